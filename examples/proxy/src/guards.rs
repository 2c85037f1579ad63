//! `[[guards]]`: the proxy's content guards, built into one
//! [`GuardLayer`].
//!
//! Each `[[guards]]` table is one named guard (its name is what keys list in `guards`, what
//! the `x-llm-policy-guards` header names, and what audit records flag as `guard:<name>`):
//!
//! | `kind` | looks for | default `mode` | default `on` | its own fields |
//! |---|---|---|---|---|
//! | `words` | words and phrases (aho-corasick) | `block` | request | `words` or `builtin = "profanity"`, `obfuscations`, `whole_words`, `label` |
//! | `regex` | your patterns, each with a label | `block` | request | `patterns`, `case_sensitive` |
//! | `secrets` | API keys, tokens, private keys | `redact` | request | `only` |
//! | `pii` | e-mail, phone, cards, IBANs, US SSNs | `redact` | request | `only` |
//! | `injection` | prompt-injection phrases | `block` | request | `families`, `languages` |
//! | `moderation` | an OpenAI-compatible `/v1/moderations` | `block` | request | `url`, `model`, `api_key_env`, `categories`, `fail_open`, `timeout` |
//! | `webhook` | your own service's verdict | `block` | request | `url`, `secret_env`, `secret_header`, `fail_open`, `timeout` |
//! | `firewall` | tool names offered and called | `block` | both | `allow`, `deny` |
//! | `reflection` | a response repeating the system prompt | `block` | response | `min_chars` |
//!
//! Every guard also takes `mode` (`audit`, `block`, `redact`), `on` (`["request",
//! "response"]`), `roles`, `fields`, `mask` and `workspace` (`true` by default: every key's
//! requests; `false`: only the keys that list it in `guards`, and requests that ask for it
//! with `x-llm-policy-guards`). A field another kind has is an error naming the guard and
//! the field; so is an unknown one.
//!
//! The moderation and webhook guards reach their service through [`http_client`], a
//! hyper client of the proxy's own (the same TLS set-up as the upstream's), with their
//! `timeout` (5 s by default). `[end_users] hash_salt_env` replaces end-user ids with a
//! salted hash before they leave the proxy.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Deserializer};
use tower_llm_policy::guard::detect::{
    Injection, InjectionFamily, InjectionLanguage, Patterns, Pii, Secrets, WordList,
};
use tower_llm_policy::guard::external::{OpenAiModerator, WebhookModerator};
use tower_llm_policy::guard::{Guard, GuardLayer, Mode, Sides, ToolFirewall};
use tower_llm_policy::keys::{BoxFuture, KeyDigest, KeyStore, StoreError};
use tower_llm_policy::request::{PromptSource, Role};
use tower_llm_policy::ApiKey;

/// How long a moderation or webhook guard waits for its verdict, unless `timeout` says.
pub const DEFAULT_EXTERNAL_TIMEOUT: Duration = Duration::from_secs(5);

/// A reflection guard's `min_chars` by default.
pub const DEFAULT_REFLECTION_CHARS: usize = 64;

/// The shortest end-user hash salt accepted, in bytes.
pub const MIN_SALT_LEN: usize = 16;

/// The HTTP client the moderation and webhook guards (and the alerts webhook) post through.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for the guards' and alerts' own endpoints: HTTP or HTTPS (ring, Mozilla's roots),
/// HTTP/1 and 2, connecting within 10 s.
pub fn http_client() -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|_| "TLS setup failed".to_owned())?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(https))
}

/// `kind = "..."`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GuardKind {
    /// `words`: a word list.
    Words,
    /// `regex`: labelled patterns.
    Regex,
    /// `secrets`: the built-in secrets.
    Secrets,
    /// `pii`: the built-in personal data.
    Pii,
    /// `injection`: prompt-injection phrases.
    Injection,
    /// `moderation`: an OpenAI-compatible moderation endpoint.
    Moderation,
    /// `webhook`: a webhook's verdict.
    Webhook,
    /// `firewall`: the tool firewall.
    Firewall,
    /// `reflection`: a response repeating the system prompt.
    Reflection,
}

impl GuardKind {
    fn as_str(self) -> &'static str {
        match self {
            GuardKind::Words => "words",
            GuardKind::Regex => "regex",
            GuardKind::Secrets => "secrets",
            GuardKind::Pii => "pii",
            GuardKind::Injection => "injection",
            GuardKind::Moderation => "moderation",
            GuardKind::Webhook => "webhook",
            GuardKind::Firewall => "firewall",
            GuardKind::Reflection => "reflection",
        }
    }

    /// The kind's own fields.
    fn fields(self) -> &'static [&'static str] {
        match self {
            GuardKind::Words => &["words", "builtin", "obfuscations", "whole_words", "label"],
            GuardKind::Regex => &["patterns", "case_sensitive"],
            GuardKind::Secrets | GuardKind::Pii => &["only"],
            GuardKind::Injection => &["families", "languages"],
            GuardKind::Moderation => &[
                "url",
                "model",
                "api_key_env",
                "categories",
                "fail_open",
                "timeout",
            ],
            GuardKind::Webhook => &["url", "secret_env", "secret_header", "fail_open", "timeout"],
            GuardKind::Firewall => &["allow", "deny"],
            GuardKind::Reflection => &["min_chars"],
        }
    }

    fn default_mode(self) -> Mode {
        match self {
            GuardKind::Secrets | GuardKind::Pii => Mode::Redact,
            _ => Mode::Block,
        }
    }
}

/// `mode = "audit" | "block" | "redact"`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModeConfig {
    /// Flag and let through.
    Audit,
    /// Refuse (400 `content_blocked`) or withhold the response.
    Block,
    /// Mask each match.
    Redact,
}

impl From<ModeConfig> for Mode {
    fn from(m: ModeConfig) -> Mode {
        match m {
            ModeConfig::Audit => Mode::Audit,
            ModeConfig::Block => Mode::Block,
            ModeConfig::Redact => Mode::Redact,
        }
    }
}

/// One entry of `on = [...]`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SideConfig {
    /// The request (the prompt).
    Request,
    /// The response (the model's output, streams included).
    Response,
}

/// `patterns = { label = "regex", ... }` or `[[guards.patterns]] label = "..." pattern = "..."`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PatternsConfig {
    /// A table of label → pattern.
    Table(std::collections::BTreeMap<String, String>),
    /// An array of `{ label, pattern }`.
    List(Vec<PatternEntry>),
}

/// One `[[guards.patterns]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternEntry {
    /// What a match is called (in flags, block messages, `{label}` in masks).
    pub label: String,
    /// The regex (Rust `regex` syntax; bounded repetitions only).
    pub pattern: String,
}

/// One `[[guards]]` table. Fields a kind does not have must be absent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    /// `name = "pii"`: unique; keys' `guards` and the `x-llm-policy-guards` header name it.
    pub name: String,
    /// `kind = "words"`, ...
    pub kind: GuardKind,
    /// `mode = "block"`: default `redact` for secrets and pii, `block` otherwise.
    #[serde(default)]
    pub mode: Option<ModeConfig>,
    /// `on = ["request", "response"]`: default request (firewall: both; reflection: response).
    #[serde(default)]
    pub on: Option<Vec<SideConfig>>,
    /// `roles = ["user"]`: only the text of messages with these roles (default: all).
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// `fields = ["messages", "prompt", "input", "instructions", "tools", "schema", "suffix",
    /// "prediction"]`: only these request fields (default: all).
    #[serde(default)]
    pub fields: Option<Vec<String>>,
    /// `mask = "[{label}]"`: what a redacted match becomes (default `[REDACTED:{label}]`).
    #[serde(default)]
    pub mask: Option<String>,
    /// `workspace = true` (default): every key's requests. `false`: only keys listing the
    /// guard in `guards`, and requests naming it in `x-llm-policy-guards`.
    #[serde(default = "yes")]
    pub workspace: bool,

    /// words: the words and phrases.
    #[serde(default)]
    pub words: Option<Vec<String>>,
    /// words: `builtin = "profanity"`.
    #[serde(default)]
    pub builtin: Option<String>,
    /// words: undo obfuscations (`f u c k`, look-alike letters) before matching.
    #[serde(default)]
    pub obfuscations: Option<bool>,
    /// words: whole words only (default true).
    #[serde(default)]
    pub whole_words: Option<bool>,
    /// words: the label of every match (default `word`; `profanity` for the built-in list).
    #[serde(default)]
    pub label: Option<String>,

    /// regex: the labelled patterns.
    #[serde(default)]
    pub patterns: Option<PatternsConfig>,
    /// regex: match case (default: case-insensitive).
    #[serde(default)]
    pub case_sensitive: Option<bool>,

    /// secrets, pii: only these built-in labels.
    #[serde(default)]
    pub only: Option<Vec<String>>,

    /// injection: only these families.
    #[serde(default)]
    pub families: Option<Vec<String>>,
    /// injection: only these languages (ISO codes, `en`, `de`, ...).
    #[serde(default)]
    pub languages: Option<Vec<String>>,

    /// moderation, webhook: where to post. Moderation default: the upstream's
    /// `/moderations`.
    #[serde(default)]
    pub url: Option<String>,
    /// moderation: the moderation model (default `omni-moderation-latest`).
    #[serde(default)]
    pub model: Option<String>,
    /// moderation: the environment variable holding the API key (default: the upstream's
    /// provider key).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// moderation: only these categories count.
    #[serde(default)]
    pub categories: Option<Vec<String>>,
    /// moderation, webhook: let requests through (flagged `guard:<name>:unavailable`) when
    /// the service gives no verdict (default false: 503 `policy_unavailable`).
    #[serde(default)]
    pub fail_open: Option<bool>,
    /// moderation, webhook: how long to wait for a verdict (default 5 s).
    #[serde(default, deserialize_with = "optional_duration")]
    pub timeout: Option<Duration>,
    /// webhook: the environment variable holding the secret sent with each call.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// webhook: the header the secret goes in (default `authorization: Bearer <secret>`).
    #[serde(default)]
    pub secret_header: Option<String>,

    /// firewall: only tools matching these patterns (`*` wildcards).
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// firewall: never tools matching these patterns.
    #[serde(default)]
    pub deny: Option<Vec<String>>,

    /// reflection: how many characters of the system prompt in a row count (default 64).
    #[serde(default)]
    pub min_chars: Option<usize>,
}

fn yes() -> bool {
    true
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    crate::config::duration(d).map(Some)
}

impl GuardConfig {
    /// The kind-specific fields set, by name.
    fn set_fields(&self) -> Vec<&'static str> {
        let set = [
            ("words", self.words.is_some()),
            ("builtin", self.builtin.is_some()),
            ("obfuscations", self.obfuscations.is_some()),
            ("whole_words", self.whole_words.is_some()),
            ("label", self.label.is_some()),
            ("patterns", self.patterns.is_some()),
            ("case_sensitive", self.case_sensitive.is_some()),
            ("only", self.only.is_some()),
            ("families", self.families.is_some()),
            ("languages", self.languages.is_some()),
            ("url", self.url.is_some()),
            ("model", self.model.is_some()),
            ("api_key_env", self.api_key_env.is_some()),
            ("categories", self.categories.is_some()),
            ("fail_open", self.fail_open.is_some()),
            ("timeout", self.timeout.is_some()),
            ("secret_env", self.secret_env.is_some()),
            ("secret_header", self.secret_header.is_some()),
            ("allow", self.allow.is_some()),
            ("deny", self.deny.is_some()),
            ("min_chars", self.min_chars.is_some()),
        ];
        set.into_iter()
            .filter(|(_, s)| *s)
            .map(|(n, _)| n)
            .collect()
    }

    fn sides(&self) -> Sides {
        match &self.on {
            Some(on) => Sides {
                request: on.contains(&SideConfig::Request),
                response: on.contains(&SideConfig::Response),
            },
            None => match self.kind {
                GuardKind::Firewall => Sides::BOTH,
                GuardKind::Reflection => Sides::RESPONSE,
                _ => Sides::REQUEST,
            },
        }
    }

    fn mode(&self) -> Mode {
        self.mode.map_or(self.kind.default_mode(), Mode::from)
    }
}

/// `[end_users]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndUsersConfig {
    /// `hash_salt_env = "TLP_END_USER_SALT"`: the environment variable holding a salt (16
    /// bytes or more): `user` and `safety_identifier` go upstream (and into the audit
    /// records) as a salted SHA-256 of their value. The salt is never shown.
    #[serde(default)]
    pub hash_salt_env: Option<String>,
}

fn env_name_ok(name: &str) -> bool {
    !(name.trim().is_empty() || name.contains('=') || name.contains('\0'))
}

fn parse_role(name: &str) -> Option<Role> {
    Some(match name {
        "system" => Role::System,
        "developer" => Role::Developer,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        "function" => Role::Function,
        _ => return None,
    })
}

fn parse_field(name: &str) -> Option<PromptSource> {
    Some(match name {
        "messages" => PromptSource::Message,
        "prompt" => PromptSource::Prompt,
        "input" => PromptSource::Input,
        "instructions" => PromptSource::Instructions,
        "tools" => PromptSource::Tools,
        "schema" => PromptSource::Schema,
        "suffix" => PromptSource::Suffix,
        "prediction" => PromptSource::Prediction,
        _ => return None,
    })
}

/// Checks `[[guards]]` and `[end_users]` without building anything (no environment needed):
/// unique names, fields that belong to each kind, valid values. Every message names the guard
/// and the field.
pub fn check_config(guards: &[GuardConfig], end_users: &EndUsersConfig) -> Result<(), String> {
    let mut names = HashSet::new();
    for g in guards {
        let name = g.name.trim();
        if name.is_empty() || name != g.name || name.contains(',') {
            return Err(format!(
                "`[[guards]]` `name` (`{}`): a name is required, without commas or surrounding \
                 spaces",
                g.name
            ));
        }
        if !names.insert(name) {
            return Err(format!("guard `{name}`: two `[[guards]]` have this `name`"));
        }
        check_guard(g).map_err(|e| format!("guard `{name}` (kind `{}`): {e}", g.kind.as_str()))?;
        // The detectors' own checks (patterns compile and are bounded, labels exist). The
        // injection detector's patterns are the library's: only its filters are read here
        // (compiling them takes a while, and is done once, by `build`).
        let checked = match g.kind {
            GuardKind::Injection => injection_filters(g).map(drop),
            _ => detector_guard(g).map(drop),
        };
        checked.map_err(|e| format!("guard `{name}` (kind `{}`): {e}", g.kind.as_str()))?;
    }
    if let Some(env) = &end_users.hash_salt_env {
        if !env_name_ok(env) {
            return Err(
                "`end_users.hash_salt_env` must be the name of an environment variable".into(),
            );
        }
    }
    Ok(())
}

fn check_guard(g: &GuardConfig) -> Result<(), String> {
    let own = g.kind.fields();
    if let Some(field) = g.set_fields().into_iter().find(|f| !own.contains(f)) {
        return Err(format!(
            "`{field}` is not a field of this kind (its own fields: {})",
            own.join(", ")
        ));
    }
    if let Some(on) = &g.on {
        if on.is_empty() {
            return Err("`on` needs \"request\", \"response\" or both".into());
        }
    }
    let sides = g.sides();
    let mode = g.mode();
    match g.kind {
        GuardKind::Moderation | GuardKind::Webhook => {
            if sides.response {
                return Err("`on`: this kind looks at requests only".into());
            }
            if g.kind == GuardKind::Moderation && mode == Mode::Redact {
                return Err("`mode`: a moderation endpoint cannot redact (audit or block)".into());
            }
            if g.kind == GuardKind::Webhook && g.url.is_none() {
                return Err("`url` is required".into());
            }
            if let Some(url) = &g.url {
                let uri: Uri = url
                    .parse()
                    .map_err(|_| "`url` is not a valid URL".to_owned())?;
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err("`url` must be an http:// or https:// URL".into());
                }
                if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                    return Err("`url` must not contain credentials (use `secret_env`)".into());
                }
            }
            for (field, env) in [
                ("api_key_env", &g.api_key_env),
                ("secret_env", &g.secret_env),
            ] {
                if env.as_deref().is_some_and(|e| !env_name_ok(e)) {
                    return Err(format!(
                        "`{field}` must be the name of an environment variable"
                    ));
                }
            }
            if let Some(header) = &g.secret_header {
                if http::HeaderName::try_from(header.as_str()).is_err() {
                    return Err("`secret_header` is not a valid header name".into());
                }
                if g.secret_env.is_none() {
                    return Err("`secret_header` needs `secret_env`".into());
                }
            }
            if g.timeout.is_some_and(|t| t.is_zero()) {
                return Err("`timeout` must be above zero".into());
            }
        }
        GuardKind::Reflection => {
            if sides.request {
                return Err("`on`: a reflection guard looks at responses only".into());
            }
            if mode == Mode::Redact {
                return Err("`mode`: a reflection guard cannot redact (audit or block)".into());
            }
            if g.min_chars == Some(0) {
                return Err("`min_chars` must be above zero".into());
            }
        }
        GuardKind::Firewall if g.allow.is_none() && g.deny.is_none() => {
            return Err("`allow` or `deny` (or both) is required".into());
        }
        _ => {}
    }
    if let Some(roles) = &g.roles {
        if let Some(bad) = roles.iter().find(|r| parse_role(r).is_none()) {
            return Err(format!(
                "`roles`: unknown role `{bad}` (system, developer, user, assistant, tool, \
                 function)"
            ));
        }
    }
    if let Some(fields) = &g.fields {
        if let Some(bad) = fields.iter().find(|f| parse_field(f).is_none()) {
            return Err(format!(
                "`fields`: unknown field `{bad}` (messages, prompt, input, instructions, tools, \
                 schema, suffix, prediction)"
            ));
        }
    }
    if g.mask.as_deref().is_some_and(str::is_empty) {
        return Err("`mask` must not be empty".into());
    }
    Ok(())
}

/// The guard of a kind that needs nothing from outside (a detector, a firewall, a
/// reflection); `None` for the kinds that ask a service.
fn detector_guard(g: &GuardConfig) -> Result<Option<Guard>, String> {
    let name = g.name.as_str();
    let guard = match g.kind {
        GuardKind::Words => {
            let mut list = match (&g.words, g.builtin.as_deref()) {
                (Some(words), None) => WordList::new(words).map_err(|e| format!("`words`: {e}"))?,
                (None, Some("profanity")) => WordList::profanity(),
                (None, Some(other)) => {
                    return Err(format!(
                        "`builtin`: unknown list `{other}` (the built-in list is `profanity`)"
                    ))
                }
                _ => return Err("one of `words` and `builtin` is required".into()),
            };
            if let Some(on) = g.obfuscations {
                list = list.obfuscations(on);
            }
            if let Some(on) = g.whole_words {
                list = list.whole_words(on);
            }
            if let Some(label) = &g.label {
                if label.trim().is_empty() {
                    return Err("`label` must not be blank".into());
                }
                list = list.label(label.clone());
            }
            Guard::new(name, list)
        }
        GuardKind::Regex => {
            let pairs: Vec<(String, String)> = match &g.patterns {
                Some(PatternsConfig::Table(t)) => {
                    t.iter().map(|(l, p)| (l.clone(), p.clone())).collect()
                }
                Some(PatternsConfig::List(l)) => l
                    .iter()
                    .map(|e| (e.label.clone(), e.pattern.clone()))
                    .collect(),
                None => return Err("`patterns` is required".into()),
            };
            let patterns = if g.case_sensitive == Some(true) {
                Patterns::case_sensitive(pairs)
            } else {
                Patterns::new(pairs)
            }
            .map_err(|e| format!("`patterns`: {e}"))?;
            Guard::new(name, patterns)
        }
        GuardKind::Secrets => Guard::new(
            name,
            match &g.only {
                Some(only) => Secrets::only(only).map_err(|e| format!("`only`: {e}"))?,
                None => Secrets::all(),
            },
        ),
        GuardKind::Pii => Guard::new(
            name,
            match &g.only {
                Some(only) => Pii::only(only).map_err(|e| format!("`only`: {e}"))?,
                None => Pii::all(),
            },
        ),
        GuardKind::Injection => {
            let (families, languages) = injection_filters(g)?;
            let mut injection = Injection::new();
            if let Some(families) = families {
                injection = injection.families(families);
            }
            if let Some(languages) = languages {
                injection = injection.languages(languages);
            }
            Guard::new(name, injection)
        }
        GuardKind::Firewall => Guard::firewall(
            name,
            ToolFirewall::new()
                .allow(g.allow.iter().flatten().cloned())
                .deny(g.deny.iter().flatten().cloned()),
        ),
        GuardKind::Reflection => {
            Guard::reflection(name, g.min_chars.unwrap_or(DEFAULT_REFLECTION_CHARS))
        }
        GuardKind::Moderation | GuardKind::Webhook => return Ok(None),
    };
    Ok(Some(guard))
}

/// An injection guard's `families` and `languages`, parsed.
type InjectionFilters = (Option<Vec<InjectionFamily>>, Option<Vec<InjectionLanguage>>);

fn injection_filters(g: &GuardConfig) -> Result<InjectionFilters, String> {
    let families = g
        .families
        .as_ref()
        .map(|families| {
            families
                .iter()
                .map(|f| f.parse::<InjectionFamily>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("`families`: {e}"))
        })
        .transpose()?;
    let languages = g
        .languages
        .as_ref()
        .map(|languages| {
            languages
                .iter()
                .map(|l| l.parse::<InjectionLanguage>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("`languages`: {e}"))
        })
        .transpose()?;
    if families.as_ref().is_some_and(Vec::is_empty) || languages.as_ref().is_some_and(Vec::is_empty)
    {
        return Err(
            "`families` and `languages` must not be empty lists (leave them out for all)".into(),
        );
    }
    Ok((families, languages))
}

/// The first name of `bound` that is not one of `guards`.
pub fn unknown_guard<'a>(guards: &[GuardConfig], bound: &'a [String]) -> Option<&'a str> {
    bound
        .iter()
        .find(|name| !guards.iter().any(|g| &g.name == *name))
        .map(String::as_str)
}

/// What the guards that ask a service need from the rest of the configuration.
pub struct External<'a> {
    /// The upstream's base URL (`.../v1`): a moderation guard's default is its
    /// `/moderations`.
    pub upstream_base_url: &'a str,
    /// The upstream's provider key: a moderation guard's default API key.
    pub provider_key: Option<&'a str>,
    /// The client both post through.
    pub client: HttpClient,
}

impl fmt::Debug for External<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("External")
            .field("upstream_base_url", &self.upstream_base_url)
            .field("provider_key", &self.provider_key.is_some())
            .finish_non_exhaustive()
    }
}

/// The [`GuardLayer`] of `[[guards]]` and `[end_users]` (already checked by
/// [`check_config`]), with secrets looked up by `env`. Errors name the guard and the field,
/// never a secret.
pub fn build(
    guards: &[GuardConfig],
    end_users: &EndUsersConfig,
    env: &dyn Fn(&str) -> Option<String>,
    external: &External<'_>,
) -> Result<GuardLayer, String> {
    let mut layer = GuardLayer::new();
    for g in guards {
        let name = g.name.as_str();
        let at = |e: String| format!("guard `{name}` (kind `{}`): {e}", g.kind.as_str());
        let mut guard = match detector_guard(g).map_err(at)? {
            Some(guard) => guard,
            None => external_guard(g, env, external).map_err(at)?,
        };
        guard = guard.mode(g.mode()).on(g.sides());
        if let Some(roles) = &g.roles {
            guard = guard.roles(roles.iter().filter_map(|r| parse_role(r)));
        }
        if let Some(fields) = &g.fields {
            guard = guard.sources(fields.iter().filter_map(|f| parse_field(f)));
        }
        if let Some(mask) = &g.mask {
            guard = guard.mask(mask.as_str());
        }
        layer = if g.workspace {
            layer.guard(guard)
        } else {
            layer.optional_guard(guard)
        };
    }
    if let Some(var) = &end_users.hash_salt_env {
        let salt = env(var).unwrap_or_default();
        if salt.len() < MIN_SALT_LEN {
            return Err(format!(
                "`end_users.hash_salt_env`: the variable {var} must hold a salt of at least \
                 {MIN_SALT_LEN} bytes"
            ));
        }
        layer = layer.hash_end_users(salt.as_bytes());
    }
    Ok(layer)
}

fn external_guard(
    g: &GuardConfig,
    env: &dyn Fn(&str) -> Option<String>,
    external: &External<'_>,
) -> Result<Guard, String> {
    let secret = |field: &str, var: &str| {
        env(var)
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| format!("`{field}`: the variable {var} is not set"))
    };
    let timeout = g.timeout.unwrap_or(DEFAULT_EXTERNAL_TIMEOUT);
    let guard = match g.kind {
        GuardKind::Moderation => {
            let url = match &g.url {
                Some(url) => url.clone(),
                None => format!(
                    "{}/moderations",
                    external.upstream_base_url.trim_end_matches('/')
                ),
            };
            let uri: Uri = url
                .parse()
                .map_err(|_| "`url` is not a valid URL".to_owned())?;
            let mut moderator = OpenAiModerator::new(external.client.clone())
                .uri(uri)
                .timeout(timeout);
            if let Some(model) = &g.model {
                moderator = moderator.model(model.as_str());
            }
            if let Some(categories) = &g.categories {
                moderator = moderator.categories(categories.iter().cloned());
            }
            let key = match &g.api_key_env {
                Some(var) => Some(secret("api_key_env", var)?),
                None => external.provider_key.map(str::to_owned),
            };
            if let Some(key) = key {
                moderator = moderator.api_key(key);
            }
            Guard::external(g.name.as_str(), moderator)
        }
        GuardKind::Webhook => {
            let url = g.url.as_deref().unwrap_or_default();
            let uri: Uri = url
                .parse()
                .map_err(|_| "`url` is not a valid URL".to_owned())?;
            let mut webhook = WebhookModerator::new(external.client.clone(), uri).timeout(timeout);
            if let Some(var) = &g.secret_env {
                let value = secret("secret_env", var)?;
                webhook = match &g.secret_header {
                    Some(header) => webhook.secret_header(header, value),
                    None => webhook.bearer(value),
                };
            }
            Guard::external(g.name.as_str(), webhook)
        }
        _ => unreachable!("detector kinds are built by detector_guard"),
    };
    Ok(guard.fail_open(g.fail_open.unwrap_or(false)))
}

/// A key store whose keys are checked against the configured guards: a key (from a database
/// row edited by hand; the file store refuses such a reload whole) bound to a guard that does
/// not exist is reported, once per key, as an error in the log. Its requests are refused by the guard layer (503
/// `policy_unavailable`: a key's guards are never silently dropped).
pub struct KnownGuards {
    inner: Arc<dyn KeyStore>,
    names: HashSet<String>,
    reported: Mutex<HashSet<String>>,
}

impl fmt::Debug for KnownGuards {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KnownGuards")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl KnownGuards {
    /// `inner`'s keys, checked against the guards named `names`.
    pub fn new(inner: Arc<dyn KeyStore>, names: impl IntoIterator<Item = String>) -> Self {
        KnownGuards {
            inner,
            names: names.into_iter().collect(),
            reported: Mutex::new(HashSet::new()),
        }
    }

    fn check(&self, found: &Result<Option<Arc<ApiKey>>, StoreError>) {
        let Ok(Some(key)) = found else { return };
        if key.guards.is_empty() {
            return;
        }
        let Some(unknown) = key.guards.iter().find(|g| !self.names.contains(*g)) else {
            return;
        };
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        if reported.insert(key.name.clone()) {
            tracing::error!(
                key = %key.name,
                guard = %unknown,
                "a key names a guard that is not in `[[guards]]`: its requests are refused \
                 (503) until the key or the configuration is fixed"
            );
        }
    }
}

impl KeyStore for KnownGuards {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        Box::pin(async move {
            let found = self.inner.lookup(digest).await;
            self.check(&found);
            found
        })
    }

    fn lookup_now(&self, digest: &KeyDigest) -> Option<Result<Option<Arc<ApiKey>>, StoreError>> {
        let found = self.inner.lookup_now(digest)?;
        self.check(&found);
        Some(found)
    }
}
