//! The admin REST API (`/admin/v1/keys`, `[admin] token_env`) through the proxy: on the
//! configuration file's keys, and on keys in PostgreSQL shared by two replicas (a real
//! server the test starts, see `tests/common/pg.rs` of the library): create a key, use it,
//! restrict its models and see the next request refused, disable it and see 401 on both
//! replicas.

#[path = "common/admin.rs"]
mod admin_common;

#[path = "../../../tests/common/pg.rs"]
mod pg;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use admin_common::{call, TOKEN, TOKEN_ENV};
use bytes::Bytes;
use example_proxy::{app, mock};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use pg::PgServer;
use serde_json::{json, Value};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const FILE_KEY: &str = "sk-file-key-of-the-admin-test";

struct Proxy {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start(config: &str, migrate: bool) -> Result<Proxy, app::StartError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).expect("config written");
    let args = app::Args {
        config: Some(path),
        listen: None,
        no_policy: false,
        migrate,
    };
    let env = |name: &str| (name == TOKEN_ENV).then(|| TOKEN.to_owned());
    let proxy = app::Proxy::prepare(&args, env).await?;
    let addr = proxy.addr;
    tokio::spawn(proxy.run(std::future::pending()));
    Ok(Proxy { addr, _dir: dir })
}

fn config(mock: SocketAddr, tail: &str) -> String {
    format!(
        r#"listen = "127.0.0.1:0"

[upstream]
base_url = "http://{mock}/v1"

[admin]
token_env = "{TOKEN_ENV}"
{tail}"#
    )
}

async fn chat(
    addr: SocketAddr,
    key: &str,
    model: &str,
) -> Result<(StatusCode, Value), Box<dyn std::error::Error + Send + Sync>> {
    call(
        addr,
        Method::POST,
        "/v1/chat/completions",
        key,
        Some(json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await
}

/// The admin story on one or two proxies sharing their keys.
async fn story(a: SocketAddr, b: SocketAddr) -> TestResult {
    // Create: the secret is shown once.
    let (status, created) = call(
        a,
        Method::POST,
        "/admin/v1/keys",
        TOKEN,
        Some(json!({"name": "new-app", "model_limits_enabled": true, "model_limits": ["gpt-4o-mini", "gpt-4o"]})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["secret"].as_str().expect("a secret").to_owned();
    assert_eq!(created["name"], "new-app");
    assert_eq!(created["object"], "key");
    // Used on both replicas.
    for addr in [a, b] {
        let (status, body) = chat(addr, &secret, "gpt-4o").await?;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Read back, without the secret.
    let (status, record) = call(a, Method::GET, "/admin/v1/keys/new-app", TOKEN, None).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(record.get("secret").is_none());
    assert!(!record.to_string().contains(&secret));
    // Restrict its models: the next request for the other model is refused, on both.
    let (status, _) = call(
        b,
        Method::PATCH,
        "/admin/v1/keys/new-app",
        TOKEN,
        Some(json!({"model_limits": ["gpt-4o-mini"]})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    for addr in [a, b] {
        let key = secret.clone();
        eventually(move || {
            let key = key.clone();
            async move {
                let (status, body) = chat(addr, &key, "gpt-4o").await?;
                Ok(status == StatusCode::FORBIDDEN && body["error"]["code"] == "model_not_allowed")
            }
        })
        .await?;
        assert_eq!(chat(addr, &secret, "gpt-4o-mini").await?.0, StatusCode::OK);
    }
    // Disable: 401 on both.
    let (status, _) = call(
        a,
        Method::PATCH,
        "/admin/v1/keys/new-app",
        TOKEN,
        Some(json!({"disabled": true})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    for addr in [a, b] {
        let key = secret.clone();
        eventually(move || {
            let key = key.clone();
            async move { Ok(chat(addr, &key, "gpt-4o-mini").await?.0 == StatusCode::UNAUTHORIZED) }
        })
        .await?;
    }
    // Listed, then deleted.
    let (status, list) = call(a, Method::GET, "/admin/v1/keys?limit=100", TOKEN, None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["object"], "list");
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["name"] == "new-app"));
    let (status, _) = call(a, Method::DELETE, "/admin/v1/keys/new-app", TOKEN, None).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call(a, Method::GET, "/admin/v1/keys/new-app", TOKEN, None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    Ok(())
}

/// Retries `check` for up to a second (the time a change may take to reach a replica).
async fn eventually<F, Fut>(check: F) -> TestResult
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<bool, Box<dyn std::error::Error + Send + Sync>>>,
{
    let started = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(1) {
            return Err("not within a second".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_admin_api_manages_the_keys_of_the_configuration_file() -> TestResult {
    let (mock, _log) = mock::spawn(mock::MockOptions::default()).await?;
    let text = config(
        mock,
        &format!("\n[[keys]]\nname = \"file-key\"\nsecret = \"{FILE_KEY}\"\n"),
    );
    let proxy = start(&text, false).await?;
    story(proxy.addr, proxy.addr).await?;
    // The file's own key is still there, and works.
    assert_eq!(
        chat(proxy.addr, FILE_KEY, "gpt-4o").await?.0,
        StatusCode::OK
    );
    Ok(())
}

#[tokio::test]
async fn the_admin_api_refuses_anyone_without_the_token() -> TestResult {
    let (mock, log) = mock::spawn(mock::MockOptions::default()).await?;
    let text = config(
        mock,
        &format!("\n[[keys]]\nname = \"file-key\"\nsecret = \"{FILE_KEY}\"\n"),
    );
    let proxy = start(&text, false).await?;
    for bearer in ["", "wrong-token-wrong-token-wrong-token-00", FILE_KEY] {
        let (status, body) = call(proxy.addr, Method::GET, "/admin/v1/keys", bearer, None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bearer}: {body}");
        assert_eq!(body["error"]["code"], "invalid_admin_token");
    }
    // The admin token is not a virtual key.
    let (status, _) = chat(proxy.addr, TOKEN, "gpt-4o").await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(log.is_empty(), "nothing reached the upstream");
    // Bad requests are OpenAI-shaped 4xx.
    for (method, path, body, expected) in [
        (
            Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": "x", "rpmm": 1})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/admin/v1/keys",
            Some(json!({"name": "file-key"})),
            StatusCode::CONFLICT,
        ),
        (
            Method::PATCH,
            "/admin/v1/keys/nobody",
            Some(json!({"rpm": 1})),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::PATCH,
            "/admin/v1/keys/file-key",
            Some(json!({"name": "renamed"})),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::PUT,
            "/admin/v1/keys/file-key",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::GET,
            "/admin/v1/nothing",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/admin/v1/keys?limit=ten",
            None,
            StatusCode::BAD_REQUEST,
        ),
        (Method::GET, "/admin/v1/spend", None, StatusCode::NOT_FOUND),
    ] {
        let (status, answer) = call(proxy.addr, method.clone(), path, TOKEN, body).await?;
        assert_eq!(status, expected, "{method} {path}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    // A body that is not JSON.
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = http
        .request(
            Request::post(format!("http://{}/admin/v1/keys", proxy.addr))
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Full::new(Bytes::from_static(b"{not json")))?,
        )
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    Ok(())
}

#[tokio::test]
async fn a_short_admin_token_or_one_that_is_a_virtual_key_stops_the_start() -> TestResult {
    let (mock, _log) = mock::spawn(mock::MockOptions::default()).await?;
    // The token is also a key of the file.
    let text = config(
        mock,
        &format!("\n[[keys]]\nname = \"clash\"\nsecret = \"{TOKEN}\"\n"),
    );
    let err = start(&text, false)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("also a virtual key"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
    // A variable that is not set.
    let text = config(mock, "").replace(TOKEN_ENV, "TEST_ADMIN_TOKEN_UNSET");
    let err = start(&text, false)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("at least 32"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_postgres_see_every_change_within_a_second() -> TestResult {
    let server = PgServer::start();
    let (mock, _log) = mock::spawn(mock::MockOptions::default()).await?;
    let tail = format!(
        "\n[store]\npostgres_url = \"{url}\"\n# Long: only NOTIFY can make a change arrive in time.\ncache_ttl = \"1h\"\n",
        url = server.url()
    );
    // The audit records in the same database.
    let text = config(mock, &tail).replace(
        "[admin]",
        &format!("[audit]\npostgres_url = \"{}\"\n\n[admin]", server.url()),
    );
    // Without the schema: the first replica migrates.
    let a = start(&text, true).await?;
    let b = start(&text, false).await?;
    story(a.addr, b.addr).await?;

    // Spend per key per day, from both replicas' records: the allowed requests of the story
    // (two, two more, then refusals and 401s, which cost nothing).
    let deadline = Instant::now() + Duration::from_secs(10);
    let today =
        humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..10].to_owned();
    loop {
        let (status, body) = call(
            a.addr,
            Method::GET,
            &format!("/admin/v1/spend?key=new-app&from={today}&to={today}"),
            TOKEN,
            None,
        )
        .await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        let days = body["data"].as_array().cloned().unwrap_or_default();
        if let Some(day) = days.first() {
            if day["requests"].as_i64() >= Some(8) {
                assert_eq!(days.len(), 1, "{body}");
                assert_eq!(day["key"], "new-app");
                assert_eq!(day["day"], today.as_str());
                assert!(day["cost_usd"].as_f64().unwrap() > 0.0, "{body}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "spend never showed: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = call(
        a.addr,
        Method::GET,
        "/admin/v1/spend?from=tomorrow",
        TOKEN,
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    Ok(())
}

#[test]
fn the_store_table_is_checked() {
    let parse = |text: &str| {
        example_proxy::config::Config::parse(
            Path::new("proxy.toml"),
            &format!("[upstream]\nbase_url = \"http://127.0.0.1:1/v1\"\n{text}"),
        )
    };
    // Keys in PostgreSQL and in the file: one place.
    assert!(parse("[store]\npostgres_url = \"postgres://a@b/c\"\n[[keys]]\nname = \"k\"\nsecret = \"sk-aaaaaaaaaaaaaaaaaaaa\"\n").is_err());
    let shown = format!(
        "{:?}",
        parse("[store]\npostgres_url = \"postgres://tlp:hunter2@db/llm\"\n").unwrap()
    );
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(parse("[store]\npostgres_url = \"mysql://a@b/c\"\n").is_err());
    assert!(parse("[admin]\ntoken_env = \"\"\n").is_err());
}
