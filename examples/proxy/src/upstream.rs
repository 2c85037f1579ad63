//! The example proxy's forwarding client: a tower `Service` that sends a request on to an
//! OpenAI-compatible upstream with the provider's key, and streams the answer back.
//!
//! ```ignore
//! let upstream = Upstream::builder("https://api.openai.com/v1")
//!     .provider_key(std::env::var("OPENAI_API_KEY").ok())
//!     .build()?;
//! // `POST /v1/chat/completions?x=1` goes to `https://api.openai.com/v1/chat/completions?x=1`.
//! let response = upstream.oneshot(request).await?; // the error type is `Infallible`
//! ```
//!
//! What it does to a request:
//! - the path must be `/v1` or `/v1/<rest>`; it goes to `<base_url>/<rest>`, query kept;
//!   anything else (and a `.`/`..` segment, which could climb out of the base path) is
//!   answered here with an OpenAI-shaped 404 and never sent;
//! - `authorization`, `api-key` and `x-api-key` are removed, and `authorization: Bearer
//!   <provider key>` (marked sensitive) is set when a key is configured;
//! - hop-by-hop headers (and those named in `Connection`) are removed, both ways;
//! - `accept-encoding: identity` (the policy layers read bodies; they do not decompress),
//!   and `host` set to the upstream's authority.
//!
//! Bodies stream both ways, frame by frame. Failures are answered, never returned as a
//! `Service` error: 504 `upstream_timeout` when connecting or waiting for the response
//! headers takes too long, 502 `upstream_unavailable` when the upstream cannot be reached.
//! A response body that stays silent longer than the idle timeout ends with an
//! [`IdleTimeout`] error.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Extensions, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{Instant, Sleep};
use tower::Service;

/// A boxed error, as bodies and hyper use them.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The request body type the client sends: any incoming body, boxed once.
type UpBody = UnsyncBoxBody<Bytes, BoxError>;

/// Default for [`UpstreamBuilder::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`UpstreamBuilder::first_byte_timeout`]: a long non-streamed completion of a
/// reasoning model can take minutes before its headers come.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default for [`UpstreamBuilder::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an unused pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Headers that belong to one connection and are never forwarded (RFC 9110 §7.6.1, plus the
/// de-facto `keep-alive` and `proxy-connection`).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
];

/// Client credentials that must not reach the upstream: the proxy's virtual keys travel in
/// any of these (OpenAI's `authorization`, Azure's `api-key`, Anthropic-style `x-api-key`).
const CLIENT_KEY_HEADERS: &[&str] = &["authorization", "api-key", "x-api-key"];

/// Forwards requests to an OpenAI-compatible upstream. Cheap to clone (the connection pool
/// is shared).
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<HttpsConnector<HttpConnector>, UpBody>,
    base_url: String,
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    /// The base path without a trailing `/` (empty for a base URL without a path).
    base_path: String,
    /// `Bearer <provider key>`, marked sensitive.
    authorization: Option<HeaderValue>,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("Upstream")
            .field("base_url", &inner.base_url)
            // Whether there is one, never the key.
            .field(
                "provider_key",
                &inner.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("first_byte_timeout", &inner.first_byte_timeout)
            .field("idle_timeout", &inner.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// Configures an [`Upstream`].
#[derive(Clone)]
pub struct UpstreamBuilder {
    base_url: String,
    provider_key: Option<String>,
    connect_timeout: Duration,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
}

impl fmt::Debug for UpstreamBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamBuilder")
            .field("base_url", &self.base_url)
            .field(
                "provider_key",
                &self.provider_key.as_ref().map(|_| "<redacted>"),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl UpstreamBuilder {
    /// The provider's API key, sent as `authorization: Bearer <key>`. `None` or an empty key
    /// sends no `authorization` at all.
    #[must_use]
    pub fn provider_key(mut self, key: Option<String>) -> Self {
        self.provider_key = key.filter(|k| !k.is_empty());
        self
    }

    /// Longest time to open the TCP connection ([`DEFAULT_CONNECT_TIMEOUT`]).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Longest time from sending the request (connecting and uploading included) to the
    /// response headers ([`DEFAULT_FIRST_BYTE_TIMEOUT`]).
    #[must_use]
    pub fn first_byte_timeout(mut self, timeout: Duration) -> Self {
        self.first_byte_timeout = timeout;
        self
    }

    /// Longest silence while reading the response body ([`DEFAULT_IDLE_TIMEOUT`]).
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Builds the client. Fails on a base URL that is not `http(s)://host[:port][/path]`, or a
    /// key that cannot be a header value (the error never shows the key).
    pub fn build(self) -> Result<Upstream, ConfigError> {
        let uri: Uri = self
            .base_url
            .parse()
            .map_err(|_| ConfigError("the base URL is not a valid URL"))?;
        let scheme = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
            _ => {
                return Err(ConfigError(
                    "the base URL must start with http:// or https://",
                ))
            }
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or(ConfigError("the base URL has no host"))?;
        if authority.as_str().contains('@') {
            return Err(ConfigError("the base URL must not contain credentials"));
        }
        if uri.query().is_some() {
            return Err(ConfigError("the base URL must not have a query string"));
        }
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| ConfigError("the base URL's host is not a valid header value"))?;
        let base_path = uri.path().trim_end_matches('/').to_owned();

        let authorization = match self.provider_key {
            Some(key) => {
                let mut value = HeaderValue::try_from(format!("Bearer {key}"))
                    .map_err(|_| ConfigError("the provider key is not a valid header value"))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };

        let mut http = HttpConnector::new();
        http.enforce_http(false); // https:// URIs go through it to the TLS wrapper
        http.set_connect_timeout(Some(self.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            // An explicit provider: no process-wide default to install, and no panic if some
            // other dependency also enables aws-lc-rs.
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|_| ConfigError("TLS setup failed"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(https);

        Ok(Upstream {
            inner: Arc::new(Inner {
                client,
                base_url: format!("{scheme}://{authority}{base_path}"),
                scheme,
                authority,
                host,
                base_path,
                authorization,
                first_byte_timeout: self.first_byte_timeout,
                idle_timeout: self.idle_timeout,
            }),
        })
    }
}

/// A bad [`UpstreamBuilder`] setting. The message never contains the provider key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(&'static str);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl StdError for ConfigError {}

impl Upstream {
    /// Starts configuring a client for `base_url`, e.g. `https://api.openai.com/v1`.
    pub fn builder(base_url: impl Into<String>) -> UpstreamBuilder {
        UpstreamBuilder {
            base_url: base_url.into(),
            provider_key: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }

    /// A client for `base_url` with `provider_key` and the default timeouts.
    pub fn new(
        base_url: impl Into<String>,
        provider_key: Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::builder(base_url).provider_key(provider_key).build()
    }

    /// The base URL, normalised (no trailing `/`).
    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    /// Whether a provider key is configured.
    pub fn has_provider_key(&self) -> bool {
        self.inner.authorization.is_some()
    }

    /// The upstream URI for an incoming `/v1/...` URI, or `None` for a path outside `/v1` or
    /// with a dot segment.
    fn target(&self, incoming: &Uri) -> Option<Uri> {
        let path = incoming.path();
        let rest = path.strip_prefix("/v1")?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None; // `/v1beta/...` is not under `/v1`
        }
        let dot_segment = rest.split('/').any(|segment| {
            let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
            decoded == "." || decoded == ".."
        });
        if dot_segment {
            return None;
        }
        let inner = &self.inner;
        let mut target = String::with_capacity(inner.base_path.len() + rest.len() + 32);
        target.push_str(&inner.base_path);
        target.push_str(rest);
        if target.is_empty() {
            target.push('/');
        }
        if let Some(query) = incoming.query() {
            target.push('?');
            target.push_str(query);
        }
        let path_and_query = PathAndQuery::try_from(target).ok()?;
        Uri::builder()
            .scheme(inner.scheme.clone())
            .authority(inner.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .ok()
    }

    async fn forward(self, req: Request<UpBody>) -> Response<UpstreamBody> {
        let (mut parts, body) = req.into_parts();
        let Some(uri) = self.target(&parts.uri) else {
            return error_response(
                StatusCode::NOT_FOUND,
                &format!("Invalid URL ({} {})", parts.method, parts.uri.path()),
                "invalid_request_error",
                "unknown_url",
            );
        };
        let inner = &self.inner;
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        for name in CLIENT_KEY_HEADERS {
            headers.remove(*name);
        }
        if let Some(authorization) = &inner.authorization {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        headers.insert(header::HOST, inner.host.clone());
        parts.uri = uri;
        // The client picks HTTP/1.1 or HTTP/2 by ALPN; an incoming HTTP/2 request would
        // otherwise force HTTP/2 with prior knowledge on a plain-HTTP upstream.
        parts.version = Version::HTTP_11;
        // The incoming request's extensions (connection info, policy views) are for this
        // side only.
        parts.extensions = Extensions::new();

        let request = Request::from_parts(parts, body);
        let response =
            match tokio::time::timeout(inner.first_byte_timeout, inner.client.request(request))
                .await
            {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => return failure(&err),
                Err(_elapsed) => {
                    tracing::warn!(
                        upstream = %inner.base_url,
                        "upstream response headers did not come in time"
                    );
                    return error_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        "The upstream did not answer in time.",
                        "server_error",
                        "upstream_timeout",
                    );
                }
            };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, UpstreamBody::streaming(body, inner.idle_timeout))
    }
}

/// The answer to a failed upstream request: 504 if a timeout is behind it, 502 otherwise.
fn failure(err: &hyper_util::client::legacy::Error) -> Response<UpstreamBody> {
    // hyper's errors carry no headers, so the provider key cannot be in them; the answer
    // uses fixed messages all the same.
    tracing::warn!(error = ?err, "upstream request failed");
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::TimedOut {
                return error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Connecting to the upstream timed out.",
                    "server_error",
                    "upstream_timeout",
                );
            }
        }
        source = e.source();
    }
    let message = if err.is_connect() {
        "Could not connect to the upstream."
    } else {
        "The connection to the upstream failed."
    };
    error_response(
        StatusCode::BAD_GATEWAY,
        message,
        "server_error",
        "upstream_unavailable",
    )
}

/// An OpenAI-shaped error response: `{"error":{"message","type","param":null,"code"}}`.
pub fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: &str,
) -> Response<UpstreamBody> {
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    let mut response = Response::new(UpstreamBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Removes the hop-by-hop headers, and those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

impl<B> Service<Request<B>> for Upstream
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<UpstreamBody>;
    type Error = Infallible;
    // Boxed: the future holds hyper's and tokio's, and this is the last service of the
    // stack, once per request, next to a network round trip.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The pool opens connections on demand; there is nothing to wait for.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let this = self.clone();
        let req = req.map(|body| body.map_err(Into::into).boxed_unsync());
        Box::pin(async move { Ok(this.forward(req).await) })
    }
}

/// The response body: the upstream's, frame by frame, or an error answered here.
pub struct UpstreamBody {
    kind: Kind,
}

enum Kind {
    Streaming {
        body: Incoming,
        idle: Duration,
        timer: Pin<Box<Sleep>>,
    },
    Full(Option<Bytes>),
    Done,
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Streaming { .. } => "streaming",
            Kind::Full(_) => "full",
            Kind::Done => "done",
        };
        f.debug_struct("UpstreamBody").field("kind", &kind).finish()
    }
}

impl UpstreamBody {
    fn streaming(body: Incoming, idle: Duration) -> Self {
        Self {
            kind: Kind::Streaming {
                body,
                idle,
                timer: Box::pin(tokio::time::sleep(idle)),
            },
        }
    }

    /// A body of one frame.
    pub fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full(Some(bytes)),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let (polled, finished) = match &mut this.kind {
            Kind::Full(bytes) => return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Done => return Poll::Ready(None),
            Kind::Streaming { body, idle, timer } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    timer.as_mut().reset(Instant::now() + *idle);
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(err))) => (Some(Err(err.into())), true),
                Poll::Ready(None) => (None, true),
                Poll::Pending => match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        tracing::warn!(idle = ?idle, "upstream response body went idle");
                        (Some(Err(IdleTimeout(*idle).into())), true)
                    }
                    Poll::Pending => return Poll::Pending,
                },
            },
        };
        if finished {
            // Drops the connection of a failed body, and the timer.
            this.kind = Kind::Done;
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Streaming { body, .. } => body.is_end_stream(),
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Streaming { body, .. } => body.size_hint(),
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) | Kind::Done => SizeHint::with_exact(0),
        }
    }
}

/// The upstream's response body sent nothing for the configured idle time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTimeout(pub Duration);

impl fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the upstream sent nothing for {:?}", self.0)
    }
}

impl StdError for IdleTimeout {}
