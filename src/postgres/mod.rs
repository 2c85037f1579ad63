//! PostgreSQL: keys ([`PostgresKeyStore`], with the admin API and change notifications) and
//! audit records ([`PostgresSink`], and the spend query [`spend_per_day`]), for deployments
//! that outgrow one machine (cargo feature `postgres`).
//!
//! The driver is [`tokio-postgres`](https://docs.rs/tokio-postgres) with the
//! [`deadpool-postgres`](https://docs.rs/deadpool-postgres) pool: asynchronous, no macros and
//! no database needed at build time (unlike sqlx's checked queries), and direct access to
//! `LISTEN`/`NOTIFY` (a connection's notification stream), which the key listener needs.
//!
//! # Schema
//!
//! The crate ships its schema as numbered SQL migrations ([`MIGRATIONS`]), applied by
//! [`migrate`] (the example proxy: `--migrate`), never implicitly. Each runs once, in a
//! transaction, recorded in `tlp_migrations`; replicas migrating at once wait for each other
//! (an advisory lock). The tables:
//!
//! - `tlp_keys`: one row per key: `name` (its id), `digest` (the SHA-256 of the key, never the
//!   key), `policy` (every policy field, as the configuration files name them, in JSON),
//!   `created_at`, `updated_at`, `last_used_at`. A trigger announces every change on the
//!   channel `tlp_keys` (the key's digest in hexadecimal).
//! - `tlp_audit`: one row per request, written by [`PostgresSink`]: the fields queries filter
//!   and sum on (`ts`, `request_id`, `key`, `model`, `endpoint`, `status`, `outcome`,
//!   `blocked_by`, `code`, tokens, `cost_usd`) and the whole record in `record` (JSON);
//!   indexed by `(key, ts)` and `ts` (per key and per day), and unique on
//!   `(request_id, ts)` (a retried batch is not written twice; a request's record by its
//!   `x-request-id`).
//!
//! Spend per key per day, UTC ([`spend_per_day`], which an admin endpoint can serve as it
//! is): every request counts, a request without a cost counts 0.
//!
//! ```sql
//! SELECT key, to_char((ts AT TIME ZONE 'UTC')::date, 'YYYY-MM-DD') AS day,
//!        coalesce(sum(cost_usd), 0)::double precision AS cost_usd, count(*) AS requests,
//!        coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
//!        coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens
//! FROM tlp_audit
//! WHERE ts >= $1 AND ts < $2 AND ($3::text IS NULL OR key = $3)
//! GROUP BY 1, 2
//! ORDER BY 2, 1;
//! ```
//!
//! Connections are plain TCP (or a Unix socket): put PostgreSQL on a private network, or in
//! front of it a TLS-terminating proxy (TLS to the database is not built in yet).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::NoTls;

use crate::keys::StoreError;

mod keys;
mod sink;
pub use keys::{KeyChange, Listener, PostgresKeyStore, DEFAULT_LAST_USED_EVERY};
pub use sink::{
    spend_per_day, DaySpend, PostgresSink, PostgresSinkBuilder, DEFAULT_BATCH_SIZE,
    DEFAULT_FLUSH_INTERVAL, DEFAULT_QUEUE, DEFAULT_QUEUE_BYTES, DEFAULT_WRITE_TIMEOUT,
};

/// The schema's migrations, in order: `(version, name, SQL)`.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "keys", include_str!("migrations/0001_keys.sql")),
    (2, "audit", include_str!("migrations/0002_audit.sql")),
    (
        3,
        "audit_request_id",
        include_str!("migrations/0003_audit_request_id.sql"),
    ),
];

/// How long a query (or waiting for a pooled connection) may take, by default: 5 seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A database error as a [`StoreError`]: PostgreSQL's message (its code and text), never the
/// connection's address or password.
pub(crate) fn db_error(e: &tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => StoreError::new(format!("postgres: {} ({})", db.message(), db.code().code())),
        None if e.is_closed() => StoreError::new("postgres: the connection is closed"),
        None => StoreError::new(format!(
            "postgres: {}",
            e.to_string().lines().next().unwrap_or("error")
        )),
    }
}

pub(crate) fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_error(&e),
        deadpool_postgres::PoolError::Timeout(_) => {
            StoreError::new("postgres: no connection within the timeout")
        }
        _ => StoreError::new("postgres: the connection pool failed"),
    }
}

/// A pool of connections to the database at `url` (`postgres://user[:password]@host[:port]/db`
/// or the `key=value` form), at most `max_size` at once, each wait and connection attempt
/// bounded by `timeout`. Connects lazily: a database that is down now does not stop the
/// application starting. Fails only on a URL that cannot be read. Needs a Tokio runtime.
pub fn pool(url: &str, max_size: usize, timeout: Duration) -> Result<Pool, StoreError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|_| StoreError::new("postgres: a connection URL that cannot be read"))?;
    config
        .connect_timeout(timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10));
    if config.get_application_name().is_none() {
        config.application_name("tower-llm-policy");
    }
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size.max(1))
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(timeout),
            create: Some(timeout),
            recycle: Some(timeout),
        })
        .build()
        .map_err(|_| StoreError::new("postgres: the connection pool cannot be built"))
}

/// Applies the [`MIGRATIONS`] not applied yet; returns the versions it applied. Safe to run
/// from several replicas at once, and again and again.
pub async fn migrate(pool: &Pool) -> Result<Vec<i32>, StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(|e| db_error(&e))?;
    // One migrating replica at a time (the others wait, then find nothing to do).
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(7261736); \
         CREATE TABLE IF NOT EXISTS tlp_migrations ( \
             version integer PRIMARY KEY, \
             name text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(|e| db_error(&e))?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM tlp_migrations", &[])
        .await
        .map_err(|e| db_error(&e))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await.map_err(|e| db_error(&e))?;
        tx.execute(
            "INSERT INTO tlp_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(|e| db_error(&e))?;
        applied.push(*version);
    }
    tx.commit().await.map_err(|e| db_error(&e))?;
    Ok(applied)
}
