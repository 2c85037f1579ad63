//! Hostile tests of the admin API over keys in PostgreSQL (behind the CachedKeyStore and
//! NOTIFY): the attacks that once worked assert they no longer do.

#[path = "common/admin.rs"]
mod admin_common;

#[path = "../../../tests/common/pg.rs"]
mod pg;

use std::net::SocketAddr;

use admin_common::{call, TOKEN, TOKEN_ENV};
use example_proxy::{app, mock};
use http::{Method, StatusCode};
use pg::PgServer;
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type Error = Box<dyn std::error::Error + Send + Sync>;

async fn start(
    config: &str,
    migrate: bool,
) -> Result<(SocketAddr, tempfile::TempDir), app::StartError> {
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
    Ok((addr, dir))
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

fn config(mock: SocketAddr, url: &str) -> String {
    format!(
        r#"listen = "127.0.0.1:0"

[upstream]
base_url = "http://{mock}/v1"

[store]
postgres_url = "{url}"

[audit]
postgres_url = "{url}"

[admin]
token_env = "{TOKEN_ENV}"
"#
    )
}

/// The admin API answers a DELETE / disable before the replica's own cache has heard the
/// NOTIFY: a client holding the key, racing the operator, is still served by the very proxy
/// that just answered "deleted" (the cache is only told through PostgreSQL's round trip).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_key_is_refused_by_the_same_replica_at_once() -> TestResult {
    let server = PgServer::start();
    let (mock, _log) = mock::spawn(mock::MockOptions::default()).await?;
    let (addr, _dir) = start(&config(mock, &server.url()), true).await?;
    let mut served_after_delete = 0;
    let mut latest = std::time::Duration::ZERO;
    let rounds = 30;
    for i in 0..rounds {
        let name = format!("racer-{i}");
        let (status, created) = call(
            addr,
            Method::POST,
            "/admin/v1/keys",
            TOKEN,
            Some(json!({"name": name})),
        )
        .await?;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let secret = created["secret"].as_str().unwrap().to_owned();
        assert_eq!(chat(addr, &secret).await?, StatusCode::OK);
        // The holder keeps sending; the operator deletes.
        let holder = {
            let secret = secret.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..40 {
                    statuses.push((std::time::Instant::now(), chat(addr, &secret).await.ok()));
                }
                statuses
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let (status, body) = call(
            addr,
            Method::DELETE,
            &format!("/admin/v1/keys/{name}"),
            TOKEN,
            None,
        )
        .await?;
        let deleted_at = std::time::Instant::now();
        assert_eq!(status, StatusCode::OK, "{body}");
        for (at, status) in holder.await? {
            // A request *sent* after the DELETE answered.
            if at > deleted_at && status == Some(StatusCode::OK) {
                served_after_delete += 1;
                latest = latest.max(at - deleted_at);
            }
        }
    }
    assert_eq!(
        served_after_delete, 0,
        "{served_after_delete} requests sent after DELETE answered 200 were still served \
         (the latest sent {latest:?} after the answer)"
    );
    Ok(())
}

/// Client errors must be 4xx, not "the store is down" (503, logged as a store failure):
/// a NUL character in a policy string is valid JSON and valid for the file store, but
/// PostgreSQL's jsonb refuses it.
#[tokio::test]
async fn a_nul_in_admin_input_is_a_400_not_a_store_outage() -> TestResult {
    let server = PgServer::start();
    let (mock, _log) = mock::spawn(mock::MockOptions::default()).await?;
    let (addr, _dir) = start(&config(mock, &server.url()), true).await?;
    let (status, body) = call(
        addr,
        Method::POST,
        "/admin/v1/keys",
        TOKEN,
        Some(json!({"name": "nul", "metadata": {"owner": "a\u{0}b"}})),
    )
    .await?;
    let mut wrong = Vec::new();
    if !status.is_client_error() {
        wrong.push(format!("POST a NUL in metadata: {status} {body}"));
    }
    for path in [
        "/admin/v1/keys?after=%00",
        "/admin/v1/keys/a%00b",
        "/admin/v1/spend?key=%00",
    ] {
        let (status, body) = call(addr, Method::GET, path, TOKEN, None).await?;
        if status.is_server_error() {
            wrong.push(format!("GET {path}: {status} {body}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "client mistakes answered as store outages:\n{}",
        wrong.join("\n")
    );
    Ok(())
}

/// The spend endpoint's parameters: far dates, reversed ranges, injection in `key`.
#[tokio::test]
async fn spend_parameters_are_checked() -> TestResult {
    let server = PgServer::start();
    let (mock, _log) = mock::spawn(mock::MockOptions::default()).await?;
    let (addr, _dir) = start(&config(mock, &server.url()), true).await?;
    for (query, ok) in [
        ("from=1970-01-01&to=9999-12-31", true),
        ("to=9999-12-31T23:59:59Z", true),
        ("from=9999-12-31", false),
        ("from=2026-12-04&to=2026-12-03", false),
        ("from=2026-12-03&to=2026-12-03", true),
        ("key=x%27%3B%20DROP%20TABLE%20tlp_keys%3B--", true),
        ("key=%25&from=1970-01-01", true),
        ("from=0000-01-01", false),
        ("from=1969-12-31T23:59:59Z", false),
        ("to=1970-01-01T00:00:00Z", false),
        ("from=%FF", false),
    ] {
        let (status, body) = call(
            addr,
            Method::GET,
            &format!("/admin/v1/spend?{query}"),
            TOKEN,
            None,
        )
        .await?;
        if ok {
            assert_eq!(status, StatusCode::OK, "{query}: {body}");
        } else {
            assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        }
    }
    let (status, body) = call(addr, Method::GET, "/admin/v1/keys", TOKEN, None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    Ok(())
}

/// Held: on PostgreSQL, concurrent PATCHes of one key serialize (`SELECT ... FOR UPDATE`):
/// a disable racing an rpm change is never lost (contrast with the file store,
/// `attack_admin::attack_concurrent_admin_patches_undo_a_disable`).
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_patches_on_postgres_keep_the_disable() -> TestResult {
    let server = PgServer::start();
    let (mock, _log) = mock::spawn(mock::MockOptions::default()).await?;
    let (addr, _dir) = start(&config(mock, &server.url()), true).await?;
    let (status, _) = call(
        addr,
        Method::POST,
        "/admin/v1/keys",
        TOKEN,
        Some(json!({"name": "k"})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED);
    for i in 0..60 {
        call(
            addr,
            Method::PATCH,
            "/admin/v1/keys/k",
            TOKEN,
            Some(json!({"disabled": false})),
        )
        .await?;
        let a = tokio::spawn(async move {
            call(
                addr,
                Method::PATCH,
                "/admin/v1/keys/k",
                TOKEN,
                Some(json!({"disabled": true})),
            )
            .await
        });
        let b = tokio::spawn(async move {
            call(
                addr,
                Method::PATCH,
                "/admin/v1/keys/k",
                TOKEN,
                Some(json!({"rpm": 1000 + i})),
            )
            .await
        });
        a.await??;
        b.await??;
        let (_, key) = call(addr, Method::GET, "/admin/v1/keys/k", TOKEN, None).await?;
        assert_eq!(key["disabled"], true, "round {i}: {key}");
        assert_eq!(key["rpm"], 1000 + i, "round {i}: {key}");
    }
    Ok(())
}
