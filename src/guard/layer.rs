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
                extra: Arc::from([]),
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

/// The guards a request asked for in the [`GUARDS_HEADER`], by index (in the request's
/// extensions, for the response side).
#[derive(Clone, Debug)]
struct HeaderGuards(Arc<[usize]>);

impl Config {
    /// The guards that apply to a request of `key`, with `extra` asked for by its header:
    /// the workspace's, then the key's, then the header's, each once.
    fn applicable<'a>(
        &'a self,
        key: Option<&ApiKey>,
        extra: &[usize],
    ) -> Result<Cow<'a, [usize]>, PolicyError> {
        let bound = key.map_or(&[][..], |k| &k.guards[..]);
        if bound.is_empty() && extra.is_empty() {
            return Ok(Cow::Borrowed(&self.workspace));
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
                return Err(PolicyError::PolicyUnavailable);
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
        Ok(Cow::Owned(all))
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
            let mut h = Sha256::new();
            h.update(&salt);
            h.update(id.as_bytes());
            let digest = h.finalize();
            let mut out = String::with_capacity(64);
            for b in digest {
                out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
                out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
            }
            out
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
    /// The guards the request's header asked for.
    extra: Arc<[usize]>,
}

/// The texts of a request the guards read, decoded once: the prompt parts, with the JSON
/// text of tool and schema definitions read for its strings.
struct Texts<'v> {
    parts: Vec<(PromptSource, Option<Role>, Cow<'v, str>)>,
}

impl<'v> Texts<'v> {
    fn of(view: &'v LlmRequest) -> Self {
        let mut parts = Vec::new();
        for part in view.prompt_parts() {
            match part.source {
                // Definitions are held as their JSON text: their strings (descriptions, enum
                // values, names) are what the model reads, decoded.
                PromptSource::Tools | PromptSource::Schema => {
                    match serde_json::from_str::<serde_json::Value>(part.text) {
                        Ok(value) => {
                            let mut strings = Vec::new();
                            collect_strings(&value, &mut strings);
                            parts.extend(
                                strings
                                    .into_iter()
                                    .map(|s| (part.source, part.role, Cow::Owned(s))),
                            );
                        }
                        Err(_) => parts.push((part.source, part.role, Cow::Borrowed(part.text))),
                    }
                }
                _ => parts.push((part.source, part.role, Cow::Borrowed(part.text))),
            }
        }
        Texts { parts }
    }

    /// The parts `guard` reads.
    fn read_by<'a>(&'a self, guard: &'a Guard) -> impl Iterator<Item = &'a str> + 'a {
        self.parts.iter().filter_map(move |(source, role, text)| {
            guard
                .reads(&PromptPart {
                    source: *source,
                    role: *role,
                    text,
                })
                .then_some(&**text)
        })
    }
}

/// Every string in `value` (object keys too: a schema's property names are read).
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

/// The names of the tools a request offers (`tools`, `functions`): a function's name, a
/// custom tool's name, a built-in tool's type, `mcp:<server_label>` for an MCP server.
pub(crate) fn offered_tools(view: &LlmRequest) -> Vec<String> {
    let mut names = Vec::new();
    for part in view.prompt_parts() {
        if part.source != PromptSource::Tools {
            continue;
        }
        let Ok(serde_json::Value::Array(tools)) = serde_json::from_str(part.text) else {
            continue;
        };
        for tool in &tools {
            fn str_of(v: Option<&serde_json::Value>) -> Option<&str> {
                v.and_then(|v| v.as_str())
            }
            let ty = str_of(tool.get("type"));
            let name = str_of(tool.get("function").and_then(|f| f.get("name")))
                .or(str_of(tool.get("custom").and_then(|f| f.get("name"))))
                .or(str_of(tool.get("name")));
            match (ty, name) {
                (Some("mcp"), _) => {
                    let label = str_of(tool.get("server_label")).unwrap_or("");
                    names.push(format!("mcp:{label}"));
                }
                (_, Some(name)) => names.push(name.to_owned()),
                (Some(ty), None) => names.push(ty.to_owned()),
                (None, None) => {}
            }
        }
    }
    names
}

impl Check for GuardCheck {
    fn layer(&self) -> LayerName {
        LayerName::Guard
    }

    fn policy(&self) -> &Policy {
        &self.config.policy
    }

    fn on_head(&self, _view: &LlmRequest, key: Option<&ApiKey>) -> Result<bool, PolicyError> {
        let applicable = self.config.applicable(key, &self.extra)?;
        Ok(!applicable.is_empty() || self.config.end_user_salt.is_some())
    }

    fn decide(
        &self,
        view: &mut LlmRequest,
        key: Option<&ApiKey>,
        audit: Option<&AuditHandle>,
    ) -> Result<(), PolicyError> {
        let config = &*self.config;
        let applicable = config.applicable(key, &self.extra)?;
        let mut redacting: Vec<usize> = Vec::new();
        if view.has_body() && !applicable.is_empty() {
            let texts = Texts::of(view);
            let mut found = Vec::new();
            for &i in applicable.iter() {
                let guard = &config.guards[i];
                if !guard.on.request {
                    continue;
                }
                match &guard.kind {
                    Kind::Detect(detector) => {
                        found.clear();
                        for text in texts.read_by(guard) {
                            detector.find(text, &mut found);
                            if !found.is_empty() && guard.mode == Mode::Block {
                                break;
                            }
                        }
                        let Some(first) = found.first() else {
                            continue;
                        };
                        match guard.mode {
                            Mode::Audit => flag(audit, guard),
                            Mode::Redact if !view.is_multipart() => {
                                flag(audit, guard);
                                redacting.push(i);
                            }
                            // Block, and Redact on a multipart body (its text is not
                            // rewritten): refused.
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
                        let refused = offered_tools(view)
                            .into_iter()
                            .find(|name| !firewall.permits(name));
                        if let Some(name) = refused {
                            if guard.mode == Mode::Audit {
                                flag(audit, guard);
                            } else {
                                let label = format!("tool {}", crate::error::quote(&name));
                                return Err(config.blocked(
                                    guard,
                                    Some(&label),
                                    key,
                                    "request",
                                    audit,
                                ));
                            }
                        }
                    }
                    // Asked after the decision (`Screen`), or on the response.
                    Kind::External(_) | Kind::Reflection(_) => {}
                }
            }
        }
        let hash = if view.user().is_some() || view.safety_identifier().is_some() {
            config.end_user_hash()
        } else {
            None
        };
        if redacting.is_empty() && hash.is_none() {
            return Ok(());
        }
        if let Some(hash) = hash {
            view.queue_end_user_hash(hash);
        }
        if !redacting.is_empty() {
            let guards = self.config.clone();
            let chosen = redacting.clone();
            view.queue_redaction(Arc::new(move |source, role, text| {
                redact_text(&guards.guards, &chosen, source, role, text)
            }));
        }
        view.reparse()?;
        // What the redaction left must pass the same guards: a match it could not reach
        // (a string the rewrite does not walk) refuses the request instead.
        if !redacting.is_empty() {
            let texts = Texts::of(view);
            let mut found = Vec::new();
            for &i in &redacting {
                let guard = &config.guards[i];
                if let Some(detector) = guard.detector() {
                    for text in texts.read_by(guard) {
                        detector.find(text, &mut found);
                    }
                }
                if let Some(first) = found.first() {
                    return Err(config.blocked(guard, Some(&first.label), key, "request", audit));
                }
            }
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
    let mut found = Vec::new();
    for &i in chosen {
        let guard = &guards[i];
        let Some(detector) = guard.detector() else {
            continue;
        };
        if !guard.reads_field(source, role) {
            continue;
        }
        found.clear();
        detector.find(text, &mut found);
        hits.extend(found.drain(..).map(|f| super::Hit {
            range: f.range,
            label: f.label,
            guard: i,
        }));
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
        let extra = req
            .extensions()
            .get::<HeaderGuards>()
            .map_or(Arc::from([]), |h| h.0.clone());
        // The head check passed: the key's guards are known.
        let applicable = config
            .applicable(key.as_deref(), &extra)
            .map(Cow::into_owned)
            .unwrap_or_default();
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
        let texts: Vec<String> = Texts::of(view).read_by(guard).map(str::to_owned).collect();
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
                req = rewrite_request(req, map, audit.as_ref())?;
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
    audit: Option<&AuditHandle>,
) -> Screened {
    let (mut parts, body) = req.into_parts();
    let Some(view) = parts.extensions.get_mut::<LlmRequest>() else {
        return Ok(Request::from_parts(parts, body));
    };
    if view.is_multipart() {
        return Err(blocked_error("webhook", None));
    }
    view.queue_redaction(Arc::new(move |_, _, text| map.get(text).cloned()));
    view.reparse()?;
    let rendered = match view.take_rendered() {
        Some(rendered) => rendered?,
        None => return Ok(Request::from_parts(parts, body)),
    };
    if let Some(audit) = audit {
        audit.observe(view);
    }
    set_body_headers(&mut parts.headers, rendered.len());
    Ok(Request::from_parts(parts, PolicyBody::full(rendered)))
}

fn set_body_headers(headers: &mut HeaderMap, len: usize) {
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
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
        if let Some(extra) = header_guards(&self.check.config, &mut req) {
            check.extra = extra.clone();
            req.extensions_mut().insert(HeaderGuards(extra));
        }
        ResponseFuture {
            inner: CheckFuture::new(check, &mut self.inner, req),
        }
    }
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
