//! `[metrics]`: the proxy, in-process in front of the mock upstream, serves its Prometheus page
//! after a mix of allowed and rejected requests, with the values they should give; the page
//! wants its token on the API's listener, and can have a listener of its own.
//!
//! The Prometheus recorder is global to the process: the tests here share it, so each uses
//! key names of its own and checks the series of those keys, or the change of a shared series
//! across its own requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use example_proxy::{app, mock};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const PROVIDER_ENV: &str = "TEST_METRICS_PROVIDER_KEY";
const TOKEN_ENV: &str = "TEST_METRICS_TOKEN";
const TOKEN: &str = "scrape-token-1234";

#[derive(Debug)]
struct Proxy {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

/// The proxy with `[metrics]` set to `metrics`, two keys (`<prefix>-app` for gpt-4o-mini,
/// `<prefix>-images` that may not use images) and an audit log.
async fn start(prefix: &str, metrics: &str) -> Result<Proxy, app::StartError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (mock_addr, _log) = mock::spawn(mock::MockOptions::default())
        .await
        .expect("mock starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("proxy.toml");
    let text = format!(
        r#"listen = "127.0.0.1:0"

[upstream]
base_url = "http://{mock_addr}/v1"
api_key_env = "{PROVIDER_ENV}"

[audit]
jsonl = "{audit}"

{metrics}

[[keys]]
name = "{prefix}-app"
secret = "sk-{prefix}-app-secret"
model_limits_enabled = true
model_limits = ["gpt-4o-mini"]
"#,
        audit = dir.path().join("audit.jsonl").display(),
    );
    std::fs::write(&config_path, text).expect("config written");
    let args = app::Args {
        config: Some(config_path),
        listen: None,
        no_policy: false,
        migrate: false,
    };
    let env = |name: &str| match name {
        PROVIDER_ENV => Some("sk-provider".to_owned()),
        TOKEN_ENV => Some(TOKEN.to_owned()),
        _ => None,
    };
    let proxy = app::Proxy::prepare(&args, env).await?;
    let addr = proxy.addr;
    let metrics_addr = proxy.metrics_addr();
    tokio::spawn(proxy.run(std::future::pending()));
    Ok(Proxy {
        addr,
        metrics_addr,
        _dir: dir,
    })
}

type Client = HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// The recorder is global to the process: tests that send requests through a proxy with
/// metrics run one at a time, so that one test's counts are not another's.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn client() -> Client {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

/// A chat completion with `key` for `model`: its status.
async fn chat(client: &Client, addr: SocketAddr, key: &str, model: &str) -> StatusCode {
    let body =
        format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hello there"}}]}}"#);
    let req = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let res = client.request(req).await.expect("proxy answers");
    let status = res.status();
    // The record (and so the metrics) come when the body ends.
    res.into_body().collect().await.expect("body");
    status
}

/// `GET <path>` with an optional bearer token: the status and the body.
async fn get(client: &Client, url: String, token: Option<&str>) -> (StatusCode, String) {
    let mut req = Request::get(url);
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let res = client
        .request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .expect("proxy answers");
    let status = res.status();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8(body.to_vec()).expect("text"))
}

/// One sample of the Prometheus text format: its name, labels and value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the Prometheus text format (no escapes in the values this proxy writes).
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("a number: {line}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').expect("labels end with }");
                let mut labels = BTreeMap::new();
                for pair in rest.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
        };
        samples.push((name, labels, value));
    }
    samples
}

/// The sum of the samples of `name` whose labels include `want`.
fn sum(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, value)| value)
        .sum()
}

#[tokio::test]
async fn the_page_counts_a_mix_of_allowed_and_rejected_requests() -> TestResult {
    let _one = ONE_AT_A_TIME.lock().await;
    let metrics = format!("[metrics]\nenabled = true\ntoken_env = \"{TOKEN_ENV}\"\n");
    let p = start("mix", &metrics).await?;
    let client = client();
    let page = format!("http://{}/metrics", p.addr);
    let before = parse(&get(&client, page.clone(), Some(TOKEN)).await.1);

    assert_eq!(
        chat(&client, p.addr, "sk-mix-app-secret", "gpt-4o-mini").await,
        StatusCode::OK
    );
    assert_eq!(
        chat(&client, p.addr, "sk-mix-app-secret", "gpt-4o-mini").await,
        StatusCode::OK
    );
    assert_eq!(
        chat(&client, p.addr, "sk-mix-app-secret", "gpt-4o").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        chat(&client, p.addr, "sk-mix-unknown", "gpt-4o-mini").await,
        StatusCode::UNAUTHORIZED
    );
    // A made-up model name is not a label of its own.
    assert_eq!(
        chat(&client, p.addr, "sk-mix-app-secret", "made-up-model-x7").await,
        StatusCode::FORBIDDEN
    );

    let (status, text) = get(&client, page.clone(), Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    let after = parse(&text);
    let delta =
        |name: &str, want: &[(&str, &str)]| sum(&after, name, want) - sum(&before, name, want);

    let requests = "llm_policy_requests_total";
    let app = ("key", "mix-app");
    assert_eq!(sum(&after, requests, &[app]), 4.0);
    assert_eq!(
        sum(
            &after,
            requests,
            &[
                app,
                ("model", "gpt-4o-mini"),
                ("endpoint", "chat_completions"),
                ("status", "200"),
                ("outcome", "completed")
            ]
        ),
        2.0
    );
    assert_eq!(
        sum(
            &after,
            requests,
            &[
                app,
                ("model", "gpt-4o"),
                ("status", "403"),
                ("outcome", "rejected")
            ]
        ),
        1.0
    );
    assert_eq!(
        sum(
            &after,
            requests,
            &[app, ("model", "other"), ("status", "403")]
        ),
        1.0
    );
    assert!(
        !text.contains("made-up-model-x7"),
        "a client's model name is a label"
    );
    assert_eq!(delta(requests, &[("key", "none"), ("status", "401")]), 1.0);

    let blocked = "llm_policy_blocked_total";
    assert_eq!(
        delta(
            blocked,
            &[("layer", "key_auth"), ("code", "invalid_api_key")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            blocked,
            &[("layer", "model_allow_list"), ("code", "model_not_allowed")]
        ),
        2.0
    );

    let tokens_in = sum(
        &after,
        "llm_policy_tokens_total",
        &[app, ("model", "gpt-4o-mini"), ("direction", "in")],
    );
    let tokens_out = sum(
        &after,
        "llm_policy_tokens_total",
        &[app, ("model", "gpt-4o-mini"), ("direction", "out")],
    );
    assert!(
        tokens_in > 0.0 && tokens_out > 0.0,
        "{tokens_in} {tokens_out}"
    );
    // gpt-4o-mini: $0.15 in, $0.60 out per million tokens.
    let cost = sum(
        &after,
        "llm_policy_cost_microusd_total",
        &[app, ("model", "gpt-4o-mini")],
    );
    let expected = tokens_in * 0.15 + tokens_out * 0.60;
    assert!(
        cost > 0.0 && (cost - expected).abs() <= 1.0,
        "{cost} vs {expected}"
    );

    // Histograms, with the library's buckets: one observation per request.
    let requests_seen = delta("llm_policy_request_duration_seconds_count", &[]);
    assert_eq!(requests_seen, 5.0);
    assert_eq!(
        delta(
            "llm_policy_layers_duration_seconds_count",
            &[("decision", "forwarded")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            "llm_policy_layers_duration_seconds_count",
            &[("decision", "rejected")]
        ),
        3.0
    );
    assert!(
        text.contains(
            "llm_policy_layers_duration_seconds_bucket{decision=\"forwarded\",le=\"0.001\"}"
        ),
        "{text}"
    );
    // The audit log's queue (every record written or queued, none dropped).
    assert_eq!(
        sum(
            &after,
            "llm_policy_audit_dropped_total",
            &[("sink", "jsonl")]
        ),
        0.0
    );
    assert!(
        text.contains("llm_policy_audit_queue_depth{sink=\"jsonl\"}"),
        "{text}"
    );
    // Never a key, nor the provider's.
    assert!(
        !text.contains("sk-mix") && !text.contains("sk-provider"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn on_the_api_listener_the_page_wants_its_token() -> TestResult {
    let _one = ONE_AT_A_TIME.lock().await;
    let metrics = format!(
        "[metrics]\nenabled = true\npath = \"/internal/metrics\"\ntoken_env = \"{TOKEN_ENV}\"\n"
    );
    let p = start("token", &metrics).await?;
    let client = client();
    let page = format!("http://{}/internal/metrics", p.addr);
    assert_eq!(
        get(&client, page.clone(), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&client, page.clone(), Some("wrong")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&client, page.clone(), Some(TOKEN)).await.0,
        StatusCode::OK
    );
    // A scrape is not a request of the API: not counted, not audited.
    let text = get(&client, page, Some(TOKEN)).await.1;
    assert_eq!(
        sum(
            &parse(&text),
            "llm_policy_requests_total",
            &[("key", "token-app")]
        ),
        0.0
    );
    Ok(())
}

#[tokio::test]
async fn without_a_token_the_page_needs_a_listener_of_its_own() -> TestResult {
    let _one = ONE_AT_A_TIME.lock().await;
    match start("open", "[metrics]\nenabled = true\n").await {
        Err(app::StartError::Metrics(message)) => {
            assert!(message.contains("token_env"), "{message}")
        }
        other => panic!("expected a [metrics] error, got {other:?}"),
    }
    // A token variable that is not set is an error too (never an open page).
    match start(
        "unset",
        "[metrics]\nenabled = true\ntoken_env = \"NOT_SET_ANYWHERE\"\n",
    )
    .await
    {
        Err(app::StartError::Metrics(message)) => {
            assert!(message.contains("NOT_SET_ANYWHERE"), "{message}")
        }
        other => panic!("expected a [metrics] error, got {other:?}"),
    }

    let p = start(
        "own",
        "[metrics]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
    )
    .await?;
    let client = client();
    let own = p.metrics_addr.expect("a listener of its own");
    assert_eq!(
        chat(&client, p.addr, "sk-own-app-secret", "gpt-4o-mini").await,
        StatusCode::OK
    );
    let (status, text) = get(&client, format!("http://{own}/metrics"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        sum(
            &parse(&text),
            "llm_policy_requests_total",
            &[("key", "own-app"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        get(&client, format!("http://{own}/other"), None).await.0,
        StatusCode::NOT_FOUND
    );
    // Not on the API's listener: there, /metrics is a path like any other (no key: 401).
    let (status, text) = get(&client, format!("http://{}/metrics", p.addr), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!text.contains("llm_policy_"), "{text}");
    Ok(())
}

#[tokio::test]
async fn off_by_default() -> TestResult {
    let _one = ONE_AT_A_TIME.lock().await;
    let p = start("off", "").await?;
    assert_eq!(p.metrics_addr, None);
    let (status, text) = get(&client(), format!("http://{}/metrics", p.addr), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!text.contains("llm_policy_"), "{text}");
    Ok(())
}
