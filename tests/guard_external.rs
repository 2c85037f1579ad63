//! The external guards (`OpenAiModerator`, `WebhookModerator`) against a mock HTTP server on
//! loopback (axum), reached through a real HTTP client (hyper-util's).
#![cfg(feature = "guards")]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tower_llm_policy::guard::external::{
    ModerationInput, Moderator, OpenAiModerator, Verdict, WebhookModerator,
};

const SECRET: &str = "sk-test-very-secret-0123456789";
const USER_TEXT: &str = "my private words";

/// One request the mock received.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Value,
}

type Answer = Arc<dyn Fn(&Value) -> (u16, String) + Send + Sync>;

#[derive(Clone)]
struct MockState {
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Answer,
}

/// A mock moderation server (any path) on loopback, answering with `answer` of each
/// request's JSON body.
struct Mock {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Mock {
    async fn start(answer: impl Fn(&Value) -> (u16, String) + Send + Sync + 'static) -> Mock {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = MockState {
            seen: seen.clone(),
            answer: Arc::new(answer),
        };
        async fn handle(
            State(state): State<MockState>,
            uri: axum::http::Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> (StatusCode, String) {
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let (status, answer) = (state.answer)(&body);
            state.seen.lock().unwrap().push(Seen {
                path: uri.path().to_owned(),
                headers,
                body,
            });
            (StatusCode::from_u16(status).unwrap(), answer)
        }
        let app = Router::new()
            .route("/v1/moderations", post(handle))
            .route("/hook", post(handle))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Mock { addr, seen }
    }

    /// Answers every request with `status` and `body`.
    async fn fixed(status: u16, body: &str) -> Mock {
        let body = body.to_owned();
        Mock::start(move |_| (status, body.clone())).await
    }

    fn uri(&self, path: &str) -> http::Uri {
        format!("http://{}{path}", self.addr).parse().unwrap()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn openai(mock: &Mock) -> OpenAiModerator<HttpClient> {
    OpenAiModerator::new(client())
        .uri(mock.uri("/v1/moderations"))
        .api_key(SECRET)
}

fn webhook(mock: &Mock) -> WebhookModerator<HttpClient> {
    WebhookModerator::new(client(), mock.uri("/hook")).secret_header("x-webhook-secret", SECRET)
}

fn input(texts: &[&str]) -> ModerationInput {
    ModerationInput::new(texts.iter().copied())
}

/// An OpenAI moderation answer: one result per `(flagged, true categories)`.
fn results(results: &[(bool, &[&str])]) -> String {
    let all = ["hate", "harassment", "violence", "self-harm", "sexual"];
    json!({
        "id": "modr-1",
        "model": "omni-moderation-latest",
        "results": results.iter().map(|(flagged, on)| json!({
            "flagged": flagged,
            "categories": all.iter().map(|c| (c.to_string(), json!(on.contains(c)))).collect::<serde_json::Map<_, _>>(),
            "category_scores": {},
        })).collect::<Vec<_>>(),
    })
    .to_string()
}

/// A clean answer with one result per input the request carried.
fn all_clean(body: &Value) -> (u16, String) {
    let n = body["input"].as_array().map_or(0, Vec::len);
    (200, results(&vec![(false, &[][..]); n]))
}

/// Asserts an error message carries neither the secret nor the user's text.
fn assert_clean_message(message: &str) {
    assert!(!message.contains(SECRET), "{message}");
    assert!(!message.contains(USER_TEXT), "{message}");
    assert!(!message.contains("sk-test"), "{message}");
}

#[tokio::test]
async fn openai_flagged_names_the_true_categories_of_flagged_results() {
    let answer = results(&[
        (false, &["sexual"]),
        (true, &["violence", "harassment"]),
        (true, &["violence"]),
    ]);
    let mock = Mock::fixed(200, &answer).await;
    let verdict = openai(&mock)
        .moderate(input(&["a", "b", "c"]))
        .await
        .unwrap();
    assert_eq!(
        verdict,
        Verdict::Flag {
            categories: vec!["harassment".into(), "violence".into()]
        }
    );
}

#[tokio::test]
async fn openai_clean_is_allowed() {
    let mock = Mock::start(all_clean).await;
    let verdict = openai(&mock).moderate(input(&["hello", "world"])).await;
    assert_eq!(verdict, Ok(Verdict::Allow));
    assert_eq!(mock.seen().len(), 1);
}

#[tokio::test]
async fn openai_sends_model_input_array_and_bearer() {
    let mock = Mock::start(all_clean).await;
    let moderator = openai(&mock).model("omni-moderation-2024-09-26");
    moderator
        .moderate(input(&["first", "second"]).key("team-a").model("gpt-4o"))
        .await
        .unwrap();
    let seen = mock.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/moderations");
    assert_eq!(
        seen[0].body,
        json!({"model": "omni-moderation-2024-09-26", "input": ["first", "second"]})
    );
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
    assert_eq!(seen[0].headers["content-type"], "application/json");
}

#[tokio::test]
async fn openai_default_model_is_omni_moderation_latest() {
    let mock = Mock::start(all_clean).await;
    let moderator = OpenAiModerator::new(client()).uri(mock.uri("/v1/moderations"));
    moderator.moderate(input(&["x"])).await.unwrap();
    let seen = mock.seen();
    assert_eq!(seen[0].body["model"], "omni-moderation-latest");
    // No key set: no authorization header.
    assert!(!seen[0].headers.contains_key("authorization"));
}

#[tokio::test]
async fn openai_category_filter_counts_only_the_categories_listed() {
    // `flagged` for violence only: not a listed category.
    let mock = Mock::fixed(200, &results(&[(true, &["violence"])])).await;
    let verdict = openai(&mock)
        .categories(["self-harm", "sexual"])
        .moderate(input(&["x"]))
        .await;
    assert_eq!(verdict, Ok(Verdict::Allow));

    // A listed category is true, whatever `flagged` says; only listed ones are named.
    let mock = Mock::fixed(200, &results(&[(false, &["self-harm", "violence"])])).await;
    let verdict = openai(&mock)
        .categories(["self-harm", "sexual"])
        .moderate(input(&["x"]))
        .await;
    assert_eq!(
        verdict,
        Ok(Verdict::Flag {
            categories: vec!["self-harm".into()]
        })
    );
}

#[tokio::test]
async fn openai_empty_input_is_allowed_without_a_call() {
    let mock = Mock::start(all_clean).await;
    let verdict = openai(&mock).moderate(ModerationInput::default()).await;
    assert_eq!(verdict, Ok(Verdict::Allow));
    assert!(mock.seen().is_empty());
}

#[tokio::test]
async fn openai_many_texts_are_sent_in_chunks() {
    let mock = Mock::start(all_clean).await;
    let texts = ["a", "b", "c", "d", "e"];
    let verdict = openai(&mock)
        .max_inputs_per_call(2)
        .moderate(input(&texts))
        .await;
    assert_eq!(verdict, Ok(Verdict::Allow));
    let sent: Vec<Value> = mock
        .seen()
        .into_iter()
        .map(|s| s.body["input"].clone())
        .collect();
    assert_eq!(
        sent,
        vec![json!(["a", "b"]), json!(["c", "d"]), json!(["e"])]
    );

    // By bytes: a text longer than the limit goes alone, whole.
    let mock = Mock::start(all_clean).await;
    let long = "x".repeat(50);
    openai(&mock)
        .max_bytes_per_call(20)
        .moderate(input(&[
            "0123456789",
            "0123456789",
            "012",
            long.as_str(),
            "z",
        ]))
        .await
        .unwrap();
    let sent: Vec<Value> = mock
        .seen()
        .into_iter()
        .map(|s| s.body["input"].clone())
        .collect();
    assert_eq!(
        sent,
        vec![
            json!(["0123456789", "0123456789"]),
            json!(["012"]),
            json!([long]),
            json!(["z"]),
        ]
    );
}

#[tokio::test]
async fn openai_stops_at_the_first_flagged_chunk() {
    let mock = Mock::start(|body| {
        let texts = body["input"].as_array().unwrap();
        let flags: Vec<(bool, &[&str])> = texts
            .iter()
            .map(|t| {
                if t == "bad" {
                    (true, &["violence"][..])
                } else {
                    (false, &[][..])
                }
            })
            .collect();
        (200, results(&flags))
    })
    .await;
    let verdict = openai(&mock)
        .max_inputs_per_call(1)
        .moderate(input(&["ok", "bad", "never sent"]))
        .await;
    assert_eq!(
        verdict,
        Ok(Verdict::Flag {
            categories: vec!["violence".into()]
        })
    );
    assert_eq!(mock.seen().len(), 2);
}

#[tokio::test]
async fn openai_error_status_is_an_error_without_the_answer() {
    // The server echoes the user's text in its error: not passed on.
    let mock = Mock::fixed(500, &format!("{{\"error\":\"{USER_TEXT}\"}}")).await;
    let error = openai(&mock)
        .moderate(input(&[USER_TEXT]))
        .await
        .unwrap_err();
    assert!(error.0.contains("500"), "{error}");
    assert_clean_message(&error.0);

    let mock = Mock::fixed(401, "{}").await;
    let error = openai(&mock).moderate(input(&["x"])).await.unwrap_err();
    assert!(error.0.contains("401"), "{error}");
}

#[tokio::test]
async fn openai_malformed_json_is_an_error() {
    for answer in [
        "not json",
        "{\"results\": [",
        &format!("{{\"results\": \"{USER_TEXT}\"}}"),
        "{\"results\": [{\"categories\": {}}]}",
    ] {
        let mock = Mock::fixed(200, answer).await;
        let error = openai(&mock)
            .moderate(input(&[USER_TEXT]))
            .await
            .unwrap_err();
        assert_clean_message(&error.0);
    }
}

#[tokio::test]
async fn openai_results_count_mismatch_is_an_error() {
    let mock = Mock::fixed(200, &results(&[(false, &[])])).await;
    let error = openai(&mock)
        .moderate(input(&["a", "b"]))
        .await
        .unwrap_err();
    assert!(error.0.contains("1 results for 2 inputs"), "{error}");
}

#[tokio::test]
async fn openai_answer_over_the_limit_is_an_error() {
    let mock = Mock::start(all_clean).await;
    let error = openai(&mock)
        .max_response_bytes(16)
        .moderate(input(&["a"]))
        .await
        .unwrap_err();
    assert!(error.0.contains("longer than 16 bytes"), "{error}");
}

#[tokio::test]
async fn server_down_is_an_error() {
    // A port that was free a moment ago: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let uri: http::Uri = format!("http://{addr}/v1/moderations").parse().unwrap();
    let error = OpenAiModerator::new(client())
        .uri(uri.clone())
        .api_key(SECRET)
        .moderate(input(&[USER_TEXT]))
        .await
        .unwrap_err();
    assert!(error.0.contains("could not be reached"), "{error}");
    assert_clean_message(&error.0);

    let error = WebhookModerator::new(client(), uri)
        .bearer(SECRET)
        .moderate(input(&[USER_TEXT]))
        .await
        .unwrap_err();
    assert!(error.0.contains("could not be reached"), "{error}");
    assert_clean_message(&error.0);
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn a_service_that_does_not_answer_times_out() {
    // Accepts connections, never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            open.push(conn);
        }
    });
    let uri: http::Uri = format!("http://{addr}/hook").parse().unwrap();
    let error = WebhookModerator::new(client(), uri)
        .timeout(std::time::Duration::from_millis(100))
        .moderate(input(&["x"]))
        .await
        .unwrap_err();
    assert!(error.0.contains("no answer within"), "{error}");
}

#[tokio::test]
async fn webhook_allow() {
    let mock = Mock::fixed(200, r#"{"action":"allow"}"#).await;
    let verdict = webhook(&mock).moderate(input(&["hello"])).await;
    assert_eq!(verdict, Ok(Verdict::Allow));
}

#[tokio::test]
async fn webhook_sends_texts_key_model_and_secret() {
    let mock = Mock::fixed(200, r#"{"action":"allow"}"#).await;
    webhook(&mock)
        .moderate(input(&["one", "two"]).key("team-a").model("gpt-4o"))
        .await
        .unwrap();
    let seen = mock.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/hook");
    assert_eq!(
        seen[0].body,
        json!({"texts": ["one", "two"], "key": "team-a", "model": "gpt-4o"})
    );
    assert_eq!(seen[0].headers["x-webhook-secret"], SECRET);
    assert_eq!(seen[0].headers["content-type"], "application/json");

    // Without key and model: nulls; a bearer token instead of the header.
    let mock = Mock::fixed(200, r#"{"action":"allow"}"#).await;
    WebhookModerator::new(client(), mock.uri("/hook"))
        .bearer(SECRET)
        .moderate(input(&["x"]))
        .await
        .unwrap();
    let seen = mock.seen();
    assert_eq!(
        seen[0].body,
        json!({"texts": ["x"], "key": null, "model": null})
    );
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {SECRET}").as_str()
    );
}

#[tokio::test]
async fn webhook_block_with_and_without_categories() {
    let mock = Mock::fixed(
        200,
        r#"{"action":"block","categories":["pii","pci","pii"]}"#,
    )
    .await;
    let verdict = webhook(&mock).moderate(input(&["x"])).await;
    assert_eq!(
        verdict,
        Ok(Verdict::Flag {
            categories: vec!["pci".into(), "pii".into()]
        })
    );

    let mock = Mock::fixed(200, r#"{"action":"block"}"#).await;
    let verdict = webhook(&mock).moderate(input(&["x"])).await;
    assert_eq!(verdict, Ok(Verdict::Flag { categories: vec![] }));
}

#[tokio::test]
async fn webhook_redact_returns_the_texts() {
    let mock = Mock::start(|body| {
        let texts: Vec<String> = body["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().replace("4111", "[card]"))
            .collect();
        (200, json!({"action": "redact", "texts": texts}).to_string())
    })
    .await;
    let verdict = webhook(&mock)
        .moderate(input(&["hello", "card 4111"]))
        .await;
    assert_eq!(
        verdict,
        Ok(Verdict::Redact {
            texts: vec!["hello".into(), "card [card]".into()]
        })
    );
}

#[tokio::test]
async fn webhook_redact_count_mismatch_is_an_error() {
    let mock = Mock::fixed(200, r#"{"action":"redact","texts":["only one"]}"#).await;
    let error = webhook(&mock)
        .moderate(input(&["a", "b"]))
        .await
        .unwrap_err();
    assert!(error.0.contains("1 texts for 2 sent"), "{error}");
}

#[tokio::test]
async fn webhook_unknown_or_malformed_answers_are_errors() {
    for answer in [
        r#"{"action":"quarantine"}"#,
        r#"{"verdict":"allow"}"#,
        r#"{"action":"redact"}"#,
        "allow",
    ] {
        let mock = Mock::fixed(200, answer).await;
        let error = webhook(&mock)
            .moderate(input(&[USER_TEXT]))
            .await
            .unwrap_err();
        assert_clean_message(&error.0);
    }
    let mock = Mock::fixed(503, r#"{"action":"allow"}"#).await;
    let error = webhook(&mock).moderate(input(&["x"])).await.unwrap_err();
    assert!(error.0.contains("503"), "{error}");
}

#[tokio::test]
async fn webhook_empty_input_is_allowed_without_a_call() {
    let mock = Mock::fixed(200, r#"{"action":"block"}"#).await;
    let verdict = webhook(&mock).moderate(ModerationInput::default()).await;
    assert_eq!(verdict, Ok(Verdict::Allow));
    assert!(mock.seen().is_empty());
}

#[tokio::test]
async fn secrets_are_absent_from_debug_output() {
    let mock = Mock::fixed(200, "{}").await;
    let shown = format!("{:?}", openai(&mock));
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(shown.contains("OpenAiModerator"), "{shown}");
    let shown = format!("{:?}", webhook(&mock));
    assert!(!shown.contains(SECRET), "{shown}");
    let shown = format!(
        "{:?}",
        WebhookModerator::new(client(), mock.uri("/hook")).bearer(SECRET)
    );
    assert!(!shown.contains(SECRET), "{shown}");
    // A password in the URI is not shown either.
    let shown = format!(
        "{:?}",
        OpenAiModerator::new(client()).uri(
            "http://user:pa55word@example.com/v1/moderations"
                .parse()
                .unwrap()
        )
    );
    assert!(!shown.contains("pa55word"), "{shown}");
    assert!(shown.contains("example.com/v1/moderations"), "{shown}");
    // Nor the user's text in the input's.
    let shown = format!("{:?}", input(&[USER_TEXT]));
    assert!(!shown.contains(USER_TEXT), "{shown}");
}

#[tokio::test]
async fn an_invalid_secret_fails_every_call_without_showing_it() {
    let mock = Mock::start(all_clean).await;
    let error = OpenAiModerator::new(client())
        .uri(mock.uri("/v1/moderations"))
        .api_key("bad\nkey-sk-test")
        .moderate(input(&["x"]))
        .await
        .unwrap_err();
    assert_clean_message(&error.0);
    assert!(mock.seen().is_empty());
}

// The moderators behind a `GuardLayer`: flagged, clean, an outage failing closed or open, a
// webhook's redaction.

mod layer {
    use std::convert::Infallible;

    use http::{Request, Response, StatusCode};
    use http_body_util::BodyExt;
    use tower::{service_fn, ServiceBuilder, ServiceExt};
    use tower_llm_policy::audit::{AuditLayer, MemorySink};
    use tower_llm_policy::guard::{Guard, GuardLayer, Mode};
    use tower_llm_policy::PolicyBody;

    use super::*;

    /// What a request through `Audit → guards → upstream` came to: its status, its body, what
    /// the upstream got (if it was called) and the audit record's flags.
    struct Outcome {
        status: StatusCode,
        body: Value,
        forwarded: Option<Value>,
        flags: Vec<String>,
    }

    async fn through(guard: Guard, user_text: &str) -> Outcome {
        let forwarded = Arc::new(Mutex::new(None));
        let seen = forwarded.clone();
        let sink = MemorySink::new();
        let svc = ServiceBuilder::new()
            .layer(AuditLayer::new(sink.clone()))
            .layer(GuardLayer::new().guard(guard))
            .service(service_fn(move |req: Request<PolicyBody>| {
                let seen = seen.clone();
                async move {
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    *seen.lock().unwrap() = Some(serde_json::from_slice::<Value>(&body).unwrap());
                    let mut response = Response::new(Full::new(Bytes::from_static(
                        br#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
                    )));
                    response
                        .headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, Infallible>(response)
                }
            }));
        let req = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(
                json!({"model": "gpt-4o", "messages": [{"role": "user", "content": user_text}]})
                    .to_string(),
            )
            .unwrap();
        let response = svc.oneshot(req).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let records = sink.records();
        assert_eq!(records.len(), 1);
        let forwarded = forwarded.lock().unwrap().take();
        Outcome {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            forwarded,
            flags: records[0].flags.clone(),
        }
    }

    /// Flags a text that says "hate" (violence, harassment), allows the rest.
    fn moderation(body: &Value) -> (u16, String) {
        let flags: Vec<(bool, &[&str])> = body["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                if t.as_str().unwrap().contains("hate") {
                    (true, &["harassment", "violence"][..])
                } else {
                    (false, &[][..])
                }
            })
            .collect();
        (200, results(&flags))
    }

    fn down() -> http::Uri {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        format!("http://{addr}/v1/moderations").parse().unwrap()
    }

    #[tokio::test]
    async fn flagged_text_is_blocked_and_clean_text_forwarded() {
        let mock = Mock::start(moderation).await;
        let out = through(Guard::external("moderation", openai(&mock)), "I hate you").await;
        assert_eq!(out.status, StatusCode::BAD_REQUEST);
        assert_eq!(out.body["error"]["code"], "content_blocked");
        let message = out.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("harassment, violence"), "{message}");
        assert!(out.forwarded.is_none());

        let out = through(Guard::external("moderation", openai(&mock)), "hello").await;
        assert_eq!(out.status, StatusCode::OK);
        assert_eq!(out.forwarded.unwrap()["messages"][0]["content"], "hello");
        assert_eq!(mock.seen().len(), 2);
    }

    #[tokio::test]
    async fn an_external_guard_on_responses_only_is_not_asked_about_the_request() {
        let mock = Mock::start(moderation).await;
        let guard = Guard::external("moderation", openai(&mock))
            .on(tower_llm_policy::guard::Sides::RESPONSE);
        let out = through(guard, "I hate you").await;
        assert_eq!(out.status, StatusCode::OK);
        assert!(out.forwarded.is_some());
        assert!(mock.seen().is_empty(), "asked about the request");
    }

    #[tokio::test]
    async fn flagged_text_in_audit_mode_is_forwarded_and_flagged() {
        let mock = Mock::start(moderation).await;
        let guard = Guard::external("moderation", openai(&mock)).mode(Mode::Audit);
        let out = through(guard, "I hate you").await;
        assert_eq!(out.status, StatusCode::OK);
        assert!(out.forwarded.is_some());
        assert!(
            out.flags.contains(&"guard:moderation".to_owned()),
            "{:?}",
            out.flags
        );
    }

    #[tokio::test]
    async fn an_outage_fails_closed_by_default_and_open_when_told() {
        for fail_open in [false, true] {
            let moderator = OpenAiModerator::new(client()).uri(down()).api_key(SECRET);
            let guard = Guard::external("moderation", moderator).fail_open(fail_open);
            let out = through(guard, "hello").await;
            if fail_open {
                assert_eq!(out.status, StatusCode::OK);
                assert!(out.forwarded.is_some());
                assert!(
                    out.flags
                        .contains(&"guard:moderation:unavailable".to_owned()),
                    "{:?}",
                    out.flags
                );
            } else {
                assert_eq!(out.status, StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(out.body["error"]["code"], "policy_unavailable");
                assert!(out.forwarded.is_none());
                let message = out.body.to_string();
                assert!(!message.contains(SECRET), "{message}");
            }
        }
        // An error status and an unreadable answer are outages too.
        for mock in [
            Mock::fixed(500, "{}").await,
            Mock::fixed(200, "not json").await,
        ] {
            let out = through(Guard::external("moderation", openai(&mock)), "hello").await;
            assert_eq!(out.status, StatusCode::SERVICE_UNAVAILABLE);
            let guard = Guard::external("moderation", openai(&mock)).fail_open(true);
            assert_eq!(through(guard, "hello").await.status, StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn a_webhook_blocks_or_redacts_what_is_forwarded() {
        let mock = Mock::start(|body| {
            let texts: Vec<String> = body["texts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().replace("4111 1111", "[card]"))
                .collect();
            if texts.iter().any(|t| t.contains("block me")) {
                return (
                    200,
                    json!({"action": "block", "categories": ["dlp"]}).to_string(),
                );
            }
            (200, json!({"action": "redact", "texts": texts}).to_string())
        })
        .await;
        let guard = Guard::external("dlp", webhook(&mock)).mode(Mode::Redact);
        let out = through(guard, "my card is 4111 1111").await;
        assert_eq!(out.status, StatusCode::OK);
        assert_eq!(
            out.forwarded.unwrap()["messages"][0]["content"],
            "my card is [card]"
        );

        let guard = Guard::external("dlp", webhook(&mock)).mode(Mode::Redact);
        let out = through(guard, "block me").await;
        assert_eq!(out.status, StatusCode::BAD_REQUEST);
        assert_eq!(out.body["error"]["code"], "content_blocked");
        assert!(out.forwarded.is_none());
    }
}
