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
//! - `authorization`, `api-key`, `x-api-key` and `x-goog-api-key` are removed, and
//!   `authorization: Bearer <provider key>` (marked sensitive) is set when a key is
//!   configured;
//! - query parameters that carry credentials (`api-key`, `api_key`, `apikey`, `key`,
//!   `access_token`, ...; see [`CREDENTIAL_QUERY_PARAMS`]) are removed from the query;
//! - the client's `OpenAI-Organization` and `OpenAI-Project` are removed (the client must not
//!   pick the billed organization); the configured ones are set instead
//!   ([`UpstreamBuilder::organization`], [`UpstreamBuilder::project`]), unless
//!   [`UpstreamBuilder::forward_client_organization`] lets the client's through;
//! - what identifies the client to the upstream is removed: `Cookie`, `Forwarded`,
//!   `X-Forwarded-*`, `X-Real-IP` and the like ([`CLIENT_IDENTITY_HEADERS`]);
//! - hop-by-hop headers (and those named in `Connection`) are removed, both ways; from the
//!   response, also `Set-Cookie` and the upstream's `OpenAI-Organization` / `OpenAI-Project`
//!   (the provider account's ids are not the client's business);
//! - `accept-encoding: identity` (the policy layers read bodies; they do not decompress),
//!   and `host` set to the upstream's authority.
//!
//! What it does to a response:
//! - the provider key never reaches the client: the key, and any fragment of it of
//!   [`MIN_KEY_FRAGMENT`] or more bytes (a provider may echo `sk-abc...wxyz` or a prefix), is
//!   replaced by as many `*` in every header value, body and trailer the upstream sends,
//!   streamed or not. The replacement keeps the length, so JSON, SSE framing and a
//!   `Content-Length` stay valid; a key split across two body frames is caught (the body keeps
//!   back the last `len(key) - 1` bytes of a frame until the next one comes);
//! - a `Content-Length` that came with a `Transfer-Encoding` is dropped (RFC 9112 §6.3: the
//!   transfer coding frames the body, the length is stale), so the relay never forwards a
//!   length it does not guarantee.
//!
//! With [`UpstreamBuilder::guard_model_list`] (the proxy sets it whenever the policy is on),
//! a successful `GET /v1/models` answer must be an identity-encoded JSON object with a `data`
//! array, within the limit: anything else (an encoded, non-JSON, unparsable or oversize
//! answer) becomes a 502 `upstream_invalid_response` and never reaches the client, so that
//! the allow-list filter behind it always has a list it can filter (it passes anything it
//! cannot read untouched).
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
use http::{Extensions, Method, Request, Response, StatusCode, Uri, Version};
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
use tower_llm_policy::{Endpoint, Route};

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
/// any of these (OpenAI's `authorization`, Azure's `api-key`, Anthropic-style `x-api-key`,
/// Google-style `x-goog-api-key`).
const CLIENT_KEY_HEADERS: &[&str] = &["authorization", "api-key", "x-api-key", "x-goog-api-key"];

/// Query parameters that carry credentials in some clients (Azure's `api-key`, Google's
/// `key`, OAuth's `access_token`, ...): removed from the query sent upstream, compared
/// case-insensitively after percent-decoding. The policy never accepts a key from the query
/// (see `KeyAuth`), so one sent there is refused and, whatever else happens, never forwarded.
pub const CREDENTIAL_QUERY_PARAMS: &[&str] = &[
    "api-key",
    "api_key",
    "apikey",
    "key",
    "x-api-key",
    "access_token",
    "token",
    "auth",
    "authorization",
    "subscription-key",
];

/// Headers by which the client picks the billed organization and project: never forwarded
/// (the configured ones are set instead) unless the configuration allows it.
const ORGANIZATION_HEADERS: &[&str] = &["openai-organization", "openai-project"];

/// Headers that tell the upstream who the client is, or carry the client's session: the
/// upstream talks to the proxy, not to the client.
pub const CLIENT_IDENTITY_HEADERS: &[&str] = &[
    "cookie",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "x-cluster-client-ip",
    "via",
];

/// Response headers of the upstream that are not the client's: its cookies, and the provider
/// account's organization and project ids.
const UPSTREAM_ONLY_RESPONSE_HEADERS: &[&str] =
    &["set-cookie", "openai-organization", "openai-project"];

/// The shortest run of the provider key's bytes that is masked in responses (see the
/// [module docs](self)). Shorter runs are too likely to be ordinary text.
pub const MIN_KEY_FRAGMENT: usize = 8;

/// Finds the provider key, and runs of [`MIN_KEY_FRAGMENT`] or more of its bytes, in what the
/// upstream sends back, and masks them with `*` of the same length.
struct Redactor {
    key: Vec<u8>,
    /// The key's bytes, as a set: the end of a chunk that is none of them starts no run.
    bytes: [bool; 256],
    /// Each `MIN_KEY_FRAGMENT`-byte window of the key (read as a `u64`), with where it starts
    /// in the key; sorted, for a binary search.
    windows: Vec<(u64, usize)>,
    /// A one-hash Bloom filter of the windows, so that most positions of a body cost one
    /// load, one multiply and one bit test (`WINDOW_FILTER_BITS` bits).
    filter: Box<[u64]>,
}

/// Bits of [`Redactor::filter`]: 2^14 (2 KiB) for at most a few hundred windows.
const WINDOW_FILTER_BITS: u32 = 14;

/// The filter bit of a window.
fn window_bit(window: u64) -> usize {
    (window.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - WINDOW_FILTER_BITS)) as usize
}

fn window_at(bytes: &[u8], at: usize) -> Option<u64> {
    let window: [u8; MIN_KEY_FRAGMENT] = bytes.get(at..at + MIN_KEY_FRAGMENT)?.try_into().ok()?;
    Some(u64::from_le_bytes(window))
}

impl Redactor {
    /// A key shorter than [`MIN_KEY_FRAGMENT`] has no fragments; it is masked whole.
    fn new(key: &str) -> Self {
        let key = key.as_bytes().to_vec();
        let mut bytes = [false; 256];
        for &b in &key {
            bytes[usize::from(b)] = true;
        }
        let mut windows: Vec<(u64, usize)> = (0..key.len().saturating_sub(MIN_KEY_FRAGMENT - 1))
            .filter_map(|at| window_at(&key, at).map(|w| (w, at)))
            .collect();
        windows.sort_unstable();
        let mut filter = vec![0u64; (1 << WINDOW_FILTER_BITS) / 64].into_boxed_slice();
        for &(window, _) in &windows {
            let bit = window_bit(window);
            filter[bit / 64] |= 1 << (bit % 64);
        }
        Redactor {
            key,
            bytes,
            windows,
            filter,
        }
    }

    /// How many bytes at the end of `bytes` a body keeps back until the next frame: the
    /// longest end that is a run of the key (at most `len(key) - 1` bytes), which the next
    /// frame could continue into a fragment. Usually none: an SSE event ends with `\n\n`,
    /// and a JSON body with `}`, which no key contains, so streams are not delayed.
    fn hold(&self, bytes: &[u8]) -> usize {
        match bytes.last() {
            Some(&last) if self.bytes[usize::from(last)] => {}
            _ => return 0,
        }
        let most = self.key.len().saturating_sub(1).min(bytes.len());
        (1..=most)
            .rev()
            .find(|&n| {
                let end = &bytes[bytes.len() - n..];
                self.key.windows(n).any(|w| w == end)
            })
            .unwrap_or(0)
    }

    /// The runs of the key in `bytes` that start before `starts_before` (runs starting later
    /// may continue in bytes not seen yet; the caller keeps those back), as byte ranges. No
    /// allocation when there is none.
    fn spans(&self, bytes: &[u8], starts_before: usize) -> Vec<(usize, usize)> {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let end = starts_before.min(bytes.len());
        if self.key.len() < MIN_KEY_FRAGMENT {
            if !self.key.is_empty() {
                for at in 0..end {
                    if bytes[at..].starts_with(&self.key) {
                        spans.push((at, at + self.key.len()));
                    }
                }
            }
            return spans;
        }
        for at in 0..end {
            let Some(window) = window_at(bytes, at) else {
                break; // fewer than a fragment's bytes left
            };
            let bit = window_bit(window);
            if self.filter[bit / 64] & (1 << (bit % 64)) == 0 {
                continue;
            }
            let first = self.windows.partition_point(|&(w, _)| w < window);
            let rest = &bytes[at..];
            let longest = self.windows[first..]
                .iter()
                .take_while(|&&(w, _)| w == window)
                .map(|&(_, start)| {
                    rest.iter()
                        .zip(&self.key[start..])
                        .take_while(|(a, b)| a == b)
                        .count()
                })
                .max()
                .unwrap_or(0);
            if longest > 0 {
                spans.push((at, at + longest));
            }
        }
        spans
    }

    /// Masks in `bytes` every run of the key that starts before `starts_before` (see
    /// [`spans`](Self::spans)). Returns whether anything was masked.
    fn mask(&self, bytes: &mut [u8], starts_before: usize) -> bool {
        let spans = self.spans(bytes, starts_before);
        for &(from, to) in &spans {
            bytes[from..to].fill(b'*');
        }
        !spans.is_empty()
    }

    /// Masks a whole header map in place.
    fn mask_headers(&self, headers: &mut HeaderMap) {
        for value in headers.values_mut() {
            let mut bytes = value.as_bytes().to_vec();
            if self.mask(&mut bytes, usize::MAX) {
                let sensitive = value.is_sensitive();
                // `*` is a valid header byte, so the masked value is one too.
                if let Ok(mut masked) = HeaderValue::from_bytes(&bytes) {
                    masked.set_sensitive(sensitive);
                    *value = masked;
                }
            }
        }
    }
}

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
    /// `OpenAI-Organization` / `OpenAI-Project` to send (configured, not the client's).
    organization: Option<HeaderValue>,
    project: Option<HeaderValue>,
    forward_client_organization: bool,
    /// The largest `GET /v1/models` answer let through (guarded), if guarded.
    model_list_limit: Option<usize>,
    /// Masks the provider key in responses, when there is one.
    redactor: Option<Arc<Redactor>>,
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
            .field("organization", &inner.organization)
            .field("project", &inner.project)
            .field(
                "forward_client_organization",
                &inner.forward_client_organization,
            )
            .field("model_list_limit", &inner.model_list_limit)
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
    organization: Option<String>,
    project: Option<String>,
    forward_client_organization: bool,
    model_list_limit: Option<usize>,
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
            .field("organization", &self.organization)
            .field("project", &self.project)
            .field(
                "forward_client_organization",
                &self.forward_client_organization,
            )
            .field("model_list_limit", &self.model_list_limit)
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

    /// The `OpenAI-Organization` sent with every request (the provider account's; `None`:
    /// none is sent, and the upstream bills the key's default organization).
    #[must_use]
    pub fn organization(mut self, organization: Option<String>) -> Self {
        self.organization = organization.filter(|o| !o.is_empty());
        self
    }

    /// The `OpenAI-Project` sent with every request (`None`: none).
    #[must_use]
    pub fn project(mut self, project: Option<String>) -> Self {
        self.project = project.filter(|p| !p.is_empty());
        self
    }

    /// Whether a client's own `OpenAI-Organization` / `OpenAI-Project` go upstream (default
    /// `false`: they are removed). A configured one replaces the client's either way.
    #[must_use]
    pub fn forward_client_organization(mut self, forward: bool) -> Self {
        self.forward_client_organization = forward;
        self
    }

    /// Guards `GET /v1/models` answers (see the [module docs](self)): a successful answer
    /// must be identity-encoded JSON with a `data` array and at most `limit` bytes, or it
    /// becomes a 502. `None` (the default): answers pass as they are.
    #[must_use]
    pub fn guard_model_list(mut self, limit: Option<usize>) -> Self {
        self.model_list_limit = limit;
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

        let redactor = self
            .provider_key
            .as_deref()
            .map(|key| Arc::new(Redactor::new(key)));
        let authorization = match self.provider_key {
            Some(key) => {
                let mut value = HeaderValue::try_from(format!("Bearer {key}"))
                    .map_err(|_| ConfigError("the provider key is not a valid header value"))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };

        let header = |value: Option<String>, what: &'static str| {
            value
                .map(|v| HeaderValue::try_from(v).map_err(|_| ConfigError(what)))
                .transpose()
        };
        let organization = header(
            self.organization,
            "the organization is not a valid header value",
        )?;
        let project = header(self.project, "the project is not a valid header value")?;

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
                organization,
                project,
                forward_client_organization: self.forward_client_organization,
                model_list_limit: self.model_list_limit,
                redactor,
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
            organization: None,
            project: None,
            forward_client_organization: false,
            model_list_limit: None,
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
            let kept = without_credentials(query);
            if !kept.is_empty() {
                target.push('?');
                target.push_str(&kept);
            }
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
        for name in CLIENT_KEY_HEADERS.iter().chain(CLIENT_IDENTITY_HEADERS) {
            headers.remove(*name);
        }
        if !inner.forward_client_organization {
            for name in ORGANIZATION_HEADERS {
                headers.remove(*name);
            }
        }
        if let Some(organization) = &inner.organization {
            headers.insert("openai-organization", organization.clone());
        }
        if let Some(project) = &inner.project {
            headers.insert("openai-project", project.clone());
        }
        if let Some(authorization) = &inner.authorization {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        let guarded_limit = inner
            .model_list_limit
            .filter(|_| parts.method == Method::GET && is_model_list(&parts.uri));
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
        if parts.status.is_informational() {
            // The proxy never asks the upstream to switch protocols (`Upgrade` is a hop-by-hop
            // header it strips), so a 101 (or any 1xx as a final answer) is not an answer to
            // this request: relaying it would hand the client's connection to another protocol.
            tracing::warn!(status = %parts.status, "the upstream answered with an unrequested 1xx");
            return error_response(
                StatusCode::BAD_GATEWAY,
                "The upstream answered with a protocol switch nobody asked for.",
                "server_error",
                "upstream_invalid_response",
            );
        }
        if parts.headers.contains_key(header::TRANSFER_ENCODING) {
            // RFC 9112 §6.3: the transfer coding frames the body and the length is stale; the
            // body is re-framed on the way out, so a length we do not guarantee must go.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        strip_hop_by_hop(&mut parts.headers);
        for name in UPSTREAM_ONLY_RESPONSE_HEADERS {
            parts.headers.remove(*name);
        }
        if let Some(redactor) = &inner.redactor {
            redactor.mask_headers(&mut parts.headers);
        }
        let body = UpstreamBody::streaming(body, inner.idle_timeout, inner.redactor.clone());
        match guarded_limit {
            Some(limit) => guard_model_list(parts, body, limit).await,
            None => Response::from_parts(parts, body),
        }
    }
}

/// Whether the request is the model list (`/v1/models`, not one model), as the policy
/// classifies it.
fn is_model_list(uri: &Uri) -> bool {
    let route = Route::classify(uri);
    route.endpoint == Endpoint::Models && route.path_model.is_none()
}

/// The query without its credential-bearing parameters ([`CREDENTIAL_QUERY_PARAMS`]).
/// Parameters are kept byte for byte, in order.
fn without_credentials(query: &str) -> String {
    let mut kept = String::with_capacity(query.len());
    for pair in query.split('&') {
        let name = pair.split('=').next().unwrap_or_default();
        let name = percent_decode_lower(name);
        if CREDENTIAL_QUERY_PARAMS.contains(&name.as_str()) {
            continue;
        }
        if !kept.is_empty() {
            kept.push('&');
        }
        kept.push_str(pair);
    }
    kept
}

/// A query parameter name, percent-decoded (`+` as a space), lowercased. Undecodable bytes are
/// kept as they are (such a name matches no credential parameter, which are all ASCII).
fn percent_decode_lower(name: &str) -> String {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let hex = |c: u8| (c as char).to_digit(16);
        if b == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b == b'+' { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).trim().to_ascii_lowercase()
}

/// Lets a successful model list through only as identity-encoded JSON with a `data` array,
/// within `limit` bytes; anything else is a 502. Errors of the upstream pass as they are.
async fn guard_model_list(
    mut parts: http::response::Parts,
    body: UpstreamBody,
    limit: usize,
) -> Response<UpstreamBody> {
    if !parts.status.is_success() {
        return Response::from_parts(parts, body);
    }
    let refuse = |why: &'static str| {
        tracing::warn!(why, "the upstream's model list was refused");
        error_response(
            StatusCode::BAD_GATEWAY,
            "The upstream answered the model list with a response the proxy cannot check.",
            "server_error",
            "upstream_invalid_response",
        )
    };
    let headers = &parts.headers;
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return refuse("content-encoding");
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.split(';').next())
        .map(|ct| ct.trim().to_ascii_lowercase())
        .is_some_and(|ct| ct == "application/json" || ct.ends_with("+json"));
    if !json {
        return refuse("content-type");
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return refuse("declared length over the limit");
    }
    let bytes = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            return refuse("length over the limit")
        }
        Err(_) => return refuse("body failed"),
    };
    let is_list = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .is_some_and(|v| v.get("data").is_some_and(serde_json::Value::is_array));
    if !is_list {
        return refuse("not a JSON model list");
    }
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    parts.headers.remove(header::TRANSFER_ENCODING);
    Response::from_parts(parts, UpstreamBody::full(bytes))
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
        /// Masks the provider key, with the bytes kept back from the last frame.
        redactor: Option<Arc<Redactor>>,
        held: Vec<u8>,
    },
    Full(Option<Bytes>),
    /// The masked bytes kept back when the body ended early (trailers, an error), then that
    /// last frame or error.
    Tail(Option<Bytes>, Option<Result<Frame<Bytes>, BoxError>>),
    Done,
}

impl Kind {
    /// The end of a streaming body that failed: the bytes kept back (masked), then `err`.
    /// Replacing the streaming state drops the connection and the timer.
    fn tail(held: &mut Vec<u8>, redactor: Option<&Redactor>, err: BoxError) -> Kind {
        let mut rest = std::mem::take(held);
        if let Some(redactor) = redactor {
            redactor.mask(&mut rest, usize::MAX);
        }
        let rest = (!rest.is_empty()).then(|| Bytes::from(rest));
        Kind::Tail(rest, Some(Err(err)))
    }
}

impl fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Streaming { .. } => "streaming",
            Kind::Full(_) => "full",
            Kind::Tail(..) => "tail",
            Kind::Done => "done",
        };
        f.debug_struct("UpstreamBody").field("kind", &kind).finish()
    }
}

impl UpstreamBody {
    fn streaming(body: Incoming, idle: Duration, redactor: Option<Arc<Redactor>>) -> Self {
        Self {
            kind: Kind::Streaming {
                body,
                idle,
                timer: Box::pin(tokio::time::sleep(idle)),
                redactor,
                held: Vec::new(),
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
        loop {
            let (polled, finished) = match &mut this.kind {
                Kind::Full(bytes) => return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
                Kind::Done => return Poll::Ready(None),
                Kind::Streaming {
                    body,
                    idle,
                    timer,
                    redactor,
                    held,
                } => match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        timer.as_mut().reset(Instant::now() + *idle);
                        let Some(redactor) = redactor else {
                            return Poll::Ready(Some(Ok(frame)));
                        };
                        match frame.into_data() {
                            // The usual frame: nothing kept back from the last, nothing to
                            // mask, nothing to keep back: passed on as it is, uncopied.
                            Ok(data)
                                if held.is_empty()
                                    && redactor.hold(&data) == 0
                                    && redactor.spans(&data, data.len()).is_empty() =>
                            {
                                return Poll::Ready(Some(Ok(Frame::data(data))));
                            }
                            Ok(data) => {
                                held.extend_from_slice(&data);
                                let out = held.len() - redactor.hold(held);
                                redactor.mask(held, out);
                                if out == 0 {
                                    continue; // too little yet to tell
                                }
                                let rest = held.split_off(out);
                                let data = Bytes::from(std::mem::replace(held, rest));
                                return Poll::Ready(Some(Ok(Frame::data(data))));
                            }
                            Err(frame) => match frame.into_trailers() {
                                Ok(mut trailers) => {
                                    redactor.mask_headers(&mut trailers);
                                    // Trailers come last: what was kept back goes first.
                                    let mut rest = std::mem::take(held);
                                    redactor.mask(&mut rest, usize::MAX);
                                    if rest.is_empty() {
                                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                                    }
                                    this.kind = Kind::Tail(
                                        Some(rest.into()),
                                        Some(Ok(Frame::trailers(trailers))),
                                    );
                                    continue;
                                }
                                Err(_) => continue, // neither data nor trailers: dropped
                            },
                        }
                    }
                    Poll::Ready(Some(Err(err))) => {
                        // What was kept back arrived before the failure: it goes first.
                        this.kind = Kind::tail(held, redactor.as_deref(), err.into());
                        continue;
                    }
                    Poll::Ready(None) => {
                        let mut rest = std::mem::take(held);
                        if let Some(redactor) = redactor {
                            redactor.mask(&mut rest, usize::MAX);
                        }
                        if rest.is_empty() {
                            (None, true)
                        } else {
                            (Some(Ok(Frame::data(Bytes::from(rest)))), true)
                        }
                    }
                    Poll::Pending => match timer.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            tracing::warn!(idle = ?idle, "upstream response body went idle");
                            let err = IdleTimeout(*idle).into();
                            this.kind = Kind::tail(held, redactor.as_deref(), err);
                            continue;
                        }
                        Poll::Pending => return Poll::Pending,
                    },
                },
                Kind::Tail(data, last) => {
                    if let Some(data) = data.take() {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    (last.take(), true)
                }
            };
            if finished {
                // Drops the connection of a failed body, and the timer.
                this.kind = Kind::Done;
            }
            return Poll::Ready(polled);
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Streaming { body, held, .. } => body.is_end_stream() && held.is_empty(),
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Tail(data, trailers) => data.is_none() && trailers.is_none(),
            Kind::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Streaming { body, held, .. } => {
                // Masking keeps the length: what is left is the upstream's plus what is held.
                let hint = body.size_hint();
                let held = held.len() as u64;
                let mut out = SizeHint::new();
                out.set_lower(hint.lower() + held);
                if let Some(upper) = hint.upper() {
                    out.set_upper(upper + held);
                }
                out
            }
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Tail(Some(data), _) => SizeHint::with_exact(data.len() as u64),
            Kind::Full(None) | Kind::Tail(None, _) | Kind::Done => SizeHint::with_exact(0),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_parameters_are_removed_from_the_query_and_the_rest_kept_as_is() {
        let cases = [
            (
                "api-version=2024-10-21&api-key=sk-1",
                "api-version=2024-10-21",
            ),
            ("key=sk-1", ""),
            ("KEY=sk-1&Api_Key=sk-2&APIKEY=sk-3&access_token=t", ""),
            // Percent-encoded and `+`-padded names are decoded before comparing.
            ("%6Bey=sk-1&api%2Dkey=sk-2&%20key+=sk-3&a=1", "a=1"),
            // A name without a value is a credential parameter all the same.
            ("key&after=2", "after=2"),
            // Names that merely contain a credential name are kept, and so is everything
            // else, byte for byte and in order (empty pairs included).
            ("monkey=1&keys=2&x=%41&&y", "monkey=1&keys=2&x=%41&&y"),
            (
                "model=gpt-4o&key=sk-1&deployment=d",
                "model=gpt-4o&deployment=d",
            ),
        ];
        for (query, kept) in cases {
            assert_eq!(without_credentials(query), kept, "{query}");
        }
    }

    #[test]
    fn the_target_has_no_query_when_only_credentials_were_in_it() {
        let upstream = Upstream::new("http://upstream.test/v1", None).unwrap();
        let target = |uri: &str| upstream.target(&uri.parse().unwrap()).unwrap().to_string();
        assert_eq!(
            target("/v1/models?key=sk-1"),
            "http://upstream.test/v1/models"
        );
        assert_eq!(
            target("/v1/chat/completions?api-key=sk-1&api-version=1"),
            "http://upstream.test/v1/chat/completions?api-version=1"
        );
    }

    /// The runs the redactor must find, by brute force: at each position, the longest
    /// common prefix with any suffix of the key, when at least a fragment long (or the whole
    /// key, for a short key).
    fn naive_spans(key: &[u8], bytes: &[u8]) -> Vec<(usize, usize)> {
        (0..bytes.len())
            .filter_map(|at| {
                let longest = (0..key.len())
                    .map(|start| {
                        bytes[at..]
                            .iter()
                            .zip(&key[start..])
                            .take_while(|(a, b)| a == b)
                            .count()
                    })
                    .max()
                    .unwrap_or(0);
                let min = MIN_KEY_FRAGMENT.min(key.len()).max(1);
                let whole = key.len() >= MIN_KEY_FRAGMENT || bytes[at..].starts_with(key);
                (longest >= min && whole).then_some((at, at + longest))
            })
            .collect()
    }

    #[test]
    fn the_window_filter_finds_what_brute_force_finds() {
        // Keys with repeated windows, and text made of their pieces and near misses.
        let keys: [&[u8]; 4] = [
            b"sk-proj-abcdefghijklmnop",
            b"sk-aaaaaaaaaaaaaaaaaaaaaaaaaaaaab",
            b"sk-abcabcabcabcabcabcabcabc",
            b"sk-short",
        ];
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for key in keys {
            let redactor = Redactor::new(std::str::from_utf8(key).unwrap());
            for _ in 0..300 {
                let mut text = Vec::new();
                for _ in 0..(next() % 8) {
                    let from = (next() as usize) % key.len();
                    let to = from + (next() as usize) % (key.len() - from + 1);
                    text.extend_from_slice(&key[from..to]);
                    if next() % 3 == 0 {
                        text.push(b"x*-a"[(next() % 4) as usize]);
                    }
                }
                assert_eq!(
                    redactor.spans(&text, usize::MAX),
                    naive_spans(key, &text),
                    "{:?} in {:?}",
                    String::from_utf8_lossy(key),
                    String::from_utf8_lossy(&text)
                );
            }
        }
    }

    #[test]
    fn the_key_and_its_long_runs_are_masked_short_runs_kept() {
        let redactor = Redactor::new("sk-proj-abcdefghijklmnop");
        let mask = |text: &str| {
            let mut bytes = text.as_bytes().to_vec();
            redactor.mask(&mut bytes, usize::MAX);
            String::from_utf8(bytes).unwrap()
        };
        assert_eq!(
            mask("k=sk-proj-abcdefghijklmnop."),
            format!("k={}.", "*".repeat(24))
        );
        // OpenAI style: a prefix, an ellipsis, a suffix; runs of 8+ bytes go.
        assert_eq!(mask("sk-proj-ab...ijklmnop"), "**********...********");
        // Runs under 8 bytes stay: too likely to be ordinary text.
        assert_eq!(mask("sk-pro and mnop"), "sk-pro and mnop");
        // A short key is masked whole only.
        let short = Redactor::new("abc");
        let mut bytes = b"xabcx ab".to_vec();
        short.mask(&mut bytes, usize::MAX);
        assert_eq!(bytes, b"x***x ab");
    }

    #[test]
    fn only_an_end_that_could_continue_into_the_key_is_held_back() {
        let redactor = Redactor::new("sk-proj-abcdefghijklmnop");
        assert_eq!(redactor.hold(b"data: {}\n\n"), 0);
        assert_eq!(redactor.hold(b"the key: sk-pr"), 5);
        assert_eq!(redactor.hold(b"abc"), 3);
        // Never the whole key: a whole key is masked, not held.
        assert_eq!(redactor.hold(b"sk-proj-abcdefghijklmnop"), 23);
    }

    #[test]
    fn the_model_list_is_told_from_one_model() {
        let list = |uri: &str| is_model_list(&uri.parse().unwrap());
        assert!(list("/v1/models"));
        assert!(list("/v1/models/"));
        assert!(list("/v1/models?limit=5"));
        assert!(!list("/v1/models/gpt-4o"));
        assert!(!list("/v1/chat/completions"));
    }
}
