//! The web console (`/console`) over plain HTTP: nothing without the admin login (a virtual
//! key, the admin token as a bearer or a forged cookie opens nothing), the cookie's
//! attributes, the CSRF token on every change, a key's secret shown once, every value
//! HTML-escaped, bad input a 4xx; and a change made on the console seen by the key's next
//! request, with the request then on the audit and spend pages. The same on PostgreSQL (keys
//! and audit in a real server the test starts).
//!
//! The browser test is `tests/console_e2e.rs`.

#[path = "common/console.rs"]
mod common;

#[path = "../../../tests/common/pg.rs"]
mod pg;

use std::time::{Duration, Instant};

use common::{chat, eventually, hidden, send, start, Console, TestResult, SEED_KEY, TOKEN};
use http::{Method, StatusCode};

/// Every page of the console, for a key named `seed`.
const PAGES: &[&str] = &[
    "/console",
    "/console/",
    "/console/keys",
    "/console/new-key",
    "/console/keys/seed",
    "/console/keys/seed/delete",
    "/console/audit",
    "/console/audit/some-id",
    "/console/spend",
    "/console/nothing-here",
];

#[tokio::test]
async fn no_console_page_without_the_admin_login() -> TestResult {
    let proxy = start(true, "").await?;
    let forged = format!("tlp_console={}", "ab".repeat(32));
    let virtual_key = format!("Bearer {SEED_KEY}");
    let admin_bearer = format!("Bearer {TOKEN}");
    let cases: [&[(&str, &str)]; 5] = [
        &[],
        &[("authorization", &virtual_key)],
        &[("authorization", &admin_bearer)],
        &[("cookie", &forged)],
        &[("cookie", "tlp_console=")],
    ];
    for headers in cases {
        for path in PAGES {
            let page = send(proxy.addr, Method::GET, path, headers, None).await?;
            assert_eq!(page.status, StatusCode::SEE_OTHER, "{path} {headers:?}");
            assert_eq!(page.location(), Some("/console/login"), "{path}");
        }
        for path in [
            "/console/keys",
            "/console/keys/seed",
            "/console/keys/seed/disable",
            "/console/keys/seed/delete",
            "/console/logout",
        ] {
            let page = send(
                proxy.addr,
                Method::POST,
                path,
                headers,
                Some((
                    "application/x-www-form-urlencoded",
                    b"name=x&csrf=x".to_vec(),
                )),
            )
            .await?;
            assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{path} {headers:?}");
            assert!(page.body.contains("Log in"), "{}", page.body);
        }
    }
    // Nothing changed: the seed key still works, and no key was created.
    assert_eq!(
        chat(proxy.addr, SEED_KEY, "gpt-4o-mini").await?.0,
        StatusCode::OK
    );
    let console = Console::login(proxy.addr).await?;
    let keys = console.get("/console/keys").await?;
    assert!(!keys.body.contains(">x<"), "{}", keys.body);

    // The admin API wants the admin token, not a virtual key, and not a console cookie.
    let session_cookie = format!("tlp_console={}", console.session);
    for headers in [
        vec![("authorization", virtual_key.as_str())],
        vec![("cookie", forged.as_str())],
        vec![("cookie", session_cookie.as_str())],
    ] {
        let page = send(proxy.addr, Method::GET, "/admin/v1/keys", &headers, None).await?;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED, "{headers:?}");
    }
    // A virtual key is not the admin token at the login either.
    let login = send(proxy.addr, Method::GET, "/console/login", &[], None).await?;
    let csrf = login.csrf().unwrap();
    let cookie = format!(
        "tlp_console_login={}",
        login.cookie_value("tlp_console_login").unwrap()
    );
    let answer = send(
        proxy.addr,
        Method::POST,
        "/console/login",
        &[("cookie", &cookie)],
        Some((
            "application/x-www-form-urlencoded",
            common::form(&[("csrf", &csrf), ("token", SEED_KEY)]).into_bytes(),
        )),
    )
    .await?;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(answer.set_cookie("tlp_console").is_none());
    Ok(())
}

#[tokio::test]
async fn the_login_sets_a_strict_http_only_cookie_and_failures_wait() -> TestResult {
    let proxy = start(true, "").await?;
    let login = send(proxy.addr, Method::GET, "/console/login", &[], None).await?;
    assert_eq!(login.status, StatusCode::OK);
    let csrf = login.csrf().unwrap();
    let cookie = format!(
        "tlp_console_login={}",
        login.cookie_value("tlp_console_login").unwrap()
    );
    let post = |token: &'static str,
                csrf: String,
                cookie: String,
                extra: Vec<(&'static str, &'static str)>| {
        let addr = proxy.addr;
        async move {
            let mut headers = vec![("cookie", cookie.as_str())];
            headers.extend(extra);
            send(
                addr,
                Method::POST,
                "/console/login",
                &headers,
                Some((
                    "application/x-www-form-urlencoded",
                    common::form(&[("csrf", &csrf), ("token", token)]).into_bytes(),
                )),
            )
            .await
        }
    };
    // A wrong token: 401 after a delay, no session.
    let started = Instant::now();
    let wrong = post(
        "not-the-admin-token-0123456789abcdef",
        csrf.clone(),
        cookie.clone(),
        vec![],
    )
    .await?;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(wrong.set_cookie("tlp_console").is_none());
    assert!(
        !wrong.body.contains("not-the-admin-token"),
        "the token is not echoed"
    );
    // No double-submit cookie, or another one: refused, even with the right token.
    let refused = post(TOKEN, csrf.clone(), String::new(), vec![]).await?;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let refused = post(
        TOKEN,
        csrf.clone(),
        "tlp_console_login=other".into(),
        vec![],
    )
    .await?;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    // From another site: refused.
    let refused = post(
        TOKEN,
        csrf.clone(),
        cookie.clone(),
        vec![("origin", "http://evil.example")],
    )
    .await?;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(refused.set_cookie("tlp_console").is_none());
    // The right token: a session cookie, HttpOnly, SameSite=Strict, Path=/console; not
    // Secure over plain HTTP, Secure when the request came over HTTPS.
    let ok = post(TOKEN, csrf.clone(), cookie.clone(), vec![]).await?;
    assert_eq!(ok.status, StatusCode::SEE_OTHER);
    assert_eq!(ok.location(), Some("/console/keys"));
    let set = ok.set_cookie("tlp_console").unwrap();
    assert!(set.contains("; HttpOnly"), "{set}");
    assert!(set.contains("; SameSite=Strict"), "{set}");
    assert!(set.contains("; Path=/console"), "{set}");
    assert!(!set.contains("Secure"), "{set}");
    assert_eq!(ok.cookie_value("tlp_console").unwrap().len(), 64);
    let tls = post(TOKEN, csrf, cookie, vec![("x-forwarded-proto", "https")]).await?;
    assert!(tls.set_cookie("tlp_console").unwrap().ends_with("; Secure"));
    // Two logins, two sessions.
    assert_ne!(
        ok.cookie_value("tlp_console"),
        tls.cookie_value("tlp_console")
    );
    Ok(())
}

#[tokio::test]
async fn logins_are_throttled_after_repeated_failures() -> TestResult {
    let proxy = start(true, "").await?;
    let login = send(proxy.addr, Method::GET, "/console/login", &[], None).await?;
    let csrf = login.csrf().unwrap();
    let cookie = format!(
        "tlp_console_login={}",
        login.cookie_value("tlp_console_login").unwrap()
    );
    let attempt = |token: &str| {
        let body = common::form(&[("csrf", &csrf), ("token", token)]).into_bytes();
        let (addr, cookie) = (proxy.addr, cookie.clone());
        async move {
            send(
                addr,
                Method::POST,
                "/console/login",
                &[("cookie", cookie.as_str())],
                Some(("application/x-www-form-urlencoded", body)),
            )
            .await
        }
    };
    // Ten failures (each waits a second) at once.
    let failures: Vec<_> = (0..10).map(|_| attempt("wrong-token")).collect();
    for result in futures_util::future::join_all(failures).await {
        assert_eq!(result?.status, StatusCode::UNAUTHORIZED);
    }
    // Then even the right token is refused from this address, for a while.
    let page = attempt(TOKEN).await?;
    assert_eq!(page.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(page.set_cookie("tlp_console").is_none());
    assert!(page.headers.contains_key("retry-after"));
    Ok(())
}

#[tokio::test]
async fn every_change_needs_the_session_csrf_token_from_this_site() -> TestResult {
    let proxy = start(true, "").await?;
    let console = Console::login(proxy.addr).await?;
    let other = Console::login(proxy.addr).await?;
    assert_ne!(console.csrf, other.csrf, "one token per session");
    let create = common::form(&[("name", "csrf-test")]);
    for (body, headers) in [
        (create.clone(), vec![]),
        (format!("{create}&csrf="), vec![]),
        (format!("{create}&csrf=0000"), vec![]),
        (format!("{create}&csrf={}", other.csrf), vec![]),
        (
            format!("{create}&csrf={}", console.csrf),
            vec![("origin", "http://evil.example")],
        ),
        (
            format!("{create}&csrf={}", console.csrf),
            vec![("referer", "http://evil.example/console/keys")],
        ),
        (
            format!("{create}&csrf={}", console.csrf),
            vec![("origin", "null")],
        ),
    ] {
        let page = console.post_raw("/console/keys", &body, &headers).await?;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{body} {headers:?}");
    }
    for action in ["disable", "delete"] {
        let page = console
            .post_raw(&format!("/console/keys/seed/{action}"), "csrf=wrong", &[])
            .await?;
        assert_eq!(page.status, StatusCode::FORBIDDEN);
    }
    let page = console.post_raw("/console/logout", "", &[]).await?;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    // Nothing happened.
    assert_eq!(
        chat(proxy.addr, SEED_KEY, "gpt-4o-mini").await?.0,
        StatusCode::OK
    );
    assert_eq!(
        console.get("/console/keys/csrf-test").await?.status,
        StatusCode::NOT_FOUND
    );
    // With the token (and this site as Origin): done.
    let origin = format!("http://{}", proxy.addr);
    let page = console
        .post_raw(
            "/console/keys",
            &format!("{create}&csrf={}", console.csrf),
            &[("origin", &origin)],
        )
        .await?;
    assert_eq!(page.status, StatusCode::CREATED, "{}", page.body);
    Ok(())
}

#[tokio::test]
async fn a_key_secret_is_shown_once_and_never_again() -> TestResult {
    let proxy = start(true, "").await?;
    let console = Console::login(proxy.addr).await?;
    let secret = console.create_key("once", &[]).await?;
    assert!(secret.starts_with("sk-tlp-"), "{secret}");
    assert_eq!(
        chat(proxy.addr, &secret, "gpt-4o-mini").await?.0,
        StatusCode::OK
    );
    eventually(Duration::from_secs(30), || async {
        Ok(console
            .get("/console/audit?key=once")
            .await?
            .body
            .contains("href=\"/console/audit/"))
    })
    .await?;
    let record_id = {
        let audit = console.get("/console/audit?key=once").await?;
        let marker = "href=\"/console/audit/";
        let start = audit.body.find(marker).ok_or("no row")? + marker.len();
        audit.body[start..start + audit.body[start..].find('"').unwrap()].to_owned()
    };
    for path in [
        "/console/keys".to_owned(),
        "/console/keys/once".to_owned(),
        "/console/keys/once/delete".to_owned(),
        "/console/audit".to_owned(),
        format!("/console/audit/{record_id}"),
        "/console/spend".to_owned(),
    ] {
        let page = console.get(&path).await?;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        for hidden in [secret.as_str(), SEED_KEY, TOKEN, common::PROVIDER_KEY] {
            assert!(!page.body.contains(hidden), "{path} shows a secret");
        }
    }
    // The configuration file keeps its digest only.
    let file = std::fs::read_to_string(proxy.dir.path().join("proxy.toml"))?;
    assert!(!file.contains(&secret));
    Ok(())
}

#[tokio::test]
async fn every_value_is_html_escaped() -> TestResult {
    let proxy = start(true, "").await?;
    let console = Console::login(proxy.addr).await?;
    let name = "<script>alert(1)</script>";
    let secret = console
        .create_key(
            name,
            &[
                ("team", "\"><img src=x onerror=alert(2)>"),
                ("metadata", "owner=<b>bold</b>"),
                ("model_extra", "<i>model</i>"),
                ("model_limits_enabled", "1"),
            ],
        )
        .await?;
    // A request with a hostile model name and user, recorded in the audit log.
    let body = serde_json::json!({"model": "<svg onload=alert(3)>", "user": "<u>me</u>",
        "messages": [{"role": "user", "content": "hi"}]});
    send(
        proxy.addr,
        Method::POST,
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {secret}"))],
        Some(("application/json", body.to_string().into_bytes())),
    )
    .await?;
    eventually(Duration::from_secs(30), || async {
        Ok(console
            .get("/console/audit")
            .await?
            .body
            .contains("&lt;svg"))
    })
    .await?;
    let key_url = "/console/keys/%3Cscript%3Ealert%281%29%3C%2Fscript%3E";
    let record = {
        let audit = console.get("/console/audit").await?;
        let marker = "href=\"/console/audit/";
        let start = audit.body.find(marker).ok_or("no row")? + marker.len();
        format!(
            "/console/audit/{}",
            &audit.body[start..start + audit.body[start..].find('"').unwrap()]
        )
    };
    for path in [
        "/console/keys",
        key_url,
        &format!("{key_url}/delete"),
        "/console/audit",
        &record,
        "/console/spend",
    ] {
        let page = console.get(path).await?;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        for raw in [
            "<script>alert",
            "<img src=x",
            "<b>bold",
            "<i>model",
            "<svg onload",
            "<u>me",
        ] {
            assert!(!page.body.contains(raw), "{path} has {raw} unescaped");
        }
    }
    let list = console.get("/console/keys").await?;
    assert!(
        list.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{}",
        list.body
    );
    let editor = console.get(key_url).await?;
    assert!(editor
        .body
        .contains("&quot;&gt;&lt;img src=x onerror=alert(2)&gt;"));
    assert!(editor.body.contains("owner=&lt;b&gt;bold&lt;/b&gt;"));
    // The only script is the console's own file: no inline script at all.
    for path in ["/console/keys", key_url, "/console/audit", "/console/spend"] {
        let page = console.get(path).await?;
        assert_eq!(page.body.matches("<script").count(), 1, "{path}");
        assert!(page
            .body
            .contains("<script src=\"/console/assets/console.js\" defer></script>"));
    }
    Ok(())
}

#[tokio::test]
async fn pages_are_sent_with_strict_headers() -> TestResult {
    let proxy = start(true, "").await?;
    let console = Console::login(proxy.addr).await?;
    for path in [
        "/console/keys",
        "/console/audit",
        "/console/spend",
        "/console/new-key",
    ] {
        let page = console.get(path).await?;
        let header = |name: &str| {
            page.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let csp = header("content-security-policy");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{csp}"
        );
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("cache-control"), "no-store");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert!(header("content-type").starts_with("text/html"));
    }
    let login = send(proxy.addr, Method::GET, "/console/login", &[], None).await?;
    assert_eq!(login.headers["cache-control"], "no-store");
    // The assets are embedded, served to anyone (the login page needs them).
    for (path, kind) in [
        ("/console/assets/console.css", "text/css"),
        ("/console/assets/console.js", "text/javascript"),
    ] {
        let asset = send(proxy.addr, Method::GET, path, &[], None).await?;
        assert_eq!(asset.status, StatusCode::OK);
        assert!(asset.headers["content-type"].to_str()?.starts_with(kind));
        assert!(asset.body.len() > 500);
    }
    Ok(())
}

#[tokio::test]
async fn bad_input_is_a_4xx_never_a_5xx() -> TestResult {
    let proxy = start(true, "").await?;
    let console = Console::login(proxy.addr).await?;
    let csrf = format!("csrf={}", console.csrf);
    let huge = format!("{csrf}&name=big&metadata={}", "a".repeat(100 * 1024));
    let cases: Vec<(String, StatusCode)> = vec![
        (huge, StatusCode::PAYLOAD_TOO_LARGE),
        (format!("{csrf}&name=%zz"), StatusCode::BAD_REQUEST),
        (format!("{csrf}&name=x%ff"), StatusCode::BAD_REQUEST),
        (format!("{csrf}&name=n&rpm=abc"), StatusCode::BAD_REQUEST),
        (format!("{csrf}&name=n&rpm=-1"), StatusCode::BAD_REQUEST),
        (
            format!("{csrf}&name=n&credit_limit_usd=NaN"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{csrf}&name=n&feature=teleport"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{csrf}&name=n&allow_ips=not-an-ip"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{csrf}&name=n&expires_at=tomorrow"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{csrf}&name=n&budget_period=weekly"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{csrf}&name=n&guard=unknown"),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!("{csrf}&name=n&metadata=no-equals-sign"),
            StatusCode::BAD_REQUEST,
        ),
        (format!("{csrf}&name=team%3Ax"), StatusCode::BAD_REQUEST),
        (format!("{csrf}&name=a%0Ab"), StatusCode::BAD_REQUEST),
        (format!("{csrf}&name=seed"), StatusCode::CONFLICT),
        (csrf.clone(), StatusCode::BAD_REQUEST),
    ];
    for (body, status) in cases {
        let page = console.post_raw("/console/keys", &body, &[]).await?;
        assert_eq!(page.status, status, "{}", &body[..body.len().min(80)]);
        assert!(page.headers["content-type"]
            .to_str()?
            .starts_with("text/html"));
    }
    // Not a form.
    let page = send(
        proxy.addr,
        Method::POST,
        "/console/keys",
        &[("cookie", &format!("tlp_console={}", console.session))],
        Some((
            "application/json",
            format!("{{\"csrf\":\"{}\"}}", console.csrf).into_bytes(),
        )),
    )
    .await?;
    assert_eq!(page.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Saving a key with a bad value leaves it as it was.
    let page = console
        .post("/console/keys/seed", &[("tpm", "lots")])
        .await?;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("tpm"), "the page names the field");
    // Unknown keys, pages and methods.
    assert_eq!(
        console.get("/console/keys/nobody").await?.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        console.post("/console/keys/nobody", &[]).await?.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        console
            .post("/console/keys/nobody/delete", &[])
            .await?
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        console.get("/console/keys/%zz").await?.status,
        StatusCode::NOT_FOUND
    );
    for path in [
        "/console/audit?status=abc",
        "/console/audit?page=-1",
        "/console/audit?page=99999999999999999999",
        "/console/spend?days=0",
        "/console/spend?days=9999",
    ] {
        assert_eq!(
            console.get(path).await?.status,
            StatusCode::BAD_REQUEST,
            "{path}"
        );
    }
    let put = send(
        proxy.addr,
        Method::PUT,
        "/console/keys",
        &[("cookie", &format!("tlp_console={}", console.session))],
        None,
    )
    .await?;
    assert_eq!(put.status, StatusCode::METHOD_NOT_ALLOWED);
    // The proxy still serves.
    assert_eq!(
        chat(proxy.addr, SEED_KEY, "gpt-4o-mini").await?.0,
        StatusCode::OK
    );
    Ok(())
}

#[tokio::test]
async fn logout_ends_the_session() -> TestResult {
    let proxy = start(true, "").await?;
    let console = Console::login(proxy.addr).await?;
    let page = console.post("/console/logout", &[]).await?;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location(), Some("/console/login"));
    assert!(page
        .set_cookie("tlp_console")
        .unwrap()
        .contains("Max-Age=0"));
    let after = console.get("/console/keys").await?;
    assert_eq!(after.status, StatusCode::SEE_OTHER);
    assert_eq!(after.location(), Some("/console/login"));
    Ok(())
}

#[tokio::test]
async fn the_console_is_off_without_admin_or_when_turned_off() -> TestResult {
    for admin in [false, true] {
        let proxy = start(admin, "").await?;
        let page = send(proxy.addr, Method::GET, "/console/login", &[], None).await?;
        if admin {
            assert_eq!(page.status, StatusCode::OK);
        } else {
            // Not the console: the policy stack's answer (no key).
            assert_eq!(page.status, StatusCode::UNAUTHORIZED);
            assert!(!page.body.contains("<html"), "{}", page.body);
        }
    }
    // `[admin] console = false`: the admin API alone.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (mock, _) = example_proxy::mock::spawn(example_proxy::mock::MockOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let config = common::config(mock, dir.path(), true, "")
        .replace("[admin]\n", "[admin]\nconsole = false\n");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config)?;
    let args = example_proxy::app::Args {
        config: Some(path),
        listen: None,
        no_policy: false,
        migrate: false,
    };
    let proxy = example_proxy::app::Proxy::prepare(&args, |name: &str| {
        (name == common::TOKEN_ENV).then(|| TOKEN.to_owned())
    })
    .await?;
    let addr = proxy.addr;
    tokio::spawn(proxy.run(std::future::pending()));
    let page = send(addr, Method::GET, "/console/login", &[], None).await?;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    let admin = send(
        addr,
        Method::GET,
        "/admin/v1/keys",
        &[("authorization", &format!("Bearer {TOKEN}"))],
        None,
    )
    .await?;
    assert_eq!(admin.status, StatusCode::OK);
    Ok(())
}

/// The story of the issue on the file store and the JSON Lines log: a key created and
/// restricted on the console, its next request refused, and both requests on the audit and
/// spend pages.
#[tokio::test]
async fn a_change_on_the_console_applies_to_the_next_request_and_shows_in_the_logs() -> TestResult {
    let proxy = start(true, "").await?;
    story(&Console::login(proxy.addr).await?, proxy.addr).await
}

async fn story(console: &Console, addr: std::net::SocketAddr) -> TestResult {
    let secret = console.create_key("story", &[]).await?;
    assert_eq!(chat(addr, &secret, "gpt-4o").await?.0, StatusCode::OK);
    // The editor lists the upstream's models to pick from.
    let editor = console.get("/console/keys/story").await?;
    assert!(editor
        .body
        .contains("takes effect on the key&#39;s next request"));
    for model in example_proxy::mock::MODELS {
        assert!(
            editor.body.contains(&format!("value=\"{model}\"")),
            "{model}"
        );
    }
    let page = console
        .post(
            "/console/keys/story",
            &[
                ("model_limits_enabled", "1"),
                ("model", "gpt-4o-mini"),
                ("rpm", "100"),
                ("feature", "images"),
                ("feature", "audio_speech"),
                ("allow_ips", "127.0.0.1\n::1"),
                ("credit_limit_usd", "5"),
                ("budget_period", "monthly"),
                ("expires_at", "2099-01-01T00:00"),
                ("metadata", "owner=alice"),
            ],
        )
        .await?;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let editor = console.get(page.location().unwrap()).await?;
    assert!(
        editor.body.contains("Saved. A change takes effect"),
        "{}",
        editor.body
    );
    assert!(editor.body.contains("value=\"2099-01-01T00:00:00\""));
    // The next request: refused for the other model, served for the chosen one.
    let (status, body) = chat(addr, &secret, "gpt-4o").await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["code"], "model_not_allowed");
    assert_eq!(chat(addr, &secret, "gpt-4o-mini").await?.0, StatusCode::OK);
    // The audit page marks the refused request.
    let waited = eventually(Duration::from_secs(30), || async {
        let page = console.get("/console/audit?key=story&blocked=1").await?;
        Ok(page.body.contains("<tr class=\"blocked") && page.body.contains("model_not_allowed"))
    })
    .await;
    if waited.is_err() {
        let page = console.get("/console/audit?key=story&blocked=1").await?;
        panic!("no blocked row: {}", page.body);
    }
    let page = console.get("/console/audit?key=story&status=200").await?;
    assert!(!page.body.contains("<tr class=\"blocked"));
    // Spend: a bar for the key, totals per model.
    let waited = eventually(Duration::from_secs(30), || async {
        let page = console.get("/console/spend?days=7").await?;
        Ok(page.body.contains("data-key=\"story\"")
            && page.body.contains("<th scope=\"row\">gpt-4o-mini</th>"))
    })
    .await;
    if waited.is_err() {
        let page = console.get("/console/spend").await?;
        let audit = console.get("/console/audit?key=story").await?;
        panic!("no bar: {}\n\n{}", page.body, audit.body);
    }
    let list = console.get("/console/keys").await?;
    assert!(list.body.contains("of $5.00"), "{}", list.body);
    assert!(!list.body.contains("unavailable"), "{}", list.body);
    // Served but flagged (no price for its model): marked flagged, not blocked.
    let other = console.create_key("flagged", &[]).await?;
    assert_eq!(
        chat(addr, &other, "unpriced-model-x").await?.0,
        StatusCode::OK
    );
    let waited = eventually(Duration::from_secs(30), || async {
        let page = console.get("/console/audit?flagged=1&key=flagged").await?;
        Ok(page.body.contains("<tr class=\"flagged\"") && page.body.contains("unknown_price"))
    })
    .await;
    if waited.is_err() {
        let page = console.get("/console/audit?key=flagged").await?;
        panic!("no flagged row: {}", page.body);
    }
    // Refused requests are not "flagged" for their `blocked` flag alone.
    let page = console.get("/console/audit?flagged=1&key=story").await?;
    assert!(!page.body.contains("<tr class"), "{}", page.body);
    // Disable, enable, delete.
    assert_eq!(
        console
            .post("/console/keys/story/disable", &[])
            .await?
            .status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        chat(addr, &secret, "gpt-4o-mini").await?.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        console
            .post("/console/keys/story/enable", &[])
            .await?
            .status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(chat(addr, &secret, "gpt-4o-mini").await?.0, StatusCode::OK);
    let confirm = console.get("/console/keys/story/delete").await?;
    assert_eq!(
        hidden(&confirm.body, "csrf").as_deref(),
        Some(console.csrf.as_str())
    );
    let deleted = console.post("/console/keys/story/delete", &[]).await?;
    assert_eq!(deleted.location(), Some("/console/keys?deleted=story"));
    // A key may be named like a page.
    console.create_key("new", &[]).await?;
    let editor = console.get("/console/keys/new").await?;
    assert!(editor.body.contains("<h1>Key new</h1>"), "{}", editor.body);
    assert_eq!(
        chat(addr, &secret, "gpt-4o-mini").await?.0,
        StatusCode::UNAUTHORIZED
    );
    Ok(())
}

/// The same story with the keys and the audit log in PostgreSQL.
#[tokio::test]
async fn the_console_works_on_postgres_keys_and_audit() -> TestResult {
    let server = pg::PgServer::start();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (mock, _) = example_proxy::mock::spawn(example_proxy::mock::MockOptions::default()).await?;
    let dir = tempfile::tempdir()?;
    let config = format!(
        "listen = \"127.0.0.1:0\"\n\n[upstream]\nbase_url = \"http://{mock}/v1\"\n\n\
         [admin]\ntoken_env = \"{}\"\n\n[store]\npostgres_url = \"{url}\"\n\n[audit]\npostgres_url = \"{url}\"\n",
        common::TOKEN_ENV,
        url = server.url()
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config)?;
    let args = example_proxy::app::Args {
        config: Some(path),
        listen: None,
        no_policy: false,
        migrate: true,
    };
    let proxy = example_proxy::app::Proxy::prepare(&args, |name: &str| {
        (name == common::TOKEN_ENV).then(|| TOKEN.to_owned())
    })
    .await?;
    let addr = proxy.addr;
    tokio::spawn(proxy.run(std::future::pending()));
    let console = Console::login(addr).await?;
    story(&console, addr).await?;
    // The audit database is what the pages read.
    let audit = console.get("/console/audit").await?;
    assert!(audit.body.contains("the audit database"), "{}", audit.body);
    Ok(())
}

/// A key's guard policies are toggles of the configured `[[guards]]`; a guard's finding in
/// audit mode shows as a flagged (not blocked) row.
#[tokio::test]
async fn guard_policies_are_toggles_and_their_findings_are_flagged() -> TestResult {
    let proxy = start(
        true,
        "[[guards]]\nname = \"pii\"\nkind = \"pii\"\nmode = \"audit\"\nworkspace = false\n",
    )
    .await?;
    let console = Console::login(proxy.addr).await?;
    let secret = console.create_key("guarded", &[]).await?;
    let editor = console.get("/console/keys/guarded").await?;
    assert!(
        editor.body.contains("name=\"guard\" value=\"pii\">"),
        "an unchecked toggle: {}",
        editor.body
    );
    let page = console
        .post("/console/keys/guarded", &[("guard", "pii")])
        .await?;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let editor = console.get("/console/keys/guarded").await?;
    assert!(editor
        .body
        .contains("name=\"guard\" value=\"pii\" checked>"));
    // A guard that is not configured is refused.
    let page = console
        .post("/console/keys/guarded", &[("guard", "nope")])
        .await?;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    // The key's next request is guarded: an e-mail address is flagged, and forwarded.
    let body = serde_json::json!({"model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "write to alice@example.com"}]});
    let answer = send(
        proxy.addr,
        Method::POST,
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {secret}"))],
        Some(("application/json", body.to_string().into_bytes())),
    )
    .await?;
    assert_eq!(answer.status, StatusCode::OK);
    let waited = eventually(Duration::from_secs(30), || async {
        let page = console.get("/console/audit?key=guarded&flagged=1").await?;
        Ok(page.body.contains("<tr class=\"flagged\"") && page.body.contains("guard:pii"))
    })
    .await;
    if waited.is_err() {
        let page = console.get("/console/audit?key=guarded").await?;
        panic!("no flagged row: {}", page.body);
    }
    Ok(())
}
