//! The policy reads what the upstream reads: the probes an attacker tried, each kept as a test
//! through the recommended stack (Audit → BodyLimit → KeyAuth → FeatureBlock → ModelAllowList
//! → PromptLimit) over an upstream that records every request it gets. A refused request never
//! reaches it; an accepted one is read the way OpenAI reads it.

mod common;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use common::{answer, Answer, Inner};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::{AuditLayer, MemorySink};
use tower_llm_policy::{
    ApiKey, BodyLimitLayer, FeatureBlockLayer, KeyAuthLayer, MemoryKeyStore, ModelAllowListLayer,
    OutputLimitMode, PolicyBody, PromptLimitLayer,
};

/// May use gpt-4o-mini, whisper-1 and gpt-realtime-mini; no images, no text to speech.
const LIMITED: &str = "sk-limited-0123456789";
/// May use gpt-4o-mini and gpt-image-1 (model limits only).
const MODELS_ONLY: &str = "sk-models-only-0123456789";
/// No limits at all.
const FREE: &str = "sk-free-0123456789";

fn store() -> Arc<MemoryKeyStore> {
    Arc::new(
        MemoryKeyStore::new()
            .with_key(
                LIMITED,
                ApiKey::new("limited")
                    .model_limits(["gpt-4o-mini", "whisper-1", "gpt-realtime-mini"])
                    .blocked_features("images,audio_speech".parse().unwrap()),
            )
            .with_key(
                MODELS_ONLY,
                ApiKey::new("models-only").model_limits(["gpt-4o-mini", "gpt-image-1"]),
            )
            .with_key(FREE, ApiKey::new("free")),
    )
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Stack = tower::util::BoxCloneService<
    Request<PolicyBody>,
    Response<UnsyncBoxBody<Bytes, BoxError>>,
    Infallible,
>;

fn boxed<B>(r: Response<B>) -> Response<UnsyncBoxBody<Bytes, BoxError>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    r.map(|b| b.map_err(Into::into).boxed_unsync())
}

/// The recommended stack over a recording upstream; `prompt` is the PromptLimit layer.
fn stack(prompt: PromptLimitLayer) -> (Stack, Inner, MemorySink) {
    let inner = Inner::default();
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .layer(BodyLimitLayer::new())
        .layer(KeyAuthLayer::new(store()))
        .layer(FeatureBlockLayer::new())
        .layer(ModelAllowListLayer::new())
        .layer(prompt)
        .service(inner.service());
    let svc = ServiceExt::<Request<PolicyBody>>::map_response(svc, boxed);
    (tower::util::BoxCloneService::new(svc), inner, sink)
}

fn default_stack() -> (Stack, Inner, MemorySink) {
    stack(PromptLimitLayer::new())
}

fn request(
    method: &str,
    path: &str,
    key: &str,
    content_type: &str,
    body: &str,
) -> Request<PolicyBody> {
    Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", content_type)
        .body(PolicyBody::from(body.to_owned()))
        .unwrap()
}

fn json(path: &str, key: &str, body: &str) -> Request<PolicyBody> {
    request("POST", path, key, "application/json", body)
}

async fn send(svc: &Stack, req: Request<PolicyBody>) -> Answer {
    answer(svc.clone().oneshot(req).await.unwrap()).await
}

/// Sends `req`, asserts it was refused with `status` and `code` and never forwarded, and
/// that it left one audit record.
async fn refused(req: Request<PolicyBody>, status: StatusCode, code: &str) -> String {
    refused_by(default_stack(), req, status, code).await
}

async fn refused_by(
    (svc, inner, sink): (Stack, Inner, MemorySink),
    req: Request<PolicyBody>,
    status: StatusCode,
    code: &str,
) -> String {
    let what = format!("{} {}", req.method(), req.uri());
    let a = send(&svc, req).await;
    assert!(!a.status.is_success(), "{what} passed");
    let (got, message) = a.error();
    assert_eq!(
        (a.status, got.as_str()),
        (status, code),
        "{what}: {message}"
    );
    assert_eq!(inner.calls(), 0, "{what} was forwarded");
    assert_eq!(sink.len(), 1, "{what}: one audit record");
    message
}

/// Sends `req`, asserts it was forwarded, and returns what the upstream received.
async fn passed(req: Request<PolicyBody>) -> common::Seen {
    passed_by(default_stack(), req).await
}

async fn passed_by(
    (svc, inner, _): (Stack, Inner, MemorySink),
    req: Request<PolicyBody>,
) -> common::Seen {
    let what = format!("{} {}", req.method(), req.uri());
    let a = send(&svc, req).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{what}: {}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(inner.calls(), 1, "{what}");
    inner.last()
}

// ---- 1. a query parameter does not replace the body's model --------------------------------

#[tokio::test]
async fn a_deployment_query_parameter_does_not_replace_the_body_model_on_v1_paths() {
    // OpenAI ignores `deployment` and runs the session's model.
    let body = r#"{"session":{"type":"realtime","model":"gpt-realtime"}}"#;
    refused(
        json(
            "/v1/realtime/client_secrets?deployment=gpt-realtime-mini",
            LIMITED,
            body,
        ),
        StatusCode::FORBIDDEN,
        "model_not_allowed",
    )
    .await;
    // The WebSocket: `?model=` runs, `?deployment=` is ignored on a /v1 path.
    refused(
        request(
            "GET",
            "/v1/realtime?model=gpt-realtime&deployment=gpt-realtime-mini",
            LIMITED,
            "application/json",
            "",
        ),
        StatusCode::FORBIDDEN,
        "model_not_allowed",
    )
    .await;
    passed(request(
        "GET",
        "/v1/realtime?model=gpt-realtime-mini",
        LIMITED,
        "application/json",
        "",
    ))
    .await;
}

// ---- 2. every field that selects a model is read ---------------------------------------------

#[tokio::test]
async fn a_realtime_call_reads_the_model_in_its_multipart_session_part() {
    let body = multipart(
        "b0",
        &[
            ("form-data; name=\"sdp\"", "v=0\r\no=- 1 2 IN IP4 127.0.0.1"),
            (
                "form-data; name=\"session\"",
                r#"{"type":"realtime","model":"gpt-realtime"}"#,
            ),
        ],
    );
    refused(
        request(
            "POST",
            "/v1/realtime/calls",
            LIMITED,
            "multipart/form-data; boundary=b0",
            &body,
        ),
        StatusCode::FORBIDDEN,
        "model_not_allowed",
    )
    .await;
    let body = body.replace("\"gpt-realtime\"", "\"gpt-realtime-mini\"");
    let seen = passed(request(
        "POST",
        "/v1/realtime/calls",
        LIMITED,
        "multipart/form-data; boundary=b0",
        &body,
    ))
    .await;
    assert_eq!(seen.view.unwrap().model(), Some("gpt-realtime-mini"));
}

#[tokio::test]
async fn nested_models_are_checked() {
    let cases = [
        // The transcription model of a transcription session.
        (
            "/v1/realtime/transcription_sessions",
            r#"{"input_audio_transcription":{"model":"gpt-4o-transcribe"}}"#,
        ),
        // A GA transcription session names it deeper.
        (
            "/v1/realtime/client_secrets",
            r#"{"session":{"type":"transcription","audio":{"input":{"transcription":{"model":"gpt-4o-transcribe"}}}}}"#,
        ),
        // The realtime model's own transcription model.
        (
            "/v1/realtime/client_secrets",
            r#"{"session":{"type":"realtime","model":"gpt-realtime-mini","audio":{"input":{"transcription":{"model":"gpt-4o-transcribe"}}}}}"#,
        ),
        // A Responses tool that generates images with its own model.
        (
            "/v1/responses",
            r#"{"model":"gpt-4o-mini","input":"draw","tools":[{"type":"image_generation","model":"dall-e-3"}]}"#,
        ),
        // A grader's model.
        (
            "/v1/fine_tuning/alpha/graders/run",
            r#"{"grader":{"type":"score_model","name":"g","model":"o3","input":[]},"model_sample":"x"}"#,
        ),
        // A multi grader nests graders.
        (
            "/v1/fine_tuning/alpha/graders/validate",
            r#"{"grader":{"type":"multi","graders":{"a":{"type":"label_model","model":"o3"}}}}"#,
        ),
        // A fine-tuning job's reinforcement grader.
        (
            "/v1/fine_tuning/jobs",
            r#"{"model":"gpt-4o-mini","training_file":"f","method":{"type":"reinforcement","reinforcement":{"grader":{"type":"score_model","model":"o3"}}}}"#,
        ),
        // An eval's model grader.
        (
            "/v1/evals",
            r#"{"data_source_config":{"type":"custom"},"testing_criteria":[{"type":"label_model","model":"o3","input":[]}]}"#,
        ),
        // An eval run's sampling model.
        (
            "/v1/evals/e1/runs",
            r#"{"data_source":{"type":"completions","model":"o3","source":{"type":"file_id","id":"f"}}}"#,
        ),
        // An Azure deployment path with a different model in the body: another upstream would
        // run that one.
        (
            "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21",
            r#"{"model":"gpt-4o","messages":[]}"#,
        ),
    ];
    for (path, body) in cases {
        refused(
            json(path, MODELS_ONLY, body),
            StatusCode::FORBIDDEN,
            "model_not_allowed",
        )
        .await;
    }
    passed(json(
        "/v1/realtime/transcription_sessions",
        LIMITED,
        r#"{"input_audio_transcription":{"model":"whisper-1"}}"#,
    ))
    .await;
}

#[tokio::test]
async fn an_image_generation_tool_is_the_image_generation_feature() {
    let body =
        r#"{"model":"gpt-4o-mini","input":"draw a cat","tools":[{"type":"image_generation"}]}"#;
    let message = refused(
        json("/v1/responses", LIMITED, body),
        StatusCode::UNPROCESSABLE_ENTITY,
        "feature_blocked",
    )
    .await;
    assert!(message.contains("images"), "{message}");
    // The model-only key may generate images with gpt-image-1.
    passed(json(
        "/v1/responses",
        MODELS_ONLY,
        r#"{"model":"gpt-4o-mini","input":"draw","tools":[{"type":"image_generation","model":"gpt-image-1"}]}"#,
    ))
    .await;
}

#[tokio::test]
async fn a_request_that_runs_an_unseen_model_is_refused_to_a_limited_key() {
    for (path, body) in [
        // Realtime sessions default to a model the API does not document.
        ("/v1/realtime/sessions", "{}"),
        (
            "/v1/realtime/client_secrets",
            r#"{"session":{"type":"realtime"}}"#,
        ),
        // A run without `model` runs its assistant's model.
        ("/v1/threads/t1/runs", r#"{"assistant_id":"a1"}"#),
        (
            "/v1/threads/runs",
            r#"{"assistant_id":"a1","thread":{"messages":[]}}"#,
        ),
        // A remix runs its source video's model.
        ("/v1/videos/v1/remix", r#"{"prompt":"again"}"#),
        // An endpoint the policy does not know.
        (
            "/v1/chatkit/sessions",
            r#"{"workflow":{"id":"w"},"user":"u"}"#,
        ),
    ] {
        refused(
            json(path, LIMITED, body),
            StatusCode::FORBIDDEN,
            "unverifiable_request",
        )
        .await;
        // A key without model limits is not concerned.
        passed(json(path, FREE, body)).await;
    }
    // Naming the model is enough.
    passed(json(
        "/v1/threads/t1/runs",
        LIMITED,
        r#"{"assistant_id":"a1","model":"gpt-4o-mini"}"#,
    ))
    .await;
    // A video without a model runs the documented default, which is checked.
    refused(
        json("/v1/videos", MODELS_ONLY, r#"{"prompt":"a cat"}"#),
        StatusCode::FORBIDDEN,
        "model_not_allowed",
    )
    .await;
}

// ---- 3. batches ------------------------------------------------------------------------------

#[tokio::test]
async fn batches_are_refused_to_limited_keys_and_their_sub_resources_pass() {
    let body =
        r#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions","completion_window":"24h"}"#;
    let message = refused(
        json("/v1/batches", LIMITED, body),
        StatusCode::FORBIDDEN,
        "unverifiable_request",
    )
    .await;
    assert!(message.contains("input file"), "{message}");
    // A prompt limit alone is a limit too.
    refused_by(
        stack(PromptLimitLayer::new().max_prompt_chars(1000)),
        json("/v1/batches", FREE, body),
        StatusCode::FORBIDDEN,
        "unverifiable_request",
    )
    .await;
    passed(json("/v1/batches", FREE, body)).await;
    passed(json("/v1/batches/batch_1/cancel", LIMITED, "")).await;
    passed(request(
        "GET",
        "/v1/batches/batch_1",
        LIMITED,
        "application/json",
        "",
    ))
    .await;
}

// ---- 4. multipart parser differentials ---------------------------------------------------------

fn multipart(boundary: &str, parts: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (disposition, value) in parts {
        out.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n{value}\r\n"
        ));
    }
    out.push_str(&format!("--{boundary}--\r\n"));
    out
}

fn transcription(content_type: &str, body: &str) -> Request<PolicyBody> {
    request(
        "POST",
        "/v1/audio/transcriptions",
        LIMITED,
        content_type,
        body,
    )
}

#[tokio::test]
async fn ambiguous_multipart_headers_are_refused_not_guessed() {
    let file = ("form-data; name=\"file\"; filename=\"a.wav\"", "RIFF");
    let bodies = [
        // RFC 2231 names: python-multipart reads `name*`.
        multipart(
            "b1",
            &[
                file,
                ("form-data; name*=UTF-8''model", "gpt-4o-transcribe"),
                ("form-data; name=\"model\"", "whisper-1"),
            ],
        ),
        // Parameter names in another case.
        multipart(
            "b1",
            &[
                file,
                ("form-data; NAME=\"model\"", "gpt-4o-transcribe"),
                ("form-data; name=\"model\"", "whisper-1"),
            ],
        ),
        // Two names in one part: parsers take the first or the last.
        multipart(
            "b1",
            &[
                file,
                ("form-data; name=\"x\"; name=\"model\"", "gpt-4o-transcribe"),
                ("form-data; name=\"model\"", "whisper-1"),
            ],
        ),
        // The model sent as a file.
        multipart(
            "b1",
            &[
                file,
                (
                    "form-data; name=\"model\"; filename=\"m.txt\"",
                    "gpt-4o-transcribe",
                ),
            ],
        ),
        // A quoted-pair escape.
        multipart(
            "b1",
            &[
                file,
                ("form-data; name=\"mod\\el\"", "gpt-4o-transcribe"),
                ("form-data; name=\"model\"", "whisper-1"),
            ],
        ),
    ];
    for body in &bodies {
        refused(
            transcription("multipart/form-data; boundary=b1", body),
            StatusCode::BAD_REQUEST,
            "ambiguous_request",
        )
        .await;
    }
    // A part that some parsers decode from base64.
    let encoded = "--b1\r\nContent-Disposition: form-data; name=\"model\"\r\nContent-Transfer-Encoding: base64\r\n\r\nZ3B0LTRv\r\n--b1--\r\n";
    refused(
        transcription("multipart/form-data; boundary=b1", encoded),
        StatusCode::BAD_REQUEST,
        "ambiguous_request",
    )
    .await;
    // The boundary given twice: one parser splits on the first, another on the second.
    let body = multipart("b2", &[file, ("form-data; name=\"model\"", "whisper-1")]);
    for content_type in [
        "multipart/form-data; boundary=b1; boundary=b2",
        "multipart/form-data; boundary=b2; BOUNDARY=b1",
        "multipart/form-data; boundary*=b2",
    ] {
        refused(
            transcription(content_type, &body),
            StatusCode::BAD_REQUEST,
            "ambiguous_request",
        )
        .await;
    }
    // The plain form passes, and its model is the one read.
    let seen = passed(transcription("multipart/form-data; boundary=\"b2\"", &body)).await;
    assert_eq!(seen.view.unwrap().model(), Some("whisper-1"));
}

// ---- 5. every text field the model reads counts ------------------------------------------------

#[tokio::test]
async fn prompt_text_in_every_field_the_model_reads_counts() {
    let long = "word ".repeat(60); // 300 characters
    let cases = [
        (
            "/v1/responses",
            serde_json::json!({"model":"gpt-4o-mini","prompt":{"id":"p1","variables":{"topic":long}}}),
        ),
        (
            "/v1/responses",
            serde_json::json!({"model":"gpt-4o-mini","prompt":{"id":"p1","variables":{"doc":{"type":"input_text","text":long}}}}),
        ),
        (
            "/v1/completions",
            serde_json::json!({"model":"gpt-4o-mini","prompt":"a","suffix":long}),
        ),
        (
            "/v1/threads/runs",
            serde_json::json!({"assistant_id":"a","model":"gpt-4o-mini","thread":{"messages":[{"role":"user","content":long}]}}),
        ),
        (
            "/v1/threads/t1/runs",
            serde_json::json!({"assistant_id":"a","model":"gpt-4o-mini","additional_instructions":long}),
        ),
        (
            "/v1/threads/t1/runs",
            serde_json::json!({"assistant_id":"a","model":"gpt-4o-mini","additional_messages":[{"role":"user","content":long}]}),
        ),
        (
            "/v1/chat/completions",
            serde_json::json!({"model":"gpt-4o-mini","messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"custom","custom":{"name":"t","input":long}}]}]}),
        ),
        (
            "/v1/responses",
            serde_json::json!({"model":"gpt-4o-mini","input":[{"type":"custom_tool_call","call_id":"c","name":"t","input":long}]}),
        ),
        (
            "/v1/chat/completions",
            serde_json::json!({"model":"gpt-4o-mini","messages":[],"response_format":{"type":"json_schema","json_schema":{"name":"s","schema":{"description":long}}}}),
        ),
        (
            "/v1/responses",
            serde_json::json!({"model":"gpt-4o-mini","input":"hi","text":{"format":{"type":"json_schema","name":"s","schema":{"description":long}}}}),
        ),
        (
            "/v1/chat/completions",
            serde_json::json!({"model":"gpt-4o-mini","messages":[],"prediction":{"type":"content","content":long}}),
        ),
        (
            "/v1/realtime/client_secrets",
            serde_json::json!({"session":{"type":"realtime","model":"gpt-realtime-mini","instructions":long}}),
        ),
    ];
    for (path, body) in cases {
        refused_by(
            stack(PromptLimitLayer::new().max_prompt_chars(200)),
            json(path, FREE, &body.to_string()),
            StatusCode::BAD_REQUEST,
            "prompt_too_long",
        )
        .await;
    }
}

// ---- 6. case and encoding differentials --------------------------------------------------------

#[tokio::test]
async fn keys_that_fold_onto_a_policy_field_are_refused() {
    for body in [
        r#"{"MODEL":"gpt-4o","messages":[]}"#,
        r#"{"model":"gpt-4o-mini","Model":"gpt-4o","messages":[]}"#,
        r#"{"model":"gpt-4o-mini","messages":[],"max_to\u212Aens":100000}"#,
        r#"{"model":"gpt-4o-mini","messages":[],"ſtream":true}"#,
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","Content":"hidden"}]}"#,
        r#"{"model":"gpt-4o-mini","input":"x","tools":[{"type":"image_generation","MODEL":"gpt-image-1"}]}"#,
    ] {
        let message = refused(
            json("/v1/chat/completions", FREE, body),
            StatusCode::BAD_REQUEST,
            "invalid_request_body",
        )
        .await;
        assert!(message.contains("only in case"), "{body}: {message}");
    }
    // A key inside a tool's JSON schema is the user's own.
    passed(json(
        "/v1/chat/completions",
        FREE,
        r#"{"model":"gpt-4o-mini","messages":[],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"Model":{"type":"string"}}}}}]}"#,
    ))
    .await;
}

#[tokio::test]
async fn encoded_paths_and_ambiguous_queries_are_refused() {
    for path in [
        "/v1/chat%2Fcompletions",
        "/v1/images/%2e%2e/chat/completions",
        "/v1/chat/completions/..",
        "/v1/./chat/completions",
        "/v1\\chat/completions",
        "/v1/chat/completions%00",
    ] {
        refused(
            json(path, FREE, r#"{"model":"gpt-4o-mini","messages":[]}"#),
            StatusCode::BAD_REQUEST,
            "ambiguous_request",
        )
        .await;
    }
    for path in [
        "/v1/realtime?model=gpt-realtime-mini&model=gpt-realtime",
        "/v1/realtime?mod%65l=gpt-realtime",
        "/v1/realtime?Model=gpt-realtime",
        "/v1/realtime?model=gpt%2Drealtime",
    ] {
        refused(
            request("GET", path, LIMITED, "application/json", ""),
            StatusCode::BAD_REQUEST,
            "ambiguous_request",
        )
        .await;
    }
}

#[tokio::test]
async fn only_configured_provider_prefixes_are_dropped() {
    // `o3-mini/gpt-4o-mini` is not gpt-4o-mini: an upstream that routes on the prefix runs o3-mini.
    refused(
        json(
            "/v1/chat/completions",
            LIMITED,
            r#"{"model":"o3-mini/gpt-4o-mini","messages":[]}"#,
        ),
        StatusCode::FORBIDDEN,
        "model_not_allowed",
    )
    .await;
    passed(json(
        "/v1/chat/completions",
        LIMITED,
        r#"{"model":"openai/gpt-4o-mini","messages":[]}"#,
    ))
    .await;
}

// ---- 7. methods ----------------------------------------------------------------------------------

#[tokio::test]
async fn put_and_patch_are_checked_like_post_and_odd_methods_are_refused() {
    let forbidden = r#"{"model":"gpt-4o","messages":[]}"#;
    for method in ["PUT", "PATCH"] {
        refused(
            request(
                method,
                "/v1/chat/completions",
                LIMITED,
                "application/json",
                forbidden,
            ),
            StatusCode::FORBIDDEN,
            "model_not_allowed",
        )
        .await;
    }
    for method in ["post", "Post", "FOO"] {
        refused(
            request(
                method,
                "/v1/chat/completions",
                LIMITED,
                "application/json",
                forbidden,
            ),
            StatusCode::BAD_REQUEST,
            "ambiguous_request",
        )
        .await;
    }
}

// ---- 8. sub-resources are their own endpoints -------------------------------------------------

#[tokio::test]
async fn sub_resources_that_run_no_model_are_not_asked_for_one() {
    for (path, body) in [
        ("/v1/responses/resp_1/cancel", ""),
        (
            "/v1/conversations",
            r#"{"items":[{"type":"message","role":"user","content":"hi"}]}"#,
        ),
        ("/v1/conversations/c1/items", r#"{"items":[]}"#),
        (
            "/v1/chat/completions/chatcmpl-1",
            r#"{"metadata":{"a":"b"}}"#,
        ),
        ("/v1/fine_tuning/jobs/ft-1/cancel", ""),
        (
            "/v1/threads/t1/messages",
            r#"{"role":"user","content":"hi"}"#,
        ),
        ("/v1/realtime/calls/c1/hangup", ""),
    ] {
        passed(json(path, LIMITED, body)).await;
    }
    // Counting input tokens names a model, which is checked when given.
    refused(
        json(
            "/v1/responses/input_tokens",
            LIMITED,
            r#"{"model":"gpt-4o","input":"hi"}"#,
        ),
        StatusCode::FORBIDDEN,
        "model_not_allowed",
    )
    .await;
}

// ---- 9. limits that were not applied ----------------------------------------------------------

#[tokio::test]
async fn realtime_output_limits_of_inf_are_clamped_or_refused() {
    let clamp = || {
        stack(
            PromptLimitLayer::new()
                .max_output_tokens(1000)
                .output_limit_mode(OutputLimitMode::Clamp),
        )
    };
    // Top level (beta sessions): clamped in place.
    let seen = passed_by(
        clamp(),
        json(
            "/v1/realtime/sessions",
            FREE,
            r#"{"model":"gpt-realtime-mini","max_response_output_tokens":"inf"}"#,
        ),
    )
    .await;
    let sent: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(sent["max_response_output_tokens"], 1000);
    // Inside a session: cannot be rewritten in place, so refused.
    let message = refused_by(
        clamp(),
        json("/v1/realtime/client_secrets", FREE, r#"{"session":{"type":"realtime","model":"gpt-realtime-mini","max_output_tokens":"inf"}}"#),
        StatusCode::BAD_REQUEST,
        "prompt_too_long",
    )
    .await;
    assert!(message.contains("\"inf\""), "{message}");
    // Reject mode refuses the top-level one too.
    refused_by(
        stack(
            PromptLimitLayer::new()
                .max_output_tokens(1000)
                .output_limit_mode(OutputLimitMode::Reject),
        ),
        json(
            "/v1/realtime/sessions",
            FREE,
            r#"{"model":"gpt-realtime-mini","max_response_output_tokens":"inf"}"#,
        ),
        StatusCode::BAD_REQUEST,
        "prompt_too_long",
    )
    .await;
}

#[tokio::test]
async fn chat_audio_output_is_text_to_speech() {
    for body in [
        r#"{"model":"gpt-4o-mini","modalities":["text","audio"],"messages":[]}"#,
        r#"{"model":"gpt-4o-mini","audio":{"voice":"alloy","format":"wav"},"messages":[]}"#,
    ] {
        let message = refused(
            json("/v1/chat/completions", LIMITED, body),
            StatusCode::UNPROCESSABLE_ENTITY,
            "feature_blocked",
        )
        .await;
        assert!(message.contains("audio_speech"), "{message}");
    }
    passed(json(
        "/v1/chat/completions",
        LIMITED,
        r#"{"model":"gpt-4o-mini","modalities":["text"],"messages":[]}"#,
    ))
    .await;
}

#[tokio::test]
async fn the_stack_answers_every_probe_without_a_server_error() {
    // A sweep of odd inputs: whatever they are, the answer is a 2xx or an OpenAI-shaped 4xx.
    let (svc, _, sink) = default_stack();
    let bodies = [
        "",
        "null",
        "[]",
        "{",
        r#"{"model":1}"#,
        r#"{"model":"gpt-4o-mini","messages":{}}"#,
    ];
    let paths = [
        "/v1/chat/completions",
        "/v1/realtime/client_secrets",
        "/v1/evals",
        "/v1/unknown",
        "/v1/batches",
    ];
    let mut n = 0;
    for path in paths {
        for body in bodies {
            let a = send(&svc, json(path, LIMITED, body)).await;
            n += 1;
            assert!(
                a.status.is_success() || a.status.is_client_error(),
                "{path} {body}: {}",
                a.status
            );
            if !a.status.is_success() {
                a.error();
            }
        }
    }
    assert_eq!(sink.len(), n, "one record per request");
}
