//! KeyAuth leaves the found key in the response's extensions, for the audit layer that runs
//! before it.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Request, Response, StatusCode};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_llm_policy::key_auth::{ClientIp, KeyAuthLayer};
use tower_llm_policy::keys::{ApiKey, MemoryKeyStore};
use tower_llm_policy::Rejection;

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

async fn call(key: &str) -> Response<impl http_body::Body> {
    let svc = ServiceBuilder::new()
        .layer(KeyAuthLayer::new(store()))
        .service(service_fn(|_req: Request<String>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let req = Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .extension(ClientIp(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1))))
        .body(String::new())
        .unwrap();
    svc.oneshot(req).await.unwrap()
}

#[tokio::test]
async fn allowed_response_carries_the_key() {
    let res = call("sk-good-0123456789").await;
    assert_eq!(res.status(), StatusCode::OK);
    let key = res
        .extensions()
        .get::<Arc<ApiKey>>()
        .expect("key in response");
    assert_eq!(key.name, "good");
    assert_eq!(key.metadata["team"], "a");
}

#[tokio::test]
async fn expired_rejection_carries_the_key() {
    let res = call("sk-expired-0123456789").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        res.extensions().get::<Rejection>().unwrap().code,
        "key_expired"
    );
    assert_eq!(
        res.extensions().get::<Arc<ApiKey>>().unwrap().name,
        "expired"
    );
}

#[tokio::test]
async fn ip_rejection_carries_the_key() {
    let res = call("sk-ip-0123456789").await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        res.extensions().get::<Arc<ApiKey>>().unwrap().name,
        "ip-bound"
    );
}

#[tokio::test]
async fn unknown_key_leaves_no_key() {
    let res = call("sk-unknown-0123456789").await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(res.extensions().get::<Arc<ApiKey>>().is_none());
}
