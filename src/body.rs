//! The one body type that flows through the stack, constructors for the
//! sidecar's own (JSON) answers, and the bounded read that the cache (keys)
//! and the retry layer (replay) share, and [`Stalling`], the body that
//! ends with an error when its client pauses too long between two reads,
//! and [`read_ahead`], which reads an answer's first bytes before it is
//! passed on.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderValue, Response, StatusCode, header};
use std::future::Future as _;

use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody, combinators::UnsyncBoxBody};

use crate::BoxError;

/// Request and response body inside the stack: streamed, type-erased once.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body into [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A body holding these bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body (no allocation: the boxed body is zero-sized).
pub fn empty() -> Body {
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A JSON response with this status.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A body read up to a bound.
#[allow(
    missing_debug_implementations,
    reason = "holds a boxed body, which has no Debug"
)]
pub enum Buffered {
    Whole(Bytes),
    /// Over the limit: what was read, followed by the rest, still streaming.
    Partial(Body),
}

/// Reads a body up to `limit` bytes without ever holding more.
pub async fn read_bounded(mut b: Body, limit: u64) -> Result<Buffered, BoxError> {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0u64;
    while let Some(frame) = b.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers are not kept
        };
        total += data.len() as u64;
        chunks.push(data);
        if total > limit {
            let read = futures_util::stream::iter(
                chunks
                    .into_iter()
                    .map(|c| Ok::<_, BoxError>(Frame::data(c))),
            );
            let rest = BodyStream::new(b);
            return Ok(Buffered::Partial(boxed(StreamBody::new(read.chain(rest)))));
        }
    }
    Ok(Buffered::Whole(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    }))
}

/// Reads up to `limit` bytes of `b` now, and returns a body that gives the
/// same frames (data and trailers) and the same end: the whole body when it
/// fit (one data frame becomes a [`Full`] body, of exact length), else what
/// was read followed by the rest, still streaming, or by the error that
/// broke it off. Unlike [`read_bounded`] nothing is lost and nothing fails
/// here: the caller only moves the reading earlier.
///
/// `keep` sees each chunk read (and may replace it, e.g. with a copy that
/// carries a charge); when it says `false` the reading ahead stops there,
/// and the rest streams as it comes.
pub async fn read_ahead(mut b: Body, limit: u64, mut keep: impl FnMut(&mut Bytes) -> bool) -> Body {
    let mut frames: Vec<Frame<Bytes>> = Vec::new();
    let mut total = 0u64;
    let tail: Option<Result<Body, BoxError>> = loop {
        match b.frame().await {
            None => break None,
            Some(Err(e)) => break Some(Err(e)),
            Some(Ok(mut frame)) => {
                let mut kept = true;
                if let Some(d) = frame.data_mut() {
                    total += d.len() as u64;
                    kept = keep(d);
                }
                frames.push(frame);
                if total > limit || !kept {
                    break Some(Ok(b));
                }
            }
        }
    };
    if tail.is_none() && frames.len() <= 1 {
        let data = frames.pop().map(Frame::into_data);
        match data {
            None => return empty(),
            Some(Ok(bytes)) => return full(bytes),
            Some(Err(trailers)) => frames.push(trailers),
        }
    }
    let read = futures_util::stream::iter(frames.into_iter().map(Ok::<_, BoxError>));
    match tail {
        None => boxed(StreamBody::new(read)),
        Some(Ok(rest)) => boxed(StreamBody::new(read.chain(BodyStream::new(rest)))),
        Some(Err(e)) => boxed(StreamBody::new(
            read.chain(futures_util::stream::once(std::future::ready(Err(e)))),
        )),
    }
}

/// Why a [`Stalling`] body was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Nothing arrived for its pause.
    Stalled,
    /// Its whole time, from its first wait for a frame, was up.
    Late,
}

pin_project_lite::pin_project! {
    /// A body cut with `on_cut(Cut::Stalled)` when no frame arrives for
    /// `pause` (restarted at every frame), and with `on_cut(Cut::Late)` when
    /// it is still arriving `whole` after it first had to wait for one. One timer serves
    /// both (armed for whichever comes first). tower-http's `TimeoutBody`
    /// does the first but does not pass on `is_end_stream` or `size_hint`,
    /// so behind it a bodiless GET would look like a body of unknown length
    /// and be sent to the app chunked; this one passes both on, so framing
    /// is unchanged.
    pub struct Stalling<B, F> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        pause: std::time::Duration,
        whole: std::time::Duration,
        // When the whole time is up, set at the first wait.
        end: Option<tokio::time::Instant>,
        on_cut: F,
    }
}

impl<B, F> Stalling<B, F> {
    pub fn new(
        inner: B,
        pause: std::time::Duration,
        whole: std::time::Duration,
        on_cut: F,
    ) -> Self {
        Self {
            inner,
            sleep: None,
            pause,
            whole,
            end: None,
            on_cut,
        }
    }
}

impl<B, F> std::fmt::Debug for Stalling<B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stalling")
            .field("pause", &self.pause)
            .field("whole", &self.whole)
            .finish()
    }
}

impl<B, F> http_body::Body for Stalling<B, F>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    F: Fn(Cut) -> BoxError,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let std::task::Poll::Ready(frame) = this.inner.poll_frame(cx) {
            this.sleep.set(None);
            return std::task::Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        // The clock is read once per wait, to arm the one timer (as a plain
        // pause timer would); the whole time starts at the first wait.
        if this.sleep.as_ref().as_pin_ref().is_none() {
            let now = tokio::time::Instant::now();
            let end = *this.end.get_or_insert(now + *this.whole);
            if now >= end {
                return std::task::Poll::Ready(Some(Err((this.on_cut)(Cut::Late))));
            }
            this.sleep
                .set(Some(tokio::time::sleep_until((now + *this.pause).min(end))));
        }
        if let Some(sleep) = this.sleep.as_mut().as_pin_mut() {
            let late = this.end.is_some_and(|end| sleep.deadline() >= end);
            if sleep.poll(cx).is_ready() {
                let cut = if late { Cut::Late } else { Cut::Stalled };
                return std::task::Poll::Ready(Some(Err((this.on_cut)(cut))));
            }
        }
        std::task::Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
