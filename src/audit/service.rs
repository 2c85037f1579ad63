use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use http::request::Parts;
use http::{header, HeaderValue, Request, Response};
use http_body::Body;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use tower_service::Service;

use super::body::AuditBody;
use super::future::{Recorder, RequestInfo, ResponseFuture};
use super::layer::{AuditLayer, Config};
use super::record::{next_request_id, plausible_request_id, AuditFlags, Facts, RequestId};
use crate::body::{BoxError, PolicyBody};
use crate::check::{carries_model_body, CheckFuture, RequestCheck};
use crate::endpoint::{Endpoint, Route};
use crate::error::{Layer as LayerName, PolicyError};
use crate::key_auth::ClientIp;
use crate::keys::ApiKey;
use crate::request::{is_multipart, BodyOptions, LlmRequest};

/// Middleware that writes one [`AuditRecord`](super::AuditRecord) per request. See the
/// [module docs](super).
#[derive(Clone)]
pub struct Audit<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Audit<S> {
    /// Wraps `inner` with the configuration of `layer`.
    pub fn new(inner: S, layer: &AuditLayer) -> Self {
        tower_layer::Layer::layer(layer, inner)
    }

    /// An [`AuditLayer`] writing to `sink`.
    pub fn layer(sink: impl super::LogSink) -> AuditLayer {
        AuditLayer::new(sink)
    }

    pub(crate) fn from_config(inner: S, config: Arc<Config>) -> Self {
        Audit { inner, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the middleware, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for Audit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Audit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Service<Request<B>> for Audit<S>
where
    S: Service<Request<PolicyBody>, Response = Response<ResBody>> + Clone,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<AuditBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let start = Instant::now();
        // Milliseconds, as the record is serialized.
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(SystemTime::UNIX_EPOCH, |d| {
                SystemTime::UNIX_EPOCH + Duration::from_millis(d.as_millis() as u64)
            });
        let request_id = self
            .config
            .trust_request_id
            .then(|| req.headers().get("x-request-id"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|id| plausible_request_id(id))
            .map_or_else(next_request_id, str::to_owned);
        let flags = AuditFlags::new();
        let ext = req.extensions_mut();
        ext.insert(RequestId(request_id.clone()));
        ext.insert(flags.clone());
        let client_ip = ext
            .get::<ClientIp>()
            .map(|c| c.0)
            .or_else(|| ext.get::<SocketAddr>().map(SocketAddr::ip));
        // A host that authenticates before this layer may have put the key here already.
        let key = ext.get::<Arc<ApiKey>>().cloned();
        let info = RequestInfo {
            request_id,
            timestamp,
            start,
            key,
            client_ip,
            method: req.method().clone(),
            uri: req.uri().clone(),
        };
        let recorder = Recorder::new(self.config.clone(), flags.clone(), info);
        let check = AuditCheck {
            config: self.config.clone(),
            flags: Some(flags),
        };
        ResponseFuture::new(CheckFuture::new(check, &mut self.inner, req), recorder)
    }
}

/// The audit layer's part in the shared body machinery: it never rejects; it notes the
/// request's facts for the record and turns `stream_options.include_usage` on where asked to.
#[derive(Clone)]
pub(crate) struct AuditCheck {
    config: Arc<Config>,
    /// The request's shared flags and facts (always set on a request's own check).
    flags: Option<AuditFlags>,
}

impl fmt::Debug for AuditCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditCheck").finish_non_exhaustive()
    }
}

impl RequestCheck for AuditCheck {
    fn layer(&self) -> LayerName {
        LayerName::Audit
    }

    fn body_options(&self) -> BodyOptions {
        self.config.body
    }

    fn needs_body(&self, parts: &Parts) -> bool {
        carries_model_body(parts)
    }

    fn check(&self, req: &mut Request<PolicyBody>) -> Result<(), PolicyError> {
        let Some(flags) = &self.flags else {
            return Ok(());
        };
        let config = &self.config;
        let injected = config.inject_usage && inject_include_usage(req);
        let Some(view) = req.extensions().get::<LlmRequest>() else {
            let route = Route::classify(req.uri());
            flags.set_facts(Facts {
                endpoint: Some(route.endpoint),
                model: route.path_model.or(route.deployment),
                ..Facts::default()
            });
            return Ok(());
        };
        let mut facts = Facts {
            endpoint: Some(view.endpoint()),
            model: view.model().map(str::to_owned),
            canonical_model: view.canonical_model().map(str::to_owned),
            user: view.user().map(str::to_owned),
            stream: view.stream(),
            usage_injected: injected,
            ..Facts::default()
        };
        if reports_usage(view.endpoint()) {
            let estimate: usize = view
                .prompt_parts()
                .map(|p| crate::tokens::estimate(p.text))
                .sum();
            facts.prompt_estimate = Some(estimate as u64 + view.prompt_token_ids());
        }
        if config.log_content {
            let mut prompt = String::new();
            for (i, part) in view.prompt_parts().enumerate() {
                if i > 0 {
                    prompt.push('\n');
                }
                prompt.push_str(part.text);
                if prompt.len() > config.max_content_bytes + REDACTION_MARGIN {
                    break;
                }
            }
            // Redact before cutting, so that a key across the cut is still recognised.
            let long = truncate(&mut prompt, config.max_content_bytes + REDACTION_MARGIN);
            let mut prompt = (config.redact)(&prompt);
            facts.prompt_truncated = truncate(&mut prompt, config.max_content_bytes) || long;
            facts.prompt = Some(prompt);
        }
        flags.set_facts(facts);
        Ok(())
    }
}

/// Extra bytes of content kept past the limit until redaction has run, so that a secret that
/// straddles the limit is redacted whole rather than cut into an unrecognisable prefix.
pub(crate) const REDACTION_MARGIN: usize = 256;

/// Whether the endpoint's successful responses report token usage.
pub(crate) fn reports_usage(endpoint: Endpoint) -> bool {
    matches!(
        endpoint,
        Endpoint::ChatCompletions
            | Endpoint::Completions
            | Endpoint::Embeddings
            | Endpoint::Responses
    )
}

/// Cuts `text` to at most `max` bytes, on a character boundary. Whether it was cut.
pub(crate) fn truncate(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    true
}

/// Turns `stream_options.include_usage` on in a streamed chat completions or completions
/// request that did not ask for usage, rewriting the body and the view. Whether it did.
fn inject_include_usage(req: &mut Request<PolicyBody>) -> bool {
    let Some(view) = req.extensions().get::<LlmRequest>() else {
        return false;
    };
    if !view.stream()
        || view.include_usage() == Some(true)
        || !matches!(
            view.endpoint(),
            Endpoint::ChatCompletions | Endpoint::Completions
        )
        || !view.has_body()
        || is_multipart(req.headers())
    {
        return false;
    }
    let Some(body) = with_include_usage(view.body()) else {
        return false;
    };
    if req.headers().contains_key(header::CONTENT_LENGTH) {
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    *req.body_mut() = PolicyBody::full(body);
    if let Some(view) = req.extensions_mut().get_mut::<LlmRequest>() {
        view.set_include_usage(Some(true));
    }
    true
}

const INCLUDE_USAGE: &[u8] = br#""stream_options":{"include_usage":true}"#;

/// The JSON object `body` with `stream_options.include_usage` set to `true`; `None` if the
/// body is not a JSON object or its `stream_options` is not an object or null.
///
/// Without a `stream_options` key in the body (the common case), the member is inserted
/// after the opening brace and nothing else is parsed or moved; otherwise the object is
/// rewritten member by member, every other value kept byte for byte.
pub(crate) fn with_include_usage(body: &[u8]) -> Option<Bytes> {
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    if memchr::memmem::find(body, b"\"stream_options\"").is_none() {
        let rest = &body[open + 1..];
        let empty = rest
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'}');
        let mut out = BytesMut::with_capacity(body.len() + INCLUDE_USAGE.len() + 1);
        out.put_slice(&body[..=open]);
        out.put_slice(INCLUDE_USAGE);
        if !empty {
            out.put_u8(b',');
        }
        out.put_slice(rest);
        return Some(out.freeze());
    }
    rewrite_stream_options(body)
}

/// The slow path of [`with_include_usage`]: the object's members in order, raw.
fn rewrite_stream_options(body: &[u8]) -> Option<Bytes> {
    struct Members<'a>(Vec<(String, &'a RawValue)>);

    impl<'de> serde::Deserialize<'de> for Members<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    let mut members = Vec::new();
                    while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                        members.push(member);
                    }
                    Ok(Members(members))
                }
            }
            d.deserialize_map(V)
        }
    }

    let members: Members<'_> = serde_json::from_slice(body).ok()?;
    let mut out = Vec::with_capacity(body.len() + INCLUDE_USAGE.len());
    out.push(b'{');
    for (i, (key, value)) in members.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut out, key).ok()?;
        out.push(b':');
        if key == "stream_options" {
            let mut options: serde_json::Value = serde_json::from_str(value.get()).ok()?;
            match &mut options {
                serde_json::Value::Object(map) => {
                    map.insert("include_usage".into(), true.into());
                }
                serde_json::Value::Null => {
                    options = serde_json::json!({ "include_usage": true });
                }
                _ => return None,
            }
            serde_json::to_writer(&mut out, &options).ok()?;
        } else {
            out.extend_from_slice(value.get().as_bytes());
        }
    }
    out.push(b'}');
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::with_include_usage;

    fn inject(body: &str) -> Option<String> {
        with_include_usage(body.as_bytes()).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn inserts_when_absent() {
        assert_eq!(
            inject(r#" {"model":"m","stream":true}"#).unwrap(),
            r#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
        assert_eq!(
            inject("{ }").unwrap(),
            r#"{"stream_options":{"include_usage":true} }"#
        );
    }

    #[test]
    fn rewrites_when_present() {
        let out =
            inject(r#"{"model":"m","stream_options":{"include_usage":false,"x":1},"n":1.50}"#)
                .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1);
        assert!(out.ends_with(r#""n":1.50}"#), "{out}");
        let out = inject(r#"{"stream_options":null}"#).unwrap();
        assert_eq!(out, r#"{"stream_options":{"include_usage":true}}"#);
        assert_eq!(inject(r#"{"stream_options":3}"#), None);
        assert_eq!(inject("[1]"), None);
    }
}
