//! Quota: spend caps and rate limits per key.
//!
//! The limits are the key's own fields, on the [`ApiKey`](crate::ApiKey) that
//! [`KeyAuth`](crate::KeyAuth) puts in the request's extensions (so put this layer after
//! KeyAuth; without a key, or for a key with none of these fields, it does nothing and costs
//! nothing):
//!
//! | field | limit | over the limit |
//! |---|---|---|
//! | `credit_limit_usd`, `budget_period` | spend in USD per period (`none`, `daily`, `monthly`, UTC) | 429 `insufficient_quota`, `x-should-retry: false` |
//! | `rpm` | requests per minute | 429 `rate_limit_exceeded`, `retry-after` |
//! | `tpm` | tokens (prompt and completion) per minute | 429 `rate_limit_exceeded`, `retry-after` |
//!
//! A refused request never reaches the inner service.
//!
//! # Spend caps
//!
//! Before the request goes on, its **worst-case cost** is reserved in the [`SpendLedger`]: the
//! prompt's tokens (counted exactly with the `tokens` cargo feature, else estimated from
//! above, as [`PromptLimit`](crate::prompt_limit) counts them) plus the requested output
//! (`max_tokens`, `max_completion_tokens`, `max_output_tokens`; [`DEFAULT_OUTPUT_TOKENS`]
//! when a chat, completions or responses request sets none, see
//! [`QuotaLayer::default_output_tokens`]) times `n`, at the canonical model's price in the
//! layer's [`PricingTable`](crate::audit::pricing::PricingTable). The ledger refuses when
//! what the key spent, plus what its requests in flight hold, plus this reservation, would be
//! more than the cap — atomically, so concurrent requests cannot share the same last dollar.
//! A model with no known price is refused for a key with a cap (fail closed;
//! [`QuotaLayer::refuse_unknown_prices`]). Batches, and requests that run a model they do not
//! name, are refused for such keys (403 `unverifiable_request`): their cost cannot be known.
//!
//! When the response ends, the request is **settled**: its body is wrapped
//! ([`QuotaBody`]), passed on frame by frame, and its usage read on the way
//! ([`UsageScanner`](crate::audit::usage::UsageScanner)); the reservation is replaced by the
//! usage's cost. A response that reports no usage (or usage that cannot be right), one whose
//! body fails, or one dropped by a client that went away before the usage came, settles at
//! its reservation: never at nothing once the upstream had the request. A request refused
//! before it was sent on (here, or by a layer further in) settles at nothing. Streams report
//! their usage only when asked: put the [`AuditLayer`](crate::AuditLayer) in front, which
//! asks for it ([`inject_usage`](crate::AuditLayer::inject_usage)), or the stream is
//! settled at its reservation.
//!
//! A request may cost more than its reservation: a response that is not streamed and writes
//! more than [`DEFAULT_OUTPUT_TOKENS`] when the request set no output limit, or hidden
//! reasoning tokens. The cap can then be passed by that difference, **by each such request
//! in flight at the same time**; the next request is refused. For a hard cap, require an
//! output limit on capped keys ([`PromptLimit`](crate::prompt_limit)'s `require_output_limit`
//! or its clamp) and raise [`QuotaLayer::default_output_tokens`] to the models' real maximum.
//!
//! # Budget-aware streams
//!
//! A stream can outgrow its reservation: an upstream that ignores the output limit, or a
//! request without one that writes more than [`DEFAULT_OUTPUT_TOKENS`]. For a key with a
//! cap, the text of a streamed response's deltas (every string of a chat `delta` but its
//! labels: content, refusals, tool and function call arguments, audio transcripts; completions
//! `text`; Responses `*.delta` events) is counted as it passes
//! (exactly with the `tokens` feature, else at 4 characters a token). A stream may spend its
//! reservation; past it, it asks the ledger to hold more under the same reservation
//! ([`SpendLedger::extend`], atomic against the cap, so that streams running together never
//! share the same remaining budget), and when the ledger holds no more the stream is cut
//! after the event that crossed: the client gets an
//! error event in OpenAI's shape (`data: {"error":{...,"code":"insufficient_quota"}}`) then
//! `data: [DONE]`, the upstream response is dropped (which ends the generation), and the
//! request is settled at what the stream was seen to cost. A compressed stream is not
//! metered. [`QuotaLayer::cut_streams_at_cap`] turns this off.
//!
//! # Rate limits
//!
//! Counted by the [`RateLimiter`]; [`MemoryRateLimiter`] uses token buckets, as OpenAI does
//! (see its docs). The tokens of a request are its worst-case tokens (as above), corrected
//! to its real usage when it ends. Every response of a request the rate limiter counted, and
//! every 429 of the rate limiter, carries OpenAI's headers for each of the key's limits
//! (a request refused for its spend cap first does not reach the rate limiter):
//! `x-ratelimit-limit-requests`,
//! `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` (a duration: `1s`,
//! `6m0s`) and the `-tokens` variants; a 429 also `retry-after` (seconds), and its message
//! names the limit. A request refused by a rate limit releases its spend reservation.
//!
//! # Team caps
//!
//! A key whose [`team`](crate::ApiKey::team) names a team with a cap
//! ([`QuotaLayer::team_cap`]) reserves against both: its own cap (if it has one) and the
//! team's, which every key of the team shares (counted under [`team_account`]). A request
//! must fit both; refused by the team's, it releases what its key held. A stream is cut when
//! it would pass either.
//!
//! # Alerts
//!
//! With an [alert sink](QuotaLayer::alerts), an account (a key, or `team:<name>` for a team
//! cap) whose settled spend reaches a threshold of its cap ([`QuotaLayer::alert_thresholds`],
//! 50, 80 and 100 % by default) fires
//! [`Alert::SpendThreshold`](crate::alert::Alert::SpendThreshold), once per account, period
//! and threshold: the ledger records what it alerted, with the period's counters
//! ([`SpendLedger::settle_watched`]), so a new period alerts again and other requests of the
//! same period do not. Spend is what is settled (a request counts when its response ends),
//! so a threshold fires from the settlement that reaches it. A request refused at the cap
//! (429) alerts at most the thresholds not alerted yet, never again. [`MemoryLedger`]
//! alerts from the settlement itself; `RedisLedger` from the task that sends its queued
//! settlement, once in total for every replica sharing the Redis.
//!
//! # State
//!
//! [`MemoryLedger`] and [`MemoryRateLimiter`] (the default, [`QuotaLayer::in_memory`]) keep
//! the counters in this process. For several replicas, keep them in Redis: `RedisStore`
//! (cargo feature `redis`), whose ledger and rate limiter run each decision as one atomic Lua
//! script, so that replicas never let two requests pass on the same remaining budget. Both
//! traits are object safe, with boxed futures for the decisions and synchronous, idempotent
//! settlements; a ledger that cannot answer fails closed (503 `policy_unavailable`), a rate
//! limiter too unless [`QuotaLayer::rate_limits_fail_open`]. The clock of the state is
//! injectable ([`Clock`], [`ManualClock`]).
//!
//! # Known limits
//!
//! - The reservation counts the prompt the request carries. A Responses request that
//!   continues a stored conversation (`previous_response_id`, `conversation`) or uses a
//!   stored prompt is reserved for its own input only; it settles at its real usage, so the
//!   ledger is right afterwards, but that one request may pass the cap by the stored part.
//! - Fees per tool call (web search, file search, code interpreter sessions) are not in the
//!   token usage and are not counted.
//! - A `background: true` Responses request answers at once without usage: it settles at
//!   its reservation (its worst case when it sets an output limit).
//!
//! ```
//! use std::sync::Arc;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::BodyExt;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_llm_policy::{ApiKey, PolicyBody};
//! use tower_llm_policy::quota::{BudgetPeriod, MemoryLedger, MemoryRateLimiter, QuotaLayer};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let svc = ServiceBuilder::new()
//!     .layer(QuotaLayer::new(MemoryLedger::new(), MemoryRateLimiter::new()))
//!     .service(service_fn(|_req: Request<PolicyBody>| async {
//!         let body = r#"{"choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":1000,"total_tokens":2000}}"#;
//!         let mut response = Response::new(body.to_owned());
//!         response.headers_mut().insert("content-type", "application/json".parse().unwrap());
//!         Ok::<_, std::convert::Infallible>(response)
//!     }));
//! // KeyAuth puts the key there; a cap of 2 cents a day.
//! let key = Arc::new(ApiKey::new("team-a").credit_limit_usd(0.02, BudgetPeriod::Daily).rpm(60));
//! let chat = || {
//!     let mut req = Request::post("/v1/chat/completions")
//!         .body(r#"{"model":"gpt-4o","max_tokens":500,"messages":[{"role":"user","content":"Hi"}]}"#.to_owned())
//!         .unwrap();
//!     req.extensions_mut().insert(key.clone());
//!     req
//! };
//!
//! // Up to $0.005 reserved, $0.0125 spent (1000 + 1000 tokens of gpt-4o).
//! let ok = svc.clone().oneshot(chat()).await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//! assert_eq!(ok.headers()["x-ratelimit-remaining-requests"], "59");
//! ok.into_body().collect().await.unwrap();
//! // The second fits in the reservation, the third does not.
//! let _ = svc.clone().oneshot(chat()).await.unwrap().into_body().collect().await;
//! let refused = svc.oneshot(chat()).await.unwrap();
//! assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(refused.headers()["x-should-retry"], "false");
//! # });
//! ```

mod body;
mod layer;
mod ledger;
mod period;
mod rate;
#[cfg(feature = "redis")]
mod redis;

pub use body::QuotaBody;
pub use layer::{team_account, Quota, QuotaLayer, ResponseFuture, TeamCap, DEFAULT_OUTPUT_TOKENS};
pub use ledger::{
    MemoryLedger, Refused, Reservation, ReservationId, ReserveError, Spend, SpendLedger, SpendWatch,
};
pub use period::{BudgetPeriod, Clock, ManualClock, SystemClock};
pub use rate::{LimitState, MemoryRateLimiter, RateDecision, RateKind, RateLimiter, RateLimits};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{
    RedisLedger, RedisOptions, RedisRateLimiter, RedisStore, DEFAULT_REDIS_TIMEOUT,
    DEFAULT_RESERVATION_TTL,
};
