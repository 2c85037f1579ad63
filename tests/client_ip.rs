//! ResolveClientIpLayer in front of AuditLayer and KeyAuth: a key's `allow_ips` and the
//! record's `client_ip` see the client behind a trusted proxy, and only behind one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::{AuditLayer, AuditRecord, MemorySink};
use tower_llm_policy::keys::{ApiKey, MemoryKeyStore};
use tower_llm_policy::{KeyAuthLayer, PolicyBody, ResolveClientIpLayer, TrustedProxies};

const KEY: &str = "sk-office-0123456789";

/// A request from `peer` with `x-forwarded-for`, through the stack: its status and record.
async fn call(peer: &str, xff: &str) -> (StatusCode, AuditRecord) {
    let store = MemoryKeyStore::new().with_key(
        KEY,
        ApiKey::new("office").allow_ips(["203.0.113.0/24".parse().unwrap()]),
    );
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        // Outermost, so that the record has the resolved address too.
        .layer(ResolveClientIpLayer::new(TrustedProxies::new([
            "10.0.0.0/8".parse().unwrap(),
        ])))
        .layer(AuditLayer::new(sink.clone()))
        .layer(KeyAuthLayer::new(Arc::new(store)))
        .service(service_fn(|req: Request<PolicyBody>| async move {
            req.into_body().collect().await.unwrap();
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {KEY}"))
        .header("x-forwarded-for", xff)
        .extension(peer.parse::<SocketAddr>().unwrap())
        .body(r#"{"model":"gpt-4o","messages":[]}"#.to_owned())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    res.into_body().collect().await.unwrap();
    (status, sink.last().expect("one record"))
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_checked_and_recorded() {
    let (status, record) = call("10.0.0.1:5000", "198.51.100.1, 203.0.113.5, 10.0.0.2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(record.client_ip, Some("203.0.113.5".parse().unwrap()));
}

#[tokio::test]
async fn from_anyone_else_the_header_changes_nothing() {
    let (status, record) = call("198.51.100.9:5000", "203.0.113.5").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(record.code.as_deref(), Some("ip_not_allowed"));
    assert_eq!(record.client_ip, Some("198.51.100.9".parse().unwrap()));
}

#[tokio::test]
async fn an_ipv4_mapped_proxy_is_trusted() {
    let (status, record) = call("[::ffff:10.0.0.1]:5000", "203.0.113.5").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(record.client_ip, Some("203.0.113.5".parse().unwrap()));
}
