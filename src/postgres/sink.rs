//! [`PostgresSink`]: audit records into the `tlp_audit` table, in batches, from a bounded
//! queue; and [`spend_per_day`], the spend query on them.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Pool, PoolError};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, timeout, Instant};

use super::{db_error, pool_error};
use crate::audit::{AuditRecord, LogSink};
use crate::keys::StoreError;

/// Default number of records a [`PostgresSink`] queues for its writer task: 10,000.
pub const DEFAULT_QUEUE: usize = 10_000;

/// Default bound on the bytes of the records (their JSON) a [`PostgresSink`] queues: 64 MiB.
pub const DEFAULT_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// Default number of records a [`PostgresSink`] writes in one statement: 500.
pub const DEFAULT_BATCH_SIZE: usize = 500;

/// How long a [`PostgresSink`] waits for more records before it writes a batch that is not
/// full, by default: 200 ms.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// How long one write of a batch may take before the [`PostgresSink`] gives up on it and
/// retries, by default: 30 seconds.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The statement that writes a batch: the records' JSON as one `text[]` parameter, each
/// parsed once (the materialized CTE) into `record`, the columns taken from it.
///
/// Why not `COPY ... FROM STDIN BINARY`, which is faster per row: COPY cannot skip rows that
/// are already there, and exactly-once needs that (a batch retried after its commit's reply
/// was lost must not be written twice). COPY would need a staging table and an
/// `INSERT ... SELECT ... ON CONFLICT` after it: three statements and a transaction per batch
/// instead of one statement, for a gain that does not matter at a gateway's rates (10,000
/// records through the sink, serialization included, take about a second in an unoptimized
/// build of `tests/postgres_sink.rs`, 8,000 to 11,000 records a second). It is also one
/// prepared statement whatever the batch's size (a multi-row `VALUES` list would be one per
/// size, and bounded by the 65,535 parameters of the protocol), and the JSON is the only
/// thing serialized, once, on the request path.
const INSERT: &str = "\
WITH batch AS MATERIALIZED (SELECT doc::jsonb AS r FROM unnest($1::text[]) AS d(doc))
INSERT INTO tlp_audit (ts, request_id, key, model, endpoint, status, outcome, blocked_by, code,
                       prompt_tokens, completion_tokens, cost_usd, record)
SELECT (r->>'timestamp')::timestamptz, r->>'request_id', r->>'key',
       coalesce(r->>'canonical_model', r->>'model'), r->>'endpoint', (r->>'status')::integer,
       r->>'outcome', r->>'blocked_by', r->>'code', (r->>'prompt_tokens')::bigint,
       (r->>'completion_tokens')::bigint, (r->>'cost_usd')::double precision, r
FROM batch
ON CONFLICT (request_id, ts) DO NOTHING";

enum Message {
    Record(String),
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    retries: AtomicU64,
    /// Records taken and not yet written, skipped or failed (queued or in the batch).
    queued: AtomicU64,
    /// Their bytes.
    queued_bytes: AtomicU64,
}

/// Writes audit records into PostgreSQL's `tlp_audit` table (see [`migrate`](super::migrate);
/// the migrations up to `0003` are needed), in batches, from a bounded queue.
///
/// [`record`](LogSink::record) serializes the record to JSON once, on the caller's thread,
/// and hands it to a Tokio task that the sink owns without ever waiting: when the queue is
/// full ([`DEFAULT_QUEUE`] records or [`DEFAULT_QUEUE_BYTES`] bytes) the record is dropped
/// and counted in [`dropped`](Self::dropped). The task writes a batch when it has
/// [`DEFAULT_BATCH_SIZE`] records, or [`DEFAULT_FLUSH_INTERVAL`] after the first record of a
/// batch came, whichever is first: one `INSERT` of the whole batch.
///
/// The columns: `ts` is the record's `timestamp`, `model` its `canonical_model` (the name it
/// was priced by) or, without one, its `model`; the others are the record's fields of the
/// same name; `record` is the whole record, the same JSON object as a JSON Lines log.
///
/// # Guarantees
///
/// - **Exactly once.** Rows are inserted with `ON CONFLICT (request_id, ts) DO NOTHING` (the
///   unique index of migration `0003`): a batch written again after its commit's reply was
///   lost (the connection dropped after the server committed) adds nothing, and its records
///   are counted in [`skipped`](Self::skipped), as is a record whose `request_id` and
///   `timestamp` are already in the table (a client reusing a trusted `x-request-id` within
///   the same millisecond).
/// - **Retried, not lost, while the database is away.** A transient error (no connection,
///   the connection closed, the pool's timeout, a server shutting down or starting up
///   `57xxx`, too many connections `53xxx`, a serialization failure or deadlock, a write that
///   took longer than the write timeout) keeps the batch, and the task retries it with an
///   exponential backoff (100 ms doubling to 5 s, [`retry_backoff`](PostgresSinkBuilder::retry_backoff)),
///   for as long as it takes. Meanwhile the queue fills, and what does not fit is dropped and
///   counted. After a database restart the queued records are written.
/// - **One bad record costs one record.** A batch that fails for good (a value the database
///   refuses, `22xxx`, `23xxx`; the table missing) is written again record by record, and a
///   record that still fails is counted in [`failed`](Self::failed). NUL characters, which
///   PostgreSQL's text and `jsonb` refuse, are replaced with U+FFFD before the record is
///   queued: such a record is written, not failed.
/// - **Counted.** Once [`flush`](Self::flush) returns, every record given to the sink is in
///   exactly one of [`written`](Self::written), [`skipped`](Self::skipped),
///   [`failed`](Self::failed) and [`dropped`](Self::dropped); before that, the rest are in
///   [`queue_depth`](Self::queue_depth).
///
/// [`flush`](Self::flush) waits for the database however long it is away: bound it with
/// `tokio::time::timeout` at shutdown. The task lives as long as the runtime and a clone of
/// the sink: dropping the last clone lets it write what is queued, then end; what is still
/// queued when the runtime shuts down is lost (flush first). [`LogSink::flush`] waits only
/// when called outside a Tokio runtime (it would block the runtime's thread): inside one, call
/// the async [`flush`](Self::flush).
///
/// ```no_run
/// # async fn run() -> Result<(), tower_llm_policy::keys::StoreError> {
/// use std::time::Duration;
/// use tower_llm_policy::audit::AuditLayer;
/// use tower_llm_policy::postgres::{migrate, pool, PostgresSink};
///
/// let pool = pool("postgres://tlp@db.internal/tlp", 4, Duration::from_secs(5))?;
/// migrate(&pool).await?;
/// let sink = PostgresSink::new(pool);
/// let layer = AuditLayer::new(sink.clone());
/// // ... serve requests; at shutdown:
/// let _ = tokio::time::timeout(Duration::from_secs(10), sink.flush()).await;
/// # drop(layer);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresSink {
    shared: Arc<Shared>,
}

struct Shared {
    tx: mpsc::Sender<Message>,
    queue_bytes: u64,
    counters: Arc<Counters>,
}

/// Options for a [`PostgresSink`]: `PostgresSink::builder().batch_size(1000).build(pool)`.
#[derive(Clone, Copy, Debug)]
pub struct PostgresSinkBuilder {
    queue: usize,
    queue_bytes: usize,
    batch_size: usize,
    flush_interval: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    write_timeout: Duration,
}

impl Default for PostgresSinkBuilder {
    fn default() -> Self {
        PostgresSinkBuilder {
            queue: DEFAULT_QUEUE,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            batch_size: DEFAULT_BATCH_SIZE,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

impl PostgresSinkBuilder {
    /// How many records may wait for the writer task before records are dropped (at least 1;
    /// default [`DEFAULT_QUEUE`]). The batch being written is not in the queue: at most this
    /// many plus one batch are held. Make it hold what arrives while the database restarts.
    #[must_use]
    pub fn queue_capacity(mut self, records: usize) -> Self {
        self.queue = records.max(1);
        self
    }

    /// How many bytes of records (their JSON), queued or being written, may wait before
    /// records are dropped (default [`DEFAULT_QUEUE_BYTES`]). A record larger than the budget
    /// is always dropped.
    #[must_use]
    pub fn queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes;
        self
    }

    /// The most records written in one statement (at least 1; default
    /// [`DEFAULT_BATCH_SIZE`]).
    #[must_use]
    pub fn batch_size(mut self, records: usize) -> Self {
        self.batch_size = records.max(1);
        self
    }

    /// How long the writer task waits for a batch to fill after its first record (default
    /// [`DEFAULT_FLUSH_INTERVAL`]): records reach the table at most about this much later
    /// when the database keeps up.
    #[must_use]
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// The wait before the first retry of a batch after a transient error, doubled after each
    /// failed retry up to `max` (default 100 ms and 5 s).
    #[must_use]
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// How long one write of a batch may take before it is abandoned and retried (default
    /// [`DEFAULT_WRITE_TIMEOUT`]). A write abandoned after the server committed it is not
    /// written twice (see [`PostgresSink`]'s guarantees).
    #[must_use]
    pub fn write_timeout(mut self, limit: Duration) -> Self {
        self.write_timeout = limit;
        self
    }

    /// The sink, writing with connections from `pool` (see [`pool`](super::pool)).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime: the writer is a task spawned on the current runtime.
    pub fn build(self, pool: Pool) -> PostgresSink {
        let (tx, rx) = mpsc::channel(self.queue);
        let counters = Arc::new(Counters::default());
        let writer = Writer {
            pool,
            counters: counters.clone(),
            options: self,
        };
        tokio::spawn(writer.run(rx));
        PostgresSink {
            shared: Arc::new(Shared {
                tx,
                queue_bytes: self.queue_bytes as u64,
                counters,
            }),
        }
    }
}

impl PostgresSink {
    /// A sink on `pool` with the default options. Needs a Tokio runtime (it spawns its writer
    /// task; panics outside one). The schema must be migrated ([`migrate`](super::migrate)).
    pub fn new(pool: Pool) -> Self {
        Self::builder().build(pool)
    }

    /// Options for a sink.
    pub fn builder() -> PostgresSinkBuilder {
        PostgresSinkBuilder::default()
    }

    /// Records written into the table so far.
    pub fn written(&self) -> u64 {
        self.shared.counters.written.load(Ordering::Relaxed)
    }

    /// Records not written because a row with their `request_id` and `timestamp` was already
    /// there: written by an earlier try of the same batch (its commit's reply was lost), or a
    /// duplicate.
    pub fn skipped(&self) -> u64 {
        self.shared.counters.skipped.load(Ordering::Relaxed)
    }

    /// Records dropped because the queue was full (in records or in bytes) or the writer task
    /// was gone.
    pub fn dropped(&self) -> u64 {
        self.shared.counters.dropped.load(Ordering::Relaxed)
    }

    /// Records the database refused for good, even alone (or that could not be serialized).
    pub fn failed(&self) -> u64 {
        self.shared.counters.failed.load(Ordering::Relaxed)
    }

    /// Writes retried after a transient error so far (a database that is away shows here).
    pub fn retries(&self) -> u64 {
        self.shared.counters.retries.load(Ordering::Relaxed)
    }

    /// Records taken and not yet written, skipped or failed: queued, or in the batch being
    /// written.
    pub fn queue_depth(&self) -> u64 {
        self.shared.counters.queued.load(Ordering::Relaxed)
    }

    /// Waits until every record taken before this call is written, skipped or counted failed
    /// (records dropped were counted when they were). While the database is away this waits
    /// for it: bound it with `tokio::time::timeout`. Returns at once if the writer task is
    /// gone (its runtime shut down).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.shared.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

impl fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the pool: its configuration holds the password.
        f.debug_struct("PostgresSink")
            .field("written", &self.written())
            .field("skipped", &self.skipped())
            .field("failed", &self.failed())
            .field("dropped", &self.dropped())
            .field("queue_depth", &self.queue_depth())
            .finish_non_exhaustive()
    }
}

/// `json` with every NUL character (`\u0000`, which PostgreSQL's `text` and `jsonb` refuse)
/// replaced with U+FFFD, in keys and in values. Only a record that has one pays for the
/// parse.
fn without_nul(json: String) -> String {
    if !json.contains("\\u0000") {
        return json;
    }
    fn clean(value: &mut Value) {
        match value {
            Value::String(s) if s.contains('\0') => *s = s.replace('\0', "\u{FFFD}"),
            Value::Array(items) => items.iter_mut().for_each(clean),
            Value::Object(map) => {
                let old = std::mem::take(map);
                for (k, mut v) in old {
                    clean(&mut v);
                    map.insert(k.replace('\0', "\u{FFFD}"), v);
                }
            }
            _ => {}
        }
    }
    match serde_json::from_str::<Value>(&json) {
        Ok(mut value) => {
            clean(&mut value);
            value.to_string()
        }
        Err(_) => json,
    }
}

impl LogSink for PostgresSink {
    fn record(&self, record: &AuditRecord) {
        let counters = &self.shared.counters;
        let json = match serde_json::to_string(record) {
            Ok(json) => without_nul(json),
            Err(_) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let len = json.len() as u64;
        // Reserve the record's bytes in the budget first; give them back if it does not fit.
        let before = counters.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) > self.shared.queue_bytes {
            counters.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        counters.queued.fetch_add(1, Ordering::Relaxed);
        if self.shared.tx.try_send(Message::Record(json)).is_err() {
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            counters.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Outside a Tokio runtime, waits like [`PostgresSink::flush`]; inside one, returns at
    /// once (waiting would block the runtime's thread, which the writer may need): call the
    /// async [`PostgresSink::flush`] there.
    fn flush(&self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            return;
        }
        let (done, wait) = oneshot::channel();
        if self.shared.tx.blocking_send(Message::Flush(done)).is_ok() {
            let _ = wait.blocking_recv();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer task

/// A write that failed: worth retrying, or not.
enum Failure {
    Transient(StoreError),
    Permanent(StoreError),
}

/// Whether an error may go away by itself: the connection (no SQLSTATE: refused, closed,
/// timed out), `08` connection exceptions, `53` insufficient resources, `57` operator
/// intervention (shutdown `57P01`, cannot connect now `57P03`, ...), `58` system errors,
/// serialization failures and deadlocks.
fn transient(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        return true;
    };
    let code = code.code();
    ["08", "53", "57", "58"]
        .iter()
        .any(|class| code.starts_with(class))
        || matches!(code, "40001" | "40P01" | "40003")
}

fn failure(e: PoolError) -> Failure {
    let is_transient = match &e {
        PoolError::Timeout(_) => true,
        PoolError::Backend(e) => transient(e),
        PoolError::PostCreateHook(_) => true,
        _ => false,
    };
    let error = pool_error(e);
    if is_transient {
        Failure::Transient(error)
    } else {
        Failure::Permanent(error)
    }
}

struct Writer {
    pool: Pool,
    counters: Arc<Counters>,
    options: PostgresSinkBuilder,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut batch: Vec<String> = Vec::with_capacity(self.options.batch_size);
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        while let Some(first) = rx.recv().await {
            match first {
                Message::Record(json) => batch.push(json),
                Message::Flush(done) => flushes.push(done),
            }
            // Fill the batch until it is full, the interval is over, or a flush asks for it.
            let deadline = Instant::now() + self.options.flush_interval;
            while flushes.is_empty() && batch.len() < self.options.batch_size {
                let message = match rx.try_recv() {
                    Ok(message) => message,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(message)) => message,
                            Ok(None) | Err(_) => break,
                        }
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                };
                match message {
                    Message::Record(json) => batch.push(json),
                    Message::Flush(done) => flushes.push(done),
                }
            }
            if !batch.is_empty() {
                self.write(&batch).await;
                let bytes: usize = batch.iter().map(String::len).sum();
                self.counters
                    .queued_bytes
                    .fetch_sub(bytes as u64, Ordering::Relaxed);
                self.counters
                    .queued
                    .fetch_sub(batch.len() as u64, Ordering::Relaxed);
                batch.clear();
            }
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }

    /// Writes `batch` whole, or else record by record; counts each record's fate.
    async fn write(&self, batch: &[String]) {
        match self.insert_retrying(batch).await {
            Ok(rows) => self.count(batch.len(), rows),
            Err(_) if batch.len() == 1 => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                for record in batch {
                    match self.insert_retrying(std::slice::from_ref(record)).await {
                        Ok(rows) => self.count(1, rows),
                        Err(_) => {
                            self.counters.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }

    fn count(&self, records: usize, rows: u64) {
        self.counters.written.fetch_add(rows, Ordering::Relaxed);
        self.counters
            .skipped
            .fetch_add((records as u64).saturating_sub(rows), Ordering::Relaxed);
    }

    /// Inserts `records`, retrying transient errors with a backoff for as long as it takes;
    /// the rows inserted, or the permanent error.
    async fn insert_retrying(&self, records: &[String]) -> Result<u64, StoreError> {
        let mut backoff = self.options.min_backoff;
        loop {
            let error = match timeout(self.options.write_timeout, self.insert(records)).await {
                Ok(Ok(rows)) => return Ok(rows),
                Ok(Err(Failure::Permanent(e))) => {
                    #[cfg(feature = "tracing")]
                    tracing::warn!(
                        target: "tower_llm_policy::postgres",
                        records = records.len(),
                        error = %e,
                        "audit records refused by the database"
                    );
                    return Err(e);
                }
                Ok(Err(Failure::Transient(e))) => e,
                Err(_) => StoreError::new("postgres: the write timed out"),
            };
            #[cfg(feature = "tracing")]
            tracing::warn!(
                target: "tower_llm_policy::postgres",
                records = records.len(),
                error = %error,
                retry_in_ms = backoff.as_millis() as u64,
                "audit records not written yet; retrying"
            );
            drop(error);
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            sleep(backoff).await;
            backoff = backoff.saturating_mul(2).min(self.options.max_backoff);
        }
    }

    async fn insert(&self, records: &[String]) -> Result<u64, Failure> {
        let client = self.pool.get().await.map_err(failure)?;
        let classify = |e: tokio_postgres::Error| {
            if transient(&e) {
                Failure::Transient(db_error(&e))
            } else {
                Failure::Permanent(db_error(&e))
            }
        };
        let statement = client.prepare_cached(INSERT).await.map_err(classify)?;
        client
            .execute(&statement, &[&records])
            .await
            .map_err(classify)
    }
}

// ---------------------------------------------------------------------------------------------
// Spend per key per day

/// The spend query of [`spend_per_day`], as in the [module docs](super).
const SPEND_PER_DAY: &str = "\
SELECT key, to_char((ts AT TIME ZONE 'UTC')::date, 'YYYY-MM-DD') AS day,
       coalesce(sum(cost_usd), 0)::double precision AS cost_usd, count(*) AS requests,
       coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
       coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens
FROM tlp_audit
WHERE ts >= $1 AND ts < $2 AND ($3::text IS NULL OR key = $3)
GROUP BY 1, 2
ORDER BY 2, 1";

/// One key's spend on one day (UTC), from [`spend_per_day`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DaySpend {
    /// The key's name; `None` for requests without a key (refused before one was found).
    pub key: Option<String>,
    /// The day, `YYYY-MM-DD`, in UTC.
    pub day: String,
    /// The sum of the requests' `cost_usd` (a request without a cost counts 0).
    pub cost_usd: f64,
    /// Requests, all of them: allowed, refused, failed, with or without a cost.
    pub requests: i64,
    /// The sum of their prompt tokens (unknown counts 0).
    pub prompt_tokens: i64,
    /// The sum of their completion tokens (unknown counts 0).
    pub completion_tokens: i64,
}

/// Spend per key per day (UTC) of the requests from `from` (included) to `to` (excluded),
/// for one key or (`None`) every key, ordered by day then key: the query in the
/// [module docs](super), on the `(key, ts)` and `ts` indexes.
pub async fn spend_per_day(
    pool: &Pool,
    from: SystemTime,
    to: SystemTime,
    key: Option<&str>,
) -> Result<Vec<DaySpend>, StoreError> {
    let client = pool.get().await.map_err(pool_error)?;
    let rows = client
        .query(SPEND_PER_DAY, &[&from, &to, &key])
        .await
        .map_err(|e| db_error(&e))?;
    Ok(rows
        .iter()
        .map(|row| DaySpend {
            key: row.get(0),
            day: row.get(1),
            cost_usd: row.get(2),
            requests: row.get(3),
            prompt_tokens: row.get(4),
            completion_tokens: row.get(5),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_characters_are_replaced_in_keys_and_values() {
        let json = serde_json::json!({"a\u{0}": ["x\u{0}y", 1], "b": "plain"}).to_string();
        let clean: Value = serde_json::from_str(&without_nul(json)).unwrap();
        assert_eq!(
            clean,
            serde_json::json!({"a\u{FFFD}": ["x\u{FFFD}y", 1], "b": "plain"})
        );
        let plain = r#"{"a":"\\u0000 is text here"}"#.to_owned();
        assert_eq!(without_nul(plain.clone()), plain);
    }
}
