//! GuardLayer on requests: each mode, fields and roles, escapes, keys bound to guards, the
//! narrowing headers, the tool firewall, end-user hashing, and external guards (flagged,
//! clean, redacting, and an outage under both fail modes).
#![cfg(feature = "guards")]

mod common_guard;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common_guard::stack::{secret, stack, Log, Re, Scripted};
use http::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tower_llm_policy::alert::{Alert, AlertSink};
use tower_llm_policy::audit::{AuditRecord, MemorySink};
use tower_llm_policy::guard::{
    Guard, GuardLayer, Mode, ModerationError, Sides, ToolFirewall, Verdict,
};
use tower_llm_policy::request::{PromptSource, Role};
use tower_llm_policy::{ApiKey, LayerName, Rejection};

fn email() -> Re {
    Re::new(r"[a-z0-9.+]{1,32}@[a-z0-9.]{1,32}\.[a-z]{2,6}", "email")
}

fn chat(messages: Value) -> Request<String> {
    post(json!({"model": "gpt-4o", "messages": messages}))
}

fn post(body: Value) -> Request<String> {
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(body.to_string())
        .unwrap()
}

fn error_of(response: &Response<Bytes>) -> Value {
    serde_json::from_slice::<Value>(response.body()).unwrap()["error"].clone()
}

fn record(sink: &MemorySink) -> AuditRecord {
    let records = sink.records();
    assert_eq!(records.len(), 1, "one record per request");
    records[0].clone()
}

fn sent(log: &Log) -> Value {
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 1, "forwarded once");
    serde_json::from_slice(&log[0].body).unwrap()
}

#[tokio::test]
async fn block_mode_refuses_with_content_blocked_naming_the_guard() {
    let (svc, log, sink) = stack(
        GuardLayer::new().guard(Guard::new("secrets", secret())),
        None,
    );
    let response = svc
        .oneshot(chat(
            json!([{"role": "user", "content": "my key is sk-abcdefgh12345"}]),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error = error_of(&response);
    assert_eq!(error["code"], "content_blocked");
    assert_eq!(error["type"], "invalid_request_error");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("`secrets`") && message.contains("api_key"),
        "{message}"
    );
    assert!(
        !message.contains("sk-abcdefgh12345"),
        "the match is never quoted"
    );
    assert_eq!(
        response.extensions().get::<Rejection>().map(|r| r.layer),
        Some(LayerName::Guard)
    );
    assert!(log.lock().unwrap().is_empty(), "nothing forwarded");
    let rec = record(&sink);
    assert_eq!(rec.blocked_by.as_deref(), Some("guard"));
    assert!(
        rec.flags.contains(&"guard:secrets".to_owned()),
        "{:?}",
        rec.flags
    );
}

#[tokio::test]
async fn clean_requests_pass_unchanged() {
    let (svc, log, sink) = stack(
        GuardLayer::new().guard(Guard::new("secrets", secret())),
        None,
    );
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello sk-"}]});
    let response = svc.oneshot(post(body.clone())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(sent(&log), body);
    assert!(record(&sink).flags.iter().all(|f| !f.starts_with("guard:")));
}

#[tokio::test]
async fn audit_mode_flags_and_forwards_as_sent() {
    let layer = GuardLayer::new().guard(Guard::new("secrets", secret()).mode(Mode::Audit));
    let (svc, log, sink) = stack(layer, None);
    let body =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "sk-abcdefgh12345"}]});
    let response = svc.oneshot(post(body.clone())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(sent(&log), body);
    let rec = record(&sink);
    assert_eq!(rec.flags, vec!["guard:secrets".to_owned()]);
    assert!(rec.blocked_by.is_none());
}

#[tokio::test]
async fn redact_mode_masks_every_match_and_keeps_the_rest_of_the_body() {
    let layer = GuardLayer::new()
        .guard(Guard::new("secrets", secret()).mode(Mode::Redact))
        .guard(
            Guard::new("pii", email())
                .mode(Mode::Redact)
                .mask("<{label}>"),
        );
    let (svc, log, sink) = stack(layer, None);
    let body = json!({
        "model": "gpt-4o",
        "temperature": 0.25,
        "seed": 12345678901234567u64,
        "metadata": {"note": "sk-notprompt123456"},
        "messages": [
            {"role": "system", "content": "Be brief. Key: sk-systemkey9999"},
            {"role": "user", "content": [
                {"type": "text", "text": "mail \"bob@example.com\" and sk-abcdefgh12345 please"},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}
            ]},
        ],
    });
    let response = svc.oneshot(post(body)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let sent = sent(&log);
    assert_eq!(
        sent["messages"][0]["content"],
        "Be brief. Key: [REDACTED:api_key]"
    );
    assert_eq!(
        sent["messages"][1]["content"][0]["text"],
        "mail \"<email>\" and [REDACTED:api_key] please"
    );
    assert_eq!(sent["messages"][1]["content"][1]["type"], "image_url");
    // Fields that are no prompt are not rewritten; numbers keep their exact text.
    assert_eq!(sent["metadata"]["note"], "sk-notprompt123456");
    assert_eq!(sent["temperature"], 0.25);
    let raw = String::from_utf8(log.lock().unwrap()[0].body.to_vec()).unwrap();
    assert!(raw.contains("12345678901234567"), "{raw}");
    let content_length: usize = log.lock().unwrap()[0].headers["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(content_length, raw.len());
    // The record holds the redacted prompt, never the secret.
    let rec = record(&sink);
    assert!(rec.flags.contains(&"guard:secrets".to_owned()));
    assert!(rec.flags.contains(&"guard:pii".to_owned()));
    let prompt = rec.content.unwrap().prompt.unwrap();
    assert!(!prompt.contains("sk-abcdefgh12345") && !prompt.contains("bob@example.com"));
    assert!(prompt.contains("<email>"), "{prompt}");
}

#[tokio::test]
async fn json_escapes_do_not_hide_a_match() {
    let (svc, log, _) = stack(
        GuardLayer::new().guard(Guard::new("secrets", secret())),
        None,
    );
    // `sk-` written with escapes: the guard reads the decoded text.
    let raw =
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"\u0073\u006b-abcdefgh12345"}]}"#;
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(raw.to_owned())
        .unwrap();
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn redaction_of_escaped_text_writes_valid_json() {
    let layer = GuardLayer::new().guard(Guard::new("secrets", secret()).mode(Mode::Redact));
    let (svc, log, _) = stack(layer, None);
    let raw = r#"{"model":"gpt-4o","messages":[{"content":"line1\n\u0073k-abcdefgh12345\t\"q\"","role":"user"}]}"#;
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(raw.to_owned())
        .unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        sent(&log)["messages"][0]["content"],
        "line1\n[REDACTED:api_key]\t\"q\""
    );
}

#[tokio::test]
async fn roles_and_sources_limit_what_a_guard_reads() {
    let layer = GuardLayer::new().guard(Guard::new("user-secrets", secret()).roles([Role::User]));
    let (svc, _, _) = stack(layer.clone(), None);
    let system = chat(json!([
        {"role": "system", "content": "sk-abcdefgh12345"},
        {"role": "user", "content": "hi"}
    ]));
    assert_eq!(svc.oneshot(system).await.unwrap().status(), StatusCode::OK);
    // Role written after the content still counts.
    let (svc, _, _) = stack(layer.clone(), None);
    let user = chat(json!([{"content": "sk-abcdefgh12345", "role": "user"}]));
    assert_eq!(
        svc.oneshot(user).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    // Text outside messages is the user's.
    let (svc, _, _) = stack(layer, None);
    let completions = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(json!({"model": "gpt-3.5-turbo-instruct", "prompt": "sk-abcdefgh12345"}).to_string())
        .unwrap();
    assert_eq!(
        svc.oneshot(completions).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );

    let tools_only =
        GuardLayer::new().guard(Guard::new("t", secret()).sources([PromptSource::Tools]));
    let (svc, _, _) = stack(tools_only.clone(), None);
    let in_message = chat(json!([{"role": "user", "content": "sk-abcdefgh12345"}]));
    assert_eq!(
        svc.oneshot(in_message).await.unwrap().status(),
        StatusCode::OK
    );
    // A tool description is read decoded (the escape is resolved).
    let (svc, _, _) = stack(tools_only, None);
    let raw = r#"{"model":"gpt-4o","messages":[],"tools":[{"type":"function","function":{"name":"f","description":"\u0073k-abcdefgh12345"}}]}"#;
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(raw.to_owned())
        .unwrap();
    assert_eq!(
        svc.oneshot(req).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn keys_add_optional_guards_and_an_unknown_binding_fails_closed() {
    let layer = GuardLayer::new().optional_guard(Guard::new("pii", email()));
    let mail = || chat(json!([{"role": "user", "content": "write to a@b.com"}]));
    let (svc, _, _) = stack(layer.clone(), Some(ApiKey::new("free")));
    assert_eq!(svc.oneshot(mail()).await.unwrap().status(), StatusCode::OK);
    let mut bound = ApiKey::new("bound");
    bound.guards = vec!["pii".into()];
    let (svc, _, _) = stack(layer.clone(), Some(bound));
    assert_eq!(
        svc.oneshot(mail()).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let mut typo = ApiKey::new("typo");
    typo.guards = vec!["pi".into()];
    let (svc, log, _) = stack(layer, Some(typo));
    let response = svc.oneshot(mail()).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_of(&response)["code"], "policy_unavailable");
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_key_cannot_weaken_a_workspace_guard() {
    // Binding a key to the same name adds nothing and removes nothing.
    let layer = GuardLayer::new().guard(Guard::new("pii", email()));
    let mut key = ApiKey::new("k");
    key.guards = vec!["pii".into()];
    let (svc, _, _) = stack(layer, Some(key));
    let req = chat(json!([{"role": "user", "content": "a@b.com"}]));
    assert_eq!(
        svc.oneshot(req).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn the_guards_header_only_adds_guards_and_is_not_forwarded() {
    let layer = GuardLayer::new()
        .guard(Guard::new("secrets", secret()))
        .optional_guard(Guard::new("pii", email()));
    let mail = |header: &str| {
        let mut req = chat(json!([{"role": "user", "content": "a@b.com"}]));
        req.headers_mut()
            .insert("x-llm-policy-guards", header.parse().unwrap());
        req
    };
    let (svc, _, _) = stack(layer.clone(), None);
    assert_eq!(
        svc.oneshot(mail(" pii ")).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    // Unknown names and attempts at removal are ignored and flagged; the workspace guard
    // still applies.
    let (svc, log, sink) = stack(layer.clone(), None);
    let response = svc.oneshot(mail("-secrets, nothing")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!log.lock().unwrap()[0]
        .headers
        .contains_key("x-llm-policy-guards"));
    assert!(record(&sink)
        .flags
        .contains(&"header_ignored:x-llm-policy-guards".to_owned()));
    let (svc, _, _) = stack(layer, None);
    let mut req = chat(json!([{"role": "user", "content": "sk-abcdefgh12345"}]));
    req.headers_mut()
        .insert("x-llm-policy-guards", "-secrets".parse().unwrap());
    assert_eq!(
        svc.oneshot(req).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn the_prompt_token_header_tightens_and_never_loosens() {
    let long = "word ".repeat(60);
    let req = |limit: &str| {
        let mut req = chat(json!([{"role": "user", "content": long}]));
        req.headers_mut()
            .insert("x-llm-policy-max-prompt-tokens", limit.parse().unwrap());
        req
    };
    let mut key = ApiKey::new("k");
    key.max_prompt_tokens = Some(1000);
    let (svc, _, _) = stack(GuardLayer::new(), Some(key.clone()));
    let tight = svc.oneshot(req("5")).await.unwrap();
    assert_eq!(tight.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&tight)["code"], "prompt_too_long");
    assert!(error_of(&tight)["message"]
        .as_str()
        .unwrap()
        .contains("this request"));
    // Loosening: ignored and flagged; the key's limit of 1000 holds (and passes here).
    let (svc, log, sink) = stack(GuardLayer::new(), Some(key.clone()));
    assert_eq!(
        svc.oneshot(req("5000")).await.unwrap().status(),
        StatusCode::OK
    );
    assert!(!log.lock().unwrap()[0]
        .headers
        .contains_key("x-llm-policy-max-prompt-tokens"));
    assert!(record(&sink)
        .flags
        .contains(&"header_ignored:x-llm-policy-max-prompt-tokens".to_owned()));
    key.max_prompt_tokens = Some(10);
    let (svc, _, sink) = stack(GuardLayer::new(), Some(key));
    assert_eq!(
        svc.oneshot(req("5000")).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert!(record(&sink)
        .flags
        .contains(&"header_ignored:x-llm-policy-max-prompt-tokens".to_owned()));
    // Not a number: ignored and flagged.
    let (svc, _, sink) = stack(GuardLayer::new(), None);
    assert_eq!(
        svc.oneshot(req("lots")).await.unwrap().status(),
        StatusCode::OK
    );
    assert!(record(&sink)
        .flags
        .contains(&"header_ignored:x-llm-policy-max-prompt-tokens".to_owned()));
}

#[tokio::test]
async fn the_tool_firewall_checks_offered_tools() {
    let firewall = ToolFirewall::new()
        .allow(["get_*", "web_search"])
        .deny(["get_secret*"]);
    let layer = GuardLayer::new().guard(Guard::firewall("tools", firewall));
    let with_tools =
        |tools: Value| post(json!({"model": "gpt-4o", "messages": [], "tools": tools}));
    let function =
        |name: &str| json!({"type": "function", "function": {"name": name, "parameters": {}}});
    let (svc, _, _) = stack(layer.clone(), None);
    let ok = with_tools(json!([function("get_weather"), {"type": "web_search"}]));
    assert_eq!(svc.oneshot(ok).await.unwrap().status(), StatusCode::OK);
    let (svc, _, _) = stack(layer.clone(), None);
    let denied = svc
        .oneshot(with_tools(json!([
            function("get_weather"),
            function("get_secret_key")
        ])))
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::BAD_REQUEST);
    assert!(error_of(&denied)["message"]
        .as_str()
        .unwrap()
        .contains("get_secret_key"));
    let (svc, _, _) = stack(layer.clone(), None);
    let unlisted = with_tools(json!([{"type": "code_interpreter"}]));
    assert_eq!(
        svc.oneshot(unlisted).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    // Responses API function tools name themselves at the top of the tool.
    let (svc, _, _) = stack(layer.clone(), None);
    let responses = Request::post("/v1/responses")
        .header("content-type", "application/json")
        .body(
            json!({"model": "gpt-4o", "input": "hi", "tools": [{"type": "function", "name": "drop_table"}]})
                .to_string(),
        )
        .unwrap();
    assert_eq!(
        svc.oneshot(responses).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let audit = GuardLayer::new()
        .guard(Guard::firewall("tools", ToolFirewall::new().deny(["*"])).mode(Mode::Audit));
    let (svc, _, sink) = stack(audit, None);
    let flagged = with_tools(json!([function("anything")]));
    assert_eq!(svc.oneshot(flagged).await.unwrap().status(), StatusCode::OK);
    assert_eq!(record(&sink).flags, vec!["guard:tools".to_owned()]);
}

#[tokio::test]
async fn end_users_are_hashed_before_they_go_upstream() {
    let layer = GuardLayer::new().hash_end_users("pepper");
    let (svc, log, sink) = stack(layer.clone(), None);
    let body = json!({"model": "gpt-4o", "messages": [], "user": "alice@example.com", "safety_identifier": "alice"});
    assert_eq!(
        svc.oneshot(post(body)).await.unwrap().status(),
        StatusCode::OK
    );
    let sent = sent(&log);
    let user = sent["user"].as_str().unwrap();
    assert_eq!(user.len(), 64);
    assert!(user.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(sent["safety_identifier"], sent["user"]);
    assert_eq!(
        record(&sink).user.as_deref(),
        Some(user),
        "the record shows the hash"
    );
    // Stable under one salt.
    let (svc, log2, _) = stack(layer, None);
    let again = json!({"model": "gpt-4o", "messages": [], "user": "alice@example.com"});
    svc.oneshot(post(again)).await.unwrap();
    assert_eq!(super_sent(&log2)["user"], user);
}

fn super_sent(log: &Log) -> Value {
    sent(log)
}

#[tokio::test]
async fn a_required_user_must_not_be_blank() {
    let mut key = ApiKey::new("k");
    key.require_user = true;
    for user in [json!(""), json!("   "), json!("\t\n")] {
        let (svc, log, _) = stack(GuardLayer::new(), Some(key.clone()));
        let body = json!({"model": "gpt-4o", "messages": [], "user": user});
        let response = svc.oneshot(post(body)).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_of(&response)["code"], "user_required");
        assert!(log.lock().unwrap().is_empty());
    }
    let (svc, _, _) = stack(GuardLayer::new(), Some(key));
    let body = json!({"model": "gpt-4o", "messages": [], "user": " ", "safety_identifier": "u-1"});
    assert_eq!(
        svc.oneshot(post(body)).await.unwrap().status(),
        StatusCode::OK
    );
}

#[derive(Default)]
struct Alerts(Mutex<Vec<Alert>>);

impl AlertSink for Alerts {
    fn alert(&self, alert: Alert) {
        self.0.lock().unwrap().push(alert);
    }
}

#[tokio::test]
async fn external_guards_block_flagged_text_and_pass_clean_text() {
    let moderator = Scripted::new(|input| {
        Ok(if input.texts.iter().any(|t| t.contains("hate")) {
            Verdict::Flag {
                categories: vec!["harassment".into(), "hate".into()],
            }
        } else {
            Verdict::Allow
        })
    });
    let alerts = Arc::new(Alerts::default());
    let layer = GuardLayer::new()
        .guard(Guard::external("moderation", moderator.clone()))
        .alerts(alerts.clone());
    let (svc, log, sink) = stack(layer.clone(), Some(ApiKey::new("k1")));
    let flagged = svc
        .oneshot(chat(json!([{"role": "system", "content": "be kind"}, {"role": "user", "content": "I hate you"}])))
        .await
        .unwrap();
    assert_eq!(flagged.status(), StatusCode::BAD_REQUEST);
    let message = error_of(&flagged)["message"].as_str().unwrap().to_owned();
    assert!(message.contains("harassment, hate"), "{message}");
    assert!(log.lock().unwrap().is_empty());
    assert_eq!(
        moderator.asked.lock().unwrap()[0],
        vec!["be kind".to_owned(), "I hate you".to_owned()]
    );
    assert_eq!(record(&sink).blocked_by.as_deref(), Some("guard"));
    let alert = alerts.0.lock().unwrap()[0].clone();
    assert_eq!(
        alert,
        Alert::ContentBlocked {
            key: Some("k1".into()),
            guard: "moderation".into(),
            side: "request",
            label: Some("harassment, hate".into())
        }
    );
    let (svc, log, _) = stack(layer, None);
    let clean = svc
        .oneshot(chat(json!([{"role": "user", "content": "hello"}])))
        .await
        .unwrap();
    assert_eq!(clean.status(), StatusCode::OK);
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_external_guard_outage_fails_closed_or_open_as_configured() {
    let down = || Scripted::new(|_| Err(ModerationError("connection refused".into())));
    let (svc, log, _) = stack(
        GuardLayer::new().guard(Guard::external("mod", down())),
        None,
    );
    let response = svc
        .oneshot(chat(json!([{"role": "user", "content": "hello"}])))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_of(&response)["code"], "policy_unavailable");
    assert!(log.lock().unwrap().is_empty());

    let open = GuardLayer::new().guard(Guard::external("mod", down()).fail_open(true));
    let (svc, log, sink) = stack(open, None);
    let response = svc
        .oneshot(chat(json!([{"role": "user", "content": "hello"}])))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(log.lock().unwrap().len(), 1);
    assert_eq!(
        record(&sink).flags,
        vec!["guard:mod:unavailable".to_owned()]
    );
}

#[tokio::test]
async fn an_external_guard_in_audit_mode_only_flags() {
    let moderator = Scripted::new(|_| Ok(Verdict::Flag { categories: vec![] }));
    let layer = GuardLayer::new().guard(Guard::external("mod", moderator).mode(Mode::Audit));
    let (svc, log, sink) = stack(layer, None);
    let response = svc
        .oneshot(chat(json!([{"role": "user", "content": "hello"}])))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(log.lock().unwrap().len(), 1);
    assert_eq!(record(&sink).flags, vec!["guard:mod".to_owned()]);
}

#[tokio::test]
async fn a_redacting_webhook_rewrites_the_forwarded_text() {
    let moderator = Scripted::new(|input| {
        Ok(Verdict::Redact {
            texts: input
                .texts
                .iter()
                .map(|t| t.replace("Alice", "[NAME]"))
                .collect(),
        })
    });
    let layer = GuardLayer::new().guard(Guard::external("names", moderator).mode(Mode::Redact));
    let (svc, log, sink) = stack(layer, None);
    let response = svc
        .oneshot(chat(json!([
            {"role": "user", "content": "Alice says hi"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "from Alice"}]}
        ])))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let sent = sent(&log);
    assert_eq!(sent["messages"][0]["content"], "[NAME] says hi");
    assert_eq!(sent["messages"][1]["content"], "hi");
    assert_eq!(sent["messages"][2]["content"][0]["text"], "from [NAME]");
    let prompt = record(&sink).content.unwrap().prompt.unwrap();
    assert!(!prompt.contains("Alice"), "{prompt}");
}

#[tokio::test]
async fn a_redacting_webhook_with_a_wrong_count_fails_closed() {
    let moderator = Scripted::new(|_| Ok(Verdict::Redact { texts: vec![] }));
    let layer = GuardLayer::new().guard(Guard::external("names", moderator).mode(Mode::Redact));
    let (svc, log, _) = stack(layer, None);
    let response = svc
        .oneshot(chat(json!([{"role": "user", "content": "Alice"}])))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn guards_on_the_response_side_only_leave_requests_alone() {
    let layer = GuardLayer::new().guard(Guard::new("out", secret()).on(Sides::RESPONSE));
    let (svc, log, _) = stack(layer, None);
    let req = chat(json!([{"role": "user", "content": "sk-abcdefgh12345"}]));
    assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK);
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn multipart_prompts_are_blocked_when_they_cannot_be_redacted() {
    let layer = GuardLayer::new().guard(Guard::new("secrets", secret()).mode(Mode::Redact));
    let (svc, log, _) = stack(layer, None);
    let boundary = "XyZ";
    let body = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\ngpt-image-1\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"prompt\"\r\n\r\nuse sk-abcdefgh12345\r\n--{boundary}--\r\n"
    );
    let req = Request::post("/v1/images/edits")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .unwrap();
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn many_requests_through_one_service_each_get_their_own_verdict() {
    let layer = GuardLayer::new().guard(Guard::new("secrets", secret()).mode(Mode::Redact));
    let (svc, log, _) = stack(layer, None);
    for i in 0..20 {
        let text = if i % 2 == 0 {
            "sk-abcdefgh12345".to_owned()
        } else {
            format!("plain {i}")
        };
        let req = chat(json!([{"role": "user", "content": text}]));
        let response = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 20);
    for (i, seen) in log.iter().enumerate() {
        let v: Value = serde_json::from_slice(&seen.body).unwrap();
        let expected = if i % 2 == 0 {
            "[REDACTED:api_key]".to_owned()
        } else {
            format!("plain {i}")
        };
        assert_eq!(v["messages"][0]["content"], expected);
    }
}
