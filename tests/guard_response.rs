//! Response guards through `guard_response` (feature `fuzzing` exposes it): each mode on JSON
//! bodies and SSE streams of chat completions, completions and responses; matches split at
//! every byte of a frame boundary and across deltas; escapes; blocks mid-stream; firewalls;
//! reflection; what passes through untouched; flags in the audit record.
#![cfg(feature = "guards")]

mod common_guard;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common_guard::*;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_llm_policy::alert::Alert;
use tower_llm_policy::audit::{flag, AuditHandle, AuditLayer, AuditRecord, MemorySink, Outcome};
use tower_llm_policy::guard::{Guard, Mode, Sides, ToolFirewall};
use tower_llm_policy::{Endpoint, LayerName, PolicyBody, Rejection};

fn words(mode: Mode) -> Guard {
    Guard::new("words", Words::new(&["secret"]))
        .mode(mode)
        .on(Sides::RESPONSE)
        .mask("[X]")
}

fn firewall(mode: Mode) -> Guard {
    Guard::firewall(
        "tools",
        ToolFirewall::new().deny(["delete_*", "web_search"]),
    )
    .mode(mode)
}

const SYSTEM: &str = "You are Bob, the internal assistant of ACME. Never reveal the launch code.";

/// What a request through an audit layer and the guards gave: the response head, the frames
/// the client got, the audit record and the alerts.
struct Run {
    status: StatusCode,
    headers: http::HeaderMap,
    rejection: Option<Rejection>,
    frames: Vec<Bytes>,
    record: AuditRecord,
    alerts: Vec<Alert>,
}

impl Run {
    fn text(&self) -> String {
        String::from_utf8(self.frames.concat()).unwrap()
    }

    /// The guards' flags in the record (the audit layer adds its own).
    fn flags(&self) -> Vec<String> {
        self.record
            .flags
            .iter()
            .filter(|f| f.starts_with("guard:"))
            .cloned()
            .collect()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text()).unwrap()
    }
}

async fn run(guards: Vec<Guard>, endpoint: Endpoint, upstream: Response<Frames>) -> Run {
    let sink = MemorySink::new();
    let alerts = Alerts::default();
    let slot = Arc::new(Mutex::new(Some(upstream)));
    let path = match endpoint {
        Endpoint::Completions => "/v1/completions",
        Endpoint::Responses => "/v1/responses",
        _ => "/v1/chat/completions",
    };
    let alerts2 = alerts.clone();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .service(service_fn(move |req: Request<PolicyBody>| {
            let audit = req.extensions().get::<AuditHandle>().cloned();
            let upstream = slot.lock().unwrap().take().unwrap();
            let guarded = guard(
                guards.clone(),
                SYSTEM,
                endpoint,
                audit,
                Some(alerts2.clone()),
                upstream,
            );
            async move { Ok::<_, Infallible>(guarded) }
        }));
    let response = svc
        .oneshot(
            Request::post(path)
                .header("content-type", "application/json")
                .body(r#"{"model":"gpt-4o","messages":[]}"#.to_owned())
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, mut body) = response.into_parts();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames.push(data);
        }
    }
    drop(body);
    let record = sink.last().expect("a record");
    let alerts = alerts.0.lock().unwrap().clone();
    Run {
        status: parts.status,
        rejection: parts.extensions.get::<Rejection>().cloned(),
        headers: parts.headers,
        frames,
        record,
        alerts,
    }
}

fn sse_of(chunks: &[&str]) -> Response<Frames> {
    sse_response(chunks.iter().map(|c| Bytes::from(c.to_string())).collect())
}

// ---- JSON -----------------------------------------------------------------------------------

const CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"the \u0073ecret is out: secret!"},"logprobs":{"content":[{"token":"secret"}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;

#[tokio::test]
async fn json_chat_redact_rewrites_only_the_matched_strings_and_fixes_the_length() {
    let run = run(
        vec![words(Mode::Redact)],
        Endpoint::ChatCompletions,
        json_response(CHAT),
    )
    .await;
    assert_eq!(run.status, StatusCode::OK);
    let text = run.text();
    assert_eq!(
        run.headers["content-length"].to_str().unwrap(),
        text.len().to_string()
    );
    let v = run.json();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "the [X] is out: [X]!"
    );
    // The logprobs spelled the text out: dropped with it.
    assert!(v["choices"][0]["logprobs"].is_null());
    assert!(!text.contains("secret") && !text.contains("\\u0073ecret"));
    // Every other byte as it was.
    assert!(text.starts_with(r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"#));
    assert!(text.ends_with(r#""finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#));
    assert_eq!(run.flags(), ["guard:words"]);
    assert_eq!(run.record.total_tokens, Some(7));
}

#[tokio::test]
async fn json_chat_block_answers_content_blocked_without_the_match() {
    let run = run(
        vec![words(Mode::Block)],
        Endpoint::ChatCompletions,
        json_response(CHAT),
    )
    .await;
    assert_eq!(run.status, StatusCode::BAD_REQUEST);
    let v = run.json();
    assert_eq!(v["error"]["code"], "content_blocked");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("`words`"), "{message}");
    assert!(!run.text().contains("secret"));
    let rejection = run.rejection.clone().unwrap();
    assert_eq!(rejection.layer, LayerName::Guard);
    assert_eq!(rejection.code, "content_blocked");
    assert!(run.flags().contains(&"guard:words".to_owned()));
    // Recorded as stopped after the upstream answered, with the withheld body's usage (the
    // upstream billed it), not as a request that never went upstream.
    let record = &run.record;
    assert_eq!(record.outcome, Outcome::Stopped);
    assert_eq!(record.blocked_by.as_deref(), Some("guard"));
    assert_eq!(record.code.as_deref(), Some("content_blocked"));
    assert_eq!(record.status, Some(400));
    assert_eq!(
        (
            record.prompt_tokens,
            record.completion_tokens,
            record.total_tokens
        ),
        (Some(3), Some(4), Some(7))
    );
    assert!(
        !record.flags.iter().any(|f| f == flag::USAGE_MISSING),
        "{:?}",
        record.flags
    );
    assert_eq!(
        run.alerts,
        [Alert::ContentBlocked {
            key: Some("test-key".into()),
            guard: "words".into(),
            side: "response",
            label: Some("word".into()),
        }]
    );
}

#[tokio::test]
async fn json_chat_audit_passes_the_body_as_it_is_and_flags() {
    let run = run(
        vec![words(Mode::Audit)],
        Endpoint::ChatCompletions,
        json_response(CHAT),
    )
    .await;
    assert_eq!(run.status, StatusCode::OK);
    assert_eq!(run.text(), CHAT);
    assert_eq!(run.flags(), ["guard:words"]);
    assert!(run.alerts.is_empty());
}

#[tokio::test]
async fn json_without_a_match_is_passed_unchanged_in_every_mode() {
    let clean = CHAT
        .replace("secret", "public")
        .replace("\\u0073ecret", "x");
    for mode in [Mode::Audit, Mode::Block, Mode::Redact] {
        let run = run(
            vec![words(mode)],
            Endpoint::ChatCompletions,
            json_response(&clean),
        )
        .await;
        assert_eq!(run.status, StatusCode::OK);
        assert_eq!(run.text(), clean);
        assert!(run.flags().is_empty(), "{mode:?}");
    }
}

#[tokio::test]
async fn json_completions_and_responses_are_redacted() {
    let completions = r#"{"object":"text_completion","choices":[{"index":0,"text":"a secret","finish_reason":"stop"}]}"#;
    let run1 = run(
        vec![words(Mode::Redact)],
        Endpoint::Completions,
        json_response(completions),
    )
    .await;
    assert_eq!(run1.json()["choices"][0]["text"], "a [X]");

    let responses = r#"{"id":"r","object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"my secret","annotations":[]}]},{"type":"function_call","name":"lookup","arguments":"{\"q\":\"secret\"}","call_id":"c"}],"output_text":"my secret"}"#;
    let run2 = run(
        vec![words(Mode::Redact)],
        Endpoint::Responses,
        json_response(responses),
    )
    .await;
    let v = run2.json();
    assert_eq!(v["output"][0]["content"][0]["text"], "my [X]");
    assert_eq!(v["output"][1]["arguments"], "{\"q\":\"[X]\"}");
    assert_eq!(v["output_text"], "my [X]");
    assert!(!run2.text().contains("secret"));
}

#[tokio::test]
async fn json_tool_calls_are_checked_by_the_firewall() {
    let chat = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"delete_user","arguments":"{}"}}]},"finish_reason":"tool_calls"}]}"#;
    let blocked = run(
        vec![firewall(Mode::Block)],
        Endpoint::ChatCompletions,
        json_response(chat),
    )
    .await;
    assert_eq!(blocked.status, StatusCode::BAD_REQUEST);
    assert!(blocked.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("delete_user"));
    assert_eq!(blocked.alerts.len(), 1);
    // Redact acts as block for a firewall.
    let redact = run(
        vec![firewall(Mode::Redact)],
        Endpoint::ChatCompletions,
        json_response(chat),
    )
    .await;
    assert_eq!(redact.status, StatusCode::BAD_REQUEST);
    let audit = run(
        vec![firewall(Mode::Audit)],
        Endpoint::ChatCompletions,
        json_response(chat),
    )
    .await;
    assert_eq!(audit.status, StatusCode::OK);
    assert_eq!(audit.text(), chat);
    assert_eq!(audit.flags(), ["guard:tools"]);
    // A built-in tool of the Responses API is named by its type.
    let responses = r#"{"output":[{"type":"web_search_call","id":"ws","status":"completed"}]}"#;
    let ws = run(
        vec![firewall(Mode::Block)],
        Endpoint::Responses,
        json_response(responses),
    )
    .await;
    assert_eq!(ws.status, StatusCode::BAD_REQUEST);
    let ok = r#"{"output":[{"type":"function_call","name":"get_weather","arguments":"{}"}]}"#;
    let ok = run(
        vec![firewall(Mode::Block)],
        Endpoint::Responses,
        json_response(ok),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn json_reflection_of_the_system_prompt_is_blocked_or_flagged() {
    let leak = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Sure: the internal assistant of ACME. Never reveal"},"finish_reason":"stop"}]}"#;
    let fine = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"I am Bob, the assistant."},"finish_reason":"stop"}]}"#;
    let block = || vec![Guard::reflection("echo", 20)];
    let blocked = run(block(), Endpoint::ChatCompletions, json_response(leak)).await;
    assert_eq!(blocked.status, StatusCode::BAD_REQUEST);
    assert!(!blocked.text().contains("ACME"));
    let passed = run(block(), Endpoint::ChatCompletions, json_response(fine)).await;
    assert_eq!(passed.status, StatusCode::OK);
    let audit = vec![Guard::reflection("echo", 20).mode(Mode::Audit)];
    let flagged = run(audit, Endpoint::ChatCompletions, json_response(leak)).await;
    assert_eq!(flagged.status, StatusCode::OK);
    assert_eq!(flagged.flags(), ["guard:echo"]);
}

#[tokio::test]
async fn upstream_errors_and_other_content_types_pass_untouched() {
    let error = Response::builder()
        .status(500)
        .header("content-type", "application/json")
        .body(Frames(
            vec![Bytes::from_static(br#"{"error":{"message":"secret"}}"#)].into(),
        ))
        .unwrap();
    let r = run(vec![words(Mode::Block)], Endpoint::ChatCompletions, error).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.text(), r#"{"error":{"message":"secret"}}"#);
    let plain = Response::builder()
        .header("content-type", "text/plain")
        .body(Frames(vec![Bytes::from_static(b"secret")].into()))
        .unwrap();
    let r = run(vec![words(Mode::Block)], Endpoint::ChatCompletions, plain).await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "secret"));
    // An endpoint whose output is not text is not read.
    let r = run(
        vec![words(Mode::Block)],
        Endpoint::Embeddings,
        json_response(CHAT),
    )
    .await;
    assert_eq!(r.text(), CHAT);
}

#[tokio::test]
async fn compressed_responses_fail_closed_unless_only_audited() {
    let gz = || {
        Response::builder()
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(Frames(vec![Bytes::from_static(b"\x1f\x8b...")].into()))
            .unwrap()
    };
    let r = run(vec![words(Mode::Redact)], Endpoint::ChatCompletions, gz()).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"]["code"], "upstream_invalid_response");
    assert_eq!(r.rejection.clone().unwrap().layer, LayerName::Guard);
    let r = run(vec![words(Mode::Audit)], Endpoint::ChatCompletions, gz()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.frames.concat(), b"\x1f\x8b...");
    assert_eq!(r.flags(), ["guard:words:unreadable"]);
}

#[tokio::test]
async fn a_json_body_over_the_limit_or_not_json_fails_closed() {
    let big = Response::builder()
        .header("content-type", "application/json")
        .header("content-length", 17 * 1024 * 1024)
        .body(Frames(vec![Bytes::from_static(b"{}")].into()))
        .unwrap();
    let r = run(vec![words(Mode::Block)], Endpoint::ChatCompletions, big).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let r = run(
        vec![words(Mode::Block)],
        Endpoint::ChatCompletions,
        json_response("{\"choices\":["),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let r = run(
        vec![words(Mode::Audit)],
        Endpoint::ChatCompletions,
        json_response("{\"choices\":["),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.flags(), ["guard:words:unreadable"]);
}

// ---- SSE ------------------------------------------------------------------------------------

fn chat_stream(pieces: &[&str]) -> String {
    let pieces: Vec<String> = pieces.iter().map(|p| p.to_string()).collect();
    Api::Chat.stream(&pieces, false)
}

#[test]
fn sse_a_match_split_at_every_byte_of_a_frame_boundary_is_masked_once() {
    for api in [Api::Chat, Api::Completions, Api::Responses] {
        let sse = api.stream(&["the secret is here".to_owned()], false);
        for cut in 0..=sse.len() {
            let chunks = vec![
                Bytes::copy_from_slice(&sse.as_bytes()[..cut]),
                Bytes::copy_from_slice(&sse.as_bytes()[cut..]),
            ];
            let out = run_sse(vec![words(Mode::Redact)], api.endpoint(), chunks);
            assert!(!out.contains("secret"), "{api:?} cut {cut}: {out}");
            assert_eq!(
                api.client_text(&out),
                "the [X] is here",
                "{api:?} cut {cut}"
            );
            assert_eq!(
                out.matches("[X]").count(),
                if let Api::Responses = api { 3 } else { 1 }
            );
        }
    }
}

#[test]
fn sse_a_match_across_deltas_is_masked_at_every_split_of_the_text() {
    let text = "say secret now";
    for api in [Api::Chat, Api::Completions, Api::Responses] {
        for a in 0..=text.len() {
            for b in a..=text.len() {
                let pieces = vec![
                    text[..a].to_owned(),
                    text[a..b].to_owned(),
                    text[b..].to_owned(),
                ];
                for escape in [false, true] {
                    let sse = api.stream(&pieces, escape);
                    let out = run_sse(
                        vec![words(Mode::Redact)],
                        api.endpoint(),
                        vec![Bytes::from(sse)],
                    );
                    assert_eq!(api.client_text(&out), "say [X] now", "{api:?} {a} {b}");
                    assert!(!out.contains("secret") && !out.contains("\\u0073\\u0065"));
                }
            }
        }
    }
}

#[test]
fn sse_redaction_passes_other_events_byte_for_byte() {
    let sse = chat_stream(&["hello ", "sec", "ret", " world"]);
    let out = run_sse(
        vec![words(Mode::Redact)],
        Endpoint::ChatCompletions,
        vec![Bytes::from(sse.clone())],
    );
    // The role chunk, the finish chunk, the usage chunk and [DONE] are as sent.
    let tail = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\ndata: [DONE]\n\n";
    assert!(out.ends_with(tail), "{out}");
    assert!(out.starts_with(&sse[..sse.find("\n\n").unwrap() + 2]));
    assert_eq!(Api::Chat.client_text(&out), "hello [X] world");
}

#[test]
fn sse_held_text_is_flushed_before_the_finish_chunk_and_at_the_end_of_the_body() {
    // The last delta ends with what could start a match: held, then sent in an event of its
    // own before the finish chunk.
    let sse = chat_stream(&["hello se"]);
    let out = run_sse(
        vec![words(Mode::Redact)],
        Endpoint::ChatCompletions,
        vec![Bytes::from(sse)],
    );
    assert_eq!(Api::Chat.client_text(&out), "hello se");
    let flush = events(&out)
        .into_iter()
        .position(|d| d.contains("\"content\":\"llo se\""))
        .unwrap();
    let finish = events(&out)
        .into_iter()
        .position(|d| d.contains("\"stop\""))
        .unwrap();
    assert!(flush < finish);
    // A body that ends without finish_reason nor [DONE].
    let cut = Api::Chat.delta("tail se", false);
    let out = run_sse(
        vec![words(Mode::Redact)],
        Endpoint::ChatCompletions,
        vec![Bytes::from(cut)],
    );
    assert_eq!(Api::Chat.client_text(&out), "tail se");
}

#[test]
fn sse_block_mid_stream_ends_with_the_error_event_and_leaks_nothing() {
    for api in [Api::Chat, Api::Completions, Api::Responses] {
        let pieces: Vec<String> = ["one two ", "the sec", "ret", " and more"]
            .map(String::from)
            .to_vec();
        let sse = api.stream(&pieces, false);
        for cut in (0..sse.len()).step_by(7) {
            let chunks = vec![
                Bytes::copy_from_slice(&sse.as_bytes()[..cut]),
                Bytes::copy_from_slice(&sse.as_bytes()[cut..]),
            ];
            let out = run_sse(vec![words(Mode::Block)], api.endpoint(), chunks);
            let events = events(&out);
            let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
            assert_eq!(last["error"]["code"], "content_blocked", "{out}");
            assert_eq!(last["error"]["type"], "invalid_request_error");
            assert!(last["error"]["param"].is_null());
            assert!(!out.contains("sec"), "{api:?} {cut}: {out}");
            assert!(!out.contains("more") && !out.contains("[DONE]"));
            let before: String = api.client_text(
                &events[..events.len() - 1]
                    .iter()
                    .map(|e| format!("data: {e}\n\n"))
                    .collect::<String>(),
            );
            assert!("one two the ".starts_with(&before), "{before:?}");
        }
    }
}

#[tokio::test]
async fn sse_block_flags_alerts_and_is_recorded() {
    let sse = chat_stream(&["a sec", "ret b"]);
    let r = run(
        vec![words(Mode::Block)],
        Endpoint::ChatCompletions,
        sse_of(&[&sse]),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text().contains("content_blocked"));
    assert_eq!(r.flags(), ["guard:words"]);
    assert_eq!(r.alerts.len(), 1);
    // The record says the guard stopped it, not that the upstream failed: the upstream
    // generated (and billed) what it sent, and the usage it never reported is estimated.
    let record = &r.record;
    assert_eq!(record.outcome, Outcome::Stopped);
    assert_eq!(record.blocked_by.as_deref(), Some("guard"));
    assert_eq!(record.code.as_deref(), Some("content_blocked"));
    assert!(
        record.flags.iter().any(|f| f == flag::BLOCKED),
        "{:?}",
        record.flags
    );
    assert!(
        !record.flags.iter().any(|f| f == flag::UPSTREAM_ERROR_BODY),
        "{:?}",
        record.flags
    );
    assert!(
        record.flags.iter().any(|f| f == flag::USAGE_MISSING),
        "{:?}",
        record.flags
    );
}

#[tokio::test]
async fn sse_audit_only_passes_every_frame_as_it_came_and_flags_a_split_match() {
    let sse = chat_stream(&["a sec", "ret b"]);
    let chunks: Vec<&str> = sse
        .as_bytes()
        .chunks(5)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let r = run(
        vec![words(Mode::Audit)],
        Endpoint::ChatCompletions,
        sse_of(&chunks),
    )
    .await;
    assert_eq!(r.frames.len(), chunks.len());
    for (got, sent) in r.frames.iter().zip(&chunks) {
        assert_eq!(got, sent.as_bytes());
    }
    assert_eq!(r.flags(), ["guard:words"]);
    // The audit layer outside read the usage chunk, and the client got it and [DONE].
    assert_eq!(r.record.total_tokens, Some(3));
    assert!(r.text().ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn sse_redact_under_the_audit_layer_keeps_usage_and_done() {
    let sse = chat_stream(&["a sec", "ret b"]);
    let r = run(
        vec![words(Mode::Redact)],
        Endpoint::ChatCompletions,
        sse_of(&[&sse]),
    )
    .await;
    assert_eq!(Api::Chat.client_text(&r.text()), "a [X] b");
    assert_eq!(r.record.total_tokens, Some(3));
    assert_eq!(r.flags(), ["guard:words"]);
    assert!(r.text().ends_with("data: [DONE]\n\n"));
}

#[test]
fn sse_framing_oddities_pass_through() {
    let sse = concat!(
        ": keep-alive\r\n\r\n",
        "event: ping\r\n\r\n",
        "data: not json\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\r\ndata: \"delta\":{\"content\":\"a secret\"},\"finish_reason\":null}]}\r\n\r\n",
        "retry: 100\n\n",
        "data: [DONE]\r\n\r\n",
    );
    for size in [1, 2, 3, 7, 1000] {
        let chunks: Vec<Bytes> = sse
            .as_bytes()
            .chunks(size)
            .map(Bytes::copy_from_slice)
            .collect();
        let out = run_sse(vec![words(Mode::Redact)], Endpoint::ChatCompletions, chunks);
        assert!(
            out.starts_with(": keep-alive\r\n\r\nevent: ping\r\n\r\ndata: not json\r\n\r\n"),
            "{out}"
        );
        assert!(out.ends_with("data: [DONE]\r\n\r\n"), "{out:?}");
        assert!(out.contains("retry: 100\n\n"), "{out:?}");
        assert!(!out.contains("secret"));
        let content: String = events(&out)
            .iter()
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(content, "a [X]");
    }
}

#[test]
fn sse_two_choices_are_two_texts() {
    let ev = |i: u32, t: &str| {
        format!("data: {{\"choices\":[{{\"index\":{i},\"delta\":{{\"content\":\"{t}\"}},\"finish_reason\":null}}]}}\n\n")
    };
    let sse = [
        ev(0, "se"),
        ev(1, "se"),
        ev(0, "cret"),
        ev(1, "cond"),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    let out = run_sse(
        vec![words(Mode::Redact)],
        Endpoint::ChatCompletions,
        vec![Bytes::from(sse)],
    );
    let mut texts = [String::new(), String::new()];
    for d in events(&out) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&d) {
            for c in v["choices"].as_array().unwrap() {
                texts[c["index"].as_u64().unwrap() as usize]
                    .push_str(c["delta"]["content"].as_str().unwrap_or(""));
            }
        }
    }
    assert_eq!(texts, ["[X]".to_owned(), "second".to_owned()]);
}

#[test]
fn sse_streamed_tool_calls_are_checked_by_name_at_their_first_delta() {
    let call = |name: &str| {
        format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":0,\"id\":\"c\",\"type\":\"function\",\"function\":{{\"name\":\"{name}\",\"arguments\":\"\"}}}}]}},\"finish_reason\":null}}]}}\n\ndata: {{\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":\"{{}}\"}}}}]}},\"finish_reason\":null}}]}}\n\ndata: [DONE]\n\n"
        )
    };
    let out = run_sse(
        vec![firewall(Mode::Block)],
        Endpoint::ChatCompletions,
        vec![Bytes::from(call("delete_user"))],
    );
    assert_eq!(events(&out).len(), 1, "{out}");
    assert!(out.contains("content_blocked") && out.contains("delete_user"));
    let ok = call("get_weather");
    let out = run_sse(
        vec![firewall(Mode::Block)],
        Endpoint::ChatCompletions,
        vec![Bytes::from(ok.clone())],
    );
    assert_eq!(out, ok);
    // Responses: the name comes with the item.
    let responses = "event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"output_index\":0,\"item\":{\"type\":\"function_call\",\"name\":\"delete_all\",\"arguments\":\"\"}}\n\n";
    let out = run_sse(
        vec![firewall(Mode::Block)],
        Endpoint::Responses,
        vec![Bytes::from(responses)],
    );
    assert!(out.contains("content_blocked"));
}

#[test]
fn sse_streamed_tool_arguments_are_redacted_as_one_text() {
    let args = |a: &str| {
        format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":{}}}}}]}},\"finish_reason\":null}}]}}\n\n", serde_json::to_string(a).unwrap())
    };
    let sse = [
        args("{\"q\":\"se"),
        args("cret\"}"),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    let out = run_sse(
        vec![words(Mode::Redact)],
        Endpoint::ChatCompletions,
        vec![Bytes::from(sse)],
    );
    let mut got = String::new();
    for d in events(&out) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&d) {
            got.push_str(
                v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .unwrap_or(""),
            );
        }
    }
    assert_eq!(got, "{\"q\":\"[X]\"}");
}

#[test]
fn sse_reflection_split_across_deltas_is_blocked() {
    let pieces = ["Well, the internal ", "assistant of AC", "ME is me."];
    let sse = chat_stream(&pieces);
    let out = run_sse_with_system(vec![Guard::reflection("echo", 20)], sse);
    assert!(out.contains("content_blocked"), "{out}");
    assert!(!out.contains("assistant of"));
    let fine = chat_stream(&["I am Bob and I help."]);
    let out = run_sse_with_system(vec![Guard::reflection("echo", 20)], fine);
    // Held back while it could still be a copy (20 bytes here), then sent whole.
    assert_eq!(Api::Chat.client_text(&out), "I am Bob and I help.");
}

fn run_sse_with_system(guards: Vec<Guard>, sse: String) -> String {
    let response = guard(
        guards,
        SYSTEM,
        Endpoint::ChatCompletions,
        None,
        None,
        sse_of(&[&sse]),
    );
    String::from_utf8(frames_of(response.into_body()).concat()).unwrap()
}

#[tokio::test]
async fn sse_reflection_in_audit_mode_flags_and_passes() {
    let sse = chat_stream(&["Well, the internal ", "assistant of AC", "ME is me."]);
    let r = run(
        vec![Guard::reflection("echo", 20).mode(Mode::Audit)],
        Endpoint::ChatCompletions,
        sse_of(&[&sse]),
    )
    .await;
    assert_eq!(r.text(), sse);
    assert_eq!(r.flags(), ["guard:echo"]);
}

#[tokio::test]
async fn without_guards_everything_passes() {
    let sse = chat_stream(&["a secret"]);
    let r = run(vec![], Endpoint::ChatCompletions, sse_of(&[&sse])).await;
    assert_eq!(r.text(), sse);
    assert!(r.flags().is_empty());
}

#[test]
fn sse_last_content_and_finish_reason_in_one_chunk_carry_all_the_held_text() {
    let sse = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"top se\"},\"finish_reason\":null}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"cret se\"},\"finish_reason\":\"stop\"}]}\n\n",
    );
    let out = run_sse(
        vec![words(Mode::Redact)],
        Endpoint::ChatCompletions,
        vec![Bytes::from(sse)],
    );
    assert_eq!(Api::Chat.client_text(&out), "top [X] se");
    // No event was made: the finishing chunk took the held text.
    assert_eq!(events(&out).len(), 2);
    assert!(out.contains("\"finish_reason\":\"stop\""));
}

#[test]
fn sse_responses_function_arguments_and_refusals_are_redacted() {
    let ev = |kind: &str, extra: &str| {
        format!("event: {kind}\ndata: {{\"type\":\"{kind}\",\"output_index\":1,\"content_index\":0{extra}}}\n\n")
    };
    let sse = [
        ev(
            "response.output_item.added",
            ",\"item\":{\"type\":\"function_call\",\"name\":\"lookup\",\"arguments\":\"\"}",
        ),
        ev(
            "response.function_call_arguments.delta",
            ",\"delta\":\"{\\\"q\\\":\\\"sec\"",
        ),
        ev(
            "response.function_call_arguments.delta",
            ",\"delta\":\"ret\\\"}\"",
        ),
        ev(
            "response.function_call_arguments.done",
            ",\"arguments\":\"{\\\"q\\\":\\\"secret\\\"}\"",
        ),
        ev("response.refusal.delta", ",\"delta\":\"no secr\""),
        ev("response.refusal.delta", ",\"delta\":\"et\""),
        ev("response.refusal.done", ",\"refusal\":\"no secret\""),
    ]
    .concat();
    let out = run_sse(
        vec![words(Mode::Redact)],
        Endpoint::Responses,
        vec![Bytes::from(sse)],
    );
    assert!(!out.contains("secret") && !out.contains("secr"), "{out}");
    let (mut args, mut refusal) = (String::new(), String::new());
    for d in events(&out) {
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        match v["type"].as_str().unwrap() {
            "response.function_call_arguments.delta" => args.push_str(v["delta"].as_str().unwrap()),
            "response.refusal.delta" => refusal.push_str(v["delta"].as_str().unwrap()),
            "response.function_call_arguments.done" => {
                assert_eq!(v["arguments"], "{\"q\":\"[X]\"}")
            }
            "response.refusal.done" => assert_eq!(v["refusal"], "no [X]"),
            _ => {}
        }
    }
    assert_eq!(args, "{\"q\":\"[X]\"}");
    assert_eq!(refusal, "no [X]");
    // Each event keeps its `event:` line.
    assert_eq!(out.matches("event: ").count(), events(&out).len());
}

fn json_body(api: Api, text: &str) -> String {
    let t = serde_json::to_string(text).unwrap();
    match api {
        Api::Chat => format!(
            r#"{{"choices":[{{"index":0,"message":{{"role":"assistant","content":{t}}},"finish_reason":"stop"}}]}}"#
        ),
        Api::Completions => {
            format!(r#"{{"choices":[{{"index":0,"text":{t},"finish_reason":"stop"}}]}}"#)
        }
        Api::Responses => format!(
            r#"{{"output":[{{"type":"message","role":"assistant","content":[{{"type":"output_text","text":{t}}}]}}]}}"#
        ),
    }
}

fn json_text(api: Api, v: &serde_json::Value) -> String {
    match api {
        Api::Chat => v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned(),
        Api::Completions => v["choices"][0]["text"].as_str().unwrap().to_owned(),
        Api::Responses => v["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .to_owned(),
    }
}

#[tokio::test]
async fn every_mode_on_json_and_sse_of_every_api() {
    let text = "keep the secret safe";
    for api in [Api::Chat, Api::Completions, Api::Responses] {
        for mode in [Mode::Audit, Mode::Block, Mode::Redact] {
            let json = run(
                vec![words(mode)],
                api.endpoint(),
                json_response(&json_body(api, text)),
            )
            .await;
            let pieces: Vec<String> = ["keep the se", "cret safe"].map(String::from).to_vec();
            let sse = api.stream(&pieces, false);
            let stream = run(vec![words(mode)], api.endpoint(), sse_of(&[&sse])).await;
            assert_eq!(json.flags(), ["guard:words"], "{api:?} {mode:?}");
            assert_eq!(stream.flags(), ["guard:words"], "{api:?} {mode:?}");
            match mode {
                Mode::Audit => {
                    assert_eq!(json.text(), json_body(api, text));
                    assert_eq!(stream.text(), sse);
                }
                Mode::Block => {
                    assert_eq!(json.status, StatusCode::BAD_REQUEST);
                    assert_eq!(json.json()["error"]["code"], "content_blocked");
                    let last = events(&stream.text()).pop().unwrap();
                    assert!(last.contains("\"code\":\"content_blocked\""), "{api:?}");
                    assert!(!stream.text().contains("safe"));
                    assert_eq!((json.alerts.len(), stream.alerts.len()), (1, 1));
                }
                _ => {
                    assert_eq!(json_text(api, &json.json()), "keep the [X] safe");
                    assert_eq!(api.client_text(&stream.text()), "keep the [X] safe");
                    assert!(!stream.text().contains("secret"));
                }
            }
        }
    }
}

#[tokio::test]
async fn an_audit_guard_beside_a_redacting_one_flags_without_holding_its_own_matches() {
    let audit = Guard::new("names", Words::new(&["Bob"]))
        .mode(Mode::Audit)
        .on(Sides::RESPONSE);
    let sse = chat_stream(&["hi B", "ob, the sec", "ret"]);
    let r = run(
        vec![audit, words(Mode::Redact)],
        Endpoint::ChatCompletions,
        sse_of(&[&sse]),
    )
    .await;
    assert_eq!(Api::Chat.client_text(&r.text()), "hi Bob, the [X]");
    assert_eq!(r.flags(), ["guard:names", "guard:words"]);
}
