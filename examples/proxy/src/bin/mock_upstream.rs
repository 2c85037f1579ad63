//! A fast mock of the OpenAI API, to run the example proxy (or a benchmark) against.
//!
//! ```sh
//! cargo run -p example-proxy --bin mock_upstream -- --listen 127.0.0.1:9090 --latency-ms 50
//! curl -s localhost:9090/v1/chat/completions \
//!   -d '{"model":"gpt-4o","messages":[{"role":"user","content":"hello there"}]}'
//! ```
//!
//! The server itself is the package's `mock` module (`src/mock.rs`), shared with the proxy's
//! embedded default and the tests.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use example_proxy::mock;

/// A mock of the OpenAI API, with deterministic answers and token counts.
#[derive(Debug, Parser)]
#[command(name = "mock_upstream", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Fixed delay before each response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Number of content chunks in streamed responses (and words in every answer).
    #[arg(long, default_value_t = 8)]
    stream_chunks: usize,
    /// Delay before each content chunk of a streamed response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let opts = mock::MockOptions::default()
        .latency(Duration::from_millis(args.latency_ms))
        .stream_chunks(args.stream_chunks)
        .chunk_delay(Duration::from_millis(args.chunk_delay_ms))
        // Nobody reads the log of a standalone server: do not let it grow.
        .record(false);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "mock upstream listening on http://{}/v1",
        listener.local_addr()?
    );
    mock::serve(listener, opts).await
}
