//! The web console (`/console`) against a hostile client: each test is a weakness found by
//! attacking the console (see the commit that fixed it), kept so that it stays fixed.

#[path = "common/console.rs"]
mod common;

use std::time::Duration;

use common::{send, start, Console, TestResult};
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The login page's double-submit pair: the cookie header and the form's token.
async fn login_form(addr: std::net::SocketAddr) -> Result<(String, String), common::Error> {
    let login = send(addr, Method::GET, "/console/login", &[], None).await?;
    let csrf = login.csrf().ok_or("no login csrf")?;
    let cookie = format!(
        "tlp_console_login={}",
        login.cookie_value("tlp_console_login").ok_or("no cookie")?
    );
    Ok((cookie, csrf))
}

/// A login attempt on its own connection whose body is held back until `go` fires (never,
/// if it is dropped first): the request's status.
async fn held_back_login(
    addr: std::net::SocketAddr,
    cookie: String,
    body: String,
    extra: String,
    go: tokio::sync::watch::Receiver<bool>,
) -> Result<u16, common::Error> {
    let mut go = go;
    let mut stream = TcpStream::connect(addr).await?;
    let head = format!(
        "POST /console/login HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n{extra}\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body.as_bytes()[..1]).await?;
    stream.flush().await?;
    // `go` dropped without firing: the rest of the body never comes.
    if go.wait_for(|go| *go).await.is_ok() {
        stream.write_all(&body.as_bytes()[1..]).await?;
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await??;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    Ok(status)
}

/// Finding: the login throttle was checked before the form was read and counted after the
/// token was compared, so logins sent at once (their bodies held back until all had passed
/// the check) were all compared: any number of guesses per throttle window.
#[tokio::test]
async fn concurrent_logins_cannot_outrun_the_throttle() -> TestResult {
    let proxy = start(true, "").await?;
    let (cookie, csrf) = login_form(proxy.addr).await?;
    let body = common::form(&[("csrf", &csrf), ("token", "wrong-token-guess-0123456789")]);
    let (go, wait) = tokio::sync::watch::channel(false);
    let attempts: Vec<_> = (0..30)
        .map(|_| {
            tokio::spawn(held_back_login(
                proxy.addr,
                cookie.clone(),
                body.clone(),
                String::new(),
                wait.clone(),
            ))
        })
        .collect();
    // Every request's head is in before any body.
    tokio::time::sleep(Duration::from_millis(500)).await;
    go.send(true)?;
    let mut compared = 0;
    for attempt in attempts {
        match attempt.await?? {
            401 => compared += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        compared <= 10,
        "{compared} wrong tokens were compared in one throttle window (at most 10)"
    );
    Ok(())
}

/// Finding: the throttle counted failures per address, IPv6 ones included, so one client
/// with a /64 (any IPv6 host) had 2^64 addresses of 10 guesses each.
#[tokio::test]
async fn an_ipv6_prefix_is_throttled_as_one_client() -> TestResult {
    let proxy = start(true, "[proxy]\ntrusted_proxies = [\"127.0.0.1/32\"]\n").await?;
    let (cookie, csrf) = login_form(proxy.addr).await?;
    let attempt = |ip: String, token: &'static str| {
        let body = common::form(&[("csrf", &csrf), ("token", token)]).into_bytes();
        let (addr, cookie) = (proxy.addr, cookie.clone());
        async move {
            send(
                addr,
                Method::POST,
                "/console/login",
                &[("cookie", cookie.as_str()), ("x-forwarded-for", &ip)],
                Some(("application/x-www-form-urlencoded", body)),
            )
            .await
        }
    };
    let failures: Vec<_> = (1..=10)
        .map(|i| attempt(format!("2001:db8:1:2::{i:x}"), "wrong-token"))
        .collect();
    for result in futures_util::future::join_all(failures).await {
        assert_eq!(result?.status, StatusCode::UNAUTHORIZED);
    }
    // Another address of the same /64: throttled too.
    let page = attempt("2001:db8:1:2::ffff".into(), "wrong-token").await?;
    assert_eq!(page.status, StatusCode::TOO_MANY_REQUESTS);
    // Another /64, and IPv4 addresses, are their own clients.
    let page = attempt("2001:db8:1:3::1".into(), "wrong-token").await?;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    Ok(())
}

/// Finding: a second `tlp_console` cookie put before the session's (cookie tossing from a
/// sibling host or another port: `Path=/console/keys` sorts first) logged the admin out,
/// since only the first cookie of that name was read.
#[tokio::test]
async fn a_tossed_cookie_does_not_hide_the_session() -> TestResult {
    let proxy = start(true, "").await?;
    let console = Console::login(proxy.addr).await?;
    let cookie = format!("tlp_console=tossed; tlp_console={}", console.session);
    let page = send(
        proxy.addr,
        Method::GET,
        "/console/keys",
        &[("cookie", &cookie)],
        None,
    )
    .await?;
    assert_eq!(page.status, StatusCode::OK, "{:?}", page.location());
    // The same for the login form's double-submit cookie: a tossed one sent first does not
    // keep the admin from logging in.
    let (login_cookie, csrf) = login_form(proxy.addr).await?;
    let cookie = format!("tlp_console_login=tossed; {login_cookie}");
    let page = send(
        proxy.addr,
        Method::POST,
        "/console/login",
        &[("cookie", &cookie)],
        Some((
            "application/x-www-form-urlencoded",
            common::form(&[("csrf", &csrf), ("token", common::TOKEN)]).into_bytes(),
        )),
    )
    .await?;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    Ok(())
}

/// The process's peak resident memory, in KiB (Linux).
fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Finding: every console page that reads a JSON Lines audit log (the keys list, the landing
/// page, included) parsed its newest 64 MiB into JSON values all at once: about ten times
/// that in memory per page view (clients fill the log, refused requests included), and a
/// spend table of every model name a client ever sent.
#[tokio::test]
async fn a_full_audit_log_is_read_in_bounded_memory() -> TestResult {
    use std::io::Write as _;
    let proxy = start(true, "").await?;
    let console = Console::login(proxy.addr).await?;
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&proxy.audit)?);
        let mut written = 0u64;
        let mut i = 0u64;
        while written < example_proxy::console::MAX_JSONL_SCAN {
            let line = serde_json::json!({
                "request_id": format!("req-{i}"), "timestamp": "2026-12-04T00:00:00Z",
                "key": "seed", "model": format!("hostile-model-{i}"), "user": "u", "status": 200,
                "flags": ["a", "b", "c", "d"], "cost_usd": 0.001, "prompt_tokens": 1,
                "key_metadata": {"team": "x", "env": "y"},
            })
            .to_string();
            writeln!(file, "{line}")?;
            written += line.len() as u64 + 1;
            i += 1;
        }
        file.flush()?;
    }
    let before = peak_kib();
    for path in ["/console/keys", "/console/audit", "/console/spend"] {
        let page = console.get(path).await?;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        if path == "/console/spend" {
            let rows = page.body.matches("hostile-model-").count();
            assert!(rows <= 200, "{rows} model rows on the spend page");
        }
    }
    let grown = peak_kib().saturating_sub(before) / 1024;
    assert!(grown < 256, "reading the audit log took {grown} MiB more");
    Ok(())
}

/// What held when attacked (kept so that it keeps holding): path tricks reach neither the
/// admin API nor a panic, state changes need POST with a form and the CSRF token from this
/// site, neither a virtual key nor the admin token is a session, hostile audit records are
/// escaped, paging and ranges are bounded.
#[tokio::test]
async fn attacks_that_held() -> TestResult {
    let proxy = start(true, "").await?;
    let console = Console::login(proxy.addr).await?;
    let cookie = format!("tlp_console={}", console.session);
    for (path, status) in [
        ("/console/../admin/v1/keys", 404),
        ("/console/keys/%2e%2e", 404),
        ("/console/keys/%2e%2e/seed", 404),
        ("/console/keys/seed%2Fdelete", 404),
        ("/console/keys/%FF", 404),
        ("/console/audit/%FF%FE", 404),
        ("/console/assets/../keys", 404),
        ("/console/./keys", 404),
        ("/console/keys/seed/delete/x", 404),
        ("/console/audit?page=99999999999999999999", 400),
        ("/console/audit?page=-1", 400),
        ("/console/audit?status=99999", 400),
        ("/console/spend?days=1000000", 400),
        ("/console/spend?days=0", 400),
        ("/console/spend?days=-1", 400),
        ("/console/keys?after=%00", 200),
        ("/console/audit?key=%00&user=%0A", 200),
    ] {
        let page = send(proxy.addr, Method::GET, path, &[("cookie", &cookie)], None).await?;
        assert_eq!(page.status.as_u16(), status, "{path}");
    }
    // Not the console: the proxy's routes, which want a key.
    for path in ["/Console/keys", "//console/keys", "/console%2Fkeys"] {
        let page = send(proxy.addr, Method::GET, path, &[("cookie", &cookie)], None).await?;
        assert!(page.status.is_client_error(), "{path}: {}", page.status);
        assert!(!page.body.contains("LLM policy console"), "{path}");
    }
    // Other methods and method overrides change nothing.
    for method in [Method::PUT, Method::DELETE, Method::PATCH] {
        let page = send(
            proxy.addr,
            method.clone(),
            "/console/keys/seed/delete",
            &[("cookie", &cookie)],
            None,
        )
        .await?;
        assert_eq!(page.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
    }
    let page = console
        .post_raw(
            "/console/keys/seed/delete",
            "",
            &[("x-http-method-override", "DELETE")],
        )
        .await?;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    // Forms a cross-site page can send without a preflight, with the right token even.
    let token = format!("csrf={}", console.csrf);
    for content_type in ["text/plain", "multipart/form-data; boundary=x"] {
        let page = send(
            proxy.addr,
            Method::POST,
            "/console/keys/seed/disable",
            &[("cookie", &cookie)],
            Some((content_type, token.clone().into_bytes())),
        )
        .await?;
        assert_eq!(
            page.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type}"
        );
    }
    for header in [
        ("origin", "null"),
        ("referer", "http://evil.example/console/keys"),
        ("origin", "http://evil.example"),
    ] {
        let page = console
            .post_raw("/console/keys/seed/disable", &token, &[header])
            .await?;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{header:?}");
    }
    // A virtual key or the admin token as the session cookie; a virtual key as the token.
    for value in [common::SEED_KEY, common::TOKEN] {
        let page = send(
            proxy.addr,
            Method::GET,
            "/console/keys",
            &[("cookie", &format!("tlp_console={value}"))],
            None,
        )
        .await?;
        assert_eq!(page.status, StatusCode::SEE_OTHER);
    }
    let (login_cookie, csrf) = login_form(proxy.addr).await?;
    let page = send(
        proxy.addr,
        Method::POST,
        "/console/login",
        &[("cookie", &login_cookie)],
        Some((
            "application/x-www-form-urlencoded",
            common::form(&[("csrf", &csrf), ("token", common::SEED_KEY)]).into_bytes(),
        )),
    )
    .await?;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    // The page with a new key's secret is never stored, and sends no Referer elsewhere.
    let created = console.post("/console/keys", &[("name", "fresh")]).await?;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.headers["cache-control"], "no-store");
    assert_eq!(created.headers["referrer-policy"], "same-origin");
    // The seed key is still enabled: nothing above changed it.
    let page = console.get("/console/keys").await?;
    assert!(page.body.contains("badge on"), "{}", page.body);
    // Hostile audit records (their fields come from clients), and a half-written last line.
    let hostile = serde_json::json!({
        "request_id": "\"><script>alert(1)</script>", "timestamp": "2026-12-04T00:00:00Z",
        "key": "</title><script>alert(2)</script>", "model": "<svg onload=alert(3)>",
        "user": "\u{202e}evil\n'onmouseover='alert(4)", "flags": ["<b>"], "status": 200,
        "cost_usd": 1.5, "code": "x\" onclick=\"alert(5)",
    });
    std::fs::write(
        &proxy.audit,
        format!("{hostile}\n{{\"request_id\":\"partial"),
    )?;
    for path in [
        "/console/audit",
        "/console/audit?flagged=1",
        "/console/spend?days=366",
        "/console/keys",
        "/console/audit/%22%3E%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    ] {
        let page = console.get(path).await?;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        for raw in [
            "<script>alert",
            "<svg onload",
            "'onmouseover='",
            "\" onclick=\"",
            "<b>",
        ] {
            assert!(!page.body.contains(raw), "{path}: {raw} unescaped");
        }
        if path != "/console/keys" {
            assert!(
                page.body.contains("&lt;/title&gt;"),
                "{path}: the record is shown"
            );
        }
    }
    Ok(())
}

/// An upstream that answers every request with `body` (JSON).
async fn fake_upstream(body: String) -> Result<std::net::SocketAddr, common::Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let body = std::sync::Arc::new(body);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// Finding: the model picker listed every model id the upstream's `GET /v1/models` gave
/// (up to its 4 MiB): an upstream (or whatever answers as it) listing 200,000 models made
/// every key's page tens of megabytes.
#[tokio::test]
async fn a_huge_model_list_is_capped() -> TestResult {
    let ids: Vec<serde_json::Value> = (0..200_000)
        .map(|i| serde_json::json!({"id": format!("m{i}")}))
        .collect();
    let upstream = fake_upstream(serde_json::json!({"data": ids}).to_string()).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, common::config(upstream, dir.path(), true, ""))?;
    let args = example_proxy::app::Args {
        config: Some(path),
        listen: None,
        no_policy: false,
        migrate: false,
    };
    let env = |name: &str| match name {
        common::TOKEN_ENV => Some(common::TOKEN.to_owned()),
        "TEST_PROVIDER_KEY" => Some(common::PROVIDER_KEY.to_owned()),
        _ => None,
    };
    let proxy = example_proxy::app::Proxy::prepare(&args, env).await?;
    let addr = proxy.addr;
    tokio::spawn(proxy.run(std::future::pending()));
    let console = Console::login(addr).await?;
    let page = console.get("/console/new-key").await?;
    assert_eq!(page.status, StatusCode::OK);
    let choices = page.body.matches("name=\"model\" value=").count();
    assert!(choices > 0 && choices <= 2000, "{choices} model choices");
    assert!(page.body.len() < 1024 * 1024, "{} bytes", page.body.len());
    Ok(())
}

/// Finding (a wrong answer, no harm): a form whose body stalled was answered 413 "Form too
/// large" — every failure to read a form was taken for the size limit.
#[tokio::test]
async fn a_stalled_form_is_a_timeout_not_too_large() -> TestResult {
    let proxy = start(true, "[server]\nbody_read_timeout = \"1s\"\n").await?;
    let (cookie, csrf) = login_form(proxy.addr).await?;
    let body = common::form(&[("csrf", &csrf), ("token", "wrong-token")]);
    let (go, wait) = tokio::sync::watch::channel(false);
    // The body never comes (`go` is dropped): the server's body timeout ends it.
    drop(go);
    let status = tokio::time::timeout(
        Duration::from_secs(20),
        held_back_login(proxy.addr, cookie, body, String::new(), wait),
    )
    .await??;
    assert_eq!(status, 408);
    Ok(())
}

/// A `Write` into a shared buffer, for the tracing output.
#[derive(Clone, Default)]
struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What held: with every event logged (TRACE), no secret is in the logs — the admin token
/// (right and wrong logins), a new key's secret, the session id and CSRF token, the seed key
/// and the provider key.
#[tokio::test]
async fn no_secret_in_the_logs() -> TestResult {
    let out = Buffer::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let proxy = start(true, "").await?;
    let (cookie, csrf) = login_form(proxy.addr).await?;
    let wrong = "wrong-admin-token-that-must-not-be-logged";
    let page = send(
        proxy.addr,
        Method::POST,
        "/console/login",
        &[("cookie", &cookie)],
        Some((
            "application/x-www-form-urlencoded",
            common::form(&[("csrf", &csrf), ("token", wrong)]).into_bytes(),
        )),
    )
    .await?;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    let console = Console::login(proxy.addr).await?;
    let secret = console.create_key("logged", &[]).await?;
    assert_eq!(
        common::chat(proxy.addr, &secret, "gpt-4o-mini").await?.0,
        StatusCode::OK
    );
    assert_eq!(
        common::chat(proxy.addr, common::SEED_KEY, "gpt-4o-mini")
            .await?
            .0,
        StatusCode::OK
    );
    for path in ["/console/keys", "/console/audit", "/console/spend"] {
        console.get(path).await?;
    }
    console.post("/console/keys/logged/disable", &[]).await?;
    console.post("/console/logout", &[]).await?;
    let logs =
        String::from_utf8_lossy(&out.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(
        logs.contains("console: failed login"),
        "the logs were captured"
    );
    for hidden in [
        common::TOKEN,
        wrong,
        &secret,
        &console.session,
        &console.csrf,
        common::SEED_KEY,
        common::PROVIDER_KEY,
    ] {
        assert!(!logs.contains(hidden), "a secret in the logs:\n{logs}");
    }
    Ok(())
}
