use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::AuditBody;
use super::recorder::{End, Recorder};
use crate::body::PolicyBody;
use crate::check::{Check, CheckFuture};
use crate::error::{LayerName, PolicyError};
use crate::keys::ApiKey;
use crate::policy::Policy;
use crate::request::LlmRequest;

pin_project! {
    /// Response future of [`Audit`](super::Audit).
    ///
    /// If it is dropped before the response is ready (the client went away), the request is
    /// recorded as [`Cancelled`](super::Outcome::Cancelled); if the inner service fails, as
    /// [`UpstreamError`](super::Outcome::UpstreamError).
    pub struct ResponseFuture<S>
    where
        S: Service<Request<PolicyBody>>,
    {
        #[pin]
        inner: CheckFuture<S, PolicyBody, AuditCheck>,
        recorder: Option<Recorder>,
    }
}

impl<S> ResponseFuture<S>
where
    S: Service<Request<PolicyBody>>,
{
    pub(crate) fn new(inner: CheckFuture<S, PolicyBody, AuditCheck>, recorder: Recorder) -> Self {
        ResponseFuture {
            inner,
            recorder: Some(recorder),
        }
    }
}

impl<S> fmt::Debug for ResponseFuture<S>
where
    S: Service<Request<PolicyBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ResBody> Future for ResponseFuture<S>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Output = Result<Response<AuditBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut recorder = this
            .recorder
            .take()
            .expect("ResponseFuture polled after completion");
        match result {
            Err(error) => {
                recorder.finish(End::Failed);
                Poll::Ready(Err(error))
            }
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                let strip = recorder.on_response(&mut parts);
                if strip {
                    // The body will be shorter than the upstream said.
                    parts.headers.remove(header::CONTENT_LENGTH);
                }
                Poll::Ready(Ok(Response::from_parts(
                    parts,
                    AuditBody::new(body, recorder, strip),
                )))
            }
        }
    }
}

/// The audit layer's part in the shared machinery: it never rejects, and reads the body only
/// when the key is known already (authenticated before this layer) or it is told to.
#[derive(Clone, Debug)]
pub(crate) struct AuditCheck {
    policy: Policy,
    reads_itself: bool,
}

impl AuditCheck {
    pub(crate) fn new(policy: Policy, reads_itself: bool) -> Self {
        AuditCheck {
            policy,
            reads_itself,
        }
    }
}

impl Check for AuditCheck {
    fn layer(&self) -> LayerName {
        LayerName::Audit
    }

    fn policy(&self) -> &Policy {
        &self.policy
    }

    fn on_head(&self, _: &LlmRequest, _: Option<&ApiKey>) -> Result<bool, PolicyError> {
        Ok(self.reads_itself)
    }

    fn decide(
        &self,
        _: &mut LlmRequest,
        _: Option<&ApiKey>,
        _: Option<&crate::audit::AuditHandle>,
    ) -> Result<(), PolicyError> {
        Ok(())
    }

    fn reads_for_audit(&self) -> bool {
        false
    }

    fn refuses_ambiguous(&self) -> bool {
        false
    }
}
