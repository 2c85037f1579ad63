//! The web console end to end in a real headless Chromium, driven through chromedriver
//! (WebDriver, with `fantoccini`): log in, create a key, restrict it to one model with the
//! type-to-filter picker, send a request for another model through the proxy with the
//! official OpenAI Python SDK, see it refused and marked on the audit page, open its
//! record, see the spend on the chart.
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`;
//! `.ci/run` installs them) and Python's `openai` package: without them the test FAILS,
//! saying what is missing. `CHROMIUM` and `CHROMEDRIVER` name other binaries, `PYTHON`
//! another interpreter. Screenshots of every page are saved as PNG in `CONSOLE_SCREENSHOTS`
//! (default: a new temporary directory, kept; its path is printed).

#[path = "common/console.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{start, Error, TestResult, TOKEN};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// The whole test's bound.
const WHOLE_TEST: Duration = Duration::from_secs(420);
/// How long a page or an element may take to appear.
const WAIT: Duration = Duration::from_secs(45);

/// chromedriver, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name` on the `PATH` (or as given when it holds a `/`).
fn find_binary(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}

fn chromium() -> Result<PathBuf, Error> {
    let wanted: Vec<String> = match std::env::var("CHROMIUM") {
        Ok(name) => vec![name],
        Err(_) => ["chromium", "chromium-browser", "google-chrome"]
            .map(String::from)
            .to_vec(),
    };
    wanted
        .iter()
        .find_map(|name| find_binary(name))
        .ok_or_else(|| {
            format!(
                "no Chromium found ({}): install Debian's `chromium` and `chromium-driver` \
             (apt-get install chromium chromium-driver), or set CHROMIUM",
                wanted.join(", ")
            )
            .into()
        })
}

fn chromedriver() -> Result<PathBuf, Error> {
    let name = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    find_binary(&name).ok_or_else(|| {
        format!(
            "no `{name}` found: install Debian's `chromium-driver` \
             (apt-get install chromium chromium-driver), or set CHROMEDRIVER"
        )
        .into()
    })
}

/// Starts chromedriver on a free loopback port and waits until it is ready.
async fn start_driver(binary: &Path) -> Result<Driver, Error> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(binary)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let driver = Driver { child, port };
    let deadline = Instant::now() + WAIT;
    loop {
        let status = common::send(
            ([127, 0, 0, 1], port).into(),
            http::Method::GET,
            "/status",
            &[],
            None,
        )
        .await;
        if let Ok(page) = status {
            let ready: Value = serde_json::from_str(&page.body).unwrap_or_default();
            if ready["value"]["ready"] == true {
                return Ok(driver);
            }
        }
        if Instant::now() > deadline {
            return Err("chromedriver did not get ready in time".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The official OpenAI Python SDK, or why it cannot be used.
fn python() -> Result<String, Error> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import openai"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Ok(status) if status.success() => Ok(python),
        _ => Err(format!(
            "`{python} -c 'import openai'` failed: install the OpenAI Python SDK \
             (python3 -m pip install openai), or set PYTHON"
        )
        .into()),
    }
}

/// The SDK's calls: a chat completion for `gpt-4o` (expected refused), then one for
/// `gpt-4o-mini`; prints what happened as JSON.
const SDK_SCRIPT: &str = r#"
import json, openai
client = openai.OpenAI(max_retries=0, timeout=60)
out = {}
try:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    out["other_model"] = "allowed"
except openai.PermissionDeniedError as e:
    out["other_model"] = {"status": e.status_code, "code": e.code}
r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
out["chosen_model"] = {"total_tokens": r.usage.total_tokens}
print(json.dumps(out))
"#;

async fn run_sdk(python: &str, base_url: &str, key: &str) -> Result<Value, Error> {
    let mut command = tokio::process::Command::new(python);
    command
        .args(["-c", SDK_SCRIPT])
        .env("OPENAI_BASE_URL", base_url)
        .env("OPENAI_API_KEY", key)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output()).await??;
    if !output.status.success() {
        return Err(format!(
            "the OpenAI SDK script failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

fn screenshots_dir() -> Result<PathBuf, Error> {
    let dir = match std::env::var_os("CONSOLE_SCREENSHOTS") {
        Some(dir) => PathBuf::from(dir),
        None => tempfile::Builder::new()
            .prefix("console-shots-")
            .tempdir()?
            .keep(),
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn shot(client: &Client, dir: &Path, name: &str) -> TestResult {
    let png = client.screenshot().await?;
    assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    std::fs::write(dir.join(format!("{name}.png")), png)?;
    Ok(())
}

/// Waits for `css` on the current page.
async fn find(client: &Client, css: &str) -> Result<fantoccini::elements::Element, Error> {
    client
        .wait()
        .at_most(WAIT)
        .every(Duration::from_millis(100))
        .for_element(Locator::Css(css))
        .await
        .map_err(|e| format!("`{css}` did not appear: {e}").into())
}

/// Reloads `url` until `css` is on it.
async fn find_after_reloads(
    client: &Client,
    url: &str,
    css: &str,
) -> Result<fantoccini::elements::Element, Error> {
    let deadline = Instant::now() + WAIT;
    loop {
        client.goto(url).await?;
        if let Ok(element) = client.find(Locator::Css(css)).await {
            return Ok(element);
        }
        if Instant::now() > deadline {
            return Err(format!("`{css}` never appeared on {url}").into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() -> TestResult {
    // Missing tools are a failure, said plainly (CI installs them).
    let chromium = chromium()?;
    let chromedriver = chromedriver()?;
    let python = python()?;
    tokio::time::timeout(WHOLE_TEST, story(&chromium, &chromedriver, &python))
        .await
        .map_err(|_| "the browser test took longer than its bound")?
}

async fn story(chromium: &Path, chromedriver: &Path, python: &str) -> TestResult {
    let shots = screenshots_dir()?;
    println!("screenshots: {}", shots.display());
    let proxy = start(true, "").await?;
    let driver = start_driver(chromedriver).await?;
    let profile = tempfile::tempdir()?;
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium.display().to_string(),
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--disable-gpu",
                "--no-first-run",
                "--disable-extensions",
                "--window-size=1280,1000",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .map_err(|e| format!("no browser session: {e}"))?;
    let result = drive(&client, &proxy, &shots, python).await;
    let _ = client.close().await;
    drop(driver);
    result
}

async fn drive(client: &Client, proxy: &common::Proxy, shots: &Path, python: &str) -> TestResult {
    // Logged out, the console sends the browser to the login page.
    client.goto(&proxy.url("/console/keys")).await?;
    let token = find(client, "#token").await?;
    assert!(client
        .current_url()
        .await?
        .path()
        .ends_with("/console/login"));
    shot(client, shots, "1-login").await?;
    // From the keyboard: the token, then Enter.
    token
        .send_keys(&format!("{TOKEN}{}", &*fantoccini::key::Key::Enter))
        .await?;

    // The keys page; a new key.
    find(client, "a[href='/console/new-key']")
        .await?
        .click()
        .await?;
    find(client, "#name").await?.send_keys("e2e-app").await?;
    find(client, "form.key-form button[type=submit]")
        .await?
        .click()
        .await?;
    let secret_field = find(client, "#secret").await?;
    let secret = secret_field.prop("value").await?.unwrap_or_default();
    assert!(secret.starts_with("sk-tlp-"), "{secret}");
    // The copy button works (the page's script runs under its CSP).
    find(client, "button[data-copy=secret]")
        .await?
        .click()
        .await?;
    let copy = find(client, "button[data-copy=secret]").await?;
    let deadline = Instant::now() + WAIT;
    while copy.text().await? != "Copied" {
        assert!(
            Instant::now() < deadline,
            "the copy button never said Copied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shot(client, shots, "2-key-created").await?;

    // Its settings: restricted to one model, picked by typing.
    find(client, "a.button[href='/console/keys/e2e-app']")
        .await?
        .click()
        .await?;
    find(client, "input[name=model_limits_enabled]")
        .await?
        .click()
        .await?;
    find(client, "#model-filter")
        .await?
        .send_keys("4o-mini")
        .await?;
    let other = find(client, "#model-choices li[data-name='gpt-4o']").await?;
    let deadline = Instant::now() + WAIT;
    while other.is_displayed().await? {
        assert!(
            Instant::now() < deadline,
            "typing did not filter the models"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let chosen = find(client, "#model-choices li[data-name='gpt-4o-mini'] input").await?;
    assert!(chosen.is_displayed().await?);
    chosen.click().await?;
    client.set_window_size(1280, 1900).await?;
    shot(client, shots, "3-key-editor").await?;
    client.set_window_size(1280, 1000).await?;
    find(client, "form.key-form button[type=submit]")
        .await?
        .click()
        .await?;
    let saved = find(client, ".notice.ok").await?;
    assert!(
        saved
            .text()
            .await?
            .contains("takes effect on the key's next request"),
        "{}",
        saved.text().await?
    );
    assert!(
        find(client, "#model-choices li[data-name='gpt-4o-mini'] input")
            .await?
            .is_selected()
            .await?
    );

    // The OpenAI SDK through the proxy: the other model refused, the chosen one served.
    let outcome = run_sdk(python, &proxy.url("/v1"), &secret).await?;
    assert_eq!(outcome["other_model"]["status"], 403, "{outcome}");
    assert_eq!(
        outcome["other_model"]["code"], "model_not_allowed",
        "{outcome}"
    );
    assert!(
        outcome["chosen_model"]["total_tokens"].as_u64() > Some(0),
        "{outcome}"
    );

    // The audit page: the refused request marked, its record one click away.
    let row = find_after_reloads(
        client,
        &proxy.url("/console/audit"),
        "tr.blocked[data-href]",
    )
    .await?;
    let text = row.text().await?;
    assert!(
        text.contains("e2e-app") && text.contains("gpt-4o"),
        "{text}"
    );
    assert!(
        text.contains("403") && text.contains("model_not_allowed"),
        "{text}"
    );
    assert!(
        text.contains("blocked"),
        "the row says so, not only its colour: {text}"
    );
    let served = find(client, "tr:not(.blocked)[data-href]")
        .await?
        .text()
        .await?;
    assert!(
        served.contains("gpt-4o-mini") && served.contains("200"),
        "{served}"
    );
    shot(client, shots, "4-audit").await?;
    row.click().await?;
    let record = find(client, "pre.record").await?.text().await?;
    assert!(
        record.contains("\"code\": \"model_not_allowed\""),
        "{record}"
    );
    assert!(!record.contains(&secret));
    shot(client, shots, "5-audit-record").await?;

    // The spend page: a bar for the key, the model's total.
    find_after_reloads(
        client,
        &proxy.url("/console/spend"),
        "rect[data-key='e2e-app']",
    )
    .await?;
    let models = find(client, "table.models").await?.text().await?;
    assert!(models.contains("gpt-4o-mini"), "{models}");
    shot(client, shots, "6-spend").await?;

    // The keys list: the key, its model, its spend; the secret nowhere.
    client.goto(&proxy.url("/console/keys")).await?;
    let keys = find(client, "table.keys").await?.text().await?;
    assert!(
        keys.contains("e2e-app") && keys.contains("gpt-4o-mini"),
        "{keys}"
    );
    assert!(!client.source().await?.contains(&secret));
    shot(client, shots, "7-keys").await?;
    // Readable on a phone.
    client.set_window_size(390, 844).await?;
    shot(client, shots, "8-keys-phone").await?;
    client.set_window_size(1280, 1000).await?;

    // Logging out ends the session.
    find(client, "form.logout button").await?.click().await?;
    find(client, "#token").await?;
    client.goto(&proxy.url("/console/keys")).await?;
    find(client, "#token").await?;
    println!("screenshots saved in {}", shots.display());
    Ok(())
}
