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

use crate::endpoint::{Endpoint, Route};
use crate::error::PolicyError;
use crate::model::ModelName;
use crate::policy::Policy;
use crate::rewrite::{self, Edits};

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
}

/// One piece of prompt text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptPart<'a> {
    /// Where it comes from.
    pub source: PromptSource,
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
    has_model_body: bool,
    multipart: bool,
    body: Bytes,
    model: Option<String>,
    model_from_default: bool,
    name: Option<ModelName>,
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
    parts: Vec<(PromptSource, Span)>,
    token_ids: u64,
    media: MediaCounts,
    size: Option<String>,
    quality: Option<String>,
    parsed_body: bool,
    edits: Edits,
    dirty: bool,
}

impl fmt::Debug for LlmRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Prompt text is user content: Debug shows its size, not the text.
        f.debug_struct("LlmRequest")
            .field("endpoint", &self.route.endpoint)
            .field("model", &self.model)
            .field("canonical_model", &self.canonical_model())
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
        let mut req = LlmRequest {
            has_model_body: route.endpoint.has_model_body(method),
            multipart: is_multipart(headers),
            model: None,
            route,
            policy: policy.clone(),
            body: Bytes::new(),
            model_from_default: false,
            name: None,
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
        if let Some(deployment) = &self.route.deployment {
            // Azure routes by deployment and ignores a `model` in the body: the deployment is
            // what runs, so it is what every check sees.
            self.model = Some(deployment.clone());
        }
        self.model_from_default = false;
        // The documented default applies to a request that names no model, which is known only
        // once its body is read.
        if self.model.is_none() && !self.body_pending() {
            if let Some(default) = self.route.endpoint.default_model() {
                self.model = Some(default.to_owned());
                self.model_from_default = true;
            }
        }
        self.name = self
            .model
            .as_deref()
            .map(|m| self.policy.aliases().resolve(m));
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
    /// ([`Endpoint::has_model_body`]) that has not been read yet.
    pub(crate) fn body_pending(&self) -> bool {
        self.has_model_body && !self.parsed_body
    }

    /// Whether the request may carry a body with a model and a prompt
    /// ([`Endpoint::has_model_body`]), read or not.
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

    /// The requested output limit: the largest of the three output-token fields sent.
    pub fn max_output(&self) -> Option<u64> {
        [
            self.max_tokens,
            self.max_completion_tokens,
            self.max_output_tokens,
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
        self.parts.iter().map(move |(source, span)| PromptPart {
            source: *source,
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
        self.prompt_parts().map(|p| p.text.chars().count()).sum()
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
        Some(rewrite::apply(&self.body, &self.edits))
    }
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
    parts: Vec<(PromptSource, Span)>,
    messages: usize,
    names: usize,
    token_ids: u64,
    media: MediaCounts,
}

impl<'a> Collector<'a> {
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
            self.parts.push((source, span));
        }
    }

    fn media_type(&mut self, ty: &str) {
        match ty {
            "image_url" | "input_image" | "image" => self.media.images += 1,
            "input_audio" | "audio" => self.media.audio += 1,
            "file" | "input_file" => self.media.files += 1,
            _ => {}
        }
    }
}

fn parse_json(req: &mut LlmRequest, body: &Bytes) -> Result<(), PolicyError> {
    let mut collector = Collector {
        base: body,
        input_items_are_messages: req.route.endpoint == Endpoint::Responses,
        parts: Vec::new(),
        messages: 0,
        names: 0,
        token_ids: 0,
        media: MediaCounts::default(),
    };
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
];

/// Deserializes one field with its name in any error message.
fn field<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
    map: &mut A,
    name: &'static str,
    seen: &mut u32,
) -> Result<T, A::Error> {
    let bit = 1u32 << FIELDS.iter().position(|f| *f == name).unwrap_or(31);
    if *seen & bit != 0 {
        return Err(de::Error::custom(format_args!(
            "`{name}`: duplicate field; send each field once"
        )));
    }
    *seen |= bit;
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

impl<'de, 'c> Visitor<'de> for TopSeed<'c, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request body to be a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = 0u32;
        let mut session_model: Option<String> = None;
        let out = self.out;
        let c = self.c;
        while let Some(key) = map.next_key::<Text<'de>>()? {
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
                    out.max_output_tokens = field(&mut map, "max_output_tokens", &mut seen)?
                }
                "session" => {
                    // Realtime client secrets name the model inside `session`.
                    let session: Option<Session> = map.next_value()?;
                    session_model = session.and_then(|s| s.model);
                }
                "n" => out.n = field(&mut map, "n", &mut seen)?,
                "best_of" => out.best_of = field(&mut map, "best_of", &mut seen)?,
                "size" => out.size = owned(field(&mut map, "size", &mut seen)?),
                "quality" => out.quality = owned(field(&mut map, "quality", &mut seen)?),
                "instructions" => {
                    if let Some(text) =
                        field::<Option<Text<'de>>, _>(&mut map, "instructions", &mut seen)?
                    {
                        c.text(PromptSource::Instructions, text.0);
                    }
                }
                name @ ("tools" | "functions") => {
                    let name = if name == "tools" {
                        "tools"
                    } else {
                        "functions"
                    };
                    let raw = field::<&'de RawValue, _>(&mut map, name, &mut seen)?;
                    if raw.get() != "null" {
                        c.text(PromptSource::Tools, Cow::Borrowed(raw.get()));
                    }
                }
                "messages" => {
                    seen_once(&mut seen, "messages")?;
                    map.next_value_seed(Labelled("messages", MessagesSeed { c: &mut *c }))?;
                }
                "prompt" => {
                    seen_once(&mut seen, "prompt")?;
                    map.next_value_seed(Labelled(
                        "prompt",
                        InputSeed {
                            c: &mut *c,
                            source: PromptSource::Prompt,
                            depth: 0,
                        },
                    ))?;
                }
                "input" => {
                    seen_once(&mut seen, "input")?;
                    map.next_value_seed(Labelled(
                        "input",
                        InputSeed {
                            c: &mut *c,
                            source: PromptSource::Input,
                            depth: 0,
                        },
                    ))?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if let Some(model) = session_model {
            match &out.model {
                Some(top) if *top != model => return Err(de::Error::custom(
                    "`model`: the body names two different models (`model` and `session.model`)",
                )),
                _ => out.model = Some(model),
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct Session {
    #[serde(default)]
    model: Option<String>,
}

/// serde_json adds the position once more when our wrapped error surfaces: drop the inner one.
fn without_position(e: &dyn fmt::Display) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

fn seen_once<E: de::Error>(seen: &mut u32, name: &'static str) -> Result<(), E> {
    let bit = 1u32 << FIELDS.iter().position(|f| *f == name).unwrap_or(31);
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

/// Deepest nesting of prompt items we follow (deeper values are still validated as JSON).
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
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
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

/// An object: a chat message, a content part, or a Responses input item.
struct ItemSeed<'c, 'a> {
    c: &'c mut Collector<'a>,
    source: PromptSource,
    depth: u8,
}

impl<'de, 'c> DeserializeSeed<'de> for ItemSeed<'c, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, 'c> Visitor<'de> for ItemSeed<'c, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let c = self.c;
        let (source, depth) = (self.source, self.depth);
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match key.0.as_ref() {
                // Text-bearing fields: strings or arrays of parts, followed recursively.
                "content" | "text" | "refusal" | "output" | "arguments" | "summary"
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
                "tool_calls" | "function_call" | "function" if depth < MAX_DEPTH => map
                    .next_value_seed(InputSeed {
                        c: &mut *c,
                        source,
                        depth,
                    })?,
                "type" => {
                    if let Some(ty) = map.next_value::<Option<Text<'de>>>()? {
                        c.media_type(&ty.0);
                    }
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// multipart

#[cfg(feature = "multipart")]
fn parse_multipart(
    req: &mut LlmRequest,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(), PolicyError> {
    use futures_util::FutureExt;

    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| invalid(format!("Invalid multipart/form-data content type: {e}")))?;
    let stream = futures_util::stream::once(std::future::ready(Ok::<Bytes, std::io::Error>(
        body.clone(),
    )));
    let mut form = multer::Multipart::new(stream, boundary);
    // The whole body is in memory, so every step completes at once: poll without a runtime.
    let bad = |e: multer::Error| invalid(format!("Invalid multipart/form-data body: {e}"));
    loop {
        let next = form
            .next_field()
            .now_or_never()
            .ok_or_else(|| invalid("Invalid multipart/form-data body"))?
            .map_err(bad)?;
        let Some(field) = next else { break };
        let name = field.name().unwrap_or_default().to_owned();
        let is_file = field.file_name().is_some();
        let wanted = !is_file
            && matches!(
                name.as_str(),
                "model" | "prompt" | "user" | "n" | "size" | "quality" | "stream"
            );
        if !wanted {
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
        }
        // The field's bytes as UTF-8, as the upstream reads them (multer's `text()` sniffs a
        // byte-order mark and decodes `\xFF\xFE...` as UTF-16, another text).
        let bytes = field
            .bytes()
            .now_or_never()
            .ok_or_else(|| invalid("Invalid multipart/form-data body"))?
            .map_err(bad)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let dup = |name: &str| PolicyError::InvalidBody {
            message: format!("`{name}`: duplicate field; send each field once"),
            param: None,
        };
        match name.as_str() {
            "model" if req.model.is_some() => return Err(dup("model")),
            "model" => req.model = Some(text),
            "prompt" => req
                .parts
                .push((PromptSource::Prompt, Span::Owned(text.into()))),
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
            _ => {}
        }
    }
    Ok(())
}

#[cfg(not(feature = "multipart"))]
fn parse_multipart(_: &mut LlmRequest, _: &HeaderMap, _: &Bytes) -> Result<(), PolicyError> {
    Err(invalid(
        "multipart/form-data bodies need the `multipart` feature of tower-llm-policy",
    ))
}
