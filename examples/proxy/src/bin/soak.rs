//! The soak: the proxy (a process) in front of the mock upstream (a process), on loopback,
//! kept busy by many connections for a while; then a report. See `examples/proxy/soak/`.
//!
//! ```sh
//! cargo build --release -p example-proxy --bins
//! target/release/soak --duration 5m --connections 500
//! ```
//!
//! It starts `mock_upstream` and `proxy` (by default the binaries next to its own), with a
//! configuration and an audit log in a fresh temporary directory; runs the load
//! (`example_proxy::soak::load`); reads the proxy's RSS before and after; stops the proxy with
//! SIGTERM (which flushes the audit log); and checks every answered request against the audit
//! records. It exits 0 only if there was no unexpected error and every request was audited
//! exactly once. Everything stops by itself: the load at its deadline, the processes when the
//! soak ends (killed if they do not stop in time).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use example_proxy::soak::{self, LoadOptions};

/// Soak test of the proxy against the mock upstream, on loopback.
#[derive(Debug, Parser)]
#[command(name = "soak", about)]
struct Args {
    /// How long to send requests for ("5m", "30s").
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Connections kept busy at once.
    #[arg(long, default_value_t = 500)]
    connections: usize,
    /// The proxy binary (default: `proxy` next to this one).
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// The mock upstream binary (default: `mock_upstream` next to this one).
    #[arg(long)]
    mock_bin: Option<PathBuf>,
    /// Delay before each content chunk of the mock's streamed answers, in milliseconds.
    #[arg(long, default_value_t = 2)]
    chunk_delay_ms: u64,
    /// Where to keep the configuration, the audit log and the processes' logs (default: a
    /// temporary directory, removed at the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

const KEY: &str = "sk-soak-virtual-key-0123456789";

/// Kills the process on drop unless it was waited for.
struct Process {
    name: &'static str,
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if self.name != "mock_upstream" {
                // The mock only ever stops this way; the proxy should have exited by now.
                eprintln!("soak: killing {}", self.name);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name(name)
}

fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

fn wait_for_port(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn config(mock: SocketAddr, listen: SocketAddr, audit: &Path) -> String {
    format!(
        r#"listen = "{listen}"

[upstream]
base_url = "http://{mock}/v1"
first_byte_timeout = "30s"
idle_timeout = "30s"

[server]
shutdown_grace = "30s"
max_connections = 1024

[audit]
jsonl = "{audit}"

[[keys]]
name = "soak"
secret = "{KEY}"
model_limits_enabled = true
model_limits = ["gpt-4o-mini", "gpt-4o"]
blocked_features = ["images"]
"#,
        audit = audit.display()
    )
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("soak: {err}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    let temp;
    let dir = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = std::env::temp_dir().join(format!("proxy-soak-{}", std::process::id()));
            std::fs::create_dir_all(&temp)?;
            temp.clone()
        }
    };
    let audit = dir.join("audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let mock_addr = free_port()?;
    let proxy_addr = free_port()?;
    std::fs::write(
        dir.join("proxy.toml"),
        config(mock_addr, proxy_addr, &audit),
    )?;

    let mock_bin = args
        .mock_bin
        .clone()
        .unwrap_or_else(|| sibling("mock_upstream"));
    let proxy_bin = args.proxy_bin.clone().unwrap_or_else(|| sibling("proxy"));
    let _mock = Process {
        name: "mock_upstream",
        child: Command::new(&mock_bin)
            .args(["--listen", &mock_addr.to_string()])
            .args(["--chunk-delay-ms", &args.chunk_delay_ms.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("mock.log"))?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", mock_bin.display()))?,
    };
    if !wait_for_port(mock_addr, Duration::from_secs(10)) {
        return Err("the mock upstream did not start".into());
    }
    let mut proxy = Process {
        name: "proxy",
        child: Command::new(&proxy_bin)
            .arg("--config")
            .arg(dir.join("proxy.toml"))
            .env("RUST_LOG", "warn")
            .stdout(std::fs::File::create(dir.join("proxy.out"))?)
            .stderr(std::fs::File::create(dir.join("proxy.log"))?)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", proxy_bin.display()))?,
    };
    if !wait_for_port(proxy_addr, Duration::from_secs(10)) {
        return Err("the proxy did not start".into());
    }
    let pid = proxy.child.id();
    let rss_start = soak::rss_kib(pid);
    println!(
        "soak: {} connections for {:?} against the proxy (pid {pid}) on {proxy_addr}, mock on {mock_addr}",
        args.connections, args.duration
    );

    // The RSS every tenth of the run, to tell a plateau from a leak.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let every = (args.duration / 10).max(Duration::from_secs(1));
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let mut next = Instant::now() + every;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if Instant::now() >= next {
                    samples.push(soak::rss_kib(pid));
                    next += every;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(soak::load(LoadOptions {
        proxy: proxy_addr,
        key: KEY.to_owned(),
        connections: args.connections,
        duration: args.duration,
    }));
    let rss_end = soak::rss_kib(pid);
    let rss_peak = soak::peak_rss_kib(pid);
    drop(runtime);
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.join().unwrap_or_default();

    // SIGTERM: the proxy finishes, flushes the audit log and exits.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(45);
    let exited = loop {
        if let Some(status) = proxy.child.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let lines = BufReader::new(std::fs::File::open(&audit)?).lines();
    let mut leaked = false;
    let check = soak::check_audit_lines(
        &report.ids,
        lines.inspect(|line| {
            if let Ok(line) = line {
                leaked |= line.contains(KEY);
            }
        }),
    )?;

    print!("{report}");
    println!(
        "proxy RSS: start {} KiB, end {} KiB, peak {} KiB",
        show(rss_start),
        show(rss_end),
        show(rss_peak)
    );
    println!(
        "proxy RSS during the run (KiB): {}",
        samples
            .iter()
            .map(|s| show(*s))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "proxy exit: {}",
        exited.map_or("did not exit in time (killed)".to_owned(), |s| s
            .to_string())
    );
    println!(
        "answered requests: {} of {} sent",
        report.ids.len(),
        report.requests
    );
    println!("{check}");
    if leaked {
        println!("the virtual key appears in the audit log");
    }
    let passed = report.unexpected == 0
        && check.exactly_once()
        && check.records == report.requests
        && exited.is_some_and(|s| s.success())
        && !leaked;
    println!("soak: {}", if passed { "PASSED" } else { "FAILED" });
    if args.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("soak: files kept in {}", dir.display());
    }
    Ok(passed)
}

fn show(kib: Option<u64>) -> String {
    kib.map_or("?".to_owned(), |k| k.to_string())
}
