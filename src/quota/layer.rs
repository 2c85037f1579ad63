//! [`QuotaLayer`], [`Quota`] and their futures.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{Hold, Meter, QuotaBody, Settle, Stage};
use super::ledger::{thresholds, MemoryLedger, ReserveError, SpendLedger, SpendWatch};
use super::period::BudgetPeriod;
use super::rate::{LimitState, MemoryRateLimiter, RateDecision, RateKind, RateLimiter, RateLimits};
use crate::alert::{AlertSink, DEFAULT_SPEND_THRESHOLDS};
use crate::audit::pricing::{ModelPrice, PricingTable, Usage};
use crate::audit::usage::{ScanMode, UsageScanner};
use crate::audit::AuditHandle;
use crate::body::{BoxError, PolicyBody, ResponseBody};
use crate::check::{Check, CheckFuture};
use crate::endpoint::{BodyModel, Endpoint, Feature};
use crate::error::{LayerName, PolicyError, Rejection};
use crate::keys::{ApiKey, BoxFuture, StoreError};
use crate::policy::Policy;
// The prompt is counted as PromptLimit counts it (the one definition of "the prompt").
use crate::prompt_limit::{prompt_tokens_up_to, MediaTokens};
use crate::request::LlmRequest;
use crate::tokens::TokenCounter;

/// Output tokens assumed for a chat, completions or responses request that sets no output
/// limit, by default: 4096.
pub const DEFAULT_OUTPUT_TOKENS: u64 = 4096;

const BATCH_REFUSED: &str = "Batches are not available to this key: it has a spend cap or a token rate limit, and the requests of a batch input file are stored upstream, where their cost cannot be known in advance.";
const UNSEEN_REFUSED: &str = "This request runs a model it does not name (an assistant's, a session default, a source video's); this key has a spend cap or a token rate limit, so name the model in the request.";

/// Applies spend caps and rate limits to the requests of keys that have them. See the
/// [module docs](super).
///
/// Holds its ledger and rate limiter (shared by clones and by every service it makes) and its
/// configuration.
#[derive(Clone)]
pub struct QuotaLayer {
    config: Arc<Config>,
}

struct Config {
    ledger: Arc<dyn SpendLedger>,
    limiter: Arc<dyn RateLimiter>,
    pricing: PricingTable,
    default_output_tokens: u64,
    refuse_unknown_prices: bool,
    media: MediaTokens,
    policy: Policy,
    cut_streams: bool,
    rate_fail_open: bool,
    teams: HashMap<String, TeamCap>,
    alerts: Option<Arc<dyn AlertSink>>,
    alert_thresholds: Arc<[u8]>,
}

/// A team's spend cap, shared by the keys whose [`team`](ApiKey::team) names it: see
/// [`QuotaLayer::team_cap`].
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TeamCap {
    /// The cap in USD per period.
    pub credit_limit_usd: f64,
    /// The period the cap covers (`none`, the default, `daily`, `monthly`; UTC).
    #[serde(default)]
    pub budget_period: BudgetPeriod,
}

/// The ledger account of `team`'s spend: `team:<name>` (a key's account is its name). Read
/// a team's spend with `ledger.spent(&team_account("research"), period)`. Name no key
/// `team:…`: it would share the team's counter.
pub fn team_account(team: &str) -> String {
    format!("team:{team}")
}

/// Whose cap a reservation is held against, for the messages.
#[derive(Clone, Copy)]
enum Owner<'a> {
    Key,
    Team(&'a str),
}

impl Owner<'_> {
    fn has(self) -> String {
        match self {
            Owner::Key => "This key has".to_owned(),
            Owner::Team(team) => format!("This key's team `{team}` has"),
        }
    }

    fn whose(self) -> String {
        match self {
            Owner::Key => "this key's".to_owned(),
            Owner::Team(team) => format!("the team `{team}`'s"),
        }
    }
}

impl fmt::Debug for QuotaLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaLayer")
            .field("prices", &self.config.pricing.len())
            .field("default_output_tokens", &self.config.default_output_tokens)
            .field("refuse_unknown_prices", &self.config.refuse_unknown_prices)
            .field("policy", &self.config.policy)
            .field("rate_limits_fail_open", &self.config.rate_fail_open)
            .field("teams", &self.config.teams)
            .field("alerts", &self.config.alerts.is_some())
            .field("alert_thresholds", &self.config.alert_thresholds)
            .finish_non_exhaustive()
    }
}

impl Default for QuotaLayer {
    fn default() -> Self {
        Self::new(MemoryLedger::new(), MemoryRateLimiter::new())
    }
}

impl QuotaLayer {
    /// A layer counting spend in `ledger` and rates in `limiter`, with the built-in prices
    /// ([`PricingTable::builtin`]).
    pub fn new(ledger: impl SpendLedger, limiter: impl RateLimiter) -> Self {
        QuotaLayer {
            config: Arc::new(Config {
                ledger: Arc::new(ledger),
                limiter: Arc::new(limiter),
                pricing: PricingTable::builtin(),
                default_output_tokens: DEFAULT_OUTPUT_TOKENS,
                refuse_unknown_prices: true,
                media: MediaTokens::default(),
                policy: Policy::default(),
                cut_streams: true,
                rate_fail_open: false,
                teams: HashMap::new(),
                alerts: None,
                alert_thresholds: Arc::new(DEFAULT_SPEND_THRESHOLDS),
            }),
        }
    }

    /// A layer with its state in this process's memory ([`MemoryLedger`],
    /// [`MemoryRateLimiter`]).
    pub fn in_memory() -> Self {
        Self::default()
    }

    fn config_mut(&mut self) -> &mut Config {
        // A clone being configured gets its own copy of the configuration.
        if Arc::get_mut(&mut self.config).is_none() {
            let c = &self.config;
            self.config = Arc::new(Config {
                ledger: c.ledger.clone(),
                limiter: c.limiter.clone(),
                pricing: c.pricing.clone(),
                default_output_tokens: c.default_output_tokens,
                refuse_unknown_prices: c.refuse_unknown_prices,
                media: c.media,
                policy: c.policy.clone(),
                cut_streams: c.cut_streams,
                rate_fail_open: c.rate_fail_open,
                teams: c.teams.clone(),
                alerts: c.alerts.clone(),
                alert_thresholds: c.alert_thresholds.clone(),
            });
        }
        Arc::get_mut(&mut self.config).expect("just made unique")
    }

    /// The prices a reservation and a settlement are computed with (canonical model names).
    #[must_use]
    pub fn pricing(mut self, pricing: PricingTable) -> Self {
        self.config_mut().pricing = pricing;
        self
    }

    /// Output tokens assumed, toward the worst-case cost and the tokens per minute, for a
    /// chat, completions or responses request that sets no output limit (default
    /// [`DEFAULT_OUTPUT_TOKENS`]).
    #[must_use]
    pub fn default_output_tokens(mut self, tokens: u64) -> Self {
        self.config_mut().default_output_tokens = tokens;
        self
    }

    /// Whether a key with a spend cap is refused a model the pricing table has no price for
    /// (default: yes, 429 `insufficient_quota`, fail closed). With `false` such a request
    /// passes while the key is under its cap and counts nothing toward it.
    #[must_use]
    pub fn refuse_unknown_prices(mut self, refuse: bool) -> Self {
        self.config_mut().refuse_unknown_prices = refuse;
        self
    }

    /// Tokens counted per image, audio and file part of a prompt (as
    /// [`PromptLimitLayer::media_tokens`](crate::PromptLimitLayer::media_tokens)).
    #[must_use]
    pub fn media_tokens(mut self, media: MediaTokens) -> Self {
        self.config_mut().media = media;
        self
    }

    /// Whether a capped key's streamed response is cut when its running cost would take the
    /// key past its cap (default: yes). See the [module docs](super#budget-aware-streams).
    #[must_use]
    pub fn cut_streams_at_cap(mut self, cut: bool) -> Self {
        self.config_mut().cut_streams = cut;
        self
    }

    /// Caps the spend of `team`, in USD per `period`: every key whose
    /// [`team`](ApiKey::team) is `team` counts toward it, on top of its own cap (a request
    /// must fit both). The team's spend is counted in the same ledger, under
    /// [`team_account`]`(team)`; a stream is cut when it would pass either cap.
    #[must_use]
    pub fn team_cap(mut self, team: impl Into<String>, cap_usd: f64, period: BudgetPeriod) -> Self {
        self.config_mut().teams.insert(
            team.into(),
            TeamCap {
                credit_limit_usd: cap_usd,
                budget_period: period,
            },
        );
        self
    }

    /// Whether a request passes the rate limits when the rate limiter cannot answer (a
    /// shared store that is down or too slow). Default: no, 503 `policy_unavailable` (fail
    /// closed). With `true` the request goes on uncounted, without `x-ratelimit-*` headers.
    /// Spend caps always fail closed: a ledger that cannot answer refuses.
    #[must_use]
    pub fn rate_limits_fail_open(mut self, open: bool) -> Self {
        self.config_mut().rate_fail_open = open;
        self
    }

    /// Sends [`Alert::SpendThreshold`](crate::alert::Alert::SpendThreshold) to `sink` when an
    /// account's settled spend reaches one of the [thresholds](Self::alert_thresholds) of its
    /// cap (a key's, or a team's as `team:<name>`): once per account, period and threshold.
    /// Keys without a cap alert nothing. See the [module docs](super#alerts).
    #[must_use]
    pub fn alerts(mut self, sink: Arc<dyn AlertSink>) -> Self {
        self.config_mut().alerts = Some(sink);
        self
    }

    /// The spend thresholds alerted, in percent of a cap (default
    /// [`DEFAULT_SPEND_THRESHOLDS`]: 50, 80, 100). Sorted and deduplicated; 0 is ignored;
    /// above 100 is allowed (a request may settle past the cap). None: no spend alerts.
    #[must_use]
    pub fn alert_thresholds(mut self, percents: impl IntoIterator<Item = u8>) -> Self {
        self.config_mut().alert_thresholds = thresholds(percents);
        self
    }

    /// The [`Policy`] a request is resolved with when this layer is the first to see it.
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.config_mut().policy = policy;
        self
    }
}

impl<S> Layer<S> for QuotaLayer {
    type Service = Quota<S>;

    fn layer(&self, inner: S) -> Quota<S> {
        Quota {
            inner: Admit {
                inner,
                config: self.config.clone(),
            },
            check: QuotaCheck {
                config: self.config.clone(),
            },
        }
    }
}

/// Middleware that applies spend caps and rate limits. See the [module docs](super).
#[derive(Clone)]
pub struct Quota<S> {
    inner: Admit<S>,
    check: QuotaCheck,
}

impl<S: fmt::Debug> fmt::Debug for Quota<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quota")
            .field("inner", &self.inner.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Quota<S> {
    /// Wraps `inner` with the limits of `layer`.
    pub fn new(inner: S, layer: &QuotaLayer) -> Self {
        layer.layer(inner)
    }

    /// A default [`QuotaLayer`] (in memory).
    pub fn layer() -> QuotaLayer {
        QuotaLayer::default()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner.inner
    }
}

/// The part of the decision the common check machinery makes: read the body when the key
/// has a limit that needs it, refuse what cannot be priced.
#[derive(Clone)]
struct QuotaCheck {
    config: Arc<Config>,
}

impl Config {
    /// The key's team and its cap, when the team has one.
    fn team_of<'k>(&self, key: &'k ApiKey) -> Option<(&'k str, TeamCap)> {
        let team = key.team.as_deref()?;
        self.teams.get(team).map(|cap| (team, *cap))
    }

    /// Whether the key has any limit this layer enforces.
    fn limited(&self, key: &ApiKey) -> bool {
        self.needs_cost(key) || key.rpm.is_some()
    }

    /// Whether the request's cost or tokens must be known for this key (an `rpm` alone
    /// needs neither, nor the body).
    fn needs_cost(&self, key: &ApiKey) -> bool {
        key.credit_limit_usd.is_some() || key.tpm.is_some() || self.team_of(key).is_some()
    }
}

/// Refusal for a key with a spend cap or a token limit, on an endpoint whose cost its own
/// response does not report.
const COST_UNREPORTED: &str = "This key has a spend cap or a token limit, and this endpoint's cost is not reported in its own response (it runs a job, a run, a session or a tool billed elsewhere), so it cannot be counted: it is refused for this key.";

/// Refusal for a key with a spend cap or a token limit, for a request that generates images
/// (the `image_generation` tool) or speech (audio output): they are priced apart from the
/// model's text tokens, so the reservation would not cover them.
const PRICED_APART: &str = "This key has a spend cap or a token limit, and this request generates images or audio, which are priced apart from its text tokens, so its cost cannot be counted: it is refused for this key.";

/// Whether a request to `endpoint` reports its own cost in its response: a capped or
/// token-limited key may use only these (and read or delete stored objects). Fine-tuning
/// jobs, assistant runs, eval runs, realtime sessions and client secrets, batches, videos,
/// containers and unknown endpoints run models whose usage never comes back in the response:
/// they would be counted at nothing.
fn reports_own_cost(endpoint: Endpoint) -> bool {
    // Moderations are free: nothing to report.
    endpoint.reports_usage() || endpoint == Endpoint::Moderations
}

impl Check for QuotaCheck {
    fn layer(&self) -> LayerName {
        LayerName::Quota
    }

    fn policy(&self) -> &Policy {
        &self.config.policy
    }

    fn on_head(&self, view: &LlmRequest, key: Option<&ApiKey>) -> Result<bool, PolicyError> {
        if !key.is_some_and(|k| self.config.needs_cost(k)) {
            return Ok(false);
        }
        if view.body_model() == BodyModel::Batch {
            return Err(PolicyError::Unverifiable(BATCH_REFUSED.into()));
        }
        if !view.runs_no_model() && !reports_own_cost(view.endpoint()) {
            return Err(PolicyError::Unverifiable(COST_UNREPORTED.into()));
        }
        Ok(true)
    }

    fn decide(
        &self,
        view: &mut LlmRequest,
        key: Option<&ApiKey>,
        _audit: Option<&AuditHandle>,
    ) -> Result<(), PolicyError> {
        if key.is_some_and(|k| self.config.needs_cost(k)) && view.has_body() {
            if view.model_unseen() {
                return Err(PolicyError::Unverifiable(UNSEEN_REFUSED.into()));
            }
            let features = view.features();
            if features.contains(Feature::ImageGeneration)
                || features.contains(Feature::AudioSpeech)
            {
                return Err(PolicyError::Unverifiable(PRICED_APART.into()));
            }
        }
        Ok(())
    }
}

/// The service behind the check: makes the asynchronous decisions (ledger, rate limiter) on
/// the resolved request, calls the inner service, and wraps its body for the settlement.
#[derive(Clone)]
struct Admit<S> {
    inner: S,
    config: Arc<Config>,
}

/// What a request is expected to cost, at worst.
struct Plan {
    price: Option<ModelPrice>,
    cost_usd: f64,
    tokens: u64,
    prompt_tokens: u64,
    counter: TokenCounter,
}

impl Config {
    /// The worst case of a request that runs a model: its prompt (counted exactly with the
    /// `tokens` feature, else estimated from above) and its requested output (or the
    /// default), times the choices asked for, at the model's price.
    fn plan(&self, view: &LlmRequest) -> Option<Plan> {
        let model = view.canonical_model()?;
        let counter = TokenCounter::for_model(model);
        let prompt = if view.has_body() {
            prompt_tokens_up_to(view, &counter, &self.media, usize::MAX).tokens() as u64
        } else {
            0
        };
        let generates = matches!(
            view.endpoint(),
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses
        );
        let per_choice = view.max_output().unwrap_or(if generates {
            self.default_output_tokens
        } else {
            0
        });
        let choices = view.n().max(view.best_of()).unwrap_or(1).max(1);
        let output = per_choice.saturating_mul(choices);
        let price = self.pricing.get(model).copied();
        let usage = Usage {
            prompt_tokens: prompt,
            completion_tokens: output,
            total_tokens: prompt.saturating_add(output),
            ..Usage::default()
        };
        Some(Plan {
            cost_usd: price.map_or(0.0, |p| p.cost(&usage)),
            price,
            tokens: usage.total_tokens,
            prompt_tokens: prompt,
            counter,
        })
    }
}

/// A decision's outcome: the request may go on (with what it owes), or is refused.
type Admission = Result<(Settle, Option<RateDecision>), (PolicyError, Option<RateDecision>)>;

fn usd(amount: f64) -> String {
    if amount >= 0.01 || amount == 0.0 {
        format!("${amount:.2}")
    } else {
        format!("${amount:.6}")
    }
}

/// The decision: the spend cap first (a request refused by a rate limit then releases its
/// reservation), then the rate limits.
async fn admit(
    config: Arc<Config>,
    key: Arc<ApiKey>,
    plan: Option<Plan>,
    audit: Option<AuditHandle>,
) -> Admission {
    let name: Arc<str> = Arc::from(key.name.as_str());
    let limits = RateLimits {
        requests_per_minute: key.rpm,
        tokens_per_minute: key.tpm,
    };
    let tokens = plan.as_ref().map_or(0, |p| p.tokens);
    // Dropped (the client left) or refused before it is sent on: settled at nothing.
    let mut settle = Settle {
        ledger: config.ledger.clone(),
        limiter: config.limiter.clone(),
        key: name.clone(),
        holds: Vec::new(),
        price: plan.as_ref().and_then(|p| p.price),
        rate: None,
        stage: Stage::Unsent,
        scanner: None,
        meter: None,
        audit,
    };
    // The caps this request counts toward: the key's, then its team's.
    let team = config.team_of(&key);
    let caps = key
        .credit_limit_usd
        .map(|cap| (Owner::Key, Cow::Borrowed(&*name), cap, key.budget_period))
        .into_iter()
        .chain(team.map(|(team, cap)| {
            (
                Owner::Team(team),
                Cow::Owned(team_account(team)),
                cap.credit_limit_usd,
                cap.budget_period,
            )
        }));
    let sink = config
        .alerts
        .as_ref()
        .filter(|_| !config.alert_thresholds.is_empty());
    if let Some(plan) = plan.as_ref() {
        for (owner, account, cap, period) in caps {
            let watch = sink.map(|sink| SpendWatch {
                account: match owner {
                    Owner::Key => name.clone(),
                    Owner::Team(_) => Arc::from(&*account),
                },
                period,
                cap_usd: cap,
                percents: config.alert_thresholds.clone(),
                sink: sink.clone(),
            });
            if plan.price.is_none() && config.refuse_unknown_prices {
                return Err((
                    PolicyError::InsufficientQuota(
                        format!("{} a spend cap, and this model's price is not known here, so its cost cannot be counted toward the cap.", owner.has()).into(),
                    ),
                    None,
                ));
            }
            // A refusal drops `settle`, which releases what was held already.
            let reservation = match config
                .ledger
                .reserve(&account, plan.cost_usd, cap, period)
                .await
            {
                Ok(reservation) => reservation,
                Err(ReserveError::Refused(refused)) => {
                    let spend = refused.spend;
                    if let Some(watch) = watch.filter(|w| w.reaches(spend.spent_usd, 100)) {
                        // At the cap: the thresholds its settlements did not alert (none,
                        // usually), once.
                        config.ledger.watch(watch);
                    }
                    let message = format!(
                        "You exceeded {} {}spend cap of {}: {} spent, {} held by requests in progress, and this request may cost up to {}.",
                        owner.whose(),
                        period.adjective(),
                        usd(refused.cap_usd),
                        usd(spend.spent_usd),
                        usd(spend.reserved_usd),
                        usd(refused.amount_usd),
                    );
                    return Err((PolicyError::InsufficientQuota(message.into()), None));
                }
                Err(ReserveError::Unavailable(error)) => {
                    state_failed("spend ledger", &error, false);
                    return Err((PolicyError::PolicyUnavailable, None));
                }
            };
            if settle.holds.is_empty() {
                if let (true, Some(price)) = (config.cut_streams, plan.price.as_ref()) {
                    let prompt = Usage {
                        prompt_tokens: plan.prompt_tokens,
                        total_tokens: plan.prompt_tokens,
                        ..Usage::default()
                    };
                    // The stream may spend its reservation, and asks the ledger for more
                    // as it goes (so that concurrent streams never share the same headroom).
                    settle.meter = Some(Meter::new(
                        plan.counter,
                        price.cost(&prompt),
                        price,
                        reservation.amount_usd,
                    ));
                }
                if let Some(audit) = &settle.audit {
                    audit.set_reserved(reservation.amount_usd);
                }
            }
            settle.holds.push(Hold {
                reservation,
                cap_usd: cap,
                watch,
            });
        }
    }
    if limits.is_empty() {
        return Ok((settle, None));
    }
    match config.limiter.acquire(&name, limits, tokens).await {
        Ok(decision) => match decision.limited_by {
            None => {
                settle.rate = Some((limits, tokens));
                Ok((settle, Some(decision)))
            }
            Some(kind) => Err((rate_limited(kind, &decision, tokens), Some(decision))),
        },
        Err(error) => {
            state_failed("rate limiter", &error, config.rate_fail_open);
            if config.rate_fail_open {
                // Uncounted, so nothing to correct.
                Ok((settle, None))
            } else {
                Err((PolicyError::PolicyUnavailable, None))
            }
        }
    }
}

/// Notes (feature `tracing`) a ledger or rate limiter that could not answer. The error names
/// the failure, never a key or a store's address.
fn state_failed(what: &str, error: &StoreError, passed: bool) {
    #[cfg(feature = "tracing")]
    if passed {
        tracing::warn!(target: "tower_llm_policy::quota", %error, "{what} error: request let through (rate limits fail open)");
    } else {
        tracing::warn!(target: "tower_llm_policy::quota", %error, "{what} error: request refused (503)");
    }
    #[cfg(not(feature = "tracing"))]
    let _ = (what, error, passed);
}

/// The 429 for a request refused by the `kind` limit.
fn rate_limited(kind: RateKind, decision: &RateDecision, tokens: u64) -> PolicyError {
    let (state, name, unit, requested) = match kind {
        RateKind::Requests => (decision.requests, "requests per min (RPM)", "requests", 1),
        RateKind::Tokens => (decision.tokens, "tokens per min (TPM)", "tokens", tokens),
    };
    let state = state.unwrap_or(LimitState {
        limit: 0,
        remaining: 0,
        reset: Duration::ZERO,
    });
    let never = decision.retry_after == Duration::MAX;
    let message = if never {
        format!(
            "Request too large for this key's {name}: Limit {}, Requested {requested} {unit}. Send a smaller request (a shorter prompt, a lower output limit).",
            state.limit
        )
    } else {
        format!(
            "Rate limit reached for this key's {name}: Limit {}, Remaining {}, Requested {requested} {unit}. Please try again in {}.",
            state.limit,
            state.remaining,
            reset_text(decision.retry_after)
        )
    };
    let retry_after_secs = if never {
        60
    } else {
        decision.retry_after.as_secs_f64().ceil().max(1.0) as u64
    };
    PolicyError::RateLimited {
        message,
        retry_after_secs,
    }
}

/// A duration as OpenAI writes `x-ratelimit-reset-*`: `20ms`, `1.5s`, `6m0s` (rounded up to
/// the millisecond).
fn reset_text(d: Duration) -> String {
    let ms = u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(u64::from(d.subsec_nanos() % 1_000_000 != 0));
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let minutes = ms / 60_000;
    let rest = ms % 60_000;
    let secs = if rest % 1000 == 0 {
        format!("{}s", rest / 1000)
    } else {
        let s = format!("{:.3}", rest as f64 / 1000.0);
        format!("{}s", s.trim_end_matches('0'))
    };
    if minutes > 0 {
        format!("{minutes}m{secs}")
    } else {
        secs
    }
}

/// Sets the `x-ratelimit-*` headers of the key's limits.
fn rate_headers(headers: &mut HeaderMap, decision: &RateDecision) {
    const NAMES: [[&str; 3]; 2] = [
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
    ];
    for (names, state) in NAMES.iter().zip([decision.requests, decision.tokens]) {
        let Some(state) = state else { continue };
        headers.insert(names[0], HeaderValue::from(state.limit));
        headers.insert(names[1], HeaderValue::from(state.remaining));
        if let Ok(reset) = HeaderValue::try_from(reset_text(state.reset)) {
            headers.insert(names[2], reset);
        }
    }
}

impl<S, ResBody> Service<Request<PolicyBody>> for Admit<S>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<QuotaBody<ResBody>>;
    type Error = S::Error;
    type Future = AdmitFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<PolicyBody>) -> Self::Future {
        let Some(key) = req
            .extensions()
            .get::<Arc<ApiKey>>()
            .filter(|k| self.config.limited(k))
            .cloned()
        else {
            // No key, or one without limits: no ledger, no limiter, nothing to settle.
            crate::audit::forwarding(&req);
            return AdmitState::Inner {
                future: self.inner.call(req),
                settle: None,
                rate: None,
            }
            .into();
        };
        let plan = req
            .extensions()
            .get::<LlmRequest>()
            .and_then(|view| self.config.plan(view));
        let audit = req.extensions().get::<AuditHandle>().cloned();
        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        AdmitState::Admitting {
            admission: Box::pin(admit(self.config.clone(), key, plan, audit)),
            req: Some(req),
            inner: Some(inner),
        }
        .into()
    }
}

pin_project! {
    pub(crate) struct AdmitFuture<S>
    where
        S: Service<Request<PolicyBody>>,
    {
        #[pin]
        state: AdmitState<S>,
    }
}

pin_project! {
    #[project = AdmitProj]
    enum AdmitState<S>
    where
        S: Service<Request<PolicyBody>>,
    {
        Admitting {
            admission: BoxFuture<'static, Admission>,
            req: Option<Request<PolicyBody>>,
            inner: Option<S>,
        },
        Inner {
            #[pin]
            future: S::Future,
            settle: Option<Settle>,
            rate: Option<RateDecision>,
        },
    }
}

impl<S: Service<Request<PolicyBody>>> From<AdmitState<S>> for AdmitFuture<S> {
    fn from(state: AdmitState<S>) -> Self {
        AdmitFuture { state }
    }
}

impl<S, ResBody> Future for AdmitFuture<S>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Output = Result<Response<QuotaBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                AdmitProj::Admitting {
                    admission,
                    req,
                    inner,
                } => {
                    let next = match ready!(admission.as_mut().poll(cx)) {
                        Ok((mut settle, rate)) => {
                            let req = req.take().expect("AdmitFuture polled after completion");
                            let mut svc =
                                inner.take().expect("AdmitFuture polled after completion");
                            // From here on the upstream may spend: never settled at nothing.
                            settle.stage = Stage::Sent;
                            crate::audit::forwarding(&req);
                            AdmitState::Inner {
                                future: svc.call(req),
                                settle: Some(settle),
                                rate,
                            }
                        }
                        Err((error, rate)) => {
                            let mut response = error
                                .into_response(LayerName::Quota)
                                .map(|full| QuotaBody::made(ResponseBody::from_full(full)));
                            if let Some(rate) = rate {
                                rate_headers(response.headers_mut(), &rate);
                            }
                            return Poll::Ready(Ok(response));
                        }
                    };
                    state.set(next);
                }
                AdmitProj::Inner {
                    future,
                    settle,
                    rate,
                } => {
                    // An error of the inner service drops `settle`: settled as sent.
                    let mut response = ready!(future.poll(cx))?;
                    let mut settle = settle.take();
                    if let Some(settle) = settle.as_mut() {
                        if response.extensions().get::<Rejection>().is_some() {
                            settle.stage = Stage::RefusedInside;
                        } else {
                            let mode = response
                                .headers()
                                .get(header::CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .and_then(ScanMode::from_content_type);
                            settle.scanner = mode.map(UsageScanner::new);
                            let encoded = response.headers().contains_key(header::CONTENT_ENCODING);
                            if mode != Some(ScanMode::Sse) || encoded {
                                // Only a plain event stream is metered (and cut).
                                settle.meter = None;
                            }
                        }
                    }
                    if let Some(rate) = rate {
                        rate_headers(response.headers_mut(), rate);
                    }
                    return Poll::Ready(Ok(
                        response.map(|body| QuotaBody::new(ResponseBody::inner(body), settle))
                    ));
                }
            }
        }
    }
}

impl<S, B, ResBody> Service<Request<B>> for Quota<S>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone,
    ResBody: Body<Data = Bytes>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<QuotaBody<ResBody>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture {
            inner: CheckFuture::new(self.check.clone(), &mut self.inner, req),
        }
    }
}

pin_project! {
    /// Response future of [`Quota`].
    pub struct ResponseFuture<S, B, ResBody>
    where
        S: Service<Request<PolicyBody>, Response = Response<ResBody>>,
        S: Clone,
        ResBody: Body<Data = Bytes>,
        B: Body,
        B::Error: Into<BoxError>,
    {
        #[pin]
        inner: CheckFuture<Admit<S>, B, QuotaCheck>,
    }
}

impl<S, B, ResBody> fmt::Debug for ResponseFuture<S, B, ResBody>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone,
    ResBody: Body<Data = Bytes>,
    B: Body,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B, ResBody>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone,
    ResBody: Body<Data = Bytes>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<QuotaBody<ResBody>>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::reset_text;
    use std::time::Duration;

    #[test]
    fn reset_durations_read_as_openai_writes_them() {
        assert_eq!(reset_text(Duration::from_millis(20)), "20ms");
        assert_eq!(reset_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(reset_text(Duration::from_secs(1)), "1s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset_text(Duration::ZERO), "0ms");
    }
}
