//! A short soak (a few seconds): the proxy in-process in front of the mock, many connections
//! of allowed, blocked and streamed requests; no unexpected error, and every request audited
//! exactly once. The full soak (processes, 5 minutes) is `examples/proxy/soak/run.sh`.

use std::time::Duration;

use example_proxy::soak::{self, LoadOptions};
use example_proxy::{app, mock};
use tokio::sync::oneshot;

const KEY: &str = "sk-soak-test-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_has_no_unexpected_error_and_audits_every_request_once() {
    let (mock_addr, _) = mock::spawn(mock::MockOptions::default().record(false))
        .await
        .expect("mock starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let audit = dir.path().join("audit.jsonl");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
[upstream]
base_url = "http://{mock_addr}/v1"
[server]
shutdown_grace = "10s"
[audit]
jsonl = "{audit}"
[[keys]]
name = "soak"
secret = "{KEY}"
model_limits_enabled = true
model_limits = ["gpt-4o-mini", "gpt-4o"]
blocked_features = ["images"]
"#,
            audit = audit.display()
        ),
    )
    .expect("config written");
    let args = app::Args {
        config: Some(config),
        listen: None,
        no_policy: false,
        migrate: false,
    };
    let proxy = app::Proxy::prepare(&args, |_| None)
        .await
        .expect("proxy starts");
    let addr = proxy.addr;
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(proxy.run(async {
        let _ = rx.await;
    }));

    let report = soak::load(LoadOptions {
        proxy: addr,
        key: KEY.to_owned(),
        connections: 50,
        duration: Duration::from_secs(4),
    })
    .await;
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the proxy stops")
        .expect("no panic")
        .expect("served");

    assert_eq!(report.unexpected, 0, "{report}");
    assert!(report.requests > 100, "{report}");
    for kind in ["Allowed", "BlockedModel", "BlockedFeature", "Streamed"] {
        assert!(
            report.ok.get(kind).copied().unwrap_or(0) > 0,
            "no {kind}: {report}"
        );
    }
    let jsonl = std::fs::read_to_string(&audit).expect("the audit log");
    let check = soak::check_audit(&report.ids, &jsonl);
    assert!(check.exactly_once(), "{check}");
    assert_eq!(check.records, report.requests, "{check}");
    assert!(!jsonl.contains(KEY));
}
