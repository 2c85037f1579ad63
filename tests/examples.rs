//! The wrapping examples work as documented.

#[allow(dead_code)]
#[path = "../examples/axum_router.rs"]
mod axum_router;
#[allow(dead_code)]
#[path = "../examples/hyper_service.rs"]
mod hyper_service;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

fn chat(model: &str, header: &str, key: &str) -> Request<String> {
    Request::post("/v1/chat/completions")
        .header(header, key)
        .body(format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#
        ))
        .unwrap()
}

#[tokio::test]
async fn axum_router_example_applies_the_policy() {
    let app = axum_router::app(axum_router::demo_store());
    let ok = app
        .clone()
        .oneshot(
            chat("gpt-4o-mini", "authorization", "Bearer sk-demo-team-a")
                .map(axum::body::Body::from),
        )
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let body = ok.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("hello, team-a"));

    let denied = app
        .clone()
        .oneshot(
            chat("gpt-4o", "authorization", "Bearer sk-demo-team-a").map(axum::body::Body::from),
        )
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    let unknown = app
        .oneshot(chat("gpt-4o-mini", "authorization", "Bearer sk-nope").map(axum::body::Body::from))
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn hyper_service_example_applies_the_policy() {
    let svc =
        hyper_service::service::<http_body_util::Full<bytes::Bytes>>(hyper_service::demo_store());
    let req = |model: &str| chat(model, "x-api-key", "sk-demo").map(http_body_util::Full::from);
    let ok = svc.clone().oneshot(req("gpt-4o")).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let denied = svc.oneshot(req("o1-pro")).await.unwrap();
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
}
