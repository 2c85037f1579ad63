//! Wrap an existing axum router with KeyAuth and ModelAllowList.
//!
//! ```sh
//! cargo run -p example-axum-router
//! curl -s localhost:3000/v1/chat/completions -H 'authorization: Bearer sk-demo-team-a' \
//!   -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
//! ```

use std::sync::Arc;

use axum::routing::post;
use axum::{Extension, Json, Router};
use serde_json::{json, Value};
use tower::ServiceBuilder;
use tower_llm_policy::{ApiKey, KeyAuthLayer, LlmRequest, MemoryKeyStore, ModelAllowListLayer};

/// The application as it was before policy: a handler answering chat completions.
async fn chat(
    Extension(key): Extension<Arc<ApiKey>>,
    Extension(view): Extension<LlmRequest>,
) -> Json<Value> {
    // The layers leave the key's policy and the parsed request for handlers to use.
    Json(json!({
        "object": "chat.completion",
        "model": view.model(),
        "choices": [{"index": 0, "message": {"role": "assistant",
            "content": format!("hello, {}", key.name)}, "finish_reason": "stop"}],
    }))
}

/// The router with the policy stack around it.
pub(crate) fn app(store: Arc<MemoryKeyStore>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .layer(
            ServiceBuilder::new()
                .layer(KeyAuthLayer::new(store))
                .layer(ModelAllowListLayer::new().workspace_models(["gpt-4o*", "o3-mini"])),
        )
}

pub(crate) fn demo_store() -> Arc<MemoryKeyStore> {
    Arc::new(MemoryKeyStore::new().with_key(
        "sk-demo-team-a",
        ApiKey::new("team-a").model_limits(["gpt-4o-mini"]),
    ))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(demo_store())).await
}

#[cfg(test)]
mod tests {
    use http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::{app, demo_store};

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
        let app = app(demo_store());
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
                chat("gpt-4o", "authorization", "Bearer sk-demo-team-a")
                    .map(axum::body::Body::from),
            )
            .await
            .unwrap();
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
        let unknown = app
            .oneshot(
                chat("gpt-4o-mini", "authorization", "Bearer sk-nope").map(axum::body::Body::from),
            )
            .await
            .unwrap();
        assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
    }
}
