//! KeyAuth: virtual API keys, looked up in a pluggable [`KeyStore`].
//!
//! The key is read from `Authorization: Bearer …`, `api-key` (Azure-style clients) or
//! `x-api-key` (Anthropic-style clients). If several are sent they must agree. The key is
//! digested once (SHA-256) and looked up by digest; the plaintext goes nowhere. A found key
//! that is enabled, unexpired and used from an allowed address goes into the request's
//! extensions as `Arc<ApiKey>`, and the three key headers are removed before the inner
//! service sees the request: the virtual key never travels upstream.
//!
//! A store that cannot answer fails closed with 503 `policy_unavailable`.
//!
//! The body is passed on untouched: nothing of it is read here. Behind an [`AuditLayer`](crate::AuditLayer), the found key
//! (admitted or refused) is written into the request's [`AuditHandle`] for the record.
//!
//! ```
//! use std::sync::Arc;
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_policy::key_auth::KeyAuthLayer;
//! use tower_llm_policy::keys::{ApiKey, MemoryKeyStore};
//!
//! # tokio_test();
//! # fn tokio_test() { tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let store = MemoryKeyStore::new().with_key("sk-team-a", ApiKey::new("team-a"));
//! let svc = ServiceBuilder::new()
//!     .layer(KeyAuthLayer::new(Arc::new(store)))
//!     .service(service_fn(|req: Request<String>| async move {
//!         // The virtual key was removed; the key's policy is in the extensions.
//!         assert!(req.headers().get("authorization").is_none());
//!         assert_eq!(req.extensions().get::<Arc<ApiKey>>().unwrap().name, "team-a");
//!         Ok::<_, std::convert::Infallible>(Response::new(String::new()))
//!     }));
//!
//! let ok = svc.clone().oneshot(Request::post("/v1/chat/completions")
//!     .header("authorization", "Bearer sk-team-a").body(String::new()).unwrap()).await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//!
//! let denied = svc.oneshot(Request::post("/v1/chat/completions")
//!     .header("authorization", "Bearer sk-wrong").body(String::new()).unwrap()).await.unwrap();
//! assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
//! # }) }
//! ```

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use http::{header, HeaderMap, HeaderName, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::audit::AuditHandle;
use crate::body::ResponseBody;
use crate::check::reject;
use crate::error::{LayerName, PolicyError};
use crate::keys::{ApiKey, BoxFuture, KeyDigest, KeyStore, StoreError};

/// The client's address, for keys with `allow_ips`. The host inserts it into the request's
/// extensions (a plain [`SocketAddr`] extension is read too). Without either, a key with an
/// IP allow-list is refused: the layer never guesses and never trusts `X-Forwarded-For`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientIp(pub IpAddr);

/// The headers a key may be presented in; all are removed before the inner service.
const KEY_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-api-key"),
];

/// Layer that authenticates virtual API keys. See the [module docs](self).
#[derive(Clone)]
pub struct KeyAuthLayer {
    store: Arc<dyn KeyStore>,
}

impl KeyAuthLayer {
    /// Authenticates against `store`.
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        KeyAuthLayer { store }
    }
}

impl std::fmt::Debug for KeyAuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAuthLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for KeyAuthLayer {
    type Service = KeyAuth<S>;

    fn layer(&self, inner: S) -> KeyAuth<S> {
        KeyAuth {
            inner,
            store: self.store.clone(),
        }
    }
}

/// Middleware that authenticates virtual API keys. See the [module docs](self).
#[derive(Clone)]
pub struct KeyAuth<S> {
    inner: S,
    store: Arc<dyn KeyStore>,
}

impl<S> KeyAuth<S> {
    /// Wraps `inner`, authenticating against `store`.
    pub fn new(inner: S, store: Arc<dyn KeyStore>) -> Self {
        KeyAuth { inner, store }
    }

    /// A [`KeyAuthLayer`] for `store`.
    pub fn layer(store: Arc<dyn KeyStore>) -> KeyAuthLayer {
        KeyAuthLayer::new(store)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for KeyAuth<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAuth")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Reads the presented key from the request headers. Several headers must agree.
fn presented_key(headers: &HeaderMap) -> Result<&str, PolicyError> {
    fn take<'h>(found: &mut Option<&'h str>, candidate: &'h str) -> Result<(), PolicyError> {
        let candidate = candidate.trim();
        if candidate.is_empty() {
            return Ok(());
        }
        match *found {
            Some(existing) if existing != candidate => Err(PolicyError::InvalidKey),
            _ => {
                *found = Some(candidate);
                Ok(())
            }
        }
    }
    let mut found = None;
    for value in headers.get_all(header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| PolicyError::InvalidKey)?.trim();
        let (scheme, token) = value.split_once(' ').ok_or(PolicyError::InvalidKey)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(PolicyError::InvalidKey);
        }
        take(&mut found, token)?;
    }
    for name in &KEY_HEADERS {
        for value in headers.get_all(name) {
            take(
                &mut found,
                value.to_str().map_err(|_| PolicyError::InvalidKey)?,
            )?;
        }
    }
    found.ok_or(PolicyError::MissingKey)
}

fn client_ip<B>(req: &Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<ClientIp>()
        .map(|c| c.0)
        .or_else(|| ext.get::<SocketAddr>().map(SocketAddr::ip))
}

/// Applies a found key to the request, or says why it is refused. A found key is written into
/// the audit handle either way.
fn admit<B>(
    req: &mut Request<B>,
    found: Result<Option<Arc<ApiKey>>, StoreError>,
) -> Result<(), PolicyError> {
    let key = found
        .map_err(|_| PolicyError::PolicyUnavailable)?
        .ok_or(PolicyError::InvalidKey)?;
    if let Some(audit) = req.extensions().get::<AuditHandle>() {
        audit.set_key(key.clone());
    }
    check_key(req, &key)?;
    let headers = req.headers_mut();
    headers.remove(header::AUTHORIZATION);
    for name in &KEY_HEADERS {
        headers.remove(name);
    }
    req.extensions_mut().insert(key);
    Ok(())
}

/// Whether a found key may be used for this request.
fn check_key<B>(req: &Request<B>, key: &ApiKey) -> Result<(), PolicyError> {
    if key.disabled {
        return Err(PolicyError::KeyDisabled);
    }
    if key.is_expired_at(SystemTime::now()) {
        return Err(PolicyError::KeyExpired);
    }
    if !key.allow_ips.is_empty() {
        let ip = client_ip(req).ok_or(PolicyError::IpNotAllowed(
            "This key is restricted to certain client addresses and the client address is unknown."
                .into(),
        ))?;
        // An IPv4 client seen through an IPv6 socket (::ffff:a.b.c.d) counts as IPv4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if !key.allow_ips.iter().any(|net| net.contains(&ip)) {
            return Err(PolicyError::IpNotAllowed(
                format!("This key may not be used from {ip}.").into(),
            ));
        }
    }
    Ok(())
}

impl<S, B, ResBody> Service<Request<B>> for KeyAuth<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let digest = match presented_key(req.headers()) {
            Ok(key) => KeyDigest::of(key),
            Err(error) => return ResponseFuture::rejected(error),
        };
        // Stores that can answer at once (in memory, a file) need no boxed future and no
        // clone of the inner service: decide now and call the (ready) inner service.
        if let Some(found) = self.store.lookup_now(&digest) {
            return match admit(&mut req, found) {
                Ok(()) => ResponseFuture {
                    state: State::Inner {
                        future: self.inner.call(req),
                    },
                },
                Err(error) => ResponseFuture::rejected(error),
            };
        }
        let store = self.store.clone();
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            state: State::Lookup {
                lookup: Box::pin(async move { store.lookup(&digest).await }),
                req: Some(req),
                inner: Some(inner),
            },
        }
    }
}

pin_project! {
    /// Response future of [`KeyAuth`].
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        Lookup {
            lookup: BoxFuture<'static, Result<Option<Arc<ApiKey>>, StoreError>>,
            req: Option<Request<B>>,
            inner: Option<S>,
        },
        Inner {
            #[pin]
            future: S::Future,
        },
        Rejected {
            error: Option<PolicyError>,
        },
    }
}

impl<S: Service<Request<B>>, B> ResponseFuture<S, B> {
    fn rejected(error: PolicyError) -> Self {
        ResponseFuture {
            state: State::Rejected { error: Some(error) },
        }
    }
}

impl<S: Service<Request<B>>, B> std::fmt::Debug for ResponseFuture<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Lookup { lookup, req, inner } => {
                    let found = ready!(lookup.as_mut().poll(cx));
                    let mut req = req.take().expect("ResponseFuture polled after completion");
                    let next = match admit(&mut req, found) {
                        Ok(()) => {
                            let mut svc = inner
                                .take()
                                .expect("ResponseFuture polled after completion");
                            State::Inner {
                                future: svc.call(req),
                            }
                        }
                        Err(error) => State::Rejected { error: Some(error) },
                    };
                    state.set(next);
                }
                StateProj::Inner { future } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                StateProj::Rejected { error } => {
                    let error = error
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(reject(error, LayerName::KeyAuth)));
                }
            }
        }
    }
}
