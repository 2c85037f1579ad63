//! The policy stack against the performance budget of DESIGN.md: all layers together must cost
//! no more than one plain `serde_json::Value` parse of the same 2 KB chat request.
//!
//! Run with `cargo bench --bench stack`. Compare, in one run:
//! - `value_parse`: `serde_json::from_slice::<Value>` of the body (the budget);
//! - `no_layers`: building the request and calling the inner service directly (the floor);
//! - `stack`: the same request through KeyAuth and ModelAllowList;
//! - `stack_all`: through all five layers (audit, key, models, features, prompt limits with a
//!   token limit the prompt is well under), the response body read to its end so the audit
//!   record is made.
//!
//! The cost of a stack is `stack - no_layers`; its ratio to `value_parse` is the figure to
//! keep at or below 1.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::FnSink;
use tower_llm_policy::{
    ApiKey, AuditLayer, FeatureBlockLayer, KeyAuthLayer, MemoryKeyStore, ModelAllowListLayer,
    PromptLimitLayer,
};

fn main() {
    divan::main();
}

/// A realistic ~2 KB chat request.
fn body() -> Bytes {
    let text = "Summarise the following notes for the weekly report, keeping every number. ";
    let messages: Vec<_> = (0..6)
        .map(|i| {
            serde_json::json!({
                "role": if i % 2 == 0 { "user" } else { "assistant" },
                "content": text.repeat(4),
            })
        })
        .collect();
    let body = serde_json::json!({
        "model": "gpt-4o-mini-2024-07-18",
        "messages": messages,
        "temperature": 0.3,
        "max_tokens": 512,
        "user": "user-1234",
        "stream": false,
    });
    let bytes = Bytes::from(body.to_string());
    assert!((1800..2600).contains(&bytes.len()), "{}", bytes.len());
    bytes
}

fn request(body: &Bytes) -> Request<http_body_util::Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-bench-key-0123456789")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(http_body_util::Full::new(body.clone()))
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

async fn inner<B>(_req: Request<B>) -> Result<Response<http_body_util::Full<Bytes>>, Infallible> {
    Ok(Response::new(http_body_util::Full::new(
        Bytes::from_static(b"{}"),
    )))
}

#[divan::bench]
fn value_parse(bencher: divan::Bencher<'_, '_>) {
    let body = body();
    bencher.bench(|| serde_json::from_slice::<serde_json::Value>(divan::black_box(&body)).unwrap());
}

#[divan::bench]
fn no_layers(bencher: divan::Bencher<'_, '_>) {
    let body = body();
    let svc = tower::service_fn(inner::<http_body_util::Full<Bytes>>);
    bencher.bench(|| {
        let resp = run(svc.oneshot(request(&body))).unwrap();
        divan::black_box(resp.status())
    });
}

#[divan::bench]
fn stack(bencher: divan::Bencher<'_, '_>) {
    let body = body();
    let store = Arc::new(MemoryKeyStore::new().with_key(
        "sk-bench-key-0123456789",
        ApiKey::new("bench").model_limits(["gpt-4o-mini", "gpt-4o", "o3-mini"]),
    ));
    let mut svc = ServiceBuilder::new()
        .layer(KeyAuthLayer::new(store))
        .layer(ModelAllowListLayer::new().workspace_models(["gpt-4o*", "o3-mini"]))
        .service_fn(inner::<tower_llm_policy::PolicyBody>);
    bencher.bench_local(|| {
        let ready = run(ServiceExt::<Request<http_body_util::Full<Bytes>>>::ready(
            &mut svc,
        ));
        let fut = ready.unwrap().call(request(&body));
        let resp = run(fut).unwrap();
        assert!(resp.status().is_success());
        divan::black_box(resp.status())
    });
}

/// The parse-once view alone (the share of the stack spent parsing the body).
#[divan::bench]
fn view_parse(bencher: divan::Bencher<'_, '_>) {
    let body = body();
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

/// Validating the body as JSON and nothing else: the floor for any parse that rejects
/// invalid JSON.
#[divan::bench]
fn validate_only(bencher: divan::Bencher<'_, '_>) {
    let body = body();
    bencher.bench(|| {
        serde_json::from_slice::<serde::de::IgnoredAny>(divan::black_box(&body)).unwrap()
    });
}

#[divan::bench]
fn stack_all(bencher: divan::Bencher<'_, '_>) {
    let body = body();
    let store = Arc::new(
        MemoryKeyStore::new().with_key(
            "sk-bench-key-0123456789",
            ApiKey::new("bench")
                .model_limits(["gpt-4o-mini", "gpt-4o", "o3-mini"])
                .max_prompt_tokens(20_000),
        ),
    );
    let records = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = records.clone();
    let sink = FnSink::new(move |_: &tower_llm_policy::AuditRecord| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    let mut svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink))
        .layer(tower_llm_policy::BodyLimitLayer::new())
        .layer(KeyAuthLayer::new(store))
        .layer(FeatureBlockLayer::new().block_models(["dall-e-3", "gpt-4.5*"]))
        .layer(ModelAllowListLayer::new().workspace_models(["gpt-4o*", "o3-mini"]))
        .layer(
            PromptLimitLayer::new()
                .max_prompt_chars(100_000)
                .max_output_tokens(4_096)
                .max_n(2),
        )
        .service_fn(inner::<tower_llm_policy::PolicyBody>);
    bencher.bench_local(|| {
        let ready = run(ServiceExt::<Request<http_body_util::Full<Bytes>>>::ready(
            &mut svc,
        ));
        let fut = ready.unwrap().call(request(&body));
        let resp = run(fut).unwrap();
        assert!(resp.status().is_success());
        let body = run(resp.into_body().collect()).unwrap();
        divan::black_box(body)
    });
    assert!(records.load(std::sync::atomic::Ordering::Relaxed) > 0);
}
