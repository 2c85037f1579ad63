//! Stream memory: how much resident memory the proxy (a running process) needs per open SSE
//! stream, and at its peak while one very long stream passes. Run by `benches/streams.sh`,
//! which starts the mock upstream and the proxy on loopback.
//!
//! ```sh
//! target/release/stream_memory --url http://127.0.0.1:19391/v1 --key sk-... --pid 1234
//! ```
//!
//! 1. Opens `--streams` streamed chat completions at once (each slow enough to stay open for
//!    a few seconds), waits until every one has its first bytes, and reads the proxy's RSS:
//!    (RSS with the streams open − RSS before) / streams is the cost of one stream.
//! 2. Reads one streamed chat completion of `--big-bytes` content bytes to its end, sampling
//!    the proxy's RSS every 20 ms: the largest sample is its peak.
//!
//! Prints both against their goals (16 KiB per stream, 64 MiB peak) and exits 1 if either is
//! missed or a stream failed. Loopback only; everything ends by itself.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use example_proxy::mock::{CHUNK_DELAY_HEADER, STREAM_BYTES_HEADER, STREAM_CHUNKS_HEADER};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Measures the proxy's memory per open stream and its peak on one long stream.
#[derive(Debug, Parser)]
#[command(name = "stream_memory", about)]
struct Args {
    /// The proxy's base URL (`http://127.0.0.1:8080/v1`).
    #[arg(long)]
    url: String,
    /// A virtual key the proxy admits for `gpt-4o-mini`.
    #[arg(long)]
    key: String,
    /// The proxy's process id, to read its RSS from `/proc`.
    #[arg(long)]
    pid: u32,
    /// Streams open at once.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Content bytes of the long stream.
    #[arg(long, default_value_t = 1 << 30)]
    big_bytes: u64,
}

/// The proxy's resident set (`VmRSS`), in bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn request(args: &Args, headers: &[(&str, String)]) -> Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "messages": [{"role": "user", "content": "stream, please"}],
    });
    let mut builder = Request::post(format!("{}/chat/completions", args.url))
        .header("authorization", format!("Bearer {}", args.key))
        .header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, value);
    }
    builder
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid request")
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.streams)
        .build_http();
    let mut ok = true;

    // Warm up: the first requests size the runtime's and the allocator's pools.
    for _ in 0..20 {
        if let Ok(res) = client.request(request(&args, &[])).await {
            let _ = res.into_body().collect().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss(args.pid);

    // 1. Many open streams: 40 chunks 100 ms apart, about 4 s each.
    let started = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for _ in 0..args.streams {
        let req = request(
            &args,
            &[
                (STREAM_CHUNKS_HEADER, "40".to_owned()),
                (CHUNK_DELAY_HEADER, "100".to_owned()),
            ],
        );
        let client = client.clone();
        let started = started.clone();
        let failed = failed.clone();
        let mut release = release_rx.clone();
        tasks.push(tokio::spawn(async move {
            let res = match client.request(req).await {
                Ok(res) if res.status().is_success() => res,
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let mut body = res.into_body();
            match body.frame().await {
                Some(Ok(_)) => {
                    started.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            // Hold the stream open (unread) until measured, then read it to its end.
            let _ = release.wait_for(|go| *go).await;
            while let Some(frame) = body.frame().await {
                if frame.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while started.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < args.streams as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open = started.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = rss(args.pid);
    let _ = release_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let per_stream = during.saturating_sub(before) / open.max(1);
    let failures = failed.load(Ordering::Relaxed);
    println!(
        "open streams: {open} of {}; RSS before {:.1} MiB, with them open {:.1} MiB: {:.1} KiB per stream (goal <= 16 KiB); {failures} failed",
        args.streams,
        before as f64 / 1048576.0,
        during as f64 / 1048576.0,
        per_stream as f64 / 1024.0,
    );
    ok &= failures == 0 && open == args.streams as u64 && per_stream <= 16 * 1024;

    // 2. One long stream, read as fast as it comes.
    let peak = Arc::new(AtomicU64::new(rss(args.pid)));
    let sampling = {
        let peak = peak.clone();
        let pid = args.pid;
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let start = Instant::now();
    let mut received = 0u64;
    let mut big_ok = false;
    if let Ok(res) = client
        .request(request(
            &args,
            &[(STREAM_BYTES_HEADER, args.big_bytes.to_string())],
        ))
        .await
    {
        let mut body = res.into_body();
        big_ok = true;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => received += frame.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => {
                    big_ok = false;
                    break;
                }
            }
        }
    }
    sampling.abort();
    peak.fetch_max(rss(args.pid), Ordering::Relaxed);
    let peak = peak.load(Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "long stream: {:.2} GiB received in {secs:.1} s ({:.0} MiB/s); proxy peak RSS {:.1} MiB (goal < 64 MiB)",
        received as f64 / (1u64 << 30) as f64,
        received as f64 / 1048576.0 / secs,
        peak as f64 / 1048576.0,
    );
    ok &= big_ok && received >= args.big_bytes && peak < 64 << 20;
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
