//! Guards on responses: JSON bodies and SSE streams.
//!
//! The request side builds a [`ResponsePlan`] and calls [`guard_response`], which answers
//! with a [`GuardResponse`] future: it resolves at once, except for a non-streamed JSON
//! response that a guard may block or rewrite, which is read whole first (up to
//! [`MAX_BODY`]) so that the status the client gets can still be an error.
//!
//! What passes untouched (a [`GuardBody`] that only forwards): no plan or no guard in it, an
//! upstream error (not 2xx), an endpoint whose output is not text (only chat completions,
//! completions and responses are read), a body neither JSON nor `text/event-stream`.
//!
//! - **JSON, block or redact**: read whole, every text of the model's output
//!   ([`fields`]) scanned; a block answers 400 `content_blocked` instead; a redaction rewrites
//!   only the strings concerned (every other byte kept) and fixes `content-length`.
//! - **JSON, audit only**: passed on frame by frame as it comes, with a bounded copy scanned
//!   at its end (flags are set before the body's end is seen by outer layers).
//! - **SSE, audit only**: every frame passed on at once, unchanged; the events are read on the
//!   side, each text stream assembled, so that a match split anywhere is flagged.
//! - **SSE, block or redact**: whole events passed on as they complete (an SSE client acts
//!   on nothing before); an event with no text in it byte for byte; one whose text changed is
//!   re-serialized with only its text strings replaced. Each text stream (a choice's content,
//!   refusal, a tool call's arguments; a Responses output text, refusal, function arguments)
//!   is scanned as one assembled text with the hold-back rule of [`scan`]: a delta's text is
//!   replaced by the output decided so far, so text is held back only while it could still be
//!   part of a match. What is still held when a stream ends (its choice's `finish_reason`, a
//!   Responses `.done` event, `data: [DONE]`, the end of the body) goes out first in an event
//!   made for it, copying the envelope of the stream's last event (see [`Stream`]). A block
//!   drops what is held, sends one `data: {"error":{..,"code":"content_blocked"}}` event and
//!   ends the body (the upstream is dropped, which stops the generation).
//!
//! A response that must be read but is compressed, over [`MAX_BODY`] (or has an event over
//! it), not UTF-8 or not JSON: with only audit guards it passes, flagged
//! `guard:<name>:unreadable`; otherwise it fails closed with 502 `upstream_invalid_response`
//! (a stream already under way ends with that error event instead).

mod fields;
mod scan;
mod sse;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::alert::{Alert, AlertSink};
use crate::audit::usage::ScanMode;
use crate::audit::AuditHandle;
use crate::body::BoxError;
use crate::endpoint::Endpoint;
use crate::error::{quote, LayerName, PolicyError};

use self::fields::{Finish, Role, StreamKey};
use self::scan::{scan_whole, Check, Checks, Findings, TextScan};
use self::sse::{Event, Piece, Splitter};
use super::{Guard, Mode};

/// What to check in one request's response.
#[derive(Clone)]
pub(crate) struct ResponsePlan {
    /// The response-side guards that apply to this request, in order: detector guards
    /// ([`Kind::Detect`](super::Kind::Detect)), firewalls and reflection guards.
    pub(crate) guards: Vec<Guard>,
    /// The request's system prompt (its `system` and `developer` messages and
    /// `instructions`, joined by newlines), for reflection guards; empty when none.
    pub(crate) system_prompt: Arc<str>,
    /// The endpoint the response answers.
    pub(crate) endpoint: Endpoint,
    /// The key's name, for alerts.
    pub(crate) key: Option<String>,
    /// The request's audit handle: flags `guard:<name>` go there.
    pub(crate) audit: Option<AuditHandle>,
    /// Where blocks are announced.
    pub(crate) alerts: Option<Arc<dyn AlertSink>>,
}

/// The largest JSON body read whole, and the largest SSE event held, to be checked (16 MiB).
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024;

/// The layer named in the [`Rejection`](crate::Rejection) of a response a guard withheld.
const LAYER: LayerName = LayerName::Guard;

/// Guards `response` by `plan`; see the [module docs](self).
pub(crate) fn guard_response<B>(
    plan: Option<ResponsePlan>,
    response: Response<B>,
) -> GuardResponse<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let pass = |response: Response<B>| GuardResponse::done(response.map(GuardBody::pass));
    let Some(plan) = plan.filter(|p| !p.guards.is_empty()) else {
        return pass(response);
    };
    let text_endpoint = matches!(
        plan.endpoint,
        Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses
    );
    if !response.status().is_success() || !text_endpoint {
        return pass(response);
    }
    let Some(mode) = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(ScanMode::from_content_type)
    else {
        return pass(response);
    };
    let guarding = Guarding::new(plan);
    if guarding.idle() {
        return pass(response);
    }
    let acting = guarding.checks.any_acting();
    let encoded = response
        .headers()
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        guarding.unreadable();
        if acting {
            return GuardResponse::done(unreadable(
                "The upstream's response is compressed and cannot be checked by the content guards; ask it for `identity` encoding.",
            ));
        }
        return pass(response);
    }
    match mode {
        ScanMode::Sse => GuardResponse::done(
            {
                let mut response = response;
                if acting {
                    // The events are rewritten: the upstream's length no longer holds.
                    response.headers_mut().remove(header::CONTENT_LENGTH);
                }
                response
            }
            .map(|body| GuardBody {
                kind: BodyKind::Sse {
                    body,
                    guard: Box::new(SseGuard::new(guarding, acting)),
                    queue: VecDeque::new(),
                    ended: false,
                },
            }),
        ),
        ScanMode::Json if !acting => GuardResponse::done(response.map(|body| GuardBody {
            kind: BodyKind::Tee {
                body,
                tee: Some(Box::new(Tee {
                    guarding,
                    copy: Vec::new(),
                    over: false,
                })),
            },
        })),
        ScanMode::Json => {
            let declared_over = response
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|len| len > MAX_BODY as u64);
            if declared_over {
                guarding.unreadable();
                return GuardResponse::done(unreadable(
                    "The upstream's response is too large to be checked by the content guards.",
                ));
            }
            let (parts, body) = response.into_parts();
            GuardResponse {
                state: FutState::Reading {
                    body,
                    parts: Some(parts),
                    buf: BytesMut::new(),
                    guarding: Some(Box::new(guarding)),
                },
            }
        }
    }
}

/// The 502 of a response that must be checked and cannot be.
fn unreadable<B>(why: &'static str) -> Response<GuardBody<B>> {
    PolicyError::UpstreamInvalid(why.into())
        .into_response(LAYER)
        .map(|full| GuardBody::full(full_bytes(full)))
}

/// The body of a rejection answered in place of the upstream's response.
pub(crate) fn rejection_body<B>(full: http_body_util::Full<Bytes>) -> GuardBody<B> {
    GuardBody::full(full_bytes(full))
}

fn full_bytes(full: http_body_util::Full<Bytes>) -> Bytes {
    // `Full` holds one chunk; read it without a runtime.
    let mut full = std::pin::pin!(full);
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    match full.as_mut().poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

/// A response's guards and where their findings go.
struct Guarding {
    checks: Checks,
    /// Guards already flagged (audit guards stop looking then).
    flagged: Vec<bool>,
    audit: Option<AuditHandle>,
    alerts: Option<Arc<dyn AlertSink>>,
    key: Option<String>,
}

/// A guard's block: what is sent to the client.
struct Blocked(PolicyError);

impl Guarding {
    fn new(plan: ResponsePlan) -> Guarding {
        let checks = Checks::new(&plan.guards, &plan.system_prompt);
        let flagged = checks
            .guards
            .iter()
            .map(|g| matches!(g.check, Check::Nothing | Check::Reflect(None)))
            .collect();
        Guarding {
            checks,
            flagged,
            audit: plan.audit,
            alerts: plan.alerts,
            key: plan.key,
        }
    }

    /// Nothing left to look for.
    fn idle(&self) -> bool {
        self.flagged.iter().all(|&f| f)
    }

    fn flag(&mut self, guard: usize) {
        if let Some(flagged) = self.flagged.get_mut(guard) {
            *flagged = true;
        }
        if let (Some(audit), Some(g)) = (&self.audit, self.checks.guards.get(guard)) {
            audit.flag(format!("guard:{}", g.guard.name()));
        }
    }

    fn unreadable(&self) {
        if let Some(audit) = &self.audit {
            for (g, flagged) in self.checks.guards.iter().zip(&self.flagged) {
                if !flagged {
                    audit.flag(format!("guard:{}:unreadable", g.guard.name()));
                }
            }
        }
    }

    /// Flags what a scan found; `Err` when it blocks.
    fn note(&mut self, findings: Findings, stream: bool) -> Result<(), Blocked> {
        for (guard, _) in &findings.audit {
            self.flag(*guard);
        }
        for guard in &findings.redacted {
            self.flag(*guard);
        }
        match findings.block {
            Some((guard, label)) => Err(self.block(guard, &label, stream, false)),
            None => Ok(()),
        }
    }

    /// A tool called `name`: checked by every firewall.
    fn tool(&mut self, name: &str, stream: bool) -> Result<(), Blocked> {
        for i in 0..self.checks.guards.len() {
            let ready = &self.checks.guards[i];
            let Check::Firewall(firewall) = &ready.check else {
                continue;
            };
            if firewall.permits(name) {
                continue;
            }
            if ready.mode == Mode::Audit {
                self.flag(i);
            } else {
                return Err(self.block(i, name, stream, true));
            }
        }
        Ok(())
    }

    fn block(&mut self, guard: usize, label: &str, stream: bool, tool: bool) -> Blocked {
        self.flag(guard);
        if let Some(audit) = &self.audit {
            audit.stopped(LAYER, "content_blocked");
        }
        let ready = &self.checks.guards[guard];
        let name = ready.guard.name();
        let what = if tool {
            format!("does not allow a call to the tool `{}`", quote(label))
        } else if matches!(ready.check, Check::Reflect(_)) {
            "found text of the system prompt in it".to_owned()
        } else {
            format!("found {}", quote(label))
        };
        let verb = if stream {
            "The response stream was stopped"
        } else {
            "The response was withheld"
        };
        if let Some(alerts) = &self.alerts {
            alerts.alert(Alert::ContentBlocked {
                key: self.key.clone(),
                guard: name.to_owned(),
                side: "response",
                label: Some(label.to_owned()),
            });
        }
        Blocked(PolicyError::ContentBlocked(
            format!("{verb}: the content guard `{}` {what}.", quote(name)).into(),
        ))
    }
}

/// A JSON document's text replaced at these spans, every other byte kept.
fn apply_edits(json: &[u8], edits: &mut [(Range<usize>, String)]) -> Vec<u8> {
    edits.sort_by_key(|(span, _)| span.start);
    let mut out = Vec::with_capacity(json.len() + 64);
    let mut at = 0;
    for (span, text) in edits.iter() {
        if span.start < at || span.end > json.len() {
            continue;
        }
        out.extend_from_slice(&json[at..span.start]);
        out.extend_from_slice(text.as_bytes());
        at = span.end;
    }
    out.extend_from_slice(&json[at..]);
    out
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// What checking a whole JSON body gave.
enum JsonOutcome {
    Unchanged,
    Rewritten(Vec<u8>),
    Blocked(Blocked),
    Unreadable,
}

/// Checks a whole JSON body (every text of it whole).
fn check_json(g: &mut Guarding, body: &[u8]) -> JsonOutcome {
    if body.iter().all(u8::is_ascii_whitespace) {
        return JsonOutcome::Unchanged;
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return JsonOutcome::Unreadable;
    };
    let Ok(found) = fields::read(text) else {
        return JsonOutcome::Unreadable;
    };
    let mut edits = Vec::new();
    for field in &found.fields {
        if field.role == Role::ToolName {
            if let Err(blocked) = g.tool(&field.text, false) {
                return JsonOutcome::Blocked(blocked);
            }
        }
        let Some(span) = &field.span else { continue };
        if !g.checks.reads_text {
            continue;
        }
        let mut findings = Findings::default();
        let out = scan_whole(&g.checks, &g.flagged, &field.text, &mut findings);
        if let Err(blocked) = g.note(findings, false) {
            return JsonOutcome::Blocked(blocked);
        }
        if let Some(out) = out {
            edits.push((span.clone(), json_string(&out)));
        }
    }
    if edits.is_empty() {
        return JsonOutcome::Unchanged;
    }
    for (span, empty) in &found.logprobs {
        edits.push((span.clone(), (*empty).to_owned()));
    }
    JsonOutcome::Rewritten(apply_edits(body, &mut edits))
}

/// A bounded copy of an audit-only JSON body, scanned at its end.
struct Tee {
    guarding: Guarding,
    copy: Vec<u8>,
    over: bool,
}

impl Tee {
    fn feed(&mut self, data: &[u8]) {
        if self.over || self.copy.len() + data.len() > MAX_BODY {
            self.over = true;
            self.copy = Vec::new();
        } else {
            self.copy.extend_from_slice(data);
        }
    }

    fn finish(mut self) {
        if self.over {
            self.guarding.unreadable();
            return;
        }
        let copy = std::mem::take(&mut self.copy);
        if let JsonOutcome::Unreadable = check_json(&mut self.guarding, &copy) {
            self.guarding.unreadable();
        }
    }
}

/// One text stream of an SSE response: its scanner, and the envelope of its last event, to
/// make the event that carries what is still held when the stream ends.
///
/// That event copies the last event's other lines (`event:`, `id:`) and, for chat and
/// completions, its top-level fields but `choices` and `usage`, with one choice: the stream's
/// `index`, a `delta` with only the held text (`content`, `refusal`, a tool call's
/// `{"index","function":{"arguments"}}`, a `function_call`'s `arguments`) or the `text`,
/// `"logprobs": null`, `"finish_reason": null`. For Responses, the last delta event whole,
/// with the held text as its `delta` (its `sequence_number` is repeated).
#[derive(Default)]
struct Stream {
    scan: TextScan,
    /// The stream's last event (a slice of the body's bytes, not a copy).
    template: Option<Bytes>,
}

/// The guard of an SSE body.
struct SseGuard {
    guarding: Guarding,
    /// Text is held back and events rewritten (else: frames pass as they are).
    acting: bool,
    splitter: Splitter,
    streams: BTreeMap<StreamKey, Stream>,
    pieces: Vec<Piece>,
}

impl SseGuard {
    fn new(guarding: Guarding, acting: bool) -> SseGuard {
        SseGuard {
            guarding,
            acting,
            splitter: Splitter::default(),
            streams: BTreeMap::new(),
            pieces: Vec::new(),
        }
    }

    /// Reads a frame; returns what to send (in acting mode) and whether the stream ends here
    /// (a block: the error event is the last bytes returned).
    fn feed(&mut self, chunk: &Bytes) -> (Bytes, bool) {
        let mut out = BytesMut::new();
        if !self.acting && self.guarding.idle() {
            return (Bytes::new(), false);
        }
        self.splitter.push(chunk, &mut self.pieces);
        let mut pieces = std::mem::take(&mut self.pieces);
        let mut stop = false;
        for piece in pieces.drain(..) {
            if stop {
                break;
            }
            match piece {
                Piece::Stray(b) => out.extend_from_slice(&b),
                Piece::Event(raw) => {
                    if let Err(blocked) = self.event(&raw, &mut out) {
                        out.extend_from_slice(&error_event(&blocked.0));
                        stop = true;
                    }
                }
            }
        }
        self.pieces = pieces;
        if !stop && self.splitter.held() > MAX_BODY {
            self.splitter = Splitter::default();
            if self.acting {
                self.guarding.unreadable();
                out.extend_from_slice(&error_event(&PolicyError::UpstreamInvalid(
                    "An event of the upstream's stream is too large to be checked by the content guards: the stream was stopped.".into(),
                )));
                stop = true;
            } else {
                self.guarding.unreadable();
            }
        }
        (out.freeze(), stop)
    }

    /// The end of the body: the last event if it lacks its blank line (completed with one),
    /// then what every stream still holds.
    fn finish(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        if !self.acting && self.guarding.idle() {
            return Bytes::new();
        }
        if let Some(mut last) = self.splitter.finish().map(|b| b.to_vec()) {
            if !(last.ends_with(b"\n") || last.ends_with(b"\r")) {
                last.push(b'\n');
            }
            last.push(b'\n');
            if let Err(blocked) = self.event(&Bytes::from(last), &mut out) {
                out.extend_from_slice(&error_event(&blocked.0));
                return out.freeze();
            }
        }
        if let Err(blocked) = self.flush(&|_| true, &[], &mut out) {
            out.extend_from_slice(&error_event(&blocked.0));
        }
        out.freeze()
    }

    /// Finishes the streams `ends` selects (but those in `skip`), writing events for what
    /// they still held.
    fn flush(
        &mut self,
        ends: &dyn Fn(&StreamKey) -> bool,
        skip: &[StreamKey],
        out: &mut BytesMut,
    ) -> Result<(), Blocked> {
        let keys: Vec<StreamKey> = self
            .streams
            .keys()
            .filter(|k| ends(k) && !skip.contains(k))
            .copied()
            .collect();
        for key in keys {
            let Some(mut stream) = self.streams.remove(&key) else {
                continue;
            };
            let mut text = String::new();
            let mut findings = Findings::default();
            stream.scan.advance(
                &self.guarding.checks,
                &self.guarding.flagged,
                true,
                &mut text,
                &mut findings,
            );
            self.guarding.note(findings, true)?;
            if self.acting && !text.is_empty() {
                if let Some(last) = &stream.template {
                    let last = Event::read(last);
                    if let Some(data) = last.data.as_deref().and_then(|d| flush_data(key, d, &text))
                    {
                        out.extend_from_slice(&sse::make_event(
                            &last.other_lines(),
                            &data,
                            last.term(),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// One whole event: passed on, or rewritten, into `out`.
    fn event(&mut self, raw: &Bytes, out: &mut BytesMut) -> Result<(), Blocked> {
        let event = Event::read(raw);
        let Some(data) = event.data.as_deref() else {
            out.extend_from_slice(raw);
            return Ok(());
        };
        if data.trim() == "[DONE]" {
            self.flush(&|_| true, &[], out)?;
            out.extend_from_slice(raw);
            return Ok(());
        }
        let found = match fields::read(data) {
            Ok(found) if !(found.fields.is_empty() && found.finishes.is_empty()) => found,
            // Not JSON, or nothing of the model's in it.
            _ => {
                out.extend_from_slice(raw);
                return Ok(());
            }
        };
        // Tool names first: a forbidden call stops the stream before its arguments.
        for field in &found.fields {
            if field.role == Role::ToolName {
                self.guarding.tool(&field.text, true)?;
            }
        }
        // The pieces of each stream, in order.
        let mut touched: Vec<StreamKey> = Vec::new();
        for field in &found.fields {
            if let Role::Stream(key) = field.role {
                let stream = self.streams.entry(key).or_default();
                stream.scan.push(&field.text);
                if self.acting {
                    stream.template = Some(raw.clone());
                }
                if !touched.contains(&key) {
                    touched.push(key);
                }
            }
        }
        let finishes = &found.finishes;
        let ends = |key: &StreamKey| {
            finishes.iter().any(|f| match *f {
                Finish::All => true,
                Finish::Choice(c) => key.choice() == Some(c),
                Finish::Output(o) => key.output() == Some(o),
                Finish::Key(k) => *key == k,
            })
        };
        // Streams that end here without a piece in this event: their held text goes first.
        if !finishes.is_empty() {
            self.flush(&ends, &touched, out)?;
        }
        let mut released: BTreeMap<StreamKey, String> = BTreeMap::new();
        for key in &touched {
            let finish = ends(key);
            let mut text = String::new();
            let mut findings = Findings::default();
            if let Some(stream) = self.streams.get_mut(key) {
                stream.scan.advance(
                    &self.guarding.checks,
                    &self.guarding.flagged,
                    finish,
                    &mut text,
                    &mut findings,
                );
            }
            self.guarding.note(findings, true)?;
            if finish {
                self.streams.remove(key);
            }
            released.insert(*key, text);
        }
        let mut edits = Vec::new();
        for field in &found.fields {
            let Some(span) = &field.span else { continue };
            let new = match field.role {
                Role::Stream(key) => released.remove(&key).unwrap_or_default(),
                Role::Whole | Role::ToolName => {
                    if !self.guarding.checks.reads_text {
                        continue;
                    }
                    let mut findings = Findings::default();
                    let new = scan_whole(
                        &self.guarding.checks,
                        &self.guarding.flagged,
                        &field.text,
                        &mut findings,
                    );
                    self.guarding.note(findings, true)?;
                    match new {
                        Some(new) => new,
                        None => continue,
                    }
                }
            };
            if self.acting && new != field.text {
                edits.push((span.clone(), json_string(&new)));
            }
        }
        if edits.is_empty() {
            out.extend_from_slice(raw);
            return Ok(());
        }
        for (span, empty) in &found.logprobs {
            edits.push((span.clone(), (*empty).to_owned()));
        }
        let data = apply_edits(data.as_bytes(), &mut edits);
        let data = String::from_utf8(data).unwrap_or_default();
        out.extend_from_slice(&event.render(&data));
        Ok(())
    }
}

/// The data of the event that carries `text`, what stream `key` still held at its end, made
/// from the stream's last event `data` (see [`Stream`]).
fn flush_data(key: StreamKey, data: &str, text: &str) -> Option<String> {
    use serde_json::{json, Map, Value};
    let Ok(Value::Object(last)) = serde_json::from_str::<Value>(data) else {
        return None;
    };
    let choice = |index: u64, delta: Value| json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": null});
    let new: Map<String, Value> = match key {
        StreamKey::OutText(..) | StreamKey::OutRefusal(..) | StreamKey::OutArgs(_) => {
            let mut event = last;
            event.insert("delta".into(), Value::String(text.into()));
            if event.contains_key("logprobs") {
                event.insert("logprobs".into(), json!([]));
            }
            event
        }
        _ => {
            let mut event: Map<String, Value> = last
                .into_iter()
                .filter(|(k, _)| k != "choices" && k != "usage")
                .collect();
            let c = match key {
                StreamKey::Content(i) => choice(i, json!({ "content": text })),
                StreamKey::Refusal(i) => choice(i, json!({ "refusal": text })),
                StreamKey::ToolArgs(i, k) => choice(
                    i,
                    json!({"tool_calls": [{"index": k, "function": {"arguments": text}}]}),
                ),
                StreamKey::FnArgs(i) => choice(i, json!({"function_call": {"arguments": text}})),
                StreamKey::Text(i) => {
                    json!({"index": i, "text": text, "logprobs": null, "finish_reason": null})
                }
                _ => return None,
            };
            event.insert("choices".into(), json!([c]));
            event
        }
    };
    serde_json::to_string(&Value::Object(new)).ok()
}

/// The event that ends a stream a guard stopped.
fn error_event(error: &PolicyError) -> Vec<u8> {
    sse::make_event(b"", &String::from_utf8_lossy(&error.to_json()), b"\n")
}

pin_project! {
    /// The response body of a response checked by content guards on the response side.
    ///
    /// One of: the upstream's body passed through untouched (nothing to check); passed
    /// through frame by frame while it is read on the side (guards that only audit); an SSE
    /// stream passed on event by event, with the model's text redacted or the stream ended
    /// by an error event when a guard blocks; or a body made whole (a JSON body that was
    /// checked, and maybe rewritten, or the error that replaced it). Its errors are the
    /// upstream body's own.
    pub struct GuardBody<B> {
        #[pin]
        kind: BodyKind<B>,
    }
}

pin_project! {
    #[project = BodyKindProj]
    enum BodyKind<B> {
        Pass { #[pin] body: B },
        Full { data: Option<Bytes> },
        Tee { #[pin] body: B, tee: Option<Box<Tee>> },
        Sse {
            #[pin] body: B,
            guard: Box<SseGuard>,
            queue: VecDeque<Frame<Bytes>>,
            ended: bool,
        },
    }
}

impl<B> GuardBody<B> {
    fn pass(body: B) -> Self {
        GuardBody {
            kind: BodyKind::Pass { body },
        }
    }

    fn full(data: Bytes) -> Self {
        GuardBody {
            kind: BodyKind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> fmt::Debug for GuardBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            BodyKind::Pass { .. } => "pass",
            BodyKind::Full { .. } => "full",
            BodyKind::Tee { .. } => "json_audit",
            BodyKind::Sse { guard, .. } if guard.acting => "sse_guarded",
            BodyKind::Sse { .. } => "sse_audit",
        };
        f.debug_struct("GuardBody").field("kind", &kind).finish()
    }
}

impl<B> Body for GuardBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut kind = self.project().kind;
        loop {
            let stopped = match kind.as_mut().project() {
                BodyKindProj::Pass { body } => return body.poll_frame(cx),
                BodyKindProj::Full { data } => {
                    return Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
                }
                BodyKindProj::Tee { mut body, tee } => {
                    let frame = ready!(body.as_mut().poll_frame(cx));
                    match &frame {
                        Some(Ok(frame)) => {
                            if let (Some(data), Some(tee)) = (frame.data_ref(), tee.as_mut()) {
                                tee.feed(data);
                            }
                            if body.is_end_stream() {
                                if let Some(tee) = tee.take() {
                                    tee.finish();
                                }
                            }
                        }
                        None => {
                            if let Some(tee) = tee.take() {
                                tee.finish();
                            }
                        }
                        // A failed body is not checked.
                        Some(Err(_)) => drop(tee.take()),
                    }
                    return Poll::Ready(frame);
                }
                BodyKindProj::Sse {
                    mut body,
                    guard,
                    queue,
                    ended,
                } => {
                    if let Some(frame) = queue.pop_front() {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    if *ended {
                        return Poll::Ready(None);
                    }
                    match ready!(body.as_mut().poll_frame(cx)) {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => {
                                let (out, stop) = guard.feed(&data);
                                if !guard.acting {
                                    if body.is_end_stream() {
                                        guard.finish();
                                    }
                                    return Poll::Ready(Some(Ok(Frame::data(data))));
                                }
                                if stop {
                                    Some(out)
                                } else {
                                    if !out.is_empty() {
                                        queue.push_back(Frame::data(out));
                                    }
                                    None
                                }
                            }
                            Err(trailers) => {
                                let out = guard.finish();
                                if guard.acting && !out.is_empty() {
                                    queue.push_back(Frame::data(out));
                                }
                                queue.push_back(trailers);
                                *ended = true;
                                None
                            }
                        },
                        Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                        None => {
                            let out = guard.finish();
                            if guard.acting && !out.is_empty() {
                                queue.push_back(Frame::data(out));
                            }
                            *ended = true;
                            None
                        }
                    }
                }
            };
            if let Some(last) = stopped {
                // Blocked: the upstream is dropped (which stops the generation); what is left
                // to send is what was decided before, and the error event.
                let mut rest = BytesMut::new();
                if let BodyKindProj::Sse { queue, .. } = kind.as_mut().project() {
                    for frame in queue.drain(..) {
                        if let Ok(data) = frame.into_data() {
                            rest.extend_from_slice(&data);
                        }
                    }
                }
                rest.extend_from_slice(&last);
                kind.set(BodyKind::Full {
                    data: Some(rest.freeze()),
                });
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Pass { body } | BodyKind::Tee { body, .. } => body.is_end_stream(),
            BodyKind::Full { data } => data.is_none(),
            BodyKind::Sse {
                body,
                guard,
                queue,
                ended,
            } => queue.is_empty() && (*ended || (!guard.acting && body.is_end_stream())),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Pass { body } | BodyKind::Tee { body, .. } => body.size_hint(),
            BodyKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            BodyKind::Sse { body, guard, .. } if !guard.acting => body.size_hint(),
            BodyKind::Sse { .. } => SizeHint::default(),
        }
    }
}

pin_project! {
    /// The future of a guarded response: ready at once, but for a non-streamed JSON body
    /// that a guard may block or rewrite, which is read whole first.
    pub(crate) struct GuardResponse<B> {
        #[pin]
        state: FutState<B>,
    }
}

pin_project! {
    #[project = FutProj]
    enum FutState<B> {
        Done { response: Option<Response<GuardBody<B>>> },
        Reading {
            #[pin]
            body: B,
            parts: Option<http::response::Parts>,
            buf: BytesMut,
            guarding: Option<Box<Guarding>>,
        },
    }
}

impl<B> GuardResponse<B> {
    fn done(response: Response<GuardBody<B>>) -> Self {
        GuardResponse {
            state: FutState::Done {
                response: Some(response),
            },
        }
    }
}

impl<B> fmt::Debug for GuardResponse<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuardResponse").finish_non_exhaustive()
    }
}

impl<B> Future for GuardResponse<B>
where
    B: Body<Data = Bytes>,
{
    type Output = Response<GuardBody<B>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            FutProj::Done { response } => Poll::Ready(
                response
                    .take()
                    .unwrap_or_else(|| unreadable("The response was already taken.")),
            ),
            FutProj::Reading {
                mut body,
                parts,
                buf,
                guarding,
            } => {
                let failed = loop {
                    match ready!(body.as_mut().poll_frame(cx)) {
                        Some(Ok(frame)) => {
                            if let Some(data) = frame.data_ref() {
                                if buf.len() + data.len() > MAX_BODY {
                                    break Some("The upstream's response is too large to be checked by the content guards.");
                                }
                                buf.extend_from_slice(data);
                            }
                        }
                        Some(Err(_)) => {
                            break Some("The upstream's response could not be read whole.")
                        }
                        None => break None,
                    }
                };
                let (Some(mut parts), Some(mut g)) = (parts.take(), guarding.take()) else {
                    return Poll::Ready(unreadable("The response was already taken."));
                };
                if let Some(why) = failed {
                    g.unreadable();
                    return Poll::Ready(unreadable(why));
                }
                let body = std::mem::take(buf).freeze();
                match check_json(&mut g, &body) {
                    JsonOutcome::Unchanged => {
                        Poll::Ready(Response::from_parts(parts, GuardBody::full(body)))
                    }
                    JsonOutcome::Rewritten(new) => {
                        parts
                            .headers
                            .insert(header::CONTENT_LENGTH, HeaderValue::from(new.len()));
                        Poll::Ready(Response::from_parts(
                            parts,
                            GuardBody::full(Bytes::from(new)),
                        ))
                    }
                    JsonOutcome::Blocked(Blocked(error)) => {
                        // The upstream answered (and billed): the record is `stopped`, with
                        // the withheld body's usage, not a rejection of the request.
                        if let Some(audit) = &g.audit {
                            audit.withheld_usage(&body);
                        }
                        let mut response = error
                            .into_response(LAYER)
                            .map(|full| GuardBody::full(full_bytes(full)));
                        // What other layers left in the extensions stays, with the rejection.
                        let rejection = response.extensions_mut().remove::<crate::Rejection>();
                        *response.extensions_mut() = std::mem::take(&mut parts.extensions);
                        if let Some(rejection) = rejection {
                            response.extensions_mut().insert(rejection);
                        }
                        Poll::Ready(response)
                    }
                    JsonOutcome::Unreadable => {
                        g.unreadable();
                        Poll::Ready(unreadable(
                            "The upstream's response is not JSON the content guards can read.",
                        ))
                    }
                }
            }
        }
    }
}

/// For the tests and fuzz targets (feature `fuzzing`): [`guard_response`] with a plan made of
/// these parts.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub fn guard_response_with<B>(
    guards: Vec<Guard>,
    system_prompt: &str,
    endpoint: Endpoint,
    audit: Option<AuditHandle>,
    alerts: Option<Arc<dyn AlertSink>>,
    response: Response<B>,
) -> impl Future<Output = Response<GuardBody<B>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let plan = ResponsePlan {
        guards,
        system_prompt: Arc::from(system_prompt),
        endpoint,
        key: Some("test-key".to_owned()),
        audit,
        alerts,
    };
    guard_response(Some(plan), response)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::guard::detect::{Detector, Found};

    struct Secret;

    impl Detector for Secret {
        fn find(&self, text: &str, found: &mut Vec<Found>) {
            let mut from = 0;
            while let Some(at) = text[from..].find("secret") {
                found.push(Found::new(from + at..from + at + 6, "word"));
                from += at + 1;
            }
        }
        fn max_match_len(&self) -> usize {
            6
        }
    }

    fn sse_guard(mode: Mode) -> SseGuard {
        let plan = ResponsePlan {
            guards: vec![Guard::new("s", Secret).mode(mode)],
            system_prompt: Arc::from(""),
            endpoint: Endpoint::ChatCompletions,
            key: None,
            audit: None,
            alerts: None,
        };
        let guarding = Guarding::new(plan);
        let acting = guarding.checks.any_acting();
        SseGuard::new(guarding, acting)
    }

    fn delta(text: &str) -> Bytes {
        Bytes::from(format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n"
        ))
    }

    #[test]
    fn memory_stays_bounded_on_a_long_stream() {
        let mut guard = sse_guard(Mode::Redact);
        let mut sent = 0;
        for i in 0..20_000 {
            let (out, stop) = guard.feed(&delta(if i % 7 == 0 { "a se" } else { "cret lorem " }));
            assert!(!stop);
            sent += out.len();
            let stream = &guard.streams[&StreamKey::Content(0)];
            // What is held is bounded by the guards (L + 2C before what is undecided, and
            // at most L + C undecided), not by the stream.
            assert!(
                stream.scan.held() <= 6 + 8 + 6 + 4 + 11,
                "{}",
                stream.scan.held()
            );
            assert_eq!(guard.splitter.held(), 0);
        }
        assert!(sent > 1_000_000);
    }

    #[test]
    fn an_event_over_the_limit_stops_a_guarded_stream_and_passes_an_audited_one() {
        let mut big =
            BytesMut::from(&b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\""[..]);
        big.resize(MAX_BODY + 10, b'a');
        let big = big.freeze();
        let mut guard = sse_guard(Mode::Block);
        let (out, stop) = guard.feed(&big);
        assert!(stop);
        let out = String::from_utf8(out.to_vec()).unwrap();
        assert!(out.contains("upstream_invalid_response"), "{out}");
        let mut guard = sse_guard(Mode::Audit);
        let (_, stop) = guard.feed(&big);
        assert!(!stop);
        assert_eq!(guard.splitter.held(), 0);
    }

    #[test]
    fn the_body_is_send_and_unpin_over_a_policy_body() {
        fn is_body<T: Body<Data = Bytes, Error = BoxError> + Send + Unpin>() {}
        is_body::<GuardBody<crate::PolicyBody>>();
    }
}
