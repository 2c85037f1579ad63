//! AuditSink: one [`AuditRecord`] per request — allowed or rejected — with the streamed token
//! usage and its cost, written to pluggable [`LogSink`]s.
//!
//! Put [`AuditLayer`] outermost, so that it sees every request, including those a later layer
//! rejects:
//!
//! ```text
//! client ──► Audit ──► BodyLimit ──► KeyAuth ──► FeatureBlock ──► ModelAllowList ──► PromptLimit ──► upstream
//! ```
//!
//! The layer puts an [`AuditHandle`] into each request's extensions; the layers after it
//! write into it what the record needs, as they learn it: the key ([`KeyAuth`](crate::KeyAuth)),
//! the resolved request (the layer that reads the body: the model after aliases, the end user,
//! the prompt), and flags. Nothing of the body is read before the key is checked; see
//! [`AuditLayer::read_body`] for a stack with no key check.
//!
//! # What is recorded
//!
//! - **Who and what**: the request id (`x-request-id`, honoured when plausible, otherwise
//!   generated, and sent back on the response), the key's name and metadata labels (never
//!   the key: [`KeyAuth`](crate::KeyAuth) writes the found key into the handle), the end user, the client address, the
//!   endpoint, the model as sent and its canonical name after the [`Policy`](crate::Policy)'s
//!   aliases (the name every check used, and the one priced), whether the response is
//!   streamed.
//! - **What happened**: the status, the [`Outcome`], and for a rejection the layer and the
//!   code (read from the [`Rejection`](crate::Rejection) the rejecting layer leaves in the
//!   response's extensions; a body that cannot be parsed is `blocked_by: "request_body"`).
//!   Flags from layers that only audit ([`AuditHandle::flag`]) and from this layer ([`flag`]).
//! - **Usage and cost**: the response body is wrapped ([`AuditBody`]), never buffered: every
//!   frame is passed on as it comes and scanned on the way ([`UsageScanner`]): a JSON
//!   body's `usage`, a chat/completions stream's usage chunk, a Responses stream's
//!   `response.completed`. A streamed chat completions (or completions) request that did not
//!   ask for usage gets `stream_options.include_usage` turned on upstream, and the usage-only
//!   chunk is removed before the client sees it ([`AuditLayer::inject_usage`], on by
//!   default); when the client asked for usage itself its stream is untouched. The cost comes
//!   from the layer's [`PricingTable`](crate::audit::pricing::PricingTable) and the canonical model:
//!   an unknown model gives `cost_usd: null` and the flag `unknown_price`, never a guess. No
//!   usage gives the flag `usage_missing` and an estimate of the prompt labelled as one.
//! - **Timing**: latency to the end of the body, time to the first byte of the body.
//! - **Content**: not by default. [`AuditLayer::log_content`] adds the prompt and the start
//!   of the response, redacted ([`redact_api_keys`] unless [`AuditLayer::redact`] says
//!   otherwise) and bounded.
//!
//! The record is emitted exactly once: when the body ends, when it fails (`upstream_error`),
//! when it is dropped early (`cancelled`: the client went away), when the inner service
//! returns an error, or when the response future itself is dropped.
//!
//! # Sinks
//!
//! [`LogSink::record`] is synchronous and never blocks the request: see [`sink`] for the
//! JSON Lines file sink with its writer thread and bounded queue, the `tracing` sink (feature
//! `tracing`), the in-memory sink for tests, the fan-out and the closure sink. A sink that
//! panics is contained: the response goes on, the record is lost and counted
//! ([`AuditLayer::sink_panics`]).
//!
//! # Example
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use http_body_util::BodyExt;
//! use tower_llm_policy::PolicyBody;
//! use tower_llm_policy::audit::{AuditLayer, MemorySink, Outcome};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let sink = MemorySink::new();
//! let svc = ServiceBuilder::new()
//!     // No key check and no policy layer inside: the audit layer reads the body itself.
//!     .layer(AuditLayer::new(sink.clone()).read_body(true))
//!     .service(service_fn(|_req: Request<PolicyBody>| async {
//!         let body = r#"{"choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":100,"total_tokens":1100}}"#;
//!         Ok::<_, std::convert::Infallible>(
//!             Response::builder().header("content-type", "application/json").body(body.to_owned()).unwrap(),
//!         )
//!     }));
//!
//! let req = Request::post("/v1/chat/completions")
//!     .body(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#.to_owned())
//!     .unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! res.into_body().collect().await.unwrap();
//!
//! let record = sink.last().unwrap();
//! assert_eq!(record.outcome, Outcome::Completed);
//! assert_eq!(record.model.as_deref(), Some("gpt-4o-mini"));
//! assert_eq!(record.total_tokens, Some(1100));
//! // gpt-4o-mini: $0.15 in, $0.60 out per million tokens.
//! assert!((record.cost_usd.unwrap() - 0.00021).abs() < 1e-12);
//! # });
//! ```
//!
//! [`UsageScanner`]: crate::audit::usage::UsageScanner

mod body;
mod future;
mod handle;
mod layer;
mod record;
mod recorder;
mod service;

pub mod pricing;
pub mod sink;
pub mod usage;

pub use body::AuditBody;
pub use future::ResponseFuture;
pub use handle::AuditHandle;
pub use layer::{AuditLayer, DEFAULT_MAX_CONTENT_BYTES};
pub use record::{
    flag, redact_api_keys, AuditRecord, ContentLog, Outcome, RequestId, UsageEstimate,
    MAX_FIELD_BYTES, MAX_PATH_BYTES,
};
pub use service::Audit;
#[cfg(feature = "tracing")]
pub use sink::TracingSink;
pub use sink::{FanOut, FnSink, JsonlSink, JsonlSinkBuilder, LogSink, MemorySink};
