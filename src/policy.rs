//! [`Policy`]: how a request is resolved, set once and shared by every layer.
//!
//! A request is resolved once, by the first layer of this crate that sees it: its route is
//! classified, its model named and resolved through the alias table, and (when a layer needs
//! it) its body read within the size limits and parsed. That layer's `Policy` decides how;
//! every later layer, the price and the audit record use the same resolved
//! [`LlmRequest`](crate::LlmRequest). Give every layer the same `Policy` (cloning it is
//! cheap: it is one `Arc`), or set it on the outermost one only: an inner layer resolves
//! nothing that an outer one already did.
//!
//! ```
//! use tower_llm_policy::{BodyOptions, ModelAllowListLayer, ModelAliases, Policy, PromptLimitLayer};
//!
//! let policy = Policy::new()
//!     .model_aliases(ModelAliases::new().alias("my-gpt4o-deployment", "gpt-4o"))
//!     .body_options(BodyOptions { limit: 4 << 20, ..BodyOptions::default() });
//! let allow = ModelAllowListLayer::new().policy(policy.clone()).workspace_models(["gpt-4o*"]);
//! let limit = PromptLimitLayer::new().policy(policy).max_prompt_tokens(8_000);
//! # let _ = (allow, limit);
//! ```

use std::sync::{Arc, OnceLock};

use crate::model::ModelAliases;
use crate::request::BodyOptions;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Shared {
    body: BodyOptions,
    aliases: ModelAliases,
}

/// How requests are resolved: body size limits and the model alias table. See the
/// [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    shared: Arc<Shared>,
}

impl Default for Policy {
    fn default() -> Self {
        // Built once and shared: `LlmRequest::parse` and every layer's `new` start from it.
        static DEFAULT: OnceLock<Policy> = OnceLock::new();
        DEFAULT
            .get_or_init(|| Policy {
                shared: Arc::new(Shared::default()),
            })
            .clone()
    }
}

impl Policy {
    /// The default: [`BodyOptions::default`] and no aliases.
    pub fn new() -> Self {
        Self::default()
    }

    /// Size limits for reading request bodies.
    #[must_use]
    pub fn body_options(mut self, options: BodyOptions) -> Self {
        Arc::make_mut(&mut self.shared).body = options;
        self
    }

    /// The alias table that model names are resolved through before any check, price or
    /// record.
    #[must_use]
    pub fn model_aliases(mut self, aliases: ModelAliases) -> Self {
        Arc::make_mut(&mut self.shared).aliases = aliases;
        self
    }

    /// The body size limits.
    pub fn body(&self) -> &BodyOptions {
        &self.shared.body
    }

    /// The alias table.
    pub fn aliases(&self) -> &ModelAliases {
        &self.shared.aliases
    }
}
