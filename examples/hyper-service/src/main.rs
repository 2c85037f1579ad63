//! Wrap a plain hyper service with KeyAuth and ModelAllowList.
//!
//! ```sh
//! cargo run -p example-hyper-service
//! curl -s localhost:3001/v1/chat/completions -H 'x-api-key: sk-demo' \
//!   -d '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
//! ```

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tower::{BoxError, Service, ServiceBuilder};
use tower_llm_policy::{ApiKey, KeyAuthLayer, MemoryKeyStore, ModelAllowListLayer, PolicyBody};

/// The service as it was before policy: answers with the size of the request it got.
async fn handle(req: Request<PolicyBody>) -> Result<Response<Full<Bytes>>, Infallible> {
    let len = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes().len())
        .unwrap_or(0);
    Ok(Response::new(Full::from(format!(
        "{{\"received_bytes\":{len}}}"
    ))))
}

/// The policy stack around the service, for any request body hyper (or a test) gives it.
pub(crate) fn service<B>(
    store: Arc<MemoryKeyStore>,
) -> impl Service<
    Request<B>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    ServiceBuilder::new()
        .layer(KeyAuthLayer::new(store))
        .layer(ModelAllowListLayer::new())
        .service(tower::service_fn(handle))
}

pub(crate) fn demo_store() -> Arc<MemoryKeyStore> {
    Arc::new(
        MemoryKeyStore::new().with_key("sk-demo", ApiKey::new("demo").model_limits(["gpt-4o"])),
    )
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    println!("listening on http://{}", listener.local_addr()?);
    let svc = service(demo_store());
    loop {
        let (stream, _) = listener.accept().await?;
        let svc = TowerToHyperService::new(svc.clone());
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::{demo_store, service};

    fn chat(model: &str, header: &str, key: &str) -> Request<String> {
        Request::post("/v1/chat/completions")
            .header(header, key)
            .body(format!(
                r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#
            ))
            .unwrap()
    }

    #[tokio::test]
    async fn hyper_service_example_applies_the_policy() {
        let svc = service::<http_body_util::Full<bytes::Bytes>>(demo_store());
        let req = |model: &str| chat(model, "x-api-key", "sk-demo").map(http_body_util::Full::from);
        let ok = svc.clone().oneshot(req("gpt-4o")).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        let denied = svc.oneshot(req("o1-pro")).await.unwrap();
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    }
}
