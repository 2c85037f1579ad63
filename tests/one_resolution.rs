//! One resolved request through the recommended stack (Audit → BodyLimit → KeyAuth →
//! FeatureBlock → ModelAllowList → PromptLimit): the model resolved once (after aliases) for
//! the checks, the price and the record; body edits applied once, by one rewriter, so a
//! client cannot undo them; nothing read before the key is checked or when the path alone
//! decides; a body over the limit is a 413 however it is sent.

use std::collections::VecDeque;
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
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::{AuditLayer, AuditRecord, MemorySink, Outcome};
use tower_llm_policy::{
    ApiKey, BodyLimitLayer, BodyOptions, FeatureBlockLayer, FeatureSet, KeyAuthLayer,
    MemoryKeyStore, ModelAliases, ModelAllowListLayer, OutputLimitMode, Policy, PolicyBody,
    PromptLimitLayer,
};

const KEY: &str = "sk-team-a-0123456789";

const CHAT_JSON: &str = r#"{"id":"c","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":100,"total_tokens":1100}}"#;
const CONTENT: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
const USAGE: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

/// A request body that counts how often it is polled.
struct CountingBody {
    chunks: VecDeque<Bytes>,
    polls: Arc<AtomicUsize>,
}

impl CountingBody {
    fn new(chunks: impl IntoIterator<Item = Bytes>) -> (Self, Arc<AtomicUsize>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let body = CountingBody {
            chunks: chunks.into_iter().collect(),
            polls: polls.clone(),
        };
        (body, polls)
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

/// What the upstream received: each request's body.
#[derive(Clone, Default)]
struct Upstream(Arc<Mutex<Vec<Bytes>>>);

impl Upstream {
    fn calls(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn last_text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().last().unwrap().to_vec()).unwrap()
    }
}

fn store() -> Arc<MemoryKeyStore> {
    Arc::new(
        MemoryKeyStore::new()
            .with_key(
                KEY,
                ApiKey::new("team-a").model_limits(["gpt-4o-mini", "gpt-4o"]),
            )
            .with_key(
                "sk-no-images-0123456789",
                ApiKey::new("no-images").blocked_features("images".parse().unwrap()),
            ),
    )
}

/// The recommended stack, sharing one `Policy`, in front of an upstream that reads the body
/// (as a forwarding client does) and answers SSE for streams, JSON otherwise.
fn stack(
    policy: Policy,
    prompt_limit: PromptLimitLayer,
) -> (
    impl Service<
            Request<PolicyBody>,
            Response = Response<impl Body<Data = Bytes, Error = impl std::fmt::Debug>>,
            Error = Infallible,
        > + Clone,
    MemorySink,
    Upstream,
) {
    let sink = MemorySink::new();
    let upstream = Upstream::default();
    let seen = upstream.clone();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()).policy(policy.clone()))
        .layer(BodyLimitLayer::new().policy(policy.clone()))
        .layer(KeyAuthLayer::new(store()))
        .layer(FeatureBlockLayer::new().policy(policy.clone()))
        .layer(ModelAllowListLayer::new().policy(policy.clone()))
        .layer(prompt_limit.policy(policy))
        .service(service_fn(move |req: Request<PolicyBody>| {
            let seen = seen.clone();
            async move {
                let body = match req.into_body().collect().await {
                    Ok(body) => body.to_bytes(),
                    Err(_) => {
                        // A forwarding client whose request body failed: a 502.
                        return Ok(Response::builder()
                            .status(StatusCode::BAD_GATEWAY)
                            .body(PolicyBody::from("upstream request failed"))
                            .unwrap());
                    }
                };
                let stream = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["stream"].as_bool())
                    .unwrap_or(false);
                seen.0.lock().unwrap().push(body);
                let response = if stream {
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(PolicyBody::from(format!("{CONTENT}{USAGE}{DONE}")))
                } else {
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(PolicyBody::from(CHAT_JSON))
                };
                Ok::<_, Infallible>(response.unwrap())
            }
        }));
    (svc, sink, upstream)
}

fn post(path: &str, key: Option<&str>, body: PolicyBody) -> Request<PolicyBody> {
    let mut req = Request::post(path).header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    req.body(body).unwrap()
}

async fn send<S, B>(svc: S, req: Request<PolicyBody>) -> (StatusCode, String)
where
    S: Service<Request<PolicyBody>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

fn record(sink: &MemorySink) -> AuditRecord {
    assert_eq!(sink.len(), 1, "one record per request");
    sink.last().unwrap()
}

#[tokio::test]
async fn an_aliased_deployment_is_checked_priced_and_recorded_as_its_target() {
    let policy = Policy::new().model_aliases(ModelAliases::new().alias("prod-chat", "gpt-4o"));
    let (svc, sink, upstream) = stack(policy, PromptLimitLayer::new());
    // Azure runs the deployment; a body model that names the same model (here through the
    // alias target) is consistent. (A different one is checked too: see tests/bypass.rs.)
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, _) = send(
        svc,
        post(
            "/openai/deployments/prod-chat/chat/completions?api-version=2024-10-21",
            Some(KEY),
            PolicyBody::from(body),
        ),
    )
    .await;
    // The key may use gpt-4o: the deployment passes as gpt-4o.
    assert_eq!(status, StatusCode::OK);
    assert_eq!(upstream.calls(), 1);
    let r = record(&sink);
    assert_eq!(r.model.as_deref(), Some("prod-chat"));
    assert_eq!(r.canonical_model.as_deref(), Some("gpt-4o"));
    // gpt-4o: $2.50 in, $10 out per million tokens.
    let expected = (1000.0 * 2.5 + 100.0 * 10.0) / 1e6;
    assert!((r.cost_usd.unwrap() - expected).abs() < 1e-12, "{r:?}");
    assert!(
        !r.flags.iter().any(|f| f == "unknown_price"),
        "{:?}",
        r.flags
    );
}

#[tokio::test]
async fn clamp_and_include_usage_are_applied_together_once() {
    let (svc, sink, upstream) = stack(
        Policy::new(),
        PromptLimitLayer::new()
            .max_output_tokens(100)
            .output_limit_mode(OutputLimitMode::Clamp),
    );
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":4096,"messages":[{"role":"user","content":"hi"}]}"#;
    let (status, text) = send(svc, post("/v1/chat/completions", Some(KEY), body.into())).await;
    assert_eq!(status, StatusCode::OK);
    let sent: Value = serde_json::from_str(&upstream.last_text()).unwrap();
    assert_eq!(sent["max_tokens"], 100);
    assert_eq!(sent["stream_options"]["include_usage"], true);
    // The usage chunk the client did not ask for is removed; the record has the usage.
    assert!(!text.contains("\"usage\""), "{text}");
    let r = record(&sink);
    assert!(r.usage_injected);
    assert_eq!(r.total_tokens, Some(29));
    assert!(r.cost_usd.is_some());
}

#[tokio::test]
async fn an_escaped_duplicate_stream_options_cannot_undo_the_injection() {
    let (svc, sink, upstream) = stack(Policy::new(), PromptLimitLayer::new());
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_\u006fptions":{"include_\u0075sage":false},"messages":[{"role":"user","content":"hi"}]}"#;
    let (status, text) = send(svc, post("/v1/chat/completions", Some(KEY), body.into())).await;
    assert_eq!(status, StatusCode::OK);
    let sent = upstream.last_text();
    // One `stream_options`, plainly spelled, with usage on: whichever duplicate an upstream
    // would read, there is none.
    assert_eq!(sent.matches("stream_options").count(), 1, "{sent}");
    assert!(!sent.contains("\\u00"), "{sent}");
    let sent: Value = serde_json::from_str(&sent).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert!(!text.contains("\"usage\""), "{text}");
    let r = record(&sink);
    assert!(r.usage_injected);
    assert_eq!(r.total_tokens, Some(29));
}

#[tokio::test]
async fn a_literal_duplicate_stream_options_is_refused() {
    let (svc, sink, upstream) = stack(Policy::new(), PromptLimitLayer::new());
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"stream_options":{"include_usage":false},"messages":[]}"#;
    let (status, text) = send(svc, post("/v1/chat/completions", Some(KEY), body.into())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("duplicate"), "{text}");
    assert_eq!(upstream.calls(), 0);
    assert_eq!(record(&sink).code.as_deref(), Some("invalid_request_body"));
}

#[tokio::test]
async fn a_string_mentioning_stream_options_does_not_stop_the_injection() {
    let (svc, sink, upstream) = stack(Policy::new(), PromptLimitLayer::new());
    let body = r#"{"model":"gpt-4o-mini","stream":true,"user":"\"stream_options\"","messages":[{"role":"user","content":"\"stream_options\":{\"include_usage\":false}"}]}"#;
    let (status, text) = send(svc, post("/v1/chat/completions", Some(KEY), body.into())).await;
    assert_eq!(status, StatusCode::OK);
    let sent: Value = serde_json::from_str(&upstream.last_text()).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["user"], "\"stream_options\"");
    assert!(!text.contains("\"usage\""), "{text}");
    let r = record(&sink);
    assert!(r.usage_injected);
    assert_eq!(r.total_tokens, Some(29));
}

#[tokio::test]
async fn no_body_is_read_before_the_key_is_checked() {
    let (svc, sink, upstream) = stack(Policy::new(), PromptLimitLayer::new().max_prompt_chars(10));
    for key in [None, Some("sk-unknown-0123456789")] {
        let (body, polls) = CountingBody::new([Bytes::from_static(b"{not json")]);
        let (status, text) = send(
            svc.clone(),
            post("/v1/chat/completions", key, PolicyBody::new(body)),
        )
        .await;
        // A request without a valid key and with a bad body is refused for its key.
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
        assert_eq!(polls.load(Ordering::SeqCst), 0, "the body was polled");
    }
    assert_eq!(upstream.calls(), 0);
    assert_eq!(sink.len(), 2);
    assert_eq!(sink.last().unwrap().blocked_by.as_deref(), Some("key_auth"));
}

#[tokio::test]
async fn a_blocked_endpoint_is_refused_from_the_path_alone() {
    let (svc, sink, upstream) = stack(Policy::new(), PromptLimitLayer::new());
    // The key blocks images, and nothing at all allows or blocks the model: the path decides.
    let (body, polls) = CountingBody::new([Bytes::from_static(
        br#"{"model":"dall-e-3","prompt":"a cat"}"#,
    )]);
    let (status, text) = send(
        svc.clone(),
        post(
            "/v1/images/generations",
            Some("sk-no-images-0123456789"),
            PolicyBody::new(body),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{text}");
    assert!(text.contains("feature_blocked"));
    assert_eq!(polls.load(Ordering::SeqCst), 0, "the body was polled");
    // The same for a workspace-wide block, before any key is involved.
    let blocked = FeatureBlockLayer::new().block_features("audio".parse::<FeatureSet>().unwrap());
    let (body, polls) = CountingBody::new([Bytes::from_static(b"{}")]);
    let svc2 =
        ServiceBuilder::new()
            .layer(blocked)
            .service(service_fn(|_: Request<PolicyBody>| async {
                Ok::<_, Infallible>(Response::new(PolicyBody::empty()))
            }));
    let (status, _) = send(svc2, post("/v1/audio/speech", None, PolicyBody::new(body))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(polls.load(Ordering::SeqCst), 0);
    assert_eq!(upstream.calls(), 0);
    let r = record(&sink);
    assert_eq!(r.outcome, Outcome::Rejected);
    assert_eq!(r.key.as_deref(), Some("no-images"));
    assert_eq!(r.blocked_by.as_deref(), Some("feature_block"));
    // The body was not read: the record claims no model (not even the endpoint's default).
    assert_eq!(r.model, None);
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413_and_not_forwarded() {
    let policy = Policy::new().body_options(BodyOptions {
        limit: 1024,
        ..BodyOptions::default()
    });
    let (svc, sink, upstream) = stack(policy, PromptLimitLayer::new());
    // A chat request in 512-byte chunks, no Content-Length: a policy layer reads it.
    let mut chat = br#"{"model":"gpt-4o","messages":[{"role":"user","content":""#.to_vec();
    chat.extend(std::iter::repeat_n(b'x', 3000));
    chat.extend_from_slice(br#""}]}"#);
    let chunks: Vec<Bytes> = chat.chunks(512).map(Bytes::copy_from_slice).collect();
    let (body, _) = CountingBody::new(chunks.clone());
    let (status, text) = send(
        svc.clone(),
        post("/v1/chat/completions", Some(KEY), PolicyBody::new(body)),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(text.contains("request_too_large"));
    assert_eq!(upstream.calls(), 0);
    // An upload no policy layer reads (files) is cut off on its way: still a 413, not the
    // upstream's 502, and the upstream got no whole body.
    let (body, _) = CountingBody::new(chunks);
    let (status, text) = send(svc, post("/v1/files", Some(KEY), PolicyBody::new(body))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert_eq!(upstream.calls(), 0);
    assert_eq!(sink.len(), 2);
    let r = sink.last().unwrap();
    assert_eq!(r.code.as_deref(), Some("request_too_large"));
    assert_eq!(r.status, Some(413));
}

#[tokio::test]
async fn a_layer_that_needs_no_body_still_reads_it_for_the_audit_record() {
    // FeatureBlock with nothing to block on the body, and a key without model limits: no
    // decision needs the body, but the record does (model, usage injection), and nothing may
    // be read before the key is checked. FeatureBlock, after KeyAuth, reads it.
    let sink = MemorySink::new();
    let upstream = Upstream::default();
    let seen = upstream.clone();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .layer(KeyAuthLayer::new(store()))
        .layer(FeatureBlockLayer::new())
        .service(service_fn(move |req: Request<PolicyBody>| {
            let seen = seen.clone();
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                seen.0.lock().unwrap().push(body);
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(PolicyBody::from(format!("{CONTENT}{USAGE}{DONE}")))
                        .unwrap(),
                )
            }
        }));
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (status, text) = send(
        svc,
        post(
            "/v1/chat/completions",
            Some("sk-no-images-0123456789"),
            body.into(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let sent: Value = serde_json::from_str(&upstream.last_text()).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert!(!text.contains("\"usage\""), "{text}");
    let r = record(&sink);
    assert_eq!(r.key.as_deref(), Some("no-images"));
    assert_eq!(r.model.as_deref(), Some("gpt-4o-mini"));
    assert!(r.usage_injected);
    assert_eq!(r.total_tokens, Some(29));
}
