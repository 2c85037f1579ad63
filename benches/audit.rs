//! The audit layer's response body wrapper on a 1 MB SSE stream (one event per frame, then the
//! usage chunk and `[DONE]`), against the same body passed through untouched.
//!
//! `cargo bench --bench audit`

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::LazyLock;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use divan::{black_box, counter::BytesCount, Bencher};
use http::{Request, Response};
use http_body::{Body, Frame};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::{AuditLayer, FnSink};
use tower_llm_policy::PolicyBody;

fn main() {
    divan::main();
}

const CONTENT: &str = "data: {\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n";
const USAGE: &str = "data: {\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

/// About 1 MB of events, one per frame.
static FRAMES: LazyLock<Vec<Bytes>> = LazyLock::new(|| {
    let mut frames: Vec<Bytes> = (0..1024 * 1024 / CONTENT.len())
        .map(|_| Bytes::from_static(CONTENT.as_bytes()))
        .collect();
    frames.push(Bytes::from_static(USAGE.as_bytes()));
    frames.push(Bytes::from_static(DONE.as_bytes()));
    frames
});

fn total_bytes() -> usize {
    FRAMES.iter().map(Bytes::len).sum()
}

struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

fn upstream() -> Response<Frames> {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Frames(FRAMES.iter().cloned().collect()))
        .unwrap()
}

/// Polls a future that never waits (everything here is in memory).
fn run<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => unreachable!("in-memory bodies never wait"),
    }
}

/// Reads a body to its end, frame by frame; the number of bytes.
fn drain<B: Body<Data = Bytes>>(body: B) -> usize {
    let mut body = pin!(body);
    let mut cx = Context::from_waker(Waker::noop());
    let mut n = 0;
    while let Poll::Ready(Some(frame)) = body.as_mut().poll_frame(&mut cx) {
        if let Ok(data) = frame
            .map_err(|_| ())
            .and_then(|f| f.into_data().map_err(|_| ()))
        {
            n += black_box(data).len();
        }
    }
    n
}

fn request(include_usage: bool) -> Request<String> {
    let options = if include_usage {
        r#","stream_options":{"include_usage":true}"#
    } else {
        ""
    };
    Request::post("/v1/chat/completions")
        .body(format!(
            r#"{{"model":"gpt-4o-mini","stream":true{options},"messages":[{{"role":"user","content":"hi"}}]}}"#
        ))
        .unwrap()
}

#[divan::bench]
fn passthrough(bencher: Bencher<'_, '_>) {
    LazyLock::force(&FRAMES);
    bencher
        .counter(BytesCount::new(total_bytes()))
        .bench(|| drain(upstream().into_body()));
}

fn audited(bencher: Bencher<'_, '_>, include_usage: bool) {
    LazyLock::force(&FRAMES);
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(FnSink::new(|r| {
            black_box(r);
        })))
        .service(service_fn(|_req: Request<PolicyBody>| async {
            Ok::<_, Infallible>(upstream())
        }));
    bencher
        .counter(BytesCount::new(total_bytes()))
        .with_inputs(|| (svc.clone(), request(include_usage)))
        .bench_local_values(|(svc, req)| {
            let res = run(ServiceExt::<Request<String>>::oneshot(svc, req)).unwrap();
            drain(res.into_body())
        });
}

/// The client asked for usage: scan only.
#[divan::bench]
fn audit_scan(bencher: Bencher<'_, '_>) {
    audited(bencher, true);
}

/// The layer asked for usage on the client's behalf: scan and strip the usage chunk.
#[divan::bench]
fn audit_scan_and_strip(bencher: Bencher<'_, '_>) {
    audited(bencher, false);
}
