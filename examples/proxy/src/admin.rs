//! The admin API, `/admin/v1/...`: keys (create, list, get, change, delete) and spend per key
//! per day, for whoever holds the admin token (`[admin] token_env`). Off unless configured.
//!
//! | request | answer |
//! |---|---|
//! | `POST /admin/v1/keys` with a key's policy (`{"name": "app", "model_limits": [...]}`) | 201, the key's record and its `secret`, shown this once |
//! | `GET /admin/v1/keys?after=<name>&limit=<n>` | `{"object": "list", "data": [...], "has_more": bool, "next_after": <name>}` |
//! | `GET /admin/v1/keys/<name>` | the record (policy, `digest_prefix`, times) |
//! | `PATCH /admin/v1/keys/<name>` with a JSON merge patch (`{"rpm": 60, "disabled": true}`) | the changed record |
//! | `DELETE /admin/v1/keys/<name>` | `{"object": "key.deleted", "name": ..., "deleted": true}` |
//! | `GET /admin/v1/spend?key=<name>&from=<date>&to=<date>` | spend per key per UTC day (`[audit] postgres_url`) |
//!
//! Authentication: `Authorization: Bearer <token>`, the value of the environment variable
//! `[admin] token_env` (at least 32 characters; the proxy refuses to start with a shorter one,
//! or one that is also a virtual key). Virtual keys are never admin tokens, and the admin token
//! is not a virtual key: `/v1` refuses it. Errors are OpenAI-shaped. Each change is logged
//! (`tracing`, target `example_proxy::admin`) with the key's name, never a secret.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};
use tower::Service;
use tower_llm_policy::keys::{AdminError, KeyAdmin, KeyDigest, PageRequest};
use tower_llm_policy::{ApiKey, PolicyBody};

use crate::stack::{ProxyBody, ProxyService};

/// Longest admin request body: 64 KiB.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Shortest admin token accepted.
pub const MIN_TOKEN_LEN: usize = 32;

/// Where spend is read from, for `/admin/v1/spend`.
pub type SpendSource = Arc<
    dyn Fn(
            SystemTime,
            SystemTime,
            Option<String>,
        ) -> Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>
        + Send
        + Sync,
>;

/// The admin API's state: the keys it manages, the token's digest, the spend source.
pub struct Admin {
    keys: Arc<dyn KeyAdmin>,
    token: KeyDigest,
    spend: Option<SpendSource>,
    /// The `[[guards]]` names a key may list in `guards`.
    guards: Option<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("spend", &self.spend.is_some())
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// The admin API over `keys`, for the bearer of `token`.
    pub fn new(keys: Arc<dyn KeyAdmin>, token: &str, spend: Option<SpendSource>) -> Self {
        Admin {
            keys,
            token: KeyDigest::of(token),
            spend,
            guards: None,
        }
    }

    /// Refuses keys (created or changed) whose `guards` name anything else than `names`.
    #[must_use]
    pub fn guards(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.guards = Some(names.into_iter().collect());
        self
    }

    /// The keys this admin manages (the web console, [`crate::console`], works on them too).
    pub(crate) fn keys(&self) -> &Arc<dyn KeyAdmin> {
        &self.keys
    }

    /// Whether `token` is the admin token (digests compared: the time says nothing of it).
    pub(crate) fn is_token(&self, token: &str) -> bool {
        KeyDigest::of(token.trim()) == self.token
    }

    /// The `[[guards]]` names a key may be bound to, sorted (`None`: not checked).
    pub(crate) fn guard_names(&self) -> Option<Vec<String>> {
        let mut names: Vec<String> = self.guards.as_ref()?.iter().cloned().collect();
        names.sort();
        Some(names)
    }

    /// The name of the first guard of `guards` that is not configured, if one is not.
    pub(crate) fn unknown_guard<'a>(
        &self,
        guards: impl IntoIterator<Item = &'a str>,
    ) -> Option<&'a str> {
        let known = self.guards.as_ref()?;
        guards.into_iter().find(|name| !known.contains(*name))
    }

    /// A 400 naming the first guard of `guards` that is not configured, if one is not.
    fn check_guards<'a>(
        &self,
        guards: impl IntoIterator<Item = &'a str>,
    ) -> Option<Response<ProxyBody>> {
        let name = self.unknown_guard(guards)?;
        Some(error(
            StatusCode::BAD_REQUEST,
            "unknown_guard",
            format!("`guards`: `{name}` is not a `[[guards]]` name of this proxy."),
        ))
    }
}

/// `stack`, with `/admin/...` answered by `admin` instead.
pub fn route(stack: ProxyService, admin: Arc<Admin>) -> ProxyService {
    ProxyService::new(WithAdmin { stack, admin })
}

#[derive(Clone)]
struct WithAdmin {
    stack: ProxyService,
    admin: Arc<Admin>,
}

pub(crate) type BoxedResponse =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl Service<Request<PolicyBody>> for WithAdmin {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxedResponse;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, req: Request<PolicyBody>) -> Self::Future {
        if req.uri().path() == "/admin" || req.uri().path().starts_with("/admin/") {
            let admin = self.admin.clone();
            return Box::pin(async move { Ok(handle(&admin, req).await) });
        }
        // The stack's own future is boxed already: passed on as it is.
        self.stack.call(req)
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<ProxyBody> {
    let kind = match status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::SERVICE_UNAVAILABLE => "server_error",
        _ => "invalid_request_error",
    };
    respond(
        status,
        &json!({"error": {"message": message.into(), "type": kind, "param": null, "code": code}}),
    )
}

fn admin_error(e: AdminError) -> Response<ProxyBody> {
    match e {
        AdminError::NotFound(_) => error(StatusCode::NOT_FOUND, "key_not_found", e.to_string()),
        AdminError::Conflict(_) => error(StatusCode::CONFLICT, "key_exists", e.to_string()),
        AdminError::Invalid(_) => error(StatusCode::BAD_REQUEST, "invalid_key", e.to_string()),
        AdminError::ReadOnly => error(StatusCode::METHOD_NOT_ALLOWED, "read_only", e.to_string()),
        AdminError::Store(_) => {
            tracing::warn!(target: "example_proxy::admin", error = %e, "admin: the key store failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "The key store could not answer; try again.",
            )
        }
        _ => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "admin_error",
            e.to_string(),
        ),
    }
}

/// Whether the request carries the admin token.
fn authorized(admin: &Admin, req: &Request<PolicyBody>) -> bool {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return false;
    };
    // Digests compared, so that the comparison's time says nothing of the token.
    scheme.eq_ignore_ascii_case("bearer") && KeyDigest::of(token.trim()) == admin.token
}

async fn read_json(req: Request<PolicyBody>) -> Result<Value, Response<ProxyBody>> {
    let body = Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                "An admin request body is 64 KiB at most, and must arrive whole.",
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("The body is not JSON: {e}"),
        )
    })
}

/// Decodes `%XX` escapes (and `+` in a query) of a path segment or query value.
pub(crate) fn percent_decode(text: &str, plus_is_space: bool) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    // No NUL: no key name, date or cursor holds one (and a database refuses it in text).
    String::from_utf8(out).ok().filter(|s| !s.contains('\0'))
}

/// The query's parameters, decoded.
pub(crate) fn query(req: &Request<PolicyBody>) -> Option<Vec<(String, String)>> {
    let Some(query) = req.uri().query() else {
        return Some(Vec::new());
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

pub(crate) fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A date (`2026-12-03`, the start of that UTC day) or an RFC 3339 time.
fn parse_time(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    if text.len() == 10 {
        return humantime::parse_rfc3339(&format!("{text}T00:00:00Z")).ok();
    }
    humantime::parse_rfc3339_weak(text).ok()
}

async fn handle(admin: &Admin, req: Request<PolicyBody>) -> Response<ProxyBody> {
    if !authorized(admin, &req) {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_admin_token",
            "The admin API needs the admin token: Authorization: Bearer <token>.",
        );
    }
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let Some(params) = query(&req) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "The query string cannot be read.",
        );
    };
    let rest = path.strip_prefix("/admin/v1/").unwrap_or_default();
    let segments: Vec<&str> = rest.split('/').collect();
    match (method, segments.as_slice()) {
        (Method::POST, ["keys"]) => {
            let body = match read_json(req).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            let key: ApiKey = match serde_json::from_value(body) {
                Ok(key) => key,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_key",
                        format!("Not a key's policy: {e}"),
                    )
                }
            };
            if let Some(response) = admin.check_guards(key.guards.iter().map(String::as_str)) {
                return response;
            }
            match admin.keys.create(key).await {
                Ok(created) => {
                    tracing::info!(target: "example_proxy::admin", key = %created.record.key.name, "admin: key created");
                    let mut body = serde_json::to_value(&created).unwrap_or(Value::Null);
                    body["object"] = json!("key");
                    respond(StatusCode::CREATED, &body)
                }
                Err(e) => admin_error(e),
            }
        }
        (Method::GET, ["keys"]) => {
            let limit = match param(&params, "limit").map(str::parse::<usize>) {
                None => None,
                Some(Ok(limit)) => Some(limit),
                Some(Err(_)) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_limit",
                        "`limit` is a number.",
                    )
                }
            };
            let page = PageRequest {
                after: param(&params, "after").map(str::to_owned),
                limit,
            };
            match admin.keys.list(page).await {
                Ok(page) => respond(
                    StatusCode::OK,
                    &json!({
                        "object": "list",
                        "data": page.keys,
                        "has_more": page.next.is_some(),
                        "next_after": page.next,
                    }),
                ),
                Err(e) => admin_error(e),
            }
        }
        (method, ["keys", name]) => {
            let Some(name) = percent_decode(name, false) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_name",
                    "The key's name cannot be read.",
                );
            };
            match method {
                Method::GET => match admin.keys.get(&name).await {
                    Ok(record) => record_response(&record),
                    Err(e) => admin_error(e),
                },
                Method::PATCH => {
                    let patch = match read_json(req).await {
                        Ok(body) => body,
                        Err(response) => return response,
                    };
                    if let Some(guards) = patch.get("guards").and_then(Value::as_array) {
                        let names = guards.iter().filter_map(Value::as_str);
                        if let Some(response) = admin.check_guards(names) {
                            return response;
                        }
                    }
                    match admin.keys.update(&name, &patch).await {
                        Ok(record) => {
                            tracing::info!(target: "example_proxy::admin", key = %name, "admin: key changed");
                            record_response(&record)
                        }
                        Err(e) => admin_error(e),
                    }
                }
                Method::DELETE => match admin.keys.delete(&name).await {
                    Ok(()) => {
                        tracing::info!(target: "example_proxy::admin", key = %name, "admin: key deleted");
                        respond(
                            StatusCode::OK,
                            &json!({"object": "key.deleted", "name": name, "deleted": true}),
                        )
                    }
                    Err(e) => admin_error(e),
                },
                _ => not_allowed(),
            }
        }
        (Method::GET, ["spend"]) => spend(admin, &params).await,
        (_, ["keys"] | ["spend"]) => not_allowed(),
        _ => error(
            StatusCode::NOT_FOUND,
            "unknown_admin_path",
            format!("No admin endpoint at {path}."),
        ),
    }
}

fn record_response(record: &tower_llm_policy::keys::KeyRecord) -> Response<ProxyBody> {
    let mut body = serde_json::to_value(record).unwrap_or(Value::Null);
    body["object"] = json!("key");
    respond(StatusCode::OK, &body)
}

fn not_allowed() -> Response<ProxyBody> {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This admin endpoint does not take this method.",
    )
}

async fn spend(admin: &Admin, params: &[(String, String)]) -> Response<ProxyBody> {
    let Some(source) = &admin.spend else {
        return error(
            StatusCode::NOT_FOUND,
            "spend_unavailable",
            "Spend per day is read from the audit log in PostgreSQL: set [audit] postgres_url.",
        );
    };
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let to = match param(params, "to").map(parse_time) {
        None => now,
        Some(Some(to)) => to,
        Some(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_time",
                "`to` is a date (2026-12-03) or an RFC 3339 time.",
            )
        }
    };
    let from = match param(params, "from").map(parse_time) {
        // The last 30 days by default, from the start of a UTC day.
        None => {
            let secs = to
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
                .saturating_sub(30 * 86_400);
            UNIX_EPOCH + Duration::from_secs(secs - secs % 86_400)
        }
        Some(Some(from)) => from,
        Some(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_time",
                "`from` is a date (2026-12-03) or an RFC 3339 time.",
            )
        }
    };
    // A `to` given as a date covers that whole day.
    let to = match param(params, "to") {
        Some(text) if text.trim().len() == 10 => to + day,
        _ => to,
    };
    if from >= to {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_time",
            "`from` must be before `to`.",
        );
    }
    let key = param(params, "key").map(str::to_owned);
    match source(from, to, key).await {
        Ok(days) => respond(StatusCode::OK, &json!({"object": "list", "data": days})),
        Err(e) => {
            tracing::warn!(target: "example_proxy::admin", error = %e, "admin: the spend query failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "The audit database could not answer; try again.",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_queries_are_decoded() {
        assert_eq!(percent_decode("a%20b", false).as_deref(), Some("a b"));
        assert_eq!(percent_decode("a+b", true).as_deref(), Some("a b"));
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%zz", false), None);
        assert_eq!(percent_decode("%", false), None);
        assert_eq!(percent_decode("%ff", false), None, "not UTF-8");
        assert_eq!(percent_decode("a%00b", false), None, "a NUL");
        assert_eq!(
            parse_time("2026-12-03"),
            humantime::parse_rfc3339("2026-12-03T00:00:00Z").ok()
        );
        assert!(parse_time("yesterday").is_none());
    }
}
