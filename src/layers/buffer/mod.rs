//! Buffering, so that a slow client never holds one of the app's workers
//! (gunicorn's sync workers serve one request each, start to finish, and
//! its documentation asks for a buffering proxy in front of them, as nginx
//! is by default):
//!
//! - [`ResponseBufferLayer`]: an answer of up to `response_buffer` bytes is
//!   read from the app at once, before it is passed up, so the app's worker
//!   and its connection are free whatever pace the client reads at. A
//!   larger answer streams on after its first `response_buffer` bytes; a
//!   `text/event-stream` answer is never held back (its events must reach
//!   the client as they come). What is read ahead is charged to the
//!   process's `memory_budget` ([`crate::memory`]) until it has been
//!   written to the client; when the budget has no room, the answer
//!   streams unbuffered (the app's worker then waits on that one client,
//!   as without buffering), so clients that never read cannot take the
//!   process's memory.
//! - [`spool::RequestSpoolLayer`]: on routes with `request_buffering`, the
//!   request body is written to a temporary file as it arrives and sent to
//!   the app only once complete, at disk speed.
//!
//! Both sit above the route's timeout: the time a client takes to send or
//! to read is governed by `client_body_timeout`, not by the route's
//! `timeout`, which keeps meaning "the app's answer, up to its head".

pub mod spool;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response, header};
use http_body::Body as _;

use std::sync::Arc;

use crate::BoxError;
use crate::body::{Body, read_ahead};
use crate::memory::{self, MemoryBudget};

/// Reads answers of up to `limit` bytes from the app before passing them
/// on, while `budget` has room for them.
#[derive(Debug, Clone)]
pub struct ResponseBufferLayer {
    limit: u64,
    budget: Arc<MemoryBudget>,
}

impl ResponseBufferLayer {
    /// `limit` 0 turns buffering off.
    pub fn new(limit: u64, budget: Arc<MemoryBudget>) -> Self {
        Self { limit, budget }
    }
}

impl<S> tower::Layer<S> for ResponseBufferLayer {
    type Service = ResponseBuffer<S>;

    fn layer(&self, inner: S) -> ResponseBuffer<S> {
        ResponseBuffer {
            inner,
            limit: self.limit,
            budget: Arc::clone(&self.budget),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ResponseBuffer<S> {
    inner: S,
    limit: u64,
    budget: Arc<MemoryBudget>,
}

impl<S> tower::Service<Request<Body>> for ResponseBuffer<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ReadingAhead<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        ReadingAhead {
            answer: self.inner.call(req),
            limit: self.limit,
            budget: Arc::clone(&self.budget),
            reading: None,
        }
    }
}

type Reading = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

pin_project_lite::pin_project! {
    /// The inner service's answer, read ahead when [`worth_reading_ahead`]:
    /// no allocation for an answer passed on as it is.
    pub struct ReadingAhead<F> {
        #[pin]
        answer: F,
        limit: u64,
        budget: Arc<MemoryBudget>,
        reading: Option<Reading>,
    }
}

impl<F> Future for ReadingAhead<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(reading) = this.reading.as_mut() {
            return reading.as_mut().poll(cx).map(Ok);
        }
        let resp = std::task::ready!(this.answer.poll(cx))?;
        let limit = *this.limit;
        if !worth_reading_ahead(&resp, limit) {
            return Poll::Ready(Ok(resp));
        }
        let (parts, body) = resp.into_parts();
        let budget = Arc::clone(this.budget);
        // Each chunk carries its charge until hyper has written it; no room
        // left: the reading ahead stops and the rest streams.
        let keep = move |chunk: &mut bytes::Bytes| match budget.try_answer(chunk.len() as u64) {
            Some(charge) => {
                *chunk = memory::charged(std::mem::take(chunk), charge);
                true
            }
            None => false,
        };
        let reading = this.reading.insert(Box::pin(async move {
            Response::from_parts(parts, read_ahead(body, limit, keep).await)
        }));
        reading.as_mut().poll(cx).map(Ok)
    }
}

/// Whether an answer is read ahead: buffering on, not an event stream, not
/// already complete, and not declared larger than the buffer (that one streams
/// from its first byte, as it would have anyway after `limit` bytes).
fn worth_reading_ahead(resp: &Response<Body>, limit: u64) -> bool {
    let body = resp.body();
    if limit == 0 || body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n > limit) {
        return false;
    }
    !resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_event_stream)
}

fn is_event_stream(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
}

#[cfg(test)]
mod tests;
