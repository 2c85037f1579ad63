//! FeatureBlock: block whole features (endpoints), models, and image sizes or qualities.
//!
//! The "enabled features and models" toggles of a gateway, as a layer. Two levels combine:
//!
//! - the **workspace** level, built into the layer: [`block_features`], [`block_models`],
//!   [`block_image_sizes`], [`block_image_qualities`], and optionally a default-deny
//!   [`allow_only`] list of features;
//! - the **key** level: the `blocked_features`, `blocked_models`, `blocked_image_sizes` and
//!   `blocked_image_qualities` of the
//!   [`ApiKey`] that [`KeyAuth`](crate::key_auth::KeyAuth) put in the request's extensions.
//!   A key's blocks add to the workspace's; they never lift one.
//!
//! A blocked request is answered with 422 `feature_blocked`, and a message that says which
//! level blocked what ("This key blocks the images feature", "This workspace blocks usage of
//! model: dall-e-3"); the inner service is not called.
//!
//! # What is matched
//!
//! - **Features** are classified from the method and path by [`Route::classify`](crate::Route::classify), including
//!   paths with a prefix before `/v1` (`/openai/v1/chat/completions`) and Azure deployment
//!   paths (`/openai/deployments/{name}/chat/completions`). A blocked group is named as a group
//!   where the whole group is blocked (`images`, `audio`), otherwise by the feature's name.
//! - **Models** are resolved once, through the [`Policy`]'s [`ModelAliases`](crate::ModelAliases), and matched on normalised and
//!   canonical names, with `prefix*` wildcards (see [`crate::model`]). The model is the one
//!   sent (body, multipart field, path, realtime `model` query), else the Azure deployment
//!   name (map it to a model with an alias: `ModelAliases::new().alias("my-deployment",
//!   "gpt-4o")` on the [`Policy`]), else the endpoint's documented default (`dall-e-2` for images), so blocking
//!   `dall-e-2` also catches an images request that names no model.
//! - **Image sizes and qualities** (`1792x1024`, `hd`) apply to the image endpoints only,
//!   compared without regard to case, for everyone and per key (`blocked_image_sizes`,
//!   `blocked_image_qualities`).
//! - **Unknown endpoints**: with [`deny_unknown_endpoints`], a request for an endpoint the
//!   classifier does not know is a 404 `unknown_url`, never forwarded.
//! - **Default deny**: with [`allow_only`], a request is refused unless its feature is in the
//!   list; requests to unknown endpoints ([`Endpoint::Other`]) are refused too. Include
//!   `models` if clients should still list models.
//!
//! A request refused on its endpoint is refused from the path alone, before any of its body is
//! read; the body is read only when a model, size or quality block could apply to the request.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_policy::PolicyBody;
//! use tower_llm_policy::feature_block::FeatureBlockLayer;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let svc = ServiceBuilder::new()
//!     .layer(
//!         FeatureBlockLayer::new()
//!             .block_features("audio".parse().unwrap())
//!             .block_models(["dall-e-3"]),
//!     )
//!     .service(service_fn(|_req: Request<PolicyBody>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(String::new()))
//!     }));
//! let images = |model: &str| Request::post("/v1/images/generations")
//!     .body(format!(r#"{{"model":"{model}","prompt":"a cat"}}"#)).unwrap();
//!
//! let ok = svc.clone().oneshot(images("dall-e-2")).await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//! let blocked = svc.clone().oneshot(images("dall-e-3")).await.unwrap();
//! assert_eq!(blocked.status(), StatusCode::UNPROCESSABLE_ENTITY);
//! let speech = Request::post("/v1/audio/speech").body(String::new()).unwrap();
//! let blocked = svc.oneshot(speech).await.unwrap();
//! assert_eq!(blocked.status(), StatusCode::UNPROCESSABLE_ENTITY);
//! # });
//! ```
//!
//! [`block_features`]: FeatureBlockLayer::block_features
//! [`block_models`]: FeatureBlockLayer::block_models
//! [`block_image_sizes`]: FeatureBlockLayer::block_image_sizes
//! [`block_image_qualities`]: FeatureBlockLayer::block_image_qualities
//! [`allow_only`]: FeatureBlockLayer::allow_only
//! [`deny_unknown_endpoints`]: FeatureBlockLayer::deny_unknown_endpoints

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{BoxError, PolicyBody, ResponseBody};
use crate::check::{Check, CheckFuture};
use crate::endpoint::BodyModel;
use crate::endpoint::{Endpoint, Feature, FeatureSet};
use crate::error::{quote, LayerName, PolicyError};
use crate::keys::ApiKey;
use crate::model::{ModelList, ModelName};
use crate::model_allow_list::{BATCH_REFUSED, UNSEEN_REFUSED};
use crate::policy::Policy;
use crate::request::LlmRequest;

#[derive(Clone, Debug, Default)]
struct Config {
    features: FeatureSet,
    models: ModelList,
    sizes: Vec<String>,
    qualities: Vec<String>,
    allow_only: Option<FeatureSet>,
    deny_unknown: bool,
    policy: Policy,
}

/// Layer that blocks features, models and image options. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct FeatureBlockLayer {
    config: Arc<Config>,
}

impl Default for FeatureBlockLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl FeatureBlockLayer {
    /// A layer that blocks nothing at the workspace level (keys' blocks only).
    pub fn new() -> Self {
        FeatureBlockLayer {
            config: Arc::new(Config::default()),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Blocks these features for every request (adds to those already blocked). Parse a set
    /// from names and groups with `"images,audio".parse::<FeatureSet>()`.
    #[must_use]
    pub fn block_features(mut self, features: FeatureSet) -> Self {
        let config = self.config_mut();
        config.features = config.features.union(features);
        self
    }

    /// Blocks these models (names or `prefix*` wildcards) for every request (adds to those
    /// already blocked).
    #[must_use]
    pub fn block_models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let config = self.config_mut();
        let entries: Vec<String> = config
            .models
            .entries()
            .iter()
            .cloned()
            .chain(models.into_iter().map(|m| m.as_ref().to_owned()))
            .collect();
        config.models = ModelList::new(entries);
        self
    }

    /// Blocks these image sizes (`1792x1024`, ...) on the image endpoints (adds to those
    /// already blocked).
    #[must_use]
    pub fn block_image_sizes<I, S>(mut self, sizes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        push_values(&mut self.config_mut().sizes, sizes);
        self
    }

    /// Blocks these image qualities (`hd`, `high`, ...) on the image endpoints (adds to those
    /// already blocked).
    #[must_use]
    pub fn block_image_qualities<I, S>(mut self, qualities: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        push_values(&mut self.config_mut().qualities, qualities);
        self
    }

    /// Default deny: only these features may be used; every other feature, and every
    /// endpoint this crate does not know ([`Endpoint::Other`]), is refused. Blocks still
    /// apply within the allowed features.
    #[must_use]
    pub fn allow_only(mut self, features: FeatureSet) -> Self {
        self.config_mut().allow_only = Some(features);
        self
    }

    /// Refuses requests to endpoints the classifier does not know ([`Endpoint::Other`]) with
    /// 404 `unknown_url` instead of passing them on, so a typo or an API the policy cannot
    /// judge never reaches the upstream. Off by default.
    #[must_use]
    pub fn deny_unknown_endpoints(mut self, deny: bool) -> Self {
        self.config_mut().deny_unknown = deny;
        self
    }

    /// The [`Policy`] a request is resolved with when this layer is the first to see it.
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.config_mut().policy = policy;
        self
    }
}

fn push_values<I, S>(list: &mut Vec<String>, values: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    for value in values {
        let value = value.as_ref().trim().to_ascii_lowercase();
        if !value.is_empty() && !list.contains(&value) {
            list.push(value);
        }
    }
}

impl<S> Layer<S> for FeatureBlockLayer {
    type Service = FeatureBlock<S>;

    fn layer(&self, inner: S) -> FeatureBlock<S> {
        FeatureBlock {
            inner,
            check: BlockCheck {
                config: self.config.clone(),
            },
        }
    }
}

/// Middleware that blocks features, models and image options. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct FeatureBlock<S> {
    inner: S,
    check: BlockCheck,
}

impl<S> FeatureBlock<S> {
    /// Wraps `inner` with the policy of `layer`.
    pub fn new(inner: S, layer: &FeatureBlockLayer) -> Self {
        layer.layer(inner)
    }

    /// A default [`FeatureBlockLayer`].
    pub fn layer() -> FeatureBlockLayer {
        FeatureBlockLayer::new()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Which level a block comes from, as named in messages.
#[derive(Clone, Copy)]
enum Level {
    Workspace,
    Key,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Workspace => "This workspace",
            Level::Key => "This key",
        }
    }
}

/// The block decision.
#[derive(Clone, Debug)]
struct BlockCheck {
    config: Arc<Config>,
}

impl BlockCheck {
    /// Decides on the endpoint alone: default deny and blocked features.
    fn check_endpoint(&self, key: Option<&ApiKey>, endpoint: Endpoint) -> Result<(), PolicyError> {
        self.check_feature(key, endpoint.feature())
    }

    /// Decides on one feature the request uses (`None`: an unknown endpoint).
    fn check_feature(
        &self,
        key: Option<&ApiKey>,
        feature: Option<Feature>,
    ) -> Result<(), PolicyError> {
        if feature.is_none() && self.config.deny_unknown {
            return Err(PolicyError::UnknownEndpoint);
        }
        if let Some(allowed) = self.config.allow_only {
            match feature {
                None => {
                    return Err(blocked(format!(
                        "{} does not allow this endpoint.",
                        Level::Workspace.as_str()
                    )))
                }
                Some(f) if !allowed.contains(f) => {
                    return Err(blocked(format!(
                        "{} does not allow the {f} feature.",
                        Level::Workspace.as_str()
                    )))
                }
                Some(_) => {}
            }
        }
        let Some(feature) = feature else {
            return Ok(());
        };
        let levels = [
            (Level::Workspace, self.config.features),
            (
                Level::Key,
                key.map(|k| k.blocked_features).unwrap_or_default(),
            ),
        ];
        for (level, set) in levels {
            if set.contains(feature) {
                return Err(blocked(format!(
                    "{} blocks the {} feature.",
                    level.as_str(),
                    feature_label(feature, set)
                )));
            }
        }
        Ok(())
    }

    /// Whether a model block applies to `key`.
    fn blocks_models(&self, key: Option<&ApiKey>) -> bool {
        !self.config.models.is_empty() || key.is_some_and(|k| !k.blocked_models.is_empty())
    }

    /// Whether a feature block applies to `key`.
    fn blocks_features(&self, key: Option<&ApiKey>) -> bool {
        self.config.allow_only.is_some()
            || !self.config.features.is_empty()
            || key.is_some_and(|k| !k.blocked_features.is_empty())
    }

    /// Whether a feature that a body can add to its endpoint's (audio output, an image
    /// generation tool) is blocked for `key`: the body must then be read.
    fn blocks_body_features(&self, key: Option<&ApiKey>) -> bool {
        let key_blocked = key.map(|k| k.blocked_features).unwrap_or_default();
        [Feature::AudioSpeech, Feature::ImageGeneration]
            .into_iter()
            .any(|f| {
                self.config.features.contains(f)
                    || key_blocked.contains(f)
                    || self.config.allow_only.is_some_and(|a| !a.contains(f))
            })
    }

    /// Whether a model, feature, size or quality block could apply to a request to
    /// `endpoint`.
    fn body_blocks_apply(&self, key: Option<&ApiKey>, endpoint: Endpoint) -> bool {
        self.blocks_models(key)
            || self.blocks_body_features(key)
            || (is_image(endpoint)
                && !(self.config.sizes.is_empty()
                    && self.config.qualities.is_empty()
                    && key.is_none_or(|k| {
                        k.blocked_image_sizes.is_empty() && k.blocked_image_qualities.is_empty()
                    })))
    }

    /// Whether the model `name` (resolved from `model` as sent) is blocked for `key`.
    fn check_model(
        &self,
        key: Option<&ApiKey>,
        name: &ModelName,
        model: &str,
    ) -> Result<(), PolicyError> {
        let key_list = key.map(|k| &k.blocked_models).filter(|l| !l.is_empty());
        let levels = [
            (Level::Workspace, Some(&self.config.models)),
            (Level::Key, key_list),
        ];
        for (level, list) in levels {
            if list.is_some_and(|l| l.contains(name)) {
                return Err(blocked(format!(
                    "{} blocks usage of model: {}",
                    level.as_str(),
                    quote(model)
                )));
            }
        }
        Ok(())
    }

    fn check_image_options(
        &self,
        key: Option<&ApiKey>,
        view: &LlmRequest,
    ) -> Result<(), PolicyError> {
        if !is_image(view.endpoint()) {
            return Ok(());
        }
        let none: &[String] = &[];
        let options = [
            (
                Level::Workspace,
                "size",
                view.size(),
                &self.config.sizes[..],
            ),
            (
                Level::Workspace,
                "quality",
                view.quality(),
                &self.config.qualities[..],
            ),
            (
                Level::Key,
                "size",
                view.size(),
                key.map_or(none, |k| &k.blocked_image_sizes[..]),
            ),
            (
                Level::Key,
                "quality",
                view.quality(),
                key.map_or(none, |k| &k.blocked_image_qualities[..]),
            ),
        ];
        for (level, what, value, blocked_values) in options {
            let Some(value) = value else { continue };
            let value_trimmed = value.trim();
            if blocked_values
                .iter()
                .any(|b| b.trim().eq_ignore_ascii_case(value_trimmed))
            {
                return Err(blocked(format!(
                    "{} blocks image {what}: {}",
                    level.as_str(),
                    quote(value_trimmed)
                )));
            }
        }
        Ok(())
    }
}

fn is_image(endpoint: Endpoint) -> bool {
    matches!(
        endpoint,
        Endpoint::ImageGeneration | Endpoint::ImageEdit | Endpoint::ImageVariation
    )
}

/// The name of a blocked feature: its group's name when the whole group is blocked.
fn feature_label(feature: Feature, set: FeatureSet) -> &'static str {
    let both = |a, b| set.contains(a) && set.contains(b);
    match feature {
        Feature::ImageGeneration | Feature::ImageEdits
            if both(Feature::ImageGeneration, Feature::ImageEdits) =>
        {
            "images"
        }
        Feature::AudioSpeech | Feature::AudioTranscription
            if both(Feature::AudioSpeech, Feature::AudioTranscription) =>
        {
            "audio"
        }
        other => other.as_str(),
    }
}

fn blocked(message: String) -> PolicyError {
    PolicyError::FeatureBlocked(Cow::Owned(message))
}

impl Check for BlockCheck {
    fn layer(&self) -> LayerName {
        LayerName::FeatureBlock
    }

    fn policy(&self) -> &Policy {
        &self.config.policy
    }

    fn on_head(&self, view: &LlmRequest, key: Option<&ApiKey>) -> Result<bool, PolicyError> {
        // A request refused on its endpoint is refused before its body is read.
        self.check_endpoint(key, view.endpoint())?;
        if view.body_model() == BodyModel::Batch
            && (self.blocks_models(key) || self.blocks_features(key))
        {
            return Err(PolicyError::Unverifiable(BATCH_REFUSED.into()));
        }
        Ok(self.body_blocks_apply(key, view.endpoint()))
    }

    fn decide(
        &self,
        view: &mut LlmRequest,
        key: Option<&ApiKey>,
        _audit: Option<&crate::audit::AuditHandle>,
    ) -> Result<(), PolicyError> {
        // Features the body adds to the endpoint's: audio output, an image generation tool.
        let endpoint_feature = view.endpoint().feature();
        for feature in view.features().iter() {
            if Some(feature) != endpoint_feature {
                self.check_feature(key, Some(feature))?;
            }
        }
        if self.blocks_models(key) && view.model_unseen() {
            return Err(PolicyError::Unverifiable(UNSEEN_REFUSED.into()));
        }
        for (sent, name) in view.models() {
            self.check_model(key, name, sent)?;
        }
        self.check_image_options(key, view)
    }
}

check_service!(FeatureBlock, BlockCheck);
