//! The policy stack against the performance budget of DESIGN.md: all layers together must cost
//! no more than one plain `serde_json::Value` parse of the same request body.
//!
//! Run with `cargo bench --bench stack`. Every bench runs on three bodies ([`BODIES`]): a 2 KB
//! chat request (`chat_2k`), a 2 KB tool-calling request (`tools_2k`: a system prompt, content
//! parts, a `tools` array with a JSON schema) and a 64 KB chat request (`chat_64k`). Compare,
//! in one run and for one body:
//! - `value_parse`: `serde_json::from_slice::<Value>` of the body (the budget);
//! - `no_layers`: building the request and calling the inner service directly (the floor);
//! - `stack`: the same request through KeyAuth and ModelAllowList;
//! - `stack_all`: through all the layers (audit, body limit, key, features, models, prompt
//!   limits with a token limit the prompt is well under), the response body read to its end so
//!   the audit record is made;
//! - `layer_*`: each layer alone (`layer_audit` reads the response body to its end too).
//!
//! The cost of a stack (or a layer) is `stack - no_layers`; its ratio to `value_parse` is the
//! figure to keep at or below 1.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::FnSink;
use tower_llm_policy::{
    ApiKey, AuditLayer, AuditRecord, BodyLimitLayer, FeatureBlockLayer, KeyAuthLayer,
    MemoryKeyStore, ModelAllowListLayer, PolicyBody, PromptLimitLayer,
};

fn main() {
    divan::main();
}

/// The request bodies every bench runs on.
#[derive(Clone, Copy, Debug)]
enum Body {
    /// A realistic ~2 KB chat request.
    Chat2k,
    /// A ~2 KB tool-calling request: a system prompt, a user message of text parts, a `tools`
    /// array with a JSON schema.
    Tools2k,
    /// A ~64 KB chat request.
    Chat64k,
}

const BODIES: [Body; 3] = [Body::Chat2k, Body::Tools2k, Body::Chat64k];

/// The bodies to run: [`BODIES`], or those named in `STACK_BODIES` (comma-separated, for
/// profiling one: `STACK_BODIES=tools_2k`).
fn bodies() -> Vec<Body> {
    let wanted = std::env::var("STACK_BODIES").unwrap_or_default();
    BODIES
        .into_iter()
        .filter(|b| wanted.is_empty() || wanted.split(',').any(|w| w.trim() == b.to_string()))
        .collect()
}

impl fmt::Display for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Body::Chat2k => "chat_2k",
            Body::Tools2k => "tools_2k",
            Body::Chat64k => "chat_64k",
        })
    }
}

impl Body {
    fn bytes(self) -> Bytes {
        let text = "Summarise the following notes for the weekly report, keeping every number. ";
        let (body, size) = match self {
            Body::Chat2k => (chat(6, &text.repeat(4)), 1800..2600),
            Body::Chat64k => (chat(160, &text.repeat(5)), 60_000..70_000),
            Body::Tools2k => (tools(), 1800..2600),
        };
        let bytes = Bytes::from(body.to_string());
        assert!(size.contains(&bytes.len()), "{self}: {}", bytes.len());
        bytes
    }
}

/// A chat request of `messages` messages of `text`, taking turns.
fn chat(messages: usize, text: &str) -> serde_json::Value {
    let messages: Vec<_> = (0..messages)
        .map(|i| {
            json!({
                "role": if i % 2 == 0 { "user" } else { "assistant" },
                "content": text,
            })
        })
        .collect();
    json!({
        "model": "gpt-4o-mini-2024-07-18",
        "messages": messages,
        "temperature": 0.3,
        "max_tokens": 512,
        "user": "user-1234",
        "stream": false,
    })
}

fn tools() -> serde_json::Value {
    json!({
        "model": "gpt-4o-2024-08-06",
        "messages": [
            {
                "role": "system",
                "content": "You are a travel assistant. Use the tools to look up flights and \
                    hotels; never invent prices, dates or availability. Answer in the language \
                    of the user, briefly, and ask before booking anything.",
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "I need to be in Lisbon on the 14th for a \
                        conference that starts at 9 in the morning, and back home by the 17th."},
                    {"type": "text", "text": "Find me a direct flight from Berlin, economy, \
                        with one checked bag, and a hotel within walking distance of the venue."},
                ],
            },
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "search_flights",
                    "description": "Search direct and connecting flights between two airports.",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "from": {"type": "string", "description": "IATA code of departure"},
                            "to": {"type": "string", "description": "IATA code of arrival"},
                            "date": {"type": "string", "format": "date"},
                            "direct_only": {"type": "boolean"},
                            "cabin": {"type": "string", "enum": ["economy", "premium", "business"]},
                            "bags": {"type": "integer", "minimum": 0, "maximum": 3},
                        },
                        "required": ["from", "to", "date"],
                        "additionalProperties": false,
                    },
                },
            },
            {
                "type": "function",
                "function": {
                    "name": "search_hotels",
                    "description": "Search hotels near an address, with prices for given nights.",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "near": {"type": "string", "description": "An address or a venue"},
                            "check_in": {"type": "string", "format": "date"},
                            "check_out": {"type": "string", "format": "date"},
                            "max_distance_m": {"type": "integer", "minimum": 100},
                        },
                        "required": ["near", "check_in", "check_out"],
                    },
                },
            },
            {
                "type": "function",
                "function": {
                    "name": "book",
                    "description": "Book a flight or a hotel found by a search, once the user agreed.",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "offer_id": {"type": "string", "description": "From a search result"},
                            "traveller": {"type": "string", "description": "Full name as on the passport"},
                        },
                        "required": ["offer_id", "traveller"],
                    },
                },
            },
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": true,
        "temperature": 0.2,
        "max_tokens": 1024,
        "user": "user-1234",
    })
}

fn request(body: &Bytes) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-bench-key-0123456789")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Full::new(body.clone()))
        .unwrap()
}

/// Polls a future that completes without waiting (every part of this stack does, here).
fn run<F: Future>(fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the benchmarked stack must not wait"),
    }
}

/// The upstream: a short chat completion with its usage, as OpenAI answers (the audit record
/// reads the usage from it; an answer without one would make it estimate the prompt).
async fn inner<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    const ANSWER: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1741569952,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Done."},"finish_reason":"stop"}],"usage":{"prompt_tokens":480,"completion_tokens":2,"total_tokens":482}}"#;
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(ANSWER)))
        .expect("a valid response"))
}

fn key_store() -> Arc<MemoryKeyStore> {
    Arc::new(
        MemoryKeyStore::new().with_key(
            "sk-bench-key-0123456789",
            ApiKey::new("bench")
                .model_limits(["gpt-4o-mini", "gpt-4o", "o3-mini"])
                // Over what the byte length of the 64 KB prompt proves (a token is at least a
                // byte): no body here needs exact counting (`--bench prompt` measures that).
                .max_prompt_tokens(100_000),
        ),
    )
}

fn key_auth() -> KeyAuthLayer {
    KeyAuthLayer::new(key_store())
}

fn model_allow_list() -> ModelAllowListLayer {
    ModelAllowListLayer::new().workspace_models(["gpt-4o*", "o3-mini"])
}

fn feature_block() -> FeatureBlockLayer {
    FeatureBlockLayer::new().block_models(["dall-e-3", "gpt-4.5*"])
}

fn prompt_limit() -> PromptLimitLayer {
    PromptLimitLayer::new()
        .max_prompt_chars(100_000)
        .max_output_tokens(4_096)
        .max_n(2)
}

/// An audit layer whose sink counts the records, and the count.
fn audit() -> (AuditLayer, Arc<AtomicUsize>) {
    let records = Arc::new(AtomicUsize::new(0));
    let counter = records.clone();
    let sink = FnSink::new(move |_: &AuditRecord| {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    (AuditLayer::new(sink), records)
}

/// Sends the body through `svc` (the stack over [`inner`]), checks that it passed and reads the
/// response body to its end (which makes the audit record, behind an audit layer).
fn bench_service<S, ResBody>(bencher: divan::Bencher<'_, '_>, body: Body, mut svc: S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResBody>, Error = Infallible>,
    ResBody: http_body::Body<Data = Bytes>,
    ResBody::Error: fmt::Debug,
{
    let body = body.bytes();
    bencher.bench_local(|| {
        let ready = run(ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc));
        let fut = ready.unwrap().call(request(&body));
        let resp = run(fut).unwrap();
        assert!(resp.status().is_success());
        let body = run(resp.into_body().collect()).unwrap();
        divan::black_box(body)
    });
}

#[divan::bench(args = bodies())]
fn value_parse(bencher: divan::Bencher<'_, '_>, body: Body) {
    let body = body.bytes();
    bencher.bench(|| serde_json::from_slice::<serde_json::Value>(divan::black_box(&body)).unwrap());
}

/// Validating the body as JSON and nothing else: the floor for any parse that rejects
/// invalid JSON.
#[divan::bench(args = bodies())]
fn validate_only(bencher: divan::Bencher<'_, '_>, body: Body) {
    let body = body.bytes();
    bencher.bench(|| {
        serde_json::from_slice::<serde::de::IgnoredAny>(divan::black_box(&body)).unwrap()
    });
}

/// The parse-once view alone (the share of the stack spent parsing the body).
#[divan::bench(args = bodies())]
fn view_parse(bencher: divan::Bencher<'_, '_>, body: Body) {
    let body = body.bytes();
    let (parts, _) = request(&body).into_parts();
    bencher.bench(|| {
        tower_llm_policy::LlmRequest::parse(&parts, divan::black_box(body.clone())).unwrap()
    });
}

/// One digest of the presented key.
#[divan::bench]
fn key_digest() -> tower_llm_policy::KeyDigest {
    tower_llm_policy::KeyDigest::of(divan::black_box("sk-bench-key-0123456789"))
}

#[divan::bench(args = bodies())]
fn no_layers(bencher: divan::Bencher<'_, '_>, body: Body) {
    bench_service(bencher, body, tower::service_fn(inner::<Full<Bytes>>));
}

#[divan::bench(args = bodies())]
fn stack(bencher: divan::Bencher<'_, '_>, body: Body) {
    let svc = ServiceBuilder::new()
        .layer(key_auth())
        .layer(model_allow_list())
        .service_fn(inner::<PolicyBody>);
    bench_service(bencher, body, svc);
}

#[divan::bench(args = bodies())]
fn stack_all(bencher: divan::Bencher<'_, '_>, body: Body) {
    let (audit, records) = audit();
    let svc = ServiceBuilder::new()
        .layer(audit)
        .layer(BodyLimitLayer::new())
        .layer(key_auth())
        .layer(feature_block())
        .layer(model_allow_list())
        .layer(prompt_limit())
        .service_fn(inner::<PolicyBody>);
    bench_service(bencher, body, svc);
    assert!(records.load(Ordering::Relaxed) > 0);
}

#[divan::bench(args = bodies())]
fn layer_key_auth(bencher: divan::Bencher<'_, '_>, body: Body) {
    let svc = ServiceBuilder::new()
        .layer(key_auth())
        .service_fn(inner::<Full<Bytes>>);
    bench_service(bencher, body, svc);
}

#[divan::bench(args = bodies())]
fn layer_model_allow_list(bencher: divan::Bencher<'_, '_>, body: Body) {
    let svc = ServiceBuilder::new()
        .layer(model_allow_list())
        .service_fn(inner::<PolicyBody>);
    bench_service(bencher, body, svc);
}

#[divan::bench(args = bodies())]
fn layer_feature_block(bencher: divan::Bencher<'_, '_>, body: Body) {
    let svc = ServiceBuilder::new()
        .layer(feature_block())
        .service_fn(inner::<PolicyBody>);
    bench_service(bencher, body, svc);
}

#[divan::bench(args = bodies())]
fn layer_prompt_limit(bencher: divan::Bencher<'_, '_>, body: Body) {
    let svc = ServiceBuilder::new()
        .layer(prompt_limit())
        .service_fn(inner::<PolicyBody>);
    bench_service(bencher, body, svc);
}

#[divan::bench(args = bodies())]
fn layer_audit(bencher: divan::Bencher<'_, '_>, body: Body) {
    let (audit, records) = audit();
    let svc = ServiceBuilder::new()
        .layer(audit)
        .service_fn(inner::<PolicyBody>);
    bench_service(bencher, body, svc);
    assert!(records.load(Ordering::Relaxed) > 0);
}
