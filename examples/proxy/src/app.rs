//! The proxy put together: command line, configuration or embedded default, key store,
//! upstream client, stack and listener.

use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use tokio::net::TcpListener;
use tower_llm_policy::audit::{DrainOnCancelLayer, FanOut, JsonlSink};
use tower_llm_policy::keys::{
    CachedKeyStore, FileKeyStore, KeyAdmin, KeyDigest, KeyStore, MemoryKeyStore,
};
use tower_llm_policy::postgres::{KeyChange, Listener, PostgresKeyStore, PostgresSink};
use tower_llm_policy::quota::RedisStore;
use tower_llm_policy::{ApiKey, FeatureSet};

use crate::admin::{self, Admin};
use crate::alerts::WebhookAlerts;
use crate::audit_line::{self, LineWriter};
use crate::config::{Config, ConfigError};
use crate::console::{self, AuditSource, Console, Models};
use crate::guards::{self, KnownGuards};
use crate::mock;
use crate::server::{self, ServerOptions};
use crate::stack::{build_stack, Policy, ProxyService};
use crate::upstream::Upstream;

/// An OpenAI-compatible proxy with tower-llm-policy's policy layers in front of the upstream.
///
/// Clients use `http://<listen>/v1` as their OpenAI base URL and a virtual key from the
/// configuration; the proxy sends `/v1/<rest>` to `<upstream.base_url>/<rest>` with the
/// provider key instead. Without `--config` it runs on an embedded default: a built-in mock
/// upstream and a demo key, printed with a ready-to-paste curl command, and every request's
/// audit record printed as one line on stdout.
#[derive(Debug, Parser)]
#[command(name = "proxy", version, about, long_about = None)]
pub struct Args {
    /// The configuration file (TOML). Without it: the embedded default.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Listen on this address instead of the configuration's `listen`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Forward without any policy layer (for performance comparisons). Every request goes
    /// upstream with the provider key, whatever key the client sent.
    #[arg(long)]
    pub no_policy: bool,
    /// Apply the PostgreSQL schema's migrations (`[store] postgres_url`, `[audit]
    /// postgres_url`) before serving. Safe to repeat, and from several replicas at once.
    #[arg(long)]
    pub migrate: bool,
}

/// Why the proxy could not start.
#[derive(Debug)]
pub enum StartError {
    /// The configuration is invalid.
    Config(ConfigError),
    /// The upstream settings are unusable.
    Upstream(String),
    /// Listening (or starting the built-in mock) failed.
    Io(String, std::io::Error),
    /// `[state]` is unusable.
    State(String),
    /// `[store]` or `[admin]` is unusable (the database, the admin token).
    Store(String),
    /// `[metrics]` is unusable.
    Metrics(String),
    /// `[[guards]]`, `[end_users]` or `[alerts]` is unusable (a variable not set, ...): the
    /// message names the guard and the field.
    Guards(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::Upstream(e) => write!(f, "invalid [upstream]: {e}"),
            StartError::Io(what, e) => write!(f, "{what}: {e}"),
            StartError::State(e) => write!(f, "invalid [state]: {e}"),
            StartError::Store(e) => write!(f, "{e}"),
            StartError::Metrics(e) => write!(f, "invalid [metrics]: {e}"),
            StartError::Guards(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        StartError::Config(e)
    }
}

/// A proxy ready to serve: bound, configured, not yet accepting.
pub struct Proxy {
    /// The address it listens on (the real port when `:0` was asked for).
    pub addr: SocketAddr,
    /// What to tell the user at start-up (printed on stdout by `main`).
    pub banner: String,
    /// The embedded default's demo key (`None` with a configuration file).
    pub demo_key: Option<String>,
    /// The embedded default's mock upstream (`None` with a configuration file).
    pub mock: Option<(SocketAddr, mock::MockLog)>,
    service: ProxyService,
    listener: TcpListener,
    server: ServerOptions,
    audit_sink: Option<JsonlSink>,
    /// `[audit] postgres_url`'s sink, flushed at shutdown.
    audit_db: Option<PostgresSink>,
    /// The responses read on after their clients left (see `[audit] drain_after_cancel`).
    drains: Option<DrainOnCancelLayer>,
    redis: Option<RedisStore>,
    /// The key change listener of `[store] postgres_url` (stops when dropped).
    _listener: Option<Listener>,
    /// `[metrics]`, when on.
    metrics: Option<crate::metrics::Metrics>,
    /// `[alerts]`, when on.
    alerts: Option<Arc<WebhookAlerts>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Loads the configuration (or sets up the embedded default), builds the stack and binds
    /// the listener. `env` looks environment variables up (the provider key): `main` passes
    /// `std::env::var`, tests a closure. The embedded default prints its audit lines on
    /// stdout.
    pub async fn prepare(
        args: &Args,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Proxy, StartError> {
        Proxy::prepare_with(args, env, audit_line::stdout()).await
    }

    /// [`Proxy::prepare`], with the embedded default's audit lines (see [`audit_line`]) handed
    /// to `audit_lines` instead of stdout.
    pub async fn prepare_with(
        args: &Args,
        env: impl Fn(&str) -> Option<String>,
        audit_lines: LineWriter,
    ) -> Result<Proxy, StartError> {
        let mut key_listener = None;
        let (config, store, admin_keys, demo_key, mock) = match &args.config {
            Some(path) => {
                let config = Config::load(path)?;
                let (store, admin_keys): (Arc<dyn KeyStore>, Arc<dyn KeyAdmin>) =
                    match config.store.url(&env) {
                        Some(url) => {
                            let (store, admin, heard) =
                                postgres_keys(&url, &config.store, args.migrate).await?;
                            key_listener = Some(heard);
                            (store, admin)
                        }
                        None => {
                            // The keys come from the same file through a store that reloads
                            // them on edit; opening it checks their credentials, that names
                            // and secrets are unique, and that every guard a key lists is in
                            // `[[guards]]` (a reload or an admin change that breaks one of
                            // those is refused, the keys in force stay).
                            let known = config.guards.clone();
                            let store = FileKeyStore::open_keys_of(path)
                                .and_then(|s| {
                                    s.validate_keys(move |key| {
                                        match guards::unknown_guard(&known, &key.guards) {
                                            Some(g) => Err(format!(
                                                "no guard is named `{g}` in `[[guards]]`"
                                            )),
                                            None => Ok(()),
                                        }
                                    })
                                })
                                .map_err(|e| ConfigError::Invalid(path.clone(), e.to_string()))?;
                            let store = Arc::new(store);
                            (store.clone(), store)
                        }
                    };
                tracing::info!(
                    config = %path.display(),
                    keys = config.keys.len(),
                    "configuration loaded"
                );
                (config, store, admin_keys, None, None)
            }
            None => {
                let (mock_addr, log) = mock::spawn(mock::MockOptions::default().record(false))
                    .await
                    .map_err(|e| StartError::Io("cannot start the built-in mock".into(), e))?;
                let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
                let config = Config::embedded(listen, format!("http://{mock_addr}/v1"));
                let secret = demo_secret();
                let memory = Arc::new(MemoryKeyStore::new().with_key(&secret, demo_key_policy()));
                let store: Arc<dyn KeyStore> = memory.clone();
                (
                    config,
                    store,
                    memory as Arc<dyn KeyAdmin>,
                    Some(secret),
                    Some((mock_addr, log)),
                )
            }
        };

        let provider_key = match &config.upstream.api_key_env {
            Some(name) => {
                let key = env(name).filter(|k| !k.trim().is_empty());
                if key.is_none() {
                    tracing::warn!(
                        variable = %name,
                        "the provider key's environment variable is not set: requests go \
                         upstream without authorization"
                    );
                }
                key
            }
            None => None,
        };
        let upstream = Upstream::builder(config.upstream.base_url.clone())
            .provider_key(provider_key.clone())
            .connect_timeout(config.upstream.connect_timeout)
            .first_byte_timeout(config.upstream.first_byte_timeout)
            .idle_timeout(config.upstream.idle_timeout)
            .organization(config.upstream.organization.clone())
            .project(config.upstream.project.clone())
            .forward_client_organization(config.upstream.forward_client_organization)
            // With the policy on, the model list is filtered: it must be a list it can read.
            .guard_model_list(
                (!args.no_policy)
                    .then_some(tower_llm_policy::model_allow_list::DEFAULT_MODELS_RESPONSE_LIMIT),
            )
            .build()
            .map_err(|e| StartError::Upstream(e.to_string()))?;

        let listen = args.listen.unwrap_or(config.listen);
        if config.server.max_body_bytes_in_flight < config.body.multipart_limit {
            // Allowed (uploads stream on upstream), but an upload that large alone fills it.
            tracing::warn!(
                max_body_bytes_in_flight = config.server.max_body_bytes_in_flight,
                multipart_limit = config.body.multipart_limit,
                "`server.max_body_bytes_in_flight` is below `body.multipart_limit`: an upload \
                 larger than the budget is refused with a 503"
            );
        }
        let server_options = ServerOptions {
            grace: config.server.shutdown_grace,
            header_read_timeout: config.server.header_read_timeout,
            body_read_timeout: config.server.body_read_timeout,
            body_total_timeout: config.server.body_total_timeout,
            max_body_bytes_in_flight: config.server.max_body_bytes_in_flight,
            max_connections: config.server.max_connections,
            trusted_proxies: config.proxy.trusted_proxies(),
        };
        let upstream_url = upstream.base_url().to_owned();
        let keys_from = match &args.config {
            Some(path) => path.display().to_string(),
            None => "the embedded default".to_owned(),
        };
        let audit_sink = match (&config.audit.jsonl, args.no_policy) {
            (Some(path), false) => Some(JsonlSink::open(path).map_err(|e| {
                StartError::Io(format!("cannot open the audit log {}", path.display()), e)
            })?),
            _ => None,
        };
        let mut audit = FanOut::new();
        if let Some(sink) = &audit_sink {
            audit = audit.with(sink.clone());
        }
        // `[audit] postgres_url`: the records in PostgreSQL too, and spend per day from them.
        let audit_db = match (config.audit.postgres_url(&env), args.no_policy) {
            (Some(url), false) => Some(audit_database(&url, args.migrate).await?),
            _ => None,
        };
        if let Some((sink, _)) = &audit_db {
            audit = audit.with(sink.clone());
        }
        if mock.is_some() && !args.no_policy {
            // The embedded default: a newcomer sees the audit records, one line each.
            audit = audit.with(audit_line::sink(audit_lines));
        }
        let admin_token_env = config.admin.token_env.clone();
        // `/console`: what it reads besides the keys, taken before the policy takes `config`.
        let console_config = (config.admin.console && !args.no_policy).then(|| {
            (
                config.admin.console_secure_cookie,
                config.audit.jsonl.clone(),
                config.workspace.models.clone(),
                config.model_names.to_model_aliases(),
                upstream.clone(),
            )
        });
        let admin_check_store = store.clone();
        let metrics = crate::metrics::Metrics::prepare(
            &config.metrics,
            &config.pricing,
            audit_sink.as_ref(),
            audit_db.as_ref().map(|(sink, _)| sink),
            &env,
        )
        .await
        .map_err(StartError::Metrics)?;
        if let Some(metrics) = &metrics {
            audit = audit.with(metrics.sink());
        }
        // `[[guards]]`, `[end_users]`, `[alerts]`: secrets from the environment, the guards'
        // and alerts' own HTTP client.
        let guard_names: Vec<String> = config.guards.iter().map(|g| g.name.clone()).collect();
        let mut alerts = None;
        let guarded = if args.no_policy {
            None
        } else {
            let client = guards::http_client().map_err(StartError::Guards)?;
            let layer = guards::build(
                &config.guards,
                &config.end_users,
                &env,
                &guards::External {
                    upstream_base_url: upstream.base_url(),
                    provider_key: provider_key.as_deref(),
                    client: client.clone(),
                },
            )
            .map_err(StartError::Guards)?;
            alerts = WebhookAlerts::from_config(&config.alerts, &env, client)
                .map_err(StartError::Guards)?
                .map(Arc::new);
            Some((layer, config.alerts.thresholds.clone()))
        };
        // Keys reloaded from the file (or read from a database) are checked against the
        // guards: one bound to an unknown guard is reported (and refused by the guard layer).
        let store: Arc<dyn KeyStore> = Arc::new(KnownGuards::new(store, guard_names.clone()));
        let policy = match guarded {
            None => None,
            Some((layer, thresholds)) => Some(
                Policy::new(config, store, audit)
                    .map_err(|e| StartError::State(e.to_string()))?
                    .with_guards(
                        layer,
                        alerts.clone().map(|a| {
                            (a as Arc<dyn tower_llm_policy::alert::AlertSink>, thresholds)
                        }),
                    ),
            ),
        };
        let mut service = build_stack(policy.as_ref(), upstream);
        if let Some(token_env) = &admin_token_env {
            let token = env(token_env).unwrap_or_default();
            let token = token.trim();
            if token.len() < admin::MIN_TOKEN_LEN {
                return Err(StartError::Store(format!(
                    "[admin] token_env: the variable {token_env} must hold a token of at least {} characters",
                    admin::MIN_TOKEN_LEN
                )));
            }
            // The admin token is never a virtual key.
            if let Ok(Some(_)) = admin_check_store.lookup(&KeyDigest::of(token)).await {
                return Err(StartError::Store(
                    "[admin] token_env: the admin token is also a virtual key; use another".into(),
                ));
            }
            let spend = audit_db
                .as_ref()
                .map(|(_, pool)| spend_source(pool.clone()));
            let admin = Arc::new(Admin::new(admin_keys, token, spend).guards(guard_names));
            service = admin::route(service, admin.clone());
            if let Some((secure, jsonl, workspace, aliases, upstream)) = console_config {
                // The audit database when there is one (indexed), else the JSON Lines file.
                let audit = match (&audit_db, jsonl) {
                    (Some((_, pool)), _) => AuditSource::Postgres(pool.clone()),
                    (None, Some(path)) => AuditSource::Jsonl(path),
                    (None, None) => AuditSource::None,
                };
                let models = Models::new(Some(upstream), workspace, aliases);
                let console = Console::new(admin, models, audit).secure_cookie(secure);
                service = console::route(service, Arc::new(console));
            }
        }
        let redis = policy.as_ref().and_then(|policy| policy.redis.clone());
        let drains = policy.map(|policy| policy.drain);

        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| StartError::Io(format!("cannot listen on {listen}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Io("cannot read the listening address".into(), e))?;

        let base = format!("http://{}/v1", display_addr(addr));
        let mut banner = format!(
            "tower-llm-policy proxy listening on {base}\n  upstream: {upstream_url}{}\n  policy:   {}\n",
            if mock.is_some() { " (built-in mock)" } else { "" },
            if args.no_policy {
                "off (--no-policy): every request is forwarded".to_owned()
            } else {
                format!("on, keys from {keys_from}")
            },
        );
        if let Some(secret) = &demo_key {
            banner.push_str(&format!(
                "  demo key: {secret} (models gpt-4o-mini and gpt-4o; no images or audio; \
                 prompts up to 1000 tokens)\n{}\nTry it:\n{}\n",
                if args.no_policy {
                    ""
                } else {
                    "  audit:    one line per request below (key, model, status, blocked_by, \
                     tokens, cost)\n"
                },
                curl_command(&base, secret)
            ));
        }
        Ok(Proxy {
            addr,
            banner,
            demo_key,
            mock,
            service,
            listener,
            server: server_options,
            audit_sink,
            audit_db: audit_db.map(|(sink, _)| sink),
            drains,
            redis,
            _listener: key_listener,
            metrics,
            alerts,
        })
    }

    /// The `[alerts]` webhook sink, when configured (its counters: sent, failed, dropped).
    pub fn alerts(&self) -> Option<Arc<WebhookAlerts>> {
        self.alerts.clone()
    }

    /// Where the `[metrics]` page listens when it has a listener of its own.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .and_then(crate::metrics::Metrics::addr)
    }

    /// Serves until `shutdown` completes, then shuts down gracefully (see [`server::run`])
    /// and flushes the audit log: every request answered has its record on disk when this
    /// returns.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> std::io::Result<()> {
        let (page, page_listener) = self.metrics.map_or((None, None), |m| m.start());
        let served =
            server::run_with(self.service, self.listener, self.server, page, shutdown).await;
        if let Some(task) = page_listener {
            task.abort();
        }
        if let Some(drains) = &self.drains {
            // Responses still read on for their usage (clients that left): their records
            // come when they end, within the drain timeout.
            let deadline = tokio::time::Instant::now() + drains.timeout();
            while drains.in_flight() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
        if let Some(redis) = &self.redis {
            // Settlements still queued for Redis, once every response has ended.
            if tokio::time::timeout(std::time::Duration::from_secs(5), redis.flush())
                .await
                .is_err()
            {
                tracing::warn!(
                    "Redis did not take the last settlements within 5 s: their reservations \
                     are counted at their amount when they expire"
                );
            }
        }
        if let Some(sink) = &self.audit_db {
            // Records are emitted when response bodies end, so after the connections closed.
            match tokio::time::timeout(std::time::Duration::from_secs(10), sink.flush()).await {
                Ok(()) => tracing::info!(
                    written = sink.written(),
                    dropped = sink.dropped(),
                    failed = sink.failed(),
                    "audit database flushed"
                ),
                Err(_) => tracing::warn!(
                    queued = sink.queue_depth(),
                    "the audit database did not take the last records within 10 s"
                ),
            }
        }
        if let Some(sink) = self.audit_sink {
            // Records are emitted when response bodies end, so after the connections closed.
            // Flushing waits for the sink's writer thread: keep it off the runtime's threads.
            let flushed = tokio::task::spawn_blocking(move || {
                let result = sink.flush();
                (result, sink.dropped())
            })
            .await;
            match flushed {
                Ok((Ok(()), 0)) => tracing::info!("audit log flushed"),
                Ok((Ok(()), dropped)) => {
                    tracing::warn!(dropped, "audit log flushed; records were dropped")
                }
                Ok((Err(err), _)) => tracing::error!(error = %err, "audit log flush failed"),
                Err(err) => tracing::error!(error = %err, "audit log flush panicked"),
            }
        }
        served
    }
}

/// The demo key's policy: the README's `chat-app` key.
fn demo_key_policy() -> ApiKey {
    let mut blocked = FeatureSet::empty();
    for group in ["images", "audio"] {
        blocked.insert_name(group).expect("known feature groups");
    }
    ApiKey::new("demo")
        .model_limits(["gpt-4o-mini", "gpt-4o"])
        .blocked_features(blocked)
        .max_prompt_tokens(1000)
}

/// A fresh demo key: `sk-demo-` and 32 hex digits from the standard library's per-process
/// random hash keys (no extra dependency; a demo key guards a mock, not money).
fn demo_secret() -> String {
    let mut out = String::from("sk-demo-");
    for i in 0u64..2 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(i);
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        out.push_str(&format!("{:016x}", hasher.finish()));
    }
    out
}

/// The address as a client should write it: a wildcard listen address becomes loopback.
fn display_addr(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// The ready-to-paste curl command of the banner.
pub fn curl_command(base: &str, key: &str) -> String {
    format!(
        "curl -sS {base}/chat/completions \\\n  -H 'Authorization: Bearer {key}' \\\n  \
         -H 'Content-Type: application/json' \\\n  \
         -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'"
    )
}

/// The keys of `[store] postgres_url`: the pool, the migrations when asked for (`--migrate`),
/// the store behind a cache, and the listener that drops changed keys from the cache at once.
async fn postgres_keys(
    url: &str,
    config: &crate::config::StoreConfig,
    migrate: bool,
) -> Result<(Arc<dyn KeyStore>, Arc<dyn KeyAdmin>, Listener), StartError> {
    let pool = tower_llm_policy::postgres::pool(
        url,
        config.max_connections,
        tower_llm_policy::postgres::DEFAULT_TIMEOUT,
    )
    .map_err(|e| StartError::Store(format!("[store] postgres_url: {e}")))?;
    if migrate {
        let applied = tower_llm_policy::postgres::migrate(&pool)
            .await
            .map_err(|e| StartError::Store(format!("--migrate: {e}")))?;
        tracing::info!(?applied, "database migrated");
    }
    let store = PostgresKeyStore::new(pool);
    let cache = Arc::new(
        CachedKeyStore::new(store.clone())
            .max_entries(config.cache_max_entries)
            .ttl(config.cache_ttl)
            .negative_ttl(config.negative_cache_ttl),
    );
    let invalidator = cache.invalidator();
    let listener = store
        .listen(url, move |change| match change {
            KeyChange::Key(digest) => invalidator.invalidate(&digest),
            KeyChange::All => invalidator.invalidate_all(),
        })
        .map_err(|e| StartError::Store(format!("[store] postgres_url: {e}")))?;
    // Changes made through this replica's admin API drop the key from its cache at once
    // (the NOTIFY reaches the other replicas).
    Ok((cache.clone(), cache, listener))
}

/// The audit database of `[audit] postgres_url`: its pool (migrated when asked for) and the
/// sink writing into it.
async fn audit_database(
    url: &str,
    migrate: bool,
) -> Result<(PostgresSink, deadpool_postgres::Pool), StartError> {
    let pool =
        tower_llm_policy::postgres::pool(url, 4, tower_llm_policy::postgres::DEFAULT_TIMEOUT)
            .map_err(|e| StartError::Store(format!("[audit] postgres_url: {e}")))?;
    if migrate {
        let applied = tower_llm_policy::postgres::migrate(&pool)
            .await
            .map_err(|e| StartError::Store(format!("--migrate: {e}")))?;
        tracing::info!(?applied, "audit database migrated");
    }
    Ok((PostgresSink::new(pool.clone()), pool))
}

/// `/admin/v1/spend`'s source: the spend per key per day in the audit database.
fn spend_source(pool: deadpool_postgres::Pool) -> admin::SpendSource {
    Arc::new(move |from, to, key| {
        let pool = pool.clone();
        Box::pin(async move {
            let days = tower_llm_policy::postgres::spend_per_day(&pool, from, to, key.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            serde_json::to_value(days).map_err(|e| e.to_string())
        })
    })
}
