//! The spend ledger: reserve a request's worst-case cost against a key's cap, settle its
//! actual cost when the response ends.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::period::{BudgetPeriod, Clock, SystemClock};
use crate::alert::{Alert, AlertSink};
use crate::keys::{BoxFuture, StoreError};

/// Nano-dollars per dollar: the in-memory ledger counts in whole nano-dollars (a `u64`, as a
/// Redis ledger would with `INCRBY`), so that sums do not drift as floating-point sums do.
const NANOS_PER_USD: f64 = 1e9;

/// USD to nano-dollars, rounded up (a reservation never rounds down to less than its cost).
pub(super) fn to_nanos(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * NANOS_PER_USD).ceil().min(u64::MAX as f64) as u64
    } else {
        0
    }
}

/// A cap in nano-dollars. A cap rounds down (an amount rounds up: [`to_nanos`]), so that the
/// ledger errs on the side of the cap; a cap that is not a positive number is zero.
pub(super) fn cap_nanos(cap_usd: f64) -> u64 {
    if cap_usd.is_finite() && cap_usd > 0.0 {
        (cap_usd * NANOS_PER_USD).floor().min(u64::MAX as f64) as u64
    } else {
        0
    }
}

pub(super) fn to_usd(nanos: u64) -> f64 {
    nanos as f64 / NANOS_PER_USD
}

/// Names one reservation, for [`SpendLedger::settle`]. Unique per ledger; a networked
/// ledger may use the request's id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReservationId(Arc<str>);

impl ReservationId {
    /// An id from a string.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        ReservationId(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An amount held against a key's cap until the request is settled.
#[derive(Clone, Debug, PartialEq)]
pub struct Reservation {
    /// The id to settle it by.
    pub id: ReservationId,
    /// The amount held, in USD.
    pub amount_usd: f64,
    /// What the cap still allowed once this amount was held, in USD, when the ledger knows:
    /// a stream that outgrows its reservation may use this much more before it is cut.
    /// `None`: the stream is allowed its reservation only.
    pub headroom_usd: Option<f64>,
}

/// A key's spend in its current period.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spend {
    /// Settled spend, in USD.
    pub spent_usd: f64,
    /// Held by requests still in flight, in USD.
    pub reserved_usd: f64,
}

/// A reservation the cap does not allow.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Refused {
    /// The cap, in USD.
    pub cap_usd: f64,
    /// The key's spend when the reservation was refused.
    pub spend: Spend,
    /// The amount asked for, in USD.
    pub amount_usd: f64,
}

/// Why [`SpendLedger::reserve`] did not reserve.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// The cap does not allow it: answered 429 `insufficient_quota`.
    #[error("the spend cap does not allow this request")]
    Refused(Refused),
    /// The ledger could not answer: answered 503 `policy_unavailable` (fail closed).
    #[error(transparent)]
    Unavailable(StoreError),
}

/// The spend thresholds a settlement is watched for, and where to alert them: see
/// [`SpendLedger::settle_watched`]. Made by [`QuotaLayer`](super::QuotaLayer) for each cap a
/// request counts toward, when it has an [alert sink](super::QuotaLayer::alerts).
#[derive(Clone)]
#[non_exhaustive]
pub struct SpendWatch {
    /// The ledger account: a key's name, or [`team_account`](super::team_account)`(team)`.
    pub account: Arc<str>,
    /// The period the cap covers.
    pub period: BudgetPeriod,
    /// The cap, in USD.
    pub cap_usd: f64,
    /// The thresholds, in percent of the cap, ascending, each once, none zero.
    pub percents: Arc<[u8]>,
    /// Where alerts go.
    pub sink: Arc<dyn AlertSink>,
}

impl fmt::Debug for SpendWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpendWatch")
            .field("account", &self.account)
            .field("period", &self.period)
            .field("cap_usd", &self.cap_usd)
            .field("percents", &self.percents)
            .finish_non_exhaustive()
    }
}

impl SpendWatch {
    /// A watch of `account`'s spend against `cap_usd` per `period`, for `percents` (sorted
    /// and deduplicated here; zeros are dropped).
    pub fn new(
        account: impl Into<Arc<str>>,
        period: BudgetPeriod,
        cap_usd: f64,
        percents: impl IntoIterator<Item = u8>,
        sink: Arc<dyn AlertSink>,
    ) -> Self {
        SpendWatch {
            account: account.into(),
            period,
            cap_usd,
            percents: thresholds(percents),
            sink,
        }
    }

    /// Whether `spent_usd` reaches `percent` % of the cap (never, for a cap that is not a
    /// positive amount).
    pub fn reaches(&self, spent_usd: f64, percent: u8) -> bool {
        reaches(to_nanos(spent_usd), cap_nanos(self.cap_usd), percent)
    }

    /// Sends the alert that the account's spend, `spent_usd`, reached `percent` %.
    pub fn alert(&self, percent: u8, spent_usd: f64) {
        self.sink.alert(Alert::SpendThreshold {
            account: self.account.to_string(),
            percent,
            spent_usd,
            cap_usd: self.cap_usd,
            period: self.period,
        });
    }
}

/// Thresholds sorted, deduplicated, without zero.
pub(super) fn thresholds(percents: impl IntoIterator<Item = u8>) -> Arc<[u8]> {
    let mut percents: Vec<u8> = percents.into_iter().filter(|p| *p > 0).collect();
    percents.sort_unstable();
    percents.dedup();
    percents.into()
}

/// Whether `spent` reaches `percent` % of `cap` (nano-dollars; never for a zero cap).
pub(super) fn reaches(spent: u64, cap: u64, percent: u8) -> bool {
    cap > 0 && u128::from(spent) * 100 >= u128::from(cap) * u128::from(percent)
}

/// Counts each key's spend against its cap. Object safe: hold it as `Arc<dyn SpendLedger>`.
///
/// The contract, which a shared ledger (Redis, with one Lua script per method) keeps too:
///
/// - [`reserve`](Self::reserve) is atomic: it refuses when the key's settled spend plus what
///   requests in flight hold plus `amount_usd` would be more than `cap_usd` (or when the cap
///   is already reached), and otherwise holds `amount_usd` — one step, so that concurrent
///   requests cannot all pass on the same remaining budget.
/// - The counters belong to the key's current [`BudgetPeriod`], and start at zero in a new one.
/// - [`settle`](Self::settle) replaces the held amount by the actual cost, at most once per
///   reservation id: a settle retried with the same id is not counted twice, and one for an
///   unknown id is ignored. The actual cost counts in the period current when it settles.
/// - `settle` is synchronous and must not block (it runs when a response body ends or is
///   dropped, where nothing can be awaited, and the library spawns no task): a ledger on a
///   network queues it (in a bounded queue it owns, and counts what it drops) and retries —
///   which is safe, since settling is idempotent.
pub trait SpendLedger: Send + Sync + 'static {
    /// Holds `amount_usd` against `key`'s cap of `cap_usd` for its current `period`.
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        amount_usd: f64,
        cap_usd: f64,
        period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Reservation, ReserveError>>;

    /// Replaces the reservation by the actual cost (`0.0` releases it). Idempotent.
    fn settle(&self, id: &ReservationId, actual_usd: f64);

    /// Holds `more_usd` more under an open reservation, atomically, if the key's cap of
    /// `cap_usd` allows it: a stream that outgrows its reservation asks for more as it runs,
    /// so that concurrent streams never share the same remaining budget. Resolves to whether
    /// it was granted (a ledger that cannot answer grants nothing: the stream is cut). The
    /// stream waits for the answer before it passes the event that outgrew it.
    ///
    /// The default grants nothing: a stream is then cut when it outgrows its reservation.
    fn extend(&self, id: &ReservationId, more_usd: f64, cap_usd: f64) -> BoxFuture<'static, bool> {
        let _ = (id, more_usd, cap_usd);
        Box::pin(std::future::ready(false))
    }

    /// [`settle`](Self::settle)s, then alerts `watch.sink` of each of `watch.percents` that
    /// the account's settled spend in its current period has reached and that was not
    /// alerted before: each threshold once per account and period, however many layers (and,
    /// for a shared ledger, replicas) settle, in ascending order, with the spend after this
    /// settlement. Like `settle` it must not block: alerts may come later, from the task that
    /// sends a queued settlement.
    ///
    /// The default settles, then calls [`watch`](Self::watch).
    fn settle_watched(&self, id: &ReservationId, actual_usd: f64, watch: SpendWatch) {
        self.settle(id, actual_usd);
        self.watch(watch);
    }

    /// Alerts `watch.sink` of the thresholds the account's settled spend has reached in its
    /// current period and that were not alerted yet (as
    /// [`settle_watched`](Self::settle_watched), without settling). The layer calls it when
    /// it refuses a request of an account whose spend has reached its cap. Must not block.
    ///
    /// The default alerts nothing: a ledger that keeps no record of the alerts it sent sends
    /// none.
    fn watch(&self, watch: SpendWatch) {
        let _ = watch;
    }

    /// `key`'s spend in its current `period`.
    fn spent<'a>(
        &'a self,
        key: &'a str,
        period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Spend, StoreError>>;
}

impl<T: SpendLedger + ?Sized> SpendLedger for Arc<T> {
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        amount_usd: f64,
        cap_usd: f64,
        period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Reservation, ReserveError>> {
        (**self).reserve(key, amount_usd, cap_usd, period)
    }
    fn settle(&self, id: &ReservationId, actual_usd: f64) {
        (**self).settle(id, actual_usd)
    }
    fn extend(&self, id: &ReservationId, more_usd: f64, cap_usd: f64) -> BoxFuture<'static, bool> {
        (**self).extend(id, more_usd, cap_usd)
    }
    fn settle_watched(&self, id: &ReservationId, actual_usd: f64, watch: SpendWatch) {
        (**self).settle_watched(id, actual_usd, watch)
    }
    fn watch(&self, watch: SpendWatch) {
        (**self).watch(watch)
    }
    fn spent<'a>(
        &'a self,
        key: &'a str,
        period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Spend, StoreError>> {
        (**self).spent(key, period)
    }
}

/// A [`SpendLedger`] in this process's memory: one mutex, held for a few map operations.
/// Clones share the counters. Spend is lost when the process ends; for several processes,
/// or spend that must survive a restart, use a shared ledger.
///
/// ```
/// use tower_llm_policy::quota::{BudgetPeriod, MemoryLedger, SpendLedger};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let ledger = MemoryLedger::new();
/// let held = ledger.reserve("team-a", 0.75, 1.0, BudgetPeriod::Monthly).await.unwrap();
/// // 0.75 held: another 0.50 would pass the cap.
/// assert!(ledger.reserve("team-a", 0.50, 1.0, BudgetPeriod::Monthly).await.is_err());
/// ledger.settle(&held.id, 0.10);
/// ledger.settle(&held.id, 0.10); // a retry: not counted again
/// let spend = ledger.spent("team-a", BudgetPeriod::Monthly).await.unwrap();
/// assert_eq!((spend.spent_usd, spend.reserved_usd), (0.10, 0.0));
/// # });
/// ```
#[derive(Clone)]
pub struct MemoryLedger {
    state: Arc<Mutex<LedgerState>>,
    next_id: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
}

#[derive(Default)]
struct LedgerState {
    accounts: HashMap<Arc<str>, Account>,
    open: HashMap<ReservationId, Open>,
}

/// One key's counters for one period.
#[derive(Clone, Copy)]
struct Account {
    period: BudgetPeriod,
    index: u64,
    spent: u64,
    reserved: u64,
    /// The thresholds alerted in this period: bit `p` for `p` %.
    alerted: [u64; 4],
}

/// A reservation not settled yet.
struct Open {
    key: Arc<str>,
    amount: u64,
    period: BudgetPeriod,
    index: u64,
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryLedger")
            .field("keys", &state.accounts.len())
            .field("open_reservations", &state.open.len())
            .finish()
    }
}

impl MemoryLedger {
    /// An empty ledger on the system clock.
    pub fn new() -> Self {
        MemoryLedger {
            state: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            clock: Arc::new(SystemClock),
        }
    }

    /// Reads the time (which decides the period) from `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Reservations not settled yet.
    pub fn open_reservations(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        // A panic elsewhere cannot leave the counters half-updated (each update is a few
        // plain assignments), so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `key`'s account for the current `period`, started afresh when the period changed.
    fn account<'s>(
        state: &'s mut LedgerState,
        key: &str,
        period: BudgetPeriod,
        index: u64,
    ) -> &'s mut Account {
        let current = state
            .accounts
            .get(key)
            .is_some_and(|a| a.period == period && a.index == index);
        if !current {
            // A new period starts with nothing spent, but what requests in flight hold (from
            // the period that ended) still counts until they settle: otherwise a request
            // reserved just before midnight and one just after would both pass a daily cap.
            let reserved = state
                .open
                .values()
                .filter(|o| &*o.key == key && o.period == period)
                .fold(0u64, |sum, o| sum.saturating_add(o.amount));
            let fresh = Account {
                period,
                index,
                spent: 0,
                reserved,
                alerted: [0; 4],
            };
            match state.accounts.get_mut(key) {
                Some(account) => *account = fresh,
                None => {
                    state.accounts.insert(Arc::from(key), fresh);
                }
            }
        }
        state
            .accounts
            .get_mut(key)
            .expect("inserted if it was missing")
    }

    fn reserve_now(
        &self,
        key: &str,
        amount_usd: f64,
        cap_usd: f64,
        period: BudgetPeriod,
    ) -> Result<Reservation, ReserveError> {
        let index = period.index_at(self.clock.now());
        let amount = to_nanos(amount_usd);
        let cap = cap_nanos(cap_usd);
        let mut state = self.lock();
        let account = Self::account(&mut state, key, period, index);
        let held = account.spent.saturating_add(account.reserved);
        if held >= cap || held.saturating_add(amount) > cap {
            return Err(ReserveError::Refused(Refused {
                cap_usd,
                spend: Spend {
                    spent_usd: to_usd(account.spent),
                    reserved_usd: to_usd(account.reserved),
                },
                amount_usd,
            }));
        }
        account.reserved += amount;
        let headroom = cap - account.spent.saturating_add(account.reserved);
        let id = ReservationId::new(self.next_id.fetch_add(1, Ordering::Relaxed).to_string());
        let key = state
            .accounts
            .get_key_value(key)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::from(key));
        state.open.insert(
            id.clone(),
            Open {
                key,
                amount,
                period,
                index,
            },
        );
        Ok(Reservation {
            id,
            amount_usd: to_usd(amount),
            headroom_usd: Some(to_usd(headroom)),
        })
    }
}

impl SpendLedger for MemoryLedger {
    fn reserve<'a>(
        &'a self,
        key: &'a str,
        amount_usd: f64,
        cap_usd: f64,
        period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Reservation, ReserveError>> {
        let result = self.reserve_now(key, amount_usd, cap_usd, period);
        Box::pin(std::future::ready(result))
    }

    fn settle(&self, id: &ReservationId, actual_usd: f64) {
        self.settle_locked(&mut self.lock(), id, actual_usd);
    }

    fn settle_watched(&self, id: &ReservationId, actual_usd: f64, watch: SpendWatch) {
        let due = {
            let mut state = self.lock();
            self.settle_locked(&mut state, id, actual_usd);
            self.due_locked(&mut state, &watch)
        };
        // Outside the lock: a sink may read the ledger.
        for (percent, spent) in due {
            watch.alert(percent, spent);
        }
    }

    fn watch(&self, watch: SpendWatch) {
        let due = self.due_locked(&mut self.lock(), &watch);
        for (percent, spent) in due {
            watch.alert(percent, spent);
        }
    }

    fn extend(&self, id: &ReservationId, more_usd: f64, cap_usd: f64) -> BoxFuture<'static, bool> {
        Box::pin(std::future::ready(self.extend_now(id, more_usd, cap_usd)))
    }

    fn spent<'a>(
        &'a self,
        key: &'a str,
        period: BudgetPeriod,
    ) -> BoxFuture<'a, Result<Spend, StoreError>> {
        Box::pin(std::future::ready(Ok(self.spent_now(key, period))))
    }
}

impl MemoryLedger {
    fn settle_locked(&self, state: &mut LedgerState, id: &ReservationId, actual_usd: f64) {
        let Some((key, amount, period)) = state
            .open
            .get(id)
            .map(|o| (o.key.clone(), o.amount, o.period))
        else {
            // Removed on the first settle: a second one finds nothing.
            return;
        };
        let index = period.index_at(self.clock.now());
        // The account of the current period holds it (a new period carried it over).
        let account = Self::account(state, &key, period, index);
        account.reserved = account.reserved.saturating_sub(amount);
        account.spent = account.spent.saturating_add(to_nanos(actual_usd));
        state.open.remove(id);
    }

    /// The thresholds of `watch` its account's spend reaches and that were not alerted in
    /// the current period, marked alerted now: `(percent, spent_usd)`, ascending.
    fn due_locked(&self, state: &mut LedgerState, watch: &SpendWatch) -> Vec<(u8, f64)> {
        let cap = cap_nanos(watch.cap_usd);
        if cap == 0 || watch.percents.is_empty() {
            return Vec::new();
        }
        let index = watch.period.index_at(self.clock.now());
        let account = Self::account(state, &watch.account, watch.period, index);
        let mut due = Vec::new();
        for &percent in watch.percents.iter() {
            let (word, bit) = (usize::from(percent / 64), 1u64 << (percent % 64));
            if reaches(account.spent, cap, percent) && account.alerted[word] & bit == 0 {
                account.alerted[word] |= bit;
                due.push((percent, to_usd(account.spent)));
            }
        }
        due
    }

    fn extend_now(&self, id: &ReservationId, more_usd: f64, cap_usd: f64) -> bool {
        let more = to_nanos(more_usd);
        let cap = cap_nanos(cap_usd);
        let mut state = self.lock();
        let Some(open) = state.open.get(id) else {
            return false;
        };
        let (key, period, opened) = (open.key.clone(), open.period, open.index);
        let index = period.index_at(self.clock.now());
        if index != opened {
            // The period changed under the stream: it gets no more.
            return false;
        }
        let account = Self::account(&mut state, &key, period, index);
        let held = account.spent.saturating_add(account.reserved);
        if held.saturating_add(more) > cap {
            return false;
        }
        account.reserved += more;
        if let Some(open) = state.open.get_mut(id) {
            open.amount += more;
        }
        true
    }

    fn spent_now(&self, key: &str, period: BudgetPeriod) -> Spend {
        let index = period.index_at(self.clock.now());
        let state = self.lock();
        match state.accounts.get(key) {
            Some(a) if a.period == period && a.index == index => Spend {
                spent_usd: to_usd(a.spent),
                reserved_usd: to_usd(a.reserved),
            },
            // A period not started yet: nothing spent, what requests in flight hold.
            _ => Spend {
                spent_usd: 0.0,
                reserved_usd: to_usd(
                    state
                        .open
                        .values()
                        .filter(|o| &*o.key == key && o.period == period)
                        .fold(0u64, |sum, o| sum.saturating_add(o.amount)),
                ),
            },
        }
    }
}
