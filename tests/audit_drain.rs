//! A client that leaves after the last token but before the usage chunk: with
//! `DrainOnCancelLayer` the response is read on briefly and the record has the upstream's own
//! usage; without it, or past the bounds, the record has none (`usage_missing`).
#![cfg(feature = "tokio")]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::channel::{Channel, Sender};
use http_body_util::BodyExt;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::{
    flag, AuditLayer, AuditRecord, DrainOnCancelLayer, MemorySink, Outcome,
};
use tower_llm_policy::PolicyBody;

const TOKEN: &str =
    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
const LAST: &str =
    "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1000,\"completion_tokens\":100,\"total_tokens\":1100}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

type Upstream = Arc<Mutex<Option<Sender<Bytes, Infallible>>>>;

/// An audit stack (with a drain in front when `drain` is some) whose upstream answers
/// `status` with `content_type` and a body the test writes through the returned sender slot.
fn stack(
    drain: Option<DrainOnCancelLayer>,
    status: StatusCode,
    content_type: &'static str,
) -> (
    impl Service<
        Request<String>,
        Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible>>,
        Error = Infallible,
    >,
    MemorySink,
    Upstream,
) {
    let sink = MemorySink::new();
    let slot: Upstream = Arc::default();
    let upstream = slot.clone();
    let service = ServiceBuilder::new()
        // No drain: a zero timeout turns it off.
        .layer(drain.unwrap_or_else(|| DrainOnCancelLayer::new().drain_timeout(Duration::ZERO)))
        .layer(AuditLayer::new(sink.clone()).read_body(true))
        .service(service_fn(move |req: Request<PolicyBody>| {
            let slot = upstream.clone();
            async move {
                req.into_body().collect().await.unwrap();
                let (sender, body) = Channel::<Bytes, Infallible>::new(64);
                *slot.lock().unwrap() = Some(sender);
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .header("content-type", content_type)
                        .body(body)
                        .unwrap(),
                )
            }
        }));
    (service, sink, slot)
}

fn chat_request(stream: bool) -> Request<String> {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}],
    });
    Request::post("/v1/chat/completions")
        .body(body.to_string())
        .unwrap()
}

async fn send(slot: &Upstream, text: &str) {
    let mut sender = slot.lock().unwrap().take().expect("the upstream answered");
    sender
        .send_data(Bytes::copy_from_slice(text.as_bytes()))
        .await
        .unwrap();
    *slot.lock().unwrap() = Some(sender);
}

/// Reads `frames` data frames of `body`; their bytes.
async fn read_frames<B>(body: &mut B, frames: usize) -> usize
where
    B: http_body::Body<Data = Bytes, Error = Infallible> + Unpin,
{
    let mut bytes = 0;
    for _ in 0..frames {
        let frame: Frame<Bytes> = body.frame().await.unwrap().unwrap();
        bytes += frame.into_data().unwrap().len();
    }
    bytes
}

/// Waits (at most 5 s) for the one record.
async fn record(sink: &MemorySink) -> AuditRecord {
    let deadline = Instant::now() + Duration::from_secs(5);
    while sink.is_empty() {
        assert!(Instant::now() < deadline, "no record within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give a stray second record the chance to show.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(sink.len(), 1, "one record per request");
    sink.last().unwrap()
}

fn has(r: &AuditRecord, name: &str) -> bool {
    r.flags.iter().any(|f| f == name)
}

#[tokio::test]
async fn usage_after_the_last_token_is_read_on_and_billed() {
    let drain = DrainOnCancelLayer::new();
    let (svc, sink, slot) = stack(Some(drain.clone()), StatusCode::OK, "text/event-stream");
    let res = svc.oneshot(chat_request(true)).await.unwrap();
    let mut body = res.into_body();
    send(&slot, TOKEN).await;
    send(&slot, LAST).await;
    let delivered = read_frames(&mut body, 2).await;
    // The client leaves with the last token; the usage comes after.
    drop(body);
    assert!(sink.is_empty(), "the record waits for the usage");
    assert_eq!(drain.in_flight(), 1);
    send(&slot, USAGE).await;
    send(&slot, DONE).await;
    let r = record(&sink).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while drain.in_flight() > 0 {
        assert!(Instant::now() < deadline, "the drain never ended");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(r.outcome, Outcome::Cancelled);
    assert_eq!(r.prompt_tokens, Some(1000));
    assert_eq!(r.completion_tokens, Some(100));
    assert!(r.cost_usd.is_some_and(|c| c > 0.0), "{:?}", r.cost_usd);
    assert!(has(&r, flag::USAGE_AFTER_CANCEL), "{:?}", r.flags);
    assert!(!has(&r, flag::USAGE_MISSING), "{:?}", r.flags);
    // Only what the client received.
    assert_eq!(r.response_bytes, delivered as u64);
}

#[tokio::test]
async fn without_the_drain_the_usage_is_missing() {
    let (svc, sink, slot) = stack(None, StatusCode::OK, "text/event-stream");
    let res = svc.oneshot(chat_request(true)).await.unwrap();
    let mut body = res.into_body();
    send(&slot, TOKEN).await;
    read_frames(&mut body, 1).await;
    drop(body);
    // Emitted at once, with no usage.
    assert_eq!(sink.len(), 1);
    let r = sink.last().unwrap();
    assert_eq!(r.outcome, Outcome::Cancelled);
    assert_eq!(r.prompt_tokens, None);
    assert!(has(&r, flag::USAGE_MISSING), "{:?}", r.flags);
    assert!(!has(&r, flag::USAGE_AFTER_CANCEL), "{:?}", r.flags);
}

#[tokio::test]
async fn a_usage_that_does_not_come_in_time_is_missing() {
    let drain = DrainOnCancelLayer::new().drain_timeout(Duration::from_millis(200));
    let (svc, sink, slot) = stack(Some(drain), StatusCode::OK, "text/event-stream");
    let res = svc.oneshot(chat_request(true)).await.unwrap();
    let mut body = res.into_body();
    send(&slot, TOKEN).await;
    read_frames(&mut body, 1).await;
    let left = Instant::now();
    drop(body);
    // The upstream goes on generating, slowly; its usage would come too late.
    let r = record(&sink).await;
    let waited = left.elapsed();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert_eq!(r.outcome, Outcome::Cancelled);
    assert_eq!(r.prompt_tokens, None);
    assert!(has(&r, flag::USAGE_MISSING), "{:?}", r.flags);
    // The sender is still held: the drain gave up by itself.
    assert!(slot.lock().unwrap().is_some());
}

#[tokio::test]
async fn a_drain_stops_at_its_byte_bound() {
    let drain = DrainOnCancelLayer::new().max_drain_bytes(1024);
    let (svc, sink, slot) = stack(Some(drain), StatusCode::OK, "text/event-stream");
    let res = svc.oneshot(chat_request(true)).await.unwrap();
    let mut body = res.into_body();
    send(&slot, TOKEN).await;
    read_frames(&mut body, 1).await;
    drop(body);
    // 64 more tokens (> 1 KiB), then the usage: the drain gives up before it.
    let mut sender = slot.lock().unwrap().take().unwrap();
    for part in std::iter::repeat_n(TOKEN, 64).chain([USAGE, DONE]) {
        if sender
            .send_data(Bytes::from_static(part.as_bytes()))
            .await
            .is_err()
        {
            break; // The drain dropped the body.
        }
    }
    drop(sender);
    let r = record(&sink).await;
    assert_eq!(r.prompt_tokens, None);
    assert!(has(&r, flag::USAGE_MISSING), "{:?}", r.flags);
    assert!(!has(&r, flag::USAGE_AFTER_CANCEL), "{:?}", r.flags);
}

#[tokio::test]
async fn a_json_answer_cut_short_is_read_on_for_its_usage() {
    let (svc, sink, slot) = stack(
        Some(DrainOnCancelLayer::new()),
        StatusCode::OK,
        "application/json",
    );
    let res = svc.oneshot(chat_request(false)).await.unwrap();
    let mut body = res.into_body();
    send(&slot, r#"{"id":"chatcmpl-1","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"}}],"#).await;
    let delivered = read_frames(&mut body, 1).await;
    drop(body);
    send(
        &slot,
        r#""usage":{"prompt_tokens":1000,"completion_tokens":100,"total_tokens":1100}}"#,
    )
    .await;
    // The upstream keeps the connection open: the drain stops once it has the usage.
    let r = record(&sink).await;
    assert_eq!(r.outcome, Outcome::Cancelled);
    assert_eq!(r.total_tokens, Some(1100));
    assert!(has(&r, flag::USAGE_AFTER_CANCEL), "{:?}", r.flags);
    assert_eq!(r.response_bytes, delivered as u64);
}

#[tokio::test]
async fn an_error_response_is_not_drained() {
    let (svc, sink, slot) = stack(
        Some(DrainOnCancelLayer::new()),
        StatusCode::INTERNAL_SERVER_ERROR,
        "application/json",
    );
    let res = svc.oneshot(chat_request(false)).await.unwrap();
    let mut body = res.into_body();
    send(&slot, r#"{"error":{"message":"#).await;
    read_frames(&mut body, 1).await;
    drop(body);
    // Dropped at once, as without the layer: the record is there now.
    assert_eq!(sink.len(), 1);
    assert_eq!(sink.last().unwrap().outcome, Outcome::Cancelled);
}

#[tokio::test]
async fn a_stream_read_to_its_end_is_recorded_as_usual() {
    let (svc, sink, slot) = stack(
        Some(DrainOnCancelLayer::new()),
        StatusCode::OK,
        "text/event-stream",
    );
    let res = svc.oneshot(chat_request(true)).await.unwrap();
    let mut body = res.into_body();
    for part in [TOKEN, LAST, USAGE, DONE] {
        send(&slot, part).await;
    }
    slot.lock().unwrap().take();
    let mut bytes = 0;
    while let Some(frame) = body.frame().await {
        bytes += frame.unwrap().into_data().map_or(0, |d| d.len());
    }
    drop(body);
    assert_eq!(sink.len(), 1);
    let r = sink.last().unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.total_tokens, Some(1100));
    assert!(!has(&r, flag::USAGE_AFTER_CANCEL), "{:?}", r.flags);
    assert_eq!(r.response_bytes, bytes as u64);
}
