//! Records you can bill from: bounded client-controlled fields, a JSONL queue bounded in
//! bytes, and usage that is refused (never priced) when it cannot be right.

mod common;

use common::GatedWriter;
use common::SharedWriter;

use std::convert::Infallible;
use std::io;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::{
    flag, AuditLayer, AuditRecord, JsonlSink, LogSink, MemorySink, Outcome, MAX_FIELD_BYTES,
    MAX_ID_BYTES, MAX_PATH_BYTES,
};
use tower_llm_policy::PolicyBody;

/// One request through an audit layer with no key check (it reads the body itself), answered
/// by `answer` with `content_type`. The record.
async fn record_of(
    path: &str,
    body: String,
    content_type: &'static str,
    answer: &'static str,
) -> AuditRecord {
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()).read_body(true))
        .service(service_fn(move |req: Request<PolicyBody>| async move {
            req.into_body().collect().await.unwrap();
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", content_type)
                    .body(answer.to_owned())
                    .unwrap(),
            )
        }));
    let res = svc
        .oneshot(Request::post(path).body(body).unwrap())
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
    assert_eq!(sink.len(), 1, "one record per request");
    sink.last().unwrap()
}

const OK_USAGE: &str =
    r#"{"choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":100,"total_tokens":1100}}"#;

fn chat(model: &str, user: &str) -> String {
    serde_json::json!({
        "model": model,
        "user": user,
        "messages": [{"role": "user", "content": "hi"}],
    })
    .to_string()
}

// ---- 1. bounded fields ----------------------------------------------------------------------

#[tokio::test]
async fn a_huge_model_and_user_are_cut_and_flagged() {
    let mib = 1024 * 1024;
    let r = record_of(
        "/v1/chat/completions",
        chat(&"m".repeat(mib), &"u".repeat(mib)),
        "application/json",
        OK_USAGE,
    )
    .await;
    assert_eq!(
        r.model.as_deref(),
        Some("m".repeat(MAX_FIELD_BYTES).as_str())
    );
    assert_eq!(
        r.canonical_model.as_deref(),
        Some("m".repeat(MAX_FIELD_BYTES).as_str())
    );
    assert_eq!(
        r.user.as_deref(),
        Some("u".repeat(MAX_FIELD_BYTES).as_str())
    );
    assert!(
        r.flags.iter().any(|f| f == flag::FIELD_TRUNCATED),
        "{:?}",
        r.flags
    );
    // A cut model name is never priced.
    assert_eq!(r.cost_usd, None);
    let line = serde_json::to_string(&r).unwrap();
    assert!(line.len() < 4096, "record is {} bytes", line.len());
}

#[tokio::test]
async fn a_huge_path_is_cut_and_flagged() {
    let path = format!("/v1/{}", "p".repeat(60 * 1024));
    let r = record_of(&path, chat("gpt-4o-mini", "ana"), "application/json", "{}").await;
    assert_eq!(r.path.len(), MAX_PATH_BYTES);
    assert!(path.starts_with(&r.path));
    assert!(
        r.flags.iter().any(|f| f == flag::FIELD_TRUNCATED),
        "{:?}",
        r.flags
    );
}

#[tokio::test]
async fn fields_are_cut_on_a_character_boundary() {
    // 'é' is two bytes: 256 bytes would split the 128th; the record keeps 127 whole.
    let model = format!("x{}", "é".repeat(400));
    let r = record_of(
        "/v1/chat/completions",
        chat(&model, "ana"),
        "application/json",
        OK_USAGE,
    )
    .await;
    let kept = r.model.unwrap();
    assert!(kept.len() <= MAX_FIELD_BYTES && kept.len() > MAX_FIELD_BYTES - 4);
    assert!(model.starts_with(&kept));
}

#[tokio::test]
async fn ordinary_fields_are_kept_whole_and_unflagged() {
    let r = record_of(
        "/v1/chat/completions",
        chat("gpt-4o-mini", "ana"),
        "application/json",
        OK_USAGE,
    )
    .await;
    assert_eq!(r.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(r.user.as_deref(), Some("ana"));
    assert_eq!(r.path, "/v1/chat/completions");
    assert!(r.flags.is_empty(), "{:?}", r.flags);
    assert!((r.cost_usd.unwrap() - 0.00021).abs() < 1e-12);
}

#[tokio::test]
async fn jsonl_queue_is_bounded_in_bytes() {
    let record = record_of(
        "/v1/chat/completions",
        chat("gpt-4o-mini", "ana"),
        "application/json",
        OK_USAGE,
    )
    .await;
    let line = serde_json::to_vec(&record).unwrap().len() as u64 + 1;

    // A line longer than the whole budget is never queued.
    let tiny = JsonlSink::builder()
        .queue_bytes(line as usize - 1)
        .writer(io::sink())
        .unwrap();
    tiny.record(&record);
    tiny.flush().unwrap();
    assert_eq!((tiny.written(), tiny.dropped()), (0, 1));

    // Room for one and a half lines, plenty of room in lines: the writer takes the first and
    // blocks, the second waits in the queue, the third would go over the bytes and is dropped.
    let (entered_tx, entered_rx) = mpsc::channel();
    let (gate_tx, gate_rx) = mpsc::channel();
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = JsonlSink::builder()
        .queue_capacity(1000)
        .queue_bytes((line + line / 2) as usize)
        .buffer_size(0)
        .writer(GatedWriter {
            entered: entered_tx,
            gate: Arc::new(Mutex::new(gate_rx)),
            out: out.clone(),
        })
        .unwrap();
    sink.record(&record);
    entered_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    sink.record(&record);
    sink.record(&record);
    assert_eq!(sink.dropped(), 1);
    drop(gate_tx);
    sink.flush().unwrap();
    assert_eq!(sink.written(), 2);
    // Written lines give their bytes back: more fit now.
    sink.record(&record);
    sink.flush().unwrap();
    assert_eq!((sink.written(), sink.dropped()), (3, 1));
    let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    assert_eq!(text.lines().count(), 3);
}

// ---- 2. invalid usage -----------------------------------------------------------------------

async fn with_usage(path: &str, usage: &'static str) -> AuditRecord {
    let body = match path {
        "/v1/embeddings" => r#"{"model":"text-embedding-3-small","input":"hi"}"#.to_owned(),
        _ => chat("gpt-4o-mini", "ana"),
    };
    record_of(path, body, "application/json", usage).await
}

fn invalid(r: &AuditRecord) -> bool {
    r.cost_usd.is_none()
        && r.flags.iter().any(|f| f == flag::USAGE_INVALID)
        && !r.flags.iter().any(|f| f == flag::UNKNOWN_PRICE)
        && r.outcome == Outcome::Completed
}

#[tokio::test]
async fn negative_counts_are_invalid_not_zero() {
    let r = with_usage(
        "/v1/chat/completions",
        r#"{"usage":{"prompt_tokens":-1000000,"completion_tokens":10,"total_tokens":10}}"#,
    )
    .await;
    assert!(invalid(&r), "{r:?}");
    assert_eq!(r.prompt_tokens, None);
    assert_eq!(r.completion_tokens, Some(10));
}

#[tokio::test]
async fn total_alone_is_invalid() {
    let r = with_usage(
        "/v1/chat/completions",
        r#"{"usage":{"total_tokens":500000}}"#,
    )
    .await;
    assert!(invalid(&r), "{r:?}");
    assert_eq!((r.prompt_tokens, r.completion_tokens), (None, None));
    assert_eq!(r.total_tokens, Some(500000));
}

#[tokio::test]
async fn a_missing_completion_count_is_invalid_except_for_embeddings() {
    let r = with_usage(
        "/v1/chat/completions",
        r#"{"usage":{"prompt_tokens":10,"total_tokens":10}}"#,
    )
    .await;
    assert!(invalid(&r), "{r:?}");
    let r = with_usage(
        "/v1/embeddings",
        r#"{"usage":{"prompt_tokens":10,"total_tokens":10}}"#,
    )
    .await;
    assert!(!invalid(&r), "{r:?}");
    assert_eq!(
        (r.prompt_tokens, r.completion_tokens, r.total_tokens),
        (Some(10), Some(0), Some(10))
    );
    assert!(r.cost_usd.is_some());
}

#[tokio::test]
async fn inconsistent_counts_are_invalid() {
    for usage in [
        r#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":16}}"#,
        r#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":11}}}"#,
        r#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"completion_tokens_details":{"reasoning_tokens":6}}}"#,
        r#"{"usage":{"input_tokens":10,"output_tokens":5,"total_tokens":14}}"#,
    ] {
        let r = with_usage("/v1/chat/completions", usage).await;
        assert!(invalid(&r), "{usage}: {r:?}");
    }
}

#[tokio::test]
async fn huge_and_fractional_counts_are_refused_not_saturated() {
    for usage in [
        r#"{"usage":{"prompt_tokens":1e30,"completion_tokens":5,"total_tokens":15}}"#,
        r#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":5}}"#,
        r#"{"usage":{"prompt_tokens":10.5,"completion_tokens":5,"total_tokens":15.5}}"#,
        r#"{"usage":{"prompt_tokens":"10","completion_tokens":5,"total_tokens":15}}"#,
    ] {
        let r = with_usage("/v1/chat/completions", usage).await;
        assert!(invalid(&r), "{usage}: {r:?}");
        assert_eq!(r.prompt_tokens, None, "{usage}");
    }
}

#[tokio::test]
async fn valid_usage_is_recorded_as_before() {
    let r = with_usage(
        "/v1/chat/completions",
        r#"{"usage":{"prompt_tokens":1000,"completion_tokens":100,"prompt_tokens_details":{"cached_tokens":1000},"completion_tokens_details":{"reasoning_tokens":100}}}"#,
    )
    .await;
    assert!(!r.flags.iter().any(|f| f == flag::USAGE_INVALID), "{r:?}");
    assert_eq!(
        (r.prompt_tokens, r.completion_tokens, r.total_tokens),
        (Some(1000), Some(100), Some(1100))
    );
    assert_eq!(
        (r.cached_tokens, r.reasoning_tokens),
        (Some(1000), Some(100))
    );
    assert!(r.cost_usd.is_some());
    // An integral float, as some compatible servers send, is still a count.
    let r = with_usage(
        "/v1/chat/completions",
        r#"{"usage":{"prompt_tokens":12.0,"completion_tokens":3,"total_tokens":15}}"#,
    )
    .await;
    assert_eq!(r.prompt_tokens, Some(12));
    assert!(r.cost_usd.is_some());
}

// ---- 3. request ids -------------------------------------------------------------------------

/// One request with `x-request-id: client_id` through `layer`, answered with the upstream's
/// `x-request-id: upstream_id`. The response's headers and the record.
async fn ids(
    layer: AuditLayer,
    sink: &MemorySink,
    client_id: Option<&str>,
    upstream_id: Option<&'static str>,
) -> (http::HeaderMap, AuditRecord) {
    let svc = ServiceBuilder::new()
        .layer(layer.read_body(true))
        .service(service_fn(move |req: Request<PolicyBody>| async move {
            req.into_body().collect().await.unwrap();
            let mut res = Response::builder().header("content-type", "application/json");
            if let Some(id) = upstream_id {
                res = res.header("x-request-id", id);
            }
            Ok::<_, Infallible>(res.body(OK_USAGE.to_owned()).unwrap())
        }));
    let mut req = Request::post("/v1/chat/completions");
    if let Some(id) = client_id {
        req = req.header("x-request-id", id);
    }
    let res = svc
        .oneshot(req.body(chat("gpt-4o-mini", "ana")).unwrap())
        .await
        .unwrap();
    let headers = res.headers().clone();
    res.into_body().collect().await.unwrap();
    (headers, sink.last().unwrap())
}

#[tokio::test]
async fn a_client_request_id_is_never_the_record_id_by_default() {
    let sink = MemorySink::new();
    let (headers, r) = ids(
        AuditLayer::new(sink.clone()),
        &sink,
        Some("victim-id"),
        None,
    )
    .await;
    assert!(r.request_id.starts_with("req_"), "{}", r.request_id);
    assert_eq!(headers["x-request-id"], r.request_id.as_str());
    assert_eq!(r.client_request_id.as_deref(), Some("victim-id"));
    // Two requests with the same client id get two record ids.
    let (_, again) = ids(
        AuditLayer::new(sink.clone()),
        &sink,
        Some("victim-id"),
        None,
    )
    .await;
    assert_ne!(again.request_id, r.request_id);
}

#[tokio::test]
async fn the_client_request_id_is_sanitised_and_bounded() {
    let sink = MemorySink::new();
    let long = format!("a b\"c{}", "x".repeat(10_000));
    let (_, r) = ids(AuditLayer::new(sink.clone()), &sink, Some(&long), None).await;
    let kept = r.client_request_id.unwrap();
    assert_eq!(kept.len(), MAX_ID_BYTES);
    assert!(kept.starts_with("a_b_c"), "{kept}");
    assert!(
        r.flags.iter().any(|f| f == flag::FIELD_TRUNCATED),
        "{:?}",
        r.flags
    );
}

#[tokio::test]
async fn the_upstream_request_id_moves_aside_for_ours() {
    let sink = MemorySink::new();
    let (headers, r) = ids(
        AuditLayer::new(sink.clone()),
        &sink,
        None,
        Some("upstream-req-7"),
    )
    .await;
    assert_eq!(headers["x-request-id"], r.request_id.as_str());
    assert!(r.request_id.starts_with("req_"));
    assert_eq!(headers["x-upstream-request-id"], "upstream-req-7");
    assert_eq!(r.upstream_request_id.as_deref(), Some("upstream-req-7"));
    assert_eq!(r.client_request_id, None);
    // Without one, there is no upstream id.
    let (headers, r) = ids(AuditLayer::new(sink.clone()), &sink, None, None).await;
    assert!(!headers.contains_key("x-upstream-request-id"));
    assert_eq!(r.upstream_request_id, None);
}

// ---- 3. error bodies, repeated usage, usage after [DONE] ------------------------------------

fn stream_chat() -> String {
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
        .to_owned()
}

const SSE: &str = "text/event-stream";

#[tokio::test]
async fn a_200_with_an_error_body_is_an_upstream_error_without_cost() {
    let r = record_of(
        "/v1/chat/completions",
        chat("gpt-4o-mini", "ana"),
        "application/json",
        r#"{"error":{"message":"The server had an error","type":"server_error"},"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#,
    )
    .await;
    assert_eq!(r.status, Some(200));
    assert_eq!(r.outcome, Outcome::UpstreamError);
    assert!(
        r.flags.iter().any(|f| f == flag::UPSTREAM_ERROR_BODY),
        "{:?}",
        r.flags
    );
    assert_eq!(r.cost_usd, None);

    // `"error": null` is no error.
    let r = record_of(
        "/v1/chat/completions",
        chat("gpt-4o-mini", "ana"),
        "application/json",
        r#"{"error":null,"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#,
    )
    .await;
    assert_eq!(r.outcome, Outcome::Completed);
    assert!(r.flags.is_empty(), "{:?}", r.flags);
    assert!(r.cost_usd.is_some());
}

#[tokio::test]
async fn an_error_event_in_a_stream_is_an_upstream_error_without_cost() {
    let r = record_of(
        "/v1/chat/completions",
        stream_chat(),
        SSE,
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n\
         data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n\
         data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\n\
         data: [DONE]\n\n",
    )
    .await;
    assert_eq!(r.outcome, Outcome::UpstreamError);
    assert!(
        r.flags.iter().any(|f| f == flag::UPSTREAM_ERROR_BODY),
        "{:?}",
        r.flags
    );
    assert_eq!(r.cost_usd, None);
    // The usage the stream reported is still shown.
    assert_eq!(r.total_tokens, Some(10));
}

#[tokio::test]
async fn repeated_usage_in_a_stream_keeps_the_last_and_is_flagged() {
    let r = record_of(
        "/v1/chat/completions",
        stream_chat(),
        SSE,
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\n\
         data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"}}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n\
         data: [DONE]\n\n",
    )
    .await;
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(
        (r.prompt_tokens, r.completion_tokens, r.total_tokens),
        (Some(9), Some(2), Some(11)),
        "the last report, not a sum"
    );
    assert!(
        r.flags.iter().any(|f| f == flag::USAGE_REPEATED),
        "{:?}",
        r.flags
    );
    assert!(r.cost_usd.is_some());

    // One report: no flag.
    let r = record_of(
        "/v1/chat/completions",
        stream_chat(),
        SSE,
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\ndata: [DONE]\n\n",
    )
    .await;
    assert!(r.flags.is_empty(), "{:?}", r.flags);
}

#[tokio::test]
async fn usage_after_done_is_ignored() {
    let r = record_of(
        "/v1/chat/completions",
        stream_chat(),
        SSE,
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n\
         data: [DONE]\n\n\
         data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\n",
    )
    .await;
    assert_eq!(r.total_tokens, None);
    assert_eq!(r.cost_usd, None);
    assert!(
        r.flags.iter().any(|f| f == flag::USAGE_MISSING),
        "{:?}",
        r.flags
    );
}

/// An upstream that compresses its stream although asked for `identity`: the body (whatever
/// its bytes) is relayed untouched, no usage is read from it nor cut out of it, and the record
/// says why its usage is missing.
#[tokio::test]
async fn an_encoded_stream_is_relayed_untouched_and_flagged() {
    // The bytes stand for a gzip body; they hold a usage chunk the stripper would cut out of a
    // plain stream.
    const BODY: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\ndata: [DONE]\n\n";
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()).read_body(true))
        .service(service_fn(|req: Request<PolicyBody>| async move {
            req.into_body().collect().await.unwrap();
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", SSE)
                    .header("content-encoding", "gzip")
                    .body(BODY.to_owned())
                    .unwrap(),
            )
        }));
    let res = svc
        .oneshot(
            Request::post("/v1/chat/completions")
                .body(stream_chat())
                .unwrap(),
        )
        .await
        .unwrap();
    let relayed = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&relayed[..], BODY.as_bytes(), "relayed byte for byte");
    let r = sink.last().unwrap();
    assert!(
        r.flags.iter().any(|f| f == flag::RESPONSE_ENCODED),
        "{:?}",
        r.flags
    );
    assert!(
        r.flags.iter().any(|f| f == flag::USAGE_MISSING),
        "{:?}",
        r.flags
    );
    assert_eq!(r.total_tokens, None);
    assert_eq!(r.cost_usd, None);

    // The same stream unencoded is read: no flag.
    let r = record_of("/v1/chat/completions", stream_chat(), SSE, BODY).await;
    assert_eq!(r.total_tokens, Some(10));
    assert!(!r.flags.iter().any(|f| f == flag::RESPONSE_ENCODED));
}

#[tokio::test]
async fn a_count_beyond_any_number_is_invalid_not_missing() {
    let r = record_of(
        "/v1/chat/completions",
        chat("gpt-4o-mini", "ana"),
        "application/json",
        r#"{"choices":[],"usage":{"prompt_tokens":1e400,"completion_tokens":1,"total_tokens":2}}"#,
    )
    .await;
    assert_eq!(r.cost_usd, None);
    assert_eq!(r.prompt_tokens, None);
    assert!(
        r.flags.iter().any(|f| f == flag::USAGE_INVALID),
        "{:?}",
        r.flags
    );
    assert!(
        !r.flags.iter().any(|f| f == flag::USAGE_MISSING),
        "{:?}",
        r.flags
    );
}

#[tokio::test]
async fn a_responses_stream_error_event_on_a_200_is_an_upstream_error() {
    let body = serde_json::json!({"model": "gpt-4o-mini", "input": "hi", "stream": true});
    let r = record_of(
        "/v1/responses",
        body.to_string(),
        "text/event-stream",
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n\
         event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"The server had an error\"}\n\n",
    )
    .await;
    assert_eq!(r.outcome, Outcome::UpstreamError);
    assert!(
        r.flags.iter().any(|f| f == flag::UPSTREAM_ERROR_BODY),
        "{:?}",
        r.flags
    );
    assert_eq!(r.cost_usd, None);
}

#[tokio::test]
async fn a_lone_record_after_an_idle_spell_is_written_without_a_flush() {
    let record = record_of(
        "/v1/chat/completions",
        chat("gpt-4o-mini", "ana"),
        "application/json",
        OK_USAGE,
    )
    .await;
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = JsonlSink::builder()
        .flush_interval(Duration::from_millis(5))
        .writer(SharedWriter(out.clone()))
        .unwrap();
    let lines = || out.lock().unwrap().iter().filter(|b| **b == b'\n').count();
    let wait_for = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lines() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "record {n} not written within 5 s (no flush was asked for)"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    sink.record(&record);
    wait_for(1);
    // Long enough for the writer to park (ten quiet intervals), then one more record.
    std::thread::sleep(Duration::from_millis(300));
    sink.record(&record);
    wait_for(2);
    assert_eq!(sink.written(), 2);
}
