//! ModelAllowList: per-key (and workspace-wide) allow-lists of models, on canonical names.
//!
//! A request's model — from the body, a multipart field, the path (`GET /v1/models/{model}`),
//! the `model` query parameter of `/v1/realtime`, an Azure deployment name, or the endpoint's
//! documented default when omitted — is resolved once, through the [`Policy`]'s
//! [`ModelAliases`](crate::ModelAliases) (see [`crate::model`]), and checked:
//!
//! 1. against the workspace entitlement the layer is built with, if any;
//! 2. then, when the key (from [`KeyAuth`](crate::key_auth::KeyAuth)) has
//!    `model_limits_enabled`, against the key's `model_limits`: a key's list only narrows the
//!    workspace's. An enabled, empty list refuses everything ("This key has no access to any
//!    models").
//!
//! A refused model is a 403 `model_not_allowed` naming the model; the inner service is not
//! called. A request on a model-bearing endpoint without any model is a 400. Without a key in
//! the extensions, only the workspace list applies.
//!
//! `GET /v1/models` responses are filtered: the JSON `data` array keeps only the models the
//! key may use. Error responses pass untouched; a successful answer that cannot be filtered
//! (compressed, not JSON, not a model list, over [`models_response_limit`]) is never passed on:
//! it becomes a 502 `upstream_invalid_response`.
//!
//! [`models_response_limit`]: ModelAllowListLayer::models_response_limit
//!
//! ```
//! use std::sync::Arc;
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_policy::{ApiKey, PolicyBody};
//! use tower_llm_policy::model_allow_list::ModelAllowListLayer;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let svc = ServiceBuilder::new()
//!     .layer(ModelAllowListLayer::new().workspace_models(["gpt-4o*", "o3-mini"]))
//!     .service(service_fn(|_req: Request<PolicyBody>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(String::new()))
//!     }));
//! let req = |model: &str| Request::post("/v1/chat/completions")
//!     .body(format!(r#"{{"model":"{model}","messages":[]}}"#)).unwrap();
//!
//! let ok = svc.clone().oneshot(req("gpt-4o-2024-08-06")).await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//! let denied = svc.oneshot(req("gpt-4.1")).await.unwrap();
//! assert_eq!(denied.status(), StatusCode::FORBIDDEN);
//! # });
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, Method, Request, Response};
use http_body::Body;
use http_body_util::combinators::Collect;
use http_body_util::{BodyExt, Limited};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{BoxError, PolicyBody, ResponseBody};
use crate::check::{reject, Check, CheckFuture};
use crate::endpoint::BodyModel;
use crate::endpoint::Endpoint;
use crate::error::{quote, LayerName, PolicyError};
use crate::keys::ApiKey;
use crate::model::{ModelList, ModelName};
use crate::policy::Policy;
use crate::request::LlmRequest;

/// Largest `GET /v1/models` response body that is filtered (32 MiB: a catalogue of tens of
/// thousands of models; OpenAI's own list is about 100 KB). A larger one is refused with a 502,
/// never passed on.
pub const DEFAULT_MODELS_RESPONSE_LIMIT: usize = 32 * 1024 * 1024;

#[derive(Clone, Debug)]
struct Config {
    workspace: Option<ModelList>,
    policy: Policy,
    models_response_limit: usize,
}

/// Layer that enforces model allow-lists. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct ModelAllowListLayer {
    config: Arc<Config>,
}

impl Default for ModelAllowListLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ModelAllowListLayer {
    /// A layer with no workspace list (keys' lists only) and no aliases.
    pub fn new() -> Self {
        ModelAllowListLayer {
            config: Arc::new(Config {
                workspace: None,
                policy: Policy::default(),
                models_response_limit: DEFAULT_MODELS_RESPONSE_LIMIT,
            }),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The workspace entitlement: models (names or `prefix*`) any key may use at most.
    #[must_use]
    pub fn workspace_models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.config_mut().workspace = Some(ModelList::new(models));
        self
    }

    /// The [`Policy`] a request is resolved with when this layer is the first to see it.
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.config_mut().policy = policy;
        self
    }

    /// Largest `GET /v1/models` response that is filtered.
    #[must_use]
    pub fn models_response_limit(mut self, limit: usize) -> Self {
        self.config_mut().models_response_limit = limit;
        self
    }
}

impl<S> Layer<S> for ModelAllowListLayer {
    type Service = ModelAllowList<S>;

    fn layer(&self, inner: S) -> ModelAllowList<S> {
        ModelAllowList {
            inner,
            check: AllowCheck {
                config: self.config.clone(),
            },
        }
    }
}

/// Middleware that enforces model allow-lists. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct ModelAllowList<S> {
    inner: S,
    check: AllowCheck,
}

impl<S> ModelAllowList<S> {
    /// Wraps `inner` with the policy of `layer`.
    pub fn new(inner: S, layer: &ModelAllowListLayer) -> Self {
        layer.layer(inner)
    }

    /// A default [`ModelAllowListLayer`].
    pub fn layer() -> ModelAllowListLayer {
        ModelAllowListLayer::new()
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

/// Why a batch is refused to a key with model limits.
pub(crate) const BATCH_REFUSED: &str = "Batches are not available to this key: the requests of a batch input file are stored upstream, where the policy cannot check their models and prompts. Send the requests one by one.";

/// Why a request that runs an unnamed model is refused to a key with model limits.
pub(crate) const UNSEEN_REFUSED: &str = "This request runs a model it does not name (an assistant's, a session default, a source video's); this key may use only some models, so name the model in the request.";

/// The allow-list decision.
#[derive(Clone, Debug)]
struct AllowCheck {
    config: Arc<Config>,
}

impl AllowCheck {
    fn applies(&self, key: Option<&ApiKey>) -> bool {
        self.config.workspace.is_some() || key.is_some_and(|k| k.model_limits_enabled)
    }

    /// Whether the model `name` (resolved from `sent`) is allowed for `key`.
    fn allows(
        &self,
        key: Option<&ApiKey>,
        name: &ModelName,
        sent: &str,
    ) -> Result<(), PolicyError> {
        let key = key.filter(|k| k.model_limits_enabled);
        if key.is_some_and(|k| k.model_limits.is_empty()) {
            return Err(PolicyError::NoModelsAllowed);
        }
        let workspace_ok = self
            .config
            .workspace
            .as_ref()
            .is_none_or(|w| w.contains(name));
        let key_ok = key.is_none_or(|k| k.model_limits.contains(name));
        if workspace_ok && key_ok {
            Ok(())
        } else {
            Err(PolicyError::ModelNotAllowed { model: quote(sent) })
        }
    }
}

impl Check for AllowCheck {
    fn layer(&self) -> LayerName {
        LayerName::ModelAllowList
    }

    fn policy(&self) -> &Policy {
        &self.config.policy
    }

    fn on_head(&self, view: &LlmRequest, key: Option<&ApiKey>) -> Result<bool, PolicyError> {
        if !self.applies(key) {
            return Ok(false);
        }
        if view.body_model() == BodyModel::Batch {
            return Err(PolicyError::Unverifiable(BATCH_REFUSED.into()));
        }
        Ok(true)
    }

    fn decide(
        &self,
        view: &mut LlmRequest,
        key: Option<&ApiKey>,
        _audit: Option<&crate::audit::AuditHandle>,
    ) -> Result<(), PolicyError> {
        if !self.applies(key) {
            return Ok(());
        }
        if view.model().is_none() {
            if view.body_model() == BodyModel::Required && view.carries_model_body() {
                return Err(PolicyError::InvalidBody {
                    message: "You must provide a model parameter.".into(),
                    param: Some("model"),
                });
            }
            if view.model_unseen() {
                return Err(PolicyError::Unverifiable(UNSEEN_REFUSED.into()));
            }
        }
        // Every model the request selects, not only the one priced.
        for (sent, name) in view.models() {
            self.allows(key, name, sent)?;
        }
        Ok(())
    }
}

impl<S, B, ResBody> Service<Request<B>> for ModelAllowList<S>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        if parts.method == Method::GET {
            let key = parts.extensions.get::<Arc<ApiKey>>().cloned();
            let view = LlmRequest::resolve(&mut parts, &self.check.config.policy);
            let listing = view.endpoint() == Endpoint::Models && view.route().path_model.is_none();
            if listing && self.check.applies(key.as_deref()) {
                let filter = Filter {
                    check: self.check.clone(),
                    policy: view.policy().clone(),
                    key,
                };
                let req = Request::from_parts(parts, PolicyBody::new(body));
                crate::audit::forwarding(&req);
                return ResponseFuture {
                    state: State::Listing {
                        future: self.inner.call(req),
                        filter: Some(filter),
                    },
                };
            }
        }
        let req = Request::from_parts(parts, body);
        ResponseFuture {
            state: State::Check {
                future: CheckFuture::new(self.check.clone(), &mut self.inner, req),
            },
        }
    }
}

struct Filter {
    check: AllowCheck,
    policy: Policy,
    key: Option<Arc<ApiKey>>,
}

impl Filter {
    /// Keeps only allowed entries of the `data` array. `None` if the body is not such a list.
    fn apply(&self, body: &[u8]) -> Option<Bytes> {
        let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let data = value.get_mut("data")?.as_array_mut()?;
        data.retain(|entry| {
            entry
                .get("id")
                .and_then(|id| id.as_str())
                .is_some_and(|id| {
                    let name = self.policy.aliases().resolve(id);
                    self.check.allows(self.key.as_deref(), &name, id).is_ok()
                })
        });
        serde_json::to_vec(&value).ok().map(Bytes::from)
    }
}

pin_project! {
    /// Response future of [`ModelAllowList`].
    pub struct ResponseFuture<S, B, ResBody>
    where
        S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
        B: Body,
        B::Error: Into<BoxError>,
        ResBody: Body,
        ResBody::Error: Into<BoxError>,
    {
        #[pin]
        state: State<S, B, ResBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, ResBody>
    where
        S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
        B: Body,
        B::Error: Into<BoxError>,
        ResBody: Body,
        ResBody::Error: Into<BoxError>,
    {
        Check {
            #[pin]
            future: CheckFuture<S, B, AllowCheck>,
        },
        Listing {
            #[pin]
            future: S::Future,
            filter: Option<Filter>,
        },
        Filtering {
            #[pin]
            collect: Collect<Limited<ResBody>>,
            parts: Option<http::response::Parts>,
            filter: Option<Filter>,
        },
    }
}

impl<S, B, ResBody> std::fmt::Debug for ResponseFuture<S, B, ResBody>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
    B: Body,
    B::Error: Into<BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B, ResBody>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Check { future } => return future.poll(cx),
                StateProj::Listing { future, filter } => {
                    let response = ready!(future.poll(cx))?;
                    let filter = filter
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let limit = filter.check.config.models_response_limit;
                    if !response.status().is_success() {
                        // An upstream error names no model: it goes back as sent.
                        return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                    }
                    if let Err(why) = filterable(&response, limit) {
                        // Never the raw list: it would name models the key may not use.
                        let error = PolicyError::UpstreamInvalid(why.into());
                        return Poll::Ready(Ok(reject(error, LayerName::ModelAllowList)));
                    }
                    let (parts, body) = response.into_parts();
                    state.set(State::Filtering {
                        collect: Limited::new(body, limit).collect(),
                        parts: Some(parts),
                        filter: Some(filter),
                    });
                }
                StateProj::Filtering {
                    collect,
                    parts,
                    filter,
                } => {
                    let collected = ready!(collect.poll(cx));
                    let mut parts = parts
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let filter = filter
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let filtered = match collected {
                        Ok(c) => filter.apply(&c.to_bytes()).ok_or(
                            "The upstream's model list is not a JSON object with a `data` array.",
                        ),
                        Err(_) => Err(
                            "The upstream's model list could not be read whole within the limit.",
                        ),
                    };
                    let filtered = match filtered {
                        Ok(filtered) => filtered,
                        // Fail closed with an error, neither the raw list nor an empty one
                        // (which would hide the models the key may use).
                        Err(why) => {
                            let error = PolicyError::UpstreamInvalid(why.into());
                            return Poll::Ready(Ok(reject(error, LayerName::ModelAllowList)));
                        }
                    };
                    parts.headers.remove(header::CONTENT_LENGTH);
                    return Poll::Ready(Ok(Response::from_parts(
                        parts,
                        ResponseBody::full(filtered),
                    )));
                }
            }
        }
    }
}

/// Whether a successful response can be filtered: JSON, not encoded, within the limit by its
/// declared length (if any); else why not.
fn filterable<B: Body>(response: &Response<B>, limit: usize) -> Result<(), &'static str> {
    let headers = response.headers();
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
    if !json {
        return Err("The upstream's model list is not JSON.");
    }
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return Err("The upstream's model list is compressed; ask it for `identity` encoding.");
    }
    let declared_ok = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_none_or(|len| len <= limit as u64);
    if !declared_ok {
        return Err("The upstream's model list is over the size limit.");
    }
    Ok(())
}
