//! Faults through the proxy, on loopback: an upstream that refuses connections, stalls, or
//! resets mid-stream (a tiny TCP server written here to misbehave); a client that goes away
//! with its body half sent or its stream half read; a key store that hangs or panics. Each
//! request gets an OpenAI-shaped error (or, for a stream already started, a terminated
//! stream) and leaves exactly one audit record saying what happened.
//!
//! The client side is raw TCP too, so that what reaches the client (a chunked stream without
//! its last chunk, say) is seen byte for byte.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use example_proxy::app;
use example_proxy::config::Config;
use example_proxy::server;
use example_proxy::stack::{build_stack, Policy, KEY_LOOKUP_TIMEOUT};
use example_proxy::upstream::Upstream as Forwarder;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower_llm_policy::audit::{FanOut, MemorySink};
use tower_llm_policy::keys::{ApiKey, BoxFuture, KeyDigest, KeyStore, StoreError};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const PROVIDER_KEY: &str = "sk-provider-faults-0123456789";
const PROVIDER_ENV: &str = "TEST_FAULTS_PROVIDER_KEY";
const KEY: &str = "sk-faults-client-key-0123";

/// Every network wait of these tests is bounded.
const BOUND: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// The misbehaving upstream

/// What the test upstream does with each request.
#[derive(Clone, Copy, Debug)]
enum Upstream {
    /// Reads the request, then says nothing, for the rest of the test.
    StallBeforeHeaders,
    /// Sends the head of a stream and two events (and the usage chunk when `usage`), then
    /// resets the connection.
    ResetMidStream { usage: bool },
    /// Sends the head of a stream and one event, then says nothing.
    StallMidStream,
    /// Sends an event every 20 ms, up to 500 of them (10 s), or until the proxy hangs up.
    Trickle,
}

const EVENT: &str = r#"data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hello"}}]}"#;
const USAGE: &str = r#"data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13}}"#;

/// One SSE event as an HTTP/1.1 chunk.
fn chunk(event: &str) -> Vec<u8> {
    let data = format!("{event}\n\n");
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

const STREAM_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// Reads a request's head and its `content-length` body.
async fn read_request(socket: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    let head_end = loop {
        let n = socket.read(&mut byte).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&byte[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = socket.read(&mut byte).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&byte[..n]);
    }
    Ok(())
}

/// Starts the test upstream; its task ends with the test's runtime.
async fn misbehaving(behaviour: Upstream) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if read_request(&mut socket).await.is_err() {
                    return;
                }
                match behaviour {
                    Upstream::StallBeforeHeaders => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    Upstream::ResetMidStream { usage } => {
                        let mut out = STREAM_HEAD.as_bytes().to_vec();
                        out.extend(chunk(EVENT));
                        out.extend(chunk(EVENT));
                        if usage {
                            out.extend(chunk(USAGE));
                        }
                        let _ = socket.write_all(&out).await;
                        let _ = socket.flush().await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        // A reset, not a clean close: linger 0 sends RST (and, being zero,
                        // never blocks the drop, which is why tokio deprecates the setter).
                        #[allow(deprecated)]
                        let _ = socket.set_linger(Some(Duration::ZERO));
                        drop(socket);
                    }
                    Upstream::StallMidStream => {
                        let mut out = STREAM_HEAD.as_bytes().to_vec();
                        out.extend(chunk(EVENT));
                        let _ = socket.write_all(&out).await;
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    Upstream::Trickle => {
                        if socket.write_all(STREAM_HEAD.as_bytes()).await.is_err() {
                            return;
                        }
                        for _ in 0..500 {
                            if socket.write_all(&chunk(EVENT)).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A loopback port with nothing listening on it.
async fn refused_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

// ---------------------------------------------------------------------------------------------
// The proxy

struct Proxy {
    addr: SocketAddr,
    audit_path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

fn config_text(upstream: SocketAddr, audit: &Path) -> String {
    format!(
        r#"listen = "127.0.0.1:0"

[upstream]
base_url = "http://{upstream}/v1"
api_key_env = "{PROVIDER_ENV}"
connect_timeout = "1s"
first_byte_timeout = "500ms"
idle_timeout = "500ms"

[server]
shutdown_grace = "2s"

[audit]
jsonl = "{audit}"

[[keys]]
name = "faults"
secret = "{KEY}"
"#,
        audit = audit.display()
    )
}

async fn proxy(upstream: SocketAddr) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("proxy.toml");
    let audit_path = dir.path().join("audit.jsonl");
    std::fs::write(&config_path, config_text(upstream, &audit_path)).unwrap();
    let args = app::Args {
        config: Some(config_path),
        listen: None,
        no_policy: false,
        migrate: false,
    };
    let env = |name: &str| (name == PROVIDER_ENV).then(|| PROVIDER_KEY.to_owned());
    let proxy = app::Proxy::prepare(&args, env).await.expect("proxy starts");
    let addr = proxy.addr;
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(proxy.run(async {
        let _ = rx.await;
    }));
    Proxy {
        addr,
        audit_path,
        shutdown: Some(tx),
        server: Some(server),
        _dir: dir,
    }
}

impl Proxy {
    /// Stops the proxy (which flushes its audit log) and returns the records.
    async fn records(&mut self) -> Vec<Value> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(BOUND, server)
                .await
                .expect("the proxy stops in time")
                .expect("the server task does not panic")
                .expect("the server ends cleanly");
        }
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON record"))
            .collect()
    }

    /// The one record of the run.
    async fn record(&mut self) -> Value {
        let records = self.records().await;
        assert_eq!(records.len(), 1, "exactly one record: {records:#?}");
        records.into_iter().next().unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// The client

fn chat_body(stream: bool) -> String {
    serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "user", "content": "tell me a story about a lighthouse"}],
    })
    .to_string()
}

fn request_head(body_len: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {body_len}\r\nconnection: close\r\n\r\n"
    )
}

/// What the client got: the raw bytes until the proxy closed the connection.
struct Received {
    bytes: Vec<u8>,
}

impl Received {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    fn status(&self) -> u16 {
        self.text()
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line")
    }

    /// The body of a response sent with `content-length`, as JSON.
    fn json(&self) -> Value {
        let text = self.text();
        let (_, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        serde_json::from_str(body).expect("a JSON body")
    }

    /// Whether a chunked body ended properly, with its last (empty) chunk.
    fn chunked_complete(&self) -> bool {
        self.bytes.ends_with(b"0\r\n\r\n")
    }
}

/// Sends a whole request and reads until the proxy closes the connection.
async fn exchange(proxy: SocketAddr, body: &str) -> Received {
    let mut socket = TcpStream::connect(proxy).await.unwrap();
    socket
        .write_all(format!("{}{body}", request_head(body.len())).as_bytes())
        .await
        .unwrap();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(BOUND, read)
        .await
        .expect("the proxy ends the response in time");
    Received { bytes }
}

fn assert_openai_error(received: &Received, status: u16, code: &str) {
    assert_eq!(received.status(), status, "{}", received.text());
    let json = received.json();
    let error = json["error"].as_object().expect("an `error` object");
    for key in ["message", "type", "param", "code"] {
        assert!(error.contains_key(key), "`{key}` missing in {json}");
    }
    assert_eq!(error["code"], code);
    assert!(!received.text().contains(PROVIDER_KEY));
}

fn flags(record: &Value) -> Vec<String> {
    record["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Upstream faults

#[tokio::test]
async fn upstream_refusing_connections_is_a_502() -> TestResult {
    let mut proxy = proxy(refused_port().await).await;
    let got = exchange(proxy.addr, &chat_body(false)).await;
    assert_openai_error(&got, 502, "upstream_unavailable");
    let record = proxy.record().await;
    assert_eq!(record["status"], 502);
    assert_eq!(record["outcome"], "upstream_error");
    assert_eq!(record["key"], "faults");
    assert_eq!(record["blocked_by"], Value::Null);
    Ok(())
}

#[tokio::test]
async fn upstream_stalling_before_its_headers_is_a_504() -> TestResult {
    let mut proxy = proxy(misbehaving(Upstream::StallBeforeHeaders).await).await;
    let started = Instant::now();
    let got = exchange(proxy.addr, &chat_body(true)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_openai_error(&got, 504, "upstream_timeout");
    let record = proxy.record().await;
    assert_eq!(record["status"], 504);
    assert_eq!(record["outcome"], "upstream_error");
    Ok(())
}

#[tokio::test]
async fn upstream_reset_after_the_usage_chunk_terminates_the_stream_and_keeps_the_usage(
) -> TestResult {
    let mut proxy = proxy(misbehaving(Upstream::ResetMidStream { usage: true }).await).await;
    let got = exchange(proxy.addr, &chat_body(true)).await;
    assert_eq!(got.status(), 200);
    let text = got.text();
    assert!(
        text.contains("Hello"),
        "the events before the reset arrived: {text}"
    );
    assert!(
        !got.chunked_complete(),
        "a failed stream must not look complete: {text}"
    );
    // The usage chunk was the proxy's own request (include_usage): the client never sees it.
    assert!(!text.contains("prompt_tokens"), "{text}");
    let record = proxy.record().await;
    assert_eq!(record["status"], 200);
    assert_eq!(record["outcome"], "upstream_error");
    assert_eq!(record["stream"], true);
    assert_eq!(record["prompt_tokens"], 11);
    assert_eq!(record["completion_tokens"], 2);
    assert_eq!(record["total_tokens"], 13);
    assert!(record["cost_usd"].as_f64().unwrap() > 0.0);
    Ok(())
}

#[tokio::test]
async fn upstream_reset_before_any_usage_records_an_estimate() -> TestResult {
    let mut proxy = proxy(misbehaving(Upstream::ResetMidStream { usage: false }).await).await;
    let got = exchange(proxy.addr, &chat_body(true)).await;
    assert_eq!(got.status(), 200);
    assert!(got.text().contains("Hello"));
    assert!(!got.chunked_complete(), "{}", got.text());
    let record = proxy.record().await;
    assert_eq!(record["outcome"], "upstream_error");
    assert_eq!(record["prompt_tokens"], Value::Null);
    assert!(flags(&record).contains(&"usage_missing".to_owned()));
    assert!(record["usage_estimate"]["prompt_tokens"].as_u64().unwrap() > 0);
    Ok(())
}

#[tokio::test]
async fn upstream_stalling_mid_stream_terminates_the_stream() -> TestResult {
    let mut proxy = proxy(misbehaving(Upstream::StallMidStream).await).await;
    let started = Instant::now();
    let got = exchange(proxy.addr, &chat_body(true)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(got.status(), 200);
    assert!(got.text().contains("Hello"));
    assert!(!got.chunked_complete(), "{}", got.text());
    let record = proxy.record().await;
    assert_eq!(record["outcome"], "upstream_error");
    assert_eq!(record["status"], 200);
    assert!(flags(&record).contains(&"usage_missing".to_owned()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Client faults

#[tokio::test]
async fn client_leaving_with_its_body_half_sent_leaves_one_cancelled_record() -> TestResult {
    let mut proxy = proxy(misbehaving(Upstream::Trickle).await).await;
    let body = chat_body(false);
    let mut socket = TcpStream::connect(proxy.addr).await?;
    socket
        .write_all(request_head(body.len()).as_bytes())
        .await?;
    socket.write_all(&body.as_bytes()[..body.len() / 2]).await?;
    socket.flush().await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(socket);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let record = proxy.record().await;
    assert_eq!(record["outcome"], "cancelled", "{record}");
    assert_eq!(record["key"], "faults");
    // The 400 it was answered (the client was gone), and why.
    assert_eq!(record["status"], 400);
    assert_eq!(record["code"], "invalid_request_body");
    assert_eq!(flags(&record), ["request_body_unreadable"]);
    Ok(())
}

#[tokio::test]
async fn client_leaving_mid_stream_leaves_one_cancelled_record() -> TestResult {
    let mut proxy = proxy(misbehaving(Upstream::Trickle).await).await;
    let body = chat_body(true);
    let mut socket = TcpStream::connect(proxy.addr).await?;
    socket
        .write_all(format!("{}{body}", request_head(body.len())).as_bytes())
        .await?;
    // Read until three events have arrived, then hang up.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(BOUND, async {
        while got.windows(5).filter(|w| w == b"Hello").count() < 3 {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream went on");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await?;
    drop(socket);
    // The proxy notices on its next write (an event every 20 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let record = proxy.record().await;
    assert_eq!(record["outcome"], "cancelled", "{record}");
    assert_eq!(record["status"], 200);
    assert_eq!(record["stream"], true);
    assert!(flags(&record).contains(&"usage_missing".to_owned()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Key store faults, through the proxy's stack and server

/// A store that hangs for one key and panics for the others.
struct BrokenStore;

const HANGING_KEY: &str = "sk-faults-hanging-key-0123";

impl KeyStore for BrokenStore {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        if *digest == KeyDigest::of(HANGING_KEY) {
            return Box::pin(std::future::pending());
        }
        Box::pin(async { panic!("key store bug") })
    }
}

#[tokio::test]
async fn a_hanging_or_panicking_store_is_a_503_and_the_connection_lives_on() -> TestResult {
    let upstream = misbehaving(Upstream::Trickle).await;
    let dir = tempfile::tempdir()?;
    let audit = dir.path().join("unused.jsonl");
    let config: Config = toml::from_str(&config_text(upstream, &audit))?;
    let records = MemorySink::new();
    let policy = Policy::new(
        config,
        Arc::new(BrokenStore),
        FanOut::new().with(records.clone()),
    )?;
    let forwarder = Forwarder::new(format!("http://{upstream}/v1"), None)?;
    let service = build_stack(Some(&policy), forwarder);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(server::run(
        service,
        listener,
        server::ServerOptions {
            grace: Duration::from_secs(2),
            ..server::ServerOptions::default()
        },
        async {
            let _ = rx.await;
        },
    ));

    // One connection, keep-alive: a panic must not take it down.
    let mut socket = TcpStream::connect(addr).await?;
    let body = chat_body(false);
    for (key, expect_at_least) in [
        ("sk-faults-panicking-key-01", Duration::ZERO),
        (HANGING_KEY, KEY_LOOKUP_TIMEOUT),
        ("sk-faults-panicking-key-02", Duration::ZERO),
    ] {
        let head = request_head(body.len())
            .replace(KEY, key)
            .replace("connection: close", "connection: keep-alive");
        socket.write_all(format!("{head}{body}").as_bytes()).await?;
        let started = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // One response: its head, then its content-length body.
        tokio::time::timeout(BOUND, async {
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the connection was closed");
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .to_ascii_lowercase()
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:")
                                .map(str::trim)
                                .map(str::to_owned)
                        })
                        .and_then(|v| v.parse().ok())
                        .unwrap();
                    if body.len() >= len {
                        break;
                    }
                }
            }
        })
        .await?;
        let elapsed = started.elapsed();
        assert!(elapsed >= expect_at_least, "{elapsed:?}");
        let received = Received { bytes: got };
        assert_openai_error(&received, 503, "policy_unavailable");
    }
    drop(socket);
    let _ = tx.send(());
    tokio::time::timeout(BOUND, server).await???;

    let records = records.records();
    assert_eq!(records.len(), 3, "{records:#?}");
    let flags: Vec<_> = records.iter().map(|r| r.flags.clone()).collect();
    assert!(
        flags[0].contains(&"key_store_panic".to_owned()),
        "{flags:?}"
    );
    assert!(
        flags[1].contains(&"key_store_timeout".to_owned()),
        "{flags:?}"
    );
    assert!(
        flags[2].contains(&"key_store_panic".to_owned()),
        "{flags:?}"
    );
    Ok(())
}
