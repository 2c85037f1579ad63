//! The example proxy's configuration: a TOML file, validated whole at start-up.
//!
//! Every table is `deny_unknown_fields`, so a typo is an error that names its line (the TOML
//! parser's message carries the line and column). `[[keys]]` entries deserialize straight into
//! [`ApiKey`]: every key field of the crate is settable there with the same name. The keys are
//! then served by a [`FileKeyStore`](tower_llm_policy::keys::FileKeyStore) on the same file,
//! which reloads them on edit; the other tables are read once, at start-up.
//!
//! See `proxy.toml` (`examples/proxy/proxy.toml`) for a documented sample of every table.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use tower_llm_policy::audit::pricing::PricingTable;
use tower_llm_policy::audit::DEFAULT_DRAIN_TIMEOUT;
use tower_llm_policy::model::{ModelAliases, ModelList};
use tower_llm_policy::quota::BudgetPeriod;
use tower_llm_policy::request::{BodyOptions, DEFAULT_BODY_LIMIT, DEFAULT_MULTIPART_LIMIT};
use tower_llm_policy::{ApiKey, FeatureSet, ForwardedHeader, TrustedProxies};

pub use crate::alerts::AlertsConfig;
pub use crate::guards::{EndUsersConfig, GuardConfig};
use crate::upstream::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_FIRST_BYTE_TIMEOUT, DEFAULT_IDLE_TIMEOUT};

/// Where the proxy listens when neither the config nor `--listen` says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// How long in-flight requests may run on after SIGINT/SIGTERM, by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// `[server] header_read_timeout` by default.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// `[server] body_read_timeout` by default.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// `[server] body_total_timeout` by default.
pub const DEFAULT_BODY_TOTAL_TIMEOUT: Duration = Duration::from_secs(300);

/// `[server] max_body_bytes_in_flight` by default: 256 MiB.
pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = 256 * 1024 * 1024;

/// `[server] max_connections` by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `listen = "127.0.0.1:8080"`: the address clients use (`http://<listen>/v1`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `[upstream]`: where requests go, with which provider key.
    pub upstream: UpstreamConfig,
    /// `[server]`: connection handling.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[audit]`: where audit records go.
    #[serde(default)]
    pub audit: AuditConfig,
    /// `[workspace]`: the models any key may use at most.
    #[serde(default)]
    pub workspace: WorkspaceConfig,
    /// `[model_names]`: aliases resolved before every model check.
    #[serde(default)]
    pub model_names: ModelAliasesConfig,
    /// `[blocked]`: features and models blocked for every key.
    #[serde(default)]
    pub blocked: BlockedConfig,
    /// `[prompt_limits]`: limits for every key (a key's own limits apply too).
    #[serde(default)]
    pub prompt_limits: PromptLimitsConfig,
    /// `[pricing]`: prices (USD per million tokens) on top of the built-in table.
    #[serde(default)]
    pub pricing: PricingTable,
    /// `[body]`: request body size limits.
    #[serde(default)]
    pub body: BodyConfig,
    /// `[proxy]`: the reverse proxies in front of this one, whose forwarding headers are
    /// believed.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// `[state]`: where spend and rate counters live (in memory, or Redis for replicas).
    #[serde(default)]
    pub state: StateConfig,
    /// `[store]`: where the keys are, when not in this file (PostgreSQL).
    #[serde(default)]
    pub store: StoreConfig,
    /// `[admin]`: the admin API (`/admin/v1/...`), off unless `token_env` is set.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[metrics]`: Prometheus metrics (off by default).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[[teams]]`: spend caps shared by the keys whose `team` names them.
    #[serde(default)]
    pub teams: Vec<TeamConfig>,
    /// `[[guards]]`: content guards (word lists, patterns, secrets, PII, prompt injection,
    /// moderation, webhooks, a tool firewall, prompt reflection). See [`crate::guards`].
    #[serde(default)]
    pub guards: Vec<GuardConfig>,
    /// `[end_users]`: what happens to the end-user ids (`user`, `safety_identifier`).
    #[serde(default)]
    pub end_users: EndUsersConfig,
    /// `[alerts]`: where spend-threshold and content-blocked alerts are posted.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// `[[keys]]`: the virtual keys, with every field of [`ApiKey`].
    #[serde(default)]
    pub keys: Vec<ApiKey>,
}

/// `[state]`: where the keys' spend (`credit_limit_usd`) and rates (`rpm`, `tpm`) are
/// counted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// `redis_url = "redis://127.0.0.1:6379"`: counters in Redis, shared by every replica
    /// pointed at it (each decision one atomic script). Absent (the default): in this
    /// process's memory, lost on restart. May hold a password (`redis://:pw@host`): it is
    /// never logged.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// `redis_prefix = "tlp:"`: what every Redis key starts with.
    #[serde(default = "default_redis_prefix")]
    pub redis_prefix: String,
    /// `redis_timeout = "1s"`: how long one call to Redis may take; past it, or when Redis
    /// is down, a capped or rate-limited key's request gets 503 `policy_unavailable`.
    #[serde(default = "default_redis_timeout", deserialize_with = "duration")]
    pub redis_timeout: Duration,
    /// `reservation_ttl = "1h"`: a reservation left open longer (its replica died) is
    /// counted at its amount. Longer than the longest stream.
    #[serde(default = "default_reservation_ttl", deserialize_with = "duration")]
    pub reservation_ttl: Duration,
    /// `rate_limits_fail_open = false`: with `true`, requests pass the rate limits (not the
    /// spend caps) while the state cannot answer.
    #[serde(default)]
    pub rate_limits_fail_open: bool,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            redis_url: None,
            redis_prefix: default_redis_prefix(),
            redis_timeout: default_redis_timeout(),
            reservation_ttl: default_reservation_ttl(),
            rate_limits_fail_open: false,
        }
    }
}

impl fmt::Debug for StateConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateConfig")
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("redis_prefix", &self.redis_prefix)
            .field("redis_timeout", &self.redis_timeout)
            .field("reservation_ttl", &self.reservation_ttl)
            .field("rate_limits_fail_open", &self.rate_limits_fail_open)
            .finish()
    }
}

/// A URL with its user and password (between `://` and `@`) hidden.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn default_redis_prefix() -> String {
    "tlp:".to_owned()
}
fn default_redis_timeout() -> Duration {
    tower_llm_policy::quota::DEFAULT_REDIS_TIMEOUT
}
fn default_reservation_ttl() -> Duration {
    tower_llm_policy::quota::DEFAULT_RESERVATION_TTL
}

/// `[store]`: the keys in PostgreSQL instead of `[[keys]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres_url = "postgres://tlp:pw@db:5432/llm"`: the keys are the `tlp_keys` table of
    /// this database (see `--migrate`); `[[keys]]` must then be empty. May hold a password:
    /// it is never logged.
    #[serde(default)]
    pub postgres_url: Option<String>,
    /// `postgres_url_env = "TLP_DATABASE_URL"`: the same URL from an environment variable.
    #[serde(default)]
    pub postgres_url_env: Option<String>,
    /// `max_connections = 16`: the pool's size.
    #[serde(default = "default_pg_connections")]
    pub max_connections: usize,
    /// `cache_ttl = "30s"`: how long a found key is served from memory without asking the
    /// database. Changes reach every replica at once through `LISTEN`/`NOTIFY`; the TTL bounds
    /// how stale a key can be while that connection is down.
    #[serde(default = "default_cache_ttl", deserialize_with = "duration")]
    pub cache_ttl: Duration,
    /// `negative_cache_ttl = "2s"`: how long an unknown key is remembered as unknown (a flood
    /// of bad keys does not reach the database).
    #[serde(default = "default_negative_ttl", deserialize_with = "duration")]
    pub negative_cache_ttl: Duration,
    /// `cache_max_entries = 10000`.
    #[serde(default = "default_cache_entries")]
    pub cache_max_entries: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            postgres_url: None,
            postgres_url_env: None,
            max_connections: default_pg_connections(),
            cache_ttl: default_cache_ttl(),
            negative_cache_ttl: default_negative_ttl(),
            cache_max_entries: default_cache_entries(),
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field(
                "postgres_url",
                &self.postgres_url.as_deref().map(redact_url),
            )
            .field("postgres_url_env", &self.postgres_url_env)
            .field("max_connections", &self.max_connections)
            .field("cache_ttl", &self.cache_ttl)
            .field("negative_cache_ttl", &self.negative_cache_ttl)
            .field("cache_max_entries", &self.cache_max_entries)
            .finish()
    }
}

impl StoreConfig {
    /// The database URL: `postgres_url`, or the variable `postgres_url_env` names (looked up
    /// with `env`).
    pub fn url(&self, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        self.postgres_url
            .clone()
            .or_else(|| self.postgres_url_env.as_deref().and_then(env))
    }
}

fn default_pg_connections() -> usize {
    16
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(30)
}
fn default_negative_ttl() -> Duration {
    Duration::from_secs(2)
}
fn default_cache_entries() -> usize {
    10_000
}

/// `[admin]`: the admin API, and the web console on top of it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `token_env = "TLP_ADMIN_TOKEN"`: the environment variable holding the admin token (at
    /// least 32 characters). Set: `/admin/v1/...` answers the bearer of that token. Absent
    /// (the default): there is no admin API.
    #[serde(default)]
    pub token_env: Option<String>,
    /// `console = true` (the default): with `token_env` set, the web console is served under
    /// `/console` (login with the admin token; see [`crate::console`]). `false`: the admin
    /// API alone.
    #[serde(default = "yes")]
    pub console: bool,
    /// `console_secure_cookie = false`: `true` marks the console's cookies `Secure` always
    /// (the console is reached over HTTPS through a proxy in front). They are `Secure`
    /// anyway on requests that say they came over HTTPS (`X-Forwarded-Proto: https`).
    #[serde(default)]
    pub console_secure_cookie: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            token_env: None,
            console: true,
            console_secure_cookie: false,
        }
    }
}

/// `[[teams]]`: one team's spend cap.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamConfig {
    /// The team's name, as the keys' `team = "..."` gives it.
    pub name: String,
    /// The cap in USD per period.
    pub credit_limit_usd: f64,
    /// `"none"` (the default), `"daily"` or `"monthly"` (UTC).
    #[serde(default)]
    pub budget_period: BudgetPeriod,
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().expect("a valid default address")
}

/// `[upstream]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `base_url = "https://api.openai.com/v1"`: `/v1/<rest>` goes to `<base_url>/<rest>`.
    pub base_url: String,
    /// `api_key_env = "OPENAI_API_KEY"`: the environment variable holding the provider key.
    /// Absent (or the variable unset): requests go upstream without `authorization`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// `connect_timeout = "10s"`.
    #[serde(default = "default_connect", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// `first_byte_timeout = "10m"`: until the response headers.
    #[serde(default = "default_first_byte", deserialize_with = "duration")]
    pub first_byte_timeout: Duration,
    /// `idle_timeout = "5m"`: longest silence inside a response body.
    #[serde(default = "default_idle", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// `organization = "org-..."`: the `OpenAI-Organization` sent upstream with every
    /// request. Absent: none is sent (the provider key's default organization is billed).
    #[serde(default)]
    pub organization: Option<String>,
    /// `project = "proj_..."`: the `OpenAI-Project` sent upstream with every request.
    #[serde(default)]
    pub project: Option<String>,
    /// `forward_client_organization = false`: whether a client's own `OpenAI-Organization`
    /// and `OpenAI-Project` headers go upstream (a configured one replaces them either way).
    /// Off by default: a client must not pick the organization the provider bills.
    #[serde(default)]
    pub forward_client_organization: bool,
}

fn default_connect() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_first_byte() -> Duration {
    DEFAULT_FIRST_BYTE_TIMEOUT
}
fn default_idle() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `shutdown_grace = "30s"`: how long in-flight requests and streams may run on after
    /// SIGINT/SIGTERM before the proxy exits anyway.
    #[serde(default = "default_grace", deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// `header_read_timeout = "30s"`: how long a client has to send a request's head (the
    /// request line and headers; for HTTP/2, the connection preface) from when the proxy
    /// starts waiting for it, an idle keep-alive connection's next request included (an
    /// HTTP/2 connection: no request or response stream in flight). The connection is closed
    /// when it runs out.
    #[serde(default = "default_header_read", deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// `body_read_timeout = "30s"`: longest wait for the next piece of a request body. A
    /// body that stalls longer is answered with a 408 `request_timeout` and the connection
    /// is closed.
    #[serde(default = "default_body_read", deserialize_with = "duration")]
    pub body_read_timeout: Duration,
    /// `body_total_timeout = "5m"`: how long a client has to send a whole request body,
    /// from the request's start (its head read). A body still coming after that (a client
    /// trickling a byte just often enough never stalls) is answered like a stalled one: a
    /// 408 `request_timeout`, the connection closed.
    #[serde(default = "default_body_total", deserialize_with = "duration")]
    pub body_total_timeout: Duration,
    /// `max_body_bytes_in_flight = 268435456` (256 MiB): request body bytes received and
    /// held, all requests together, from their arrival until their request is answered. A
    /// request whose next bytes would go over it is answered with a 503 `server_overloaded`
    /// (`Retry-After: 1`) and the connection is closed. At least `[body] limit`.
    #[serde(default = "default_max_body_bytes_in_flight")]
    pub max_body_bytes_in_flight: usize,
    /// `max_connections = 1024`: client connections served at once. Further connections
    /// wait (in the listen queue, unaccepted) until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            body_total_timeout: DEFAULT_BODY_TOTAL_TIMEOUT,
            max_body_bytes_in_flight: DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

fn default_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE
}
fn default_header_read() -> Duration {
    DEFAULT_HEADER_READ_TIMEOUT
}
fn default_body_read() -> Duration {
    DEFAULT_BODY_READ_TIMEOUT
}
fn default_body_total() -> Duration {
    DEFAULT_BODY_TOTAL_TIMEOUT
}
fn default_max_body_bytes_in_flight() -> usize {
    DEFAULT_MAX_BODY_BYTES_IN_FLIGHT
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

/// `[audit]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `jsonl = "audit.jsonl"`: append one JSON record per request to this file.
    #[serde(default)]
    pub jsonl: Option<PathBuf>,
    /// `postgres_url = "postgres://..."`: also write every record into the `tlp_audit` table
    /// of this database (batched, see `--migrate`); `/admin/v1/spend` reads it. May hold a
    /// password: it is never logged.
    #[serde(default)]
    pub postgres_url: Option<String>,
    /// `postgres_url_env = "TLP_AUDIT_DATABASE_URL"`: the same URL from an environment
    /// variable.
    #[serde(default)]
    pub postgres_url_env: Option<String>,
    /// `drain_after_cancel = "1s"`: when a client leaves before a response's usage came (for
    /// example right after a stream's last token), the response is read on for at most this
    /// long (and 64 KiB) so that its record has the upstream's usage and cost (flagged
    /// `usage_after_cancel`). `"0s"` turns it off. See
    /// [`DrainOnCancelLayer`](tower_llm_policy::audit::DrainOnCancelLayer).
    #[serde(default = "default_drain", deserialize_with = "duration")]
    pub drain_after_cancel: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            jsonl: None,
            postgres_url: None,
            postgres_url_env: None,
            drain_after_cancel: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

impl fmt::Debug for AuditConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditConfig")
            .field("jsonl", &self.jsonl)
            .field(
                "postgres_url",
                &self.postgres_url.as_deref().map(redact_url),
            )
            .field("postgres_url_env", &self.postgres_url_env)
            .field("drain_after_cancel", &self.drain_after_cancel)
            .finish()
    }
}

impl AuditConfig {
    /// The audit database URL: `postgres_url`, or the variable `postgres_url_env` names.
    pub fn postgres_url(&self, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        self.postgres_url
            .clone()
            .or_else(|| self.postgres_url_env.as_deref().and_then(env))
    }
}

fn default_drain() -> Duration {
    DEFAULT_DRAIN_TIMEOUT
}

/// `[workspace]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceConfig {
    /// `models = ["gpt-4o*", "o3-mini"]`: the workspace entitlement. Absent: no workspace
    /// list (keys' own lists only).
    #[serde(default)]
    pub models: Option<ModelList>,
}

/// `[model_names]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelAliasesConfig {
    /// `aliases = { "gpt4" = "gpt-4" }`.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// `strip_suffixes = ["-latest"]`.
    #[serde(default)]
    pub strip_suffixes: Vec<String>,
}

impl ModelAliasesConfig {
    /// The alias table.
    pub fn to_model_aliases(&self) -> ModelAliases {
        let mut names = ModelAliases::new();
        for (from, to) in &self.aliases {
            names = names.alias(from, to);
        }
        for suffix in &self.strip_suffixes {
            names = names.strip_suffix(suffix);
        }
        names
    }
}

/// `[blocked]`: for the FeatureBlock layer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockedConfig {
    /// `unknown_endpoints = false`: forward requests for endpoints the policy does not know
    /// (default `true`: refuse them with 404 `unknown_url`, never forwarded).
    #[serde(default = "yes")]
    pub unknown_endpoints: bool,
    /// `features = ["fine_tuning", "audio"]`: blocked for every key.
    #[serde(default)]
    pub features: FeatureSet,
    /// `models = ["gpt-4.5*"]`: blocked for every key.
    #[serde(default)]
    pub models: ModelList,
    /// `image_sizes = ["1792x1024"]`: image sizes blocked for every key.
    #[serde(default)]
    pub image_sizes: Vec<String>,
    /// `image_qualities = ["hd"]`: image qualities blocked for every key.
    #[serde(default)]
    pub image_qualities: Vec<String>,
}

impl Default for BlockedConfig {
    fn default() -> Self {
        BlockedConfig {
            unknown_endpoints: true,
            features: FeatureSet::default(),
            models: ModelList::default(),
            image_sizes: Vec::new(),
            image_qualities: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}

/// `[prompt_limits]`: for the PromptLimit layer. Same names as the key fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptLimitsConfig {
    /// Characters of prompt text.
    #[serde(default)]
    pub max_prompt_chars: Option<u64>,
    /// Prompt tokens.
    #[serde(default)]
    pub max_prompt_tokens: Option<u64>,
    /// Requested output tokens (`max_tokens`, `max_completion_tokens`, `max_output_tokens`).
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// `n` / `best_of`.
    #[serde(default)]
    pub max_n: Option<u64>,
    /// Chat messages.
    #[serde(default)]
    pub max_messages: Option<u64>,
    /// Whether every request must carry `user` or `safety_identifier`.
    #[serde(default)]
    pub require_user: bool,
    /// `clamp_output = true`: lower a requested output limit above `max_output_tokens` to it
    /// (rewriting the body) instead of refusing the request.
    #[serde(default)]
    pub clamp_output: bool,
    /// `require_output_limit = true`: refuse chat, completions and responses requests that set
    /// no output-token limit.
    #[serde(default)]
    pub require_output_limit: bool,
}

/// `[body]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyConfig {
    /// `limit = 16777216`: largest JSON body, in bytes (413 above).
    #[serde(default = "default_body_limit")]
    pub limit: usize,
    /// `multipart_limit = 33554432`: largest multipart (upload) body, in bytes.
    #[serde(default = "default_multipart_limit")]
    pub multipart_limit: usize,
}

impl Default for BodyConfig {
    fn default() -> Self {
        BodyConfig {
            limit: DEFAULT_BODY_LIMIT,
            multipart_limit: DEFAULT_MULTIPART_LIMIT,
        }
    }
}

impl BodyConfig {
    /// The options every body-reading layer gets.
    pub fn options(&self) -> BodyOptions {
        BodyOptions {
            limit: self.limit,
            multipart_limit: self.multipart_limit,
        }
    }
}

fn default_body_limit() -> usize {
    DEFAULT_BODY_LIMIT
}
fn default_multipart_limit() -> usize {
    DEFAULT_MULTIPART_LIMIT
}

/// `[proxy]`: the reverse proxies (load balancers, ingress) in front of this proxy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// `trusted_proxies = ["10.0.0.0/8", "fd00::/8"]`: connections from these ranges may say
    /// who the client is, in `X-Forwarded-For` or `Forwarded`; the client is then the
    /// right-most address in the header that is not itself in these ranges (see
    /// [`TrustedProxies`] for the whole rule). It is what
    /// the keys' `allow_ips` are checked against and what the audit record's `client_ip`
    /// says. Empty (the default): the headers are ignored, the connection's address is the
    /// client.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// `forwarded_header = "x-forwarded-for"` (or `"forwarded"`): the header the trusted
    /// proxies write; the other is ignored, so that a client sending both cannot make itself
    /// look like its proxy. `"either"` (the default): whichever one a request carries, and
    /// neither when it carries both.
    #[serde(default)]
    pub forwarded_header: ForwardedHeaderConfig,
}

/// `[proxy] forwarded_header`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeaderConfig {
    /// `"either"`.
    #[default]
    Either,
    /// `"x-forwarded-for"`.
    XForwardedFor,
    /// `"forwarded"`.
    Forwarded,
}

impl ProxyConfig {
    /// The trusted proxies, for the server.
    pub fn trusted_proxies(&self) -> TrustedProxies {
        TrustedProxies::new(self.trusted_proxies.iter().copied()).header(
            match self.forwarded_header {
                ForwardedHeaderConfig::Either => ForwardedHeader::Either,
                ForwardedHeaderConfig::XForwardedFor => ForwardedHeader::XForwardedFor,
                ForwardedHeaderConfig::Forwarded => ForwardedHeader::Forwarded,
            },
        )
    }
}

/// `"30s"`, `"1m 30s"`, `"500ms"` (humantime), or a number of seconds.
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Seconds(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration `{t}` ({e}); write e.g. \"30s\" or \"5m\""
            ))
        }),
    }
}

/// Why the configuration could not be loaded. Messages never contain a secret.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Io(PathBuf, std::io::Error),
    /// Invalid TOML, an unknown field, a bad value: the parser's message names the line.
    Parse(PathBuf, String),
    /// Valid TOML that makes no sense (no credential for a key, two keys with one name, ...).
    Invalid(PathBuf, String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Io(path, e) => write!(f, "cannot read {}: {e}", path.display()),
            ConfigError::Parse(path, message) | ConfigError::Invalid(path, message) => {
                write!(f, "invalid config {}: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and parses the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Io(path.to_owned(), e))?;
        Config::parse(path, &text)
    }

    /// Parses configuration text (`path` is for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        // The parser's own message quotes the offending line, which may hold a secret.
        let config: Config = toml::from_str(text).map_err(|e| {
            ConfigError::Parse(
                path.to_owned(),
                tower_llm_policy::keys::toml_message(text, &e),
            )
        })?;
        if let Some(env) = &config.upstream.api_key_env {
            if env.trim().is_empty() || env.contains('=') || env.contains('\0') {
                return Err(ConfigError::Invalid(
                    path.to_owned(),
                    "`upstream.api_key_env` must be the name of an environment variable".into(),
                ));
            }
        }
        let server = &config.server;
        if server.header_read_timeout.is_zero()
            || server.body_read_timeout.is_zero()
            || server.body_total_timeout.is_zero()
        {
            return Err(ConfigError::Invalid(
                path.to_owned(),
                "`server.header_read_timeout`, `server.body_read_timeout` and \
                 `server.body_total_timeout` must be above zero"
                    .into(),
            ));
        }
        if server.max_connections == 0 {
            return Err(ConfigError::Invalid(
                path.to_owned(),
                "`server.max_connections` must be above zero".into(),
            ));
        }
        if config.body.limit == 0 || config.body.multipart_limit == 0 {
            return Err(ConfigError::Invalid(
                path.to_owned(),
                "`body.limit` and `body.multipart_limit` must be above zero".into(),
            ));
        }
        if server.max_body_bytes_in_flight < config.body.limit {
            // Zero included: a lone request of the largest size allowed must fit.
            return Err(ConfigError::Invalid(
                path.to_owned(),
                format!(
                    "`server.max_body_bytes_in_flight` ({}) must be at least `body.limit` ({}): \
                     a request body of the largest size allowed must fit in it",
                    server.max_body_bytes_in_flight, config.body.limit
                ),
            ));
        }
        let invalid = |message: String| ConfigError::Invalid(path.to_owned(), message);
        if let Some(url) = &config.state.redis_url {
            let scheme = url.split("://").next().unwrap_or_default();
            if !url.contains("://")
                || !["redis", "rediss", "redis+unix", "unix", "valkey", "valkeys"].contains(&scheme)
            {
                return Err(invalid(format!(
                    "`state.redis_url` ({}) must be a redis:// (or rediss://) URL",
                    redact_url(url)
                )));
            }
        }
        if config.state.redis_timeout.is_zero() || config.state.reservation_ttl.is_zero() {
            return Err(invalid(
                "`state.redis_timeout` and `state.reservation_ttl` must be above zero".into(),
            ));
        }
        let mut teams = std::collections::HashSet::new();
        for team in &config.teams {
            if team.name.trim().is_empty() || !teams.insert(team.name.as_str()) {
                return Err(invalid(format!(
                    "`[[teams]]` need a name each, once: `{}`",
                    team.name
                )));
            }
            if !(team.credit_limit_usd.is_finite() && team.credit_limit_usd >= 0.0) {
                return Err(invalid(format!(
                    "team `{}`: `credit_limit_usd` must be a number of dollars, zero or more",
                    team.name
                )));
            }
        }
        let store = &config.store;
        if store.postgres_url.is_some() && store.postgres_url_env.is_some() {
            return Err(invalid(
                "`store.postgres_url` and `store.postgres_url_env`: one of them".into(),
            ));
        }
        if (store.postgres_url.is_some() || store.postgres_url_env.is_some())
            && !config.keys.is_empty()
        {
            return Err(invalid(
                "with `[store]` in PostgreSQL, the keys are in the database: remove `[[keys]]` \
                 (create keys with the admin API)"
                    .into(),
            ));
        }
        let audit = &config.audit;
        if audit.postgres_url.is_some() && audit.postgres_url_env.is_some() {
            return Err(invalid(
                "`audit.postgres_url` and `audit.postgres_url_env`: one of them".into(),
            ));
        }
        for url in [&store.postgres_url, &audit.postgres_url]
            .into_iter()
            .flatten()
        {
            if !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.contains('='))
            {
                return Err(invalid(format!(
                    "a PostgreSQL URL ({}) must be a postgres:// URL",
                    redact_url(url)
                )));
            }
        }
        if store.max_connections == 0 || store.cache_max_entries == 0 {
            return Err(invalid(
                "`store.max_connections` and `store.cache_max_entries` must be above zero".into(),
            ));
        }
        if let Some(env) = &config.admin.token_env {
            if env.trim().is_empty() || env.contains('=') || env.contains('\0') {
                return Err(invalid(
                    "`admin.token_env` must be the name of an environment variable".into(),
                ));
            }
        }
        if let Some(key) = config.keys.iter().find(|k| k.name.starts_with("team:")) {
            // A team's spend is counted under `team:<name>`: such a key would share it.
            return Err(invalid(format!(
                "key `{}`: a key's name may not start with `team:`",
                key.name
            )));
        }
        crate::guards::check_config(&config.guards, &config.end_users).map_err(&invalid)?;
        crate::alerts::check_config(&config.alerts).map_err(&invalid)?;
        // A key bound to a guard that does not exist would have its requests refused: the
        // file is refused instead, naming both (the file store's reloads are checked by
        // `guards::KnownGuards`).
        for key in &config.keys {
            if let Some(name) = crate::guards::unknown_guard(&config.guards, &key.guards) {
                return Err(invalid(format!(
                    "key `{}`: `guards` names `{name}`, which is not a `[[guards]]` name",
                    key.name
                )));
            }
        }
        Ok(config)
    }

    /// The configuration of the embedded default: everything at its default, the upstream
    /// at `base_url` without a provider key, and no keys (the caller adds the demo key).
    pub fn embedded(listen: SocketAddr, base_url: String) -> Config {
        Config {
            listen,
            upstream: UpstreamConfig {
                base_url,
                api_key_env: None,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
                organization: None,
                project: None,
                forward_client_organization: false,
            },
            server: ServerConfig::default(),
            audit: AuditConfig::default(),
            workspace: WorkspaceConfig::default(),
            model_names: ModelAliasesConfig::default(),
            blocked: BlockedConfig::default(),
            prompt_limits: PromptLimitsConfig::default(),
            pricing: PricingTable::empty(),
            body: BodyConfig::default(),
            proxy: ProxyConfig::default(),
            state: StateConfig::default(),
            store: StoreConfig::default(),
            admin: AdminConfig::default(),
            metrics: MetricsConfig::default(),
            teams: Vec::new(),
            guards: Vec::new(),
            end_users: EndUsersConfig::default(),
            alerts: AlertsConfig::default(),
            keys: Vec::new(),
        }
    }
}

/// `[metrics]`: the Prometheus page (see [`crate::metrics`]). Off by default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `enabled = true`: serve the metrics.
    #[serde(default)]
    pub enabled: bool,
    /// `path = "/metrics"`: where (not under `/v1`, not `/healthz`).
    #[serde(default = "default_metrics_path")]
    pub path: String,
    /// `listen = "127.0.0.1:9090"`: a listener of the page's own. Absent: the API's
    /// listener, which then needs `token_env`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// `token_env = "METRICS_TOKEN"`: the environment variable holding the bearer token a
    /// scrape must send. Required on the API's listener; a variable that is not set is an
    /// error at start-up.
    #[serde(default)]
    pub token_env: Option<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            path: default_metrics_path(),
            listen: None,
            token_env: None,
        }
    }
}

fn default_metrics_path() -> String {
    "/metrics".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_error_names_the_line_but_not_a_secret_on_it() {
        let text = "[upstream]\nbase_url = \"http://127.0.0.1:1\"\n\n[[keys]]\nname = \"a\"\nsecret = \"sk-leaky-secret-123456\" oops\n";
        let error = Config::parse(Path::new("proxy.toml"), text).unwrap_err();
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains("sk-leaky-secret"), "{shown}");
        assert!(shown.contains("line 6"), "{shown}");
        // A secret in a field of the wrong type is not quoted back either.
        let text = "[upstream]\nbase_url = \"http://127.0.0.1:1\"\n\n[[keys]]\nname = \"a\"\nsecret = \"sk-x\"\nmodel_limits = \"sk-leaky-secret-123456\"\n";
        let error = Config::parse(Path::new("proxy.toml"), text).unwrap_err();
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains("sk-leaky-secret"), "{shown}");
    }
}
