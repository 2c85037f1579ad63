//! What the upstream receives, what the model list lets through, and how slow clients are
//! treated: the proxy in-process on loopback, in front of the mock upstream (which logs every
//! hit) or of a small upstream of the test's own that answers the model list badly.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body as AxumBody;
use axum::extract::Request as AxumRequest;
use axum::response::Response as AxumResponse;
use bytes::Bytes;
use example_proxy::{app, mock};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use mock::{MockLog, MockOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const PROVIDER_KEY: &str = "sk-provider-hardening-0123456789";
const PROVIDER_ENV: &str = "TEST_HARDENING_PROVIDER_KEY";
const CHAT_KEY: &str = "sk-chat-app-hardening-key";
const OPEN_KEY: &str = "sk-open-hardening-key";

fn config_text(base: &str, audit: &Path) -> String {
    format!(
        r#"listen = "127.0.0.1:0"

[upstream]
base_url = "{base}"
api_key_env = "{PROVIDER_ENV}"
first_byte_timeout = "10s"
idle_timeout = "10s"

[server]
shutdown_grace = "5s"

[audit]
jsonl = "{audit}"

[[keys]]
name = "chat-app"
secret = "{CHAT_KEY}"
model_limits_enabled = true
model_limits = ["gpt-4o-mini", "gpt-4o"]

[[keys]]
name = "open"
secret = "{OPEN_KEY}"
"#,
        audit = audit.display()
    )
}

struct Harness {
    addr: SocketAddr,
    log: MockLog,
    audit_path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

fn env(name: &str) -> Option<String> {
    (name == PROVIDER_ENV).then(|| PROVIDER_KEY.to_owned())
}

/// The proxy in front of the mock, its configuration changed by `edit`.
async fn start(edit: impl FnOnce(String) -> String) -> Harness {
    let (mock_addr, log) = mock::spawn(MockOptions::default())
        .await
        .expect("mock starts");
    start_at(&format!("http://{mock_addr}/v1"), log, edit).await
}

/// The proxy in front of the upstream at `base`.
async fn start_at(base: &str, log: MockLog, edit: impl FnOnce(String) -> String) -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("proxy.toml");
    let audit_path = dir.path().join("audit.jsonl");
    std::fs::write(&config_path, edit(config_text(base, &audit_path))).expect("config");
    let args = app::Args {
        config: Some(config_path),
        listen: None,
        no_policy: false,
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
        audit_path,
        shutdown: Some(tx),
        server: Some(server),
        _dir: dir,
    }
}

impl Harness {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the proxy (flushing the audit log) and returns its records.
    async fn stop_and_records(&mut self) -> Vec<Value> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(15), server)
                .await
                .expect("the proxy stops")
                .expect("no panic")
                .expect("served");
        }
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON record"))
            .collect()
    }
}

/// A plain HTTP request: status, headers, body.
async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, HeaderMap, Bytes) {
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
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn chat_body(model: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]}).to_string()
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Asserts an OpenAI-shaped error with `code`, and returns its message.
fn assert_openai_error(body: &[u8], code: &str) -> String {
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("a JSON body: {}", String::from_utf8_lossy(body)));
    let error = value["error"].as_object().expect("an `error` object");
    for field in ["message", "type", "param", "code"] {
        assert!(error.contains_key(field), "`{field}` missing in {value}");
    }
    assert_eq!(error["code"], code, "{value}");
    error["message"].as_str().unwrap_or_default().to_owned()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// 10. What reaches the upstream

#[tokio::test]
async fn credentials_in_the_query_are_not_forwarded() -> TestResult {
    let mut h = start(|t| t).await;
    let auth = bearer(CHAT_KEY);
    let query = format!(
        "api-version=2024-10-21&api-key={CHAT_KEY}&key={CHAT_KEY}&api_key={CHAT_KEY}\
         &Api%2DKey={CHAT_KEY}&APIKEY={CHAT_KEY}&access_token={CHAT_KEY}&keep=1"
    );
    let (status, _, _) = send(
        Method::POST,
        &h.url(&format!("/v1/chat/completions?{query}")),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        &chat_body("gpt-4o-mini"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let got = h.log.last().expect("the upstream got the request");
    assert_eq!(got.query.as_deref(), Some("api-version=2024-10-21&keep=1"));

    // Only credentials: no query at all.
    let (status, _, _) = send(
        Method::GET,
        &h.url(&format!("/v1/models?key={CHAT_KEY}")),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let got = h.log.last().expect("the upstream got the request");
    assert_eq!(got.query, None);
    for received in h.log.received() {
        assert!(!received.query.unwrap_or_default().contains(CHAT_KEY));
    }
    h.stop_and_records().await;
    Ok(())
}

#[tokio::test]
async fn a_key_only_in_the_query_is_refused_and_nothing_goes_upstream() -> TestResult {
    let mut h = start(|t| t).await;
    for param in ["api-key", "key", "api_key"] {
        let (status, _, body) = send(
            Method::POST,
            &h.url(&format!("/v1/chat/completions?{param}={CHAT_KEY}")),
            &[("content-type", "application/json")],
            &chat_body("gpt-4o-mini"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{param}");
        assert!(!contains(&body, CHAT_KEY));
    }
    assert!(h.log.is_empty());
    let records = h.stop_and_records().await;
    assert_eq!(records.len(), 3);
    for record in records {
        assert!(!record.to_string().contains(CHAT_KEY), "{record}");
    }
    Ok(())
}

#[tokio::test]
async fn client_credentials_identity_and_cookies_do_not_reach_the_upstream() -> TestResult {
    let mut h = start(|t| t).await;
    let auth = bearer(CHAT_KEY);
    let (status, _, _) = send(
        Method::POST,
        &h.url("/v1/chat/completions"),
        &[
            ("authorization", &auth),
            ("api-key", CHAT_KEY),
            ("x-api-key", CHAT_KEY),
            ("x-goog-api-key", CHAT_KEY),
            ("content-type", "application/json"),
            ("cookie", "session=client-session-cookie"),
            ("x-forwarded-for", "203.0.113.7"),
            ("forwarded", "for=203.0.113.7;proto=https"),
            ("x-real-ip", "203.0.113.7"),
            ("x-forwarded-host", "client.example"),
            ("x-forwarded-proto", "https"),
            ("via", "1.1 client-proxy"),
            ("openai-beta", "assistants=v2"),
        ],
        &chat_body("gpt-4o-mini"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let got = h.log.last().expect("the upstream got the request");
    assert_eq!(
        got.authorization.as_deref(),
        Some(&*bearer(PROVIDER_KEY)),
        "the client's authorization is replaced by the provider key"
    );
    for name in [
        "api-key",
        "x-api-key",
        "x-goog-api-key",
        "cookie",
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
        "x-forwarded-host",
        "x-forwarded-proto",
        "via",
    ] {
        assert!(got.headers.get(name).is_none(), "`{name}` was forwarded");
    }
    // What the API needs still goes.
    assert_eq!(got.headers["openai-beta"], "assistants=v2");
    for (name, value) in &got.headers {
        assert!(
            !contains(value.as_bytes(), CHAT_KEY),
            "`{name}` has the key"
        );
        assert!(!contains(value.as_bytes(), "203.0.113.7"), "`{name}`");
    }
    h.stop_and_records().await;
    Ok(())
}

#[tokio::test]
async fn client_organization_and_project_are_removed_by_default() -> TestResult {
    let mut h = start(|t| t).await;
    let auth = bearer(CHAT_KEY);
    let (status, _, _) = send(
        Method::GET,
        &h.url("/v1/models"),
        &[
            ("authorization", &auth),
            ("openai-organization", "org-client-picked"),
            ("openai-project", "proj_client_picked"),
        ],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let got = h.log.last().expect("the upstream got the request");
    assert!(got.headers.get("openai-organization").is_none());
    assert!(got.headers.get("openai-project").is_none());
    h.stop_and_records().await;
    Ok(())
}

#[tokio::test]
async fn the_configured_organization_and_project_replace_the_clients() -> TestResult {
    let mut h = start(|t| {
        t.replace(
            "idle_timeout = \"10s\"\n",
            "idle_timeout = \"10s\"\norganization = \"org-config\"\nproject = \"proj_config\"\n\
             forward_client_organization = true\n",
        )
    })
    .await;
    let auth = bearer(CHAT_KEY);
    send(
        Method::GET,
        &h.url("/v1/models"),
        &[
            ("authorization", &auth),
            ("openai-organization", "org-client-picked"),
            ("openai-project", "proj_client_picked"),
        ],
        "",
    )
    .await;
    let got = h.log.last().expect("the upstream got the request");
    assert_eq!(got.headers["openai-organization"], "org-config");
    assert_eq!(got.headers["openai-project"], "proj_config");
    assert_eq!(got.headers.get_all("openai-organization").iter().count(), 1);
    h.stop_and_records().await;
    Ok(())
}

#[tokio::test]
async fn client_organization_passes_only_when_the_config_allows_it() -> TestResult {
    let mut h = start(|t| {
        t.replace(
            "idle_timeout = \"10s\"\n",
            "idle_timeout = \"10s\"\nforward_client_organization = true\n",
        )
    })
    .await;
    let auth = bearer(CHAT_KEY);
    send(
        Method::GET,
        &h.url("/v1/models"),
        &[
            ("authorization", &auth),
            ("openai-organization", "org-client-picked"),
            ("openai-project", "proj_client_picked"),
        ],
        "",
    )
    .await;
    let got = h.log.last().expect("the upstream got the request");
    assert_eq!(got.headers["openai-organization"], "org-client-picked");
    assert_eq!(got.headers["openai-project"], "proj_client_picked");
    h.stop_and_records().await;
    Ok(())
}

#[tokio::test]
async fn the_audit_record_id_is_generated_not_the_clients() -> TestResult {
    let mut h = start(|t| t).await;
    let auth = bearer(CHAT_KEY);
    let mut answered = Vec::new();
    for _ in 0..2 {
        let (status, headers, _) = send(
            Method::POST,
            &h.url("/v1/chat/completions"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("x-request-id", "client-chosen-id"),
            ],
            &chat_body("gpt-4o-mini"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        answered.push(headers["x-request-id"].to_str()?.to_owned());
    }
    let records = h.stop_and_records().await;
    assert_eq!(records.len(), 2);
    let ids: Vec<&str> = records
        .iter()
        .map(|r| r["request_id"].as_str().expect("an id"))
        .collect();
    assert_ne!(ids[0], ids[1], "two requests, two ids");
    for (id, sent_back) in ids.iter().zip(&answered) {
        assert_ne!(*id, "client-chosen-id");
        assert!(id.starts_with("req_"), "{id}");
        assert_eq!(id, sent_back, "the client is told the record's id");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A small upstream of the test's own: `/v1/models` answers as `answer` says; every request's
// headers are kept.

type Seen = Arc<Mutex<Vec<HeaderMap>>>;

async fn bad_upstream(
    answer: impl Fn() -> AxumResponse + Clone + Send + Sync + 'static,
) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let kept = seen.clone();
    let router = axum::Router::new().fallback(move |req: AxumRequest| {
        let answer = answer.clone();
        let kept = kept.clone();
        async move {
            kept.lock().unwrap().push(req.headers().clone());
            answer()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}/v1"), seen)
}

/// The full model list, as the mock answers it.
fn full_list() -> String {
    json!({
        "object": "list",
        "data": mock::MODELS.iter().map(|id| json!({"id": id, "object": "model"})).collect::<Vec<_>>(),
    })
    .to_string()
}

fn answer(content_type: &str, body: impl Into<AxumBody>) -> AxumResponse {
    AxumResponse::builder()
        .status(200)
        .header("content-type", content_type)
        .body(body.into())
        .unwrap()
}

/// Asks for the model list with the limited key: a 502 that leaks no model outside the key's
/// list.
async fn assert_list_refused(base: &str) -> TestResult {
    let mut h = start_at(base, MockLog::default(), |t| t).await;
    let auth = bearer(CHAT_KEY);
    let (status, _, body) = send(
        Method::GET,
        &h.url("/v1/models"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_openai_error(&body, "upstream_invalid_response");
    for model in ["gpt-4.1", "o3-mini", "dall-e-3", "whisper-1"] {
        assert!(!contains(&body, model), "{model} leaked");
    }
    let records = h.stop_and_records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["status"], 502);
    Ok(())
}

#[tokio::test]
async fn a_gzip_encoded_model_list_is_a_502() -> TestResult {
    let (base, seen) = bad_upstream(|| {
        let mut response = answer("application/json", full_list());
        // Not really compressed: the declared encoding alone must stop it.
        response
            .headers_mut()
            .insert("content-encoding", "gzip".parse().unwrap());
        response
    })
    .await;
    assert_list_refused(&base).await?;
    // The proxy asked for no encoding.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["accept-encoding"], "identity");
    Ok(())
}

#[tokio::test]
async fn a_model_list_of_another_encoding_is_a_502() -> TestResult {
    let (base, _) = bad_upstream(|| {
        let mut response = answer("application/json", full_list());
        response
            .headers_mut()
            .insert("content-encoding", "br".parse().unwrap());
        response
    })
    .await;
    assert_list_refused(&base).await
}

#[tokio::test]
async fn a_model_list_that_is_not_json_is_a_502() -> TestResult {
    let (base, _) = bad_upstream(|| answer("text/plain", full_list())).await;
    assert_list_refused(&base).await?;
    let (base, _) = bad_upstream(|| {
        AxumResponse::builder()
            .status(200)
            .body(AxumBody::from(full_list()))
            .unwrap()
    })
    .await;
    assert_list_refused(&base).await
}

#[tokio::test]
async fn an_unparsable_or_listless_model_list_is_a_502() -> TestResult {
    let (base, _) = bad_upstream(|| {
        let list = full_list();
        answer("application/json", list[..list.len() - 3].to_owned())
    })
    .await;
    assert_list_refused(&base).await?;
    let (base, _) = bad_upstream(|| answer("application/json", r#"{"models":["gpt-4.1"]}"#)).await;
    assert_list_refused(&base).await
}

/// A list above the limit (`DEFAULT_MODELS_RESPONSE_LIMIT`): the full list, padded with long
/// model ids.
fn oversize_list() -> String {
    let filler = "x".repeat(1000);
    let mut data: Vec<Value> = mock::MODELS
        .iter()
        .map(|id| json!({"id": id, "object": "model"}))
        .collect();
    let padding = tower_llm_policy::model_allow_list::DEFAULT_MODELS_RESPONSE_LIMIT / 1000 + 100;
    for i in 0..padding {
        data.push(json!({"id": format!("gpt-4.1-{i}-{filler}"), "object": "model"}));
    }
    json!({"object": "list", "data": data}).to_string()
}

#[tokio::test]
async fn a_model_list_declared_over_the_limit_is_a_502() -> TestResult {
    let list = oversize_list();
    assert!(list.len() > tower_llm_policy::model_allow_list::DEFAULT_MODELS_RESPONSE_LIMIT);
    let (base, _) = bad_upstream(move || answer("application/json", list.clone())).await;
    assert_list_refused(&base).await
}

#[tokio::test]
async fn a_chunked_model_list_over_the_limit_is_a_502() -> TestResult {
    let list = oversize_list();
    let (base, _) = bad_upstream(move || {
        // In pieces, with no declared length.
        let chunks: Vec<Result<Bytes, std::io::Error>> = list
            .as_bytes()
            .chunks(64 * 1024)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        answer(
            "application/json",
            AxumBody::from_stream(futures_util::stream::iter(chunks)),
        )
    })
    .await;
    assert_list_refused(&base).await
}

#[tokio::test]
async fn a_valid_model_list_is_still_filtered_and_upstream_only_headers_are_dropped() -> TestResult
{
    let (base, _) = bad_upstream(|| {
        let mut response = answer("application/json; charset=utf-8", full_list());
        let headers = response.headers_mut();
        headers.insert("set-cookie", "__cf_bm=upstream; Path=/".parse().unwrap());
        headers.insert("openai-organization", "org-provider".parse().unwrap());
        headers.insert("openai-project", "proj_provider".parse().unwrap());
        response
    })
    .await;
    let mut h = start_at(&base, MockLog::default(), |t| t).await;
    let auth = bearer(CHAT_KEY);
    let (status, headers, body) = send(
        Method::GET,
        &h.url("/v1/models"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let list: Value = serde_json::from_slice(&body)?;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["gpt-4o", "gpt-4o-mini"]);
    for name in ["set-cookie", "openai-organization", "openai-project"] {
        assert!(headers.get(name).is_none(), "`{name}` reached the client");
    }
    h.stop_and_records().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 12. Slow clients

/// Reads until the proxy closes the connection; what it sent, and when it closed. Fails after
/// `limit`.
async fn read_until_closed(
    stream: &mut (impl AsyncRead + Unpin),
    limit: Duration,
) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Instant::now()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the connection is still open after {limit:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

fn with_server(text: String, extra: &str) -> String {
    text.replace(
        "shutdown_grace = \"5s\"\n",
        &format!("shutdown_grace = \"5s\"\n{extra}\n"),
    )
}

#[tokio::test]
async fn half_a_header_is_closed_within_the_timeout() -> TestResult {
    let mut h = start(|t| with_server(t, "header_read_timeout = \"1s\"")).await;
    let mut stream = TcpStream::connect(h.addr).await?;
    let started = Instant::now();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthor")
        .await?;
    let (got, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let after = closed - started;
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
    // hyper closes without an answer (or with a bare 408 of its own).
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(h.log.is_empty());
    assert!(
        h.stop_and_records().await.is_empty(),
        "no request, no record"
    );
    Ok(())
}

#[tokio::test]
async fn a_silent_connection_or_half_an_http2_preface_is_closed_within_the_timeout() -> TestResult {
    let mut h = start(|t| with_server(t, "header_read_timeout = \"1s\"")).await;
    let mut silent = TcpStream::connect(h.addr).await?;
    let mut preface = TcpStream::connect(h.addr).await?;
    preface.write_all(b"PRI * HTTP/2.0\r\n").await?;
    let started = Instant::now();
    for stream in [&mut silent, &mut preface] {
        let (got, closed) = read_until_closed(stream, Duration::from_secs(5)).await;
        assert!(got.is_empty());
        assert!(closed - started >= Duration::from_millis(900));
    }
    h.stop_and_records().await;
    Ok(())
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() -> TestResult {
    let mut h = start(|t| with_server(t, "header_read_timeout = \"1s\"")).await;
    let mut stream = TcpStream::connect(h.addr).await?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
        .await?;
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await?;
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(closed - started >= Duration::from_millis(900));
    h.stop_and_records().await;
    Ok(())
}

/// Sends a head announcing `len` body bytes and `sent` of them, then stalls; returns the
/// proxy's answer (read until it closes).
async fn stall_body(addr: SocketAddr, head: &str, sent: &[u8]) -> (Vec<u8>, Duration) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(sent).await.unwrap();
    let (got, closed) = read_until_closed(&mut stream, Duration::from_secs(8)).await;
    (got, closed - started)
}

fn split_response(raw: &[u8]) -> (String, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    (
        String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase(),
        raw[end + 4..].to_vec(),
    )
}

#[tokio::test]
async fn a_stalled_body_is_a_408_the_connection_closes_and_one_record_is_left() -> TestResult {
    let mut h = start(|t| with_server(t, "body_read_timeout = \"1s\"")).await;
    let body = chat_body("gpt-4o-mini");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {CHAT_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (got, after) = stall_body(h.addr, &head, &body.as_bytes()[..10]).await;
    assert!(
        after >= Duration::from_millis(900),
        "answered after {after:?}"
    );
    let (response_head, response_body) = split_response(&got);
    assert!(response_head.starts_with("http/1.1 408"), "{response_head}");
    assert!(
        response_head.contains("connection: close"),
        "{response_head}"
    );
    assert_openai_error(&response_body, "request_timeout");
    assert!(h.log.is_empty(), "nothing went upstream");

    let records = h.stop_and_records().await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["status"], 408);
    assert_eq!(records[0]["blocked_by"], "server");
    assert_eq!(records[0]["code"], "request_timeout");
    assert_eq!(records[0]["key"], "chat-app");
    Ok(())
}

#[tokio::test]
async fn a_stalled_upload_streaming_upstream_is_a_408_with_one_record() -> TestResult {
    let mut h = start(|t| with_server(t, "body_read_timeout = \"1s\"")).await;
    // A chunked multipart upload: it streams on upstream as it comes, and then stalls.
    let boundary = "hardening-boundary";
    let part = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
         Content-Type: audio/wav\r\n\r\n"
    );
    let head = format!(
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {OPEN_KEY}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let chunk = format!("{:x}\r\n{part}\r\n", part.len());
    let (got, after) = stall_body(h.addr, &head, chunk.as_bytes()).await;
    assert!(
        after >= Duration::from_millis(900),
        "answered after {after:?}"
    );
    let (response_head, response_body) = split_response(&got);
    assert!(response_head.starts_with("http/1.1 408"), "{response_head}");
    assert_openai_error(&response_body, "request_timeout");
    let records = h.stop_and_records().await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["status"], 408);
    Ok(())
}

#[tokio::test]
async fn a_slow_but_moving_body_is_not_cut_off() -> TestResult {
    let mut h = start(|t| with_server(t, "body_read_timeout = \"1s\"")).await;
    let body = chat_body("gpt-4o-mini");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {CHAT_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = TcpStream::connect(h.addr).await?;
    stream.write_all(head.as_bytes()).await?;
    // 2.4 s in all, never more than 0.6 s without a byte.
    for piece in body.as_bytes().chunks(body.len().div_ceil(4)) {
        tokio::time::sleep(Duration::from_millis(600)).await;
        stream.write_all(piece).await?;
    }
    let (got, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let (response_head, _) = split_response(&got);
    assert!(response_head.starts_with("http/1.1 200"), "{response_head}");
    assert_eq!(h.stop_and_records().await.len(), 1);
    Ok(())
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() -> TestResult {
    let mut h =
        start(|t| with_server(t, "max_connections = 2\nheader_read_timeout = \"10s\"")).await;
    let first = TcpStream::connect(h.addr).await?;
    let _second = TcpStream::connect(h.addr).await?;
    // Give the proxy time to accept both.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(h.addr).await?;
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = [0u8; 1024];
    let waited = tokio::time::timeout(Duration::from_millis(700), third.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "the third connection was served beyond the limit"
    );
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(3), third.read(&mut buf))
        .await
        .expect("served once a slot is free")?;
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    h.stop_and_records().await;
    Ok(())
}

#[tokio::test]
async fn a_request_hyper_cannot_parse_gets_its_bare_400() -> TestResult {
    // hyper answers a malformed head itself, before the proxy's code runs, with an empty body
    // (see the server module's docs); this pins that behaviour down.
    let mut h = start(|t| t).await;
    let mut stream = TcpStream::connect(h.addr).await?;
    stream.write_all(b"NOT AN HTTP REQUEST\r\n\r\n").await?;
    let (got, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let (response_head, body) = split_response(&got);
    assert!(response_head.starts_with("http/1.1 400"), "{response_head}");
    assert!(body.is_empty());
    assert!(h.stop_and_records().await.is_empty());
    Ok(())
}

#[test]
fn server_settings_have_defaults_and_refuse_zero() {
    let path = Path::new("proxy.toml");
    let base = "[upstream]\nbase_url = \"http://127.0.0.1:9/v1\"\n";
    let config = example_proxy::config::Config::parse(path, base).expect("defaults");
    assert_eq!(config.server.header_read_timeout, Duration::from_secs(30));
    assert_eq!(config.server.body_read_timeout, Duration::from_secs(30));
    assert_eq!(config.server.body_total_timeout, Duration::from_secs(300));
    assert_eq!(config.server.max_body_bytes_in_flight, 256 * 1024 * 1024);
    assert_eq!(config.server.max_connections, 1024);
    assert!(!config.upstream.forward_client_organization);
    for bad in [
        "[server]\nheader_read_timeout = \"0s\"\n",
        "[server]\nbody_read_timeout = 0\n",
        "[server]\nbody_total_timeout = \"0s\"\n",
        "[server]\nmax_connections = 0\n",
        "[server]\nmax_body_bytes_in_flight = 0\n",
    ] {
        let text = format!("{base}{bad}");
        let err = example_proxy::config::Config::parse(path, &text).unwrap_err();
        assert!(err.to_string().contains("server."), "{err}");
    }
    // The budget must hold a body of the largest size allowed.
    let text = format!("{base}[server]\nmax_body_bytes_in_flight = 1000\n[body]\nlimit = 2000\n");
    let err = example_proxy::config::Config::parse(path, &text).unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.contains("server.max_body_bytes_in_flight") && shown.contains("body.limit"),
        "{shown}"
    );
    let text = format!("{base}[server]\nmax_body_bytes_in_flight = 2000\n[body]\nlimit = 2000\n");
    example_proxy::config::Config::parse(path, &text).expect("a budget of one whole body");
}

#[tokio::test]
async fn a_stalled_http2_body_is_a_408_with_one_record() -> TestResult {
    use futures_util::StreamExt;
    use http_body::Frame;

    let mut h = start(|t| with_server(t, "body_read_timeout = \"1s\"")).await;
    let stream = TcpStream::connect(h.addr).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    // Ten bytes of the body, then nothing, and no end of stream.
    let first: Result<Frame<Bytes>, std::io::Error> =
        Ok(Frame::data(Bytes::from_static(b"{\"model\":")));
    let body = http_body_util::StreamBody::new(
        futures_util::stream::iter([first]).chain(futures_util::stream::pending()),
    );
    let request = Request::post(format!("http://{}/v1/chat/completions", h.addr))
        .header("authorization", bearer(CHAT_KEY))
        .header("content-type", "application/json")
        .body(body)?;
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(8), sender.send_request(request))
        .await
        .expect("answered in time")?;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    // No `connection` header in HTTP/2.
    assert!(response.headers().get("connection").is_none());
    let body = response.into_body().collect().await?.to_bytes();
    assert_openai_error(&body, "request_timeout");
    assert!(h.log.is_empty());
    let records = h.stop_and_records().await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["status"], 408);
    Ok(())
}

/// An HTTP/2 connection to the proxy: the sender, and the connection's task (which ends when
/// the proxy closes the connection).
async fn h2_connect(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(conn))
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_header_timeout() -> TestResult {
    let mut h = start(|t| with_server(t, "header_read_timeout = \"1s\"")).await;
    let (mut sender, conn) = h2_connect(h.addr).await;
    let response = sender
        .send_request(
            Request::get(format!("http://{}/healthz", h.addr)).body(Full::new(Bytes::new()))?,
        )
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let idle_from = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the proxy closed the idle connection")?
        .ok();
    assert!(idle_from.elapsed() >= Duration::from_millis(900));
    h.stop_and_records().await;
    Ok(())
}

#[tokio::test]
async fn an_http2_stream_longer_than_the_header_timeout_is_not_cut() -> TestResult {
    // 12 chunks, 200 ms apart: a 2.4 s stream on a connection with a 1 s idle timeout.
    let opts = MockOptions::default()
        .stream_chunks(12)
        .chunk_delay(Duration::from_millis(200));
    let (mock_addr, log) = mock::spawn(opts).await?;
    let mut h = start_at(&format!("http://{mock_addr}/v1"), log, |t| {
        with_server(t, "header_read_timeout = \"1s\"")
    })
    .await;
    let (mut sender, _conn) = h2_connect(h.addr).await;
    let body = json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "messages": [{"role": "user", "content": "stream slowly"}],
    })
    .to_string();
    let response = sender
        .send_request(
            Request::post(format!("http://{}/v1/chat/completions", h.addr))
                .header("authorization", bearer(CHAT_KEY))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))?,
        )
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let started = Instant::now();
    let bytes = response.into_body().collect().await?.to_bytes();
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(bytes.ends_with(b"data: [DONE]\n\n"));
    let records = h.stop_and_records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["status"], 200);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 12b. Trickled bodies and the budget of bytes held for request bodies

/// Sends `head`, then `body` in `piece`-byte writes `pause` apart, while reading the proxy's
/// answer; stops writing once the proxy has answered and closed. The raw answer, and how long
/// after the head it came.
async fn send_in_pieces(
    addr: SocketAddr,
    head: String,
    body: Vec<u8>,
    piece: usize,
    pause: Duration,
) -> (Vec<u8>, Duration) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        if write.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for chunk in body.chunks(piece) {
            tokio::time::sleep(pause).await;
            if write.write_all(chunk).await.is_err() {
                return;
            }
        }
        // All sent: keep the write half open until the answer is read.
        std::future::pending::<()>().await;
    });
    let (got, closed) = read_until_closed(&mut read, Duration::from_secs(8)).await;
    writer.abort();
    (got, closed - started)
}

fn post_head(key: &str, len: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
}

/// A chat request body of exactly `len` bytes.
fn chat_body_of(len: usize) -> String {
    let empty = chat_body_with("");
    let body = chat_body_with(&"a".repeat(len - empty.len()));
    assert_eq!(body.len(), len);
    body
}

fn chat_body_with(content: &str) -> String {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}).to_string()
}

#[tokio::test]
async fn a_trickled_body_is_cut_off_at_the_total_deadline() -> TestResult {
    let mut h = start(|t| {
        with_server(
            t,
            "body_read_timeout = \"300ms\"\nbody_total_timeout = \"1s\"",
        )
    })
    .await;
    // A byte every 200 ms: it never stalls for 300 ms, and would take 16 s in all.
    let body = chat_body("gpt-4o-mini");
    let (got, after) = send_in_pieces(
        h.addr,
        post_head(CHAT_KEY, body.len()),
        body.into_bytes(),
        1,
        Duration::from_millis(200),
    )
    .await;
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(4),
        "answered after {after:?}"
    );
    let (response_head, response_body) = split_response(&got);
    assert!(response_head.starts_with("http/1.1 408"), "{response_head}");
    assert!(
        response_head.contains("connection: close"),
        "{response_head}"
    );
    assert_openai_error(&response_body, "request_timeout");
    assert!(h.log.is_empty(), "nothing went upstream");
    let records = h.stop_and_records().await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["status"], 408);
    assert_eq!(records[0]["blocked_by"], "server");
    assert_eq!(records[0]["code"], "request_timeout");
    Ok(())
}

/// A budget of 1 MiB, bodies of at most 1 MiB.
fn with_budget(text: String) -> String {
    let text = with_server(
        text,
        "max_body_bytes_in_flight = 1048576\nbody_read_timeout = \"5s\"",
    );
    format!("{text}\n[body]\nlimit = 1048576\n")
}

fn assert_overloaded(got: &[u8]) {
    let (response_head, response_body) = split_response(got);
    assert!(response_head.starts_with("http/1.1 503"), "{response_head}");
    assert!(response_head.contains("retry-after: 1"), "{response_head}");
    assert!(
        response_head.contains("connection: close"),
        "{response_head}"
    );
    assert_openai_error(&response_body, "server_overloaded");
    let value: Value = serde_json::from_slice(&response_body).unwrap();
    assert_eq!(value["error"]["type"], "server_error", "{value}");
}

#[tokio::test]
async fn a_body_over_the_budget_is_a_503_and_the_budget_comes_back() -> TestResult {
    let mut h = start(with_budget).await;
    let len = 700 * 1024;
    let body = chat_body_of(len);

    // The first client sends all but the last 100 bytes, and waits: ~700 KiB held.
    let mut first = TcpStream::connect(h.addr).await?;
    first.write_all(post_head(CHAT_KEY, len).as_bytes()).await?;
    first.write_all(&body.as_bytes()[..len - 100]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The second does not fit beside it.
    let (got, _) = send_in_pieces(
        h.addr,
        post_head(OPEN_KEY, len),
        body.clone().into_bytes(),
        8 * 1024,
        Duration::from_millis(2),
    )
    .await;
    assert_overloaded(&got);

    // The first completes.
    first.write_all(&body.as_bytes()[len - 100..]).await?;
    let (got, _) = read_until_closed(&mut first, Duration::from_secs(8)).await;
    let (response_head, _) = split_response(&got);
    assert!(response_head.starts_with("http/1.1 200"), "{response_head}");

    // Both gave their bytes back: a new one fits.
    let auth = bearer(OPEN_KEY);
    let (status, _, _) = send(
        Method::POST,
        &h.url("/v1/chat/completions"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        &body,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        h.log.received().len(),
        2,
        "the 503's body never went upstream"
    );

    let records = h.stop_and_records().await;
    assert_eq!(records.len(), 3, "{records:?}");
    let refused: Vec<_> = records.iter().filter(|r| r["status"] == 503).collect();
    assert_eq!(refused.len(), 1, "{records:?}");
    assert_eq!(refused[0]["blocked_by"], "server");
    assert_eq!(refused[0]["code"], "server_overloaded");
    assert_eq!(refused[0]["key"], "open");
    assert_eq!(records.iter().filter(|r| r["status"] == 200).count(), 2);
    Ok(())
}

#[tokio::test]
async fn cancelled_bodies_give_their_bytes_back() -> TestResult {
    let mut h = start(with_budget).await;
    let len = 700 * 1024;
    let body = chat_body_of(len);
    // Ten clients send 100 KiB each of a 700 KiB body: ~1000 KiB of the 1 MiB held.
    let mut held = Vec::new();
    for i in 0..10 {
        let key = if i % 2 == 0 { CHAT_KEY } else { OPEN_KEY };
        let mut stream = TcpStream::connect(h.addr).await?;
        stream.write_all(post_head(key, len).as_bytes()).await?;
        stream.write_all(&body.as_bytes()[..100 * 1024]).await?;
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The budget is full: 100 KiB more do not fit.
    let small = chat_body_of(100 * 1024);
    let (got, _) = send_in_pieces(
        h.addr,
        post_head(OPEN_KEY, small.len()),
        small.into_bytes(),
        8 * 1024,
        Duration::from_millis(2),
    )
    .await;
    assert_overloaded(&got);

    // They all go away mid-body; their bytes come back.
    drop(held);
    let auth = bearer(OPEN_KEY);
    let mut attempts = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        attempts += 1;
        let (status, _, _) = send(
            Method::POST,
            &h.url("/v1/chat/completions"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            &body,
        )
        .await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            Instant::now() < deadline,
            "the cancelled bodies' bytes never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = h.stop_and_records().await;
    // One record each: the ten cancelled, the refused probe, every attempt.
    assert_eq!(records.len(), 10 + 1 + attempts, "{records:?}");
    Ok(())
}

type StreamedBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// A request body fed through a channel: it ends when the sender is dropped.
fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, StreamedBody) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|data| (Ok(http_body::Frame::data(data)), rx))
    });
    (tx, http_body_util::StreamBody::new(frames).boxed_unsync())
}

fn full_body(body: &str) -> StreamedBody {
    Full::new(Bytes::from(body.to_owned()))
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[tokio::test]
async fn an_http2_stream_over_the_budget_is_a_503_and_the_connection_lives_on() -> TestResult {
    let mut h = start(with_budget).await;
    let len = 700 * 1024;
    let body = chat_body_of(len);
    let stream = TcpStream::connect(h.addr).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    tokio::spawn(conn);
    let url = format!("http://{}/v1/chat/completions", h.addr);
    let request = |key: &str, body: StreamedBody| {
        Request::post(&url)
            .header("authorization", bearer(key))
            .header("content-type", "application/json")
            .body(body)
            .unwrap()
    };

    // Stream one: all but the last 100 bytes, then it waits.
    let (tx, first_body) = channel_body();
    let first = tokio::spawn(sender.send_request(request(CHAT_KEY, first_body)));
    for piece in body.as_bytes()[..len - 100].chunks(64 * 1024) {
        tx.send(Bytes::copy_from_slice(piece)).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Stream two, on the same connection, does not fit beside it.
    sender.ready().await?;
    let response = tokio::time::timeout(
        Duration::from_secs(8),
        sender.send_request(request(OPEN_KEY, full_body(&body))),
    )
    .await
    .expect("answered in time")?;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(response.headers().get("connection").is_none());
    let refused = response.into_body().collect().await?.to_bytes();
    assert_openai_error(&refused, "server_overloaded");

    // Stream one completes.
    tx.send(Bytes::copy_from_slice(&body.as_bytes()[len - 100..]))
        .await?;
    drop(tx);
    let response = tokio::time::timeout(Duration::from_secs(8), first)
        .await
        .expect("answered in time")??;
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await?;

    // The connection lives on, and the budget is free again.
    sender.ready().await?;
    let response = sender
        .send_request(request(OPEN_KEY, full_body(&body)))
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await?;

    let records = h.stop_and_records().await;
    assert_eq!(records.len(), 3, "{records:?}");
    let refused: Vec<_> = records.iter().filter(|r| r["status"] == 503).collect();
    assert_eq!(refused.len(), 1, "{records:?}");
    assert_eq!(refused[0]["blocked_by"], "server");
    assert_eq!(refused[0]["code"], "server_overloaded");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The client's address behind trusted proxies (`[proxy] trusted_proxies`). The tests connect
// from loopback: trusted when the config lists 127.0.0.0/8, an ordinary client otherwise.

const OFFICE_KEY: &str = "sk-office-hardening-key";

/// A key usable only from 203.0.113.0/24, and `[proxy]` as given (`None`: no table).
fn with_office_key(text: String, trusted: Option<&str>) -> String {
    let mut text = format!(
        "{text}\n[[keys]]\nname = \"office\"\nsecret = \"{OFFICE_KEY}\"\nallow_ips = [\"203.0.113.0/24\"]\n"
    );
    if let Some(trusted) = trusted {
        text.push_str(&format!("\n[proxy]\ntrusted_proxies = {trusted}\n"));
    }
    text
}

/// A chat request with the office key and `headers`: its status and body.
async fn office_chat(h: &Harness, headers: &[(&str, &str)]) -> (StatusCode, Bytes) {
    let auth = bearer(OFFICE_KEY);
    let mut all = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    all.extend_from_slice(headers);
    let (status, _, body) = send(
        Method::POST,
        &h.url("/v1/chat/completions"),
        &all,
        &chat_body("gpt-4o-mini"),
    )
    .await;
    (status, body)
}

fn client_ips(records: &[Value]) -> Vec<&str> {
    records
        .iter()
        .map(|r| r["client_ip"].as_str().expect("a client_ip"))
        .collect()
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_peer_change_nothing() -> TestResult {
    let mut h = start(|t| with_office_key(t, None)).await;
    let (status, body) = office_chat(&h, &[("x-forwarded-for", "203.0.113.5")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_openai_error(&body, "ip_not_allowed");
    let (status, body) = office_chat(&h, &[("forwarded", "for=203.0.113.5")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_openai_error(&body, "ip_not_allowed");
    let records = h.stop_and_records().await;
    assert_eq!(client_ips(&records), ["127.0.0.1", "127.0.0.1"]);
    assert!(h.log.is_empty(), "nothing went upstream");
    Ok(())
}

#[tokio::test]
async fn a_trusted_proxy_says_who_the_client_is() -> TestResult {
    let mut h = start(|t| with_office_key(t, Some(r#"["127.0.0.0/8", "fd00::/8"]"#))).await;
    let (status, _) = office_chat(&h, &[("x-forwarded-for", "203.0.113.5")]).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) =
        office_chat(&h, &[("forwarded", r#"for="203.0.113.6:4711";proto=http"#)]).await;
    assert_eq!(status, StatusCode::OK);
    let records = h.stop_and_records().await;
    assert_eq!(client_ips(&records), ["203.0.113.5", "203.0.113.6"]);
    assert_eq!(records[0]["key"], "office");
    assert_eq!(h.log.received().len(), 2);
    Ok(())
}

#[tokio::test]
async fn the_right_most_untrusted_hop_is_the_client() -> TestResult {
    let mut h = start(|t| with_office_key(t, Some(r#"["127.0.0.0/8"]"#))).await;
    // Trusted hops on the right are skipped.
    let (status, _) = office_chat(&h, &[("x-forwarded-for", "203.0.113.5, 127.0.0.1")]).await;
    assert_eq!(status, StatusCode::OK);
    // Two lines, joined in order.
    let (status, _) = office_chat(
        &h,
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "127.0.0.9"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // A client that puts an allowed address on the left is still itself.
    let (status, body) = office_chat(&h, &[("x-forwarded-for", "203.0.113.5, 198.51.100.7")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_openai_error(&body, "ip_not_allowed");
    // IPv6, quoted, with a port.
    let (status, _) = office_chat(&h, &[("forwarded", r#"for="[2001:db8::1]:4711""#)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let records = h.stop_and_records().await;
    assert_eq!(
        client_ips(&records),
        ["203.0.113.5", "203.0.113.7", "198.51.100.7", "2001:db8::1"]
    );
    Ok(())
}

#[tokio::test]
async fn both_headers_or_an_unreadable_hop_leave_the_proxys_own_address() -> TestResult {
    let mut h = start(|t| with_office_key(t, Some(r#"["127.0.0.0/8"]"#))).await;
    let (status, body) = office_chat(
        &h,
        &[
            ("x-forwarded-for", "203.0.113.5"),
            ("forwarded", "for=203.0.113.5"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_openai_error(&body, "ip_not_allowed");
    for header in [
        ("x-forwarded-for", "203.0.113.5, unknown"),
        ("forwarded", "for=203.0.113.5, for=_hidden"),
        ("forwarded", r#"for=203.0.113.5, for="127.0.0.2"#),
    ] {
        let (status, _) = office_chat(&h, &[header]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{header:?}");
    }
    let records = h.stop_and_records().await;
    assert_eq!(client_ips(&records), ["127.0.0.1"; 4]);
    Ok(())
}

#[tokio::test]
async fn with_the_proxys_header_named_a_client_sending_both_is_still_found() -> TestResult {
    let mut h = start(|t| {
        with_office_key(t, Some(r#"["127.0.0.0/8"]"#)) + "forwarded_header = \"x-forwarded-for\"\n"
    })
    .await;
    // The proxy wrote X-Forwarded-For; the client added a Forwarded of its own.
    let (status, _) = office_chat(
        &h,
        &[
            ("x-forwarded-for", "203.0.113.5"),
            ("forwarded", "for=198.51.100.7"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // A Forwarded alone is not read.
    let (status, _) = office_chat(&h, &[("forwarded", "for=203.0.113.5")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let records = h.stop_and_records().await;
    assert_eq!(client_ips(&records), ["203.0.113.5", "127.0.0.1"]);
    Ok(())
}

#[test]
fn trusted_proxies_default_to_none_and_must_be_cidrs() -> TestResult {
    let path = Path::new("proxy.toml");
    let base = "[upstream]\nbase_url = \"http://127.0.0.1:9/v1\"\n";
    let config = example_proxy::config::Config::parse(path, base).expect("defaults");
    assert!(config.proxy.trusted_proxies().is_empty());
    let text = format!("{base}[proxy]\ntrusted_proxies = [\"10.0.0.0/8\", \"fd00::/8\"]\n");
    let config = example_proxy::config::Config::parse(path, &text).expect("two ranges");
    assert!(config
        .proxy
        .trusted_proxies()
        .is_trusted("::ffff:10.1.2.3".parse()?));
    for bad in [
        "[proxy]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
        "[proxy]\ntrusted_proxies = [\"proxy.internal\"]\n",
        "[proxy]\ntrusted_proxy = [\"10.0.0.0/8\"]\n",
    ] {
        let text = format!("{base}{bad}");
        assert!(
            example_proxy::config::Config::parse(path, &text).is_err(),
            "{bad}"
        );
    }
    Ok(())
}
