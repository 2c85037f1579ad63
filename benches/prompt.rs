//! The prompt walk of PromptLimit and the FeatureBlock + PromptLimit stack, next to a plain
//! `serde_json::Value` parse of the same body (the performance budget's yardstick).
//!
//! `cargo bench --all-features --bench prompt` (exact token counts; without `tokens` the
//! "exact" rows are estimates too).

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::LazyLock;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use divan::{black_box, counter::BytesCount, Bencher};
use http::{Request, Response};
use tower::{service_fn, Service, ServiceBuilder};
use tower_llm_policy::feature_block::FeatureBlockLayer;
use tower_llm_policy::prompt_limit::{
    prompt_chars, prompt_tokens_up_to, MediaTokens, PromptLimitLayer,
};
use tower_llm_policy::tokens::{Encoding, TokenCounter};
use tower_llm_policy::{FeatureSet, LlmRequest, PolicyBody};

fn main() {
    divan::main();
}

const PARAGRAPH: &str = "You are a careful assistant. Summarise the following support ticket \
    in two sentences, then list the customer's open questions as bullet points. The customer \
    writes: \"Since the update on 2024-08-06 the export to CSV fails with error 0x80070057; \
    I've tried re-installing twice, it didn't help.\" ";

/// A chat request of about 2 KB: a system message and four user/assistant turns.
static CHAT_2KB: LazyLock<Bytes> = LazyLock::new(|| {
    let mut messages = vec![serde_json::json!({"role":"system","content":PARAGRAPH})];
    while serde_json::to_vec(&messages).unwrap().len() < 1900 {
        messages.push(serde_json::json!({"role":"user","content":PARAGRAPH}));
        messages.push(serde_json::json!({"role":"assistant","content":"Understood."}));
    }
    body(&serde_json::json!({"model":"gpt-4o","max_tokens":512,"user":"u-1","messages":messages}))
});

/// A chat request with one user message of about 100 KB.
static CHAT_100KB: LazyLock<Bytes> = LazyLock::new(|| {
    let text = PARAGRAPH.repeat(100 * 1024 / PARAGRAPH.len());
    body(&serde_json::json!({"model":"gpt-4o","messages":[{"role":"user","content":text}]}))
});

/// A chat request whose one message is a single 1 MiB word.
static CHAT_WORD_1MB: LazyLock<Bytes> = LazyLock::new(|| {
    let word = "a".repeat(1024 * 1024);
    body(&serde_json::json!({"model":"gpt-4o","messages":[{"role":"user","content":word}]}))
});

fn body(value: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap())
}

fn parse(bytes: &Bytes) -> LlmRequest {
    let (parts, ()) = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts();
    LlmRequest::parse(&parts, bytes.clone()).unwrap()
}

/// The yardstick: a plain `serde_json::Value` parse of the 2 KB chat request.
#[divan::bench]
fn baseline_value_parse_2kb(bencher: Bencher<'_, '_>) {
    let bytes: &[u8] = &CHAT_2KB;
    bencher
        .counter(BytesCount::new(bytes.len()))
        .bench(|| serde_json::from_slice::<serde_json::Value>(black_box(bytes)).unwrap());
}

/// Building the view (done once per request, by whichever layer reads first).
#[divan::bench]
fn view_parse_2kb(bencher: Bencher<'_, '_>) {
    let bytes = &*CHAT_2KB;
    bencher.bench(|| parse(black_box(bytes)));
}

/// `max_prompt_chars`: the character walk over the view's prompt parts.
#[divan::bench(args = ["2kb", "100kb", "word_1mb"])]
fn walk_chars(bencher: Bencher<'_, '_>, size: &str) {
    let view = parse(request(size));
    bencher.bench(|| prompt_chars(black_box(&view)));
}

/// `max_prompt_tokens` with a limit the prompt is within: every part is counted.
#[divan::bench(args = [Encoding::O200kBase, Encoding::Cl100kBase])]
fn walk_tokens_2kb(bencher: Bencher<'_, '_>, encoding: Encoding) {
    let view = parse(&CHAT_2KB);
    let counter = TokenCounter::new(encoding);
    let media = MediaTokens::default();
    bencher.bench(|| prompt_tokens_up_to(black_box(&view), &counter, &media, 100_000));
}

/// The estimate ([`estimate`](tower_llm_policy::tokens::estimate), without the `tokens` feature)
/// instead of exact counts.
#[divan::bench]
fn walk_tokens_2kb_estimated(bencher: Bencher<'_, '_>) {
    let view = parse(&CHAT_2KB);
    let counter = TokenCounter::estimating(Encoding::O200kBase);
    let media = MediaTokens::default();
    bencher.bench(|| prompt_tokens_up_to(black_box(&view), &counter, &media, 100_000));
}

/// A 100 KB prompt against a 1 000-token limit: counting stops early.
#[divan::bench]
fn walk_tokens_100kb_limit_1k(bencher: Bencher<'_, '_>) {
    let view = parse(&CHAT_100KB);
    let counter = TokenCounter::new(Encoding::O200kBase);
    let media = MediaTokens::default();
    bencher.bench(|| prompt_tokens_up_to(black_box(&view), &counter, &media, 1_000));
}

/// A 100 KB prompt within a large limit: the whole text is counted.
#[divan::bench(sample_count = 30)]
fn walk_tokens_100kb_all(bencher: Bencher<'_, '_>) {
    let view = parse(&CHAT_100KB);
    let counter = TokenCounter::new(Encoding::O200kBase);
    let media = MediaTokens::default();
    bencher
        .counter(BytesCount::new(CHAT_100KB.len()))
        .bench(|| prompt_tokens_up_to(black_box(&view), &counter, &media, usize::MAX));
}

/// Hostile input: one 1 MiB word against a 1 000-token limit (decided by its length).
#[divan::bench]
fn walk_tokens_word_1mb_limit_1k(bencher: Bencher<'_, '_>) {
    let view = parse(&CHAT_WORD_1MB);
    let counter = TokenCounter::new(Encoding::O200kBase);
    let media = MediaTokens::default();
    bencher.bench(|| prompt_tokens_up_to(black_box(&view), &counter, &media, 1_000));
}

/// Hostile input within a limit: the 1 MiB word is encoded whole.
#[divan::bench(sample_count = 10)]
fn walk_tokens_word_1mb_all(bencher: Bencher<'_, '_>) {
    let view = parse(&CHAT_WORD_1MB);
    let counter = TokenCounter::new(Encoding::O200kBase);
    let media = MediaTokens::default();
    bencher
        .counter(BytesCount::new(CHAT_WORD_1MB.len()))
        .bench(|| prompt_tokens_up_to(black_box(&view), &counter, &media, usize::MAX));
}

fn request(size: &str) -> &'static Bytes {
    match size {
        "2kb" => &CHAT_2KB,
        "100kb" => &CHAT_100KB,
        _ => &CHAT_WORD_1MB,
    }
}

/// Polls a future that completes without waiting (in-memory bodies, an immediate inner
/// service) to its end.
fn run<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// The whole request path through FeatureBlock (a model block, so it reads and parses the
/// body) and PromptLimit (every limit) on the 2 KB chat request, with a token limit of
/// 20 000 (the prompt's length in bytes is within it: nothing to count) and of 1 000 (the
/// prompt, about 400 tokens, is counted exactly).
#[divan::bench(args = [20_000, 1_000])]
fn stack_feature_block_and_prompt_limit_2kb(bencher: Bencher<'_, '_>, max_prompt_tokens: u64) {
    let mut svc = ServiceBuilder::new()
        .layer(
            FeatureBlockLayer::new()
                .block_features("images,audio".parse::<FeatureSet>().unwrap())
                .block_models(["dall-e-3", "gpt-4-32k*"]),
        )
        .layer(
            PromptLimitLayer::new()
                .max_prompt_chars(100_000)
                .max_prompt_tokens(max_prompt_tokens)
                .max_output_tokens(4_096)
                .max_n(1)
                .max_messages(50)
                .require_user(true),
        )
        .service(service_fn(|_req: Request<PolicyBody>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let bytes = CHAT_2KB.clone();
    bencher
        .with_inputs(|| {
            Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes.clone()))
                .unwrap()
        })
        .bench_local_values(|req| {
            run(std::future::poll_fn(|cx| {
                Service::<Request<http_body_util::Full<Bytes>>>::poll_ready(&mut svc, cx)
            }))
            .unwrap();
            let response = run(svc.call(req)).unwrap();
            assert!(response.status().is_success());
            response
        });
}
