//! BodyLimit on its own: every body held to the policy's limit, read or streamed, with the
//! OpenAI-shaped 413, and bodies within the limit passed on as they came.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::{BodyLimitLayer, BodyOptions, Policy, PolicyBody, Rejection};

/// What the inner service saw: the body's size hint and end flag as it arrived, and its bytes.
#[derive(Clone, Debug, Default)]
struct Seen {
    exact: Option<u64>,
    end_stream: bool,
    bytes: Option<Bytes>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn limited(
    limit: usize,
) -> (
    impl Service<Request<PolicyBody>, Response = Response<impl Body<Data = Bytes>>, Error = Infallible>,
    Log,
) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    let policy = Policy::new().body_options(BodyOptions {
        limit,
        ..BodyOptions::default()
    });
    let svc = ServiceBuilder::new()
        .layer(BodyLimitLayer::new().policy(policy))
        .service(service_fn(move |req: Request<PolicyBody>| {
            let seen = seen.clone();
            async move {
                let body = req.into_body();
                let mut entry = Seen {
                    exact: body.size_hint().exact(),
                    end_stream: body.is_end_stream(),
                    bytes: None,
                };
                // A forwarding client: a body that fails to read is a 502.
                let status = match body.collect().await {
                    Ok(collected) => {
                        entry.bytes = Some(collected.to_bytes());
                        StatusCode::OK
                    }
                    Err(_) => StatusCode::BAD_GATEWAY,
                };
                seen.lock().unwrap().push(entry);
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(PolicyBody::empty())
                        .unwrap(),
                )
            }
        }));
    (svc, log)
}

/// A body sent in chunks, with no length known beforehand.
struct Chunks(std::collections::VecDeque<&'static [u8]>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let next = self.0.pop_front();
        std::task::Poll::Ready(next.map(|c| Ok(http_body::Frame::data(Bytes::from_static(c)))))
    }
}

fn chunked(chunks: Vec<&'static [u8]>) -> PolicyBody {
    PolicyBody::new(Chunks(chunks.into()))
}

#[tokio::test]
async fn a_declared_length_over_the_policy_limit_is_413_before_anything_is_read() {
    let (svc, log) = limited(1024);
    let req = Request::post("/v1/files")
        .header("content-length", "4096")
        .body(PolicyBody::from("small"))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        res.extensions().get::<Rejection>().unwrap().code,
        "request_too_large"
    );
    let body = res.into_body().collect().await.ok().unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "request_too_large");
    assert!(
        log.lock().unwrap().is_empty(),
        "the inner service was called"
    );
}

#[tokio::test]
async fn a_chunked_body_cut_off_at_the_limit_is_413_not_the_inner_services_502() {
    let (svc, log) = limited(1024);
    let chunk: &'static [u8] = &[b'x'; 512];
    let req = Request::post("/v1/files")
        .body(chunked(vec![chunk, chunk, chunk]))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let seen = log.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].bytes.is_none(),
        "the inner service got a whole body"
    );
}

#[tokio::test]
async fn a_body_within_the_limit_passes_as_it_came() {
    let (mut svc, log) = limited(1024);
    let req = Request::post("/v1/files")
        .body(PolicyBody::from("0123456789"))
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let req = Request::get("/v1/models")
        .body(PolicyBody::empty())
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let chunk: &'static [u8] = &[b'y'; 512];
    let req = Request::post("/v1/files")
        .body(chunked(vec![chunk, chunk]))
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "exactly the limit passes");
    let seen = log.lock().unwrap();
    // The size is still known to the inner service (a forwarding client sends it as
    // Content-Length), and an empty body still says it has ended.
    assert_eq!(seen[0].exact, Some(10));
    assert!(!seen[0].end_stream);
    assert_eq!(seen[0].bytes.as_deref(), Some(&b"0123456789"[..]));
    assert!(seen[1].end_stream);
    assert_eq!(seen[2].bytes.as_ref().map(Bytes::len), Some(1024));
}

#[tokio::test]
async fn readiness_is_the_inner_services() {
    /// A service that is never ready.
    #[derive(Clone)]
    struct NotReady;

    impl Service<Request<PolicyBody>> for NotReady {
        type Response = Response<PolicyBody>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<PolicyBody>, Infallible>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Pending
        }

        fn call(&mut self, _: Request<PolicyBody>) -> Self::Future {
            unreachable!("never ready, never called")
        }
    }

    let mut svc = ServiceBuilder::new()
        .layer(BodyLimitLayer::new())
        .service(NotReady);
    let ready = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(Service::<Request<PolicyBody>>::poll_ready(&mut svc, cx))
    })
    .await;
    assert!(ready.is_pending());
}
