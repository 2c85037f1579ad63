//! Spend caps and rate limits through the proxy: `[[keys]]` with `credit_limit_usd`,
//! `budget_period`, `rpm`; a real OpenAI client in front, the mock upstream behind.

use std::path::Path;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use async_openai::Client;
use bytes::Bytes;
use example_proxy::{app, mock};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use mock::{MockLog, MockOptions};
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const PROVIDER_ENV: &str = "TEST_QUOTA_PROVIDER_KEY";
const CAPPED_KEY: &str = "sk-capped-test-key";
const SLOW_KEY: &str = "sk-one-a-minute-test-key";

fn config_text(base: &str, audit: &Path) -> String {
    format!(
        r#"listen = "127.0.0.1:0"

[upstream]
base_url = "{base}"
api_key_env = "{PROVIDER_ENV}"

[audit]
jsonl = "{audit}"

[[keys]]
name = "capped"
secret = "{CAPPED_KEY}"
# A tenth of a cent a month: a request that may write 4096 tokens of gpt-4o-mini does not fit.
credit_limit_usd = 0.001
budget_period = "monthly"

[[keys]]
name = "one-a-minute"
secret = "{SLOW_KEY}"
rpm = 1
"#,
        audit = audit.display()
    )
}

struct Proxy {
    addr: std::net::SocketAddr,
    log: MockLog,
    _dir: tempfile::TempDir,
}

async fn start() -> Proxy {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (mock_addr, log) = mock::spawn(MockOptions::default())
        .await
        .expect("mock starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("proxy.toml");
    let text = config_text(
        &format!("http://{mock_addr}/v1"),
        &dir.path().join("audit.jsonl"),
    );
    std::fs::write(&config_path, text).expect("config written");
    let args = app::Args {
        config: Some(config_path),
        listen: None,
        no_policy: false,
        migrate: false,
    };
    let env = |name: &str| (name == PROVIDER_ENV).then(|| "sk-provider".to_owned());
    let proxy = app::Proxy::prepare(&args, env).await.expect("proxy starts");
    let addr = proxy.addr;
    tokio::spawn(proxy.run(std::future::pending()));
    Proxy {
        addr,
        log,
        _dir: dir,
    }
}

fn chat(max_tokens: Option<u32>) -> CreateChatCompletionRequest {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model("gpt-4o-mini")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("hello")
            .build()
            .unwrap()
            .into()]);
    if let Some(max) = max_tokens {
        args.max_completion_tokens(max);
    }
    args.build().unwrap()
}

#[tokio::test]
async fn a_capped_key_gets_insufficient_quota_through_the_openai_client() -> TestResult {
    let p = start().await;
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("http://{}/v1", p.addr))
            .with_api_key(CAPPED_KEY),
    );
    // No output limit: 4096 tokens assumed, more than the cap allows.
    match client.chat().create(chat(None)).await {
        Err(OpenAIError::ApiError(e)) => {
            assert_eq!(e.status_code.as_u16(), 429);
            assert_eq!(e.api_error.code.as_deref(), Some("insufficient_quota"));
            assert_eq!(e.api_error.r#type.as_deref(), Some("insufficient_quota"));
        }
        other => panic!("expected insufficient_quota, got {other:?}"),
    }
    assert!(p.log.is_empty(), "a refused request reached the upstream");
    // A small request fits.
    let ok = client.chat().create(chat(Some(50))).await?;
    assert!(ok.usage.is_some());
    assert_eq!(p.log.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_key_over_its_requests_per_minute_gets_429_with_the_headers() -> TestResult {
    let p = start().await;
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = || {
        Request::post(format!("http://{}/v1/chat/completions", p.addr))
            .header("authorization", format!("Bearer {SLOW_KEY}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
            )))
            .unwrap()
    };
    let first = http.request(request()).await?;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["x-ratelimit-limit-requests"], "1");
    assert_eq!(first.headers()["x-ratelimit-remaining-requests"], "0");
    first.into_body().collect().await?;

    let second = http.request(request()).await?;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = second.headers()["retry-after"].to_str()?.parse()?;
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(second.headers()["x-ratelimit-remaining-requests"], "0");
    let body: Value = serde_json::from_slice(&second.into_body().collect().await?.to_bytes())?;
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        p.log.len(),
        1,
        "the refused request never reached the upstream"
    );
    Ok(())
}
