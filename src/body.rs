//! Body types: the request body the policy layers hand on, and the response body they answer with.

use std::any::Any;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use pin_project_lite::pin_project;

/// A boxed error, as bodies and services in the tower ecosystem use it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body that the body-reading layers pass to the inner service.
///
/// A request whose body a layer read is rebuilt from the kept [`Bytes`] (no copy); a request
/// no layer needed to read streams through untouched, boxed once. When several body-reading
/// layers are stacked, an inner layer receives a `PolicyBody` and hands it on as it is, so the
/// body type stays `PolicyBody` however many layers there are.
pub struct PolicyBody {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Stream(UnsyncBoxBody<Bytes, BoxError>),
}

impl PolicyBody {
    /// A body that is already in memory.
    pub fn full(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
        }
    }

    /// Wraps any body. A `PolicyBody` is returned as it is, not boxed a second time.
    pub fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let mut slot = Some(body);
        if let Some(own) = (&mut slot as &mut dyn Any).downcast_mut::<Option<PolicyBody>>() {
            if let Some(own) = own.take() {
                return own;
            }
        }
        match slot {
            Some(body) => Self {
                kind: Kind::Stream(body.map_err(Into::into).boxed_unsync()),
            },
            None => Self::empty(),
        }
    }

    /// The bytes of a body that is fully in memory (a layer read it), `None` for a body that
    /// streams through.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Full(bytes) => Some(bytes.as_deref().unwrap_or_default()),
            Kind::Stream(_) => None,
        }
    }
}

impl Default for PolicyBody {
    fn default() -> Self {
        Self::empty()
    }
}

impl From<Bytes> for PolicyBody {
    fn from(bytes: Bytes) -> Self {
        Self::full(bytes)
    }
}

impl From<&'static str> for PolicyBody {
    fn from(text: &'static str) -> Self {
        Self::full(Bytes::from_static(text.as_bytes()))
    }
}

impl From<String> for PolicyBody {
    fn from(text: String) -> Self {
        Self::full(Bytes::from(text))
    }
}

impl From<Vec<u8>> for PolicyBody {
    fn from(bytes: Vec<u8>) -> Self {
        Self::full(Bytes::from(bytes))
    }
}

impl std::fmt::Debug for PolicyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Full(bytes) => f
                .debug_struct("PolicyBody")
                .field("len", &bytes.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Stream(_) => f.debug_struct("PolicyBody").field("stream", &true).finish(),
        }
    }
}

impl Body for PolicyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, Bytes::len) as u64),
            Kind::Stream(body) => body.size_hint(),
        }
    }
}

pin_project! {
    /// The response body of a policy layer: either a body the layer made (a rejection, or a
    /// rewritten `GET /v1/models` list) or the inner service's body, passed through frame by
    /// frame.
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Full { #[pin] body: Full<Bytes> },
        Inner { #[pin] body: B },
    }
}

impl<B> ResponseBody<B> {
    /// A body made by a layer from bytes.
    pub(crate) fn full(bytes: Bytes) -> Self {
        Self::from_full(Full::new(bytes))
    }

    pub(crate) fn from_full(body: Full<Bytes>) -> Self {
        ResponseBody {
            kind: ResponseKind::Full { body },
        }
    }

    /// The inner service's body.
    pub(crate) fn inner(body: B) -> Self {
        ResponseBody {
            kind: ResponseKind::Inner { body },
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            ResponseKind::Full { .. } => f.write_str("ResponseBody::Full"),
            ResponseKind::Inner { .. } => f.write_str("ResponseBody::Inner"),
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ResponseKindProj::Full { body } => match body.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            ResponseKindProj::Inner { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full { body } => body.is_end_stream(),
            ResponseKind::Inner { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Full { body } => body.size_hint(),
            ResponseKind::Inner { body } => body.size_hint(),
        }
    }
}
