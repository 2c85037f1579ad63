//! A hostile client against the request side of the GuardLayer.
//!
//! Tests named after a property the layer must have. Those marked `FINDING` fail on main
//! 98bf2af: they demonstrate a way to get text past a guard (or another defect) and assert the
//! correct behaviour. The others pass and document attacks that are stopped today.
#![cfg(feature = "guards")]

mod common_guard;

use common_guard::stack::{secret, stack, Log, Re, Scripted};
use http::{Request, StatusCode};
use serde_json::{json, Value};
use tower_llm_policy::audit::{AuditRecord, MemorySink};
use tower_llm_policy::guard::{Guard, GuardLayer, Mode, ToolFirewall, Verdict};
use tower_llm_policy::request::Role;
use tower_llm_policy::ApiKey;

// ---------------------------------------------------------------------------------------------
// Harness (as tests/guard_request.rs)

const SECRET: &str = "sk-abcdefgh12345";

fn block() -> GuardLayer {
    GuardLayer::new().guard(Guard::new("secrets", secret()))
}

fn redact() -> GuardLayer {
    GuardLayer::new().guard(Guard::new("secrets", secret()).mode(Mode::Redact))
}

fn raw(path: &str, body: &str) -> Request<String> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .unwrap()
}

fn post(path: &str, body: Value) -> Request<String> {
    raw(path, &body.to_string())
}

fn chat(messages: Value) -> Request<String> {
    post(
        "/v1/chat/completions",
        json!({"model": "gpt-4o", "messages": messages}),
    )
}

fn forwarded(log: &Log) -> Vec<String> {
    log.lock()
        .unwrap()
        .iter()
        .map(|s| String::from_utf8_lossy(&s.body).into_owned())
        .collect()
}

fn record(sink: &MemorySink) -> AuditRecord {
    let records = sink.records();
    assert_eq!(records.len(), 1, "one record per request");
    records[0].clone()
}

/// Sends `req` through `layer`; returns the status and what the upstream received.
async fn send(layer: &GuardLayer, req: Request<String>) -> (StatusCode, Vec<String>) {
    let (svc, log, _) = stack(layer.clone(), None);
    let response = svc.oneshot(req).await.unwrap();
    (response.status(), forwarded(&log))
}

/// Whether `needle` reached the upstream in any spelling: as is, or JSON-escaped letter by
/// letter is not produced by the layer, so a plain search of the body and of its decoded
/// strings suffices.
fn leaked(bodies: &[String], needle: &str) -> bool {
    bodies.iter().any(|b| {
        b.contains(needle) || serde_json::from_str::<Value>(b).is_ok_and(|v| value_has(&v, needle))
    })
}

fn value_has(v: &Value, needle: &str) -> bool {
    match v {
        Value::String(s) => s.contains(needle),
        Value::Array(a) => a.iter().any(|v| value_has(v, needle)),
        Value::Object(m) => m
            .iter()
            .any(|(k, v)| k.contains(needle) || value_has(v, needle)),
        _ => false,
    }
}

/// Runs each `(label, request)` through `layer` and lists those whose `needle` reached the
/// upstream.
async fn leaks(
    layer: &GuardLayer,
    needle: &str,
    cases: Vec<(&'static str, Request<String>)>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (label, req) in cases {
        let (status, bodies) = send(layer, req).await;
        assert!(
            !status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE,
            "{label}: {status}"
        );
        if leaked(&bodies, needle) {
            out.push(format!("{label} ({status})"));
        }
    }
    out
}

// =============================================================================================
// FINDINGS (fail on 98bf2af)

/// FINDING 1. Text stored upstream and later read by a model (a thread's messages, a
/// conversation's items, an eval run's template) passes a block-mode guard: these routes have
/// no model in their body, so the body is never read and `GuardCheck::decide` sees no text.
#[tokio::test]
async fn prompt_text_sent_to_stored_object_routes_is_guarded() {
    let s = SECRET;
    let cases = vec![
        (
            "POST /v1/threads messages",
            post(
                "/v1/threads",
                json!({"messages": [{"role": "user", "content": s}]}),
            ),
        ),
        (
            "POST /v1/threads/t1/messages content",
            post(
                "/v1/threads/thread_1/messages",
                json!({"role": "user", "content": s}),
            ),
        ),
        (
            "POST /v1/conversations items",
            post(
                "/v1/conversations",
                json!({"items": [{"type": "message", "role": "user", "content": s}]}),
            ),
        ),
        (
            "POST /v1/conversations/c1/items",
            post(
                "/v1/conversations/conv_1/items",
                json!({"items": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": s}]}]}),
            ),
        ),
        (
            "POST /v1/evals/e1/runs template",
            post(
                "/v1/evals/eval_1/runs",
                json!({"name": "r", "data_source": {"type": "completions", "model": "gpt-4o",
                    "input_messages": {"type": "template", "template": [{"role": "user", "content": s}]},
                    "source": {"type": "file_content", "content": [{"item": {"q": "x"}}]}}}),
            ),
        ),
    ];
    let leaks = leaks(&block(), SECRET, cases).await;
    assert!(leaks.is_empty(), "reached the upstream: {leaks:#?}");
}

/// FINDING 2. Responses `input` items of types other than messages and function calls carry
/// text the model reads in members the parse does not collect (`code`, `queries`, `results`,
/// `action`, `stdout`, `diff`, `error`, the `tools` of `mcp_list_tools`). A block-mode guard
/// lets them through.
#[tokio::test]
async fn every_responses_input_item_is_read() {
    let s = SECRET;
    let items = vec![
        (
            "code_interpreter_call.code",
            json!({"type": "code_interpreter_call", "id": "ci_1", "status": "completed", "container_id": "cntr_1", "code": s, "outputs": []}),
        ),
        (
            "code_interpreter_call.outputs.logs",
            json!({"type": "code_interpreter_call", "id": "ci_1", "status": "completed", "container_id": "cntr_1", "code": "print(1)", "outputs": [{"type": "logs", "logs": s}]}),
        ),
        (
            "file_search_call.queries",
            json!({"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": [s]}),
        ),
        (
            "file_search_call.results.text",
            json!({"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": ["q"], "results": [{"file_id": "f", "filename": "a.txt", "score": 1.0, "text": s}]}),
        ),
        (
            "web_search_call.action.query",
            json!({"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search", "query": s}}),
        ),
        (
            "local_shell_call.action.command",
            json!({"type": "local_shell_call", "id": "ls_1", "call_id": "c1", "status": "completed", "action": {"type": "exec", "command": ["echo", s], "env": {}}}),
        ),
        (
            "shell_call.action.commands",
            json!({"type": "shell_call", "call_id": "c1", "action": {"commands": [format!("echo {s}")]}}),
        ),
        (
            "shell_call_output.output.stdout",
            json!({"type": "shell_call_output", "call_id": "c1", "output": [{"stdout": s, "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}]}),
        ),
        (
            "apply_patch_call.operation.diff",
            json!({"type": "apply_patch_call", "call_id": "c1", "status": "completed", "operation": {"type": "create_file", "path": "a.txt", "diff": format!("+{s}")}}),
        ),
        (
            "mcp_call.error",
            json!({"type": "mcp_call", "id": "m1", "server_label": "x", "name": "f", "arguments": "{}", "error": s}),
        ),
        (
            "mcp_list_tools.tools.description",
            json!({"type": "mcp_list_tools", "id": "ml_1", "server_label": "x", "tools": [{"name": "f", "description": s, "input_schema": {}}]}),
        ),
    ];
    let cases = items
        .into_iter()
        .map(|(label, item)| {
            (
                label,
                post("/v1/responses", json!({"model": "gpt-4o", "input": [item]})),
            )
        })
        .collect();
    let leaks = leaks(&block(), SECRET, cases).await;
    assert!(leaks.is_empty(), "reached the upstream: {leaks:#?}");
}

/// FINDING 3. Realtime session text outside `instructions` and `tools`: a session's `prompt`
/// template variables and the transcription `prompt` are read by the models, not by the guards.
#[tokio::test]
async fn realtime_session_prompts_are_read() {
    let s = SECRET;
    let cases = vec![
        (
            "session.prompt.variables",
            post(
                "/v1/realtime/client_secrets",
                json!({"session": {"type": "realtime", "model": "gpt-realtime",
                    "prompt": {"id": "pmpt_1", "variables": {"city": s}}}}),
            ),
        ),
        (
            "session.audio.input.transcription.prompt",
            post(
                "/v1/realtime/client_secrets",
                json!({"session": {"type": "realtime", "model": "gpt-realtime",
                    "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe", "prompt": s}}}}}),
            ),
        ),
    ];
    let leaks = leaks(&block(), SECRET, cases).await;
    assert!(leaks.is_empty(), "reached the upstream: {leaks:#?}");
}

/// FINDING 4. A prompt sent as token ids (completions `prompt`, embeddings `input`) is never
/// read: the tokens of a secret reach the model while a block-mode guard passes the request.
#[tokio::test]
async fn token_id_prompts_do_not_get_past_a_blocking_guard() {
    let bpe = tiktoken_rs::cl100k_base_singleton();
    let ids = bpe.encode_with_special_tokens(&format!("my key is {SECRET}"));
    // The ids are the secret: the model reads it back.
    assert_eq!(bpe.decode(&ids).unwrap(), format!("my key is {SECRET}"));
    let cases = vec![
        (
            "completions prompt",
            post(
                "/v1/completions",
                json!({"model": "gpt-3.5-turbo-instruct", "prompt": ids}),
            ),
        ),
        (
            "embeddings input",
            post(
                "/v1/embeddings",
                json!({"model": "text-embedding-3-small", "input": [ids]}),
            ),
        ),
    ];
    let mut passed = Vec::new();
    for (label, req) in cases {
        let (status, bodies) = send(&block(), req).await;
        if status == StatusCode::OK && !bodies.is_empty() {
            passed.push(label);
        }
    }
    assert!(
        passed.is_empty(),
        "token ids passed a block-mode guard unread: {passed:?}"
    );
}

/// FINDING 5. A `role` inside a content part overrides the message's role for the guards
/// (`part.1.or(role)` in `ItemSeed`), but the upstream reads the message's: a guard limited to
/// `user` text does not read the user's text.
#[tokio::test]
async fn a_role_inside_a_content_part_does_not_change_whose_text_it_is() {
    let layer = GuardLayer::new().guard(Guard::new("user", secret()).roles([Role::User]));
    let req = chat(json!([{"role": "user", "content": [
        {"type": "text", "text": SECRET, "role": "assistant"}
    ]}]));
    let (status, bodies) = send(&layer, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "forwarded: {bodies:?}");
}

/// FINDING 6. Role names the API does not define (`"User"`, `"user "`, `"USER"`) are
/// `Role::Other`, which no role-filtered guard reads; a lenient upstream (a gateway that
/// lower-cases or trims, a chat template) reads them as the user's. They should be read by
/// every role-filtered guard (or refused).
#[tokio::test]
async fn unknown_role_spellings_do_not_escape_a_role_filtered_guard() {
    let layer = GuardLayer::new().guard(Guard::new("user", secret()).roles([Role::User]));
    let mut passed = Vec::new();
    for role in ["User", "user ", "USER", "\u{0075}ser\u{200b}"] {
        let (status, _) = send(&layer, chat(json!([{"role": role, "content": SECRET}]))).await;
        if status == StatusCode::OK {
            passed.push(role);
        }
    }
    assert!(passed.is_empty(), "passed: {passed:?}");
}

/// FINDING 7. Two `role` keys in one message are accepted; the parse takes the last, the body
/// rewriter (`redact_value`) the first, and an upstream whichever its parser keeps. With a
/// guard limited to `user` text, the user's text passes as the assistant's.
#[tokio::test]
async fn a_message_with_two_roles_is_refused() {
    let layer = GuardLayer::new().guard(Guard::new("user", secret()).roles([Role::User]));
    let body = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{SECRET}","role":"assistant"}}]}}"#
    );
    let (status, bodies) = send(&layer, raw("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "forwarded: {bodies:?}");
}

/// FINDING 8. The tool firewall names a `namespace` tool by its namespace: the functions inside
/// it are never checked.
#[tokio::test]
async fn functions_inside_a_namespace_tool_are_checked() {
    let layer = GuardLayer::new().guard(Guard::firewall(
        "tools",
        ToolFirewall::new().allow(["crm", "get_*"]).deny(["drop_*"]),
    ));
    let req = post(
        "/v1/responses",
        json!({"model": "gpt-4o", "input": "hi", "tools": [{"type": "namespace", "name": "crm",
            "description": "CRM", "tools": [{"type": "function", "name": "drop_table", "parameters": {}}]}]}),
    );
    let (status, bodies) = send(&layer, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "forwarded: {bodies:?}");
}

/// FINDING 9. Tools offered in Responses `input` items (`additional_tools`,
/// `tool_search_output`) are never seen by the firewall (nor read by the detectors).
#[tokio::test]
async fn tools_offered_in_input_items_are_checked() {
    let layer = GuardLayer::new().guard(Guard::firewall(
        "tools",
        ToolFirewall::new().allow(["get_*"]),
    ));
    let tool = json!({"type": "function", "name": "drop_table", "parameters": {}});
    let mut passed = Vec::new();
    for item in [
        json!({"type": "additional_tools", "role": "developer", "tools": [tool]}),
        json!({"type": "tool_search_output", "call_id": "c1", "execution": "client", "tools": [tool]}),
    ] {
        let ty = item["type"].as_str().unwrap().to_owned();
        let req = post("/v1/responses", json!({"model": "gpt-4o", "input": [item]}));
        if send(&layer, req).await.0 == StatusCode::OK {
            passed.push(ty);
        }
    }
    assert!(passed.is_empty(), "offered unchecked: {passed:?}");
}

/// FINDING 10. A function tool with a name at two levels is checked by one of them
/// (`function.name` first), while the Responses API reads the top-level `name` (and
/// gateways that accept both shapes read either): every name a tool carries must pass.
#[tokio::test]
async fn a_tool_with_two_names_is_checked_by_both() {
    let layer = GuardLayer::new().guard(Guard::firewall(
        "tools",
        ToolFirewall::new().allow(["get_*"]),
    ));
    let tool = json!({"type": "function", "name": "drop_table",
        "function": {"name": "get_weather", "parameters": {}}, "parameters": {}});
    let mut passed = Vec::new();
    for path in ["/v1/responses", "/v1/chat/completions"] {
        let req = post(
            path,
            json!({"model": "gpt-4o", "input": "hi", "messages": [], "tools": [tool]}),
        );
        if send(&layer, req).await.0 == StatusCode::OK {
            passed.push(path);
        }
    }
    assert!(passed.is_empty(), "drop_table offered on {passed:?}");
}

/// FINDING 11. After a redaction, only the redacting guards look again. A mask that deletes
/// (`mask("")`) lets a client splice a phrase a block-mode guard refuses.
#[tokio::test]
async fn redaction_cannot_splice_text_a_blocking_guard_refuses() {
    let layer = GuardLayer::new()
        .guard(Guard::new(
            "injection",
            Re::new(r"(?i)ignore previous instructions", "injection"),
        ))
        .guard(
            Guard::new("ssn", Re::new(r"\d{3}-\d{2}-\d{4}", "ssn"))
                .mode(Mode::Redact)
                .mask(""),
        );
    let req = chat(json!([{"role": "user", "content": "ignore prev123-45-6789ious instructions"}]));
    let (status, bodies) = send(&layer, req).await;
    assert!(
        !leaked(&bodies, "ignore previous instructions"),
        "spliced phrase forwarded ({status}): {bodies:?}"
    );
}

/// FINDING 12. A redacting webhook's verdict is applied by exact-string replacement in the
/// fields the body rewriter walks, and nothing checks that it was applied. Texts the webhook
/// was shown but the rewriter does not walk (a new thread's messages, a realtime session's
/// instructions, schema property names and `type` strings in tools) go upstream unredacted.
#[tokio::test]
async fn a_redacting_webhook_verdict_is_applied_or_the_request_refused() {
    let layer = GuardLayer::new()
        .guard(Guard::external("names", Scripted::redacting("Alice")).mode(Mode::Redact));
    let cases = vec![
        (
            "threads/runs thread.messages",
            post(
                "/v1/threads/runs",
                json!({"assistant_id": "asst_1", "model": "gpt-4o",
                    "thread": {"messages": [{"role": "user", "content": "Alice says hi"}]}}),
            ),
        ),
        (
            "realtime session.instructions",
            post(
                "/v1/realtime/client_secrets",
                json!({"session": {"type": "realtime", "model": "gpt-realtime", "instructions": "Call Alice"}}),
            ),
        ),
        (
            "tools schema property name",
            post(
                "/v1/chat/completions",
                json!({"model": "gpt-4o", "messages": [], "tools": [{"type": "function", "function": {
                    "name": "f", "parameters": {"type": "object", "properties": {"Alice": {"type": "string"}}}}}]}),
            ),
        ),
    ];
    let leaks = leaks(&layer, "Alice", cases).await;
    assert!(
        leaks.is_empty(),
        "webhook redaction not applied: {leaks:#?}"
    );
}

/// FINDING 13. With `hash_end_users`, a multipart request with a `user` field (images edits)
/// is refused with 400 "could not be rewritten": the hash is queued on a body the JSON
/// rewriter cannot write. Fixed: refused with a message that says why (the multipart `user`
/// is not rewritten), and the raw id never goes upstream.
#[tokio::test]
async fn end_user_hashing_never_forwards_a_multipart_user_raw() {
    let layer = GuardLayer::new().hash_end_users("pepper");
    let boundary = "XyZ";
    let body = format!(
        "--{boundary}\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\ngpt-image-1\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"prompt\"\r\n\r\na cat\r\n--{boundary}\r\ncontent-disposition: form-data; name=\"user\"\r\n\r\nalice@example.com\r\n--{boundary}--\r\n"
    );
    let req = Request::post("/v1/images/edits")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .unwrap();
    let (svc, log, _) = stack(layer, None);
    let response = svc.oneshot(req).await.unwrap();
    let bodies = forwarded(&log);
    assert!(
        !leaked(&bodies, "alice@example.com"),
        "the raw end-user id went upstream"
    );
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let text = String::from_utf8_lossy(response.body());
    assert!(
        text.contains("multipart") && text.contains("`user`"),
        "{text}"
    );
}

/// FINDING 16. A batch runs the prompts of an uploaded file the guards never read (the file
/// goes up through `/v1/files`, a route whose body is not read; `/v1/batches` names only its
/// id). `PromptLimitLayer` refuses batches it cannot verify (`BATCH_REFUSED`); the guards let
/// them through.
#[tokio::test]
async fn batches_are_refused_when_request_guards_apply() {
    let req = post(
        "/v1/batches",
        json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    );
    let (status, bodies) = send(&block(), req).await;
    assert!(
        status.is_client_error() && bodies.is_empty(),
        "a batch of unread prompts was forwarded ({status})"
    );
}

/// FINDING 17. The firewall names an MCP server by its `server_label`, which the client
/// chooses: allowing `mcp:github` allows any server the client labels `github`.
#[tokio::test]
async fn an_mcp_server_is_not_identified_by_a_label_the_client_chooses() {
    let layer = GuardLayer::new().guard(Guard::firewall(
        "tools",
        ToolFirewall::new().allow(["mcp:github"]),
    ));
    let req = post(
        "/v1/responses",
        json!({"model": "gpt-4o", "input": "hi", "tools": [{"type": "mcp", "server_label": "github",
            "server_url": "https://attacker.example/mcp", "require_approval": "never"}]}),
    );
    let (status, _) = send(&layer, req).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "an arbitrary MCP server was allowed"
    );
}

/// FINDING 18 (low). A body on a `GET` to a model route is never read (only POST, PUT and
/// PATCH bodies are), yet it is forwarded: behind a gateway that honours
/// `X-HTTP-Method-Override` (or reads GET bodies), its prompt reaches a model unguarded.
#[tokio::test]
async fn a_get_with_a_prompt_body_is_not_forwarded_unread() {
    let req = Request::get("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-http-method-override", "POST")
        .body(
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": SECRET}]})
                .to_string(),
        )
        .unwrap();
    let (status, bodies) = send(&block(), req).await;
    assert!(!leaked(&bodies, SECRET), "forwarded ({status})");
}

/// The refusals above (batches, unread bodies, token-id prompts) are for guards that could
/// refuse or rewrite the request. Guards that only flag it, only read responses, or look for
/// the system prompt in answers let such requests through (flagging what they can).
#[tokio::test]
async fn guards_that_cannot_refuse_a_request_refuse_none_of_those() {
    let layers = [
        (
            "audit",
            GuardLayer::new().guard(Guard::new("secrets", secret()).mode(Mode::Audit)),
        ),
        (
            "response only",
            GuardLayer::new().guard(
                Guard::new("secrets", secret()).on(tower_llm_policy::guard::Sides::RESPONSE),
            ),
        ),
        (
            "reflection",
            GuardLayer::new().guard(Guard::reflection("echo", 20)),
        ),
    ];
    for (label, layer) in layers {
        let batch = post(
            "/v1/batches",
            json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        );
        let token_ids = post(
            "/v1/completions",
            json!({"model": "gpt-3.5-turbo-instruct", "prompt": [1, 2, 3]}),
        );
        let get_with_body = Request::get("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(json!({"model": "gpt-4o", "messages": []}).to_string())
            .unwrap();
        for (what, req) in [
            ("batch", batch),
            ("token ids", token_ids),
            ("GET with a body", get_with_body),
        ] {
            let (status, _) = send(&layer, req).await;
            assert_eq!(status, StatusCode::OK, "{label}: {what} refused");
        }
    }
}

// =============================================================================================
// Attacks that are stopped (pass on 98bf2af): properties to keep.

/// Escaped keys and duplicate prompt fields cannot make the guard read one text and the
/// upstream another.
#[tokio::test]
async fn escaped_and_duplicate_keys_are_read_or_refused() {
    let s = SECRET;
    let bodies = [
        // Escaped role key: still the user's.
        format!(r#"{{"model":"gpt-4o","messages":[{{"r\u006fle":"user","c\u006fntent":"{s}"}}]}}"#),
        // Two `content` keys: both are read.
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"hi","content":"{s}"}}]}}"#),
        // `messages` twice, once escaped: refused.
        format!(r#"{{"model":"gpt-4o","messages":[],"m\u0065ssages":[{{"role":"user","content":"{s}"}}]}}"#),
        // Case variants Go would read: refused.
        format!(r#"{{"model":"gpt-4o","Messages":[{{"role":"user","content":"{s}"}}]}}"#),
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","Content":"{s}"}}]}}"#),
        format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"x","\u017fummary":"{s}"}}]}}"#),
        // Escaped text.
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"\u0073\u006B\u002Dabcdefgh12345"}]}"#.to_owned(),
    ];
    let layer = GuardLayer::new().guard(Guard::new("user", secret()).roles([Role::User]));
    for body in bodies {
        let (status, forwarded) = send(&layer, raw("/v1/chat/completions", &body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(forwarded.is_empty());
    }
}

/// Redaction walks duplicate keys too: both `content` values are masked.
#[tokio::test]
async fn redaction_masks_every_duplicate() {
    let body = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{SECRET}","content":"b {SECRET}"}}]}}"#
    );
    let (status, bodies) = send(&redact(), raw("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!leaked(&bodies, SECRET), "{bodies:?}");
    assert_eq!(bodies[0].matches("[REDACTED:api_key]").count(), 2);
}

/// Text the rewriter does not reach in redact mode is refused, never forwarded unredacted
/// (the post-redaction check): a new thread's messages, a realtime session's instructions, a
/// schema property name, a `type` string, an `id` inside a message.
#[tokio::test]
async fn redact_mode_refuses_what_it_cannot_rewrite() {
    let s = SECRET;
    let cases = vec![
        (
            "thread.messages",
            post(
                "/v1/threads/runs",
                json!({"assistant_id": "a", "model": "gpt-4o", "thread": {"messages": [{"role": "user", "content": s}]}}),
            ),
        ),
        (
            "session.instructions",
            post(
                "/v1/realtime/client_secrets",
                json!({"session": {"type": "realtime", "model": "gpt-realtime", "instructions": s}}),
            ),
        ),
        (
            "schema key",
            post(
                "/v1/chat/completions",
                json!({"model": "gpt-4o", "messages": [], "response_format": {"type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "properties": {s: {"type": "string"}}}}}}),
            ),
        ),
        (
            "type string in tools",
            post(
                "/v1/chat/completions",
                json!({"model": "gpt-4o", "messages": [], "tools": [{"type": s}]}),
            ),
        ),
    ];
    let leaks = leaks(&redact(), SECRET, cases).await;
    assert!(leaks.is_empty(), "forwarded unredacted: {leaks:#?}");
}

/// Redaction writes valid JSON whatever the text: escapes, quotes and backslashes in masks,
/// astral characters, many matches, overlapping guards; numbers keep their spelling.
#[tokio::test]
async fn redaction_output_is_valid_json_with_the_same_structure() {
    let layer = GuardLayer::new()
        .guard(
            Guard::new("secrets", secret())
                .mode(Mode::Redact)
                .mask("\"\\{label}\u{1F600}\n</script>"),
        )
        .guard(
            Guard::new("digits", Re::new(r"\d{5}", "digits"))
                .mode(Mode::Redact)
                .mask("{label}{label}"),
        );
    let many = format!("{SECRET} ").repeat(500);
    let body = format!(
        r#"{{"model":"gpt-4o","temperature":1e0,"seed":-0,"messages":[{{"role":"user","content":"\ud83d\ude00 \u0000 \"{SECRET}\" \\ {many}"}},{{"role":"user","content":[{{"type":"text","text":"x"}}]}}]}}"#
    );
    let (status, bodies) = send(&layer, raw("/v1/chat/completions", &body)).await;
    assert_eq!(status, StatusCode::OK);
    let sent: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert!(!leaked(&bodies, SECRET));
    assert!(bodies[0].contains(r#""temperature":1e0,"seed":-0"#));
    let text = sent["messages"][0]["content"].as_str().unwrap();
    assert!(text.starts_with("\u{1F600} \u{0} \""), "{text:?}");
    assert_eq!(text.matches("</script>").count(), 501);
    assert_eq!(sent["messages"][1]["content"][0]["text"], "x");
}

/// Malformed or hostile JSON is refused with a 4xx, never a panic or a 5xx: lone surrogates
/// (in read and in skipped strings, with a redaction pending), deep nesting, `messages` that
/// nest `messages`, non-string roles and users.
#[tokio::test]
async fn hostile_json_is_refused_with_a_client_error() {
    let deep_messages = format!(
        r#"{{"model":"gpt-4o","messages":[{}{}]}}"#,
        r#"{"role":"user","messages":["#.repeat(200),
        "]}".repeat(200)
    );
    let nested = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    let deep = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{SECRET}","x":{nested}}}]}}"#
    );
    let bodies = [
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"\ud800"}]}"#.to_owned(),
        format!(
            r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":[{{"type":"text","text":"{SECRET}"}},{{"type":"image_url","image_url":{{"url":"\udc00"}}}}]}}]}}"#
        ),
        deep_messages,
        deep,
        r#"{"model":"gpt-4o","messages":[{"role":1,"content":"x"}]}"#.to_owned(),
        r#"{"model":"gpt-4o","messages":[],"user":{"id":"a"}}"#.to_owned(),
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":1.5}]}"#.to_owned(),
        r#"{"model":"gpt-4o","messages":"#.to_owned(),
    ];
    for (layer, guarded) in [
        (redact(), true),
        (block(), true),
        (GuardLayer::new().hash_end_users("s"), false),
    ] {
        for body in &bodies {
            let (status, bodies) = send(&layer, raw("/v1/chat/completions", body)).await;
            assert!(
                status.is_client_error() || status == StatusCode::OK,
                "{status} for {}",
                &body[..body.len().min(120)]
            );
            assert!(!guarded || !leaked(&bodies, SECRET), "{}", &body[..120]);
        }
    }
}

/// The guards header only adds guards, in any spelling, however often it is sent, and is
/// never forwarded.
#[tokio::test]
async fn the_guards_header_cannot_remove_a_guard_and_never_goes_upstream() {
    let layer = GuardLayer::new()
        .guard(Guard::new("secrets", secret()))
        .optional_guard(Guard::new("digits", Re::new(r"\d{6}", "digits")));
    let variants: Vec<Vec<&[u8]>> = vec![
        vec![b"-secrets"],
        vec![b"!secrets, digits"],
        vec![b"none"],
        vec![b"", b"secrets=off"],
        vec![b"\xff\xfe"],
        vec![b"digits", b"-secrets"],
    ];
    for values in variants {
        for name in ["x-llm-policy-guards", "X-LLM-Policy-Guards"] {
            let (svc, log, _) = stack(layer.clone(), None);
            let mut req = chat(json!([{"role": "user", "content": SECRET}]));
            for v in &values {
                req.headers_mut().append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    http::HeaderValue::from_bytes(v).unwrap(),
                );
            }
            assert_eq!(
                svc.oneshot(req).await.unwrap().status(),
                StatusCode::BAD_REQUEST
            );
            assert!(log.lock().unwrap().is_empty());
        }
        // Clean text: forwarded without the header.
        let (svc, log, _) = stack(layer.clone(), None);
        let mut req = chat(json!([{"role": "user", "content": "hello"}]));
        for v in &values {
            req.headers_mut().append(
                "x-llm-policy-guards",
                http::HeaderValue::from_bytes(v).unwrap(),
            );
        }
        assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK);
        assert!(!log.lock().unwrap()[0]
            .headers
            .contains_key("x-llm-policy-guards"));
    }
    // A very long header naming the optional guard many times adds it once.
    let (svc, _, _) = stack(layer, None);
    let mut req = chat(json!([{"role": "user", "content": "123456"}]));
    req.headers_mut().insert(
        "x-llm-policy-guards",
        "digits,".repeat(10_000).parse().unwrap(),
    );
    assert_eq!(
        svc.oneshot(req).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
}

/// The prompt-token header never loosens a limit, whatever its spelling, and never goes
/// upstream.
#[tokio::test]
async fn the_prompt_token_header_never_loosens_and_never_goes_upstream() {
    let mut key = ApiKey::new("k");
    key.max_prompt_tokens = Some(10);
    let long = "word ".repeat(60);
    for values in [
        vec!["0"],
        vec!["-1"],
        vec!["+5000"],
        vec![" 5000 "],
        vec!["99999999999999999999999"],
        vec!["5000", "1"],
        vec!["1", "5000"],
        vec!["0x1000"],
        vec!["5e3"],
    ] {
        let (svc, log, _) = stack(GuardLayer::new(), Some(key.clone()));
        let mut req = chat(json!([{"role": "user", "content": long}]));
        for v in &values {
            req.headers_mut()
                .append("x-llm-policy-max-prompt-tokens", v.parse().unwrap());
        }
        let status = svc.oneshot(req).await.unwrap().status();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{values:?}");
        assert!(log.lock().unwrap().is_empty());
    }
    let (svc, log, _) = stack(GuardLayer::new(), None);
    let mut req = chat(json!([{"role": "user", "content": "hi"}]));
    req.headers_mut()
        .append("x-llm-policy-max-prompt-tokens", "5000".parse().unwrap());
    req.headers_mut()
        .append("X-LLM-Policy-Max-Prompt-Tokens", "junk".parse().unwrap());
    assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK);
    assert!(!log.lock().unwrap()[0]
        .headers
        .contains_key("x-llm-policy-max-prompt-tokens"));
}

/// End-user hashing: an escaped key is hashed, a duplicate or a non-string refused, the record
/// and the upstream agree; a `user` inside `metadata` is not an end-user id and is left alone.
#[tokio::test]
async fn end_user_ids_never_go_upstream_raw() {
    let layer = GuardLayer::new().hash_end_users("pepper");
    let (svc, log, sink) = stack(layer.clone(), None);
    let body = r#"{"model":"gpt-4o","messages":[],"us\u0065r":"alice","metadata":{"user":"note"}}"#;
    assert_eq!(
        svc.oneshot(raw("/v1/chat/completions", body))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let sent: Value = serde_json::from_str(&forwarded(&log)[0]).unwrap();
    let user = sent["user"].as_str().unwrap().to_owned();
    assert_eq!(user.len(), 64);
    assert!(!forwarded(&log)[0].contains("alice"));
    assert_eq!(record(&sink).user.as_deref(), Some(user.as_str()));
    assert_eq!(sent["metadata"]["user"], "note");
    for body in [
        r#"{"model":"gpt-4o","messages":[],"user":"alice","us\u0065r":"bob"}"#,
        r#"{"model":"gpt-4o","messages":[],"user":1}"#,
        r#"{"model":"gpt-4o","messages":[],"user":["alice"]}"#,
        r#"{"model":"gpt-4o","messages":[],"safety_identifier":"a","safety_identifier":"b"}"#,
    ] {
        let (status, bodies) = send(&layer, raw("/v1/chat/completions", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(bodies.is_empty());
    }
}

/// The tool firewall reads escaped names, `functions` as well as `tools`, and refuses a second
/// `tools` field.
#[tokio::test]
async fn the_firewall_reads_escaped_names_and_every_tool_list() {
    let layer = GuardLayer::new().guard(Guard::firewall(
        "tools",
        ToolFirewall::new().allow(["get_*"]),
    ));
    for body in [
        r#"{"model":"gpt-4o","messages":[],"tools":[{"type":"function","function":{"n\u0061me":"drop_table"}}]}"#,
        r#"{"model":"gpt-4o","messages":[],"tools":[{"type":"function","function":{"name":"get_x"}}],"functions":[{"name":"drop_table"}]}"#,
        r#"{"model":"gpt-4o","messages":[],"tools":[{"type":"function","function":{"name":"get_x"}}],"t\u006fols":[{"type":"function","function":{"name":"drop_table"}}]}"#,
        r#"{"model":"gpt-4o","messages":[],"tools":[{"type":"function","function":{"name":"get_x","name":"drop_table"}}]}"#,
        r#"{"model":"gpt-4o","messages":[],"tools":[{"type":"function","Function":{"name":"drop_table"}}]}"#,
        r#"{"model":"gpt-4o","input":"x","tools":[{"type":"custom","name":"drop_table"}]}"#,
        r#"{"model":"gpt-4o","input":"x","tools":[{"type":"mcp","server_label":"gh","server_url":"https://x"}]}"#,
    ] {
        let path = if body.contains("\"input\"") {
            "/v1/responses"
        } else {
            "/v1/chat/completions"
        };
        let (status, _) = send(&layer, raw(path, body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
}

/// An external guard is shown the text of every prompt field it reads: instructions, tool
/// definitions, template variables, tool results.
#[tokio::test]
async fn an_external_guard_is_shown_every_prompt_field() {
    let moderator = Scripted::new(|input| {
        Ok(if input.texts.iter().any(|t| t.contains("FLAG")) {
            Verdict::Flag { categories: vec![] }
        } else {
            Verdict::Allow
        })
    });
    let layer = GuardLayer::new().guard(Guard::external("mod", moderator));
    let cases = [
        json!({"model": "gpt-4o", "input": "x", "instructions": "FLAG"}),
        json!({"model": "gpt-4o", "input": "x", "tools": [{"type": "function", "name": "f", "description": "FLAG"}]}),
        json!({"model": "gpt-4o", "prompt": {"id": "p", "variables": {"a": "FLAG"}}}),
        json!({"model": "gpt-4o", "input": [{"type": "function_call_output", "call_id": "c", "output": "FLAG"}]}),
        json!({"model": "gpt-4o", "input": [{"type": "custom_tool_call", "call_id": "c", "name": "f", "input": "FLAG"}]}),
        json!({"model": "gpt-4o", "input": [{"type": "reasoning", "id": "r", "summary": [{"type": "summary_text", "text": "FLAG"}]}]}),
        json!({"model": "gpt-4o", "input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {"description": "FLAG"}}}}),
    ];
    for body in cases {
        let (status, _) = send(&layer, post("/v1/responses", body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
}

/// FINDING 14. Tool and schema definitions nested deeper than serde_json's recursion limit
/// (128) are accepted by the parse (their deep members are skipped), but `offered_tools` and
/// `Texts::of` then fail to parse them as a `Value`: the firewall sees no tool at all, and the
/// detectors read the raw JSON text, escapes undecoded.
#[tokio::test]
async fn deeply_nested_tool_definitions_are_still_checked() {
    let deep = format!("{}0{}", "[".repeat(200), "]".repeat(200));
    let firewall = GuardLayer::new().guard(Guard::firewall(
        "tools",
        ToolFirewall::new().allow(["get_*"]),
    ));
    let body = format!(
        r#"{{"model":"gpt-4o","messages":[],"tools":[{{"type":"function","function":{{"name":"drop_table","parameters":{{"type":"object","default":{deep}}}}}}}]}}"#
    );
    let mut passed = Vec::new();
    if send(&firewall, raw("/v1/chat/completions", &body)).await.0 == StatusCode::OK {
        passed.push("firewall: drop_table offered");
    }
    let body = format!(
        r#"{{"model":"gpt-4o","messages":[],"tools":[{{"type":"function","function":{{"name":"f","description":"\u0073k-abcdefgh12345","parameters":{{"type":"object","default":{deep}}}}}}}]}}"#
    );
    if send(&block(), raw("/v1/chat/completions", &body)).await.0 == StatusCode::OK {
        passed.push("detector: escaped secret in a tool description");
    }
    assert!(passed.is_empty(), "{passed:?}");
}

/// FINDING 15 (crash). A redaction walks the prompt fields recursively (`redact_value`), with
/// no depth limit, while the parse skips deep values without one: one request with a match
/// and a deeply nested array inside a message overflows the stack and aborts the process
/// (every connection of the server). The request is sent in a child process; the test checks
/// that it answered instead of aborting.
#[test]
fn deep_nesting_in_a_redacted_request_does_not_crash_the_process() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "deep_nesting_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the child died ({:?}): {}",
        out.status,
        stderr
            .lines()
            .filter(|l| l.contains("overflow") || l.contains("status"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

#[tokio::test]
#[ignore = "run by deep_nesting_in_a_redacted_request_does_not_crash_the_process"]
async fn deep_nesting_child() {
    // 100 000 levels: a 200 KB body, far under the 16 MiB default limit.
    let n = 100_000;
    let body = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{SECRET}","x":{}1{}}}]}}"#,
        "[".repeat(n),
        "]".repeat(n)
    );
    let (status, bodies) = send(&redact(), raw("/v1/chat/completions", &body)).await;
    eprintln!("status {status}");
    assert!(!leaked(&bodies, SECRET));
}
