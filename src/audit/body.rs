use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::recorder::{End, Recorder};
use crate::audit::usage::UsageChunkStripper;
use crate::body::ResponseBody;

pin_project! {
    /// Response body of [`Audit`](super::Audit): the inner body, passed through frame by frame
    /// as it comes, while the usage is read from it on the fly.
    ///
    /// Holds no more than a small, bounded window whatever the body's length: the usage
    /// scanner's buffer (one `usage` object), the usage-chunk stripper's (one incomplete SSE
    /// event, at most 16 KiB, only when the layer asked the upstream for usage on the
    /// client's behalf), and the logged content when content logging is on (at most its
    /// limit). See [`buffered_high_water`](Self::buffered_high_water).
    ///
    /// The request's record is emitted once: when the body ends or fails, or when it is dropped
    /// before its end (the client went away: [`Cancelled`](super::Outcome::Cancelled)).
    pub struct AuditBody<B> {
        #[pin]
        inner: ResponseBody<B>,
        stripper: Option<UsageChunkStripper>,
        // Trailers that wait behind the last bytes the stripper held.
        queued: Option<Frame<Bytes>>,
        recorder: Option<Recorder>,
        ended: bool,
        high_water: usize,
    }
}

impl<B: Body<Data = Bytes>> AuditBody<B> {
    pub(crate) fn new(inner: ResponseBody<B>, mut recorder: Recorder, strip: bool) -> Self {
        let mut ended = false;
        let recorder = if recorder.is_rejection() {
            // A body the policy made: nothing to observe, the record is complete now.
            recorder.set_response_bytes(inner.size_hint().exact().unwrap_or(0));
            recorder.finish(End::Completed);
            None
        } else if inner.is_end_stream() {
            // No body will be polled (204, HEAD, an empty body): the response is complete.
            recorder.finish(End::Completed);
            ended = true;
            None
        } else {
            Some(recorder)
        };
        AuditBody {
            inner,
            stripper: strip.then(UsageChunkStripper::new),
            queued: None,
            recorder,
            ended,
            high_water: 0,
        }
    }
}

impl<B> AuditBody<B> {
    /// The most bytes this wrapper has held at once so far (usage scanner, stripper and logged
    /// content together; buffer capacities). It stays within a few KiB whatever the length of
    /// the body.
    pub fn buffered_high_water(&self) -> usize {
        self.high_water
    }
}

impl<B> fmt::Debug for AuditBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditBody")
            .field("inner", &self.inner)
            .field("stripping", &self.stripper.is_some())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

fn concat(a: Bytes, b: Bytes) -> Bytes {
    if a.is_empty() {
        return b;
    }
    if b.is_empty() {
        return a;
    }
    let mut out = BytesMut::with_capacity(a.len() + b.len());
    out.extend_from_slice(&a);
    out.extend_from_slice(&b);
    out.freeze()
}

impl<B> Body for AuditBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if let Some(trailers) = this.queued.take() {
            finish(this.recorder, this.ended, End::Completed);
            return Poll::Ready(Some(Ok(trailers)));
        }
        if *this.ended {
            return Poll::Ready(None);
        }
        loop {
            let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    finish(this.recorder, this.ended, End::Failed);
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    let held = this.stripper.as_mut().map(UsageChunkStripper::finish);
                    let held = held.filter(|held| !held.is_empty());
                    if let (Some(held), Some(recorder)) = (&held, this.recorder.as_mut()) {
                        recorder.on_forwarded(held);
                    }
                    finish(this.recorder, this.ended, End::Completed);
                    return Poll::Ready(held.map(|held| Ok(Frame::data(held))));
                }
            };
            let at_end = this.inner.is_end_stream();
            let frame = match frame.into_data() {
                Ok(data) => {
                    if let Some(recorder) = this.recorder.as_mut() {
                        recorder.on_upstream(&data);
                    }
                    let out = match this.stripper.as_mut() {
                        Some(stripper) => {
                            let out = stripper.push(data);
                            let out = if at_end {
                                concat(out, stripper.finish())
                            } else {
                                out
                            };
                            *this.high_water = (*this.high_water).max(
                                stripper.buffered_high_water()
                                    + this.recorder.as_ref().map_or(0, Recorder::buffered),
                            );
                            out
                        }
                        None => data,
                    };
                    if let Some(recorder) = this.recorder.as_mut() {
                        recorder.on_forwarded(&out);
                        *this.high_water = (*this.high_water).max(
                            recorder.buffered()
                                + this
                                    .stripper
                                    .as_ref()
                                    .map_or(0, UsageChunkStripper::buffered_high_water),
                        );
                    }
                    if out.is_empty() {
                        if at_end {
                            finish(this.recorder, this.ended, End::Completed);
                            return Poll::Ready(None);
                        }
                        // Everything was held back or removed: nothing to send yet.
                        continue;
                    }
                    Frame::data(out)
                }
                Err(trailers) => {
                    let held = this.stripper.as_mut().map(UsageChunkStripper::finish);
                    match held.filter(|held| !held.is_empty()) {
                        Some(held) => {
                            if let Some(recorder) = this.recorder.as_mut() {
                                recorder.on_forwarded(&held);
                            }
                            *this.queued = Some(trailers);
                            return Poll::Ready(Some(Ok(Frame::data(held))));
                        }
                        None => trailers,
                    }
                }
            };
            if at_end {
                finish(this.recorder, this.ended, End::Completed);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        // True only once the record is emitted (see `poll_frame`), so that a server which stops
        // polling at the end and drops the body does not make it look cancelled.
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        if self.stripper.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

fn finish(recorder: &mut Option<Recorder>, ended: &mut bool, end: End) {
    *ended = true;
    if let Some(mut recorder) = recorder.take() {
        recorder.finish(end);
    }
}
