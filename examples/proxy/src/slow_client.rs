//! Slow clients: a request body that stalls is cut off, and the request is answered with an
//! OpenAI-shaped 408 and the connection closed.
//!
//! The server wraps every request body in a [`ReadTimeoutBody`]: whenever whoever reads the
//! body (a policy layer, or the forwarding client on its way upstream) waits for the client
//! longer than the timeout without a frame coming, the body ends with a [`BodyReadTimeout`]
//! error, and the request's [`BodyStalled`] marker (in its extensions) is set. The time the
//! reader itself takes between two reads does not count: only time spent waiting on the
//! client.
//!
//! [`BodyTimeoutLayer`], right inside the audit layer, then answers that request with a 408
//! `request_timeout` (whatever the reader made of the failed body: a policy layer's 400, the
//! forwarder's 502), marked `Connection: close` on HTTP/1 so that hyper closes the connection
//! after it, and with a [`Rejection`] for the audit record (`blocked_by: "server"`). The
//! request leaves exactly one audit record, the 408's.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// The layer name the 408's [`Rejection`] carries (`blocked_by` of its audit record).
pub const SERVER_LAYER: &str = "server";

/// Set when the request's body timed out; in the request's extensions.
#[derive(Clone, Debug, Default)]
pub struct BodyStalled(Arc<AtomicBool>);

impl BodyStalled {
    /// Whether the body timed out.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
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

pin_project! {
    /// A request body that fails with [`BodyReadTimeout`] when its reader waits on the client
    /// for longer than the timeout. See the [module docs](self).
    pub struct ReadTimeoutBody<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        // Armed when a read finds nothing; disarmed when a frame comes.
        timer: Option<Pin<Box<Sleep>>>,
        armed: bool,
        stalled: BodyStalled,
        done: bool,
    }
}

impl<B> ReadTimeoutBody<B> {
    /// Wraps `inner`; `stalled` is set when it times out.
    pub fn new(inner: B, timeout: Duration, stalled: BodyStalled) -> Self {
        ReadTimeoutBody {
            inner,
            timeout,
            timer: None,
            armed: false,
            stalled,
            done: false,
        }
    }
}

impl<B: fmt::Debug> fmt::Debug for ReadTimeoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadTimeoutBody")
            .field("timeout", &self.timeout)
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
                if frame.is_none() {
                    *this.done = true;
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let deadline = Instant::now() + *this.timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !*this.armed {
                    timer.as_mut().reset(deadline);
                    *this.armed = true;
                }
                ready!(timer.as_mut().poll(cx));
                *this.done = true;
                this.stalled.set();
                tracing::debug!(timeout = ?this.timeout, "request body stalled");
                Poll::Ready(Some(Err(BodyReadTimeout(*this.timeout).into())))
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

/// Answers a request whose body stalled with the 408. See the [module docs](self).
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
        let stalled = req.extensions().get::<BodyStalled>().cloned();
        let http1 = req.version() <= Version::HTTP_11;
        BodyTimeoutFuture {
            inner: self.inner.call(req),
            stalled,
            http1,
        }
    }
}

pin_project! {
    /// The future of [`BodyTimeout`].
    pub struct BodyTimeoutFuture<F> {
        #[pin]
        inner: F,
        stalled: Option<BodyStalled>,
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
        let response = ready!(this.inner.poll(cx))?;
        if this.stalled.as_ref().is_some_and(BodyStalled::is_set) {
            // Whatever the reader answered (the failed body's 400 or 502) is dropped.
            return Poll::Ready(Ok(request_timeout(*this.http1)));
        }
        Poll::Ready(Ok(response.map(Either::Left)))
    }
}

/// The 408: OpenAI-shaped, `Connection: close` on HTTP/1, with its [`Rejection`].
fn request_timeout<B>(http1: bool) -> Response<Either<B, Full<Bytes>>> {
    let message = "The request body was not received in time.";
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": null,
            "code": REQUEST_TIMEOUT_CODE,
        }
    });
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
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
        code: REQUEST_TIMEOUT_CODE,
        message: message.to_owned(),
    });
    response
}
