use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{header, Method, StatusCode, Uri};

use super::handle::{bounded, truncate, AuditHandle, Facts, REDACTION_MARGIN};
use super::layer::Config;
use super::pricing::Usage;
use super::record::{
    flag, sanitised_id, AuditRecord, ContentLog, Outcome, UsageEstimate, MAX_FIELD_BYTES,
    MAX_PATH_BYTES,
};
use super::usage::{Reported, ScanMode, UsageScanner};
use crate::endpoint::Endpoint;
use crate::error::{LayerName, Rejection};
use crate::keys::ApiKey;

/// What is known about a request when it arrives.
#[derive(Debug)]
pub(crate) struct RequestInfo {
    pub(crate) request_id: String,
    /// The client's `x-request-id`, sanitised and bounded; whether it was cut.
    pub(crate) client_request_id: Option<(String, bool)>,
    pub(crate) timestamp: SystemTime,
    pub(crate) start: Instant,
    pub(crate) client_ip: Option<IpAddr>,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
}

/// How the response ended, as the body wrapper saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// The body ended (or there was none to send).
    Completed,
    /// The body or the inner service failed.
    Failed,
    /// Dropped before the end.
    Cancelled,
}

/// Collects one request's record from arrival to the end of the response body, and emits it
/// exactly once: on [`finish`](Self::finish), or, if that never came, when dropped.
pub(crate) struct Recorder {
    config: Arc<Config>,
    handle: AuditHandle,
    pub(crate) info: RequestInfo,
    status: Option<StatusCode>,
    rejection: Option<(LayerName, &'static str)>,
    /// A layer ended or withheld the response after the upstream answered.
    stopped: Option<(LayerName, &'static str)>,
    /// The usage of a body a layer withheld.
    withheld_usage: Option<Reported>,
    /// The upstream's `x-request-id`, sanitised and bounded; whether it was cut.
    upstream_request_id: Option<(String, bool)>,
    /// What the layers wrote into the handle, taken when the response arrives.
    key: Option<Arc<ApiKey>>,
    flags: Vec<String>,
    facts: Option<Facts>,
    /// What a quota layer held against the key's cap, and what it settled.
    reserved_usd: Option<f64>,
    settled_usd: Option<f64>,
    scanner: Option<UsageScanner>,
    ttfb: Option<Duration>,
    /// The time spent in the policy stack (see [`AuditRecord::policy_ms`]).
    policy: Option<Duration>,
    response_bytes: u64,
    content: Option<Vec<u8>>,
    content_truncated: bool,
    /// The response body is content-encoded: relayed untouched, not read for usage.
    response_encoded: bool,
    /// Shared with a [`DrainOnCancel`](super::DrainOnCancel) outside the layer, if any.
    #[cfg(feature = "tokio")]
    tail: Option<super::drain::Tail>,
    /// A usage report was read after the client left.
    #[cfg(feature = "tokio")]
    usage_after_cancel: bool,
    done: bool,
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("request_id", &self.info.request_id)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    pub(crate) fn new(config: Arc<Config>, handle: AuditHandle, info: RequestInfo) -> Self {
        Recorder {
            content: config.log_content.then(Vec::new),
            config,
            handle,
            info,
            status: None,
            rejection: None,
            stopped: None,
            withheld_usage: None,
            upstream_request_id: None,
            key: None,
            flags: Vec::new(),
            facts: None,
            reserved_usd: None,
            settled_usd: None,
            scanner: None,
            ttfb: None,
            policy: None,
            response_bytes: 0,
            content_truncated: false,
            response_encoded: false,
            #[cfg(feature = "tokio")]
            tail: None,
            #[cfg(feature = "tokio")]
            usage_after_cancel: false,
            done: false,
        }
    }

    /// Shares the state of a response that may be drained after its client left.
    #[cfg(feature = "tokio")]
    pub(crate) fn with_tail(mut self, tail: Option<super::drain::Tail>) -> Self {
        self.tail = tail;
        self
    }

    /// Whether the client left and what is read now is drained, not delivered.
    fn departed(&self) -> bool {
        #[cfg(feature = "tokio")]
        {
            self.tail.as_ref().is_some_and(super::drain::Tail::departed)
        }
        #[cfg(not(feature = "tokio"))]
        false
    }

    /// Tells a drain outside the layer whether the usage is still to come.
    #[cfg(feature = "tokio")]
    fn update_tail(&mut self) {
        let Some(tail) = &self.tail else { return };
        let waiting = self.scanner.as_ref().is_some_and(|scanner| {
            !(scanner.saw_done()
                || scanner.is_finished()
                || (scanner.mode() == ScanMode::Json && scanner.usage_reports() > 0))
        });
        if !waiting {
            tail.set_wants(false);
        }
    }

    /// Takes note of the response head. Returns whether the usage-only chunk must be stripped
    /// from the body.
    pub(crate) fn on_response(&mut self, parts: &mut http::response::Parts) -> bool {
        self.status = Some(parts.status);
        // The response's `x-request-id` is always the record's; an upstream's own id moves to
        // `x-upstream-request-id` (and into the record).
        if let Ok(ours) = http::HeaderValue::from_str(&self.info.request_id) {
            if let Some(theirs) = parts.headers.insert("x-request-id", ours) {
                if theirs.as_bytes() != self.info.request_id.as_bytes() {
                    self.upstream_request_id = sanitised_id(theirs.as_bytes());
                    parts.headers.insert("x-upstream-request-id", theirs);
                }
            }
        }
        self.rejection = parts
            .extensions
            .get::<Rejection>()
            .map(|r| (r.layer, r.code));
        self.take_handle();
        // A response withheld after the upstream answered carries its layer's rejection, but
        // the request was forwarded: it is recorded as stopped.
        if self.stopped.is_some() {
            self.rejection = None;
        }
        // A rejection was decided in the stack alone; a forwarded request spent the time until
        // the innermost layer handed it on.
        self.policy = if self.rejection.is_some() {
            Some(self.info.start.elapsed())
        } else {
            self.handle.forwarded_after()
        };
        if self.rejection.is_some() {
            return false;
        }
        // A compressed body cannot be read for usage nor have a chunk cut out of it: it goes
        // on untouched, and the record says so (never a usage read from compressed bytes).
        self.response_encoded = parts
            .headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .any(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"));
        if self.response_encoded {
            return false;
        }
        let mode = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(ScanMode::from_content_type);
        self.scanner = mode.map(UsageScanner::new);
        #[cfg(feature = "tokio")]
        if let Some(tail) = &self.tail {
            let endpoint = self.facts.as_ref().and_then(|f| f.endpoint);
            tail.set_wants(
                self.scanner.is_some()
                    && parts.status.is_success()
                    && self.info.method == Method::POST
                    && endpoint.is_some_and(Endpoint::reports_usage),
            );
        }
        mode == Some(ScanMode::Sse)
            && parts.status.is_success()
            && self.facts.as_ref().is_some_and(|f| f.usage_injected)
    }

    /// Takes what the layers wrote into the handle (once).
    fn take_handle(&mut self) {
        if self.facts.is_none() {
            let state = self.handle.take(&self.info.method, &self.info.uri);
            self.key = state.key;
            self.flags = state.flags;
            self.facts = Some(state.facts);
            self.reserved_usd = state.reserved_usd;
            self.settled_usd = state.settled_usd;
            self.stopped = state.stopped;
            self.withheld_usage = state.withheld_usage;
        }
    }

    /// Takes what the layers wrote into the handle while the body streamed (flags, the
    /// settled spend).
    fn take_late(&mut self) {
        let late = self.handle.take_late();
        self.flags.extend(late.flags);
        self.reserved_usd = late.reserved_usd.or(self.reserved_usd);
        self.settled_usd = late.settled_usd.or(self.settled_usd);
        self.stopped = self.stopped.or(late.stopped);
        self.withheld_usage = late.withheld_usage.or(self.withheld_usage.take());
    }

    /// Whether the request was rejected by a policy layer.
    pub(crate) fn is_rejection(&self) -> bool {
        self.rejection.is_some()
    }

    /// A chunk of the body as it came from the upstream.
    pub(crate) fn on_upstream(&mut self, chunk: &[u8]) {
        if self.ttfb.is_none() && !chunk.is_empty() {
            self.ttfb = Some(self.info.start.elapsed());
        }
        if let Some(scanner) = &mut self.scanner {
            #[cfg(feature = "tokio")]
            let reports = scanner.usage_reports();
            scanner.feed(chunk);
            #[cfg(feature = "tokio")]
            if self.tail.is_some() {
                if scanner.usage_reports() > reports && self.departed() {
                    self.usage_after_cancel = true;
                }
                self.update_tail();
            }
        }
    }

    /// A chunk of the body as it goes to the client.
    pub(crate) fn on_forwarded(&mut self, chunk: &[u8]) {
        if self.departed() {
            // Drained after the client left: never delivered.
            return;
        }
        self.response_bytes += chunk.len() as u64;
        if let Some(content) = &mut self.content {
            let limit = self.config.max_content_bytes + REDACTION_MARGIN;
            let room = limit.saturating_sub(content.len());
            if chunk.len() > room {
                self.content_truncated = true;
            }
            content.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
    }

    /// Counts a body the layer made (a rejection) that is sent whole.
    pub(crate) fn set_response_bytes(&mut self, bytes: u64) {
        self.response_bytes = bytes;
    }

    /// Bytes held for this record now (the scanner's usage buffer, logged content).
    pub(crate) fn buffered(&self) -> usize {
        self.scanner
            .as_ref()
            .map_or(0, UsageScanner::buffered_high_water)
            + self.content.as_ref().map_or(0, Vec::capacity)
    }

    /// Builds and emits the record (once).
    pub(crate) fn finish(&mut self, end: End) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        // A response read on after its client left ended for nobody (its last event is
        // still read as the end of the body).
        let end = if self.departed() {
            if end == End::Completed {
                if let Some(scanner) = &mut self.scanner {
                    scanner.finish();
                }
            }
            End::Cancelled
        } else {
            end
        };
        #[cfg(feature = "tracing")]
        let request_id = self.info.request_id.clone();
        // The sink (and the redaction function) are user code, called here from a body's
        // `poll_frame` or a `Drop`: a panic is contained and counted (see
        // `AuditLayer::sink_panics`).
        let emitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let record = self.build(end);
            self.config.sink.record(&record);
        }));
        if emitted.is_err() {
            self.config
                .sink_panics
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            #[cfg(feature = "tracing")]
            tracing::error!(
                target: "tower_llm_policy::audit",
                request_id = %request_id,
                "the audit sink panicked: this request's record is lost"
            );
        }
    }

    fn build(&mut self, end: End) -> AuditRecord {
        let elapsed_ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        self.take_handle();
        self.take_late();
        let facts = self.facts.take().unwrap_or_default();
        let endpoint = facts.endpoint.unwrap_or(Endpoint::Other);
        let model = facts.model;
        let canonical_model = facts.canonical_model;

        let started = self.status.is_some_and(|s| s.is_success());
        let mut error_body = false;
        let mut repeated = false;
        let reported = self.scanner.as_mut().and_then(|scanner| {
            if end == End::Completed {
                scanner.finish();
            }
            // An error status's error body is the usual one: only a success's is flagged, and
            // not the error a layer ended the response with.
            error_body = scanner.saw_error() && started && self.stopped.is_none();
            repeated = scanner.usage_reports() > 1;
            scanner.take_reported()
        });
        let usage = reported
            .or(self.withheld_usage.take())
            .map(|r| checked_usage(r, endpoint));

        // A body that could not be read is the client's departure, not a policy decision.
        let unreadable = self
            .rejection
            .is_some_and(|(layer, _)| layer == LayerName::RequestBody)
            && self
                .flags
                .iter()
                .any(|f| f == flag::REQUEST_BODY_UNREADABLE);
        let outcome = match (self.rejection, end) {
            (Some(_), _) if unreadable => Outcome::Cancelled,
            (Some(_), _) => Outcome::Rejected,
            // A layer ended the response on purpose: whatever the body did after.
            (None, _) if self.stopped.is_some() => Outcome::Stopped,
            (None, End::Cancelled) => Outcome::Cancelled,
            (None, End::Failed) => Outcome::UpstreamError,
            (None, End::Completed)
                if self.status.is_some_and(|s| s.is_success()) && !error_body =>
            {
                Outcome::Completed
            }
            (None, End::Completed) => Outcome::UpstreamError,
        };

        let (path, path_truncated) = bounded(self.info.uri.path(), MAX_PATH_BYTES);
        // An extension method is client-chosen text too.
        let (method, method_truncated) = bounded(self.info.method.as_str(), MAX_FIELD_BYTES);
        let mut flags = Vec::new();
        if (self.rejection.is_some() && !unreadable) || self.stopped.is_some() {
            flags.push(flag::BLOCKED.to_owned());
        }
        if error_body {
            flags.push(flag::UPSTREAM_ERROR_BODY.to_owned());
        }
        if repeated {
            flags.push(flag::USAGE_REPEATED.to_owned());
        }
        if self.response_encoded {
            flags.push(flag::RESPONSE_ENCODED.to_owned());
        }
        #[cfg(feature = "tokio")]
        if self.usage_after_cancel {
            flags.push(flag::USAGE_AFTER_CANCEL.to_owned());
        }
        let client_request_id = self.info.client_request_id.take();
        let upstream_request_id = self.upstream_request_id.take();
        let id_truncated = [&client_request_id, &upstream_request_id]
            .iter()
            .any(|id| id.as_ref().is_some_and(|(_, cut)| *cut));
        if facts.field_truncated || path_truncated || method_truncated || id_truncated {
            flags.push(flag::FIELD_TRUNCATED.to_owned());
        }
        for flag in self.flags.drain(..) {
            if !flags.contains(&flag) {
                flags.push(flag);
            }
        }

        // A response that started (a success status) and then failed was billed upstream for
        // its prompt at least: its missing usage is flagged and estimated as well.
        let usage_expected = self.rejection.is_none()
            && self.info.method == Method::POST
            && endpoint.reports_usage()
            && (outcome == Outcome::Completed
                || outcome == Outcome::Cancelled
                || outcome == Outcome::Stopped
                || (outcome == Outcome::UpstreamError && started));
        let mut usage_estimate = None;
        if usage.is_none() && usage_expected {
            flags.push(flag::USAGE_MISSING.to_owned());
            usage_estimate = facts.prompt_estimate.map(|prompt| UsageEstimate {
                prompt_tokens: prompt.tokens(),
                method: "estimate".to_owned(),
            });
        }
        // An error body is not billed from, whatever usage it carries.
        let cost_usd = usage.as_ref().filter(|_| !error_body).and_then(|usage| {
            // Invalid usage is never priced: a cost from it would be a guess.
            let Some(usage) = &usage.valid else {
                flags.push(flag::USAGE_INVALID.to_owned());
                return None;
            };
            // A cut name is not the model's name: it is never priced.
            let cost = canonical_model
                .as_deref()
                .filter(|_| !facts.canonical_truncated)
                .and_then(|model| self.config.pricing.cost(model, usage));
            if cost.is_none() {
                flags.push(flag::UNKNOWN_PRICE.to_owned());
            }
            cost
        });

        let content = self.content.take().map(|bytes| {
            let mut text = (self.config.redact)(&String::from_utf8_lossy(&bytes));
            let cut = truncate(&mut text, self.config.max_content_bytes);
            ContentLog {
                prompt: facts.prompt,
                response: (!text.is_empty()).then_some(text),
                truncated: facts.prompt_truncated || self.content_truncated || cut,
            }
        });

        let key = self.key.as_deref();
        AuditRecord {
            request_id: std::mem::take(&mut self.info.request_id),
            client_request_id: client_request_id.map(|(id, _)| id),
            upstream_request_id: upstream_request_id.map(|(id, _)| id),
            timestamp: self.info.timestamp,
            key: key.map(|k| k.name.clone()),
            key_metadata: key.map(|k| k.metadata.clone()).unwrap_or_default(),
            user: facts.user,
            client_ip: self.info.client_ip,
            method,
            path,
            endpoint: endpoint.as_str().to_owned(),
            model,
            canonical_model,
            stream: facts.stream,
            usage_injected: facts.usage_injected,
            status: self.status.map(|s| s.as_u16()),
            outcome,
            blocked_by: self
                .rejection
                .or(self.stopped)
                .map(|(layer, _)| layer.as_str().to_owned()),
            code: self
                .rejection
                .or(self.stopped)
                .map(|(_, code)| code.to_owned()),
            flags,
            prompt_tokens: usage.as_ref().and_then(|u| u.prompt),
            completion_tokens: usage.as_ref().and_then(|u| u.completion),
            total_tokens: usage.as_ref().and_then(|u| u.total),
            cached_tokens: usage.as_ref().and_then(|u| u.cached),
            reasoning_tokens: usage.as_ref().and_then(|u| u.reasoning),
            usage_estimate,
            cost_usd,
            reserved_usd: self.reserved_usd,
            settled_usd: self.settled_usd,
            latency_ms: elapsed_ms(self.info.start.elapsed()),
            ttft_ms: self.ttfb.map(elapsed_ms),
            policy_ms: self.policy.map(elapsed_ms),
            response_bytes: self.response_bytes,
            content,
        }
    }
}

/// The usage a record shows: the counts that were sent and valid, and the usage to price
/// when the report is valid as a whole.
struct CheckedUsage {
    prompt: Option<u64>,
    completion: Option<u64>,
    total: Option<u64>,
    cached: Option<u64>,
    reasoning: Option<u64>,
    /// `None` when the report is invalid (see [`flag::USAGE_INVALID`]).
    valid: Option<Usage>,
}

/// Checks a usage report for the endpoint: besides the scanner's checks (each count, and that
/// they agree), the prompt count must be there, and the completion count too except for
/// embeddings (which report none: it is 0).
fn checked_usage(r: Reported, endpoint: Endpoint) -> CheckedUsage {
    let completion = match r.completion {
        None if endpoint == Endpoint::Embeddings && !r.invalid => Some(0),
        c => c,
    };
    let total = r
        .total
        .or_else(|| r.prompt.zip(completion).map(|(p, c)| p + c));
    let valid = match (r.invalid, r.prompt, completion, total) {
        (false, Some(prompt_tokens), Some(completion_tokens), Some(total_tokens)) => Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens,
            cached_tokens: r.cached,
            reasoning_tokens: r.reasoning,
        }),
        _ => None,
    };
    CheckedUsage {
        prompt: r.prompt,
        completion,
        total,
        cached: r.cached,
        reasoning: r.reasoning,
        valid,
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Dropped without an end: the client went away (before the response or mid-body).
        self.finish(End::Cancelled);
    }
}
