//! `[alerts]`: each [`Alert`] (a spend threshold crossed, content a guard blocked) posted as
//! JSON to a webhook.
//!
//! ```json
//! {"type":"spend_threshold","account":"team-a","percent":80,"spent_usd":8.1,"cap_usd":10.0,"period":"monthly"}
//! {"type":"content_blocked","key":"chat-app","guard":"pii","side":"request","label":"email"}
//! ```
//!
//! The request path only queues: [`WebhookAlerts::alert`] puts the alert in a bounded queue
//! (`queue`, 1024 by default) and returns; one background task posts them in order, each
//! with a 10 s timeout. When the queue is full (the webhook is slow or down), the alert is
//! dropped and counted ([`WebhookAlerts::dropped`]); a post that fails is counted
//! ([`WebhookAlerts::failed`]) and logged, and not retried.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tower_llm_policy::alert::{Alert, AlertSink};

use crate::guards::HttpClient;

/// How many alerts wait for the webhook at most, by default.
pub const DEFAULT_QUEUE: usize = 1024;

/// How long one post may take.
pub const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// `[alerts]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// `webhook_url = "https://hooks.example.com/llm"`: where alerts are posted. Absent (the
    /// default): no alerts.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// `secret_env = "TLP_ALERTS_SECRET"`: the environment variable holding a token sent as
    /// `Authorization: Bearer <token>` with each post. Never shown.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// `thresholds = [50, 80, 100]`: the percents of a key's or team's spend cap that alert
    /// (once per account and period each). `[]`: no spend alerts.
    #[serde(default = "default_thresholds")]
    pub thresholds: Vec<u8>,
    /// `queue = 1024`: alerts waiting for the webhook at most; more are dropped (counted).
    #[serde(default = "default_queue")]
    pub queue: usize,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhook_url: None,
            secret_env: None,
            thresholds: default_thresholds(),
            queue: DEFAULT_QUEUE,
        }
    }
}

fn default_thresholds() -> Vec<u8> {
    tower_llm_policy::alert::DEFAULT_SPEND_THRESHOLDS.to_vec()
}
fn default_queue() -> usize {
    DEFAULT_QUEUE
}

/// Checks `[alerts]` (no environment needed).
pub fn check_config(alerts: &AlertsConfig) -> Result<(), String> {
    if let Some(url) = &alerts.webhook_url {
        let uri: Uri = url
            .parse()
            .map_err(|_| "`alerts.webhook_url` is not a valid URL".to_owned())?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err("`alerts.webhook_url` must be an http:// or https:// URL".into());
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(
                "`alerts.webhook_url` must not contain credentials (use `secret_env`)".into(),
            );
        }
    } else if alerts.secret_env.is_some() {
        return Err("`alerts.secret_env` needs `alerts.webhook_url`".into());
    }
    if let Some(env) = &alerts.secret_env {
        if env.trim().is_empty() || env.contains('=') || env.contains('\0') {
            return Err("`alerts.secret_env` must be the name of an environment variable".into());
        }
    }
    if alerts.queue == 0 {
        return Err("`alerts.queue` must be above zero".into());
    }
    if alerts.thresholds.contains(&0) {
        return Err("`alerts.thresholds`: percents above zero".into());
    }
    Ok(())
}

/// An [`AlertSink`] posting each alert as JSON to a webhook, from a background task.
pub struct WebhookAlerts {
    tx: mpsc::Sender<Value>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

impl fmt::Debug for WebhookAlerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookAlerts")
            .field("sent", &self.sent())
            .field("failed", &self.failed())
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl WebhookAlerts {
    /// The sink of `[alerts]`, or `None` without a `webhook_url`; starts its task (call
    /// within the Tokio runtime). `env` looks `secret_env` up.
    pub fn from_config(
        config: &AlertsConfig,
        env: &dyn Fn(&str) -> Option<String>,
        client: HttpClient,
    ) -> Result<Option<WebhookAlerts>, String> {
        let Some(url) = &config.webhook_url else {
            return Ok(None);
        };
        let uri: Uri = url
            .parse()
            .map_err(|_| "`alerts.webhook_url` is not a valid URL".to_owned())?;
        let secret = match &config.secret_env {
            Some(var) => {
                let token = env(var)
                    .filter(|t| !t.trim().is_empty())
                    .ok_or_else(|| format!("`alerts.secret_env`: the variable {var} is not set"))?;
                let mut value =
                    HeaderValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
                        format!("`alerts.secret_env`: the variable {var} is not a valid token")
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Some(WebhookAlerts::start(
            uri,
            secret,
            config.queue,
            client,
        )))
    }

    fn start(
        uri: Uri,
        secret: Option<HeaderValue>,
        queue: usize,
        client: HttpClient,
    ) -> WebhookAlerts {
        let (tx, mut rx) = mpsc::channel::<Value>(queue.max(1));
        let counters = Arc::new(Counters::default());
        let task_counters = counters.clone();
        tokio::spawn(async move {
            while let Some(alert) = rx.recv().await {
                let mut request = Request::post(uri.clone())
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(alert.to_string())))
                    .expect("a request to a parsed URI");
                if let Some(secret) = &secret {
                    request
                        .headers_mut()
                        .insert(header::AUTHORIZATION, secret.clone());
                }
                let posted = tokio::time::timeout(POST_TIMEOUT, async {
                    let response = client.request(request).await.map_err(|e| e.to_string())?;
                    let status = response.status();
                    // Read the answer so the connection can be reused.
                    let _ = response.into_body().collect().await;
                    if status.is_success() {
                        Ok(())
                    } else {
                        Err(format!("the webhook answered {status}"))
                    }
                })
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {POST_TIMEOUT:?}")));
                match posted {
                    Ok(()) => task_counters.sent.fetch_add(1, Ordering::Relaxed),
                    Err(error) => {
                        tracing::warn!(%error, "an alert could not be posted");
                        task_counters.failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
        WebhookAlerts { tx, counters }
    }

    /// Alerts posted.
    pub fn sent(&self) -> u64 {
        self.counters.sent.load(Ordering::Relaxed)
    }

    /// Alerts whose post failed.
    pub fn failed(&self) -> u64 {
        self.counters.failed.load(Ordering::Relaxed)
    }

    /// Alerts dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }
}

/// An alert as the webhook gets it; `None` for a kind of alert this proxy does not know.
pub fn alert_json(alert: &Alert) -> Option<Value> {
    Some(match alert {
        Alert::SpendThreshold {
            account,
            percent,
            spent_usd,
            cap_usd,
            period,
        } => json!({
            "type": "spend_threshold",
            "account": account,
            "percent": percent,
            "spent_usd": spent_usd,
            "cap_usd": cap_usd,
            "period": period,
        }),
        Alert::ContentBlocked {
            key,
            guard,
            side,
            label,
        } => json!({
            "type": "content_blocked",
            "key": key,
            "guard": guard,
            "side": side,
            "label": label,
        }),
        _ => return None,
    })
}

impl AlertSink for WebhookAlerts {
    fn alert(&self, alert: Alert) {
        let Some(body) = alert_json(&alert) else {
            return;
        };
        if self.tx.try_send(body).is_err() {
            let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(dropped, "the alerts queue is full: alerts are dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked() -> Alert {
        Alert::ContentBlocked {
            key: Some("k".into()),
            guard: "g".into(),
            side: "request",
            label: None,
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        // The task cannot run before this test yields (a current-thread runtime): the first
        // alert fills the queue of one, the others are dropped at once.
        let config = AlertsConfig {
            webhook_url: Some("http://127.0.0.1:9/alerts".into()),
            queue: 1,
            ..AlertsConfig::default()
        };
        let client = crate::guards::http_client().unwrap();
        let sink = WebhookAlerts::from_config(&config, &|_| None, client)
            .unwrap()
            .expect("configured");
        for _ in 0..5 {
            sink.alert(blocked());
        }
        assert_eq!(sink.dropped(), 4);
    }

    #[test]
    fn alerts_are_the_documented_json() {
        assert_eq!(
            alert_json(&blocked()),
            Some(
                json!({"type": "content_blocked", "key": "k", "guard": "g", "side": "request", "label": null})
            )
        );
    }

    #[test]
    fn a_secret_without_a_webhook_or_a_zero_queue_is_refused() {
        let mut config = AlertsConfig {
            secret_env: Some("X".into()),
            ..AlertsConfig::default()
        };
        assert!(check_config(&config).is_err());
        config.secret_env = None;
        config.queue = 0;
        assert!(check_config(&config).is_err());
    }
}
