//! The response buffer over an app whose body records how far it was read:
//! a small answer is read whole before it is passed on; an event stream,
//! an answer declared larger than the buffer, and the buffer turned off
//! are passed on unread. And [`read_ahead`] gives back exactly what it read.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tower::{Layer, ServiceExt};

use super::*;
use crate::body;

/// A body of these chunks that counts the chunks taken from it.
fn counted(chunks: &'static [&'static str], taken: &Arc<AtomicUsize>) -> Body {
    let taken = Arc::clone(taken);
    let stream = futures_util::stream::iter(chunks.iter()).map(move |c| {
        taken.fetch_add(1, Ordering::SeqCst);
        Ok::<_, BoxError>(Frame::data(Bytes::from_static(c.as_bytes())))
    });
    body::boxed(StreamBody::new(stream))
}

use futures_util::StreamExt as _;

/// An app answering with `chunks`, of this content type and declared length.
fn app(
    chunks: &'static [&'static str],
    content_type: &'static str,
    declared: Option<u64>,
    taken: &Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Body>,
    Error = BoxError,
    Future = futures_util::future::Ready<Result<Response<Body>, BoxError>>,
> + Clone {
    let taken = Arc::clone(taken);
    tower::service_fn(move |_req: Request<Body>| {
        let mut b = counted(chunks, &taken);
        if let Some(n) = declared {
            b = body::boxed(Sized(b, n));
        }
        let mut resp = Response::new(b);
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        futures_util::future::ready(Ok(resp))
    })
}

/// A body that declares its exact length, as hyper's does with
/// `Content-Length`.
struct Sized(Body, u64);

impl http_body::Body for Sized {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx)
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.1)
    }
}

const PARTS: &[&str] = &["{\"results\": ", "[1, 2, 3]", "}"];

async fn through(limit: u64, content_type: &'static str, declared: Option<u64>) -> (usize, Bytes) {
    let taken = Arc::new(AtomicUsize::new(0));
    let svc = ResponseBufferLayer::new(limit, crate::memory::MemoryBudget::new(u64::MAX))
        .layer(app(PARTS, content_type, declared, &taken));
    let resp = svc.oneshot(Request::new(body::empty())).await.unwrap();
    // How far the app's body was read before the answer was passed on.
    let before = taken.load(Ordering::SeqCst);
    let all = resp.into_body().collect().await.unwrap().to_bytes();
    (before, all)
}

#[tokio::test]
async fn a_small_answer_is_read_whole_before_it_is_passed_on() {
    let (before, all) = through(1024, "application/json", None).await;
    assert_eq!(before, 3, "every chunk was read from the app first");
    assert_eq!(all, Bytes::from("{\"results\": [1, 2, 3]}"));
}

#[tokio::test]
async fn a_larger_answer_is_read_up_to_the_buffer_then_streams_on() {
    let (before, all) = through(5, "application/json", None).await;
    assert_eq!(before, 1, "read until past the buffer, no further");
    assert_eq!(all, Bytes::from("{\"results\": [1, 2, 3]}"));
}

#[tokio::test]
async fn event_streams_declared_large_answers_and_a_zero_buffer_are_not_held_back() {
    let (before, _) = through(1024, "text/event-stream; charset=utf-8", None).await;
    assert_eq!(before, 0, "an event stream goes on as it comes");
    let (before, _) = through(1024, "TEXT/EVENT-STREAM", None).await;
    assert_eq!(before, 0);
    let (before, all) = through(10, "application/json", Some(22)).await;
    assert_eq!(
        before, 0,
        "declared larger than the buffer: streamed from the first byte"
    );
    assert_eq!(all.len(), 22);
    let (before, _) = through(0, "application/json", None).await;
    assert_eq!(before, 0, "response_buffer = 0 turns it off");
}

#[tokio::test]
async fn read_ahead_keeps_trailers_errors_and_exact_lengths() {
    // One chunk: a full body of exact length.
    let b = read_ahead(body::full("whole"), 100, |_| true).await;
    assert_eq!(b.size_hint().exact(), Some(5));
    assert_eq!(b.collect().await.unwrap().to_bytes(), Bytes::from("whole"));

    // Data and trailers: both come back.
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc"));
    let frames = futures_util::stream::iter([
        Ok::<_, BoxError>(Frame::data(Bytes::from("a"))),
        Ok(Frame::trailers(trailers)),
    ]);
    let b = read_ahead(body::boxed(StreamBody::new(frames)), 100, |_| true).await;
    let got = b.collect().await.unwrap();
    assert_eq!(
        got.trailers().and_then(|t| t.get("x-checksum")).unwrap(),
        "abc"
    );
    assert_eq!(got.to_bytes(), Bytes::from("a"));

    // An upstream body that breaks off: what was read, then the error, as
    // a streamed answer would have ended.
    let frames = futures_util::stream::iter([
        Ok::<_, BoxError>(Frame::data(Bytes::from("part"))),
        Err("upstream went away".into()),
    ]);
    let mut b = read_ahead(body::boxed(StreamBody::new(frames)), 100, |_| true).await;
    let first = b.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, Bytes::from("part"));
    let err = b.frame().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("went away"));

    // Empty stays empty.
    let b = read_ahead(body::empty(), 100, |_| true).await;
    assert!(b.is_end_stream());
}
