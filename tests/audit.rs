//! The audit layer through the public API: one record per request, usage from JSON and SSE
//! bodies, usage injection and stripping, rejections, cancellation, upstream errors, cost,
//! bounded memory, sinks, and no secrets.

mod common;

use common::GatedWriter;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::pricing::{ModelPrice, PricingTable};
use tower_llm_policy::audit::{
    flag, AuditHandle, AuditLayer, AuditRecord, FanOut, FnSink, JsonlSink, LogSink, MemorySink,
    Outcome, RequestId,
};
use tower_llm_policy::key_auth::{ClientIp, KeyAuthLayer};
use tower_llm_policy::keys::{ApiKey, MemoryKeyStore};
use tower_llm_policy::model_allow_list::ModelAllowListLayer;
use tower_llm_policy::PolicyBody;

// ---- fixtures -------------------------------------------------------------------------------

const SECRET: &str = "sk-virt-Q7wZp3LmN8vR2xTk5Yb9";

const CHAT_JSON: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":2000,"completion_tokens":300,"total_tokens":2300,"prompt_tokens_details":{"cached_tokens":1024},"completion_tokens_details":{"reasoning_tokens":100}}}"#;

const CONTENT: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
const FINISH: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
const USAGE: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29,\"prompt_tokens_details\":{\"cached_tokens\":3},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

fn chat_body(stream: bool, extra: &str) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","user":"alice","stream":{stream}{extra},"messages":[{{"role":"user","content":"Say hi. My key is {SECRET}"}}]}}"#
    )
}

fn store() -> Arc<MemoryKeyStore> {
    Arc::new(
        MemoryKeyStore::new().with_key(
            SECRET,
            ApiKey::new("team-a")
                .label("team", "search")
                .model_limits(["gpt-4o-mini"]),
        ),
    )
}

fn request(path: &str, body: impl Into<String>) -> Request<String> {
    Request::post(path)
        .header("authorization", format!("Bearer {SECRET}"))
        .header("content-type", "application/json")
        .extension(ClientIp(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))))
        .body(body.into())
        .unwrap()
}

/// A response body fed frame by frame: scripted frames, then (optionally) a channel.
struct TestBody {
    frames: VecDeque<Result<Bytes, io::Error>>,
    rx: Option<tokio::sync::mpsc::UnboundedReceiver<Result<Bytes, io::Error>>>,
}

impl TestBody {
    fn chunks<I: IntoIterator<Item = S>, S: Into<String>>(chunks: I) -> Self {
        TestBody {
            frames: chunks
                .into_iter()
                .map(|c| Ok(Bytes::from(c.into())))
                .collect(),
            rx: None,
        }
    }

    fn channel() -> (
        tokio::sync::mpsc::UnboundedSender<Result<Bytes, io::Error>>,
        Self,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            tx,
            TestBody {
                frames: VecDeque::new(),
                rx: Some(rx),
            },
        )
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(next) = self.frames.pop_front() {
            return Poll::Ready(Some(next.map(Frame::data)));
        }
        match &mut self.rx {
            Some(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
            None => Poll::Ready(None),
        }
    }
}

fn sse(body: TestBody) -> Response<TestBody> {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

fn json(body: &str) -> Response<TestBody> {
    Response::builder()
        .header("content-type", "application/json")
        .body(TestBody::chunks([body]))
        .unwrap()
}

/// What the upstream received.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<Bytes>>>);

impl Seen {
    fn last_json(&self) -> serde_json::Value {
        serde_json::from_slice(self.0.lock().unwrap().last().unwrap()).unwrap()
    }
}

/// The whole stack: audit, key auth, model allow-list, and an upstream answering `respond`.
fn stack<F>(
    layer: AuditLayer,
    respond: F,
) -> (
    impl Service<
            Request<String>,
            Response = Response<impl Body<Data = Bytes, Error = impl std::fmt::Debug>>,
            Error = io::Error,
        > + Clone,
    Seen,
)
where
    F: Fn() -> Response<TestBody> + Clone + Send + Sync + 'static,
{
    let seen = Seen::default();
    let seen2 = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(KeyAuthLayer::new(store()))
        .layer(ModelAllowListLayer::new())
        .service(service_fn(move |req: Request<PolicyBody>| {
            let respond = respond.clone();
            let seen = seen2.clone();
            async move {
                assert!(req.extensions().get::<RequestId>().is_some());
                let body = req.into_body().collect().await.unwrap().to_bytes();
                seen.0.lock().unwrap().push(body);
                Ok::<_, io::Error>(respond())
            }
        }));
    (svc, seen)
}

async fn body_text<B>(body: B) -> String
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let bytes = body.collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

// ---- allowed requests -----------------------------------------------------------------------

#[tokio::test]
async fn allowed_json_response_is_recorded_with_usage_and_cost() {
    let sink = MemorySink::new();
    let (svc, _) = stack(AuditLayer::new(sink.clone()), || json(CHAT_JSON));
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(false, "")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(sink.is_empty(), "the record waits for the end of the body");
    assert_eq!(body_text(res.into_body()).await, CHAT_JSON);

    let records = sink.records();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.request_id, id);
    assert_eq!(r.key.as_deref(), Some("team-a"));
    assert_eq!(r.key_metadata["team"], "search");
    assert_eq!(r.user.as_deref(), Some("alice"));
    assert_eq!(r.client_ip, Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))));
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.endpoint, "chat_completions");
    assert_eq!(r.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(r.canonical_model.as_deref(), Some("gpt-4o-mini"));
    assert!(!r.stream);
    assert!(!r.usage_injected);
    assert_eq!(r.status, Some(200));
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.blocked_by, None);
    assert_eq!(r.code, None);
    assert!(r.flags.is_empty(), "{:?}", r.flags);
    assert_eq!(r.prompt_tokens, Some(2000));
    assert_eq!(r.completion_tokens, Some(300));
    assert_eq!(r.total_tokens, Some(2300));
    assert_eq!(r.cached_tokens, Some(1024));
    assert_eq!(r.reasoning_tokens, Some(100));
    assert_eq!(r.usage_estimate, None);
    // gpt-4o-mini: 976 uncached at $0.15, 1024 cached at $0.075, 300 out at $0.60 per 1M.
    let expected = (976.0 * 0.15 + 1024.0 * 0.075 + 300.0 * 0.60) / 1e6;
    assert!(close(r.cost_usd.unwrap(), expected), "{:?}", r.cost_usd);
    assert!(r.latency_ms >= 0.0);
    assert!(r.ttft_ms.unwrap() <= r.latency_ms);
    assert_eq!(r.response_bytes, CHAT_JSON.len() as u64);
    assert_eq!(r.content, None);
}

#[tokio::test]
async fn record_serializes_with_the_documented_field_names() {
    let sink = MemorySink::new();
    let (svc, _) = stack(AuditLayer::new(sink.clone()), || json(CHAT_JSON));
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(false, "")))
        .await
        .unwrap();
    body_text(res.into_body()).await;
    let value = serde_json::to_value(sink.last().unwrap()).unwrap();
    for field in [
        "request_id",
        "timestamp",
        "key",
        "key_metadata",
        "user",
        "client_ip",
        "endpoint",
        "model",
        "canonical_model",
        "status",
        "blocked_by",
        "code",
        "flags",
        "stream",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cost_usd",
        "latency_ms",
        "ttft_ms",
        "outcome",
    ] {
        assert!(value.get(field).is_some(), "missing {field}: {value}");
    }
    assert_eq!(value["outcome"], "completed");
    assert_eq!(value["blocked_by"], serde_json::Value::Null);
    assert_eq!(value["client_ip"], "10.1.2.3");
    assert!(value["timestamp"].as_str().unwrap().ends_with('Z'));
    // It reads back.
    let back: AuditRecord = serde_json::from_value(value).unwrap();
    assert_eq!(back, sink.last().unwrap());
}

#[tokio::test]
async fn incoming_request_id_is_honoured_when_trusted() {
    let sink = MemorySink::new();
    let (svc, _) = stack(AuditLayer::new(sink.clone()).trust_request_id(true), || {
        json(CHAT_JSON)
    });
    let mut req = request("/v1/chat/completions", chat_body(false, ""));
    req.headers_mut()
        .insert("x-request-id", "trace-42".parse().unwrap());
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.headers()["x-request-id"], "trace-42");
    body_text(res.into_body()).await;
    assert_eq!(sink.last().unwrap().request_id, "trace-42");

    // An implausible one is replaced.
    let mut req = request("/v1/chat/completions", chat_body(false, ""));
    req.headers_mut()
        .insert("x-request-id", "has spaces".parse().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    body_text(res.into_body()).await;
    assert!(sink.last().unwrap().request_id.starts_with("req_"));
}

// ---- streams --------------------------------------------------------------------------------

#[tokio::test]
async fn stream_without_usage_request_gets_usage_injected_and_stripped() {
    let sink = MemorySink::new();
    let (svc, seen) = stack(AuditLayer::new(sink.clone()), || {
        sse(TestBody::chunks([CONTENT, FINISH, USAGE, DONE]))
    });
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(true, "")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // The client sees the stream it asked for: no usage chunk.
    assert_eq!(
        body_text(res.into_body()).await,
        [CONTENT, FINISH, DONE].concat()
    );
    // The upstream was asked for usage.
    let upstream = seen.last_json();
    assert_eq!(upstream["stream_options"]["include_usage"], true);
    assert_eq!(upstream["model"], "gpt-4o-mini");
    assert_eq!(upstream["messages"][0]["role"], "user");

    let r = sink.last().unwrap();
    assert_eq!(sink.len(), 1);
    assert!(r.stream);
    assert!(r.usage_injected);
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.prompt_tokens, Some(19));
    assert_eq!(r.completion_tokens, Some(10));
    assert_eq!(r.total_tokens, Some(29));
    assert_eq!(r.cached_tokens, Some(3));
    assert_eq!(r.reasoning_tokens, Some(2));
    assert!(r.cost_usd.is_some());
    assert_eq!(
        r.response_bytes,
        [CONTENT, FINISH, DONE].concat().len() as u64
    );
}

#[tokio::test]
async fn stream_that_asked_for_usage_is_untouched() {
    let sink = MemorySink::new();
    let (svc, seen) = stack(AuditLayer::new(sink.clone()), || {
        sse(TestBody::chunks([CONTENT, FINISH, USAGE, DONE]))
    });
    let sent = chat_body(true, r#","stream_options":{"include_usage":true}"#);
    let res = svc
        .oneshot(request("/v1/chat/completions", sent.clone()))
        .await
        .unwrap();
    assert_eq!(
        body_text(res.into_body()).await,
        [CONTENT, FINISH, USAGE, DONE].concat()
    );
    assert_eq!(seen.0.lock().unwrap().last().unwrap(), sent.as_bytes());
    let r = sink.last().unwrap();
    assert!(!r.usage_injected);
    assert_eq!(r.total_tokens, Some(29));
}

#[tokio::test]
async fn stream_options_without_include_usage_is_completed() {
    let sink = MemorySink::new();
    let (svc, seen) = stack(AuditLayer::new(sink.clone()), || {
        sse(TestBody::chunks([CONTENT, USAGE, DONE]))
    });
    let sent = chat_body(true, r#","stream_options":{"include_usage":false}"#);
    let res = svc
        .oneshot(request("/v1/chat/completions", sent))
        .await
        .unwrap();
    assert_eq!(body_text(res.into_body()).await, [CONTENT, DONE].concat());
    assert_eq!(seen.last_json()["stream_options"]["include_usage"], true);
    assert_eq!(sink.last().unwrap().total_tokens, Some(29));
}

#[tokio::test]
async fn stream_without_usage_is_flagged_with_a_labelled_estimate() {
    let sink = MemorySink::new();
    let layer = AuditLayer::new(sink.clone()).inject_usage(false);
    let (svc, seen) = stack(layer, || sse(TestBody::chunks([CONTENT, FINISH, DONE])));
    let sent = chat_body(true, "");
    let res = svc
        .oneshot(request("/v1/chat/completions", sent.clone()))
        .await
        .unwrap();
    assert_eq!(
        body_text(res.into_body()).await,
        [CONTENT, FINISH, DONE].concat()
    );
    assert_eq!(seen.0.lock().unwrap().last().unwrap(), sent.as_bytes());
    let r = sink.last().unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.flags, [flag::USAGE_MISSING]);
    assert_eq!(r.total_tokens, None);
    assert_eq!(r.cost_usd, None);
    let estimate = r.usage_estimate.unwrap();
    assert_eq!(estimate.method, "estimate");
    assert!(estimate.prompt_tokens > 0);
}

#[tokio::test]
async fn responses_api_stream_usage_from_response_completed() {
    let completed = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":50,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":20,\"output_tokens_details\":{\"reasoning_tokens\":8},\"total_tokens\":70}}}\n\n";
    let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n";
    let sink = MemorySink::new();
    let (svc, seen) = stack(AuditLayer::new(sink.clone()), move || {
        sse(TestBody::chunks([delta, completed]))
    });
    let sent = r#"{"model":"gpt-4o-mini","input":"hi","stream":true}"#;
    let res = svc.oneshot(request("/v1/responses", sent)).await.unwrap();
    assert_eq!(
        body_text(res.into_body()).await,
        [delta, completed].concat()
    );
    assert_eq!(seen.0.lock().unwrap().last().unwrap(), sent.as_bytes());
    let r = sink.last().unwrap();
    assert_eq!(r.endpoint, "responses");
    assert!(!r.usage_injected);
    assert_eq!(r.prompt_tokens, Some(50));
    assert_eq!(r.completion_tokens, Some(20));
    assert_eq!(r.reasoning_tokens, Some(8));
}

// ---- rejections -----------------------------------------------------------------------------

#[tokio::test]
async fn unknown_key_is_recorded_as_rejected_by_key_auth() {
    let sink = MemorySink::new();
    let (svc, seen) = stack(AuditLayer::new(sink.clone()), || json(CHAT_JSON));
    let mut req = request("/v1/chat/completions", chat_body(false, ""));
    req.headers_mut()
        .insert("authorization", "Bearer sk-unknown-123456".parse().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // Recorded as soon as the rejection is produced.
    let r = sink.last().unwrap();
    assert_eq!(r.outcome, Outcome::Rejected);
    assert_eq!(r.blocked_by.as_deref(), Some("key_auth"));
    assert_eq!(r.code.as_deref(), Some("invalid_api_key"));
    assert_eq!(r.flags, [flag::BLOCKED]);
    assert_eq!(r.status, Some(401));
    assert_eq!(r.key, None);
    // Nothing of the body is read before the key is admitted: the model is not known.
    assert_eq!(r.model, None);
    assert_eq!(r.endpoint, "chat_completions");
    assert_eq!(r.cost_usd, None);
    assert!(seen.0.lock().unwrap().is_empty());
    // The body is still the OpenAI error, and nothing more is recorded.
    assert!(body_text(res.into_body()).await.contains("invalid_api_key"));
    assert_eq!(sink.len(), 1);
}

#[tokio::test]
async fn model_rejection_names_the_layer_and_the_key() {
    let sink = MemorySink::new();
    let (svc, _) = stack(AuditLayer::new(sink.clone()), || json(CHAT_JSON));
    let body = r#"{"model":"gpt-4.1","messages":[]}"#;
    let res = svc
        .oneshot(request("/v1/chat/completions", body))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let r = sink.last().unwrap();
    assert_eq!(r.blocked_by.as_deref(), Some("model_allow_list"));
    assert_eq!(r.code.as_deref(), Some("model_not_allowed"));
    assert_eq!(r.key.as_deref(), Some("team-a"));
    assert_eq!(r.key_metadata["team"], "search");
    assert_eq!(r.model.as_deref(), Some("gpt-4.1"));
    assert!(r.flags.contains(&flag::BLOCKED.to_owned()));
}

#[tokio::test]
async fn unparsable_body_is_recorded_as_blocked_by_request_body() {
    let sink = MemorySink::new();
    let (svc, _) = stack(AuditLayer::new(sink.clone()), || json(CHAT_JSON));
    let res = svc
        .oneshot(request("/v1/chat/completions", "{not json"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let r = sink.last().unwrap();
    assert_eq!(r.outcome, Outcome::Rejected);
    assert_eq!(r.blocked_by.as_deref(), Some("request_body"));
    assert_eq!(r.code.as_deref(), Some("invalid_request_body"));
    assert_eq!(r.endpoint, "chat_completions");
    assert_eq!(r.model, None);
}

#[tokio::test]
async fn flags_from_audit_only_layers_are_recorded() {
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .service(service_fn(|req: Request<PolicyBody>| async move {
            // A word list in audit mode: it lets the request through and flags it; so does a
            // guard in dry-run mode (a repeated flag is kept once).
            let audit = req.extensions().get::<AuditHandle>().unwrap();
            audit.flag("word_list:secret_project");
            audit.flag("guard:dry_run");
            audit.flag("word_list:secret_project");
            // An inner service that reads the body: the record keeps a copy of it on the way.
            req.into_body().collect().await.unwrap();
            Ok::<_, Infallible>(json(CHAT_JSON))
        }));
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(false, "")))
        .await
        .unwrap();
    body_text(res.into_body()).await;
    let r = sink.last().unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.flags, ["word_list:secret_project", "guard:dry_run"]);
    assert_eq!(r.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(r.user.as_deref(), Some("alice"));
}

// ---- cancellation and errors ----------------------------------------------------------------

#[tokio::test]
async fn client_dropping_the_body_mid_stream_is_recorded_once_as_cancelled() {
    let sink = MemorySink::new();
    let (tx, body) = TestBody::channel();
    let body = Mutex::new(Some(body));
    let body = Arc::new(body);
    let (svc, _) = stack(AuditLayer::new(sink.clone()), move || {
        sse(body.lock().unwrap().take().unwrap())
    });
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(true, "")))
        .await
        .unwrap();
    let mut body = res.into_body();
    tx.send(Ok(Bytes::from(CONTENT))).unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), CONTENT);
    assert!(sink.is_empty());

    drop(body);
    let records = sink.records();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.outcome, Outcome::Cancelled);
    assert_eq!(r.status, Some(200));
    assert!(r.ttft_ms.is_some());
    assert!(r.flags.contains(&flag::USAGE_MISSING.to_owned()));
    // More data after the client left changes nothing.
    let _ = tx.send(Ok(Bytes::from(USAGE)));
    assert_eq!(sink.len(), 1);
}

#[tokio::test]
async fn client_leaving_before_the_response_is_recorded_as_cancelled() {
    let sink = MemorySink::new();
    let mut svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()).read_body(true))
        .service(service_fn(|_req: Request<PolicyBody>| async {
            std::future::pending::<Result<Response<String>, Infallible>>().await
        }));
    let fut = ServiceExt::<Request<String>>::ready(&mut svc)
        .await
        .unwrap()
        .call(request("/v1/chat/completions", chat_body(false, "")));
    let mut fut = Box::pin(fut);
    // Poll until the inner service is waiting, then give up on it.
    assert!(futures_poll_once(fut.as_mut()).await.is_none());
    assert!(sink.is_empty());
    drop(fut);
    let r = sink.last().unwrap();
    assert_eq!(sink.len(), 1);
    assert_eq!(r.outcome, Outcome::Cancelled);
    assert_eq!(r.status, None);
    assert_eq!(r.model.as_deref(), Some("gpt-4o-mini"));
}

async fn futures_poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match Pin::new(&mut fut).poll(cx) {
            Poll::Ready(out) => Some(out),
            Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test]
async fn upstream_error_mid_stream_is_recorded() {
    let sink = MemorySink::new();
    let (svc, _) = stack(AuditLayer::new(sink.clone()), || {
        let mut body = TestBody::chunks([CONTENT]);
        body.frames
            .push_back(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")));
        sse(body)
    });
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(true, "")))
        .await
        .unwrap();
    assert!(res.into_body().collect().await.is_err());
    let r = sink.last().unwrap();
    assert_eq!(sink.len(), 1);
    assert_eq!(r.outcome, Outcome::UpstreamError);
    assert_eq!(r.status, Some(200));
    // The stream started: the upstream billed its prompt at least, and its usage never came.
    assert!(r.flags.contains(&flag::USAGE_MISSING.to_owned()));
    assert!(r.usage_estimate.is_some());
}

#[tokio::test]
async fn upstream_error_status_is_recorded() {
    let sink = MemorySink::new();
    let (svc, _) = stack(AuditLayer::new(sink.clone()), || {
        let mut res = json(
            r#"{"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}"#,
        );
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        res
    });
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(false, "")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    body_text(res.into_body()).await;
    let r = sink.last().unwrap();
    assert_eq!(r.outcome, Outcome::UpstreamError);
    assert_eq!(r.status, Some(503));
    assert_eq!(r.blocked_by, None);
    assert!(r.flags.is_empty(), "{:?}", r.flags);
}

#[tokio::test]
async fn inner_service_error_is_recorded() {
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .service(service_fn(|_req: Request<PolicyBody>| async {
            Err::<Response<String>, _>(io::Error::new(io::ErrorKind::TimedOut, "upstream timeout"))
        }));
    let err = svc
        .oneshot(request("/v1/chat/completions", chat_body(false, "")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    let r = sink.last().unwrap();
    assert_eq!(sink.len(), 1);
    assert_eq!(r.outcome, Outcome::UpstreamError);
    assert_eq!(r.status, None);
}

#[tokio::test]
async fn empty_body_response_is_completed_without_polling() {
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .service(service_fn(|_req: Request<PolicyBody>| async {
            let mut res = Response::new(String::new());
            *res.status_mut() = StatusCode::NO_CONTENT;
            Ok::<_, Infallible>(res)
        }));
    let res = svc
        .oneshot(
            Request::delete("/v1/files/file-1")
                .body(String::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(res.body().is_end_stream());
    drop(res);
    let r = sink.last().unwrap();
    assert_eq!(sink.len(), 1);
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.endpoint, "files");
    assert_eq!(r.flags, Vec::<String>::new());
}

// ---- memory ---------------------------------------------------------------------------------

/// A long SSE stream made on the fly: `n` content chunks, then usage and `[DONE]`.
struct LongStream {
    left: usize,
    tail: VecDeque<Bytes>,
    chunk: Bytes,
}

impl Body for LongStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left > 0 {
            self.left -= 1;
            return Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))));
        }
        Poll::Ready(self.tail.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test]
async fn huge_stream_keeps_memory_bounded() {
    let sink = MemorySink::new();
    // A 4 KiB frame of content events (one of them split across frames).
    let mut chunk = CONTENT.repeat(4096 / CONTENT.len());
    chunk.push_str(&CONTENT[..40]);
    let frames = 2 * 1024; // 8 MiB
    let mut tail = VecDeque::new();
    tail.push_back(Bytes::from(&CONTENT[40..]));
    tail.push_back(Bytes::from(USAGE));
    tail.push_back(Bytes::from(DONE));
    let upstream = Arc::new(Mutex::new(Some(LongStream {
        left: frames,
        tail,
        chunk: Bytes::from(chunk.clone()),
    })));
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()).read_body(true))
        .service(service_fn(move |_req: Request<PolicyBody>| {
            let body = upstream.lock().unwrap().take().unwrap();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(body)
                        .unwrap(),
                )
            }
        }));
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(true, "")))
        .await
        .unwrap();
    let mut body = res.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().into_data().unwrap().len() as u64;
    }
    let expected = (frames * chunk.len() + CONTENT.len() - 40 + DONE.len()) as u64;
    assert_eq!(received, expected, "everything but the usage chunk arrives");
    let hw = body.buffered_high_water();
    assert!(hw <= 32 * 1024, "the wrapper held {hw} bytes");
    let r = sink.last().unwrap();
    assert_eq!(r.total_tokens, Some(29));
    assert_eq!(r.response_bytes, expected);
}

// ---- cost -----------------------------------------------------------------------------------

#[tokio::test]
async fn cost_counts_cached_tokens_at_their_price_and_reasoning_tokens_once() {
    let sink = MemorySink::new();
    let table = PricingTable::empty().with(
        "gpt-4o-mini",
        ModelPrice::new(2.0, 8.0).with_cached_input(0.5),
    );
    let (svc, _) = stack(AuditLayer::new(sink.clone()).pricing(table), || {
        json(CHAT_JSON)
    });
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(false, "")))
        .await
        .unwrap();
    body_text(res.into_body()).await;
    let r = sink.last().unwrap();
    // 2000 prompt of which 1024 cached; 300 completion of which 100 reasoning (inside the 300).
    let expected = (976.0 * 2.0 + 1024.0 * 0.5 + 300.0 * 8.0) / 1e6;
    assert!(
        close(r.cost_usd.unwrap(), expected),
        "{:?} vs {expected}",
        r.cost_usd
    );
    assert!(r.flags.is_empty());
}

#[tokio::test]
async fn unknown_model_has_no_cost_and_a_flag() {
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()).read_body(true))
        .service(service_fn(|_req: Request<PolicyBody>| async {
            Ok::<_, Infallible>(json(CHAT_JSON))
        }));
    let res = svc
        .oneshot(request(
            "/v1/chat/completions",
            r#"{"model":"acme/local-llama-3","messages":[]}"#,
        ))
        .await
        .unwrap();
    body_text(res.into_body()).await;
    let r = sink.last().unwrap();
    assert_eq!(r.canonical_model.as_deref(), Some("acme/local-llama-3"));
    assert_eq!(r.total_tokens, Some(2300));
    assert_eq!(r.cost_usd, None);
    assert_eq!(r.flags, [flag::UNKNOWN_PRICE]);
}

// ---- secrets and content --------------------------------------------------------------------

fn assert_no_secret(text: &str) {
    // No 6-character window of the key's random part appears anywhere.
    let random = &SECRET["sk-virt-".len()..];
    for i in 0..=random.len() - 6 {
        let window = &random[i..i + 6];
        assert!(!text.contains(window), "found {window:?} in {text}");
    }
}

#[tokio::test]
async fn no_secret_in_any_record() {
    let sink = MemorySink::new();
    for log_content in [false, true] {
        let layer = AuditLayer::new(sink.clone()).log_content(log_content);
        let (svc, _) = stack(layer, || sse(TestBody::chunks([CONTENT, USAGE, DONE])));
        // Allowed, streamed.
        let res = svc
            .clone()
            .oneshot(request("/v1/chat/completions", chat_body(true, "")))
            .await
            .unwrap();
        body_text(res.into_body()).await;
        // Rejected by the model allow-list.
        let res = svc
            .clone()
            .oneshot(request(
                "/v1/chat/completions",
                format!(
                    r#"{{"model":"gpt-4.1","messages":[{{"role":"user","content":"{SECRET}"}}]}}"#
                ),
            ))
            .await
            .unwrap();
        drop(res);
        // The key sent in `api-key` and `x-api-key` too.
        let mut req = request("/v1/embeddings", r#"{"model":"gpt-4o-mini","input":"x"}"#);
        req.headers_mut().insert("api-key", SECRET.parse().unwrap());
        req.headers_mut()
            .insert("x-api-key", SECRET.parse().unwrap());
        let res = svc.oneshot(req).await.unwrap();
        drop(res);
    }
    let records = sink.records();
    assert_eq!(records.len(), 6);
    for r in &records {
        assert_eq!(r.key.as_deref(), Some("team-a"));
        assert_no_secret(&serde_json::to_string(r).unwrap());
        assert_no_secret(&format!("{r:?}"));
    }
    // With content logging, the prompt is there, with the key redacted.
    let logged = records[3].content.as_ref().unwrap();
    let prompt = logged.prompt.as_deref().unwrap();
    assert!(
        prompt.starts_with("Say hi. My key is sk-[redacted]"),
        "{prompt}"
    );
    assert_eq!(
        logged.response.as_deref().unwrap(),
        [CONTENT, DONE].concat()
    );
}

#[tokio::test]
async fn logged_content_is_bounded_and_uses_the_redaction_hook() {
    let sink = MemorySink::new();
    let layer = AuditLayer::new(sink.clone())
        .log_content(true)
        .max_content_bytes(10)
        .redact(|text| text.replace("Say", "[word]"));
    let (svc, _) = stack(layer, || json(CHAT_JSON));
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(false, "")))
        .await
        .unwrap();
    body_text(res.into_body()).await;
    let content = sink.last().unwrap().content.unwrap();
    // Redacted, then cut at 10 bytes.
    assert_eq!(content.prompt.as_deref(), Some("[word] hi."));
    assert_eq!(content.response.as_deref(), Some(&CHAT_JSON[..10]));
    assert!(content.truncated);
}

// ---- sinks ----------------------------------------------------------------------------------

#[tokio::test]
async fn slow_sink_does_not_slow_requests_and_counts_drops() {
    let (entered_tx, entered_rx) = mpsc::channel();
    let (gate_tx, gate_rx) = mpsc::channel();
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink = JsonlSink::builder()
        .queue_capacity(2)
        .buffer_size(0)
        .writer(GatedWriter {
            entered: entered_tx,
            gate: Arc::new(Mutex::new(gate_rx)),
            out: out.clone(),
        })
        .unwrap();
    let (svc, _) = stack(AuditLayer::new(sink.clone()), || json(CHAT_JSON));
    async fn send<S, B>(svc: &S)
    where
        S: Service<Request<String>, Response = Response<B>, Error = io::Error> + Clone,
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        let res = svc
            .clone()
            .oneshot(request("/v1/chat/completions", chat_body(false, "")))
            .await
            .unwrap();
        body_text(res.into_body()).await;
    }
    let deadline = Duration::from_secs(10);

    // The first record reaches the writer, which then blocks.
    tokio::time::timeout(deadline, send(&svc)).await.unwrap();
    entered_rx.recv_timeout(deadline).unwrap();
    // Nine more requests complete at once while the writer is stuck: two fit in the queue.
    tokio::time::timeout(deadline, async {
        for _ in 0..9 {
            send(&svc).await;
        }
    })
    .await
    .expect("requests were slowed down by the sink");
    assert_eq!(sink.dropped(), 7);

    // Open the gate for good; everything queued is written.
    drop(gate_tx);
    sink.flush().unwrap();
    assert_eq!(sink.written(), 3);
    let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
    assert_eq!(text.lines().count(), 3);
    for line in text.lines() {
        let r: AuditRecord = serde_json::from_str(line).unwrap();
        assert_eq!(r.outcome, Outcome::Completed);
    }
}

#[tokio::test]
async fn jsonl_file_is_valid_json_per_line_under_concurrent_writers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sink = JsonlSink::builder()
        .queue_capacity(100_000)
        .buffer_size(4096)
        .open(&path)
        .unwrap();

    // A real record to start from, with content so lines are long and varied.
    let memory = MemorySink::new();
    let layer =
        AuditLayer::new(FanOut::new().with(memory.clone()).with(sink.clone())).log_content(true);
    let (svc, _) = stack(layer, || json(CHAT_JSON));
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(false, "")))
        .await
        .unwrap();
    body_text(res.into_body()).await;
    let template = memory.last().unwrap();

    let threads: Vec<_> = (0..8)
        .map(|t| {
            let sink = sink.clone();
            let template = template.clone();
            std::thread::spawn(move || {
                for i in 0..1000 {
                    let mut r = template.clone();
                    r.request_id = format!("t{t}-{i}");
                    r.user = Some("x\n\"y\"".repeat(i % 50));
                    sink.record(&r);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    sink.flush().unwrap();
    assert_eq!(sink.dropped(), 0);
    assert_eq!(sink.written(), 8001);

    let text = std::fs::read_to_string(&path).unwrap();
    let mut ids = std::collections::HashSet::new();
    for line in text.lines() {
        let r: AuditRecord = serde_json::from_str(line).expect("a valid JSON line");
        ids.insert(r.request_id);
    }
    assert_eq!(ids.len(), 8001);
    sink.shutdown();
    // After shutdown, records are dropped and counted, never written.
    sink.record(&template);
    assert_eq!(sink.dropped(), 1);
}

#[tokio::test]
async fn fan_out_and_closure_sinks_see_every_record() {
    let first = MemorySink::new();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let fan = FanOut::new()
        .with(first.clone())
        .with(FnSink::new(move |r: &AuditRecord| {
            seen.lock().unwrap().push(r.request_id.clone())
        }));
    let (svc, _) = stack(AuditLayer::new(fan), || json(CHAT_JSON));
    for _ in 0..3 {
        let res = svc
            .clone()
            .oneshot(request("/v1/chat/completions", chat_body(false, "")))
            .await
            .unwrap();
        body_text(res.into_body()).await;
    }
    let ids: Vec<_> = first.records().into_iter().map(|r| r.request_id).collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(*calls.lock().unwrap(), ids);
}

#[cfg(feature = "tracing")]
mod tracing_sink {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use tower_llm_policy::audit::TracingSink;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    #[derive(Default)]
    struct Capture {
        events: AtomicUsize,
        fields: Mutex<Vec<(String, String)>>,
    }

    struct Fields<'a>(&'a mut Vec<(String, String)>);

    impl Visit for Fields<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push((field.name().to_owned(), format!("{value:?}")));
        }
    }

    impl Subscriber for &'static Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            assert_eq!(event.metadata().target(), "tower_llm_policy::audit");
            self.events.fetch_add(1, Ordering::SeqCst);
            event.record(&mut Fields(&mut self.fields.lock().unwrap()));
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[tokio::test]
    async fn tracing_sink_emits_one_event_per_record() {
        let capture: &'static Capture = Box::leak(Box::default());
        let memory = MemorySink::new();
        let (svc, _) = stack(AuditLayer::new(FanOut::new().with(memory.clone())), || {
            json(CHAT_JSON)
        });
        let res = svc
            .oneshot(request("/v1/chat/completions", chat_body(false, "")))
            .await
            .unwrap();
        body_text(res.into_body()).await;
        let record = memory.last().unwrap();
        tracing::subscriber::with_default(capture, || TracingSink::new().record(&record));
        assert_eq!(capture.events.load(Ordering::SeqCst), 1);
        let fields = capture.fields.lock().unwrap();
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("key").as_deref(), Some("\"team-a\""));
        assert_eq!(get("total_tokens").as_deref(), Some("2300"));
        assert_eq!(get("outcome").as_deref(), Some("\"completed\""));
        assert_no_secret(&format!("{fields:?}"));
    }
}

#[tokio::test]
async fn a_key_across_the_content_limit_is_still_redacted() {
    let sink = MemorySink::new();
    let layer = AuditLayer::new(sink.clone())
        .log_content(true)
        .max_content_bytes(22);
    let (svc, _) = stack(layer, || json(CHAT_JSON));
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(false, "")))
        .await
        .unwrap();
    body_text(res.into_body()).await;
    let content = sink.last().unwrap().content.unwrap();
    assert_eq!(content.prompt.as_deref(), Some("Say hi. My key is sk-["));
}

#[tokio::test]
async fn prices_from_a_file_override_the_builtin_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prices.json");
    std::fs::write(
        &path,
        r#"{"gpt-4o-mini": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}}"#,
    )
    .unwrap();
    let mut table = PricingTable::builtin();
    table.merge(PricingTable::from_json_file(&path).unwrap());
    let sink = MemorySink::new();
    let (svc, _) = stack(AuditLayer::new(sink.clone()).pricing(table), || {
        json(CHAT_JSON)
    });
    let res = svc
        .oneshot(request("/v1/chat/completions", chat_body(false, "")))
        .await
        .unwrap();
    body_text(res.into_body()).await;
    assert!(close(sink.last().unwrap().cost_usd.unwrap(), 2300.0 / 1e6));

    std::fs::write(&path, r#"{"m": {"input_per_mtok": -1}}"#).unwrap();
    let err = PricingTable::from_json_file(&path).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[tokio::test]
async fn a_body_the_record_copies_keeps_its_size_and_end_for_the_inner_service() {
    let sink = MemorySink::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .service(service_fn(move |req: Request<PolicyBody>| {
            let log = log.clone();
            async move {
                let body = req.into_body();
                // A forwarding client sends an exact size as Content-Length.
                log.lock()
                    .unwrap()
                    .push((body.size_hint().exact(), body.is_end_stream()));
                body.collect().await.unwrap();
                Ok::<_, Infallible>(json(CHAT_JSON))
            }
        }));
    let sent = chat_body(false, "");
    let res = svc
        .clone()
        .oneshot(request("/v1/chat/completions", sent.clone()))
        .await
        .unwrap();
    body_text(res.into_body()).await;
    let res = svc
        .oneshot(request("/v1/chat/completions", ""))
        .await
        .unwrap();
    body_text(res.into_body()).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0], (Some(sent.len() as u64), false));
    assert_eq!(seen[1], (Some(0), true));
    // The copy gave the first record its model.
    assert_eq!(sink.records()[0].model.as_deref(), Some("gpt-4o-mini"));
}
