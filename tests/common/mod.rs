//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use serde_json::Value;
use tower_llm_policy::{ApiKey, LlmRequest, PolicyBody, Rejection};

/// What the inner service saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: http::Method,
    pub uri: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub body_was_buffered: bool,
    pub key: Option<Arc<ApiKey>>,
    pub view: Option<LlmRequest>,
}

/// An inner service that records every request it is called with.
#[derive(Clone, Default)]
pub struct Inner {
    pub calls: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Inner {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("inner was called")
    }

    /// A `tower::Service` answering 200 with `{"ok":true}` (or a model list for GET /v1/models).
    pub fn service(
        &self,
    ) -> impl tower::Service<
        Request<PolicyBody>,
        Response = Response<http_body_util::Full<Bytes>>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send {
        let this = self.clone();
        tower::service_fn(move |req: Request<PolicyBody>| {
            let this = this.clone();
            async move {
                this.calls.fetch_add(1, Ordering::SeqCst);
                let body_was_buffered = req.body().as_bytes().is_some();
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let listing = parts.uri.path().ends_with("/models");
                this.seen.lock().unwrap().push(Seen {
                    method: parts.method.clone(),
                    uri: parts.uri.to_string(),
                    headers: parts.headers.clone(),
                    body,
                    body_was_buffered,
                    key: parts.extensions.get::<Arc<ApiKey>>().cloned(),
                    view: parts.extensions.get::<LlmRequest>().cloned(),
                });
                let body = if listing {
                    MODEL_LIST.to_string()
                } else {
                    r#"{"ok":true}"#.to_string()
                };
                let mut resp = Response::new(http_body_util::Full::new(Bytes::from(body)));
                resp.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                Ok::<_, Infallible>(resp)
            }
        })
    }
}

pub const MODEL_LIST: &str = r#"{"object":"list","data":[
 {"id":"gpt-4o","object":"model","owned_by":"openai"},
 {"id":"gpt-4o-mini","object":"model","owned_by":"openai"},
 {"id":"gpt-4o-2024-08-06","object":"model","owned_by":"openai"},
 {"id":"gpt-4.1","object":"model","owned_by":"openai"},
 {"id":"o3-mini","object":"model","owned_by":"openai"},
 {"id":"dall-e-3","object":"model","owned_by":"openai"}]}"#;

/// A chat request body for `model`.
pub fn chat(model: &str) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello there"}],
    })
    .to_string()
}

pub fn post(path: &str, body: impl Into<String>) -> Request<String> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

pub fn with_key<B>(mut req: Request<B>, key: &str) -> Request<B> {
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    req
}

/// A response read to its end, with its error body parsed when JSON.
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub rejection: Option<Rejection>,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// Asserts the OpenAI error shape and returns `(code, message)`.
    pub fn error(&self) -> (String, String) {
        let v = self.json();
        let err = v.get("error").expect("an `error` object");
        for key in ["message", "type", "param", "code"] {
            assert!(err.get(key).is_some(), "error body lacks `{key}`: {v}");
        }
        assert!(err["code"].is_string(), "code must be a string: {v}");
        assert!(err["message"].is_string());
        assert!(err["type"].is_string());
        assert_eq!(
            self.headers.get("content-type").unwrap(),
            "application/json",
            "rejections are JSON"
        );
        let rejection = self.rejection.as_ref().expect("a Rejection extension");
        assert_eq!(rejection.code, err["code"].as_str().unwrap());
        (
            err["code"].as_str().unwrap().to_owned(),
            err["message"].as_str().unwrap().to_owned(),
        )
    }
}

pub async fn answer<B>(response: Response<B>) -> Answer
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        rejection: parts.extensions.get::<Rejection>().cloned(),
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

/// A request body that arrives in chunks and counts how often it is polled for data.
pub struct CountingBody {
    chunks: Vec<Bytes>,
    pub polls: Arc<AtomicUsize>,
}

impl CountingBody {
    pub fn new(text: &str, pieces: usize) -> (Self, Arc<AtomicUsize>) {
        let bytes = text.as_bytes();
        let step = bytes.len().div_ceil(pieces.max(1)).max(1);
        let chunks = bytes
            .chunks(step)
            .rev()
            .map(Bytes::copy_from_slice)
            .collect();
        let polls = Arc::new(AtomicUsize::new(0));
        (
            CountingBody {
                chunks,
                polls: polls.clone(),
            },
            polls,
        )
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(self.chunks.pop().map(|c| Ok(Frame::data(c))))
    }
}

/// A writer that keeps what it is given where the test can read it while the writer is held
/// (by a JSONL sink, say).
pub struct SharedWriter(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A writer whose `write` says it was entered, then blocks until the test opens the gate
/// (drops or sends on its sender), then keeps the bytes in `out`.
pub struct GatedWriter {
    pub entered: std::sync::mpsc::Sender<()>,
    pub gate: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
    pub out: Arc<Mutex<Vec<u8>>>,
}

impl std::io::Write for GatedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.entered.send(());
        let _ = self.gate.lock().unwrap().recv();
        self.out.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
