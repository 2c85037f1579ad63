use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::layer::Config;
use super::record::MAX_FIELD_BYTES;
use crate::endpoint::Endpoint;
use crate::keys::ApiKey;
use crate::policy::Policy;
use crate::request::{LlmRequest, PromptText};

/// The audit layer's handle on one request, in the request's extensions.
///
/// [`AuditLayer`](super::AuditLayer) puts one into every request it sees; the layers after it
/// write what the record needs into it as they learn it: [`KeyAuth`](crate::KeyAuth) the key,
/// the layer that resolves the request the model (after aliases), the end user and the
/// prompt, and any layer or service its own flags ([`flag`](Self::flag)). The record is made
/// from it when the response ends. Cloning shares the same handle.
///
/// ```
/// use tower_llm_policy::audit::AuditHandle;
///
/// # fn inner_layer<B>(req: &http::Request<B>) {
/// // A word list in audit mode lets the request through and flags it.
/// if let Some(audit) = req.extensions().get::<AuditHandle>() {
///     audit.flag("word_list:competitor_names");
/// }
/// # }
/// ```
#[derive(Clone)]
pub struct AuditHandle {
    shared: Arc<Shared>,
}

struct Shared {
    config: Arc<Config>,
    state: Mutex<State>,
    /// When the audit layer took the request.
    start: Instant,
    /// Nanoseconds after `start` when a layer of this crate last handed the request to its
    /// inner service (`0`: not yet); see [`forwarding`].
    forwarded: AtomicU64,
}

/// What the handle holds for the record.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) key: Option<Arc<ApiKey>>,
    pub(crate) flags: Vec<String>,
    pub(crate) facts: Facts,
    /// A layer is reading the body for the view: the audit layer's copy is not needed.
    claimed: bool,
    /// The audit layer's copy of a body no layer read (bounded).
    copy: Option<Copy>,
    /// What a quota layer held against the key's spend cap, and what it settled.
    pub(crate) reserved_usd: Option<f64>,
    pub(crate) settled_usd: Option<f64>,
    /// A layer ended or withheld the response after the upstream answered (its name and the
    /// error's code).
    pub(crate) stopped: Option<(crate::error::LayerName, &'static str)>,
    /// The usage of an upstream body a layer withheld (the body the audit layer sees is
    /// the layer's error, not the upstream's answer).
    pub(crate) withheld_usage: Option<super::usage::Reported>,
}

/// What the layers wrote into the handle while the body streamed.
pub(crate) struct Late {
    pub(crate) flags: Vec<String>,
    pub(crate) reserved_usd: Option<f64>,
    pub(crate) settled_usd: Option<f64>,
    pub(crate) stopped: Option<(crate::error::LayerName, &'static str)>,
    pub(crate) withheld_usage: Option<super::usage::Reported>,
}

struct Copy {
    /// The policy the request was resolved with, to parse the copy as the layers would have.
    policy: Policy,
    bytes: Vec<u8>,
    limit: usize,
    over: bool,
}

/// What the record says of the request itself.
#[derive(Clone, Debug, Default)]
pub(crate) struct Facts {
    pub(crate) endpoint: Option<Endpoint>,
    pub(crate) model: Option<String>,
    pub(crate) canonical_model: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) stream: bool,
    pub(crate) usage_injected: bool,
    /// The prompt, for an estimate of its tokens made only when the record needs one (no
    /// usage came); see [`PromptEstimate`].
    pub(crate) prompt_estimate: Option<PromptEstimate>,
    pub(crate) prompt: Option<String>,
    pub(crate) prompt_truncated: bool,
    /// `model` or `user` was cut to [`MAX_FIELD_BYTES`].
    pub(crate) field_truncated: bool,
    /// `canonical_model` was cut: it must not be priced.
    pub(crate) canonical_truncated: bool,
}

/// A copy of at most `max` bytes of `text`, cut on a character boundary (never copying more
/// than `max` bytes, whatever the length of `text`). Whether it was cut.
pub(crate) fn bounded(text: &str, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text.to_owned(), false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_owned(), true)
}

/// The largest request body a record holds on to until the response ends, for an estimate of
/// its prompt made only if no usage comes (128 KiB); the estimate of a larger one is made at
/// once.
pub(crate) const MAX_HELD_PROMPT: usize = 128 * 1024;

/// A prompt's token estimate: made, or to make from the text when needed.
#[derive(Clone, Debug)]
pub(crate) enum PromptEstimate {
    Made(u64),
    Later(PromptText),
}

impl PromptEstimate {
    /// The estimate (made now if it was not yet).
    pub(crate) fn tokens(&self) -> u64 {
        match self {
            PromptEstimate::Made(tokens) => *tokens,
            PromptEstimate::Later(text) => text.estimate(),
        }
    }
}

/// Extra bytes of content kept past the limit until redaction has run, so that a secret that
/// straddles the limit is redacted whole rather than cut into an unrecognisable prefix.
pub(crate) const REDACTION_MARGIN: usize = 256;

/// Cuts `text` to at most `max` bytes, on a character boundary. Whether it was cut.
pub(crate) fn truncate(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    true
}

impl Facts {
    /// The facts of a resolved view (its head only, or with its body).
    pub(crate) fn of(view: &LlmRequest, config: &Config) -> Facts {
        let mut cut = false;
        let mut field = |value: Option<&str>| {
            value.map(|v| {
                let (v, c) = bounded(v, MAX_FIELD_BYTES);
                cut |= c;
                v
            })
        };
        let model = field(view.model());
        let user = field(view.user());
        let field_truncated = cut;
        let canonical = view.canonical_model().map(|m| bounded(m, MAX_FIELD_BYTES));
        let canonical_truncated = canonical.as_ref().is_some_and(|(_, c)| *c);
        let mut facts = Facts {
            endpoint: Some(view.endpoint()),
            model,
            canonical_model: canonical.map(|(m, _)| m),
            user,
            stream: view.stream(),
            usage_injected: view.edits().include_usage,
            field_truncated: field_truncated || canonical_truncated,
            canonical_truncated,
            ..Facts::default()
        };
        if !view.has_body() {
            return facts;
        }
        if view.endpoint().reports_usage() {
            let text = view.prompt_text();
            // A large body is not held for the response's whole length: its estimate is made
            // now.
            facts.prompt_estimate = Some(if text.held_bytes() <= MAX_HELD_PROMPT {
                PromptEstimate::Later(text)
            } else {
                PromptEstimate::Made(text.estimate())
            });
        }
        if config.log_content {
            let mut prompt = String::new();
            for (i, part) in view.prompt_parts().enumerate() {
                if i > 0 {
                    prompt.push('\n');
                }
                prompt.push_str(part.text);
                if prompt.len() > config.max_content_bytes + REDACTION_MARGIN {
                    break;
                }
            }
            // Redact before cutting, so that a key across the cut is still recognised.
            let long = truncate(&mut prompt, config.max_content_bytes + REDACTION_MARGIN);
            let mut prompt = (config.redact)(&prompt);
            facts.prompt_truncated = truncate(&mut prompt, config.max_content_bytes) || long;
            facts.prompt = Some(prompt);
        }
        facts
    }
}

/// Called by every layer of this crate just before it calls its inner service with `req`:
/// the request's [`AuditHandle`], if any, notes the time. The layers are called from the
/// outside in, so the last note is the innermost layer's, taken as the request leaves the
/// policy stack for the service it guards (the upstream): the record's
/// [`policy_ms`](super::AuditRecord::policy_ms). One clock read per layer, and only behind an
/// audit layer.
pub(crate) fn forwarding<B>(req: &http::Request<B>) {
    if let Some(handle) = req.extensions().get::<AuditHandle>() {
        handle.mark_forwarded();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AuditHandle {
    pub(crate) fn new(
        config: Arc<Config>,
        view: &LlmRequest,
        key: Option<Arc<ApiKey>>,
        start: Instant,
    ) -> Self {
        let facts = Facts::of(view, &config);
        AuditHandle {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(State {
                    key,
                    facts,
                    ..State::default()
                }),
                start,
                forwarded: AtomicU64::new(0),
            }),
        }
    }

    /// A layer hands the request to its inner service now (see [`forwarding`]).
    fn mark_forwarded(&self) {
        let nanos = u64::try_from(self.shared.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // 0 means "not yet": a request forwarded within its first nanosecond is 1 ns.
        self.shared.forwarded.store(nanos.max(1), Ordering::Relaxed);
    }

    /// From the request's arrival at the audit layer to the last time a layer of this crate
    /// handed it to its inner service; `None` if none did.
    pub(crate) fn forwarded_after(&self) -> Option<Duration> {
        match self.shared.forwarded.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    /// Adds a flag to the request's record (a repeated flag is kept once).
    pub fn flag(&self, flag: impl Into<String>) {
        let flag = flag.into();
        let mut state = lock(&self.shared.state);
        if !state.flags.contains(&flag) {
            state.flags.push(flag);
        }
    }

    /// The flags added so far, in order.
    pub fn flags(&self) -> Vec<String> {
        lock(&self.shared.state).flags.clone()
    }

    /// Records the key the request was made with (found, whether admitted or not).
    /// A quota layer held `usd` against the key's spend cap.
    pub(crate) fn set_reserved(&self, usd: f64) {
        lock(&self.shared.state).reserved_usd = Some(usd);
    }

    /// A quota layer settled `usd` against the key's spend cap.
    pub(crate) fn set_settled(&self, usd: f64) {
        lock(&self.shared.state).settled_usd = Some(usd);
    }

    /// What was written into the handle since [`take`](Self::take) (flags, the settled spend),
    /// taken out: the response body may still be streaming when the layers write them.
    pub(crate) fn take_late(&self) -> Late {
        let mut state = lock(&self.shared.state);
        Late {
            flags: std::mem::take(&mut state.flags),
            reserved_usd: state.reserved_usd.take(),
            settled_usd: state.settled_usd.take(),
            stopped: state.stopped.take(),
            withheld_usage: state.withheld_usage.take(),
        }
    }

    /// A layer ended the response mid-way, or withheld it whole, after the upstream had
    /// answered: the record is [`Stopped`](super::Outcome::Stopped), `blocked_by` this layer.
    /// The first layer to stop it is the one recorded.
    pub(crate) fn stopped(&self, layer: crate::error::LayerName, code: &'static str) {
        lock(&self.shared.state)
            .stopped
            .get_or_insert((layer, code));
    }

    /// The usage read from an upstream body that a layer withheld (it reports what the
    /// upstream billed; the client got the layer's error instead).
    #[cfg(feature = "guards")]
    pub(crate) fn withheld_usage(&self, body: &[u8]) {
        let mut scanner = super::usage::UsageScanner::new(super::usage::ScanMode::Json);
        scanner.feed(body);
        scanner.finish();
        if let Some(reported) = scanner.take_reported() {
            lock(&self.shared.state).withheld_usage = Some(reported);
        }
    }

    pub(crate) fn set_key(&self, key: Arc<ApiKey>) {
        lock(&self.shared.state).key = Some(key);
    }

    /// A layer reads the body for the view: the record will have it.
    pub(crate) fn claim_body(&self) {
        let mut state = lock(&self.shared.state);
        state.claimed = true;
        state.copy = None;
    }

    /// The view was parsed: asks for usage in a stream that did not (when the layer is set to)
    /// and takes the request's facts.
    pub(crate) fn observe(&self, view: &mut LlmRequest) {
        let config = &self.shared.config;
        if config.inject_usage
            && view.stream()
            && view.include_usage() != Some(true)
            && matches!(
                view.endpoint(),
                Endpoint::ChatCompletions | Endpoint::Completions
            )
            && !view.is_multipart()
        {
            view.request_usage();
        }
        let facts = Facts::of(view, config);
        lock(&self.shared.state).facts = facts;
    }

    /// Starts the audit layer's own copy of a body that no layer may read (bounded by
    /// `limit`); see [`TeeBody`].
    pub(crate) fn start_copy(&self, policy: Policy, limit: usize) {
        lock(&self.shared.state).copy = Some(Copy {
            policy,
            bytes: Vec::new(),
            limit,
            over: false,
        });
    }

    fn copy_chunk(&self, chunk: &[u8]) {
        let mut state = lock(&self.shared.state);
        if state.claimed {
            return;
        }
        if let Some(copy) = &mut state.copy {
            if copy.over || copy.bytes.len() + chunk.len() > copy.limit {
                copy.over = true;
                copy.bytes = Vec::new();
            } else {
                copy.bytes.extend_from_slice(chunk);
            }
        }
    }

    /// Everything the record needs from the handle. A body that only the audit layer's copy
    /// saw (never a multipart one) is parsed now, for the model, the user and the prompt.
    pub(crate) fn take(&self, method: &Method, uri: &Uri) -> State {
        let mut state = std::mem::take(&mut *lock(&self.shared.state));
        if let Some(copy) = state.copy.take().filter(|c| !c.over && !c.bytes.is_empty()) {
            let headers = HeaderMap::new();
            let mut view = LlmRequest::from_request_head(method, uri, &headers, &copy.policy);
            if view.read_body(&headers, Bytes::from(copy.bytes)).is_ok() {
                state.facts = Facts::of(&view, &self.shared.config);
            }
        }
        state
    }
}

impl fmt::Debug for AuditHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.shared.state);
        f.debug_struct("AuditHandle")
            .field("key", &state.key.as_ref().map(|k| &k.name))
            .field("flags", &state.flags)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// A request body that no layer reads, passed to the inner service frame by frame while
    /// the audit layer keeps a bounded copy for the record (stopped as soon as a layer reads
    /// the body itself).
    pub(crate) struct TeeBody<B> {
        #[pin]
        inner: B,
        handle: AuditHandle,
    }
}

impl<B> TeeBody<B> {
    pub(crate) fn new(inner: B, handle: AuditHandle) -> Self {
        TeeBody { inner, handle }
    }
}

impl<B: Body<Data = Bytes>> Body for TeeBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &frame {
            if let Some(data) = frame.data_ref() {
                this.handle.copy_chunk(data);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditLayer, MemorySink};

    fn view(path: &str, body: &str) -> LlmRequest {
        let (parts, ()) = http::Request::post(path).body(()).unwrap().into_parts();
        LlmRequest::parse(&parts, Bytes::from(body.to_owned())).unwrap()
    }

    fn config(layer: AuditLayer) -> Arc<Config> {
        layer.config
    }

    #[test]
    fn truncate_cuts_on_a_character_boundary() {
        let mut text = "café!".to_owned();
        assert!(!truncate(&mut text, 6));
        assert_eq!(text, "café!");
        assert!(truncate(&mut text, 4));
        assert_eq!(text, "caf");
        let mut text = "ééé".to_owned();
        assert!(truncate(&mut text, 5));
        assert_eq!(text, "éé");
    }

    #[test]
    fn only_endpoints_that_report_usage_get_a_prompt_estimate() {
        let config = config(AuditLayer::new(MemorySink::new()));
        assert!(Endpoint::ChatCompletions.reports_usage());
        assert!(!Endpoint::ImageGeneration.reports_usage());
        assert!(!Endpoint::Moderations.reports_usage());
        // "abcdefgh" is 6 estimated tokens (the estimate errs high), plus 3 token ids.
        let completions = view(
            "/v1/completions",
            r#"{"model":"gpt-3.5-turbo-instruct","prompt":["abcdefgh",[1,2,3]]}"#,
        );
        assert_eq!(
            Facts::of(&completions, &config)
                .prompt_estimate
                .map(|e| e.tokens()),
            Some(9)
        );
        let images = view(
            "/v1/images/generations",
            r#"{"model":"dall-e-3","prompt":"abcdefgh"}"#,
        );
        assert!(Facts::of(&images, &config).prompt_estimate.is_none());
    }

    #[test]
    fn a_small_prompt_is_estimated_when_needed_a_large_one_at_once() {
        let config = config(AuditLayer::new(MemorySink::new()));
        let body = |text: &str| {
            serde_json::json!({
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": text}, {"role": "user", "content": "a\"b"}],
            })
            .to_string()
        };
        let small = "hello world ".repeat(100);
        let large = "hello world ".repeat(20_000);
        for (text, later) in [(&small, true), (&large, false)] {
            let view = view("/v1/chat/completions", &body(text));
            let expected = (crate::tokens::estimate(text) + crate::tokens::estimate("a\"b")) as u64;
            match Facts::of(&view, &config).prompt_estimate {
                Some(PromptEstimate::Later(held)) if later => {
                    assert_eq!(held.estimate(), expected);
                    assert!(held.held_bytes() <= MAX_HELD_PROMPT);
                }
                Some(PromptEstimate::Made(tokens)) if !later => assert_eq!(tokens, expected),
                other => panic!("{} bytes: {other:?}", text.len()),
            }
        }
    }

    #[test]
    fn logged_prompt_joins_the_parts_and_is_cut_at_the_limit() {
        let chat = r#"{"model":"m","messages":[{"role":"user","content":"first part"},{"role":"user","content":"second part"},{"role":"user","content":"third part"}]}"#;
        let roomy = config(
            AuditLayer::new(MemorySink::new())
                .log_content(true)
                .max_content_bytes(1000),
        );
        let facts = Facts::of(&view("/v1/chat/completions", chat), &roomy);
        assert_eq!(
            facts.prompt.as_deref(),
            Some("first part\nsecond part\nthird part")
        );
        assert!(!facts.prompt_truncated);
        let tight = config(
            AuditLayer::new(MemorySink::new())
                .log_content(true)
                .max_content_bytes(8),
        );
        let facts = Facts::of(&view("/v1/chat/completions", chat), &tight);
        assert_eq!(facts.prompt.as_deref(), Some("first pa"));
        assert!(facts.prompt_truncated);
    }

    #[test]
    fn a_prompt_cut_before_redaction_is_marked_truncated_even_if_redaction_shortens_it() {
        let long = "k".repeat(2000);
        let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{long}"}}]}}"#);
        let config = config(
            AuditLayer::new(MemorySink::new())
                .log_content(true)
                .max_content_bytes(100)
                .redact(|_| "[redacted]".to_owned()),
        );
        let facts = Facts::of(&view("/v1/chat/completions", &body), &config);
        assert_eq!(facts.prompt.as_deref(), Some("[redacted]"));
        assert!(facts.prompt_truncated);
    }

    #[test]
    fn flags_are_kept_once_in_order() {
        let config = config(AuditLayer::new(MemorySink::new()));
        let handle = AuditHandle::new(
            config,
            &view("/v1/chat/completions", "{}"),
            None,
            std::time::Instant::now(),
        );
        handle.flag("b");
        handle.flag("a");
        handle.flag("b");
        assert_eq!(handle.flags(), ["b", "a"]);
        assert_eq!(
            handle
                .take(&http::Method::POST, &"/".parse().unwrap())
                .flags,
            ["b", "a"]
        );
    }

    #[test]
    fn the_copy_of_an_unread_body_is_bounded_and_dropped_once_a_layer_reads_it() {
        let body = r#"{"model":"gpt-4o-mini","user":"ana","messages":[]}"#;
        let (method, uri) = (http::Method::POST, "/v1/chat/completions".parse().unwrap());
        let copy = |limit: usize, claim: bool| {
            let config = config(AuditLayer::new(MemorySink::new()));
            let head = view("/v1/chat/completions", "");
            let handle = AuditHandle::new(config, &head, None, std::time::Instant::now());
            handle.start_copy(Policy::default(), limit);
            let (first, rest) = body.as_bytes().split_at(20);
            handle.copy_chunk(first);
            if claim {
                handle.claim_body();
            }
            handle.copy_chunk(rest);
            handle.take(&method, &uri).facts
        };
        // Within the bound, the copy gives the record the model and the user.
        let facts = copy(body.len(), false);
        assert_eq!(facts.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(facts.user.as_deref(), Some("ana"));
        // One byte over it, nothing is kept (no partial body is parsed).
        assert_eq!(copy(body.len() - 1, false).model, None);
        // A layer that reads the body itself makes the copy unnecessary.
        assert_eq!(copy(body.len(), true).model, None);
    }
}
