//! `AccessLog`: one line per request (method, route, path, status, the
//! cache's verdict, duration, client address, request id) at INFO under the `rag_sidecar::access`
//! target, written when the response head is ready. It sits above the rescue,
//! so the sidecar's own error answers are logged with their status too.

use std::task::{Context, Poll};

use http::{Method, Request, Response};
use tokio::time::Instant;

use crate::extensions::{CacheOutcome, ClientAddr};
use crate::logging::escaped;
use crate::route::MatchedRoute;
use crate::service::{Hook, OnAnswer};

#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLogLayer;

impl<S> tower::Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog { inner }
    }
}

#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
}

/// What the log line needs from the request, taken before it moves on.
#[derive(Debug)]
pub struct Entry {
    method: Method,
    path: String,
    route: Option<MatchedRoute>,
    client: Option<ClientAddr>,
    request_id: Option<http::HeaderValue>,
    start: Instant,
}

impl<S, B, RB> tower::Service<Request<B>> for AccessLog<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = OnAnswer<S::Future, Entry>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Skip the copies entirely when the line would be filtered out.
        let entry =
            tracing::enabled!(target: "rag_sidecar::access", tracing::Level::INFO).then(|| Entry {
                method: req.method().clone(),
                path: req.uri().path().to_string(),
                route: req.extensions().get::<MatchedRoute>().cloned(),
                client: req.extensions().get::<ClientAddr>().copied(),
                request_id: req.headers().get("x-request-id").cloned(),
                start: Instant::now(),
            });
        OnAnswer::new(self.inner.call(req), entry)
    }
}

impl<RB, E> Hook<RB, E> for Entry {
    fn run(self, out: &mut Result<Response<RB>, E>) {
        let status = out.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
        let cache = out
            .as_ref()
            .ok()
            .and_then(|r| r.extensions().get::<CacheOutcome>())
            .map_or("-", |c| c.as_str());
        tracing::info!(
            target: "rag_sidecar::access",
            method = %self.method,
            route = self.route.as_ref().map_or("-", |r| r.name.as_str()),
            // The client's bytes, escaped: no forged second record.
            path = %escaped(&self.path),
            status,
            cache,
            // Microsecond precision, not f64 noise (`254.25262199999997`).
            duration_ms = (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            client = %self.client.map_or_else(|| "-".to_string(), |c| c.0.to_string()),
            request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
            "request"
        );
    }
}
