//! Reading token usage out of response bodies as they stream past, and removing the
//! usage-only chunk that the proxy asked for on the client's behalf.
//!
//! The scanner and the stripper are plain synchronous state machines over byte chunks: the audit layer's
//! body wrapper hands them every frame as it forwards it, and neither ever holds the body.
//!
//! - [`UsageScanner`] finds the usage in a JSON body (the top-level `"usage"` object) or in a
//!   `text/event-stream` body (a chunk with a non-null `usage`, or the Responses API's
//!   `response.completed` event), and turns it into a [`pricing::Usage`](crate::audit::pricing::Usage).
//!   It holds only the bytes of the usage value itself (at most
//!   [`DEFAULT_MAX_USAGE_BYTES`] by default), whatever the size of the body or of one event.
//! - The audit layer's own usage-chunk stripper (private) removes the usage-only chunk
//!   (`"choices":[]` with a non-null `usage`) from a chat or completions stream, for the case
//!   where the layer turned on `stream_options.include_usage` upstream although the client did
//!   not ask for it.
//!
//! Feed the scanner the bytes as they come from the upstream:
//!
//! ```
//! use tower_llm_policy::audit::usage::{ScanMode, UsageScanner};
//!
//! let upstream = [
//!     "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
//!     "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\n",
//!     "data: [DONE]\n\n",
//! ];
//! let mut scanner = UsageScanner::new(ScanMode::Sse);
//! for frame in upstream {
//!     scanner.feed(frame.as_bytes());
//! }
//! scanner.finish();
//!
//! assert_eq!(scanner.usage().map(|u| u.total_tokens), Some(10));
//! assert!(scanner.saw_done());
//! ```
//!
//! Neither decompresses: the proxy asks the upstream for `accept-encoding: identity`.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use memchr::{memchr, memchr2};
use serde::{Deserialize, Deserializer};

use crate::audit::pricing::Usage;

/// Default bound on the bytes of one `usage` value the [`UsageScanner`] keeps while reading
/// it (16 KiB; a real one is a few hundred bytes). A larger value is skipped.
pub const DEFAULT_MAX_USAGE_BYTES: usize = 16 * 1024;

/// Default bound on the bytes of one incomplete event the usage-chunk stripper holds back
/// (16 KiB; a usage-only chunk is well under 1 KiB). Longer events are never removed.
pub(crate) const DEFAULT_STRIP_WINDOW: usize = 16 * 1024;

/// What kind of response body a [`UsageScanner`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanMode {
    /// One JSON document (a non-streamed response): usage is its top-level `"usage"` value.
    Json,
    /// A `text/event-stream` body: usage is in the `data:` of one of the events.
    Sse,
}

impl ScanMode {
    /// The mode for a response's `Content-Type`: `text/event-stream` is [`Sse`](Self::Sse),
    /// `application/json` and any `+json` type are [`Json`](Self::Json), anything else is
    /// `None` (nothing to scan). Parameters such as `; charset=utf-8` are ignored.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("text/event-stream") {
            Some(Self::Sse)
        } else if essence.eq_ignore_ascii_case("application/json")
            || essence
                .get(essence.len().saturating_sub(5)..)
                .is_some_and(|suffix| suffix.eq_ignore_ascii_case("+json"))
        {
            Some(Self::Json)
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// UsageScanner

/// Finds the token usage in a response body fed to it chunk by chunk.
///
/// Create one per response with the body's [`ScanMode`], [`feed`](Self::feed) it every chunk in
/// order (chunks may be split anywhere: inside a `data:` line, inside the JSON, between `\r`
/// and `\n`), call [`finish`](Self::finish) at the end of the body, then read
/// [`usage`](Self::usage).
///
/// # What counts as usage
///
/// - [`ScanMode::Json`]: the value of the `"usage"` key of the top-level object. A `usage` key
///   in a nested object, or the text `"usage"` inside a string, is not taken.
/// - [`ScanMode::Sse`]: in each event's data (its `data:` lines joined by `\n`), the top-level
///   `"usage"` value when it is not `null` (chat completions and completions streams: with
///   `stream_options.include_usage` it is the last chunk, with `"choices": []`; some compatible
///   servers put it on the last content chunk instead), and the non-null `"usage"` of the
///   top-level `"response"` object (Responses API streams: the events that carry one are
///   `response.completed`, `response.incomplete` and `response.failed`; the event name itself
///   is not needed). Comments, other fields and `[DONE]` are skipped.
///
/// When usage is reported more than once, the last report wins (some compatible servers
/// send a running total on every chunk); [`usage_reports`](Self::usage_reports) counts them.
/// Nothing after an SSE `[DONE]` is read. Both usage shapes map to
/// [`Usage`]: `prompt_tokens`/`input_tokens`, `completion_tokens`/`output_tokens`,
/// `total_tokens` (prompt + completion when absent), `prompt_tokens_details.cached_tokens`/
/// `input_tokens_details.cached_tokens` and `completion_tokens_details.reasoning_tokens`/
/// `output_tokens_details.reasoning_tokens`. Embeddings report only `prompt_tokens` and
/// `total_tokens`. A `usage` object with no token count at all is ignored.
///
/// A count is a non-negative integer up to [`MAX_TOKEN_COUNT`] (`12.0` is accepted as 12).
/// Anything else — negative, fractional, larger, a string — and counts that disagree
/// (`total_tokens` ≠ prompt + completion, cached > prompt, reasoning > completion) make the
/// usage invalid ([`usage_invalid`](Self::usage_invalid)): never saturated or rounded into a
/// count that would be billed.
///
/// # Memory
///
/// The scanner does not buffer the body, nor an SSE event: it reads the JSON with a small
/// state machine (string and escape state, nesting depth, the current key) and keeps only the
/// bytes of a usage value, at most [`DEFAULT_MAX_USAGE_BYTES`] (see
/// [`with_max_usage_bytes`](Self::with_max_usage_bytes)). So an event of any size (a
/// `response.completed` carrying a long answer) is still read, and memory stays bounded on a
/// stream of any length; [`buffered_high_water`](Self::buffered_high_water) reports it.
///
/// # Limits
///
/// Keys are matched on their raw bytes: a key written with escapes (`"us\u0061ge"`) is not
/// recognised. The JSON is not validated: on malformed input the scanner finds no usage (or
/// the usage of whatever it could parse), and it never panics; a `usage` object that does not
/// parse (a count of `1e400`, out of any number's range) is reported, invalid. At [`finish`](Self::finish), a
/// last SSE event that lacks its closing blank line is still read.
#[derive(Debug)]
pub struct UsageScanner {
    mode: ScanMode,
    json: JsonScan,
    sse: SseEvents,
    saw_done: bool,
    finished: bool,
}

impl UsageScanner {
    /// A scanner for a body of the given kind.
    pub fn new(mode: ScanMode) -> Self {
        Self {
            mode,
            json: JsonScan::new(mode == ScanMode::Sse, true),
            sse: SseEvents::default(),
            saw_done: false,
            finished: false,
        }
    }

    /// Sets the largest `usage` value, in bytes, the scanner will keep while reading it
    /// (default [`DEFAULT_MAX_USAGE_BYTES`]). Larger values are skipped.
    #[must_use]
    pub fn with_max_usage_bytes(mut self, max: usize) -> Self {
        self.json.max_capture = max;
        self
    }

    /// The mode this scanner was created with.
    pub fn mode(&self) -> ScanMode {
        self.mode
    }

    /// Scans the next chunk of the body. Chunks fed after [`finish`](Self::finish) are
    /// ignored, and so is whatever follows an SSE `[DONE]` event: the stream is over, and a
    /// usage sent after it is not read (a conforming upstream sends none).
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.finished || self.saw_done {
            return;
        }
        match self.mode {
            ScanMode::Json => self.json.feed(chunk),
            ScanMode::Sse => {
                let mut rest = chunk;
                while let Some(end) = self.sse.feed(rest, &mut self.json) {
                    self.end_event();
                    if self.saw_done {
                        break;
                    }
                    rest = rest.get(end..).unwrap_or_default();
                }
            }
        }
    }

    /// Marks the end of the body. In SSE mode a last event without its closing blank line is
    /// read as if it had one.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        match self.mode {
            ScanMode::Json => self.json.end_capture(),
            ScanMode::Sse => {
                self.sse.end_line(&mut self.json);
                if self.sse.data_lines > 0 {
                    self.end_event();
                }
            }
        }
        self.finished = true;
    }

    fn end_event(&mut self) {
        if self.sse.is_done() {
            self.saw_done = true;
        }
        if self.sse.is_error() {
            self.json.saw_error = true;
        }
        self.json.end_capture();
        self.json.reset();
        self.sse.reset_event();
    }

    /// The usage found so far (the last one reported), if any. It may be read at any time,
    /// for example when the client went away before the end of the body.
    pub fn usage(&self) -> Option<&Usage> {
        self.json.found.as_ref().map(|r| &r.usage)
    }

    /// Whether the usage found so far is invalid: a count that is negative, fractional,
    /// larger than [`MAX_TOKEN_COUNT`] or not a number (read as 0 in [`usage`](Self::usage)),
    /// or counts that disagree (`total_tokens` is not prompt + completion, cached tokens are
    /// more than the prompt's, reasoning tokens more than the completion's). The audit layer
    /// records such usage with no cost and the flag
    /// [`usage_invalid`](crate::audit::flag::USAGE_INVALID).
    pub fn usage_invalid(&self) -> bool {
        self.json.found.as_ref().is_some_and(|r| r.invalid)
    }

    /// Takes the usage found so far out of the scanner.
    pub fn take_usage(&mut self) -> Option<Usage> {
        self.json.found.take().map(|r| r.usage)
    }

    /// Whether the body reported an error: a JSON object under a top-level `"error"` key (a
    /// `200` whose body is `{"error":{...}}`, or a stream event `data: {"error":{...}}`), or
    /// under the `"error"` key of a Responses stream's top-level `response` (a
    /// `response.failed` event), or a Responses stream's `error` event (`event: error`, or
    /// data starting `{"type":"error"`). `"error": null` is no error.
    pub fn saw_error(&self) -> bool {
        self.json.saw_error
    }

    /// How many usage reports were read (a stream may carry more than one: the last one is
    /// the usage).
    pub fn usage_reports(&self) -> u32 {
        self.json.reports
    }

    /// Takes the usage report found so far, with its validity.
    pub(crate) fn take_reported(&mut self) -> Option<Reported> {
        self.json.found.take()
    }

    /// Whether an SSE event with the data `[DONE]` was seen (always `false` in JSON mode).
    pub fn saw_done(&self) -> bool {
        self.saw_done
    }

    /// Whether [`finish`](Self::finish) was called.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The largest heap buffer, in bytes of capacity, the scanner has held so far. It never
    /// exceeds the [usage bound](Self::with_max_usage_bytes); on real traffic it is the size of
    /// one usage object.
    pub fn buffered_high_water(&self) -> usize {
        self.json.high_water
    }
}

// ---------------------------------------------------------------------------------------------
// UsageChunkStripper

/// Removes the usage-only chunk from a chat completions or completions event stream.
///
/// Use it when the proxy turned on `stream_options.include_usage` upstream although the client
/// did not ask for it: the client then gets the stream it asked for. When the client asked for
/// usage itself, do not use a stripper at all: its stream is forwarded untouched.
///
/// An event is removed when its data (its `data:` lines joined) is a JSON object whose
/// top-level `"choices"` is an empty array and whose top-level `"usage"` is an object, and the
/// event is no longer than the window. Everything else — content chunks, a usage carried on a
/// content chunk, comments, `[DONE]` — is forwarded byte for byte, in order.
///
/// [`push`](Self::push) returns at once what may be forwarded: all complete events except a
/// usage-only one, and the start of an incomplete event as soon as its bytes show it is not one
/// (its `choices` is not empty, its `usage` is `null`, its data is not a JSON object, or its
/// JSON object is complete and is not usage-only). Only the current incomplete event may be held back, which costs the client nothing (an SSE client
/// acts on an event only when its closing blank line arrives), and never more than the window
/// ([`DEFAULT_STRIP_WINDOW`], see [`with_window`](Self::with_window)): a longer event is
/// released as it comes and kept. When a chunk holds only bytes to forward in one run, the
/// result is a zero-copy slice of it.
#[derive(Debug)]
pub(crate) struct UsageChunkStripper {
    window: usize,
    json: JsonScan,
    sse: SseEvents,
    held: BytesMut,
    /// The current event is known to be forwarded: its bytes pass through as they come.
    pass: bool,
    /// The previous chunk ended with a `\r` that ended an event; `Some(removed)` says whether
    /// that event was removed, which is where a `\n` opening the next chunk belongs.
    ended_on_cr: Option<bool>,
    removed: u64,
    high_water: usize,
}

impl Default for UsageChunkStripper {
    fn default() -> Self {
        Self::new()
    }
}

impl UsageChunkStripper {
    /// A stripper with the default window.
    pub(crate) fn new() -> Self {
        Self {
            window: DEFAULT_STRIP_WINDOW,
            json: JsonScan::new(false, false),
            sse: SseEvents::default(),
            held: BytesMut::new(),
            pass: false,
            ended_on_cr: None,
            removed: 0,
            high_water: 0,
        }
    }

    /// Sets the largest event, in bytes, that may be held back and removed (default
    /// [`DEFAULT_STRIP_WINDOW`]).
    #[must_use]
    #[cfg(test)]
    pub(crate) fn with_window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }

    /// Takes the next chunk of the upstream stream and returns the bytes that may be forwarded
    /// to the client now (possibly empty).
    pub(crate) fn push(&mut self, chunk: Bytes) -> Bytes {
        if chunk.is_empty() {
            return chunk;
        }
        let mut out = Out::default();
        let mut start = 0;
        if let Some(removed) = self.ended_on_cr.take() {
            if chunk.first() == Some(&b'\n') {
                // The second half of the `\r\n` that ended the previous event.
                self.sse.after_cr = false;
                if !removed {
                    out.range(&chunk, 0..1);
                }
                start = 1;
            }
        }
        while start < chunk.len() {
            let Some(rest) = chunk.get(start..) else {
                break;
            };
            match self.sse.feed(rest, &mut self.json) {
                Some(len) => {
                    let end = start + len;
                    let event_len = self.held.len() + len;
                    let remove =
                        !self.pass && event_len <= self.window && self.json.is_usage_only();
                    if remove {
                        self.removed += 1;
                        self.held.clear();
                    } else {
                        if !self.held.is_empty() {
                            out.bytes(&chunk, &self.held);
                            self.held.clear();
                        }
                        out.range(&chunk, start..end);
                    }
                    if end == chunk.len() && self.sse.after_cr {
                        self.ended_on_cr = Some(remove);
                    }
                    self.reset_event();
                    start = end;
                }
                None => {
                    // The rest of the chunk is the start of an event that is not complete yet.
                    let tail = start..chunk.len();
                    if self.pass
                        || self.json.not_usage_only()
                        || self.held.len() + tail.len() > self.window
                    {
                        if !self.held.is_empty() {
                            out.bytes(&chunk, &self.held);
                            self.held.clear();
                        }
                        self.pass = true;
                        out.range(&chunk, tail);
                    } else {
                        self.held
                            .extend_from_slice(chunk.get(tail).unwrap_or_default());
                        self.high_water = self.high_water.max(self.held.capacity());
                    }
                    break;
                }
            }
        }
        out.finish(&chunk)
    }

    /// Ends the stream and returns what is still held: the start of an event that never got
    /// its closing blank line. It is removed too if it is a complete usage-only chunk (an SSE
    /// client would have dropped it anyway).
    pub(crate) fn finish(&mut self) -> Bytes {
        self.sse.end_line(&mut self.json);
        let remove = !self.held.is_empty()
            && !self.pass
            && self.held.len() <= self.window
            && self.json.is_usage_only();
        let held = self.held.split().freeze();
        self.reset_event();
        self.held = BytesMut::new();
        if remove {
            self.removed += 1;
            Bytes::new()
        } else {
            held
        }
    }

    fn reset_event(&mut self) {
        self.json.reset();
        self.sse.reset_event();
        self.pass = false;
        if self.held.capacity() > 4096 {
            self.held = BytesMut::new();
        }
    }

    /// Number of usage-only events removed so far.
    #[cfg(test)]
    pub(crate) fn removed(&self) -> u64 {
        self.removed
    }

    /// Bytes held back right now (the start of the current, incomplete event).
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }

    /// The largest buffer, in bytes of capacity, held back so far.
    pub(crate) fn buffered_high_water(&self) -> usize {
        self.high_water
    }
}

/// Output of one [`UsageChunkStripper::push`]: a run of the input chunk while that is all there
/// is (returned as a zero-copy slice), copied into a buffer otherwise.
#[derive(Default)]
struct Out {
    run: Option<Range<usize>>,
    buf: BytesMut,
}

impl Out {
    fn range(&mut self, chunk: &Bytes, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        match &mut self.run {
            Some(run) if run.end == range.start => run.end = range.end,
            _ => {
                self.flush(chunk);
                self.run = Some(range);
            }
        }
    }

    fn bytes(&mut self, chunk: &Bytes, bytes: &[u8]) {
        self.flush(chunk);
        self.buf.extend_from_slice(bytes);
    }

    fn flush(&mut self, chunk: &Bytes) {
        if let Some(run) = self.run.take() {
            self.buf
                .extend_from_slice(chunk.get(run).unwrap_or_default());
        }
    }

    fn finish(mut self, chunk: &Bytes) -> Bytes {
        if self.buf.is_empty() {
            match self.run {
                Some(run) if run.end <= chunk.len() => chunk.slice(run),
                _ => Bytes::new(),
            }
        } else {
            self.flush(chunk);
            self.buf.freeze()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SSE framing

/// Where the SSE parser is within the current line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinePhase {
    /// No byte of the line seen yet.
    Start,
    /// Reading the field name (up to `:`).
    Name,
    /// Just after `data:`: one optional space to skip.
    SkipSpace,
    /// In the value of a `data:` line.
    Data,
    /// Just after `event:`: one optional space to skip.
    EventSkipSpace,
    /// In the value of an `event:` line.
    EventValue,
    /// In a comment or a field other than `data` and `event`.
    Ignore,
}

/// Splits an event stream into lines and events, sending the data of each event to a
/// [`JsonScan`]. Holds no heap memory.
#[derive(Debug)]
struct SseEvents {
    phase: LinePhase,
    /// Bytes of the field name seen, and whether they are still a prefix of `data`, or of
    /// `event`.
    name_len: usize,
    name_is_data: bool,
    name_is_event: bool,
    /// The value of the event's `event:` line (its type), up to 8 bytes.
    kind: [u8; 8],
    kind_len: usize,
    kind_overflow: bool,
    /// The last line ended with `\r`: a `\n` next is part of that line ending.
    after_cr: bool,
    /// `data:` lines in the current event.
    data_lines: usize,
    /// The first bytes of the event's data, to recognise `[DONE]`.
    head: [u8; 16],
    head_len: usize,
    head_overflow: bool,
}

impl Default for SseEvents {
    fn default() -> Self {
        Self {
            phase: LinePhase::Start,
            name_len: 0,
            name_is_data: true,
            name_is_event: true,
            kind: [0; 8],
            kind_len: 0,
            kind_overflow: false,
            after_cr: false,
            data_lines: 0,
            head: [0; 16],
            head_len: 0,
            head_overflow: false,
        }
    }
}

impl SseEvents {
    /// Reads `data` up to the end of the current event. Returns `Some(n)` when the event ended
    /// after the first `n` bytes (its closing blank line included); the caller handles the
    /// event, resets, and calls again with the rest. `None` when all of `data` was read without
    /// the event ending.
    fn feed(&mut self, data: &[u8], json: &mut JsonScan) -> Option<usize> {
        let mut i = 0;
        if self.after_cr && !data.is_empty() {
            self.after_cr = false;
            if data.first() == Some(&b'\n') {
                i = 1;
            }
        }
        while let Some(rest) = data.get(i..).filter(|r| !r.is_empty()) {
            let Some(off) = memchr2(b'\n', b'\r', rest) else {
                self.line_bytes(rest, json);
                return None;
            };
            self.line_bytes(rest.get(..off).unwrap_or_default(), json);
            let terminator = i + off;
            i = terminator + 1;
            if data.get(terminator) == Some(&b'\r') {
                match data.get(i) {
                    Some(b'\n') => i += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            if self.end_line(json) {
                return Some(i);
            }
        }
        None
    }

    /// Bytes of the current line, without its terminator.
    fn line_bytes(&mut self, mut s: &[u8], json: &mut JsonScan) {
        while !s.is_empty() {
            match self.phase {
                LinePhase::Start | LinePhase::Name => {
                    self.phase = LinePhase::Name;
                    let colon = memchr(b':', s);
                    let name = s.get(..colon.unwrap_or(s.len())).unwrap_or_default();
                    self.name_bytes(name);
                    let Some(colon) = colon else {
                        return;
                    };
                    s = s.get(colon + 1..).unwrap_or_default();
                    if self.name_is_data && self.name_len == 4 {
                        self.begin_data(json);
                        self.phase = LinePhase::SkipSpace;
                    } else if self.name_is_event && self.name_len == 5 {
                        // A later `event:` line replaces the type.
                        self.kind_len = 0;
                        self.kind_overflow = false;
                        self.phase = LinePhase::EventSkipSpace;
                    } else {
                        self.phase = LinePhase::Ignore;
                        return;
                    }
                }
                LinePhase::SkipSpace => {
                    if s.first() == Some(&b' ') {
                        s = s.get(1..).unwrap_or_default();
                    }
                    self.phase = LinePhase::Data;
                }
                LinePhase::Data => {
                    self.data_bytes(s, json);
                    return;
                }
                LinePhase::EventSkipSpace => {
                    if s.first() == Some(&b' ') {
                        s = s.get(1..).unwrap_or_default();
                    }
                    self.phase = LinePhase::EventValue;
                }
                LinePhase::EventValue => {
                    let end = self.kind_len + s.len();
                    match self.kind.get_mut(self.kind_len..end) {
                        Some(dst) if !self.kind_overflow => {
                            dst.copy_from_slice(s);
                            self.kind_len = end;
                        }
                        _ => self.kind_overflow = true,
                    }
                    return;
                }
                LinePhase::Ignore => return,
            }
        }
    }

    fn name_bytes(&mut self, name: &[u8]) {
        let end = self.name_len.saturating_add(name.len());
        if self.name_is_data {
            self.name_is_data = b"data".get(self.name_len..end) == Some(name);
        }
        if self.name_is_event {
            self.name_is_event = b"event".get(self.name_len..end) == Some(name);
        }
        self.name_len = end;
    }

    fn begin_data(&mut self, json: &mut JsonScan) {
        if self.data_lines > 0 {
            self.data_bytes(b"\n", json);
        }
        self.data_lines += 1;
    }

    fn data_bytes(&mut self, s: &[u8], json: &mut JsonScan) {
        json.feed(s);
        if !self.head_overflow {
            // The first bytes, as many as fit; more marks the data longer than the head.
            let room = self.head.len() - self.head_len;
            let take = s.len().min(room);
            if let (Some(dst), Some(src)) = (
                self.head.get_mut(self.head_len..self.head_len + take),
                s.get(..take),
            ) {
                dst.copy_from_slice(src);
                self.head_len += take;
            }
            self.head_overflow = s.len() > room;
        }
    }

    /// Ends the current line. Returns `true` when it was blank, which ends the event.
    fn end_line(&mut self, json: &mut JsonScan) -> bool {
        let phase = std::mem::replace(&mut self.phase, LinePhase::Start);
        if phase == LinePhase::Name && self.name_is_data && self.name_len == 4 {
            // A bare `data` line: a data line with an empty value.
            self.begin_data(json);
        }
        if phase == LinePhase::Name && self.name_is_event && self.name_len == 5 {
            // A bare `event` line: an empty type.
            self.kind_len = 0;
            self.kind_overflow = false;
        }
        self.name_len = 0;
        self.name_is_data = true;
        self.name_is_event = true;
        phase == LinePhase::Start
    }

    /// Whether the current event's data is `[DONE]`.
    fn is_done(&self) -> bool {
        self.data_lines > 0
            && !self.head_overflow
            && self
                .head
                .get(..self.head_len)
                .is_some_and(|d| d.trim_ascii() == b"[DONE]")
    }

    /// Whether the current event reports an error: its type is `error` (a Responses stream's
    /// error event), or its data starts `{"type":"error"` (the same event sent without its
    /// `event:` line).
    fn is_error(&self) -> bool {
        let kind = (!self.kind_overflow).then(|| self.kind.get(..self.kind_len));
        kind.flatten() == Some(b"error".as_slice())
            || (self.data_lines > 0
                && self
                    .head
                    .get(..self.head_len)
                    .is_some_and(|d| d.starts_with(br#"{"type":"error""#)))
    }

    fn reset_event(&mut self) {
        let after_cr = self.after_cr;
        *self = Self {
            after_cr,
            ..Self::default()
        };
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming JSON

/// A key of interest, at the depth where it counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Other,
    /// `usage` at the top level, or inside the top-level `response` object.
    Usage,
    /// `response` at the top level (only looked for in SSE mode).
    Response,
    /// `choices` at the top level.
    Choices,
    /// `error` at the top level, or inside the top-level `response` object.
    Error,
}

/// What a watched top-level value turned out to be, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Nothing,
    Null,
    Object,
    EmptyArray,
    Other,
}

/// The state of the document's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Root {
    Unknown,
    Object,
    /// The root object has been closed: later bytes are ignored.
    Closed,
    /// The root is not an object: nothing to find.
    Other,
}

/// A streaming reader of one JSON document that tracks just enough (string and escape state,
/// depth, the current key at the levels of interest) to capture the `usage` value and to
/// classify the top-level `choices` and `usage` values, without buffering anything else.
#[derive(Debug)]
struct JsonScan {
    /// Also capture `usage` inside the top-level `response` object.
    response_usage: bool,
    /// Capture and parse usage values (the scanner) rather than only classify (the stripper).
    capture: bool,
    max_capture: usize,

    root: Root,
    depth: u32,
    in_string: bool,
    escape: bool,
    /// At a tracked level: the next string is a key.
    expect_key: bool,
    reading_key: bool,
    key: [u8; 8],
    key_len: usize,
    key_long: bool,
    last_key: Key,
    /// Inside the top-level `response` object (depth 2 is tracked).
    in_response: bool,
    /// Classify the next value byte as the value of this key.
    await_value: Option<Key>,
    /// The next value byte follows the `[` of `choices`.
    await_second: bool,
    choices: Seen,
    usage_top: Seen,
    /// Depth of the `usage` value being captured.
    capturing: Option<u32>,
    buf: Vec<u8>,
    overflow: bool,

    found: Option<Reported>,
    /// Usage reports found so far (each event's; the last one is kept).
    reports: u32,
    /// An `error` object was seen at the top level (or in the top-level `response`).
    saw_error: bool,
    high_water: usize,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonScan {
    fn new(response_usage: bool, capture: bool) -> Self {
        Self {
            response_usage,
            capture,
            max_capture: DEFAULT_MAX_USAGE_BYTES,
            root: Root::Unknown,
            depth: 0,
            in_string: false,
            escape: false,
            expect_key: false,
            reading_key: false,
            key: [0; 8],
            key_len: 0,
            key_long: false,
            last_key: Key::Other,
            in_response: false,
            await_value: None,
            await_second: false,
            choices: Seen::Nothing,
            usage_top: Seen::Nothing,
            capturing: None,
            buf: Vec::new(),
            overflow: false,
            found: None,
            reports: 0,
            saw_error: false,
            high_water: 0,
        }
    }

    /// Back to the start of a new document, keeping configuration, the usage found so far,
    /// the high-water mark and the capture buffer's allocation.
    fn reset(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        *self = Self {
            buf,
            found: self.found.take(),
            reports: self.reports,
            saw_error: self.saw_error,
            ..Self::new(self.response_usage, self.capture)
        }
        .with_limits(self.max_capture, self.high_water);
    }

    fn with_limits(mut self, max_capture: usize, high_water: usize) -> Self {
        self.max_capture = max_capture;
        self.high_water = high_water;
        self
    }

    /// Whether the current position is directly inside an object whose keys matter.
    fn tracked(&self) -> bool {
        (self.depth == 1 && self.root == Root::Object) || (self.depth == 2 && self.in_response)
    }

    fn feed(&mut self, data: &[u8]) {
        if matches!(self.root, Root::Closed | Root::Other) {
            return;
        }
        // Start, within `data`, of the bytes of the usage value being captured.
        let mut cap_from = 0;
        let mut i = 0;
        while let Some(&b) = data.get(i) {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    // Escapes in a key: not one of ours (see the scanner's limits).
                    self.key_long |= self.reading_key;
                    i += 1;
                    continue;
                }
                let rest = data.get(i..).unwrap_or_default();
                match memchr2(b'"', b'\\', rest) {
                    None => {
                        if self.reading_key {
                            self.key_bytes(rest);
                        }
                        i = data.len();
                    }
                    Some(off) => {
                        if self.reading_key {
                            self.key_bytes(rest.get(..off).unwrap_or_default());
                        }
                        if rest.get(off) == Some(&b'\\') {
                            self.escape = true;
                        } else {
                            self.in_string = false;
                            if self.reading_key {
                                self.reading_key = false;
                                self.last_key = self.key_end();
                            }
                        }
                        i += off + 1;
                    }
                }
                continue;
            }
            if is_ws(b) {
                i += 1;
                continue;
            }
            if self.await_second {
                self.await_second = false;
                self.choices = if b == b']' {
                    Seen::EmptyArray
                } else {
                    Seen::Other
                };
            }
            if let Some(key) = self.await_value.take() {
                match key {
                    Key::Usage => {
                        if self.depth == 1 {
                            self.usage_top = match b {
                                b'n' => Seen::Null,
                                b'{' => Seen::Object,
                                _ => Seen::Other,
                            };
                        }
                        if b == b'n' && self.capturing.is_some() {
                            // `"usage": null`, on every chunk of an include_usage stream:
                            // nothing to keep or parse.
                            self.capturing = None;
                            self.buf.clear();
                        }
                    }
                    Key::Choices if b == b'[' => self.await_second = true,
                    Key::Choices => self.choices = Seen::Other,
                    // `"error": {...}`: the upstream reports an error (a `null` is no error).
                    Key::Error if b == b'{' => self.saw_error = true,
                    Key::Error | Key::Response | Key::Other => {}
                }
            }
            let tracked = self.tracked();
            match b {
                b'"' => {
                    self.in_string = true;
                    if tracked && self.expect_key {
                        self.reading_key = true;
                        self.key_len = 0;
                        self.key_long = false;
                    }
                }
                b'{' | b'[' => {
                    if self.depth == 0 {
                        if b == b'[' {
                            self.root = Root::Other;
                            return;
                        }
                        self.root = Root::Object;
                        self.expect_key = true;
                    } else if b == b'{'
                        && tracked
                        && self.depth == 1
                        && self.last_key == Key::Response
                        && !self.expect_key
                    {
                        self.in_response = true;
                        self.expect_key = true;
                    }
                    self.depth = self.depth.saturating_add(1);
                }
                b'}' | b']' => {
                    if self.capturing == Some(self.depth) {
                        self.capture_bytes(data.get(cap_from..i).unwrap_or_default());
                        self.end_capture();
                    }
                    if self.depth == 2 && self.in_response {
                        self.in_response = false;
                        self.expect_key = false;
                        self.last_key = Key::Other;
                    }
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        self.root = Root::Closed;
                        return;
                    }
                }
                b':' if tracked => {
                    self.expect_key = false;
                    match self.last_key {
                        Key::Usage => {
                            self.await_value = Some(Key::Usage);
                            if self.capture {
                                self.capturing = Some(self.depth);
                                self.buf.clear();
                                self.overflow = false;
                                cap_from = i + 1;
                            }
                        }
                        Key::Choices => self.await_value = Some(Key::Choices),
                        Key::Error => self.await_value = Some(Key::Error),
                        Key::Response | Key::Other => {}
                    }
                }
                b',' if tracked => {
                    if self.capturing == Some(self.depth) {
                        self.capture_bytes(data.get(cap_from..i).unwrap_or_default());
                        self.end_capture();
                    }
                    self.expect_key = true;
                    self.last_key = Key::Other;
                }
                _ if self.depth == 0 => {
                    // The root is a string, number or literal, or not JSON.
                    self.root = Root::Other;
                    return;
                }
                _ => {}
            }
            i += 1;
        }
        if self.capturing.is_some() {
            self.capture_bytes(data.get(cap_from..).unwrap_or_default());
        }
    }

    fn key_bytes(&mut self, s: &[u8]) {
        if self.key_long {
            return;
        }
        let end = self.key_len + s.len();
        match self.key.get_mut(self.key_len..end) {
            Some(dst) => {
                dst.copy_from_slice(s);
                self.key_len = end;
            }
            None => self.key_long = true,
        }
    }

    fn key_end(&self) -> Key {
        if self.key_long {
            return Key::Other;
        }
        match (self.key.get(..self.key_len).unwrap_or_default(), self.depth) {
            (b"usage", _) => Key::Usage,
            (b"choices", 1) => Key::Choices,
            (b"error", _) if self.capture => Key::Error,
            (b"response", 1) if self.response_usage => Key::Response,
            _ => Key::Other,
        }
    }

    /// Appends to the captured usage value, giving up on it past `max_capture` bytes. The
    /// buffer's capacity never exceeds `max_capture`.
    fn capture_bytes(&mut self, s: &[u8]) {
        if self.overflow || s.is_empty() {
            return;
        }
        let needed = self.buf.len() + s.len();
        if needed > self.max_capture {
            self.overflow = true;
            self.buf = Vec::new();
            return;
        }
        if needed > self.buf.capacity() {
            let target = needed
                .max(self.buf.capacity().saturating_mul(2))
                .max(256)
                .min(self.max_capture);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(s);
        self.high_water = self.high_water.max(self.buf.capacity());
    }

    /// Ends the capture in progress, if any, keeping the usage if it parses.
    fn end_capture(&mut self) {
        if self.capturing.take().is_none() {
            return;
        }
        if !self.overflow {
            let reported = match serde_json::from_slice::<Option<WireUsage>>(&self.buf) {
                Ok(wire) => wire.and_then(WireUsage::into_reported),
                // A usage object the upstream sent but that cannot be read (a count of
                // `1e400`, beyond any number type; a cut-off object): reported, and invalid,
                // never taken as absent. A value that is no object is no usage.
                Err(_) if self.buf.trim_ascii_start().first() == Some(&b'{') => {
                    Some(Reported::unreadable())
                }
                Err(_) => None,
            };
            if let Some(reported) = reported {
                self.found = Some(reported);
                self.reports = self.reports.saturating_add(1);
            }
        }
        self.overflow = false;
        self.buf.clear();
        if self.buf.capacity() > 4096 {
            self.buf = Vec::new();
        }
    }

    /// The document is complete and is a usage-only chunk.
    fn is_usage_only(&self) -> bool {
        self.root == Root::Closed
            && self.choices == Seen::EmptyArray
            && self.usage_top == Seen::Object
    }

    /// What has been read already rules out a usage-only chunk.
    fn not_usage_only(&self) -> bool {
        self.root == Root::Other
            || self.choices == Seen::Other
            || matches!(self.usage_top, Seen::Null | Seen::Other)
            // A closed document does not change any more.
            || (self.root == Root::Closed && !self.is_usage_only())
    }
}

// ---------------------------------------------------------------------------------------------
// Wire shapes of usage

/// The largest token count taken as a count (10^12): a larger one, like a negative or
/// fractional one, makes the usage invalid rather than being saturated or rounded.
pub const MAX_TOKEN_COUNT: u64 = 1_000_000_000_000;

/// Usage as the upstream sends it: the chat/completions/embeddings shape and the Responses API
/// shape in one, every field optional.
#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Count,
    #[serde(default)]
    completion_tokens: Count,
    #[serde(default)]
    total_tokens: Count,
    #[serde(default)]
    input_tokens: Count,
    #[serde(default)]
    output_tokens: Count,
    #[serde(default)]
    prompt_tokens_details: Option<WireDetails>,
    #[serde(default)]
    completion_tokens_details: Option<WireDetails>,
    #[serde(default)]
    input_tokens_details: Option<WireDetails>,
    #[serde(default)]
    output_tokens_details: Option<WireDetails>,
}

#[derive(Deserialize)]
struct WireDetails {
    #[serde(default)]
    cached_tokens: Count,
    #[serde(default)]
    reasoning_tokens: Count,
}

/// One token count as sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Count {
    /// Absent or `null`.
    #[default]
    Absent,
    /// A non-negative integer up to [`MAX_TOKEN_COUNT`] (an integral float such as `12.0`,
    /// which some compatible servers send, included).
    Valid(u64),
    /// Anything else: negative, fractional, larger than [`MAX_TOKEN_COUNT`], not a number.
    Invalid,
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Ok(match value {
            serde_json::Value::Null => Count::Absent,
            serde_json::Value::Number(n) => n
                .as_u64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.is_finite() && *f >= 0.0 && f.fract() == 0.0)
                        .filter(|f| *f <= MAX_TOKEN_COUNT as f64)
                        .map(|f| f as u64)
                })
                .filter(|n| *n <= MAX_TOKEN_COUNT)
                .map_or(Count::Invalid, Count::Valid),
            _ => Count::Invalid,
        })
    }
}

impl Count {
    fn or(self, other: Count) -> Count {
        if self == Count::Absent {
            other
        } else {
            self
        }
    }

    fn valid(self) -> Option<u64> {
        match self {
            Count::Valid(n) => Some(n),
            _ => None,
        }
    }
}

/// A usage report as the audit record needs it: the counts that were sent and valid, and
/// whether the report as a whole is invalid.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Reported {
    /// The lenient reading ([`UsageScanner::usage`]): absent or invalid counts are 0.
    pub(crate) usage: Usage,
    pub(crate) prompt: Option<u64>,
    pub(crate) completion: Option<u64>,
    /// As sent, or prompt + completion when both were sent and it was not.
    pub(crate) total: Option<u64>,
    pub(crate) cached: Option<u64>,
    pub(crate) reasoning: Option<u64>,
    /// A count was invalid (see [`Count::Invalid`]), or the counts disagree: total is not
    /// prompt + completion, cached is more than prompt, reasoning more than completion.
    pub(crate) invalid: bool,
}

impl Reported {
    /// A usage value that could not be read at all: no count, invalid.
    fn unreadable() -> Reported {
        Reported {
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
                total_tokens: 0,
                cached_tokens: None,
                reasoning_tokens: None,
            },
            prompt: None,
            completion: None,
            total: None,
            cached: None,
            reasoning: None,
            invalid: true,
        }
    }
}

impl WireUsage {
    fn into_reported(self) -> Option<Reported> {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        let total = self.total_tokens;
        if [prompt, completion, total]
            .iter()
            .all(|c| *c == Count::Absent)
        {
            return None;
        }
        let detail = |d: &Option<WireDetails>, f: fn(&WireDetails) -> Count| {
            d.as_ref().map_or(Count::Absent, f)
        };
        let cached = detail(&self.prompt_tokens_details, |d| d.cached_tokens)
            .or(detail(&self.input_tokens_details, |d| d.cached_tokens));
        let reasoning = detail(&self.completion_tokens_details, |d| d.reasoning_tokens)
            .or(detail(&self.output_tokens_details, |d| d.reasoning_tokens));
        let mut invalid = [prompt, completion, total, cached, reasoning].contains(&Count::Invalid);
        let (p, c, t) = (prompt.valid(), completion.valid(), total.valid());
        // Counts are at most 10^12: these sums cannot overflow.
        match (p, c, t) {
            (Some(p), Some(c), Some(t)) => invalid |= p + c != t,
            // Embeddings: prompt and total only, which must agree.
            (Some(p), None, Some(t)) if completion == Count::Absent => invalid |= p != t,
            _ => {}
        }
        if let (Some(cached), Some(p)) = (cached.valid(), p) {
            invalid |= cached > p;
        }
        if let (Some(r), Some(c)) = (reasoning.valid(), c) {
            invalid |= r > c;
        }
        let total_or_sum = t.or_else(|| p.zip(c).map(|(p, c)| p + c));
        let (p0, c0) = (p.unwrap_or(0), c.unwrap_or(0));
        Some(Reported {
            usage: Usage {
                prompt_tokens: p0,
                completion_tokens: c0,
                total_tokens: t.unwrap_or(p0 + c0),
                cached_tokens: cached.valid(),
                reasoning_tokens: reasoning.valid(),
            },
            prompt: p,
            completion: c,
            total: total_or_sum,
            cached: cached.valid(),
            reasoning: reasoning.valid(),
            invalid,
        })
    }
}

#[cfg(test)]
mod tests;
