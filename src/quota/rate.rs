//! Rate limits: requests and tokens per minute, per key.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::period::{Clock, SystemClock};
use crate::keys::{BoxFuture, StoreError};

/// A key's rate limits (its `rpm` and `tpm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateLimits {
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Tokens (prompt and completion) per minute.
    pub tokens_per_minute: Option<u64>,
}

impl RateLimits {
    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none()
    }
}

/// Which limit a request hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateKind {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
}

/// One limit's state, as sent in the `x-ratelimit-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitState {
    /// The limit per minute (`x-ratelimit-limit-*`).
    pub limit: u64,
    /// What is left now (`x-ratelimit-remaining-*`).
    pub remaining: u64,
    /// How long until the limit is back to its full value (`x-ratelimit-reset-*`).
    pub reset: Duration,
}

/// A rate limiter's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateDecision {
    /// `None`: allowed, and counted. `Some`: refused by that limit, and nothing counted.
    pub limited_by: Option<RateKind>,
    /// How long until the request could pass (when refused). `Duration::MAX` when it never
    /// can: it asks for more tokens than the limit per minute.
    pub retry_after: Duration,
    /// The requests limit's state, when the key has one.
    pub requests: Option<LimitState>,
    /// The tokens limit's state, when the key has one.
    pub tokens: Option<LimitState>,
}

/// Counts requests and tokens per key against its [`RateLimits`]. Object safe: hold it as
/// `Arc<dyn RateLimiter>`.
///
/// [`acquire`](Self::acquire) checks both limits and counts the request against both in one
/// atomic step (a request refused by one limit takes nothing from the other). The tokens are
/// an estimate made before the request runs; [`correct`](Self::correct) puts the difference
/// to the real usage right when the response ends. Like
/// [`SpendLedger::settle`](super::SpendLedger::settle), `correct` is synchronous and must not
/// block.
pub trait RateLimiter: Send + Sync + 'static {
    /// Counts one request of `tokens` (estimated) against `key`'s `limits`, or refuses it.
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        limits: RateLimits,
        tokens: u64,
    ) -> BoxFuture<'a, Result<RateDecision, StoreError>>;

    /// Corrects an acquired request's `estimated` tokens to the `actual` usage.
    fn correct(&self, key: &str, limits: RateLimits, estimated: u64, actual: u64);
}

impl<T: RateLimiter + ?Sized> RateLimiter for Arc<T> {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        limits: RateLimits,
        tokens: u64,
    ) -> BoxFuture<'a, Result<RateDecision, StoreError>> {
        (**self).acquire(key, limits, tokens)
    }
    fn correct(&self, key: &str, limits: RateLimits, estimated: u64, actual: u64) {
        (**self).correct(key, limits, estimated, actual)
    }
}

/// A [`RateLimiter`] in this process's memory, with **token buckets**, as OpenAI limits
/// rates: each limit is a bucket holding up to the limit, full at first, that refills
/// continuously at the limit per minute (an `rpm` of 60 gives back one request a second). A
/// request takes one from the requests bucket and its estimated tokens from the tokens
/// bucket; usage above the estimate is taken when it is known, and can leave the tokens
/// bucket below zero (the next requests wait for it to refill), usage below the estimate is
/// given back. So a key may burst up to its whole limit at once, then goes on at the
/// limit's pace; the `x-ratelimit-reset-*` headers say when the bucket will be full again.
///
/// Clones share the buckets.
#[derive(Clone)]
pub struct MemoryRateLimiter {
    buckets: Arc<Mutex<HashMap<Arc<str>, Buckets>>>,
    clock: Arc<dyn Clock>,
}

#[derive(Clone, Copy, Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// A token bucket's level (may be below zero after a correction) and when it was last filled.
#[derive(Clone, Copy)]
struct Bucket {
    limit: u64,
    level: f64,
    at: SystemTime,
}

impl Bucket {
    fn full(limit: u64, now: SystemTime) -> Self {
        Bucket {
            limit,
            level: limit as f64,
            at: now,
        }
    }

    /// Per second.
    fn rate(&self) -> f64 {
        self.limit as f64 / 60.0
    }

    /// Refills up to `now` (a clock that went back refills nothing), and follows a changed
    /// limit.
    fn refill(&mut self, limit: u64, now: SystemTime) {
        if limit != self.limit {
            // A new limit: keep what was used, against the new size.
            let used = self.limit as f64 - self.level;
            self.limit = limit;
            self.level = limit as f64 - used;
        }
        let elapsed = now.duration_since(self.at).unwrap_or(Duration::ZERO);
        self.level = (self.level + elapsed.as_secs_f64() * self.rate()).min(self.limit as f64);
        self.at = self.at.max(now);
    }

    /// How long until `need` is in the bucket.
    fn wait_for(&self, need: f64) -> Duration {
        if self.level >= need {
            return Duration::ZERO;
        }
        if self.rate() <= 0.0 {
            return Duration::MAX;
        }
        Duration::try_from_secs_f64((need - self.level) / self.rate()).unwrap_or(Duration::MAX)
    }

    fn state(&self) -> LimitState {
        LimitState {
            limit: self.limit,
            remaining: self.level.max(0.0).floor() as u64,
            reset: self.wait_for(self.limit as f64),
        }
    }
}

fn bucket(slot: &mut Option<Bucket>, limit: Option<u64>, now: SystemTime) -> Option<&mut Bucket> {
    match limit {
        None => {
            *slot = None;
            None
        }
        Some(limit) => {
            let bucket = slot.get_or_insert_with(|| Bucket::full(limit, now));
            bucket.refill(limit, now);
            Some(bucket)
        }
    }
}

impl Default for MemoryRateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryRateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRateLimiter")
            .field("keys", &self.lock().len())
            .finish()
    }
}

impl MemoryRateLimiter {
    /// A limiter on the system clock.
    pub fn new() -> Self {
        MemoryRateLimiter {
            buckets: Arc::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Reads the time (which refills the buckets) from `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Buckets>> {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acquire_now(&self, key: &str, limits: RateLimits, tokens: u64) -> RateDecision {
        let now = self.clock.now();
        let mut map = self.lock();
        if !map.contains_key(key) {
            map.insert(Arc::from(key), Buckets::default());
        }
        let entry = map.get_mut(key).expect("inserted if it was missing");
        let mut requests = bucket(&mut entry.requests, limits.requests_per_minute, now);
        let mut token_bucket = bucket(&mut entry.tokens, limits.tokens_per_minute, now);

        let mut limited_by = None;
        let mut retry_after = Duration::ZERO;
        if let Some(b) = requests.as_deref() {
            if b.level < 1.0 {
                limited_by = Some(RateKind::Requests);
                retry_after = b.wait_for(1.0);
            }
        }
        if let (None, Some(b)) = (limited_by, token_bucket.as_deref()) {
            if tokens > b.limit {
                limited_by = Some(RateKind::Tokens);
                retry_after = Duration::MAX;
            } else if b.level < tokens as f64 {
                limited_by = Some(RateKind::Tokens);
                retry_after = b.wait_for(tokens as f64);
            }
        }
        if limited_by.is_none() {
            if let Some(b) = requests.as_deref_mut() {
                b.level -= 1.0;
            }
            if let Some(b) = token_bucket.as_deref_mut() {
                b.level -= tokens as f64;
            }
        }
        RateDecision {
            limited_by,
            retry_after,
            requests: requests.map(|b| b.state()),
            tokens: token_bucket.map(|b| b.state()),
        }
    }
}

impl RateLimiter for MemoryRateLimiter {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        limits: RateLimits,
        tokens: u64,
    ) -> BoxFuture<'a, Result<RateDecision, StoreError>> {
        Box::pin(std::future::ready(
            Ok(self.acquire_now(key, limits, tokens)),
        ))
    }

    fn correct(&self, key: &str, limits: RateLimits, estimated: u64, actual: u64) {
        if estimated == actual {
            return;
        }
        let now = self.clock.now();
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(key) {
            if let Some(b) = bucket(&mut entry.tokens, limits.tokens_per_minute, now) {
                b.level = (b.level + estimated as f64 - actual as f64).min(b.limit as f64);
            }
        }
    }
}
