//! The example proxy's modules, as a library: the `proxy` binary (`src/main.rs`) and the
//! `mock_upstream` binary (`src/bin/mock_upstream.rs`) are thin `main`s over them, and the
//! tests (`tests/`) use them to run the proxy in-process.
//!
//! - [`app`]: command line, configuration or embedded default, start-up;
//! - [`audit_line`]: the embedded default's audit records, one line each on stdout;
//! - [`console`]: `/console`, the web console on top of [`admin`] (keys, audit log, spend);
//! - [`config`]: the TOML configuration (see `proxy.toml` in this package);
//! - [`guards`]: `[[guards]]`, the content guards, and `[end_users]`;
//! - [`alerts`]: `[alerts]`, spend and content-blocked alerts posted to a webhook;
//! - [`metrics`]: `[metrics]`, the Prometheus page;
//! - [`stack`]: the policy layers in front of the forwarding client;
//! - [`server`]: the HTTP server, `/healthz`, timeouts and the connection limit, graceful
//!   shutdown;
//! - [`slow_client`]: the request body read and total timeouts (408), the budget of bytes
//!   held for request bodies (503);
//! - [`soak`]: the soak's load generator and audit check (the `soak` binary);
//! - [`upstream`]: the forwarding client to the OpenAI-compatible upstream;
//! - [`mock`]: a deterministic mock of the OpenAI API (the embedded default's upstream).

pub mod admin;
pub mod alerts;
pub mod app;
pub mod audit_line;
pub mod config;
pub mod console;
pub mod guards;
pub mod metrics;
pub mod mock;
pub mod server;
pub mod slow_client;
pub mod soak;
pub mod stack;
pub mod upstream;
