//! Guards that ask another service: the [`Moderator`] trait, OpenAI-compatible moderation
//! ([`OpenAiModerator`]) and a webhook ([`WebhookModerator`]).
//!
//! Both call their service through a tower [`Service`] the host provides (its HTTP client:
//! hyper-util's, reqwest behind a `service_fn`, a mock in tests), so the library picks no
//! HTTP client, TLS stack or runtime. A [`Guard::external`](super::Guard::external) wraps
//! one; when it gives no verdict ([`ModerationError`]: unreachable, an error status, an
//! answer it cannot read, too slow) the guard fails closed (503 `policy_unavailable`) or
//! open, as configured.
//!
//! # Timeouts
//!
//! The library is runtime-agnostic, so a moderator does not time its calls itself unless
//! asked: wrap the service in `tower::timeout::TimeoutLayer` (its error is a
//! [`ModerationError`] like any other), or, with the `tokio` cargo feature, set
//! [`OpenAiModerator::timeout`] / [`WebhookModerator::timeout`].
//!
//! # Secrets
//!
//! The API key (or webhook secret) is sent in a header marked sensitive, and never appears in
//! `Debug` output or in a [`ModerationError`]; neither does the user's text, nor anything of
//! the service's answer but its status and where it could not be read.

use std::collections::BTreeSet;
use std::fmt;
use std::future::poll_fn;
use std::sync::Arc;
#[cfg(feature = "tokio")]
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use tower_service::Service;

use crate::body::BoxError;
use crate::keys::BoxFuture;

/// What a [`Moderator`] is asked about: the request's text, part by part.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ModerationInput {
    /// The text parts the guard reads, in body order (decoded).
    pub texts: Vec<String>,
    /// The key's name, when a key was authenticated.
    pub key: Option<String>,
    /// The model the request runs (canonical name), when known.
    pub model: Option<String>,
}

impl fmt::Debug for ModerationInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // User content: sizes, never the text.
        f.debug_struct("ModerationInput")
            .field("texts", &self.texts.len())
            .field("chars", &self.texts.iter().map(|t| t.len()).sum::<usize>())
            .field("key", &self.key)
            .field("model", &self.model)
            .finish()
    }
}

/// A [`Moderator`]'s answer.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Nothing to object to.
    Allow,
    /// Flagged, in these categories (`harassment`, `violence`, ...): blocked or flagged as
    /// the guard's mode says.
    Flag {
        /// The categories flagged (may be empty).
        categories: Vec<String>,
    },
    /// The text, rewritten: one text per text given, in the same order. Applied when the
    /// guard's mode is [`Redact`](super::Mode::Redact); otherwise taken as a flag.
    Redact {
        /// The rewritten texts.
        texts: Vec<String>,
    },
}

impl fmt::Debug for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allow => f.write_str("Allow"),
            Verdict::Flag { categories } => f
                .debug_struct("Flag")
                .field("categories", categories)
                .finish(),
            Verdict::Redact { texts } => f
                .debug_struct("Redact")
                .field("texts", &texts.len())
                .finish(),
        }
    }
}

/// Why a [`Moderator`] gave no verdict (unreachable, an error status, an answer it could not
/// read, too slow). The guard then fails open or closed, as configured.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModerationError(pub String);

/// A guard that asks another service about the request's text before it is forwarded.
pub trait Moderator: Send + Sync + 'static {
    /// Decides on `input`.
    fn moderate(
        &self,
        input: ModerationInput,
    ) -> BoxFuture<'static, Result<Verdict, ModerationError>>;
}

impl<M: Moderator + ?Sized> Moderator for Arc<M> {
    fn moderate(
        &self,
        input: ModerationInput,
    ) -> BoxFuture<'static, Result<Verdict, ModerationError>> {
        (**self).moderate(input)
    }
}

impl ModerationInput {
    /// An input of `texts`, with no key and no model.
    pub fn new(texts: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ModerationInput {
            texts: texts.into_iter().map(Into::into).collect(),
            key: None,
            model: None,
        }
    }

    /// Sets the key's name.
    #[must_use]
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the model.
    #[must_use]
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }
}

/// The default [`OpenAiModerator::uri`]: `/v1/moderations`.
pub const DEFAULT_MODERATION_URI: &str = "/v1/moderations";

/// The default [`OpenAiModerator::model`]: `omni-moderation-latest`.
pub const DEFAULT_MODERATION_MODEL: &str = "omni-moderation-latest";

/// The default [`max_response_bytes`](OpenAiModerator::max_response_bytes) of both
/// moderators: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// The default [`OpenAiModerator::max_inputs_per_call`]: 32 texts.
pub const DEFAULT_MAX_INPUTS_PER_CALL: usize = 32;

/// The default [`OpenAiModerator::max_bytes_per_call`]: 128 KiB of text.
pub const DEFAULT_MAX_BYTES_PER_CALL: usize = 128 * 1024;

/// The HTTP side both moderators share: the host's service, where to post, the headers that
/// carry a secret, the answer's size limit and the timeout.
#[derive(Clone)]
struct Client<S> {
    service: S,
    uri: Uri,
    /// `(name, value)`, marked sensitive; `Err` when the secret given is not a valid header
    /// value (every call then fails, without saying more about it).
    secret: Option<Result<(HeaderName, HeaderValue), ()>>,
    max_response_bytes: usize,
    #[cfg(feature = "tokio")]
    timeout: Option<Duration>,
}

impl<S> Client<S> {
    fn new(service: S, uri: Uri) -> Self {
        Client {
            service,
            uri,
            secret: None,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            #[cfg(feature = "tokio")]
            timeout: None,
        }
    }

    fn set_secret(&mut self, name: HeaderName, value: &str) {
        self.secret = Some(
            HeaderValue::try_from(value)
                .map(|mut v| {
                    v.set_sensitive(true);
                    (name, v)
                })
                .map_err(drop),
        );
    }

    fn debug_fields(&self, d: &mut fmt::DebugStruct<'_, '_>) {
        d.field("uri", &UriShown(&self.uri))
            .field(
                "secret",
                &self.secret.as_ref().map(|s| match s {
                    Ok((name, _)) => name.as_str().to_owned(),
                    Err(()) => "invalid".to_owned(),
                }),
            )
            .field("max_response_bytes", &self.max_response_bytes);
        #[cfg(feature = "tokio")]
        d.field("timeout", &self.timeout);
    }
}

/// A URI without its user information (`user:password@`), for `Debug`.
struct UriShown<'a>(&'a Uri);

impl fmt::Debug for UriShown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let uri = self.0;
        if let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) {
            let host = authority.as_str().rsplit('@').next().unwrap_or_default();
            write!(f, "\"{scheme}://{host}")?;
        } else {
            f.write_str("\"")?;
        }
        write!(f, "{}\"", uri.path())
    }
}

/// `ModerationError` for a service's error: its text (a client's errors name the failure,
/// never the request's headers or body).
fn service_error(what: &str, e: impl Into<BoxError>) -> ModerationError {
    ModerationError(format!(
        "{what}: the service could not be reached: {}",
        e.into()
    ))
}

/// `ModerationError` for an answer that is not the JSON expected. serde's own message may
/// quote the answer (which may echo the user's text): only the kind and place are given.
fn shape_error(what: &str, e: &serde_json::Error) -> ModerationError {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Data => "JSON of the wrong shape",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    ModerationError(format!(
        "{what}: the answer is {kind} (line {}, column {})",
        e.line(),
        e.column()
    ))
}

impl<S, ResB> Client<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    /// Posts `body` (JSON) and reads the answer's body, up to the limit. `what` names the
    /// moderator in errors.
    async fn post(&self, what: &'static str, body: Vec<u8>) -> Result<Bytes, ModerationError> {
        let exchange = self.exchange(what, body);
        #[cfg(feature = "tokio")]
        if let Some(limit) = self.timeout {
            return match tokio::time::timeout(limit, exchange).await {
                Ok(answer) => answer,
                Err(_) => Err(ModerationError(format!(
                    "{what}: no answer within {limit:?}"
                ))),
            };
        }
        exchange.await
    }

    async fn exchange(&self, what: &'static str, body: Vec<u8>) -> Result<Bytes, ModerationError> {
        let mut request = Request::post(self.uri.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| ModerationError(format!("{what}: the request could not be built")))?;
        match &self.secret {
            Some(Ok((name, value))) => {
                request.headers_mut().insert(name.clone(), value.clone());
            }
            Some(Err(())) => {
                return Err(ModerationError(format!(
                    "{what}: the configured secret is not a valid header value"
                )))
            }
            None => {}
        }
        let mut service = self.service.clone();
        poll_fn(|cx| service.poll_ready(cx))
            .await
            .map_err(|e| service_error(what, e))?;
        let response = service
            .call(request)
            .await
            .map_err(|e| service_error(what, e))?;
        let status = response.status();
        if !status.is_success() {
            // The body is not read: it may echo the request.
            return Err(ModerationError(format!(
                "{what}: the service answered {status}"
            )));
        }
        let limit = self.max_response_bytes;
        match Limited::new(response.into_body(), limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ModerationError(format!(
                "{what}: the answer is longer than {limit} bytes"
            ))),
            Err(e) => Err(ModerationError(format!(
                "{what}: the answer could not be read: {e}"
            ))),
        }
    }
}

/// A [`Moderator`] that asks an OpenAI-compatible moderation endpoint
/// (`POST /v1/moderations`), through the host's HTTP client `S`.
///
/// It posts `{"model":"omni-moderation-latest","input":["text", ...]}` (the request's texts,
/// as an array) with `Authorization: Bearer <api key>` when one is set, and reads
/// `results[i].flagged` and `results[i].categories` (category → bool) of the answer:
///
/// - no result flagged: [`Verdict::Allow`];
/// - one flagged or more: [`Verdict::Flag`], with the names of the categories that are
///   `true` in the flagged results, sorted, each once;
/// - with [`categories`](Self::categories): only those count — a text is flagged when one of
///   them is `true` (whatever `flagged` says), and only they are named;
/// - an answer that is not a 2xx, that cannot be read, is longer than
///   [`max_response_bytes`](Self::max_response_bytes), is not that JSON, or has not one
///   result per text sent: [`ModerationError`] (the guard then fails closed or open).
///
/// An input with no text is allowed without a call. Many or long texts are sent in several
/// calls, one after the other, each of at most [`max_inputs_per_call`](Self::max_inputs_per_call)
/// texts and, unless one text alone is longer, [`max_bytes_per_call`](Self::max_bytes_per_call)
/// bytes of text; a text is never split. The first call whose texts are flagged decides
/// (the categories named are that call's), and no further call is made.
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::{BodyExt, Full};
/// use tower::service_fn;
/// use tower_llm_policy::guard::Guard;
/// use tower_llm_policy::guard::external::{ModerationInput, Moderator, OpenAiModerator, Verdict};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// // The host's HTTP client; here a stand-in that flags everything.
/// let client = service_fn(|req: Request<Full<Bytes>>| async move {
///     assert_eq!(req.uri(), "https://api.openai.com/v1/moderations");
///     let answer = r#"{"results":[{"flagged":true,"categories":{"violence":true,"hate":false}}]}"#;
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
/// });
/// let moderator = OpenAiModerator::new(client)
///     .uri("https://api.openai.com/v1/moderations".parse().unwrap())
///     .api_key("sk-...");
/// let verdict = moderator.moderate(ModerationInput::new(["some text"])).await.unwrap();
/// assert_eq!(verdict, Verdict::Flag { categories: vec!["violence".into()] });
///
/// // As a guard: blocks flagged requests (fails closed when the service is down).
/// let guard = Guard::external("moderation", moderator);
/// # let _ = guard;
/// # });
/// ```
#[derive(Clone)]
pub struct OpenAiModerator<S> {
    client: Client<S>,
    model: Arc<str>,
    categories: Option<Arc<[String]>>,
    max_inputs: usize,
    max_bytes: usize,
}

impl<S> fmt::Debug for OpenAiModerator<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("OpenAiModerator");
        self.client.debug_fields(&mut d);
        d.field("model", &self.model)
            .field("categories", &self.categories)
            .field("max_inputs_per_call", &self.max_inputs)
            .field("max_bytes_per_call", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

impl<S> OpenAiModerator<S> {
    /// A moderator that posts through `service` to [`DEFAULT_MODERATION_URI`] with
    /// [`DEFAULT_MODERATION_MODEL`], without an API key.
    pub fn new(service: S) -> Self {
        OpenAiModerator {
            client: Client::new(service, Uri::from_static(DEFAULT_MODERATION_URI)),
            model: Arc::from(DEFAULT_MODERATION_MODEL),
            categories: None,
            max_inputs: DEFAULT_MAX_INPUTS_PER_CALL,
            max_bytes: DEFAULT_MAX_BYTES_PER_CALL,
        }
    }

    /// Where to post (default [`DEFAULT_MODERATION_URI`], a path for a service that knows
    /// its host). An absolute URI (`https://api.openai.com/v1/moderations`) lets the host's
    /// client reach another host.
    #[must_use]
    pub fn uri(mut self, uri: Uri) -> Self {
        self.client.uri = uri;
        self
    }

    /// The moderation model (default [`DEFAULT_MODERATION_MODEL`]).
    #[must_use]
    pub fn model(mut self, model: impl Into<Arc<str>>) -> Self {
        self.model = model.into();
        self
    }

    /// The API key, sent as `Authorization: Bearer <key>` (a header marked sensitive; never
    /// in `Debug` output or errors).
    #[must_use]
    pub fn api_key(mut self, key: impl AsRef<str>) -> Self {
        self.client
            .set_secret(AUTHORIZATION, &format!("Bearer {}", key.as_ref()));
        self
    }

    /// Only these categories count (`violence`, `self-harm/intent`, ...): a text is flagged
    /// when one of them is `true`, and only they are named (an empty list flags nothing).
    /// Default: the answer's `flagged`, and every category that is `true`.
    #[must_use]
    pub fn categories(mut self, categories: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.categories = Some(categories.into_iter().map(Into::into).collect());
        self
    }

    /// The longest answer read, in bytes (default [`DEFAULT_MAX_RESPONSE_BYTES`]); a longer
    /// one is an error.
    #[must_use]
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.client.max_response_bytes = limit;
        self
    }

    /// The most texts sent in one call (default [`DEFAULT_MAX_INPUTS_PER_CALL`]; at least 1).
    #[must_use]
    pub fn max_inputs_per_call(mut self, limit: usize) -> Self {
        self.max_inputs = limit.max(1);
        self
    }

    /// The most bytes of text sent in one call (default [`DEFAULT_MAX_BYTES_PER_CALL`]); a
    /// text longer than this alone is sent alone, whole.
    #[must_use]
    pub fn max_bytes_per_call(mut self, limit: usize) -> Self {
        self.max_bytes = limit;
        self
    }

    /// Gives up on a call that has not answered (connecting and reading included) after
    /// `limit`, with a [`ModerationError`] (feature `tokio`; else wrap the service in
    /// `tower::timeout::TimeoutLayer`). Each call of a chunked input has the full time.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    #[must_use]
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.client.timeout = Some(limit);
        self
    }

    /// The service.
    pub fn get_ref(&self) -> &S {
        &self.client.service
    }

    /// The texts of `texts` split into calls: ranges of at most `max_inputs` texts and
    /// `max_bytes` bytes (a longer text alone).
    fn chunks(&self, texts: &[String]) -> Vec<std::ops::Range<usize>> {
        let mut chunks = Vec::new();
        let (mut start, mut bytes) = (0, 0usize);
        for (i, text) in texts.iter().enumerate() {
            let full = i - start >= self.max_inputs
                || (i > start && bytes.saturating_add(text.len()) > self.max_bytes);
            if full {
                chunks.push(start..i);
                (start, bytes) = (i, 0);
            }
            bytes = bytes.saturating_add(text.len());
        }
        if start < texts.len() {
            chunks.push(start..texts.len());
        }
        chunks
    }
}

#[derive(serde::Serialize)]
struct ModerationRequest<'a> {
    model: &'a str,
    input: &'a [String],
}

#[derive(serde::Deserialize)]
struct ModerationAnswer {
    results: Vec<ModerationResult>,
}

#[derive(serde::Deserialize)]
struct ModerationResult {
    flagged: bool,
    #[serde(default)]
    categories: std::collections::BTreeMap<String, serde_json::Value>,
}

const OPENAI: &str = "moderation";

impl<S, ResB> Moderator for OpenAiModerator<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    fn moderate(
        &self,
        input: ModerationInput,
    ) -> BoxFuture<'static, Result<Verdict, ModerationError>> {
        let this = self.clone();
        Box::pin(async move {
            for chunk in this.chunks(&input.texts) {
                let texts = &input.texts[chunk];
                let body = serde_json::to_vec(&ModerationRequest {
                    model: &this.model,
                    input: texts,
                })
                .map_err(|e| shape_error(OPENAI, &e))?;
                let answer = this.client.post(OPENAI, body).await?;
                let answer: ModerationAnswer =
                    serde_json::from_slice(&answer).map_err(|e| shape_error(OPENAI, &e))?;
                if answer.results.len() != texts.len() {
                    return Err(ModerationError(format!(
                        "{OPENAI}: the answer has {} results for {} inputs",
                        answer.results.len(),
                        texts.len()
                    )));
                }
                let mut flagged = false;
                let mut categories = BTreeSet::new();
                for result in &answer.results {
                    let on = result
                        .categories
                        .iter()
                        .filter(|(_, v)| v.as_bool() == Some(true))
                        .map(|(name, _)| name);
                    match &this.categories {
                        Some(wanted) => {
                            for name in on.filter(|n| wanted.contains(n)) {
                                flagged = true;
                                categories.insert(name.clone());
                            }
                        }
                        None if result.flagged => {
                            flagged = true;
                            categories.extend(on.cloned());
                        }
                        None => {}
                    }
                }
                if flagged {
                    return Ok(Verdict::Flag {
                        categories: categories.into_iter().collect(),
                    });
                }
            }
            Ok(Verdict::Allow)
        })
    }
}

/// A [`Moderator`] that asks a webhook of the host's own (a policy service, a DLP scanner),
/// through the host's HTTP client `S`.
///
/// # Protocol
///
/// The moderator posts JSON to the webhook's URI: the texts (decoded, in body order), the
/// key's name and the request's model (`null` when unknown), with the secret header when one
/// is set ([`bearer`](Self::bearer): `Authorization: Bearer <token>`;
/// [`secret_header`](Self::secret_header): any header, such as `x-webhook-secret`):
///
/// ```text
/// POST /moderate HTTP/1.1
/// content-type: application/json
/// x-webhook-secret: ...
///
/// {"texts":["Hello","my card is 4111 1111 1111 1111"],"key":"team-a","model":"gpt-4o"}
/// ```
///
/// The webhook answers `2xx` with one of:
///
/// | answer | verdict |
/// |---|---|
/// | `{"action":"allow"}` | [`Verdict::Allow`] |
/// | `{"action":"block","categories":["pci"]}` (`categories` optional) | [`Verdict::Flag`] (blocked, or flagged in [`Mode::Audit`](super::Mode::Audit)) |
/// | `{"action":"redact","texts":["Hello","my card is [card]"]}` | [`Verdict::Redact`]: one text for each text sent, in the same order |
///
/// ```text
/// HTTP/1.1 200 OK
/// content-type: application/json
///
/// {"action":"redact","texts":["Hello","my card is [card]"]}
/// ```
///
/// Other fields are ignored. Anything else — a status that is not 2xx, an unknown `action`,
/// a `redact` without as many texts as were sent, an answer that is not such JSON or longer
/// than [`max_response_bytes`](Self::max_response_bytes) — is a [`ModerationError`]: no
/// verdict (the guard fails closed or open). An input with no text is allowed without a
/// call; otherwise every text goes in one call.
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use tower::service_fn;
/// use tower_llm_policy::guard::external::{ModerationInput, Moderator, Verdict, WebhookModerator};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let client = service_fn(|_req: Request<Full<Bytes>>| async {
///     let answer = r#"{"action":"block","categories":["pci"]}"#;
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
/// });
/// let webhook = WebhookModerator::new(client, "http://dlp.internal/moderate".parse().unwrap())
///     .secret_header("x-webhook-secret", "s3cret");
/// let verdict = webhook.moderate(ModerationInput::new(["card 4111..."])).await.unwrap();
/// assert_eq!(verdict, Verdict::Flag { categories: vec!["pci".into()] });
/// # });
/// ```
#[derive(Clone)]
pub struct WebhookModerator<S> {
    client: Client<S>,
}

impl<S> fmt::Debug for WebhookModerator<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("WebhookModerator");
        self.client.debug_fields(&mut d);
        d.finish_non_exhaustive()
    }
}

impl<S> WebhookModerator<S> {
    /// A moderator that posts through `service` to `uri`.
    pub fn new(service: S, uri: Uri) -> Self {
        WebhookModerator {
            client: Client::new(service, uri),
        }
    }

    /// Sends `Authorization: Bearer <token>` (marked sensitive; never in `Debug` output or
    /// errors). Replaces a [`secret_header`](Self::secret_header).
    #[must_use]
    pub fn bearer(mut self, token: impl AsRef<str>) -> Self {
        self.client
            .set_secret(AUTHORIZATION, &format!("Bearer {}", token.as_ref()));
        self
    }

    /// Sends the header `name: value` (`x-webhook-secret: ...`), marked sensitive; the value
    /// is never in `Debug` output or errors. Replaces a [`bearer`](Self::bearer) token.
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name (a constant of the host's code). An invalid
    /// value makes every call fail instead.
    #[must_use]
    pub fn secret_header(mut self, name: &str, value: impl AsRef<str>) -> Self {
        let name = HeaderName::try_from(name).expect("a valid header name");
        self.client.set_secret(name, value.as_ref());
        self
    }

    /// The longest answer read, in bytes (default [`DEFAULT_MAX_RESPONSE_BYTES`]).
    #[must_use]
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.client.max_response_bytes = limit;
        self
    }

    /// Gives up on a call that has not answered after `limit`, with a [`ModerationError`]
    /// (feature `tokio`; else wrap the service in `tower::timeout::TimeoutLayer`).
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    #[must_use]
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.client.timeout = Some(limit);
        self
    }

    /// The service.
    pub fn get_ref(&self) -> &S {
        &self.client.service
    }
}

#[derive(serde::Serialize)]
struct WebhookRequest<'a> {
    texts: &'a [String],
    key: Option<&'a str>,
    model: Option<&'a str>,
}

#[derive(serde::Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
enum WebhookAnswer {
    Allow,
    Block {
        #[serde(default)]
        categories: Vec<String>,
    },
    Redact {
        texts: Vec<String>,
    },
}

const WEBHOOK: &str = "moderation webhook";

impl<S, ResB> Moderator for WebhookModerator<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    fn moderate(
        &self,
        input: ModerationInput,
    ) -> BoxFuture<'static, Result<Verdict, ModerationError>> {
        let client = self.client.clone();
        Box::pin(async move {
            if input.texts.is_empty() {
                return Ok(Verdict::Allow);
            }
            let body = serde_json::to_vec(&WebhookRequest {
                texts: &input.texts,
                key: input.key.as_deref(),
                model: input.model.as_deref(),
            })
            .map_err(|e| shape_error(WEBHOOK, &e))?;
            let answer = client.post(WEBHOOK, body).await?;
            match serde_json::from_slice(&answer).map_err(|e| shape_error(WEBHOOK, &e))? {
                WebhookAnswer::Allow => Ok(Verdict::Allow),
                WebhookAnswer::Block { categories } => {
                    let categories: BTreeSet<String> = categories.into_iter().collect();
                    Ok(Verdict::Flag {
                        categories: categories.into_iter().collect(),
                    })
                }
                WebhookAnswer::Redact { texts } if texts.len() == input.texts.len() => {
                    Ok(Verdict::Redact { texts })
                }
                WebhookAnswer::Redact { texts } => Err(ModerationError(format!(
                    "{WEBHOOK}: `redact` answered {} texts for {} sent",
                    texts.len(),
                    input.texts.len()
                ))),
            }
        })
    }
}
