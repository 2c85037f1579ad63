//! The example proxy: tower-llm-policy in front of an OpenAI-compatible API, as a ready
//! gateway.
//!
//! ```sh
//! # The embedded default: a built-in mock upstream and a demo key, with a curl to paste.
//! cargo run --release -p example-proxy
//! # A real upstream, keys and policy from a file (see examples/proxy/proxy.toml).
//! OPENAI_API_KEY=sk-... cargo run --release -p example-proxy -- --config proxy.toml
//! # The built binary takes the same options.
//! target/release/proxy --config proxy.toml --listen 0.0.0.0:8080
//! ```
//!
//! Clients use `http://<listen>/v1` as their OpenAI base URL. Logs go to stderr (`RUST_LOG`,
//! default `info`; `RUST_LOG=example_proxy=debug` adds a line per request). SIGINT or SIGTERM
//! stops accepting, lets in-flight requests and streams finish (`[server] shutdown_grace`) and
//! exits.
//!
//! The modules are the package's library (`src/lib.rs`), which the tests use to run the proxy
//! in-process.

use std::process::ExitCode;

use clap::Parser;
use example_proxy::app;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let args = app::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let proxy = match app::Proxy::prepare(&args, |name| std::env::var(name).ok()).await {
        Ok(proxy) => proxy,
        Err(err) => {
            eprintln!("proxy: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", proxy.banner);
    match proxy.run(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("proxy: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
