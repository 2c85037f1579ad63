//! BodyLimit: every request body held to the [`Policy`]'s size limits, whether or not a layer
//! reads it, with an OpenAI-shaped 413.
//!
//! A declared `Content-Length` over the limit is answered at once with 413
//! `request_too_large`, before anything is read or forwarded. A body without one (a chunked
//! upload) is passed on as it comes and cut off at the limit: the inner service's read fails,
//! and whatever the inner service answers then (an upstream error, a 502) is replaced by the
//! same 413, so the client learns what went wrong and the audit record says so. The limit is
//! [`BodyOptions::limit`](crate::BodyOptions::limit), or
//! [`multipart_limit`](crate::BodyOptions::multipart_limit) for `multipart/form-data`
//! bodies.
//!
//! Put it early (after the audit layer, before [`KeyAuth`](crate::KeyAuth)), so that uploads
//! no policy layer reads (files, batches) are held to the limit too.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_policy::{BodyLimitLayer, BodyOptions, PolicyBody, Policy};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let policy = Policy::new().body_options(BodyOptions { limit: 1024, ..BodyOptions::default() });
//! let svc = ServiceBuilder::new()
//!     .layer(BodyLimitLayer::new().policy(policy))
//!     .service(service_fn(|_req: Request<PolicyBody>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(String::new()))
//!     }));
//! let big = Request::post("/v1/files").header("content-length", "4096").body(String::new()).unwrap();
//! let res = svc.oneshot(big).await.unwrap();
//! assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
//! # });
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{BoxError, PolicyBody, ResponseBody};
use crate::check::reject;
use crate::error::{LayerName, PolicyError};
use crate::policy::Policy;
use crate::request::LlmRequest;

/// Layer that holds request bodies to the size limits. See the [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct BodyLimitLayer {
    policy: Policy,
}

impl BodyLimitLayer {
    /// Limits bodies to [`BodyOptions::default`](crate::BodyOptions::default).
    pub fn new() -> Self {
        Self::default()
    }

    /// The [`Policy`] whose body limits apply (an outer layer's policy, if it resolved the
    /// request first, takes precedence).
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Middleware that holds request bodies to the size limits. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct BodyLimit<S> {
    inner: S,
    policy: Policy,
}

impl<S> BodyLimit<S> {
    /// Wraps `inner` with the limits of `layer`.
    pub fn new(inner: S, layer: &BodyLimitLayer) -> Self {
        layer.layer(inner)
    }

    /// A default [`BodyLimitLayer`].
    pub fn layer() -> BodyLimitLayer {
        BodyLimitLayer::new()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResBody> Service<Request<B>> for BodyLimit<S>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let options = *LlmRequest::resolve(&mut parts, &self.policy)
            .policy()
            .body();
        let limit = match options.check_declared_length(&parts.headers) {
            Ok(limit) => limit,
            Err(error) => {
                return ResponseFuture {
                    state: State::Rejected { error: Some(error) },
                }
            }
        };
        let tripped = Arc::new(AtomicBool::new(false));
        let body = PolicyBody::new(LimitedBody {
            inner: Limited::new(body, limit),
            tripped: tripped.clone(),
        });
        let req = Request::from_parts(parts, body);
        crate::audit::forwarding(&req);
        ResponseFuture {
            state: State::Inner {
                future: self.inner.call(req),
                tripped,
                limit,
            },
        }
    }
}

pin_project! {
    /// Response future of [`BodyLimit`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner {
            #[pin]
            future: F,
            tripped: Arc<AtomicBool>,
            limit: usize,
        },
        Rejected {
            error: Option<PolicyError>,
        },
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner {
                future,
                tripped,
                limit,
            } => {
                let result = ready!(future.poll(cx));
                if tripped.load(Ordering::Acquire) {
                    // The body was cut off at the limit: whatever the inner service made of
                    // that, the client's answer is the 413.
                    let error = PolicyError::BodyTooLarge { limit: *limit };
                    return Poll::Ready(Ok(reject(error, LayerName::RequestBody)));
                }
                Poll::Ready(result.map(|response| response.map(ResponseBody::inner)))
            }
            StateProj::Rejected { error } => {
                let error = error
                    .take()
                    .expect("ResponseFuture polled after completion");
                Poll::Ready(Ok(reject(error, LayerName::RequestBody)))
            }
        }
    }
}

pin_project! {
    /// The request body through [`Limited`], noting in `tripped` when it went over the limit
    /// (the inner service may swallow the error; the response future must still know).
    struct LimitedBody<B> {
        #[pin]
        inner: Limited<B>,
        tripped: Arc<AtomicBool>,
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Err(error)) = &frame {
            if error.is::<LengthLimitError>() {
                this.tripped.store(true, Ordering::Release);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
