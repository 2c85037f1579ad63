//! What the admin API tests share: the admin token (in its environment variable) and one
//! call to the proxy, answered as a status and a JSON body.
#![allow(dead_code)]

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// The variable `[admin] token_env` names in the tests' configurations.
pub const TOKEN_ENV: &str = "TEST_ADMIN_TOKEN";
/// The admin token the tests' environment gives.
pub const TOKEN: &str = "admin-token-for-the-tests-0123456789abcdef";

/// `method path` to the proxy at `addr` with `Authorization: Bearer <bearer>` and `body` as
/// JSON: the status and the JSON answer (`null` when it is not JSON).
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    bearer: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), Box<dyn std::error::Error + Send + Sync>> {
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {bearer}"));
    let body = match body {
        Some(body) => {
            req = req.header("content-type", "application/json");
            Bytes::from(body.to_string())
        }
        None => Bytes::new(),
    };
    let response = http.request(req.body(Full::new(body))?).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}
