//! The example proxy (this package's library, as `src/main.rs` runs it), in-process on a
//! loopback port in front of the mock upstream (`src/mock.rs`), driven by a real OpenAI client
//! (async-openai).
//!
//! Every rejected request is also checked not to have reached the upstream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use async_openai::Client;
use bytes::Bytes;
use example_proxy::audit_line as app_audit;
use example_proxy::{app, config, mock};
use futures_util::StreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use mock::{MockLog, MockOptions};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const PROVIDER_KEY: &str = "sk-provider-test-0123456789";
const PROVIDER_ENV: &str = "TEST_PROXY_PROVIDER_KEY";
const CHAT_KEY: &str = "sk-chat-app-test-key";
const NO_MODELS_KEY: &str = "sk-no-models-test-key";
const OPEN_KEY: &str = "sk-open-test-key";
const OFFICE_KEY: &str = "sk-office-only-test-key";
const JSON_LIMIT: usize = 1024 * 1024;
const MULTIPART_LIMIT: usize = 2 * 1024 * 1024;

/// The test configuration; `{base}` and `{audit}` are filled in.
fn config_text(base: &str, audit: &Path) -> String {
    format!(
        r#"listen = "127.0.0.1:0"

[upstream]
base_url = "{base}"
api_key_env = "{PROVIDER_ENV}"
first_byte_timeout = "10s"
idle_timeout = "10s"

[server]
shutdown_grace = "10s"

[audit]
jsonl = "{audit}"

[[keys]]
name = "chat-app"
secret = "{CHAT_KEY}"
model_limits_enabled = true
model_limits = ["gpt-4o-mini", "gpt-4o"]
blocked_features = ["images", "audio"]
max_prompt_tokens = 1000

[[keys]]
name = "no-models"
secret = "{NO_MODELS_KEY}"
model_limits_enabled = true
model_limits = []

[[keys]]
name = "open"
secret = "{OPEN_KEY}"
blocked_features = ["images"]

[[keys]]
name = "office-only"
secret = "{OFFICE_KEY}"
allow_ips = ["10.0.0.0/8"]

[body]
limit = {JSON_LIMIT}
multipart_limit = {MULTIPART_LIMIT}
"#,
        audit = audit.display()
    )
}

/// A proxy on a loopback port in front of a mock, with its configuration in a temp dir.
struct Harness {
    addr: SocketAddr,
    log: MockLog,
    config_path: PathBuf,
    audit_path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

fn init() {
    // async-openai's reqwest is built without a crypto provider (no aws-lc): use ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn env(name: &str) -> Option<String> {
    (name == PROVIDER_ENV).then(|| PROVIDER_KEY.to_owned())
}

async fn start() -> Harness {
    start_with(MockOptions::default(), false).await
}

async fn start_with(opts: MockOptions, no_policy: bool) -> Harness {
    start_edited(opts, no_policy, |text| text).await
}

/// Starts with the test configuration as changed by `edit`.
async fn start_edited(
    opts: MockOptions,
    no_policy: bool,
    edit: impl FnOnce(String) -> String,
) -> Harness {
    init();
    let (mock_addr, log) = mock::spawn(opts).await.expect("mock starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("proxy.toml");
    let audit_path = dir.path().join("audit.jsonl");
    let text = edit(config_text(&format!("http://{mock_addr}/v1"), &audit_path));
    std::fs::write(&config_path, text).expect("config written");
    let args = app::Args {
        config: Some(config_path.clone()),
        listen: None,
        no_policy,
        migrate: false,
    };
    let proxy = app::Proxy::prepare(&args, env).await.expect("proxy starts");
    let addr = proxy.addr;
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(proxy.run(async {
        let _ = rx.await;
    }));
    Harness {
        addr,
        log,
        config_path,
        audit_path,
        shutdown: Some(tx),
        server: Some(server),
        _dir: dir,
    }
}

impl Harness {
    /// The audit log's records, one JSON object per line (after [`stop`](Self::stop), which
    /// flushes it).
    fn audit_records(&self) -> Result<Vec<Value>, serde_json::Error> {
        let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
        text.lines().map(serde_json::from_str).collect()
    }

    fn base(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn client(&self, key: &str) -> Client<OpenAIConfig> {
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(self.base())
                .with_api_key(key),
        )
    }

    /// Stops the proxy gracefully and waits for it.
    async fn stop(&mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.server.take() {
            Some(server) => tokio::time::timeout(Duration::from_secs(20), server)
                .await
                .expect("the proxy stops within its grace period")
                .expect("the server task does not panic"),
            None => Ok(()),
        }
    }
}

fn chat(model: &str, text: &str) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(model)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(text)
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap()
}

/// The status and the OpenAI error of a failed call.
fn api_error(
    result: Result<impl std::fmt::Debug, OpenAIError>,
) -> (u16, async_openai::error::ApiError) {
    match result {
        Err(OpenAIError::ApiError(response)) => (response.status_code.as_u16(), response.api_error),
        other => panic!("expected an OpenAI API error, got {other:?}"),
    }
}

/// A plain HTTP request to the proxy: status and body.
async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, Bytes) {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let response = client
        .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .expect("the proxy answers");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

// ---------------------------------------------------------------------------------------------
// Allowed calls

#[tokio::test]
async fn allowed_call_reaches_the_upstream_with_the_provider_key() -> TestResult {
    let h = start().await;
    let response = h
        .client(CHAT_KEY)
        .chat()
        .create(chat("gpt-4o-mini", "hello through the proxy"))
        .await?;
    assert_eq!(response.model, "gpt-4o-mini");
    let text = response.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    assert_eq!(text, "This is a mock response from the upstream");
    assert_eq!(response.usage.unwrap().prompt_tokens, 4);

    let got = h.log.received();
    assert_eq!(got.len(), 1);
    let got = &got[0];
    assert_eq!(got.method, Method::POST);
    assert_eq!(got.path, "/v1/chat/completions");
    assert_eq!(
        got.authorization.as_deref(),
        Some(&*format!("Bearer {PROVIDER_KEY}"))
    );
    assert_eq!(got.headers["accept-encoding"], "identity");
    for value in got.headers.values() {
        let value = value.as_bytes();
        assert!(!value
            .windows(CHAT_KEY.len())
            .any(|w| w == CHAT_KEY.as_bytes()));
    }
    let body = got.json().unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["messages"][0]["content"], "hello through the proxy");
    Ok(())
}

#[tokio::test]
async fn a_dated_snapshot_of_an_allowed_model_is_allowed() -> TestResult {
    let h = start().await;
    let response = h
        .client(CHAT_KEY)
        .chat()
        .create(chat("gpt-4o-2024-08-06", "hello"))
        .await?;
    assert_eq!(response.model, "gpt-4o-2024-08-06");
    assert_eq!(
        h.log.last().unwrap().json().unwrap()["model"],
        "gpt-4o-2024-08-06"
    );
    Ok(())
}

#[tokio::test]
async fn streamed_responses_arrive_chunk_by_chunk() -> TestResult {
    // Slow chunks: the first must reach the client before the upstream has finished.
    let opts = MockOptions::default()
        .stream_chunks(6)
        .chunk_delay(Duration::from_millis(40));
    let h = start_with(opts, false).await;
    let mut request = chat("gpt-4o-mini", "stream please");
    request.stream = Some(true);
    let mut stream = h.client(CHAT_KEY).chat().create_stream(request).await?;

    let mut text = String::new();
    let mut chunks = 0;
    let mut completed_at_first_content = None;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await? {
        let chunk = chunk?;
        chunks += 1;
        if let Some(content) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
            if !content.is_empty() && completed_at_first_content.is_none() {
                completed_at_first_content = Some(h.log.streams_completed());
            }
            text.push_str(&content);
        }
    }
    assert_eq!(text, "This is a mock response from");
    assert!(chunks >= 7, "{chunks} chunks");
    assert_eq!(
        completed_at_first_content,
        Some(0),
        "the first chunk was held until the upstream finished"
    );
    assert_eq!(h.log.streams_completed(), 1);
    assert_eq!(h.log.last().unwrap().json().unwrap()["stream"], true);
    Ok(())
}

#[tokio::test]
async fn model_list_is_filtered_to_the_keys_models() -> TestResult {
    let h = start().await;
    let models = h.client(CHAT_KEY).models().list().await?;
    let mut ids: Vec<_> = models.data.iter().map(|m| m.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["gpt-4o", "gpt-4o-mini"]);

    // A key without a model list sees the upstream's whole list.
    let all = h.client(OPEN_KEY).models().list().await?;
    assert_eq!(all.data.len(), mock::MODELS.len());
    assert_eq!(h.log.len(), 2);
    assert_eq!(
        h.log.last().unwrap().authorization.as_deref(),
        Some(&*format!("Bearer {PROVIDER_KEY}"))
    );
    Ok(())
}

#[tokio::test]
async fn healthz_answers_without_a_key() -> TestResult {
    let h = start().await;
    let (status, body) = send(Method::GET, &format!("http://{}/healthz", h.addr), &[], "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_slice::<Value>(&body)?["status"], "ok");
    assert!(h.log.is_empty());
    Ok(())
}

#[tokio::test]
async fn http2_clients_are_served() -> TestResult {
    let h = start().await;
    let client = HttpClient::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let request = Request::post(format!("{}/chat/completions", h.base()))
        .header("authorization", format!("Bearer {CHAT_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"over h2"}]}"#,
        )))?;
    let response = client.request(request).await?;
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(h.log.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_slow_upstream_is_an_openai_shaped_504() -> TestResult {
    let opts = MockOptions::default().latency(Duration::from_secs(3));
    let h = start_edited(opts, false, |text| {
        text.replace(
            "first_byte_timeout = \"10s\"",
            "first_byte_timeout = \"200ms\"",
        )
    })
    .await;
    let started = std::time::Instant::now();
    let (status, error) = api_error(
        h.client(CHAT_KEY)
            .chat()
            .create(chat("gpt-4o-mini", "hello"))
            .await,
    );
    assert_eq!(status, 504);
    // async-openai does not parse 5xx bodies (OpenAI's may not be JSON): the raw body is the
    // message, and it is the OpenAI-shaped error.
    let body: Value = serde_json::from_str(&error.message)?;
    assert_eq!(body["error"]["code"], "upstream_timeout", "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert!(started.elapsed() < Duration::from_secs(2));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rejections: OpenAI-typed errors, and nothing reaches the upstream

#[tokio::test]
async fn a_model_outside_the_keys_list_is_403() -> TestResult {
    let h = start().await;
    let result = h
        .client(CHAT_KEY)
        .chat()
        .create(chat("gpt-4.1", "hello"))
        .await;
    let (status, error) = api_error(result);
    assert_eq!(status, 403);
    assert_eq!(error.code.as_deref(), Some("model_not_allowed"));
    assert_eq!(error.param.as_deref(), Some("model"));
    assert!(error.message.contains("gpt-4.1"), "{}", error.message);
    assert!(h.log.is_empty(), "a rejected request reached the upstream");
    Ok(())
}

#[tokio::test]
async fn an_empty_model_list_is_403() -> TestResult {
    let h = start().await;
    let result = h
        .client(NO_MODELS_KEY)
        .chat()
        .create(chat("gpt-4o-mini", "hello"))
        .await;
    let (status, error) = api_error(result);
    assert_eq!(status, 403);
    assert_eq!(error.code.as_deref(), Some("model_not_allowed"));
    assert_eq!(error.message, "This key has no access to any models");
    assert!(h.log.is_empty(), "a rejected request reached the upstream");
    Ok(())
}

#[tokio::test]
async fn an_unknown_key_is_401() -> TestResult {
    let h = start().await;
    let result = h
        .client("sk-not-a-key")
        .chat()
        .create(chat("gpt-4o-mini", "hello"))
        .await;
    let (status, error) = api_error(result);
    assert_eq!(status, 401);
    assert_eq!(error.code.as_deref(), Some("invalid_api_key"));
    assert!(!error.message.contains("sk-not-a-key"));

    // The model list too.
    let (status, _) = api_error(h.client("sk-not-a-key").models().list().await);
    assert_eq!(status, 401);
    assert!(h.log.is_empty(), "a rejected request reached the upstream");
    Ok(())
}

#[tokio::test]
async fn the_client_address_is_checked_against_the_keys_allow_list() -> TestResult {
    let h = start().await;
    let (status, error) = api_error(
        h.client(OFFICE_KEY)
            .chat()
            .create(chat("gpt-4o-mini", "hello"))
            .await,
    );
    assert_eq!(status, 403);
    assert_eq!(error.code.as_deref(), Some("ip_not_allowed"));
    assert!(error.message.contains("127.0.0.1"), "{}", error.message);
    assert!(h.log.is_empty(), "a rejected request reached the upstream");
    Ok(())
}

#[tokio::test]
async fn no_rejected_request_reaches_the_upstream() -> TestResult {
    let h = start().await;
    let chat_url = format!("{}/chat/completions", h.base());
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let json = ("content-type", "application/json");
    let bearer = |key: &str| format!("Bearer {key}");
    type Case<'a> = (Vec<(&'a str, String)>, &'a str, StatusCode);
    let cases: Vec<Case<'_>> = vec![
        (vec![], body, StatusCode::UNAUTHORIZED),
        (
            vec![("authorization", bearer("sk-unknown"))],
            body,
            StatusCode::UNAUTHORIZED,
        ),
        // Two different keys in two headers.
        (
            vec![
                ("authorization", bearer(CHAT_KEY)),
                ("x-api-key", OPEN_KEY.to_owned()),
            ],
            body,
            StatusCode::UNAUTHORIZED,
        ),
        (
            vec![("authorization", bearer(CHAT_KEY))],
            r#"{"model":"o3-mini","messages":[]}"#,
            StatusCode::FORBIDDEN,
        ),
        (
            vec![("authorization", bearer(NO_MODELS_KEY))],
            body,
            StatusCode::FORBIDDEN,
        ),
        (
            vec![("authorization", bearer(CHAT_KEY))],
            r#"{"model": "gpt-4o-mini", "messages": [}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            vec![("api-key", CHAT_KEY.to_owned())],
            r#"{"messages":[]}"#,
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (headers, body, expected) in cases {
        let mut all: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        all.push(json);
        let (status, answer) = send(Method::POST, &chat_url, &all, body).await;
        assert_eq!(status, expected, "{headers:?} {body}");
        let answer: Value = serde_json::from_slice(&answer)?;
        assert!(answer["error"]["code"].is_string(), "{answer}");
    }
    // An endpoint the policy does not know is refused, not forwarded (`[blocked]
    // unknown_endpoints` defaults to true).
    let auth = bearer(OPEN_KEY);
    let (status, answer) = send(
        Method::POST,
        &format!("{}/chat/complete", h.base()),
        &[("authorization", auth.as_str()), json],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let answer: Value = serde_json::from_slice(&answer)?;
    assert_eq!(answer["error"]["code"], "unknown_url");
    assert!(
        h.log.is_empty(),
        "rejected requests reached the upstream: {:?}",
        h.log.received()
    );
    Ok(())
}

fn multipart_upload(size: usize) -> (String, String) {
    let boundary = "proxy-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{}\r\n--{boundary}--\r\n",
        "x".repeat(size)
    );
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn uploads_stream_up_within_the_body_limit() -> TestResult {
    let h = start().await;
    let url = format!("{}/files", h.base());
    let auth = format!("Bearer {CHAT_KEY}");

    // 1.5 MB under the 2 MiB multipart limit: the upstream gets all of it. (The mock has no
    // files endpoint and answers 404 after reading the body.)
    let (content_type, body) = multipart_upload(1_500_000);
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", content_type.as_str()),
    ];
    let (status, _) = send(Method::POST, &url, &headers, &body).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(h.log.len(), 1);
    assert_eq!(h.log.last().unwrap().body_len, body.len());

    // Over it, by Content-Length: 413 at once, nothing upstream.
    let (content_type, body) = multipart_upload(MULTIPART_LIMIT + 1);
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", content_type.as_str()),
    ];
    let (status, answer) = send(Method::POST, &url, &headers, &body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let answer: Value = serde_json::from_slice(&answer)?;
    assert_eq!(answer["error"]["code"], "request_too_large");
    assert_eq!(h.log.len(), 1, "a body over the limit reached the upstream");

    // JSON bodies have their own, smaller limit.
    let big_chat = chat("gpt-4o-mini", &"word ".repeat(JSON_LIMIT / 5 + 1));
    let (status, error) = api_error(h.client(CHAT_KEY).chat().create(big_chat).await);
    assert_eq!(status, 413);
    assert_eq!(error.code.as_deref(), Some("request_too_large"));
    assert_eq!(h.log.len(), 1, "a body over the limit reached the upstream");
    Ok(())
}

#[tokio::test]
async fn a_chunked_upload_is_cut_off_at_the_limit() -> TestResult {
    use http_body::Frame;
    use http_body_util::StreamBody;
    let h = start().await;
    // 3 MiB in 64 KiB chunks, with no Content-Length.
    let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..48)
        .map(|_| Ok(Frame::data(Bytes::from(vec![b'x'; 64 * 1024]))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let request = Request::post(format!("{}/files", h.base()))
        .header("authorization", format!("Bearer {CHAT_KEY}"))
        .header("content-type", "multipart/form-data; boundary=b")
        .body(body)?;
    let client = HttpClient::builder(TokioExecutor::new()).build_http();
    // The proxy may also close the connection on the broken upload (an `Err` here).
    if let Ok(response) = client.request(request).await {
        let status = response.status();
        assert!(!status.is_success(), "status {status}");
    }
    assert!(
        h.log.is_empty(),
        "a body over the limit reached the upstream"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// A little more than the key file's check interval.
const RELOAD: Duration = Duration::from_millis(1100);

#[tokio::test]
async fn edits_to_the_keys_take_effect_without_a_restart() -> TestResult {
    let h = start().await;
    const NEW_KEY: &str = "sk-added-later-key";
    let result = h
        .client(NEW_KEY)
        .chat()
        .create(chat("o3-mini", "hello"))
        .await;
    assert_eq!(api_error(result).0, 401);

    let text = std::fs::read_to_string(&h.config_path)?;
    let added = format!(
        "{text}\n[[keys]]\nname = \"added-later\"\nsecret = \"{NEW_KEY}\"\n\
         model_limits_enabled = true\nmodel_limits = [\"o3-mini\"]\n"
    );
    std::fs::write(&h.config_path, &added)?;
    // The key file is checked for changes once a second.
    tokio::time::sleep(RELOAD).await;
    let response = h
        .client(NEW_KEY)
        .chat()
        .create(chat("o3-mini", "hello"))
        .await?;
    assert_eq!(response.model, "o3-mini");

    // Narrowing a key's list applies as soon too.
    std::fs::write(
        &h.config_path,
        added.replace(
            "model_limits = [\"o3-mini\"]",
            "model_limits = [\"gpt-4o\"]",
        ),
    )?;
    tokio::time::sleep(RELOAD).await;
    let (status, error) = api_error(h.client(NEW_KEY).chat().create(chat("o3-mini", "hi")).await);
    assert_eq!(status, 403);
    assert_eq!(error.code.as_deref(), Some("model_not_allowed"));

    // And removing it.
    std::fs::write(&h.config_path, &text)?;
    tokio::time::sleep(RELOAD).await;
    let result = h
        .client(NEW_KEY)
        .chat()
        .create(chat("gpt-4o", "hello"))
        .await;
    assert_eq!(api_error(result).0, 401);
    assert_eq!(h.log.len(), 1);
    Ok(())
}

#[test]
fn unknown_config_fields_are_errors_naming_their_line() {
    let base = config_text("http://127.0.0.1:9/v1", Path::new("audit.jsonl"));
    let cases = [
        // In a key (line 21 of the config).
        (
            "max_prompt_tokens = 1000",
            "max_prompt_tokenz = 1000",
            "max_prompt_tokenz",
            21,
        ),
        // In a table.
        (
            "idle_timeout = \"10s\"",
            "idle_timeout = \"10s\"\nread_timeout = 1",
            "read_timeout",
            8,
        ),
        // At the top level.
        (
            "listen = \"127.0.0.1:0\"",
            "listn = \"127.0.0.1:0\"",
            "listn",
            1,
        ),
    ];
    for (from, to, field, line) in cases {
        assert!(base.contains(from), "{from}");
        let text = base.replacen(from, to, 1);
        let err = config::Config::parse(Path::new("proxy.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("unknown field `{field}`")), "{err}");
        assert!(err.contains(&format!("line {line}")), "{err}");
        assert!(err.contains("proxy.toml"), "{err}");
    }
}

#[tokio::test]
async fn the_proxy_refuses_to_start_on_an_invalid_config() -> TestResult {
    init();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("proxy.toml");
    let args = app::Args {
        config: Some(path.clone()),
        listen: Some("127.0.0.1:0".parse()?),
        no_policy: false,
        migrate: false,
    };
    let base = config_text("http://127.0.0.1:9/v1", Path::new("audit.jsonl"));
    for (text, expected) in [
        (
            base.replace("model_limits = []", "model_limits = []\ncolour = \"red\""),
            "line 28",
        ),
        (
            base.replace("secret = \"sk-open-test-key\"", ""),
            "needs `secret` or `secret_sha256`",
        ),
        (
            base.replace("name = \"open\"", "name = \"chat-app\""),
            "two keys are named `chat-app`",
        ),
        (
            base.replace(
                "blocked_features = [\"images\"]",
                "blocked_features = [\"imagez\"]",
            ),
            "unknown feature `imagez`",
        ),
        (
            base.replace("http://127.0.0.1:9/v1", "ftp://example.com"),
            "http:// or https://",
        ),
        (
            base.replace("shutdown_grace = \"10s\"", "shutdown_grace = \"soon\""),
            "invalid duration",
        ),
    ] {
        std::fs::write(&path, &text)?;
        let err = app::Proxy::prepare(&args, env)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
        assert!(!err.contains("sk-chat-app-test-key"), "a secret in: {err}");
    }
    Ok(())
}

#[tokio::test]
async fn the_sample_config_parses_and_builds() -> TestResult {
    init();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let config = config::Config::load(&path)?;
    assert_eq!(config.listen, "127.0.0.1:8080".parse()?);
    assert_eq!(config.upstream.base_url, "https://api.openai.com/v1");
    assert_eq!(
        config.upstream.api_key_env.as_deref(),
        Some("OPENAI_API_KEY")
    );
    assert_eq!(
        config.audit.jsonl.as_deref(),
        Some(Path::new("audit.jsonl"))
    );
    assert_eq!(config.keys.len(), 2);
    assert_eq!(config.keys[0].name, "chat-app");
    assert_eq!(config.keys[0].max_prompt_tokens, Some(1000));
    assert!(config.pricing.get("my-finetune").is_some());
    assert_eq!(config.body.limit, 16 * 1024 * 1024);

    // The whole start-up path, on a free port.
    let args = app::Args {
        config: Some(path),
        listen: Some("127.0.0.1:0".parse()?),
        no_policy: false,
        migrate: false,
    };
    let proxy = app::Proxy::prepare(&args, |_| None).await?;
    assert!(proxy.banner.contains("api.openai.com"), "{}", proxy.banner);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Modes

#[tokio::test]
async fn the_embedded_default_serves_the_printed_curl() -> TestResult {
    init();
    let args = app::Args {
        config: None,
        listen: Some("127.0.0.1:0".parse()?),
        no_policy: false,
        migrate: false,
    };
    let proxy = app::Proxy::prepare(&args, |_| None).await?;
    let banner = proxy.banner.clone();
    let key = proxy.demo_key.clone().expect("a demo key");
    assert!(key.starts_with("sk-demo-") && key.len() > 30, "{key}");
    assert!(
        banner.contains(&format!("http://{}/v1", proxy.addr)),
        "{banner}"
    );
    assert!(banner.contains(&key), "{banner}");
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(proxy.run(async {
        let _ = rx.await;
    }));

    // The curl command as printed, continuation lines joined.
    let curl = banner[banner.find("curl ").expect("a curl command")..]
        .replace("\\\n", " ")
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let words = shell_words(&curl);
    assert_eq!(words[0], "curl");
    let url = words
        .iter()
        .find(|w| w.starts_with("http://"))
        .expect("a URL");
    let mut headers = Vec::new();
    let mut data = None;
    for pair in words.windows(2) {
        match pair[0].as_str() {
            "-H" => {
                let (name, value) = pair[1].split_once(": ").expect("a header");
                headers.push((name.to_owned(), value.to_owned()));
            }
            "-d" => data = Some(pair[1].clone()),
            _ => {}
        }
    }
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let (status, body) = send(Method::POST, url, &headers, &data.expect("a body")).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let body: Value = serde_json::from_slice(&body)?;
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "This is a mock response from the upstream"
    );

    // The demo key has the README's policy.
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(url.trim_end_matches("/chat/completions"))
            .with_api_key(&key),
    );
    let (status, _) = api_error(client.chat().create(chat("gpt-4.1", "hi")).await);
    assert_eq!(status, 403);

    // And if curl is installed, the command itself works as printed.
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok()
    {
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&banner[banner.find("curl ").unwrap()..])
            .output()
            .await?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer: Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(answer["object"], "chat.completion");
    }

    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), server).await???;
    Ok(())
}

/// Audit lines collected instead of printed.
#[derive(Clone, Default)]
struct Lines(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Lines {
    fn writer(&self) -> app_audit::LineWriter {
        let lines = self.0.clone();
        std::sync::Arc::new(move |line: &str| lines.lock().unwrap().push(line.to_owned()))
    }

    fn get(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (a record is made when the response body ends, which the server may see just
    /// after the client) until there are `n` lines.
    async fn wait_for(&self, n: usize) -> Vec<String> {
        for _ in 0..200 {
            if self.get().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.get()
    }
}

#[tokio::test]
async fn the_embedded_default_prints_one_audit_line_per_request() -> TestResult {
    init();
    let args = app::Args {
        config: None,
        listen: Some("127.0.0.1:0".parse()?),
        no_policy: false,
        migrate: false,
    };
    let lines = Lines::default();
    let proxy = app::Proxy::prepare_with(&args, |_| None, lines.writer()).await?;
    assert!(
        proxy.banner.contains("audit:    one line per request"),
        "{}",
        proxy.banner
    );
    let key = proxy.demo_key.clone().expect("a demo key");
    let base = format!("http://{}/v1", proxy.addr);
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(proxy.run(async {
        let _ = rx.await;
    }));
    let client = Client::with_config(OpenAIConfig::new().with_api_base(&base).with_api_key(&key));

    client
        .chat()
        .create(chat("gpt-4o-mini", "one two three"))
        .await?;
    let seen = lines.wait_for(1).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let line = &seen[0];
    assert!(
        line.starts_with("audit key=demo model=gpt-4o-mini status=200 blocked_by=- tokens="),
        "{line}"
    );
    // The mock answers with 8 words; gpt-4o-mini has a built-in price.
    assert!(line.contains("+8 cost_usd=0.0"), "{line}");
    assert!(!line.contains(&key), "{line}");

    let (status, _) = api_error(client.chat().create(chat("gpt-4.1", "hi")).await);
    assert_eq!(status, 403);
    let (status, _) = send(
        Method::POST,
        &format!("{base}/chat/completions"),
        &[("authorization", "Bearer sk-not-a-key")],
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let seen = lines.wait_for(3).await;
    assert_eq!(
        seen[1..],
        [
            "audit key=demo model=gpt-4.1 status=403 \
             blocked_by=model_allow_list:model_not_allowed tokens=- cost_usd=-",
            "audit key=- model=- status=401 blocked_by=key_auth:invalid_api_key \
             tokens=- cost_usd=-",
        ],
        "{seen:?}"
    );

    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), server).await???;
    Ok(())
}

#[tokio::test]
async fn a_configuration_file_sends_the_records_to_its_jsonl_only() -> TestResult {
    init();
    let (mock_addr, _log) = mock::spawn(MockOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("proxy.toml");
    let audit_path = dir.path().join("audit.jsonl");
    std::fs::write(
        &config_path,
        config_text(&format!("http://{mock_addr}/v1"), &audit_path),
    )?;
    let args = app::Args {
        config: Some(config_path),
        listen: None,
        no_policy: false,
        migrate: false,
    };
    let lines = Lines::default();
    let proxy = app::Proxy::prepare_with(&args, env, lines.writer()).await?;
    assert!(!proxy.banner.contains("audit:"), "{}", proxy.banner);
    let base = format!("http://{}/v1", proxy.addr);
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(proxy.run(async {
        let _ = rx.await;
    }));
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(&base)
            .with_api_key(CHAT_KEY),
    );
    client.chat().create(chat("gpt-4o-mini", "hello")).await?;
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), server).await???;
    // Run to its end: the JSONL is flushed, and no console line was written.
    assert_eq!(std::fs::read_to_string(&audit_path)?.lines().count(), 1);
    assert!(lines.get().is_empty(), "{:?}", lines.get());
    Ok(())
}

/// Splits a shell command line on spaces outside single quotes (enough for the banner's curl).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '\'' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

#[tokio::test]
async fn no_policy_forwards_everything_with_the_provider_key() -> TestResult {
    let h = start_with(MockOptions::default(), true).await;
    // Any key, any model: no layer looks.
    let response = h
        .client("sk-anything")
        .chat()
        .create(chat("gpt-4.1", "hello"))
        .await?;
    assert_eq!(response.model, "gpt-4.1");
    let models = h.client("sk-anything").models().list().await?;
    assert_eq!(models.data.len(), mock::MODELS.len());
    let got = h.log.received();
    assert_eq!(got.len(), 2);
    for request in got {
        assert_eq!(
            request.authorization.as_deref(),
            Some(&*format!("Bearer {PROVIDER_KEY}"))
        );
    }
    Ok(())
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_stream_finish_and_refuses_new_connections() -> TestResult {
    let opts = MockOptions::default()
        .stream_chunks(8)
        .chunk_delay(Duration::from_millis(50));
    let mut h = start_with(opts, false).await;
    let mut request = chat("gpt-4o-mini", "a long answer please");
    request.stream = Some(true);
    let mut stream = h.client(CHAT_KEY).chat().create_stream(request).await?;
    let first = stream.next().await.expect("a first chunk")?;
    assert_eq!(first.model, "gpt-4o-mini");

    let _ = h.shutdown.take().expect("running").send(());
    // New connections are refused once the listener is closed.
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(h.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        refused,
        "the proxy still accepts connections after shutdown"
    );

    // The stream in flight runs to its end.
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        if let Some(content) = chunk?.choices.first().and_then(|c| c.delta.content.clone()) {
            text.push_str(&content);
        }
    }
    assert_eq!(text, "This is a mock response from the upstream");
    h.stop().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// FeatureBlock, PromptLimit and the audit log, through the proxy

#[tokio::test]
async fn a_blocked_feature_is_422() -> TestResult {
    use async_openai::types::images::CreateImageRequestArgs;
    let h = start().await;
    // `open` has no model list, so the model passes and the feature block decides.
    let request = CreateImageRequestArgs::default()
        .prompt("a lighthouse")
        .build()?;
    let (status, error) = api_error(h.client(OPEN_KEY).images().generate(request).await);
    assert_eq!(status, 422);
    assert_eq!(error.code.as_deref(), Some("feature_blocked"));
    assert!(h.log.is_empty(), "a rejected request reached the upstream");
    Ok(())
}

#[tokio::test]
async fn a_prompt_over_the_keys_limit_is_400() -> TestResult {
    let h = start().await;
    // chat-app allows 1000 prompt tokens; this is about 3000.
    let long = "lorem ipsum dolor ".repeat(1000);
    let (status, error) = api_error(
        h.client(CHAT_KEY)
            .chat()
            .create(chat("gpt-4o-mini", &long))
            .await,
    );
    assert_eq!(status, 400);
    assert_eq!(error.code.as_deref(), Some("prompt_too_long"));
    assert!(h.log.is_empty(), "a rejected request reached the upstream");

    // Under the limit it passes.
    h.client(CHAT_KEY)
        .chat()
        .create(chat("gpt-4o-mini", "short"))
        .await?;
    assert_eq!(h.log.len(), 1);
    Ok(())
}

#[tokio::test]
async fn the_audit_file_has_a_record_per_request() -> TestResult {
    let mut h = start().await;
    let client = h.client(CHAT_KEY);
    client
        .chat()
        .create({
            let mut r = chat("gpt-4o-mini", "one two three");
            // Deprecated by OpenAI for `safety_identifier`, still sent by many clients.
            #[allow(deprecated)]
            {
                r.user = Some("user-42".into());
            }
            r
        })
        .await?;
    let _ = client
        .chat()
        .create(chat("gpt-4.1", "hello"))
        .await
        .unwrap_err();
    let mut request = chat("gpt-4o", "stream this");
    request.stream = Some(true);
    let mut stream = client.chat().create_stream(request).await?;
    while let Some(chunk) = stream.next().await {
        chunk?;
    }
    // Shutting down flushes the sink.
    h.stop().await?;

    let records = h.audit_records()?;
    assert_eq!(records.len(), 3, "{records:?}");
    for record in &records {
        for field in [
            "key",
            "model",
            "status",
            "blocked_by",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "stream",
            "user",
        ] {
            assert!(record.get(field).is_some(), "`{field}` missing in {record}");
        }
        assert_eq!(record["key"], "chat-app");
        assert!(!record.to_string().contains(CHAT_KEY));
        assert!(!record.to_string().contains(PROVIDER_KEY));
    }
    let allowed = &records[0];
    assert_eq!(allowed["model"], "gpt-4o-mini");
    assert_eq!(allowed["status"], 200);
    assert!(allowed["blocked_by"].is_null());
    assert_eq!(allowed["prompt_tokens"], 3);
    assert_eq!(allowed["completion_tokens"], 8);
    assert!(allowed["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(allowed["stream"], false);
    assert_eq!(allowed["user"], "user-42");

    let blocked = &records[1];
    assert_eq!(blocked["model"], "gpt-4.1");
    assert_eq!(blocked["status"], 403);
    assert_eq!(blocked["blocked_by"], "model_allow_list");

    let streamed = &records[2];
    assert_eq!(streamed["model"], "gpt-4o");
    assert_eq!(streamed["stream"], true);
    assert_eq!(streamed["prompt_tokens"], 2);
    assert_eq!(streamed["completion_tokens"], 8);
    Ok(())
}

/// Streams a chat completion and leaves as soon as the last token (the `finish_reason`)
/// arrives, before the usage chunk the mock sends 300 ms later. The request's record.
async fn leave_after_the_last_token(
    h: &mut Harness,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    let mut request = chat("gpt-4o-mini", "one two three");
    request.stream = Some(true);
    let mut stream = h.client(CHAT_KEY).chat().create_stream(request).await?;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await? {
        let chunk = chunk?;
        if chunk
            .choices
            .first()
            .is_some_and(|c| c.finish_reason.is_some())
        {
            break;
        }
    }
    drop(stream);
    // Shutting down waits for the drain, then flushes the sink.
    h.stop().await?;
    let records = h.audit_records()?;
    assert_eq!(records.len(), 1, "{records:?}");
    Ok(records[0].clone())
}

#[tokio::test]
async fn a_client_leaving_before_the_usage_chunk_is_billed_from_the_upstreams_usage() -> TestResult
{
    let opts = MockOptions::default()
        .stream_chunks(3)
        .usage_delay(Duration::from_millis(300));
    let mut h = start_with(opts, false).await;
    let record = leave_after_the_last_token(&mut h).await?;
    assert_eq!(record["outcome"], "cancelled", "{record}");
    assert_eq!(record["prompt_tokens"], 3, "{record}");
    assert_eq!(record["completion_tokens"], 3, "{record}");
    assert!(
        record["cost_usd"].as_f64().is_some_and(|c| c > 0.0),
        "{record}"
    );
    let flags = record["flags"].to_string();
    assert!(flags.contains("usage_after_cancel"), "{record}");
    assert!(!flags.contains("usage_missing"), "{record}");
    Ok(())
}

#[tokio::test]
async fn with_the_drain_off_a_client_leaving_before_the_usage_chunk_leaves_it_missing() -> TestResult
{
    let opts = MockOptions::default()
        .stream_chunks(3)
        .usage_delay(Duration::from_millis(300));
    let mut h = start_edited(opts, false, |text| {
        text.replace("[audit]\n", "[audit]\ndrain_after_cancel = \"0s\"\n")
    })
    .await;
    let record = leave_after_the_last_token(&mut h).await?;
    assert_eq!(record["outcome"], "cancelled", "{record}");
    assert!(record["prompt_tokens"].is_null(), "{record}");
    assert!(record["cost_usd"].is_null(), "{record}");
    assert!(
        record["flags"].to_string().contains("usage_missing"),
        "{record}"
    );
    Ok(())
}
