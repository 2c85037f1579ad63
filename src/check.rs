//! The machinery the policy layers share (private): resolve the request once, decide on its
//! head, read the body only when a decision (or the audit record) needs it, decide, apply the
//! queued body edits once, then call the inner service or answer with the rejection.
//!
//! A layer describes its decision as a [`Check`]; its service's future wraps a
//! [`CheckFuture`].

use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::audit::AuditHandle;
use crate::body::{BoxError, PolicyBody, ResponseBody};
use crate::error::{LayerName, PolicyError};
use crate::keys::ApiKey;
use crate::policy::Policy;
use crate::request::LlmRequest;

/// The `Service` impl and the response future of a layer whose whole work is a [`Check`]
/// (`$svc { inner, check }`): one `CheckFuture` in a public newtype, as tower-http does.
macro_rules! check_service {
    ($svc:ident, $check:ty) => {
        impl<S, B, ResBody> Service<Request<B>> for $svc<S>
        where
            S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone,
            B: Body<Data = Bytes> + Send + 'static,
            B::Error: Into<BoxError>,
        {
            type Response = Response<ResponseBody<ResBody>>;
            type Error = S::Error;
            type Future = ResponseFuture<S, B>;

            fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
                self.inner.poll_ready(cx)
            }

            fn call(&mut self, req: Request<B>) -> Self::Future {
                let (mut parts, body) = req.into_parts();
                let check = self.check.for_request(&mut parts);
                let req = Request::from_parts(parts, body);
                ResponseFuture {
                    inner: CheckFuture::new(check, &mut self.inner, req),
                }
            }
        }

        pin_project! {
            #[doc = concat!("Response future of [`", stringify!($svc), "`].")]
            pub struct ResponseFuture<S, B>
            where
                S: Service<Request<PolicyBody>>,
                B: Body,
                B::Error: Into<BoxError>,
            {
                #[pin]
                inner: CheckFuture<S, B, $check>,
            }
        }

        impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
        where
            S: Service<Request<PolicyBody>>,
            B: Body,
            B::Error: Into<BoxError>,
        {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("ResponseFuture").finish_non_exhaustive()
            }
        }

        impl<S, B, ResBody> Future for ResponseFuture<S, B>
        where
            S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
            B: Body<Data = Bytes>,
            B::Error: Into<BoxError>,
        {
            type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
                self.project().inner.poll(cx)
            }
        }
    };
}

/// One layer's decision on a request.
pub(crate) trait Check: Clone + Send + 'static {
    /// The layer named in rejections.
    fn layer(&self) -> LayerName;

    /// The policy a request is resolved with when this layer is the first to see it.
    fn policy(&self) -> &Policy;

    /// Decides what the head alone can decide (the route, the model in the path, the key):
    /// `Err` rejects the request before its body is read; `Ok(true)` asks for the body.
    fn on_head(&self, view: &LlmRequest, key: Option<&ApiKey>) -> Result<bool, PolicyError>;

    /// Decides on the resolved view, with its body when there is one and it was asked for.
    /// May queue body edits on the view.
    fn decide(
        &self,
        view: &mut LlmRequest,
        key: Option<&ApiKey>,
        audit: Option<&AuditHandle>,
    ) -> Result<(), PolicyError>;

    /// The check for one request: this one, or one adjusted by what the request's head asks
    /// (a header that tightens a limit, read and removed here).
    fn for_request(&self, _parts: &mut Parts) -> Self {
        self.clone()
    }

    /// Whether this layer, when it asks for the body, reads it on routes whose body carries
    /// no model too (a thread's messages, a conversation's items).
    #[cfg(feature = "guards")]
    fn reads_any_body(&self) -> bool {
        false
    }

    /// Whether this layer reads a pending body for the audit record when no decision needs it,
    /// once its own head checks passed (the body-reading policy layers do; the audit layer
    /// does not).
    fn reads_for_audit(&self) -> bool {
        true
    }

    /// Whether this layer refuses a request whose head is ambiguous
    /// ([`LlmRequest::refusal`]): every policy layer does; the audit layer only records.
    fn refuses_ambiguous(&self) -> bool {
        true
    }
}

pin_project! {
    /// The response future of a policy layer.
    pub(crate) struct CheckFuture<S, B, C>
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
            error: Option<(PolicyError, LayerName)>,
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
    C: Check,
{
    /// Starts handling `req`: decides at once when the body is not needed (or already read),
    /// otherwise reads it first. `inner` must be ready; when the call is deferred, the ready
    /// service moves into the future and a clone takes its place.
    pub(crate) fn new(check: C, inner: &mut S, req: Request<B>) -> Self {
        let (mut parts, body) = req.into_parts();
        let key = parts.extensions.get::<Arc<ApiKey>>().cloned();
        // Behind an audit layer, the record wants the body (whether one is pending is the
        // view's to say).
        let for_audit = check.reads_for_audit() && parts.extensions.get::<AuditHandle>().is_some();
        let view = LlmRequest::resolve(&mut parts, check.policy());
        if let Some(reason) = view.refusal().filter(|_| check.refuses_ambiguous()) {
            let error = PolicyError::AmbiguousRequest(reason.to_owned().into());
            return Self::rejected(error, check.layer());
        }
        let needs_body = match check.on_head(view, key.as_deref()) {
            Ok(needs) => needs,
            Err(error) => return Self::rejected(error, check.layer()),
        };
        #[cfg(feature = "guards")]
        if needs_body && check.reads_any_body() {
            view.want_body();
        }
        if !(view.body_pending() && (needs_body || for_audit)) {
            return match decide_and_forward(&check, parts, PolicyBody::new(body), key.as_deref()) {
                Ok(req) => {
                    crate::audit::forwarding(&req);
                    State::Inner {
                        future: inner.call(req),
                    }
                    .into()
                }
                Err(error) => Self::rejected(error, check.layer()),
            };
        }
        let options = *view.policy().body();
        let limit = match options.check_declared_length(&parts.headers) {
            Ok(limit) => limit,
            Err(error) => return Self::rejected(error, LayerName::RequestBody),
        };
        if let Some(audit) = parts.extensions.get::<AuditHandle>() {
            // This read serves the record: the audit layer need not copy the body.
            audit.claim_body();
        }
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

    fn rejected(error: PolicyError, layer: LayerName) -> Self {
        State::Rejected {
            error: Some((error, layer)),
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

/// Runs the check's decision on the view in `parts`, applies the queued edits to the body,
/// and gives the request to send on.
fn decide_and_forward<C: Check>(
    check: &C,
    mut parts: Parts,
    mut body: PolicyBody,
    key: Option<&ApiKey>,
) -> Result<Request<PolicyBody>, PolicyError> {
    let audit = parts.extensions.get::<AuditHandle>().cloned();
    let view = parts
        .extensions
        .get_mut::<LlmRequest>()
        .expect("the view is resolved before any decision");
    check.decide(view, key, audit.as_ref())?;
    if let Some(rendered) = view.take_rendered() {
        let rendered = rendered?;
        set_length(&mut parts.headers, rendered.len());
        body = PolicyBody::full(rendered);
    }
    Ok(Request::from_parts(parts, body))
}

/// Marks a rewritten body, in memory and of known length: it is sent with that length, never
/// chunked, whatever the client did.
pub(crate) fn set_length(headers: &mut http::HeaderMap, len: usize) {
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

/// Turns the outcome of reading a body into its bytes or the error to answer with. A body that
/// failed mid-way (the client went away, or broke its framing) is flagged
/// [`request_body_unreadable`](crate::audit::flag::REQUEST_BODY_UNREADABLE) for the record.
fn read_outcome<E: Into<BoxError>>(
    result: Result<http_body_util::Collected<Bytes>, E>,
    limit: usize,
    audit: Option<&AuditHandle>,
) -> Result<Bytes, PolicyError> {
    match result {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            let e: BoxError = e.into();
            // The limit of this read, or of a `BodyLimit` layer's read before it.
            if e.is::<LengthLimitError>() {
                Err(PolicyError::BodyTooLarge { limit })
            } else {
                if let Some(audit) = audit {
                    audit.flag(crate::audit::flag::REQUEST_BODY_UNREADABLE);
                }
                Err(PolicyError::InvalidBody {
                    message: "The request body could not be read.".into(),
                    param: None,
                })
            }
        }
    }
}

/// Reads the parsed body into the view in `parts` and tells the audit handle.
fn resolve_body(parts: &mut Parts, bytes: Bytes) -> Result<(), PolicyError> {
    let audit = parts.extensions.get::<AuditHandle>().cloned();
    let view = parts
        .extensions
        .get_mut::<LlmRequest>()
        .expect("the view is resolved before the body is read");
    view.read_body(&parts.headers, bytes)?;
    if let Some(audit) = audit {
        audit.observe(view);
    }
    Ok(())
}

impl<S, B, C, ResBody> Future for CheckFuture<S, B, C>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    C: Check,
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
                    let audit = parts.extensions.get::<AuditHandle>();
                    let next = match read_outcome(result, *limit, audit)
                        .and_then(|bytes| resolve_body(&mut parts, bytes.clone()).map(|()| bytes))
                    {
                        Err(error) => State::Rejected {
                            error: Some((error, LayerName::RequestBody)),
                        },
                        Ok(bytes) => {
                            let key = parts.extensions.get::<Arc<ApiKey>>().cloned();
                            match decide_and_forward(
                                check,
                                parts,
                                PolicyBody::full(bytes),
                                key.as_deref(),
                            ) {
                                Err(error) => State::Rejected {
                                    error: Some((error, check.layer())),
                                },
                                Ok(req) => {
                                    let mut svc =
                                        inner.take().expect("CheckFuture polled after completion");
                                    crate::audit::forwarding(&req);
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
pub(crate) fn reject<B>(error: PolicyError, layer: LayerName) -> Response<ResponseBody<B>> {
    error.into_response(layer).map(ResponseBody::from_full)
}
