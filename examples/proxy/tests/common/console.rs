//! What the console tests share: a proxy (in-process) in front of the mock upstream with
//! `[admin]` and a JSON Lines audit log, plain HTTP calls that keep their own cookies, and a
//! logged-in console session.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use example_proxy::{app, mock};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The variable `[admin] token_env` names.
pub const TOKEN_ENV: &str = "TEST_ADMIN_TOKEN";
/// The admin token.
pub const TOKEN: &str = "admin-token-for-the-console-tests-0123456789";
/// The configuration file's own key.
pub const SEED_KEY: &str = "sk-seed-key-of-the-console-tests";
/// The provider key the proxy sends upstream.
pub const PROVIDER_KEY: &str = "sk-provider-key-of-the-console-tests";

/// A running proxy and what it was started with.
pub struct Proxy {
    pub addr: SocketAddr,
    pub mock: SocketAddr,
    pub audit: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// The configuration: the mock upstream, the admin token, the audit log in `dir`, the seed
/// key, and `tail` at the end.
pub fn config(mock: SocketAddr, dir: &std::path::Path, admin: bool, tail: &str) -> String {
    let admin = if admin {
        format!("[admin]\ntoken_env = \"{TOKEN_ENV}\"\n")
    } else {
        String::new()
    };
    format!(
        r#"listen = "127.0.0.1:0"

[upstream]
base_url = "http://{mock}/v1"
api_key_env = "TEST_PROVIDER_KEY"

{admin}
[audit]
jsonl = "{audit}"

{tail}

[[keys]]
name = "seed"
secret = "{SEED_KEY}"
"#,
        audit = dir.join("audit.jsonl").display(),
    )
}

/// Starts the mock and a proxy on `config(..)`.
pub async fn start(admin: bool, tail: &str) -> Result<Proxy, Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (mock, _log) = mock::spawn(mock::MockOptions::default().record(false)).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config(mock, dir.path(), admin, tail))?;
    let args = app::Args {
        config: Some(path),
        listen: None,
        no_policy: false,
        migrate: false,
    };
    let env = |name: &str| match name {
        TOKEN_ENV => Some(TOKEN.to_owned()),
        "TEST_PROVIDER_KEY" => Some(PROVIDER_KEY.to_owned()),
        _ => None,
    };
    let proxy = app::Proxy::prepare(&args, env).await?;
    let addr = proxy.addr;
    tokio::spawn(proxy.run(std::future::pending()));
    Ok(Proxy {
        addr,
        mock,
        audit: dir.path().join("audit.jsonl"),
        dir,
    })
}

/// An answer: status, headers, body as text.
#[derive(Debug)]
pub struct Page {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Page {
    /// The `Location` header.
    pub fn location(&self) -> Option<&str> {
        self.headers.get("location").and_then(|v| v.to_str().ok())
    }

    /// The `Set-Cookie` header that sets `name`, whole.
    pub fn set_cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with(&format!("{name}=")))
            .map(str::to_owned)
    }

    /// The value the cookie `name` is set to.
    pub fn cookie_value(&self, name: &str) -> Option<String> {
        let whole = self.set_cookie(name)?;
        let value = whole.split(';').next()?.split_once('=')?.1;
        Some(value.to_owned())
    }

    /// The value of the first hidden `csrf` field.
    pub fn csrf(&self) -> Option<String> {
        hidden(&self.body, "csrf")
    }
}

/// The value of the first `<input ... name="<name>" value="...">` of `html`.
pub fn hidden(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')?;
    Some(html[start..start + end].to_owned())
}

/// `application/x-www-form-urlencoded` of `fields`.
pub fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One request: `headers` as given, `body` with its content type.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, Vec<u8>)>,
) -> Result<Page, Error> {
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let bytes = match body {
        Some((content_type, bytes)) => {
            req = req.header("content-type", content_type);
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    let response = tokio::time::timeout(
        Duration::from_secs(60),
        http.request(req.body(Full::new(bytes))?),
    )
    .await??;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Page {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A logged-in console session.
pub struct Console {
    pub addr: SocketAddr,
    /// The session cookie's value.
    pub session: String,
    /// The session's CSRF token.
    pub csrf: String,
}

impl Console {
    /// Logs in with the admin token, as a browser would: the login page (its double-submit
    /// cookie and field), the form, the session cookie.
    pub async fn login(addr: SocketAddr) -> Result<Console, Error> {
        let page = send(addr, Method::GET, "/console/login", &[], None).await?;
        assert_eq!(page.status, StatusCode::OK, "{}", page.body);
        let login_cookie = page
            .cookie_value("tlp_console_login")
            .ok_or("no login cookie")?;
        let csrf = page.csrf().ok_or("no login csrf")?;
        let cookie = format!("tlp_console_login={login_cookie}");
        let answer = send(
            addr,
            Method::POST,
            "/console/login",
            &[("cookie", &cookie)],
            Some((
                "application/x-www-form-urlencoded",
                form(&[("csrf", &csrf), ("token", TOKEN)]).into_bytes(),
            )),
        )
        .await?;
        assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
        let session = answer.cookie_value("tlp_console").ok_or("no session")?;
        let keys = send(
            addr,
            Method::GET,
            "/console/keys",
            &[("cookie", &format!("tlp_console={session}"))],
            None,
        )
        .await?;
        assert_eq!(keys.status, StatusCode::OK, "{}", keys.body);
        let csrf = keys.csrf().ok_or("no csrf on the keys page")?;
        Ok(Console {
            addr,
            session,
            csrf,
        })
    }

    fn cookie(&self) -> String {
        format!("tlp_console={}", self.session)
    }

    /// `GET path` with the session.
    pub async fn get(&self, path: &str) -> Result<Page, Error> {
        send(
            self.addr,
            Method::GET,
            path,
            &[("cookie", &self.cookie())],
            None,
        )
        .await
    }

    /// `POST path` with the session, `fields` and the CSRF token.
    pub async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Result<Page, Error> {
        let mut all = vec![("csrf", self.csrf.as_str())];
        all.extend_from_slice(fields);
        self.post_raw(path, &form(&all), &[]).await
    }

    /// `POST path` with the session and `body` as a form, nothing added.
    pub async fn post_raw(
        &self,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Result<Page, Error> {
        let cookie = self.cookie();
        let mut all = vec![("cookie", cookie.as_str())];
        all.extend_from_slice(headers);
        send(
            self.addr,
            Method::POST,
            path,
            &all,
            Some((
                "application/x-www-form-urlencoded",
                body.as_bytes().to_vec(),
            )),
        )
        .await
    }

    /// Creates a key named `name` with `fields`: its secret.
    pub async fn create_key(&self, name: &str, fields: &[(&str, &str)]) -> Result<String, Error> {
        let mut all = vec![("name", name)];
        all.extend_from_slice(fields);
        let page = self.post("/console/keys", &all).await?;
        assert_eq!(page.status, StatusCode::CREATED, "{}", page.body);
        let marker = "id=\"secret\" readonly value=\"";
        let start = page.body.find(marker).ok_or("no secret shown")? + marker.len();
        let end = page.body[start..].find('"').ok_or("no secret end")?;
        Ok(page.body[start..start + end].to_owned())
    }
}

/// A chat completion through the proxy with `key`: status and JSON answer.
pub async fn chat(
    addr: SocketAddr,
    key: &str,
    model: &str,
) -> Result<(StatusCode, serde_json::Value), Error> {
    let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let page = send(
        addr,
        Method::POST,
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {key}"))],
        Some(("application/json", body.to_string().into_bytes())),
    )
    .await?;
    Ok((
        page.status,
        serde_json::from_str(&page.body).unwrap_or_default(),
    ))
}

/// Polls `check` every 100 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> Result<(), Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, Error>>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the condition did not hold in time".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
