//! Guards on responses: JSON bodies and SSE streams.
//!
//! INTERFACE (the request side builds a [`ResponsePlan`] and calls [`guard_response`]); the
//! rest of this module is the response-guard work.

use std::sync::Arc;

use crate::alert::AlertSink;
use crate::audit::AuditHandle;
use crate::endpoint::Endpoint;

use super::Guard;

/// What to check in one request's response.
#[derive(Clone)]
pub(crate) struct ResponsePlan {
    /// The response-side guards that apply to this request, in order: detector guards
    /// ([`Kind::Detect`](super::Kind::Detect)), firewalls and reflection guards.
    pub(crate) guards: Vec<Guard>,
    /// The request's system prompt (its `system` and `developer` messages and
    /// `instructions`, joined by newlines), for reflection guards; empty when none.
    pub(crate) system_prompt: Arc<str>,
    /// The endpoint the response answers.
    pub(crate) endpoint: Endpoint,
    /// The key's name, for alerts.
    pub(crate) key: Option<String>,
    /// The request's audit handle: flags `guard:<name>` go there.
    pub(crate) audit: Option<AuditHandle>,
    /// Where blocks are announced.
    pub(crate) alerts: Option<Arc<dyn AlertSink>>,
}

// ---------------------------------------------------------------------------------------
// TEMPORARY pass-through, replaced by the response-guard work when it is merged.

use std::future::{ready, Ready};

use bytes::Bytes;
use http_body_util::Full;

/// The response body of [`Guarded`](super::Guarded).
pub type GuardBody<B> = http_body_util::Either<B, Full<Bytes>>;

pub(crate) type GuardResponse<B> = Ready<http::Response<GuardBody<B>>>;

pub(crate) fn guard_response<B>(
    _plan: Option<ResponsePlan>,
    response: http::Response<B>,
) -> GuardResponse<B> {
    ready(response.map(http_body_util::Either::Left))
}

pub(crate) fn rejection_body<B>(full: Full<Bytes>) -> GuardBody<B> {
    http_body_util::Either::Right(full)
}
