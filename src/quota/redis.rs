//! Spend ledger and rate limiter in Redis, shared by every replica (cargo feature `redis`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::ledger::{
    cap_nanos, to_nanos, to_usd, Refused, Reservation, ReservationId, ReserveError, Spend,
    SpendLedger, SpendWatch,
};
use super::period::{BudgetPeriod, Clock};
use super::rate::{LimitState, RateDecision, RateKind, RateLimiter, RateLimits};
use crate::keys::{BoxFuture, StoreError};

/// How long a reservation may stay open, by default: one hour. See
/// [`RedisOptions::reservation_ttl`].
pub const DEFAULT_RESERVATION_TTL: Duration = Duration::from_secs(3600);

/// How long a call to Redis may take, by default: one second. See [`RedisOptions::timeout`].
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// Settlements and corrections waiting for Redis, at most.
const QUEUE: usize = 65_536;

/// Settlements and corrections sent to Redis at the same time, at most.
const IN_FLIGHT: usize = 64;

/// Stale reservations one call settles, at most (the next calls settle the rest).
const SWEEP: usize = 100;

/// Lua shared by the ledger's scripts: the time, and the sweep of reservations that stayed
/// open longer than their time to live (a replica that died before settling them). Each is
/// settled at its amount, in the current period: a request that was sent is never counted
/// at nothing.
///
/// `KEYS[1]` spend of the current period, `KEYS[2]` held, `KEYS[3]` open reservations
/// (id → "amount tag"), `KEYS[4]` their deadlines (a sorted set); `ARGV[1]` the time in
/// milliseconds, or empty for the server's, `ARGV[2]` how many to sweep at most, `ARGV[3]`
/// the spend counter's time to live (s, 0 for none).
const LEDGER_PRELUDE: &str = r"
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(key)
  local v = tonumber(redis.call('GET', key) or '0') or 0
  if v < 0 then return 0 end
  return v
end
local function fmt(n) return string.format('%.0f', n) end
local spend_ttl = tonumber(ARGV[3])
local function spend(amount)
  redis.call('INCRBY', KEYS[1], amount)
  if spend_ttl > 0 then redis.call('EXPIRE', KEYS[1], spend_ttl) end
end
local function release(amount)
  if redis.call('DECRBY', KEYS[2], amount) <= 0 then redis.call('DEL', KEYS[2]) end
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(stale) do
  local v = redis.call('HGET', KEYS[3], id)
  if v then
    local a = tonumber(string.match(v, '^(%d+)'))
    release(fmt(a))
    spend(fmt(a))
    redis.call('HDEL', KEYS[3], id)
  end
  redis.call('ZREM', KEYS[4], id)
end
";

/// Reserve: refuses when spent + held ≥ cap or spent + held + amount > cap, else holds the
/// amount under a new id. `ARGV[4]` amount, `ARGV[5]` cap (nano-dollars), `ARGV[6]` the
/// period's tag, `ARGV[7]` the reservation's time to live (ms); `KEYS[5]` the key's id
/// sequence.
/// Returns `{granted, spent, held, id}`.
const RESERVE: &str = r"
local amount = tonumber(ARGV[4])
local cap = tonumber(ARGV[5])
local spent = num(KEYS[1])
local held = num(KEYS[2])
if spent + held >= cap or spent + held + amount > cap then
  return {0, fmt(spent), fmt(held), ''}
end
local id = fmt(redis.call('INCR', KEYS[5]))
redis.call('INCRBY', KEYS[2], fmt(amount))
redis.call('HSET', KEYS[3], id, fmt(amount) .. ' ' .. ARGV[6])
local ttl = tonumber(ARGV[7])
redis.call('ZADD', KEYS[4], now + ttl, id)
return {1, fmt(spent), fmt(held + amount), id}
";

/// Spend alerts, for the scripts that watch thresholds: `KEYS[5]` the thresholds alerted in
/// the current period (a set, expiring with the spend counter); from `ARGV[at]`: the cap
/// (nano-dollars; 0: not watched), then the thresholds, in percent. `alerts(at)` marks those
/// the settled spend reaches and that were not marked, and returns `{spent, percent...}`.
const ALERTS: &str = r"
local function alerts(at)
  local spent = num(KEYS[1])
  local out = {spent}
  local cap = tonumber(ARGV[at])
  if not cap or cap <= 0 then return out end
  for i = at + 1, #ARGV do
    local p = tonumber(ARGV[i])
    if spent * 100 >= p * cap and redis.call('SADD', KEYS[5], p) == 1 then
      if spend_ttl > 0 then redis.call('EXPIRE', KEYS[5], spend_ttl) end
      table.insert(out, p)
    end
  end
  return out
end
";

/// Settle: replaces an open reservation by the actual cost, once. `ARGV[4]` the id,
/// `ARGV[5]` the actual cost, then the thresholds watched ([`ALERTS`], from `ARGV[6]`).
/// Returns `{1, spent, percent...}` when settled (the thresholds newly reached), `{0}` when
/// the id is not open (settled already, or swept).
const SETTLE: &str = r"
local v = redis.call('HGET', KEYS[3], ARGV[4])
if not v then return {0} end
local a = tonumber(string.match(v, '^(%d+)'))
redis.call('HDEL', KEYS[3], ARGV[4])
redis.call('ZREM', KEYS[4], ARGV[4])
release(fmt(a))
spend(ARGV[5])
local out = alerts(6)
table.insert(out, 1, 1)
return out
";

/// Watch: the thresholds watched ([`ALERTS`], from `ARGV[4]`) that the settled spend has
/// reached and that were not alerted. Returns `{1, spent, percent...}`.
const WATCH: &str = r"
local out = alerts(4)
table.insert(out, 1, 1)
return out
";

/// Extend: holds `ARGV[5]` more under the open reservation `ARGV[4]` if the cap `ARGV[6]`
/// allows it and the period (`ARGV[7]`, its tag) is the one it was reserved in.
const EXTEND: &str = r"
local v = redis.call('HGET', KEYS[3], ARGV[4])
if not v then return 0 end
local a, tag = string.match(v, '^(%d+) (.*)$')
if tag ~= ARGV[7] then return 0 end
local more = tonumber(ARGV[5])
if num(KEYS[1]) + num(KEYS[2]) + more > tonumber(ARGV[6]) then return 0 end
redis.call('INCRBY', KEYS[2], fmt(more))
redis.call('HSET', KEYS[3], ARGV[4], fmt(tonumber(a) + more) .. ' ' .. tag)
return 1
";

/// Spent: `{spent, held}` of the current period.
const SPENT: &str = r"
return {fmt(num(KEYS[1])), fmt(num(KEYS[2]))}
";

/// Token buckets, as [`MemoryRateLimiter`](super::MemoryRateLimiter) keeps them: `KEYS[1]`
/// the requests bucket, `KEYS[2]` the tokens bucket (hashes: limit, level, at); `ARGV[1]`
/// the time (ms, or empty for the server's), `ARGV[2]` requests per minute (-1: none),
/// `ARGV[3]` tokens per minute (-1: none).
const BUCKETS: &str = r"
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function load(key, limit)
  if limit < 0 then
    redis.call('DEL', key)
    return nil
  end
  local b = redis.call('HMGET', key, 'limit', 'level', 'at')
  local old, level, at = tonumber(b[1]), tonumber(b[2]), tonumber(b[3])
  if not old or not level or not at then
    return {limit = limit, level = limit, at = now}
  end
  if old ~= limit then level = limit - (old - level) end
  local elapsed = now - at
  if elapsed < 0 then elapsed = 0 end
  level = math.min(limit, level + elapsed * limit / 60000)
  if now > at then at = now end
  return {limit = limit, level = level, at = at}
end
local function save(key, b)
  if b then
    redis.call('HSET', key, 'limit', b.limit, 'level', string.format('%.17g', b.level), 'at', b.at)
    redis.call('PEXPIRE', key, 120000)
  end
end
local function wait(b, need)
  if b.level >= need then return 0 end
  if b.limit <= 0 then return -1 end
  return math.ceil((need - b.level) * 60000 / b.limit)
end
local function state(b)
  if not b then return {-1, 0, 0} end
  local remaining = math.floor(math.max(b.level, 0))
  return {b.limit, remaining, math.max(wait(b, b.limit), 0)}
end
";

/// Acquire: `ARGV[4]` the request's estimated tokens. Returns `{limited_by (0 none, 1
/// requests, 2 tokens), retry_ms (-1: never), requests limit, remaining, reset_ms, tokens
/// limit, remaining, reset_ms}` (a limit of -1: none).
const ACQUIRE: &str = r"
local rpm, tpm, tokens = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local req = load(KEYS[1], rpm)
local tok = load(KEYS[2], tpm)
local limited, retry = 0, 0
if req and req.level < 1 then
  limited, retry = 1, wait(req, 1)
end
if limited == 0 and tok then
  if tokens > tok.limit then
    limited, retry = 2, -1
  elseif tok.level < tokens then
    limited, retry = 2, wait(tok, tokens)
  end
end
if limited == 0 then
  if req then req.level = req.level - 1 end
  if tok then tok.level = tok.level - tokens end
end
save(KEYS[1], req)
save(KEYS[2], tok)
local r, t = state(req), state(tok)
return {limited, retry, r[1], r[2], r[3], t[1], t[2], t[3]}
";

/// Correct: `ARGV[4]` estimated, `ARGV[5]` actual tokens of a request acquired earlier.
const CORRECT: &str = r"
local tok = load(KEYS[2], tonumber(ARGV[3]))
if tok and redis.call('EXISTS', KEYS[2]) == 1 then
  tok.level = math.min(tok.limit, tok.level + tonumber(ARGV[4]) - tonumber(ARGV[5]))
  save(KEYS[2], tok)
end
return 1
";

/// The connection to Redis that a [`RedisLedger`] and a [`RedisRateLimiter`] share, and the
/// queue of settlements waiting for it.
///
/// Every decision (reserve, extend, a rate limit check) is one Lua script, atomic in Redis,
/// so that any number of replicas sharing one Redis never let two requests pass on the same
/// remaining budget. Settlements and token corrections are synchronous in the traits (they
/// run when a response body ends or is dropped): they go into a bounded queue and a task
/// sends them, retrying a failure until the reservation's time to live is over (settling is
/// idempotent, so a retry of a settlement that did arrive changes nothing).
///
/// A reservation still open after [`reservation_ttl`](RedisOptions::reservation_ttl) (its replica
/// died, or could not reach Redis to settle it) is settled at its amount by the next
/// decision on that key: never at nothing.
///
/// Keys, under the prefix (`tlp:` by default), with the key's name in a hash tag so that
/// one key's counters are in one cluster slot: `tlp:{name}:spend:d:20425` (settled spend in
/// nano-dollars, per period, expiring some time after its period), `tlp:{name}:held`,
/// `tlp:{name}:open`, `tlp:{name}:deadlines` (open reservations: gone when none is open;
/// they do not expire, so that one left by a dead replica is counted whenever the key is
/// used next), `tlp:{name}:seq` (reservation ids), `tlp:{name}:rpm`, `tlp:{name}:tpm`
/// (token buckets, expiring after two idle minutes, when they are full anyway), and with
/// [spend alerts](super::QuotaLayer::alerts) `tlp:{name}:alerts:d:20425` (the thresholds
/// alerted in the period, a set expiring with its spend counter).
///
/// Spend alerts: the settlement's script also marks the thresholds the spend reaches (`SADD`
/// to the period's set, atomic with the settlement), so each fires once in total for every
/// replica sharing the Redis; the alert is sent by the task that sends the queued settlement,
/// once Redis has answered (a few milliseconds after the response ended, longer while Redis
/// is slow or down). An alert whose answer is lost (Redis applied the settlement but the
/// connection broke before its answer came) is not sent again: at most once.
/// Amounts are whole nano-dollars, exact up to about $9 million per key and period (Lua's
/// numbers are doubles).
///
/// Redis that cannot be reached, or does not answer within [`timeout`](RedisOptions::timeout):
/// a decision fails with [`StoreError`], which [`QuotaLayer`](super::QuotaLayer) answers
/// with 503 `policy_unavailable` (fail closed;
/// [`rate_limits_fail_open`](super::QuotaLayer::rate_limits_fail_open) lets requests pass
/// the rate limits then). The connection is made again in the background.
///
/// Needs a Tokio runtime: [`open`](Self::open) spawns the task that sends settlements.
#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Shared>,
}

struct Shared {
    conn: ConnectionManager,
    prefix: String,
    reservation_ttl: Duration,
    clock: Option<Arc<dyn Clock>>,
    queue: mpsc::Sender<Job>,
    dropped: AtomicU64,
    failed: AtomicU64,
    scripts: Scripts,
}

struct Scripts {
    reserve: Script,
    settle: Script,
    watch: Script,
    extend: Script,
    spent: Script,
    acquire: Script,
    correct: Script,
}

impl Scripts {
    fn new() -> Self {
        let ledger = |body: &str| Script::new(&format!("{LEDGER_PRELUDE}{body}"));
        let buckets = |body: &str| Script::new(&format!("{BUCKETS}{body}"));
        Scripts {
            reserve: ledger(RESERVE),
            settle: ledger(&format!("{ALERTS}{SETTLE}")),
            watch: ledger(&format!("{ALERTS}{WATCH}")),
            extend: ledger(EXTEND),
            spent: ledger(SPENT),
            acquire: buckets(ACQUIRE),
            correct: buckets(CORRECT),
        }
    }
}

/// A write that waits in the queue.
enum Job {
    Settle {
        keys: LedgerKeys,
        id: String,
        actual: u64,
        spend_ttl: u64,
        now: String,
        queued: Instant,
        watch: Option<SpendWatch>,
    },
    /// Alerts the thresholds reached and not alerted.
    Watch {
        keys: LedgerKeys,
        spend_ttl: u64,
        now: String,
        queued: Instant,
        watch: SpendWatch,
    },
    Correct {
        keys: [String; 2],
        tpm: u64,
        estimated: u64,
        actual: u64,
        now: String,
        queued: Instant,
    },
    Flush(oneshot::Sender<()>),
}

/// The keys of one API key's ledger, for the period current when they were named.
#[derive(Clone)]
struct LedgerKeys {
    spend: String,
    held: String,
    open: String,
    deadlines: String,
    seq: String,
    /// The thresholds alerted in the period.
    alerts: String,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The connection (its address may carry a password) is not shown.
        f.debug_struct("RedisStore")
            .field("prefix", &self.shared.prefix)
            .field("reservation_ttl", &self.shared.reservation_ttl)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

/// Options of [`RedisStore::open_with`].
#[derive(Clone)]
pub struct RedisOptions {
    prefix: String,
    reservation_ttl: Duration,
    timeout: Duration,
    clock: Option<Arc<dyn Clock>>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            prefix: "tlp:".to_owned(),
            reservation_ttl: DEFAULT_RESERVATION_TTL,
            timeout: DEFAULT_REDIS_TIMEOUT,
            clock: None,
        }
    }
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("prefix", &self.prefix)
            .field("reservation_ttl", &self.reservation_ttl)
            .field("timeout", &self.timeout)
            .field("clock", &self.clock.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl RedisOptions {
    /// Default options: prefix `tlp:`, reservations open at most an hour, calls of at most a
    /// second.
    pub fn new() -> Self {
        Self::default()
    }

    /// What every key starts with (default `tlp:`): several deployments (or tests) can share
    /// one Redis under different prefixes.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a reservation may stay open before the next decision on its key settles it
    /// at its amount (default [`DEFAULT_RESERVATION_TTL`]). Longer than the longest request
    /// (a stream included): a reservation swept while its stream still runs is counted at
    /// its amount, and the stream's real cost is lost.
    #[must_use]
    pub fn reservation_ttl(mut self, ttl: Duration) -> Self {
        self.reservation_ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// Reads the time (the period, the buckets' refill, reservations' deadlines) from
    /// `clock` instead of the Redis server's clock (the default: one clock for every
    /// replica). For tests.
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// How long one call to Redis (connecting included) may take (default
    /// [`DEFAULT_REDIS_TIMEOUT`]); past it the decision fails closed.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    // The error's text names the failure (connection refused, timed out, a script error),
    // never the URL or its password.
    match e.detail() {
        Some(detail) => StoreError::new(format!("redis: {}: {detail}", e.category())),
        None => StoreError::new(format!("redis: {}", e.category())),
    }
}

impl RedisStore {
    /// Connects to Redis at `url` (`redis://[:password@]host:port[/db]`, `rediss://` with TLS
    /// when the `redis` crate has it) with the default [`RedisOptions`]. The connection is
    /// made on first use: a Redis that is down now does not stop the application starting,
    /// its requests fail closed until it is back. Fails only on a URL that cannot be read.
    ///
    /// Must be called within a Tokio runtime.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, RedisOptions::default())
    }

    /// [`open`](Self::open) with `options`.
    pub fn open_with(url: &str, options: RedisOptions) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            StoreError::new(format!(
                "redis: a URL that cannot be read ({})",
                e.category()
            ))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout))
            .set_response_timeout(Some(options.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
        let (queue, jobs) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared {
            conn,
            prefix: options.prefix,
            reservation_ttl: options.reservation_ttl,
            clock: options.clock,
            queue,
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            scripts: Scripts::new(),
        });
        tokio::spawn(send_jobs(Arc::downgrade(&shared), jobs));
        Ok(RedisStore { shared })
    }

    /// A spend ledger in this Redis.
    pub fn ledger(&self) -> RedisLedger {
        RedisLedger {
            store: self.clone(),
        }
    }

    /// A rate limiter in this Redis.
    pub fn rate_limiter(&self) -> RedisRateLimiter {
        RedisRateLimiter {
            store: self.clone(),
        }
    }

    /// Settlements and corrections dropped because the queue was full (Redis down or too
    /// slow for long): their reservations are settled at their amount when they expire.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Settlements and corrections given up after retrying until their reservation's time
    /// to live was over.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Waits until every settlement and correction queued before this call was sent (or
    /// given up). For a graceful shutdown, and tests.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.shared.queue.send(Job::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Whether Redis answers now (`PING`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.shared.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(unavailable)
    }
}

impl Shared {
    fn now(&self) -> Option<SystemTime> {
        self.clock.as_ref().map(|c| c.now())
    }

    /// The time argument of a script: the injected clock's, or empty for the server's.
    fn now_arg(&self) -> String {
        self.now()
            .map(|t| {
                t.duration_since(UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO)
                    .as_millis()
                    .to_string()
            })
            .unwrap_or_default()
    }

    /// The current period's index: from the injected clock, else this machine's (the period
    /// changes at UTC midnight; replicas whose clocks differ by a second disagree for that
    /// second only).
    fn period_index(&self, period: BudgetPeriod) -> u64 {
        period.index_at(self.now().unwrap_or_else(SystemTime::now))
    }

    /// `prefix{name}:`: the key's name with `%`, `{`, `}` and `/` escaped, so that every
    /// name has its own keys and its own hash tag.
    fn base(&self, name: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + name.len() + 3);
        out.push_str(&self.prefix);
        out.push('{');
        out.push_str(&escape(name));
        out.push_str("}:");
        out
    }

    fn ledger_keys(&self, name: &str, period: BudgetPeriod, index: u64) -> LedgerKeys {
        let base = self.base(name);
        LedgerKeys {
            spend: format!("{base}spend:{}:{index}", tag_letter(period)),
            held: format!("{base}held"),
            open: format!("{base}open"),
            deadlines: format!("{base}deadlines"),
            seq: format!("{base}seq"),
            alerts: format!("{base}alerts:{}:{index}", tag_letter(period)),
        }
    }

    fn bucket_keys(&self, name: &str) -> [String; 2] {
        let base = self.base(name);
        [format!("{base}rpm"), format!("{base}tpm")]
    }

    fn enqueue(&self, job: Job) {
        if self.queue.try_send(job).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "tracing")]
            tracing::warn!(
                target: "tower_llm_policy::quota",
                "redis: a settlement was dropped (the queue is full); its reservation is settled at its amount when it expires"
            );
        }
    }
}

fn escape(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.contains(['%', '{', '}', '/']) {
        return name.into();
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out.into()
}

fn tag_letter(period: BudgetPeriod) -> char {
    match period {
        BudgetPeriod::Lifetime => 'l',
        BudgetPeriod::Daily => 'd',
        BudgetPeriod::Monthly => 'm',
    }
}

/// A period as a reservation records it: its letter and its index (`d:20425`).
fn period_tag(period: BudgetPeriod, index: u64) -> String {
    format!("{}:{index}", tag_letter(period))
}

/// A call of one of the ledger's scripts with what [`LEDGER_PRELUDE`] reads: the four keys
/// of the key's ledger, the time, the sweep's bound and the spend counter's time to live. The
/// script's own keys and arguments follow.
fn ledger_call<'s>(
    script: &'s Script,
    keys: &LedgerKeys,
    now: &str,
    spend_ttl: u64,
) -> redis::ScriptInvocation<'s> {
    let mut call = script.prepare_invoke();
    call.key(&keys.spend)
        .key(&keys.held)
        .key(&keys.open)
        .key(&keys.deadlines)
        .arg(now)
        .arg(SWEEP)
        .arg(spend_ttl);
    call
}

fn period_from_letter(letter: &str) -> Option<BudgetPeriod> {
    match letter {
        "l" => Some(BudgetPeriod::Lifetime),
        "d" => Some(BudgetPeriod::Daily),
        "m" => Some(BudgetPeriod::Monthly),
        _ => None,
    }
}

/// How long a period's spend counter is kept after its last write: a little over the period
/// (none for a lifetime cap).
fn spend_ttl_secs(period: BudgetPeriod) -> u64 {
    match period {
        BudgetPeriod::Lifetime => 0,
        BudgetPeriod::Daily => 8 * 86_400,
        BudgetPeriod::Monthly => 62 * 86_400,
    }
}

/// The task that sends queued writes, up to [`IN_FLIGHT`] at a time. Ends when the store is
/// dropped and the queue is empty.
async fn send_jobs(shared: std::sync::Weak<Shared>, mut jobs: mpsc::Receiver<Job>) {
    let mut running = JoinSet::new();
    while let Some(job) = jobs.recv().await {
        let Some(store) = shared.upgrade() else {
            return;
        };
        if let Job::Flush(done) = job {
            while running.join_next().await.is_some() {}
            let _ = done.send(());
            continue;
        }
        while running.len() >= IN_FLIGHT {
            running.join_next().await;
        }
        running.spawn(send_job(store, job));
    }
    while running.join_next().await.is_some() {}
}

/// Sends one write, retrying with backoff until it lands or its reservation would have
/// expired anyway.
async fn send_job(store: Arc<Shared>, job: Job) {
    let deadline = store.reservation_ttl;
    let mut pause = Duration::from_millis(20);
    loop {
        let mut conn = store.conn.clone();
        let (sent, queued) = match &job {
            Job::Settle {
                keys,
                id,
                actual,
                spend_ttl,
                now,
                queued,
                watch,
            } => {
                let mut call = ledger_call(&store.scripts.settle, keys, now, *spend_ttl);
                call.key(&keys.alerts).arg(id).arg(actual);
                watch_args(&mut call, watch.as_ref());
                (
                    call.invoke_async::<Vec<i64>>(&mut conn)
                        .await
                        .map(|answer| alert(watch.as_ref(), &answer)),
                    *queued,
                )
            }
            Job::Watch {
                keys,
                spend_ttl,
                now,
                queued,
                watch,
            } => {
                let mut call = ledger_call(&store.scripts.watch, keys, now, *spend_ttl);
                call.key(&keys.alerts);
                watch_args(&mut call, Some(watch));
                (
                    call.invoke_async::<Vec<i64>>(&mut conn)
                        .await
                        .map(|answer| alert(Some(watch), &answer)),
                    *queued,
                )
            }
            Job::Correct {
                keys,
                tpm,
                estimated,
                actual,
                now,
                queued,
            } => (
                store
                    .scripts
                    .correct
                    .key(&keys[0])
                    .key(&keys[1])
                    .arg(now)
                    .arg(-1)
                    .arg(limit_arg(Some(*tpm)))
                    .arg(estimated)
                    .arg(actual)
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map(drop),
                *queued,
            ),
            Job::Flush(_) => return,
        };
        match sent {
            Ok(()) => return,
            Err(_) if queued.elapsed() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(_) => {
                store.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// The arguments of [`ALERTS`]: the cap (0 when not watched) and the thresholds.
fn watch_args(call: &mut redis::ScriptInvocation<'_>, watch: Option<&SpendWatch>) {
    match watch {
        Some(watch) => {
            call.arg(cap_nanos(watch.cap_usd));
            for percent in watch.percents.iter() {
                call.arg(percent);
            }
        }
        None => {
            call.arg(0);
        }
    }
}

/// Sends the alerts of a script's answer `{1, spent, percent...}`.
fn alert(watch: Option<&SpendWatch>, answer: &[i64]) {
    let (Some(watch), [1, spent, percents @ ..]) = (watch, answer) else {
        return;
    };
    let spent = to_usd(u64::try_from(*spent).unwrap_or(0));
    for &percent in percents {
        if let Ok(percent) = u8::try_from(percent) {
            watch.alert(percent, spent);
        }
    }
}

/// A [`SpendLedger`] in Redis: see [`RedisStore`]. Clones share the store.
///
/// Reservation ids are `seq/period/name` (`seq` counted in Redis per key), so that any
/// replica can settle any reservation.
#[derive(Clone, Debug)]
pub struct RedisLedger {
    store: RedisStore,
}

impl RedisLedger {
    /// The store this ledger writes to.
    pub fn store(&self) -> &RedisStore {
        &self.store
    }

    fn settle_with(&self, id: &ReservationId, actual_usd: f64, watch: Option<SpendWatch>) {
        let shared = &self.store.shared;
        let Some((seq, period, name)) = parse_id(id.as_str()) else {
            // Not an id of this ledger: nothing is open under it.
            return;
        };
        let index = shared.period_index(period);
        shared.enqueue(Job::Settle {
            keys: shared.ledger_keys(&name, period, index),
            id: seq.to_owned(),
            actual: to_nanos(actual_usd),
            spend_ttl: spend_ttl_secs(period),
            now: shared.now_arg(),
            queued: Instant::now(),
            watch,
        });
    }
}

/// Reads a reservation id back: `(period, name)`.
fn parse_id(id: &str) -> Option<(&str, BudgetPeriod, String)> {
    let mut parts = id.splitn(3, '/');
    let seq = parts.next()?;
    let period = period_from_letter(parts.next()?)?;
    let name = unescape(parts.next()?)?;
    Some((seq, period, name))
}

fn unescape(escaped: &str) -> Option<String> {
    if !escaped.contains('%') {
        return Some(escaped.to_owned());
    }
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3)?;
        out.push(match code {
            "25" => '%',
            "7B" => '{',
            "7D" => '}',
            "2F" => '/',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

fn nanos_of(value: &str) -> u64 {
    value.parse::<u64>().unwrap_or(0)
}

impl SpendLedger for RedisLedger {
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        amount_usd: f64,
        cap_usd: f64,
        period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Reservation, ReserveError>> {
        Box::pin(async move {
            let shared = &self.store.shared;
            let index = shared.period_index(period);
            let keys = shared.ledger_keys(key, period, index);
            let amount = to_nanos(amount_usd);
            let cap = cap_nanos(cap_usd);
            let tag = period_tag(period, index);
            let mut conn = shared.conn.clone();
            let (granted, spent, held, seq): (i64, String, String, String) = ledger_call(
                &shared.scripts.reserve,
                &keys,
                &shared.now_arg(),
                spend_ttl_secs(period),
            )
            .key(&keys.seq)
            .arg(amount)
            .arg(cap)
            .arg(&tag)
            .arg(u64::try_from(shared.reservation_ttl.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| ReserveError::Unavailable(unavailable(e)))?;
            let (spent, held) = (nanos_of(&spent), nanos_of(&held));
            if granted != 1 {
                return Err(ReserveError::Refused(Refused {
                    cap_usd,
                    spend: Spend {
                        spent_usd: to_usd(spent),
                        reserved_usd: to_usd(held),
                    },
                    amount_usd,
                }));
            }
            Ok(Reservation {
                id: ReservationId::new(format!("{seq}/{}/{}", tag_letter(period), escape(key))),
                amount_usd: to_usd(amount),
                headroom_usd: Some(to_usd(cap.saturating_sub(spent.saturating_add(held)))),
            })
        })
    }

    fn settle(&self, id: &ReservationId, actual_usd: f64) {
        self.settle_with(id, actual_usd, None);
    }

    /// Settles in the same script that marks the thresholds reached (once for every
    /// replica: a set per account and period in Redis), and alerts from the task that sends
    /// the queued settlement, when Redis has answered.
    fn settle_watched(&self, id: &ReservationId, actual_usd: f64, watch: SpendWatch) {
        self.settle_with(id, actual_usd, Some(watch));
    }

    fn watch(&self, watch: SpendWatch) {
        let shared = &self.store.shared;
        let period = watch.period;
        let index = shared.period_index(period);
        shared.enqueue(Job::Watch {
            keys: shared.ledger_keys(&watch.account, period, index),
            spend_ttl: spend_ttl_secs(period),
            now: shared.now_arg(),
            queued: Instant::now(),
            watch,
        });
    }

    fn extend(&self, id: &ReservationId, more_usd: f64, cap_usd: f64) -> BoxFuture<'static, bool> {
        let shared = self.store.shared.clone();
        let id = id.clone();
        Box::pin(async move {
            let Some((seq, period, name)) = parse_id(id.as_str()) else {
                return false;
            };
            let index = shared.period_index(period);
            let keys = shared.ledger_keys(&name, period, index);
            let mut conn = shared.conn.clone();
            ledger_call(
                &shared.scripts.extend,
                &keys,
                &shared.now_arg(),
                spend_ttl_secs(period),
            )
            .arg(seq)
            .arg(to_nanos(more_usd))
            .arg(cap_nanos(cap_usd))
            .arg(period_tag(period, index))
            .invoke_async::<i64>(&mut conn)
            .await
            .is_ok_and(|granted| granted == 1)
        })
    }

    fn spent<'a>(
        &'a self,
        key: &'a str,
        period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Spend, StoreError>> {
        Box::pin(async move {
            let shared = &self.store.shared;
            let keys = shared.ledger_keys(key, period, shared.period_index(period));
            let mut conn = shared.conn.clone();
            let (spent, held): (String, String) = ledger_call(
                &shared.scripts.spent,
                &keys,
                &shared.now_arg(),
                spend_ttl_secs(period),
            )
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
            Ok(Spend {
                spent_usd: to_usd(nanos_of(&spent)),
                reserved_usd: to_usd(nanos_of(&held)),
            })
        })
    }
}

/// A [`RateLimiter`] in Redis, with the token buckets of
/// [`MemoryRateLimiter`](super::MemoryRateLimiter): see [`RedisStore`]. Clones share the
/// store.
#[derive(Clone, Debug)]
pub struct RedisRateLimiter {
    store: RedisStore,
}

impl RedisRateLimiter {
    /// The store this limiter writes to.
    pub fn store(&self) -> &RedisStore {
        &self.store
    }
}

/// A limit for the scripts: -1 for none.
fn limit_arg(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

fn limit_state(limit: i64, remaining: i64, reset_ms: i64) -> Option<LimitState> {
    (limit >= 0).then(|| LimitState {
        limit: limit as u64,
        remaining: remaining.max(0) as u64,
        reset: Duration::from_millis(reset_ms.max(0) as u64),
    })
}

impl RateLimiter for RedisRateLimiter {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        limits: RateLimits,
        tokens: u64,
    ) -> BoxFuture<'a, Result<RateDecision, StoreError>> {
        Box::pin(async move {
            let shared = &self.store.shared;
            let keys = shared.bucket_keys(key);
            let mut conn = shared.conn.clone();
            let r: Vec<i64> = shared
                .scripts
                .acquire
                .key(&keys[0])
                .key(&keys[1])
                .arg(shared.now_arg())
                .arg(limit_arg(limits.requests_per_minute))
                .arg(limit_arg(limits.tokens_per_minute))
                .arg(tokens)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let [limited, retry_ms, rl, rr, rs, tl, tr, ts] = r[..] else {
                return Err(StoreError::new("redis: an answer of the wrong shape"));
            };
            Ok(RateDecision {
                limited_by: match limited {
                    1 => Some(RateKind::Requests),
                    2 => Some(RateKind::Tokens),
                    _ => None,
                },
                retry_after: if retry_ms < 0 {
                    Duration::MAX
                } else {
                    Duration::from_millis(retry_ms as u64)
                },
                requests: limit_state(rl, rr, rs),
                tokens: limit_state(tl, tr, ts),
            })
        })
    }

    fn correct(&self, key: &str, limits: RateLimits, estimated: u64, actual: u64) {
        let Some(tpm) = limits.tokens_per_minute else {
            return;
        };
        if estimated == actual {
            return;
        }
        let shared = &self.store.shared;
        shared.enqueue(Job::Correct {
            keys: shared.bucket_keys(key),
            tpm,
            estimated,
            actual,
            now: shared.now_arg(),
            queued: Instant::now(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_so_that_each_has_its_own_keys() {
        assert_eq!(escape("team-a"), "team-a");
        assert_eq!(escape("a}b{c%d/e"), "a%7Db%7Bc%25d%2Fe");
        for name in ["team-a", "a}b{c%d/e", "%7D", "/", "ü/%"] {
            let id = format!("12/m/{}", escape(name));
            let (seq, period, back) = parse_id(&id).unwrap();
            assert_eq!(
                (seq, period, back.as_str()),
                ("12", BudgetPeriod::Monthly, name)
            );
        }
        assert!(parse_id("12/x/name").is_none());
        assert!(parse_id("12/d/%zz").is_none());
        assert!(parse_id("12").is_none());
    }
}
