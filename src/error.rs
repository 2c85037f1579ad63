//! The error contract: every policy outcome as an OpenAI-shaped JSON response.
//!
//! A rejection is never a `Service::Error` (that would drop the connection): each layer answers
//! `Ok(response)` with the status, a JSON body `{"error":{"message","type","param","code"}}`
//! (all four keys present, `code` a string) and `content-type: application/json`, so every
//! OpenAI SDK raises its usual typed exception. The response's extensions carry a
//! [`Rejection`] naming the layer and the code, which the audit layer reads.
//!
//! | outcome | status | code |
//! |---|---|---|
//! | missing / unknown / disabled key | 401 | `invalid_api_key` |
//! | expired key | 401 | `key_expired` |
//! | key's IP allow-list refuses the client | 403 | `ip_not_allowed` |
//! | model not in the key's allow-list | 403 | `model_not_allowed` |
//! | feature or model on a block list | 422 | `feature_blocked` |
//! | unknown endpoint, when unknown endpoints are refused | 404 | `unknown_url` |
//! | prompt over the limit | 400 | `prompt_too_long` |
//! | `user` required but absent | 400 | `user_required` |
//! | content / prompt-injection guard blocks | 400 | `content_blocked` |
//! | spend cap reached (with `x-should-retry: false`) | 429 | `insufficient_quota` |
//! | rate limit (with `retry-after`) | 429 | `rate_limit_exceeded` |
//! | body over the size limit | 413 | `request_too_large` |
//! | body not valid JSON / unreadable | 400 | `invalid_request_body` |
//! | a model list from the upstream that cannot be filtered (fail closed) | 502 | `upstream_invalid_response` |
//! | path, query, method or multipart headers an upstream could read otherwise | 400 | `ambiguous_request` |
//! | the request runs a model (or batch) the policy cannot see, for a key it limits | 403 | `unverifiable_request` |
//! | key store or ledger unreachable, too slow or panicking (fail closed) | 503 | `policy_unavailable` |

use std::borrow::Cow;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// Which layer produced a [`Rejection`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LayerName {
    /// [`KeyAuth`](crate::key_auth::KeyAuth).
    KeyAuth,
    /// [`ModelAllowList`](crate::model_allow_list::ModelAllowList).
    ModelAllowList,
    /// The `FeatureBlock` layer.
    FeatureBlock,
    /// The `PromptLimit` layer.
    PromptLimit,
    /// The [`Quota`](crate::quota::Quota) layer (spend caps and rate limits).
    Quota,
    /// The content guards (the `GuardLayer`, feature `guards`).
    Guard,
    /// The audit layer.
    Audit,
    /// Reading or parsing the request body (whichever layer read it first), or the
    /// [`BodyLimit`](crate::body_limit::BodyLimit) layer.
    RequestBody,
    /// A layer outside this crate.
    Other(&'static str),
}

impl LayerName {
    /// A stable, lowercase name for logs and audit records (`"key_auth"`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            LayerName::KeyAuth => "key_auth",
            LayerName::ModelAllowList => "model_allow_list",
            LayerName::FeatureBlock => "feature_block",
            LayerName::PromptLimit => "prompt_limit",
            LayerName::Quota => "quota",
            LayerName::Guard => "guard",
            LayerName::Audit => "audit",
            LayerName::RequestBody => "request_body",
            LayerName::Other(name) => name,
        }
    }
}

impl std::fmt::Display for LayerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request was rejected: left in the rejection response's extensions for the audit layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The layer that rejected the request.
    pub layer: LayerName,
    /// The OpenAI `code` of the error (`"model_not_allowed"`, ...).
    pub code: &'static str,
    /// The human-readable message sent to the client.
    pub message: String,
}

/// Every policy outcome that ends a request, with its status, OpenAI `type`, `code` and `param`.
///
/// Messages never contain a presented key or a provider key.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// No key was presented.
    #[error("You didn't provide an API key. Provide your API key in an Authorization header using Bearer auth (Authorization: Bearer YOUR_KEY).")]
    MissingKey,
    /// The presented key is not known to the key store (or several different keys were sent).
    #[error("Incorrect API key provided.")]
    InvalidKey,
    /// The key exists but is disabled.
    #[error("This API key has been disabled.")]
    KeyDisabled,
    /// The key's `expires_at` has passed.
    #[error("This API key has expired.")]
    KeyExpired,
    /// The client's address is not in the key's `allow_ips`.
    #[error("{0}")]
    IpNotAllowed(Cow<'static, str>),
    /// The model is outside the key's (or the workspace's) allow-list.
    #[error("This key is not allowed to use model: {model}")]
    ModelNotAllowed {
        /// The model as sent by the client.
        model: String,
    },
    /// The request's head (path, query, method) or multipart headers could be read otherwise
    /// by an upstream than by the policy, so it is refused rather than guessed.
    #[error("{0}")]
    AmbiguousRequest(Cow<'static, str>),
    /// The request runs a model the policy cannot see (an assistant's, a session default, the
    /// requests of a batch input file), and a layer limits this key.
    #[error("{0}")]
    Unverifiable(Cow<'static, str>),
    /// The key's allow-list is enabled and empty.
    #[error("This key has no access to any models")]
    NoModelsAllowed,
    /// A feature, endpoint or model is on a block list.
    #[error("{0}")]
    FeatureBlocked(Cow<'static, str>),
    /// The request is for no OpenAI endpoint the policy knows, and unknown endpoints are
    /// refused rather than forwarded.
    #[error("Unknown request URL: this gateway forwards only the OpenAI API endpoints it knows.")]
    UnknownEndpoint,
    /// The prompt (or a requested output size) is over a limit.
    #[error("{message}")]
    PromptTooLong {
        /// What was measured against which limit.
        message: String,
        /// The request field concerned (`messages`, `max_tokens`, ...).
        param: Option<&'static str>,
    },
    /// The key requires an end-user identifier and the request has none.
    #[error(
        "A non-blank `user` (or `safety_identifier`) field is required on every request here."
    )]
    UserRequired,
    /// A content guard blocked the prompt.
    #[error("{0}")]
    ContentBlocked(Cow<'static, str>),
    /// A spend cap was reached.
    #[error("{0}")]
    InsufficientQuota(Cow<'static, str>),
    /// A rate limit was reached.
    #[error("{message}")]
    RateLimited {
        /// What limit was reached.
        message: String,
        /// Seconds until a retry may succeed (sent as `retry-after`).
        retry_after_secs: u64,
    },
    /// The body is larger than the configured limit.
    #[error("Request body is too large: the limit is {limit} bytes.")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The body is not valid JSON, has a field of the wrong type, or could not be read.
    #[error("{message}")]
    InvalidBody {
        /// What is wrong, for the client.
        message: String,
        /// The field concerned, when known.
        param: Option<&'static str>,
    },
    /// An upstream answer the policy must read (a `GET /v1/models` list to filter) could not be
    /// read: encoded, not JSON, not a model list, or over the size limit. Never passed on raw.
    #[error("{0}")]
    UpstreamInvalid(Cow<'static, str>),
    /// The key store or a ledger could not answer (an error, a timeout, a panic): the policy
    /// fails closed. See [`key_auth`](crate::key_auth) for the store's cases.
    #[error("The policy service is temporarily unavailable. Please retry.")]
    PolicyUnavailable,
}

impl PolicyError {
    /// The HTTP status this outcome is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            PolicyError::MissingKey
            | PolicyError::InvalidKey
            | PolicyError::KeyDisabled
            | PolicyError::KeyExpired => StatusCode::UNAUTHORIZED,
            PolicyError::IpNotAllowed(_)
            | PolicyError::ModelNotAllowed { .. }
            | PolicyError::NoModelsAllowed
            | PolicyError::Unverifiable(_) => StatusCode::FORBIDDEN,
            PolicyError::FeatureBlocked(_) => StatusCode::UNPROCESSABLE_ENTITY,
            PolicyError::UnknownEndpoint => StatusCode::NOT_FOUND,
            PolicyError::PromptTooLong { .. }
            | PolicyError::UserRequired
            | PolicyError::ContentBlocked(_)
            | PolicyError::InvalidBody { .. }
            | PolicyError::AmbiguousRequest(_) => StatusCode::BAD_REQUEST,
            PolicyError::InsufficientQuota(_) | PolicyError::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            PolicyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            PolicyError::PolicyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            PolicyError::UpstreamInvalid(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The OpenAI error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            PolicyError::MissingKey | PolicyError::InvalidKey | PolicyError::KeyDisabled => {
                "invalid_api_key"
            }
            PolicyError::KeyExpired => "key_expired",
            PolicyError::IpNotAllowed(_) => "ip_not_allowed",
            PolicyError::ModelNotAllowed { .. } | PolicyError::NoModelsAllowed => {
                "model_not_allowed"
            }
            PolicyError::FeatureBlocked(_) => "feature_blocked",
            PolicyError::UnknownEndpoint => "unknown_url",
            PolicyError::PromptTooLong { .. } => "prompt_too_long",
            PolicyError::UserRequired => "user_required",
            PolicyError::ContentBlocked(_) => "content_blocked",
            PolicyError::InsufficientQuota(_) => "insufficient_quota",
            PolicyError::RateLimited { .. } => "rate_limit_exceeded",
            PolicyError::BodyTooLarge { .. } => "request_too_large",
            PolicyError::InvalidBody { .. } => "invalid_request_body",
            PolicyError::AmbiguousRequest(_) => "ambiguous_request",
            PolicyError::Unverifiable(_) => "unverifiable_request",
            PolicyError::PolicyUnavailable => "policy_unavailable",
            PolicyError::UpstreamInvalid(_) => "upstream_invalid_response",
        }
    }

    /// The OpenAI error `type`.
    pub fn error_type(&self) -> &'static str {
        match self {
            PolicyError::InsufficientQuota(_) => "insufficient_quota",
            PolicyError::RateLimited { .. } => "rate_limit_error",
            PolicyError::PolicyUnavailable | PolicyError::UpstreamInvalid(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The OpenAI error `param`: the request field concerned, if any.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            PolicyError::ModelNotAllowed { .. } | PolicyError::NoModelsAllowed => Some("model"),
            PolicyError::UserRequired => Some("user"),
            PolicyError::PromptTooLong { param, .. } | PolicyError::InvalidBody { param, .. } => {
                *param
            }
            _ => None,
        }
    }

    /// The JSON body `{"error":{"message","type","param","code"}}`.
    pub fn to_json(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.error_type(),
                "param": self.param(),
                "code": self.code(),
            }
        });
        Bytes::from(body.to_string())
    }

    /// The whole rejection response, with a [`Rejection`] from `layer` in its extensions.
    pub fn into_response(self, layer: LayerName) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.to_json()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match &self {
            PolicyError::InsufficientQuota(_) => {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            PolicyError::RateLimited {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        response.extensions_mut().insert(Rejection {
            layer,
            code: self.code(),
            message: self.to_string(),
        });
        response
    }
}

/// Longest client-sent value (a model name, a size) quoted back in an error message.
const QUOTE_LIMIT: usize = 200;

/// A client-sent value for an error message, cut at [`QUOTE_LIMIT`] characters.
pub(crate) fn quote(value: &str) -> String {
    match value.char_indices().nth(QUOTE_LIMIT) {
        Some((i, _)) => format!("{}…", &value[..i]),
        None => value.to_owned(),
    }
}
