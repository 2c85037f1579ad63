//! [`GuardLayer`], [`Guarded`] and their futures: the guards of a request, and of its
//! response.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use sha2::{Digest, Sha256};
use tower_layer::Layer;
use tower_service::Service;

use super::response::{guard_response, rejection_body, GuardBody, GuardResponse, ResponsePlan};
use super::{Guard, Kind, Mode};
use crate::alert::{Alert, AlertSink};
use crate::audit::AuditHandle;
use crate::body::{BoxError, PolicyBody, ResponseBody};
use crate::check::{Check, CheckFuture};
use crate::endpoint::Endpoint;
use crate::error::{LayerName, PolicyError};
use crate::keys::{ApiKey, BoxFuture};
use crate::policy::Policy;
use crate::request::{LlmRequest, PromptPart, PromptSource, Role};

/// The request header with which a caller adds guards to its own request:
/// `x-llm-policy-guards: pii, injection`. Names the layer does not know are ignored and the
/// request is flagged `header_ignored:x-llm-policy-guards`. A header can only add guards:
/// there is no way to remove or weaken one. Removed before the request is forwarded.
pub const GUARDS_HEADER: &str = "x-llm-policy-guards";

/// Applies content guards to requests and their responses. See the [module docs](super).
///
/// Guards added with [`guard`](Self::guard) apply to every request (the workspace's);
/// guards added with [`optional_guard`](Self::optional_guard) apply to the requests of keys
/// that list them in [`ApiKey::guards`], and to requests that ask for them with the
/// [`GUARDS_HEADER`]. A key can only add guards, never remove a workspace one.
#[derive(Clone)]
pub struct GuardLayer {
    config: Arc<Config>,
}

struct Config {
    guards: Vec<Guard>,
    by_name: HashMap<Arc<str>, usize>,
    workspace: Vec<usize>,
    /// `workspace`, shared by the requests that add no guard to it.
    workspace_shared: Arc<[usize]>,
    policy: Policy,
    end_user_salt: Option<Arc<[u8]>>,
    alerts: Option<Arc<dyn AlertSink>>,
}

impl fmt::Debug for GuardLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("GuardLayer")
            .field("guards", &c.guards)
            .field(
                "workspace",
                &c.workspace
                    .iter()
                    .map(|&i| c.guards[i].name())
                    .collect::<Vec<_>>(),
            )
            .field("hash_end_users", &c.end_user_salt.is_some())
            .field("alerts", &c.alerts.is_some())
            .finish()
    }
}

impl Default for GuardLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl GuardLayer {
    /// A layer without guards.
    pub fn new() -> Self {
        GuardLayer {
            config: Arc::new(Config {
                guards: Vec::new(),
                by_name: HashMap::new(),
                workspace: Vec::new(),
                workspace_shared: Arc::from([]),
                policy: Policy::default(),
                end_user_salt: None,
                alerts: None,
            }),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::get_mut(&mut self.config).expect("GuardLayer is configured before it is cloned")
    }

    fn add(&mut self, guard: Guard, workspace: bool) {
        let config = self.config_mut();
        let name: Arc<str> = Arc::from(guard.name());
        let index = match config.by_name.get(&name) {
            Some(&i) => {
                config.guards[i] = guard;
                i
            }
            None => {
                config.guards.push(guard);
                config.by_name.insert(name, config.guards.len() - 1);
                config.guards.len() - 1
            }
        };
        config.workspace.retain(|&i| i != index);
        if workspace {
            config.workspace.push(index);
        }
        config.workspace_shared = Arc::from(&config.workspace[..]);
    }

    /// Adds a guard that applies to every request (a guard of the same name is replaced).
    ///
    /// # Panics
    ///
    /// When called on a clone of a layer (configure first, then clone).
    #[must_use]
    pub fn guard(mut self, guard: Guard) -> Self {
        self.add(guard, true);
        self
    }

    /// Adds a guard that applies only to the requests of keys bound to it
    /// ([`ApiKey::guards`]) and to requests that name it in the [`GUARDS_HEADER`].
    ///
    /// # Panics
    ///
    /// When called on a clone of a layer.
    #[must_use]
    pub fn optional_guard(mut self, guard: Guard) -> Self {
        self.add(guard, false);
        self
    }

    /// Replaces `user` and `safety_identifier` with a salted SHA-256 of their value (64 hex
    /// digits) before the request goes upstream; the audit record shows the hash too. The
    /// same end user always gets the same hash under one salt.
    #[must_use]
    pub fn hash_end_users(mut self, salt: impl AsRef<[u8]>) -> Self {
        self.config_mut().end_user_salt = Some(Arc::from(salt.as_ref()));
        self
    }

    /// Announces every block (of a request or a response) to `sink`.
    #[must_use]
    pub fn alerts(mut self, sink: Arc<dyn AlertSink>) -> Self {
        self.config_mut().alerts = Some(sink);
        self
    }

    /// The policy (model aliases, body limits) a request is resolved with when this layer is
    /// the first of the crate to see it.
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.config_mut().policy = policy;
        self
    }

    /// The names of the guards this layer knows (to check a key's
    /// [`guards`](ApiKey::guards) when it is configured).
    pub fn guard_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.config.guards.iter().map(Guard::name)
    }

    /// Whether a guard of this name is known.
    pub fn knows(&self, name: &str) -> bool {
        self.config.by_name.contains_key(name)
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded {
            inner: Screen {
                inner,
                config: self.config.clone(),
            },
            check: GuardCheck {
                config: self.config.clone(),
                applicable: Ok(self.config.workspace_shared.clone()),
                body_unread: false,
            },
        }
    }
}

/// The guards of the [`GuardLayer`] around an inner service.
#[derive(Clone)]
pub struct Guarded<S> {
    inner: Screen<S>,
    check: GuardCheck,
}

impl<S> fmt::Debug for Guarded<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("guards", &self.check.config.guards.len())
            .finish_non_exhaustive()
    }
}

impl<S> Guarded<S> {
    /// Wraps `inner` with the guards of `layer`.
    pub fn new(inner: S, layer: &GuardLayer) -> Self {
        layer.layer(inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner.inner
    }
}

/// The guards that apply to a request, by index: resolved once per request, in the
/// request's extensions for the response side.
#[derive(Clone, Debug)]
struct Applicable(Arc<[usize]>);

/// A key is bound to a guard the layer does not know: its requests are refused (503), its
/// guards never silently dropped.
#[derive(Clone, Copy, Debug)]
struct Unbound;

impl From<Unbound> for PolicyError {
    fn from(_: Unbound) -> Self {
        PolicyError::PolicyUnavailable
    }
}

impl Config {
    /// The guards that apply to a request of `key`, with `extra` asked for by its header:
    /// the workspace's, then the key's, then the header's, each once.
    fn applicable(&self, key: Option<&ApiKey>, extra: &[usize]) -> Result<Arc<[usize]>, Unbound> {
        let bound = key.map_or(&[][..], |k| &k.guards[..]);
        if bound.is_empty() && extra.is_empty() {
            return Ok(self.workspace_shared.clone());
        }
        let mut all = self.workspace.clone();
        for name in bound {
            let Some(&i) = self.by_name.get(name.as_str()) else {
                #[cfg(feature = "tracing")]
                tracing::warn!(
                    key = key.map(|k| k.name.as_str()),
                    guard = name.as_str(),
                    "a key is bound to a guard this layer does not know: its requests are refused"
                );
                return Err(Unbound);
            };
            if !all.contains(&i) {
                all.push(i);
            }
        }
        for &i in extra {
            if !all.contains(&i) {
                all.push(i);
            }
        }
        Ok(Arc::from(all))
    }

    fn blocked(
        &self,
        guard: &Guard,
        label: Option<&str>,
        key: Option<&ApiKey>,
        side: &'static str,
        audit: Option<&AuditHandle>,
    ) -> PolicyError {
        if let Some(audit) = audit {
            audit.flag(format!("guard:{}", guard.name()));
        }
        if let Some(alerts) = &self.alerts {
            alerts.alert(Alert::ContentBlocked {
                key: key.map(|k| k.name.clone()),
                guard: guard.name().to_owned(),
                side,
                label: label.map(str::to_owned),
            });
        }
        blocked_error(guard.name(), label)
    }

    /// The salted hash an end-user id is replaced with.
    fn end_user_hash(&self) -> Option<crate::rewrite::EndUserHash> {
        let salt = self.end_user_salt.clone()?;
        Some(Arc::new(move |id: &str| {
            let digest = Sha256::new()
                .chain_update(&salt)
                .chain_update(id)
                .finalize();
            crate::keys::KeyDigest::from_bytes(digest.into()).to_hex()
        }))
    }
}

/// The error a block answers with: it names the guard and what was found, never the text.
pub(crate) fn blocked_error(guard: &str, label: Option<&str>) -> PolicyError {
    let message = match label {
        Some(label) => {
            format!("This request was blocked by the content guard `{guard}` ({label}).")
        }
        None => format!("This request was blocked by the content guard `{guard}`."),
    };
    PolicyError::ContentBlocked(message.into())
}

/// The request-side decision of the guards.
#[derive(Clone)]
struct GuardCheck {
    config: Arc<Config>,
    /// The guards that apply to the request (its key's and its header's added to the
    /// workspace's), resolved once.
    applicable: Result<Arc<[usize]>, Unbound>,
    /// A method whose body is never read (GET, HEAD, DELETE, OPTIONS) came with one.
    body_unread: bool,
}

/// The texts of a request the guards read, decoded once: the prompt parts, with the JSON
/// text of tool and schema definitions read for its strings; on endpoints whose bodies hold
/// text outside the fields the request parse reads ([`reads_whole_body`]), every string of
/// the body as well, read by the guards that filter no field or role.
struct Texts<'v> {
    parts: Vec<(PromptSource, Option<Role>, Cow<'v, str>)>,
    /// Strings of the body outside the prompt parts.
    whole: Vec<String>,
}

/// Why definitions or a body could not be read for its text: refused, never passed unread.
fn unreadable() -> PolicyError {
    PolicyError::ContentBlocked(
        "This request could not be read by the content guards (definitions or values nested too deeply to be parsed)."
            .into(),
    )
}

/// Endpoints whose bodies the request parse reads completely for text: every other body a
/// guard reads is read for all its strings.
fn reads_whole_body(view: &LlmRequest) -> bool {
    !matches!(
        view.endpoint(),
        Endpoint::ChatCompletions
            | Endpoint::Completions
            | Endpoint::Embeddings
            | Endpoint::Moderations
            | Endpoint::AudioSpeech
            | Endpoint::ImageGeneration
            | Endpoint::ImageEdit
            | Endpoint::ImageVariation
            | Endpoint::AudioTranscription
            | Endpoint::AudioTranslation
    ) && !view.is_multipart()
}

/// Top-level members that are no text a model reads.
const NOT_PROMPT: [&str; 4] = ["model", "user", "safety_identifier", "metadata"];

impl<'v> Texts<'v> {
    fn of(view: &'v LlmRequest) -> Result<Self, PolicyError> {
        let mut parts = Vec::new();
        for part in view.prompt_parts() {
            match part.source {
                // Definitions are held as their JSON text: their strings (descriptions, enum
                // values, names) are what the model reads, decoded.
                PromptSource::Tools | PromptSource::Schema => {
                    let value = serde_json::from_str::<serde_json::Value>(part.text)
                        .map_err(|_| unreadable())?;
                    let mut strings = Vec::new();
                    collect_strings(&value, &mut strings);
                    parts.extend(
                        strings
                            .into_iter()
                            .map(|s| (part.source, part.role, Cow::Owned(s))),
                    );
                }
                _ => parts.push((part.source, part.role, Cow::Borrowed(part.text))),
            }
        }
        let mut whole = Vec::new();
        if view.has_body() && reads_whole_body(view) && !view.body().is_empty() {
            let body = serde_json::from_slice::<serde_json::Value>(view.body())
                .map_err(|_| unreadable())?;
            if let serde_json::Value::Object(members) = body {
                for (key, value) in &members {
                    if !NOT_PROMPT.contains(&key.as_str()) {
                        collect_strings(value, &mut whole);
                    }
                }
            }
        }
        Ok(Texts { parts, whole })
    }

    /// The texts `guard` reads.
    fn read_by<'a>(&'a self, guard: &'a Guard) -> impl Iterator<Item = &'a str> + 'a {
        let unfiltered = guard.sources.is_none() && guard.roles.is_none();
        self.parts
            .iter()
            .filter_map(move |(source, role, text)| {
                guard
                    .reads(&PromptPart {
                        source: *source,
                        role: *role,
                        text,
                    })
                    .then_some(&**text)
            })
            .chain(
                self.whole
                    .iter()
                    .filter(move |_| unfiltered)
                    .map(String::as_str),
            )
    }
}

/// Every string in `value` (object keys too: a schema's property names are read; and the
/// strings a redaction does not rewrite, so that a match there refuses the request).
fn collect_strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                collect_strings(v, out);
            }
        }
        _ => {}
    }
}

/// The names of the tools a request offers (`tools`, `functions`, wherever the request
/// parse found them): every name a tool gives itself (a function's `name` at either level, a
/// custom tool's), a built-in tool's type, `mcp:<host>` for an MCP server (`mcp:<connector
/// id>` for a connector: never the label the client chooses), and the tools inside a
/// namespace.
pub(crate) fn offered_tools(view: &LlmRequest) -> Result<Vec<String>, PolicyError> {
    let mut names = Vec::new();
    for part in view.prompt_parts() {
        if part.source != PromptSource::Tools {
            continue;
        }
        let tools =
            serde_json::from_str::<serde_json::Value>(part.text).map_err(|_| unreadable())?;
        tool_names(&tools, &mut names);
    }
    Ok(names)
}

fn tool_names(tools: &serde_json::Value, names: &mut Vec<String>) {
    fn str_of(v: Option<&serde_json::Value>) -> Option<&str> {
        v.and_then(|v| v.as_str())
    }
    let list = match tools {
        serde_json::Value::Array(list) => list.as_slice(),
        one @ serde_json::Value::Object(_) => std::slice::from_ref(one),
        _ => return,
    };
    for tool in list {
        let ty = str_of(tool.get("type"));
        if ty == Some("mcp") {
            let server = str_of(tool.get("server_url"))
                .map(url_host)
                .or(str_of(tool.get("connector_id")))
                .unwrap_or("");
            names.push(format!("mcp:{server}"));
            continue;
        }
        let before = names.len();
        for name in [
            str_of(tool.get("function").and_then(|f| f.get("name"))),
            str_of(tool.get("custom").and_then(|f| f.get("name"))),
            str_of(tool.get("name")),
        ]
        .into_iter()
        .flatten()
        {
            names.push(name.to_owned());
        }
        if names.len() == before {
            if let Some(ty) = ty {
                names.push(ty.to_owned());
            }
        }
        if let Some(inner) = tool.get("tools") {
            tool_names(inner, names);
        }
    }
}

/// The host of a URL (`https://host:443/path` → `host`), lower-cased by the caller's
/// patterns' own spelling; the whole text when it is not a URL.
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    }
}

impl GuardCheck {
    /// The guards that apply to the request.
    fn applicable(&self) -> Result<&[usize], Unbound> {
        self.applicable.as_deref().map_err(|&e| e)
    }

    /// Whether a guard that applies to this request can refuse or rewrite it (audit guards
    /// only flag).
    fn strict(&self, applicable: &[usize]) -> bool {
        applicable.iter().any(|&i| {
            let g = &self.config.guards[i];
            g.on.request && g.mode != Mode::Audit && !matches!(g.kind, Kind::Reflection(_))
        })
    }

    /// Runs the request-side guards on `texts`: flags, refuses with the first block, and
    /// gives the guards that want their matches redacted (none when `redact` is false: a
    /// redaction's match found again is refused).
    fn scan(
        &self,
        view: &LlmRequest,
        texts: &Texts<'_>,
        applicable: &[usize],
        key: Option<&ApiKey>,
        audit: Option<&AuditHandle>,
        redact: bool,
    ) -> Result<Vec<usize>, PolicyError> {
        let config = &*self.config;
        let mut redacting = Vec::new();
        let mut found = Vec::new();
        for &i in applicable {
            let guard = &config.guards[i];
            if !guard.on.request {
                continue;
            }
            match &guard.kind {
                Kind::Detect(detector) => {
                    found.clear();
                    for text in texts.read_by(guard) {
                        detector.find(text, &mut found);
                        if !found.is_empty() && guard.mode != Mode::Audit {
                            break;
                        }
                    }
                    let Some(first) = found.first() else {
                        continue;
                    };
                    match guard.mode {
                        Mode::Audit => flag(audit, guard),
                        Mode::Redact if redact && !view.is_multipart() => {
                            flag(audit, guard);
                            redacting.push(i);
                        }
                        // Block; Redact on a multipart body (its text is not rewritten), or
                        // of what a redaction left: refused.
                        _ => {
                            return Err(config.blocked(
                                guard,
                                Some(&first.label),
                                key,
                                "request",
                                audit,
                            ))
                        }
                    }
                }
                Kind::Firewall(firewall) => {
                    let refused = offered_tools(view)?
                        .into_iter()
                        .find(|name| !firewall.permits(name));
                    if let Some(name) = refused {
                        if guard.mode == Mode::Audit {
                            flag(audit, guard);
                        } else {
                            let label = format!(
                                "tool {}",
                                crate::error::quote(&name.escape_debug().to_string())
                            );
                            return Err(config.blocked(guard, Some(&label), key, "request", audit));
                        }
                    }
                }
                // Asked after the decision (`Screen`), or on the response.
                Kind::External(_) | Kind::Reflection(_) => {}
            }
        }
        Ok(redacting)
    }
}

impl Check for GuardCheck {
    fn layer(&self) -> LayerName {
        LayerName::Guard
    }

    fn policy(&self) -> &Policy {
        &self.config.policy
    }

    fn on_head(&self, view: &LlmRequest, _key: Option<&ApiKey>) -> Result<bool, PolicyError> {
        let applicable = self.applicable()?;
        if self.strict(applicable) {
            if self.body_unread {
                return Err(PolicyError::AmbiguousRequest(
                    "A GET, HEAD, DELETE or OPTIONS request with a body is refused here: content guards apply, and its body is not read."
                        .into(),
                ));
            }
            if view.body_model() == crate::endpoint::BodyModel::Batch {
                return Err(PolicyError::Unverifiable(
                    "Batches are not available here: content guards apply, and the requests of a batch input file are stored upstream, where they cannot be read."
                        .into(),
                ));
            }
        }
        Ok(!applicable.is_empty() || self.config.end_user_salt.is_some())
    }

    fn reads_any_body(&self) -> bool {
        true
    }

    fn decide(
        &self,
        view: &mut LlmRequest,
        key: Option<&ApiKey>,
        audit: Option<&AuditHandle>,
    ) -> Result<(), PolicyError> {
        let config = &*self.config;
        let applicable = self.applicable()?;
        let hash = if view.user().is_some() || view.safety_identifier().is_some() {
            config.end_user_hash()
        } else {
            None
        };
        if hash.is_some() && view.is_multipart() {
            return Err(PolicyError::InvalidBody {
                message: "End-user ids are hashed here, and a multipart body's `user` is not rewritten: send the request without `user`.".into(),
                param: Some("user"),
            });
        }
        let mut redacting = Vec::new();
        if view.has_body() && !applicable.is_empty() {
            if view.prompt_token_ids() > 0 && self.strict(applicable) {
                return Err(PolicyError::Unverifiable(
                    "A prompt sent as token ids cannot be read by the content guards that apply here: send it as text."
                        .into(),
                ));
            }
            let texts = Texts::of(view)?;
            redacting = self.scan(view, &texts, applicable, key, audit, true)?;
        }
        if redacting.is_empty() && hash.is_none() {
            return Ok(());
        }
        if let Some(hash) = hash {
            view.queue_end_user_hash(hash);
        }
        if !redacting.is_empty() {
            let guards = self.config.clone();
            let chosen = redacting.clone();
            view.queue_redaction(
                Arc::new(move |source, role, text| {
                    redact_text(&guards.guards, &chosen, source, role, text)
                }),
                reads_whole_body(view),
            );
        }
        view.reparse()?;
        // The rewritten request passes every guard again: a match the rewrite could not reach,
        // or one that the masks made (text spliced around a deletion), refuses it.
        if !redacting.is_empty() {
            let texts = Texts::of(view)?;
            self.scan(view, &texts, applicable, key, audit, false)?;
        }
        if let Some(audit) = audit {
            audit.observe(view);
        }
        Ok(())
    }
}

fn flag(audit: Option<&AuditHandle>, guard: &Guard) {
    if let Some(audit) = audit {
        audit.flag(format!("guard:{}", guard.name()));
    }
}

/// `text` (a string of a prompt field) with the matches of the redacting guards that read
/// it masked, or `None` when nothing in it matches.
fn redact_text(
    guards: &[Guard],
    chosen: &[usize],
    source: PromptSource,
    role: Option<Role>,
    text: &str,
) -> Option<String> {
    let mut hits = Vec::new();
    for &i in chosen {
        if guards[i].reads_field(source, role) {
            guards[i].hits(i, text, &mut hits);
        }
    }
    if hits.is_empty() {
        return None;
    }
    Some(super::redact_hits(text, &mut hits, guards))
}

/// The inner half of [`Guarded`]: asks the external guards, then guards the response.
#[derive(Clone)]
struct Screen<S> {
    inner: S,
    config: Arc<Config>,
}

/// What the external guards decided: the request to forward, or the answer.
type Screened = Result<Request<PolicyBody>, PolicyError>;

impl<S, ResBody> Service<Request<PolicyBody>> for Screen<S>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<GuardBody<ResBody>>;
    type Error = S::Error;
    type Future = ScreenFuture<S, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<PolicyBody>) -> Self::Future {
        let config = &self.config;
        let key = req.extensions().get::<Arc<ApiKey>>().cloned();
        // Resolved by the head check, which passed (a request reaches this service only
        // through it); the workspace's guards at least, should it be called otherwise.
        let applicable = req
            .extensions()
            .get::<Applicable>()
            .map_or_else(|| config.workspace_shared.clone(), |a| a.0.clone());
        let audit = req.extensions().get::<AuditHandle>().cloned();
        let plan = response_plan(config, &applicable, &req, key.as_deref(), audit.clone());
        let external: Vec<usize> = applicable
            .iter()
            .copied()
            .filter(|&i| {
                let g = &config.guards[i];
                g.on.request && matches!(g.kind, Kind::External(_))
            })
            .collect();
        if external.is_empty() {
            crate::audit::forwarding(&req);
            return ScreenState::Inner {
                future: self.inner.call(req),
                plan,
            }
            .into();
        }
        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        ScreenState::Asking {
            asking: Box::pin(ask(config.clone(), external, req, key, audit)),
            inner: Some(inner),
            plan,
        }
        .into()
    }
}

/// The response plan of a request, when a guard reads its response.
fn response_plan(
    config: &Arc<Config>,
    applicable: &[usize],
    req: &Request<PolicyBody>,
    key: Option<&ApiKey>,
    audit: Option<AuditHandle>,
) -> Option<ResponsePlan> {
    let guards: Vec<Guard> = applicable
        .iter()
        .map(|&i| &config.guards[i])
        .filter(|g| g.on.response && !matches!(g.kind, Kind::External(_)))
        .cloned()
        .collect();
    if guards.is_empty() {
        return None;
    }
    let view = req.extensions().get::<LlmRequest>()?;
    let reflects = guards.iter().any(|g| matches!(g.kind, Kind::Reflection(_)));
    let system_prompt: Arc<str> = match view {
        view if reflects => {
            let mut text = String::new();
            for part in view.prompt_parts() {
                let system = matches!(part.role, Some(Role::System | Role::Developer))
                    || part.source == PromptSource::Instructions;
                if system {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(part.text);
                }
            }
            Arc::from(text)
        }
        _ => Arc::from(""),
    };
    Some(ResponsePlan {
        guards,
        system_prompt,
        endpoint: view.endpoint(),
        key: key.map(|k| k.name.clone()),
        audit,
        alerts: config.alerts.clone(),
    })
}

/// Asks each external guard in turn about the request's text.
async fn ask(
    config: Arc<Config>,
    external: Vec<usize>,
    mut req: Request<PolicyBody>,
    key: Option<Arc<ApiKey>>,
    audit: Option<AuditHandle>,
) -> Screened {
    for i in external {
        let guard = &config.guards[i];
        let Kind::External(moderator) = &guard.kind else {
            continue;
        };
        let Some(view) = req.extensions().get::<LlmRequest>() else {
            break;
        };
        let texts: Vec<String> = Texts::of(view)?.read_by(guard).map(str::to_owned).collect();
        if texts.is_empty() {
            continue;
        }
        let input = super::ModerationInput {
            texts: texts.clone(),
            key: key.as_ref().map(|k| k.name.clone()),
            model: view.canonical_model().map(str::to_owned),
        };
        let verdict = match moderator.moderate(input).await {
            Ok(verdict) => verdict,
            Err(_error) => {
                #[cfg(feature = "tracing")]
                tracing::warn!(guard = guard.name(), error = %_error, "an external guard gave no verdict");
                if guard.fail_open {
                    if let Some(audit) = &audit {
                        audit.flag(format!("guard:{}:unavailable", guard.name()));
                    }
                    continue;
                }
                return Err(PolicyError::PolicyUnavailable);
            }
        };
        let categories = match verdict {
            super::Verdict::Allow => continue,
            super::Verdict::Flag { categories } => categories,
            super::Verdict::Redact { texts: new } if guard.mode == Mode::Redact => {
                if new.len() != texts.len() {
                    return Err(PolicyError::PolicyUnavailable);
                }
                flag(audit.as_ref(), guard);
                let map: HashMap<String, String> = texts
                    .into_iter()
                    .zip(new)
                    .filter(|(old, new)| old != new)
                    .collect();
                if map.is_empty() {
                    continue;
                }
                req = rewrite_request(req, map, guard.name(), audit.as_ref())?;
                continue;
            }
            super::Verdict::Redact { .. } => Vec::new(),
        };
        let label = (!categories.is_empty()).then(|| categories.join(", "));
        if guard.mode == Mode::Audit {
            flag(audit.as_ref(), guard);
            continue;
        }
        return Err(config.blocked(
            guard,
            label.as_deref(),
            key.as_deref(),
            "request",
            audit.as_ref(),
        ));
    }
    Ok(req)
}

/// `req` with each prompt string that is a key of `map` replaced by its value.
fn rewrite_request(
    req: Request<PolicyBody>,
    map: HashMap<String, String>,
    guard_name: &str,
    audit: Option<&AuditHandle>,
) -> Screened {
    let (mut parts, body) = req.into_parts();
    let Some(view) = parts.extensions.get_mut::<LlmRequest>() else {
        return Ok(Request::from_parts(parts, body));
    };
    if view.is_multipart() {
        return Err(blocked_error(guard_name, None));
    }
    let everywhere = reads_whole_body(view);
    let replaced: Vec<String> = map.keys().cloned().collect();
    view.queue_redaction(
        Arc::new(move |_, _, text| map.get(text).cloned()),
        everywhere,
    );
    view.reparse()?;
    // Every text the verdict rewrote is gone, or the request is refused: a text the rewrite
    // could not reach (an object key, an identifier) is never forwarded as it was.
    let texts = Texts::of(view)?;
    let left = texts
        .parts
        .iter()
        .map(|(_, _, t)| &**t)
        .chain(texts.whole.iter().map(String::as_str))
        .any(|t| replaced.iter().any(|r| r == t));
    if left {
        return Err(blocked_error(guard_name, None));
    }
    let rendered = match view.take_rendered() {
        Some(rendered) => rendered?,
        None => return Ok(Request::from_parts(parts, body)),
    };
    if let Some(audit) = audit {
        audit.observe(view);
    }
    crate::check::set_length(&mut parts.headers, rendered.len());
    Ok(Request::from_parts(parts, PolicyBody::full(rendered)))
}

pin_project! {
    /// The future of the inner half of [`Guarded`].
    pub(crate) struct ScreenFuture<S, ResBody>
    where
        S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
    {
        #[pin]
        state: ScreenState<S, ResBody>,
    }
}

pin_project! {
    #[project = ScreenProj]
    enum ScreenState<S, ResBody>
    where
        S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
    {
        Asking {
            asking: BoxFuture<'static, Screened>,
            inner: Option<S>,
            plan: Option<ResponsePlan>,
        },
        Inner {
            #[pin]
            future: S::Future,
            plan: Option<ResponsePlan>,
        },
        Guarding {
            #[pin]
            guarding: GuardResponse<ResBody>,
        },
    }
}

impl<S, ResBody> From<ScreenState<S, ResBody>> for ScreenFuture<S, ResBody>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
{
    fn from(state: ScreenState<S, ResBody>) -> Self {
        ScreenFuture { state }
    }
}

impl<S, ResBody> Future for ScreenFuture<S, ResBody>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response<GuardBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                ScreenProj::Asking {
                    asking,
                    inner,
                    plan,
                } => {
                    let next = match ready!(asking.as_mut().poll(cx)) {
                        Ok(req) => {
                            let mut svc =
                                inner.take().expect("ScreenFuture polled after completion");
                            crate::audit::forwarding(&req);
                            ScreenState::Inner {
                                future: svc.call(req),
                                plan: plan.take(),
                            }
                        }
                        Err(error) => {
                            return Poll::Ready(Ok(error
                                .into_response(LayerName::Guard)
                                .map(rejection_body)));
                        }
                    };
                    state.set(next);
                }
                ScreenProj::Inner { future, plan } => {
                    let response = ready!(future.poll(cx))?;
                    let guarding = guard_response(plan.take(), response);
                    state.set(ScreenState::Guarding { guarding });
                }
                ScreenProj::Guarding { guarding } => {
                    return Poll::Ready(Ok(ready!(guarding.poll(cx))));
                }
            }
        }
    }
}

impl<S, B, ResBody> Service<Request<B>> for Guarded<S>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<GuardBody<ResBody>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut check = self.check.clone();
        check.body_unread = !matches!(
            *req.method(),
            http::Method::POST | http::Method::PUT | http::Method::PATCH
        ) && (has_body(req.headers()) || !req.body().is_end_stream());
        let extra = header_guards(&self.check.config, &mut req);
        let key = req.extensions().get::<Arc<ApiKey>>().cloned();
        check.applicable = self
            .check
            .config
            .applicable(key.as_deref(), extra.as_deref().unwrap_or_default());
        if let Ok(applicable) = &check.applicable {
            req.extensions_mut().insert(Applicable(applicable.clone()));
        }
        ResponseFuture {
            inner: CheckFuture::new(check, &mut self.inner, req),
        }
    }
}

/// Whether the head announces a body: a `Content-Length` other than 0, or a
/// `Transfer-Encoding`.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes().iter().any(|&b| b != b'0'))
}

/// The known guards named by the request's [`GUARDS_HEADER`] (removed from the request).
fn header_guards<B>(config: &Config, req: &mut Request<B>) -> Option<Arc<[usize]>> {
    let mut values = Vec::new();
    while let Some(value) = take_header(req.headers_mut()) {
        values.push(value);
    }
    if values.is_empty() {
        return None;
    }
    let mut chosen = Vec::new();
    let mut ignored = false;
    for value in &values {
        let Ok(text) = value.to_str() else {
            ignored = true;
            continue;
        };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match config.by_name.get(name) {
                Some(&i) if !chosen.contains(&i) => chosen.push(i),
                Some(_) => {}
                None => ignored = true,
            }
        }
    }
    if ignored {
        if let Some(audit) = req.extensions().get::<AuditHandle>() {
            audit.flag(format!("header_ignored:{GUARDS_HEADER}"));
        }
    }
    Some(Arc::from(chosen))
}

fn take_header(headers: &mut HeaderMap) -> Option<HeaderValue> {
    match headers.entry(GUARDS_HEADER) {
        http::header::Entry::Occupied(e) => {
            let (_, mut values) = e.remove_entry_mult();
            let first = values.next();
            let rest: Vec<HeaderValue> = values.collect();
            for v in rest {
                headers.append(GUARDS_HEADER, v);
            }
            first
        }
        http::header::Entry::Vacant(_) => None,
    }
}

pin_project! {
    /// Response future of [`Guarded`].
    pub struct ResponseFuture<S, B, ResBody>
    where
        S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
        S: Clone,
        ResBody: Body<Data = Bytes>,
        ResBody::Error: Into<BoxError>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        #[pin]
        inner: CheckFuture<Screen<S>, B, GuardCheck>,
    }
}

impl<S, B, ResBody> fmt::Debug for ResponseFuture<S, B, ResBody>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B, ResBody>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: Into<BoxError>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<GuardBody<ResBody>>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}
