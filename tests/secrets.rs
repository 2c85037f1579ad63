//! No secret leaks: every path through the whole stack — allowed, blocked by each layer,
//! streamed, errors (bad JSON, unknown key, a store that fails, hangs or panics) — is run with
//! known secret strings (virtual keys, a provider key the inner service sends on), and
//! everything observable is collected: every response (status, headers, body), every audit
//! record (JSON, JSON Lines and `Debug`), the `Debug` and `Display` of every public type that
//! holds or sees a key, and the `tracing` output at TRACE level. None of it may contain a
//! secret, nor the full hex digest of one.
#![cfg(all(feature = "tracing", feature = "tokio", feature = "file-store"))]

mod common;

use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::{AuditLayer, AuditRecord, FanOut, FnSink, JsonlSink, MemorySink};
use tower_llm_policy::keys::{
    ApiKey, BoxFuture, FileKeyStore, KeyDigest, KeyStore, MemoryKeyStore, StoreError,
};
use tower_llm_policy::request::BodyOptions;
use tower_llm_policy::{
    AuditHandle, BodyLimitLayer, ClientIp, FeatureBlockLayer, FeatureSet, KeyAuthLayer, LlmRequest,
    ModelAllowListLayer, Policy, PolicyBody, PromptLimitLayer, Rejection,
};
use tracing_subscriber::util::SubscriberInitExt;

const GOOD: &str = "sk-secret-good-4f1e9a7c2b";
const HEADER_KEY: &str = "sk-secret-header-8d2c6e0f1a";
const LIMITED: &str = "sk-secret-limited-3b7d5f9e1c";
const DISABLED: &str = "sk-secret-disabled-6a0c2e4f8b";
const EXPIRED: &str = "sk-secret-expired-1d3f5b7a9c";
const OFFICE: &str = "sk-secret-office-9e8d7c6b5a";
const USER_KEY: &str = "sk-secret-user-2a4c6e8b0d";
const UNKNOWN: &str = "sk-secret-unknown-5c7e9a1b3d";
const FILE_KEY: &str = "sk-secret-file-7f6e5d4c3b";
const BAD_FILE_KEY: &str = "sk-secret-badfile-0a9b8c7d6e";
const FAILING: &str = "sk-secret-failing-4e3d2c1b0a";
const PROVIDER: &str = "sk-secret-provider-1f2e3d4c5b";

const SECRETS: &[&str] = &[
    GOOD,
    HEADER_KEY,
    LIMITED,
    DISABLED,
    EXPIRED,
    OFFICE,
    USER_KEY,
    UNKNOWN,
    FILE_KEY,
    BAD_FILE_KEY,
    FAILING,
    PROVIDER,
];

/// Everything collected, to be searched at the end.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<(String, String)>>>);

impl Collected {
    fn add(&self, what: impl Into<String>, text: impl Into<String>) {
        self.0.lock().unwrap().push((what.into(), text.into()));
    }

    fn debug(&self, what: &str, value: &impl std::fmt::Debug) {
        self.add(format!("{what} (Debug)"), format!("{value:?}"));
        self.add(format!("{what} (Debug, alternate)"), format!("{value:#?}"));
    }

    fn display(&self, what: &str, value: &impl std::fmt::Display) {
        self.add(format!("{what} (Display)"), value.to_string());
    }
}

/// A `Write` into a shared buffer (the JSON Lines sink's file, the tracing output).
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

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The keys, by secret.
fn keys() -> MemoryKeyStore {
    let mut images = FeatureSet::empty();
    images.insert_name("images").unwrap();
    MemoryKeyStore::new()
        .with_key(GOOD, ApiKey::new("good").label("team", "search"))
        .with_key(HEADER_KEY, ApiKey::new("header"))
        .with_key(
            LIMITED,
            ApiKey::new("limited")
                .model_limits(["gpt-4o-mini"])
                .blocked_features(images)
                .max_prompt_tokens(20),
        )
        .with_key(DISABLED, ApiKey::new("disabled").disabled(true))
        .with_key(
            EXPIRED,
            ApiKey::new("expired").expires_at(SystemTime::now() - Duration::from_secs(1)),
        )
        .with_key(
            OFFICE,
            ApiKey::new("office").allow_ips(["10.0.0.0/8".parse().unwrap()]),
        )
        .with_key(USER_KEY, ApiKey::new("needs-user").require_user(true))
}

/// A store that fails for one key, hangs for another, panics for a third, and otherwise asks
/// `inner`.
struct Faulty<S> {
    inner: S,
}

impl<S: KeyStore> KeyStore for Faulty<S> {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        if *digest == KeyDigest::of(FAILING) {
            return Box::pin(async { Err(StoreError::new("connection refused by the key db")) });
        }
        if *digest == KeyDigest::of(BAD_FILE_KEY) {
            return Box::pin(std::future::pending());
        }
        if *digest == KeyDigest::of(UNKNOWN) {
            // A careless store's panic message with the key in it: it must go nowhere the crate
            // writes to (the process's panic hook prints it, which is not the crate's doing).
            panic!("store bug looking up {UNKNOWN}");
        }
        self.inner.lookup(digest)
    }
}

/// The inner service: "forwards" with the provider key (it checks that no virtual key reached
/// it), and answers as an upstream does: JSON with usage, or a stream with its usage chunk.
fn upstream(
    seen: Collected,
) -> impl tower::Service<
    Request<PolicyBody>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |req: Request<PolicyBody>| {
        let seen = seen.clone();
        async move {
            let (mut parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            seen.debug("request head as the inner service saw it", &parts);
            // The body goes upstream as the client sent it (a key the client quotes in its
            // prompt included, by design): it is not searched.
            if let Some(view) = parts.extensions.get::<LlmRequest>() {
                seen.debug("LlmRequest", view);
            }
            if let Some(handle) = parts.extensions.get::<AuditHandle>() {
                seen.debug("AuditHandle", handle);
            }
            if let Some(key) = parts.extensions.get::<Arc<ApiKey>>() {
                seen.debug("ApiKey from the extensions", key);
            }
            // What a forwarding client does; the header is the provider's, for upstream only.
            let mut authorization: http::HeaderValue =
                format!("Bearer {PROVIDER}").parse().unwrap();
            authorization.set_sensitive(true);
            parts.headers.insert("authorization", authorization);
            let stream = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["stream"].as_bool())
                .unwrap_or(false);
            let (content_type, text) = if stream {
                (
                    "text/event-stream",
                    concat!(
                        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n",
                        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1,\"total_tokens\":4}}\n\n",
                        "data: [DONE]\n\n"
                    )
                    .to_owned(),
                )
            } else if parts.uri.path().ends_with("/models") {
                ("application/json", common::MODEL_LIST.to_owned())
            } else {
                (
                    "application/json",
                    r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#.to_owned(),
                )
            };
            Ok(Response::builder()
                .header("content-type", content_type)
                .body(text)
                .unwrap())
        }
    })
}

fn chat(model: &str, text: &str) -> String {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]}).to_string()
}

fn streamed(model: &str) -> String {
    serde_json::json!({
        "model": model, "stream": true,
        "messages": [{"role": "user", "content": "hello"}],
    })
    .to_string()
}

/// One request of the run: method, path, key headers, body.
struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: String,
    expect: StatusCode,
}

fn bearer(key: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {key}"))]
}

fn cases() -> Vec<Case> {
    let case = |name, path, headers, body: String, expect| Case {
        name,
        method: "POST",
        path,
        headers,
        body,
        expect,
    };
    let chat_path = "/v1/chat/completions";
    vec![
        case(
            "allowed",
            chat_path,
            bearer(GOOD),
            chat("gpt-4o", "hello"),
            StatusCode::OK,
        ),
        case(
            "allowed, key in api-key and x-api-key",
            chat_path,
            vec![
                ("api-key", HEADER_KEY.into()),
                ("x-api-key", HEADER_KEY.into()),
            ],
            chat("gpt-4o", "hello"),
            StatusCode::OK,
        ),
        case(
            "streamed",
            chat_path,
            bearer(GOOD),
            streamed("gpt-4o"),
            StatusCode::OK,
        ),
        case(
            "streamed, limited key",
            chat_path,
            bearer(LIMITED),
            streamed("gpt-4o-mini"),
            StatusCode::OK,
        ),
        case(
            "the prompt quotes a key (content logged, redacted)",
            chat_path,
            bearer(GOOD),
            chat(
                "gpt-4o",
                &format!("my key is {GOOD} and the provider's {PROVIDER}"),
            ),
            StatusCode::OK,
        ),
        case(
            "file store key",
            chat_path,
            bearer(FILE_KEY),
            chat("gpt-4o", "hi"),
            StatusCode::OK,
        ),
        case(
            "missing key",
            chat_path,
            vec![],
            chat("gpt-4o", "hi"),
            StatusCode::UNAUTHORIZED,
        ),
        case(
            "unknown key (the store panics)",
            chat_path,
            bearer(UNKNOWN),
            chat("gpt-4o", "hi"),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        case(
            "unknown key",
            chat_path,
            bearer("sk-secret-nobody-0f0e0d0c0b"),
            chat("gpt-4o", "hi"),
            StatusCode::UNAUTHORIZED,
        ),
        case(
            "two different keys",
            chat_path,
            vec![
                ("authorization", format!("Bearer {GOOD}")),
                ("x-api-key", HEADER_KEY.into()),
            ],
            chat("gpt-4o", "hi"),
            StatusCode::UNAUTHORIZED,
        ),
        case(
            "not bearer",
            chat_path,
            vec![("authorization", format!("Basic {GOOD}"))],
            chat("gpt-4o", "hi"),
            StatusCode::UNAUTHORIZED,
        ),
        case(
            "disabled key",
            chat_path,
            bearer(DISABLED),
            chat("gpt-4o", "hi"),
            StatusCode::UNAUTHORIZED,
        ),
        case(
            "expired key",
            chat_path,
            bearer(EXPIRED),
            chat("gpt-4o", "hi"),
            StatusCode::UNAUTHORIZED,
        ),
        case(
            "address not allowed",
            chat_path,
            bearer(OFFICE),
            chat("gpt-4o", "hi"),
            StatusCode::FORBIDDEN,
        ),
        case(
            "store error",
            chat_path,
            bearer(FAILING),
            chat("gpt-4o", "hi"),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        case(
            "store timeout",
            chat_path,
            bearer(BAD_FILE_KEY),
            chat("gpt-4o", "hi"),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        case(
            "model not allowed",
            chat_path,
            bearer(LIMITED),
            chat("gpt-4o", "hi"),
            StatusCode::FORBIDDEN,
        ),
        case(
            "feature blocked",
            "/v1/images/generations",
            bearer(LIMITED),
            r#"{"model":"dall-e-3","prompt":"a cat"}"#.into(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        case(
            "prompt too long",
            chat_path,
            bearer(LIMITED),
            chat("gpt-4o-mini", &"many words here ".repeat(50)),
            StatusCode::BAD_REQUEST,
        ),
        case(
            "user required",
            chat_path,
            bearer(USER_KEY),
            chat("gpt-4o", "hi"),
            StatusCode::BAD_REQUEST,
        ),
        case(
            "bad JSON",
            chat_path,
            bearer(GOOD),
            format!("{{\"model\": \"gpt-4o\", {GOOD}"),
            StatusCode::BAD_REQUEST,
        ),
        case(
            "body too large",
            chat_path,
            bearer(GOOD),
            chat("gpt-4o", &"x".repeat(8 * 1024)),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        Case {
            name: "model list",
            method: "GET",
            path: "/v1/models",
            headers: bearer(LIMITED),
            body: String::new(),
            expect: StatusCode::OK,
        },
    ]
}

#[tokio::test]
async fn no_secret_is_shown_anywhere() {
    let seen = Collected::default();

    // Tracing at TRACE level into a buffer (this test's thread: the runtime is current-thread).
    let tracing_out = Buffer::default();
    let writer = tracing_out.clone();
    let _tracing = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_writer(move || writer.clone())
        .set_default();

    // A file store holding one key, and a key file whose syntax error sits on a secret's line.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    std::fs::write(
        &path,
        format!("[[keys]]\nname = \"file\"\nsecret = \"{FILE_KEY}\"\n"),
    )
    .unwrap();
    let file_store = FileKeyStore::open(&path)
        .unwrap()
        .check_interval(std::time::Duration::ZERO);
    seen.debug("FileKeyStore", &file_store);
    let bad = dir.path().join("bad.toml");
    for text in [
        format!("[[keys]]\nname = \"bad\"\nsecret = \"{BAD_FILE_KEY}\" oops\n"),
        format!("[[keys]]\nname = \"bad\"\nsecret = \"{BAD_FILE_KEY}\n"),
        format!("[[keys]]\nname = \"bad\"\nsecrte = \"{BAD_FILE_KEY}\"\n"),
        format!("[[keys]]\nname = \"bad\"\nsecret = \"{BAD_FILE_KEY}\"\nsecret = \"{BAD_FILE_KEY}\"\n"),
        format!("[[keys]]\nname = \"bad\"\nsecret = \"{BAD_FILE_KEY}\"\nmax_n = \"{BAD_FILE_KEY}\"\n"),
        format!("[[keys]]\nname = \"a\"\nsecret = \"{BAD_FILE_KEY}\"\n[[keys]]\nname = \"b\"\nsecret = \"{BAD_FILE_KEY}\"\n"),
        format!("[[keys]]\nname = \"bad\"\nsecret = \"{BAD_FILE_KEY}\"\nsecret_sha256 = \"{}\"\n", KeyDigest::of(BAD_FILE_KEY).to_hex()),
    ] {
        std::fs::write(&bad, &text).unwrap();
        let error = FileKeyStore::open(&bad).expect_err("an invalid key file");
        seen.debug("KeyFileError", &error);
        seen.display("KeyFileError", &error);
    }
    let bad_json = dir.path().join("bad.json");
    for text in [
        format!(
            r#"{{"keys":[{{"name":"bad","secret":"{BAD_FILE_KEY}","max_n":"{BAD_FILE_KEY}"}}]}}"#
        ),
        format!(r#"{{"keys":[{{"name":"bad","secret":"{BAD_FILE_KEY}}}]}}"#),
        format!(r#"{{"keys":[{{"name":"bad","secrte":"{BAD_FILE_KEY}"}}]}}"#),
    ] {
        std::fs::write(&bad_json, &text).unwrap();
        let error = FileKeyStore::open(&bad_json).expect_err("an invalid key file");
        seen.debug("KeyFileError (JSON)", &error);
        seen.display("KeyFileError (JSON)", &error);
    }
    // A good store whose file turns bad: the error is kept and shown by `last_error`.
    let reloading = FileKeyStore::open(&path)
        .unwrap()
        .check_interval(std::time::Duration::ZERO);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(
        &path,
        format!("[[keys]]\nname = \"file\"\nsecret = \"{FILE_KEY}\" oops\n"),
    )
    .unwrap();
    reloading.refresh();
    let last = reloading.last_error().expect("the reload failed");
    seen.add("FileKeyStore::last_error", last);
    seen.debug("FileKeyStore", &reloading);
    std::fs::write(
        &path,
        format!("[[keys]]\nname = \"file\"\nsecret = \"{FILE_KEY}\"\n"),
    )
    .unwrap();

    // Keys and digests.
    let configured: ApiKey =
        serde_json::from_str(&format!(r#"{{"name":"cfg","secret":"{GOOD}"}}"#)).unwrap();
    seen.debug("ApiKey with its credential still in", &configured);
    seen.add(
        "ApiKey with its credential still in (JSON)",
        serde_json::to_string(&configured).unwrap(),
    );
    let mut both: ApiKey = serde_json::from_str(&format!(
        r#"{{"name":"both","secret":"{GOOD}","secret_sha256":"{}"}}"#,
        KeyDigest::of(GOOD).to_hex()
    ))
    .unwrap();
    let error = both.take_credential().expect_err("two credentials");
    seen.debug("CredentialError", &error);
    seen.display("CredentialError", &error);
    for secret in SECRETS {
        let digest = KeyDigest::of(secret);
        seen.debug("KeyDigest", &digest);
        seen.display("KeyDigest", &digest);
    }
    let store_error = StoreError::new("connection refused by the key db");
    seen.debug("StoreError", &store_error);
    seen.display("StoreError", &store_error);

    // The stack.
    let memory = keys();
    seen.debug("MemoryKeyStore", &memory);
    let memory = Arc::new(memory);
    let store: Arc<dyn KeyStore> = Arc::new(Faulty {
        inner: Combined {
            memory: memory.clone(),
            file: file_store,
        },
    });
    let records = MemorySink::new();
    let jsonl_out = Buffer::default();
    let jsonl = JsonlSink::from_writer(jsonl_out.clone()).unwrap();
    let sinks = FanOut::new()
        // A careless sink that panics, its message quoting a key, for one key's records.
        .with(FnSink::new(|record: &AuditRecord| {
            if record.key.as_deref() == Some("header") {
                panic!("sink bug for {HEADER_KEY}");
            }
        }))
        .with(records.clone())
        .with(jsonl.clone())
        .with(tower_llm_policy::audit::TracingSink::new());
    seen.debug("FanOut", &sinks);
    seen.debug("JsonlSink", &jsonl);
    seen.debug("MemorySink (before)", &records);
    let policy = Policy::new().body_options(BodyOptions {
        limit: 4 * 1024,
        ..BodyOptions::default()
    });
    seen.debug("Policy", &policy);
    let audit = AuditLayer::new(sinks)
        .policy(policy.clone())
        .log_content(true);
    let key_auth = KeyAuthLayer::new(store).lookup_timeout(Duration::from_millis(100));
    let counter = audit.clone();
    seen.debug("AuditLayer", &audit);
    seen.debug("KeyAuthLayer", &key_auth);
    let layers = ServiceBuilder::new()
        .layer(audit)
        .layer(BodyLimitLayer::new().policy(policy.clone()))
        .layer(key_auth)
        .layer(FeatureBlockLayer::new().policy(policy.clone()))
        .layer(ModelAllowListLayer::new().policy(policy.clone()))
        .layer(PromptLimitLayer::new().policy(policy.clone()));
    // The stack's services, over an inner service that is `Debug`.
    #[derive(Debug)]
    struct Inner;
    seen.debug("the whole stack", &layers.clone().service(Inner));
    let svc = layers.service(upstream(seen.clone()));

    for case in cases() {
        let mut req = Request::builder().method(case.method).uri(case.path);
        for (name, value) in &case.headers {
            req = req.header(*name, value);
        }
        let req = req
            .header("content-type", "application/json")
            .extension(ClientIp(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))))
            .body(case.body.clone())
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), svc.clone().oneshot(req))
            .await
            .expect("answered in time")
            .unwrap();
        let (parts, body) = response.into_parts();
        assert_eq!(parts.status, case.expect, "{}", case.name);
        seen.debug(&format!("{}: response head", case.name), &parts);
        if let Some(rejection) = parts.extensions.get::<Rejection>() {
            seen.debug(&format!("{}: Rejection", case.name), rejection);
        }
        let body: Bytes = body.collect().await.unwrap().to_bytes();
        seen.add(
            format!("{}: response body", case.name),
            String::from_utf8_lossy(&body),
        );
        // The error, as the crate's type.
        if !parts.status.is_success() {
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(json["error"]["code"].is_string(), "{}: {json}", case.name);
        }
    }
    for error in [
        tower_llm_policy::PolicyError::InvalidKey,
        tower_llm_policy::PolicyError::PolicyUnavailable,
    ] {
        seen.debug("PolicyError", &error);
        seen.display("PolicyError", &error);
        seen.add(
            "PolicyError JSON",
            String::from_utf8_lossy(&error.to_json()),
        );
    }

    // Every record, as the sinks have it.
    let jsonl_flushed = tokio::task::spawn_blocking({
        let jsonl = jsonl.clone();
        move || jsonl.flush()
    });
    jsonl_flushed.await.unwrap().unwrap();
    assert_eq!(counter.sink_panics(), 1, "the careless sink panicked once");
    seen.debug("AuditLayer (after)", &counter);
    let all = records.records();
    assert_eq!(all.len(), cases().len(), "one record per request");
    for record in &all {
        seen.debug("AuditRecord", record);
        seen.add("AuditRecord (JSON)", serde_json::to_string(record).unwrap());
    }
    // The prompt that quoted the keys was logged, redacted.
    let quoted = all
        .iter()
        .filter_map(|r| r.content.as_ref()?.prompt.as_deref())
        .find(|p| p.contains("my key is"))
        .expect("the quoting prompt is logged");
    assert!(quoted.contains("sk-[redacted]"), "{quoted}");
    seen.debug("MemorySink (after)", &records);
    seen.add("JSON Lines", jsonl_out.text());
    seen.debug("JsonlSink (after)", &jsonl);
    let tracing_text = tracing_out.text();
    assert!(
        tracing_text.contains("llm request"),
        "the tracing sink's events were captured"
    );
    assert!(
        tracing_text.contains("key store panicked"),
        "KeyAuth's store events were captured"
    );
    assert!(
        tracing_text.contains("audit sink panicked"),
        "the audit layer's sink panic event was captured"
    );
    seen.add("tracing output", tracing_text);

    // The search.
    let collected = seen.0.lock().unwrap();
    assert!(collected.len() > 100, "{} items", collected.len());
    let mut hits = Vec::new();
    for (what, text) in collected.iter() {
        for secret in SECRETS {
            let digest = KeyDigest::of(secret).to_hex();
            if text.contains(secret) || text.contains(&digest) {
                hits.push(format!("{what} shows {secret}: {text}"));
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

/// The memory store, then the file store.
struct Combined {
    memory: Arc<MemoryKeyStore>,
    file: FileKeyStore,
}

impl KeyStore for Combined {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        Box::pin(async move {
            match self.memory.lookup(digest).await? {
                Some(key) => Ok(Some(key)),
                None => self.file.lookup(digest).await,
            }
        })
    }
}
