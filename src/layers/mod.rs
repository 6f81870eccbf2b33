//! The proxy stack. [`build_stack`] is the one place that says which layer
//! wraps which, and why; everything else is a layer of its own module.
//!
//! Layers added first see the request first. A layer never imports another
//! layer's module: what they share travels as a typed extension
//! ([`crate::extensions`]), an error ([`crate::error`]) or, where one layer
//! must ask about another's state (the retry about the route's circuit),
//! as a function handed over here.

pub mod access_log;
pub mod attempt_span;
pub mod body_limit;
pub mod buffer;
pub mod cache;
pub mod circuit;
pub mod classify;
pub mod inflight;
pub mod match_route;
pub mod quota;
pub mod rate_limit;
pub mod rescue;
pub mod retry;
pub mod timeout;
pub mod trace_span;

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use tower::ServiceBuilder;
use tower::util::BoxCloneService;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};

use self::access_log::AccessLogLayer;
use self::attempt_span::AttemptSpanLayer;
use self::body_limit::BodyLimitLayer;
use self::buffer::ResponseBufferLayer;
use self::buffer::spool::{RequestSpoolLayer, SpoolBudget};
use self::circuit::{CircuitLayer, Circuits};
use self::classify::ClassifyLayer;
use self::match_route::MatchRouteLayer;
use self::rescue::RescueLayer;
use self::retry::{CircuitIsOpen, RetryLayer};
use self::timeout::RouteTimeoutLayer;
use self::trace_span::TraceSpanLayer;
use crate::BoxError;
use crate::body::Body;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::metrics::layer::MetricsLayer;
use crate::metrics::resilience::{FailureCounts, RetryStats};
use crate::proxy::Proxy;
use crate::route::RouteTable;
use crate::service::BoxResponseFuture;
use crate::trace::Tracing;

/// The assembled stack, type-erased once; never fails (errors are answers).
pub type ProxyStack = BoxCloneService<
    Request<Body>,
    Response<tower_http::body::UnsyncBoxBody<bytes::Bytes, BoxError>>,
    Infallible,
>;

/// Per-process state of the retry, circuit-breaker and classification
/// layers, which the admin endpoints and metrics read.
#[derive(Debug, Clone)]
pub struct Resilience {
    pub circuits: Arc<Circuits>,
    /// Upstream failures by legacy type.
    pub failures: Arc<FailureCounts>,
    pub retries: Arc<RetryStats>,
}

impl Resilience {
    pub fn new(cfg: &Config) -> Self {
        Self {
            circuits: Circuits::new(cfg),
            failures: Arc::default(),
            retries: Arc::default(),
        }
    }
}

/// What every worker's stack shares: the in-flight cap, the cache and its
/// coalescing, the limiters, the circuits and the failure figures are per
/// process.
#[derive(Debug, Clone)]
pub struct Shared {
    pub inflight: Arc<tokio::sync::Semaphore>,
    pub cache: cache::CacheLayer,
    pub rate_limit: rate_limit::RateLimitLayer,
    /// The routes' upstream quotas (`upstream_limit`).
    pub quota: quota::QuotaLayer,
    pub resilience: Resilience,
    pub metrics: Arc<Metrics>,
    /// The bytes of request bodies on disk (`spool_max_bytes`).
    pub spool: Arc<SpoolBudget>,
    /// The bytes held for clients: answers read ahead, stream backlogs
    /// (`memory_budget`).
    pub memory: Arc<crate::memory::MemoryBudget>,
    /// The trace context and, when spans are exported, the tracer.
    pub tracing: Tracing,
}

/// Assembles worker `worker`'s per-request stack over its proxy service.
pub fn build_stack(
    cfg: &Config,
    routes: RouteTable,
    proxy: Proxy,
    shared: &Shared,
    worker: usize,
) -> ProxyStack {
    let resilience = &shared.resilience;
    let recorder = cfg.metrics_enabled.then(|| shared.metrics.recorder(worker));
    let fallback_timeout = routes
        .routes()
        .last()
        .map_or(std::time::Duration::from_secs(30), |r| r.timeout);
    let stack = ServiceBuilder::new()
        // A panic anywhere below becomes a 500 JSON answer instead of a
        // connection dropped without a reply.
        .layer(CatchPanicLayer::custom(rescue::panic_response))
        // Keep the client's X-Request-Id or mint a UUID before anything logs
        // or forwards, so the app and the logs share it.
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        // Match the route once; every layer below reads the same decision.
        .layer(MatchRouteLayer::new(routes))
        // Every answer counted and timed (errors included: the rescue is
        // below), on this worker's own shard. Above the propagation below,
        // so it reads the request id off the answer instead of copying it
        // from every request.
        .option_layer(recorder.clone().map(MetricsLayer::new))
        // Return the request id on every answer, the sidecar's own errors
        // included.
        .layer(PropagateRequestIdLayer::x_request_id())
        // One access-log line per request, with the final status.
        .layer(AccessLogLayer)
        // The request's trace: the client's kept or a new one started,
        // passed on with the sidecar's span as the parent; the server span
        // when spans are exported. Above the rescue: local answers are
        // spans with the status the client gets.
        .layer(TraceSpanLayer::new(shared.tracing.clone()))
        // The one rescue: typed errors from below become JSON answers here,
        // above nothing that could fail, so the log above sees their status.
        .layer(RescueLayer)
        // The future of everything below, boxed once: each layer above
        // moves its inner future into its own, and without the box the
        // whole nested future is copied at each of them (callgrind: 689
        // instructions a proxied request, 454 a hit, less with the box).
        .map_future(|f| -> BoxResponseFuture { Box::pin(f) })
        // In-flight cap: past `max_inflight`, answer 503 at once instead of
        // queueing work the upstream cannot absorb.
        .layer(inflight::InflightLimitLayer::new(Arc::clone(
            &shared.inflight,
        )))
        // Rate limiting, before the cache: rejected requests reach neither
        // the cache nor the upstream (nor, later, the retry layer).
        .layer(shared.rate_limit.clone())
        // Refuse oversized bodies (413): a declared length at once, a
        // chunked body as it is counted. Above the cache, whose key reads
        // the body first: a declared 60 MB must not wait for the first MiB.
        .layer(BodyLimitLayer::new(cfg.max_request_body))
        // The cache: hits (and coalesced waiters) skip everything below;
        // upstream failures below come back here to be answered stale.
        .layer(shared.cache.clone())
        // Answers read from the app at once up to `response_buffer`, so a
        // client that reads slowly holds no app worker. Below the cache
        // (which reads what it stores itself), above the deadline: the
        // route's timeout still means the app's answer up to its head.
        .layer(ResponseBufferLayer::new(
            cfg.response_buffer,
            Arc::clone(&shared.memory),
        ))
        // On `request_buffering` routes the body is spooled to disk and
        // sent on only when complete: the app never waits on a slow
        // client. Below the rate limit and the cache (a refused request or
        // a hit is never spooled), above the deadline and the retry (the
        // client's pace is not the app's, and a spooled body is complete
        // before the first attempt).
        .layer(RequestSpoolLayer::new(Arc::clone(&shared.spool)))
        // The route's overall deadline; retries run inside it.
        .layer(RouteTimeoutLayer::new(fallback_timeout).counting(Arc::clone(&resilience.failures)))
        // Retries with backoff and budget, above the breaker so that each
        // attempt is admitted (or refused) by the circuit on its own.
        .option_layer(cfg.retry.enabled.then(|| {
            let circuits = Arc::clone(&resilience.circuits);
            RetryLayer::new(
                cfg,
                CircuitIsOpen(Arc::new(move |r| {
                    circuits.for_route(r).is_some_and(|b| b.is_open())
                })),
                Arc::clone(&resilience.retries),
                worker,
                cfg.threads,
            )
        }))
        // The upstream quota (`upstream_limit`): below the retry, so that
        // every attempt costs quota; below the cache, so that hits and
        // coalesced waiters cost none; above the breaker, so that a request
        // refused for want of quota (a stale answer above, or 503) is no
        // failure of the app's, and one waiting its turn holds no permit.
        .layer(shared.quota.clone())
        // One span per upstream attempt, when spans are exported: below the
        // retry and the quota (each attempt, not its wait for room), above
        // the breaker (a refused attempt is a span too).
        .option_layer(shared.tracing.tracer().cloned().map(AttemptSpanLayer::new))
        // One breaker per named circuit: open → 503 at once (or stale above).
        .layer(CircuitLayer::new(Arc::clone(&resilience.circuits)))
        // Each attempt's answer sorted into the legacy error types that the
        // breaker and the retry policy read.
        .layer(
            ClassifyLayer::new(
                cfg.retry.rate_limit_patterns.clone(),
                Arc::clone(&resilience.failures),
            )
            .timing(recorder),
        )
        .service(proxy);
    BoxCloneService::new(stack)
}
