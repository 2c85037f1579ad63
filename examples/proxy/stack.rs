//! The proxy's tower stack: the crate's policy layers in front of the forwarding client.
//!
//! ```text
//! client ──► AuditSink ──► KeyAuth ──► ModelAllowList ──► FeatureBlock ──► PromptLimit ──► Upstream
//! ```
//!
//! The layers that exist today are wired; the others have an `INTEGRATE:` marker at the spot
//! where they slot in, saying which configuration values go where.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_policy::model::{ModelList, ModelNames};
use tower_llm_policy::pricing::PricingTable;
use tower_llm_policy::request::BodyOptions;
use tower_llm_policy::{KeyAuthLayer, KeyStore, ModelAllowListLayer, PolicyBody};

use crate::config::{AuditConfig, BlockedConfig, Config, PromptLimitsConfig};
use crate::upstream::{BoxError, Upstream};

/// The response body every variant of the stack answers with.
pub(crate) type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The whole stack, type-erased (its request body is the client's, streamed, and limited to
/// `[body]` by the server before it gets here) so that the policy and `--no-policy` variants (and any set of
/// layers) are one type. One box per request, in both variants alike.
pub(crate) type ProxyService =
    BoxCloneService<Request<PolicyBody>, Response<ProxyBody>, Infallible>;

/// Everything the policy layers are built from, resolved from the [`Config`] once.
pub(crate) struct Policy {
    /// The keys (a file store on the config file, or the embedded default's memory store).
    pub(crate) store: Arc<dyn KeyStore>,
    /// `[workspace] models`.
    pub(crate) workspace_models: Option<ModelList>,
    /// `[model_names]`.
    pub(crate) names: ModelNames,
    /// `[body]`, for whichever layer reads the body first.
    pub(crate) body: BodyOptions,
    /// `[blocked]`: for FeatureBlock.
    #[allow(dead_code)] // read at the FeatureBlock INTEGRATE marker
    pub(crate) blocked: BlockedConfig,
    /// `[prompt_limits]`: for PromptLimit.
    #[allow(dead_code)] // read at the PromptLimit INTEGRATE marker
    pub(crate) prompt_limits: PromptLimitsConfig,
    /// The built-in prices with `[pricing]` on top: for the audit records' `cost_usd`.
    #[allow(dead_code)] // read at the AuditSink INTEGRATE marker
    pub(crate) pricing: PricingTable,
    /// `[audit]`.
    #[allow(dead_code)] // read at the AuditSink INTEGRATE marker
    pub(crate) audit: AuditConfig,
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
    /// The policy of `config`, with its keys served by `store`.
    pub(crate) fn new(config: Config, store: Arc<dyn KeyStore>) -> Policy {
        let mut pricing = PricingTable::builtin();
        pricing.merge(config.pricing);
        Policy {
            store,
            workspace_models: config.workspace.models,
            names: config.model_names.to_model_names(),
            body: config.body.options(),
            blocked: config.blocked,
            prompt_limits: config.prompt_limits,
            pricing,
            audit: config.audit,
        }
    }
}

/// The stack: the policy layers (when `policy` is some) in front of `upstream`.
pub(crate) fn build_stack(policy: Option<&Policy>, upstream: Upstream) -> ProxyService {
    let Some(policy) = policy else {
        // `--no-policy`: the same forwarding, server and boxing; no layer at all.
        return BoxCloneService::new(ServiceExt::<Request<PolicyBody>>::map_response(
            upstream, box_body,
        ));
    };

    let mut allow_list = ModelAllowListLayer::new()
        .model_names(policy.names.clone())
        .body_options(policy.body);
    if let Some(models) = &policy.workspace_models {
        allow_list = allow_list.workspace_models(models.entries());
    }

    let stack = ServiceBuilder::new()
        // INTEGRATE: AuditSinkLayer (issue 4) goes first, outermost, so that it sees every
        // request, rejected ones included, and every response body to its end:
        //   .option_layer(policy.audit.jsonl.as_ref().map(|path| {
        //       AuditSinkLayer::new(JsonlSink::open(path)?)   // `[audit] jsonl`
        //           .pricing(policy.pricing.clone())          // built-in + `[pricing]`
        //           .model_names(policy.names.clone())        // `[model_names]`
        //           .body_options(policy.body)                // `[body]`
        //   }))
        // and keep a handle on the sink in `Proxy` so that `server::run` flushes it after
        // the last connection closed (see the INTEGRATE marker there).
        .layer(KeyAuthLayer::new(policy.store.clone()))
        .layer(allow_list)
        // INTEGRATE: FeatureBlockLayer (issue 3), after ModelAllowList:
        //   .layer(FeatureBlockLayer::new()
        //       .blocked_features(policy.blocked.features)        // `[blocked] features`
        //       .blocked_models(policy.blocked.models.clone())    // `[blocked] models`
        //       .model_names(policy.names.clone())                // `[model_names]`
        //       .body_options(policy.body))                       // `[body]`
        // A key's own `blocked_features` / `blocked_models` come with its `Arc<ApiKey>`.
        //
        // INTEGRATE: PromptLimitLayer (issue 3), last before the upstream:
        //   .layer(PromptLimitLayer::new()
        //       .max_prompt_chars(policy.prompt_limits.max_prompt_chars)   // `[prompt_limits]`
        //       .max_prompt_tokens(policy.prompt_limits.max_prompt_tokens)
        //       .max_output_tokens(policy.prompt_limits.max_output_tokens)
        //       .max_n(policy.prompt_limits.max_n)
        //       .max_messages(policy.prompt_limits.max_messages)
        //       .require_user(policy.prompt_limits.require_user)
        //       .body_options(policy.body))                                // `[body]`
        // A key's own `max_prompt_tokens` etc. come with its `Arc<ApiKey>`.
        //
        // INTEGRATE: then un-ignore the tests in tests/proxy.rs marked "needs
        // FeatureBlock/PromptLimit/AuditSink".
        .service(upstream);
    BoxCloneService::new(ServiceExt::<Request<PolicyBody>>::map_response(
        stack, box_body,
    ))
}

/// Boxes any response body of the stack into [`ProxyBody`].
fn box_body<B>(response: Response<B>) -> Response<ProxyBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    response.map(|body| body.map_err(Into::into).boxed_unsync())
}
