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
