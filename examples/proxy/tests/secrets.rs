//! No secret leaks through the proxy: the virtual keys and the provider key are known strings;
//! every path (allowed, streamed, blocked by each layer, bad JSON, unknown key, an upstream
//! error, an upstream that cannot be reached) is run against the proxy in front of the mock
//! upstream, and every response (status, headers, body), the audit log, the `tracing` output at
//! TRACE level and the `Debug` of the proxy's types are searched for them: zero hits.
//!
//! The mock upstream is the one place that must see the provider key (and does: checked).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use example_proxy::{app, mock, upstream};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;

const PROVIDER_KEY: &str = "sk-secret-proxy-provider-0a1b2c3d4e";
const PROVIDER_ENV: &str = "TEST_SECRETS_PROVIDER_KEY";
const CHAT_KEY: &str = "sk-secret-proxy-chat-5f6e7d8c9b";
const OPEN_KEY: &str = "sk-secret-proxy-open-1a2b3c4d5e";
const UNKNOWN_KEY: &str = "sk-secret-proxy-unknown-6f7e8d9c0b";
const WEBHOOK_SECRET: &str = "whsec-secret-proxy-guard-3c4d5e6f7a";
const WEBHOOK_ENV: &str = "TEST_SECRETS_WEBHOOK_SECRET";
const ALERTS_SECRET: &str = "alerts-secret-proxy-token-8b9c0d1e2f";
const ALERTS_ENV: &str = "TEST_SECRETS_ALERTS_SECRET";
const SALT: &str = "salt-secret-proxy-end-users-4a5b6c";
const SALT_ENV: &str = "TEST_SECRETS_SALT";
const SECRETS: &[&str] = &[
    PROVIDER_KEY,
    CHAT_KEY,
    OPEN_KEY,
    UNKNOWN_KEY,
    WEBHOOK_SECRET,
    ALERTS_SECRET,
    SALT,
];

/// A `Write` into a shared buffer, for the tracing output.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `closed`: a port nothing listens on (the webhook guard's and the alerts' endpoint: every
/// call fails, and the failures are logged).
fn config_text(upstream: &str, audit: &std::path::Path, closed: u16) -> String {
    format!(
        r#"listen = "127.0.0.1:0"

[upstream]
base_url = "{upstream}"
api_key_env = "{PROVIDER_ENV}"
first_byte_timeout = "5s"
idle_timeout = "5s"

[server]
shutdown_grace = "5s"

[audit]
jsonl = "{audit}"

[body]
limit = 4096

[[guards]]
name = "banned"
kind = "words"
words = ["xyzzy"]

[[guards]]
name = "dlp"
kind = "webhook"
workspace = false
url = "http://127.0.0.1:{closed}/moderate"
secret_env = "{WEBHOOK_ENV}"
timeout = "2s"

[end_users]
hash_salt_env = "{SALT_ENV}"

[alerts]
webhook_url = "http://127.0.0.1:{closed}/alerts"
secret_env = "{ALERTS_ENV}"

[[keys]]
name = "chat-app"
secret = "{CHAT_KEY}"
model_limits_enabled = true
model_limits = ["gpt-4o-mini"]
blocked_features = ["images"]
max_prompt_tokens = 50

[[keys]]
name = "open"
secret = "{OPEN_KEY}"
require_user = true
"#,
        audit = audit.display()
    )
}

/// One plain HTTP request; everything about the response, as text.
async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: String,
) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let req = req
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("answered in time")
        .expect("the proxy answers");
    let status = response.status().as_u16();
    let head = format!("{:?} {:?}", response.status(), response.headers());
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the body ends in time")
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_else(|e| format!("<body error {e:?}>"));
    (status, format!("{head}\n{body}"))
}

/// A case: its name, method, path, headers, body and the status expected (0: any 4xx).
type Case<'a> = (
    &'a str,
    Method,
    &'a str,
    Vec<(&'a str, String)>,
    String,
    u16,
);

fn chat(model: &str, text: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model, "stream": stream,
        "messages": [{"role": "user", "content": text}],
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_leaves_the_proxy_but_the_provider_key_to_the_upstream() {
    let tracing_out = Buffer::default();
    let writer = tracing_out.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let (mock_addr, mock_log) = mock::spawn(mock::MockOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("proxy.toml");
    let audit_path = dir.path().join("audit.jsonl");
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    std::fs::write(
        &config_path,
        config_text(&format!("http://{mock_addr}/v1"), &audit_path, closed),
    )
    .unwrap();
    let args = app::Args {
        config: Some(config_path.clone()),
        listen: None,
        no_policy: false,
        migrate: false,
    };
    let env = |name: &str| {
        [
            (PROVIDER_ENV, PROVIDER_KEY),
            (WEBHOOK_ENV, WEBHOOK_SECRET),
            (ALERTS_ENV, ALERTS_SECRET),
            (SALT_ENV, SALT),
        ]
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| (*v).to_owned())
    };
    let proxy = app::Proxy::prepare(&args, env).await.expect("proxy starts");
    let mut seen: Vec<(String, String)> = Vec::new();
    seen.push(("Proxy (Debug)".into(), format!("{proxy:?}")));
    seen.push(("banner".into(), proxy.banner.clone()));
    let config = example_proxy::config::Config::load(&config_path).unwrap();
    seen.push(("Config (Debug)".into(), format!("{config:?}")));
    let builder = upstream::Upstream::builder(format!("http://{mock_addr}/v1"))
        .provider_key(Some(PROVIDER_KEY.to_owned()));
    seen.push(("UpstreamBuilder (Debug)".into(), format!("{builder:?}")));
    seen.push((
        "Upstream (Debug)".into(),
        format!("{:?}", builder.build().unwrap()),
    ));
    let addr = proxy.addr;
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(proxy.run(async {
        let _ = rx.await;
    }));

    let bearer = |key: &str| vec![("authorization", format!("Bearer {key}"))];
    let cases: Vec<Case<'_>> = vec![
        (
            "allowed",
            Method::POST,
            "/v1/chat/completions",
            bearer(CHAT_KEY),
            chat("gpt-4o-mini", "hi", false),
            200,
        ),
        (
            "streamed",
            Method::POST,
            "/v1/chat/completions",
            bearer(CHAT_KEY),
            chat("gpt-4o-mini", "hi", true),
            200,
        ),
        (
            "key in x-api-key",
            Method::POST,
            "/v1/chat/completions",
            vec![("x-api-key", CHAT_KEY.into())],
            chat("gpt-4o-mini", "hi", false),
            200,
        ),
        (
            "model list",
            Method::GET,
            "/v1/models",
            bearer(CHAT_KEY),
            String::new(),
            200,
        ),
        (
            "missing key",
            Method::POST,
            "/v1/chat/completions",
            vec![],
            chat("gpt-4o-mini", "hi", false),
            401,
        ),
        (
            "unknown key",
            Method::POST,
            "/v1/chat/completions",
            bearer(UNKNOWN_KEY),
            chat("gpt-4o-mini", "hi", false),
            401,
        ),
        (
            "two keys",
            Method::POST,
            "/v1/chat/completions",
            vec![
                ("authorization", format!("Bearer {CHAT_KEY}")),
                ("api-key", OPEN_KEY.into()),
            ],
            chat("gpt-4o-mini", "hi", false),
            401,
        ),
        (
            "model not allowed",
            Method::POST,
            "/v1/chat/completions",
            bearer(CHAT_KEY),
            chat("gpt-4o", "hi", false),
            403,
        ),
        (
            "feature blocked",
            Method::POST,
            "/v1/images/generations",
            bearer(CHAT_KEY),
            r#"{"model":"dall-e-3","prompt":"a cat"}"#.into(),
            422,
        ),
        (
            "prompt too long",
            Method::POST,
            "/v1/chat/completions",
            bearer(CHAT_KEY),
            chat("gpt-4o-mini", &"word ".repeat(200), false),
            400,
        ),
        (
            "user required",
            Method::POST,
            "/v1/chat/completions",
            bearer(OPEN_KEY),
            chat("gpt-4o", "hi", false),
            400,
        ),
        (
            "bad JSON",
            Method::POST,
            "/v1/chat/completions",
            bearer(CHAT_KEY),
            format!("{{\"model\": {CHAT_KEY}"),
            400,
        ),
        (
            "body too large",
            Method::POST,
            "/v1/chat/completions",
            bearer(CHAT_KEY),
            chat("gpt-4o-mini", &"x".repeat(8192), false),
            413,
        ),
        (
            "content blocked",
            Method::POST,
            "/v1/chat/completions",
            bearer(CHAT_KEY),
            chat("gpt-4o-mini", "xyzzy", false),
            400,
        ),
        (
            "webhook guard unreachable",
            Method::POST,
            "/v1/chat/completions",
            {
                let mut headers = bearer(CHAT_KEY);
                headers.push(("x-llm-policy-guards", "dlp".into()));
                headers
            },
            chat("gpt-4o-mini", "hi", false),
            503,
        ),
        // Refused somewhere (a layer or the forwarder): any 4xx.
        (
            "outside /v1",
            Method::POST,
            "/v2/chat/completions",
            bearer(OPEN_KEY),
            chat("gpt-4o", "hi", false),
            0,
        ),
    ];
    for (name, method, path, headers, body, expect) in cases {
        let (status, text) = send(addr, method, path, &headers, body).await;
        if expect == 0 {
            assert!((400..500).contains(&status), "{name}: {text}");
        } else {
            assert_eq!(status, expect, "{name}: {text}");
        }
        seen.push((format!("{name}: response"), text));
    }
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the proxy stops")
        .unwrap()
        .unwrap();

    // The upstream was given the provider key, and never a virtual key.
    let received = mock_log.received();
    assert!(!received.is_empty());
    for request in &received {
        assert_eq!(
            request.authorization.as_deref(),
            Some(&*format!("Bearer {PROVIDER_KEY}"))
        );
        let headers = format!("{:?}", request.headers);
        for key in [CHAT_KEY, OPEN_KEY, UNKNOWN_KEY] {
            assert!(!headers.contains(key), "{headers}");
        }
    }

    let audit = std::fs::read_to_string(&audit_path).unwrap();
    assert_eq!(audit.lines().count(), 16, "one record per request: {audit}");
    seen.push(("audit log".into(), audit));
    let tracing_text = String::from_utf8_lossy(&tracing_out.0.lock().unwrap()).into_owned();
    assert!(tracing_text.contains("request"), "tracing was captured");
    seen.push(("tracing output".into(), tracing_text));

    let mut hits = Vec::new();
    for (what, text) in &seen {
        for secret in SECRETS {
            if text.contains(secret) {
                hits.push(format!("{what} shows {secret}:\n{text}"));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "{} leaks:\n{}",
        hits.len(),
        hits.join("\n\n")
    );
}
