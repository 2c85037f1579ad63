//! PromptLimit: every limit kind, workspace and key limits combined, clamp versus reject,
//! token counts against a second tokenizer (tiktoken-rs), and hostile input.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::error::LayerName as Layer;
use tower_llm_policy::prompt_limit::{
    prompt_chars, prompt_tokens_up_to, MediaTokens, OutputLimitMode, PromptLimitLayer, PromptLimits,
};
use tower_llm_policy::tokens::{Count, TokenCounter};
use tower_llm_policy::{ApiKey, LlmRequest, ModelAliases, PolicyBody, Rejection};

/// What the inner service saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    body: Bytes,
    content_length: Option<String>,
    transfer_encoding: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn stack(
    layer: PromptLimitLayer,
) -> (
    impl Service<
            Request<String>,
            Response = Response<tower_llm_policy::ResponseBody<String>>,
            Error = Infallible,
        > + Clone,
    Log,
) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(move |req: Request<PolicyBody>| {
                let seen = seen.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let view = parts.extensions.get::<LlmRequest>().cloned();
                    let body = body.collect().await.unwrap().to_bytes();
                    seen.lock().unwrap().push(Seen {
                        body,
                        content_length: parts
                            .headers
                            .get("content-length")
                            .map(|v| v.to_str().unwrap().to_owned()),
                        transfer_encoding: parts
                            .headers
                            .get("transfer-encoding")
                            .map(|v| v.to_str().unwrap().to_owned()),
                        max_tokens: view.as_ref().and_then(|v| v.max_tokens()),
                        max_completion_tokens: view
                            .as_ref()
                            .and_then(|v| v.max_completion_tokens()),
                        max_output_tokens: view.as_ref().and_then(|v| v.max_output_tokens()),
                    });
                    Ok::<_, Infallible>(Response::new(String::new()))
                }
            }));
    (svc, log)
}

fn post(path: &str, body: &Value) -> Request<String> {
    let body = body.to_string();
    Request::post(path)
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(body)
        .unwrap()
}

fn chat(body: Value) -> Request<String> {
    post("/v1/chat/completions", &body)
}

fn with_key(mut req: Request<String>, key: ApiKey) -> Request<String> {
    req.extensions_mut().insert(Arc::new(key));
    req
}

async fn send<S, B>(svc: &S, req: Request<String>) -> (StatusCode, Value, Option<Rejection>)
where
    S: Service<Request<String>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError> + std::fmt::Debug,
{
    let response = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (
        parts.status,
        json,
        parts.extensions.get::<Rejection>().cloned(),
    )
}

fn message(json: &Value) -> &str {
    json["error"]["message"].as_str().unwrap_or_default()
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

/// The parsed view of a JSON request, as the layers see it.
fn view(path: &str, body: &Value) -> LlmRequest {
    let (parts, _) = Request::post(path)
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts();
    LlmRequest::parse(&parts, Bytes::from(body.to_string())).unwrap()
}

fn assert_too_long(status: StatusCode, json: &Value, param: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
    assert_eq!(json["error"]["code"], "prompt_too_long", "{json}");
    assert_eq!(json["error"]["type"], "invalid_request_error");
    assert_eq!(json["error"]["param"], param, "{json}");
}

// ---------------------------------------------------------------------------------------------
// Every limit kind

#[tokio::test]
async fn max_prompt_chars() {
    let (svc, log) = stack(PromptLimitLayer::new().max_prompt_chars(10));
    let (status, ..) = send(
        &svc,
        chat(json!({"model":"gpt-4o","messages":[user("héllo wörl")]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, json, rejection) = send(
        &svc,
        chat(json!({"model":"gpt-4o","messages":[user("hello"), user("world!")]})),
    )
    .await;
    assert_too_long(status, &json, "messages");
    assert_eq!(
        message(&json),
        "Prompt is 11 characters; the limit for this workspace is 10 characters."
    );
    assert_eq!(rejection.unwrap().layer, Layer::PromptLimit);
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn chars_count_every_prompt_field() {
    let (svc, _) = stack(PromptLimitLayer::new().max_prompt_chars(10));
    for (path, body, param) in [
        (
            "/v1/completions",
            json!({"model":"gpt-3.5-turbo-instruct","prompt":"x".repeat(11)}),
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"model":"gpt-3.5-turbo-instruct","prompt":["xxxxxx","xxxxx"]}),
            "prompt",
        ),
        (
            "/v1/embeddings",
            json!({"model":"text-embedding-3-small","input":"x".repeat(11)}),
            "input",
        ),
        (
            "/v1/responses",
            json!({"model":"gpt-4o","instructions":"xxxxxx","input":"xxxxx"}),
            "input",
        ),
        (
            "/v1/responses",
            json!({"model":"gpt-4o","input":[{"role":"user","content":[{"type":"input_text","text":"x".repeat(11)}]}]}),
            "input",
        ),
        ("/v1/moderations", json!({"input":"x".repeat(11)}), "input"),
        (
            "/v1/audio/speech",
            json!({"model":"tts-1","voice":"alloy","input":"x".repeat(11)}),
            "input",
        ),
        (
            "/v1/images/generations",
            json!({"prompt":"x".repeat(11)}),
            "prompt",
        ),
        (
            "/v1/chat/completions",
            json!({"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"x".repeat(11)}]}]}),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"model":"gpt-4o","messages":[user("x")],"tools":[{"type":"function","function":{"name":"f"}}]}),
            "messages",
        ),
    ] {
        let (status, json, _) = send(&svc, post(path, &body)).await;
        assert_too_long(status, &json, param);
        assert!(message(&json).contains("characters"), "{path}: {json}");
    }
}

#[tokio::test]
async fn token_ids_count_four_characters_each() {
    let (svc, _) = stack(PromptLimitLayer::new().max_prompt_chars(10));
    let (status, json, _) = send(
        &svc,
        post(
            "/v1/completions",
            &json!({"model":"davinci-002","prompt":[1, 2, 3]}),
        ),
    )
    .await;
    assert_too_long(status, &json, "prompt");
    assert_eq!(
        message(&json),
        "Prompt is 12 characters; the limit for this workspace is 10 characters."
    );
}

#[tokio::test]
async fn max_prompt_tokens_counts_token_arrays_by_length() {
    let (svc, _) = stack(PromptLimitLayer::new().max_prompt_tokens(5));
    let (status, ..) = send(
        &svc,
        post(
            "/v1/embeddings",
            &json!({"model":"text-embedding-3-small","input":[[1,2],[3,4,5]]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, json, _) = send(
        &svc,
        post(
            "/v1/embeddings",
            &json!({"model":"text-embedding-3-small","input":[[1,2,3],[4,5,6]]}),
        ),
    )
    .await;
    assert_too_long(status, &json, "input");
    assert!(
        message(&json).starts_with("Prompt is at least 6 tokens"),
        "{json}"
    );
    assert!(message(&json).ends_with("the limit for this workspace is 5 tokens."));
}

#[tokio::test]
async fn images_count_by_the_documented_rule() {
    let image = json!({"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}});
    let body = json!({"model":"gpt-4o","messages":[{"role":"user","content":[image, image]}]});
    let view = view("/v1/chat/completions", &body);
    let counter = TokenCounter::for_model("gpt-4o");
    // Two images, one message (3 framing + 1 role), the reply priming (3). No text.
    let expected = 2 * MediaTokens::DEFAULT_IMAGE as usize + 3 + 1 + 3;
    assert_eq!(
        prompt_tokens_up_to(&view, &counter, &MediaTokens::default(), usize::MAX),
        Count::Within { tokens: expected }
    );
    // Images are not characters.
    assert_eq!(prompt_chars(&view), 0);

    let (svc, _) = stack(PromptLimitLayer::new().max_prompt_tokens(expected as u64));
    let (status, ..) = send(&svc, chat(body.clone())).await;
    assert_eq!(status, StatusCode::OK);
    let (svc, _) = stack(PromptLimitLayer::new().max_prompt_tokens(expected as u64 - 1));
    let (status, json, _) = send(&svc, chat(body.clone())).await;
    assert_too_long(status, &json, "messages");

    // The rule is configurable.
    let media = MediaTokens {
        image: 10,
        audio: 20,
        file: 30,
    };
    let (svc, _) = stack(
        PromptLimitLayer::new()
            .max_prompt_tokens(2 * 10 + 7)
            .media_tokens(media),
    );
    let (status, ..) = send(&svc, chat(body)).await;
    assert_eq!(status, StatusCode::OK);
}

#[test]
fn audio_and_files_count_by_the_documented_rule() {
    let body = json!({"model":"gpt-4o-audio-preview","messages":[{"role":"user","content":[
        {"type":"input_audio","input_audio":{"data":"AAAA","format":"wav"}},
        {"type":"file","file":{"file_id":"file-1"}}
    ]}]});
    let view = view("/v1/chat/completions", &body);
    let counter = TokenCounter::for_model("gpt-4o");
    let expected = (MediaTokens::DEFAULT_AUDIO + MediaTokens::DEFAULT_FILE) as usize + 7;
    assert_eq!(
        prompt_tokens_up_to(&view, &counter, &MediaTokens::default(), usize::MAX).tokens(),
        expected
    );
}

#[tokio::test]
async fn max_output_tokens_rejects_each_field() {
    let (svc, log) = stack(PromptLimitLayer::new().max_output_tokens(1000));
    for field in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
        let mut body = json!({"model":"gpt-4o","messages":[user("hi")]});
        body[field] = json!(1000);
        let (status, ..) = send(&svc, chat(body.clone())).await;
        assert_eq!(status, StatusCode::OK, "{field}");
        body[field] = json!(1001);
        let (status, json, _) = send(&svc, chat(body)).await;
        assert_too_long(status, &json, field);
        assert_eq!(
            message(&json),
            format!("`{field}` is 1001; the limit for this workspace is 1000 tokens.")
        );
    }
    // Without any output field the limit does not apply (see `require_output_limit`).
    let (status, ..) = send(
        &svc,
        chat(json!({"model":"gpt-4o","messages":[user("hi")]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(log.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn require_output_limit() {
    let (svc, _) = stack(PromptLimitLayer::new().require_output_limit(true));
    for (path, body, param) in [
        (
            "/v1/chat/completions",
            json!({"model":"gpt-4o","messages":[]}),
            "max_completion_tokens",
        ),
        (
            "/v1/completions",
            json!({"model":"gpt-3.5-turbo-instruct","prompt":"x"}),
            "max_tokens",
        ),
        (
            "/v1/responses",
            json!({"model":"gpt-4o","input":"x"}),
            "max_output_tokens",
        ),
    ] {
        let (status, json, _) = send(&svc, post(path, &body)).await;
        assert_too_long(status, &json, param);
        assert!(message(&json).starts_with("This workspace requires an output limit"));
        let mut body = body;
        body[param] = json!(10);
        let (status, ..) = send(&svc, post(path, &body)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    // Chat also takes the older `max_tokens`.
    let (status, ..) = send(
        &svc,
        chat(json!({"model":"gpt-4o","messages":[],"max_tokens":5})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Endpoints without an output size are not concerned.
    let (status, ..) = send(
        &svc,
        post(
            "/v1/embeddings",
            &json!({"model":"text-embedding-3-small","input":"x"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn max_n_covers_n_and_best_of() {
    let (svc, _) = stack(PromptLimitLayer::new().max_n(2));
    let (status, ..) = send(&svc, chat(json!({"model":"gpt-4o","messages":[],"n":2}))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, json, _) = send(&svc, chat(json!({"model":"gpt-4o","messages":[],"n":3}))).await;
    assert_too_long(status, &json, "n");
    assert_eq!(
        message(&json),
        "`n` is 3; the limit for this workspace is 2."
    );
    let (status, json, _) = send(
        &svc,
        post(
            "/v1/completions",
            &json!({"model":"gpt-3.5-turbo-instruct","prompt":"x","n":1,"best_of":5}),
        ),
    )
    .await;
    assert_too_long(status, &json, "best_of");
    // Images: `n` images.
    let (status, json, _) = send(
        &svc,
        post("/v1/images/generations", &json!({"prompt":"a cat","n":4})),
    )
    .await;
    assert_too_long(status, &json, "n");
}

#[tokio::test]
async fn max_messages() {
    let (svc, _) = stack(PromptLimitLayer::new().max_messages(2));
    let (status, ..) = send(
        &svc,
        chat(json!({"model":"gpt-4o","messages":[user("a"), user("b")]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, json, _) = send(
        &svc,
        chat(json!({"model":"gpt-4o","messages":[user("a"), user("b"), user("c")]})),
    )
    .await;
    assert_too_long(status, &json, "messages");
    assert_eq!(
        message(&json),
        "Request has 3 messages; the limit for this workspace is 2 messages."
    );
}

#[tokio::test]
async fn require_user_per_key_and_for_the_workspace() {
    let (svc, log) = stack(PromptLimitLayer::new());
    let key = ApiKey::new("k").require_user(true);
    let body = json!({"model":"gpt-4o","messages":[]});
    let (status, json, rejection) = send(&svc, with_key(chat(body.clone()), key.clone())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"]["code"], "user_required");
    assert_eq!(json["error"]["param"], "user");
    assert_eq!(rejection.unwrap().layer, Layer::PromptLimit);
    for field in ["user", "safety_identifier"] {
        let mut body = body.clone();
        body[field] = json!("end-user-42");
        let (status, ..) = send(&svc, with_key(chat(body), key.clone())).await;
        assert_eq!(status, StatusCode::OK, "{field}");
    }
    // Another key is not concerned.
    let (status, ..) = send(&svc, with_key(chat(body.clone()), ApiKey::new("b"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(log.lock().unwrap().len(), 3);

    // The workspace switch applies to every request, with or without a key.
    let (svc, _) = stack(PromptLimitLayer::new().require_user(true));
    let (status, json, _) = send(&svc, chat(body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"]["code"], "user_required");
    // Endpoints that take no `user` are not concerned.
    let (status, ..) = send(
        &svc,
        post(
            "/v1/audio/speech",
            &json!({"model":"tts-1","voice":"alloy","input":"hi"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Workspace and key combined

#[tokio::test]
async fn the_smaller_of_workspace_and_key_limits_applies() {
    let (svc, _) = stack(PromptLimitLayer::new().max_prompt_chars(10).max_n(4));
    let mut tight = ApiKey::new("tight");
    tight.max_prompt_chars = Some(5);
    tight.max_n = Some(8);
    let body = json!({"model":"gpt-4o","messages":[user("123456")]});

    let (status, json, _) = send(&svc, with_key(chat(body.clone()), tight.clone())).await;
    assert_too_long(status, &json, "messages");
    assert_eq!(
        message(&json),
        "Prompt is 6 characters; the limit for this key is 5 characters."
    );
    // Without the key the workspace's limit applies.
    let (status, ..) = send(&svc, chat(body)).await;
    assert_eq!(status, StatusCode::OK);
    // The key's larger `max_n` does not lift the workspace's.
    let (status, json, _) = send(
        &svc,
        with_key(chat(json!({"model":"gpt-4o","messages":[],"n":5})), tight),
    )
    .await;
    assert_too_long(status, &json, "n");
    assert_eq!(
        message(&json),
        "`n` is 5; the limit for this workspace is 4."
    );
}

#[tokio::test]
async fn key_limits_apply_without_workspace_limits() {
    let (svc, _) = stack(PromptLimitLayer::new());
    let mut key = ApiKey::new("k");
    key.max_messages = Some(1);
    key.max_output_tokens = Some(100);
    let (status, json, _) = send(
        &svc,
        with_key(
            chat(json!({"model":"gpt-4o","messages":[user("a"), user("b")]})),
            key.clone(),
        ),
    )
    .await;
    assert_too_long(status, &json, "messages");
    assert!(message(&json).contains("for this key"));
    let (status, json, _) = send(
        &svc,
        with_key(
            chat(json!({"model":"gpt-4o","messages":[],"max_completion_tokens":101})),
            key.clone(),
        ),
    )
    .await;
    assert_too_long(status, &json, "max_completion_tokens");
    let key = ApiKey::new("tokens").max_prompt_tokens(3);
    let (status, json, _) = send(
        &svc,
        with_key(
            post(
                "/v1/embeddings",
                &json!({"model":"text-embedding-3-small","input":[1,2,3,4]}),
            ),
            key,
        ),
    )
    .await;
    assert_too_long(status, &json, "input");
    assert!(
        message(&json).ends_with("the limit for this key is 3 tokens."),
        "{json}"
    );
}

#[test]
fn prompt_limits_deserialize_with_the_key_field_names() {
    let limits: PromptLimits = serde_json::from_value(json!({
        "max_prompt_chars": 1, "max_prompt_tokens": 2, "max_output_tokens": 3,
        "max_n": 4, "max_messages": 5, "require_user": true
    }))
    .unwrap();
    assert_eq!(
        limits,
        PromptLimits::new()
            .max_prompt_chars(1)
            .max_prompt_tokens(2)
            .max_output_tokens(3)
            .max_n(4)
            .max_messages(5)
            .require_user(true)
    );
    assert!(serde_json::from_value::<PromptLimits>(json!({"max_chars": 1})).is_err());
    assert!(PromptLimits::new().is_empty());
    let mut key = ApiKey::new("k").max_prompt_tokens(7);
    key.max_n = Some(2);
    assert_eq!(
        PromptLimits::of_key(&key),
        PromptLimits::new().max_prompt_tokens(7).max_n(2)
    );
}

// ---------------------------------------------------------------------------------------------
// Clamp versus reject

#[tokio::test]
async fn clamp_rewrites_the_fields_over_the_limit() {
    let (svc, log) = stack(
        PromptLimitLayer::new()
            .max_output_tokens(1000)
            .output_limit_mode(OutputLimitMode::Clamp),
    );
    let sent = r#"{"model":"gpt-4o", "messages":[{"role":"user","content":"caf\u00e9"}],"max_tokens":4096,"max_completion_tokens":500,"temperature":0.70,"seed":123456789012345678901234,"metadata":{"max_tokens":99999}}"#;
    for framing in ["content-length", "transfer-encoding"] {
        let req = Request::post("/v1/chat/completions").header("content-type", "application/json");
        let req = match framing {
            "content-length" => req.header("content-length", sent.len()),
            _ => req.header("transfer-encoding", "chunked"),
        };
        let (status, ..) = send(&svc, req.body(sent.to_owned()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
    }
    let chunked = log.lock().unwrap()[1].clone();
    assert!(chunked.transfer_encoding.is_none());
    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(chunked.content_length, seen.content_length);
    assert_eq!(chunked.body, seen.body);
    let body = std::str::from_utf8(&seen.body).unwrap();
    // Only the top-level field over the limit changed; everything else is byte for byte.
    assert_eq!(
        body,
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"caf\u00e9"}],"max_tokens":1000,"max_completion_tokens":500,"temperature":0.70,"seed":123456789012345678901234,"metadata":{"max_tokens":99999}}"#
    );
    assert_eq!(seen.content_length, Some(body.len().to_string()));
    // The view in the extensions follows the rewrite.
    assert_eq!(seen.max_tokens, Some(1000));
    assert_eq!(seen.max_completion_tokens, Some(500));
}

#[tokio::test]
async fn clamp_leaves_requests_within_the_limit_untouched() {
    let (svc, log) = stack(
        PromptLimitLayer::new()
            .max_output_tokens(1000)
            .output_limit_mode(OutputLimitMode::Clamp),
    );
    let body = json!({"model":"gpt-4o","input":"x","max_output_tokens":1000});
    let (status, ..) = send(&svc, post("/v1/responses", &body)).await;
    assert_eq!(status, StatusCode::OK);
    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(seen.body, body.to_string());
    assert_eq!(seen.max_output_tokens, Some(1000));
}

#[tokio::test]
async fn clamp_uses_the_smaller_key_limit_and_other_limits_still_reject() {
    let (svc, log) = stack(
        PromptLimitLayer::new()
            .max_output_tokens(1000)
            .max_prompt_chars(5)
            .output_limit_mode(OutputLimitMode::Clamp),
    );
    let mut key = ApiKey::new("k");
    key.max_output_tokens = Some(256);
    let (status, ..) = send(
        &svc,
        with_key(
            post(
                "/v1/responses",
                &json!({"model":"gpt-4o","input":"x","max_output_tokens":300}),
            ),
            key.clone(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(log.lock().unwrap()[0].max_output_tokens, Some(256));
    let seen: Value = serde_json::from_slice(&log.lock().unwrap()[0].body).unwrap();
    assert_eq!(seen["max_output_tokens"], 256);

    let (status, json, _) = send(
        &svc,
        with_key(
            post(
                "/v1/responses",
                &json!({"model":"gpt-4o","input":"too long","max_output_tokens":300}),
            ),
            key,
        ),
    )
    .await;
    assert_too_long(status, &json, "input");
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn reject_is_the_default_mode() {
    let (svc, log) = stack(PromptLimitLayer::new().max_output_tokens(10));
    let (status, json, _) = send(
        &svc,
        chat(json!({"model":"gpt-4o","messages":[],"max_tokens":11})),
    )
    .await;
    assert_too_long(status, &json, "max_tokens");
    assert!(log.lock().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Body handling

#[tokio::test]
async fn bodies_are_not_read_when_no_limit_applies() {
    let (svc, log) = stack(PromptLimitLayer::new());
    let req = Request::post("/v1/chat/completions")
        .body("not json".to_owned())
        .unwrap();
    let (status, ..) = send(&svc, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(log.lock().unwrap()[0].body, "not json");
    // Nor on endpoints without a prompt.
    let (svc, _) = stack(PromptLimitLayer::new().max_prompt_chars(1));
    let req = Request::post("/v1/files")
        .body("not json".to_owned())
        .unwrap();
    let (status, ..) = send(&svc, req).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn invalid_json_is_a_400_when_a_limit_applies() {
    let (svc, log) = stack(PromptLimitLayer::new().max_prompt_chars(10));
    let req = Request::post("/v1/chat/completions")
        .body("{\"messages\": [".to_owned())
        .unwrap();
    let (status, json, _) = send(&svc, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"]["code"], "invalid_request_body");
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn azure_deployment_alias_chooses_the_encoding() {
    // `my-deployment` resolves to gpt-4o; without the alias the name is unknown (cl100k).
    let text = "日本語のテキストを数えます。";
    let body = json!({"input": text});
    let path = "/openai/deployments/my-deployment/embeddings?api-version=2024-10-21";
    let o200k = TokenCounter::for_model("gpt-4o").count(text) as u64;
    let cl100k = TokenCounter::for_model("gpt-4").count(text) as u64;
    let aliased = PromptLimitLayer::new()
        .policy(
            tower_llm_policy::Policy::new()
                .model_aliases(ModelAliases::new().alias("my-deployment", "gpt-4o")),
        )
        .max_prompt_tokens(o200k);
    let (svc, _) = stack(aliased);
    let (status, json, _) = send(&svc, post(path, &body)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    if o200k < cl100k {
        let (svc, _) = stack(PromptLimitLayer::new().max_prompt_tokens(o200k));
        let (status, json, _) = send(&svc, post(path, &body)).await;
        assert_too_long(status, &json, "input");
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile input

#[tokio::test]
async fn one_megabyte_word_is_refused_quickly() {
    let word = "a".repeat(1024 * 1024);
    let body = json!({"model":"gpt-4o","messages":[user(&word)]});
    for layer in [
        PromptLimitLayer::new().max_prompt_tokens(1000),
        PromptLimitLayer::new().max_prompt_chars(1000),
    ] {
        let (svc, _) = stack(layer);
        let started = Instant::now();
        let (status, json, _) = send(&svc, chat(body.clone())).await;
        assert_too_long(status, &json, "messages");
        // Linear work at most (a parse and one scan), even in a debug build.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn one_megabyte_word_within_a_large_limit_counts_linearly() {
    let word = "a".repeat(1024 * 1024);
    let body = json!({"model":"gpt-4o","messages":[user(&word)]});
    let view = view("/v1/chat/completions", &body);
    let counter = TokenCounter::for_model("gpt-4o");
    let whole = counter.count(&word) + 7;
    let started = Instant::now();
    let count = prompt_tokens_up_to(&view, &counter, &MediaTokens::default(), usize::MAX);
    assert_eq!(count, Count::Within { tokens: whole });
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let (svc, _) = stack(PromptLimitLayer::new().max_prompt_tokens(whole as u64));
    let (status, ..) = send(&svc, chat(body)).await;
    assert_eq!(status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Exact counts (feature `tokens`), cross-checked with tiktoken-rs

#[cfg(feature = "tokens")]
mod exact {
    use super::*;
    use tiktoken_rs::CoreBPE;

    fn tiktoken(model: &str) -> &'static CoreBPE {
        match TokenCounter::for_model(model).encoding() {
            tower_llm_policy::tokens::Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
            _ => tiktoken_rs::cl100k_base_singleton(),
        }
    }

    fn reference(model: &str, text: &str) -> usize {
        tiktoken(model).encode_ordinary(text).len()
    }

    /// OpenAI's cookbook ("How to count tokens with tiktoken"), `num_tokens_from_messages`:
    /// 3 per message, the tokens of every value (role, content, name), 1 more per name, 3 for
    /// the reply.
    fn cookbook(model: &str, messages: &Value) -> usize {
        let mut total = 3;
        for message in messages.as_array().unwrap() {
            total += 3;
            for (key, value) in message.as_object().unwrap() {
                total += reference(model, value.as_str().unwrap());
                if key == "name" {
                    total += 1;
                }
            }
        }
        total
    }

    /// The cookbook's example conversation.
    fn example_messages() -> Value {
        json!([
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
        ])
    }

    fn count(path: &str, body: &Value) -> usize {
        let view = view(path, body);
        let model = view.canonical_model().unwrap_or_default().to_owned();
        let counter = TokenCounter::for_model(&model);
        prompt_tokens_up_to(&view, &counter, &MediaTokens::default(), usize::MAX).tokens()
    }

    #[test]
    fn every_role_is_one_token() {
        for model in ["gpt-4o", "gpt-4"] {
            for role in [
                "system",
                "developer",
                "user",
                "assistant",
                "tool",
                "function",
            ] {
                assert_eq!(reference(model, role), 1, "{model} {role}");
            }
        }
    }

    #[test]
    fn cookbook_example_matches_its_published_count() {
        // The cookbook prints 129 prompt tokens for gpt-4-0613 / gpt-3.5-turbo (cl100k_base)
        let body = json!({"model":"gpt-4-0613","messages": example_messages()});
        assert_eq!(count("/v1/chat/completions", &body), 129);
        assert_eq!(cookbook("gpt-4", &example_messages()), 129);
        // ... and 124 for gpt-4o (o200k_base).
        let body = json!({"model":"gpt-4o","messages": example_messages()});
        assert_eq!(count("/v1/chat/completions", &body), 124);
    }

    #[test]
    fn chat_counts_match_the_cookbook_with_tiktoken() {
        let samples = [
            example_messages(),
            json!([{"role":"user","content":"hello world"}]),
            json!([
                {"role":"system","content":"You are terse."},
                {"role":"user","name":"alice","content":"日本語のテキストを数えます。 emoji 😀👍🏽"},
                {"role":"assistant","content":"fn main() { println!(\"hi\"); }"},
                {"role":"user","content":"   leading and trailing spaces   \n\n\n"},
            ]),
        ];
        for model in ["gpt-4o", "gpt-4o-mini-2024-07-18", "gpt-4", "gpt-3.5-turbo"] {
            for messages in &samples {
                let body = json!({"model": model, "messages": messages});
                assert_eq!(
                    count("/v1/chat/completions", &body),
                    cookbook(model, messages),
                    "{model} {messages}"
                );
            }
        }
    }

    #[test]
    fn text_parts_count_like_strings() {
        let parts = json!({"model":"gpt-4o","messages":[{"role":"user","content":[
            {"type":"text","text":"The quick brown fox"},
            {"type":"text","text":" jumps over the lazy dog."}
        ]}]});
        let expected = reference("gpt-4o", "The quick brown fox")
            + reference("gpt-4o", " jumps over the lazy dog.")
            + 3
            + 1
            + 3;
        assert_eq!(count("/v1/chat/completions", &parts), expected);
    }

    #[test]
    fn other_endpoints_count_their_text() {
        let text = "The quick brown fox jumps over the lazy dog.";
        for (path, body, expected) in [
            (
                "/v1/completions",
                json!({"model":"gpt-3.5-turbo-instruct","prompt":[text, text]}),
                2 * reference("gpt-3.5-turbo-instruct", text),
            ),
            (
                "/v1/embeddings",
                json!({"model":"text-embedding-3-small","input":text}),
                reference("text-embedding-3-small", text),
            ),
            (
                "/v1/responses",
                json!({"model":"gpt-4.1","instructions":"Be terse.","input":text}),
                reference("gpt-4.1", "Be terse.") + reference("gpt-4.1", text),
            ),
            (
                "/v1/completions",
                json!({"model":"davinci-002","prompt":[[1, 2, 3], [4]]}),
                4,
            ),
        ] {
            assert_eq!(count(path, &body), expected, "{path} {body}");
        }
    }

    #[tokio::test]
    async fn the_limit_is_exact_and_the_message_gives_the_count() {
        let messages = example_messages();
        let body = json!({"model":"gpt-4o","messages": messages});
        let exact = cookbook("gpt-4o", &messages) as u64;
        let (svc, _) = stack(PromptLimitLayer::new().max_prompt_tokens(exact));
        let (status, ..) = send(&svc, chat(body.clone())).await;
        assert_eq!(status, StatusCode::OK);

        let mut key = ApiKey::new("k");
        key.max_prompt_tokens = Some(exact - 1);
        let (status, json, _) = send(&svc, with_key(chat(body.clone()), key)).await;
        assert_too_long(status, &json, "messages");
        assert_eq!(
            message(&json),
            format!(
                "Prompt is at least {exact} tokens; the limit for this key is {} tokens.",
                exact - 1
            )
        );
        // Well over the limit: counting stops early, the count is a lower bound over the limit.
        let (svc, _) = stack(PromptLimitLayer::new().max_prompt_tokens(20));
        let (_, json, _) = send(&svc, chat(body)).await;
        let counted: u64 = message(&json)
            .strip_prefix("Prompt is at least ")
            .and_then(|m| m.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(counted > 20 && counted <= exact, "{counted}");
    }

    #[tokio::test]
    async fn tools_definitions_are_counted() {
        let tools = json!([{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}]);
        let body = json!({"model":"gpt-4o","messages":[user("hi")],"tools": tools});
        let expected = reference("gpt-4o", "hi") + 7 + reference("gpt-4o", &tools.to_string());
        assert_eq!(count("/v1/chat/completions", &body), expected);
    }
}

#[cfg(not(feature = "tokens"))]
mod estimated {
    use super::*;

    #[tokio::test]
    async fn without_the_feature_the_count_is_an_estimate_and_says_so() {
        let (svc, _) = stack(PromptLimitLayer::new().max_prompt_tokens(10));
        // 10 tokens exactly, estimated at more than the 3 left after one message's framing (7).
        let body = json!({"model":"gpt-4o","messages":[user("The quick brown fox jumps over the lazy dog.")]});
        let (status, json, _) = send(&svc, chat(body)).await;
        assert_too_long(status, &json, "messages");
        assert!(
            message(&json).contains("tokens (estimated, erring high)"),
            "{json}"
        );
    }

    #[test]
    fn estimate_is_the_estimate_of_the_text() {
        // 41 letters: 16 + 40 × 11 sixteenths of a token, rounded up.
        let body = json!({"model":"gpt-4o","input":"x".repeat(41)});
        let view = view("/v1/responses", &body);
        let counter = TokenCounter::for_model("gpt-4o");
        assert!(!counter.is_exact());
        assert_eq!(
            prompt_tokens_up_to(&view, &counter, &MediaTokens::default(), usize::MAX),
            Count::Within {
                tokens: tower_llm_policy::tokens::estimate(&"x".repeat(41))
            }
        );
        assert_eq!(tower_llm_policy::tokens::estimate(&"x".repeat(41)), 29);
    }
}

// ---------------------------------------------------------------------------------------------
// In a stack

#[tokio::test]
async fn behind_feature_block_the_body_is_parsed_once_and_clamped() {
    use tower_llm_policy::feature_block::FeatureBlockLayer;
    let log: Log = Arc::default();
    let seen = log.clone();
    let svc = ServiceBuilder::new()
        // Reads and parses the body (a model block applies) ...
        .layer(FeatureBlockLayer::new().block_models(["dall-e-3"]))
        // ... and PromptLimit reuses the view, then rewrites the body.
        .layer(
            PromptLimitLayer::new()
                .max_output_tokens(100)
                .max_prompt_tokens(1000)
                .output_limit_mode(OutputLimitMode::Clamp),
        )
        .service(service_fn(move |req: Request<PolicyBody>| {
            let seen = seen.clone();
            async move {
                let (parts, body) = req.into_parts();
                let view = parts.extensions.get::<LlmRequest>().unwrap();
                let body = body.collect().await.unwrap().to_bytes();
                seen.lock().unwrap().push(Seen {
                    body,
                    content_length: None,
                    transfer_encoding: None,
                    max_tokens: view.max_tokens(),
                    max_completion_tokens: None,
                    max_output_tokens: None,
                });
                Ok::<_, Infallible>(Response::new(String::new()))
            }
        }));
    let body = json!({"model":"gpt-4o","messages":[user("hi")],"max_tokens":500});
    let (status, ..) = send(&svc, chat(body)).await;
    assert_eq!(status, StatusCode::OK);
    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(seen.max_tokens, Some(100));
    let sent: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(sent["max_tokens"], 100);

    // Both layers still refuse on their own.
    let (status, json, _) = send(
        &svc,
        post(
            "/v1/images/generations",
            &json!({"model":"dall-e-3","prompt":"x"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json["error"]["code"], "feature_blocked");
    let (status, json, rejection) = send(
        &svc,
        chat(json!({"model":"gpt-4o","messages":[user(&"word ".repeat(2000))]})),
    )
    .await;
    assert_too_long(status, &json, "messages");
    assert_eq!(rejection.unwrap().layer, Layer::PromptLimit);
}

#[tokio::test]
async fn a_prompt_no_longer_in_bytes_than_the_limit_passes_uncounted() {
    // 12 bytes of text: at most 12 tokens however tokenized, plus 7 for one chat message.
    let body = json!({"model":"gpt-4o","messages":[user("日本語のテ")]});
    let bytes = "日本語のテ".len() as u64;
    let view = view("/v1/chat/completions", &body);
    let counter = TokenCounter::for_model("gpt-4o");
    let tokens =
        prompt_tokens_up_to(&view, &counter, &MediaTokens::default(), usize::MAX).tokens() as u64;
    assert!(tokens <= bytes + 7);
    for limit in [bytes + 7, tokens] {
        let (svc, _) = stack(PromptLimitLayer::new().max_prompt_tokens(limit));
        let (status, ..) = send(&svc, chat(body.clone())).await;
        assert_eq!(status, StatusCode::OK, "limit {limit}");
    }
    let (svc, _) = stack(PromptLimitLayer::new().max_prompt_tokens(tokens - 1));
    let (status, json, _) = send(&svc, chat(body)).await;
    assert_too_long(status, &json, "messages");
}

#[tokio::test]
async fn max_messages_counts_responses_input_items() {
    let (svc, log) = stack(PromptLimitLayer::new().max_messages(2));
    let items = |n: usize| {
        let input: Vec<Value> = (0..n)
            .map(|i| json!({"role": "user", "content": [{"type": "input_text", "text": format!("turn {i}")}]}))
            .collect();
        post("/v1/responses", &json!({"model": "gpt-4o", "input": input}))
    };
    let (status, ..) = send(&svc, items(2)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, json, _) = send(&svc, items(3)).await;
    assert_too_long(status, &json, "input");
    assert_eq!(
        message(&json),
        "Request has 3 messages; the limit for this workspace is 2 messages."
    );
    // A plain string input is no list of items, and embeddings inputs are not messages.
    let (status, ..) = send(
        &svc,
        post("/v1/responses", &json!({"model": "gpt-4o", "input": "hi"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, ..) = send(
        &svc,
        post(
            "/v1/embeddings",
            &json!({"model": "text-embedding-3-small", "input": ["a", "b", "c"]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        log.lock().unwrap().len(),
        3,
        "the refused request reached the inner service"
    );
}
