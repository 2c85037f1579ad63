//! The machinery shared by the layers that read the request body: read it once (when the
//! request needs it and no earlier layer did), store the [`LlmRequest`], decide, then call the
//! inner service or answer with the rejection.
//!
//! A layer describes its decision as a [`RequestCheck`]; its service's future is a
//! [`CheckFuture`]. The trait is public so that a host can write its own body-aware policy
//! layer (a guard) that shares the same parsed-once view.

use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::{BoxError, PolicyBody, ResponseBody};
use crate::error::{Layer, PolicyError};
use crate::request::{BodyOptions, LlmRequest};

/// One layer's decision on a request, made with the parsed-once [`LlmRequest`] at hand.
pub trait RequestCheck: Clone + Send + 'static {
    /// The layer named in rejections.
    fn layer(&self) -> Layer;

    /// Size limits for reading the body, if this layer is the first to read it.
    fn body_options(&self) -> BodyOptions {
        BodyOptions::default()
    }

    /// Whether this request's body must be parsed for [`check`](RequestCheck::check). Called
    /// only when no earlier layer parsed it; the key (if any) is in `parts.extensions`.
    fn needs_body(&self, parts: &Parts) -> bool;

    /// Decides on the request: `Err` rejects it. When `needs_body` was true (or an earlier
    /// layer parsed the body) the [`LlmRequest`] is in the extensions. A check may rewrite
    /// the body (replace it with `PolicyBody::full`) and update the view accordingly.
    fn check(&self, req: &mut Request<PolicyBody>) -> Result<(), PolicyError>;
}

pin_project! {
    /// The response future of a body-reading policy layer.
    pub struct CheckFuture<S, B, C>
    where
        S: Service<Request<PolicyBody>>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        #[pin]
        state: State<S, B, C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, C>
    where
        S: Service<Request<PolicyBody>>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        Reading {
            #[pin]
            collect: Collect<Limited<B>>,
            parts: Option<Parts>,
            inner: Option<S>,
            check: C,
            limit: usize,
        },
        Inner {
            #[pin]
            future: S::Future,
        },
        Rejected {
            error: Option<(PolicyError, Layer)>,
        },
    }
}

impl<S, B, C> std::fmt::Debug for CheckFuture<S, B, C>
where
    S: Service<Request<PolicyBody>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckFuture").finish_non_exhaustive()
    }
}

impl<S, B, C> CheckFuture<S, B, C>
where
    S: Service<Request<PolicyBody>> + Clone,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    C: RequestCheck,
{
    /// Starts handling `req`: decides at once when the body is not needed (or already parsed),
    /// otherwise reads it first. `inner` must be ready; when the call is deferred, the ready
    /// service moves into the future and a clone takes its place.
    pub fn new(check: C, inner: &mut S, req: Request<B>) -> Self {
        let (parts, body) = req.into_parts();
        if parts.extensions.get::<LlmRequest>().is_some() || !check.needs_body(&parts) {
            let mut req = Request::from_parts(parts, PolicyBody::new(body));
            return check
                .check(&mut req)
                .map_err(|e| (e, check.layer()))
                .map(|()| State::Inner {
                    future: inner.call(req),
                })
                .unwrap_or_else(|error| State::Rejected { error: Some(error) })
                .into();
        }
        let limit = match check.body_options().check_declared_length(&parts.headers) {
            Ok(limit) => limit,
            Err(error) => {
                return State::Rejected {
                    error: Some((error, Layer::RequestBody)),
                }
                .into()
            }
        };
        let clone = inner.clone();
        let ready = mem::replace(inner, clone);
        State::Reading {
            collect: Limited::new(body, limit).collect(),
            parts: Some(parts),
            inner: Some(ready),
            check,
            limit,
        }
        .into()
    }
}

impl<S, B, C> From<State<S, B, C>> for CheckFuture<S, B, C>
where
    S: Service<Request<PolicyBody>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    fn from(state: State<S, B, C>) -> Self {
        CheckFuture { state }
    }
}

/// Whether this request is one whose body may name a model (see [`Endpoint::has_model_body`]):
/// the usual answer of [`RequestCheck::needs_body`].
///
/// [`Endpoint::has_model_body`]: crate::endpoint::Endpoint::has_model_body
pub fn carries_model_body(parts: &Parts) -> bool {
    crate::endpoint::Route::classify(&parts.uri)
        .endpoint
        .has_model_body(&parts.method)
}

/// Turns the outcome of reading a body into its bytes or the error to answer with.
pub(crate) fn read_outcome<E: Into<BoxError>>(
    result: Result<http_body_util::Collected<Bytes>, E>,
    limit: usize,
) -> Result<Bytes, PolicyError> {
    match result {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            let e: BoxError = e.into();
            if e.downcast_ref::<LengthLimitError>().is_some() {
                Err(PolicyError::BodyTooLarge { limit })
            } else {
                Err(PolicyError::InvalidBody {
                    message: "The request body could not be read.".into(),
                    param: None,
                })
            }
        }
    }
}

impl<S, B, C, ResBody> Future for CheckFuture<S, B, C>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    C: RequestCheck,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Reading {
                    collect,
                    parts,
                    inner,
                    check,
                    limit,
                } => {
                    let result = ready!(collect.poll(cx));
                    let mut parts = parts.take().expect("CheckFuture polled after completion");
                    let outcome = read_outcome(result, *limit).and_then(|bytes| {
                        let view = LlmRequest::parse(&parts, bytes.clone())?;
                        parts.extensions.insert(view);
                        Ok(bytes)
                    });
                    let next = match outcome {
                        Err(error) => State::Rejected {
                            error: Some((error, Layer::RequestBody)),
                        },
                        Ok(bytes) => {
                            let mut req = Request::from_parts(parts, PolicyBody::full(bytes));
                            match check.check(&mut req) {
                                Err(error) => State::Rejected {
                                    error: Some((error, check.layer())),
                                },
                                Ok(()) => {
                                    let mut svc =
                                        inner.take().expect("CheckFuture polled after completion");
                                    State::Inner {
                                        future: svc.call(req),
                                    }
                                }
                            }
                        }
                    };
                    state.set(next);
                }
                StateProj::Inner { future } => {
                    let response = ready!(future.poll(cx))?;
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                StateProj::Rejected { error } => {
                    let (error, layer) = error.take().expect("CheckFuture polled after completion");
                    return Poll::Ready(Ok(reject(error, layer)));
                }
            }
        }
    }
}

/// The rejection response for `error`, in a layer's response body type.
pub(crate) fn reject<B>(error: PolicyError, layer: Layer) -> Response<ResponseBody<B>> {
    error.into_response(layer).map(ResponseBody::from_full)
}
