//! KeyAuth: header variants, key checks, fail-closed stores, file stores with reload.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{answer, chat, post, with_key, Inner};
use http::StatusCode;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_policy::keys::{BoxFuture, FileKeyStore, StoreError};
use tower_llm_policy::{ApiKey, ClientIp, KeyAuthLayer, KeyDigest, KeyStore, MemoryKeyStore};

fn store() -> Arc<MemoryKeyStore> {
    Arc::new(
        MemoryKeyStore::new()
            .with_key("sk-good", ApiKey::new("good").label("team", "search"))
            .with_key(
                "sk-old",
                ApiKey::new("old").expires_at(SystemTime::now() - Duration::from_secs(60)),
            )
            .with_key(
                "sk-future",
                ApiKey::new("future").expires_at(SystemTime::now() + Duration::from_secs(3600)),
            )
            .with_key("sk-off", ApiKey::new("off").disabled(true))
            .with_key(
                "sk-office",
                ApiKey::new("office").allow_ips(["10.1.0.0/16".parse().unwrap()]),
            ),
    )
}

async fn send(store: Arc<dyn KeyStore>, req: http::Request<String>) -> (common::Answer, Inner) {
    let inner = Inner::default();
    let svc = ServiceBuilder::new()
        .layer(KeyAuthLayer::new(store))
        .map_request(|r: http::Request<String>| r.map(tower_llm_policy::PolicyBody::from))
        .service(inner.service());
    let resp = svc.oneshot(req).await.unwrap();
    (answer(resp).await, inner)
}

fn req() -> http::Request<String> {
    post("/v1/chat/completions", chat("gpt-4o"))
}

#[tokio::test]
async fn bearer_key_is_accepted_and_removed_before_the_inner_service() {
    let (a, inner) = send(store(), with_key(req(), "sk-good")).await;
    assert_eq!(a.status, StatusCode::OK);
    let seen = inner.last();
    assert!(seen.headers.get("authorization").is_none());
    let key = seen.key.expect("Arc<ApiKey> in extensions");
    assert_eq!(key.name, "good");
    assert_eq!(key.metadata["team"], "search");
}

#[tokio::test]
async fn scheme_is_case_insensitive_and_key_is_trimmed() {
    let mut r = req();
    r.headers_mut()
        .insert("authorization", "bearer   sk-good ".parse().unwrap());
    let (a, _) = send(store(), r).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn azure_and_anthropic_style_headers_work_and_are_removed() {
    for header in ["api-key", "x-api-key"] {
        let mut r = req();
        r.headers_mut().insert(header, "sk-good".parse().unwrap());
        let (a, inner) = send(store(), r).await;
        assert_eq!(a.status, StatusCode::OK, "{header}");
        assert!(
            inner.last().headers.get(header).is_none(),
            "{header} removed"
        );
    }
}

#[tokio::test]
async fn agreeing_headers_pass_and_conflicting_headers_are_refused() {
    let mut r = with_key(req(), "sk-good");
    r.headers_mut()
        .insert("x-api-key", "sk-good".parse().unwrap());
    assert_eq!(send(store(), r).await.0.status, StatusCode::OK);

    let mut r = with_key(req(), "sk-good");
    r.headers_mut()
        .insert("api-key", "sk-other".parse().unwrap());
    let (a, inner) = send(store(), r).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.error().0, "invalid_api_key");
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn missing_key_is_401_invalid_api_key() {
    let (a, inner) = send(store(), req()).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let (code, message) = a.error();
    assert_eq!(code, "invalid_api_key");
    assert!(message.contains("didn't provide an API key"), "{message}");
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn unknown_key_and_non_bearer_schemes_are_401() {
    let (a, inner) = send(store(), with_key(req(), "sk-nope")).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.error().0, "invalid_api_key");
    assert!(
        !String::from_utf8_lossy(&a.body).contains("sk-nope"),
        "key echoed"
    );
    assert_eq!(inner.calls(), 0);

    let mut r = req();
    r.headers_mut()
        .insert("authorization", "Basic c2stZ29vZDo=".parse().unwrap());
    assert_eq!(send(store(), r).await.0.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn expired_key_is_401_key_expired_and_unexpired_passes() {
    let (a, inner) = send(store(), with_key(req(), "sk-old")).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.error().0, "key_expired");
    assert_eq!(inner.calls(), 0);
    let (a, _) = send(store(), with_key(req(), "sk-future")).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn disabled_key_is_401() {
    let (a, inner) = send(store(), with_key(req(), "sk-off")).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.error().0, "invalid_api_key");
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn ip_allow_list_is_enforced_and_fails_closed_without_an_address() {
    let allowed: IpAddr = "10.1.2.3".parse().unwrap();
    let mut r = with_key(req(), "sk-office");
    r.extensions_mut().insert(ClientIp(allowed));
    assert_eq!(send(store(), r).await.0.status, StatusCode::OK);

    // A plain SocketAddr extension is read too; IPv4-mapped IPv6 counts as IPv4.
    let mut r = with_key(req(), "sk-office");
    r.extensions_mut()
        .insert("[::ffff:10.1.9.9]:5000".parse::<SocketAddr>().unwrap());
    assert_eq!(send(store(), r).await.0.status, StatusCode::OK);

    let mut r = with_key(req(), "sk-office");
    r.extensions_mut()
        .insert(ClientIp("192.168.1.1".parse().unwrap()));
    let (a, inner) = send(store(), r).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.error().0, "ip_not_allowed");
    assert_eq!(inner.calls(), 0);

    // No address known: refused, never guessed (and X-Forwarded-For is not trusted).
    let mut r = with_key(req(), "sk-office");
    r.headers_mut()
        .insert("x-forwarded-for", "10.1.2.3".parse().unwrap());
    let (a, _) = send(store(), r).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.error().0, "ip_not_allowed");
}

struct BrokenStore;

impl KeyStore for BrokenStore {
    fn lookup<'a>(
        &'a self,
        _: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        Box::pin(async { Err(StoreError::new("connection refused")) })
    }
}

#[tokio::test]
async fn store_errors_fail_closed_with_503() {
    let (a, inner) = send(Arc::new(BrokenStore), with_key(req(), "sk-good")).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    let (code, message) = a.error();
    assert_eq!(code, "policy_unavailable");
    assert!(
        !message.contains("connection refused"),
        "internal detail leaked"
    );
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn memory_store_can_add_and_remove_keys_at_run_time() {
    let store = Arc::new(MemoryKeyStore::new());
    let r = || with_key(req(), "sk-late");
    assert_eq!(
        send(store.clone(), r()).await.0.status,
        StatusCode::UNAUTHORIZED
    );
    store.insert(KeyDigest::of("sk-late"), ApiKey::new("late"));
    assert_eq!(send(store.clone(), r()).await.0.status, StatusCode::OK);
    assert!(store.remove(&KeyDigest::of("sk-late")));
    assert_eq!(send(store, r()).await.0.status, StatusCode::UNAUTHORIZED);
}

fn write(path: &std::path::Path, text: &str) {
    // Write then rename, as editors and config tools do; the store notices either way.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn toml_file_store_loads_secrets_and_digests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    let digest = KeyDigest::of("sk-hashed").to_hex();
    write(
        &path,
        &format!(
            r#"
[[keys]]
name = "plain"
secret = "sk-plain"
model_limits_enabled = true
model_limits = ["gpt-4o"]
blocked_features = ["images", "audio"]
allow_ips = ["127.0.0.1", "10.0.0.0/8"]
expires_at = "2999-01-01T00:00:00Z"
metadata = {{ team = "infra" }}

[[keys]]
name = "hashed"
secret_sha256 = "{digest}"
"#
        ),
    );
    let store = Arc::new(
        FileKeyStore::open(&path)
            .unwrap()
            .check_interval(std::time::Duration::ZERO),
    );
    assert_eq!(store.len(), 2);
    let mut r = with_key(req(), "sk-plain");
    r.extensions_mut()
        .insert(ClientIp("127.0.0.1".parse().unwrap()));
    let (a, inner) = send(store.clone(), r).await;
    assert_eq!(a.status, StatusCode::OK);
    let key = inner.last().key.unwrap();
    assert_eq!(key.name, "plain");
    assert!(key.model_limits_enabled);
    assert_eq!(key.metadata["team"], "infra");
    assert!(key
        .blocked_features
        .contains(tower_llm_policy::Feature::ImageGeneration));
    // The plaintext is nowhere in the key's Debug output.
    assert!(!format!("{key:?}").contains("sk-plain"));
    let (a, _) = send(store, with_key(req(), "sk-hashed")).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn json_file_store_works_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.json");
    write(
        &path,
        r#"{"keys":[{"name":"j","secret":"sk-json","expires_at":4102444800}]}"#,
    );
    let store = Arc::new(
        FileKeyStore::open(&path)
            .unwrap()
            .check_interval(std::time::Duration::ZERO),
    );
    let (a, _) = send(store, with_key(req(), "sk-json")).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn file_store_picks_up_edits_on_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    write(&path, "[[keys]]\nname = \"a\"\nsecret = \"sk-a\"\n");
    let store = Arc::new(
        FileKeyStore::open(&path)
            .unwrap()
            .check_interval(std::time::Duration::ZERO),
    );
    assert_eq!(
        send(store.clone(), with_key(req(), "sk-a")).await.0.status,
        StatusCode::OK
    );

    // Revoke a, add b.
    write(&path, "[[keys]]\nname = \"b\"\nsecret = \"sk-b\"\n");
    assert_eq!(
        send(store.clone(), with_key(req(), "sk-a")).await.0.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(store.clone(), with_key(req(), "sk-b")).await.0.status,
        StatusCode::OK
    );
    assert_eq!(store.reloads(), 1);

    // A broken edit keeps the keys in force and says why.
    write(&path, "[[keys]]\nname = \"b\"\nsecrett = \"sk-b\"\n");
    assert_eq!(
        send(store.clone(), with_key(req(), "sk-b")).await.0.status,
        StatusCode::OK
    );
    assert_eq!(store.failed_reloads(), 1);
    let err = store.last_error().unwrap();
    assert!(err.contains("secrett"), "{err}");
    assert!(err.contains("line 3"), "{err}");

    // Fixing it clears the error.
    write(&path, "[[keys]]\nname = \"c\"\nsecret = \"sk-c\"\n");
    assert_eq!(
        send(store.clone(), with_key(req(), "sk-c")).await.0.status,
        StatusCode::OK
    );
    assert!(store.last_error().is_none());
}

#[test]
fn file_store_rejects_bad_files_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[keys]]\nname = \"a\"\nsecret = \"s\"\nmodel_limit = []\n", "model_limit"),
        ("[[keys]]\nname = \"a\"\n", "needs `secret` or `secret_sha256`"),
        (
            "[[keys]]\nname = \"a\"\nsecret = \"s\"\nsecret_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n",
            "both",
        ),
        (
            "[[keys]]\nname = \"a\"\nsecret = \"s1\"\n[[keys]]\nname = \"a\"\nsecret = \"s2\"\n",
            "two keys are named",
        ),
        (
            "[[keys]]\nname = \"a\"\nsecret = \"same\"\n[[keys]]\nname = \"b\"\nsecret = \"same\"\n",
            "same secret",
        ),
        ("[[keys]]\nname = \"a\"\nsecret_sha256 = \"abc\"\n", "64 hexadecimal"),
        ("[[keys]]\nname = \"a\"\nsecret = \"s\"\nblocked_features = [\"telepathy\"]\n", "unknown feature"),
        ("[[keys]]\nname = \"a\"\nsecret = \"s\"\nallow_ips = [\"10.0.0.0/99\"]\n", "invalid address"),
        ("[[keys]]\nname = \"a\"\nsecret = \"s\"\nexpires_at = \"soon\"\n", "invalid expires_at"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("k{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let err = FileKeyStore::open(&path).unwrap_err().to_string();
        assert!(err.contains(expected), "case {i}: {err}");
        assert!(!err.contains("same\""), "secret leaked: {err}");
    }
    assert!(FileKeyStore::open(dir.path().join("missing.toml")).is_err());
}
