//! The parsed-once request view: body limits, malformed input, what the view extracts, and
//! that the body is read once however many layers are stacked.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use common::{answer, chat, post, with_key, CountingBody, Inner};
use http::{Request, StatusCode};
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_policy::request::{BodyOptions, PromptSource};
use tower_llm_policy::{
    ApiKey, Endpoint, KeyAuthLayer, LlmRequest, MemoryKeyStore, ModelAllowListLayer,
};

fn key() -> Arc<ApiKey> {
    Arc::new(ApiKey::new("k").model_limits(["gpt-4o*", "text-embedding-3-small"]))
}

async fn send(layer: ModelAllowListLayer, mut req: Request<String>) -> (common::Answer, Inner) {
    req.extensions_mut().insert(key());
    let inner = Inner::default();
    let svc = ServiceBuilder::new().layer(layer).service(inner.service());
    (answer(svc.oneshot(req).await.unwrap()).await, inner)
}

async fn view_of(body: &str) -> LlmRequest {
    let (a, inner) = send(
        ModelAllowListLayer::new(),
        post("/v1/chat/completions", body),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    inner.last().view.unwrap()
}

#[tokio::test]
async fn declared_length_over_the_limit_is_413_before_reading() {
    let layer = ModelAllowListLayer::new().policy(tower_llm_policy::Policy::new().body_options(
        BodyOptions {
            limit: 1024,
            ..BodyOptions::default()
        },
    ));
    let mut req = post("/v1/chat/completions", chat("gpt-4o"));
    req.headers_mut()
        .insert("content-length", "999999".parse().unwrap());
    let (a, inner) = send(layer, req).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(a.error().0, "request_too_large");
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn a_body_longer_than_declared_or_without_length_stops_at_the_limit() {
    let layer = || {
        ModelAllowListLayer::new().policy(tower_llm_policy::Policy::new().body_options(
            BodyOptions {
                limit: 1024,
                ..BodyOptions::default()
            },
        ))
    };
    let big = chat(&"gpt-4o".repeat(400));
    // No Content-Length: the limit still holds while reading.
    let (a, inner) = send(layer(), post("/v1/chat/completions", big.clone())).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(inner.calls(), 0);
    // A lying Content-Length (small) does not help.
    let mut req = post("/v1/chat/completions", big);
    req.headers_mut()
        .insert("content-length", "10".parse().unwrap());
    let (a, _) = send(layer(), req).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    // A garbage Content-Length is a 400.
    let mut req = post("/v1/chat/completions", chat("gpt-4o"));
    req.headers_mut()
        .insert("content-length", "ten".parse().unwrap());
    assert_eq!(send(layer(), req).await.0.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn malformed_bodies_are_400_invalid_request_body_and_never_forwarded() {
    let cases = [
        ("{", None),
        ("not json", None),
        ("[1,2,3]", None),
        ("\"just a string\"", None),
        (r#"{"model":"gpt-4o"} trailing"#, None),
        (r#"{"model":5,"messages":[]}"#, Some("model")),
        (r#"{"model":"gpt-4o","stream":"yes"}"#, Some("stream")),
        (r#"{"model":"gpt-4o","max_tokens":-5}"#, Some("max_tokens")),
        (r#"{"model":"gpt-4o","max_tokens":1.5}"#, Some("max_tokens")),
        (
            r#"{"model":"gpt-4o","messages":{"role":"user"}}"#,
            Some("messages"),
        ),
        (
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":true}]}"#,
            Some("messages"),
        ),
        (r#"{"model":"gpt-4o","user":["a"]}"#, Some("user")),
        // Smuggling: the upstream may take the last duplicate, we would check the first.
        (r#"{"model":"gpt-4o","model":"o1-pro"}"#, Some("model")),
        (r#"{"model":"gpt-4o","mod\u0065l":"o1-pro"}"#, Some("model")),
    ];
    for (body, param) in cases {
        let (a, inner) = send(
            ModelAllowListLayer::new(),
            post("/v1/chat/completions", body),
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        let (code, message) = a.error();
        assert_eq!(code, "invalid_request_body", "{body}");
        assert_eq!(a.rejection.as_ref().unwrap().layer.as_str(), "request_body");
        if let Some(param) = param {
            assert_eq!(a.json()["error"]["param"], param, "{body}: {message}");
        }
        assert_eq!(inner.calls(), 0, "{body} was forwarded");
    }
}

#[tokio::test]
async fn escaped_model_is_unescaped_before_the_check() {
    let (a, _) = send(
        ModelAllowListLayer::new(),
        post(
            "/v1/chat/completions",
            r#"{"model":"o1-pr\u006f","messages":[]}"#,
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.error().1.contains("o1-pro"));
}

#[tokio::test]
async fn the_view_extracts_what_the_layers_use() {
    let body = serde_json::json!({
        "model": "gpt-4o-2024-08-06",
        "user": "alice",
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_completion_tokens": 300,
        "n": 2,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "name": "bob", "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{\"q\":\"cat\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "a cat\non a mat"}
        ],
        "tools": [{"type": "function", "function": {"name": "look", "parameters": {}}}],
        "temperature": 0.2,
        "metadata": {"content": "not prompt text"}
    })
    .to_string();
    let v = view_of(&body).await;
    assert_eq!(v.endpoint(), Endpoint::ChatCompletions);
    assert_eq!(v.model(), Some("gpt-4o-2024-08-06"));
    assert_eq!(v.canonical_model(), Some("gpt-4o"));
    assert_eq!(v.user(), Some("alice"));
    assert!(v.stream());
    assert_eq!(v.include_usage(), Some(true));
    assert_eq!(v.max_output(), Some(300));
    assert_eq!(v.n(), Some(2));
    assert_eq!(v.message_count(), 4);
    assert_eq!(v.message_names(), 1);
    let texts: Vec<(PromptSource, &str)> = v.prompt_parts().map(|p| (p.source, p.text)).collect();
    assert_eq!(
        texts,
        vec![
            (PromptSource::Message, "Be brief."),
            // serde_json's `json!` sorts keys: `content` comes before `name` in this body.
            (PromptSource::Message, "What is in this image?"),
            (PromptSource::Message, "bob"),
            (PromptSource::Message, "{\"q\":\"cat\"}"),
            (PromptSource::Message, "a cat\non a mat"),
            (
                PromptSource::Tools,
                r#"[{"function":{"name":"look","parameters":{}},"type":"function"}]"#
            ),
        ]
    );
    assert_eq!(v.media().images, 1);
    assert_eq!(v.media().audio, 1);
    // Debug shows sizes, not prompt text.
    assert!(!format!("{v:?}").contains("Be brief"));
}

#[tokio::test]
async fn completions_embeddings_and_responses_prompts() {
    let send_to = |path: &'static str, body: String| async move {
        let (a, inner) = send(ModelAllowListLayer::new(), post(path, body)).await;
        assert_eq!(a.status, StatusCode::OK);
        inner.last().view.unwrap()
    };
    let v = send_to(
        "/v1/completions",
        r#"{"model":"gpt-4o-mini","prompt":["one","two"],"max_tokens":7,"best_of":3}"#.into(),
    )
    .await;
    assert_eq!(v.endpoint(), Endpoint::Completions);
    assert_eq!(
        v.prompt_parts().map(|p| p.text).collect::<Vec<_>>(),
        ["one", "two"]
    );
    assert_eq!(v.best_of(), Some(3));

    let v = send_to(
        "/v1/embeddings",
        r#"{"model":"text-embedding-3-small","input":[[1,2,3],[4,5]]}"#.into(),
    )
    .await;
    assert_eq!(v.prompt_token_ids(), 5);
    assert_eq!(v.prompt_parts().count(), 0);

    let v = send_to(
        "/v1/responses",
        serde_json::json!({
            "model": "gpt-4o",
            "instructions": "Talk like a pirate.",
            "max_output_tokens": 50,
            "safety_identifier": "user-7",
            "input": [
                {"role": "user", "content": [
                    {"type": "input_text", "text": "Hi"},
                    {"type": "input_image", "image_url": "https://example.com/a.png"},
                    {"type": "input_file", "file_id": "file-1"}
                ]},
                {"type": "function_call_output", "call_id": "c", "output": "42"}
            ]
        })
        .to_string(),
    )
    .await;
    assert_eq!(v.endpoint(), Endpoint::Responses);
    let texts: Vec<_> = v.prompt_parts().map(|p| (p.source, p.text)).collect();
    assert_eq!(
        texts,
        [
            (PromptSource::Input, "Hi"),
            (PromptSource::Input, "42"),
            (PromptSource::Instructions, "Talk like a pirate."),
        ]
    );
    assert_eq!(v.media().images, 1);
    assert_eq!(v.media().files, 1);
    assert_eq!(v.max_output(), Some(50));
    assert_eq!(v.user(), Some("user-7"));
}

#[tokio::test]
async fn escaped_prompt_text_is_unescaped() {
    let v = view_of(
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"caf\u00e9 \"quoted\""}]}"#,
    )
    .await;
    assert_eq!(v.prompt_parts().next().unwrap().text, "café \"quoted\"");
    assert_eq!(v.prompt_chars(), 13);
}

/// The body is read once with every layer stacked, in either order, and the inner service
/// receives it whole.
#[tokio::test]
async fn body_is_read_once_with_all_layers_stacked() {
    let store = Arc::new(
        MemoryKeyStore::new().with_key("sk-1", ApiKey::new("one").model_limits(["gpt-4o"])),
    );
    let text = chat("gpt-4o");
    for key_auth_first in [true, false] {
        let inner = Inner::default();
        let (body, polls) = CountingBody::new(&text, 4);
        let req = with_key(
            Request::post("/v1/chat/completions").body(body).unwrap(),
            "sk-1",
        );
        let resp = if key_auth_first {
            ServiceBuilder::new()
                .layer(KeyAuthLayer::new(store.clone()))
                .layer(ModelAllowListLayer::new().workspace_models(["gpt-4o*"]))
                .layer(ModelAllowListLayer::new())
                .service(inner.service())
                .oneshot(req)
                .await
                .unwrap()
                .map(|b| b.boxed_unsync_for_test())
        } else {
            ServiceBuilder::new()
                .layer(ModelAllowListLayer::new().workspace_models(["gpt-4o*"]))
                .layer(KeyAuthLayer::new(store.clone()))
                .layer(ModelAllowListLayer::new())
                .service(inner.service())
                .oneshot(req)
                .await
                .unwrap()
                .map(|b| b.boxed_unsync_for_test())
        };
        let a = answer(resp).await;
        assert_eq!(a.status, StatusCode::OK);
        // 4 data frames and one end-of-stream poll: read exactly once.
        assert_eq!(polls.load(Ordering::SeqCst), 5);
        let seen = inner.last();
        assert!(seen.body_was_buffered);
        assert_eq!(seen.body, Bytes::from(text.clone()));
        assert!(seen.view.is_some());
        assert_eq!(seen.key.unwrap().name, "one");
    }
}

trait BoxForTest {
    fn boxed_unsync_for_test(self) -> http_body_util::combinators::UnsyncBoxBody<Bytes, String>;
}

impl<B> BoxForTest for B
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    fn boxed_unsync_for_test(self) -> http_body_util::combinators::UnsyncBoxBody<Bytes, String> {
        use http_body_util::BodyExt;
        self.map_err(|e| format!("{e:?}")).boxed_unsync()
    }
}

#[tokio::test]
async fn no_client_input_causes_a_panic_or_a_5xx() {
    // Deterministic pseudo-random mutations of valid bodies, plus hostile shapes.
    let seeds = [
        chat("gpt-4o"),
        r#"{"model":"gpt-4o","input":[[1,2],[3]],"prompt":["a",["b"]]}"#.to_owned(),
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#
            .to_owned(),
    ];
    let mut hostile = vec![
        "[".repeat(100_000),
        format!(
            "{{\"model\":\"gpt-4o\",\"messages\":{}{}}}",
            "[".repeat(5000),
            "]".repeat(5000)
        ),
        format!(
            "{{\"model\":\"gpt-4o\",\"input\":{}1{}}}",
            "[".repeat(120),
            "]".repeat(120)
        ),
        format!("{{\"model\":\"gpt-4o\",\"n\":{}}}", "9".repeat(400)),
        "{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"\\ud800\"}]}".into(),
        "\u{feff}{}".into(),
        String::new(),
    ];
    let mut state = 0x2545_f491_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for seed in &seeds {
        for _ in 0..300 {
            let mut bytes = seed.clone().into_bytes();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[i] = (next() % 128) as u8,
                    1 => {
                        bytes.remove(i);
                    }
                    _ => bytes.insert(i, b"{}[]\",:0\\"[(next() % 9) as usize]),
                }
            }
            hostile.push(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    for body in hostile {
        let (a, _) = send(
            ModelAllowListLayer::new(),
            post("/v1/chat/completions", body.clone()),
        )
        .await;
        assert!(
            a.status.is_success() || a.status.is_client_error(),
            "{} for {body:.200}",
            a.status
        );
        if !a.status.is_success() {
            a.error();
        }
    }
}
