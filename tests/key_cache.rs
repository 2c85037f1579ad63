//! CachedKeyStore: hits and misses, TTLs, bounds, a random-key flood, expiry through KeyAuth,
//! invalidation (also racing a lookup in flight), store errors, single flight.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{answer, chat, post, with_key, Inner};
use http::StatusCode;
use tokio::sync::{mpsc, Semaphore};
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_policy::keys::{BoxFuture, CachedKeyStore, StoreError};
use tower_llm_policy::quota::ManualClock;
use tower_llm_policy::{ApiKey, KeyAuthLayer, KeyDigest, KeyStore};

/// A store that stands for a database: answers only asynchronously, counts its lookups, can
/// fail, and can be held (each lookup reads its answer, says it started, then waits for a
/// permit before answering).
#[derive(Default)]
struct Db {
    keys: Mutex<HashMap<KeyDigest, Arc<ApiKey>>>,
    calls: AtomicUsize,
    failing: AtomicBool,
    /// The next lookup panics (once), after the gate.
    panics: AtomicBool,
    gate: Option<Gate>,
}

struct Gate {
    permits: Semaphore,
    started: mpsc::UnboundedSender<()>,
}

impl Db {
    fn with(self, secret: &str, key: ApiKey) -> Self {
        self.put(secret, key);
        self
    }

    /// A held store, and the receiver that hears each lookup start.
    fn held() -> (Self, mpsc::UnboundedReceiver<()>) {
        let (started, rx) = mpsc::unbounded_channel();
        let db = Db {
            gate: Some(Gate {
                permits: Semaphore::new(0),
                started,
            }),
            ..Db::default()
        };
        (db, rx)
    }

    fn put(&self, secret: &str, key: ApiKey) {
        self.keys
            .lock()
            .unwrap()
            .insert(KeyDigest::of(secret), Arc::new(key));
    }

    fn release(&self, n: usize) {
        self.gate.as_ref().unwrap().permits.add_permits(n);
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl KeyStore for Db {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            // The row is read first; a held store then holds the answer on its way back.
            let answer = if self.failing.load(Ordering::SeqCst) {
                Err(StoreError::new("database down"))
            } else {
                Ok(self.keys.lock().unwrap().get(digest).cloned())
            };
            if let Some(gate) = &self.gate {
                let _ = gate.started.send(());
                gate.permits.acquire().await.unwrap().forget();
            }
            if self.panics.swap(false, Ordering::SeqCst) {
                panic!("the store panicked");
            }
            answer
        })
    }
}

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn cache(db: Db) -> (Arc<CachedKeyStore<Arc<Db>>>, Arc<Db>, ManualClock) {
    let db = Arc::new(db);
    let clock = ManualClock::new(t0());
    let cache = CachedKeyStore::new(db.clone()).clock(clock.clone());
    (Arc::new(cache), db, clock)
}

async fn name_of(store: &dyn KeyStore, secret: &str) -> Option<String> {
    store
        .lookup(&KeyDigest::of(secret))
        .await
        .unwrap()
        .map(|k| k.name.clone())
}

fn random_digest(n: u64) -> KeyDigest {
    KeyDigest::of(&format!("sk-random-{n}"))
}

#[tokio::test]
async fn a_found_key_is_fetched_once_then_served_from_the_cache() {
    let (cache, db, _) = cache(Db::default().with("sk-a", ApiKey::new("a")));
    for _ in 0..5 {
        assert_eq!(name_of(&*cache, "sk-a").await.as_deref(), Some("a"));
    }
    assert_eq!(db.calls(), 1);
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits, stats.entries), (1, 4, 1));
}

#[tokio::test]
async fn lookup_now_is_none_on_a_miss_and_answers_a_fresh_entry() {
    let (cache, db, _) = cache(Db::default().with("sk-a", ApiKey::new("a")));
    let a = KeyDigest::of("sk-a");
    let unknown = KeyDigest::of("sk-nope");
    assert!(cache.lookup_now(&a).is_none());
    assert!(cache.lookup_now(&unknown).is_none());
    cache.lookup(&a).await.unwrap();
    cache.lookup(&unknown).await.unwrap();
    let found = cache.lookup_now(&a).unwrap().unwrap().unwrap();
    assert_eq!(found.name, "a");
    assert!(cache.lookup_now(&unknown).unwrap().unwrap().is_none());
    assert_eq!(db.calls(), 2);
}

#[tokio::test]
async fn a_found_key_is_asked_again_after_the_ttl() {
    let db = Db::default().with("sk-a", ApiKey::new("a"));
    let clock = ManualClock::new(t0());
    let db = Arc::new(db);
    let cache = CachedKeyStore::new(db.clone())
        .ttl(Duration::from_secs(30))
        .clock(clock.clone());
    name_of(&cache, "sk-a").await;
    clock.advance(Duration::from_millis(29_999));
    name_of(&cache, "sk-a").await;
    assert_eq!(db.calls(), 1);
    // A change in the store is seen once the entry is stale.
    db.put("sk-a", ApiKey::new("a-renamed"));
    clock.advance(Duration::from_millis(1));
    assert_eq!(name_of(&cache, "sk-a").await.as_deref(), Some("a-renamed"));
    assert_eq!(db.calls(), 2);
}

#[tokio::test]
async fn an_unknown_key_reaches_the_store_once_within_the_negative_ttl() {
    let db = Arc::new(Db::default());
    let clock = ManualClock::new(t0());
    let cache = CachedKeyStore::new(db.clone())
        .negative_ttl(Duration::from_secs(2))
        .clock(clock.clone());
    for _ in 0..100 {
        assert_eq!(name_of(&cache, "sk-wrong").await, None);
    }
    assert_eq!(db.calls(), 1);
    assert_eq!(cache.stats().negative_hits, 99);
    assert_eq!(cache.stats().hits, 0);
    clock.advance(Duration::from_secs(2));
    assert_eq!(name_of(&cache, "sk-wrong").await, None);
    assert_eq!(db.calls(), 2);
}

#[tokio::test]
async fn a_key_added_to_the_store_is_found_after_the_negative_ttl() {
    let (cache, db, clock) = cache(Db::default());
    assert_eq!(name_of(&*cache, "sk-new").await, None);
    db.put("sk-new", ApiKey::new("new"));
    assert_eq!(
        name_of(&*cache, "sk-new").await,
        None,
        "still cached unknown"
    );
    clock.advance(Duration::from_secs(2));
    assert_eq!(name_of(&*cache, "sk-new").await.as_deref(), Some("new"));
    assert_eq!(cache.stats().negative_entries, 0, "no longer unknown");
}

#[tokio::test]
async fn a_clock_set_back_does_not_stretch_the_ttl() {
    let (cache, db, clock) = cache(Db::default().with("sk-a", ApiKey::new("a")));
    name_of(&*cache, "sk-a").await;
    clock.set(t0() - Duration::from_secs(3600));
    name_of(&*cache, "sk-a").await;
    assert_eq!(db.calls(), 2);
}

#[tokio::test]
async fn the_cache_holds_at_most_max_entries_found_keys() {
    let db = Db::default();
    for n in 0..100 {
        db.put(&format!("sk-{n}"), ApiKey::new(format!("k{n}")));
    }
    let db = Arc::new(db);
    let cache = CachedKeyStore::new(db.clone()).max_entries(10);
    for n in 0..100 {
        name_of(&cache, &format!("sk-{n}")).await;
    }
    let stats = cache.stats();
    assert_eq!(stats.entries, 10);
    assert_eq!(stats.evictions, 90);
    // The last ten are the ones kept.
    for n in 90..100 {
        name_of(&cache, &format!("sk-{n}")).await;
    }
    assert_eq!(db.calls(), 100);
}

#[tokio::test]
async fn a_hit_key_survives_a_sweep_that_evicts_others() {
    let db = Db::default();
    for n in 0..4 {
        db.put(&format!("sk-{n}"), ApiKey::new(format!("k{n}")));
    }
    let db = Arc::new(db);
    let cache = CachedKeyStore::new(db.clone()).max_entries(3);
    for n in 0..3 {
        name_of(&cache, &format!("sk-{n}")).await;
    }
    name_of(&cache, "sk-0").await; // a hit: second chance
    name_of(&cache, "sk-3").await; // evicts sk-1, not sk-0
    assert_eq!(db.calls(), 4);
    name_of(&cache, "sk-0").await;
    assert_eq!(db.calls(), 4, "sk-0 kept");
    name_of(&cache, "sk-1").await;
    assert_eq!(db.calls(), 5, "sk-1 evicted");
}

#[tokio::test]
async fn a_flood_of_random_keys_neither_evicts_real_keys_nor_grows_the_cache() {
    let db = Db::default();
    for n in 0..20 {
        db.put(&format!("sk-real-{n}"), ApiKey::new(format!("real-{n}")));
    }
    let (cache, db, _) = cache(db);
    for n in 0..20 {
        name_of(&*cache, &format!("sk-real-{n}")).await;
    }
    for n in 0..5_000 {
        assert!(cache.lookup(&random_digest(n)).await.unwrap().is_none());
    }
    let stats = cache.stats();
    assert_eq!(stats.negative_entries, 1_000, "the default negative bound");
    assert_eq!(stats.negative_evictions, 4_000);
    assert_eq!((stats.entries, stats.evictions), (20, 0));
    let calls = db.calls();
    for n in 0..20 {
        assert!(name_of(&*cache, &format!("sk-real-{n}")).await.is_some());
    }
    assert_eq!(db.calls(), calls, "every real key is still a hit");
}

#[tokio::test]
async fn max_negative_entries_bounds_the_unknown_keys() {
    let db = Arc::new(Db::default());
    let cache = CachedKeyStore::new(db.clone()).max_negative_entries(5);
    for n in 0..50 {
        cache.lookup(&random_digest(n)).await.unwrap();
    }
    assert_eq!(cache.stats().negative_entries, 5);
    // Nothing cached unknown at all: every lookup reaches the store.
    let db = Arc::new(Db::default());
    let cache = CachedKeyStore::new(db.clone()).max_negative_entries(0);
    for _ in 0..3 {
        cache.lookup(&random_digest(0)).await.unwrap();
    }
    assert_eq!(db.calls(), 3);
}

#[tokio::test]
async fn max_entries_zero_caches_no_found_key() {
    let db = Arc::new(Db::default().with("sk-a", ApiKey::new("a")));
    let cache = CachedKeyStore::new(db.clone()).max_entries(0);
    for _ in 0..3 {
        assert!(name_of(&cache, "sk-a").await.is_some());
    }
    assert_eq!(db.calls(), 3);
}

async fn through_key_auth(store: Arc<dyn KeyStore>, secret: &str) -> (StatusCode, Option<String>) {
    let svc = ServiceBuilder::new()
        .layer(KeyAuthLayer::new(store))
        .map_request(|r: http::Request<String>| r.map(tower_llm_policy::PolicyBody::from))
        .service(Inner::default().service());
    let resp = svc
        .oneshot(with_key(
            post("/v1/chat/completions", chat("gpt-4o")),
            secret,
        ))
        .await
        .unwrap();
    let a = answer(resp).await;
    let code = (a.status != StatusCode::OK).then(|| a.error().0);
    (a.status, code)
}

#[tokio::test]
async fn a_key_that_expires_while_cached_is_refused_through_key_auth_at_once() {
    // KeyAuth checks expiry against the wall clock, so this test waits for it to pass.
    let expires = SystemTime::now() + Duration::from_millis(500);
    let db = Arc::new(Db::default().with("sk-soon", ApiKey::new("soon").expires_at(expires)));
    let cache = Arc::new(CachedKeyStore::new(db.clone()).ttl(Duration::from_secs(3600)));
    assert_eq!(
        through_key_auth(cache.clone(), "sk-soon").await,
        (StatusCode::OK, None)
    );
    while SystemTime::now() <= expires {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        through_key_auth(cache.clone(), "sk-soon").await,
        (StatusCode::UNAUTHORIZED, Some("key_expired".into()))
    );
    assert_eq!(db.calls(), 1, "refused from the cache, within its TTL");
    assert_eq!(cache.stats().hits, 1);
}

#[tokio::test]
async fn an_expired_key_is_refused_from_the_cache_every_time() {
    let past = SystemTime::now() - Duration::from_secs(60);
    let db = Arc::new(Db::default().with("sk-old", ApiKey::new("old").expires_at(past)));
    let cache = Arc::new(CachedKeyStore::new(db.clone()));
    for _ in 0..3 {
        assert_eq!(
            through_key_auth(cache.clone(), "sk-old").await,
            (StatusCode::UNAUTHORIZED, Some("key_expired".into()))
        );
    }
    assert_eq!(db.calls(), 1);
}

#[tokio::test]
async fn key_auth_serves_cache_hits_and_refuses_unknown_keys() {
    let db = Arc::new(Db::default().with("sk-a", ApiKey::new("a")));
    let cache = Arc::new(CachedKeyStore::new(db.clone()));
    for _ in 0..3 {
        assert_eq!(
            through_key_auth(cache.clone(), "sk-a").await.0,
            StatusCode::OK
        );
        assert_eq!(
            through_key_auth(cache.clone(), "sk-b").await,
            (StatusCode::UNAUTHORIZED, Some("invalid_api_key".into()))
        );
    }
    assert_eq!(db.calls(), 2);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.negative_hits, stats.misses), (2, 2, 2));
}

#[tokio::test]
async fn invalidate_drops_one_digest_found_or_unknown() {
    let (cache, db, _) = cache(Db::default().with("sk-a", ApiKey::new("a")));
    name_of(&*cache, "sk-a").await;
    name_of(&*cache, "sk-new").await;
    db.put("sk-a", ApiKey::new("a2"));
    db.put("sk-new", ApiKey::new("new"));
    cache.invalidate(&KeyDigest::of("sk-a"));
    assert_eq!(name_of(&*cache, "sk-a").await.as_deref(), Some("a2"));
    assert_eq!(name_of(&*cache, "sk-new").await, None, "not invalidated");
    cache.invalidate(&KeyDigest::of("sk-new"));
    assert_eq!(name_of(&*cache, "sk-new").await.as_deref(), Some("new"));
    assert_eq!(db.calls(), 4);
}

#[tokio::test]
async fn invalidate_key_named_drops_that_key_and_the_unknown_ones_only() {
    let db = Db::default()
        .with("sk-a", ApiKey::new("a"))
        .with("sk-a-second", ApiKey::new("a"))
        .with("sk-b", ApiKey::new("b"));
    let (cache, db, _) = cache(db);
    for secret in ["sk-a", "sk-a-second", "sk-b", "sk-c"] {
        name_of(&*cache, secret).await;
    }
    assert_eq!(db.calls(), 4);
    db.put("sk-c", ApiKey::new("c"));
    cache.invalidate_key_named("a");
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.negative_entries), (1, 0));
    name_of(&*cache, "sk-b").await;
    assert_eq!(db.calls(), 4, "b is still cached");
    name_of(&*cache, "sk-a").await;
    name_of(&*cache, "sk-a-second").await;
    assert_eq!(name_of(&*cache, "sk-c").await.as_deref(), Some("c"));
    assert_eq!(db.calls(), 7);
}

#[tokio::test]
async fn invalidate_all_empties_the_cache() {
    let (cache, db, _) = cache(Db::default().with("sk-a", ApiKey::new("a")));
    name_of(&*cache, "sk-a").await;
    name_of(&*cache, "sk-x").await;
    cache.invalidate_all();
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.negative_entries), (0, 0));
    name_of(&*cache, "sk-a").await;
    name_of(&*cache, "sk-x").await;
    assert_eq!(db.calls(), 4);
}

#[tokio::test]
async fn the_invalidator_works_from_another_task() {
    let (cache, db, _) = cache(Db::default().with("sk-a", ApiKey::new("a")));
    name_of(&*cache, "sk-a").await;
    let invalidator = cache.invalidator();
    let digest = KeyDigest::of("sk-a");
    let task = {
        let invalidator = invalidator.clone();
        tokio::spawn(async move { invalidator.clone().invalidate(&digest) })
    };
    task.await.unwrap();
    assert_eq!(invalidator.stats().entries, 0);
    name_of(&*cache, "sk-a").await;
    assert_eq!(db.calls(), 2);
    invalidator.invalidate_key_named("a");
    assert_eq!(invalidator.stats().entries, 0);
    name_of(&*cache, "sk-a").await;
    name_of(&*cache, "sk-x").await;
    invalidator.invalidate_all();
    assert_eq!(
        (
            invalidator.stats().entries,
            invalidator.stats().negative_entries
        ),
        (0, 0)
    );
    assert_eq!(db.calls(), 4);
}

#[tokio::test]
async fn a_key_deleted_from_the_store_is_unknown_after_the_ttl() {
    let (cache, db, clock) = cache(Db::default().with("sk-a", ApiKey::new("a")));
    name_of(&*cache, "sk-a").await;
    db.keys.lock().unwrap().clear();
    assert!(name_of(&*cache, "sk-a").await.is_some(), "within the TTL");
    clock.advance(Duration::from_secs(30));
    assert_eq!(name_of(&*cache, "sk-a").await, None);
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.negative_entries), (0, 1));
    assert_eq!(name_of(&*cache, "sk-a").await, None);
    assert_eq!(db.calls(), 2);
}

#[test]
fn the_inner_store_is_reachable() {
    let db = Arc::new(Db::default().with("sk-a", ApiKey::new("a")));
    let cache = CachedKeyStore::new(db.clone());
    assert!(Arc::ptr_eq(cache.get_ref(), &db));
    assert!(Arc::ptr_eq(&cache.into_inner(), &db));
}

/// Waits until `n` lookups have joined one in flight (failing after 10 s, not hanging).
async fn until_coalesced(cache: &CachedKeyStore<Arc<Db>>, n: u64) {
    let wait = async {
        while cache.stats().coalesced < n {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("the lookups joined the one in flight");
}

/// Starts a lookup of `sk-a` on a held store, and returns once the store was asked.
async fn lookup_in_flight(
    cache: &Arc<CachedKeyStore<Arc<Db>>>,
    started: &mut mpsc::UnboundedReceiver<()>,
) -> tokio::task::JoinHandle<Option<String>> {
    let task = tokio::spawn({
        let cache = cache.clone();
        async move { name_of(&*cache, "sk-a").await }
    });
    started.recv().await.unwrap();
    task
}

#[tokio::test]
async fn an_invalidation_beats_a_lookup_in_flight() {
    type Invalidate = fn(&CachedKeyStore<Arc<Db>>);
    let ways: [(&str, Invalidate); 3] = [
        ("digest", |c| c.invalidate(&KeyDigest::of("sk-a"))),
        ("name", |c| c.invalidate_key_named("a")),
        ("all", |c| c.invalidate_all()),
    ];
    for (way, invalidate) in ways {
        let (db, mut started) = Db::held();
        let (cache, db, _) = cache(db.with("sk-a", ApiKey::new("a")));
        let task = lookup_in_flight(&cache, &mut started).await;
        // The key changes in the database while the old row is on its way.
        invalidate(&cache);
        db.put("sk-a", ApiKey::new("a-changed"));
        db.release(1);
        assert_eq!(task.await.unwrap().as_deref(), Some("a"), "{way}");
        assert_eq!(
            cache.stats().entries,
            0,
            "{way}: the stale row is not cached"
        );
        db.release(1);
        assert_eq!(
            name_of(&*cache, "sk-a").await.as_deref(),
            Some("a-changed"),
            "{way}"
        );
        assert_eq!(db.calls(), 2, "{way}");
    }
}

#[tokio::test]
async fn a_lookup_after_an_invalidation_does_not_join_the_stale_one() {
    let (db, mut started) = Db::held();
    let (cache, db, _) = cache(db.with("sk-a", ApiKey::new("a")));
    let stale = lookup_in_flight(&cache, &mut started).await;
    cache.invalidate(&KeyDigest::of("sk-a"));
    db.put("sk-a", ApiKey::new("a-changed"));
    let fresh = lookup_in_flight(&cache, &mut started).await;
    assert_eq!(db.calls(), 2, "a new lookup, not a waiter");
    db.release(2);
    assert_eq!(stale.await.unwrap().as_deref(), Some("a"));
    assert_eq!(fresh.await.unwrap().as_deref(), Some("a-changed"));
    assert_eq!(name_of(&*cache, "sk-a").await.as_deref(), Some("a-changed"));
    assert_eq!(db.calls(), 2);
}

#[tokio::test]
async fn an_invalidation_of_another_key_does_not_discard_a_lookup() {
    let (db, mut started) = Db::held();
    let (cache, db, _) = cache(db.with("sk-a", ApiKey::new("a")));
    let task = lookup_in_flight(&cache, &mut started).await;
    cache.invalidate(&KeyDigest::of("sk-other"));
    db.release(1);
    task.await.unwrap();
    assert_eq!(cache.stats().entries, 1);
}

#[tokio::test]
async fn store_errors_are_not_cached() {
    let (cache, db, _) = cache(Db::default().with("sk-a", ApiKey::new("a")));
    db.failing.store(true, Ordering::SeqCst);
    let digest = KeyDigest::of("sk-a");
    for _ in 0..2 {
        let err = cache.lookup(&digest).await.unwrap_err();
        assert_eq!(err.to_string(), "key store unavailable: database down");
        assert!(cache.lookup_now(&digest).is_none());
    }
    assert_eq!(db.calls(), 2);
    assert_eq!(
        (cache.stats().entries, cache.stats().negative_entries),
        (0, 0)
    );
    db.failing.store(false, Ordering::SeqCst);
    assert_eq!(name_of(&*cache, "sk-a").await.as_deref(), Some("a"));
    assert_eq!(db.calls(), 3);
}

#[tokio::test]
async fn a_store_error_through_key_auth_is_503_and_the_next_request_asks_again() {
    let db = Arc::new(Db::default().with("sk-a", ApiKey::new("a")));
    let cache = Arc::new(CachedKeyStore::new(db.clone()));
    db.failing.store(true, Ordering::SeqCst);
    assert_eq!(
        through_key_auth(cache.clone(), "sk-a").await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("policy_unavailable".into())
        )
    );
    db.failing.store(false, Ordering::SeqCst);
    assert_eq!(
        through_key_auth(cache.clone(), "sk-a").await.0,
        StatusCode::OK
    );
    assert_eq!(db.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_of_one_key_make_one_store_lookup() {
    let (db, mut started) = Db::held();
    let (cache, db, _) = cache(db.with("sk-a", ApiKey::new("a")));
    let first = lookup_in_flight(&cache, &mut started).await;
    let waiters: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { name_of(&*cache, "sk-a").await })
        })
        .collect();
    // Every waiter has joined the lookup in flight before the store answers.
    until_coalesced(&cache, 100).await;
    db.release(1);
    assert_eq!(first.await.unwrap().as_deref(), Some("a"));
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().as_deref(), Some("a"));
    }
    assert_eq!(db.calls(), 1);
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.coalesced), (101, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_share_the_store_error_and_the_next_lookup_asks_again() {
    let (db, mut started) = Db::held();
    let (cache, db, _) = cache(db.with("sk-a", ApiKey::new("a")));
    db.failing.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cache.lookup(&KeyDigest::of("sk-a")).await.map(|_| ()) }
    });
    started.recv().await.unwrap();
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.lookup(&KeyDigest::of("sk-a")).await.map(|_| ()) })
        })
        .collect();
    until_coalesced(&cache, 10).await;
    db.release(1);
    let err = first.await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "key store unavailable: database down");
    for waiter in waiters {
        let err = waiter.await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "key store unavailable: database down");
    }
    assert_eq!(db.calls(), 1);
    db.failing.store(false, Ordering::SeqCst);
    db.release(1);
    assert_eq!(name_of(&*cache, "sk-a").await.as_deref(), Some("a"));
    assert_eq!(db.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_takes_over_when_the_lookup_it_waits_for_is_dropped() {
    let (db, mut started) = Db::held();
    let (cache, db, _) = cache(db.with("sk-a", ApiKey::new("a")));
    let leader = lookup_in_flight(&cache, &mut started).await;
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { name_of(&*cache, "sk-a").await }
    });
    until_coalesced(&cache, 1).await;
    // The leader's client leaves (or its lookup times out).
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    started.recv().await.unwrap();
    assert_eq!(db.calls(), 2, "the waiter asked the store itself");
    db.release(1);
    assert_eq!(waiter.await.unwrap().as_deref(), Some("a"));
    assert_eq!(cache.stats().entries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn many_tasks_on_many_keys_ask_the_store_once_per_key() {
    let db = Db::default();
    for n in 0..16 {
        db.put(&format!("sk-{n}"), ApiKey::new(format!("k{n}")));
    }
    let (cache, db, _) = cache(db);
    let tasks: Vec<_> = (0..800)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let n = i % 20; // 16 known keys, 4 unknown
                let found = name_of(&*cache, &format!("sk-{n}")).await;
                assert_eq!(found, (n < 16).then(|| format!("k{n}")));
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(db.calls(), 20);
    let stats = cache.stats();
    assert_eq!(stats.hits + stats.negative_hits + stats.misses, 800);
    assert_eq!(stats.misses - stats.coalesced, 20);
}

#[tokio::test]
async fn debug_shows_configuration_and_sizes_not_keys() {
    let (cache, _, _) = cache(Db::default().with("sk-secret-value", ApiKey::new("team-x")));
    name_of(&*cache, "sk-secret-value").await;
    let debug = format!("{cache:?}");
    assert!(debug.contains("ttl: 30s"), "{debug}");
    assert!(debug.contains("max_entries: 10000"), "{debug}");
    assert!(debug.contains("entries: 1"), "{debug}");
    assert!(!debug.contains("team-x"), "{debug}");
    assert!(!debug.contains("sk-secret"), "{debug}");
    let digest = KeyDigest::of("sk-secret-value").to_hex();
    assert!(!debug.contains(&digest[..8]), "{debug}");
    assert!(!format!("{:?}", cache.invalidator()).contains("team-x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_takes_over_when_the_store_panics_in_the_lookup_it_waits_for() {
    let (db, mut started) = Db::held();
    let (cache, db, _) = cache(db.with("sk-a", ApiKey::new("a")));
    db.panics.store(true, Ordering::SeqCst);
    let leader = lookup_in_flight(&cache, &mut started).await;
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { name_of(&*cache, "sk-a").await }
    });
    until_coalesced(&cache, 1).await;
    db.release(1);
    assert!(leader.await.unwrap_err().is_panic());
    started.recv().await.unwrap();
    db.release(1);
    assert_eq!(waiter.await.unwrap().as_deref(), Some("a"));
    assert_eq!(db.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clock_that_panics_as_the_answer_lands_does_not_strand_the_waiters() {
    let (db, mut started) = Db::held();
    let db = Arc::new(db.with("sk-a", ApiKey::new("a")));
    let armed = Arc::new(AtomicBool::new(false));
    let clock = {
        let armed = armed.clone();
        move || {
            if armed.swap(false, Ordering::SeqCst) {
                panic!("the clock panicked");
            }
            t0()
        }
    };
    let cache = Arc::new(CachedKeyStore::new(db.clone()).clock(clock));
    let leader = lookup_in_flight(&cache, &mut started).await;
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { name_of(&*cache, "sk-a").await }
    });
    until_coalesced(&cache, 1).await;
    armed.store(true, Ordering::SeqCst);
    db.release(1);
    assert!(leader.await.unwrap_err().is_panic());
    started.recv().await.unwrap();
    db.release(1);
    assert_eq!(waiter.await.unwrap().as_deref(), Some("a"));
}
