//! PromptLimit: stop oversized prompts (and oversized requested outputs) before they cost money.
//!
//! Limits, each optional, set for the whole **workspace** on the layer ([`PromptLimits`]) and
//! per **key** (the same-named fields of the [`ApiKey`] that
//! [`KeyAuth`](crate::key_auth::KeyAuth) put in the request's extensions). Where both set a
//! limit, the smaller one applies, and the message names the level it came from.
//!
//! | limit | measured on | over the limit |
//! |---|---|---|
//! | `max_prompt_chars` | the prompt's text, in Unicode scalar values | 400 `prompt_too_long` |
//! | `max_prompt_tokens` | the prompt, in tokens (see below) | 400 `prompt_too_long` |
//! | `max_output_tokens` | `max_tokens`, `max_completion_tokens`, `max_output_tokens` | 400 `prompt_too_long`, or clamped |
//! | `max_n` | `n` and `best_of` | 400 `prompt_too_long` |
//! | `max_messages` | the number of chat `messages` | 400 `prompt_too_long` |
//! | `require_user` | `user` or `safety_identifier` present, and not empty or blank | 400 `user_required` |
//!
//! The message gives the limit and the measured size: "Prompt is at least 1534 tokens; the
//! limit for this key is 1000 tokens." ("at least": counting stops as soon as the limit is
//! crossed, so the figure is a lower bound). The inner service is not called.
//!
//! # The prompt
//!
//! All text the model reads ([`LlmRequest::prompt_parts`]): chat messages (string content or
//! text parts, names, tool call arguments), `tools` / `functions` definitions (their JSON
//! text, which is a little more than what OpenAI feeds the model: the safe side),
//! completions `prompt`, `input` (embeddings, moderations, responses, speech) and
//! `instructions`. Besides the text:
//!
//! - **Token-id arrays** (`"prompt": [1734, 995]`) count their length in tokens, and
//!   [`CHARS_PER_TOKEN_ID`] (4) characters per id toward the character limit, so a character
//!   limit cannot be sidestepped by sending token ids.
//! - **Images, audio and files** count a fixed number of tokens each, [`MediaTokens`]: by
//!   default an image is 1445 tokens (OpenAI's high-detail maximum for GPT-4o-class models:
//!   85 + 8 tiles × 170), an audio part 600 tokens (one minute at OpenAI's 1 token per 100 ms
//!   of input audio) and a file 1445 tokens (one page, as an image). Their real size is not
//!   known without decoding them; for long audio, many-page files and models that bill
//!   images at more tokens (gpt-4o-mini), these are floors: raise them with
//!   [`PromptLimitLayer::media_tokens`]. Media count 0 characters.
//! - **Chat requests** add OpenAI's per-message framing as its cookbook counts it:
//!   [`chat_overhead`] (3 tokens per message, 1 per `name`, 3 for the reply) plus the role,
//!   [`ROLE_TOKENS`] per message. The Responses API documents no such framing; its input is
//!   counted as text only.
//!
//! Tokens are counted with the encoding of the request's canonical model (after the
//! [`Policy`]'s alias table), `o200k_base` or `cl100k_base` ([`TokenCounter::for_model`]), exactly
//! with the `tokens` cargo feature. Without it, tokens are **estimated** from above, from the
//! classes of the text's bytes and never more than its length in bytes
//! ([`estimate`](crate::tokens::estimate)), and the message says so. Counting stops as
//! soon as the limit is crossed, and a long run of text without whitespace is bounded by its
//! length first, so a hostile prompt costs time linear in its size at most. A prompt whose
//! text is no longer in bytes than the limit (after the fixed costs) is within it however it
//! is tokenized (a token is at least one byte), and passes without being counted at all.
//!
//! # Output limits
//!
//! With [`OutputLimitMode::Reject`] (the default) a request asking for more output tokens than
//! the limit is refused. With [`OutputLimitMode::Clamp`] the body is rewritten instead: every
//! output field sent above the limit is set to the limit (the other fields are kept byte for
//! byte) and the [`LlmRequest`] in the extensions is updated. The clamp is queued on the view
//! with any other edit ([`LlmRequest::edits`]) and applied once, by the crate's one rewriter;
//! the view's [`body`](LlmRequest::body) still holds the bytes as sent. A request that sets none of the
//! three fields is not limited by them, unless [`require_output_limit`] is on: then a chat,
//! completions or responses request without one is refused.
//!
//! # End users
//!
//! `require_user` (per key, or for the workspace) is enforced here: a chat, completions,
//! embeddings, images or responses request with neither `user` nor `safety_identifier` is a
//! 400 `user_required`.
//!
//! The body is read only when a limit applies to the request (and only on endpoints that carry
//! a prompt).
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_policy::PolicyBody;
//! use tower_llm_policy::prompt_limit::PromptLimitLayer;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let svc = ServiceBuilder::new()
//!     .layer(PromptLimitLayer::new().max_prompt_tokens(100).max_output_tokens(500))
//!     .service(service_fn(|_req: Request<PolicyBody>| async {
//!         Ok::<_, std::convert::Infallible>(Response::new(String::new()))
//!     }));
//! let chat = |text: &str, max: u32| Request::post("/v1/chat/completions")
//!     .body(format!(
//!         r#"{{"model":"gpt-4o","max_tokens":{max},"messages":[{{"role":"user","content":"{text}"}}]}}"#
//!     ))
//!     .unwrap();
//!
//! let ok = svc.clone().oneshot(chat("Say hello.", 100)).await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//! let long = svc.clone().oneshot(chat(&"hello ".repeat(500), 100)).await.unwrap();
//! assert_eq!(long.status(), StatusCode::BAD_REQUEST);
//! let greedy = svc.oneshot(chat("Say hello.", 4096)).await.unwrap();
//! assert_eq!(greedy.status(), StatusCode::BAD_REQUEST);
//! # });
//! ```
//!
//! [`require_output_limit`]: PromptLimitLayer::require_output_limit

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use serde::{Deserialize, Serialize};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{BoxError, PolicyBody, ResponseBody};
use crate::check::{Check, CheckFuture};
use crate::endpoint::BodyModel;
use crate::endpoint::Endpoint;
use crate::error::{LayerName, PolicyError};
use crate::keys::ApiKey;
use crate::model_allow_list::BATCH_REFUSED;
use crate::policy::Policy;
use crate::request::LlmRequest;
use crate::tokens::{chat_overhead, Count, TokenCounter};

/// Tokens counted for each chat message's `role`: every role OpenAI accepts (`system`,
/// `developer`, `user`, `assistant`, `tool`, `function`) is one token in both encodings. The
/// cookbook counts the role's text on top of [`chat_overhead`]'s framing.
pub const ROLE_TOKENS: usize = 1;

/// Characters a token id counts toward `max_prompt_chars`: 4, OpenAI's rule of thumb for an
/// English token. It is not the inverse of the token [`estimate`](crate::tokens::estimate),
/// which errs high; a token stands for anything from part of a character to dozens of them.
pub const CHARS_PER_TOKEN_ID: u64 = 4;

/// Prompt and output limits, each optional. The field names are those of [`ApiKey`].
///
/// Deserializes from configuration (every field optional, unknown fields an error).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PromptLimits {
    /// Maximum prompt size in characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prompt_chars: Option<u64>,
    /// Maximum prompt size in tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_prompt_tokens: Option<u64>,
    /// Maximum requested output tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// Maximum `n` (and `best_of`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_n: Option<u64>,
    /// Maximum number of chat messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    /// Requires `user` (or `safety_identifier`) on every request.
    pub require_user: bool,
}

impl PromptLimits {
    /// No limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// The limits set on a key.
    pub fn of_key(key: &ApiKey) -> Self {
        PromptLimits {
            max_prompt_chars: key.max_prompt_chars,
            max_prompt_tokens: key.max_prompt_tokens,
            max_output_tokens: key.max_output_tokens,
            max_n: key.max_n,
            max_messages: key.max_messages,
            require_user: key.require_user,
        }
    }

    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Limits the prompt to this many characters.
    #[must_use]
    pub fn max_prompt_chars(mut self, chars: u64) -> Self {
        self.max_prompt_chars = Some(chars);
        self
    }

    /// Limits the prompt to this many tokens.
    #[must_use]
    pub fn max_prompt_tokens(mut self, tokens: u64) -> Self {
        self.max_prompt_tokens = Some(tokens);
        self
    }

    /// Limits the requested output tokens.
    #[must_use]
    pub fn max_output_tokens(mut self, tokens: u64) -> Self {
        self.max_output_tokens = Some(tokens);
        self
    }

    /// Limits `n` and `best_of`.
    #[must_use]
    pub fn max_n(mut self, n: u64) -> Self {
        self.max_n = Some(n);
        self
    }

    /// Limits the number of chat messages.
    #[must_use]
    pub fn max_messages(mut self, messages: u64) -> Self {
        self.max_messages = Some(messages);
        self
    }

    /// Requires `user` (or `safety_identifier`) on every request.
    #[must_use]
    pub fn require_user(mut self, require: bool) -> Self {
        self.require_user = require;
        self
    }
}

/// What happens to a request that asks for more output tokens than the limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OutputLimitMode {
    /// Refuse it: 400 `prompt_too_long` (the default).
    #[default]
    Reject,
    /// Rewrite the body: set each output field above the limit to the limit.
    Clamp,
}

/// Tokens counted for each non-text prompt part. See the [module docs](self#the-prompt).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MediaTokens {
    /// Tokens per image part (`image_url`, `input_image`).
    pub image: u64,
    /// Tokens per audio part (`input_audio`).
    pub audio: u64,
    /// Tokens per file part (`file`, `input_file`, multipart file uploads).
    pub file: u64,
}

impl MediaTokens {
    /// OpenAI's high-detail maximum for one image on GPT-4o-class models: 85 + 8 × 170.
    pub const DEFAULT_IMAGE: u64 = 1445;
    /// One minute of input audio at 1 token per 100 ms.
    pub const DEFAULT_AUDIO: u64 = 600;
    /// One page given to the model as an image.
    pub const DEFAULT_FILE: u64 = 1445;
}

impl Default for MediaTokens {
    fn default() -> Self {
        MediaTokens {
            image: Self::DEFAULT_IMAGE,
            audio: Self::DEFAULT_AUDIO,
            file: Self::DEFAULT_FILE,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Config {
    limits: PromptLimits,
    output_mode: OutputLimitMode,
    require_output_limit: bool,
    media: MediaTokens,
    policy: Policy,
}

/// Layer that enforces prompt and output limits. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct PromptLimitLayer {
    config: Arc<Config>,
}

impl Default for PromptLimitLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl PromptLimitLayer {
    /// A layer with no workspace limits (keys' limits only).
    pub fn new() -> Self {
        PromptLimitLayer {
            config: Arc::new(Config::default()),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Sets all workspace limits at once.
    #[must_use]
    pub fn limits(mut self, limits: PromptLimits) -> Self {
        self.config_mut().limits = limits;
        self
    }

    /// Limits every prompt to this many characters.
    #[must_use]
    pub fn max_prompt_chars(mut self, chars: u64) -> Self {
        self.config_mut().limits.max_prompt_chars = Some(chars);
        self
    }

    /// Limits every prompt to this many tokens.
    #[must_use]
    pub fn max_prompt_tokens(mut self, tokens: u64) -> Self {
        self.config_mut().limits.max_prompt_tokens = Some(tokens);
        self
    }

    /// Limits the output tokens any request may ask for.
    #[must_use]
    pub fn max_output_tokens(mut self, tokens: u64) -> Self {
        self.config_mut().limits.max_output_tokens = Some(tokens);
        self
    }

    /// Limits `n` and `best_of`.
    #[must_use]
    pub fn max_n(mut self, n: u64) -> Self {
        self.config_mut().limits.max_n = Some(n);
        self
    }

    /// Limits the number of chat messages.
    #[must_use]
    pub fn max_messages(mut self, messages: u64) -> Self {
        self.config_mut().limits.max_messages = Some(messages);
        self
    }

    /// Requires `user` (or `safety_identifier`) on every request, whatever the key says.
    #[must_use]
    pub fn require_user(mut self, require: bool) -> Self {
        self.config_mut().limits.require_user = require;
        self
    }

    /// Rejects (default) or clamps requests that ask for too many output tokens.
    #[must_use]
    pub fn output_limit_mode(mut self, mode: OutputLimitMode) -> Self {
        self.config_mut().output_mode = mode;
        self
    }

    /// Refuses chat, completions and responses requests that set none of `max_tokens`,
    /// `max_completion_tokens` and `max_output_tokens`.
    #[must_use]
    pub fn require_output_limit(mut self, require: bool) -> Self {
        self.config_mut().require_output_limit = require;
        self
    }

    /// Tokens counted per image, audio and file part.
    #[must_use]
    pub fn media_tokens(mut self, media: MediaTokens) -> Self {
        self.config_mut().media = media;
        self
    }

    /// The [`Policy`] a request is resolved with when this layer is the first to see it (its
    /// alias table resolves the model, which chooses the token encoding).
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.config_mut().policy = policy;
        self
    }
}

impl<S> Layer<S> for PromptLimitLayer {
    type Service = PromptLimit<S>;

    fn layer(&self, inner: S) -> PromptLimit<S> {
        PromptLimit {
            inner,
            check: LimitCheck {
                config: self.config.clone(),
                requested: None,
            },
        }
    }
}

/// Middleware that enforces prompt and output limits. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct PromptLimit<S> {
    inner: S,
    check: LimitCheck,
}

impl<S> PromptLimit<S> {
    /// Wraps `inner` with the policy of `layer`.
    pub fn new(inner: S, layer: &PromptLimitLayer) -> Self {
        layer.layer(inner)
    }

    /// A default [`PromptLimitLayer`].
    pub fn layer() -> PromptLimitLayer {
        PromptLimitLayer::new()
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

/// Which level a limit comes from, as named in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Workspace,
    Key,
    Request,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Workspace => "this workspace",
            Level::Key => "this key",
            Level::Request => "this request",
        })
    }
}

/// The smaller of the workspace's and the key's limit (the key's on a tie).
fn effective(workspace: Option<u64>, key: Option<u64>) -> Option<(u64, Level)> {
    match (workspace, key) {
        (Some(w), Some(k)) if w < k => Some((w, Level::Workspace)),
        (_, Some(k)) => Some((k, Level::Key)),
        (Some(w), None) => Some((w, Level::Workspace)),
        (None, None) => None,
    }
}

fn too_long(message: String, param: Option<&'static str>) -> PolicyError {
    PolicyError::PromptTooLong { message, param }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The prompt's size in characters toward `max_prompt_chars`: its text in Unicode scalar
/// values, plus [`CHARS_PER_TOKEN_ID`] per token id. Media count 0.
pub fn prompt_chars(view: &LlmRequest) -> u64 {
    let text = view.prompt_chars() as u64;
    text.saturating_add(view.prompt_token_ids().saturating_mul(CHARS_PER_TOKEN_ID))
}

/// Counts the prompt's tokens (see the [module docs](self#the-prompt)), stopping as soon as
/// there are more than `limit`: fixed costs first (chat framing, token ids, media), then the
/// text parts in order, each with the budget that remains.
pub fn prompt_tokens_up_to(
    view: &LlmRequest,
    counter: &TokenCounter,
    media: &MediaTokens,
    limit: usize,
) -> Count {
    let mut total = fixed_tokens(view, media);
    if total > limit {
        return Count::Exceeded { counted: total };
    }
    for part in view.prompt_parts() {
        match counter.count_up_to(part.text, limit - total) {
            Count::Within { tokens } => total += tokens,
            Count::Exceeded { counted } => {
                return Count::Exceeded {
                    counted: total.saturating_add(counted),
                }
            }
        }
    }
    Count::Within { tokens: total }
}

/// An upper bound of the prompt's tokens, with no counting: a token is at least one byte of
/// text (and the estimate is never more than the length in bytes), so the text's length in
/// bytes plus the fixed costs bounds the count from above.
fn prompt_tokens_at_most(view: &LlmRequest, media: &MediaTokens) -> usize {
    fixed_tokens(view, media).saturating_add(view.prompt_len())
}

/// The tokens that need no counting: chat framing, token ids and media.
fn fixed_tokens(view: &LlmRequest, media: &MediaTokens) -> usize {
    let counts = view.media();
    let media_tokens = media
        .image
        .saturating_mul(u64::from(counts.images))
        .saturating_add(media.audio.saturating_mul(u64::from(counts.audio)))
        .saturating_add(media.file.saturating_mul(u64::from(counts.files)));
    let overhead = if view.endpoint() == Endpoint::ChatCompletions {
        let messages = view.message_count();
        chat_overhead(messages, view.message_names())
            .saturating_add(messages.saturating_mul(ROLE_TOKENS))
    } else {
        0
    };
    overhead
        .saturating_add(to_usize(view.prompt_token_ids()))
        .saturating_add(to_usize(media_tokens))
}

/// The request header with which a caller tightens the prompt token limit of its own
/// request: `x-llm-policy-max-prompt-tokens: 2000`. A value at or above the limit that
/// applies anyway (or not a number) is ignored, and the request flagged
/// `header_ignored:x-llm-policy-max-prompt-tokens`: a header never loosens a limit. Removed
/// before the request is forwarded.
pub const MAX_PROMPT_TOKENS_HEADER: &str = "x-llm-policy-max-prompt-tokens";

/// The limit decision.
#[derive(Clone, Debug)]
struct LimitCheck {
    config: Arc<Config>,
    /// The request's own limit ([`MAX_PROMPT_TOKENS_HEADER`]), when it sent a number.
    requested: Option<u64>,
}

/// Endpoints whose requests take `user` / `safety_identifier`.
fn takes_user(endpoint: Endpoint) -> bool {
    matches!(
        endpoint,
        Endpoint::ChatCompletions
            | Endpoint::Completions
            | Endpoint::Embeddings
            | Endpoint::ImageGeneration
            | Endpoint::ImageEdit
            | Endpoint::ImageVariation
            | Endpoint::Responses
    )
}

/// The output field a client should set on an endpoint that must have one, and the message's
/// wording of it.
fn output_field_for(endpoint: Endpoint) -> Option<(&'static str, &'static str)> {
    match endpoint {
        Endpoint::ChatCompletions => Some((
            "max_completion_tokens",
            "`max_completion_tokens` (or `max_tokens`)",
        )),
        Endpoint::Completions => Some(("max_tokens", "`max_tokens`")),
        Endpoint::Responses => Some(("max_output_tokens", "`max_output_tokens`")),
        _ => None,
    }
}

/// The output-token fields of a request, as sent (`"inf"` as `u64::MAX`), and whether each
/// can be clamped in place (top-level fields can; a realtime `session`'s cannot).
fn output_fields(view: &LlmRequest) -> [(&'static str, Option<u64>, bool); 5] {
    [
        ("max_tokens", view.max_tokens(), true),
        ("max_completion_tokens", view.max_completion_tokens(), true),
        ("max_output_tokens", view.max_output_tokens(), true),
        (
            "max_response_output_tokens",
            view.max_response_output_tokens(),
            true,
        ),
        ("session", view.session_max_output(), false),
    ]
}

/// An output-token value for a message: `inf` for realtime's unlimited.
fn show_output(value: u64) -> String {
    if value == u64::MAX {
        "\"inf\"".to_owned()
    } else {
        value.to_string()
    }
}

impl LimitCheck {
    /// Whether any limit applies, given the key's own limits.
    fn applies(&self, own: &PromptLimits) -> bool {
        !self.config.limits.is_empty() || self.config.require_output_limit || !own.is_empty()
    }

    /// Checks `view` against the limits; returns the output limit to clamp to, if the body
    /// must be rewritten.
    fn decide_limits(
        &self,
        own: &PromptLimits,
        view: &LlmRequest,
    ) -> Result<Option<u64>, PolicyError> {
        let global = &self.config.limits;
        let endpoint = view.endpoint();

        if (global.require_user || own.require_user)
            && takes_user(endpoint)
            && view.end_user().is_none()
        {
            return Err(PolicyError::UserRequired);
        }

        if let Some((limit, level)) = effective(global.max_messages, own.max_messages) {
            let count = view.message_count() as u64;
            if count > limit {
                let param = if endpoint == Endpoint::Responses {
                    "input"
                } else {
                    "messages"
                };
                return Err(too_long(
                    format!(
                        "Request has {count} messages; the limit for {level} is {limit} messages."
                    ),
                    Some(param),
                ));
            }
        }

        if let Some((limit, level)) = effective(global.max_n, own.max_n) {
            for (param, value) in [("n", view.n()), ("best_of", view.best_of())] {
                if let Some(value) = value.filter(|v| *v > limit) {
                    return Err(too_long(
                        format!("`{param}` is {value}; the limit for {level} is {limit}."),
                        Some(param),
                    ));
                }
            }
        }

        let mut clamp = None;
        if self.config.require_output_limit && view.max_output().is_none() {
            if let Some((param, wording)) = output_field_for(endpoint) {
                return Err(too_long(
                    format!("This workspace requires an output limit: set {wording}."),
                    Some(param),
                ));
            }
        }
        if let Some((limit, level)) = effective(global.max_output_tokens, own.max_output_tokens) {
            for (param, value, clampable) in output_fields(view) {
                let Some(value) = value.filter(|v| *v > limit) else {
                    continue;
                };
                match self.config.output_mode {
                    OutputLimitMode::Clamp if clampable => clamp = Some(limit),
                    _ => {
                        let shown = show_output(value);
                        let param = if clampable {
                            param
                        } else {
                            "session.max_output_tokens"
                        };
                        return Err(too_long(
                            format!(
                                "`{param}` is {shown}; the limit for {level} is {limit} tokens."
                            ),
                            Some(if clampable { param } else { "session" }),
                        ));
                    }
                }
            }
        }

        let prompt_param = prompt_param(endpoint);
        if let Some((limit, level)) = effective(global.max_prompt_chars, own.max_prompt_chars) {
            let chars = prompt_chars(view);
            if chars > limit {
                return Err(too_long(
                    format!(
                        "Prompt is {chars} characters; the limit for {level} is {limit} characters."
                    ),
                    prompt_param,
                ));
            }
        }

        if let Some((limit, level)) = effective(global.max_prompt_tokens, own.max_prompt_tokens) {
            if prompt_tokens_at_most(view, &self.config.media) <= to_usize(limit) {
                // Within the limit however it is tokenized: no need to count.
                return Ok(clamp);
            }
            let counter = self.counter(view);
            let count = prompt_tokens_up_to(view, &counter, &self.config.media, to_usize(limit));
            if let Count::Exceeded { counted } = count {
                let estimated = if counter.is_exact() {
                    ""
                } else {
                    " (estimated, erring high)"
                };
                return Err(too_long(
                    format!(
                        "Prompt is at least {counted} tokens{estimated}; the limit for {level} is {limit} tokens."
                    ),
                    prompt_param,
                ));
            }
        }
        Ok(clamp)
    }

    /// The token counter for the request's model (resolved through the alias table).
    fn counter(&self, view: &LlmRequest) -> TokenCounter {
        TokenCounter::for_model(view.canonical_model().unwrap_or_default())
    }
}

/// The request field that holds most of the prompt, for the error's `param`.
fn prompt_param(endpoint: Endpoint) -> Option<&'static str> {
    match endpoint {
        Endpoint::ChatCompletions => Some("messages"),
        Endpoint::Completions => Some("prompt"),
        Endpoint::Embeddings
        | Endpoint::Moderations
        | Endpoint::Responses
        | Endpoint::AudioSpeech => Some("input"),
        Endpoint::ImageGeneration | Endpoint::ImageEdit => Some("prompt"),
        _ => None,
    }
}

impl Check for LimitCheck {
    fn for_request(&self, parts: &mut http::request::Parts) -> Self {
        let Some(value) = parts.headers.remove(MAX_PROMPT_TOKENS_HEADER) else {
            return self.clone();
        };
        let requested = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok());
        if requested.is_none() {
            if let Some(audit) = parts.extensions.get::<crate::audit::AuditHandle>() {
                audit.flag(format!("header_ignored:{MAX_PROMPT_TOKENS_HEADER}"));
            }
        }
        LimitCheck {
            config: self.config.clone(),
            requested,
        }
    }

    fn layer(&self) -> LayerName {
        LayerName::PromptLimit
    }

    fn policy(&self) -> &Policy {
        &self.config.policy
    }

    fn on_head(&self, view: &LlmRequest, key: Option<&ApiKey>) -> Result<bool, PolicyError> {
        let applies = self.applies(&key.map(PromptLimits::of_key).unwrap_or_default())
            || self.requested.is_some();
        if applies && view.body_model() == BodyModel::Batch {
            return Err(PolicyError::Unverifiable(BATCH_REFUSED.into()));
        }
        Ok(applies)
    }

    fn decide(
        &self,
        view: &mut LlmRequest,
        key: Option<&ApiKey>,
        _audit: Option<&crate::audit::AuditHandle>,
    ) -> Result<(), PolicyError> {
        let own = key.map(PromptLimits::of_key).unwrap_or_default();
        let requested = self.requested.filter(|&r| {
            let tightens = effective(self.config.limits.max_prompt_tokens, own.max_prompt_tokens)
                .is_none_or(|(limit, _)| r < limit);
            if !tightens {
                if let Some(audit) = _audit {
                    audit.flag(format!("header_ignored:{MAX_PROMPT_TOKENS_HEADER}"));
                }
            }
            tightens
        });
        if !view.has_body() || !(self.applies(&own) || requested.is_some()) {
            return Ok(());
        }
        if let Some(limit) = requested {
            let count = prompt_tokens_up_to(
                view,
                &self.counter(view),
                &self.config.media,
                to_usize(limit),
            );
            if let Count::Exceeded { counted } = count {
                return Err(too_long(
                    format!(
                        "Prompt is at least {counted} tokens; the limit for {} is {limit} tokens.",
                        Level::Request
                    ),
                    None,
                ));
            }
        }
        if let Some(limit) = self.decide_limits(&own, view)? {
            view.clamp_output(limit);
        }
        Ok(())
    }
}

check_service!(PromptLimit, LimitCheck);
