//! The example proxy's forwarder (`src/upstream.rs`) against the mock upstream (`src/mock.rs`),
//! on loopback.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use example_proxy::{mock, upstream};
use http::{header, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use mock::MockOptions;
use serde_json::{json, Value};
use tower::{Service, ServiceExt};
use upstream::{Upstream, UpstreamBody};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const PROVIDER_KEY: &str = "sk-provider-0123456789";
const CLIENT_KEY: &str = "vk-client-abcdef";

fn chat_body(stream: bool) -> String {
    json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "stream_options": { "include_usage": stream },
        "messages": [{ "role": "user", "content": "say hello to the proxy" }]
    })
    .to_string()
}

fn chat_request(path: &str, stream: bool) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {CLIENT_KEY}"))
        .body(Full::new(Bytes::from(chat_body(stream))))
        .unwrap()
}

async fn start(opts: MockOptions) -> (String, mock::MockLog) {
    let (addr, log) = mock::spawn(opts).await.unwrap();
    (format!("http://{addr}/v1"), log)
}

async fn forward<B>(upstream: &mut Upstream, req: Request<B>) -> Response<UpstreamBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<upstream::BoxError>,
{
    let result: Result<_, Infallible> = ServiceExt::<Request<B>>::ready(upstream)
        .await
        .unwrap()
        .call(req)
        .await;
    match result {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

async fn json_of(response: Response<UpstreamBody>) -> Value {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

fn assert_openai_error(body: &Value, code: &str) {
    let error = body["error"].as_object().expect("an `error` object");
    for key in ["message", "type", "param", "code"] {
        assert!(error.contains_key(key), "`{key}` missing in {body}");
    }
    assert_eq!(error["code"], code);
    assert!(!body.to_string().contains(PROVIDER_KEY));
}

#[tokio::test]
async fn upstream_gets_the_provider_key_not_the_clients() -> TestResult {
    let (base, log) = start(MockOptions::default()).await;
    let mut upstream = Upstream::new(base, Some(PROVIDER_KEY.into()))?;
    let mut req = chat_request("/v1/chat/completions", false);
    req.headers_mut().insert("api-key", CLIENT_KEY.parse()?);
    req.headers_mut().insert("x-api-key", CLIENT_KEY.parse()?);

    let response = forward(&mut upstream, req).await;
    assert_eq!(response.status(), StatusCode::OK);

    let got = log.last().expect("the mock got the request");
    assert_eq!(
        got.authorization.as_deref(),
        Some(&*format!("Bearer {PROVIDER_KEY}"))
    );
    assert!(got.headers.get("api-key").is_none());
    assert!(got.headers.get("x-api-key").is_none());
    for value in got.headers.values() {
        assert!(!value
            .as_bytes()
            .windows(CLIENT_KEY.len())
            .any(|w| w == CLIENT_KEY.as_bytes()));
    }
    Ok(())
}

#[tokio::test]
async fn without_a_provider_key_no_authorization_is_sent() -> TestResult {
    let (base, log) = start(MockOptions::default()).await;
    let mut upstream = Upstream::new(base, None)?;
    let response = forward(&mut upstream, chat_request("/v1/chat/completions", false)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(log.last().unwrap().authorization, None);
    Ok(())
}

#[tokio::test]
async fn path_query_host_and_encoding_are_set_for_the_upstream() -> TestResult {
    let (base, log) = start(MockOptions::default()).await;
    let authority = base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_owned();
    let mut upstream = Upstream::new(base, Some(PROVIDER_KEY.into()))?;
    let mut req = chat_request("/v1/chat/completions?api-version=2024-10-21&x=1", false);
    req.headers_mut()
        .insert(header::HOST, "proxy.example".parse()?);
    req.headers_mut()
        .insert(header::ACCEPT_ENCODING, "gzip, br".parse()?);

    let response = forward(&mut upstream, req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_of(response).await;
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["usage"]["prompt_tokens"], 5);

    let got = log.last().unwrap();
    assert_eq!(got.method, Method::POST);
    assert_eq!(got.path, "/v1/chat/completions");
    assert_eq!(got.query.as_deref(), Some("api-version=2024-10-21&x=1"));
    assert_eq!(got.headers[header::HOST], authority.as_str());
    assert_eq!(got.headers[header::ACCEPT_ENCODING], "identity");
    assert_eq!(got.json().unwrap()["model"], "gpt-4o-mini");
    Ok(())
}

#[tokio::test]
async fn an_http2_request_goes_to_a_plain_http1_upstream() -> TestResult {
    let (base, log) = start(MockOptions::default()).await;
    let mut upstream = Upstream::new(base, Some(PROVIDER_KEY.into()))?;
    let mut req = chat_request("/v1/chat/completions", false);
    *req.version_mut() = http::Version::HTTP_2;
    let response = forward(&mut upstream, req).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(log.len(), 1);
    Ok(())
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() -> TestResult {
    let (base, log) = start(MockOptions::default()).await;
    let mut upstream = Upstream::new(base, Some(PROVIDER_KEY.into()))?;
    let mut req = chat_request("/v1/chat/completions", false);
    let headers = req.headers_mut();
    headers.insert(header::CONNECTION, "keep-alive, x-hop-secret".parse()?);
    headers.insert("x-hop-secret", "1".parse()?);
    headers.insert("keep-alive", "timeout=5".parse()?);
    headers.insert("proxy-connection", "keep-alive".parse()?);
    headers.insert(header::TE, "trailers".parse()?);
    headers.insert(header::TRAILER, "x-checksum".parse()?);
    headers.insert(header::UPGRADE, "websocket".parse()?);
    headers.insert(header::PROXY_AUTHORIZATION, "Basic cHJveHk6cHc=".parse()?);
    headers.insert("x-end-to-end", "kept".parse()?);

    let response = forward(&mut upstream, req).await;
    assert_eq!(response.status(), StatusCode::OK);

    let got = log.last().unwrap();
    for name in [
        "connection",
        "x-hop-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "transfer-encoding",
    ] {
        assert!(got.headers.get(name).is_none(), "`{name}` was forwarded");
    }
    assert_eq!(got.headers["x-end-to-end"], "kept");
    Ok(())
}

#[tokio::test]
async fn streamed_response_arrives_chunk_by_chunk() -> TestResult {
    let opts = MockOptions::default()
        .stream_chunks(4)
        .chunk_delay(Duration::from_millis(50));
    let (base, log) = start(opts).await;
    let mut upstream = Upstream::new(base, Some(PROVIDER_KEY.into()))?;

    let response = forward(&mut upstream, chat_request("/v1/chat/completions", true)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    assert!(response.headers().get(header::TRANSFER_ENCODING).is_none());
    let mut body = response.into_body();

    let first = body.frame().await.unwrap()?.into_data().unwrap();
    assert!(first.starts_with(b"data: "));
    // The mock is still between content chunks: nothing waited for the whole stream.
    assert_eq!(log.streams_completed(), 0);

    let mut text = String::from_utf8(first.to_vec())?;
    let mut frames = 1;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            text.push_str(std::str::from_utf8(&data)?);
            frames += 1;
        }
    }
    assert!(frames > 1, "{frames} frame(s)");
    assert_eq!(log.streams_completed(), 1);
    assert!(text.ends_with("data: [DONE]\n\n"));
    let usage_line = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["choices"] == json!([]))
        .expect("a usage chunk");
    assert_eq!(usage_line["usage"]["prompt_tokens"], 5);
    assert_eq!(usage_line["usage"]["completion_tokens"], 4);
    Ok(())
}

#[tokio::test]
async fn connection_refused_is_a_502_openai_error() -> TestResult {
    // A port that was free a moment ago and has no listener now.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    drop(listener);
    let mut upstream = Upstream::new(format!("http://{addr}/v1"), Some(PROVIDER_KEY.into()))?;

    let response = forward(&mut upstream, chat_request("/v1/chat/completions", false)).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    assert_openai_error(&json_of(response).await, "upstream_unavailable");
    Ok(())
}

#[tokio::test]
async fn slow_response_headers_are_a_504_openai_error() -> TestResult {
    let (base, log) = start(MockOptions::default().latency(Duration::from_secs(5))).await;
    let mut upstream = Upstream::builder(base)
        .provider_key(Some(PROVIDER_KEY.into()))
        .first_byte_timeout(Duration::from_millis(200))
        .build()?;

    let started = std::time::Instant::now();
    let response = forward(&mut upstream, chat_request("/v1/chat/completions", false)).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_openai_error(&json_of(response).await, "upstream_timeout");
    assert_eq!(log.len(), 1);
    Ok(())
}

#[tokio::test]
async fn silent_response_body_ends_with_an_idle_error() -> TestResult {
    let opts = MockOptions::default()
        .stream_chunks(2)
        .chunk_delay(Duration::from_secs(5));
    let (base, _log) = start(opts).await;
    let mut upstream = Upstream::builder(base)
        .idle_timeout(Duration::from_millis(200))
        .build()?;

    let response = forward(&mut upstream, chat_request("/v1/chat/completions", true)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // The role chunk comes at once, then the mock goes quiet.
    assert!(body.frame().await.unwrap().is_ok());
    let err = body.frame().await.unwrap().unwrap_err();
    assert!(
        err.downcast_ref::<upstream::IdleTimeout>().is_some(),
        "{err}"
    );
    assert!(body.frame().await.is_none());
    Ok(())
}

/// A body of `total` bytes in 64 KiB frames, with no size known up front.
struct Chunked {
    next: usize,
    total: usize,
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.next >= self.total {
            return Poll::Ready(None);
        }
        let end = (self.next + 64 * 1024).min(self.total);
        let chunk: Vec<u8> = (self.next..end).map(pattern).collect();
        self.next = end;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[tokio::test]
async fn large_streamed_upload_arrives_intact() -> TestResult {
    const SIZE: usize = 8 * 1024 * 1024;
    let (base, log) = start(MockOptions::default().record_body_limit(SIZE)).await;
    let mut upstream = Upstream::new(base, Some(PROVIDER_KEY.into()))?;
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/audio/transcriptions")
        .header(header::CONTENT_TYPE, "multipart/form-data; boundary=x")
        .body(Chunked {
            next: 0,
            total: SIZE,
        })?;

    let response = forward(&mut upstream, req).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json_of(response).await["text"], mock::TRANSCRIPTION);

    let got = log.last().unwrap();
    assert_eq!(got.body_len, SIZE);
    assert!(got.body.iter().enumerate().all(|(i, b)| *b == pattern(i)));
    Ok(())
}

#[tokio::test]
async fn paths_outside_v1_are_answered_here() -> TestResult {
    let (base, log) = start(MockOptions::default()).await;
    let mut upstream = Upstream::new(base, Some(PROVIDER_KEY.into()))?;
    for path in [
        "/admin",
        "/v1beta/models",
        "/v1/../admin",
        "/v1/models/%2E%2E/x",
    ] {
        let req = Request::get(path).body(Full::new(Bytes::new()))?;
        let response = forward(&mut upstream, req).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_openai_error(&json_of(response).await, "unknown_url");
    }
    assert!(log.is_empty(), "nothing reached the upstream");
    Ok(())
}

#[tokio::test]
async fn models_pass_through() -> TestResult {
    let (base, _log) = start(MockOptions::default()).await;
    let upstream = Upstream::new(base, Some(PROVIDER_KEY.into()))?;
    let req = Request::get("/v1/models/gpt-4.1").body(Full::new(Bytes::new()))?;
    let response = upstream.clone().oneshot(req).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json_of(response).await["id"], "gpt-4.1");
    let req = Request::get("/v1/nope").body(Full::new(Bytes::new()))?;
    let response = upstream.oneshot(req).await?;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(json_of(response).await["error"]["message"].is_string());
    Ok(())
}

#[test]
fn debug_never_shows_the_provider_key() {
    let upstream = Upstream::new("https://api.openai.com/v1/", Some(PROVIDER_KEY.into())).unwrap();
    let debug = format!("{upstream:?}");
    assert!(!debug.contains(PROVIDER_KEY), "{debug}");
    assert!(debug.contains("https://api.openai.com/v1"));
    assert_eq!(upstream.base_url(), "https://api.openai.com/v1");
    let builder = Upstream::builder("http://x/v1").provider_key(Some(PROVIDER_KEY.into()));
    assert!(!format!("{builder:?}").contains(PROVIDER_KEY));
}

#[test]
fn bad_base_urls_are_refused_without_echoing_the_key() {
    for base in ["ftp://x/v1", "/v1", "http://u:p@x/v1", "http://x/v1?a=1"] {
        let err = Upstream::new(base, Some(PROVIDER_KEY.into())).unwrap_err();
        assert!(!err.to_string().contains(PROVIDER_KEY));
    }
    let err = Upstream::new("http://x/v1", Some("bad\nkey".into())).unwrap_err();
    assert!(!err.to_string().contains("bad"));
}

#[tokio::test]
async fn failed_tls_handshake_is_a_502_openai_error() -> TestResult {
    // The mock speaks plain HTTP: the TLS client gets garbage back and gives up.
    let (base, _log) = start(MockOptions::default()).await;
    let base = base.replace("http://", "https://");
    let mut upstream = Upstream::new(base, Some(PROVIDER_KEY.into()))?;
    let response = forward(&mut upstream, chat_request("/v1/chat/completions", false)).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_openai_error(&json_of(response).await, "upstream_unavailable");
    Ok(())
}
