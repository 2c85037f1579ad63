//! `[metrics]`: the library's [`MetricsSink`] behind the audit layer, rendered in the
//! Prometheus text format at `GET /metrics` (metrics-exporter-prometheus's recorder, without
//! its HTTP listener: this proxy serves the page itself).
//!
//! Off by default. When on, the page is served either
//! - on the API's own listener, before the policy stack (so a scrape is neither a request of
//!   a key nor an audit record): then `token_env` is required, and a scrape must send
//!   `Authorization: Bearer <token>` — the API listener is the clients' and the page names
//!   the keys and their spend; or
//! - on a listener of its own (`listen`), for a network that only the monitoring reaches;
//!   the token is optional there.
//!
//! The page shows key *names*, never a key, and labels only models of the pricing table
//! (built-in prices and `[pricing]`): any other name a client sends is `other` (see
//! [`tower_llm_policy::metrics`]).
//!
//! The recorder is the process's global one, installed once: every proxy in the process
//! (the tests run several) shares it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tower_llm_policy::audit::pricing::PricingTable;
use tower_llm_policy::audit::JsonlSink;
use tower_llm_policy::metrics::{
    names, MetricsSink, LAYERS_DURATION_BUCKETS, REQUEST_DURATION_BUCKETS,
};
use tower_llm_policy::postgres::PostgresSink;

use crate::config::MetricsConfig;
use crate::stack::ProxyBody;

/// How often the recorder's histograms are folded in when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The proxy's metrics: the sink for the audit layer, the page, and its own listener if it
/// has one.
pub struct Metrics {
    page: Arc<MetricsPage>,
    listener: Option<TcpListener>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("page", &self.page)
            .field("addr", &self.addr())
            .finish()
    }
}

/// `GET <path>`: the Prometheus page.
pub struct MetricsPage {
    path: String,
    /// The bearer token a scrape must send (never shown in `Debug`).
    token: Option<String>,
    handle: PrometheusHandle,
    sink: MetricsSink,
}

impl std::fmt::Debug for MetricsPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsPage")
            .field("path", &self.path)
            .field("token", &self.token.as_ref().map(|_| "[redacted]"))
            .field("sink", &self.sink)
            .finish_non_exhaustive()
    }
}

/// The process's Prometheus recorder, installed on first use (with histogram buckets for the
/// library's two durations), and its upkeep task. `None` if another recorder was installed
/// first.
fn handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(names::REQUEST_DURATION.to_owned()),
                    REQUEST_DURATION_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(names::LAYERS_DURATION.to_owned()),
                        LAYERS_DURATION_BUCKETS,
                    )
                });
            let handle = match builder.and_then(PrometheusBuilder::install_recorder) {
                Ok(handle) => handle,
                Err(error) => {
                    tracing::error!(%error, "cannot install the Prometheus recorder");
                    return None;
                }
            };
            MetricsSink::describe();
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        })
        .clone()
}

impl Metrics {
    /// `[metrics]` of the configuration: `None` when off. Reads the token's environment
    /// variable with `env`, installs the recorder, binds the page's own listener if it has
    /// one. Must run within the Tokio runtime.
    pub async fn prepare(
        config: &MetricsConfig,
        pricing: &PricingTable,
        jsonl: Option<&JsonlSink>,
        postgres: Option<&PostgresSink>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Metrics>, String> {
        if !config.enabled {
            return Ok(None);
        }
        let path = config.path.trim();
        if !path.starts_with('/') || path.starts_with("/v1/") || path == "/v1" || path == "/healthz"
        {
            return Err(format!(
                "`metrics.path` ({path}) must start with `/` and be neither /healthz nor under /v1"
            ));
        }
        let token = match &config.token_env {
            Some(name) => match env(name).filter(|t| !t.trim().is_empty()) {
                Some(token) => Some(token.trim().to_owned()),
                // Fail closed: a page meant to be protected is not served open.
                None => {
                    return Err(format!(
                        "`metrics.token_env`: the environment variable {name} is not set"
                    ))
                }
            },
            None if config.listen.is_none() => {
                return Err(
                    "serving the metrics on the API's listener needs `metrics.token_env` \
                     (the page names the keys and their spend); or give it its own \
                     `metrics.listen` address"
                        .to_owned(),
                )
            }
            None => None,
        };
        let handle = handle().ok_or("a metrics recorder was installed already")?;
        // The built-in prices' models, and `[pricing]`'s.
        let mut sink = MetricsSink::new().priced_models(pricing);
        if let Some(jsonl) = jsonl {
            sink = sink.watch_jsonl("jsonl", jsonl);
        }
        if let Some(postgres) = postgres {
            sink = sink.watch_postgres("postgres", postgres);
        }
        let listener = match config.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen on {addr} for the metrics: {e}"))?,
            ),
            None => None,
        };
        Ok(Some(Metrics {
            page: Arc::new(MetricsPage {
                path: path.to_owned(),
                token,
                handle,
                sink,
            }),
            listener,
        }))
    }

    /// The sink to add to the audit layer's.
    pub fn sink(&self) -> MetricsSink {
        self.page.sink.clone()
    }

    /// The page's own listening address (`None`: on the API's listener).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The page, for the API's listener when it has none of its own; and the page's own
    /// listener, served on a task until the returned handle is aborted.
    pub fn start(
        self,
    ) -> (
        Option<Arc<MetricsPage>>,
        Option<tokio::task::JoinHandle<()>>,
    ) {
        match self.listener {
            None => (Some(self.page), None),
            Some(listener) => (None, Some(tokio::spawn(serve(listener, self.page)))),
        }
    }
}

impl MetricsPage {
    /// Whether `req` is for the page (any method: a POST to it is answered 405 here, not sent
    /// upstream).
    pub fn matches<B>(&self, req: &Request<B>) -> bool {
        req.uri().path() == self.path
    }

    /// The answer to a request for the page.
    pub fn respond<B>(&self, req: &Request<B>) -> Response<ProxyBody> {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        if let Some(token) = &self.token {
            let sent = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                .unwrap_or_default();
            if !same(sent, token.as_bytes()) {
                let mut response = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
        }
        self.sink.report_sinks();
        self.handle.run_upkeep();
        let mut response = text(StatusCode::OK, self.handle.render());
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }
}

/// Constant-time comparison (the time depends on the lengths only).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Serves the page alone on `listener` (HTTP/1.1): every other path is a 404.
async fn serve(listener: TcpListener, page: Arc<MetricsPage>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let page = page.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let response = if page.matches(&req) {
                    page.respond(&req)
                } else {
                    text(StatusCode::NOT_FOUND, "not found\n")
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"ab", b"abc"));
        assert!(!same(b"", b"abc"));
    }
}
