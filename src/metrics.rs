//! Metrics (feature `metrics`): a [`LogSink`] that turns each audit record into counters and
//! histograms of the [`metrics`] facade, for whichever exporter the host installs
//! (Prometheus, StatsD, ...).
//!
//! [`MetricsSink`] goes into the audit layer's sinks (alone, or with others in a
//! [`FanOut`](crate::audit::FanOut)), so every request is counted once, allowed or rejected,
//! when its response ends. Nothing is measured twice: the numbers are the record's.
//!
//! # Metrics
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `llm_policy_requests_total` | counter | `key`, `model`, `endpoint`, `status`, `outcome` | requests, allowed or not |
//! | `llm_policy_blocked_total` | counter | `layer`, `code` | requests a policy layer rejected |
//! | `llm_policy_tokens_total` | counter | `key`, `model`, `direction` (`in`, `out`) | prompt and completion tokens the upstream reported |
//! | `llm_policy_cost_microusd_total` | counter | `key`, `model` | cost in millionths of a USD (the sum of the records' `cost_usd`, rounded once, not per request) |
//! | `llm_policy_streams_total` | counter | `model`, `outcome` (`completed`, `cancelled`, `cut`, `blocked`, `error`) | streamed requests that went upstream, by how they ended (`cut`: by a spend cap; `blocked`: stopped by a content guard) |
//! | `llm_policy_request_duration_seconds` | histogram | `endpoint`, `outcome` | arrival to the end of the response body |
//! | `llm_policy_layers_duration_seconds` | histogram | `decision` (`forwarded`, `rejected`) | time spent in the policy layers, the upstream excluded ([`AuditRecord::policy_ms`]) |
//! | `llm_policy_audit_queue_depth` | gauge | `sink` | records waiting in a watched [`JsonlSink`]'s queue |
//! | `llm_policy_audit_queue_bytes` | gauge | `sink` | their bytes |
//! | `llm_policy_audit_dropped_total` | counter | `sink` | records the sink dropped (queue full) |
//! | `llm_policy_audit_write_errors_total` | counter | `sink` | its failed writes |
//!
//! `outcome` is the record's ([`Outcome::as_str`]); `status` the HTTP status (`none` when no
//! response was produced); `key` the key's *name* ([`ApiKey::name`](crate::ApiKey), never the
//! key; `none` when no key was found); `layer` and `code` the rejection's
//! ([`LayerName::as_str`](crate::LayerName::as_str), the OpenAI error code).
//!
//! # Bounded labels
//!
//! Every label value comes from a fixed set or from the host's configuration, never from what
//! a client sent, so that a client cannot create series without end (millions of made-up
//! model names would exhaust the memory of the exporter and of Prometheus):
//!
//! - `model` is the record's canonical model only when it is a *known* model: one of the
//!   pricing table's (the built-in one by default, [`MetricsSink::priced_models`]) or one
//!   the host names ([`MetricsSink::models`], e.g. the allow-lists). Any other name is
//!   `other`, and a request without a model is `unknown`. A rejected request's model is the
//!   client's text, so this holds for rejections too.
//! - `endpoint` is one of [`Endpoint::as_str`](crate::Endpoint::as_str)'s names (`unknown`
//!   for anything else);
//! - `key` is one series per configured key ([`MetricsSink::key_label`] turns it off for a
//!   store with very many keys: then it is always `all`);
//! - `status` is a number from 100 to 599 (or `none`); `layer` and `code` are names from the
//!   code.
//!
//! # Sink queues
//!
//! [`MetricsSink::watch_jsonl`] reports a [`JsonlSink`]'s queue and drops, on every record
//! and whenever [`MetricsSink::report_sinks`] is called (before rendering a scrape, so that
//! an idle proxy's gauges are current too).
//!
//! # Example
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use metrics_util::debugging::DebuggingRecorder;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_policy::metrics::{names, MetricsSink};
//! use tower_llm_policy::{AuditLayer, PolicyBody};
//!
//! // The host installs an exporter's recorder; this test uses a local one.
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
//! metrics::with_local_recorder(&recorder, || {
//!     let svc = ServiceBuilder::new()
//!         .layer(AuditLayer::new(MetricsSink::new()))
//!         .service(service_fn(|_req: Request<PolicyBody>| async {
//!             Ok::<_, std::convert::Infallible>(Response::new(String::new()))
//!         }));
//!     let req = Request::get("/v1/models").body(String::new()).unwrap();
//!     let res = runtime.block_on(svc.oneshot(req)).unwrap();
//!     assert_eq!(res.status(), StatusCode::OK);
//!     // The record is emitted when the response body ends (or is dropped).
//!     drop(res);
//! });
//! let requests = snapshotter
//!     .snapshot()
//!     .into_vec()
//!     .into_iter()
//!     .filter(|(key, ..)| key.key().name() == names::REQUESTS)
//!     .count();
//! assert_eq!(requests, 1);
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use ::metrics::{counter, gauge, histogram, SharedString};

use crate::audit::pricing::PricingTable;
use crate::audit::{flag, AuditRecord, JsonlSink, LogSink, Outcome};

/// The metric names, for exporters' settings (histogram buckets) and queries.
pub mod names {
    /// Requests, allowed or not: `key`, `model`, `endpoint`, `status`, `outcome`.
    pub const REQUESTS: &str = "llm_policy_requests_total";
    /// Requests a policy layer rejected: `layer`, `code`.
    pub const BLOCKED: &str = "llm_policy_blocked_total";
    /// Tokens the upstream reported: `key`, `model`, `direction` (`in`, `out`).
    pub const TOKENS: &str = "llm_policy_tokens_total";
    /// Cost, in millionths of a USD: `key`, `model`.
    pub const COST_MICROUSD: &str = "llm_policy_cost_microusd_total";
    /// Streamed requests that went upstream, by their end: `model`, `outcome`.
    pub const STREAMS: &str = "llm_policy_streams_total";
    /// Arrival to the end of the response body, in seconds: `endpoint`, `outcome`.
    pub const REQUEST_DURATION: &str = "llm_policy_request_duration_seconds";
    /// Time in the policy layers, the upstream excluded, in seconds: `decision`.
    pub const LAYERS_DURATION: &str = "llm_policy_layers_duration_seconds";
    /// Records waiting in a watched sink's queue: `sink`.
    pub const AUDIT_QUEUE_DEPTH: &str = "llm_policy_audit_queue_depth";
    /// Bytes of the records waiting in a watched sink's queue: `sink`.
    pub const AUDIT_QUEUE_BYTES: &str = "llm_policy_audit_queue_bytes";
    /// Records a watched sink dropped: `sink`.
    pub const AUDIT_DROPPED: &str = "llm_policy_audit_dropped_total";
    /// A watched sink's failed writes: `sink`.
    pub const AUDIT_WRITE_ERRORS: &str = "llm_policy_audit_write_errors_total";
}

/// Histogram buckets (seconds) that suit [`names::REQUEST_DURATION`]: 10 ms to 5 minutes.
pub const REQUEST_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Histogram buckets (seconds) that suit [`names::LAYERS_DURATION`]: 10 µs to 5 s (a key
/// store or a ledger over the network, a slow request body).
pub const LAYERS_DURATION_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1,
    0.5, 1.0, 5.0,
];

/// The `model` label of a model that is not known (see the [module docs](self)).
pub const OTHER_MODEL: &str = "other";

/// The `model` label of a request without a model.
pub const UNKNOWN_MODEL: &str = "unknown";

/// The endpoint names a record can have ([`Endpoint::as_str`](crate::Endpoint::as_str)).
const ENDPOINTS: [&str; 20] = [
    "chat_completions",
    "completions",
    "embeddings",
    "image_generation",
    "image_edit",
    "image_variation",
    "audio_speech",
    "audio_transcription",
    "audio_translation",
    "moderations",
    "responses",
    "files",
    "batches",
    "fine_tuning",
    "models",
    "realtime",
    "assistants",
    "videos",
    "evals",
    "other",
];

/// A [`LogSink`] that counts each audit record in the [`metrics`] facade. See the
/// [module docs](self) for the metrics and their labels.
///
/// Cheap to clone (clones share the cost totals). `record` takes a lock only for records
/// with a cost, to add it to its running total.
#[derive(Clone)]
pub struct MetricsSink {
    models: Arc<HashSet<Arc<str>>>,
    key_label: bool,
    jsonl: Vec<(&'static str, JsonlSink)>,
    #[cfg(feature = "postgres")]
    postgres: Vec<(&'static str, crate::postgres::PostgresSink)>,
    /// Each (key, model) series' cost so far, in USD: the counter is set to its rounded
    /// total, so that small costs are not lost to rounding each one.
    costs: Arc<Mutex<HashMap<(SharedString, SharedString), f64>>>,
}

impl Default for MetricsSink {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsSink {
    /// A sink that knows the models of the built-in pricing table
    /// ([`PricingTable::builtin`]).
    pub fn new() -> Self {
        MetricsSink {
            models: Arc::new(HashSet::new()),
            key_label: true,
            jsonl: Vec::new(),
            #[cfg(feature = "postgres")]
            postgres: Vec::new(),
            costs: Arc::default(),
        }
        .priced_models(&PricingTable::builtin())
    }

    /// Also knows the models `table` has a price for (the table the audit layer prices with,
    /// when it has more than the built-in one).
    #[must_use]
    pub fn priced_models(self, table: &PricingTable) -> Self {
        self.models(table.iter().map(|(model, _)| model))
    }

    /// Also knows `models` (canonical names, e.g. every name of the keys' allow-lists and
    /// the workspace's): they are labelled by name rather than [`OTHER_MODEL`].
    #[must_use]
    pub fn models<I>(mut self, models: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let known = Arc::make_mut(&mut self.models);
        known.extend(
            models
                .into_iter()
                .map(|m| Arc::from(m.as_ref().trim().to_ascii_lowercase())),
        );
        self
    }

    /// Whether the key's name is a label (default `true`). With `false` the `key` label is
    /// always `all`: for a key store with so many keys that a series each would be too many.
    #[must_use]
    pub fn key_label(mut self, on: bool) -> Self {
        self.key_label = on;
        self
    }

    /// Reports `sink`'s queue depth, queued bytes, drops and write errors with the label
    /// `sink = name`, on every record and on [`report_sinks`](Self::report_sinks). Keeps a
    /// clone of `sink` (which keeps its writer thread alive while this sink lives).
    #[must_use]
    pub fn watch_jsonl(mut self, name: &'static str, sink: &JsonlSink) -> Self {
        self.jsonl.push((name, sink.clone()));
        self
    }

    /// Reports a [`PostgresSink`](crate::postgres::PostgresSink)'s queue (records waiting),
    /// drops and records it could not write (`failed`) under `sink = name`, as
    /// [`watch_jsonl`](Self::watch_jsonl) does (feature `postgres`).
    #[cfg(feature = "postgres")]
    #[must_use]
    pub fn watch_postgres(
        mut self,
        name: &'static str,
        sink: &crate::postgres::PostgresSink,
    ) -> Self {
        self.postgres.push((name, sink.clone()));
        self
    }

    /// Sets the gauges and counters of the watched sinks ([`watch_jsonl`](Self::watch_jsonl))
    /// now: call it before rendering a scrape.
    pub fn report_sinks(&self) {
        #[cfg(feature = "postgres")]
        for (name, sink) in &self.postgres {
            let labels = [("sink", *name)];
            gauge!(names::AUDIT_QUEUE_DEPTH, &labels).set(sink.queue_depth() as f64);
            counter!(names::AUDIT_DROPPED, &labels).absolute(sink.dropped());
            counter!(names::AUDIT_WRITE_ERRORS, &labels).absolute(sink.failed());
        }
        for (name, sink) in &self.jsonl {
            let labels = [("sink", *name)];
            gauge!(names::AUDIT_QUEUE_DEPTH, &labels).set(sink.queued() as f64);
            gauge!(names::AUDIT_QUEUE_BYTES, &labels).set(sink.queued_bytes() as f64);
            counter!(names::AUDIT_DROPPED, &labels).absolute(sink.dropped());
            counter!(names::AUDIT_WRITE_ERRORS, &labels).absolute(sink.write_errors());
        }
    }

    /// Registers the metrics' descriptions and units with the installed recorder (exporters
    /// show them as `# HELP`). Call it once, after installing the recorder.
    pub fn describe() {
        use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
        describe_counter!(
            names::REQUESTS,
            "LLM API requests, allowed or rejected by the policy layers"
        );
        describe_counter!(
            names::BLOCKED,
            "Requests rejected by a policy layer, by layer and error code"
        );
        describe_counter!(
            names::TOKENS,
            "Prompt (in) and completion (out) tokens reported by the upstream"
        );
        describe_counter!(names::COST_MICROUSD, "Cost in millionths of a USD");
        describe_counter!(
            names::STREAMS,
            "Streamed requests that went upstream, by how they ended"
        );
        describe_histogram!(
            names::REQUEST_DURATION,
            Unit::Seconds,
            "From the request's arrival to the end of the response body"
        );
        describe_histogram!(
            names::LAYERS_DURATION,
            Unit::Seconds,
            "Time spent in the policy layers before the upstream was called (or the request rejected)"
        );
        describe_gauge!(
            names::AUDIT_QUEUE_DEPTH,
            "Audit records waiting in the sink's queue"
        );
        describe_gauge!(
            names::AUDIT_QUEUE_BYTES,
            Unit::Bytes,
            "Bytes of the audit records waiting in the sink's queue"
        );
        describe_counter!(
            names::AUDIT_DROPPED,
            "Audit records dropped by the sink (queue full)"
        );
        describe_counter!(names::AUDIT_WRITE_ERRORS, "Failed writes of the audit sink");
    }

    /// The `model` label of `record`: its canonical model when it is known, else
    /// [`OTHER_MODEL`]; [`UNKNOWN_MODEL`] without one (see the [module docs](self)).
    pub fn model_label(&self, record: &AuditRecord) -> SharedString {
        match record.canonical_model.as_deref() {
            None => SharedString::const_str(UNKNOWN_MODEL),
            Some(model) => match self.models.get(model) {
                // A shared name: no copy per record.
                Some(known) => SharedString::from(known.clone()),
                None => SharedString::const_str(OTHER_MODEL),
            },
        }
    }

    /// The `key` label of `record`: the key's name, `none` without a key, `all` with the
    /// label turned off.
    fn key_label_of(&self, record: &AuditRecord) -> SharedString {
        match (&record.key, self.key_label) {
            (_, false) => SharedString::const_str("all"),
            (None, true) => SharedString::const_str("none"),
            (Some(name), true) => SharedString::from(name.clone()),
        }
    }
}

/// The `endpoint` label: one of the crate's endpoint names, else `unknown`.
fn endpoint_label(endpoint: &str) -> &'static str {
    ENDPOINTS
        .iter()
        .find(|&&name| name == endpoint)
        .copied()
        .unwrap_or("unknown")
}

/// The `status` label: the status code, `none` without a response (or `invalid`).
fn status_label(status: Option<u16>) -> String {
    match status {
        None => "none".to_owned(),
        Some(code @ 100..=599) => code.to_string(),
        Some(_) => "invalid".to_owned(),
    }
}

/// How a streamed request that went upstream ended; `None` for the others.
fn stream_outcome(record: &AuditRecord) -> Option<&'static str> {
    if !record.stream || record.outcome == Outcome::Rejected {
        return None;
    }
    if record.flags.iter().any(|f| f == flag::BUDGET_CUT) {
        return Some("cut");
    }
    Some(match record.outcome {
        Outcome::Completed => "completed",
        Outcome::Cancelled => "cancelled",
        Outcome::Stopped => "blocked",
        _ => "error",
    })
}

/// A label that is one of a fixed set of names from the code (`blocked_by`, `code`): kept if
/// it is a plain snake_case name of at most 64 bytes, else `other`.
fn code_label(value: Option<&str>) -> String {
    match value {
        Some(v)
            if !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') =>
        {
            v.to_owned()
        }
        Some(_) => "other".to_owned(),
        None => "none".to_owned(),
    }
}

impl fmt::Debug for MetricsSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsSink")
            .field("models", &self.models.len())
            .field("key_label", &self.key_label)
            .field(
                "jsonl",
                &self.jsonl.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl LogSink for MetricsSink {
    fn record(&self, record: &AuditRecord) {
        let key = self.key_label_of(record);
        let model = self.model_label(record);
        let endpoint = endpoint_label(&record.endpoint);
        let outcome = record.outcome.as_str();
        counter!(
            names::REQUESTS,
            "key" => key.clone(),
            "model" => model.clone(),
            "endpoint" => endpoint,
            "status" => status_label(record.status),
            "outcome" => outcome,
        )
        .increment(1);
        if record.outcome == Outcome::Rejected {
            counter!(
                names::BLOCKED,
                "layer" => code_label(record.blocked_by.as_deref()),
                "code" => code_label(record.code.as_deref()),
            )
            .increment(1);
        }
        if let Some(tokens) = record.prompt_tokens {
            counter!(names::TOKENS, "key" => key.clone(), "model" => model.clone(), "direction" => "in")
                .increment(tokens);
        }
        if let Some(tokens) = record.completion_tokens {
            counter!(names::TOKENS, "key" => key.clone(), "model" => model.clone(), "direction" => "out")
                .increment(tokens);
        }
        if let Some(cost) = record.cost_usd.filter(|c| c.is_finite() && *c > 0.0) {
            let total = {
                let mut costs = self.costs.lock().unwrap_or_else(PoisonError::into_inner);
                let total = costs.entry((key.clone(), model.clone())).or_insert(0.0);
                *total += cost;
                *total
            };
            counter!(names::COST_MICROUSD, "key" => key, "model" => model.clone())
                .absolute((total * 1e6).round() as u64);
        }
        if let Some(stream) = stream_outcome(record) {
            counter!(names::STREAMS, "model" => model, "outcome" => stream).increment(1);
        }
        histogram!(names::REQUEST_DURATION, "endpoint" => endpoint, "outcome" => outcome)
            .record(record.latency_ms / 1000.0);
        if let Some(policy_ms) = record.policy_ms {
            let decision = if record.outcome == Outcome::Rejected {
                "rejected"
            } else {
                "forwarded"
            };
            histogram!(names::LAYERS_DURATION, "decision" => decision).record(policy_ms / 1000.0);
        }
        self.report_sinks();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Endpoint;

    /// Every endpoint's name is a label as it is. (The match fails to compile when a variant
    /// is added: add it here and to `ENDPOINTS`.)
    #[test]
    fn every_endpoint_name_is_a_label() {
        let all = [
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Embeddings,
            Endpoint::ImageGeneration,
            Endpoint::ImageEdit,
            Endpoint::ImageVariation,
            Endpoint::AudioSpeech,
            Endpoint::AudioTranscription,
            Endpoint::AudioTranslation,
            Endpoint::Moderations,
            Endpoint::Responses,
            Endpoint::Files,
            Endpoint::Batches,
            Endpoint::FineTuning,
            Endpoint::Models,
            Endpoint::Realtime,
            Endpoint::Assistants,
            Endpoint::Videos,
            Endpoint::Evals,
            Endpoint::Other,
        ];
        for endpoint in all {
            match endpoint {
                Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Embeddings
                | Endpoint::ImageGeneration
                | Endpoint::ImageEdit
                | Endpoint::ImageVariation
                | Endpoint::AudioSpeech
                | Endpoint::AudioTranscription
                | Endpoint::AudioTranslation
                | Endpoint::Moderations
                | Endpoint::Responses
                | Endpoint::Files
                | Endpoint::Batches
                | Endpoint::FineTuning
                | Endpoint::Models
                | Endpoint::Realtime
                | Endpoint::Assistants
                | Endpoint::Videos
                | Endpoint::Evals
                | Endpoint::Other => {}
            }
            assert_eq!(endpoint_label(endpoint.as_str()), endpoint.as_str());
        }
        assert_eq!(endpoint_label("/v1/../etc"), "unknown");
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(status_label(Some(200)), "200");
        assert_eq!(status_label(Some(100)), "100");
        assert_eq!(status_label(Some(599)), "599");
        assert_eq!(status_label(Some(99)), "invalid");
        assert_eq!(status_label(Some(600)), "invalid");
        assert_eq!(status_label(None), "none");
        assert_eq!(code_label(Some("model_not_allowed")), "model_not_allowed");
        assert_eq!(code_label(Some("Bad Name")), "other");
        assert_eq!(code_label(Some("")), "other");
        assert_eq!(code_label(Some(&"a".repeat(64))), "a".repeat(64));
        assert_eq!(code_label(Some(&"a".repeat(65))), "other");
        assert_eq!(code_label(None), "none");
    }
}
