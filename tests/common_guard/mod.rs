//! Shared by the response-guard tests: two small local detectors (a word list with
//! aho-corasick, a pattern with regex), a body of scripted frames, a synchronous driver of
//! `guard_response`, SSE streams of the three APIs and their client-side reading.
#![allow(dead_code)]

pub(crate) mod stack;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use aho_corasick::AhoCorasick;
use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame};
use tower_llm_policy::alert::{Alert, AlertSink};
use tower_llm_policy::audit::AuditHandle;
use tower_llm_policy::guard::detect::Found;
use tower_llm_policy::guard::{Detector, Guard};
use tower_llm_policy::Endpoint;

/// Every occurrence of each word, overlapping ones too (local: context 0).
pub(crate) struct Words {
    ac: AhoCorasick,
    max: usize,
}

impl Words {
    pub(crate) fn new(words: &[&str]) -> Words {
        Words {
            ac: AhoCorasick::new(words).unwrap(),
            max: words.iter().map(|w| w.len()).max().unwrap_or(0),
        }
    }
}

impl Detector for Words {
    fn find(&self, text: &str, found: &mut Vec<Found>) {
        for m in self.ac.find_overlapping_iter(text) {
            found.push(Found::new(m.range(), "word"));
        }
    }
    fn max_match_len(&self) -> usize {
        self.max
    }
    fn context(&self) -> usize {
        0
    }
}

/// `sk-` and four letters, as a whole word (its matches cannot overlap: local, context one
/// character).
pub(crate) struct KeyRegex(regex::Regex);

impl KeyRegex {
    pub(crate) fn new() -> KeyRegex {
        KeyRegex(regex::Regex::new(r"\bsk-[a-z]{4}\b").unwrap())
    }
}

impl Detector for KeyRegex {
    fn find(&self, text: &str, found: &mut Vec<Found>) {
        for m in self.0.find_iter(text) {
            found.push(Found::new(m.range(), "key"));
        }
    }
    fn max_match_len(&self) -> usize {
        7
    }
}

/// The whole-text redaction with several guards, as the crate defines it: every hit of every
/// guard (in guard order), sorted by start (the longest first), overlapping hits merged and
/// masked with the first one's mask.
pub(crate) fn redact_all(guards: &[Guard], text: &str) -> String {
    let mut hits: Vec<(usize, usize, String, usize)> = Vec::new();
    for (g, guard) in guards.iter().enumerate() {
        let mut found = Vec::new();
        if let Some(d) = guard.detector() {
            d.find(text, &mut found);
        }
        hits.extend(
            found
                .into_iter()
                .map(|f| (f.range.start, f.range.end, f.label.into_owned(), g)),
        );
    }
    hits.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut out = String::new();
    let (mut at, mut i) = (0, 0);
    while i < hits.len() {
        let (s, e0, label, g) = hits[i].clone();
        let mut end = e0;
        let mut j = i + 1;
        while j < hits.len() && hits[j].0 < end {
            end = end.max(hits[j].1);
            j += 1;
        }
        let start = s.max(at);
        out.push_str(&text[at..start]);
        out.push_str(&guards[g].mask_for(&label));
        at = end.max(start);
        i = j;
    }
    out.push_str(&text[at..]);
    out
}

/// `text` cut at these fractions of its length (on character boundaries).
pub(crate) fn split_text(text: &str, cuts: &[f64]) -> Vec<String> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|f| {
            let mut p = (f * text.len() as f64) as usize;
            while !text.is_char_boundary(p) {
                p -= 1;
            }
            p
        })
        .collect();
    points.push(0);
    points.push(text.len());
    points.sort();
    points.dedup();
    points
        .windows(2)
        .map(|w| text[w[0]..w[1]].to_owned())
        .collect()
}

/// `bytes` cut at these fractions of its length (anywhere).
pub(crate) fn split_bytes(bytes: &[u8], cuts: &[f64]) -> Vec<Bytes> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|f| (f * bytes.len() as f64) as usize)
        .collect();
    points.push(0);
    points.push(bytes.len());
    points.sort();
    points.dedup();
    points
        .windows(2)
        .map(|w| Bytes::copy_from_slice(&bytes[w[0]..w[1]]))
        .collect()
}

/// A JSON string, with every ASCII letter escaped as `\u00XX` when `escape`.
pub(crate) fn json_str(text: &str, escape: bool) -> String {
    if !escape {
        return serde_json::to_string(text).unwrap();
    }
    let mut out = String::from("\"");
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            let one = serde_json::to_string(&c.to_string()).unwrap();
            out.push_str(&one[1..one.len() - 1]);
        }
    }
    out.push('"');
    out
}

/// A body of scripted frames, always ready.
pub(crate) struct Frames(pub VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// Polls a future that never waits (the bodies here are always ready).
pub(crate) fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// The frames of a body, each as it came.
pub(crate) fn frames_of<B: Body<Data = Bytes>>(body: B) -> Vec<Bytes>
where
    B::Error: std::fmt::Debug,
{
    let mut body = pin!(body);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    out.push(data);
                }
            }
            Poll::Ready(Some(Err(e))) => panic!("body error {e:?}"),
            Poll::Ready(None) => return out,
            Poll::Pending => panic!("pending"),
        }
    }
}

/// Alerts, kept.
#[derive(Clone, Default)]
pub(crate) struct Alerts(pub Arc<Mutex<Vec<Alert>>>);

impl AlertSink for Alerts {
    fn alert(&self, alert: Alert) {
        self.0.lock().unwrap().push(alert);
    }
}

/// An SSE response of these frames through the guards; what the client gets, joined.
pub(crate) fn run_sse(guards: Vec<Guard>, endpoint: Endpoint, chunks: Vec<Bytes>) -> String {
    let response = sse_response(chunks);
    let guarded = now(tower_llm_policy::fuzzing::guard_response_with(
        guards, "", endpoint, None, None, response,
    ));
    String::from_utf8(frames_of(guarded.into_body()).concat()).unwrap()
}

pub(crate) fn sse_response(chunks: Vec<Bytes>) -> Response<Frames> {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Frames(chunks.into()))
        .unwrap()
}

pub(crate) fn json_response(body: &str) -> Response<Frames> {
    Response::builder()
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Frames(VecDeque::from([Bytes::from(body.to_owned())])))
        .unwrap()
}

/// Guards a response with everything given.
pub(crate) fn guard<B>(
    guards: Vec<Guard>,
    system: &str,
    endpoint: Endpoint,
    audit: Option<AuditHandle>,
    alerts: Option<Alerts>,
    response: Response<B>,
) -> Response<tower_llm_policy::fuzzing::GuardBody<B>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    now(tower_llm_policy::fuzzing::guard_response_with(
        guards,
        system,
        endpoint,
        audit,
        alerts.map(|a| Arc::new(a) as Arc<dyn AlertSink>),
        response,
    ))
}

/// The data of each event of an SSE text (events split on blank lines, `\n` endings).
pub(crate) fn events(sse: &str) -> Vec<String> {
    let sse = sse.replace("\r\n", "\n").replace('\r', "\n");
    sse.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let data: Vec<&str> = e
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            data.join("\n")
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Api {
    Chat,
    Completions,
    Responses,
}

impl Api {
    pub(crate) fn endpoint(self) -> Endpoint {
        match self {
            Api::Chat => Endpoint::ChatCompletions,
            Api::Completions => Endpoint::Completions,
            Api::Responses => Endpoint::Responses,
        }
    }

    /// One delta event.
    pub(crate) fn delta(self, text: &str, escape: bool) -> String {
        let t = json_str(text, escape);
        match self {
            Api::Chat => format!(
                "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{t}}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
            ),
            Api::Completions => format!(
                "data: {{\"id\":\"c1\",\"object\":\"text_completion\",\"choices\":[{{\"index\":0,\"text\":{t},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
            ),
            Api::Responses => format!(
                "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":{t},\"sequence_number\":5}}\n\n"
            ),
        }
    }

    /// The whole stream of these deltas.
    pub(crate) fn stream(self, pieces: &[String], escape: bool) -> String {
        let mut out = String::new();
        if let Api::Chat = self {
            out.push_str("data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n");
        }
        for p in pieces {
            out.push_str(&self.delta(p, escape));
        }
        let whole: String = pieces.concat();
        match self {
            Api::Chat => {
                out.push_str("data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n");
                out.push_str("data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n");
                out.push_str("data: [DONE]\n\n");
            }
            Api::Completions => {
                out.push_str("data: {\"id\":\"c1\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,\"text\":\"\",\"finish_reason\":\"stop\"}]}\n\n");
                out.push_str("data: [DONE]\n\n");
            }
            Api::Responses => {
                let t = json_str(&whole, escape);
                out.push_str(&format!("event: response.output_text.done\ndata: {{\"type\":\"response.output_text.done\",\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"text\":{t},\"sequence_number\":6}}\n\n"));
                out.push_str(&format!("event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"r\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":{t}}}]}}],\"usage\":{{\"input_tokens\":1,\"output_tokens\":2,\"total_tokens\":3}}}},\"sequence_number\":7}}\n\n"));
            }
        }
        out
    }

    /// What a client assembles from the deltas of `sse` (asserting every event is valid JSON
    /// or `[DONE]`, and no error came).
    pub(crate) fn client_text(self, sse: &str) -> String {
        let mut text = String::new();
        for data in events(sse) {
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("event data not JSON ({e}): {data:?}"));
            assert!(v.get("error").is_none(), "error event: {data}");
            match self {
                Api::Chat => {
                    for c in v["choices"].as_array().unwrap() {
                        if let Some(t) = c["delta"]["content"].as_str() {
                            text.push_str(t);
                        }
                    }
                }
                Api::Completions => {
                    for c in v["choices"].as_array().unwrap() {
                        if let Some(t) = c["text"].as_str() {
                            text.push_str(t);
                        }
                    }
                }
                Api::Responses => {
                    if v["type"] == "response.output_text.delta" {
                        text.push_str(v["delta"].as_str().unwrap());
                    }
                }
            }
        }
        text
    }

    /// The full text of a Responses stream's `.done` and `completed` events (equal).
    pub(crate) fn done_text(self, sse: &str) -> Option<String> {
        let Api::Responses = self else { return None };
        let mut done = None;
        for data in events(sse) {
            let v: serde_json::Value = serde_json::from_str(&data).unwrap();
            if v["type"] == "response.output_text.done" {
                done = Some(v["text"].as_str().unwrap().to_owned());
            }
            if v["type"] == "response.completed" {
                let t = v["response"]["output"][0]["content"][0]["text"]
                    .as_str()
                    .unwrap();
                assert_eq!(Some(t), done.as_deref());
            }
        }
        done
    }
}
