//! `[state] redis_url` and `[[teams]]`: two proxies (replicas) sharing one real
//! `redis-server`, which the test starts on a free loopback port (`.ci/run` installs it;
//! without it these tests fail). A key's requests per minute hold across both replicas, a
//! team's spend cap across both, and a Redis that is down refuses limited keys with 503
//! `policy_unavailable` while the proxy stays up.

#[path = "../../../tests/common/redis.rs"]
mod redis_server;

use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use example_proxy::config::Config;
use example_proxy::{app, mock};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use mock::{MockLog, MockOptions};
use redis_server::RedisServer;
use serde_json::Value;
use tower_llm_policy::quota::{team_account, BudgetPeriod, RedisOptions, RedisStore, SpendLedger};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const RPM_KEY: &str = "sk-three-a-minute-test-key";
const TEAM_KEY_A: &str = "sk-research-a-test-key";
const TEAM_KEY_B: &str = "sk-research-b-test-key";
const PLAIN_KEY: &str = "sk-unlimited-test-key";

fn config_text(base: &str, audit: &Path, redis_url: &str) -> String {
    format!(
        r#"listen = "127.0.0.1:0"

[upstream]
base_url = "{base}"

[audit]
jsonl = "{audit}"

[state]
redis_url = "{redis_url}"
redis_timeout = "300ms"

[[teams]]
name = "research"
credit_limit_usd = 0.05
budget_period = "monthly"

[[keys]]
name = "three-a-minute"
secret = "{RPM_KEY}"
rpm = 3

[[keys]]
name = "research-a"
secret = "{TEAM_KEY_A}"
team = "research"

[[keys]]
name = "research-b"
secret = "{TEAM_KEY_B}"
team = "research"
credit_limit_usd = 100.0

[[keys]]
name = "unlimited"
secret = "{PLAIN_KEY}"
"#,
        audit = audit.display()
    )
}

struct Replica {
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

/// A proxy on `redis_url`, in front of the mock at `mock_addr`.
async fn replica(mock_addr: std::net::SocketAddr, redis_url: &str) -> Replica {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("proxy.toml");
    let text = config_text(
        &format!("http://{mock_addr}/v1"),
        &dir.path().join("audit.jsonl"),
        redis_url,
    );
    std::fs::write(&config_path, text).expect("config written");
    let args = app::Args {
        config: Some(config_path),
        listen: None,
        no_policy: false,
        migrate: false,
    };
    let proxy = app::Proxy::prepare(&args, |_| None)
        .await
        .expect("proxy starts");
    let addr = proxy.addr;
    tokio::spawn(proxy.run(std::future::pending()));
    Replica { addr, _dir: dir }
}

async fn mock_upstream() -> (std::net::SocketAddr, MockLog) {
    mock::spawn(MockOptions::default())
        .await
        .expect("mock starts")
}

async fn chat(
    addr: std::net::SocketAddr,
    key: &str,
    max_tokens: u32,
) -> Result<(StatusCode, http::HeaderMap, Value), Box<dyn std::error::Error + Send + Sync>> {
    chat_words(addr, key, max_tokens, 1).await
}

/// A chat request whose prompt is `words` words (the mock counts a token a word).
async fn chat_words(
    addr: std::net::SocketAddr,
    key: &str,
    max_tokens: u32,
    words: usize,
) -> Result<(StatusCode, http::HeaderMap, Value), Box<dyn std::error::Error + Send + Sync>> {
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let prompt = "hi ".repeat(words);
    let body = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    let response = http
        .request(
            Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))?,
        )
        .await?;
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_hold_across_two_replicas() -> TestResult {
    let redis = RedisServer::start();
    let (mock_addr, log) = mock_upstream().await;
    let a = replica(mock_addr, &redis.url()).await;
    let b = replica(mock_addr, &redis.url()).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        tasks.push(tokio::spawn(async move { chat(addr, RPM_KEY, 5).await }));
    }
    let mut ok = 0;
    for task in tasks {
        let (status, headers, body) = task.await??;
        assert_eq!(headers["x-ratelimit-limit-requests"], "3");
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(body["error"]["code"], "rate_limit_exceeded");
                assert!(headers.contains_key("retry-after"));
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // One comes back every 20 s: the whole race is far shorter.
    assert_eq!(ok, 3);
    assert_eq!(log.len(), 3, "refused requests never reached the upstream");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_cap_holds_across_two_replicas_and_its_spend_is_in_redis() -> TestResult {
    let redis = RedisServer::start();
    let (mock_addr, log) = mock_upstream().await;
    let a = replica(mock_addr, &redis.url()).await;
    let b = replica(mock_addr, &redis.url()).await;
    // gpt-4o-mini at $0.15 per million prompt tokens: a prompt of 20,000 words costs
    // $0.003, so the $0.05 team cap fits about a dozen; both keys, both replicas draw on it.
    let mut refused = 0;
    let mut ok = 0;
    for round in 0..100 {
        let addr = if round % 2 == 0 { a.addr } else { b.addr };
        let key = if round % 3 == 0 {
            TEAM_KEY_A
        } else {
            TEAM_KEY_B
        };
        let (status, _, body) = chat_words(addr, key, 100, 20_000).await?;
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(body["error"]["code"], "insufficient_quota");
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(message.contains("team `research`"), "{message}");
                refused += 1;
                if refused == 5 {
                    break;
                }
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(ok > 0 && refused == 5, "{ok} passed, {refused} refused");
    assert_eq!(log.len(), ok, "refused requests never reached the upstream");
    // A key outside the team is not held back by it.
    assert_eq!(chat(a.addr, PLAIN_KEY, 2000).await?.0, StatusCode::OK);

    // The team's spend, read from the same Redis: within its cap, nothing left held once
    // the replicas' settlements have landed.
    let store = RedisStore::open_with(&redis.url(), RedisOptions::new())?;
    let ledger = store.ledger();
    let deadline = Instant::now() + Duration::from_secs(10);
    let spend = loop {
        let spend = ledger
            .spent(&team_account("research"), BudgetPeriod::Monthly)
            .await?;
        if spend.reserved_usd == 0.0 || Instant::now() > deadline {
            break spend;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(spend.reserved_usd, 0.0);
    assert!(
        spend.spent_usd > 0.0 && spend.spent_usd <= 0.05,
        "{spend:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_redis_that_is_down_refuses_limited_keys_with_503_and_the_proxy_stays_up() -> TestResult {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let (mock_addr, log) = mock_upstream().await;
    let proxy = replica(mock_addr, &format!("redis://127.0.0.1:{port}/")).await;
    let started = Instant::now();
    for key in [RPM_KEY, TEAM_KEY_A] {
        let (status, _, body) = chat(proxy.addr, key, 5).await?;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "policy_unavailable");
        let message = body.to_string();
        assert!(!message.contains(&port.to_string()), "{message}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // A key without limits does not need the state.
    assert_eq!(chat(proxy.addr, PLAIN_KEY, 5).await?.0, StatusCode::OK);
    assert_eq!(log.len(), 1);
    Ok(())
}

#[test]
fn the_state_table_is_checked_and_its_password_never_shown() {
    let parse = |state: &str| {
        Config::parse(
            Path::new("proxy.toml"),
            &format!("[upstream]\nbase_url = \"http://127.0.0.1:1/v1\"\n{state}"),
        )
    };
    let config = parse("[state]\nredis_url = \"redis://:hunter2@10.0.0.5:6379/0\"\n").unwrap();
    let shown = format!("{config:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("10.0.0.5:6379"), "{shown}");
    let err = parse("[state]\nredis_url = \"http://:hunter2@10.0.0.5\"\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("redis://"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    assert!(parse("[state]\nredis_timeout = \"0s\"\n").is_err());
    assert!(parse("[state]\nredis_urll = \"redis://x\"\n").is_err());
    // Teams: named once each, a cap of dollars; no key may take a team's account name.
    assert!(parse("[[teams]]\nname = \"a\"\ncredit_limit_usd = 1.0\n[[teams]]\nname = \"a\"\ncredit_limit_usd = 2.0\n").is_err());
    assert!(parse("[[teams]]\nname = \"a\"\ncredit_limit_usd = -1.0\n").is_err());
    assert!(
        parse("[[keys]]\nname = \"team:a\"\nsecret = \"sk-x-test-key-long-enough\"\n").is_err()
    );
    let ok = parse("[[teams]]\nname = \"a\"\ncredit_limit_usd = 1.5\nbudget_period = \"daily\"\n")
        .unwrap();
    assert_eq!(ok.teams[0].budget_period, BudgetPeriod::Daily);
}
