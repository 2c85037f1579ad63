//! [`PostgresKeyStore`]: keys in the `tlp_keys` table, the admin API on them, and the
//! listener that hears their changes.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::{db_error, pool_error};
use crate::keys::admin::{apply_patch, check_new_key, digest_prefix, generate_secret};
use crate::keys::{
    AdminError, ApiKey, BoxFuture, CreatedKey, KeyAdmin, KeyDigest, KeyPage, KeyRecord, KeyStore,
    PageRequest, StoreError,
};

/// How often a key's `last_used_at` is written at most, by default: once a minute.
pub const DEFAULT_LAST_USED_EVERY: Duration = Duration::from_secs(60);

/// Keys whose last write of `last_used_at` is remembered, at most.
const LAST_USED_MEMORY: usize = 100_000;

/// Keys in PostgreSQL (the `tlp_keys` table of [`migrate`](super::migrate)), looked up by
/// digest, with the [`KeyAdmin`] API. Every lookup is a query (an indexed one): put a
/// [`CachedKeyStore`](crate::keys) in front for many requests a second, and a [`Listener`]
/// ([`listen`](Self::listen)) to drop changed keys from it at once.
///
/// A row whose `policy` is not a valid key (written by hand, by a newer version) fails the
/// lookup closed (503), naming the key in the error, never letting the request through.
/// `last_used_at` is written at most once a minute per key
/// ([`last_used_every`](Self::last_used_every)), in the background.
#[derive(Clone)]
pub struct PostgresKeyStore {
    pool: Pool,
    last_used: Arc<Mutex<HashMap<KeyDigest, Instant>>>,
    last_used_every: Duration,
}

impl fmt::Debug for PostgresKeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pool's configuration holds the password: not shown.
        let status = self.pool.status();
        f.debug_struct("PostgresKeyStore")
            .field("connections", &status.size)
            .field("max_connections", &status.max_size)
            .field("last_used_every", &self.last_used_every)
            .finish_non_exhaustive()
    }
}

const COLUMNS: &str = "name, digest, policy, created_at, updated_at, last_used_at";

fn record(row: &Row) -> Result<KeyRecord, StoreError> {
    let name: String = row.get("name");
    let digest: Vec<u8> = row.get("digest");
    let policy: Value = row.get("policy");
    let digest = <[u8; 32]>::try_from(digest.as_slice())
        .map(KeyDigest::from_bytes)
        .map_err(|_| StoreError::new(format!("postgres: the key `{name}` has a bad digest")))?;
    let key = key_of(&name, policy)?;
    Ok(KeyRecord {
        key,
        digest_prefix: digest_prefix(&digest),
        created_at: row.get::<_, Option<SystemTime>>("created_at"),
        updated_at: row.get::<_, Option<SystemTime>>("updated_at"),
        last_used_at: row.get::<_, Option<SystemTime>>("last_used_at"),
    })
}

/// The key named `name` from its stored policy.
fn key_of(name: &str, policy: Value) -> Result<ApiKey, StoreError> {
    let mut key: ApiKey = serde_json::from_value(policy).map_err(|e| {
        StoreError::new(format!(
            "postgres: the key `{name}` has a policy that cannot be read ({e})"
        ))
    })?;
    key.name = name.to_owned();
    // A credential written into the policy by hand is not a credential here.
    let _ = key.take_credential();
    Ok(key)
}

fn policy_of(key: &ApiKey) -> Result<Value, AdminError> {
    serde_json::to_value(key).map_err(|e| AdminError::Invalid(format!("invalid key: {e}")))
}

fn admin_error(e: tokio_postgres::Error, name: &str) -> AdminError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        return AdminError::Conflict(name.to_owned());
    }
    if e.code() == Some(&SqlState::CHECK_VIOLATION) {
        return AdminError::Invalid(format!("invalid key `{name}`"));
    }
    AdminError::Store(db_error(&e))
}

impl PostgresKeyStore {
    /// A store on `pool` (see [`pool`](super::pool)). The schema must be migrated
    /// ([`migrate`](super::migrate)).
    pub fn new(pool: Pool) -> Self {
        PostgresKeyStore {
            pool,
            last_used: Arc::default(),
            last_used_every: DEFAULT_LAST_USED_EVERY,
        }
    }

    /// How often a key's `last_used_at` is written at most (default
    /// [`DEFAULT_LAST_USED_EVERY`]); `Duration::MAX` never writes it.
    #[must_use]
    pub fn last_used_every(mut self, every: Duration) -> Self {
        self.last_used_every = every;
        self
    }

    /// The pool it queries.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Writes `last_used_at` of the key with `digest` in the background, if it was not
    /// written within `last_used_every`.
    fn touch(&self, digest: &KeyDigest) {
        if self.last_used_every == Duration::MAX {
            return;
        }
        let now = Instant::now();
        {
            let mut seen = self.last_used.lock().unwrap_or_else(|e| e.into_inner());
            if seen
                .get(digest)
                .is_some_and(|at| now.duration_since(*at) < self.last_used_every)
            {
                return;
            }
            if seen.len() >= LAST_USED_MEMORY {
                seen.clear();
            }
            seen.insert(*digest, now);
        }
        let pool = self.pool.clone();
        let digest = *digest;
        tokio::spawn(async move {
            if let Ok(client) = pool.get().await {
                let _ = client
                    .execute(
                        "UPDATE tlp_keys SET last_used_at = now() WHERE digest = $1",
                        &[&digest.as_bytes().as_slice()],
                    )
                    .await;
            }
        });
    }

    async fn find(&self, digest: &KeyDigest) -> Result<Option<Arc<ApiKey>>, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let statement = client
            .prepare_cached("SELECT name, policy FROM tlp_keys WHERE digest = $1")
            .await
            .map_err(|e| db_error(&e))?;
        let row = client
            .query_opt(&statement, &[&digest.as_bytes().as_slice()])
            .await
            .map_err(|e| db_error(&e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let name: String = row.get(0);
        let key = key_of(&name, row.get(1))?;
        self.touch(digest);
        Ok(Some(Arc::new(key)))
    }

    /// Listens for changes of keys (the trigger's `NOTIFY tlp_keys`) on a connection of its
    /// own to `url` (the pool's database), and calls `on_change` with each changed key's
    /// digest, or [`KeyChange::All`] when the connection was (re)made or lost (changes may
    /// have been missed). It reconnects by itself, with backoff up to 5 s. Give it the
    /// [`CacheInvalidator`](crate::keys) of the cache in front of this store:
    ///
    /// ```ignore
    /// let listener = store.listen(url, move |change| match change {
    ///     KeyChange::Key(digest) => invalidator.invalidate(&digest),
    ///     KeyChange::All => invalidator.invalidate_all(),
    /// })?;
    /// ```
    ///
    /// Listening stops when the returned [`Listener`] is dropped. Needs a Tokio runtime.
    pub fn listen(
        &self,
        url: &str,
        on_change: impl Fn(KeyChange) + Send + Sync + 'static,
    ) -> Result<Listener, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|_| StoreError::new("postgres: a connection URL that cannot be read"))?;
        config
            .connect_timeout(super::DEFAULT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10));
        let listening = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(listen_loop(config, Arc::new(on_change), listening.clone()));
        Ok(Listener { task, listening })
    }
}

/// What changed in the key table, as a [`Listener`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyChange {
    /// The key with this digest changed (its policy, or it was created or deleted).
    Key(KeyDigest),
    /// Anything may have changed: the listener (re)connected, or lost its connection.
    All,
}

/// A running change listener ([`PostgresKeyStore::listen`]); stops when dropped.
#[must_use = "the listener stops when dropped"]
pub struct Listener {
    task: tokio::task::JoinHandle<()>,
    listening: Arc<AtomicBool>,
}

impl Listener {
    /// Whether it is connected and listening now.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("listening", &self.is_listening())
            .finish()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type OnChange = Arc<dyn Fn(KeyChange) + Send + Sync>;

async fn listen_loop(
    config: tokio_postgres::Config,
    on_change: OnChange,
    listening: Arc<AtomicBool>,
) {
    let mut pause = Duration::from_millis(100);
    loop {
        if let Ok((client, mut connection)) = config.connect(NoTls).await {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            // The connection must be polled for its messages (notifications among them).
            let driver = tokio::spawn(async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(message) = messages.next().await {
                    match message {
                        Ok(AsyncMessage::Notification(n)) => {
                            if tx.send(n.payload().to_owned()).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
            if client.batch_execute("LISTEN tlp_keys").await.is_ok() {
                listening.store(true, Ordering::Relaxed);
                // What changed while nobody listened is unknown.
                on_change(KeyChange::All);
                pause = Duration::from_millis(100);
                while let Some(payload) = rx.recv().await {
                    match KeyDigest::from_hex(&payload) {
                        Ok(digest) => on_change(KeyChange::Key(digest)),
                        Err(_) => on_change(KeyChange::All),
                    }
                }
                listening.store(false, Ordering::Relaxed);
                on_change(KeyChange::All);
            }
            driver.abort();
            drop(client);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

impl KeyStore for PostgresKeyStore {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        Box::pin(self.find(digest))
    }
}

impl KeyAdmin for PostgresKeyStore {
    fn create(&self, key: ApiKey) -> BoxFuture<'_, Result<CreatedKey, AdminError>> {
        Box::pin(async move {
            let key = check_new_key(key)?;
            let secret = generate_secret()?;
            let digest = KeyDigest::of(&secret);
            let policy = policy_of(&key)?;
            let client = self.pool.get().await.map_err(pool_error)?;
            let row = client
                .query_one(
                    &format!(
                        "INSERT INTO tlp_keys (name, digest, policy) VALUES ($1, $2, $3) \
                         RETURNING {COLUMNS}"
                    ),
                    &[&key.name, &digest.as_bytes().as_slice(), &policy],
                )
                .await
                .map_err(|e| admin_error(e, &key.name))?;
            Ok(CreatedKey {
                record: record(&row)?,
                secret,
            })
        })
    }

    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(pool_error)?;
            let row = client
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM tlp_keys WHERE name = $1"),
                    &[&name],
                )
                .await
                .map_err(|e| admin_error(e, name))?
                .ok_or_else(|| AdminError::NotFound(name.to_owned()))?;
            Ok(record(&row)?)
        })
    }

    fn update<'a>(
        &'a self,
        name: &'a str,
        patch: &'a Value,
    ) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        Box::pin(async move {
            let mut client = self.pool.get().await.map_err(pool_error)?;
            let tx = client
                .transaction()
                .await
                .map_err(|e| admin_error(e, name))?;
            let row = tx
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM tlp_keys WHERE name = $1 FOR UPDATE"),
                    &[&name],
                )
                .await
                .map_err(|e| admin_error(e, name))?
                .ok_or_else(|| AdminError::NotFound(name.to_owned()))?;
            let current = record(&row)?;
            let patched = apply_patch(&current.key, patch)?;
            let row = tx
                .query_one(
                    &format!(
                        "UPDATE tlp_keys SET policy = $2, updated_at = now() WHERE name = $1 \
                         RETURNING {COLUMNS}"
                    ),
                    &[&name, &policy_of(&patched)?],
                )
                .await
                .map_err(|e| admin_error(e, name))?;
            tx.commit().await.map_err(|e| admin_error(e, name))?;
            Ok(record(&row)?)
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            let client = self.pool.get().await.map_err(pool_error)?;
            let deleted = client
                .execute("DELETE FROM tlp_keys WHERE name = $1", &[&name])
                .await
                .map_err(|e| admin_error(e, name))?;
            if deleted == 0 {
                return Err(AdminError::NotFound(name.to_owned()));
            }
            Ok(())
        })
    }

    fn list(&self, page: PageRequest) -> BoxFuture<'_, Result<KeyPage, AdminError>> {
        Box::pin(async move {
            let size = page.size();
            let client = self.pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM tlp_keys WHERE $1::text IS NULL OR name > $1 \
                         ORDER BY name LIMIT $2"
                    ),
                    &[&page.after, &(size as i64 + 1)],
                )
                .await
                .map_err(|e| AdminError::Store(db_error(&e)))?;
            let more = rows.len() > size;
            let keys = rows
                .iter()
                .take(size)
                .map(record)
                .collect::<Result<Vec<_>, _>>()?;
            let next = more
                .then(|| keys.last().map(|r| r.key.name.clone()))
                .flatten();
            Ok(KeyPage { keys, next })
        })
    }
}
