//! Slow and greedy clients: a request body that stalls, that takes too long in all, or that
//! would overfill the server's budget of bytes held for request bodies is cut off, and the
//! request is answered with an OpenAI-shaped error (408 or 503) and the connection closed.
//!
//! The server wraps every request body in a [`ReadTimeoutBody`], with the request's
//! [`BodyState`] (also in its extensions):
//! - whenever whoever reads the body (a policy layer, or the forwarding client on its way
//!   upstream) waits for the client longer than `body_read_timeout` without a frame coming,
//!   the body ends with a [`BodyReadTimeout`] error. The time the reader itself takes between
//!   two reads does not count: only time spent waiting on the client;
//! - whenever the reader waits for the client past `body_total_timeout` after the request
//!   started (a client trickling a byte just often enough never stalls), the body ends with a
//!   [`BodyTotalTimeout`] error. Both deadlines share one timer, armed only when a read finds
//!   nothing (no timer, no allocation for a frame that is ready);
//! - every data frame's bytes are charged to the server's [`BodyBudget`] as they come; a
//!   frame that would take it over its limit ends the body with a [`BodyOverBudget`] error.
//!   The charge is the request's until the request is answered (see [`BodyBudget`]).
//!
//! The [`BodyState`] records which of these happened. [`BodyTimeoutLayer`], right inside the
//! audit layer, then answers that request with a 408 `request_timeout` (a stall or the total
//! deadline) or a 503 `server_overloaded` with `Retry-After: 1` (the budget), whatever the
//! reader made of the failed body (a policy layer's 400, the forwarder's 502). The answer is
//! marked `Connection: close` on HTTP/1 so that hyper closes the connection after it (the
//! rest of the body may still come), and carries a [`Rejection`] for the audit record
//! (`blocked_by: "server"`). The request leaves exactly one audit record, that answer's. The
//! layer's future also gives the request's charge back to the budget once the answer's head is
//! produced, or when it is dropped (the client went away).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::Service;
use tower_layer::Layer;
use tower_llm_policy::{LayerName, Rejection};

/// The `code` of the 408.
pub const REQUEST_TIMEOUT_CODE: &str = "request_timeout";

/// The `code` of the 503 of a full [`BodyBudget`].
pub const SERVER_OVERLOADED_CODE: &str = "server_overloaded";

/// The layer name the 408's and 503's [`Rejection`] carries (`blocked_by` of its audit
/// record).
pub const SERVER_LAYER: &str = "server";

/// Why a request body was cut off (see [`BodyState::failure`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFailure {
    /// It stalled for `body_read_timeout`, or was not all there by `body_total_timeout`: 408.
    TimedOut,
    /// Its bytes would have taken the [`BodyBudget`] over its limit: 503.
    OverBudget,
}

const NO_FAILURE: u8 = 0;
const TIMED_OUT: u8 = 1;
const OVER_BUDGET: u8 = 2;

/// The bytes held for request bodies, server-wide: `[server] max_body_bytes_in_flight`.
///
/// Every request body's bytes are charged to it as they arrive (by [`ReadTimeoutBody`]); a
/// request's charge is given back when the request is answered (its response head produced)
/// or abandoned (its future dropped, as when the client goes away mid-body), by
/// [`BodyTimeoutLayer`]'s future, not by the body: the policy layers buffer the body into
/// `Bytes` and drop the original body long before the request is done with those bytes. The
/// charge is cumulative: a multipart upload streamed on upstream as it comes is charged for
/// everything it sent, although the proxy no longer holds it (a conservative count).
///
/// A plain atomic counter rather than a [`tokio::sync::Semaphore`] of bytes: a frame that does
/// not fit is refused at once, never waited for (waiting would hold the connection and the
/// bytes already received, which is what the budget is there to bound), so a semaphore's
/// queue of waiters would go unused; a compare-and-swap never blocks, has no `u32` limit on
/// one charge (`Semaphore::try_acquire_many`), and costs one atomic operation per frame. A
/// frame larger than the whole budget is simply refused, like any frame that does not fit.
#[derive(Clone, Debug)]
pub struct BodyBudget(Arc<BudgetInner>);

#[derive(Debug)]
struct BudgetInner {
    limit: usize,
    in_flight: AtomicUsize,
}

impl BodyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        BodyBudget(Arc::new(BudgetInner {
            limit,
            in_flight: AtomicUsize::new(0),
        }))
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// The bytes charged now.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::Acquire)
    }

    /// Charges `n` bytes if they fit.
    fn try_charge(&self, n: usize) -> bool {
        let limit = self.0.limit;
        self.0
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.0.in_flight.fetch_sub(n, Ordering::AcqRel);
        }
    }
}

/// A request's body, as the server sees it: whether (and why) it was cut off, and what it has
/// charged to the [`BodyBudget`]. In the request's extensions; clones share it.
#[derive(Clone, Debug, Default)]
pub struct BodyState(Arc<StateInner>);

#[derive(Debug, Default)]
struct StateInner {
    failure: AtomicU8,
    budget: Option<BodyBudget>,
    charge: Mutex<Charge>,
}

/// The bytes a request holds of the budget; none more once it is released.
#[derive(Debug, Default)]
struct Charge {
    held: usize,
    released: bool,
}

impl BodyState {
    /// A request's state, its bytes charged to `budget` (if any).
    pub fn new(budget: Option<BodyBudget>) -> Self {
        BodyState(Arc::new(StateInner {
            failure: AtomicU8::new(NO_FAILURE),
            budget,
            charge: Mutex::new(Charge::default()),
        }))
    }

    /// Why the body was cut off, if it was.
    pub fn failure(&self) -> Option<BodyFailure> {
        match self.0.failure.load(Ordering::Acquire) {
            TIMED_OUT => Some(BodyFailure::TimedOut),
            OVER_BUDGET => Some(BodyFailure::OverBudget),
            _ => None,
        }
    }

    /// The bytes this request holds of the budget now.
    pub fn held(&self) -> usize {
        self.0.charge.lock().map(|c| c.held).unwrap_or(0)
    }

    fn fail(&self, why: u8) {
        // The first failure is the one answered.
        let _ =
            self.0
                .failure
                .compare_exchange(NO_FAILURE, why, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Charges `n` more bytes; `false` if the budget has no room for them. Bytes that come
    /// after the request was answered are not charged (nobody holds them for it).
    fn charge(&self, n: usize) -> bool {
        let Some(budget) = &self.0.budget else {
            return true;
        };
        let Ok(mut charge) = self.0.charge.lock() else {
            return true;
        };
        if charge.released {
            return true;
        }
        if !budget.try_charge(n) {
            return false;
        }
        charge.held += n;
        true
    }

    /// Gives the request's charge back; idempotent.
    pub fn release(&self) {
        self.0.release();
    }
}

impl StateInner {
    fn release(&self) {
        let Some(budget) = &self.budget else {
            return;
        };
        // A poisoned lock still holds a valid count (nothing panics while holding it).
        let mut charge = match self.charge.lock() {
            Ok(charge) => charge,
            Err(poisoned) => poisoned.into_inner(),
        };
        charge.released = true;
        budget.release(std::mem::take(&mut charge.held));
    }
}

impl Drop for StateInner {
    fn drop(&mut self) {
        // Should the layer's future never have run (a stack without it), the charge still
        // comes back when the last holder of the request's state lets go.
        self.release();
    }
}

/// The error a stalled body ends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyReadTimeout(pub Duration);

impl fmt::Display for BodyReadTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the client sent no request body data for {:?}", self.0)
    }
}

impl StdError for BodyReadTimeout {}

/// The error a body ends with when it is not all there `body_total_timeout` after the
/// request started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyTotalTimeout(pub Duration);

impl fmt::Display for BodyTotalTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the client did not send the request body within {:?}",
            self.0
        )
    }
}

impl StdError for BodyTotalTimeout {}

/// The error a body ends with when its next frame does not fit in the [`BodyBudget`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyOverBudget {
    /// The frame's size.
    pub frame: usize,
    /// The budget's limit.
    pub limit: usize,
}

impl fmt::Display for BodyOverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} more request body bytes would take the server over its {} bytes in flight",
            self.frame, self.limit
        )
    }
}

impl StdError for BodyOverBudget {}

pin_project! {
    /// A request body cut off when its reader waits on the client for longer than the read
    /// timeout, or past the total deadline, or when its bytes do not fit in the
    /// [`BodyBudget`]. See the [module docs](self).
    pub struct ReadTimeoutBody<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        // `body_total_timeout`, and when it runs out (none: never).
        total: Duration,
        total_deadline: Option<Instant>,
        // Armed when a read finds nothing; disarmed when a frame comes. One timer for both
        // deadlines, allocated the first time a read finds nothing.
        timer: Option<Pin<Box<Sleep>>>,
        armed: bool,
        // Whether the armed timer is the total deadline's (else the read timeout's).
        armed_total: bool,
        state: BodyState,
        done: bool,
    }
}

impl<B> ReadTimeoutBody<B> {
    /// Wraps `inner`: `state` records a failure and the budget charges. No total deadline
    /// (see [`total_timeout`](Self::total_timeout)).
    pub fn new(inner: B, timeout: Duration, state: BodyState) -> Self {
        ReadTimeoutBody {
            inner,
            timeout,
            total: Duration::MAX,
            total_deadline: None,
            timer: None,
            armed: false,
            armed_total: false,
            state,
            done: false,
        }
    }

    /// The whole body must be there within `total` from now (the request's start): past it,
    /// a read that finds nothing fails at once.
    pub fn total_timeout(mut self, total: Duration) -> Self {
        self.total = total;
        self.total_deadline = Instant::now().checked_add(total);
        self
    }
}

impl<B: fmt::Debug> fmt::Debug for ReadTimeoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadTimeoutBody")
            .field("timeout", &self.timeout)
            .field("total", &self.total)
            .field("armed", &self.armed)
            .finish_non_exhaustive()
    }
}

impl<B> Body for ReadTimeoutBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.armed = false;
                match &frame {
                    None => *this.done = true,
                    Some(Ok(frame)) => {
                        let n = frame.data_ref().map_or(0, Bytes::len);
                        if n > 0 && !this.state.charge(n) {
                            *this.done = true;
                            this.state.fail(OVER_BUDGET);
                            let limit = this.state.0.budget.as_ref().map_or(0, BodyBudget::limit);
                            tracing::debug!(frame = n, limit, "request body over the budget");
                            return Poll::Ready(Some(Err(
                                BodyOverBudget { frame: n, limit }.into()
                            )));
                        }
                    }
                    Some(Err(_)) => {}
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !*this.armed {
                    let read_deadline = Instant::now() + *this.timeout;
                    let (deadline, total) = match *this.total_deadline {
                        Some(total) if total <= read_deadline => (total, true),
                        _ => (read_deadline, false),
                    };
                    *this.armed_total = total;
                    match this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => *this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    *this.armed = true;
                }
                let Some(timer) = this.timer.as_mut() else {
                    return Poll::Pending; // armed above
                };
                ready!(timer.as_mut().poll(cx));
                *this.done = true;
                this.state.fail(TIMED_OUT);
                if *this.armed_total {
                    tracing::debug!(total = ?this.total, "request body not complete in time");
                    Poll::Ready(Some(Err(BodyTotalTimeout(*this.total).into())))
                } else {
                    tracing::debug!(timeout = ?this.timeout, "request body stalled");
                    Poll::Ready(Some(Err(BodyReadTimeout(*this.timeout).into())))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

/// Answers a request whose body was cut off with the 408 or the 503, and gives its budget
/// charge back once it is answered. See the [module docs](self).
#[derive(Clone, Copy, Debug, Default)]
pub struct BodyTimeoutLayer;

impl<S> Layer<S> for BodyTimeoutLayer {
    type Service = BodyTimeout<S>;

    fn layer(&self, inner: S) -> BodyTimeout<S> {
        BodyTimeout { inner }
    }
}

/// The service of [`BodyTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct BodyTimeout<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for BodyTimeout<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<Either<ResBody, Full<Bytes>>>;
    type Error = S::Error;
    type Future = BodyTimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let state = req.extensions().get::<BodyState>().cloned();
        let http1 = req.version() <= Version::HTTP_11;
        BodyTimeoutFuture {
            inner: self.inner.call(req),
            charge: ReleaseOnDrop(state),
            http1,
        }
    }
}

/// Gives a request's budget charge back when dropped.
#[derive(Debug)]
struct ReleaseOnDrop(Option<BodyState>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(state) = &self.0 {
            state.release();
        }
    }
}

pin_project! {
    /// The future of [`BodyTimeout`]. Dropped before it is done (the client went away), it
    /// gives the request's budget charge back.
    pub struct BodyTimeoutFuture<F> {
        #[pin]
        inner: F,
        charge: ReleaseOnDrop,
        http1: bool,
    }
}

impl<F, ResBody, E> Future for BodyTimeoutFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<Either<ResBody, Full<Bytes>>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        // Answered (or failed): the bytes are no longer held for this request.
        let state = this.charge.0.take();
        if let Some(state) = &state {
            state.release();
        }
        let response = result?;
        // Whatever the reader answered (the failed body's 400 or 502) is dropped.
        let answer = match state.as_ref().and_then(BodyState::failure) {
            Some(BodyFailure::TimedOut) => request_timeout(*this.http1),
            Some(BodyFailure::OverBudget) => server_overloaded(*this.http1),
            None => return Poll::Ready(Ok(response.map(Either::Left))),
        };
        Poll::Ready(Ok(answer))
    }
}

/// The 408: OpenAI-shaped, `Connection: close` on HTTP/1, with its [`Rejection`].
fn request_timeout<B>(http1: bool) -> Response<Either<B, Full<Bytes>>> {
    rejection(
        StatusCode::REQUEST_TIMEOUT,
        "invalid_request_error",
        REQUEST_TIMEOUT_CODE,
        "The request body was not received in time.",
        http1,
    )
}

/// The 503 of a full budget: OpenAI-shaped like the library's 503 `policy_unavailable`
/// (`type: "server_error"`), `Retry-After: 1`, `Connection: close` on HTTP/1, with its
/// [`Rejection`].
fn server_overloaded<B>(http1: bool) -> Response<Either<B, Full<Bytes>>> {
    let mut response = rejection(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        SERVER_OVERLOADED_CODE,
        "The server is holding too many request bodies at the moment. Please retry.",
        http1,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn rejection<B>(
    status: StatusCode,
    error_type: &'static str,
    code: &'static str,
    message: &'static str,
    http1: bool,
) -> Response<Either<B, Full<Bytes>>> {
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": error_type,
            "param": null,
            "code": code,
        }
    });
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if http1 {
        // The rest of the body may still come: the connection cannot carry another request.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response.extensions_mut().insert(Rejection {
        layer: LayerName::Other(SERVER_LAYER),
        code,
        message: message.to_owned(),
    });
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[test]
    fn the_budget_refuses_what_does_not_fit_and_never_overflows() {
        let budget = BodyBudget::new(100);
        assert!(budget.try_charge(60));
        assert!(!budget.try_charge(41));
        assert!(budget.try_charge(40));
        assert_eq!(budget.in_flight(), 100);
        // Larger than the whole budget, or than the whole address space.
        budget.release(100);
        assert!(!budget.try_charge(101));
        assert!(budget.try_charge(1));
        assert!(!budget.try_charge(usize::MAX));
        assert_eq!(budget.in_flight(), 1);
    }

    #[test]
    fn a_request_gives_its_charge_back_once_and_charges_nothing_after() {
        let budget = BodyBudget::new(1000);
        let state = BodyState::new(Some(budget.clone()));
        assert!(state.charge(300));
        assert!(state.charge(200));
        assert_eq!((state.held(), budget.in_flight()), (500, 500));
        state.release();
        state.release();
        assert_eq!(budget.in_flight(), 0);
        // Bytes after the answer are not held for the request.
        assert!(state.charge(900));
        assert_eq!(budget.in_flight(), 0);
        // The last holder letting go releases too.
        let other = BodyState::new(Some(budget.clone()));
        assert!(other.charge(700));
        drop(other);
        assert_eq!(budget.in_flight(), 0);
    }

    #[test]
    fn many_requests_charging_at_once_never_exceed_the_budget() {
        let budget = BodyBudget::new(10_000);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let state = BodyState::new(Some(budget.clone()));
                        for _ in 0..10 {
                            let _ = state.charge(300);
                            assert!(budget.in_flight() <= 10_000);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(budget.in_flight(), 0);
    }

    /// A body that yields a byte every `every`, forever.
    fn trickle(every: Duration) -> StreamBody<Ticks> {
        StreamBody::new(Ticks(Box::pin(tokio::time::sleep(every)), every))
    }

    struct Ticks(Pin<Box<Sleep>>, Duration);

    impl futures_util::Stream for Ticks {
        type Item = Result<Frame<Bytes>, std::io::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            ready!(self.0.as_mut().poll(cx));
            let next = Instant::now() + self.1;
            self.0.as_mut().reset(next);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"a")))))
        }
    }

    #[tokio::test]
    async fn a_trickle_fails_at_the_total_deadline_not_before() {
        let state = BodyState::new(None);
        let body = ReadTimeoutBody::new(
            trickle(Duration::from_millis(50)),
            Duration::from_millis(200),
            state.clone(),
        )
        .total_timeout(Duration::from_millis(500));
        let started = Instant::now();
        let err = body.collect().await.unwrap_err();
        let took = started.elapsed();
        assert!(err.is::<BodyTotalTimeout>(), "{err}");
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(state.failure(), Some(BodyFailure::TimedOut));
    }

    #[tokio::test]
    async fn a_body_over_the_budget_fails_and_says_so() {
        let budget = BodyBudget::new(10);
        let state = BodyState::new(Some(budget.clone()));
        let body = ReadTimeoutBody::new(
            trickle(Duration::from_millis(1)),
            Duration::from_secs(5),
            state.clone(),
        );
        let err = body.collect().await.unwrap_err();
        assert!(err.is::<BodyOverBudget>(), "{err}");
        assert_eq!(state.failure(), Some(BodyFailure::OverBudget));
        assert_eq!(budget.in_flight(), 10);
        state.release();
        assert_eq!(budget.in_flight(), 0);
    }

    #[tokio::test]
    async fn the_charge_comes_back_when_answered_or_abandoned() {
        use tower::ServiceExt;

        let budget = BodyBudget::new(1000);
        let request = |state: &BodyState| {
            let mut req = Request::new(());
            req.extensions_mut().insert(state.clone());
            req
        };
        // Abandoned: the client went away before the answer.
        let state = BodyState::new(Some(budget.clone()));
        assert!(state.charge(500));
        let never = BodyTimeoutLayer.layer(tower::service_fn(|_req: Request<()>| {
            std::future::pending::<Result<Response<()>, std::convert::Infallible>>()
        }));
        let pending = never.oneshot(request(&state));
        assert!(tokio::time::timeout(Duration::from_millis(20), pending)
            .await
            .is_err());
        assert_eq!(
            budget.in_flight(),
            0,
            "released when the future was dropped"
        );

        // Answered: released as the head is produced, the response body not yet sent.
        let state = BodyState::new(Some(budget.clone()));
        assert!(state.charge(500));
        let answer = BodyTimeoutLayer.layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(()))
        }));
        let response = answer.oneshot(request(&state)).await.unwrap();
        assert_eq!(budget.in_flight(), 0);
        assert_eq!(response.status(), StatusCode::OK);
        assert!(state.failure().is_none());
    }
}
