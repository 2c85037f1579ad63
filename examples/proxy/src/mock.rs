//! A fast, deterministic mock of the OpenAI API: the upstream of the proxy's embedded default,
//! the `mock_upstream` binary, and the tests' stand-in for OpenAI.
//!
//! Serves `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/images/generations`, `/v1/moderations`, `/v1/responses`, `/v1/models`,
//! `/v1/models/{id}` and `/v1/audio/transcriptions`, with the response shapes of OpenAI
//! (streaming included), and records every request it receives in a [`MockLog`] so a test
//! can check what reached the upstream.
//!
//! Two deterministic triggers for content-guard tests: a chat completion whose last message
//! is `ECHO <text>` answers `<text>` (streamed in deltas of [`ECHO_DELTA_CHARS`] characters),
//! and a moderation input containing `FLAGME` is flagged (`violence`).
//!
//! Token counts are predictable: the prompt tokens are the whitespace-separated words of the
//! request's texts ([`count_words`]), the completion tokens are the number of words the mock
//! answers, which is [`MockOptions::stream_chunks`].

use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// The models `GET /v1/models` lists.
pub const MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "o3-mini",
    "dall-e-3",
    "text-embedding-3-small",
    "whisper-1",
];

/// The words the mock answers with, cycled to [`MockOptions::stream_chunks`] words.
const WORDS: &[&str] = &[
    "This", "is", "a", "mock", "response", "from", "the", "upstream",
];

/// The text every transcription returns.
pub const TRANSCRIPTION: &str = "This is a mock transcription.";

/// How the mock behaves, and where it records what it received.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Fixed delay before the response headers (time to first byte).
    pub latency: Duration,
    /// Number of content chunks in streamed responses, and words in every answer.
    pub stream_chunks: usize,
    /// Delay before each content chunk of a streamed response.
    pub chunk_delay: Duration,
    /// Delay before a streamed chat completion's usage chunk, after its last token (a client
    /// may leave in between).
    pub usage_delay: Duration,
    /// Whether requests are recorded in [`MockOptions::log`]. Off for a long-running server,
    /// whose log would otherwise grow without bound.
    pub record: bool,
    /// How many bytes of each request body are kept in the log (the length is always kept).
    pub record_body_limit: usize,
    /// What the mock received.
    pub log: MockLog,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            stream_chunks: 8,
            chunk_delay: Duration::ZERO,
            usage_delay: Duration::ZERO,
            record: true,
            record_body_limit: 1024 * 1024,
            log: MockLog::default(),
        }
    }
}

impl MockOptions {
    /// Sets [`MockOptions::latency`].
    #[must_use]
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Sets [`MockOptions::stream_chunks`] (at least one).
    #[must_use]
    pub fn stream_chunks(mut self, n: usize) -> Self {
        self.stream_chunks = n.max(1);
        self
    }

    /// Sets [`MockOptions::chunk_delay`].
    #[must_use]
    pub fn chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }

    /// Sets [`MockOptions::usage_delay`].
    #[must_use]
    pub fn usage_delay(mut self, delay: Duration) -> Self {
        self.usage_delay = delay;
        self
    }

    /// Sets [`MockOptions::record`].
    #[must_use]
    pub fn record(mut self, record: bool) -> Self {
        self.record = record;
        self
    }

    /// Sets [`MockOptions::record_body_limit`].
    #[must_use]
    pub fn record_body_limit(mut self, limit: usize) -> Self {
        self.record_body_limit = limit;
        self
    }
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Received {
    /// The request method.
    pub method: Method,
    /// The path, without the query string.
    pub path: String,
    /// The query string, without `?`.
    pub query: Option<String>,
    /// The `authorization` header, if any (as text; `None` if absent or not visible ASCII).
    pub authorization: Option<String>,
    /// All request headers.
    pub headers: HeaderMap,
    /// The first [`MockOptions::record_body_limit`] bytes of the body.
    pub body: Bytes,
    /// The full length of the body.
    pub body_len: usize,
}

impl Received {
    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// What the mock received, shared between the server and whoever holds a clone.
#[derive(Clone, Debug, Default)]
pub struct MockLog {
    inner: Arc<LogInner>,
}

#[derive(Debug, Default)]
struct LogInner {
    received: Mutex<Vec<Received>>,
    streams_completed: AtomicUsize,
}

impl MockLog {
    /// The received requests, oldest first (a lock: do not hold it across an `.await`).
    pub fn lock(&self) -> MutexGuard<'_, Vec<Received>> {
        self.inner
            .received
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of the received requests, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.lock().clone()
    }

    /// How many requests were received.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no request was received.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The last request received.
    pub fn last(&self) -> Option<Received> {
        self.lock().last().cloned()
    }

    /// Forgets the received requests.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// How many streamed responses the mock has finished writing (`data: [DONE]` sent or,
    /// for the Responses API, `response.completed`).
    pub fn streams_completed(&self) -> usize {
        self.inner.streams_completed.load(Ordering::SeqCst)
    }

    fn push(&self, received: Received) {
        self.lock().push(received);
    }

    fn stream_completed(&self) {
        self.inner.streams_completed.fetch_add(1, Ordering::SeqCst);
    }
}

/// The mock as an axum [`Router`] (every route, unknown ones included, is recorded).
pub fn router(opts: MockOptions) -> Router {
    Router::new().fallback(handle).with_state(Arc::new(opts))
}

/// Serves the mock on `listener` until the task is dropped or the listener fails.
pub async fn serve(listener: TcpListener, opts: MockOptions) -> std::io::Result<()> {
    axum::serve(listener, router(opts)).await
}

/// Starts the mock on `127.0.0.1` on a free port, in a background task; returns its address
/// and its log. The server lives as long as the runtime.
pub async fn spawn(opts: MockOptions) -> std::io::Result<(std::net::SocketAddr, MockLog)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let log = opts.log.clone();
    tokio::spawn(serve(listener, opts));
    Ok((addr, log))
}

/// The number of whitespace-separated words in `text`: the mock's token count.
pub fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The prompt tokens the mock counts for a request body to `path` (`/v1/...`).
///
/// Chat: every message's `content` (a string, or the `text` of its parts). Completions and
/// embeddings: `prompt` / `input`, a string or an array of strings. Responses: `instructions`
/// and `input` (a string, or messages as for chat). Images and moderations: `prompt` / `input`.
pub fn prompt_tokens(path: &str, body: &Value) -> u64 {
    match path {
        "/v1/chat/completions" => body
            .get("messages")
            .and_then(Value::as_array)
            .map(|messages| {
                messages
                    .iter()
                    .filter_map(|m| m.get("content"))
                    .map(count_content)
                    .sum()
            })
            .unwrap_or(0),
        "/v1/completions" | "/v1/images/generations" => body.get("prompt").map_or(0, count_content),
        "/v1/embeddings" | "/v1/moderations" => body.get("input").map_or(0, count_content),
        "/v1/responses" => {
            let instructions = body
                .get("instructions")
                .and_then(Value::as_str)
                .map_or(0, count_words);
            let input = match body.get("input") {
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| match item.get("content") {
                        Some(content) => count_content(content),
                        None => count_content(item),
                    })
                    .sum(),
                Some(other) => count_content(other),
                None => 0,
            };
            instructions + input
        }
        _ => 0,
    }
}

/// Words in a string, in an array of strings, or in the `text` of an array of content parts.
fn count_content(content: &Value) -> u64 {
    match content {
        Value::String(s) => count_words(s),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part {
                Value::String(s) => count_words(s),
                Value::Object(o) => o.get("text").and_then(Value::as_str).map_or(0, count_words),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// The mock's answer: `n` words.
pub fn answer_words(n: usize) -> Vec<&'static str> {
    WORDS.iter().copied().cycle().take(n).collect()
}

async fn handle(State(opts): State<Arc<MockOptions>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "could not read the body", None),
    };
    let path = parts.uri.path().to_owned();
    if opts.record {
        let kept = body.slice(..body.len().min(opts.record_body_limit));
        opts.log.push(Received {
            method: parts.method.clone(),
            path: path.clone(),
            query: parts.uri.query().map(str::to_owned),
            authorization: parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            headers: parts.headers.clone(),
            body: kept,
            body_len: body.len(),
        });
    }
    if !opts.latency.is_zero() {
        tokio::time::sleep(opts.latency).await;
    }

    let method = parts.method;
    match (method.clone(), path.as_str()) {
        (Method::GET, "/v1/models") => Json(json!({
            "object": "list",
            "data": MODELS.iter().map(|id| model_object(id)).collect::<Vec<_>>(),
        }))
        .into_response(),
        (Method::GET, p) if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            if MODELS.contains(&id) {
                Json(model_object(id)).into_response()
            } else {
                error(
                    StatusCode::NOT_FOUND,
                    &format!("The model '{id}' does not exist"),
                    Some("model_not_found"),
                )
            }
        }
        (Method::POST, "/v1/audio/transcriptions") => {
            Json(json!({ "text": TRANSCRIPTION })).into_response()
        }
        (
            Method::POST,
            "/v1/chat/completions"
            | "/v1/completions"
            | "/v1/embeddings"
            | "/v1/images/generations"
            | "/v1/moderations"
            | "/v1/responses",
        ) => {
            let request: Value = match serde_json::from_slice(&body) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "We could not parse the JSON body of your request.",
                        None,
                    )
                }
            };
            let Some(model) = request.get("model").and_then(Value::as_str) else {
                return error_param(
                    StatusCode::BAD_REQUEST,
                    "you must provide a model parameter",
                    "model",
                );
            };
            let model = model.to_owned();
            let prompt = prompt_tokens(&path, &request);
            let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
            let include_usage = request
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true);
            let header_number = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let n = header_number(STREAM_CHUNKS_HEADER)
                .map_or(opts.stream_chunks, |n| n as usize)
                .max(1);
            let mut opts = opts;
            if let Some(ms) = header_number(CHUNK_DELAY_HEADER) {
                Arc::make_mut(&mut opts).chunk_delay = Duration::from_millis(ms);
            }
            match path.as_str() {
                "/v1/chat/completions"
                    if stream && header_number(STREAM_BYTES_HEADER).is_some() =>
                {
                    let bytes = header_number(STREAM_BYTES_HEADER).unwrap_or(0);
                    sized_chat_stream(&opts, &model, prompt, bytes, include_usage)
                }
                "/v1/chat/completions" if stream => sse(
                    &opts,
                    chat_stream(&model, prompt, n, include_usage, echo(&request).as_deref()),
                ),
                "/v1/chat/completions" => {
                    Json(chat(&model, prompt, n, echo(&request).as_deref())).into_response()
                }
                "/v1/completions" if stream => {
                    sse(&opts, completion_stream(&model, prompt, n, include_usage))
                }
                "/v1/completions" => Json(completion(&model, prompt, n)).into_response(),
                "/v1/responses" if stream => sse(&opts, responses_stream(&model, prompt, n)),
                "/v1/responses" => Json(responses(&model, prompt, n)).into_response(),
                "/v1/embeddings" => Json(embeddings(&model, &request, prompt)).into_response(),
                "/v1/images/generations" => Json(images(&request)).into_response(),
                _ => Json(moderations(&model, &request)).into_response(),
            }
        }
        (method, path) => error(
            StatusCode::NOT_FOUND,
            &format!("Invalid URL ({method} {path})"),
            None,
        ),
    }
}

/// A JSON response (axum's `Json` would need its `json` feature settings; this is enough).
struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            self.0.to_string(),
        )
            .into_response()
    }
}

/// An OpenAI-shaped error.
fn error(status: StatusCode, message: &str, code: Option<&str>) -> Response {
    let kind = if status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST {
        "invalid_request_error"
    } else {
        "server_error"
    };
    let mut response = Json(json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    }))
    .into_response();
    *response.status_mut() = status;
    response
}

fn error_param(status: StatusCode, message: &str, param: &str) -> Response {
    let mut response = Json(json!({
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": null,
        }
    }))
    .into_response();
    *response.status_mut() = status;
    response
}

fn model_object(id: &str) -> Value {
    json!({ "id": id, "object": "model", "created": 1_700_000_000, "owned_by": "openai" })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn next_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}{:012}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn chat_usage(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": { "cached_tokens": 0, "audio_tokens": 0 },
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

/// How many characters each delta of a streamed `ECHO` answer has.
pub const ECHO_DELTA_CHARS: usize = 4;

/// The text after `ECHO ` in a chat request's last message, when it starts so.
fn echo(request: &Value) -> Option<String> {
    let last = request.get("messages")?.as_array()?.last()?;
    let text = match last.get("content")? {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => return None,
    };
    text.strip_prefix("ECHO ").map(str::to_owned)
}

/// `text` in pieces of [`ECHO_DELTA_CHARS`] characters.
fn echo_pieces(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(ECHO_DELTA_CHARS)
        .map(|c| c.iter().collect())
        .collect()
}

fn chat(model: &str, prompt: u64, n: usize, echo: Option<&str>) -> Value {
    let (content, n) = match echo {
        Some(text) => (text.to_owned(), echo_pieces(text).len()),
        None => (answer_words(n).join(" "), n),
    };
    json!({
        "id": next_id("chatcmpl-mock"),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "system_fingerprint": "fp_mock",
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": content,
                "refusal": null,
                "annotations": []
            },
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": chat_usage(prompt, n as u64),
        "service_tier": "default"
    })
}

/// The `data:` payloads of a streamed chat completion, `[DONE]` included.
fn chat_stream(
    model: &str,
    prompt: u64,
    n: usize,
    include_usage: bool,
    echo: Option<&str>,
) -> Vec<Event> {
    let pieces: Vec<String> = match echo {
        Some(text) => echo_pieces(text),
        None => answer_words(n)
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                if i == 0 {
                    w.to_owned()
                } else {
                    format!(" {w}")
                }
            })
            .collect(),
    };
    let n = pieces.len();
    let id = next_id("chatcmpl-mock");
    let created = now();
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }]
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut events = vec![Event::data(chunk(
        json!({ "role": "assistant", "content": "", "refusal": null }),
        Value::Null,
    ))];
    for text in pieces {
        events.push(Event::content(chunk(
            json!({ "content": text }),
            Value::Null,
        )));
    }
    events.push(Event::data(chunk(json!({}), json!("stop"))));
    if include_usage {
        events.push(Event::usage(json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [],
            "usage": chat_usage(prompt, n as u64)
        })));
    }
    events.push(Event::done());
    events
}

fn completion(model: &str, prompt: u64, n: usize) -> Value {
    json!({
        "id": next_id("cmpl-mock"),
        "object": "text_completion",
        "created": now(),
        "model": model,
        "system_fingerprint": "fp_mock",
        "choices": [{
            "text": answer_words(n).join(" "),
            "index": 0,
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": chat_usage(prompt, n as u64)
    })
}

fn completion_stream(model: &str, prompt: u64, n: usize, include_usage: bool) -> Vec<Event> {
    let id = next_id("cmpl-mock");
    let created = now();
    let chunk = |text: String, finish: Value| {
        let mut c = json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }]
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut events = Vec::new();
    for (i, word) in answer_words(n).into_iter().enumerate() {
        let text = if i == 0 {
            word.to_owned()
        } else {
            format!(" {word}")
        };
        events.push(Event::content(chunk(text, Value::Null)));
    }
    events.push(Event::data(chunk(String::new(), json!("stop"))));
    if include_usage {
        events.push(Event::data(json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [],
            "usage": chat_usage(prompt, n as u64)
        })));
    }
    events.push(Event::done());
    events
}

fn responses_usage(input: u64, output: u64) -> Value {
    json!({
        "input_tokens": input,
        "input_tokens_details": { "cached_tokens": 0 },
        "output_tokens": output,
        "output_tokens_details": { "reasoning_tokens": 0 },
        "total_tokens": input + output
    })
}

fn response_object(id: &str, msg_id: &str, model: &str, done: Option<(u64, usize)>) -> Value {
    let (status, output, usage) = match done {
        Some((prompt, n)) => (
            "completed",
            json!([{
                "type": "message",
                "id": msg_id,
                "status": "completed",
                "role": "assistant",
                "content": [{
                    "type": "output_text",
                    "text": answer_words(n).join(" "),
                    "annotations": []
                }]
            }]),
            responses_usage(prompt, n as u64),
        ),
        None => ("in_progress", json!([]), Value::Null),
    };
    json!({
        "id": id,
        "object": "response",
        "created_at": now(),
        "status": status,
        "error": null,
        "incomplete_details": null,
        "model": model,
        "output": output,
        "parallel_tool_calls": true,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage
    })
}

fn responses(model: &str, prompt: u64, n: usize) -> Value {
    response_object(
        &next_id("resp_mock"),
        &next_id("msg_mock"),
        model,
        Some((prompt, n)),
    )
}

fn responses_stream(model: &str, prompt: u64, n: usize) -> Vec<Event> {
    let id = next_id("resp_mock");
    let msg_id = next_id("msg_mock");
    let mut seq = 0u64;
    let mut next_seq = || {
        seq += 1;
        seq - 1
    };
    let mut events = vec![Event::named(
        "response.created",
        json!({
            "type": "response.created",
            "sequence_number": next_seq(),
            "response": response_object(&id, &msg_id, model, None)
        }),
    )];
    for (i, word) in answer_words(n).into_iter().enumerate() {
        let text = if i == 0 {
            word.to_owned()
        } else {
            format!(" {word}")
        };
        let mut event = Event::named(
            "response.output_text.delta",
            json!({
                "type": "response.output_text.delta",
                "sequence_number": next_seq(),
                "item_id": msg_id,
                "output_index": 0,
                "content_index": 0,
                "delta": text
            }),
        );
        event.delayed = true;
        events.push(event);
    }
    events.push(Event::named(
        "response.completed",
        json!({
            "type": "response.completed",
            "sequence_number": next_seq(),
            "response": response_object(&id, &msg_id, model, Some((prompt, n)))
        }),
    ));
    events
}

fn embeddings(model: &str, request: &Value, prompt: u64) -> Value {
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::Array(items)) => items.iter().map(Value::to_string).collect(),
        Some(other) => vec![other.to_string()],
        None => vec![String::new()],
    };
    let dims = request
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(8)
        .clamp(1, 64) as usize;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            json!({ "object": "embedding", "index": index, "embedding": vector(input, dims) })
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": prompt, "total_tokens": prompt }
    })
}

/// A deterministic unit-ish vector from the text (FNV-1a, then a xorshift walk).
fn vector(text: &str, dims: usize) -> Vec<f64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0..dims)
        .map(|_| {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            // Map to [-1, 1) with 4 decimals, so the JSON stays short.
            ((h % 20_000) as f64 - 10_000.0) / 10_000.0
        })
        .collect()
}

fn images(request: &Value) -> Value {
    let n = request
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 10);
    let b64 = request.get("response_format").and_then(Value::as_str) == Some("b64_json");
    let prompt = request.get("prompt").and_then(Value::as_str).unwrap_or("");
    let data: Vec<Value> = (0..n)
        .map(|i| {
            if b64 {
                // A 1x1 transparent PNG.
                json!({ "b64_json": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=", "revised_prompt": prompt })
            } else {
                json!({ "url": format!("https://mock.invalid/images/{i}.png"), "revised_prompt": prompt })
            }
        })
        .collect();
    json!({ "created": now(), "data": data })
}

fn moderations(model: &str, request: &Value) -> Value {
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::Array(items)) if !items.is_empty() => {
            items.iter().map(|i| i.to_string()).collect()
        }
        Some(other) => vec![other.to_string()],
        None => vec![String::new()],
    };
    const CATEGORIES: &[&str] = &[
        "harassment",
        "harassment/threatening",
        "hate",
        "hate/threatening",
        "illicit",
        "illicit/violent",
        "self-harm",
        "self-harm/instructions",
        "self-harm/intent",
        "sexual",
        "sexual/minors",
        "violence",
        "violence/graphic",
    ];
    let categories: serde_json::Map<String, Value> = CATEGORIES
        .iter()
        .map(|c| ((*c).to_owned(), Value::Bool(false)))
        .collect();
    let scores: serde_json::Map<String, Value> = CATEGORIES
        .iter()
        .map(|c| ((*c).to_owned(), json!(0.0001)))
        .collect();
    let results: Vec<Value> = inputs
        .iter()
        .map(|input| {
            let flagged = input.contains("FLAGME");
            let mut categories = categories.clone();
            if flagged {
                categories.insert("violence".into(), Value::Bool(true));
            }
            json!({
                "flagged": flagged,
                "categories": categories,
                "category_scores": scores
            })
        })
        .collect();
    json!({
        "id": next_id("modr-mock"),
        "model": model,
        "results": results
    })
}

/// Request header: a streamed chat completion whose content is this many bytes, generated
/// as it is sent (in events of [`SIZED_CHUNK`] bytes, never held whole), for memory tests of a
/// long stream through the proxy.
pub const STREAM_BYTES_HEADER: &str = "x-mock-stream-bytes";

/// Request header: the number of content chunks of this response (instead of
/// [`MockOptions::stream_chunks`]).
pub const STREAM_CHUNKS_HEADER: &str = "x-mock-stream-chunks";

/// Request header: the delay before each content chunk of this response, in milliseconds
/// (instead of [`MockOptions::chunk_delay`]).
pub const CHUNK_DELAY_HEADER: &str = "x-mock-chunk-delay-ms";

/// Content bytes per event of a sized stream ([`STREAM_BYTES_HEADER`]).
pub const SIZED_CHUNK: usize = 16 * 1024;

/// A chat completion stream of `bytes` content bytes (`x` repeated), made one event at a time
/// as the client reads (see [`STREAM_BYTES_HEADER`]). The completion tokens are the events.
fn sized_chat_stream(
    opts: &MockOptions,
    model: &str,
    prompt: u64,
    bytes: u64,
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::channel(4);
    let model = model.to_owned();
    let delay = opts.chunk_delay;
    let log = opts.log.clone();
    tokio::spawn(async move {
        let id = next_id("chatcmpl-mock");
        let created = now();
        let head = format!(
            "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{model},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"",
            model = Value::from(model.as_str()),
        );
        let tail = "\"},\"finish_reason\":null}]}\n\n";
        let mut left = bytes;
        let mut events = 0u64;
        while left > 0 {
            let n = left.min(SIZED_CHUNK as u64) as usize;
            left -= n as u64;
            events += 1;
            let mut event = BytesMut::with_capacity(head.len() + n + tail.len());
            event.extend_from_slice(head.as_bytes());
            event.resize(head.len() + n, b'x');
            event.extend_from_slice(tail.as_bytes());
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(event.freeze()).await.is_err() {
                return; // The client went away.
            }
        }
        let mut last = format!(
            "data: {{\"id\":\"{id}\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":{model},\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n",
            model = Value::from(model.as_str()),
        );
        if include_usage {
            let usage = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": chat_usage(prompt, events),
            });
            last.push_str(&format!("data: {usage}\n\n"));
        }
        last.push_str("data: [DONE]\n\n");
        if tx.send(Bytes::from(last)).await.is_ok() {
            log.stream_completed();
        }
    });
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::new(ChannelBody { rx }),
    )
        .into_response()
}

/// One server-sent event.
struct Event {
    bytes: Bytes,
    /// Whether [`MockOptions::chunk_delay`] applies before it (the content chunks).
    delayed: bool,
    /// Whether [`MockOptions::usage_delay`] applies before it (a chat stream's usage chunk).
    usage: bool,
}

impl Event {
    fn data(value: Value) -> Self {
        Self {
            bytes: Bytes::from(format!("data: {value}\n\n")),
            delayed: false,
            usage: false,
        }
    }

    fn usage(value: Value) -> Self {
        Self {
            usage: true,
            ..Self::data(value)
        }
    }

    fn content(value: Value) -> Self {
        Self {
            delayed: true,
            ..Self::data(value)
        }
    }

    fn named(name: &str, value: Value) -> Self {
        Self {
            bytes: Bytes::from(format!("event: {name}\ndata: {value}\n\n")),
            delayed: false,
            usage: false,
        }
    }

    fn done() -> Self {
        Self {
            bytes: Bytes::from_static(b"data: [DONE]\n\n"),
            delayed: false,
            usage: false,
        }
    }
}

/// A `text/event-stream` response writing `events`, each content event after
/// [`MockOptions::chunk_delay`]. Without a delay the events go out in one body frame.
fn sse(opts: &MockOptions, events: Vec<Event>) -> Response {
    let delay = opts.chunk_delay;
    let usage_delay = opts.usage_delay;
    let log = opts.log.clone();
    let body = if delay.is_zero() && usage_delay.is_zero() {
        let mut all = BytesMut::new();
        for event in &events {
            all.extend_from_slice(&event.bytes);
        }
        log.stream_completed();
        Body::from(all.freeze())
    } else {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for event in events {
                if event.delayed {
                    tokio::time::sleep(delay).await;
                }
                if event.usage {
                    tokio::time::sleep(usage_delay).await;
                }
                if tx.send(event.bytes).await.is_err() {
                    return; // The client went away.
                }
            }
            log.stream_completed();
        });
        Body::new(ChannelBody { rx })
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

/// A body fed by a channel, one frame per message.
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl fmt::Debug for ChannelBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelBody").finish_non_exhaustive()
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}
