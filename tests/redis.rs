//! The Redis ledger and rate limiter against a real `redis-server`, which each test starts on
//! a free loopback port: the ledger's contract (atomic reserve, idempotent settle, extend,
//! periods, reservations swept at their amount), the token buckets, two replicas racing on
//! one key, a stream cut at the cap, and Redis going away (fail closed, fail open for rate
//! limits only, back when it is back).
//!
//! Needs `redis-server` on the `PATH` (or `REDIS_SERVER=/path/to/redis-server`); `.ci/run`
//! installs it. Without it these tests fail: they do not skip.
#![cfg(feature = "redis")]

#[path = "common/redis.rs"]
mod redis_server;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use redis_server::RedisServer;
use serde_json::Value;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::pricing::{ModelPrice, PricingTable};
use tower_llm_policy::quota::{
    BudgetPeriod, ManualClock, QuotaLayer, RateKind, RateLimiter, RateLimits, RedisOptions,
    RedisStore, ReserveError, SpendLedger,
};
use tower_llm_policy::{ApiKey, PolicyBody};

/// 2026-01-31T12:00:00Z.
const JAN_31_NOON: u64 = 1_769_860_800;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn store(server: &RedisServer, clock: Option<&ManualClock>) -> RedisStore {
    let mut options = RedisOptions::new().timeout(Duration::from_millis(500));
    if let Some(clock) = clock {
        options = options.clock(clock.clone());
    }
    RedisStore::open_with(&server.url(), options).unwrap()
}

#[tokio::test]
async fn reserve_refuses_past_the_cap_and_settle_counts_once() {
    let server = RedisServer::start();
    let store = store(&server, None);
    let ledger = store.ledger();
    let period = BudgetPeriod::Monthly;

    let held = ledger.reserve("team-a", 0.75, 1.0, period).await.unwrap();
    assert_eq!(held.amount_usd, 0.75);
    assert_eq!(held.headroom_usd, Some(0.25));
    // 0.75 held: 0.50 more would pass the cap, 0.25 would not.
    match ledger.reserve("team-a", 0.50, 1.0, period).await {
        Err(ReserveError::Refused(refused)) => {
            assert_eq!(refused.spend.reserved_usd, 0.75);
            assert_eq!(refused.spend.spent_usd, 0.0);
        }
        other => panic!("not refused: {other:?}"),
    }
    let small = ledger.reserve("team-a", 0.25, 1.0, period).await.unwrap();
    assert_ne!(small.id, held.id);

    ledger.settle(&held.id, 0.10);
    ledger.settle(&held.id, 0.10); // a retry: not counted again
                                   // Another replica settles the same reservation again: still once.
    store_b(&server).ledger().settle(&held.id, 0.10);
    ledger.settle(&small.id, 0.0);
    store.flush().await;
    let spend = ledger.spent("team-a", period).await.unwrap();
    assert_eq!((spend.spent_usd, spend.reserved_usd), (0.10, 0.0));
    // Other keys, and other periods, have their own counters.
    let other = ledger.spent("team-b", period).await.unwrap();
    assert_eq!(other.spent_usd, 0.0);
    let lifetime = ledger
        .spent("team-a", BudgetPeriod::Lifetime)
        .await
        .unwrap();
    assert_eq!(lifetime.spent_usd, 0.0);
    // Nothing open is left behind: the spend counter and the id sequence only.
    let index = BudgetPeriod::Monthly.index_at(SystemTime::now());
    assert_eq!(
        server.keys(),
        [
            "tlp:{team-a}:seq".to_owned(),
            format!("tlp:{{team-a}}:spend:m:{index}")
        ]
    );
    // A cap already reached refuses even a free request.
    ledger.reserve("full", 1.0, 1.0, period).await.unwrap();
    assert!(matches!(
        ledger.reserve("full", 0.0, 1.0, period).await,
        Err(ReserveError::Refused(_))
    ));
}

fn store_b(server: &RedisServer) -> RedisStore {
    store(server, None)
}

#[tokio::test]
async fn names_that_look_like_key_syntax_get_their_own_counters() {
    let server = RedisServer::start();
    let store = store(&server, None);
    let ledger = store.ledger();
    let names = ["a}b", "a", "a}:held", "%7D", "x/y", "{a}", "ünï"];
    for (i, name) in names.iter().enumerate() {
        let r = ledger
            .reserve(name, 1.0 + i as f64, 100.0, BudgetPeriod::Lifetime)
            .await
            .unwrap();
        ledger.settle(&r.id, 1.0 + i as f64);
    }
    store.flush().await;
    for (i, name) in names.iter().enumerate() {
        let spend = ledger.spent(name, BudgetPeriod::Lifetime).await.unwrap();
        assert_eq!(spend.spent_usd, 1.0 + i as f64, "{name}");
        assert_eq!(spend.reserved_usd, 0.0, "{name}");
    }
}

#[tokio::test]
async fn extend_holds_more_only_within_the_cap() {
    let server = RedisServer::start();
    let store = store(&server, None);
    let ledger = store.ledger();
    let period = BudgetPeriod::Lifetime;
    let r = ledger.reserve("k", 0.40, 1.0, period).await.unwrap();
    assert!(ledger.extend(&r.id, 0.30, 1.0).await);
    // 0.70 held: 0.40 more would pass the cap.
    assert!(!ledger.extend(&r.id, 0.40, 1.0).await);
    assert!(matches!(
        ledger.reserve("k", 0.31, 1.0, period).await,
        Err(ReserveError::Refused(_))
    ));
    // The settle releases the whole held amount, extension included.
    ledger.settle(&r.id, 0.5);
    store.flush().await;
    let spend = ledger.spent("k", period).await.unwrap();
    assert_eq!((spend.spent_usd, spend.reserved_usd), (0.5, 0.0));
    // A settled reservation cannot grow.
    assert!(!ledger.extend(&r.id, 0.01, 1.0).await);
}

#[tokio::test]
async fn the_spend_counter_rolls_over_with_its_period_and_in_flight_requests_still_count() {
    let server = RedisServer::start();
    let clock = ManualClock::new(at(JAN_31_NOON));
    let store = store(&server, Some(&clock));
    let ledger = store.ledger();
    let daily = BudgetPeriod::Daily;

    let done = ledger.reserve("k", 0.6, 1.0, daily).await.unwrap();
    ledger.settle(&done.id, 0.6);
    store.flush().await;
    // Just before midnight: 0.6 spent, one request of 0.3 in flight.
    clock.set(at(JAN_31_NOON + 12 * 3600 - 1));
    let in_flight = ledger.reserve("k", 0.3, 1.0, daily).await.unwrap();
    assert!(ledger.reserve("k", 0.2, 1.0, daily).await.is_err());

    // A new day: nothing spent, but what is in flight still holds its share.
    clock.set(at(JAN_31_NOON + 12 * 3600 + 1));
    let spend = ledger.spent("k", daily).await.unwrap();
    assert_eq!((spend.spent_usd, spend.reserved_usd), (0.0, 0.3));
    assert!(ledger.reserve("k", 0.8, 1.0, daily).await.is_err());
    // The stream that started yesterday gets no more today.
    assert!(!ledger.extend(&in_flight.id, 0.1, 1.0).await);
    // It settles into the new day.
    ledger.settle(&in_flight.id, 0.25);
    store.flush().await;
    let spend = ledger.spent("k", daily).await.unwrap();
    assert_eq!((spend.spent_usd, spend.reserved_usd), (0.25, 0.0));
    // A monthly cap: February starts a new month.
    let monthly = BudgetPeriod::Monthly;
    let m = ledger.reserve("k", 0.9, 1.0, monthly).await.unwrap();
    ledger.settle(&m.id, 0.9);
    store.flush().await;
    assert!(ledger.reserve("k", 0.2, 1.0, monthly).await.is_err());
    clock.set(at(JAN_31_NOON + 29 * 86_400));
    assert!(ledger.reserve("k", 0.2, 1.0, monthly).await.is_ok());
}

#[tokio::test]
async fn a_reservation_left_open_past_its_ttl_is_settled_at_its_amount() {
    let server = RedisServer::start();
    let clock = ManualClock::new(at(JAN_31_NOON));
    let store = RedisStore::open_with(
        &server.url(),
        RedisOptions::new()
            .clock(clock.clone())
            .reservation_ttl(Duration::from_secs(60)),
    )
    .unwrap();
    let ledger = store.ledger();
    let period = BudgetPeriod::Lifetime;
    // A replica reserves, then dies before settling.
    let lost = ledger.reserve("k", 0.4, 1.0, period).await.unwrap();
    clock.advance(Duration::from_secs(61));
    // The next decision on the key sweeps it: counted at its amount, never at nothing.
    let spend = ledger.spent("k", period).await.unwrap();
    assert_eq!((spend.spent_usd, spend.reserved_usd), (0.4, 0.0));
    // A settle arriving after the sweep changes nothing.
    ledger.settle(&lost.id, 0.01);
    store.flush().await;
    let spend = ledger.spent("k", period).await.unwrap();
    assert_eq!((spend.spent_usd, spend.reserved_usd), (0.4, 0.0));
}

#[tokio::test]
async fn token_buckets_refill_at_the_limit_per_minute_and_correct_to_the_usage() {
    let server = RedisServer::start();
    let clock = ManualClock::new(at(JAN_31_NOON));
    let store = store(&server, Some(&clock));
    let limiter = store.rate_limiter();
    let rpm = RateLimits {
        requests_per_minute: Some(3),
        tokens_per_minute: None,
    };
    for remaining in [2, 1, 0] {
        let d = limiter.acquire("k", rpm, 0).await.unwrap();
        assert_eq!(d.limited_by, None);
        assert_eq!(d.requests.unwrap().remaining, remaining);
        assert!(d.tokens.is_none());
    }
    let refused = limiter.acquire("k", rpm, 0).await.unwrap();
    assert_eq!(refused.limited_by, Some(RateKind::Requests));
    // One request comes back every 20 s.
    assert_eq!(refused.retry_after, Duration::from_secs(20));
    assert_eq!(refused.requests.unwrap().reset, Duration::from_secs(60));
    clock.advance(Duration::from_secs(20));
    assert_eq!(limiter.acquire("k", rpm, 0).await.unwrap().limited_by, None);

    let tpm = RateLimits {
        requests_per_minute: None,
        tokens_per_minute: Some(1000),
    };
    let d = limiter.acquire("t", tpm, 800).await.unwrap();
    assert_eq!(d.tokens.unwrap().remaining, 200);
    // The request used 100 tokens, not 800: 700 come back.
    limiter.correct("t", tpm, 800, 100);
    store.flush().await;
    let d = limiter.acquire("t", tpm, 850).await.unwrap();
    assert_eq!(d.limited_by, None);
    assert_eq!(d.tokens.unwrap().remaining, 50);
    // Usage above the estimate is taken too.
    limiter.correct("t", tpm, 850, 1000);
    store.flush().await;
    let refused = limiter.acquire("t", tpm, 1).await.unwrap();
    assert_eq!(refused.limited_by, Some(RateKind::Tokens));
    // More than a whole minute's tokens can never pass.
    let never = limiter.acquire("u", tpm, 1001).await.unwrap();
    assert_eq!(never.limited_by, Some(RateKind::Tokens));
    assert_eq!(never.retry_after, Duration::MAX);
    // A limit of zero refuses everything.
    let zero = RateLimits {
        requests_per_minute: Some(0),
        tokens_per_minute: None,
    };
    let d = limiter.acquire("z", zero, 0).await.unwrap();
    assert_eq!(d.limited_by, Some(RateKind::Requests));
    // A request refused by one limit takes nothing from the other.
    let both = RateLimits {
        requests_per_minute: Some(10),
        tokens_per_minute: Some(100),
    };
    let d = limiter.acquire("b", both, 500).await.unwrap();
    assert_eq!(d.limited_by, Some(RateKind::Tokens));
    assert_eq!(d.requests.unwrap().remaining, 10);
}

// --- Through the layer --------------------------------------------------------------------

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// $1 per token, in and out: a cost in USD is a number of tokens.
fn dollar_per_token() -> PricingTable {
    PricingTable::empty().with("gpt-4o", ModelPrice::new(1e6, 1e6))
}

fn json_reply(prompt: u64, completion: u64) -> Response<Body> {
    let body = format!(
        r#"{{"choices":[{{"message":{{"content":"hi"}}}}],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
        prompt + completion
    );
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

fn chat(key: &Arc<ApiKey>, max_tokens: u64) -> Request<String> {
    let mut req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"model":"gpt-4o","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Hi"}}]}}"#
        ))
        .unwrap();
    req.extensions_mut().insert(key.clone());
    req
}

/// A stack (one replica): the quota layer over an upstream that counts its calls, answers
/// after a short while, and reports `usage` of 10 prompt and 20 completion tokens.
fn replica(
    layer: QuotaLayer,
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<String>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Send>,
    Error = Infallible,
    Future: Send,
> + Clone
       + Send
       + 'static {
    ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_req: Request<PolicyBody>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, Infallible>(json_reply(10, 20))
            }
        }))
}

async fn send<S, B>(svc: &S, req: Request<String>) -> (StatusCode, http::HeaderMap, Value)
where
    S: Service<Request<String>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes, Error = Infallible>,
{
    let response = svc.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_racing_on_one_key_never_pass_its_cap_by_more_than_one_reservation() {
    let server = RedisServer::start();
    let (a, b) = (store(&server, None), store(&server, None));
    let calls = Arc::new(AtomicUsize::new(0));
    let layer =
        |s: &RedisStore| QuotaLayer::new(s.ledger(), s.rate_limiter()).pricing(dollar_per_token());
    let replicas = [
        replica(layer(&a), calls.clone()),
        replica(layer(&b), calls.clone()),
    ];
    // Each request reserves 10 prompt tokens at most ("Hi" and the message overhead) plus
    // 50 output tokens, and costs 30 ($1 a token). A cap of $1,000 fits a few dozen.
    let cap = 1000.0;
    let key = Arc::new(ApiKey::new("racer").credit_limit_usd(cap, BudgetPeriod::Lifetime));
    // Waves of 240 concurrent requests, half on each replica, until a wave gets nothing
    // through: the first is refused mostly for what is held, the later ones use what the
    // settlements gave back.
    let mut admitted = 0;
    let mut reservation = 0.0f64;
    for wave in 0.. {
        assert!(wave < 20, "the cap never filled up");
        let mut tasks = Vec::new();
        for i in 0..240 {
            let svc = replicas[i % 2].clone();
            let req = chat(&key, 50);
            tasks.push(tokio::spawn(async move { send(&svc, req).await }));
        }
        let mut ok = 0;
        for task in tasks {
            let (status, _, body) = task.await.unwrap();
            match status {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    assert_eq!(body["error"]["code"], "insufficient_quota");
                    // "… and this request may cost up to $NN.NN."
                    let message = body["error"]["message"].as_str().unwrap();
                    let up_to = message.rsplit('$').next().unwrap().trim_end_matches('.');
                    reservation = reservation.max(up_to.parse().unwrap());
                }
                other => panic!("unexpected {other}"),
            }
        }
        a.flush().await;
        b.flush().await;
        admitted += ok;
        let spend = a
            .ledger()
            .spent("racer", BudgetPeriod::Lifetime)
            .await
            .unwrap();
        // Refused requests never reached the upstream.
        assert_eq!(calls.load(Ordering::SeqCst), admitted);
        // Each admitted request settled at its usage, 30 tokens; nothing is left held.
        assert_eq!(spend.spent_usd, 30.0 * admitted as f64);
        assert_eq!(spend.reserved_usd, 0.0);
        assert!(
            spend.spent_usd <= cap + reservation,
            "spent {} with a cap of {cap} and reservations of {reservation}",
            spend.spent_usd
        );
        if wave == 0 {
            assert!(ok < 240, "the cap must have been reached");
        }
        if ok == 0 {
            // Nothing more fits: what is left of the cap is less than one reservation.
            assert!(cap - spend.spent_usd < reservation, "{spend:?}");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_racing_on_one_key_allow_exactly_its_requests_per_minute() {
    let server = RedisServer::start();
    // Time stands still, so no request comes back during the race.
    let clock = ManualClock::new(at(JAN_31_NOON));
    let (a, b) = (store(&server, Some(&clock)), store(&server, Some(&clock)));
    let calls = Arc::new(AtomicUsize::new(0));
    let replicas = [
        replica(QuotaLayer::new(a.ledger(), a.rate_limiter()), calls.clone()),
        replica(QuotaLayer::new(b.ledger(), b.rate_limiter()), calls.clone()),
    ];
    let key = Arc::new(ApiKey::new("rpm").rpm(50));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let svc = replicas[i % 2].clone();
        let req = chat(&key, 50);
        tasks.push(tokio::spawn(async move { send(&svc, req).await }));
    }
    let mut ok = 0;
    for task in tasks {
        let (status, headers, body) = task.await.unwrap();
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(body["error"]["code"], "rate_limit_exceeded");
                assert_eq!(headers["retry-after"], "2");
                assert_eq!(headers["x-ratelimit-limit-requests"], "50");
                assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 50);
    assert_eq!(calls.load(Ordering::SeqCst), 50);
}

#[tokio::test]
async fn a_stream_that_outgrows_the_cap_is_cut_and_settled_at_what_it_cost() {
    let server = RedisServer::start();
    let store = store(&server, None);
    let ledger = store.ledger();
    let calls = Arc::new(AtomicUsize::new(0));
    // An upstream that ignores max_tokens: 200 chunks of one token ("abcd") each.
    let counter = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(QuotaLayer::new(ledger.clone(), store.rate_limiter()).pricing(dollar_per_token()))
        .service(service_fn(move |_req: Request<PolicyBody>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut text = String::new();
                for _ in 0..200 {
                    text.push_str("data: {\"choices\":[{\"delta\":{\"content\":\"abcd\"}}]}\n\n");
                }
                text.push_str("data: [DONE]\n\n");
                let mut response = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
                response
                    .headers_mut()
                    .insert("content-type", "text/event-stream".parse().unwrap());
                Ok::<_, Infallible>(response)
            }
        }));
    // A cap of $60: the prompt (at most a few dozen tokens) and 10 output tokens are
    // reserved; the stream asks Redis for more as it goes, until the cap.
    let key = Arc::new(ApiKey::new("streamer").credit_limit_usd(60.0, BudgetPeriod::Lifetime));
    let response = svc.clone().oneshot(chat(&key, 10)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(text.contains("insufficient_quota"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    let chunks = text.matches("abcd").count();
    assert!(chunks > 10 && chunks < 60, "{chunks} chunks passed");
    store.flush().await;
    let spend = ledger
        .spent("streamer", BudgetPeriod::Lifetime)
        .await
        .unwrap();
    assert_eq!(spend.reserved_usd, 0.0);
    assert!(spend.spent_usd <= 60.0 + 1.0, "{spend:?}");
    assert!(spend.spent_usd > 30.0, "{spend:?}");
}

#[tokio::test]
async fn redis_down_fails_closed_rate_limits_may_fail_open_and_it_recovers() {
    let mut server = RedisServer::start();
    let port = server.port;
    let store = store(&server, None);
    let calls = Arc::new(AtomicUsize::new(0));
    let closed = replica(
        QuotaLayer::new(store.ledger(), store.rate_limiter()).pricing(dollar_per_token()),
        calls.clone(),
    );
    let open = replica(
        QuotaLayer::new(store.ledger(), store.rate_limiter())
            .pricing(dollar_per_token())
            .rate_limits_fail_open(true),
        calls.clone(),
    );
    let capped = Arc::new(ApiKey::new("capped").credit_limit_usd(1e6, BudgetPeriod::Lifetime));
    let limited = Arc::new(ApiKey::new("limited").rpm(100));
    assert_eq!(send(&closed, chat(&capped, 10)).await.0, StatusCode::OK);
    assert_eq!(send(&closed, chat(&limited, 10)).await.0, StatusCode::OK);

    server.stop();
    let started = Instant::now();
    for (svc, key) in [(&closed, &capped), (&closed, &limited), (&open, &capped)] {
        let (status, _, body) = send(svc, chat(key, 10)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "policy_unavailable");
    }
    // Fail open: a key with only a rate limit passes, uncounted and without the headers.
    let (status, headers, _) = send(&open, chat(&limited, 10)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-ratelimit-limit-requests").is_none());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Back on the same port: the connection is made again.
    let _server = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, ..) = send(&closed, chat(&capped, 10)).await;
        if status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "the store did not reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.ping().await.unwrap();
}
