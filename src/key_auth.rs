//! KeyAuth: virtual API keys, looked up in a pluggable [`KeyStore`].
//!
//! The key is read from `Authorization: Bearer …`, `api-key` (Azure-style clients) or
//! `x-api-key` (Anthropic-style clients). If several are sent they must agree. The key is
//! digested once (SHA-256) and looked up by digest; the plaintext goes nowhere. A found key
//! that is enabled, unexpired and used from an allowed address goes into the request's
//! extensions as `Arc<ApiKey>`, and the three key headers are removed before the inner
//! service sees the request: the virtual key never travels upstream.
//!
//! A store that cannot answer fails closed with 503 `policy_unavailable`, whichever way it
//! fails:
//!
//! | the store | answer | audit flag |
//! |---|---|---|
//! | returns an error ([`StoreError`]) | 503 `policy_unavailable` | [`key_store_error`](crate::audit::flag::KEY_STORE_ERROR) |
//! | takes longer than the [lookup timeout](KeyAuthLayer::lookup_timeout_with) | 503 `policy_unavailable` | [`key_store_timeout`](crate::audit::flag::KEY_STORE_TIMEOUT) |
//! | panics (in [`KeyStore::lookup_now`], in [`KeyStore::lookup`] or in its future) | 503 `policy_unavailable` | [`key_store_panic`](crate::audit::flag::KEY_STORE_PANIC) |
//!
//! # Panics in the store are contained
//!
//! A store is user code. A panic in it is caught (`catch_unwind`) where this layer calls or
//! polls it, so that it takes down neither the request nor the connection (nor, in a `Drop`
//! during unwinding, the process): the request is answered 503 `policy_unavailable` — the
//! policy could not be decided, so it fails closed, like any store outage; 503 rather than
//! 500 because the client can do nothing about it but retry — and the audit record is written
//! as for any rejection, with the flag `key_store_panic`. The panic's payload is never logged
//! nor recorded by this crate (it could hold anything); with the `tracing` feature an `ERROR`
//! event without it says that the store panicked. (The process's panic hook, which is not this
//! crate's, still prints the panic message as it does for every panic.)
//!
//! # Lookup timeout
//!
//! The crate depends on no async runtime, so it cannot make a timer of its own: a timeout is
//! given a *sleep hook*, a function that returns a future completing after a duration, with
//! [`KeyAuthLayer::lookup_timeout_with`] (any runtime). With the `tokio` cargo feature,
//! `KeyAuthLayer::lookup_timeout` uses `tokio::time::sleep`. The timeout applies to the
//! asynchronous [`KeyStore::lookup`]; [`KeyStore::lookup_now`] answers synchronously and must
//! not block (the in-memory and file stores never do). The timer is started when the lookup
//! is first polled, and only for stores that do not answer at once. Without a timeout, a
//! store that never answers holds its request until the client or the server gives up.
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
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderName, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::audit::{flag, AuditHandle};
use crate::body::ResponseBody;
use crate::check::reject;
use crate::error::{LayerName, PolicyError};
use crate::keys::{ApiKey, BoxFuture, KeyDigest, KeyStore, StoreError};

/// The client's address, for keys with `allow_ips` (and the audit record's `client_ip`). The
/// host inserts it into the request's extensions (a plain [`SocketAddr`] extension is read
/// too). Without either, a key with an IP allow-list is refused: the layer never guesses and
/// never reads `X-Forwarded-For` or `Forwarded` itself.
///
/// Behind a reverse proxy, the connection's peer is the proxy. Put
/// [`ResolveClientIpLayer`](crate::ResolveClientIpLayer) before this layer (or call
/// [`TrustedProxies::client_ip`](crate::TrustedProxies::client_ip) in your server and insert
/// the result): it believes the forwarding headers only on connections from the proxies you
/// list, and then takes the right-most address that is not one of them (see
/// [`client_ip`](crate::client_ip) for the whole rule). Do not list your proxies' own ranges
/// in a key's `allow_ips`: a request whose headers cannot be read resolves to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientIp(pub IpAddr);

/// The headers a key may be presented in; all are removed before the inner service.
const KEY_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("api-key"),
    HeaderName::from_static("x-api-key"),
];

/// A sleep hook: returns a future that completes after the given duration. See
/// [`KeyAuthLayer::lookup_timeout_with`].
pub type SleepFn = Arc<dyn Fn(Duration) -> BoxFuture<'static, ()> + Send + Sync>;

/// A lookup timeout and the sleep hook that measures it.
#[derive(Clone)]
struct LookupTimeout {
    after: Duration,
    sleep: SleepFn,
}

impl std::fmt::Debug for LookupTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LookupTimeout").field(&self.after).finish()
    }
}

/// Layer that authenticates virtual API keys. See the [module docs](self).
#[derive(Clone)]
pub struct KeyAuthLayer {
    store: Arc<dyn KeyStore>,
    timeout: Option<LookupTimeout>,
}

impl KeyAuthLayer {
    /// Authenticates against `store`, with no lookup timeout.
    pub fn new(store: Arc<dyn KeyStore>) -> Self {
        KeyAuthLayer {
            store,
            timeout: None,
        }
    }

    /// Gives up on a [`KeyStore::lookup`] that has not answered after `timeout`, answering
    /// 503 `policy_unavailable` (flag `key_store_timeout`). `sleep` makes the timer: it returns
    /// a future that completes after the duration it is given, on whatever runtime the service
    /// runs on (see the [module docs](self#lookup-timeout)). It is called once per request
    /// whose store does not answer at once ([`KeyStore::lookup_now`]), when the lookup is
    /// first polled.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use tower_llm_policy::key_auth::KeyAuthLayer;
    /// use tower_llm_policy::keys::MemoryKeyStore;
    ///
    /// let layer = KeyAuthLayer::new(Arc::new(MemoryKeyStore::new()))
    ///     .lookup_timeout_with(Duration::from_secs(2), |d| Box::pin(tokio::time::sleep(d)));
    /// # drop(layer);
    /// ```
    #[must_use]
    pub fn lookup_timeout_with<F>(mut self, timeout: Duration, sleep: F) -> Self
    where
        F: Fn(Duration) -> BoxFuture<'static, ()> + Send + Sync + 'static,
    {
        self.timeout = Some(LookupTimeout {
            after: timeout,
            sleep: Arc::new(sleep),
        });
        self
    }

    /// [`lookup_timeout_with`](Self::lookup_timeout_with) with `tokio::time::sleep`: the
    /// service must run on a tokio runtime with its time driver enabled.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    #[must_use]
    pub fn lookup_timeout(self, timeout: Duration) -> Self {
        self.lookup_timeout_with(timeout, |d| Box::pin(tokio::time::sleep(d)))
    }

    /// The lookup timeout, if one is set.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout.as_ref().map(|t| t.after)
    }
}

impl std::fmt::Debug for KeyAuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyAuthLayer")
            .field("lookup_timeout", &self.timeout())
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for KeyAuthLayer {
    type Service = KeyAuth<S>;

    fn layer(&self, inner: S) -> KeyAuth<S> {
        KeyAuth {
            inner,
            store: self.store.clone(),
            timeout: self.timeout.clone(),
        }
    }
}

/// Middleware that authenticates virtual API keys. See the [module docs](self).
#[derive(Clone)]
pub struct KeyAuth<S> {
    inner: S,
    store: Arc<dyn KeyStore>,
    timeout: Option<LookupTimeout>,
}

impl<S> KeyAuth<S> {
    /// Wraps `inner`, authenticating against `store`, with no lookup timeout (see
    /// [`KeyAuthLayer::lookup_timeout_with`]).
    pub fn new(inner: S, store: Arc<dyn KeyStore>) -> Self {
        KeyAuth {
            inner,
            store,
            timeout: None,
        }
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
            .field("lookup_timeout", &self.timeout.as_ref().map(|t| t.after))
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

/// What asking the store came to.
enum Found {
    /// The store answered (a key, no key, or its error).
    Answer(Result<Option<Arc<ApiKey>>, StoreError>),
    /// The store did not answer within the lookup timeout.
    TimedOut,
    /// The store panicked.
    Panicked,
}

/// Notes a store that could not answer: an audit flag, and (feature `tracing`) an event.
/// Neither carries the key, its digest or a panic's payload.
fn store_failed<B>(req: &Request<B>, flag: &'static str, error: Option<&StoreError>) {
    if let Some(audit) = req.extensions().get::<AuditHandle>() {
        audit.flag(flag);
    }
    #[cfg(feature = "tracing")]
    match error {
        Some(error) => tracing::warn!(
            target: "tower_llm_policy::key_auth",
            %error,
            "key store error: request refused (503)"
        ),
        None if flag == flag::KEY_STORE_PANIC => tracing::error!(
            target: "tower_llm_policy::key_auth",
            "key store panicked: request refused (503)"
        ),
        None => tracing::warn!(
            target: "tower_llm_policy::key_auth",
            "key store did not answer in time: request refused (503)"
        ),
    }
    #[cfg(not(feature = "tracing"))]
    let _ = error;
}

/// Applies a found key to the request, or says why it is refused. A found key is written into
/// the audit handle either way.
fn admit<B>(req: &mut Request<B>, found: Found) -> Result<(), PolicyError> {
    let found = match found {
        Found::Answer(Ok(found)) => found,
        Found::Answer(Err(error)) => {
            store_failed(req, flag::KEY_STORE_ERROR, Some(&error));
            return Err(PolicyError::PolicyUnavailable);
        }
        Found::TimedOut => {
            store_failed(req, flag::KEY_STORE_TIMEOUT, None);
            return Err(PolicyError::PolicyUnavailable);
        }
        Found::Panicked => {
            store_failed(req, flag::KEY_STORE_PANIC, None);
            return Err(PolicyError::PolicyUnavailable);
        }
    };
    let key = found.ok_or(PolicyError::InvalidKey)?;
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
    // The clock is read only for a key that expires.
    if key.expires_at.is_some() && key.is_expired_at(SystemTime::now()) {
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
        // The store is user code: a panic in it is contained (see the module docs).
        let now = match catch_unwind(AssertUnwindSafe(|| self.store.lookup_now(&digest))) {
            Ok(now) => now.map(Found::Answer),
            Err(_panic) => Some(Found::Panicked),
        };
        if let Some(found) = now {
            return match admit(&mut req, found) {
                Ok(()) => {
                    crate::audit::forwarding(&req);
                    ResponseFuture {
                        state: State::Inner {
                            future: self.inner.call(req),
                        },
                    }
                }
                Err(error) => ResponseFuture::rejected(error),
            };
        }
        let store = self.store.clone();
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            state: State::Lookup {
                lookup: Box::pin(async move { store.lookup(&digest).await }),
                timeout: self.timeout.clone(),
                timer: None,
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
            timeout: Option<LookupTimeout>,
            timer: Option<BoxFuture<'static, ()>>,
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

/// Polls the store's lookup, and the timer when there is a timeout; a panic in either is
/// caught (after which neither is polled again: the state moves on).
fn poll_lookup(
    lookup: &mut BoxFuture<'static, Result<Option<Arc<ApiKey>>, StoreError>>,
    timeout: &Option<LookupTimeout>,
    timer: &mut Option<BoxFuture<'static, ()>>,
    cx: &mut Context<'_>,
) -> Poll<Found> {
    let polled = catch_unwind(AssertUnwindSafe(|| {
        if let Poll::Ready(found) = lookup.as_mut().poll(cx) {
            return Poll::Ready(Found::Answer(found));
        }
        let Some(timeout) = timeout else {
            return Poll::Pending;
        };
        let timer = timer.get_or_insert_with(|| (timeout.sleep)(timeout.after));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Found::TimedOut),
            Poll::Pending => Poll::Pending,
        }
    }));
    polled.unwrap_or(Poll::Ready(Found::Panicked))
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
                StateProj::Lookup {
                    lookup,
                    timeout,
                    timer,
                    req,
                    inner,
                } => {
                    let found = ready!(poll_lookup(lookup, timeout, timer, cx));
                    let mut req = req.take().expect("ResponseFuture polled after completion");
                    let next = match admit(&mut req, found) {
                        Ok(()) => {
                            let mut svc = inner
                                .take()
                                .expect("ResponseFuture polled after completion");
                            crate::audit::forwarding(&req);
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
