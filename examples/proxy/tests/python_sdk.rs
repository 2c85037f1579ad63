//! The official `openai` Python package through the example proxy: runs
//! `tests/python/test_openai_sdk.py` (plain `unittest`) against this package's two binaries.
//!
//! Cargo builds a package's binaries before its integration tests and tells them where they
//! are: the script runs with `PROXY_BIN` and `MOCK_BIN` set to `CARGO_BIN_EXE_proxy` and
//! `CARGO_BIN_EXE_mock_upstream` (`target/<profile>/{proxy,mock_upstream}`). Only the `openai`
//! package needs installing; CI (`.ci/run`) does:
//!
//! ```sh
//! pip install --quiet openai
//! export REQUIRE_PYTHON_SDK=1
//! ```
//!
//! Without `python3`, the `openai` package or the binaries, the test prints a `skipped: ...`
//! line and passes, unless `REQUIRE_PYTHON_SDK=1`, when it fails instead. `PYTHON` names
//! another interpreter.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The script's own watchdog (`SDK_TEST_TIMEOUT`), in seconds.
const SCRIPT_TIMEOUT_SECS: u64 = 60;
/// When this test kills the script if the watchdog did not.
const HARD_TIMEOUT: Duration = Duration::from_secs(SCRIPT_TIMEOUT_SECS + 30);

fn required() -> bool {
    std::env::var("REQUIRE_PYTHON_SDK").is_ok_and(|v| v.trim() == "1")
}

/// Fails when `REQUIRE_PYTHON_SDK=1`; otherwise says why the test is skipped.
fn skip(why: &str) {
    if required() {
        panic!("REQUIRE_PYTHON_SDK=1 and {why}");
    }
    println!("skipped: {why} (set REQUIRE_PYTHON_SDK=1 to make this a failure)");
}

/// Runs `command` to its end (or `timeout`), collecting its stdout and stderr.
fn run_bounded(
    mut command: Command,
    timeout: Duration,
) -> std::io::Result<(Option<ExitStatus>, String)> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_bounded(&mut child, timeout)?;
    let output = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    Ok((status, output))
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The exit status, or `None` (the child killed) after `timeout`.
fn wait_bounded(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_openai_python_sdk_works_through_the_proxy() {
    if cfg!(not(unix)) {
        // The script stops the proxy with SIGTERM and bounds itself with SIGALRM.
        skip("the Python SDK test needs a Unix system");
        return;
    }
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());

    let mut probe = Command::new(&python);
    probe.args([
        "-c",
        "import openai, sys; print(openai.__version__, sys.version.split()[0])",
    ]);
    match run_bounded(probe, Duration::from_secs(30)) {
        Ok((Some(status), output)) if status.success() => {
            println!("openai {}", output.trim());
        }
        Ok((_, output)) => {
            skip(&format!(
                "`{python} -c 'import openai'` failed (pip install openai): {}",
                output.trim().lines().last().unwrap_or("no output")
            ));
            return;
        }
        Err(e) => {
            skip(&format!("`{python}` cannot be run: {e}"));
            return;
        }
    }

    let proxy = PathBuf::from(env!("CARGO_BIN_EXE_proxy"));
    let mock = PathBuf::from(env!("CARGO_BIN_EXE_mock_upstream"));
    let missing: Vec<_> = [&proxy, &mock]
        .into_iter()
        .filter(|p| !p.is_file())
        .collect();
    if !missing.is_empty() {
        skip(&format!(
            "the proxy's binaries are missing ({}): `cargo test -p example-proxy` builds them",
            missing
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return;
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/test_openai_sdk.py");
    let mut command = Command::new(&python);
    command
        .arg(&script)
        .env("PROXY_BIN", &proxy)
        .env("MOCK_BIN", &mock)
        .env("SDK_TEST_TIMEOUT", SCRIPT_TIMEOUT_SECS.to_string())
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let (status, output) = run_bounded(command, HARD_TIMEOUT)
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    match status {
        Some(status) if status.success() => println!("{output}"),
        Some(status) => panic!(
            "{} failed ({status}) with PROXY_BIN={} MOCK_BIN={}:\n{output}",
            script.display(),
            proxy.display(),
            mock.display()
        ),
        None => panic!(
            "{} did not finish within {HARD_TIMEOUT:?} and was killed:\n{output}",
            script.display()
        ),
    }
}
