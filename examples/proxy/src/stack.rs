//! The proxy's tower stack: the crate's policy layers in front of the forwarding client.
//!
//! ```text
//! client ──► DrainOnCancel ──► Audit ──► BodyTimeout ──► BodyLimit ──► KeyAuth ──► FeatureBlock ──► ModelAllowList ──► PromptLimit ──► Guards ──► Quota ──► (x-llm-policy-* removed) ──► Upstream
//! ```
//!
//! [`Guards`](tower_llm_policy::guard) (`[[guards]]`, see [`crate::guards`]) is always there,
//! guards or none: it handles the `x-llm-policy-guards` header (a request adds guards to
//! itself, never removes one), and costs a look at the key when no guard applies. It sits
//! after PromptLimit (a prompt too long is refused before a guard reads it or a moderation
//! service is asked) and before Quota (a blocked request reserves nothing). Redacted
//! requests go upstream rewritten; guarded responses (`on = ["response"]`) are checked as
//! they stream. Every other request header starting with `x-llm-policy-` is removed before
//! the request is forwarded, in both variants: policy headers never reach the upstream.
//!
//! [`Quota`](tower_llm_policy::quota) (each key's `credit_limit_usd`, `budget_period`, `rpm`,
//! `tpm`) is last: a request any other layer refuses reserves nothing and takes nothing
//! from a rate limit. Its counters are in this process's memory: they start at zero when the
//! proxy starts, and a file reload keeps them.
//!
//! [`BodyTimeout`](crate::slow_client::BodyTimeoutLayer) answers a request whose body stalled
//! or came too slowly with a 408, or did not fit in the server's budget of body bytes with a
//! 503 (inside the audit layer, so that the record has it), and gives the request's bytes back
//! to that budget once it is answered. The audit layer generates
//! every record's id itself: a client's `x-request-id` is never trusted as the id.
//!
//! Every layer shares one library [`Policy`](tower_llm_policy::Policy) (`[body]` and
//! `[model_names]`): the request is resolved once, with it.
//!
//! [`DrainOnCancel`](tower_llm_policy::audit::DrainOnCancelLayer) reads a response on briefly
//! when its client left before the usage came (`[audit] drain_after_cancel`).
//!
//! The audit layer is there when records have somewhere to go (`[audit] jsonl`, or the
//! console lines of the embedded default); the other layers always, each configured from its
//! own table (and each key's own fields, which come with its `ApiKey`).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};
use tower_layer::Layer;
use tower_llm_policy::alert::AlertSink;
use tower_llm_policy::audit::pricing::PricingTable;
use tower_llm_policy::audit::{DrainOnCancelLayer, FanOut};
use tower_llm_policy::guard::GuardLayer;
use tower_llm_policy::keys::StoreError;
use tower_llm_policy::model::{ModelAliases, ModelList};
use tower_llm_policy::quota::{QuotaLayer, RedisOptions, RedisStore};
use tower_llm_policy::request::BodyOptions;
use tower_llm_policy::{
    AuditLayer, BodyLimitLayer, FeatureBlockLayer, KeyAuthLayer, KeyStore, ModelAllowListLayer,
    OutputLimitMode, PolicyBody, PromptLimitLayer,
};

use crate::config::{BlockedConfig, Config, PromptLimitsConfig};
use crate::slow_client::BodyTimeoutLayer;
use crate::upstream::{BoxError, Upstream};

/// How long KeyAuth waits on the key store before it answers 503 `policy_unavailable`
/// ([`KeyAuthLayer::lookup_timeout`], timed by tokio). The proxy's file store answers at once
/// and never waits; a store over a network (a database, a cache) must answer within this.
pub const KEY_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The response body every variant of the stack answers with.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The whole stack, type-erased (its request body is the client's, streamed, and limited to
/// `[body]` by the server before it gets here) so that the policy and `--no-policy` variants (and any set of
/// layers) are one type. One box per request, in both variants alike.
pub type ProxyService = BoxCloneService<Request<PolicyBody>, Response<ProxyBody>, Infallible>;

/// Everything the policy layers are built from, resolved from the [`Config`] once.
pub struct Policy {
    /// The keys (a file store on the config file, or the embedded default's memory store).
    pub store: Arc<dyn KeyStore>,
    /// `[workspace] models`.
    pub workspace_models: Option<ModelList>,
    /// `[model_names]`.
    pub names: ModelAliases,
    /// `[body]`, for whichever layer reads the body first.
    pub body: BodyOptions,
    /// `[blocked]`: for FeatureBlock.
    pub blocked: BlockedConfig,
    /// `[prompt_limits]`: for PromptLimit.
    pub prompt_limits: PromptLimitsConfig,
    /// The built-in prices with `[pricing]` on top: for the audit records' `cost_usd`.
    pub pricing: PricingTable,
    /// Where the audit records go: `[audit] jsonl` (opened), the embedded default's console
    /// lines. No audit layer when empty.
    pub audit: FanOut,
    /// `[audit] drain_after_cancel`: reads a response on briefly for its usage when the
    /// client left first. Shared with the server, which waits for the drains before it
    /// flushes the audit log.
    pub drain: DrainOnCancelLayer,
    /// The keys' and teams' spend caps and rate limits, counted in memory or in Redis
    /// (`[state]`), at the same prices as the audit records. Kept across rebuilds of the
    /// stack.
    pub quota: QuotaLayer,
    /// The Redis store of `[state] redis_url`, flushed at shutdown (queued settlements).
    pub redis: Option<RedisStore>,
    /// `[[guards]]` and `[end_users]` (see [`Policy::with_guards`]); no guard by default.
    pub guards: GuardLayer,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("workspace_models", &self.workspace_models)
            .field("body", &self.body)
            .field("blocked", &self.blocked)
            .field("prompt_limits", &self.prompt_limits)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// The policy of `config`, with its keys served by `store` and its audit records sent to
    /// `audit` (the caller opens `[audit] jsonl`, adds the console lines). With `[state]
    /// redis_url`, connects to Redis (lazily: a Redis that is down fails requests of limited
    /// keys closed until it is back); must run within the Tokio runtime then. Fails on a
    /// Redis URL that cannot be read.
    pub fn new(
        config: Config,
        store: Arc<dyn KeyStore>,
        audit: FanOut,
    ) -> Result<Policy, StoreError> {
        let mut pricing = PricingTable::builtin();
        pricing.merge(config.pricing);
        let state = &config.state;
        let redis = match &state.redis_url {
            Some(url) => Some(RedisStore::open_with(
                url,
                RedisOptions::new()
                    .prefix(state.redis_prefix.clone())
                    .timeout(state.redis_timeout)
                    .reservation_ttl(state.reservation_ttl),
            )?),
            None => None,
        };
        let mut quota = match &redis {
            Some(redis) => QuotaLayer::new(redis.ledger(), redis.rate_limiter()),
            None => QuotaLayer::in_memory(),
        }
        .pricing(pricing.clone())
        .rate_limits_fail_open(state.rate_limits_fail_open);
        for team in &config.teams {
            quota = quota.team_cap(team.name.clone(), team.credit_limit_usd, team.budget_period);
        }
        Ok(Policy {
            quota,
            redis,
            store,
            workspace_models: config.workspace.models,
            names: config.model_names.to_model_aliases(),
            body: config.body.options(),
            blocked: config.blocked,
            prompt_limits: config.prompt_limits,
            pricing,
            audit,
            drain: DrainOnCancelLayer::new().drain_timeout(config.audit.drain_after_cancel),
            guards: GuardLayer::new(),
        })
    }

    /// The policy with `guards` (built by [`crate::guards::build`], not yet cloned), and
    /// with alerts of blocks and of spend thresholds (`thresholds`, in percent of a cap) sent
    /// to `alerts`.
    pub fn with_guards(
        mut self,
        guards: GuardLayer,
        alerts: Option<(Arc<dyn AlertSink>, Vec<u8>)>,
    ) -> Policy {
        let resolve = tower_llm_policy::Policy::new()
            .model_aliases(self.names.clone())
            .body_options(self.body);
        let mut guards = guards.policy(resolve);
        if let Some((sink, thresholds)) = alerts {
            guards = guards.alerts(sink.clone());
            self.quota = self.quota.alerts(sink).alert_thresholds(thresholds);
        }
        self.guards = guards;
        self
    }
}

/// Removes every request header starting with `x-llm-policy-` (what the layers read, they
/// removed already; anything else is not for the upstream either).
pub fn strip_policy_headers<B>(mut req: Request<B>) -> Request<B> {
    let names: Vec<http::HeaderName> = req
        .headers()
        .keys()
        .filter(|name| name.as_str().starts_with("x-llm-policy-"))
        .cloned()
        .collect();
    for name in names {
        req.headers_mut().remove(&name);
    }
    req
}

/// The stack: the policy layers (when `policy` is some) in front of `upstream`.
pub fn build_stack(policy: Option<&Policy>, upstream: Upstream) -> ProxyService {
    let Some(policy) = policy else {
        // `--no-policy`: the same forwarding, server and boxing; no layer at all.
        let timed = BodyTimeoutLayer.layer(upstream.map_request(strip_policy_headers));
        return BoxCloneService::new(ServiceExt::<Request<PolicyBody>>::map_response(
            timed, box_body,
        ));
    };

    // How requests are resolved, shared by every layer.
    let resolve = tower_llm_policy::Policy::new()
        .model_aliases(policy.names.clone())
        .body_options(policy.body);
    let mut allow_list = ModelAllowListLayer::new().policy(resolve.clone());
    if let Some(models) = &policy.workspace_models {
        allow_list = allow_list.workspace_models(models.entries());
    }
    let feature_block = FeatureBlockLayer::new()
        .deny_unknown_endpoints(policy.blocked.unknown_endpoints)
        .block_features(policy.blocked.features)
        .block_models(policy.blocked.models.entries())
        .block_image_sizes(&policy.blocked.image_sizes)
        .block_image_qualities(&policy.blocked.image_qualities)
        .policy(resolve.clone());
    let limits = &policy.prompt_limits;
    let mut prompt_limit = PromptLimitLayer::new()
        .require_user(limits.require_user)
        .require_output_limit(limits.require_output_limit)
        .output_limit_mode(if limits.clamp_output {
            OutputLimitMode::Clamp
        } else {
            OutputLimitMode::Reject
        })
        .policy(resolve.clone());
    for (value, set) in [
        (
            limits.max_prompt_chars,
            PromptLimitLayer::max_prompt_chars as fn(_, _) -> _,
        ),
        (
            limits.max_prompt_tokens,
            PromptLimitLayer::max_prompt_tokens,
        ),
        (
            limits.max_output_tokens,
            PromptLimitLayer::max_output_tokens,
        ),
        (limits.max_n, PromptLimitLayer::max_n),
        (limits.max_messages, PromptLimitLayer::max_messages),
    ] {
        if let Some(value) = value {
            prompt_limit = set(prompt_limit, value);
        }
    }

    // A key's own blocks and limits come with its `Arc<ApiKey>` from KeyAuth.
    // Cheapest and broadest first: the key, then what the path alone decides (a blocked
    // endpoint needs no body), then what needs the body.
    let policed = ServiceBuilder::new()
        .layer(BodyTimeoutLayer)
        .layer(BodyLimitLayer::new().policy(resolve.clone()))
        .layer(KeyAuthLayer::new(policy.store.clone()).lookup_timeout(KEY_LOOKUP_TIMEOUT))
        .layer(feature_block)
        .layer(allow_list)
        .layer(prompt_limit)
        .layer(policy.guards.clone())
        .layer(policy.quota.clone().policy(resolve.clone()))
        .map_request(strip_policy_headers)
        .service(upstream);
    match (!policy.audit.is_empty()).then_some(&policy.audit) {
        // Outermost, so that it sees every request, rejected ones included, and every
        // response body to its end.
        Some(sinks) => {
            // A client that leaves before the usage: the response is read on briefly for it.
            let drain = policy.drain.clone();
            let audited = AuditLayer::new(sinks.clone())
                // The record's id is ours: a client's `x-request-id` could collide with
                // another record's, or be chosen to.
                .trust_request_id(false)
                .pricing(policy.pricing.clone())
                .policy(resolve)
                .layer(policed);
            BoxCloneService::new(ServiceExt::<Request<PolicyBody>>::map_response(
                drain.layer(audited),
                box_policy_body,
            ))
        }
        None => BoxCloneService::new(ServiceExt::<Request<PolicyBody>>::map_response(
            policed,
            box_policy_body,
        )),
    }
}

/// [`box_body`], for the policy stack: an event stream goes out without `Content-Length`.
/// A response guard may rewrite a stream as it passes (masks, held-back text re-sent, an error
/// event at a block), so an upstream's length no longer holds; the library's response guard
/// keeps the header, and hyper would cut the stream at it. Chunked instead.
fn box_policy_body<B>(mut response: Response<B>) -> Response<ProxyBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let event_stream = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    if event_stream {
        response.headers_mut().remove(http::header::CONTENT_LENGTH);
    }
    box_body(response)
}

/// Boxes any response body of the stack into [`ProxyBody`].
fn box_body<B>(response: Response<B>) -> Response<ProxyBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    response.map(|body| body.map_err(Into::into).boxed_unsync())
}
