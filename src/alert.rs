//! Alerts: a key (or team) crossing a spend threshold, content a guard blocked; delivered
//! through an [`AlertSink`] the host provides.

use std::fmt;

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
