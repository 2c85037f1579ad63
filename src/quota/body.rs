//! The response body of [`Quota`](super::Quota): passes every frame on, reads the usage on the
//! way, and settles the request when the body ends, fails or is dropped.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::ledger::{Reservation, SpendLedger};
use super::rate::{RateLimiter, RateLimits};
use crate::audit::pricing::ModelPrice;
use crate::audit::usage::UsageScanner;
use crate::body::ResponseBody;

/// What a request owes the ledger and the rate limiter, settled once, when dropped.
///
/// Dropping is the one place a request is settled, so that every way a request can end
/// (body completed, failed, dropped by a client that went away, the inner service failing,
/// the response future dropped) settles it exactly once.
pub(crate) struct Settle {
    pub(crate) ledger: Arc<dyn SpendLedger>,
    pub(crate) limiter: Arc<dyn RateLimiter>,
    pub(crate) key: Arc<str>,
    pub(crate) reservation: Option<Reservation>,
    pub(crate) price: Option<ModelPrice>,
    pub(crate) rate: Option<(RateLimits, u64)>,
    pub(crate) stage: Stage,
    pub(crate) scanner: Option<UsageScanner>,
}

/// How far the request went, which decides what is settled without usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Not sent on (refused here, or dropped before): nothing was spent.
    Unsent,
    /// Sent on: what the usage says, else the whole reservation.
    Sent,
    /// A layer further in refused it: the upstream never saw it.
    RefusedInside,
}

impl Settle {
    fn feed(&mut self, data: &[u8]) {
        if let Some(scanner) = self.scanner.as_mut() {
            scanner.feed(data);
        }
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        let usage = self.scanner.as_mut().and_then(|scanner| {
            scanner.finish();
            (!scanner.usage_invalid())
                .then(|| scanner.take_usage())
                .flatten()
        });
        let (cost, tokens) = match self.stage {
            Stage::Unsent | Stage::RefusedInside => (Some(0.0), Some(0)),
            Stage::Sent => (
                // No usage (none reported, or none that can be right), or no price: the
                // reservation, never nothing.
                usage
                    .as_ref()
                    .and_then(|u| self.price.map(|p| p.cost(u)))
                    .filter(|c| c.is_finite()),
                usage
                    .as_ref()
                    .map(|u| u.prompt_tokens + u.completion_tokens),
            ),
        };
        if let Some(reservation) = self.reservation.take() {
            self.ledger
                .settle(&reservation.id, cost.unwrap_or(reservation.amount_usd));
        }
        if let Some((limits, estimated)) = self.rate.take() {
            if limits.tokens_per_minute.is_some() {
                self.limiter
                    .correct(&self.key, limits, estimated, tokens.unwrap_or(estimated));
            }
        }
    }
}

pin_project! {
    /// Response body of [`Quota`](super::Quota): the inner body, passed through frame by frame
    /// as it comes, while its usage is read on the fly ([`UsageScanner`]). The request is
    /// settled with the ledger when the body ends, fails, or is dropped before its end; in
    /// memory it holds the scanner's small buffer (one `usage` value), whatever the body's
    /// length.
    pub struct QuotaBody<B> {
        #[pin]
        inner: ResponseBody<B>,
        settle: Option<Settle>,
    }
}

impl<B: Body<Data = Bytes>> QuotaBody<B> {
    pub(crate) fn new(inner: ResponseBody<B>, settle: Option<Settle>) -> Self {
        // A body that will not be polled (204, HEAD, empty): settled now.
        let settle = if inner.is_end_stream() { None } else { settle };
        QuotaBody { inner, settle }
    }
}

impl<B> QuotaBody<B> {
    pub(crate) fn made(inner: ResponseBody<B>) -> Self {
        QuotaBody {
            inner,
            settle: None,
        }
    }
}

impl<B> fmt::Debug for QuotaBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaBody")
            .field("inner", &self.inner)
            .field("settled", &self.settle.is_none())
            .finish()
    }
}

impl<B> Body for QuotaBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let (Some(data), Some(settle)) = (frame.data_ref(), this.settle.as_mut()) {
                    settle.feed(data);
                }
            }
            // The end, or a failure: settle with what was seen.
            Some(Err(_)) | None => drop(this.settle.take()),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
