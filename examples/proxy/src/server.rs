//! The proxy's HTTP server: HTTP/1.1 and HTTP/2 (hyper-util's `auto`), `GET /healthz`, the
//! client's address for the keys' IP allow-lists (the connection's, or from the forwarding
//! headers of a trusted proxy), one log line per request, and graceful
//! shutdown with a bounded wait.
//!
//! Slow and greedy clients ([`ServerOptions`], `[server]` in the configuration):
//! - a connection has `header_read_timeout` to send a request's head: the HTTP/2 preface
//!   (checked here, before hyper), or the HTTP/1 request line and headers (hyper's own header
//!   read timeout, which also closes an idle keep-alive connection). It is closed otherwise,
//!   without an answer. An HTTP/2 connection with no request in flight (a response body
//!   still streaming counts as in flight) for that long is closed too;
//! - a request body that stalls for `body_read_timeout`, or is not all there
//!   `body_total_timeout` after the request started (a client trickling it a byte at a time),
//!   is answered with a 408 and the connection closed (see [`crate::slow_client`]);
//! - the request body bytes held at once, all requests together, are capped at
//!   `max_body_bytes_in_flight` (one [`BodyBudget`] for the server): a request whose next
//!   bytes do not fit is answered with a 503 `server_overloaded` (`Retry-After: 1`) and the
//!   connection closed (on HTTP/2, the stream alone ends); the budget's bytes come back as
//!   requests are answered or abandoned;
//! - at most `max_connections` connections are served at once: the next one is accepted
//!   only when one closes (until then it waits in the kernel's listen queue);
//! - a request hyper cannot parse is answered by hyper itself, before any service runs: 400
//!   (bad request line or header), 431 (head too large) or 414 (URI too long), with an empty
//!   body. hyper (1.x) writes those responses internally and offers no hook to give them a
//!   body, so they are not OpenAI-shaped; no audit record is written for them either, as no
//!   request reached the stack.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt};
use tower_llm_policy::{ClientIp, PolicyBody, Rejection, TrustedProxies};

use crate::config::{
    DEFAULT_BODY_READ_TIMEOUT, DEFAULT_BODY_TOTAL_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES_IN_FLIGHT, DEFAULT_MAX_CONNECTIONS, DEFAULT_SHUTDOWN_GRACE,
};
use crate::metrics::MetricsPage;
use crate::slow_client::{BodyBudget, BodyState, ReadTimeoutBody};
use crate::stack::{ProxyBody, ProxyService};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How the server treats connections: `[server]` of the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// After the shutdown signal, how long in-flight requests may run on.
    pub grace: Duration,
    /// How long a client has to send a request's head (see the [module docs](self)).
    pub header_read_timeout: Duration,
    /// Longest wait for the next piece of a request body (408 after).
    pub body_read_timeout: Duration,
    /// Longest time from a request's start to the end of its body (408 after).
    pub body_total_timeout: Duration,
    /// Request body bytes held at once, all requests together (503 above).
    pub max_body_bytes_in_flight: usize,
    /// Connections served at once.
    pub max_connections: usize,
    /// The reverse proxies whose `X-Forwarded-For` or `Forwarded` is believed (`[proxy]`).
    pub trusted_proxies: TrustedProxies,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            grace: DEFAULT_SHUTDOWN_GRACE,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            body_total_timeout: DEFAULT_BODY_TOTAL_TIMEOUT,
            max_body_bytes_in_flight: DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            trusted_proxies: TrustedProxies::none(),
        }
    }
}

/// Serves `service` on `listener` until `shutdown` completes; then stops accepting, lets the
/// open connections finish their in-flight requests and streams for at most
/// `options.grace`, and returns. Idle keep-alive connections are closed at once.
///
/// Bodies are never buffered here; the stack holds them to `[body]` (see
/// [`tower_llm_policy::BodyLimit`]), inside the audit layer so that a 413 is recorded too.
pub async fn run(
    service: ProxyService,
    listener: TcpListener,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    run_with(service, listener, options, None, shutdown).await
}

/// [`run`], with the `[metrics]` page served on the same listener, before the stack (see
/// [`crate::metrics`]).
pub async fn run_with(
    service: ProxyService,
    listener: TcpListener,
    options: ServerOptions,
    metrics: Option<Arc<MetricsPage>>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let grace = options.grace;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    // HTTP/2 keep-alive pings and stream limits use the timer too.
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let bodies = BodyRules {
        read_timeout: options.body_read_timeout,
        total_timeout: options.body_total_timeout,
        budget: BodyBudget::new(options.max_body_bytes_in_flight),
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A free slot first: beyond the limit, connections wait unaccepted.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let metrics = metrics.clone();
        let bodies = bodies.clone();
        let trusted = options.trusted_proxies.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_timeout = options.header_read_timeout;
        tokio::spawn(async move {
            // The slot is freed when this task ends, however it ends.
            let _permit = permit;
            // hyper's header read timeout starts once it knows the protocol; the preface
            // (or the first bytes of an HTTP/1 request) must come within the same time.
            let protocol = match tokio::time::timeout(header_timeout, first_bytes(&stream)).await {
                Ok(Ok(Some(protocol))) => protocol,
                Ok(Ok(None)) | Ok(Err(_)) => return,
                Err(_) => {
                    tracing::debug!(%peer, "connection closed: no request head in time");
                    return;
                }
            };
            // HTTP/1 idle connections are closed by hyper's header read timeout; HTTP/2 has
            // none, so its requests are counted here and an idle connection closed after the
            // same time.
            let activity = (protocol == Protocol::Http2).then(|| Arc::new(Activity::new()));
            let tracked = activity.clone();
            let per_connection = hyper::service::service_fn(move |req: Request<Incoming>| {
                let active = tracked.as_ref().map(Activity::start);
                // KeyAuth reads the client's address for the keys' `allow_ips` (and the audit
                // record shows it). The socket's peer is the client, unless it is one of
                // `[proxy] trusted_proxies`: then its forwarding headers say who the client is.
                let client = ClientIp(trusted.client_ip(peer.ip(), req.headers()));
                let page = metrics.clone();
                let answer = handle(service.clone(), page, peer, client, bodies.clone(), req);
                async move {
                    let response = answer.await?;
                    Ok::<_, Infallible>(match active {
                        Some(active) => response.map(|body| {
                            ActiveBody {
                                body,
                                _active: active,
                            }
                            .boxed_unsync()
                        }),
                        None => response,
                    })
                }
            });
            let connection = builder
                .serve_connection(TokioIo::new(stream), per_connection)
                .into_owned();
            let served = watcher.watch(connection);
            let result = match activity {
                Some(activity) => tokio::select! {
                    result = served => result,
                    () = activity.idle_for(header_timeout) => {
                        tracing::debug!(%peer, "idle HTTP/2 connection closed");
                        Ok(())
                    }
                },
                None => served.await,
            };
            if let Err(err) = result {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    tracing::info!(
        open_connections = open,
        grace = ?grace,
        "shutting down: no new connections; waiting for in-flight requests"
    );
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!(grace = ?grace, "grace period over; closing what is left"),
    }
    // The caller flushes the audit log now that the last response body has ended.
    Ok(())
}

/// The protocol of a connection, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// Waits until the client has sent enough to tell HTTP/1 from HTTP/2: any byte that does not
/// continue the HTTP/2 preface, or the whole preface. `None` if the client closed first.
/// Nothing is consumed (hyper reads it all again).
async fn first_bytes(stream: &TcpStream) -> std::io::Result<Option<Protocol>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Some(Protocol::Http1));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(Protocol::Http2));
        }
        // A strict prefix of the preface: `peek` would return at once with the same bytes.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The requests in flight on a connection, and since when there has been none.
struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `base` when the last request ended.
    idle_since: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
        }
    }

    /// A request starts; it ends when the guard is dropped (with its response body, or
    /// before there is one).
    fn start(self: &Arc<Self>) -> Active {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Active(self.clone())
    }

    /// Completes once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        let mut deadline = tokio::time::Instant::now() + timeout;
        loop {
            tokio::time::sleep_until(deadline).await;
            if self.in_flight.load(Ordering::Acquire) > 0 {
                deadline = tokio::time::Instant::now() + timeout;
                continue;
            }
            let since = self.base + Duration::from_millis(self.idle_since.load(Ordering::Acquire));
            let until = since + timeout;
            if Instant::now() >= until {
                return;
            }
            deadline = tokio::time::Instant::from_std(until);
        }
    }
}

/// A request in flight (see [`Activity::start`]).
struct Active(Arc<Activity>);

impl Drop for Active {
    fn drop(&mut self) {
        let activity = &self.0;
        let now = activity.base.elapsed().as_millis() as u64;
        activity.idle_since.store(now, Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it ends or is dropped.
struct ActiveBody {
    body: ProxyBody,
    _active: Active,
}

impl http_body::Body for ActiveBody {
    type Data = Bytes;
    type Error = crate::upstream::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What every request body is held to (see [`crate::slow_client`]).
#[derive(Clone, Debug)]
struct BodyRules {
    read_timeout: Duration,
    total_timeout: Duration,
    /// The server's one budget.
    budget: BodyBudget,
}

/// One request: `/healthz` and the metrics page here, everything else through the stack.
async fn handle(
    mut service: ProxyService,
    metrics: Option<Arc<MetricsPage>>,
    peer: SocketAddr,
    client: ClientIp,
    bodies: BodyRules,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if req.uri().path() == "/healthz" && matches!(*req.method(), Method::GET | Method::HEAD) {
        return Ok(healthz());
    }
    if let Some(page) = metrics.filter(|page| page.matches(&req)) {
        return Ok(page.respond(&req));
    }
    // The request starts now (hyper calls the service once the head is read): its body's
    // total deadline runs from here.
    let state = BodyState::new(Some(bodies.budget));
    let mut req = req.map(|body| {
        PolicyBody::new(
            ReadTimeoutBody::new(body, bodies.read_timeout, state.clone())
                .total_timeout(bodies.total_timeout),
        )
    });
    req.extensions_mut().insert(state);
    req.extensions_mut().insert(client);
    let started = Instant::now();
    let method = req.method().clone();
    // The path only: a query string could carry anything.
    let path = req.uri().path().to_owned();
    let response = service.ready().await?.call(req).await?;
    let rejection = response.extensions().get::<Rejection>();
    tracing::debug!(
        %peer,
        %method,
        path,
        status = response.status().as_u16(),
        blocked_by = rejection.map(|r| r.layer.as_str()),
        code = rejection.map(|r| r.code),
        headers_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    Ok(response)
}

fn healthz() -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(b"{\"status\":\"ok\"}"))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
