//! Budget periods and the clock they are read from.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The period a key's spend cap (`credit_limit_usd`) covers: the spend counter starts again
/// at zero when a new period begins. Periods are calendar periods in UTC.
///
/// In configuration: `budget_period = "none"` (the default; `"lifetime"` is accepted too),
/// `"daily"` or `"monthly"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BudgetPeriod {
    /// The cap covers the key's whole life: the counter never starts again.
    #[default]
    #[serde(rename = "none", alias = "lifetime")]
    Lifetime,
    /// The cap covers one UTC day (from 00:00:00 UTC).
    #[serde(rename = "daily")]
    Daily,
    /// The cap covers one UTC calendar month (from the 1st, 00:00:00 UTC).
    #[serde(rename = "monthly")]
    Monthly,
}

impl BudgetPeriod {
    /// A number naming the period `now` falls in: equal for two instants of the same period,
    /// different otherwise (0 for [`Lifetime`](Self::Lifetime); days since the Unix epoch for
    /// [`Daily`](Self::Daily); `year * 12 + month - 1` for [`Monthly`](Self::Monthly)). A
    /// ledger keys its counters by it (a Redis ledger: `spend:{key}:{index}`).
    pub fn index_at(self, now: SystemTime) -> u64 {
        let secs = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let days = secs / 86_400;
        match self {
            BudgetPeriod::Lifetime => 0,
            BudgetPeriod::Daily => days,
            BudgetPeriod::Monthly => {
                let (year, month) = year_month(days as i64);
                (year as u64) * 12 + (month as u64 - 1)
            }
        }
    }

    /// The period's name for messages (`"monthly "`, or nothing for a lifetime cap).
    pub(crate) fn adjective(self) -> &'static str {
        match self {
            BudgetPeriod::Lifetime => "",
            BudgetPeriod::Daily => "daily ",
            BudgetPeriod::Monthly => "monthly ",
        }
    }
}

/// The civil (proleptic Gregorian) year and month of a day counted from 1970-01-01, by
/// Howard Hinnant's `civil_from_days`.
fn year_month(days: i64) -> (i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month)
}

/// Where the in-memory ledger and rate limiter read the time: [`SystemClock`] unless a test
/// (or a host with its own time source) gives another, such as a [`ManualClock`] or a closure
/// `Fn() -> SystemTime`.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

impl<F> Clock for F
where
    F: Fn() -> SystemTime + Send + Sync + 'static,
{
    fn now(&self) -> SystemTime {
        self()
    }
}

/// The system's clock ([`SystemTime::now`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that stands still until it is moved: for tests of period rollover and rate limit
/// refills. Clones share the same time.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<Mutex<SystemTime>>,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: SystemTime) -> Self {
        ManualClock {
            now: Arc::new(Mutex::new(start)),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// Sets the clock.
    pub fn set(&self, to: SystemTime) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn months_roll_over_at_utc_midnight_on_the_first() {
        // 2026-01-31T23:59:59Z and 2026-02-01T00:00:00Z.
        let jan = at(1_769_903_999);
        let feb = at(1_769_904_000);
        assert_eq!(BudgetPeriod::Monthly.index_at(jan), 2026 * 12);
        assert_eq!(BudgetPeriod::Monthly.index_at(feb), 2026 * 12 + 1);
        assert_eq!(
            BudgetPeriod::Daily.index_at(feb),
            BudgetPeriod::Daily.index_at(jan) + 1
        );
        assert_eq!(BudgetPeriod::Lifetime.index_at(feb), 0);
        // A leap day: 2024-02-29 is in February, 2024-03-01 in March.
        assert_eq!(
            BudgetPeriod::Monthly.index_at(at(1_709_164_800)),
            2024 * 12 + 1
        );
        assert_eq!(
            BudgetPeriod::Monthly.index_at(at(1_709_251_200)),
            2024 * 12 + 2
        );
    }
}
