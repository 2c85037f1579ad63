//! The quota's state: a spend ledger round (reserve, then settle) and a rate limiter round,
//! in memory and in Redis, against one bare Redis round trip.
//!
//! `cargo bench --bench quota --features redis` (needs `redis-server` on the `PATH`, or
//! `REDIS_SERVER=/path/to/redis-server`: the bench starts its own on a free loopback port,
//! without persistence, and stops it at the end).
//!
//! In memory (one iteration is one round; the futures are ready, so they are polled once
//! rather than run on a runtime, which would add its own cost to a figure this small):
//! - `memory_ledger_reserve_settle`: [`MemoryLedger`] `reserve` then `settle` (a cap that
//!   never refuses);
//! - `memory_rate_acquire_correct`: [`MemoryRateLimiter`] `acquire` then `correct` (limits
//!   that never refuse, a usage below the estimate).
//!
//! In Redis (one iteration is [`ROUNDS`] operations in a row on a current-thread Tokio
//! runtime; the throughput column is per operation, the time column divided by [`ROUNDS`]
//! too):
//! - `redis_ping`: `PING` ([`RedisStore::ping`]), the baseline: one round trip;
//! - `redis_ledger_reserve_settle`: [`RedisLedger`] `reserve` then `settle`, then one
//!   [`RedisStore::flush`] at the end of the iteration, so that the settlements (queued and
//!   sent by the store's task, overlapping the next reservations) are all counted;
//! - `redis_ledger_reserve`: the `reserve` alone (on a key of its own, its reservations left
//!   open), to tell the reservation's script from the settlement's;
//! - `redis_rate_acquire`: [`RedisRateLimiter`] `acquire`.
//!
//! Read the Redis figures as multiples of `redis_ping` (same [`ROUNDS`], so the ratio of the
//! medians is the ratio per operation). A reserve and a rate limit check are one script each,
//! a round of the ledger two (reserve, settle): one and two round trips are their network
//! floor, and what they take above it is the scripts' work in Redis and the client's. The
//! memory figures are what the default [`QuotaLayer::in_memory`] adds to a request with a cap
//! and rate limits.
//!
//! [`QuotaLayer::in_memory`]: tower_llm_policy::quota::QuotaLayer::in_memory

#[path = "../tests/common/redis.rs"]
mod redis_server;

use std::future::Future;
use std::pin::pin;
use std::sync::{LazyLock, OnceLock};
use std::task::{Context, Poll, Waker};

use divan::{black_box, counter::ItemsCount, Bencher};
use redis_server::RedisServer;
use tokio::runtime::Runtime;
use tower_llm_policy::quota::{
    BudgetPeriod, MemoryLedger, MemoryRateLimiter, RateLimiter, RateLimits, RedisLedger,
    RedisRateLimiter, RedisStore, SpendLedger,
};

/// Redis operations per iteration of a Redis bench.
const ROUNDS: usize = 32;

/// What a round reserves and settles (USD), against a cap it never reaches.
const AMOUNT: f64 = 0.01;
const ACTUAL: f64 = 0.004;
const CAP: f64 = 1e9;

/// Limits that never refuse: a request of [`TOKENS`] tokens, corrected to [`USED`].
const LIMITS: RateLimits = RateLimits {
    requests_per_minute: Some(1_000_000_000),
    tokens_per_minute: Some(1_000_000_000_000),
};
const TOKENS: u64 = 1000;
const USED: u64 = 800;

/// The URL of the bench's `redis-server`, set by [`main`] before the benches run.
static REDIS_URL: OnceLock<String> = OnceLock::new();

fn main() {
    let server = RedisServer::start();
    REDIS_URL.set(server.url()).unwrap();
    divan::main();
    drop(server);
}

/// The runtime and the store every Redis bench shares, connected and with its scripts
/// loaded before the first sample.
struct Redis {
    rt: Runtime,
    store: RedisStore,
    ledger: RedisLedger,
    limiter: RedisRateLimiter,
}

static REDIS: LazyLock<Redis> = LazyLock::new(|| {
    // One thread: the bench's futures, the connection's and the settlement queue's tasks
    // take turns on it (no wake-up across threads in each round trip), and `redis-server`
    // has a core of its own on a small machine.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = REDIS_URL.get().expect("main starts redis-server first");
    let store = rt.block_on(async { RedisStore::open(url) }).unwrap();
    let (ledger, limiter) = (store.ledger(), store.rate_limiter());
    rt.block_on(async {
        store.ping().await.unwrap();
        let held = ledger
            .reserve("warm-up", AMOUNT, CAP, BudgetPeriod::Monthly)
            .await
            .unwrap();
        ledger.settle(&held.id, ACTUAL);
        store.flush().await;
        limiter.acquire("warm-up", LIMITS, TOKENS).await.unwrap();
    });
    assert_eq!((store.dropped(), store.failed()), (0, 0));
    Redis {
        rt,
        store,
        ledger,
        limiter,
    }
});

/// Polls a future that never waits (the in-memory ledger and limiter answer at once).
fn now<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("the in-memory state never waits"),
    }
}

#[divan::bench(sample_size = 1000)]
fn memory_ledger_reserve_settle(bencher: Bencher<'_, '_>) {
    let ledger = MemoryLedger::new();
    bencher.bench_local(|| {
        let held = now(ledger.reserve(
            black_box("team-a"),
            black_box(AMOUNT),
            CAP,
            BudgetPeriod::Monthly,
        ))
        .unwrap();
        ledger.settle(&held.id, black_box(ACTUAL));
    });
}

#[divan::bench(sample_size = 1000)]
fn memory_rate_acquire_correct(bencher: Bencher<'_, '_>) {
    let limiter = MemoryRateLimiter::new();
    bencher.bench_local(|| {
        let decision =
            now(limiter.acquire(black_box("team-a"), LIMITS, black_box(TOKENS))).unwrap();
        debug_assert!(decision.limited_by.is_none());
        limiter.correct("team-a", LIMITS, TOKENS, black_box(USED));
        decision
    });
}

#[divan::bench(sample_count = 60)]
fn redis_ping(bencher: Bencher<'_, '_>) {
    let redis = &*REDIS;
    bencher.counter(ItemsCount::new(ROUNDS)).bench_local(|| {
        redis.rt.block_on(async {
            for _ in 0..ROUNDS {
                redis.store.ping().await.unwrap();
            }
        })
    });
}

#[divan::bench(sample_count = 60)]
fn redis_ledger_reserve_settle(bencher: Bencher<'_, '_>) {
    let redis = &*REDIS;
    bencher.counter(ItemsCount::new(ROUNDS)).bench_local(|| {
        redis.rt.block_on(async {
            for _ in 0..ROUNDS {
                let held = redis
                    .ledger
                    .reserve(black_box("team-a"), AMOUNT, CAP, BudgetPeriod::Monthly)
                    .await
                    .unwrap();
                redis.ledger.settle(&held.id, black_box(ACTUAL));
            }
            redis.store.flush().await;
        })
    });
    assert_eq!((redis.store.dropped(), redis.store.failed()), (0, 0));
}

#[divan::bench(sample_count = 60)]
fn redis_ledger_reserve(bencher: Bencher<'_, '_>) {
    let redis = &*REDIS;
    bencher.counter(ItemsCount::new(ROUNDS)).bench_local(|| {
        redis.rt.block_on(async {
            for _ in 0..ROUNDS {
                let held = redis
                    .ledger
                    .reserve(black_box("team-b"), AMOUNT, CAP, BudgetPeriod::Monthly)
                    .await
                    .unwrap();
                black_box(held);
            }
        })
    });
}

#[divan::bench(sample_count = 60)]
fn redis_rate_acquire(bencher: Bencher<'_, '_>) {
    let redis = &*REDIS;
    bencher.counter(ItemsCount::new(ROUNDS)).bench_local(|| {
        redis.rt.block_on(async {
            for _ in 0..ROUNDS {
                let decision = redis
                    .limiter
                    .acquire(black_box("team-a"), LIMITS, TOKENS)
                    .await
                    .unwrap();
                debug_assert!(decision.limited_by.is_none());
            }
        })
    });
}
