//! The web console, `/console`: the keys (a type-to-filter model picker, every policy field),
//! the audit log (blocked and flagged requests marked) and spend charts, for whoever logs in
//! with the admin token. Served when `[admin]` is configured (`[admin] console = false` turns
//! it off), on top of the admin API's [`Admin`] state: the same keys, through the same
//! [`KeyAdmin`](tower_llm_policy::keys::KeyAdmin), whatever the store (the configuration file
//! or PostgreSQL).
//!
//! | page | what |
//! |---|---|
//! | `GET /console/login`, `POST /console/login` | the admin token in, a session cookie out |
//! | `POST /console/logout` | ends the session |
//! | `GET /console/keys` | name, enabled, models, spend this period, last used |
//! | `GET /console/new-key`, `POST /console/keys` | a new key; its secret shown this once |
//! | `GET /console/keys/<name>`, `POST /console/keys/<name>` | every policy field |
//! | `POST /console/keys/<name>/disable`, `.../enable` | |
//! | `GET /console/keys/<name>/delete`, `POST` the same | asks, then deletes |
//! | `GET /console/audit?key=&model=&status=&user=&blocked=1&flagged=1&page=` | the records, newest first |
//! | `GET /console/audit/<request_id>` | one whole record |
//! | `GET /console/spend?days=30` | spend per key per day (a chart), totals per model |
//! | `GET /console/assets/{console.css,console.js,icon.svg}` | embedded in the binary: no CDN |
//!
//! Security:
//! - **Login** with the admin token, compared by digest (constant time); a failure is
//!   answered after 1 second, and after 10 failures from one address (an IPv6 address's
//!   /64 counts as one) in 5 minutes its logins are refused (429) until those 5 minutes end.
//!   An attempt is counted before its token is compared, so logins sent at once cannot
//!   outrun the count; with 4096 addresses counted in their 5 minutes, new addresses are
//!   refused until one's 5 minutes end. The login form itself is protected by a
//!   double-submit cookie (any of the request's cookies of that name may match).
//! - **Sessions**: 256 random bits in the cookie `tlp_console` (`HttpOnly`, `SameSite=Strict`,
//!   `Path=/console`, `Secure` with `[admin] console_secure_cookie` or a request that came
//!   over HTTPS according to `X-Forwarded-Proto`/`Forwarded`), kept on the server as a
//!   digest; they end after 30 minutes idle, 12 hours in all, or at logout. Every cookie of
//!   that name a request carries is tried: one tossed in by another host or port, sent
//!   first, does not hide the session. Nothing else opens the console: an `Authorization`
//!   header (a virtual key, the admin token) is ignored, and a page without a live session
//!   redirects to the login.
//! - **CSRF**: every `POST` carries the session's token in a hidden field (compared in
//!   constant time), and its `Origin` or `Referer`, when present, must be this host.
//! - **Output**: every value is HTML-escaped (one escaping helper, `html::esc`); a key's
//!   secret appears only on the page that answers its creation; the Content-Security-Policy
//!   allows no inline script or style; `X-Frame-Options: DENY`; `Cache-Control: no-store`.
//! - **Input**: forms are `application/x-www-form-urlencoded`, 64 KiB at most (413), whole
//!   (408 when the server cut the body off); a field that cannot be read is a 400 page
//!   naming it.
//! - **Reading**: a JSON Lines audit log is read one record at a time (two logs read at
//!   once at most); the model picker lists 2000 models at most, the spend page 200.

mod audit;
mod data;
pub(crate) mod html;
mod keys;
pub(crate) mod session;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::Service;
use tower_llm_policy::{ClientIp, PolicyBody};

use crate::admin::{percent_decode, Admin, BoxedResponse};
use crate::stack::{ProxyBody, ProxyService};

pub use data::{AuditSource, Models, MAX_JSONL_SCAN};
use html::{esc, Nav};
use session::{Sessions, Throttle};

/// The longest form a console page accepts: 64 KiB.
pub const MAX_FORM_BYTES: usize = 64 * 1024;

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");
const ICON: &str = include_str!("assets/icon.svg");

/// The console's state: the admin API's [`Admin`] (keys and admin token), where the audit
/// records and the model list come from, and the sessions.
#[derive(Debug)]
pub struct Console {
    admin: Arc<Admin>,
    models: Models,
    audit: AuditSource,
    secure_cookie: bool,
    sessions: Sessions,
    throttle: Throttle,
}

impl Console {
    /// The console over `admin`'s keys, with `models` for the model picker and `audit` for
    /// the audit and spend pages.
    pub fn new(admin: Arc<Admin>, models: Models, audit: AuditSource) -> Self {
        Console {
            admin,
            models,
            audit,
            secure_cookie: false,
            sessions: Sessions::default(),
            throttle: Throttle::default(),
        }
    }

    /// Marks the cookies `Secure` whatever the request says (`[admin]
    /// console_secure_cookie`: the console is served over HTTPS by a proxy in front).
    #[must_use]
    pub fn secure_cookie(mut self, secure: bool) -> Self {
        self.secure_cookie = secure;
        self
    }
}

/// `stack`, with `/console` and `/console/...` answered by `console` instead.
pub fn route(stack: ProxyService, console: Arc<Console>) -> ProxyService {
    ProxyService::new(WithConsole { stack, console })
}

#[derive(Clone)]
struct WithConsole {
    stack: ProxyService,
    console: Arc<Console>,
}

impl Service<Request<PolicyBody>> for WithConsole {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxedResponse;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, req: Request<PolicyBody>) -> Self::Future {
        let path = req.uri().path();
        if path == "/console" || path.starts_with("/console/") {
            let console = self.console.clone();
            return Box::pin(async move { Ok(handle(&console, req).await) });
        }
        self.stack.call(req)
    }
}

/// A logged-in request: the session's id and CSRF token.
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) csrf: String,
}

/// A form's fields, decoded, in order.
#[derive(Default)]
pub(crate) struct Form(Vec<(String, String)>);

/// The fields' names only: a form's values include the admin token (the login) and the
/// CSRF token.
impl std::fmt::Debug for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

impl Form {
    /// The first value of `name`, trimmed; `None` when absent or blank.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// Every non-blank value of `name`.
    pub(crate) fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
            .collect()
    }

    /// Whether the checkbox `name` is checked.
    pub(crate) fn checked(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn parse(body: &[u8]) -> Option<Form> {
        let text = std::str::from_utf8(body).ok()?;
        text.split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                Some((percent_decode(k, true)?, percent_decode(v, true)?))
            })
            .collect::<Option<Vec<_>>>()
            .map(Form)
    }
}

fn client_ip(req: &Request<PolicyBody>) -> IpAddr {
    req.extensions()
        .get::<ClientIp>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |ip| ip.0)
}

/// Whether the request came over HTTPS (a TLS terminator in front says so). The header can
/// only add `Secure` to a cookie, never take it away: trusting it weakens nothing.
fn came_over_https(req: &Request<PolicyBody>) -> bool {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    header("x-forwarded-proto").is_some_and(|v| v.trim() == "https")
        || header("forwarded").is_some_and(|v| v.contains("proto=https"))
        || req.uri().scheme_str() == Some("https")
}

/// Whether `Origin` and `Referer`, those present, name this host.
fn same_origin(req: &Request<PolicyBody>) -> bool {
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
    else {
        return false;
    };
    let matches = |url: &str, whole: bool| {
        ["http://", "https://"].iter().any(|scheme| {
            url.strip_prefix(scheme)
                .and_then(|rest| rest.strip_prefix(host))
                .is_some_and(|rest| {
                    if whole {
                        rest.is_empty()
                    } else {
                        rest.is_empty() || rest.starts_with('/')
                    }
                })
        })
    };
    let origin_ok = match req.headers().get(header::ORIGIN) {
        None => true,
        Some(value) => value.to_str().is_ok_and(|v| matches(v, true)),
    };
    let referer_ok = match req.headers().get(header::REFERER) {
        None => true,
        Some(value) => value.to_str().is_ok_and(|v| matches(v, false)),
    };
    origin_ok && referer_ok
}

/// Reads a POSTed form: 415 when it is not a urlencoded form, 413 over
/// [`MAX_FORM_BYTES`], 400 when it cannot be decoded.
async fn read_form(req: Request<PolicyBody>) -> Result<Form, Response<ProxyBody>> {
    let urlencoded = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !urlencoded {
        return Err(html::message(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Not a form",
            "The console takes forms (application/x-www-form-urlencoded) only.",
            ("/console/keys", "Back to the keys"),
            Nav::None,
            None,
        ));
    }
    let too_large = || {
        html::message(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Form too large",
            "A console form is 64 KiB at most.",
            ("/console/keys", "Back to the keys"),
            Nav::None,
            None,
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_FORM_BYTES as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                return too_large();
            }
            // The server cut the body off (it stalled, or took too long), or the client left.
            let mut response = html::message(
                StatusCode::REQUEST_TIMEOUT,
                "Form not received",
                "The form did not arrive whole: try again.",
                ("/console/keys", "Back to the keys"),
                Nav::None,
                None,
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        })?
        .to_bytes();
    Form::parse(&body).ok_or_else(|| {
        html::message(
            StatusCode::BAD_REQUEST,
            "Unreadable form",
            "The form could not be decoded.",
            ("/console/keys", "Back to the keys"),
            Nav::None,
            None,
        )
    })
}

fn method_not_allowed() -> Response<ProxyBody> {
    html::message(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
        "This console page does not take this method.",
        ("/console/keys", "Back to the keys"),
        Nav::None,
        None,
    )
}

fn not_found(session: &Session) -> Response<ProxyBody> {
    html::message(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no console page here.",
        ("/console/keys", "Back to the keys"),
        Nav::Keys,
        Some(&session.csrf),
    )
}

async fn handle(console: &Console, req: Request<PolicyBody>) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    // The static files: no secret in them, served to anyone (the login page needs them).
    match path.as_str() {
        "/console/assets/console.css"
        | "/console/assets/console.js"
        | "/console/assets/icon.svg" => {
            if !matches!(method, Method::GET | Method::HEAD) {
                return method_not_allowed();
            }
            return match path.rsplit('.').next() {
                Some("css") => html::asset("text/css; charset=utf-8", CSS),
                Some("js") => html::asset("text/javascript; charset=utf-8", JS),
                _ => html::asset("image/svg+xml", ICON),
            };
        }
        "/console/login" => return login(console, req).await,
        _ => {}
    }
    // Everything else needs a live session, from the cookie only.
    // Every cookie of the name is tried: a tossed one (another host or port may set one)
    // must not hide the session's.
    let session = session::cookies(req.headers(), session::COOKIE).find_map(|id| {
        console.sessions.get(id).map(|csrf| Session {
            id: id.to_owned(),
            csrf,
        })
    });
    let Some(session) = session else {
        return if matches!(method, Method::GET | Method::HEAD) {
            html::redirect("/console/login")
        } else {
            let mut response = html::message(
                StatusCode::UNAUTHORIZED,
                "Logged out",
                "This needs a console session: log in with the admin token.",
                ("/console/login", "Log in"),
                Nav::None,
                None,
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Cookie realm=\"console\""),
            );
            response
        };
    };
    let segments: Vec<&str> = path
        .strip_prefix("/console")
        .unwrap_or_default()
        .trim_start_matches('/')
        .split('/')
        .collect();
    // Names in the path are percent-encoded.
    let decode = |segment: &str| percent_decode(segment, false);
    if method == Method::POST {
        if !same_origin(&req) {
            return html::message(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form came from another site (Origin or Referer is not this console).",
                ("/console/keys", "Back to the keys"),
                Nav::Keys,
                Some(&session.csrf),
            );
        }
        let form = match read_form(req).await {
            Ok(form) => form,
            Err(response) => return response,
        };
        let token_ok = form
            .0
            .iter()
            .find(|(k, _)| k == "csrf")
            .is_some_and(|(_, v)| session::ct_eq(v.as_bytes(), session.csrf.as_bytes()));
        if !token_ok {
            return html::message(
                StatusCode::FORBIDDEN,
                "Refused",
                "The form's CSRF token is missing or wrong: reload the page and try again.",
                ("/console/keys", "Back to the keys"),
                Nav::Keys,
                Some(&session.csrf),
            );
        }
        return match segments.as_slice() {
            ["logout"] => logout(console, &session),
            ["keys"] => keys::create(console, &session, &form).await,
            ["keys", name] => match decode(name) {
                Some(name) => keys::save(console, &session, &name, &form).await,
                None => not_found(&session),
            },
            ["keys", name, action @ ("disable" | "enable" | "delete")] => match decode(name) {
                Some(name) => keys::action(console, &session, &name, action).await,
                None => not_found(&session),
            },
            _ => not_found(&session),
        };
    }
    if !matches!(method, Method::GET | Method::HEAD) {
        return method_not_allowed();
    }
    let params = crate::admin::query(&req).unwrap_or_default();
    match segments.as_slice() {
        [""] => html::redirect("/console/keys"),
        ["keys"] => keys::list(console, &session, &params).await,
        // Not under `/console/keys/`, where a key may be named `new`.
        ["new-key"] => keys::new_key(console, &session).await,
        ["keys", name] => match decode(name) {
            Some(name) => keys::edit(console, &session, &name, &params).await,
            None => not_found(&session),
        },
        ["keys", name, "delete"] => match decode(name) {
            Some(name) => keys::confirm_delete(console, &session, &name).await,
            None => not_found(&session),
        },
        ["audit"] => audit::list(console, &session, &params).await,
        ["audit", id] => match decode(id) {
            Some(id) => audit::record(console, &session, &id).await,
            None => not_found(&session),
        },
        ["spend"] => audit::spend(console, &session, &params).await,
        _ => not_found(&session),
    }
}

/// The login page, with a fresh double-submit token (also set as a cookie).
fn login_page(secure: bool, status: StatusCode, problem: Option<&str>) -> Response<ProxyBody> {
    let Some(token) = session::random_token() else {
        return no_randomness();
    };
    let problem = problem
        .map(|p| format!("<p class=\"notice error\" role=\"alert\">{}</p>", esc(p)))
        .unwrap_or_default();
    let main = format!(
        "{problem}<form method=\"post\" action=\"/console/login\" class=\"card login\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <label for=\"token\">Admin token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required autofocus>\
         <p class=\"hint\">The value of the environment variable named by <code>[admin] token_env</code>. \
         Virtual keys do not open the console.</p>\
         <button type=\"submit\">Log in</button></form>",
        esc(&token)
    );
    let mut response = html::html(status, html::layout("Log in", Nav::None, None, &main));
    if let Ok(value) = HeaderValue::from_str(&session::set_cookie(
        session::LOGIN_COOKIE,
        &token,
        secure,
        Some(600),
    )) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

fn no_randomness() -> Response<ProxyBody> {
    html::message(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "The system's random source cannot be read: no session can be made.",
        ("/console/login", "Try again"),
        Nav::None,
        None,
    )
}

/// The login page for a client out of attempts: 429.
fn throttled(secure: bool) -> Response<ProxyBody> {
    let mut response = login_page(
        secure,
        StatusCode::TOO_MANY_REQUESTS,
        Some("Too many failed logins from this address: wait a few minutes."),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("300"));
    response
}

async fn login(console: &Console, req: Request<PolicyBody>) -> Response<ProxyBody> {
    let secure = console.secure_cookie || came_over_https(&req);
    match *req.method() {
        Method::GET | Method::HEAD => {
            // Already logged in: on to the keys.
            if session::cookies(req.headers(), session::COOKIE)
                .any(|id| console.sessions.get(id).is_some())
            {
                return html::redirect("/console/keys");
            }
            return login_page(secure, StatusCode::OK, None);
        }
        Method::POST => {}
        _ => return method_not_allowed(),
    }
    let ip = client_ip(&req);
    if !console.throttle.allowed(ip) {
        return throttled(secure);
    }
    if !same_origin(&req) {
        return login_page(
            secure,
            StatusCode::FORBIDDEN,
            Some("This login came from another site."),
        );
    }
    let parts_headers = req.headers().clone();
    let form = match read_form(req).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    // Any of the double-submit cookies (a tossed one may come first) equal to the field.
    let field = form.0.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v);
    let csrf_ok = field.is_some_and(|field| {
        session::cookies(&parts_headers, session::LOGIN_COOKIE)
            .any(|cookie| !cookie.is_empty() && session::ct_eq(cookie.as_bytes(), field.as_bytes()))
    });
    if !csrf_ok {
        return login_page(
            secure,
            StatusCode::FORBIDDEN,
            Some("The login form expired or came from elsewhere: try again."),
        );
    }
    // The attempt is counted before the token is compared (and forgotten on success), so
    // that logins sent at once cannot all be compared.
    if !console.throttle.attempt(ip) {
        return throttled(secure);
    }
    let token = form.0.iter().find(|(k, _)| k == "token").map(|(_, v)| v);
    if !token.is_some_and(|t| console.admin.is_token(t)) {
        tracing::warn!(target: "example_proxy::console", client = %ip, "console: failed login");
        tokio::time::sleep(session::FAILURE_DELAY).await;
        return login_page(
            secure,
            StatusCode::UNAUTHORIZED,
            Some("That is not the admin token."),
        );
    }
    console.throttle.succeeded(ip);
    let Some((id, _csrf)) = console.sessions.create() else {
        return no_randomness();
    };
    tracing::info!(target: "example_proxy::console", client = %ip, "console: logged in");
    let mut response = html::redirect("/console/keys");
    for cookie in [
        session::set_cookie(session::COOKIE, &id, secure, None),
        session::set_cookie(session::LOGIN_COOKIE, "", secure, Some(0)),
    ] {
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

fn logout(console: &Console, session: &Session) -> Response<ProxyBody> {
    console.sessions.end(&session.id);
    let mut response = html::redirect("/console/login");
    if let Ok(value) = HeaderValue::from_str(&session::set_cookie(
        session::COOKIE,
        "",
        console.secure_cookie,
        Some(0),
    )) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<PolicyBody> {
        let mut req = Request::post("/console/keys")
            .body(PolicyBody::empty())
            .unwrap();
        for (name, value) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        req
    }

    #[test]
    fn origin_and_referer_must_name_this_host() {
        let host = ("host", "127.0.0.1:8080");
        assert!(same_origin(&request(&[host])));
        assert!(same_origin(&request(&[
            host,
            ("origin", "http://127.0.0.1:8080")
        ])));
        assert!(same_origin(&request(&[
            host,
            ("referer", "http://127.0.0.1:8080/console/keys")
        ])));
        for (name, value) in [
            ("origin", "http://evil.example"),
            ("origin", "http://127.0.0.1:8080.evil.example"),
            ("origin", "null"),
            ("referer", "http://127.0.0.1:80800/x"),
            ("referer", "https://evil.example/console"),
        ] {
            assert!(!same_origin(&request(&[host, (name, value)])), "{value}");
        }
        assert!(!same_origin(&request(&[])), "no host");
    }

    #[test]
    fn forms_are_decoded_or_refused() {
        let form = Form::parse(b"a=1&model=x&model=y+z&empty=&b=%3Cs%3E").unwrap();
        assert_eq!(form.get("a"), Some("1"));
        assert_eq!(form.all("model"), ["x", "y z"]);
        assert_eq!(form.get("empty"), None);
        assert_eq!(form.get("b"), Some("<s>"));
        let login = Form::parse(b"csrf=c5rf-value&token=the-admin-token").unwrap();
        let debug = format!("{login:?}");
        assert!(!debug.contains("the-admin-token") && !debug.contains("c5rf-value"));
        assert!(Form::parse(b"a=%zz").is_none());
        assert!(Form::parse(b"a=\xff").is_none());
    }
}
