//! `RouteTimeout`: bounds the upstream exchange (up to the response head) by
//! the matched route's `timeout`, and turns the elapsed case into a typed
//! [`UpstreamTimeout`] (504). tower's own `Timeout` takes one fixed duration
//! per layer; the route decides here. A streamed response body is not cut
//! once its head has arrived (an SSE answer may run long).
//!
//! The deadline travels with the request as a [`Deadline`] extension: the
//! retry layer never waits past it, and each upstream attempt (the
//! classifier's) is bounded by it from inside the circuit breaker.
//!
//! A deadline that passes while the client is still sending its body is the
//! client's doing, not the upstream's: a stalled upload must not count as an
//! upstream timeout (five would open the shared circuit). The body is
//! watched ([`BodySent`], also read by the breaker's permit), and such a
//! timeout answers 408 as a [`ClientTimeout`], counted as nothing upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;

use crate::BoxError;
use crate::body::Body;
use crate::error::{ClientTimeout, Failure, UpstreamTimeout};
use crate::extensions::{BodySent, Deadline};
use crate::metrics::resilience::FailureCounts;
use crate::route::MatchedRoute;
use crate::service::WorkerHandle;

#[derive(Debug, Clone)]
pub struct RouteTimeoutLayer {
    fallback: Duration,
    counts: Option<Arc<FailureCounts>>,
}

impl RouteTimeoutLayer {
    /// `fallback` applies to a request no route was matched for.
    pub fn new(fallback: Duration) -> Self {
        Self {
            fallback,
            counts: None,
        }
    }

    /// Counts each timeout as an upstream failure of type `timeout`.
    pub fn counting(mut self, counts: Arc<FailureCounts>) -> Self {
        self.counts = Some(counts);
        self
    }
}

impl<S> tower::Layer<S> for RouteTimeoutLayer {
    type Service = RouteTimeout<S>;

    fn layer(&self, inner: S) -> RouteTimeout<S> {
        RouteTimeout {
            inner,
            fallback: self.fallback,
            // A handle of this worker's own (see `WorkerHandle`).
            counts: self.counts.as_ref().map(|c| Arc::new(Arc::clone(c))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteTimeout<S> {
    inner: S,
    fallback: Duration,
    counts: Option<WorkerHandle<FailureCounts>>,
}

/// The body, watched when there is one to send (bodiless requests are
/// passed as they are, with no flag).
fn watched(body: Body) -> (Body, Option<BodySent>) {
    if http_body::Body::is_end_stream(&body) {
        return (body, None);
    }
    let sent = BodySent::new();
    let body = crate::body::boxed(Tracked {
        inner: body,
        sent: sent.clone(),
    });
    (body, Some(sent))
}

/// Sets [`BodySent`] once the body has yielded its end.
struct Tracked {
    inner: Body,
    sent: BodySent,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        // hyper stops polling once `is_end_stream` says so, without asking
        // for the final `None`.
        if matches!(frame, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.sent.mark_sent();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S> tower::Service<Request<Body>> for RouteTimeout<S>
where
    S: tower::Service<Request<Body>, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let (body, sent) = watched(body);
        let mut req = Request::from_parts(parts, body);
        if let Some(s) = &sent {
            req.extensions_mut().insert(s.clone());
        }
        let after = req
            .extensions()
            .get::<MatchedRoute>()
            .map_or(self.fallback, |r| r.timeout);
        let at = tokio::time::Instant::now() + after;
        req.extensions_mut().insert(Deadline {
            at,
            route_timeout: after,
        });
        ResponseFuture {
            inner: tokio::time::timeout_at(at, self.inner.call(req)),
            after,
            counts: self.counts.clone(),
            sent,
        }
    }
}

pin_project_lite::pin_project! {
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: tokio::time::Timeout<F>,
        after: Duration,
        counts: Option<WorkerHandle<FailureCounts>>,
        sent: Option<BodySent>,
    }
}

impl<F, R> Future for ResponseFuture<F>
where
    F: Future<Output = Result<R, BoxError>>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match std::task::ready!(this.inner.poll(cx)) {
            Ok(out) => Poll::Ready(out),
            Err(_elapsed) => {
                if this.sent.as_ref().is_some_and(|s| !s.is_sent()) {
                    return Poll::Ready(Err(Box::new(ClientTimeout(*this.after))));
                }
                if let Some(c) = this.counts {
                    c.record(Failure::Timeout);
                }
                Poll::Ready(Err(Box::new(UpstreamTimeout(*this.after))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt};

    #[tokio::test(start_paused = true)]
    async fn times_out_by_the_route() {
        let slow = tower::service_fn(|_req: Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, BoxError>("late")
        });
        let counts = Arc::new(FailureCounts::default());
        let svc = RouteTimeoutLayer::new(Duration::from_secs(3))
            .counting(Arc::clone(&counts))
            .layer(slow);
        let start = tokio::time::Instant::now();
        let err = svc
            .clone()
            .oneshot(Request::new(crate::body::empty()))
            .await
            .unwrap_err();
        assert!(err.downcast_ref::<UpstreamTimeout>().is_some());
        assert_eq!(counts.get(Failure::Timeout), 1);
        assert_eq!(start.elapsed(), Duration::from_secs(3));

        let mut cfg = crate::config::Config::default();
        cfg.routes.last_mut().unwrap().timeout = Duration::from_secs(20);
        let table = crate::route::RouteTable::new(&cfg);
        let mut req = Request::new(crate::body::empty());
        req.extensions_mut()
            .insert(table.matched(&http::Method::GET, "/x"));
        assert_eq!(svc.oneshot(req).await.unwrap(), "late");
    }
}
