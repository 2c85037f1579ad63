//! The content guards on a 32 KB prompt and on a 1 MiB stream, against baselines in the same
//! run.
//!
//! `cargo bench --bench guards --features guards`
//!
//! Requests (one iteration: one request through the stack to a service that answers at once,
//! on a current-thread Tokio runtime):
//! - `request_no_guards`: the `GuardLayer` with no guard (the body is still resolved by the
//!   layer: the baseline);
//! - `request_full_set`: every built-in detector on the request — `WordList::profanity()`,
//!   `Secrets::all()`, `Pii::all()`, `Injection::new()`, a custom `Patterns` — in block mode
//!   on a clean 32 KB prompt (nothing matches: every guard reads all of it);
//! - `request_full_set_redact`: the same set, secrets and PII in redact mode, on the prompt
//!   with a key and an e-mail in it (the redaction, the second read and the re-check);
//! - `value_parse`: `serde_json::from_slice::<Value>` of the same body, the yardstick.
//!
//! Streams (one iteration: a 1 MiB chat completion stream of about 6,000 events read to its
//! end through the layer):
//! - `stream_pass`: no response guard;
//! - `stream_full_set_redact`: the same detectors on the response, secrets and PII redacting
//!   and the rest blocking (nothing blocks in this text);
//! - `stream_one`: each detector alone on the response, in the mode of the full set (alone,
//!   a guard is the widest: it reads its window every quarter of its hold-back).
//!
//! Detectors alone (`find_32k`): one `Detector::find` over the clean 32 KB text, with no layer
//! around it; prints each detector's longest match `L` and context `C` (a stream that a
//! detector acts on holds back about `L + C` bytes).
//!
//! Quote the medians as ratios within one run.

use std::convert::Infallible;
use std::sync::LazyLock;

use bytes::Bytes;
use divan::{black_box, Bencher};
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use tokio::runtime::Runtime;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_llm_policy::guard::detect::{Injection, Patterns, Pii, Secrets, WordList};
use tower_llm_policy::guard::{Guard, GuardLayer, Mode, Sides};
use tower_llm_policy::PolicyBody;

fn main() {
    divan::main();
}

static RT: LazyLock<Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
});

/// English prose with numbers and punctuation, about `len` bytes.
fn prose(len: usize) -> String {
    let sentences = [
        "The quarterly report shows revenue of 4.2 million across 17 regions. ",
        "Please summarise the attached notes and list three follow-up actions. ",
        "Our team met on Tuesday to review the deployment checklist and the rollback plan. ",
        "Customers in the northern region asked for faster delivery and clearer invoices. ",
        "Translate the following paragraph into French, keeping the technical terms. ",
    ];
    let mut text = String::with_capacity(len + 100);
    let mut i = 0;
    while text.len() < len {
        text.push_str(sentences[i % sentences.len()]);
        i += 1;
    }
    text
}

static CLEAN: LazyLock<Bytes> = LazyLock::new(|| body(&prose(32 * 1024)));
static DIRTY: LazyLock<Bytes> = LazyLock::new(|| {
    let mut text = prose(32 * 1024);
    text.insert_str(
        16 * 1024,
        " my key is sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z and mail me at jane.doe@example.com ",
    );
    body(&text)
});

fn body(prompt: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": prompt}
            ]
        })
        .to_string(),
    )
}

fn full_set(redact: bool, on: Sides) -> GuardLayer {
    let mode = if redact { Mode::Redact } else { Mode::Block };
    GuardLayer::new()
        .guard(Guard::new("profanity", WordList::profanity()).on(on))
        .guard(Guard::new("secrets", Secrets::all()).mode(mode).on(on))
        .guard(Guard::new("pii", Pii::all()).mode(mode).on(on))
        .guard(Guard::new("injection", Injection::new()).on(on))
        .guard(
            Guard::new(
                "tickets",
                Patterns::new([("ticket", r"(?-u:\b)TICKET-[0-9]{1,8}(?-u:\b)")]).unwrap(),
            )
            .on(on),
        )
}

async fn one_request(layer: &GuardLayer, body: Bytes) -> u16 {
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|req: Request<PolicyBody>| async move {
            let _ = req.into_body().collect().await;
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::new())))
        }));
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(body))
        .unwrap();
    svc.oneshot(req).await.unwrap().status().as_u16()
}

#[divan::bench]
fn request_no_guards(bencher: Bencher<'_, '_>) {
    let layer = GuardLayer::new();
    bencher.bench_local(|| RT.block_on(one_request(&layer, black_box(CLEAN.clone()))));
}

#[divan::bench]
fn request_full_set(bencher: Bencher<'_, '_>) {
    let layer = full_set(false, Sides::REQUEST);
    assert_eq!(RT.block_on(one_request(&layer, CLEAN.clone())), 200);
    bencher.bench_local(|| RT.block_on(one_request(&layer, black_box(CLEAN.clone()))));
}

#[divan::bench]
fn request_full_set_redact(bencher: Bencher<'_, '_>) {
    let layer = full_set(true, Sides::REQUEST);
    assert_eq!(RT.block_on(one_request(&layer, DIRTY.clone())), 200);
    bencher.bench_local(|| RT.block_on(one_request(&layer, black_box(DIRTY.clone()))));
}

#[divan::bench]
fn value_parse(bencher: Bencher<'_, '_>) {
    bencher.bench_local(|| serde_json::from_slice::<serde_json::Value>(black_box(&CLEAN)).unwrap());
}

/// A 1 MiB chat completion stream, one event per frame.
static STREAM: LazyLock<Vec<Bytes>> = LazyLock::new(|| {
    let text = prose(1024 * 1024);
    let mut frames = Vec::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let mut cut = rest.len().min(160);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (delta, tail) = rest.split_at(cut);
        rest = tail;
        let event = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": null}]
        });
        frames.push(Bytes::from(format!("data: {event}\n\n")));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
});

async fn one_stream(layer: &GuardLayer) -> usize {
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(service_fn(|_req: Request<PolicyBody>| async move {
            let frames = STREAM
                .iter()
                .cloned()
                .map(|b| Ok::<_, Infallible>(http_body::Frame::data(b)));
            let body = StreamBody::new(futures_util::stream::iter(frames));
            let mut response = Response::new(body);
            response
                .headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            Ok::<_, Infallible>(response)
        }));
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(body("hi")))
        .unwrap();
    let response = svc.oneshot(req).await.unwrap();
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}

#[divan::bench(sample_count = 10)]
fn stream_pass(bencher: Bencher<'_, '_>) {
    let layer = GuardLayer::new();
    bencher.bench_local(|| RT.block_on(one_stream(&layer)));
}

#[divan::bench(args = ["profanity", "secrets", "pii", "injection", "tickets"])]
fn find_32k(bencher: Bencher<'_, '_>, which: &str) {
    use tower_llm_policy::guard::detect::Detector;
    let d: Box<dyn Detector> = match which {
        "profanity" => Box::new(WordList::profanity()),
        "secrets" => Box::new(Secrets::all()),
        "pii" => Box::new(Pii::all()),
        "injection" => Box::new(Injection::new()),
        _ => Box::new(Patterns::new([("ticket", r"(?-u:\b)TICKET-[0-9]{1,8}(?-u:\b)")]).unwrap()),
    };
    let text = prose(32 * 1024);
    eprintln!("{which}: L {} C {}", d.max_match_len(), d.context());
    bencher.bench_local(|| {
        let mut found = Vec::new();
        d.find(black_box(&text), &mut found);
        found.len()
    });
}

#[divan::bench(sample_count = 5, args = ["profanity", "secrets", "pii", "injection", "tickets"])]
fn stream_one(bencher: Bencher<'_, '_>, which: &str) {
    let on = Sides::RESPONSE;
    let g = match which {
        "profanity" => Guard::new("profanity", WordList::profanity()).on(on),
        "secrets" => Guard::new("secrets", Secrets::all())
            .mode(Mode::Redact)
            .on(on),
        "pii" => Guard::new("pii", Pii::all()).mode(Mode::Redact).on(on),
        "injection" => Guard::new("injection", Injection::new()).on(on),
        _ => Guard::new(
            "tickets",
            Patterns::new([("ticket", r"(?-u:\b)TICKET-[0-9]{1,8}(?-u:\b)")]).unwrap(),
        )
        .on(on),
    };
    let layer = GuardLayer::new().guard(g);
    bencher.bench_local(|| RT.block_on(one_stream(&layer)));
}

#[divan::bench(sample_count = 10)]
fn stream_full_set_redact(bencher: Bencher<'_, '_>) {
    let layer = full_set(true, Sides::RESPONSE);
    assert!(RT.block_on(one_stream(&layer)) > 1024 * 1024);
    bencher.bench_local(|| RT.block_on(one_stream(&layer)));
}
