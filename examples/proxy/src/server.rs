//! The proxy's HTTP server: HTTP/1.1 and HTTP/2 (hyper-util's `auto`), `GET /healthz`, the
//! client's address for the keys' IP allow-lists, one log line per request, and graceful
//! shutdown with a bounded wait.
//!
//! Slow and greedy clients ([`ServerOptions`], `[server]` in the configuration):
//! - a connection has `header_read_timeout` to send a request's head: the HTTP/2 preface
//!   (checked here, before hyper), or the HTTP/1 request line and headers (hyper's own header
//!   read timeout, which also closes an idle keep-alive connection). It is closed otherwise,
//!   without an answer;
//! - a request body that stalls for `body_read_timeout` is answered with a 408 and the
//!   connection closed (see [`crate::slow_client`]);
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
use tower_llm_policy::{ClientIp, PolicyBody, Rejection};

use crate::config::{
    DEFAULT_BODY_READ_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_SHUTDOWN_GRACE,
};
use crate::slow_client::{BodyStalled, ReadTimeoutBody};
use crate::stack::{ProxyBody, ProxyService};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How the server treats connections: `[server]` of the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// After the shutdown signal, how long in-flight requests may run on.
    pub grace: Duration,
    /// How long a client has to send a request's head (see the [module docs](self)).
    pub header_read_timeout: Duration,
    /// Longest wait for the next piece of a request body (408 after).
    pub body_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            grace: DEFAULT_SHUTDOWN_GRACE,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
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
    let grace = options.grace;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    // HTTP/2 keep-alive pings and stream limits use the timer too.
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let slots = std::sync::Arc::new(Semaphore::new(options.max_connections.max(1)));
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
        let body_timeout = options.body_read_timeout;
        let per_connection = hyper::service::service_fn(move |req: Request<Incoming>| {
            handle(service.clone(), peer, body_timeout, req)
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_timeout = options.header_read_timeout;
        tokio::spawn(async move {
            // The slot is freed when this task ends, however it ends.
            let _permit = permit;
            // hyper's header read timeout starts once it knows the protocol; the preface
            // (or the first bytes of an HTTP/1 request) must come within the same time.
            match tokio::time::timeout(header_timeout, first_bytes(&stream)).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) | Ok(Err(_)) => return,
                Err(_) => {
                    tracing::debug!(%peer, "connection closed: no request head in time");
                    return;
                }
            }
            let connection = builder
                .serve_connection(TokioIo::new(stream), per_connection)
                .into_owned();
            if let Err(err) = watcher.watch(connection).await {
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

/// Waits until the client has sent enough to tell HTTP/1 from HTTP/2: any byte that does not
/// continue the HTTP/2 preface, or the whole preface. `false` if the client closed first.
/// Nothing is consumed (hyper reads it all again).
async fn first_bytes(stream: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(false);
        }
        if n == H2_PREFACE.len() || buf[..n] != H2_PREFACE[..n] {
            return Ok(true);
        }
        // A strict prefix of the preface: `peek` would return at once with the same bytes.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request: `/healthz` here, everything else through the stack.
async fn handle(
    mut service: ProxyService,
    peer: SocketAddr,
    body_timeout: Duration,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if req.uri().path() == "/healthz" && matches!(*req.method(), Method::GET | Method::HEAD) {
        return Ok(healthz());
    }
    let stalled = BodyStalled::default();
    let mut req =
        req.map(|body| PolicyBody::new(ReadTimeoutBody::new(body, body_timeout, stalled.clone())));
    req.extensions_mut().insert(stalled);
    // KeyAuth reads the client's address for the keys' `allow_ips`. The proxy listens for
    // clients directly, so the socket's peer is the client: no forwarding header is trusted.
    req.extensions_mut().insert(ClientIp(peer.ip()));
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
