//! `Retry`: replays a failed upstream attempt, per PRODUCT.md "Retry and
//! circuit breaking", on tower's retry machinery (`tower::retry::Retry` with
//! a per-request [`Policy`], and its `TpsBudget`).
//!
//! A request is retried only when all of these hold:
//! * its route is retryable (`retry = true`, or `"idempotent"` and the method
//!   is idempotent);
//! * its body is replayable: up to `retry.max_replay_bytes` it is buffered
//!   for that purpose; a larger one goes upstream once, streaming;
//! * the attempt failed with a connection error, a timeout, or 429, 500, 502,
//!   503, 504 (the verdict comes from the classifier); never an answer that
//!   is not valid HTTP (`bad_response`);
//! * fewer than `max_retries` retries were made, the route's circuit is not
//!   open, the wait (backoff with jitter, or the upstream's `Retry-After`
//!   capped at `max_wait`) ends before the route's deadline, and the retry
//!   budget (`budget_percent` of recent requests plus
//!   `budget_min_per_second`) has room.
//!
//! Otherwise the last answer goes back as it is, at once. A request the
//! cache forwards while holding a stale answer for it ([`StaleAtHand`]) gets
//! one attempt: its failure is answered stale at once, not after backoff.

pub mod backoff;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body::Body as _;
use tokio::time::Instant;
use tower::ServiceExt;
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::rng::HasherRng;

use self::backoff::Backoff;
use crate::BoxError;
use crate::body::{self, Body, Buffered, read_bounded};
use crate::config::{Config, RetryMode};
use crate::error::{ClientTimeout, Failure};
use crate::extensions::{Attempt, Carried, Deadline, StaleAtHand, UpstreamFailure};
use crate::metrics::resilience::RetryStats;
use crate::proxy::X_REQUEST_ID;
use crate::route::MatchedRoute;
use crate::service::{BoxResponseFuture, Inner};

/// Answers worth another try (besides connection errors and timeouts).
const RETRY_STATUSES: [StatusCode; 5] = [
    StatusCode::TOO_MANY_REQUESTS,
    StatusCode::INTERNAL_SERVER_ERROR,
    StatusCode::BAD_GATEWAY,
    StatusCode::SERVICE_UNAVAILABLE,
    StatusCode::GATEWAY_TIMEOUT,
];

/// How long a request counts towards the budget.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Whether the route's circuit is open now: a retry would only be refused.
/// Given by `build_stack`, which owns both layers, so that the retry does not
/// reach into the breaker's module.
#[derive(Clone)]
pub struct CircuitIsOpen(pub Arc<dyn Fn(&MatchedRoute) -> bool + Send + Sync>);

impl std::fmt::Debug for CircuitIsOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CircuitIsOpen")
    }
}

#[derive(Debug)]
struct Shared {
    max_retries: u32,
    backoff: Backoff,
    max_replay: u64,
    budget: TpsBudget,
    circuit_is_open: CircuitIsOpen,
    stats: Arc<RetryStats>,
}

#[derive(Debug, Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

impl RetryLayer {
    /// The layer of worker `worker` of `workers`. Each worker keeps its own
    /// budget (its requests earn its retries) and gets its share of the
    /// per-second floor, so the process-wide bound is as configured while no
    /// budget state is shared between threads on the request path.
    pub fn new(
        cfg: &Config,
        circuit_is_open: CircuitIsOpen,
        stats: Arc<RetryStats>,
        worker: usize,
        workers: usize,
    ) -> Self {
        let r = &cfg.retry;
        let percent = (r.budget_percent / 100.0) as f32;
        Self {
            shared: Arc::new(Shared {
                max_retries: r.max_retries,
                backoff: Backoff {
                    initial: r.initial_wait,
                    max: r.max_wait,
                },
                max_replay: r.max_replay_bytes,
                budget: TpsBudget::new(
                    BUDGET_WINDOW,
                    floor_share(r.budget_min_per_second, worker, workers),
                    percent.clamp(0.0, 1000.0),
                ),
                circuit_is_open,
                stats,
            }),
        }
    }
}

/// Worker `worker`'s part of a per-second floor split over `workers`; the
/// parts add up to `floor`.
fn floor_share(floor: u32, worker: usize, workers: usize) -> u32 {
    let n = u32::try_from(workers.max(1)).unwrap_or(u32::MAX);
    let i = u32::try_from(worker).unwrap_or(u32::MAX);
    let share = floor / n + u32::from(i < floor % n);
    share.min(i32::MAX as u32 - 1)
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Inner> tower::Service<Request<Body>> for Retry<S> {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Every request earns the budget its share of retries.
        self.shared.budget.deposit();
        let stale_at_hand = req.extensions().get::<StaleAtHand>().is_some();
        if self.shared.max_retries == 0 || stale_at_hand || !retryable(&req) {
            return Box::pin(self.inner.call(req));
        }
        let sh = Arc::clone(&self.shared);
        if req.body().is_end_stream() {
            // Nothing to read (a GET): straight to the attempts.
            return attempts(sh, self.inner.clone(), req, Bytes::new());
        }
        Box::pin(replayable(sh, self.inner.clone(), req))
    }
}

/// Whether the request's route allows retrying it.
fn retryable<B>(req: &Request<B>) -> bool {
    let mode = req
        .extensions()
        .get::<MatchedRoute>()
        .map_or(RetryMode::IdempotentOnly, |r| r.retry);
    match mode {
        RetryMode::Always => true,
        RetryMode::Never => false,
        RetryMode::IdempotentOnly => req.method().is_idempotent(),
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Buffers the body if it is small enough, then runs the attempts; a body
/// too large to keep goes upstream once.
async fn replayable<S: Inner>(
    sh: Arc<Shared>,
    inner: S,
    req: Request<Body>,
) -> Result<Response<Body>, BoxError> {
    let deadline = req.extensions().get::<Deadline>().copied();
    let (parts, b) = req.into_parts();
    if content_length(&parts.headers).is_some_and(|n| n > sh.max_replay) {
        return once(inner, Request::from_parts(parts, b)).await;
    }
    let read = read_bounded(b, sh.max_replay);
    let read = match deadline {
        Some(d) => tokio::time::timeout_at(d.at, read)
            .await
            .map_err(|_| -> BoxError { Box::new(ClientTimeout(d.route_timeout)) })?,
        None => read.await,
    };
    match read? {
        Buffered::Whole(bytes) => {
            attempts(
                sh,
                inner,
                Request::from_parts(parts, body::full(bytes.clone())),
                bytes,
            )
            .await
        }
        Buffered::Partial(rest) => once(inner, Request::from_parts(parts, rest)).await,
    }
}

// These two box their futures outside any async block: awaited inside one,
// tower's generic futures trip rustc's higher-ranked `Send` check over the
// boxed error's lifetime (the same reason as `super::call_boxed`).

fn once<S: Inner>(inner: S, req: Request<Body>) -> BoxResponseFuture {
    Box::pin(inner.oneshot(req))
}

/// Runs the attempts of a request whose body is `body`.
fn attempts<S: Inner>(
    sh: Arc<Shared>,
    inner: S,
    req: Request<Body>,
    body: Bytes,
) -> BoxResponseFuture {
    let policy = Attempts {
        carried: Carried::take_from(req.extensions()),
        sh,
        body,
        done: 0,
        rng: None,
    };
    Box::pin(tower::retry::Retry::new(policy, inner).oneshot(req))
}

/// One request's retry state: the buffered body and the retries made.
#[derive(Debug, Clone)]
struct Attempts {
    sh: Arc<Shared>,
    body: Bytes,
    done: u32,
    /// The extensions the layers below read, put back on the copy only
    /// when a retry is made.
    carried: Carried,
    /// Made on the first retry: most requests never need one.
    rng: Option<HasherRng>,
}

impl Attempts {
    /// The wait before the next retry, or `None` (with the reason logged)
    /// when there is to be no retry.
    fn next_wait(
        &mut self,
        result: &Result<Response<Body>, BoxError>,
    ) -> Option<(Failure, Duration)> {
        let failure = UpstreamFailure::of(result)?;
        if failure == Failure::BadResponse {
            // The app would only answer the same again.
            tracing::debug!("not retrying: the upstream's answer was not valid HTTP");
            return None;
        }
        let answer = result.as_ref().ok();
        if answer.is_some_and(|r| !RETRY_STATUSES.contains(&r.status())) {
            return None;
        }
        if self.done >= self.sh.max_retries {
            return None;
        }
        if self
            .carried
            .route()
            .is_some_and(|r| (self.sh.circuit_is_open.0)(r))
        {
            return None;
        }
        let asked =
            answer.and_then(|r| self.sh.backoff.retry_after(r.headers(), SystemTime::now()));
        let wait = asked.unwrap_or_else(|| {
            let rng = self.rng.get_or_insert_with(HasherRng::new);
            self.sh.backoff.wait(self.done, rng)
        });
        if self
            .carried
            .deadline()
            .is_some_and(|d| Instant::now() + wait >= d.at)
        {
            tracing::debug!(
                "not retrying: a wait of {:.1}s would pass the route's deadline",
                wait.as_secs_f64()
            );
            return None;
        }
        if !self.sh.budget.withdraw() {
            self.sh
                .stats
                .budget_exhausted
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!("not retrying: retry budget spent");
            return None;
        }
        Some((failure, wait))
    }
}

impl Policy<Request<Body>, Response<Body>, BoxError> for Attempts {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut Request<Body>,
        result: &mut Result<Response<Body>, BoxError>,
    ) -> Option<Self::Future> {
        let (failure, wait) = self.next_wait(result)?;
        self.done += 1;
        self.sh.stats.retries.fetch_add(1, Ordering::Relaxed);
        let what = match result {
            Ok(r) => format!("{} (HTTP {})", failure.as_str(), r.status().as_u16()),
            Err(e) => format!("{} ({e})", failure.as_str()),
        };
        let request_id = req
            .headers()
            .get(X_REQUEST_ID)
            .and_then(|id| id.to_str().ok())
            .unwrap_or("-");
        // Counted as attempts are made: `max_retries` retries are
        // `max_retries + 1` attempts, so the last retry logs "3/4", never
        // "3/3 … Retrying" followed by a fourth.
        tracing::warn!(
            request_id,
            "Attempt {}/{} failed: {what}. Retrying in {:.1}s",
            self.done,
            self.sh.max_retries + 1,
            wait.as_secs_f64()
        );
        self.carried.put_on(req.extensions_mut());
        req.extensions_mut().insert(Attempt(self.done + 1));
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, req: &Request<Body>) -> Option<Request<Body>> {
        let b = if self.body.is_empty() {
            body::empty()
        } else {
            body::full(self.body.clone())
        };
        let mut copy = Request::new(b);
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        Some(copy)
    }
}

#[cfg(test)]
mod tests;
