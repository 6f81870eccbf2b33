//! `RequestSpool`: on a route with `request_buffering`, the request body is
//! written to an anonymous temporary file (`tempfile`, unlinked from the
//! start, so nothing is left behind whatever happens) as it arrives, and
//! the request goes on to the app only when the body is complete, with its
//! exact `Content-Length`, read back from the file. A client that drips its
//! upload a byte a second holds a file, not one of the app's workers.
//!
//! Nothing is held whole in memory: the body passes through in its own
//! chunks. The bytes on disk are bounded over every request and worker by
//! `spool_max_bytes` ([`SpoolBudget`]), and one client key (the rate
//! limiter's, else the peer's address) holds at most a quarter of it. Bytes
//! are charged as they are written, never as declared: twenty uploads that
//! declare 50 MiB and send a byte a minute hold twenty bytes, not the
//! spool. A declared length is only checked against the room left (the
//! spool's and the client's), so that a body that could never fit is
//! refused before a byte is read. A body that would take more is refused
//! with 503 and `Retry-After` ([`SpoolFull`], [`SpoolShare`]). Reading the
//! client's body keeps its own errors (one that stalls or outlasts
//! `client_body_deadline` is cut with 408, one over the route's limit is
//! 413), so they are answered as before, and nothing reaches the app.

use std::collections::HashMap;
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
use crate::error::{SpoolFull, SpoolIo, SpoolShare};
use crate::extensions::client_of;
use crate::metrics::requests::SpoolFigures;
use crate::route::MatchedRoute;
use crate::service::{BoxResponseFuture, Inner, call_boxed, take_ready};

/// The bytes spooled at once, over every request and worker, and by client.
#[derive(Debug)]
#[allow(
    clippy::disallowed_types,
    reason = "held for one charge or refund, never across an await"
)]
pub struct SpoolBudget {
    /// Over all clients (read without the lock, for the metrics).
    used: AtomicU64,
    max: u64,
    /// By client; a client with nothing on disk has no entry.
    by_client: std::sync::Mutex<HashMap<u64, u64>>,
}

impl SpoolBudget {
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicU64::new(0),
            max,
            #[allow(
                clippy::disallowed_types,
                clippy::disallowed_methods,
                reason = "see the field"
            )]
            by_client: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Bytes spooled now (for the metrics).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// One client's share: a quarter of the whole.
    fn share(&self) -> u64 {
        self.max / 4
    }

    #[allow(clippy::disallowed_types, reason = "see the field")]
    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.by_client.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `n` more bytes for `client` would fit now, taking nothing
    /// (a declared length, checked before a byte is read).
    fn room(&self, client: u64, n: u64) -> Result<(), BoxError> {
        let mine = self.clients().get(&client).copied().unwrap_or(0);
        self.check(mine, n)
    }

    fn check(&self, mine: u64, n: u64) -> Result<(), BoxError> {
        if mine.saturating_add(n) > self.share() {
            return Err(Box::new(SpoolShare(self.share())));
        }
        if self.used().saturating_add(n) > self.max {
            return Err(Box::new(SpoolFull(self.max)));
        }
        Ok(())
    }

    /// Takes `n` more bytes for `held`, or refuses without taking any.
    fn take(&self, held: &mut Held, n: u64) -> Result<(), BoxError> {
        let mut clients = self.clients();
        let mine = clients.entry(held.client).or_insert(0);
        self.check(*mine, n)?;
        *mine += n;
        self.used.fetch_add(n, Ordering::AcqRel);
        held.bytes += n;
        Ok(())
    }

    fn give_back(&self, client: u64, n: u64) {
        let mut clients = self.clients();
        if let Some(mine) = clients.get_mut(&client) {
            *mine = mine.saturating_sub(n);
            if *mine == 0 {
                clients.remove(&client);
            }
        }
        self.used.fetch_sub(n, Ordering::AcqRel);
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
    client: u64,
    bytes: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.give_back(self.client, self.bytes);
        }
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
            let client = client_of(&parts.extensions);
            let (len, body) = spool(body, budget, client, declared).await?;
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
    client: u64,
    declared: Option<u64>,
) -> Result<(u64, Body), BoxError> {
    let mut held = Held {
        budget: Arc::clone(&budget),
        client,
        bytes: 0,
    };
    // A declared length that could not fit now is refused before a byte is
    // read; one that fits takes nothing until its bytes are written.
    if let Some(n) = declared {
        budget.room(client, n)?;
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
        // Charged as written, before the write.
        budget.take(&mut held, data.len() as u64)?;
        len += data.len() as u64;
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
