//! `RequestSpool`: on a route with `request_buffering`, the request body is
//! written to an anonymous temporary file (`tempfile`, unlinked from the
//! start, so nothing is left behind whatever happens) as it arrives, and
//! the request goes on to the app only when the body is complete, with its
//! exact `Content-Length`, read back from the file. A client that drips its
//! upload a byte a second holds a file, not one of the app's workers.
//!
//! Nothing is held whole in memory: the body passes through in its own
//! chunks. The bytes on disk are bounded over every request and worker by
//! `spool_max_bytes` ([`SpoolBudget`]): a body that would take more is
//! refused with 503 and `Retry-After` ([`SpoolFull`]), at once when its
//! declared length says so. Reading the client's body keeps its own errors
//! (a body that stalls is cut by `client_body_timeout` with 408, one over
//! the route's limit is 413), so they are answered as before, and nothing
//! reaches the app.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::Either;
use http::{HeaderValue, Request, Response, header};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::BoxError;
use crate::body::{self, Body};
use crate::error::{SpoolFull, SpoolIo};
use crate::metrics::requests::SpoolFigures;
use crate::route::MatchedRoute;
use crate::service::{BoxResponseFuture, Inner, call_boxed, take_ready};

/// The bytes spooled at once, over every request and worker.
#[derive(Debug)]
pub struct SpoolBudget {
    used: AtomicU64,
    max: u64,
}

impl SpoolBudget {
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicU64::new(0),
            max,
        })
    }

    /// Bytes spooled now (for the metrics).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` more bytes for `held`, or refuses without taking any.
    fn take(&self, held: &mut Held, n: u64) -> Result<(), SpoolFull> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let next = cur.saturating_add(n);
            if next > self.max {
                return Err(SpoolFull(self.max));
            }
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    held.bytes += n;
                    return Ok(());
                }
                Err(now) => cur = now,
            }
        }
    }
}

impl SpoolFigures for SpoolBudget {
    fn spooled_bytes(&self) -> u64 {
        self.used()
    }
}

/// One request's share of the budget, given back when its file is closed
/// (the body that reads it back dropped, or the spooling abandoned).
#[derive(Debug)]
struct Held {
    budget: Arc<SpoolBudget>,
    bytes: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone)]
pub struct RequestSpoolLayer {
    budget: Arc<SpoolBudget>,
}

impl RequestSpoolLayer {
    pub fn new(budget: Arc<SpoolBudget>) -> Self {
        Self { budget }
    }
}

impl<S> tower::Layer<S> for RequestSpoolLayer {
    type Service = RequestSpool<S>;

    fn layer(&self, inner: S) -> RequestSpool<S> {
        RequestSpool {
            inner,
            budget: Arc::clone(&self.budget),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RequestSpool<S> {
    inner: S,
    budget: Arc<SpoolBudget>,
}

impl<S: Inner> tower::Service<Request<Body>> for RequestSpool<S> {
    type Response = Response<Body>;
    type Error = BoxError;
    /// A request that is not spooled goes on unboxed.
    type Future = Either<S::Future, BoxResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let on = req
            .extensions()
            .get::<MatchedRoute>()
            .is_some_and(|r| r.request_buffering);
        if !on || req.body().is_end_stream() {
            return Either::Left(self.inner.call(req));
        }
        let mut inner = take_ready(&mut self.inner);
        let budget = Arc::clone(&self.budget);
        Either::Right(Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let declared = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let (len, body) = spool(body, budget, declared).await?;
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            call_boxed(&mut inner, Request::from_parts(parts, body)).await
        }))
    }
}

/// Writes `body` to a temporary file and returns its length and a body that
/// reads it back (holding the file and its share of the budget).
async fn spool(
    mut body: Body,
    budget: Arc<SpoolBudget>,
    declared: Option<u64>,
) -> Result<(u64, Body), BoxError> {
    let mut held = Held {
        budget: Arc::clone(&budget),
        bytes: 0,
    };
    // A declared length is known now: refuse before reading a byte.
    if let Some(n) = declared {
        budget.take(&mut held, n)?;
    }
    let file = tokio::task::spawn_blocking(tempfile::tempfile)
        .await
        .map_err(|e| SpoolIo(std::io::Error::other(e)))?
        .map_err(SpoolIo)?;
    let mut file = tokio::fs::File::from_std(file);
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers are not forwarded by a spooled request
        };
        len += data.len() as u64;
        let more = len.saturating_sub(held.bytes);
        if more > 0 {
            budget.take(&mut held, more)?;
        }
        file.write_all(&data).await.map_err(SpoolIo)?;
    }
    file.flush().await.map_err(SpoolIo)?;
    file.rewind().await.map_err(SpoolIo)?;
    let chunks = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024).map(
        move |chunk: std::io::Result<Bytes>| {
            // The budget's share lives as long as the file is read.
            let _held = &held;
            chunk
                .map(Frame::data)
                .map_err(|e| -> BoxError { Box::new(SpoolIo(e)) })
        },
    );
    Ok((len, body::boxed(StreamBody::new(chunks))))
}

#[cfg(test)]
mod tests;
