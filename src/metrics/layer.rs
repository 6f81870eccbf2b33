//! `Metrics`: records every request on its worker's [`Recorder`] — route,
//! method, status, duration, the cache's verdict ([`CacheOutcome`]), the sidecar's
//! own error kind ([`crate::error::Rescued`]) or the upstream's failure type
//! ([`UpstreamFailure`]) — when the response head is ready. It sits right
//! under the route match, above the access log and the rescue, so it sees
//! every answer, errors included. A request whose client went away before
//! the answer leaves the active-requests gauge all the same.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;

use super::requests::{Finished, Recorder, method_index};
use crate::error::Rescued;
use crate::extensions::{CacheOutcome, UpstreamFailure};
use crate::route::MatchedRoute;
use crate::service::{Hook, OnAnswer};

#[derive(Debug, Clone)]
pub struct MetricsLayer {
    recorder: Arc<Recorder>,
}

impl MetricsLayer {
    /// A worker's layer over its own recorder.
    pub fn new(recorder: Arc<Recorder>) -> Self {
        Self { recorder }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> MetricsService<S> {
        MetricsService {
            inner,
            recorder: Arc::clone(&self.recorder),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
    recorder: Arc<Recorder>,
}

impl<S, B, RB> tower::Service<Request<B>> for MetricsService<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = OnAnswer<S::Future, Pending>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = req
            .extensions()
            .get::<MatchedRoute>()
            .and_then(|r| self.recorder.route(&r.name));
        self.recorder.started();
        let pending = Pending {
            recorder: Arc::clone(&self.recorder),
            route,
            method: method_index(req.method()),
            start: Instant::now(),
            done: false,
        };
        OnAnswer::new(self.inner.call(req), Some(pending))
    }
}

/// A request on its way; dropped unanswered, it still leaves the gauge.
#[derive(Debug)]
pub struct Pending {
    recorder: Arc<Recorder>,
    route: Option<usize>,
    method: usize,
    start: Instant,
    done: bool,
}

impl Pending {
    fn finish<RB>(mut self, resp: Option<&Response<RB>>) {
        self.done = true;
        let now = Instant::now();
        let ext = resp.map(Response::extensions);
        let rescued = ext.and_then(|e| e.get::<Rescued>());
        let f = Finished {
            route: self.route,
            method: self.method,
            // No answer (a service error above the rescue cannot happen):
            // counted as the 500 hyper would turn it into.
            status: resp.map_or(500, |r| r.status().as_u16()),
            at: now,
            elapsed: now - self.start,
            cache: ext.and_then(|e| e.get::<CacheOutcome>()).copied(),
            own_error: rescued.map(|r| (r.kind, r.message.as_str())),
            upstream_failure: ext.and_then(|e| e.get::<UpstreamFailure>()).map(|f| f.0),
            // Set on the answer by the request-id propagation below.
            request_id: resp
                .and_then(|r| r.headers().get("x-request-id"))
                .and_then(|v| v.to_str().ok()),
        };
        self.recorder.finished(&f);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            // Not answered: the client went away.
            self.recorder.cancelled();
        }
    }
}

impl<RB, E> Hook<RB, E> for Pending {
    fn run(self, out: &mut Result<Response<RB>, E>) {
        self.finish(out.as_ref().ok());
    }
}
