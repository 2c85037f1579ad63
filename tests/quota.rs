//! Quota: spend caps and rate limits, alone and combined; settlement from the usage (JSON,
//! SSE, none, cancelled); period rollover on an injected clock; retried settles; the headers;
//! refused requests never reaching the inner service; concurrency.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::pricing::{ModelPrice, PricingTable};
use tower_llm_policy::keys::{BoxFuture, StoreError};
use tower_llm_policy::quota::{
    team_account, BudgetPeriod, ManualClock, MemoryLedger, MemoryRateLimiter, QuotaLayer,
    Reservation, ReservationId, ReserveError, Spend, SpendLedger,
};
use tower_llm_policy::{ApiKey, PolicyBody, PromptLimitLayer, Rejection};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the upstream answers.
#[derive(Clone, Copy)]
enum Reply {
    /// A JSON completion with this usage (prompt, completion).
    Json(u64, u64),
    /// A JSON completion without usage.
    NoUsage,
    /// An SSE stream whose last chunk carries this usage.
    Sse(u64, u64),
    /// An SSE stream that sends one chunk and then never ends.
    Hang,
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text)).boxed_unsync()
}

fn reply(reply: Reply) -> Response<Body> {
    let (content_type, body) = match reply {
        Reply::Json(p, c) => (
            "application/json",
            full(format!(
                r#"{{"choices":[{{"message":{{"content":"hi"}}}}],"usage":{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{}}}}}"#,
                p + c
            )),
        ),
        Reply::NoUsage => (
            "application/json",
            full(r#"{"choices":[{"message":{"content":"hi"}}]}"#.to_owned()),
        ),
        Reply::Sse(p, c) => (
            "text/event-stream",
            full(format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"hi\"}}}}]}}\n\ndata: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
                p + c
            )),
        ),
        Reply::Hang => {
            let first = futures_stream_once_then_pending();
            ("text/event-stream", first)
        }
    };
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    response
}

/// A body that yields one SSE chunk, then stays pending.
fn futures_stream_once_then_pending() -> Body {
    struct Once(bool);
    impl http_body::Body for Once {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            if std::mem::replace(&mut self.0, true) {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                    b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
                )))))
            }
        }
    }
    Once(false).boxed_unsync()
}

/// $1 per token, in and out: a cost in USD is a number of tokens.
fn dollar_per_token() -> PricingTable {
    PricingTable::empty().with("gpt-4o", ModelPrice::new(1e6, 1e6))
}

struct Harness<S> {
    svc: S,
    calls: Arc<AtomicUsize>,
}

fn harness(
    layer: QuotaLayer,
    answer: Reply,
) -> Harness<
    impl Service<
            Request<String>,
            Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Send>,
            Error = Infallible,
            Future: Send,
        > + Clone
        + Send
        + 'static,
> {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(move |_req: Request<PolicyBody>| {
                counter.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, Infallible>(reply(answer)) }
            }));
    Harness { svc, calls }
}

fn chat(key: &Arc<ApiKey>, max_tokens: u64) -> Request<String> {
    chat_model(key, "gpt-4o", max_tokens)
}

fn chat_model(key: &Arc<ApiKey>, model: &str, max_tokens: u64) -> Request<String> {
    let mut req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Hi"}}]}}"#
        ))
        .unwrap();
    req.extensions_mut().insert(key.clone());
    req
}

async fn send<S, B>(
    svc: &S,
    req: Request<String>,
) -> (StatusCode, http::HeaderMap, Value, Option<Rejection>)
where
    S: Service<Request<String>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes, Error = Infallible>,
{
    let response = svc.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let rejection = response.extensions().get::<Rejection>().cloned();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body, rejection)
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 2026-01-31T12:00:00Z.
const JAN_31_NOON: u64 = 1_769_860_800;

async fn spent(ledger: &MemoryLedger, key: &str, period: BudgetPeriod) -> Spend {
    ledger.spent(key, period).await.unwrap()
}

/// The reservation of one `chat(key, max_tokens)` request, measured: its upstream reports no
/// usage, so it settles at its reservation.
async fn reservation_of(max_tokens: u64) -> f64 {
    let ledger = MemoryLedger::new();
    let layer =
        QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token());
    let h = harness(layer, Reply::NoUsage);
    let key = Arc::new(ApiKey::new("probe").credit_limit_usd(1e9, BudgetPeriod::Lifetime));
    send(&h.svc, chat(&key, max_tokens)).await;
    spent(&ledger, "probe", BudgetPeriod::Lifetime)
        .await
        .spent_usd
}

#[tokio::test]
async fn a_capped_key_is_refused_once_the_reservation_would_pass_the_cap() {
    let reserve = reservation_of(100).await;
    assert!(
        reserve > 100.0 && reserve < 130.0,
        "prompt plus 100 output tokens: {reserve}"
    );
    let ledger = MemoryLedger::new();
    let layer =
        QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token());
    let h = harness(layer, Reply::Json(10, 20));
    // Room for the first request's reservation, not for a second on top of its cost.
    let key =
        Arc::new(ApiKey::new("capped").credit_limit_usd(reserve + 20.0, BudgetPeriod::Lifetime));

    let (status, headers, _, _) = send(&h.svc, chat(&key, 100)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-should-retry").is_none());
    // Settled at the usage's cost, not the reservation.
    let spend = spent(&ledger, "capped", BudgetPeriod::Lifetime).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (30.0, 0.0));

    let (status, headers, body, rejection) = send(&h.svc, chat(&key, 100)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(headers["x-should-retry"], "false");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("spend cap"));
    assert_eq!(rejection.unwrap().layer.as_str(), "quota");
    assert_eq!(
        h.calls.load(Ordering::SeqCst),
        1,
        "the refused request never reached the upstream"
    );
}

#[tokio::test]
async fn a_response_without_usage_settles_at_its_reservation() {
    let reserve = reservation_of(50).await;
    assert!(reserve >= 50.0);
    // The same request twice gives the same reservation.
    assert_eq!(reservation_of(50).await, reserve);
}

#[tokio::test]
async fn a_stream_is_settled_from_its_usage_chunk() {
    let ledger = MemoryLedger::new();
    let layer =
        QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token());
    let h = harness(layer, Reply::Sse(7, 5));
    let key = Arc::new(ApiKey::new("s").credit_limit_usd(1000.0, BudgetPeriod::Lifetime));
    let response = h.svc.clone().oneshot(chat(&key, 100)).await.unwrap();
    // In flight: the reservation is held.
    let held = spent(&ledger, "s", BudgetPeriod::Lifetime).await;
    assert!(held.reserved_usd > 100.0 && held.spent_usd == 0.0);
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        text.ends_with(b"data: [DONE]\n\n"),
        "the stream passes through untouched"
    );
    let spend = spent(&ledger, "s", BudgetPeriod::Lifetime).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (12.0, 0.0));
}

#[tokio::test]
async fn a_cancelled_stream_settles_at_its_reservation_never_at_nothing() {
    let reserve = reservation_of(100).await;
    let ledger = MemoryLedger::new();
    let layer =
        QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token());
    let h = harness(layer, Reply::Hang);
    let key = Arc::new(ApiKey::new("c").credit_limit_usd(1000.0, BudgetPeriod::Lifetime));
    let response = h.svc.clone().oneshot(chat(&key, 100)).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.into_data().unwrap().starts_with(b"data:"));
    assert_eq!(ledger.open_reservations(), 1);
    // The client goes away.
    drop(body);
    assert_eq!(ledger.open_reservations(), 0);
    let spend = spent(&ledger, "c", BudgetPeriod::Lifetime).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (reserve, 0.0));
}

#[tokio::test]
async fn a_response_future_dropped_before_the_decision_holds_nothing() {
    // The request was never sent on: released, not charged.
    let ledger = MemoryLedger::new();
    let layer =
        QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token());
    let h = harness(layer, Reply::Json(1, 1));
    let key = Arc::new(ApiKey::new("d").credit_limit_usd(1000.0, BudgetPeriod::Lifetime));
    let mut svc = h.svc.clone();
    let future = svc.ready().await.unwrap().call(chat(&key, 10));
    drop(future);
    let spend = spent(&ledger, "d", BudgetPeriod::Lifetime).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (0.0, 0.0));
}

#[tokio::test]
async fn a_retried_settle_is_counted_once() {
    let ledger = MemoryLedger::new();
    let r = ledger
        .reserve("k", 5.0, 10.0, BudgetPeriod::Lifetime)
        .await
        .unwrap();
    ledger.settle(&r.id, 3.0);
    ledger.settle(&r.id, 3.0);
    ledger.settle(&r.id, 4.0);
    ledger.settle(&ReservationId::new("never-reserved"), 100.0);
    let spend = spent(&ledger, "k", BudgetPeriod::Lifetime).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (3.0, 0.0));
    // 3 spent: 7 more fit exactly, 7.01 does not.
    assert!(ledger
        .reserve("k", 7.01, 10.0, BudgetPeriod::Lifetime)
        .await
        .is_err());
    let r = ledger
        .reserve("k", 7.0, 10.0, BudgetPeriod::Lifetime)
        .await
        .unwrap();
    // At the cap: even a free request is refused until it settles lower.
    assert!(matches!(
        ledger.reserve("k", 0.0, 10.0, BudgetPeriod::Lifetime).await,
        Err(ReserveError::Refused(_))
    ));
    ledger.settle(&r.id, 1.0);
    assert!(ledger
        .reserve("k", 6.0, 10.0, BudgetPeriod::Lifetime)
        .await
        .is_ok());
}

#[tokio::test]
async fn the_spend_counter_rolls_over_with_its_period() {
    let clock = ManualClock::new(at(JAN_31_NOON));
    let ledger = MemoryLedger::new().with_clock(clock.clone());
    for period in [
        BudgetPeriod::Daily,
        BudgetPeriod::Monthly,
        BudgetPeriod::Lifetime,
    ] {
        let key = format!("{period:?}");
        clock.set(at(JAN_31_NOON));
        let r = ledger.reserve(&key, 8.0, 10.0, period).await.unwrap();
        ledger.settle(&r.id, 8.0);
        assert!(ledger.reserve(&key, 5.0, 10.0, period).await.is_err());
        // Eleven hours later, still January 31st.
        clock.set(at(JAN_31_NOON + 11 * 3600));
        assert!(ledger.reserve(&key, 5.0, 10.0, period).await.is_err());
        // February 1st, 00:00:00 UTC: a new day and a new month.
        clock.set(at(JAN_31_NOON + 12 * 3600));
        let again = ledger.reserve(&key, 5.0, 10.0, period).await;
        assert_eq!(
            again.is_ok(),
            period != BudgetPeriod::Lifetime,
            "{period:?}"
        );
        if let Ok(r) = again {
            ledger.settle(&r.id, 5.0);
            assert_eq!(spent(&ledger, &key, period).await.spent_usd, 5.0);
        }
    }
    // February 2nd: a new day, the same month.
    clock.set(at(JAN_31_NOON + 36 * 3600));
    assert_eq!(
        spent(&ledger, "Daily", BudgetPeriod::Daily).await.spent_usd,
        0.0
    );
    assert_eq!(
        spent(&ledger, "Monthly", BudgetPeriod::Monthly)
            .await
            .spent_usd,
        5.0
    );
}

#[tokio::test]
async fn a_reservation_from_the_last_period_settles_into_the_new_one() {
    let clock = ManualClock::new(at(JAN_31_NOON));
    let ledger = MemoryLedger::new().with_clock(clock.clone());
    let r = ledger
        .reserve("k", 8.0, 10.0, BudgetPeriod::Daily)
        .await
        .unwrap();
    clock.advance(Duration::from_secs(24 * 3600));
    // Until it settles, what it holds counts in the new day too.
    let spend = spent(&ledger, "k", BudgetPeriod::Daily).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (0.0, 8.0));
    ledger.settle(&r.id, 2.0);
    let spend = spent(&ledger, "k", BudgetPeriod::Daily).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (2.0, 0.0));
}

#[tokio::test]
async fn a_request_in_flight_at_midnight_still_counts_against_the_new_day() {
    let clock = ManualClock::new(at(JAN_31_NOON));
    let ledger = MemoryLedger::new().with_clock(clock.clone());
    // Reserved a second before midnight...
    clock.advance(Duration::from_secs(12 * 3600 - 1));
    let first = ledger
        .reserve("k", 90.0, 100.0, BudgetPeriod::Daily)
        .await
        .unwrap();
    // ...a second request two seconds later, in the new day, does not get the whole cap.
    clock.advance(Duration::from_secs(2));
    assert!(ledger
        .reserve("k", 90.0, 100.0, BudgetPeriod::Daily)
        .await
        .is_err());
    let small = ledger
        .reserve("k", 10.0, 100.0, BudgetPeriod::Daily)
        .await
        .unwrap();
    ledger.settle(&first.id, 90.0);
    ledger.settle(&small.id, 10.0);
    let spend = spent(&ledger, "k", BudgetPeriod::Daily).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (100.0, 0.0));
}

#[tokio::test]
async fn a_model_without_a_price_is_refused_for_a_capped_key() {
    let ledger = MemoryLedger::new();
    let layer =
        QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token());
    let h = harness(layer.clone(), Reply::Json(1, 1));
    let capped = Arc::new(ApiKey::new("capped").credit_limit_usd(1000.0, BudgetPeriod::Lifetime));
    let (status, headers, body, _) = send(&h.svc, chat_model(&capped, "my-local-model", 10)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert_eq!(headers["x-should-retry"], "false");
    assert!(body["error"]["message"].as_str().unwrap().contains("price"));
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);

    // A key without a cap uses it freely.
    let free = Arc::new(ApiKey::new("free"));
    let (status, ..) = send(&h.svc, chat_model(&free, "my-local-model", 10)).await;
    assert_eq!(status, StatusCode::OK);

    // Configured to let unknown prices through: passes, counts nothing.
    let open = harness(layer.refuse_unknown_prices(false), Reply::Json(1, 1));
    let (status, ..) = send(&open.svc, chat_model(&capped, "my-local-model", 10)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        spent(&ledger, "capped", BudgetPeriod::Lifetime)
            .await
            .spent_usd,
        0.0
    );
}

#[tokio::test]
async fn requests_per_minute_refuse_with_retry_after_and_the_headers() {
    let clock = ManualClock::new(at(JAN_31_NOON));
    let limiter = MemoryRateLimiter::new().with_clock(clock.clone());
    let layer = QuotaLayer::new(MemoryLedger::new(), limiter);
    let h = harness(layer, Reply::Json(1, 1));
    let key = Arc::new(ApiKey::new("r").rpm(3));
    for remaining in ["2", "1", "0"] {
        let (status, headers, ..) = send(&h.svc, chat(&key, 10)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-ratelimit-limit-requests"], "3");
        assert_eq!(headers["x-ratelimit-remaining-requests"], remaining);
        assert!(
            headers.get("x-ratelimit-limit-tokens").is_none(),
            "no tpm on this key"
        );
    }
    let (status, headers, body, _) = send(&h.svc, chat(&key, 10)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("requests per min (RPM)"), "{message}");
    // One request comes back every 20 s (3 a minute).
    assert_eq!(headers["retry-after"], "20");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(headers["x-ratelimit-reset-requests"], "1m0s");
    assert!(headers.get("x-should-retry").is_none());
    assert_eq!(h.calls.load(Ordering::SeqCst), 3);

    clock.advance(Duration::from_secs(20));
    let (status, headers, ..) = send(&h.svc, chat(&key, 10)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(headers["x-ratelimit-reset-requests"], "1m0s");
}

#[tokio::test]
async fn tokens_per_minute_count_the_estimate_then_the_usage() {
    let clock = ManualClock::new(at(JAN_31_NOON));
    let limiter = MemoryRateLimiter::new().with_clock(clock.clone());
    let layer = QuotaLayer::new(MemoryLedger::new(), limiter);
    let h = harness(layer, Reply::Json(10, 20));
    let key = Arc::new(ApiKey::new("t").tpm(1000));
    // Estimated at the prompt plus 600 output tokens; the usage says 30.
    let (status, headers, ..) = send(&h.svc, chat(&key, 600)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-ratelimit-limit-tokens"], "1000");
    let remaining: u64 = headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining < 400,
        "the estimate is taken up front: {remaining}"
    );
    // Corrected to 30 when the response ended: another 600 fits (its response is held open,
    // so its estimate stays taken).
    let held = h.svc.clone().oneshot(chat(&key, 600)).await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    // Now 30 + ~610 are taken: a third does not fit, and the message says which limit.
    let (status, headers, body, _) = send(&h.svc, chat(&key, 600)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("tokens per min (TPM)"), "{message}");
    assert!(headers.contains_key("retry-after"));
    assert!(headers.contains_key("x-ratelimit-reset-tokens"));
    // The held response ends with a usage of 30: the third fits now.
    held.into_body().collect().await.unwrap();
    let (status, ..) = send(&h.svc, chat(&key, 600)).await;
    assert_eq!(status, StatusCode::OK);
    // A request larger than the whole limit can never pass.
    let (status, _, body, _) = send(&h.svc, chat(&key, 5000)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Request too large"));
    assert_eq!(h.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_rate_limited_request_releases_its_spend_reservation() {
    let clock = ManualClock::new(at(JAN_31_NOON));
    let ledger = MemoryLedger::new();
    let layer = QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new().with_clock(clock))
        .pricing(dollar_per_token());
    let h = harness(layer, Reply::Json(1, 1));
    let key = Arc::new(
        ApiKey::new("both")
            .credit_limit_usd(1000.0, BudgetPeriod::Lifetime)
            .rpm(1),
    );
    let (status, ..) = send(&h.svc, chat(&key, 10)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body, _) = send(&h.svc, chat(&key, 10)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let spend = spent(&ledger, "both", BudgetPeriod::Lifetime).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (2.0, 0.0));
    assert_eq!(ledger.open_reservations(), 0);
}

#[tokio::test]
async fn the_spend_cap_is_checked_before_the_rate_limits() {
    let clock = ManualClock::new(at(JAN_31_NOON));
    let ledger = MemoryLedger::new();
    let layer = QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new().with_clock(clock))
        .pricing(dollar_per_token());
    let h = harness(layer, Reply::Json(1, 1));
    let key = Arc::new(
        ApiKey::new("both")
            .credit_limit_usd(5.0, BudgetPeriod::Lifetime)
            .rpm(10),
    );
    let (status, headers, body, _) = send(&h.svc, chat(&key, 10)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["code"], "insufficient_quota");
    assert!(headers.get("retry-after").is_none());
    // The refused request took nothing from the rate limit.
    let key = Arc::new(
        ApiKey::new("both")
            .credit_limit_usd(1000.0, BudgetPeriod::Lifetime)
            .rpm(10),
    );
    let (status, headers, ..) = send(&h.svc, chat(&key, 10)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-ratelimit-remaining-requests"], "9");
}

/// A ledger that counts its calls and can fail.
#[derive(Clone, Default)]
struct Counting {
    calls: Arc<AtomicUsize>,
    fail: bool,
}

impl SpendLedger for Counting {
    fn reserve<'a>(
        &'a self,
        _key: &'a str,
        amount_usd: f64,
        _cap_usd: f64,
        _period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Reservation, ReserveError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let fail = self.fail;
        Box::pin(async move {
            if fail {
                return Err(ReserveError::Unavailable(StoreError::new("down")));
            }
            Ok(Reservation {
                id: ReservationId::new("1"),
                amount_usd,
                headroom_usd: None,
            })
        })
    }
    fn settle(&self, _id: &ReservationId, _actual_usd: f64) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
    fn spent<'a>(
        &'a self,
        _key: &'a str,
        _period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Spend, StoreError>> {
        Box::pin(async { Ok(Spend::default()) })
    }
}

#[tokio::test]
async fn keys_without_limits_and_requests_without_keys_never_touch_the_ledger() {
    let ledger = Counting::default();
    let h = harness(
        QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()),
        Reply::Json(1, 1),
    );
    let key = Arc::new(ApiKey::new("plain"));
    let (status, headers, ..) = send(&h.svc, chat(&key, 10)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-ratelimit-limit-requests").is_none());
    let mut anonymous = chat(&key, 10);
    anonymous.extensions_mut().remove::<Arc<ApiKey>>();
    let (status, ..) = send(&h.svc, anonymous).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ledger.calls.load(Ordering::SeqCst), 0);
    // A capped key: one reserve, one settle.
    let capped = Arc::new(ApiKey::new("capped").credit_limit_usd(1e6, BudgetPeriod::Lifetime));
    send(&h.svc, chat(&capped, 10)).await;
    assert_eq!(ledger.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_ledger_that_cannot_answer_fails_closed() {
    let ledger = Counting {
        fail: true,
        ..Counting::default()
    };
    let h = harness(
        QuotaLayer::new(ledger, MemoryRateLimiter::new()),
        Reply::Json(1, 1),
    );
    let key = Arc::new(ApiKey::new("capped").credit_limit_usd(10.0, BudgetPeriod::Lifetime));
    let (status, _, body, _) = send(&h.svc, chat(&key, 10)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "policy_unavailable");
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_request_refused_further_in_is_released_not_charged() {
    let ledger = MemoryLedger::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = ServiceBuilder::new()
        .layer(
            QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token()),
        )
        .layer(PromptLimitLayer::new().max_output_tokens(5))
        .service(service_fn(move |_req: Request<PolicyBody>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(reply(Reply::Json(1, 1))) }
        }));
    let key = Arc::new(ApiKey::new("k").credit_limit_usd(1000.0, BudgetPeriod::Lifetime));
    let (status, _, body, _) = send(&svc, chat(&key, 10)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "prompt_too_long");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let spend = spent(&ledger, "k", BudgetPeriod::Lifetime).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (0.0, 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_pass_the_cap_by_more_than_one_reservation() {
    let reserve = reservation_of(100).await;
    let ledger = MemoryLedger::new();
    let layer =
        QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token());
    // The upstream bills more than the reservation (an estimate that was low).
    let h = harness(layer, Reply::Json(100, 100));
    let cap = 10.0 * reserve;
    let key = Arc::new(ApiKey::new("hot").credit_limit_usd(cap, BudgetPeriod::Lifetime));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let svc = h.svc.clone();
            let key = key.clone();
            tokio::spawn(async move { send(&svc, chat(&key, 100)).await.0 })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    let spend = spent(&ledger, "hot", BudgetPeriod::Lifetime).await;
    assert_eq!(spend.reserved_usd, 0.0);
    assert_eq!(spend.spent_usd, ok as f64 * 200.0);
    assert!((1..=10).contains(&ok), "{ok} passed");
    assert!(
        spend.spent_usd <= cap + 200.0,
        "settled {} over a cap of {cap}",
        spend.spent_usd
    );
    assert_eq!(h.calls.load(Ordering::SeqCst), ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_get_exactly_the_requests_per_minute() {
    let clock = ManualClock::new(at(JAN_31_NOON));
    let layer = QuotaLayer::new(
        MemoryLedger::new(),
        MemoryRateLimiter::new().with_clock(clock),
    );
    let h = harness(layer, Reply::Json(1, 1));
    let key = Arc::new(ApiKey::new("burst").rpm(37));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let svc = h.svc.clone();
            let key = key.clone();
            tokio::spawn(async move { send(&svc, chat(&key, 10)).await.0 })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        if task.await.unwrap() == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 37);
    assert_eq!(h.calls.load(Ordering::SeqCst), 37);
}

#[tokio::test]
async fn a_batch_is_refused_for_a_capped_key() {
    let h = harness(QuotaLayer::in_memory(), Reply::Json(1, 1));
    let key = Arc::new(ApiKey::new("capped").credit_limit_usd(10.0, BudgetPeriod::Lifetime));
    let mut req = Request::post("/v1/batches")
        .header("content-type", "application/json")
        .body(r#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions","completion_window":"24h"}"#.to_owned())
        .unwrap();
    req.extensions_mut().insert(key);
    let (status, _, body, _) = send(&h.svc, req).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["code"], "unverifiable_request");
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn budget_period_reads_from_configuration() {
    let key: ApiKey = serde_json::from_str(
        r#"{"name":"a","credit_limit_usd":5.0,"budget_period":"monthly","rpm":10,"tpm":1000}"#,
    )
    .unwrap();
    assert_eq!(key.budget_period, BudgetPeriod::Monthly);
    let key: ApiKey = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
    assert_eq!(key.budget_period, BudgetPeriod::Lifetime);
    let key: ApiKey = serde_json::from_str(r#"{"name":"a","budget_period":"none"}"#).unwrap();
    assert_eq!(key.budget_period, BudgetPeriod::Lifetime);
    assert!(serde_json::from_str::<ApiKey>(r#"{"name":"a","budget_period":"weekly"}"#).is_err());
}

#[tokio::test]
async fn an_inner_service_error_settles_at_the_reservation() {
    let reserve = reservation_of(100).await;
    let ledger = MemoryLedger::new();
    let svc = ServiceBuilder::new()
        .layer(
            QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token()),
        )
        .service(service_fn(|_req: Request<PolicyBody>| async {
            Err::<Response<Body>, _>(std::io::Error::other("connection reset"))
        }));
    let key = Arc::new(ApiKey::new("e").credit_limit_usd(1000.0, BudgetPeriod::Lifetime));
    assert!(svc.oneshot(chat(&key, 100)).await.is_err());
    let spend = spent(&ledger, "e", BudgetPeriod::Lifetime).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (reserve, 0.0));
}

#[tokio::test]
async fn behind_the_audit_layer_a_stream_asks_for_its_usage_and_is_settled_from_it() {
    use tower_llm_policy::audit::{AuditLayer, MemorySink};
    let sink = MemorySink::new();
    let ledger = MemoryLedger::new();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()).pricing(dollar_per_token()))
        .layer(
            QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token()),
        )
        .service(service_fn(|req: Request<PolicyBody>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&body).unwrap();
            // The audit layer asked the upstream for the usage on the client's behalf.
            assert_eq!(body["stream_options"]["include_usage"], true);
            Ok::<_, Infallible>(reply(Reply::Sse(7, 5)))
        }));
    let key = Arc::new(ApiKey::new("a").credit_limit_usd(150.0, BudgetPeriod::Lifetime));
    let mut req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(
            r#"{"model":"gpt-4o","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"Hi"}]}"#
                .to_owned(),
        )
        .unwrap();
    req.extensions_mut().insert(key.clone());
    let (status, ..) = send(&svc, req).await;
    assert_eq!(status, StatusCode::OK);
    let spend = spent(&ledger, "a", BudgetPeriod::Lifetime).await;
    assert_eq!((spend.spent_usd, spend.reserved_usd), (12.0, 0.0));
    // The record says what was held and what was settled (the usage's cost).
    let first = sink.last().unwrap();
    let reserved = first.reserved_usd.expect("the reservation is recorded");
    assert!(reserved >= 12.0, "{reserved}");
    assert_eq!(first.settled_usd, Some(12.0));
    assert_eq!(first.cost_usd, Some(12.0));

    // 12 spent: a request that may cost over 200 does not fit in 150. The refusal is in the
    // audit record, as the quota layer's.
    let mut refused = chat(&key, 200);
    refused.extensions_mut().insert(key.clone());
    let (status, ..) = send(&svc, refused).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let records = sink.records();
    let last = records.last().unwrap();
    assert_eq!(last.blocked_by.as_deref(), Some("quota"));
    assert_eq!(last.code.as_deref(), Some("insufficient_quota"));
    // Refused: nothing was held or settled.
    assert_eq!((last.reserved_usd, last.settled_usd), (None, None));
}

#[tokio::test]
async fn a_stream_cut_at_the_cap_is_flagged_in_its_record_with_what_was_settled() {
    use tower_llm_policy::audit::{flag, AuditLayer, MemorySink};
    let reserve = reservation_of(10).await;
    let sink = MemorySink::new();
    let ledger = MemoryLedger::new();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()).pricing(dollar_per_token()))
        .layer(
            QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token()),
        )
        .service(service_fn(move |_req: Request<PolicyBody>| async move {
            Ok::<_, Infallible>(runaway(1000, Arc::default()))
        }));
    let key = Arc::new(ApiKey::new("s").credit_limit_usd(reserve + 30.0, BudgetPeriod::Lifetime));
    let response = svc.oneshot(chat(&key, 10)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    assert_eq!(sink.len(), 1);
    let record = sink.last().unwrap();
    assert!(
        record.flags.iter().any(|f| f == flag::BUDGET_CUT),
        "{:?}",
        record.flags
    );
    // Stopped by the quota layer, not an upstream error: the cap's own error event is not
    // the upstream's.
    assert_eq!(record.outcome, tower_llm_policy::audit::Outcome::Stopped);
    assert_eq!(record.blocked_by.as_deref(), Some("quota"));
    assert_eq!(record.code.as_deref(), Some("insufficient_quota"));
    assert!(!record.flags.iter().any(|f| f == flag::UPSTREAM_ERROR_BODY));
    let spend = spent(&ledger, "s", BudgetPeriod::Lifetime).await;
    assert_eq!(record.settled_usd, Some(spend.spent_usd));
    assert!(record.settled_usd > record.reserved_usd, "{record:?}");
}

/// An SSE stream of `left` content chunks (` hello` each) that never reports usage, and
/// tells when it is dropped.
struct Runaway {
    left: usize,
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

impl http_body::Body for Runaway {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        let chunk = if self.left == 0 {
            "data: [DONE]\n\n"
        } else {
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" hello\"}}]}\n\n"
        };
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            chunk.as_bytes(),
        )))))
    }
}

/// An event stream from an upstream that ignores `max_tokens`: `left - 1` chunks, then
/// `[DONE]`; `dropped` is set when the body is dropped.
fn runaway(left: usize, dropped: Arc<std::sync::atomic::AtomicBool>) -> Response<Runaway> {
    let mut response = Response::new(Runaway { left, dropped });
    response
        .headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    response
}

impl Drop for Runaway {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_stream_that_outgrows_the_cap_is_cut_with_an_error_event_and_done() {
    let reserve = reservation_of(10).await;
    let ledger = MemoryLedger::new();
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = dropped.clone();
    let svc = ServiceBuilder::new()
        .layer(
            QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token()),
        )
        .service(service_fn(move |_req: Request<PolicyBody>| {
            let dropped = flag.clone();
            async move {
                // An upstream that ignores `max_tokens`.
                Ok::<_, Infallible>(runaway(1000, dropped))
            }
        }));
    let cap = reserve + 30.0;
    let key = Arc::new(ApiKey::new("s").credit_limit_usd(cap, BudgetPeriod::Lifetime));
    let response = svc.oneshot(chat(&key, 10)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.into_body().collect().await.unwrap().to_bytes();
    let text = std::str::from_utf8(&text).unwrap();
    assert!(dropped.load(Ordering::SeqCst), "the upstream was dropped");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.len() < 100, "cut early: {} events", events.len());
    assert_eq!(events[events.len() - 1], "data: [DONE]");
    let error: Value =
        serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "insufficient_quota");
    // Every event before is a whole content chunk.
    for event in &events[..events.len() - 2] {
        let chunk: Value = serde_json::from_str(event.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(chunk["choices"][0]["delta"]["content"], " hello");
    }
    // Settled at what the stream was seen to cost: past the reservation, within the cap plus
    // the one chunk that crossed it.
    let spend = spent(&ledger, "s", BudgetPeriod::Lifetime).await;
    assert_eq!(spend.reserved_usd, 0.0);
    assert!(spend.spent_usd > reserve, "{} > {reserve}", spend.spent_usd);
    assert!(spend.spent_usd <= cap + 2.0, "{} <= {cap}", spend.spent_usd);
}

#[tokio::test]
async fn streams_are_not_cut_when_told_not_to() {
    let ledger = MemoryLedger::new();
    let svc = ServiceBuilder::new()
        .layer(
            QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new())
                .pricing(dollar_per_token())
                .cut_streams_at_cap(false),
        )
        .service(service_fn(move |_req: Request<PolicyBody>| async move {
            let dropped = Arc::default();
            Ok::<_, Infallible>(runaway(200, dropped))
        }));
    let key = Arc::new(ApiKey::new("s").credit_limit_usd(100.0, BudgetPeriod::Lifetime));
    let response = svc.oneshot(chat(&key, 10)).await.unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        text.split(|b| *b == b'\n')
            .filter(|l| l.starts_with(b"data: {"))
            .count(),
        199
    );
}

/// A request to `path` with `method` and a JSON `body` (empty: none), for `key`.
fn to(key: &Arc<ApiKey>, method: &str, path: &str, body: &str) -> Request<String> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .unwrap();
    req.extensions_mut().insert(key.clone());
    req
}

#[tokio::test]
async fn endpoints_whose_cost_is_billed_elsewhere_are_refused_to_limited_keys() {
    let h = harness(
        QuotaLayer::new(MemoryLedger::new(), MemoryRateLimiter::new()).pricing(dollar_per_token()),
        Reply::NoUsage,
    );
    let capped = Arc::new(ApiKey::new("c").credit_limit_usd(50.0, BudgetPeriod::Lifetime));
    let tokens = Arc::new(ApiKey::new("t").tpm(100));
    let out_of_band = [
        (
            "POST",
            "/v1/fine_tuning/jobs",
            r#"{"model":"gpt-4o","training_file":"file-1","hyperparameters":{"n_epochs":50}}"#,
        ),
        (
            "POST",
            "/v1/threads/thread_1/runs",
            r#"{"assistant_id":"asst_1","model":"gpt-4o"}"#,
        ),
        (
            "POST",
            "/v1/threads/runs",
            r#"{"assistant_id":"asst_1","model":"gpt-4o","thread":{"messages":[{"role":"user","content":"hi"}]}}"#,
        ),
        (
            "POST",
            "/v1/realtime/client_secrets",
            r#"{"session":{"type":"realtime","model":"gpt-4o"}}"#,
        ),
        ("POST", "/v1/realtime/sessions", r#"{"model":"gpt-4o"}"#),
        ("GET", "/v1/realtime?model=gpt-4o", ""),
    ];
    for key in [&capped, &tokens] {
        for (method, path, body) in out_of_band {
            let (status, _, error, rejection) = send(&h.svc, to(key, method, path, body)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {error}");
            assert_eq!(error["error"]["code"], "unverifiable_request", "{path}");
            assert_eq!(rejection.map(|r| r.layer.as_str()), Some("quota"));
        }
    }
    assert_eq!(
        h.calls.load(Ordering::SeqCst),
        0,
        "none reached the upstream"
    );

    // Reading and deleting stored objects, and the endpoints that report their own cost,
    // go on.
    for (method, path, body) in [
        ("GET", "/v1/files", ""),
        ("DELETE", "/v1/files/file-1", ""),
        ("GET", "/v1/fine_tuning/jobs/ftjob-1", ""),
        (
            "POST",
            "/v1/embeddings",
            r#"{"model":"gpt-4o","input":"hello"}"#,
        ),
    ] {
        let (status, _, error, _) = send(&h.svc, to(&capped, method, path, body)).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {error}");
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 4);
    // A key with only a request rate needs no cost: its requests are not refused for it.
    let rpm = Arc::new(ApiKey::new("r").rpm(100));
    let (status, ..) = send(
        &h.svc,
        to(&rpm, "POST", "/v1/fine_tuning/jobs", out_of_band[0].2),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn concurrent_streams_never_share_the_remaining_budget() {
    // 20 streams admitted together, each reserving little, whose upstream never stops: each
    // asks the ledger for more as it runs, so that together they stay within the cap.
    let ledger = MemoryLedger::new();
    let svc = ServiceBuilder::new()
        .layer(
            QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new()).pricing(dollar_per_token()),
        )
        .service(service_fn(move |_req: Request<PolicyBody>| async move {
            Ok::<_, Infallible>(runaway(100_000, Arc::default()))
        }));
    let cap = 1000.0;
    let key = Arc::new(ApiKey::new("s").credit_limit_usd(cap, BudgetPeriod::Lifetime));
    // All admitted before any is read.
    let mut bodies = Vec::new();
    for _ in 0..20 {
        let response = svc.clone().oneshot(chat(&key, 10)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        bodies.push(response.into_body());
    }
    let read: Vec<_> = bodies
        .into_iter()
        .map(|body| tokio::spawn(async move { body.collect().await.unwrap().to_bytes() }))
        .collect();
    for task in read {
        let text = task.await.unwrap();
        assert!(text.ends_with(b"data: [DONE]\n\n"), "every stream is cut");
    }
    let spend = spent(&ledger, "s", BudgetPeriod::Lifetime).await;
    assert_eq!(spend.reserved_usd, 0.0);
    // Each stream may pass what it holds by the one event that crossed it.
    assert!(
        spend.spent_usd <= cap + 20.0 * 2.0,
        "{} spent against a cap of {cap}",
        spend.spent_usd
    );
}

/// An SSE stream of 2,000 events of `data: {event}`, never reporting usage.
struct Repeat {
    event: Bytes,
    left: usize,
}

impl http_body::Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.event.clone()))))
    }
}

#[tokio::test]
async fn every_kind_of_streamed_output_is_metered() {
    // Output in fields other than `delta.content`: each stream must be cut before its end.
    for delta in [
        r#"{"function_call":{"arguments":"{\"city\": \"Paris\", \"unit\": \"c\"}"}}"#,
        r#"{"content":[{"type":"text","text":"hello there, friend"}]}"#,
        r#"{"reasoning_content":"Let me think about this carefully."}"#,
        r#"{"audio":{"id":"audio_1","transcript":"hello there, how are you"}}"#,
        r#"{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"a\": 1, \"b\": 2}"}}]}"#,
    ] {
        let event = Bytes::from(format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{delta}}}]}}\n\n"
        ));
        let ledger = MemoryLedger::new();
        let svc = ServiceBuilder::new()
            .layer(
                QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new())
                    .pricing(dollar_per_token()),
            )
            .service(service_fn(move |_req: Request<PolicyBody>| {
                let event = event.clone();
                async move {
                    let mut response = Response::new(Repeat { event, left: 2000 });
                    response
                        .headers_mut()
                        .insert("content-type", "text/event-stream".parse().unwrap());
                    Ok::<_, Infallible>(response)
                }
            }));
        let key = Arc::new(ApiKey::new("m").credit_limit_usd(300.0, BudgetPeriod::Lifetime));
        let response = svc.oneshot(chat(&key, 10)).await.unwrap();
        let text = response.into_body().collect().await.unwrap().to_bytes();
        let events = text
            .split(|b| *b == b'\n')
            .filter(|l| l.starts_with(b"data: {\"choices\""))
            .count();
        assert!(events < 2000, "{delta}: not cut ({events} events)");
        assert!(
            text.ends_with(b"data: [DONE]\n\n"),
            "{delta}: cut with [DONE]"
        );
    }
}

#[tokio::test]
async fn images_and_audio_priced_apart_are_refused_to_limited_keys() {
    let h = harness(
        QuotaLayer::new(MemoryLedger::new(), MemoryRateLimiter::new()).pricing(dollar_per_token()),
        Reply::NoUsage,
    );
    let capped = Arc::new(ApiKey::new("c").credit_limit_usd(1000.0, BudgetPeriod::Lifetime));
    for (path, body) in [
        (
            "/v1/responses",
            r#"{"model":"gpt-4o","input":"draw a cat","max_output_tokens":16,"tools":[{"type":"image_generation","quality":"high"}]}"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","max_tokens":16,"modalities":["text","audio"],"audio":{"voice":"alloy","format":"wav"},"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    ] {
        let (status, _, error, _) = send(&h.svc, to(&capped, "POST", path, body)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {error}");
        assert_eq!(error["error"]["code"], "unverifiable_request");
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    // The same requests without images or audio go on.
    let (status, ..) = send(
        &h.svc,
        to(
            &capped,
            "POST",
            "/v1/responses",
            r#"{"model":"gpt-4o","input":"describe a cat","max_output_tokens":16}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_team_cap_is_shared_by_the_keys_of_the_team() {
    let reserve = reservation_of(100).await;
    let ledger = MemoryLedger::new();
    // Room for three requests' usage (30 each) and one reservation on top.
    let team_cap = 90.0 + reserve - 1.0;
    let layer = QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new())
        .pricing(dollar_per_token())
        .team_cap("research", team_cap, BudgetPeriod::Monthly);
    let h = harness(layer, Reply::Json(10, 20));
    let alice = Arc::new(ApiKey::new("alice").team("research"));
    let bob = Arc::new(
        ApiKey::new("bob")
            .team("research")
            .credit_limit_usd(1e6, BudgetPeriod::Lifetime),
    );
    let carol = Arc::new(ApiKey::new("carol").team("sales"));
    for key in [&alice, &bob, &alice] {
        assert_eq!(send(&h.svc, chat(key, 100)).await.0, StatusCode::OK);
    }
    let team = ledger
        .spent(&team_account("research"), BudgetPeriod::Monthly)
        .await
        .unwrap();
    assert_eq!((team.spent_usd, team.reserved_usd), (90.0, 0.0));
    // The team is full for either key; the refusal names the team.
    for key in [&alice, &bob] {
        let (status, headers, body, _) = send(&h.svc, chat(key, 100)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers["x-should-retry"], "false");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("team `research`"), "{message}");
        assert!(message.contains("monthly spend cap"), "{message}");
    }
    assert_eq!(h.calls.load(Ordering::SeqCst), 3);
    // Bob's own reservation was released when the team refused: his spend is his one request.
    let bob_spend = spent(&ledger, "bob", BudgetPeriod::Lifetime).await;
    assert_eq!((bob_spend.spent_usd, bob_spend.reserved_usd), (30.0, 0.0));
    // A key of a team without a cap, and a key of no team, are not limited by it.
    assert_eq!(send(&h.svc, chat(&carol, 100)).await.0, StatusCode::OK);
    let loner = Arc::new(ApiKey::new("loner"));
    let (status, headers, ..) = send(&h.svc, chat(&loner, 100)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-ratelimit-limit-requests").is_none());
    // A key's own cap still applies inside its team.
    let tight = Arc::new(
        ApiKey::new("tight")
            .team("sales")
            .credit_limit_usd(1.0, BudgetPeriod::Lifetime),
    );
    let (status, _, body, _) = send(&h.svc, chat(&tight, 100)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("this key's spend cap"));
}

#[tokio::test]
async fn a_team_capped_key_is_refused_unpriced_models_and_unverifiable_requests() {
    let layer = QuotaLayer::new(MemoryLedger::new(), MemoryRateLimiter::new())
        .pricing(dollar_per_token())
        .team_cap("research", 1000.0, BudgetPeriod::Lifetime);
    let h = harness(layer, Reply::Json(10, 20));
    let key = Arc::new(ApiKey::new("k").team("research"));
    let (status, _, body, _) = send(&h.svc, chat_model(&key, "mystery-model", 10)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("team `research` has a spend cap"));
    let (status, _, body, _) = send(
        &h.svc,
        to(
            &key,
            "POST",
            "/v1/batches",
            r#"{"input_file_id":"f","endpoint":"/v1/chat/completions","completion_window":"24h"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_stream_is_cut_at_its_team_cap() {
    let reserve = reservation_of(10).await;
    let ledger = MemoryLedger::new();
    let svc = ServiceBuilder::new()
        .layer(
            QuotaLayer::new(ledger.clone(), MemoryRateLimiter::new())
                .pricing(dollar_per_token())
                .team_cap("t", reserve + 30.0, BudgetPeriod::Lifetime),
        )
        .service(service_fn(move |_req: Request<PolicyBody>| async move {
            Ok::<_, Infallible>(runaway(1000, Arc::default()))
        }));
    // The key's own cap is far away: the team's cuts the stream.
    let key = Arc::new(
        ApiKey::new("k")
            .team("t")
            .credit_limit_usd(1e6, BudgetPeriod::Lifetime),
    );
    let response = svc.oneshot(chat(&key, 10)).await.unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    let text = std::str::from_utf8(&text).unwrap();
    assert!(text.contains("insufficient_quota"));
    assert!(text.ends_with("data: [DONE]\n\n"));
    let team = ledger
        .spent(&team_account("t"), BudgetPeriod::Lifetime)
        .await
        .unwrap();
    let own = spent(&ledger, "k", BudgetPeriod::Lifetime).await;
    assert_eq!(team.reserved_usd, 0.0);
    assert!(
        team.spent_usd > reserve && team.spent_usd <= reserve + 32.0,
        "{team:?}"
    );
    // Both were settled at the same cost.
    assert_eq!(own.spent_usd, team.spent_usd);
}

/// A ledger that answers `extend` only after a pause, as one on a network does.
#[derive(Clone)]
struct Slow(MemoryLedger);

impl SpendLedger for Slow {
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        amount_usd: f64,
        cap_usd: f64,
        period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Reservation, ReserveError>> {
        self.0.reserve(key, amount_usd, cap_usd, period)
    }
    fn settle(&self, id: &ReservationId, actual_usd: f64) {
        self.0.settle(id, actual_usd)
    }
    fn extend(&self, id: &ReservationId, more_usd: f64, cap_usd: f64) -> BoxFuture<'static, bool> {
        let answer = self.0.extend(id, more_usd, cap_usd);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            answer.await
        })
    }
    fn spent<'a>(
        &'a self,
        key: &'a str,
        period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Spend, StoreError>> {
        self.0.spent(key, period)
    }
}

#[tokio::test]
async fn a_stream_waits_for_a_slow_ledger_to_grant_more_and_loses_nothing() {
    let reserve = reservation_of(10).await;
    let ledger = MemoryLedger::new();
    let svc = ServiceBuilder::new()
        .layer(
            QuotaLayer::new(Slow(ledger.clone()), MemoryRateLimiter::new())
                .pricing(dollar_per_token()),
        )
        .service(service_fn(move |_req: Request<PolicyBody>| async move {
            Ok::<_, Infallible>(runaway(300, Arc::default()))
        }));
    // Room for the whole stream, granted bit by bit: every chunk arrives, in order.
    let key = Arc::new(ApiKey::new("s").credit_limit_usd(1e6, BudgetPeriod::Lifetime));
    let response = svc.clone().oneshot(chat(&key, 10)).await.unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    let text = std::str::from_utf8(&text).unwrap();
    assert!(!text.contains("insufficient_quota"));
    assert_eq!(text.matches(" hello").count(), 299);
    // A cap that stops it: cut as with a fast ledger.
    let key = Arc::new(ApiKey::new("t").credit_limit_usd(reserve + 30.0, BudgetPeriod::Lifetime));
    let response = svc.oneshot(chat(&key, 10)).await.unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    let text = std::str::from_utf8(&text).unwrap();
    assert!(text.contains("insufficient_quota"));
    assert!(text.matches(" hello").count() < 100);
    let spend = spent(&ledger, "t", BudgetPeriod::Lifetime).await;
    assert_eq!(spend.reserved_usd, 0.0);
}
