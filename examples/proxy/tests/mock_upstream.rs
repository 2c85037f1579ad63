//! The mock upstream (`src/mock.rs`) answers like OpenAI and records what it got.
//! Driven as a tower service (its axum `Router`), no sockets.

use axum::body::Body;
use bytes::Bytes;
use example_proxy::mock;
use http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use mock::MockOptions;
use serde_json::{json, Value};
use tower::ServiceExt;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn call(opts: &MockOptions, req: Request<Body>) -> (StatusCode, String, Bytes) {
    let response = mock::router(opts.clone()).oneshot(req).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, content_type, body)
}

fn post(path: &str, body: Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, "Bearer sk-test")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// The JSON payloads of an SSE body, `[DONE]` left out, with their `event:` names.
fn events(body: &[u8]) -> (Vec<(Option<String>, Value)>, bool) {
    let text = std::str::from_utf8(body).unwrap();
    let mut out = Vec::new();
    let mut done = false;
    for block in text.split("\n\n").filter(|b| !b.is_empty()) {
        let mut name = None;
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_owned());
            } else if let Some(data) = line.strip_prefix("data: ") {
                if data == "[DONE]" {
                    done = true;
                } else {
                    out.push((name.clone(), serde_json::from_str(data).unwrap()));
                }
            }
        }
    }
    (out, done)
}

#[tokio::test]
async fn chat_completion_echoes_the_model_and_counts_words() -> TestResult {
    let opts = MockOptions::default().stream_chunks(5);
    let req = post(
        "/v1/chat/completions",
        json!({
            "model": "gpt-4.1",
            "messages": [
                { "role": "system", "content": "be brief" },
                { "role": "user", "content": [{ "type": "text", "text": "one two three" }] }
            ]
        }),
    );
    let (status, content_type, body) = call(&opts, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/json");
    let body: Value = serde_json::from_slice(&body)?;
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4.1");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], 5);
    assert_eq!(usage["completion_tokens"], 5);
    assert_eq!(usage["total_tokens"], 10);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 0);
    Ok(())
}

#[tokio::test]
async fn streamed_chat_ends_with_a_usage_chunk_and_done() -> TestResult {
    let opts = MockOptions::default().stream_chunks(3);
    let req = post(
        "/v1/chat/completions",
        json!({
            "model": "gpt-4o",
            "stream": true,
            "stream_options": { "include_usage": true },
            "messages": [{ "role": "user", "content": "hi there" }]
        }),
    );
    let (status, content_type, body) = call(&opts, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/event-stream");
    let (chunks, done) = events(&body);
    assert!(done);
    assert!(chunks
        .iter()
        .all(|(_, c)| c["object"] == "chat.completion.chunk" && c["model"] == "gpt-4o"));
    let text: String = chunks
        .iter()
        .filter_map(|(_, c)| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, mock::answer_words(3).join(" "));
    let (_, last) = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["prompt_tokens"], 2);
    assert_eq!(last["usage"]["completion_tokens"], 3);
    // Before the last, `usage` is present and null, as OpenAI sends it.
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|(_, c)| c.get("usage") == Some(&Value::Null)));
    Ok(())
}

#[tokio::test]
async fn streamed_chat_without_include_usage_has_no_usage() -> TestResult {
    let req = post(
        "/v1/chat/completions",
        json!({ "model": "gpt-4o", "stream": true, "messages": [] }),
    );
    let (_, _, body) = call(&MockOptions::default(), req).await;
    let (chunks, done) = events(&body);
    assert!(done);
    assert!(chunks.iter().all(|(_, c)| c.get("usage").is_none()));
    Ok(())
}

#[tokio::test]
async fn streamed_completions_carry_usage_when_asked() -> TestResult {
    let req = post(
        "/v1/completions",
        json!({
            "model": "gpt-3.5-turbo-instruct",
            "prompt": "a b c d",
            "stream": true,
            "stream_options": { "include_usage": true }
        }),
    );
    let (_, _, body) = call(&MockOptions::default(), req).await;
    let (chunks, done) = events(&body);
    assert!(done);
    assert_eq!(chunks[0].1["object"], "text_completion");
    assert_eq!(chunks.last().unwrap().1["usage"]["prompt_tokens"], 4);
    Ok(())
}

#[tokio::test]
async fn responses_stream_has_created_deltas_and_completed_with_usage() -> TestResult {
    let opts = MockOptions::default().stream_chunks(4);
    let req = post(
        "/v1/responses",
        json!({
            "model": "o3-mini",
            "stream": true,
            "instructions": "be nice",
            "input": [{ "role": "user", "content": [{ "type": "input_text", "text": "x y z" }] }]
        }),
    );
    let (status, _, body) = call(&opts, req).await;
    assert_eq!(status, StatusCode::OK);
    let (events, _) = events(&body);
    let names: Vec<&str> = events.iter().filter_map(|(n, _)| n.as_deref()).collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "response.output_text.delta")
            .count(),
        4
    );
    for (name, event) in &events {
        assert_eq!(event["type"].as_str(), name.as_deref());
    }
    let completed = &events.last().unwrap().1["response"];
    assert_eq!(completed["model"], "o3-mini");
    assert_eq!(completed["usage"]["input_tokens"], 5);
    assert_eq!(completed["usage"]["output_tokens"], 4);
    assert_eq!(completed["usage"]["total_tokens"], 9);
    Ok(())
}

#[tokio::test]
async fn responses_json_has_usage() -> TestResult {
    let req = post(
        "/v1/responses",
        json!({ "model": "gpt-4o", "input": "a b" }),
    );
    let (_, _, body) = call(&MockOptions::default(), req).await;
    let body: Value = serde_json::from_slice(&body)?;
    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["usage"]["input_tokens"], 2);
    assert_eq!(body["output"][0]["content"][0]["type"], "output_text");
    Ok(())
}

#[tokio::test]
async fn embeddings_are_deterministic() -> TestResult {
    let req = || {
        post(
            "/v1/embeddings",
            json!({ "model": "text-embedding-3-small", "input": ["a b", "c"], "dimensions": 4 }),
        )
    };
    let opts = MockOptions::default();
    let (_, _, first) = call(&opts, req()).await;
    let (_, _, second) = call(&opts, req()).await;
    let body: Value = serde_json::from_slice(&first)?;
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["data"][0]["embedding"].as_array().unwrap().len(), 4);
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["model"], "text-embedding-3-small");
    assert_eq!(
        body["data"],
        serde_json::from_slice::<Value>(&second)?["data"]
    );
    Ok(())
}

#[tokio::test]
async fn images_and_moderations_answer() -> TestResult {
    let opts = MockOptions::default();
    let req = post(
        "/v1/images/generations",
        json!({ "model": "dall-e-3", "prompt": "a cat", "n": 2 }),
    );
    let (status, _, body) = call(&opts, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&body)?["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let req = post(
        "/v1/moderations",
        json!({ "model": "omni-moderation-latest", "input": "hello" }),
    );
    let (status, _, body) = call(&opts, req).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body)?;
    assert_eq!(body["model"], "omni-moderation-latest");
    assert_eq!(body["results"][0]["flagged"], false);
    Ok(())
}

#[tokio::test]
async fn models_list_and_lookup() -> TestResult {
    let opts = MockOptions::default();
    let (status, _, body) = call(&opts, Request::get("/v1/models").body(Body::empty())?).await;
    assert_eq!(status, StatusCode::OK);
    let body: Value = serde_json::from_slice(&body)?;
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    for id in [
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "o3-mini",
        "dall-e-3",
        "text-embedding-3-small",
        "whisper-1",
    ] {
        assert!(ids.contains(&id), "{id}");
    }
    let (status, _, body) = call(
        &opts,
        Request::get("/v1/models/o3-mini").body(Body::empty())?,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&body)?["id"], "o3-mini");
    let (status, _, body) =
        call(&opts, Request::get("/v1/models/gpt-9").body(Body::empty())?).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        serde_json::from_slice::<Value>(&body)?["error"]["code"],
        "model_not_found"
    );
    Ok(())
}

#[tokio::test]
async fn unknown_routes_are_openai_shaped_404s() -> TestResult {
    let req = Request::builder()
        .method(Method::DELETE)
        .uri("/v1/nothing/here")
        .body(Body::empty())?;
    let (status, content_type, body) = call(&MockOptions::default(), req).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(content_type, "application/json");
    let body: Value = serde_json::from_slice(&body)?;
    let error = body["error"].as_object().unwrap();
    for key in ["message", "type", "param", "code"] {
        assert!(error.contains_key(key), "{key}");
    }
    Ok(())
}

#[tokio::test]
async fn transcription_reads_the_multipart_body() -> TestResult {
    let opts = MockOptions::default();
    let multipart = "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
                     --b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
                     Content-Type: audio/wav\r\n\r\nRIFF....\r\n--b--\r\n";
    let req = Request::post("/v1/audio/transcriptions")
        .header(header::CONTENT_TYPE, "multipart/form-data; boundary=b")
        .body(Body::from(multipart))?;
    let (status, _, body) = call(&opts, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_slice::<Value>(&body)?["text"],
        mock::TRANSCRIPTION
    );
    assert_eq!(opts.log.last().unwrap().body_len, multipart.len());
    Ok(())
}

#[tokio::test]
async fn every_request_is_recorded() -> TestResult {
    let opts = MockOptions::default().record_body_limit(4);
    let req = Request::post("/v1/chat/completions?a=b")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, "Bearer sk-test")
        .body(Body::from(r#"{"model":"gpt-4o","messages":[]}"#))?;
    call(&opts, req).await;
    call(&opts, Request::get("/nope").body(Body::empty())?).await;

    let got = opts.log.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].method, Method::POST);
    assert_eq!(got[0].path, "/v1/chat/completions");
    assert_eq!(got[0].query.as_deref(), Some("a=b"));
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer sk-test"));
    assert_eq!(got[0].headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(&got[0].body[..], b"{\"mo");
    assert!(got[0].body_len > 4);
    assert_eq!(got[1].path, "/nope");
    Ok(())
}

#[tokio::test]
async fn bad_json_is_a_400() -> TestResult {
    let req = Request::post("/v1/chat/completions").body(Body::from("{nope"))?;
    let (status, _, body) = call(&MockOptions::default(), req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(serde_json::from_slice::<Value>(&body)?["error"]["message"].is_string());
    Ok(())
}
