//! Faults in the parts a user plugs in — the key store and the audit sink — over a test inner
//! service: a store that fails, hangs or panics is answered 503 `policy_unavailable`, never a
//! hang nor a dropped connection, with one audit record; a sink that is slow, fails or panics
//! never touches the request.

mod common;

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{answer, chat, post, with_key, Inner};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::flag;
use tower_llm_policy::audit::{AuditLayer, FanOut, FnSink, JsonlSink, MemorySink, Outcome};
use tower_llm_policy::keys::{ApiKey, BoxFuture, KeyDigest, KeyStore, MemoryKeyStore, StoreError};
use tower_llm_policy::{FeatureBlockLayer, KeyAuthLayer, PolicyBody};

const KEY: &str = "sk-faults-good-0123456789";

/// Every test is bounded: a hang is a failure, not a stuck test run.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("answered in time, not hung")
}

/// How a test store misbehaves.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Answers from memory at once (`lookup_now`), or through `lookup` when `false`.
    Works { now: bool },
    /// `lookup_now` returns an error.
    ErrorNow,
    /// The `lookup` future resolves to an error.
    ErrorLater,
    /// `lookup` never resolves.
    Hangs,
    /// `lookup` answers after this long.
    Slow(Duration),
    /// `lookup_now` panics.
    PanicNow,
    /// `lookup` panics when called (before making its future).
    PanicInLookup,
    /// The `lookup` future panics when polled.
    PanicInFuture,
}

/// A real store (a `MemoryKeyStore`) behind a fault.
struct FaultyStore {
    keys: MemoryKeyStore,
    fault: Fault,
    lookups: AtomicUsize,
}

fn store(fault: Fault) -> Arc<FaultyStore> {
    Arc::new(FaultyStore {
        keys: MemoryKeyStore::new().with_key(KEY, ApiKey::new("good")),
        fault,
        lookups: AtomicUsize::new(0),
    })
}

impl KeyStore for FaultyStore {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        match self.fault {
            Fault::PanicInLookup => panic!("store bug in lookup"),
            Fault::PanicInFuture => Box::pin(async { panic!("store bug in the future") }),
            Fault::Hangs => Box::pin(std::future::pending()),
            Fault::ErrorLater => Box::pin(async { Err(StoreError::new("database unreachable")) }),
            Fault::Slow(after) => Box::pin(async move {
                tokio::time::sleep(after).await;
                Ok(self.keys.get(digest))
            }),
            _ => Box::pin(async move { Ok(self.keys.get(digest)) }),
        }
    }

    fn lookup_now(&self, digest: &KeyDigest) -> Option<Result<Option<Arc<ApiKey>>, StoreError>> {
        match self.fault {
            Fault::Works { now: true } => Some(Ok(self.keys.get(digest))),
            Fault::ErrorNow => Some(Err(StoreError::new("cache poisoned"))),
            Fault::PanicNow => panic!("store bug in lookup_now"),
            _ => None,
        }
    }
}

/// Audit, then KeyAuth (with a lookup timeout of `timeout`), over the test inner service.
fn stack(
    store: Arc<FaultyStore>,
    timeout: Option<Duration>,
    sink: MemorySink,
    inner: &Inner,
) -> impl Service<
    Request<String>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = impl std::fmt::Debug>>,
    Error = std::convert::Infallible,
> + Clone {
    let mut key_auth = KeyAuthLayer::new(store);
    if let Some(timeout) = timeout {
        // `lookup_timeout` (feature `tokio`) is this; see `lookup_timeout_uses_tokio`.
        key_auth = key_auth.lookup_timeout_with(timeout, |d| Box::pin(tokio::time::sleep(d)));
    }
    ServiceBuilder::new()
        .layer(AuditLayer::new(sink))
        .layer(key_auth)
        .service(inner.service())
}

/// One request with the good key through a stack over a store with `fault`: the answer and the
/// one record it left.
async fn through(fault: Fault, timeout: Option<Duration>) -> (common::Answer, MemorySink, Inner) {
    let sink = MemorySink::new();
    let inner = Inner::default();
    let svc = stack(store(fault), timeout, sink.clone(), &inner);
    let res = bounded(svc.oneshot(with_key(post("/v1/chat/completions", chat("gpt-4o")), KEY)))
        .await
        .unwrap();
    (answer(res).await, sink, inner)
}

/// A 503 `policy_unavailable` in the OpenAI shape, one record with `flag`, nothing upstream.
fn assert_unavailable(answer: &common::Answer, sink: &MemorySink, inner: &Inner, flag: &str) {
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let (code, message) = answer.error();
    assert_eq!(code, "policy_unavailable");
    assert_eq!(answer.json()["error"]["type"], "server_error");
    assert!(!message.contains(KEY));
    assert_eq!(inner.calls(), 0, "nothing reaches the inner service");
    let records = sink.records();
    assert_eq!(records.len(), 1, "exactly one record: {records:?}");
    let record = &records[0];
    assert_eq!(record.outcome, Outcome::Rejected);
    assert_eq!(record.status, Some(503));
    assert_eq!(record.blocked_by.as_deref(), Some("key_auth"));
    assert_eq!(record.code.as_deref(), Some("policy_unavailable"));
    assert!(record.flags.iter().any(|f| f == flag), "{:?}", record.flags);
}

#[tokio::test]
async fn working_stores_admit_the_key_both_ways() {
    for now in [true, false] {
        let (answer, sink, inner) = through(Fault::Works { now }, None).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(inner.calls(), 1);
        assert_eq!(sink.len(), 1);
        assert_eq!(sink.last().unwrap().outcome, Outcome::Completed);
    }
}

#[tokio::test]
async fn store_error_at_once_is_a_503() {
    let (answer, sink, inner) = through(Fault::ErrorNow, None).await;
    assert_unavailable(&answer, &sink, &inner, flag::KEY_STORE_ERROR);
}

#[tokio::test]
async fn store_error_from_its_future_is_a_503() {
    let (answer, sink, inner) = through(Fault::ErrorLater, None).await;
    assert_unavailable(&answer, &sink, &inner, flag::KEY_STORE_ERROR);
}

#[tokio::test]
async fn hanging_store_times_out_with_a_503() {
    let started = Instant::now();
    let (answer, sink, inner) = through(Fault::Hangs, Some(Duration::from_millis(200))).await;
    let took = started.elapsed();
    assert_unavailable(&answer, &sink, &inner, flag::KEY_STORE_TIMEOUT);
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn hanging_store_without_a_timeout_holds_the_request() {
    // What the timeout is for: without one, the request waits on the store.
    let sink = MemorySink::new();
    let inner = Inner::default();
    let svc = stack(store(Fault::Hangs), None, sink.clone(), &inner);
    let req = with_key(post("/v1/chat/completions", chat("gpt-4o")), KEY);
    let waited = tokio::time::timeout(Duration::from_millis(300), svc.oneshot(req)).await;
    assert!(waited.is_err(), "no answer without a timeout");
    // The request future was dropped: the client went away, one record says so.
    assert_eq!(sink.len(), 1);
    assert_eq!(sink.last().unwrap().outcome, Outcome::Cancelled);
}

#[tokio::test]
async fn slow_store_within_the_timeout_is_fine() {
    let (answer, sink, inner) = through(
        Fault::Slow(Duration::from_millis(20)),
        Some(Duration::from_secs(5)),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(inner.calls(), 1);
    assert_eq!(sink.last().unwrap().key.as_deref(), Some("good"));
    let flags = sink.last().unwrap().flags;
    assert!(
        !flags.iter().any(|f| f.starts_with("key_store")),
        "{flags:?}"
    );
}

#[tokio::test]
async fn slow_store_past_the_timeout_is_a_503() {
    let (answer, sink, inner) = through(
        Fault::Slow(Duration::from_secs(30)),
        Some(Duration::from_millis(100)),
    )
    .await;
    assert_unavailable(&answer, &sink, &inner, flag::KEY_STORE_TIMEOUT);
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn lookup_timeout_uses_tokio() {
    let sink = MemorySink::new();
    let inner = Inner::default();
    let layer = KeyAuthLayer::new(store(Fault::Hangs)).lookup_timeout(Duration::from_millis(50));
    assert_eq!(layer.timeout(), Some(Duration::from_millis(50)));
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .layer(layer)
        .service(inner.service());
    let req = with_key(post("/v1/chat/completions", chat("gpt-4o")), KEY);
    let res = bounded(svc.oneshot(req)).await.unwrap();
    let answer = answer(res).await;
    assert_unavailable(&answer, &sink, &inner, flag::KEY_STORE_TIMEOUT);
}

#[tokio::test]
async fn the_sleep_hook_is_any_runtimes() {
    // `lookup_timeout_with`: the timer comes from the caller (here a thread, no tokio timer).
    let sink = MemorySink::new();
    let inner = Inner::default();
    let hooks = Arc::new(AtomicUsize::new(0));
    let counted = hooks.clone();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .layer(KeyAuthLayer::new(store(Fault::Hangs)).lookup_timeout_with(
            Duration::from_millis(50),
            move |after| {
                counted.fetch_add(1, Ordering::SeqCst);
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                std::thread::spawn(move || {
                    std::thread::sleep(after);
                    let _ = tx.send(());
                });
                Box::pin(async move {
                    let _ = rx.await;
                })
            },
        ))
        .service(inner.service());
    let res = bounded(svc.oneshot(with_key(post("/v1/chat/completions", chat("gpt-4o")), KEY)))
        .await
        .unwrap();
    let answer = answer(res).await;
    assert_unavailable(&answer, &sink, &inner, flag::KEY_STORE_TIMEOUT);
    assert_eq!(hooks.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn panic_in_lookup_now_is_contained() {
    let (answer, sink, inner) = through(Fault::PanicNow, None).await;
    assert_unavailable(&answer, &sink, &inner, flag::KEY_STORE_PANIC);
}

#[tokio::test]
async fn panic_in_lookup_is_contained() {
    let (answer, sink, inner) = through(Fault::PanicInLookup, Some(Duration::from_secs(5))).await;
    assert_unavailable(&answer, &sink, &inner, flag::KEY_STORE_PANIC);
}

#[tokio::test]
async fn panic_in_the_lookup_future_is_contained() {
    let (answer, sink, inner) = through(Fault::PanicInFuture, None).await;
    assert_unavailable(&answer, &sink, &inner, flag::KEY_STORE_PANIC);
}

#[tokio::test]
async fn the_service_answers_on_after_a_store_panic() {
    let sink = MemorySink::new();
    let inner = Inner::default();
    let faulty = store(Fault::PanicInFuture);
    let mut svc = stack(faulty.clone(), None, sink.clone(), &inner);
    for _ in 0..3 {
        let req = with_key(post("/v1/chat/completions", chat("gpt-4o")), KEY);
        let res = bounded(svc.ready().await.unwrap().call(req)).await.unwrap();
        assert_eq!(answer(res).await.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(faulty.lookups.load(Ordering::SeqCst), 3);
    assert_eq!(sink.len(), 3);
    // An unknown key never reaches the store's error path: still 401, not 503.
    let req = with_key(
        post("/v1/chat/completions", chat("gpt-4o")),
        "sk-wrong-000000000",
    );
    let good = stack(
        store(Fault::Works { now: true }),
        None,
        sink.clone(),
        &inner,
    );
    let res = bounded(good.oneshot(req)).await.unwrap();
    assert_eq!(answer(res).await.status, StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------------------------------------
// Sinks

/// A response body of several frames, one per poll.
struct Frames(std::collections::VecDeque<Bytes>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// An inner service that streams a chat completion (SSE, with its usage chunk), one event a
/// frame.
fn streaming_inner() -> impl Service<
    Request<PolicyBody>,
    Response = Response<Frames>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|req: Request<PolicyBody>| async move {
        req.into_body().collect().await.unwrap();
        let events = [
            r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"lo"}}]}"#,
            r#"data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#,
            "data: [DONE]",
        ];
        let frames = events
            .iter()
            .map(|e| Bytes::from(format!("{e}\n\n")))
            .collect();
        let mut res = Response::new(Frames(frames));
        res.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        Ok::<_, std::convert::Infallible>(res)
    })
}

fn stream_request() -> Request<String> {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "messages": [{"role": "user", "content": "Hello there"}],
    });
    with_key(post("/v1/chat/completions", body.to_string()), KEY)
}

fn good_store() -> Arc<MemoryKeyStore> {
    Arc::new(MemoryKeyStore::new().with_key(KEY, ApiKey::new("good")))
}

#[tokio::test]
async fn panicking_sink_leaves_every_response_whole() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let layer = AuditLayer::new(FnSink::new(move |_record| {
        counted.fetch_add(1, Ordering::SeqCst);
        panic!("sink bug");
    }));
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(KeyAuthLayer::new(good_store()))
        .service(streaming_inner());

    // Read to the end (the record is emitted in `poll_frame`).
    let res = bounded(svc.clone().oneshot(stream_request()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = bounded(res.into_body().collect()).await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains("Hel") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );

    // A rejection (the record is emitted with the response head).
    let res = bounded(
        svc.clone()
            .oneshot(with_key(stream_request(), "sk-unknown-0000000000")),
    )
    .await
    .unwrap();
    assert_eq!(answer(res).await.status, StatusCode::UNAUTHORIZED);

    // Dropped half read (the record is emitted in `Drop`: a panic there would abort).
    let res = bounded(svc.clone().oneshot(stream_request()))
        .await
        .unwrap();
    let mut body = res.into_body();
    let first = bounded(body.frame()).await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);

    // The future dropped before the response (the record is emitted in the future's `Drop`).
    let never = service_fn(|_req: Request<PolicyBody>| {
        std::future::pending::<Result<Response<String>, std::convert::Infallible>>()
    });
    let pending = ServiceBuilder::new().layer(layer.clone()).service(never);
    let waited =
        tokio::time::timeout(Duration::from_millis(50), pending.oneshot(stream_request())).await;
    assert!(waited.is_err());

    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "the sink was called once each"
    );
    assert_eq!(layer.sink_panics(), 4, "and each panic was counted");
}

#[tokio::test]
async fn a_panicking_sink_in_a_fan_out_does_not_starve_the_others() {
    let memory = MemorySink::new();
    let layer = AuditLayer::new(
        FanOut::new()
            .with(FnSink::new(|_record| panic!("first sink bug")))
            .with(memory.clone()),
    );
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .layer(KeyAuthLayer::new(good_store()))
        .service(streaming_inner());
    let res = bounded(svc.oneshot(stream_request())).await.unwrap();
    bounded(res.into_body().collect()).await.unwrap();
    assert_eq!(memory.len(), 1);
    let record = memory.last().unwrap();
    assert_eq!(record.outcome, Outcome::Completed);
    assert_eq!(record.total_tokens, Some(9));
    assert_eq!(layer.sink_panics(), 1);
}

/// A writer that blocks every write until the gate opens.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
}

impl Write for Gate {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (open, cv) = &*self.0;
        let mut open = open.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_stalled_sink_neither_slows_requests_nor_grows() {
    const REQUESTS: usize = 40;
    let gate = Gate::default();
    let sink = JsonlSink::builder()
        .queue_capacity(4)
        .buffer_size(0)
        .writer(gate.clone())
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .layer(KeyAuthLayer::new(good_store()))
        .service(streaming_inner());
    let started = Instant::now();
    for _ in 0..REQUESTS {
        let res = bounded(svc.clone().oneshot(stream_request()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        bounded(res.into_body().collect()).await.unwrap();
    }
    let took = started.elapsed();
    // The writer has not written a byte: the requests did not wait for it.
    assert!(
        took < Duration::from_secs(5),
        "{REQUESTS} requests took {took:?}"
    );
    assert_eq!(sink.written(), 0);
    // The queue (4) and the line the writer holds are all it kept; the rest was dropped.
    let dropped = sink.dropped();
    assert!(
        dropped >= (REQUESTS - 5) as u64 && dropped <= REQUESTS as u64,
        "dropped {dropped}"
    );
    gate.open();
    let flushed = tokio::task::spawn_blocking({
        let sink = sink.clone();
        move || sink.flush()
    });
    bounded(flushed).await.unwrap().unwrap();
    assert_eq!(sink.written() + sink.dropped(), REQUESTS as u64);
}

/// A writer whose every write fails.
struct Broken;

impl Write for Broken {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::other("disk full"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Err(io::Error::other("disk full"))
    }
}

#[tokio::test]
async fn a_failing_sink_counts_its_errors_and_requests_go_on() {
    let sink = JsonlSink::builder().buffer_size(0).writer(Broken).unwrap();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .layer(KeyAuthLayer::new(good_store()))
        .service(streaming_inner());
    for _ in 0..5 {
        let res = bounded(svc.clone().oneshot(stream_request()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = bounded(res.into_body().collect()).await.unwrap().to_bytes();
        assert!(body.ends_with(b"data: [DONE]\n\n"));
    }
    let flushed = tokio::task::spawn_blocking({
        let sink = sink.clone();
        move || sink.flush()
    });
    assert!(bounded(flushed).await.unwrap().is_err(), "the flush fails");
    assert_eq!(sink.written(), 0);
    assert!(sink.write_errors() >= 5, "{}", sink.write_errors());
}

// ---------------------------------------------------------------------------------------------
// A request body that fails mid-read

/// A request body that sends its first half, then fails (the client went away).
struct HalfBody(Option<Bytes>);

impl http_body::Body for HalfBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        std::task::Poll::Ready(Some(match self.0.take() {
            Some(half) => Ok(Frame::data(half)),
            None => Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")),
        }))
    }
}

#[tokio::test]
async fn a_body_failing_mid_read_is_recorded_cancelled_not_rejected() {
    let sink = MemorySink::new();
    let inner = Inner::default();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .layer(KeyAuthLayer::new(good_store()))
        .layer(FeatureBlockLayer::new())
        .service(inner.service());
    let half = Bytes::from_static(br#"{"model":"gpt-4o","messa"#);
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(HalfBody(Some(half.clone())))
        .unwrap();
    let res = bounded(svc.clone().oneshot(req)).await.unwrap();
    let got = answer(res).await;
    // Whoever is still there gets an OpenAI-shaped 400, never a 500.
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.error().0, "invalid_request_body");
    assert_eq!(inner.calls(), 0);
    let record = sink.take().pop().unwrap();
    assert_eq!(record.outcome, Outcome::Cancelled);
    assert_eq!(record.key.as_deref(), Some("good"));
    assert_eq!(record.flags, [flag::REQUEST_BODY_UNREADABLE]);
    assert_eq!(record.blocked_by.as_deref(), Some("request_body"));

    // The same half body, complete but invalid JSON, is the client's mistake: a rejection.
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(String::from_utf8(half.to_vec()).unwrap())
        .unwrap();
    let res = bounded(svc.oneshot(req)).await.unwrap();
    assert_eq!(answer(res).await.status, StatusCode::BAD_REQUEST);
    let record = sink.take().pop().unwrap();
    assert_eq!(record.outcome, Outcome::Rejected);
    assert_eq!(record.flags, [flag::BLOCKED]);
}
