//! Alerts: a key (or team) crossing a spend threshold, content a guard blocked; delivered
//! through an [`AlertSink`] the host provides.
//!
//! Spend alerts come from [`QuotaLayer::alerts`](crate::QuotaLayer::alerts): each threshold
//! ([`DEFAULT_SPEND_THRESHOLDS`], or
//! [`QuotaLayer::alert_thresholds`](crate::QuotaLayer::alert_thresholds)) fires once per
//! account and period, when the account's settled spend reaches it. [`MemoryAlerts`] keeps
//! what it is given, for tests and simple hosts:
//!
//! ```
//! use std::sync::Arc;
//! use tower_llm_policy::alert::{Alert, AlertSink, MemoryAlerts};
//! use tower_llm_policy::QuotaLayer;
//!
//! let alerts = MemoryAlerts::new();
//! let quota = QuotaLayer::in_memory().alerts(Arc::new(alerts.clone())).alert_thresholds([75, 100]);
//! # let _ = quota;
//! // ... requests ...
//! for alert in alerts.take() {
//!     if let Alert::SpendThreshold { account, percent, .. } = alert {
//!         println!("{account} spent {percent} % of its cap");
//!     }
//! }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::quota::BudgetPeriod;

/// Something an operator wants to hear about.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub enum Alert {
    /// An account's spend crossed `percent` % of its cap in the current period (each
    /// threshold fires once per period and account).
    SpendThreshold {
        /// The ledger account: a key's name, or `team:<name>` for a team cap.
        account: String,
        /// The threshold crossed (50, 80, 100 by default).
        percent: u8,
        /// What the account had spent when it crossed, in USD.
        spent_usd: f64,
        /// The cap, in USD.
        cap_usd: f64,
        /// The period the cap covers.
        period: BudgetPeriod,
    },
    /// A guard blocked a request or withheld a response.
    ContentBlocked {
        /// The key's name, when one was authenticated.
        key: Option<String>,
        /// The guard's name.
        guard: String,
        /// `"request"` or `"response"`.
        side: &'static str,
        /// What was found (`email`, a moderation category, a tool name), when known.
        label: Option<String>,
    },
}

impl fmt::Debug for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alert::SpendThreshold {
                account,
                percent,
                spent_usd,
                cap_usd,
                period,
            } => f
                .debug_struct("SpendThreshold")
                .field("account", account)
                .field("percent", percent)
                .field("spent_usd", spent_usd)
                .field("cap_usd", cap_usd)
                .field("period", period)
                .finish(),
            Alert::ContentBlocked {
                key,
                guard,
                side,
                label,
            } => f
                .debug_struct("ContentBlocked")
                .field("key", key)
                .field("guard", guard)
                .field("side", side)
                .field("label", label)
                .finish(),
        }
    }
}

/// Receives [`Alert`]s. Called on the request path: an implementation must return at once
/// (queue the alert, send it from a task), never block.
pub trait AlertSink: Send + Sync + 'static {
    /// Delivers one alert.
    fn alert(&self, alert: Alert);
}

impl<T: AlertSink + ?Sized> AlertSink for Arc<T> {
    fn alert(&self, alert: Alert) {
        (**self).alert(alert)
    }
}

/// The spend thresholds alerted by default: 50, 80 and 100 % of a cap.
pub const DEFAULT_SPEND_THRESHOLDS: [u8; 3] = [50, 80, 100];

/// An [`AlertSink`] that keeps every alert in memory, in the order given: for tests, and for
/// hosts that poll ([`take`](Self::take)) and send alerts on their own schedule. Clones share
/// the alerts. Unbounded: a host that never takes them keeps them all.
#[derive(Clone, Default)]
pub struct MemoryAlerts {
    alerts: Arc<Mutex<Vec<Alert>>>,
}

impl fmt::Debug for MemoryAlerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryAlerts")
            .field("alerts", &self.len())
            .finish()
    }
}

impl MemoryAlerts {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Alert>> {
        // A push cannot leave the list half-updated: a poisoned lock is used as is.
        self.alerts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes and returns the alerts kept so far, oldest first.
    pub fn take(&self) -> Vec<Alert> {
        std::mem::take(&mut *self.lock())
    }

    /// A copy of the alerts kept so far, oldest first (they stay).
    pub fn snapshot(&self) -> Vec<Alert> {
        self.lock().clone()
    }

    /// How many alerts are kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no alert is kept.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl AlertSink for MemoryAlerts {
    fn alert(&self, alert: Alert) {
        self.lock().push(alert);
    }
}
