//! An upstream the proxy need not trust: the provider key it echoes (whole, or a fragment) never
//! reaches the client, in bodies (JSON or SSE, split across frames) or headers; neither a stale
//! `Content-Length` next to `Transfer-Encoding: chunked` nor an unrequested 101 is relayed.
//! Each test runs a raw-TCP upstream that sends exactly the bytes it is given.

use std::time::Duration;

use bytes::Bytes;
use example_proxy::upstream::{Upstream, UpstreamBody};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const PROVIDER_KEY: &str = "sk-proj-Q7xW2mN9vB4kL8pZ3rT6yH1jF5dS0aE";

/// A one-connection upstream: reads the request head, then writes `pieces` one by one (with a
/// pause between, so each is its own read on the other side) and closes.
async fn raw_upstream(pieces: Vec<Vec<u8>>) -> std::io::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        for piece in pieces {
            if socket.write_all(&piece).await.is_err() {
                return;
            }
            let _ = socket.flush().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = socket.shutdown().await;
    });
    Ok(format!("http://{addr}/v1"))
}

async fn get(base: &str, path: &str) -> Response<UpstreamBody> {
    let upstream = Upstream::new(base, Some(PROVIDER_KEY.into())).unwrap();
    let request = Request::get(path).body(Empty::<Bytes>::new()).unwrap();
    match upstream.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Every frame of the body, as sent.
async fn frames(response: Response<UpstreamBody>) -> Vec<Bytes> {
    let mut body = response.into_body();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            out.push(data);
        }
    }
    out
}

fn assert_no_key(text: &str) {
    assert!(!text.contains(PROVIDER_KEY), "the key leaked: {text}");
    // Nor a recognisable fragment of it: its first or last eight bytes.
    assert!(
        !text.contains(&PROVIDER_KEY[..8]),
        "a prefix leaked: {text}"
    );
    assert!(
        !text.contains(&PROVIDER_KEY[PROVIDER_KEY.len() - 8..]),
        "a suffix leaked: {text}"
    );
}

#[tokio::test]
async fn an_upstream_401_echoing_the_key_reaches_the_client_masked() -> TestResult {
    let body = format!(
        r#"{{"error":{{"message":"Incorrect API key provided: Bearer {PROVIDER_KEY}. Also seen: {}...{}","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}}}"#,
        &PROVIDER_KEY[..10],
        &PROVIDER_KEY[PROVIDER_KEY.len() - 9..],
    );
    let response = format!(
        "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let base = raw_upstream(vec![response.into_bytes()]).await?;
    let response = get(&base, "/v1/models").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let length = response.headers()[header::CONTENT_LENGTH]
        .to_str()?
        .parse::<usize>()?;
    let bytes = response.into_body().collect().await?.to_bytes();
    let text = std::str::from_utf8(&bytes)?;
    assert_no_key(text);
    // Same length, still the same JSON error otherwise.
    assert_eq!(bytes.len(), length);
    assert_eq!(bytes.len(), body.len());
    let json: serde_json::Value = serde_json::from_slice(&bytes)?;
    assert_eq!(json["error"]["code"], "invalid_api_key");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Incorrect API key provided: Bearer ***"),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn a_key_split_across_two_sse_chunks_is_masked_and_the_framing_kept() -> TestResult {
    let event = |text: &str| {
        format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n")
    };
    let stream = format!(
        "{}{}{}data: [DONE]\n\n",
        event("hello"),
        event(&format!("your key is {PROVIDER_KEY} indeed")),
        event("bye"),
    );
    // Cut the stream five bytes into the key, two chunks sent apart: neither side of the cut
    // alone is the key, and the first is too short to be a fragment.
    let cut = stream.find(PROVIDER_KEY).unwrap() + 5;
    let chunk = |part: &str| format!("{:x}\r\n{part}\r\n", part.len()).into_bytes();
    let pieces = vec![
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec(),
        chunk(&stream[..cut]),
        chunk(&stream[cut..]),
        b"0\r\n\r\n".to_vec(),
    ];
    let base = raw_upstream(pieces).await?;
    let response = get(&base, "/v1/chat/completions").await;
    assert_eq!(response.status(), StatusCode::OK);
    let frames = frames(response).await;
    let joined: Vec<u8> = frames.concat();
    let text = String::from_utf8(joined)?;
    assert_no_key(&text);
    for frame in &frames {
        assert_no_key(std::str::from_utf8(frame)?);
    }
    // Same bytes but the key, masked in place: the events still parse, one by one.
    assert_eq!(text.len(), stream.len());
    assert_eq!(
        text,
        stream.replace(PROVIDER_KEY, &"*".repeat(PROVIDER_KEY.len()))
    );
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 4);
    for event in &events[..3] {
        let data = event.strip_prefix("data: ").unwrap();
        serde_json::from_str::<serde_json::Value>(data)?;
    }
    Ok(())
}

#[tokio::test]
async fn a_key_in_response_headers_is_masked() -> TestResult {
    let response = format!(
        "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
         www-authenticate: Bearer error=\"invalid_token\", key=\"{PROVIDER_KEY}\"\r\n\
         x-debug-key: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        &PROVIDER_KEY[..12],
    );
    let base = raw_upstream(vec![response.into_bytes()]).await?;
    let response = get(&base, "/v1/models").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    for (name, value) in response.headers() {
        assert_no_key(&format!(
            "{name}: {}",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    let www = response.headers()[header::WWW_AUTHENTICATE].to_str()?;
    assert!(
        www.starts_with("Bearer error=\"invalid_token\", key=\"****"),
        "{www}"
    );
    assert_eq!(response.headers()["x-debug-key"], "*".repeat(12).as_str());
    Ok(())
}

#[tokio::test]
async fn a_stale_content_length_next_to_chunked_is_dropped() -> TestResult {
    let payload = r#"{"object":"list","data":[]}"#;
    let (first, second) = payload.split_at(10);
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\
         transfer-encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\n\r\n",
        first.len(),
        second.len(),
    );
    let base = raw_upstream(vec![response.into_bytes()]).await?;
    let response = get(&base, "/v1/models").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers().get(header::CONTENT_LENGTH).is_none(),
        "a stale content-length was relayed: {:?}",
        response.headers()
    );
    assert!(response.headers().get(header::TRANSFER_ENCODING).is_none());
    let bytes = response.into_body().collect().await?.to_bytes();
    assert_eq!(bytes, payload.as_bytes());
    Ok(())
}

/// An upstream that answers a plain request with `101 Switching Protocols` (nobody asked to
/// upgrade): the proxy cannot relay a protocol switch it did not request, so the client gets an
/// OpenAI-shaped 502, never a 101.
#[tokio::test]
async fn an_unrequested_101_is_a_502() -> TestResult {
    let response = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\nraw bytes of another protocol";
    let base = raw_upstream(vec![response.as_bytes().to_vec()]).await?;
    let response = get(&base, "/v1/models").await;
    assert_eq!(
        response.status(),
        StatusCode::BAD_GATEWAY,
        "{:?}",
        response.headers()
    );
    let bytes = response.into_body().collect().await?.to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes)?;
    assert!(json["error"]["code"].is_string(), "{json}");
    Ok(())
}
