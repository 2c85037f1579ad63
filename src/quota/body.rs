//! The response body of [`Quota`](super::Quota): passes every frame on, reads the usage on the
//! way, and settles the request when the body ends, fails or is dropped.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::ledger::{Reservation, SpendLedger, SpendWatch};
use super::rate::{RateLimiter, RateLimits};
use crate::audit::pricing::ModelPrice;
use crate::audit::usage::UsageScanner;
use crate::audit::{flag, AuditHandle};
use crate::body::ResponseBody;
use crate::error::PolicyError;
use crate::keys::BoxFuture;
use crate::tokens::TokenCounter;

/// Longest SSE line the stream meter reads (a chunk's JSON is a few hundred bytes). A longer
/// line is not metered.
const MAX_METERED_LINE: usize = 64 * 1024;

/// The running cost of a streamed completion, from the text of its deltas as they pass.
pub(crate) struct Meter {
    /// The current line, until its end.
    line: Vec<u8>,
    /// The current line is too long to read: skipped to its end.
    skipping: bool,
    counter: TokenCounter,
    output_tokens: u64,
    /// The prompt's cost (known before the stream).
    prompt_usd: f64,
    output_usd_per_token: f64,
    /// The stream is cut when its running cost passes this.
    allowance_usd: f64,
}

impl Meter {
    pub(crate) fn new(
        counter: TokenCounter,
        prompt_usd: f64,
        price: &ModelPrice,
        allowance_usd: f64,
    ) -> Self {
        Meter {
            line: Vec::new(),
            skipping: false,
            counter,
            output_tokens: 0,
            prompt_usd,
            output_usd_per_token: price.output_per_mtok / 1_000_000.0,
            allowance_usd,
        }
    }

    /// The stream's cost so far: its prompt and the output tokens counted.
    pub(crate) fn running_usd(&self) -> f64 {
        self.prompt_usd + self.output_tokens as f64 * self.output_usd_per_token
    }

    /// Reads `data`; returns where the line that took the stream past its allowance ends
    /// (just after its `\n`), if one did.
    fn feed(&mut self, data: &[u8]) -> Option<usize> {
        let mut start = 0;
        while let Some(at) = memchr::memchr(b'\n', &data[start..]) {
            let end = start + at;
            if !self.skipping && self.line.len() + (end - start) <= MAX_METERED_LINE {
                self.line.extend_from_slice(&data[start..end]);
                let line = std::mem::take(&mut self.line);
                self.read_line(&line);
                self.line = line;
            }
            self.line.clear();
            self.skipping = false;
            start = end + 1;
            if self.running_usd() > self.allowance_usd {
                return Some(start);
            }
        }
        let rest = &data[start..];
        if self.skipping || self.line.len() + rest.len() > MAX_METERED_LINE {
            self.skipping = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(rest);
        }
        None
    }

    /// Counts the output text of one `data:` line: every string of a chat
    /// `choices[].delta` but its labels (content, in parts too, refusals, tool and function
    /// call arguments, audio transcripts, reasoning), completions `choices[].text`, Responses
    /// `*.delta` events.
    fn read_line(&mut self, line: &[u8]) {
        let Some(json) = line.strip_prefix(b"data:") else {
            return;
        };
        let json = json.trim_ascii();
        if !json.starts_with(b"{") {
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk<'_>>(json) else {
            return;
        };
        let mut tokens = 0;
        let mut count = |text: &str| tokens += self.counter_tokens(text);
        for choice in &chunk.choices {
            if let Some(delta) = &choice.delta {
                delta_text(delta, &mut count);
            }
            choice.text.as_deref().map(&mut count);
        }
        if chunk.kind.as_deref().is_some_and(|k| k.ends_with(".delta")) {
            chunk.delta.as_deref().map(&mut count);
        }
        self.output_tokens = self.output_tokens.saturating_add(tokens);
    }

    /// The tokens of some output text: exact with the `tokens` feature; otherwise OpenAI's
    /// rule of thumb (4 characters a token), not the prompt estimate, which errs high and
    /// would cut a stream early.
    fn counter_tokens(&self, text: &str) -> u64 {
        if self.counter.is_exact() {
            self.counter.count(text) as u64
        } else {
            text.chars().count().div_ceil(4) as u64
        }
    }
}

#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(default)]
    choices: Vec<Choice<'a>>,
    #[serde(default, rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Choice<'a> {
    /// Read whole: every string in it is output (content as text or parts, refusals, tool
    /// and function call arguments, audio transcripts, a compatible server's reasoning).
    #[serde(default)]
    delta: Option<serde_json::Value>,
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

/// Keys of a delta whose string values are labels, not output.
const DELTA_LABELS: [&str; 4] = ["role", "type", "id", "name"];

/// Calls `count` with every string in a chat delta that is output (see [`DELTA_LABELS`]).
fn delta_text(value: &serde_json::Value, count: &mut impl FnMut(&str)) {
    match value {
        serde_json::Value::String(text) => count(text),
        serde_json::Value::Array(items) => {
            for item in items {
                delta_text(item, count);
            }
        }
        serde_json::Value::Object(fields) => {
            for (key, value) in fields {
                if !(value.is_string() && DELTA_LABELS.contains(&key.as_str())) {
                    delta_text(value, count);
                }
            }
        }
        _ => {}
    }
}

/// The events that end a stream cut at its budget: an error in OpenAI's shape, then
/// `[DONE]`. Preceded by a blank line, which ends the event the last line belonged to.
fn cut_events() -> Bytes {
    let error = PolicyError::InsufficientQuota(
        "This key's spend cap was reached while this response was streamed: the response was cut here.".into(),
    );
    let mut out = b"\ndata: ".to_vec();
    out.extend_from_slice(&error.to_json());
    out.extend_from_slice(b"\n\ndata: [DONE]\n\n");
    Bytes::from(out)
}

/// What a request owes the ledger and the rate limiter, settled once, when dropped.
///
/// Dropping is the one place a request is settled, so that every way a request can end
/// (body completed, failed, dropped by a client that went away, the inner service failing,
/// the response future dropped) settles it exactly once.
pub(crate) struct Settle {
    pub(crate) ledger: Arc<dyn SpendLedger>,
    pub(crate) limiter: Arc<dyn RateLimiter>,
    pub(crate) key: Arc<str>,
    /// What is held: the key's reservation against its cap, the team's against the team's.
    pub(crate) holds: Vec<Hold>,
    pub(crate) price: Option<ModelPrice>,
    pub(crate) rate: Option<(RateLimits, u64)>,
    pub(crate) stage: Stage,
    pub(crate) scanner: Option<UsageScanner>,
    /// For a stream that may be cut at the key's budget.
    pub(crate) meter: Option<Meter>,
    /// The audit layer's handle, when there is one: the record gets what was reserved and
    /// settled.
    pub(crate) audit: Option<AuditHandle>,
}

/// A reservation, and the cap it was made against (for a metered stream that asks the
/// ledger for more).
pub(crate) struct Hold {
    pub(crate) reservation: Reservation,
    pub(crate) cap_usd: f64,
    /// The thresholds its settlement is watched for, when the layer alerts.
    pub(crate) watch: Option<SpendWatch>,
}

/// How far the request went, which decides what is settled without usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Not sent on (refused here, or dropped before): nothing was spent.
    Unsent,
    /// Sent on: what the usage says, else the whole reservation.
    Sent,
    /// A layer further in refused it: the upstream never saw it.
    RefusedInside,
}

impl Settle {
    fn feed(&mut self, data: &[u8]) {
        if let Some(scanner) = self.scanner.as_mut() {
            scanner.feed(data);
        }
    }

    /// A metered stream outgrew its allowance: asks the ledger to hold more under each of
    /// its reservations (what it is over by, and at least half the allowance again, so that
    /// a long stream asks rarely). `None`: nothing can be asked for (the stream is cut).
    fn ask_more(&self) -> Option<Grant> {
        let meter = self.meter.as_ref()?;
        if self.holds.is_empty() {
            return None;
        }
        let over = meter.running_usd() - meter.allowance_usd;
        let more = over.max(meter.allowance_usd / 2.0).max(1e-9);
        if !more.is_finite() {
            return None;
        }
        let mut answers: Vec<_> = self
            .holds
            .iter()
            .map(|h| self.ledger.extend(&h.reservation.id, more, h.cap_usd))
            .collect();
        let answer = if answers.len() == 1 {
            answers.pop().expect("one answer")
        } else {
            // Granted when every cap allows it (what one of them holds more is released
            // when the request settles).
            Box::pin(async move {
                let mut granted = true;
                for answer in answers {
                    granted &= answer.await;
                }
                granted
            })
        };
        Some(Grant { answer, more })
    }

    /// The ledger granted `more`.
    fn granted(&mut self, more: f64) {
        if let Some(meter) = self.meter.as_mut() {
            meter.allowance_usd += more;
            for hold in &mut self.holds {
                hold.reservation.amount_usd += more;
            }
        }
    }
}

/// A request to the ledger for more allowance, awaited before the stream goes on.
struct Grant {
    answer: BoxFuture<'static, bool>,
    more: f64,
}

/// A frame held while the ledger answers: metered up to `read`.
struct Held {
    data: Bytes,
    read: usize,
    grant: Grant,
}

impl Drop for Settle {
    fn drop(&mut self) {
        let usage = self.scanner.as_mut().and_then(|scanner| {
            scanner.finish();
            (!scanner.usage_invalid())
                .then(|| scanner.take_usage())
                .flatten()
        });
        let (cost, tokens) = match self.stage {
            Stage::Unsent | Stage::RefusedInside => (Some(0.0), Some(0)),
            Stage::Sent => (
                // No usage (none reported, or none that can be right), or no price: the
                // reservation, never nothing.
                usage
                    .as_ref()
                    .and_then(|u| self.price.map(|p| p.cost(u)))
                    .filter(|c| c.is_finite()),
                usage
                    .as_ref()
                    .map(|u| u.prompt_tokens + u.completion_tokens),
            ),
        };
        let seen = self.meter.as_ref().map_or(0.0, Meter::running_usd);
        for (i, hold) in self.holds.drain(..).enumerate() {
            // Without usage: the reservation, or what the stream was seen to cost if more.
            let fallback = hold.reservation.amount_usd.max(seen);
            let settled = cost.unwrap_or(fallback);
            match hold.watch {
                // Nothing spent: no threshold newly reached.
                Some(watch) if settled > 0.0 => {
                    self.ledger
                        .settle_watched(&hold.reservation.id, settled, watch)
                }
                _ => self.ledger.settle(&hold.reservation.id, settled),
            }
            if let (0, Some(audit)) = (i, &self.audit) {
                audit.set_settled(settled);
            }
        }
        if let Some((limits, estimated)) = self.rate.take() {
            if limits.tokens_per_minute.is_some() {
                self.limiter
                    .correct(&self.key, limits, estimated, tokens.unwrap_or(estimated));
            }
        }
    }
}

pin_project! {
    /// Response body of [`Quota`](super::Quota): the inner body, passed through frame by frame
    /// as it comes, while its usage is read on the fly ([`UsageScanner`]). The request is
    /// settled with the ledger when the body ends, fails, or is dropped before its end; in
    /// memory it holds the scanner's small buffer (one `usage` value), whatever the body's
    /// length.
    #[project = QuotaBodyProj]
    pub struct QuotaBody<B> {
        #[pin]
        inner: ResponseBody<B>,
        settle: Option<Settle>,
        // A frame waiting for the ledger's answer to a stream that outgrew its allowance.
        held: Option<Held>,
        // The stream was cut at the key's budget: these events end it.
        tail: Option<Bytes>,
        cut: bool,
    }
}

impl<B: Body<Data = Bytes>> QuotaBody<B> {
    pub(crate) fn new(inner: ResponseBody<B>, settle: Option<Settle>) -> Self {
        // A body that will not be polled (204, HEAD, empty): settled now.
        let settle = if inner.is_end_stream() { None } else { settle };
        QuotaBody {
            inner,
            settle,
            held: None,
            tail: None,
            cut: false,
        }
    }
}

impl<B> QuotaBody<B> {
    pub(crate) fn made(inner: ResponseBody<B>) -> Self {
        QuotaBody {
            inner,
            settle: None,
            held: None,
            tail: None,
            cut: false,
        }
    }
}

impl<B> fmt::Debug for QuotaBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaBody")
            .field("inner", &self.inner)
            .field("settled", &self.settle.is_none())
            .finish()
    }
}

impl<B> Body for QuotaBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if *this.cut {
            return Poll::Ready(this.tail.take().map(|tail| Ok(Frame::data(tail))));
        }
        // The frame to meter, and how much of it is metered already.
        let (data, mut read) = match this.held.as_mut() {
            Some(held) => {
                let granted = ready!(held.grant.answer.as_mut().poll(cx));
                let held = this.held.take().expect("just matched");
                let Some(settle) = this.settle.as_mut() else {
                    return Poll::Ready(Some(Ok(Frame::data(held.data))));
                };
                if !granted {
                    return cut(this, held.data, held.read);
                }
                settle.granted(held.grant.more);
                (held.data, held.read)
            }
            None => match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Some(settle) = this.settle.as_mut() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    settle.feed(&data);
                    (data, 0)
                }
                // The end, or a failure: settle with what was seen.
                other => {
                    drop(this.settle.take());
                    return Poll::Ready(other);
                }
            },
        };
        let settle = this.settle.as_mut().expect("metered only while unsettled");
        // Meters the rest of the frame; each time the stream goes past what it may spend,
        // asks the ledger for more, and cuts it there if the ledger holds no more.
        while let Some(end) = settle
            .meter
            .as_mut()
            .and_then(|m| m.feed(data.get(read..).unwrap_or_default()))
        {
            read += end;
            let Some(mut grant) = settle.ask_more() else {
                return cut(this, data, read);
            };
            match grant.answer.as_mut().poll(cx) {
                Poll::Ready(true) => settle.granted(grant.more),
                Poll::Ready(false) => return cut(this, data, read),
                Poll::Pending => {
                    *this.held = Some(Held { data, read, grant });
                    return Poll::Pending;
                }
            }
        }
        if this.inner.is_end_stream() {
            // The last frame: settled now, before whoever reads the body sees its end (an
            // audit layer records the settlement then).
            drop(this.settle.take());
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        if self.cut {
            return self.tail.is_none();
        }
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.cut || self.settle.as_ref().is_some_and(|s| s.meter.is_some()) {
            // A metered stream may be cut short and end with events of ours.
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

/// Cuts the stream past its budget, after the first `end` bytes of `data`: the rest of this
/// frame is not sent, the upstream is dropped (which stops the generation), the request
/// settled with what the stream was seen to cost, and the client gets an error and the end.
fn cut<B: Body<Data = Bytes>>(
    this: QuotaBodyProj<'_, B>,
    data: Bytes,
    end: usize,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
    *this.cut = true;
    *this.tail = Some(cut_events());
    if let Some(audit) = this.settle.as_ref().and_then(|s| s.audit.as_ref()) {
        audit.flag(flag::BUDGET_CUT);
        audit.stopped(crate::error::LayerName::Quota, "insufficient_quota");
    }
    let mut inner = this.inner;
    inner.set(ResponseBody::full(Bytes::new()));
    drop(this.settle.take());
    let head = data.slice(..end.min(data.len()));
    if head.is_empty() {
        return Poll::Ready(this.tail.take().map(|tail| Ok(Frame::data(tail))));
    }
    Poll::Ready(Some(Ok(Frame::data(head))))
}
