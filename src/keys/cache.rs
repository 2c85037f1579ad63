//! [`CachedKeyStore`]: a bounded cache in front of a slow [`KeyStore`] (a database).

use std::collections::HashMap;
use std::error::Error;
use std::fmt;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, SystemTime};

use super::{
    AdminError, ApiKey, BoxFuture, CreatedKey, KeyAdmin, KeyDigest, KeyPage, KeyRecord, KeyStore,
    PageRequest, StoreError,
};
use crate::quota::{Clock, SystemClock};

/// The default [`max_entries`](CachedKeyStore::max_entries).
const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// The default [`max_negative_entries`](CachedKeyStore::max_negative_entries).
const DEFAULT_MAX_NEGATIVE_ENTRIES: usize = 1_000;
/// The default [`ttl`](CachedKeyStore::ttl).
const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// The default [`negative_ttl`](CachedKeyStore::negative_ttl).
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(2);

/// A bounded cache of found and unknown keys in front of another [`KeyStore`], for stores that
/// live in a database: most requests are answered from memory, synchronously
/// ([`KeyStore::lookup_now`], no boxed future), and the database sees one lookup per key per
/// TTL.
///
/// # What is cached, and for how long
///
/// - A **found key** is kept for [`ttl`](Self::ttl) (30 s by default), at most
///   [`max_entries`](Self::max_entries) of them (10 000).
/// - An **unknown key** (`Ok(None)`) is kept for [`negative_ttl`](Self::negative_ttl) (2 s),
///   at most [`max_negative_entries`](Self::max_negative_entries) of them (1 000), in a map
///   of its own: a client retrying with a wrong key reaches the store once per negative TTL,
///   and a client sending random keys fills only the negative map, never evicting a real key.
///   (Each *different* random key still costs one store lookup: limit such clients before
///   this layer, by address.)
/// - A **store error** is never cached: the next lookup asks the store again.
///
/// The cache never changes a key. A found key is served with its `expires_at`, which
/// [`KeyAuth`](crate::key_auth::KeyAuth) checks against the wall clock on every request, hit
/// or miss: a key that expires while it is cached is refused (`key_expired`) from that instant
/// on, not at the end of the TTL. (Keeping the expired key cached is deliberate: a client
/// that goes on using it is refused from memory without reaching the database.) Disabling a
/// key, or any other change in the store, is seen within the TTL — or at once, when the
/// store calls an invalidation method (a PostgreSQL `LISTEN` task holding a
/// [`CacheInvalidator`], say).
///
/// # Eviction: CLOCK
///
/// Each map is a CLOCK (second chance, an approximation of LRU): a hit sets the entry's
/// *referenced* bit, and a full map, to make room, sweeps a hand over the entries, clearing
/// set bits and evicting the first entry found clear. Unlike a strict LRU, a hit moves
/// nothing, so it needs only a shared (read) lock and an atomic store: hits on many threads
/// do not queue behind each other. It is a few dozen lines on a `Vec` and a `HashMap`, which
/// is why this crate does not depend on `moka`, `quick_cache` or `lru` for it. Evictions are
/// counted ([`CacheStats`]).
///
/// # Single flight
///
/// Concurrent misses of the same digest make one inner lookup: the first becomes the leader,
/// the others wait for its answer (a key, no key, or the store's error, which each of them
/// receives). No runtime is needed: waiters register their wakers with the lookup in flight.
/// If the leader's request is dropped (its client left, or its lookup timed out), a waiter
/// takes over.
///
/// # Invalidation beats a racing lookup
///
/// [`invalidate`](Self::invalidate), [`invalidate_key_named`](Self::invalidate_key_named) and
/// [`invalidate_all`](Self::invalidate_all) (also on a [`CacheInvalidator`]) drop the cached
/// entries, and also detach the lookups in flight that they concern: each lookup is
/// registered under a generation number, and its answer is cached only if that registration
/// is still current when it arrives. An answer read from the database before a change, and
/// arriving after the change was announced, is given to the requests that were already
/// waiting for it (they started before the change) but never cached, and later requests start
/// a new lookup.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use http::{Request, Response, StatusCode};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use tower_llm_policy::key_auth::KeyAuthLayer;
/// use tower_llm_policy::keys::{ApiKey, CachedKeyStore, KeyDigest, MemoryKeyStore};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// // Stands for a database-backed store.
/// let database = MemoryKeyStore::new().with_key("sk-team-a", ApiKey::new("team-a"));
/// let cache = CachedKeyStore::new(database)
///     .max_entries(50_000)
///     .ttl(Duration::from_secs(60))
///     .negative_ttl(Duration::from_secs(5));
/// // Give this to the task that hears about changes in the database.
/// let invalidator = cache.invalidator();
/// let cache = Arc::new(cache);
///
/// let svc = ServiceBuilder::new()
///     .layer(KeyAuthLayer::new(cache.clone()))
///     .service(service_fn(|_req: Request<String>| async {
///         Ok::<_, std::convert::Infallible>(Response::new(String::new()))
///     }));
/// let req = || Request::post("/v1/chat/completions")
///     .header("authorization", "Bearer sk-team-a").body(String::new()).unwrap();
///
/// assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), StatusCode::OK);
/// assert_eq!(svc.clone().oneshot(req()).await.unwrap().status(), StatusCode::OK);
/// let stats = cache.stats();
/// assert_eq!((stats.misses, stats.hits), (1, 1));
///
/// // The key was changed in the database: the next request asks the store again.
/// invalidator.invalidate_key_named("team-a");
/// assert_eq!(svc.oneshot(req()).await.unwrap().status(), StatusCode::OK);
/// assert_eq!(cache.stats().misses, 2);
/// # });
/// ```
pub struct CachedKeyStore<S> {
    inner: S,
    shared: Arc<Shared>,
    ttl: Duration,
    negative_ttl: Duration,
    clock: Arc<dyn Clock>,
}

impl<S: KeyStore> CachedKeyStore<S> {
    /// A cache in front of `inner`, with the defaults: 10 000 found keys for 30 s, 1 000
    /// unknown keys for 2 s, the system clock.
    pub fn new(inner: S) -> Self {
        CachedKeyStore {
            inner,
            shared: Arc::new(Shared {
                state: RwLock::new(State {
                    found: ClockMap::new(DEFAULT_MAX_ENTRIES),
                    unknown: ClockMap::new(DEFAULT_MAX_NEGATIVE_ENTRIES),
                    flights: HashMap::new(),
                    generation: 0,
                }),
                counters: Counters::default(),
            }),
            ttl: DEFAULT_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            clock: Arc::new(SystemClock),
        }
    }
}

impl<S> CachedKeyStore<S> {
    /// Keeps at most `n` found keys (10 000 by default); `0` caches no found key.
    #[must_use]
    pub fn max_entries(self, n: usize) -> Self {
        self.shared.write().found.set_capacity(n);
        self
    }

    /// Keeps at most `n` unknown keys (1 000 by default), apart from the found ones; `0`
    /// caches no unknown key.
    #[must_use]
    pub fn max_negative_entries(self, n: usize) -> Self {
        self.shared.write().unknown.set_capacity(n);
        self
    }

    /// How long a found key is served from the cache (30 s by default): the longest a change
    /// in the store goes unseen when nobody calls an invalidation method.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long an unknown key is answered "unknown" from the cache (2 s by default): the
    /// longest a new key can be refused after it was added to the store, when nobody calls an
    /// invalidation method.
    #[must_use]
    pub fn negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = ttl;
        self
    }

    /// Reads the time from `clock` (the system clock by default), for tests. It measures the
    /// TTLs only: key expiry is checked by [`KeyAuth`](crate::key_auth::KeyAuth).
    #[must_use]
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// A handle that invalidates entries of this cache from elsewhere (a task listening for
    /// changes in the database). Cheap to clone.
    pub fn invalidator(&self) -> CacheInvalidator {
        CacheInvalidator {
            shared: self.shared.clone(),
        }
    }

    /// Drops the entry of `digest` (found or unknown), and detaches a lookup of it in flight.
    pub fn invalidate(&self, digest: &KeyDigest) {
        self.shared.invalidate(digest);
    }

    /// Drops every found key named `name`, every unknown key (one of them may be the key
    /// just created under that name) and every lookup in flight.
    pub fn invalidate_key_named(&self, name: &str) {
        self.shared.invalidate_key_named(name);
    }

    /// Drops every entry and detaches every lookup in flight.
    pub fn invalidate_all(&self) {
        self.shared.invalidate_all();
    }

    /// The counters and sizes.
    pub fn stats(&self) -> CacheStats {
        self.shared.stats()
    }

    /// The wrapped store.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Consumes the cache, returning the wrapped store.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Answers from the cache when it holds a fresh entry: `Some(found)`, or `None` on a miss.
    fn cached(&self, digest: &KeyDigest) -> Option<Option<Arc<ApiKey>>> {
        self.cached_in(&self.shared.read(), digest)
    }

    /// [`cached`](Self::cached), under a lock already held.
    fn cached_in(&self, state: &State, digest: &KeyDigest) -> Option<Option<Arc<ApiKey>>> {
        let now = self.clock.now();
        if let Some(slot) = state.found.get(digest) {
            if is_fresh(slot.value.at, now, self.ttl) {
                slot.touch();
                self.shared.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Some(Some(slot.value.key.clone()));
            }
        }
        if let Some(slot) = state.unknown.get(digest) {
            if is_fresh(slot.value, now, self.negative_ttl) {
                slot.touch();
                self.shared
                    .counters
                    .negative_hits
                    .fetch_add(1, Ordering::Relaxed);
                return Some(None);
            }
        }
        None
    }
}

/// Whether an entry cached `at` is still fresh at `now`. A clock that went back before `at`
/// makes the entry stale, so that a wall clock set back cannot stretch a TTL.
fn is_fresh(at: SystemTime, now: SystemTime, ttl: Duration) -> bool {
    now.duration_since(at).is_ok_and(|age| age < ttl)
}

impl<S: KeyStore> CachedKeyStore<S> {
    /// Asks the inner store (its synchronous answer when it has one).
    async fn ask_inner(&self, digest: &KeyDigest) -> Result<Option<Arc<ApiKey>>, StoreError> {
        match self.inner.lookup_now(digest) {
            Some(answer) => answer,
            None => self.inner.lookup(digest).await,
        }
    }

    async fn lookup_cached(&self, digest: &KeyDigest) -> Result<Option<Arc<ApiKey>>, StoreError> {
        loop {
            if let Some(found) = self.cached(digest) {
                return Ok(found);
            }
            let (flight, leader) = {
                let mut state = self.shared.write();
                // A lookup that landed between the read lock above and this one.
                if let Some(found) = self.cached_in(&state, digest) {
                    return Ok(found);
                }
                match state.flights.get(digest) {
                    Some(flight) => (flight.clone(), false),
                    None => {
                        state.generation += 1;
                        let flight = Arc::new(Flight {
                            generation: state.generation,
                            state: Mutex::new(FlightState::default()),
                        });
                        state.flights.insert(*digest, flight.clone());
                        (flight, true)
                    }
                }
            };
            self.shared.counters.misses.fetch_add(1, Ordering::Relaxed);
            if leader {
                let mut guard = LeaderGuard {
                    shared: &self.shared,
                    digest,
                    flight: &flight,
                    done: false,
                };
                let answer = self.ask_inner(digest).await;
                // `land` reads the clock, which is user code: until it has handed the answer
                // over, the guard still stands for the waiters.
                let answer = self.land(digest, &flight, answer);
                guard.done = true;
                return answer;
            }
            self.shared
                .counters
                .coalesced
                .fetch_add(1, Ordering::Relaxed);
            if let Some(answer) = flight.wait().await {
                return answer.to_result();
            }
            // The leader was dropped before it had an answer: start again.
        }
    }

    /// Caches the leader's answer (unless its flight was invalidated meanwhile) and hands it
    /// to the waiters.
    fn land(
        &self,
        digest: &KeyDigest,
        flight: &Arc<Flight>,
        answer: Result<Option<Arc<ApiKey>>, StoreError>,
    ) -> Result<Option<Arc<ApiKey>>, StoreError> {
        let now = self.clock.now();
        {
            let mut state = self.shared.write();
            if state.take_flight(digest, flight) {
                match &answer {
                    Ok(Some(key)) => {
                        state.unknown.remove(digest);
                        let entry = Entry {
                            key: key.clone(),
                            at: now,
                        };
                        if state.found.insert(*digest, entry) {
                            self.shared
                                .counters
                                .evictions
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(None) => {
                        state.found.remove(digest);
                        if state.unknown.insert(*digest, now) {
                            self.shared
                                .counters
                                .negative_evictions
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {}
                }
            }
        }
        let (shared, answer) = match answer {
            Ok(found) => (FlightAnswer::Found(found.clone()), Ok(found)),
            Err(error) => {
                let shared = SharedError::from(error);
                let mine = shared.to_error();
                (FlightAnswer::Failed(shared), Err(mine))
            }
        };
        flight.finish(Some(shared));
        answer
    }
}

impl<S: KeyStore> KeyStore for CachedKeyStore<S> {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        Box::pin(self.lookup_cached(digest))
    }

    /// A fresh cached entry, found or unknown; `None` otherwise (then
    /// [`lookup`](KeyStore::lookup) asks the inner store).
    fn lookup_now(&self, digest: &KeyDigest) -> Option<Result<Option<Arc<ApiKey>>, StoreError>> {
        self.cached(digest).map(Ok)
    }
}

impl<S> fmt::Debug for CachedKeyStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.read();
        f.debug_struct("CachedKeyStore")
            .field("ttl", &self.ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("max_entries", &state.found.capacity)
            .field("max_negative_entries", &state.unknown.capacity)
            .field("entries", &state.found.len())
            .field("negative_entries", &state.unknown.len())
            .field("in_flight", &state.flights.len())
            .finish_non_exhaustive()
    }
}

/// Invalidates entries of a [`CachedKeyStore`] from another task (a database listener). Cheap
/// to clone; holds the cache's state, not its inner store.
#[derive(Clone)]
pub struct CacheInvalidator {
    shared: Arc<Shared>,
}

impl CacheInvalidator {
    /// See [`CachedKeyStore::invalidate`].
    pub fn invalidate(&self, digest: &KeyDigest) {
        self.shared.invalidate(digest);
    }

    /// See [`CachedKeyStore::invalidate_key_named`].
    pub fn invalidate_key_named(&self, name: &str) {
        self.shared.invalidate_key_named(name);
    }

    /// See [`CachedKeyStore::invalidate_all`].
    pub fn invalidate_all(&self) {
        self.shared.invalidate_all();
    }

    /// See [`CachedKeyStore::stats`].
    pub fn stats(&self) -> CacheStats {
        self.shared.stats()
    }
}

impl fmt::Debug for CacheInvalidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheInvalidator").finish_non_exhaustive()
    }
}

/// A [`CachedKeyStore`]'s counters (since it was made) and sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups answered with a cached found key.
    pub hits: u64,
    /// Lookups answered "unknown" from the cache.
    pub negative_hits: u64,
    /// Lookups the cache could not answer: each asked the inner store or waited for another
    /// lookup of the same key that did (`coalesced`).
    pub misses: u64,
    /// Misses that waited for another lookup of the same key instead of asking the store.
    pub coalesced: u64,
    /// Found keys evicted to make room (not counting expired or invalidated entries).
    pub evictions: u64,
    /// Unknown keys evicted to make room: many is the sign of a client trying random keys.
    pub negative_evictions: u64,
    /// Found keys in the cache now (fresh or not).
    pub entries: usize,
    /// Unknown keys in the cache now (fresh or not).
    pub negative_entries: usize,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    negative_hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    evictions: AtomicU64,
    negative_evictions: AtomicU64,
}

/// What the cache and its invalidators share.
struct Shared {
    state: RwLock<State>,
    counters: Counters,
}

struct State {
    found: ClockMap<Entry>,
    /// Unknown keys, with when they were found unknown.
    unknown: ClockMap<SystemTime>,
    /// Lookups in flight. Removing one (invalidation) keeps its answer out of the cache.
    flights: HashMap<KeyDigest, Arc<Flight>>,
    /// The generation of the latest flight.
    generation: u64,
}

impl State {
    /// Unregisters `flight` if it is still the current one for `digest`; whether it was.
    fn take_flight(&mut self, digest: &KeyDigest, flight: &Flight) -> bool {
        match self.flights.get(digest) {
            Some(current) if current.generation == flight.generation => {
                self.flights.remove(digest);
                true
            }
            _ => false,
        }
    }
}

struct Entry {
    key: Arc<ApiKey>,
    at: SystemTime,
}

impl Shared {
    // A panic while the lock is held cannot leave the maps half-changed in a way that matters
    // (each change is a few steps on owned data, none calls user code), so a poisoned lock is
    // used as it is.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn invalidate(&self, digest: &KeyDigest) {
        let mut state = self.write();
        state.found.remove(digest);
        state.unknown.remove(digest);
        state.flights.remove(digest);
    }

    fn invalidate_key_named(&self, name: &str) {
        let mut state = self.write();
        state.found.retain(|entry| entry.key.name != name);
        state.unknown.clear();
        state.flights.clear();
    }

    fn invalidate_all(&self) {
        let mut state = self.write();
        state.found.clear();
        state.unknown.clear();
        state.flights.clear();
    }

    fn stats(&self) -> CacheStats {
        let (entries, negative_entries) = {
            let state = self.read();
            (state.found.len(), state.unknown.len())
        };
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            negative_hits: c.negative_hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            coalesced: c.coalesced.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            negative_evictions: c.negative_evictions.load(Ordering::Relaxed),
            entries,
            negative_entries,
        }
    }
}

/// A store lookup in flight, which other lookups of the same key wait for.
struct Flight {
    generation: u64,
    state: Mutex<FlightState>,
}

#[derive(Default)]
struct FlightState {
    /// `Some` once the leader is done: `Some(answer)`, or `None` if it was dropped first.
    outcome: Option<Option<FlightAnswer>>,
    waiters: Vec<Waker>,
}

/// The leader's answer, as every waiter receives it.
#[derive(Clone)]
enum FlightAnswer {
    Found(Option<Arc<ApiKey>>),
    Failed(SharedError),
}

impl FlightAnswer {
    fn to_result(&self) -> Result<Option<Arc<ApiKey>>, StoreError> {
        match self {
            FlightAnswer::Found(found) => Ok(found.clone()),
            FlightAnswer::Failed(error) => Err(error.to_error()),
        }
    }
}

impl Flight {
    fn lock(&self) -> std::sync::MutexGuard<'_, FlightState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the outcome (`None`: the leader gave up) and wakes the waiters. The first
    /// outcome stays.
    fn finish(&self, outcome: Option<FlightAnswer>) {
        let waiters = {
            let mut state = self.lock();
            state.outcome.get_or_insert(outcome);
            std::mem::take(&mut state.waiters)
        };
        for waker in waiters {
            waker.wake();
        }
    }

    /// Waits for the leader: its answer, or `None` if it was dropped without one.
    async fn wait(&self) -> Option<FlightAnswer> {
        // Where this waiter's waker is in `waiters`, once registered.
        let mut slot: Option<usize> = None;
        poll_fn(|cx| {
            let mut state = self.lock();
            if let Some(outcome) = &state.outcome {
                return Poll::Ready(outcome.clone());
            }
            match slot {
                Some(i) => state.waiters[i].clone_from(cx.waker()),
                None => {
                    slot = Some(state.waiters.len());
                    state.waiters.push(cx.waker().clone());
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// Unregisters and abandons the leader's flight if the leader is dropped (or panics) before
/// its answer, so that its waiters do not wait forever: one of them takes over.
struct LeaderGuard<'a> {
    shared: &'a Shared,
    digest: &'a KeyDigest,
    flight: &'a Arc<Flight>,
    done: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.write().take_flight(self.digest, self.flight);
            self.flight.finish(None);
        }
    }
}

/// A store error shared between the waiters of one lookup: the message and the source, which
/// each waiter gets as a [`StoreError`] of its own.
#[derive(Clone)]
struct SharedError {
    message: String,
    source: Option<Arc<dyn Error + Send + Sync>>,
}

impl From<StoreError> for SharedError {
    fn from(error: StoreError) -> Self {
        SharedError {
            message: error.message,
            source: error.source.map(Arc::from),
        }
    }
}

impl SharedError {
    fn to_error(&self) -> StoreError {
        StoreError {
            message: self.message.clone(),
            source: self
                .source
                .clone()
                .map(|s| Box::new(SharedSource(s)) as Box<dyn Error + Send + Sync>),
        }
    }
}

/// An error source shared by several [`StoreError`]s; shows as the original.
struct SharedSource(Arc<dyn Error + Send + Sync>);

impl fmt::Debug for SharedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for SharedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl Error for SharedSource {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

/// A bounded map with CLOCK (second chance) eviction; see [`CachedKeyStore`].
struct ClockMap<V> {
    slots: Vec<Slot<V>>,
    index: HashMap<KeyDigest, usize>,
    /// The next slot the sweep looks at.
    hand: usize,
    capacity: usize,
}

struct Slot<V> {
    digest: KeyDigest,
    value: V,
    /// Set by a hit (under the read lock), cleared by the sweep.
    referenced: AtomicBool,
}

impl<V> Slot<V> {
    fn touch(&self) {
        self.referenced.store(true, Ordering::Relaxed);
    }
}

impl<V> ClockMap<V> {
    fn new(capacity: usize) -> Self {
        ClockMap {
            slots: Vec::new(),
            index: HashMap::new(),
            hand: 0,
            capacity,
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn get(&self, digest: &KeyDigest) -> Option<&Slot<V>> {
        self.index.get(digest).map(|&i| &self.slots[i])
    }

    /// Inserts or replaces; whether another entry was evicted to make room.
    fn insert(&mut self, digest: KeyDigest, value: V) -> bool {
        if let Some(&i) = self.index.get(&digest) {
            self.slots[i].value = value;
            return false;
        }
        if self.capacity == 0 {
            return false;
        }
        let slot = Slot {
            digest,
            value,
            referenced: AtomicBool::new(false),
        };
        if self.slots.len() < self.capacity {
            self.index.insert(digest, self.slots.len());
            self.slots.push(slot);
            return false;
        }
        // Full: the first entry not hit since the hand last passed it goes. Ends within two
        // turns, as the first turn clears every bit.
        while self.slots[self.hand]
            .referenced
            .swap(false, Ordering::Relaxed)
        {
            self.hand = (self.hand + 1) % self.slots.len();
        }
        let victim = std::mem::replace(&mut self.slots[self.hand], slot);
        self.index.remove(&victim.digest);
        self.index.insert(digest, self.hand);
        self.hand = (self.hand + 1) % self.slots.len();
        true
    }

    fn remove(&mut self, digest: &KeyDigest) -> Option<V> {
        let i = self.index.remove(digest)?;
        let slot = self.slots.swap_remove(i);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(moved.digest, i);
        }
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
        Some(slot.value)
    }

    fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.slots.retain(|slot| keep(&slot.value));
        self.reindex();
    }

    fn clear(&mut self) {
        self.slots.clear();
        self.reindex();
    }

    /// Changes the capacity, dropping the newest entries beyond it.
    fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.slots.truncate(capacity);
        self.reindex();
    }

    fn reindex(&mut self) {
        self.index = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| (slot.digest, i))
            .collect();
        if self.hand >= self.slots.len() {
            self.hand = 0;
        }
    }
}

/// The admin API of the store inside, which also drops each changed key from this cache at
/// once: this replica never serves a key it has just changed or deleted (other replicas
/// learn of it from the store's own notifications, or when their entries' TTL runs out).
impl<S: KeyStore + KeyAdmin> KeyAdmin for CachedKeyStore<S> {
    fn create(&self, key: ApiKey) -> BoxFuture<'_, Result<CreatedKey, AdminError>> {
        Box::pin(async move {
            let created = self.get_ref().create(key).await?;
            // Unknown keys remembered as unknown may include this one.
            self.invalidate_key_named(&created.record.key.name);
            Ok(created)
        })
    }

    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        self.get_ref().get(name)
    }

    fn update<'a>(
        &'a self,
        name: &'a str,
        patch: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        Box::pin(async move {
            let result = self.get_ref().update(name, patch).await;
            // Dropped even when the answer was lost: the next lookup asks the store.
            self.invalidate_key_named(name);
            result
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            let result = self.get_ref().delete(name).await;
            self.invalidate_key_named(name);
            result
        })
    }

    fn list(&self, page: PageRequest) -> BoxFuture<'_, Result<KeyPage, AdminError>> {
        self.get_ref().list(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u32) -> KeyDigest {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&n.to_be_bytes());
        KeyDigest::from_bytes(bytes)
    }

    fn check<V>(map: &ClockMap<V>) {
        assert!(map.len() <= map.capacity);
        assert_eq!(map.index.len(), map.slots.len());
        for (digest, &i) in &map.index {
            assert_eq!(map.slots[i].digest, *digest);
        }
        assert!(map.hand < map.slots.len().max(1));
    }

    #[test]
    fn clock_map_never_grows_past_its_capacity() {
        let mut map = ClockMap::new(3);
        let evicted: usize = (0..10).map(|n| usize::from(map.insert(d(n), n))).sum();
        assert_eq!(map.len(), 3);
        assert_eq!(evicted, 7);
        check(&map);
    }

    #[test]
    fn clock_map_gives_a_hit_entry_a_second_chance() {
        let mut map = ClockMap::new(3);
        for n in 0..3 {
            map.insert(d(n), n);
        }
        map.get(&d(0)).unwrap().touch();
        assert!(map.insert(d(3), 3));
        // 0 was hit, so 1 (the oldest not hit) went.
        assert!(map.get(&d(0)).is_some());
        assert!(map.get(&d(1)).is_none());
        assert!(map.get(&d(2)).is_some());
        assert!(map.get(&d(3)).is_some());
        check(&map);
    }

    #[test]
    fn clock_map_evicts_in_insertion_order_without_hits() {
        let mut map = ClockMap::new(2);
        map.insert(d(0), 0);
        map.insert(d(1), 1);
        map.insert(d(2), 2);
        assert!(map.get(&d(0)).is_none());
        map.insert(d(3), 3);
        assert!(map.get(&d(1)).is_none());
        assert_eq!(map.get(&d(2)).unwrap().value, 2);
        assert_eq!(map.get(&d(3)).unwrap().value, 3);
        check(&map);
    }

    #[test]
    fn clock_map_replacing_evicts_nothing() {
        let mut map = ClockMap::new(1);
        assert!(!map.insert(d(0), 0));
        assert!(!map.insert(d(0), 1));
        assert_eq!(map.get(&d(0)).unwrap().value, 1);
    }

    #[test]
    fn clock_map_of_capacity_zero_holds_nothing() {
        let mut map = ClockMap::new(0);
        assert!(!map.insert(d(0), 0));
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn clock_map_remove_keeps_the_index_right() {
        let mut map = ClockMap::new(4);
        for n in 0..4 {
            map.insert(d(n), n);
        }
        assert_eq!(map.remove(&d(1)), Some(1));
        assert_eq!(map.remove(&d(1)), None);
        check(&map);
        for n in [0, 2, 3] {
            assert_eq!(map.get(&d(n)).unwrap().value, n);
        }
        map.retain(|v| *v != 2);
        check(&map);
        assert!(map.get(&d(2)).is_none());
        assert_eq!(map.get(&d(3)).unwrap().value, 3);
        map.clear();
        assert_eq!(map.len(), 0);
        check(&map);
    }

    #[test]
    fn clock_map_stays_consistent_under_mixed_operations() {
        let mut map = ClockMap::new(8);
        let mut seed = 7u32;
        for _ in 0..5_000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let n = (seed >> 16) % 20;
            match seed % 5 {
                0 => {
                    map.remove(&d(n));
                }
                1 => {
                    if let Some(slot) = map.get(&d(n)) {
                        slot.touch();
                    }
                }
                _ => {
                    map.insert(d(n), n);
                }
            }
            check(&map);
            for slot in &map.slots {
                assert_eq!(d(slot.value), slot.digest);
            }
        }
    }

    #[test]
    fn shrinking_the_capacity_keeps_the_index_right() {
        let mut map = ClockMap::new(5);
        for n in 0..5 {
            map.insert(d(n), n);
        }
        map.set_capacity(2);
        assert_eq!(map.len(), 2);
        check(&map);
    }

    #[test]
    fn freshness_is_age_below_ttl_and_a_clock_set_back_is_stale() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let ttl = Duration::from_secs(10);
        assert!(is_fresh(t, t, ttl));
        assert!(is_fresh(t, t + Duration::from_secs(9), ttl));
        assert!(!is_fresh(t, t + ttl, ttl));
        assert!(!is_fresh(t, t - Duration::from_secs(1), ttl));
    }

    #[test]
    fn a_shared_error_keeps_its_message_and_source() {
        let io = std::io::Error::other("connection reset");
        let shared = SharedError::from(StoreError::with_source("postgres", io));
        let error = shared.to_error();
        assert_eq!(error.to_string(), "key store unavailable: postgres");
        assert_eq!(error.source().unwrap().to_string(), "connection reset");
        assert!(format!("{error:?}").contains("connection reset"));
        // The source's own source is kept too.
        let io = std::io::Error::other("reset");
        let outer = StoreError::with_source("pool", StoreError::with_source("connect", io));
        let error = SharedError::from(outer).to_error();
        let source = error.source().unwrap();
        assert_eq!(source.to_string(), "key store unavailable: connect");
        assert_eq!(source.source().unwrap().to_string(), "reset");
    }
}
