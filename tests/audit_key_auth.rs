//! KeyAuth writes the key it found into the audit handle, for the audit layer that runs before
//! it: the record names the key of allowed requests and of refused ones alike.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::{AuditLayer, AuditRecord, MemorySink};
use tower_llm_policy::key_auth::{ClientIp, KeyAuthLayer};
use tower_llm_policy::keys::{ApiKey, MemoryKeyStore};
use tower_llm_policy::{PolicyBody, Rejection};

fn store() -> Arc<MemoryKeyStore> {
    Arc::new(
        MemoryKeyStore::new()
            .with_key("sk-good-0123456789", ApiKey::new("good").label("team", "a"))
            .with_key(
                "sk-expired-0123456789",
                ApiKey::new("expired").expires_at(SystemTime::now() - Duration::from_secs(60)),
            )
            .with_key(
                "sk-ip-0123456789",
                ApiKey::new("ip-bound").allow_ips(["10.0.0.0/8".parse().unwrap()]),
            ),
    )
}

async fn call(key: &str) -> (StatusCode, Option<Rejection>, AuditRecord) {
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(sink.clone()))
        .layer(KeyAuthLayer::new(store()))
        .service(service_fn(|req: Request<PolicyBody>| async move {
            // The key is in the request's extensions for the inner service, not in the response.
            assert!(req.extensions().get::<Arc<ApiKey>>().is_some());
            // Read as a forwarding client does: the record keeps a copy on the way.
            req.into_body().collect().await.unwrap();
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .extension(ClientIp(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1))))
        .body(r#"{"model":"gpt-4o","messages":[]}"#.to_owned())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    let rejection = res.extensions().get::<Rejection>().cloned();
    assert!(res.extensions().get::<Arc<ApiKey>>().is_none());
    res.into_body().collect().await.unwrap();
    (status, rejection, sink.last().expect("one record"))
}

#[tokio::test]
async fn allowed_request_is_recorded_with_the_key() {
    let (status, _, record) = call("sk-good-0123456789").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(record.key.as_deref(), Some("good"));
    assert_eq!(record.key_metadata["team"], "a");
    assert_eq!(record.model.as_deref(), Some("gpt-4o"));
}

#[tokio::test]
async fn expired_rejection_is_recorded_with_the_key() {
    let (status, rejection, record) = call("sk-expired-0123456789").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(rejection.unwrap().code, "key_expired");
    assert_eq!(record.key.as_deref(), Some("expired"));
    assert_eq!(record.code.as_deref(), Some("key_expired"));
}

#[tokio::test]
async fn ip_rejection_is_recorded_with_the_key() {
    let (status, _, record) = call("sk-ip-0123456789").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(record.key.as_deref(), Some("ip-bound"));
    assert_eq!(record.blocked_by.as_deref(), Some("key_auth"));
}

#[tokio::test]
async fn unknown_key_is_recorded_without_a_key() {
    let (status, _, record) = call("sk-unknown-0123456789").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(record.key, None);
    assert_eq!(record.code.as_deref(), Some("invalid_api_key"));
}
