//! The proxy's HTTP server: HTTP/1.1 and HTTP/2 (hyper-util's `auto`), `GET /healthz`, the
//! client's address for the keys' IP allow-lists, one log line per request, and graceful
//! shutdown with a bounded wait.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};
use tower_llm_policy::{ClientIp, PolicyBody, Rejection};

use crate::stack::{ProxyBody, ProxyService};

/// Serves `service` on `listener` until `shutdown` completes; then stops accepting, lets the
/// open connections finish their in-flight requests and streams for at most `grace`, and
/// returns. Idle keep-alive connections are closed at once.
///
/// Bodies are never buffered here; the stack holds them to `[body]` (see
/// [`tower_llm_policy::BodyLimit`]), inside the audit layer so that a 413 is recorded too.
pub async fn run(
    service: ProxyService,
    listener: TcpListener,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
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
        let per_connection = hyper::service::service_fn(move |req: Request<Incoming>| {
            handle(service.clone(), peer, req)
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), per_connection)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
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

/// One request: `/healthz` here, everything else through the stack.
async fn handle(
    mut service: ProxyService,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    if req.uri().path() == "/healthz" && matches!(*req.method(), Method::GET | Method::HEAD) {
        return Ok(healthz());
    }
    let mut req = req.map(PolicyBody::new);
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
