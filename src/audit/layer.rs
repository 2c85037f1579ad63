use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::pricing::PricingTable;
use super::record::redact_api_keys;
use super::sink::LogSink;
use crate::policy::Policy;

/// Default bound on the prompt text and on the response text kept per record when content
/// logging is on (16 KiB each).
pub const DEFAULT_MAX_CONTENT_BYTES: usize = 16 * 1024;

/// A redaction function for logged content.
pub(crate) type Redact = Arc<dyn Fn(&str) -> String + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) sink: Arc<dyn LogSink>,
    pub(crate) pricing: Arc<PricingTable>,
    pub(crate) inject_usage: bool,
    pub(crate) read_body: bool,
    pub(crate) log_content: bool,
    pub(crate) redact: Redact,
    pub(crate) max_content_bytes: usize,
    pub(crate) policy: Policy,
    pub(crate) trust_request_id: bool,
    /// Records lost to a panicking sink (or redaction function), shared by every clone.
    pub(crate) sink_panics: Arc<AtomicU64>,
}

/// Layer that writes one [`AuditRecord`](super::AuditRecord) per request to a
/// [`LogSink`]. See the [module docs](super).
#[derive(Clone)]
pub struct AuditLayer {
    pub(crate) config: Arc<Config>,
}

impl AuditLayer {
    /// Audits to `sink`, with the built-in prices, usage injection on, content logging off.
    pub fn new(sink: impl LogSink) -> Self {
        AuditLayer {
            config: Arc::new(Config {
                sink: Arc::new(sink),
                pricing: Arc::new(PricingTable::builtin()),
                inject_usage: true,
                read_body: false,
                log_content: false,
                redact: Arc::new(redact_api_keys),
                max_content_bytes: DEFAULT_MAX_CONTENT_BYTES,
                policy: Policy::default(),
                trust_request_id: false,
                sink_panics: Arc::new(AtomicU64::new(0)),
            }),
        }
    }

    /// How many records were lost so far because the sink panicked (or the
    /// [redaction function](Self::redact) did) while taking them. Shared by the clones of this
    /// layer and the services it made.
    ///
    /// A sink is user code called on the request path, in a response body's `poll_frame` or
    /// `Drop`: a panic there would take down the connection (or, in a `Drop` during unwinding,
    /// the process). The layer catches it: the response goes on unaffected, the record is lost
    /// and counted here, and with the `tracing` feature an `ERROR` event gives the request id
    /// (never the record, nor the panic's payload).
    pub fn sink_panics(&self) -> u64 {
        self.config.sink_panics.load(Ordering::Relaxed)
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The prices used for `cost_usd` (default: [`PricingTable::builtin`]; merge your own
    /// over it with [`PricingTable::merge`]).
    #[must_use]
    pub fn pricing(mut self, table: PricingTable) -> Self {
        self.config_mut().pricing = Arc::new(table);
        self
    }

    /// Whether streamed chat completions and completions requests that did not ask for usage
    /// get `stream_options.include_usage` turned on upstream, with the usage-only chunk removed
    /// before the client sees it (default: on). Off, such streams are recorded with
    /// [`usage_missing`](super::flag::USAGE_MISSING).
    #[must_use]
    pub fn inject_usage(mut self, inject: bool) -> Self {
        self.config_mut().inject_usage = inject;
        self
    }

    /// Whether this layer reads the request body itself, before the layers inside it (default:
    /// no).
    ///
    /// By default the body is never read before the key is checked: behind this layer, the
    /// first of [`FeatureBlock`](crate::FeatureBlock), [`ModelAllowList`](crate::ModelAllowList)
    /// and [`PromptLimit`](crate::PromptLimit) whose path checks pass reads it (after
    /// [`KeyAuth`](crate::KeyAuth) in the recommended order) and writes the model, the prompt
    /// and the end user into the request's [`AuditHandle`](super::AuditHandle); a key already
    /// known when the request reaches this layer (authenticated before it) lets it read the
    /// body itself. With none of those layers inside and no key check, turn this on: the layer
    /// then reads the body, records it and turns `include_usage` on for streams. Left off in
    /// such a stack, the record takes a bounded copy of the body as the inner service reads it
    /// (so the model and the prompt are still recorded) but cannot ask for usage.
    #[must_use]
    pub fn read_body(mut self, read: bool) -> Self {
        self.config_mut().read_body = read;
        self
    }

    /// Whether records carry the prompt and response text (default: off), redacted by the
    /// [redaction function](Self::redact) and cut at
    /// [`max_content_bytes`](Self::max_content_bytes).
    #[must_use]
    pub fn log_content(mut self, log: bool) -> Self {
        self.config_mut().log_content = log;
        self
    }

    /// The redaction applied to logged content (default: [`redact_api_keys`]).
    #[must_use]
    pub fn redact<F>(mut self, redact: F) -> Self
    where
        F: Fn(&str) -> String + Send + Sync + 'static,
    {
        self.config_mut().redact = Arc::new(redact);
        self
    }

    /// The most prompt text, and the most response text, kept per record when content is
    /// logged (default [`DEFAULT_MAX_CONTENT_BYTES`]).
    #[must_use]
    pub fn max_content_bytes(mut self, bytes: usize) -> Self {
        self.config_mut().max_content_bytes = bytes;
        self
    }

    /// The [`Policy`] a request is resolved with when this layer is the first to see it
    /// (outermost, it is: give it the policy every layer shares).
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.config_mut().policy = policy;
        self
    }

    /// Whether an incoming `x-request-id` header (1 to 128 characters of
    /// `[A-Za-z0-9._:/+=-]`) is used as the request id (default: no). A client-chosen id is
    /// not unique: two requests could share one record id, or a client could take another
    /// request's. Turn it on only behind a gateway that sets the header itself. Either way the
    /// client's header is kept, sanitised and bounded, as the record's `client_request_id`.
    #[must_use]
    pub fn trust_request_id(mut self, trust: bool) -> Self {
        self.config_mut().trust_request_id = trust;
        self
    }
}

impl fmt::Debug for AuditLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("AuditLayer")
            .field("prices", &c.pricing.len())
            .field("inject_usage", &c.inject_usage)
            .field("read_body", &c.read_body)
            .field("log_content", &c.log_content)
            .field("max_content_bytes", &c.max_content_bytes)
            .field("policy", &c.policy)
            .field("trust_request_id", &c.trust_request_id)
            .field("sink_panics", &self.sink_panics())
            .finish_non_exhaustive()
    }
}
