//! The one body type that flows through the stack, constructors for the
//! sidecar's own (JSON) answers, and the bounded read that the cache (keys)
//! and the retry layer (replay) share.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderValue, Response, StatusCode, header};
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
