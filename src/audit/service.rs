use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::AuditBody;
use super::future::{AuditCheck, ResponseFuture};
use super::handle::{AuditHandle, TeeBody};
use super::layer::{AuditLayer, Config};
use super::record::{next_request_id, plausible_request_id, sanitised_id, RequestId};
use super::recorder::{Recorder, RequestInfo};
use crate::body::{BoxError, PolicyBody};
use crate::check::CheckFuture;
use crate::key_auth::ClientIp;
use crate::keys::ApiKey;
use crate::request::LlmRequest;

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
        Audit {
            inner,
            config: layer.config.clone(),
        }
    }

    /// An [`AuditLayer`] writing to `sink`.
    pub fn layer(sink: impl super::LogSink) -> AuditLayer {
        AuditLayer::new(sink)
    }

    /// Records lost to a panicking sink so far (see [`AuditLayer::sink_panics`]).
    pub fn sink_panics(&self) -> u64 {
        self.config
            .sink_panics
            .load(std::sync::atomic::Ordering::Relaxed)
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
    type Future = ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let start = Instant::now();
        // Milliseconds, as the record is serialized.
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(SystemTime::UNIX_EPOCH, |d| {
                SystemTime::UNIX_EPOCH + Duration::from_millis(d.as_millis() as u64)
            });
        let (mut parts, body) = req.into_parts();
        let client_request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| sanitised_id(v.as_bytes()));
        let request_id = self
            .config
            .trust_request_id
            .then(|| parts.headers.get("x-request-id"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|id| plausible_request_id(id))
            .map_or_else(next_request_id, str::to_owned);
        let ext = &parts.extensions;
        let client_ip = ext
            .get::<ClientIp>()
            .map(|c| c.0)
            .or_else(|| ext.get::<SocketAddr>().map(SocketAddr::ip));
        // A host that authenticates before this layer may have put the key here already.
        let key = ext.get::<Arc<ApiKey>>().cloned();
        let method = parts.method.clone();
        let uri = parts.uri.clone();
        let view = LlmRequest::resolve(&mut parts, &self.config.policy);
        let handle = AuditHandle::new(self.config.clone(), view, key.clone(), start);
        // With the key not known yet, the body is not read here: the layer that admits the
        // request reads it for the record. Should no layer of this crate read it, the record
        // takes a bounded copy of it on its way to the inner service.
        let reads_itself = key.is_some() || self.config.read_body;
        let copy = view.body_pending() && !reads_itself && !view.is_multipart();
        if copy {
            handle.start_copy(view.policy().clone(), view.policy().body().limit);
        }
        parts.extensions.insert(RequestId(request_id.clone()));
        parts.extensions.insert(handle.clone());
        let body = if copy {
            PolicyBody::new(TeeBody::new(body, handle.clone()))
        } else {
            PolicyBody::new(body)
        };
        let info = RequestInfo {
            request_id,
            client_request_id,
            timestamp,
            start,
            client_ip,
            method,
            uri,
        };
        let recorder = Recorder::new(self.config.clone(), handle, info);
        #[cfg(feature = "tokio")]
        let recorder = recorder.with_tail(parts.extensions.get::<super::drain::Tail>().cloned());
        let check = AuditCheck::new(self.config.policy.clone(), reads_itself);
        let req = Request::from_parts(parts, body);
        ResponseFuture::new(CheckFuture::new(check, &mut self.inner, req), recorder)
    }
}

impl<S> tower_layer::Layer<S> for AuditLayer {
    type Service = Audit<S>;

    fn layer(&self, inner: S) -> Audit<S> {
        Audit::new(inner, self)
    }
}
