//! Hostile tests of the proxy's admin API (`/admin/v1/...`) over the configuration file's keys:
//! the attacks that once worked assert they no longer do, the others that they never did.

#[path = "common/admin.rs"]
mod admin_common;

use std::net::SocketAddr;
use std::sync::Arc;

use admin_common::{call, TOKEN, TOKEN_ENV};
use bytes::Bytes;
use example_proxy::{app, mock};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type Error = Box<dyn std::error::Error + Send + Sync>;

const LEAKED: &str = "sk-leaked-key-that-must-be-disabled";

struct Proxy {
    addr: SocketAddr,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn start(config: &str) -> Result<Proxy, app::StartError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).expect("config written");
    let args = app::Args {
        config: Some(path.clone()),
        listen: None,
        no_policy: false,
        migrate: false,
    };
    let env = |name: &str| (name == TOKEN_ENV).then(|| TOKEN.to_owned());
    let proxy = app::Proxy::prepare(&args, env).await?;
    let addr = proxy.addr;
    tokio::spawn(proxy.run(std::future::pending()));
    Ok(Proxy {
        addr,
        path,
        _dir: dir,
    })
}

fn config(mock: SocketAddr) -> String {
    format!(
        r#"listen = "127.0.0.1:0"

[upstream]
base_url = "http://{mock}/v1"

[admin]
token_env = "{TOKEN_ENV}"

[[keys]]
name = "leaked"
secret = "{LEAKED}"
"#
    )
}

async fn chat(addr: SocketAddr, key: &str) -> Result<StatusCode, Error> {
    Ok(call(
        addr,
        Method::POST,
        "/v1/chat/completions",
        key,
        Some(json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await?
    .0)
}

/// An operator disables a leaked key (`PATCH {"disabled": true}` → 200, `"disabled": true`)
/// while another admin client (an automation) changes the same key's `rpm`. The file store's
/// `update` computes the new entry from the snapshot it read before taking the admin lock,
/// so the rpm change writes the pre-disable policy back: the leaked key works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_admin_patches_never_undo_a_disable() -> TestResult {
    let (mock, _log) = mock::spawn(mock::MockOptions::default()).await?;
    let proxy = Arc::new(start(&config(mock)).await?);
    assert_eq!(chat(proxy.addr, LEAKED).await?, StatusCode::OK);
    let mut reverted = 0;
    let rounds = 60;
    for i in 0..rounds {
        let (s, _) = call(
            proxy.addr,
            Method::PATCH,
            "/admin/v1/keys/leaked",
            TOKEN,
            Some(json!({"disabled": false})),
        )
        .await?;
        assert_eq!(s, StatusCode::OK);
        let addr = proxy.addr;
        let disable = tokio::spawn(async move {
            call(
                addr,
                Method::PATCH,
                "/admin/v1/keys/leaked",
                TOKEN,
                Some(json!({"disabled": true})),
            )
            .await
        });
        let adjust = tokio::spawn(async move {
            call(
                addr,
                Method::PATCH,
                "/admin/v1/keys/leaked",
                TOKEN,
                Some(json!({"rpm": 1000 + i})),
            )
            .await
        });
        let (s1, b1) = disable.await??;
        let (s2, _) = adjust.await??;
        assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
        assert_eq!(b1["disabled"], true, "{b1}");
        // What a restart (or the next reload) serves: the file.
        let text = std::fs::read_to_string(&proxy.path)?;
        if !text.contains("disabled = true") {
            reverted += 1;
            // After the reload interval, what the leaked key gets now.
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
            let now = chat(proxy.addr, LEAKED).await?;
            assert_eq!(
                now,
                StatusCode::UNAUTHORIZED,
                "round {i}: the disable answered 200 `\"disabled\": true`, yet the leaked key \
                 is served ({reverted} lost disables so far)"
            );
        }
    }
    assert_eq!(reverted, 0, "{reverted} of {rounds} disables lost");
    Ok(())
}

/// Paths that are not exactly `/admin/...` go to the policy stack, never to the admin
/// handler, and the admin token is not a virtual key: nothing reaches the upstream and no
/// alternative spelling lists the keys.
#[tokio::test]
async fn no_spelling_of_the_admin_path_gets_past_the_token() -> TestResult {
    let (mock, log) = mock::spawn(mock::MockOptions::default()).await?;
    let proxy = start(&config(mock)).await?;
    for path in [
        "//admin/v1/keys",
        "/Admin/v1/keys",
        "/ADMIN/v1/keys",
        "/admin%2Fv1/keys",
        "/%61dmin/v1/keys",
        "/v1/../admin/v1/keys",
        "/admin/v1/./keys",
        "/admin/v1//keys",
        "/admin/v1/keys/",
        "/admin/v1/keys/..",
        "/admin/v1/keys/%2e%2e",
        "/admin/./v1/keys",
    ] {
        // Without the token, with a virtual key: never a key list.
        let (status, body) = call(proxy.addr, Method::GET, path, LEAKED, None).await?;
        assert!(
            body.get("data").is_none() && body.get("secret").is_none(),
            "{path} with a virtual key: {status} {body}"
        );
        let (status, body) = call(proxy.addr, Method::GET, path, "", None).await?;
        assert!(
            body.get("data").is_none(),
            "{path} without a token: {status} {body}"
        );
    }
    assert!(log.is_empty(), "an admin path reached the upstream");
    Ok(())
}

/// A created key's credential is chosen by the proxy, never by the caller; a patch cannot set
/// one (through any spelling) nor rename the key.
#[tokio::test]
async fn the_admin_api_cannot_choose_or_change_a_secret() -> TestResult {
    let (mock, _log) = mock::spawn(mock::MockOptions::default()).await?;
    let proxy = start(&config(mock)).await?;
    let (status, created) = call(
        proxy.addr,
        Method::POST,
        "/admin/v1/keys",
        TOKEN,
        Some(json!({"name": "mine", "secret": "sk-chosen-by-attacker-000"})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        chat(proxy.addr, "sk-chosen-by-attacker-000").await?,
        StatusCode::UNAUTHORIZED
    );
    for patch in [
        r#"{"name":"mine","name":"other"}"#,
        r#"{"secret":"sk-x-000000000000","rpm":1}"#,
        r#"{"secret_sha256":"0000000000000000000000000000000000000000000000000000000000000000"}"#,
        r#"{"Secret":"sk-x-000000000000"}"#,
        r#"{"metadata":{"secret":"sk-x"},"secret\u0000":"x"}"#,
        r#"{"secr\u0065t":"sk-x-000000000000"}"#,
    ] {
        let http = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let response = http
            .request(
                Request::patch(format!("http://{}/admin/v1/keys/mine", proxy.addr))
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .body(Full::new(Bytes::from(patch)))?,
            )
            .await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        assert_ne!(
            status,
            StatusCode::OK,
            "{patch}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert_eq!(
        chat(proxy.addr, "sk-x-000000000000").await?,
        StatusCode::UNAUTHORIZED
    );
    let text = std::fs::read_to_string(&proxy.path)?;
    assert!(!text.contains("name = \"other\""), "{text}");
    Ok(())
}

/// `expires_at` as Unix seconds is a u64: one past SystemTime's range panics in the
/// deserializer (`UNIX_EPOCH + Duration`), and one past year 9999 parses but panics when the
/// key is written (`humantime` returns fmt::Error, `to_string()` panics). Either kills the
/// admin request's connection instead of a 400. A key file holding such a key (valid TOML,
/// loaded and served fine) makes `GET /admin/v1/keys` panic for good.
#[tokio::test]
async fn a_far_future_expiry_is_refused_and_never_kills_the_handler() -> TestResult {
    let (mock, _log) = mock::spawn(mock::MockOptions::default()).await?;
    let text = format!(
        "{}\n[[keys]]\nname = \"far\"\nsecret = \"sk-far-future-key-00000000\"\nexpires_at = 253402300799\n",
        config(mock)
    );
    let proxy = start(&text).await?;
    let mut dead = Vec::new();
    for (i, expiry) in [json!(18446744073709551615u64), json!(253402300800u64)]
        .into_iter()
        .enumerate()
    {
        for (method, path, body) in [
            (
                Method::POST,
                "/admin/v1/keys".to_owned(),
                json!({"name": format!("far-{i}"), "expires_at": expiry}),
            ),
            (
                Method::PATCH,
                "/admin/v1/keys/leaked".to_owned(),
                json!({"expires_at": expiry}),
            ),
        ] {
            match call(proxy.addr, method.clone(), &path, TOKEN, Some(body)).await {
                Ok((status, _)) if status.is_client_error() => {}
                Ok((status, body)) => {
                    dead.push(format!("{method} {path} {expiry}: {status} {body}"))
                }
                Err(e) => dead.push(format!(
                    "{method} {path} expires_at {expiry}: no answer ({e})"
                )),
            }
        }
    }
    // The farthest key a file may hold (9999-12-31T23:59:59Z) is served...
    assert_eq!(
        chat(proxy.addr, "sk-far-future-key-00000000").await?,
        StatusCode::OK
    );
    // ...and listed and read.
    for path in ["/admin/v1/keys", "/admin/v1/keys/far"] {
        if let Err(e) = call(proxy.addr, Method::GET, path, TOKEN, None).await {
            dead.push(format!("GET {path}: no answer ({e})"));
        }
    }
    assert!(
        dead.is_empty(),
        "admin requests killed by a panic:\n{}",
        dead.join("\n")
    );
    Ok(())
}
