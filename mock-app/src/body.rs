//! The response body type every handler answers with (a complete buffer, or
//! a channel fed by a task for SSE), and the constructors of the plain and
//! JSON answers and of the 400 / 404 errors.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::Response;
use hyper::StatusCode;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderValue};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Response body: either a complete buffer or a channel fed by a task (SSE).
/// An `Err` on the channel breaks the stream: the server drops the
/// connection without ending the body, as a crashing app would.
pub(crate) enum MockBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.get_mut() {
            MockBody::Full(data) => Poll::Ready(
                data.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            MockBody::Channel(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(data) => data.as_ref().is_none_or(Bytes::is_empty),
            MockBody::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |b| b.len() as u64))
            }
            MockBody::Channel(_) => SizeHint::default(),
        }
    }
}

pub(crate) type Resp = Response<MockBody>;

pub(crate) fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Resp {
    let mut resp = Response::new(MockBody::Full(Some(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

pub(crate) fn json_response(status: StatusCode, value: &Value) -> Resp {
    // Serialising a `Value` cannot fail (all map keys are strings).
    let body = serde_json::to_vec(value).unwrap_or_default();
    response(status, "application/json", Bytes::from(body))
}

pub(crate) fn static_json(status: StatusCode, body: &'static str) -> Resp {
    response(
        status,
        "application/json",
        Bytes::from_static(body.as_bytes()),
    )
}

pub(crate) fn bad_request(message: impl Into<String>) -> Resp {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": "Bad request", "message": message.into()}),
    )
}

pub(crate) fn not_found(message: impl Into<String>) -> Resp {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"error": "Not found", "message": message.into()}),
    )
}
