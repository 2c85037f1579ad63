//! Reading the rest of a response for its usage after the client went away.
//!
//! A streamed chat completion reports its usage in a last chunk, after the last token. A
//! client that closes the connection as soon as it has the last token leaves before that chunk:
//! the response body is dropped, and the record would have no usage although the upstream
//! billed the whole completion. [`DrainOnCancelLayer`], put right outside the
//! [`AuditLayer`](super::AuditLayer), keeps reading such a response briefly in a background
//! task (at most [`drain_timeout`](DrainOnCancelLayer::drain_timeout) and
//! [`max_drain_bytes`](DrainOnCancelLayer::max_drain_bytes)) so that the audit layer reads
//! the usage from it, then drops it.
//!
//! Only a response whose usage is still to come is drained: a success from an endpoint that
//! reports usage (chat completions, completions, embeddings, responses), not compressed, whose
//! usage has not been read yet. Everything else is dropped at once, as without the layer. The
//! record is still [`Cancelled`](super::Outcome::Cancelled), its `response_bytes` count only
//! what the client received, and a usage read after the client left is flagged
//! [`usage_after_cancel`](super::flag::USAGE_AFTER_CANCEL). When the usage does not come within
//! the bounds, the record is emitted without it ([`usage_missing`](super::flag::USAGE_MISSING)),
//! as before.
//!
//! The bound is a trade-off: an upstream that is still generating when the client leaves goes
//! on generating (and billing) for up to the drain timeout, instead of stopping at once. The
//! default (one second) is enough for the usage chunk that follows the last token, and short
//! next to a completion's length.
//!
//! Draining needs a Tokio runtime (the `tokio` feature); without one at the time the body is
//! dropped, the response is dropped at once.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

/// How long a response is read after its client left, by default (1 s).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// How many bytes of a response are read after its client left, by default (64 KiB).
pub const DEFAULT_MAX_DRAIN_BYTES: usize = 64 * 1024;

/// What the audit layer and the drain layer share about one response: whether its usage is
/// still to come, and whether its client left. In the request's extensions, put there by
/// [`DrainOnCancel`] for the [`AuditLayer`](super::AuditLayer) inside it.
#[derive(Clone, Default)]
pub(crate) struct Tail(Arc<TailState>);

#[derive(Default)]
struct TailState {
    /// The recorder still waits for the response's usage.
    wants: AtomicBool,
    /// The client went away; what is read now is drained, not delivered.
    departed: AtomicBool,
}

impl Tail {
    pub(crate) fn set_wants(&self, wants: bool) {
        self.0.wants.store(wants, Ordering::Release);
    }

    fn wants(&self) -> bool {
        self.0.wants.load(Ordering::Acquire)
    }

    pub(crate) fn departed(&self) -> bool {
        self.0.departed.load(Ordering::Acquire)
    }

    fn depart(&self) {
        self.0.departed.store(true, Ordering::Release);
    }
}

impl fmt::Debug for Tail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tail")
            .field("wants", &self.wants())
            .field("departed", &self.departed())
            .finish()
    }
}

/// Keeps reading a response whose client left until its usage comes, within bounds.
///
/// A streamed chat completion reports its usage after its last token: a client that leaves
/// with the last token takes the usage with it. Put right outside the
/// [`AuditLayer`](crate::AuditLayer), this layer reads such a response on in a background task
/// (Tokio) for at most [`drain_timeout`](Self::drain_timeout) and
/// [`max_drain_bytes`](Self::max_drain_bytes), so that the record gets the upstream's usage
/// (flagged [`usage_after_cancel`](crate::audit::flag::USAGE_AFTER_CANCEL); the record stays
/// `cancelled` and counts only the bytes the client received). Only a success from an endpoint
/// that reports usage, whose usage has not been read yet, is drained; anything else is dropped
/// at once. An upstream still generating when its client left goes on for up to the timeout.
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_llm_policy::audit::{DrainOnCancelLayer, MemorySink};
/// use tower_llm_policy::AuditLayer;
///
/// # async fn upstream(_: http::Request<tower_llm_policy::PolicyBody>)
/// #     -> Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
/// #     Ok(http::Response::new(http_body_util::Full::default()))
/// # }
/// let sink = MemorySink::new();
/// let service = ServiceBuilder::new()
///     .layer(DrainOnCancelLayer::new().drain_timeout(Duration::from_secs(2)))
///     .layer(AuditLayer::new(sink.clone()))
///     .service_fn(upstream);
/// # let _ = service;
/// ```
///
/// Clones (and the services they make) share one count of the drains running
/// ([`in_flight`](Self::in_flight)): a server that shuts down waits for it to reach zero
/// before it flushes its audit log, so that the drained records are not lost.
#[derive(Clone, Debug)]
pub struct DrainOnCancelLayer {
    limits: Limits,
    in_flight: Arc<AtomicUsize>,
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    timeout: Duration,
    max_bytes: usize,
}

impl Default for DrainOnCancelLayer {
    fn default() -> Self {
        DrainOnCancelLayer::new()
    }
}

impl DrainOnCancelLayer {
    /// A drain of at most [`DEFAULT_DRAIN_TIMEOUT`] and [`DEFAULT_MAX_DRAIN_BYTES`].
    pub fn new() -> Self {
        DrainOnCancelLayer {
            limits: Limits {
                timeout: DEFAULT_DRAIN_TIMEOUT,
                max_bytes: DEFAULT_MAX_DRAIN_BYTES,
            },
            in_flight: Arc::default(),
        }
    }

    /// How many responses are being drained now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The drain timeout.
    pub fn timeout(&self) -> Duration {
        self.limits.timeout
    }

    /// The longest a response is read after its client left. Zero turns draining off.
    #[must_use]
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.limits.timeout = timeout;
        self
    }

    /// The most bytes read from a response after its client left (more, and it is dropped).
    #[must_use]
    pub fn max_drain_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_bytes = bytes;
        self
    }
}

impl<S> Layer<S> for DrainOnCancelLayer {
    type Service = DrainOnCancel<S>;

    fn layer(&self, inner: S) -> DrainOnCancel<S> {
        DrainOnCancel {
            inner,
            limits: self.limits,
            in_flight: self.in_flight.clone(),
        }
    }
}

/// The service of [`DrainOnCancelLayer`].
#[derive(Clone, Debug)]
pub struct DrainOnCancel<S> {
    inner: S,
    limits: Limits,
    in_flight: Arc<AtomicUsize>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for DrainOnCancel<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body + Unpin + Send + 'static,
    ResBody::Data: Send,
{
    type Response = Response<DrainBody<ResBody>>;
    type Error = S::Error;
    type Future = DrainFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let tail = (!self.limits.timeout.is_zero()).then(Tail::default);
        if let Some(tail) = &tail {
            req.extensions_mut().insert(tail.clone());
        }
        DrainFuture {
            inner: self.inner.call(req),
            drain: tail.map(|tail| Drain {
                tail,
                limits: self.limits,
                in_flight: self.in_flight.clone(),
            }),
        }
    }
}

pin_project! {
    /// The response future of [`DrainOnCancel`].
    pub struct DrainFuture<F> {
        #[pin]
        inner: F,
        drain: Option<Drain>,
    }
}

/// What a response needs to be drained.
#[derive(Debug)]
struct Drain {
    tail: Tail,
    limits: Limits,
    in_flight: Arc<AtomicUsize>,
}

impl<F> fmt::Debug for DrainFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for DrainFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
{
    type Output = Result<Response<DrainBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let drain = this.drain.take();
        Poll::Ready(Ok(response.map(|inner| DrainBody {
            inner: Some(inner),
            drain,
        })))
    }
}

/// The response body of [`DrainOnCancel`]: the inner body, passed through; dropped before its
/// end while its usage is still to come, it is read on in a background task.
pub struct DrainBody<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
{
    inner: Option<B>,
    drain: Option<Drain>,
}

impl<B> fmt::Debug for DrainBody<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrainBody")
            .field("drain", &self.drain)
            .finish_non_exhaustive()
    }
}

impl<B> Body for DrainBody<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<B> Drop for DrainBody<B>
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
{
    fn drop(&mut self) {
        let (Some(inner), Some(drain)) = (self.inner.take(), self.drain.take()) else {
            return;
        };
        if inner.is_end_stream() || !drain.tail.wants() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // From now on the audit layer counts nothing as delivered.
        drain.tail.depart();
        let running = Running::new(&drain.in_flight);
        runtime.spawn(read_on(inner, drain, running));
    }
}

/// Reads `body` until its usage has been read, it ends, or the limits are reached; then drops
/// it (and with it the audit layer's recorder, which emits the record).
async fn read_on<B>(mut body: B, drain: Drain, running: Running)
where
    B: Body + Unpin + Send + 'static,
{
    let Drain { tail, limits, .. } = drain;
    let read = async {
        let mut bytes = 0usize;
        while tail.wants() && bytes <= limits.max_bytes {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        bytes = bytes.saturating_add(data.remaining());
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
    };
    let _ = tokio::time::timeout(limits.timeout, read).await;
    drop(body);
    drop(running);
}

/// One drain counted in [`DrainOnCancelLayer::in_flight`] until dropped (its task ended, or
/// the runtime dropped it).
struct Running(Arc<AtomicUsize>);

impl Running {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Running(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
