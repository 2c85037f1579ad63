//! The parsed-once view of an LLM request: [`LlmRequest`].
//!
//! The first layer that needs the body reads it (checking `Content-Length` first, then through
//! a size limit), parses it once and stores an `LlmRequest` in the request's extensions; every
//! later layer reuses it. The parse extracts only the fields the policy layers use, borrowing
//! text from the body where it has no escapes, and skips everything else, while still
//! rejecting invalid JSON, duplicate policy fields and fields of the wrong type.
//!
//! Where the prompt lives (the prompt parts, see [`LlmRequest::prompt_parts`]): chat
//! `messages[].content` (string or text parts), message `name`s, assistant `tool_calls` and
//! `function_call` arguments, `tools` / `functions` definitions (their JSON text), completions
//! `prompt`, embeddings / moderations / responses / speech `input` (strings, text parts,
//! message items, function call arguments and outputs), and responses `instructions`. Token-id
//! arrays are not text: their length is [`LlmRequest::prompt_token_ids`]. Image, audio and
//! file parts are counted in [`LlmRequest::media`], never silently ignored.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, Method, Uri};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::endpoint::{BodyModel, Endpoint, Feature, FeatureSet, Route};
use crate::error::PolicyError;
use crate::model::ModelName;
use crate::policy::Policy;
use crate::rewrite::{self, Edits, TextEdits};

/// Default limit for JSON request bodies: 16 MiB (a chat request with several base64 images
/// fits; a 200-page prompt is well under 1 MiB).
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// Default limit for multipart bodies (audio and image uploads): 32 MiB, above OpenAI's 25 MB
/// audio upload limit.
pub const DEFAULT_MULTIPART_LIMIT: usize = 32 * 1024 * 1024;

/// How request bodies are read: the size limits. The first layer that reads the body applies
/// its options; give every layer the same ones (or configure the outermost).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyOptions {
    /// Largest JSON body, in bytes.
    pub limit: usize,
    /// Largest multipart body, in bytes.
    pub multipart_limit: usize,
}

impl Default for BodyOptions {
    fn default() -> Self {
        BodyOptions {
            limit: DEFAULT_BODY_LIMIT,
            multipart_limit: DEFAULT_MULTIPART_LIMIT,
        }
    }
}

impl BodyOptions {
    /// The limit for a request with these headers: [`multipart_limit`](Self::multipart_limit)
    /// for `multipart/form-data` bodies, [`limit`](Self::limit) otherwise.
    pub(crate) fn limit_for(&self, headers: &HeaderMap) -> usize {
        if is_multipart(headers) {
            self.multipart_limit
        } else {
            self.limit
        }
    }

    /// Checks a declared `Content-Length` before anything is read and returns the limit that
    /// applies: 413 `request_too_large` when it is over, 400 when it is unreadable or sent
    /// twice. A body without `Content-Length` passes here and is held to the limit as it is
    /// read.
    pub(crate) fn check_declared_length(&self, headers: &HeaderMap) -> Result<usize, PolicyError> {
        let limit = self.limit_for(headers);
        let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
        let Some(value) = values.next() else {
            return Ok(limit);
        };
        let declared = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|_| values.next().is_none())
            .ok_or_else(|| invalid("Invalid Content-Length header."))?;
        if declared > limit as u64 {
            return Err(PolicyError::BodyTooLarge { limit });
        }
        Ok(limit)
    }
}

/// Whether these headers announce a `multipart/form-data` body.
pub(crate) fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .get(..19)
                .is_some_and(|p| p.eq_ignore_ascii_case("multipart/form-data"))
        })
}

/// Where a prompt part comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PromptSource {
    /// Chat message content (or a message's `name`, a tool call's arguments).
    Message,
    /// Completions `prompt` (or a multipart `prompt` field).
    Prompt,
    /// `input` (embeddings, moderations, responses, speech).
    Input,
    /// Responses `instructions`.
    Instructions,
    /// The JSON text of `tools` / `functions` definitions.
    Tools,
    /// The JSON text of structured-output schemas (`response_format`, Responses `text`).
    Schema,
    /// Completions `suffix`.
    Suffix,
    /// Predicted output (`prediction`).
    Prediction,
}

/// The `role` of the message (or Responses input item) a prompt part belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// `system`.
    System,
    /// `developer`.
    Developer,
    /// `user`.
    User,
    /// `assistant`.
    Assistant,
    /// `tool` (a tool's result).
    Tool,
    /// `function` (a legacy function's result).
    Function,
    /// Any other role.
    Other,
}

impl Role {
    /// The role as written in the API (`"other"` for [`Role::Other`]).
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Function => "function",
            Role::Other => "other",
        }
    }

    /// The role named `name` (exactly as the API spells it); any other name is
    /// [`Role::Other`].
    pub fn from_name(name: &str) -> Role {
        match name {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            "function" => Role::Function,
            _ => Role::Other,
        }
    }
}

/// One piece of prompt text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PromptPart<'a> {
    /// Where it comes from.
    pub source: PromptSource,
    /// The `role` of the message or input item it is in, when that names one; `None` for
    /// text outside messages (a completions `prompt`, a string `input`, `instructions`,
    /// tool definitions).
    pub role: Option<Role>,
    /// The text (unescaped).
    pub text: &'a str,
}

/// Non-text prompt parts, counted so limits can apply a documented rule to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MediaCounts {
    /// Image parts (`image_url`, `input_image`).
    pub images: u32,
    /// Audio parts (`input_audio`).
    pub audio: u32,
    /// File parts (`file`, `input_file`).
    pub files: u32,
}

#[derive(Clone, PartialEq, Eq)]
enum Span {
    Range(Range<usize>),
    Owned(Box<str>),
}

/// A request's prompt text, held for an estimate of its tokens that may never be needed (the
/// audit record's, made only when the upstream reports no usage): the body shares the
/// request's bytes, nothing is copied but escaped text parts.
#[derive(Clone)]
pub(crate) struct PromptText {
    body: Bytes,
    spans: Vec<Span>,
    token_ids: u64,
}

impl PromptText {
    /// The body's length: what holding it costs.
    pub(crate) fn held_bytes(&self) -> usize {
        self.body.len()
    }

    /// [`estimate`](crate::tokens::estimate) of the text parts, plus the token ids.
    pub(crate) fn estimate(&self) -> u64 {
        let text: usize = self
            .spans
            .iter()
            .map(|span| match span {
                Span::Owned(s) => crate::tokens::estimate(s),
                Span::Range(r) => self
                    .body
                    .get(r.clone())
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .map_or(0, crate::tokens::estimate),
            })
            .sum();
        text as u64 + self.token_ids
    }
}

impl fmt::Debug for PromptText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // User content: its size, never the text.
        f.debug_struct("PromptText")
            .field("parts", &self.spans.len())
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// The resolved view of an LLM request, decided once per request; see the module docs.
///
/// The first layer of this crate that sees a request resolves its head (the route, the model
/// named in the path, the endpoint's default model) and stores the view in the request's
/// extensions; the first layer that needs the body reads and parses it into the same view.
/// The model is resolved through the [`Policy`]'s alias table once, and every layer, the price
/// and the audit record use that name. Changes to the body are queued on the view and applied
/// once, from the bytes as read, by one rewriter ([`edits`](Self::edits)).
#[derive(Clone)]
pub struct LlmRequest {
    route: Route,
    policy: Policy,
    runs: BodyModel,
    refusal: Option<Cow<'static, str>>,
    /// A GET, HEAD or DELETE that selects no model: it reads or deletes a stored object.
    runs_no_model: bool,
    has_model_body: bool,
    /// A layer asked for a body that carries no model (the content guards read the text a
    /// thread or a conversation stores).
    body_wanted: bool,
    /// A POST, PUT or PATCH: a method whose body the API reads.
    #[cfg_attr(not(feature = "guards"), allow(dead_code))]
    body_method: bool,
    multipart: bool,
    body: Bytes,
    model: Option<String>,
    model_from_default: bool,
    name: Option<ModelName>,
    extra_models: Vec<String>,
    extra_names: Vec<ModelName>,
    /// A realtime transcription model that runs when the session names no other model.
    transcription_model: Option<String>,
    max_response_output_tokens: Option<u64>,
    nested_output: Option<u64>,
    audio_output: bool,
    image_tool: bool,
    user: Option<String>,
    safety_identifier: Option<String>,
    stream: bool,
    include_usage: Option<bool>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    n: Option<u64>,
    best_of: Option<u64>,
    messages: usize,
    message_names: usize,
    parts: Vec<(PromptSource, Option<Role>, Span)>,
    token_ids: u64,
    media: MediaCounts,
    size: Option<String>,
    quality: Option<String>,
    parsed_body: bool,
    edits: Edits,
    text_edits: TextEdits,
    dirty: bool,
}

impl fmt::Debug for LlmRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Prompt text is user content: Debug shows its size, not the text.
        f.debug_struct("LlmRequest")
            .field("endpoint", &self.route.endpoint)
            .field("model", &self.model)
            .field("canonical_model", &self.canonical_model())
            .field("other_models", &self.extra_models)
            .field("user", &self.user)
            .field("stream", &self.stream)
            .field("include_usage", &self.include_usage)
            .field("max_output_tokens", &self.max_output())
            .field("n", &self.n)
            .field("messages", &self.messages)
            .field("prompt_parts", &self.parts.len())
            .field("prompt_chars", &self.prompt_chars())
            .field("prompt_token_ids", &self.token_ids)
            .field("media", &self.media)
            .field("body_len", &self.body.len())
            .field("edits", &self.edits)
            .finish()
    }
}

impl LlmRequest {
    /// The view of a request's head: its route, the model named in the path (or the Azure
    /// deployment), else the endpoint's documented default, resolved with `policy`.
    pub(crate) fn from_head(parts: &Parts, policy: &Policy) -> Self {
        Self::from_request_head(&parts.method, &parts.uri, &parts.headers, policy)
    }

    /// [`from_head`](Self::from_head) from the head's pieces.
    pub(crate) fn from_request_head(
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        policy: &Policy,
    ) -> Self {
        let route = Route::classify(uri);
        let body_method = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
        let runs = if body_method {
            route.body_model
        } else if route.query_selects_model() && *method == Method::GET {
            // The realtime WebSocket runs `?model=`, or a default.
            BodyModel::Unseen
        } else {
            BodyModel::None
        };
        let standard = matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::DELETE
                | Method::POST
                | Method::PUT
                | Method::PATCH
                | Method::TRACE
                | Method::CONNECT
        );
        let refusal = if standard {
            route.refusal().map(Cow::Borrowed)
        } else {
            // `post` is not `POST` to us, but some servers fold methods: refuse rather than
            // guess.
            Some(Cow::Borrowed(
                "The request method is not a standard HTTP method (methods are case-sensitive).",
            ))
        };
        let mut req = LlmRequest {
            // Reading or deleting a stored object runs no model (the realtime WebSocket, a GET,
            // does: see `runs`).
            runs_no_model: matches!(*method, Method::GET | Method::HEAD | Method::DELETE)
                && runs == BodyModel::None,
            has_model_body: body_method && !matches!(runs, BodyModel::None | BodyModel::Batch),
            body_wanted: false,
            body_method,
            runs,
            refusal,
            multipart: is_multipart(headers),
            model: None,
            route,
            policy: policy.clone(),
            body: Bytes::new(),
            model_from_default: false,
            name: None,
            extra_models: Vec::new(),
            extra_names: Vec::new(),
            transcription_model: None,
            max_response_output_tokens: None,
            nested_output: None,
            audio_output: false,
            image_tool: false,
            user: None,
            safety_identifier: None,
            stream: false,
            include_usage: None,
            max_tokens: None,
            max_completion_tokens: None,
            max_output_tokens: None,
            n: None,
            best_of: None,
            messages: 0,
            message_names: 0,
            parts: Vec::new(),
            token_ids: 0,
            media: MediaCounts::default(),
            size: None,
            quality: None,
            parsed_body: false,
            edits: Edits::default(),
            text_edits: TextEdits::default(),
            dirty: false,
        };
        req.finish();
        req
    }

    /// The view of `parts` in its extensions, resolved now (with `policy`) if no earlier layer
    /// did.
    pub(crate) fn resolve<'a>(parts: &'a mut Parts, policy: &Policy) -> &'a mut LlmRequest {
        if parts.extensions.get::<LlmRequest>().is_none() {
            let view = LlmRequest::from_head(parts, policy);
            parts.extensions.insert(view);
        }
        parts
            .extensions
            .get_mut::<LlmRequest>()
            .expect("the view was just inserted")
    }

    /// Settles the model: the one sent, else the one in the path, the Azure deployment
    /// whatever the body says, else the endpoint's default; then resolves it once.
    fn finish(&mut self) {
        if self.model.is_none() {
            self.model = self.route.path_model.clone();
        }
        if self.model.is_none() {
            self.model = self.transcription_model.take();
        }
        if self.model.is_none()
            && self.runs == BodyModel::Unseen
            && self.route.endpoint != Endpoint::Realtime
            && !self.extra_models.is_empty()
        {
            // An eval run names its model inside `data_source`: that one runs. (A realtime
            // session's nested models are transcription models; its own stays unseen.)
            self.model = Some(self.extra_models.remove(0));
        }
        if let Some(deployment) = &self.route.deployment {
            // Azure routes by deployment and ignores a `model` in the body: the deployment is
            // what runs, so it is what prices and records see. A different model in the body
            // (or the query) is checked too: another upstream would run that one.
            if let Some(sent) = self.model.take().filter(|m| m != deployment) {
                self.extra_models.push(sent);
            }
            self.model = Some(deployment.clone());
        }
        self.model_from_default = false;
        // The documented default applies to a request that names no model, which is known only
        // once its body is read.
        if self.model.is_none() && !self.body_pending() {
            if let BodyModel::Default(default) = self.runs {
                self.model = Some(default.to_owned());
                self.model_from_default = true;
            }
        }
        if let Some(primary) = &self.model {
            self.extra_models.retain(|m| m != primary);
        }
        self.extra_models.sort_unstable();
        self.extra_models.dedup();
        let aliases = self.policy.aliases();
        self.name = self.model.as_deref().map(|m| aliases.resolve(m));
        self.extra_names = self
            .extra_models
            .iter()
            .map(|m| aliases.resolve(m))
            .collect();
    }

    /// Parses a request's body, as the layers do with the default [`Policy`]. `parts` gives
    /// the route and the content type.
    ///
    /// JSON bodies must be a JSON object; multipart bodies are read for their `model`,
    /// `prompt`, `user`, `n`, `size`, `quality` and `stream` fields (with the `multipart`
    /// feature; without it, a multipart body is an error). An empty body gives an empty view.
    pub fn parse(parts: &Parts, body: Bytes) -> Result<Self, PolicyError> {
        Self::parse_with(parts, body, &Policy::default())
    }

    /// [`parse`](Self::parse) with the model names and limits of `policy`.
    pub fn parse_with(parts: &Parts, body: Bytes, policy: &Policy) -> Result<Self, PolicyError> {
        let mut req = Self::from_head(parts, policy);
        req.read_body(&parts.headers, body)?;
        Ok(req)
    }

    /// Fills the view from the body (once).
    pub(crate) fn read_body(
        &mut self,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<(), PolicyError> {
        self.parsed_body = true;
        self.model = None;
        self.extra_models.clear();
        if !body.iter().all(u8::is_ascii_whitespace) {
            if self.multipart {
                parse_multipart(self, headers, &body)?;
            } else {
                parse_json(self, &body)?;
            }
        }
        self.body = body;
        self.finish();
        Ok(())
    }

    /// The policy this request was resolved with.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Whether the request may carry a body with a model and a prompt
    /// ([`Route::body_model`], for this method) that has not been read yet.
    pub(crate) fn body_pending(&self) -> bool {
        (self.has_model_body || self.body_wanted) && !self.parsed_body
    }

    /// Asks for the body of a request that carries no model, when its method is one whose
    /// body the API reads and it is JSON (file uploads, multipart, are left alone). Returns
    /// whether it will be read.
    #[cfg(feature = "guards")]
    pub(crate) fn want_body(&mut self) -> bool {
        if self.body_method && !self.multipart && !self.parsed_body && !self.has_model_body {
            self.body_wanted = !matches!(
                self.route.endpoint,
                Endpoint::Files | Endpoint::Batches | Endpoint::FineTuning
            );
        }
        self.body_pending()
    }

    /// Whether the request may carry a body with a model and a prompt
    /// ([`Route::body_model`], for this method), read or not.
    pub(crate) fn carries_model_body(&self) -> bool {
        self.has_model_body
    }

    /// Whether the body is `multipart/form-data`.
    pub(crate) fn is_multipart(&self) -> bool {
        self.multipart
    }

    /// The route: endpoint, model in the path, Azure deployment.
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Whether the request only reads or deletes a stored object (a GET, HEAD or DELETE that
    /// selects no model): it runs no model and costs no tokens.
    pub(crate) fn runs_no_model(&self) -> bool {
        self.runs_no_model
    }

    /// The endpoint.
    pub fn endpoint(&self) -> Endpoint {
        self.route.endpoint
    }

    /// The model as sent (body field, multipart field, path, or — for Azure-style
    /// `/deployments/{name}/` paths, whatever the body says — the deployment name), or the
    /// endpoint's documented default when the request omits it.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Every model the request selects, as sent with its resolved name: [`model`](Self::model)
    /// first, then the others the body names (a Responses `image_generation` tool's model,
    /// a grader's, a realtime transcription model, a `model` in the body of an Azure
    /// deployment path), each once. Every one is checked; only the first is priced.
    pub fn models(&self) -> impl Iterator<Item = (&str, &ModelName)> + '_ {
        let primary = self.model.as_deref().zip(self.name.as_ref());
        primary.into_iter().chain(
            self.extra_models
                .iter()
                .map(String::as_str)
                .zip(self.extra_names.iter()),
        )
    }

    /// What the body means for the model that runs, for this request's method and path
    /// ([`BodyModel::None`] for a `GET`, except the realtime WebSocket's).
    pub fn body_model(&self) -> BodyModel {
        self.runs
    }

    /// Whether the request runs a model it does not show ([`BodyModel::Unseen`] with no model
    /// named): a layer that limits models must refuse it.
    pub fn model_unseen(&self) -> bool {
        self.runs == BodyModel::Unseen && self.model.is_none() && !self.body_pending()
    }

    /// Why the request is refused whatever the policy (an ambiguous path, query, method or
    /// multipart header), if it is.
    pub fn refusal(&self) -> Option<&str> {
        self.refusal.as_deref()
    }

    /// The features the request uses: its endpoint's, plus text to speech for chat
    /// completions that ask for audio output (`modalities: ["audio"]` or `audio`), plus image
    /// generation for an `image_generation` tool.
    pub fn features(&self) -> FeatureSet {
        let mut set = FeatureSet::empty();
        if let Some(feature) = self.endpoint().feature() {
            set.insert(feature);
        }
        if self.audio_output && self.endpoint() == Endpoint::ChatCompletions {
            set.insert(Feature::AudioSpeech);
        }
        if self.image_tool {
            set.insert(Feature::ImageGeneration);
        }
        set
    }

    /// Whether [`model`](Self::model) is the endpoint's default rather than sent.
    pub fn model_is_default(&self) -> bool {
        self.model_from_default
    }

    /// The model resolved through the [`Policy`]'s alias table: its normalised and canonical
    /// names, which every check, the price and the audit record use.
    pub fn model_name(&self) -> Option<&ModelName> {
        self.name.as_ref()
    }

    /// The model's canonical name, after the alias table ([`crate::model`]).
    pub fn canonical_model(&self) -> Option<&str> {
        self.name.as_ref().map(|n| n.canonical.as_str())
    }

    /// The end user: `user`, else `safety_identifier`.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref().or(self.safety_identifier.as_deref())
    }

    /// The end user, as a check that requires one reads it: the first of `user` and
    /// `safety_identifier` that is not empty or blank (whitespace only).
    pub fn end_user(&self) -> Option<&str> {
        [self.user.as_deref(), self.safety_identifier.as_deref()]
            .into_iter()
            .flatten()
            .find(|id| !id.trim().is_empty())
    }

    /// `safety_identifier` as sent.
    pub fn safety_identifier(&self) -> Option<&str> {
        self.safety_identifier.as_deref()
    }

    /// Whether the response is streamed.
    pub fn stream(&self) -> bool {
        self.stream
    }

    /// `stream_options.include_usage` as sent.
    pub fn include_usage(&self) -> Option<bool> {
        self.include_usage
    }

    /// `max_tokens` as sent.
    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }

    /// `max_completion_tokens` as sent.
    pub fn max_completion_tokens(&self) -> Option<u64> {
        self.max_completion_tokens
    }

    /// `max_output_tokens` as sent (Responses API).
    pub fn max_output_tokens(&self) -> Option<u64> {
        self.max_output_tokens
    }

    /// Realtime's `max_response_output_tokens` as sent (`"inf"` is `u64::MAX`).
    pub fn max_response_output_tokens(&self) -> Option<u64> {
        self.max_response_output_tokens
    }

    /// An output limit inside a realtime `session` (`max_output_tokens` or
    /// `max_response_output_tokens`; `"inf"` is `u64::MAX`). It cannot be clamped in place: a
    /// limit over the policy's is refused.
    pub fn session_max_output(&self) -> Option<u64> {
        self.nested_output
    }

    /// The requested output limit: the largest of the output-token fields sent (`"inf"` is
    /// `u64::MAX`).
    pub fn max_output(&self) -> Option<u64> {
        [
            self.max_tokens,
            self.max_completion_tokens,
            self.max_output_tokens,
            self.max_response_output_tokens,
            self.nested_output,
        ]
        .into_iter()
        .flatten()
        .max()
    }

    /// `n` as sent.
    pub fn n(&self) -> Option<u64> {
        self.n
    }

    /// `best_of` as sent.
    pub fn best_of(&self) -> Option<u64> {
        self.best_of
    }

    /// The number of chat messages, or of Responses API `input` items.
    pub fn message_count(&self) -> usize {
        self.messages
    }

    /// The number of chat messages with a `name`.
    pub fn message_names(&self) -> usize {
        self.message_names
    }

    /// The prompt's text parts, in body order.
    pub fn prompt_parts(&self) -> impl Iterator<Item = PromptPart<'_>> + '_ {
        self.parts
            .iter()
            .map(move |(source, role, span)| PromptPart {
                source: *source,
                role: *role,
                text: match span {
                    Span::Owned(s) => s,
                    // Ranges are taken from `str`s that serde_json validated within this body.
                    Span::Range(r) => self
                        .body
                        .get(r.clone())
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .unwrap_or_default(),
                },
            })
    }

    /// The prompt's size in characters (Unicode scalar values), over all text parts.
    pub fn prompt_chars(&self) -> usize {
        // The bytes are UTF-8 (checked when the body was parsed): a character is a byte that
        // does not continue another one. Counted without checking the text once more.
        self.prompt_bytes()
            .map(|b| {
                if b.is_ascii() {
                    b.len()
                } else {
                    b.iter().filter(|&&b| !is_continuation(b)).count()
                }
            })
            .sum()
    }

    /// The prompt's size in bytes, over all text parts.
    pub(crate) fn prompt_len(&self) -> usize {
        self.parts
            .iter()
            .map(|(_, _, span)| match span {
                Span::Owned(s) => s.len(),
                Span::Range(r) => r.len(),
            })
            .sum()
    }

    /// The bytes of the prompt's text parts, in body order.
    fn prompt_bytes(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.parts.iter().map(move |(_, _, span)| match span {
            Span::Owned(s) => s.as_bytes(),
            Span::Range(r) => self.body.get(r.clone()).unwrap_or_default(),
        })
    }

    /// The prompt's text, kept for an estimate made later (see [`PromptText`]): the body's
    /// bytes (shared, not copied) and where the text parts are in them.
    pub(crate) fn prompt_text(&self) -> PromptText {
        PromptText {
            body: self.body.clone(),
            spans: self.parts.iter().map(|(_, _, span)| span.clone()).collect(),
            token_ids: self.token_ids,
        }
    }

    /// The number of token ids sent as integer arrays (`prompt` / `input`).
    pub fn prompt_token_ids(&self) -> u64 {
        self.token_ids
    }

    /// Image, audio and file parts.
    pub fn media(&self) -> MediaCounts {
        self.media
    }

    /// Images `size` as sent.
    pub fn size(&self) -> Option<&str> {
        self.size.as_deref()
    }

    /// Images `quality` as sent.
    pub fn quality(&self) -> Option<&str> {
        self.quality.as_deref()
    }

    /// The body as read from the client, before the queued [`edits`](Self::edits) (a
    /// clamped output limit, an injected `stream_options`): the prompt parts point into these
    /// bytes. The body that travels on is the request's own, with the edits applied.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Whether the view was built from a body (false for a view of the head only).
    pub fn has_body(&self) -> bool {
        self.parsed_body
    }

    /// The changes queued for the body, applied once to the bytes as read before the request
    /// goes on.
    pub fn edits(&self) -> &Edits {
        &self.edits
    }

    /// Queues a clamp of every output-token field above `limit` to `limit`, and updates the
    /// view's fields to match.
    pub(crate) fn clamp_output(&mut self, limit: u64) {
        for field in [
            &mut self.max_tokens,
            &mut self.max_completion_tokens,
            &mut self.max_output_tokens,
            &mut self.max_response_output_tokens,
        ] {
            if field.is_some_and(|v| v > limit) {
                *field = Some(limit);
            }
        }
        let limit = self.edits.clamp_output.map_or(limit, |l| l.min(limit));
        self.edits.clamp_output = Some(limit);
        self.dirty = true;
    }

    /// Queues `stream_options.include_usage: true`.
    pub(crate) fn request_usage(&mut self) {
        self.include_usage = Some(true);
        self.edits.include_usage = true;
        self.dirty = true;
    }

    /// The body with every queued edit applied, if edits were queued since the last call.
    pub(crate) fn take_rendered(&mut self) -> Option<Result<Bytes, PolicyError>> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        Some(rewrite::apply_with(
            &self.body,
            &self.edits,
            &self.text_edits,
        ))
    }

    /// Queues a rewrite of the prompt's strings (a guard's redaction).
    #[cfg(feature = "guards")]
    pub(crate) fn queue_redaction(&mut self, redact: rewrite::Redactor, everywhere: bool) {
        self.text_edits.redact = Some(redact);
        self.text_edits.everywhere = everywhere;
        self.edits.redacted = true;
        self.dirty = true;
    }

    /// Queues the replacement of `user` and `safety_identifier` by `hash` of their values.
    #[cfg(feature = "guards")]
    pub(crate) fn queue_end_user_hash(&mut self, hash: rewrite::EndUserHash) {
        self.text_edits.end_user = Some(hash);
        self.edits.end_user_hashed = true;
        self.dirty = true;
    }

    /// Applies the queued text rewrites (and every other queued edit) now, and reads the
    /// view again from the new body: every later check, the price and the audit record see
    /// the rewritten text. The text rewrites are dropped once applied (a hash is never
    /// hashed again); the other edits stay queued, and are applied again, to the same
    /// effect, if another edit is queued later. JSON bodies only.
    #[cfg(feature = "guards")]
    pub(crate) fn reparse(&mut self) -> Result<(), PolicyError> {
        if self.text_edits.is_empty() || self.multipart {
            return Ok(());
        }
        let rendered = rewrite::apply_with(&self.body, &self.edits, &self.text_edits)?;
        self.text_edits = TextEdits::default();
        self.parts.clear();
        self.read_body(&HeaderMap::new(), rendered)?;
        // The body that travels on is rendered once more, from the new bytes (the other
        // edits are idempotent).
        self.dirty = true;
        Ok(())
    }
}

/// Whether `b` continues a UTF-8 character (`0b10xx_xxxx`).
fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
}

fn invalid(message: impl Into<String>) -> PolicyError {
    PolicyError::InvalidBody {
        message: message.into(),
        param: None,
    }
}

// ---------------------------------------------------------------------------------------------
// JSON

struct Collector<'a> {
    base: &'a [u8],
    /// Count the elements of a top-level `input` array as messages (Responses API items).
    input_items_are_messages: bool,
    parts: Vec<(PromptSource, Option<Role>, Span)>,
    messages: usize,
    names: usize,
    token_ids: u64,
    media: MediaCounts,
    /// Models named anywhere below the top level (tools, graders, transcription settings).
    models: Vec<String>,
    /// An `image_generation` tool was seen.
    image_tool: bool,
}

impl<'a> Collector<'a> {
    fn new(base: &'a [u8], input_items_are_messages: bool) -> Self {
        Collector {
            base,
            input_items_are_messages,
            parts: Vec::new(),
            messages: 0,
            names: 0,
            token_ids: 0,
            media: MediaCounts::default(),
            models: Vec::new(),
            image_tool: false,
        }
    }

    fn span(&self, s: Cow<'a, str>) -> Span {
        match s {
            Cow::Borrowed(b) => {
                let start = (b.as_ptr() as usize).wrapping_sub(self.base.as_ptr() as usize);
                if start <= self.base.len() && b.len() <= self.base.len() - start {
                    Span::Range(start..start + b.len())
                } else {
                    Span::Owned(b.into())
                }
            }
            Cow::Owned(o) => Span::Owned(o.into_boxed_str()),
        }
    }

    fn text(&mut self, source: PromptSource, s: Cow<'a, str>) {
        if !s.is_empty() {
            let span = self.span(s);
            self.parts.push((source, None, span));
        }
    }

    fn media_type(&mut self, ty: &str) {
        match ty {
            "image_url" | "input_image" | "image" => self.media.images += 1,
            "input_audio" | "audio" => self.media.audio += 1,
            "file" | "input_file" => self.media.files += 1,
            "image_generation" => self.image_tool = true,
            _ => {}
        }
    }

    /// Counts the raw JSON text of a definition (tools, schemas) as prompt, and reads the
    /// models and tool types inside it.
    fn raw(&mut self, source: PromptSource, raw: &'a RawValue) -> Result<(), serde_json::Error> {
        if raw.get() == "null" {
            return Ok(());
        }
        self.text(source, Cow::Borrowed(raw.get()));
        let mut de = serde_json::Deserializer::from_str(raw.get());
        ScanSeed {
            c: self,
            depth: 1,
            is_model: false,
            walking: nests_within(raw.get(), 1),
        }
        .deserialize(&mut de)
    }
}

fn parse_json(req: &mut LlmRequest, body: &Bytes) -> Result<(), PolicyError> {
    let mut collector = Collector::new(body, req.route.endpoint == Endpoint::Responses);
    // Room for a short conversation's parts at once (the vector grew from 4, then 8).
    collector.parts.reserve(8);
    // JSON text is UTF-8 (RFC 8259): serde_json checks the strings it reads, but not those it
    // skips, and an upstream's parser rejects (or reads otherwise) a body that is not.
    let text = std::str::from_utf8(body).map_err(|e| PolicyError::InvalidBody {
        message: format!(
            "We could not parse the JSON body of your request: invalid UTF-8 at byte {}",
            e.valid_up_to()
        ),
        param: None,
    })?;
    let mut de = serde_json::Deserializer::from_str(text);
    let top = TopSeed {
        c: &mut collector,
        out: req,
    };
    top.deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| {
            let param = if e.is_data() { field_of(&e) } else { None };
            PolicyError::InvalidBody {
                message: format!("We could not parse the JSON body of your request: {e}"),
                param,
            }
        })?;
    req.parts = collector.parts;
    req.messages = collector.messages;
    req.message_names = collector.names;
    req.token_ids = collector.token_ids;
    req.media = collector.media;
    req.extra_models.append(&mut collector.models);
    req.image_tool |= collector.image_tool;
    Ok(())
}

/// Our own errors name the field first (`` `model`: ... ``); take it for `param`.
fn field_of(e: &serde_json::Error) -> Option<&'static str> {
    let msg = e.to_string();
    FIELDS.iter().copied().find(|f| {
        msg.strip_prefix('`')
            .and_then(|m| m.strip_prefix(f))
            .is_some_and(|m| m.starts_with('`'))
    })
}

/// The top-level fields read once each (a duplicate is refused).
const FIELDS: &[&str] = &[
    "model",
    "user",
    "safety_identifier",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "messages",
    "prompt",
    "input",
    "instructions",
    "tools",
    "functions",
    "size",
    "quality",
    "session",
    "suffix",
    "prediction",
    "response_format",
    "text",
    "modalities",
    "audio",
    "max_response_output_tokens",
    "additional_instructions",
    "additional_messages",
    "thread",
    "input_audio_transcription",
];

/// Every key the parse reads somewhere. A key that differs from one of these only in case
/// (or in the two characters Go folds onto ASCII letters, KELVIN SIGN and LONG S) is refused:
/// Go's `encoding/json`, which Go gateways such as new-api and one-api use, matches field
/// names that way, so it would read `"MODEL"` where we read nothing.
const READ_KEYS: &[&str] = &[
    "content",
    "role",
    "code",
    "logs",
    "outputs",
    "queries",
    "query",
    "results",
    "action",
    "command",
    "commands",
    "stdout",
    "stderr",
    "operation",
    "diff",
    "error",
    "text",
    "refusal",
    "output",
    "arguments",
    "summary",
    "name",
    "tool_calls",
    "function_call",
    "function",
    "custom",
    "type",
    "variables",
    "messages",
    "model",
    "instructions",
    "max_output_tokens",
    "max_response_output_tokens",
    "tools",
    "input",
    "grader",
    "graders",
    "testing_criteria",
    "data_source",
    "transcription",
    "audio",
    "metadata",
    "parameters",
    "schema",
    "json_schema",
    "input_schema",
];

/// The key we read that `key` folds onto without being it, if any (see [`READ_KEYS`]).
///
/// Folding only changes ASCII upper-case letters, KELVIN SIGN and LONG S, and every key we
/// read is lowercase ASCII: a key without an upper-case ASCII letter or a non-ASCII byte (the
/// common case) folds onto itself, and is settled by one pass over its bytes.
fn folds_onto_read_key(key: &str) -> Option<&'static str> {
    if key.len() > 96 || !key.bytes().any(|b| b.is_ascii_uppercase() || b >= 0x80) {
        return None;
    }
    FIELDS
        .iter()
        .chain(READ_KEYS)
        .copied()
        .find(|read| folds_to(key, read))
}

/// Whether `key`, folded as Go's `encoding/json` matches field names, is `read` (lowercase
/// ASCII).
fn folds_to(key: &str, read: &str) -> bool {
    let mut read = read.bytes();
    for c in key.chars() {
        let folded = match c {
            '\u{212A}' => b'k',
            '\u{17F}' => b's',
            c if c.is_ascii() => (c as u8).to_ascii_lowercase(),
            _ => return false,
        };
        if read.next() != Some(folded) {
            return false;
        }
    }
    read.next().is_none()
}

/// Deserializes one field with its name in any error message.
fn field<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
    map: &mut A,
    name: &'static str,
    seen: &mut u64,
) -> Result<T, A::Error> {
    seen_once(seen, name)?;
    map.next_value::<T>()
        .map_err(|e| de::Error::custom(format_args!("`{name}`: {}", without_position(&e))))
}

struct TopSeed<'c, 'a> {
    c: &'c mut Collector<'a>,
    out: &'c mut LlmRequest,
}

impl<'de, 'c> DeserializeSeed<'de> for TopSeed<'c, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

fn owned(s: Option<Text<'_>>) -> Option<String> {
    s.map(|t| t.0.into_owned())
}

/// A string that borrows from the body when it has no escapes. (serde's own `Cow<str>`
/// always allocates.)
struct Text<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// An object key: refused when it folds onto a key we read without being it.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Text(key) = Text::deserialize(d)?;
        if let Some(folded) = folds_onto_read_key(&key) {
            return Err(de::Error::custom(format_args!(
                "the key `{}` differs from `{folded}` only in case; send `{folded}`",
                key.escape_debug()
            )));
        }
        Ok(Key(key))
    }
}

/// An output-token limit: a non-negative integer, or realtime's `"inf"` (`u64::MAX`).
struct OutputCap(u64);

impl<'de> Deserialize<'de> for OutputCap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OutputCap;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer or \"inf\"")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OutputCap, E> {
                Ok(OutputCap(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<OutputCap, E> {
                if v == "inf" {
                    Ok(OutputCap(u64::MAX))
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `modalities`: whether it asks for audio.
struct AsksAudio(bool);

impl<'de> Deserialize<'de> for AsksAudio {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Option::<Vec<Text<'de>>>::deserialize(d)?;
        Ok(AsksAudio(list.is_some_and(|l| {
            l.iter().any(|m| m.0.eq_ignore_ascii_case("audio"))
        })))
    }
}

impl<'de, 'c> Visitor<'de> for TopSeed<'c, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request body to be a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = 0u64;
        let mut session = SessionFacts::default();
        let mut transcription = SessionFacts::default();
        let out = self.out;
        let c = self.c;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.0.as_ref() {
                "model" => {
                    out.model = owned(field::<Option<Text<'de>>, _>(&mut map, "model", &mut seen)?)
                }
                "user" => out.user = owned(field(&mut map, "user", &mut seen)?),
                "safety_identifier" => {
                    out.safety_identifier = owned(field(&mut map, "safety_identifier", &mut seen)?)
                }
                "stream" => {
                    out.stream =
                        field::<Option<bool>, _>(&mut map, "stream", &mut seen)?.unwrap_or(false)
                }
                "stream_options" => {
                    out.include_usage =
                        field::<Option<StreamOptions>, _>(&mut map, "stream_options", &mut seen)?
                            .and_then(|o| o.include_usage)
                }
                "max_tokens" => out.max_tokens = field(&mut map, "max_tokens", &mut seen)?,
                "max_completion_tokens" => {
                    out.max_completion_tokens = field(&mut map, "max_completion_tokens", &mut seen)?
                }
                "max_output_tokens" => {
                    out.max_output_tokens =
                        field::<Option<OutputCap>, _>(&mut map, "max_output_tokens", &mut seen)?
                            .map(|c| c.0)
                }
                "max_response_output_tokens" => {
                    out.max_response_output_tokens = field::<Option<OutputCap>, _>(
                        &mut map,
                        "max_response_output_tokens",
                        &mut seen,
                    )?
                    .map(|c| c.0)
                }
                "session" => {
                    // Realtime client secrets name the model inside `session`.
                    seen_once(&mut seen, "session")?;
                    map.next_value_seed(Labelled(
                        "session",
                        SessionSeed {
                            c: &mut *c,
                            facts: &mut session,
                        },
                    ))?;
                }
                "input_audio_transcription" => {
                    // Realtime transcription sessions: the model that transcribes.
                    seen_once(&mut seen, "input_audio_transcription")?;
                    map.next_value_seed(Labelled(
                        "input_audio_transcription",
                        SessionSeed {
                            c: &mut *c,
                            facts: &mut transcription,
                        },
                    ))?;
                }
                "n" => out.n = field(&mut map, "n", &mut seen)?,
                "best_of" => out.best_of = field(&mut map, "best_of", &mut seen)?,
                "size" => out.size = owned(field(&mut map, "size", &mut seen)?),
                "quality" => out.quality = owned(field(&mut map, "quality", &mut seen)?),
                name @ ("instructions" | "additional_instructions") => {
                    let name = if name == "instructions" {
                        "instructions"
                    } else {
                        "additional_instructions"
                    };
                    if let Some(text) = field::<Option<Text<'de>>, _>(&mut map, name, &mut seen)? {
                        c.text(PromptSource::Instructions, text.0);
                    }
                }
                "suffix" => {
                    if let Some(text) =
                        field::<Option<Text<'de>>, _>(&mut map, "suffix", &mut seen)?
                    {
                        c.text(PromptSource::Suffix, text.0);
                    }
                }
                "modalities" => {
                    out.audio_output |= field::<AsksAudio, _>(&mut map, "modalities", &mut seen)?.0
                }
                "audio" => {
                    let raw = field::<&'de RawValue, _>(&mut map, "audio", &mut seen)?;
                    out.audio_output |= raw.get() != "null";
                }
                name @ ("tools" | "functions" | "response_format" | "text") => {
                    let (name, source) = match name {
                        "tools" => ("tools", PromptSource::Tools),
                        "functions" => ("functions", PromptSource::Tools),
                        "response_format" => ("response_format", PromptSource::Schema),
                        _ => ("text", PromptSource::Schema),
                    };
                    let raw = field::<&'de RawValue, _>(&mut map, name, &mut seen)?;
                    // A `response_format` of `"json_object"` and the like hold no schema.
                    if !raw.get().starts_with('"') {
                        c.raw(source, raw).map_err(|e| {
                            de::Error::custom(format_args!("`{name}`: {}", without_position(&e)))
                        })?;
                    }
                }
                name @ ("messages" | "additional_messages") => {
                    let name = if name == "messages" {
                        "messages"
                    } else {
                        "additional_messages"
                    };
                    seen_once(&mut seen, name)?;
                    map.next_value_seed(Labelled(name, MessagesSeed { c: &mut *c }))?;
                }
                "thread" => {
                    // `/v1/threads/runs`: the new thread's messages are prompt.
                    seen_once(&mut seen, "thread")?;
                    map.next_value_seed(Labelled(
                        "thread",
                        ItemSeed {
                            c: &mut *c,
                            source: PromptSource::Message,
                            depth: 1,
                        },
                    ))?;
                }
                name @ ("prompt" | "input" | "prediction") => {
                    let (name, source) = match name {
                        "prompt" => ("prompt", PromptSource::Prompt),
                        "input" => ("input", PromptSource::Input),
                        _ => ("prediction", PromptSource::Prediction),
                    };
                    seen_once(&mut seen, name)?;
                    map.next_value_seed(Labelled(
                        name,
                        InputSeed {
                            c: &mut *c,
                            source,
                            depth: 0,
                        },
                    ))?;
                }
                _ => scan_member(&key.0, &mut map, &mut *c, 1)?,
            }
        }
        if let Some(cap) = session.max_output {
            out.nested_output = Some(cap);
        }
        if let Some(model) = session.model {
            match &out.model {
                Some(top) if *top != model => return Err(de::Error::custom(
                    "`model`: the body names two different models (`model` and `session.model`)",
                )),
                _ => out.model = Some(model),
            }
        }
        // A transcription session runs its transcription model.
        let transcribes =
            session.kind.as_deref() == Some("transcription") || transcription.model.is_some();
        if transcribes && out.model.is_none() {
            out.transcription_model = transcription
                .model
                .or_else(|| session.nested.first().cloned());
        }
        c.models.append(&mut session.nested);
        c.models.append(&mut transcription.nested);
        Ok(())
    }
}

/// What a realtime `session` (or `input_audio_transcription`) object says.
#[derive(Default)]
struct SessionFacts {
    model: Option<String>,
    kind: Option<String>,
    max_output: Option<u64>,
    /// Models named deeper inside (`audio.input.transcription.model`).
    nested: Vec<String>,
}

/// A realtime `session` object: its model, type, instructions, output limit, tools, and the
/// models nested in it.
struct SessionSeed<'c, 'a> {
    c: &'c mut Collector<'a>,
    facts: &'c mut SessionFacts,
}

impl<'de, 'c> DeserializeSeed<'de> for SessionSeed<'c, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'c> Visitor<'de> for SessionSeed<'c, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = 0u64;
        let c = self.c;
        let facts = self.facts;
        // Models found deeper are kept apart: a transcription session runs the first.
        let mut nested = Collector::new(c.base, false);
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.0.as_ref() {
                "model" => {
                    if let Some(model) =
                        field::<Option<Text<'de>>, _>(&mut map, "model", &mut seen)?
                    {
                        facts.model = Some(model.0.into_owned());
                    }
                }
                "type" => {
                    if let Some(kind) = map.next_value::<Option<Text<'de>>>()? {
                        facts.kind = Some(kind.0.into_owned());
                    }
                }
                "instructions" => {
                    if let Some(text) =
                        field::<Option<Text<'de>>, _>(&mut map, "instructions", &mut seen)?
                    {
                        c.text(PromptSource::Instructions, text.0);
                    }
                }
                name @ ("max_output_tokens" | "max_response_output_tokens") => {
                    let name = if name == "max_output_tokens" {
                        "max_output_tokens"
                    } else {
                        "max_response_output_tokens"
                    };
                    if let Some(cap) = field::<Option<OutputCap>, _>(&mut map, name, &mut seen)? {
                        facts.max_output = Some(facts.max_output.map_or(cap.0, |c| c.max(cap.0)));
                    }
                }
                "tools" => {
                    let raw = field::<&'de RawValue, _>(&mut map, "tools", &mut seen)?;
                    nested.raw(PromptSource::Tools, raw).map_err(|e| {
                        de::Error::custom(format_args!("`tools`: {}", without_position(&e)))
                    })?;
                }
                _ => scan_member(&key.0, &mut map, &mut nested, 2)?,
            }
        }
        c.parts.append(&mut nested.parts);
        c.image_tool |= nested.image_tool;
        facts.nested.append(&mut nested.models);
        Ok(())
    }
}

/// serde_json adds the position once more when our wrapped error surfaces: drop the inner one.
fn without_position(e: &dyn fmt::Display) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

fn seen_once<E: de::Error>(seen: &mut u64, name: &'static str) -> Result<(), E> {
    let bit = 1u64 << FIELDS.iter().position(|f| *f == name).unwrap_or(63);
    if *seen & bit != 0 {
        return Err(E::custom(format_args!(
            "`{name}`: duplicate field; send each field once"
        )));
    }
    *seen |= bit;
    Ok(())
}

/// Prefixes errors of a seed with the field's name.
struct Labelled<S>(&'static str, S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Labelled<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        let name = self.0;
        // The inner errors already carry the position; add the field name in front.
        self.1.deserialize(d).map_err(|e| {
            let text = e.to_string();
            if text.starts_with('`') {
                e
            } else {
                de::Error::custom(format_args!("`{name}`: {}", without_position(&text)))
            }
        })
    }
}

/// Deepest nesting the scan for models follows; a body nested deeper is refused (serde_json
/// itself stops at 128).
const MAX_SCAN_DEPTH: u8 = 64;

/// Keys whose values are user data (metadata, JSON schemas of tool parameters and structured
/// output): never a model selection, and not field names an upstream matches.
fn is_user_data(key: &str) -> bool {
    matches!(
        key,
        "metadata" | "parameters" | "schema" | "json_schema" | "input_schema" | "format"
    )
}

/// Reads the value of a member whose key no seed handles: a string `model` is a model the
/// request selects, a `type` may name a tool, user data is skipped, and anything else is
/// walked for nested models.
fn scan_member<'de, A: MapAccess<'de>>(
    key: &str,
    map: &mut A,
    c: &mut Collector<'de>,
    depth: u8,
) -> Result<(), A::Error> {
    scan_member_in(key, map, c, depth, false)
}

/// [`scan_member`]; `walking`: the member is inside a value being walked already whose text
/// is known to nest less than [`MAX_SCAN_DEPTH`] deep ([`nests_within`]), so the value is
/// walked at once rather than skipped as raw text first and parsed a second time. Walking a
/// value that holds nothing we read finds nothing and, nested that little, cannot be too deep:
/// this saves a parse and reads the body the same.
fn scan_member_in<'de, A: MapAccess<'de>>(
    key: &str,
    map: &mut A,
    c: &mut Collector<'de>,
    depth: u8,
    walking: bool,
) -> Result<(), A::Error> {
    match key {
        "model" => map.next_value_seed(ScanSeed {
            c,
            depth,
            is_model: true,
            walking: false,
        }),
        "type" => {
            if let Some(ty) = map.next_value::<Option<&'de RawValue>>()? {
                if ty.get() == "\"image_generation\"" {
                    c.image_tool = true;
                }
            }
            Ok(())
        }
        k if is_user_data(k) => map.next_value::<IgnoredAny>().map(drop),
        _ if walking => map.next_value_seed(ScanSeed {
            c,
            depth,
            is_model: false,
            walking: true,
        }),
        _ => {
            // Skipped as raw text first (as cheap as ignoring it); walked only when it could
            // hold something we read: a nested `model` or image tool, or a key that is escaped
            // or not plain lowercase ASCII (which could fold onto one we read).
            let raw = map.next_value::<&'de RawValue>()?;
            if !may_hold_read_keys(raw.get()) {
                return Ok(());
            }
            let mut de = serde_json::Deserializer::from_str(raw.get());
            ScanSeed {
                c,
                depth,
                is_model: false,
                walking: nests_within(raw.get(), depth),
            }
            .deserialize(&mut de)
            .map_err(|e| de::Error::custom(without_position(&e)))
        }
    }
}

/// Whether every object and array of the JSON text `raw`, read at `depth`, is less than
/// [`MAX_SCAN_DEPTH`] deep: it holds fewer brackets than the depth that remains (brackets in
/// strings are counted too, so this errs towards no).
fn nests_within(raw: &str, depth: u8) -> bool {
    let opens = raw.bytes().filter(|&b| b == b'{' || b == b'[').count();
    usize::from(depth) + opens < usize::from(MAX_SCAN_DEPTH)
}

/// Whether a skipped value must be walked (see [`scan_member`]): an object or array whose text
/// holds `model`, `image_generation`, an upper-case ASCII letter, a non-ASCII byte or a
/// backslash. Anything else holds no key that could select a model or fold onto a key we read.
fn may_hold_read_keys(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    matches!(bytes.first(), Some(b'{' | b'['))
        && (bytes
            .iter()
            .any(|&b| b.is_ascii_uppercase() || b >= 0x80 || b == b'\\')
            || memchr::memmem::find(bytes, b"model").is_some()
            || memchr::memmem::find(bytes, b"image_generation").is_some())
}

/// Any value: walked for nested `model` keys (and `image_generation` tools), its keys checked
/// for case variants of the keys we read. `is_model`: the value of a `model` key, so a string
/// is a model the request selects.
struct ScanSeed<'c, 'a> {
    c: &'c mut Collector<'a>,
    depth: u8,
    is_model: bool,
    /// The value nests less than [`MAX_SCAN_DEPTH`] deep: its members are walked at once (see
    /// [`scan_member_in`]).
    walking: bool,
}

impl<'de, 'c> DeserializeSeed<'de> for ScanSeed<'c, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'c> Visitor<'de> for ScanSeed<'c, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if self.is_model {
            self.c.models.push(v.to_owned());
        }
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_SCAN_DEPTH {
            return Err(de::Error::custom("the body is nested too deeply"));
        }
        while seq
            .next_element_seed(ScanSeed {
                c: &mut *self.c,
                depth: self.depth + 1,
                is_model: false,
                walking: self.walking,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.depth >= MAX_SCAN_DEPTH {
            return Err(de::Error::custom("the body is nested too deeply"));
        }
        while let Some(key) = map.next_key::<Key<'de>>()? {
            scan_member_in(&key.0, &mut map, &mut *self.c, self.depth + 1, self.walking)?;
        }
        Ok(())
    }
}

/// `messages`: an array of message objects.
struct MessagesSeed<'c, 'a> {
    c: &'c mut Collector<'a>,
}

impl<'de, 'c> DeserializeSeed<'de> for MessagesSeed<'c, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'c> Visitor<'de> for MessagesSeed<'c, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(ItemSeed {
                c: &mut *self.c,
                source: PromptSource::Message,
                depth: 1,
            })?
            .is_some()
        {
            self.c.messages += 1;
        }
        Ok(())
    }
}

/// Deepest nesting of prompt items we follow (deeper values are still scanned for models).
const MAX_DEPTH: u8 = 8;

/// `prompt` / `input` / part arrays: a string, an array of strings, token ids, arrays of
/// token ids, or objects (parts and items).
struct InputSeed<'c, 'a> {
    c: &'c mut Collector<'a>,
    source: PromptSource,
    depth: u8,
}

impl<'de, 'c> DeserializeSeed<'de> for InputSeed<'c, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'c> Visitor<'de> for InputSeed<'c, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string, an array of strings or token ids, or an array of parts")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        self.c.text(self.source, Cow::Borrowed(v));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.c.text(self.source, Cow::Owned(v.to_owned()));
        Ok(())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.c.text(self.source, Cow::Owned(v));
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.c.token_ids += 1;
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom("token ids must be non-negative integers"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return ScanSeed {
                c: self.c,
                depth: self.depth,
                is_model: false,
                walking: false,
            }
            .visit_seq(seq);
        }
        let items_are_messages = self.depth == 0
            && self.source == PromptSource::Input
            && self.c.input_items_are_messages;
        while seq
            .next_element_seed(InputSeed {
                c: &mut *self.c,
                source: self.source,
                depth: self.depth + 1,
            })?
            .is_some()
        {
            if items_are_messages {
                self.c.messages += 1;
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        ItemSeed {
            c: self.c,
            source: self.source,
            depth: self.depth + 1,
        }
        .visit_map(map)
    }
}

/// An object: a chat message, a content part, a Responses input item, a prompt template.
struct ItemSeed<'c, 'a> {
    c: &'c mut Collector<'a>,
    source: PromptSource,
    depth: u8,
}

impl<'de, 'c> DeserializeSeed<'de> for ItemSeed<'c, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'c> Visitor<'de> for ItemSeed<'c, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let c = self.c;
        let (source, depth) = (self.source, self.depth);
        // The parts of this item (and of the items inside it that name no role of their own)
        // take its `role`, wherever in the object that is written.
        let first_part = c.parts.len();
        let mut role = None;
        let mut role_seen = false;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.0.as_ref() {
                "role" => {
                    // Read once: a second `role` is one an upstream may read instead.
                    if role_seen {
                        return Err(de::Error::custom("`role` is given twice in one item"));
                    }
                    role_seen = true;
                    if let Some(name) = map.next_value::<Option<Text<'de>>>()? {
                        role = Some(Role::from_name(&name.0));
                    }
                }
                // Tools offered inside an item (Responses `additional_tools`, a tool search's
                // output, an MCP server's tool list): definitions, as at the top level.
                "tools" if depth < MAX_DEPTH => {
                    let raw = map.next_value::<&'de RawValue>()?;
                    c.raw(PromptSource::Tools, raw).map_err(|e| {
                        de::Error::custom(format_args!("`tools`: {}", without_position(&e)))
                    })?;
                }
                // Text-bearing fields: strings or arrays of parts, followed recursively. A
                // custom tool call's `input` is text the model reads as well.
                "content" | "text" | "refusal" | "output" | "arguments" | "summary" | "input"
                | "instructions" | "code" | "logs" | "outputs" | "queries" | "query"
                | "results" | "action" | "command" | "commands" | "stdout" | "stderr"
                | "operation" | "diff" | "error"
                    if depth < MAX_DEPTH =>
                {
                    map.next_value_seed(InputSeed {
                        c: &mut *c,
                        source,
                        depth,
                    })?
                }
                "name" if source == PromptSource::Message && depth == 1 => {
                    if let Some(name) = map.next_value::<Option<Text<'de>>>()? {
                        c.names += 1;
                        c.text(PromptSource::Message, name.0);
                    }
                }
                "messages" if depth < MAX_DEPTH => {
                    map.next_value_seed(MessagesSeed { c: &mut *c })?
                }
                "tool_calls" | "function_call" | "function" | "custom" if depth < MAX_DEPTH => map
                    .next_value_seed(InputSeed {
                        c: &mut *c,
                        source,
                        depth,
                    })?,
                // A prompt template's variables: each value is text (or an input part).
                "variables" if depth < MAX_DEPTH => map.next_value_seed(VariablesSeed {
                    c: &mut *c,
                    source,
                    depth,
                })?,
                "type" => {
                    if let Some(ty) = map.next_value::<Option<Text<'de>>>()? {
                        c.media_type(&ty.0);
                    }
                }
                k => scan_member(k, &mut map, &mut *c, depth + 1)?,
            }
        }
        // The outermost item's role wins: a part cannot name itself another speaker.
        if role.is_some() {
            for part in &mut c.parts[first_part..] {
                part.1 = role;
            }
        }
        Ok(())
    }
}

/// A prompt template's `variables`: names (user data) to text or input parts.
struct VariablesSeed<'c, 'a> {
    c: &'c mut Collector<'a>,
    source: PromptSource,
    depth: u8,
}

impl<'de, 'c> DeserializeSeed<'de> for VariablesSeed<'c, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'c> Visitor<'de> for VariablesSeed<'c, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of variables")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(InputSeed {
                c: &mut *self.c,
                source: self.source,
                depth: self.depth + 1,
            })?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// multipart

#[cfg(feature = "multipart")]
fn ambiguous(message: &'static str) -> PolicyError {
    PolicyError::AmbiguousRequest(Cow::Borrowed(message))
}

#[cfg(feature = "multipart")]
/// Splits a header value into `;`-separated items, keeping quoted strings whole.
fn header_items(value: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, b) in value.bytes().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b';' if !quoted => {
                items.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(value[start..].trim());
    items
}

#[cfg(feature = "multipart")]
/// A parameter's name and unquoted value; `None` for an item without `=`.
fn header_param(item: &str) -> Result<Option<(&str, &str)>, PolicyError> {
    let Some((name, value)) = item.split_once('=') else {
        return Ok(None);
    };
    let (name, value) = (name.trim(), value.trim());
    let value = match value.strip_prefix('"') {
        Some(rest) => {
            let inner = rest
                .strip_suffix('"')
                .ok_or_else(|| ambiguous("A multipart header has an unterminated quoted value."))?;
            if inner.contains(['"', '\\']) {
                // Quoted-pair escapes are read differently by different parsers.
                return Err(ambiguous(
                    "A multipart header value holds a backslash or an inner quote.",
                ));
            }
            inner
        }
        None => value,
    };
    Ok(Some((name, value)))
}

#[cfg(feature = "multipart")]
/// The `boundary` of a `multipart/form-data` content type, refused when any parser could read
/// another: the header sent twice, `boundary` twice (in any case), or in RFC 2231 form.
pub(crate) fn strict_boundary(headers: &HeaderMap) -> Result<String, PolicyError> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let value = values.next().map(|v| v.to_str());
    if values.next().is_some() {
        return Err(ambiguous("The Content-Type header is sent twice."));
    }
    let value = value
        .and_then(Result::ok)
        .ok_or_else(|| invalid("Invalid multipart/form-data content type."))?;
    let mut boundary = None;
    for item in header_items(value).into_iter().skip(1) {
        let Some((name, value)) = header_param(item)? else {
            continue;
        };
        if name.to_ascii_lowercase().starts_with("boundary") {
            if name != "boundary" || boundary.is_some() {
                return Err(ambiguous(
                    "The multipart boundary is given twice, in another case, or encoded; send one `boundary=`.",
                ));
            }
            boundary = Some(value.to_owned());
        }
    }
    boundary
        .filter(|b| !b.is_empty())
        .ok_or_else(|| invalid("Invalid multipart/form-data content type: no boundary."))
}

#[cfg(feature = "multipart")]
/// The field name of a part, from its headers, refused when a parser could read another: a
/// `Content-Disposition` sent twice, not `form-data`, `name` or `filename` twice, in another
/// case or in RFC 2231 form (`name*=`), or a `Content-Transfer-Encoding` that changes the
/// bytes (some parsers decode base64 parts).
fn strict_part_name(headers: &HeaderMap) -> Result<(String, bool), PolicyError> {
    let mut dispositions = headers.get_all(header::CONTENT_DISPOSITION).iter();
    let value = dispositions
        .next()
        .ok_or_else(|| invalid("A multipart part has no Content-Disposition header."))?;
    if dispositions.next().is_some() {
        return Err(ambiguous(
            "A multipart part has two Content-Disposition headers.",
        ));
    }
    if let Some(encoding) = headers.get("content-transfer-encoding") {
        let plain = encoding.to_str().is_ok_and(|e| {
            ["7bit", "8bit", "binary"]
                .iter()
                .any(|p| e.trim().eq_ignore_ascii_case(p))
        });
        if !plain {
            return Err(ambiguous(
                "A multipart part has a Content-Transfer-Encoding other than 7bit, 8bit or binary.",
            ));
        }
    }
    let value = std::str::from_utf8(value.as_bytes())
        .map_err(|_| invalid("A multipart Content-Disposition header is not UTF-8."))?;
    let items = header_items(value);
    if !items[0].eq_ignore_ascii_case("form-data") {
        return Err(ambiguous("A multipart part is not `form-data`."));
    }
    let (mut name, mut file) = (None, false);
    for item in &items[1..] {
        let Some((param, value)) = header_param(item)? else {
            continue;
        };
        let lower = param.to_ascii_lowercase();
        if lower.ends_with('*') {
            return Err(ambiguous(
                "A multipart part uses an encoded parameter (`name*=`); send `name=\"...\"`.",
            ));
        }
        match lower.as_str() {
            "name" | "filename" if param != lower => {
                return Err(ambiguous(
                    "A multipart part's `name` or `filename` is not lowercase.",
                ))
            }
            "name" if name.is_some() => return Err(ambiguous("A multipart part has two names.")),
            "name" => name = Some(value.to_owned()),
            "filename" if file => return Err(ambiguous("A multipart part has two file names.")),
            "filename" => file = true,
            _ => {}
        }
    }
    Ok((name.unwrap_or_default(), file))
}

/// Fields of a multipart body the policy reads.
#[cfg(feature = "multipart")]
const MULTIPART_FIELDS: &[&str] = &[
    "model", "prompt", "user", "n", "size", "quality", "stream", "session",
];

#[cfg(feature = "multipart")]
fn parse_multipart(
    req: &mut LlmRequest,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(), PolicyError> {
    use futures_util::FutureExt;

    let boundary = strict_boundary(headers)?;
    let stream = futures_util::stream::once(std::future::ready(Ok::<Bytes, std::io::Error>(
        body.clone(),
    )));
    let mut form = multer::Multipart::new(stream, boundary);
    // The whole body is in memory, so every step completes at once: poll without a runtime.
    let bad = |e: multer::Error| invalid(format!("Invalid multipart/form-data body: {e}"));
    let mut seen: Vec<&'static str> = Vec::new();
    loop {
        let next = form
            .next_field()
            .now_or_never()
            .ok_or_else(|| invalid("Invalid multipart/form-data body"))?
            .map_err(bad)?;
        let Some(field) = next else { break };
        let (name, is_file) = strict_part_name(field.headers())?;
        if field.name().unwrap_or_default() != name {
            return Err(ambiguous("A multipart part's name is ambiguous."));
        }
        let wanted = MULTIPART_FIELDS.iter().find(|f| **f == name).copied();
        if wanted.is_some() && is_file {
            return Err(ambiguous(
                "A multipart field the policy reads (`model`, `prompt`, ...) is sent as a file.",
            ));
        }
        let case_variant = MULTIPART_FIELDS.contains(&name.to_ascii_lowercase().as_str())
            || folds_onto_read_key(&name).is_some();
        if wanted.is_none() && case_variant {
            return Err(ambiguous(
                "A multipart field differs from one the policy reads only in case.",
            ));
        }
        let Some(wanted) = wanted else {
            // Skip the field's data (a file part is consumed chunk by chunk, no copy).
            let mut field = field;
            while field
                .chunk()
                .now_or_never()
                .ok_or_else(|| invalid("Invalid multipart/form-data body"))?
                .map_err(bad)?
                .is_some()
            {}
            if is_file {
                req.media.files += 1;
            }
            continue;
        };
        if seen.contains(&wanted) {
            return Err(PolicyError::InvalidBody {
                message: format!("`{wanted}`: duplicate field; send each field once"),
                param: None,
            });
        }
        seen.push(wanted);
        // The field's bytes as UTF-8, as the upstream reads them (multer's `text()` sniffs a
        // byte-order mark and decodes `\xFF\xFE...` as UTF-16, another text). Bytes that are
        // not UTF-8 are refused rather than read one way here and another upstream.
        let bytes = field
            .bytes()
            .now_or_never()
            .ok_or_else(|| invalid("Invalid multipart/form-data body"))?
            .map_err(bad)?;
        let text = String::from_utf8(bytes.to_vec())
            .map_err(|_| invalid(format!("`{wanted}`: the multipart field is not UTF-8")))?;
        match wanted {
            "model" => req.model = Some(text),
            "prompt" => req
                .parts
                .push((PromptSource::Prompt, None, Span::Owned(text.into()))),
            "user" => req.user = Some(text),
            "size" => req.size = Some(text),
            "quality" => req.quality = Some(text),
            "stream" => req.stream = text.trim().eq_ignore_ascii_case("true"),
            "n" => {
                req.n = Some(text.trim().parse().map_err(|_| PolicyError::InvalidBody {
                    message: format!("`n` must be a positive integer, got `{text}`"),
                    param: None,
                })?)
            }
            // `POST /v1/realtime/calls`: the session configuration, as JSON.
            _ => parse_session_part(req, &text)?,
        }
    }
    Ok(())
}

/// The `session` part of a realtime call: read like a JSON body's `session`.
#[cfg(feature = "multipart")]
fn parse_session_part(req: &mut LlmRequest, text: &str) -> Result<(), PolicyError> {
    let wrapped = format!("{{\"session\":{text}}}");
    let mut inner = LlmRequest::from_request_head(
        &Method::POST,
        &Uri::from_static("/v1/realtime/client_secrets"),
        &HeaderMap::new(),
        &req.policy,
    );
    inner
        .read_body(&HeaderMap::new(), Bytes::from(wrapped))
        .map_err(|e| match e {
            PolicyError::InvalidBody { message, param } => PolicyError::InvalidBody {
                message: format!("The `session` part: {message}"),
                param,
            },
            other => other,
        })?;
    let owned: Vec<(PromptSource, Option<Role>, Span)> = inner
        .prompt_parts()
        .map(|p| (p.source, p.role, Span::Owned(p.text.into())))
        .collect();
    req.parts.extend(owned);
    if req.model.is_none() {
        req.model = inner.model.take();
    } else if let Some(model) = inner.model.take() {
        req.extra_models.push(model);
    }
    req.extra_models.append(&mut inner.extra_models);
    req.nested_output = inner.nested_output;
    req.image_tool |= inner.image_tool;
    Ok(())
}

#[cfg(not(feature = "multipart"))]
fn parse_multipart(_: &mut LlmRequest, _: &HeaderMap, _: &Bytes) -> Result<(), PolicyError> {
    Err(invalid(
        "multipart/form-data bodies need the `multipart` feature of tower-llm-policy",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: String) -> Result<LlmRequest, PolicyError> {
        let (parts, ()) = http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(())
            .unwrap()
            .into_parts();
        LlmRequest::parse(&parts, Bytes::from(body))
    }

    fn nested(depth: usize, inner: &str) -> String {
        format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth))
    }

    /// Members of a value being walked are walked at once (not skipped as raw text and parsed
    /// again): they read the same, and bodies are refused as nested too deeply as before.
    #[test]
    fn walked_values_read_the_same() {
        // A case variant deep inside a tool definition is refused.
        let body = r#"{"model":"m","messages":[],"tools":[{"type":"function","function":{"name":"F","x":{"Model":"y"}}}]}"#;
        let err = parse(body.into()).unwrap_err().to_string();
        assert!(err.contains("differs from `model` only in case"), "{err}");
        // A model nested inside a tool and inside an unknown field is read.
        let body = r#"{"model":"m","messages":[],"tools":[{"type":"function","Description":0,"x":{"y":{"model":"gpt-5"}}}],"z":{"Q":[{"model":"o3"}]}}"#;
        let req = parse(body.into()).unwrap();
        let models: Vec<_> = req.models().map(|(m, _)| m.to_owned()).collect();
        assert_eq!(models, ["m", "gpt-5", "o3"]);
        // Deep nesting: a value with nothing we read is skipped, however deep (to serde_json's
        // own limit); one that could hold a key we read is refused past MAX_SCAN_DEPTH.
        for walked in [false, true] {
            let upper = if walked { r#""Up":0,"# } else { "" };
            let plain = format!(
                r#"{{"model":"m","messages":[],"z":{{{upper}"a":{}}}}}"#,
                nested(70, "1")
            );
            assert!(parse(plain).is_ok(), "walked: {walked}");
            let deep = format!(
                r#"{{"model":"m","messages":[],"z":{{{upper}"a":{}}}}}"#,
                nested(70, r#"{"model":"x"}"#)
            );
            let err = parse(deep).unwrap_err().to_string();
            assert!(err.contains("nested too deeply"), "{err}");
            let tools = format!(
                r#"{{"model":"m","messages":[],"tools":[{{"Up":0,"a":{}}}]}}"#,
                nested(70, "1")
            );
            assert!(parse(tools).is_ok());
        }
    }
}
