//! Spend-threshold alerts of the QuotaLayer: each threshold of an account's cap fires once per
//! period, from the settlement that reaches it, with the right numbers; a new period re-arms
//! them; team caps alert as `team:<name>`; refusals at the cap do not repeat them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::alert::{Alert, MemoryAlerts, DEFAULT_SPEND_THRESHOLDS};
use tower_llm_policy::audit::pricing::{ModelPrice, PricingTable};
use tower_llm_policy::quota::{
    team_account, BudgetPeriod, ManualClock, MemoryLedger, MemoryRateLimiter, QuotaLayer,
    SpendLedger,
};
use tower_llm_policy::{ApiKey, PolicyBody};

/// 2026-01-31T12:00:00Z.
const JAN_31_NOON: u64 = 1_769_860_800;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// $1 per token, in and out: a cost in USD is a number of tokens.
fn dollar_per_token() -> PricingTable {
    PricingTable::empty().with("gpt-4o", ModelPrice::new(1e6, 1e6))
}

/// A stack whose upstream reports, as the request's usage, `x-cost` completion tokens (and
/// no prompt tokens): a request settles at `x-cost` dollars.
fn stack(
    layer: QuotaLayer,
) -> impl Service<
    Request<String>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible>>,
    Error = Infallible,
> + Clone {
    ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(|req: Request<PolicyBody>| async move {
            let cost: u64 = req
                .headers()
                .get("x-cost")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let body = format!(
                r#"{{"choices":[],"usage":{{"prompt_tokens":0,"completion_tokens":{cost},"total_tokens":{cost}}}}}"#
            );
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Infallible>(response)
        }))
}

/// Sends a chat request of `key` (a small reservation: its prompt and 1 output token) that
/// settles at `cost` dollars, reads its body to the end (which settles it), and returns its
/// status.
async fn spend<S, B>(svc: &S, key: &Arc<ApiKey>, cost: u64) -> StatusCode
where
    S: Service<Request<String>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes, Error = Infallible>,
{
    let mut req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-cost", cost.to_string())
        .body(
            r#"{"model":"gpt-4o","max_tokens":1,"messages":[{"role":"user","content":"Hi"}]}"#
                .to_owned(),
        )
        .unwrap();
    req.extensions_mut().insert(key.clone());
    let response = svc.clone().oneshot(req).await.unwrap();
    let status = response.status();
    response.into_body().collect().await.unwrap();
    status
}

/// The spend alerts, as `(account, percent, spent_usd, cap_usd, period)`.
fn spend_alerts(alerts: &MemoryAlerts) -> Vec<(String, u8, f64, f64, BudgetPeriod)> {
    alerts
        .take()
        .into_iter()
        .map(|alert| match alert {
            Alert::SpendThreshold {
                account,
                percent,
                spent_usd,
                cap_usd,
                period,
            } => (account, percent, spent_usd, cap_usd, period),
            other => panic!("not a spend alert: {other:?}"),
        })
        .collect()
}

fn layer(ledger: &MemoryLedger, alerts: &MemoryAlerts) -> QuotaLayer {
    QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new())
        .pricing(dollar_per_token())
        .alerts(Arc::new(alerts.clone()))
}

#[tokio::test]
async fn each_threshold_fires_once_from_the_settlement_that_reaches_it() {
    let ledger = MemoryLedger::new();
    let alerts = MemoryAlerts::new();
    let svc = stack(layer(&ledger, &alerts));
    let key = Arc::new(ApiKey::new("team-a").credit_limit_usd(1000.0, BudgetPeriod::Monthly));
    let m = BudgetPeriod::Monthly;

    assert_eq!(spend(&svc, &key, 300).await, StatusCode::OK);
    assert!(alerts.is_empty(), "30 %: nothing yet");
    spend(&svc, &key, 250).await;
    assert_eq!(
        spend_alerts(&alerts),
        [("team-a".to_owned(), 50, 550.0, 1000.0, m)]
    );
    spend(&svc, &key, 100).await;
    assert!(alerts.is_empty(), "65 %: 50 % fired already");
    spend(&svc, &key, 200).await;
    spend(&svc, &key, 100).await;
    spend(&svc, &key, 50).await;
    assert_eq!(
        spend_alerts(&alerts),
        [
            ("team-a".to_owned(), 80, 850.0, 1000.0, m),
            ("team-a".to_owned(), 100, 1000.0, 1000.0, m),
        ]
    );
    assert_eq!(ledger.spent("team-a", m).await.unwrap().spent_usd, 1000.0);
}

#[tokio::test]
async fn one_settlement_past_several_thresholds_fires_them_in_order() {
    let ledger = MemoryLedger::new();
    let alerts = MemoryAlerts::new();
    let svc = stack(layer(&ledger, &alerts));
    let key = Arc::new(ApiKey::new("k").credit_limit_usd(1000.0, BudgetPeriod::Lifetime));
    spend(&svc, &key, 850).await;
    let fired: Vec<(u8, f64)> = spend_alerts(&alerts)
        .into_iter()
        .map(|(_, percent, spent, ..)| (percent, spent))
        .collect();
    assert_eq!(fired, [(50, 850.0), (80, 850.0)]);
}

#[tokio::test]
async fn refusals_at_the_cap_do_not_repeat_alerts() {
    let ledger = MemoryLedger::new();
    let alerts = MemoryAlerts::new();
    let svc = stack(layer(&ledger, &alerts));
    let key = Arc::new(ApiKey::new("k").credit_limit_usd(100.0, BudgetPeriod::Daily));
    spend(&svc, &key, 100).await;
    let percents: Vec<u8> = spend_alerts(&alerts).iter().map(|a| a.1).collect();
    assert_eq!(percents, DEFAULT_SPEND_THRESHOLDS);
    for _ in 0..5 {
        assert_eq!(spend(&svc, &key, 1).await, StatusCode::TOO_MANY_REQUESTS);
    }
    assert!(alerts.is_empty(), "{:?}", alerts.snapshot());
}

#[tokio::test]
async fn a_refusal_at_the_cap_alerts_once_what_no_settlement_alerted() {
    let ledger = MemoryLedger::new();
    let alerts = MemoryAlerts::new();
    let svc = stack(layer(&ledger, &alerts));
    // Spent up to the cap outside the layer (another service sharing the ledger, without
    // alerts).
    let held = ledger
        .reserve("k", 10.0, 100.0, BudgetPeriod::Daily)
        .await
        .unwrap();
    ledger.settle(&held.id, 100.0);
    let key = Arc::new(ApiKey::new("k").credit_limit_usd(100.0, BudgetPeriod::Daily));
    assert_eq!(spend(&svc, &key, 1).await, StatusCode::TOO_MANY_REQUESTS);
    let fired: Vec<(u8, f64)> = spend_alerts(&alerts)
        .into_iter()
        .map(|(_, percent, spent, ..)| (percent, spent))
        .collect();
    assert_eq!(fired, [(50, 100.0), (80, 100.0), (100, 100.0)]);
    assert_eq!(spend(&svc, &key, 1).await, StatusCode::TOO_MANY_REQUESTS);
    assert!(alerts.is_empty());
}

#[tokio::test]
async fn a_new_period_rearms_the_thresholds() {
    let clock = ManualClock::new(at(JAN_31_NOON));
    let ledger = MemoryLedger::new().with_clock(clock.clone());
    let alerts = MemoryAlerts::new();
    let svc = stack(layer(&ledger, &alerts));
    let key = Arc::new(ApiKey::new("daily").credit_limit_usd(100.0, BudgetPeriod::Daily));

    spend(&svc, &key, 60).await;
    assert_eq!(spend_alerts(&alerts).len(), 1);
    spend(&svc, &key, 10).await;
    assert!(alerts.is_empty());
    // February 1st, 00:00 UTC: a new day, nothing spent, nothing alerted.
    clock.set(at(JAN_31_NOON + 12 * 3600));
    spend(&svc, &key, 40).await;
    assert!(alerts.is_empty(), "40 % of the new day");
    spend(&svc, &key, 15).await;
    assert_eq!(
        spend_alerts(&alerts),
        [("daily".to_owned(), 50, 55.0, 100.0, BudgetPeriod::Daily)]
    );
}

#[tokio::test]
async fn a_team_cap_alerts_as_the_team() {
    let ledger = MemoryLedger::new();
    let alerts = MemoryAlerts::new();
    let svc = stack(layer(&ledger, &alerts).team_cap("research", 200.0, BudgetPeriod::Monthly));
    // Alice has no cap of her own; Bob has one.
    let alice = Arc::new(ApiKey::new("alice").team("research"));
    let bob = Arc::new(
        ApiKey::new("bob")
            .team("research")
            .credit_limit_usd(100.0, BudgetPeriod::Lifetime),
    );
    spend(&svc, &alice, 90).await;
    assert!(alerts.is_empty(), "45 % of the team's cap");
    spend(&svc, &bob, 60).await;
    assert_eq!(
        spend_alerts(&alerts),
        [
            // Bob's own cap: 60 of 100.
            ("bob".to_owned(), 50, 60.0, 100.0, BudgetPeriod::Lifetime),
            // The team's: 150 of 200.
            (
                team_account("research"),
                50,
                150.0,
                200.0,
                BudgetPeriod::Monthly
            ),
        ]
    );
    spend(&svc, &alice, 20).await;
    assert_eq!(
        spend_alerts(&alerts),
        [(
            "team:research".to_owned(),
            80,
            170.0,
            200.0,
            BudgetPeriod::Monthly
        )]
    );
}

#[tokio::test]
async fn keys_without_a_cap_never_alert() {
    let ledger = MemoryLedger::new();
    let alerts = MemoryAlerts::new();
    let svc = stack(layer(&ledger, &alerts));
    let rate_only = Arc::new(ApiKey::new("rate-only").rpm(100));
    let free = Arc::new(ApiKey::new("free"));
    for key in [&rate_only, &free] {
        for _ in 0..3 {
            assert_eq!(spend(&svc, key, 1_000_000).await, StatusCode::OK);
        }
    }
    assert!(alerts.is_empty());
}

#[tokio::test]
async fn custom_thresholds_are_sorted_deduplicated_and_may_pass_100() {
    let ledger = MemoryLedger::new();
    let alerts = MemoryAlerts::new();
    let svc = stack(layer(&ledger, &alerts).alert_thresholds([90, 25, 0, 25, 120]));
    let key = Arc::new(ApiKey::new("k").credit_limit_usd(1000.0, BudgetPeriod::Lifetime));
    spend(&svc, &key, 300).await;
    // A response that costs far more than its reservation settles past the cap.
    spend(&svc, &key, 1000).await;
    let fired: Vec<(u8, f64)> = spend_alerts(&alerts)
        .into_iter()
        .map(|(_, percent, spent, ..)| (percent, spent))
        .collect();
    assert_eq!(fired, [(25, 300.0), (90, 1300.0), (120, 1300.0)]);
}

#[tokio::test]
async fn no_thresholds_no_alerts() {
    let ledger = MemoryLedger::new();
    let alerts = MemoryAlerts::new();
    let svc = stack(layer(&ledger, &alerts).alert_thresholds([]));
    let key = Arc::new(ApiKey::new("k").credit_limit_usd(10.0, BudgetPeriod::Lifetime));
    spend(&svc, &key, 10).await;
    assert_eq!(spend(&svc, &key, 1).await, StatusCode::TOO_MANY_REQUESTS);
    assert!(alerts.is_empty());
}

#[tokio::test]
async fn two_layers_sharing_a_ledger_alert_each_threshold_once() {
    let ledger = MemoryLedger::new();
    let alerts = MemoryAlerts::new();
    let a = stack(layer(&ledger, &alerts));
    let b = stack(layer(&ledger, &alerts));
    let key = Arc::new(ApiKey::new("k").credit_limit_usd(100.0, BudgetPeriod::Lifetime));
    for i in 0..10 {
        let svc = if i % 2 == 0 { &a } else { &b };
        spend(svc, &key, 10).await;
    }
    let percents: Vec<u8> = spend_alerts(&alerts).iter().map(|a| a.1).collect();
    assert_eq!(percents, [50, 80, 100]);
}

#[test]
fn memory_alerts_take_and_snapshot() {
    use tower_llm_policy::alert::AlertSink;
    let alerts = MemoryAlerts::new();
    let shared = alerts.clone();
    shared.alert(Alert::ContentBlocked {
        key: None,
        guard: "pii".into(),
        side: "request",
        label: Some("email".into()),
    });
    assert_eq!(alerts.snapshot().len(), 1);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts.take().len(), 1);
    assert!(alerts.is_empty());
    assert!(shared.take().is_empty());
}

#[cfg(feature = "redis")]
#[path = "common/redis.rs"]
mod redis_server;

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use tower_llm_policy::quota::{RedisOptions, RedisStore};

    fn store(server: &super::redis_server::RedisServer, clock: &ManualClock) -> RedisStore {
        let options = RedisOptions::new()
            .timeout(Duration::from_millis(500))
            .clock(clock.clone());
        RedisStore::open_with(&server.url(), options).unwrap()
    }

    fn layer(store: &RedisStore, alerts: &MemoryAlerts) -> QuotaLayer {
        QuotaLayer::new(store.ledger(), store.rate_limiter())
            .pricing(dollar_per_token())
            .alerts(Arc::new(alerts.clone()))
    }

    /// Two replicas (two stores, two layers, two sinks) share one Redis: each threshold
    /// fires once in total, from the replica whose settlement reached it.
    #[tokio::test]
    async fn replicas_sharing_redis_alert_each_threshold_once_in_total() {
        let server = super::redis_server::RedisServer::start();
        let clock = ManualClock::new(at(JAN_31_NOON));
        let (store_a, store_b) = (store(&server, &clock), store(&server, &clock));
        let (alerts_a, alerts_b) = (MemoryAlerts::new(), MemoryAlerts::new());
        let a = stack(layer(&store_a, &alerts_a));
        let b = stack(layer(&store_b, &alerts_b));
        let key = Arc::new(ApiKey::new("k").credit_limit_usd(1000.0, BudgetPeriod::Daily));

        let mut fired = Vec::new();
        for i in 0..10 {
            let (svc, store) = if i % 2 == 0 {
                (&a, &store_a)
            } else {
                (&b, &store_b)
            };
            assert_eq!(spend(svc, &key, 100).await, StatusCode::OK);
            // The settlement is queued: sent (and its alerts sent) once flushed.
            store.flush().await;
            for (replica, alerts) in [("a", &alerts_a), ("b", &alerts_b)] {
                for (account, percent, spent, cap, period) in spend_alerts(alerts) {
                    assert_eq!(
                        (account.as_str(), cap, period),
                        ("k", 1000.0, BudgetPeriod::Daily)
                    );
                    fired.push((i, replica, percent, spent));
                }
            }
        }
        assert_eq!(
            fired,
            [
                (4, "a", 50, 500.0),
                (7, "b", 80, 800.0),
                (9, "b", 100, 1000.0)
            ]
        );

        // At the cap: refused on both replicas, no alert again.
        for (svc, store) in [(&a, &store_a), (&b, &store_b)] {
            assert_eq!(spend(svc, &key, 1).await, StatusCode::TOO_MANY_REQUESTS);
            store.flush().await;
        }
        assert!(alerts_a.is_empty() && alerts_b.is_empty());

        // The next day: re-armed.
        clock.set(at(JAN_31_NOON + 12 * 3600));
        assert_eq!(spend(&b, &key, 600).await, StatusCode::OK);
        store_b.flush().await;
        assert_eq!(
            spend_alerts(&alerts_b),
            [("k".to_owned(), 50, 600.0, 1000.0, BudgetPeriod::Daily)]
        );
        assert!(alerts_a.is_empty());
    }

    /// A team cap alerts as `team:<name>` in Redis too; a refusal at the cap alerts what
    /// settlements without alerts left unalerted, once.
    #[tokio::test]
    async fn team_accounts_and_refusals_at_the_cap() {
        let server = super::redis_server::RedisServer::start();
        let clock = ManualClock::new(at(JAN_31_NOON));
        let store = store(&server, &clock);
        let alerts = MemoryAlerts::new();
        let svc = stack(layer(&store, &alerts).team_cap("research", 200.0, BudgetPeriod::Monthly));
        let alice = Arc::new(ApiKey::new("alice").team("research"));
        spend(&svc, &alice, 170).await;
        store.flush().await;
        assert_eq!(
            spend_alerts(&alerts),
            [
                (
                    team_account("research"),
                    50,
                    170.0,
                    200.0,
                    BudgetPeriod::Monthly
                ),
                (
                    team_account("research"),
                    80,
                    170.0,
                    200.0,
                    BudgetPeriod::Monthly
                ),
            ]
        );

        // Spent to the cap by a layer without alerts: the next refusal alerts 100 %, once.
        let quiet = stack(
            QuotaLayer::new(store.ledger(), store.rate_limiter())
                .pricing(dollar_per_token())
                .team_cap("research", 200.0, BudgetPeriod::Monthly),
        );
        spend(&quiet, &alice, 30).await;
        store.flush().await;
        assert!(alerts.is_empty());
        for _ in 0..3 {
            assert_eq!(spend(&svc, &alice, 1).await, StatusCode::TOO_MANY_REQUESTS);
            store.flush().await;
        }
        assert_eq!(
            spend_alerts(&alerts),
            [(
                team_account("research"),
                100,
                200.0,
                200.0,
                BudgetPeriod::Monthly
            )]
        );
    }
}
