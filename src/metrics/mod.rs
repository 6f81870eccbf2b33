//! Metrics: what every request and upstream attempt records, and the two
//! views of it — the legacy `/api/metrics` JSON ([`legacy`]) and the
//! Prometheus exposition at `/metrics`.
//!
//! Each concern registers its own series and exports its own figures:
//! [`requests`] (the proxy: answers, durations, own errors), [`cache`],
//! [`redis`] (command failures), [`quota`] (the upstream quota), [`trace`]
//! (span export),
//! [`rate_limit`], [`resilience`] (retries, upstream failures, circuits) and
//! [`system`] (machine, health score, readiness probe, process). Metrics
//! imports no layer: the layers record into the types defined here
//! ([`resilience::FailureCounts`], [`resilience::RetryStats`],
//! [`redis::RedisErrors`], [`trace::SpanCounts`], a worker's
//! [`Recorder`]) or report their state through a trait defined here and
//! implemented by them ([`cache::CacheFigures`],
//! [`rate_limit::RateLimitFigures`], [`resilience::CircuitFigures`],
//! [`system::ProbeFigures`], [`requests::SpoolFigures`]). The registry is brought up to date from all of
//! them at each scrape.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "the locks guard the recent-errors list, the reset baseline and the scrape: held for a copy or an insert, never across an await, and taken only on failures, resets and scrapes"
)]

/// Registers `c` on `r`; a clash is a programming error caught by the tests.
fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &prometheus::Registry, c: C) -> C {
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!("metrics registration: {e}");
    }
    c
}

fn opts(name: &str, help: &str) -> prometheus::Opts {
    prometheus::Opts::new(name, help).namespace("rag_sidecar")
}

/// Constructors that cannot fail for the literal names and labels used
/// here; a failure (a typo) is logged and the series left out.
macro_rules! series {
    ($r:expr, $ty:ident, $opts:expr) => {
        reg(
            $r,
            $ty::with_opts($opts).unwrap_or_else(|e| {
                tracing::error!("metric: {e}");
                $ty::with_opts(opts("invalid", "invalid")).expect("a literal name is valid")
            }),
        )
    };
    ($r:expr, $ty:ident, $opts:expr, $labels:expr) => {
        reg(
            $r,
            $ty::new($opts, $labels).unwrap_or_else(|e| {
                tracing::error!("metric: {e}");
                $ty::new(opts("invalid", "invalid").into(), &["x"])
                    .expect("a literal name is valid")
            }),
        )
    };
}

pub mod cache;
pub mod layer;
pub mod legacy;
#[cfg(target_os = "linux")]
mod process;
pub mod quota;
pub mod rate_limit;
pub mod redis;
pub mod requests;
pub mod resilience;
pub mod system;
pub mod trace;
pub mod window;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus::{Encoder, IntCounter, IntCounterVec, Registry, TextEncoder};

pub use self::requests::{
    BUCKETS, CLASSES, Finished, METHODS, OWN_ERRORS, RECENT_ERRORS, Recorder,
};
use crate::config::Config;
use crate::health::{Health, Inputs};
use crate::system::Monitor;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A counter's current value (the figures are independent: relaxed).
fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// Raises a counter to `v` (the sources are monotonic).
fn raise(c: &IntCounter, v: u64) {
    let cur = c.get();
    if v > cur {
        c.inc_by(v - cur);
    }
}

/// Raises one series of a vector to `v`, creating it (at 0) if need be:
/// series of a bounded, known label set are exported from the start, so a
/// rate over them works before the first event.
fn raise_vec(c: &IntCounterVec, labels: &[&str], v: u64) {
    if let Ok(c) = c.get_metric_with_label_values(labels) {
        raise(&c, v);
    }
}

/// Where the figures other parts own are read from (see the module doc).
#[derive(Debug, Clone)]
pub struct Sources {
    pub cache: Arc<dyn cache::CacheFigures>,
    pub rate_limit: Arc<dyn rate_limit::RateLimitFigures>,
    pub failures: Arc<resilience::FailureCounts>,
    pub retries: Arc<resilience::RetryStats>,
    pub circuits: Arc<dyn resilience::CircuitFigures>,
    pub system: Arc<Monitor>,
    pub probe: Arc<dyn system::ProbeFigures>,
    pub spool: Arc<dyn requests::SpoolFigures>,
    /// The bytes held for clients (`memory_budget`).
    pub memory: Arc<crate::memory::MemoryBudget>,
    /// Redis command failures, which the Redis client records.
    pub redis_errors: Arc<redis::RedisErrors>,
    /// The upstream quota's figures, which the quota layer records.
    pub quota: Arc<quota::QuotaStats>,
    /// What became of the finished spans, which the trace exporter records.
    pub spans: Arc<trace::SpanCounts>,
    /// Whether a Redis URL is configured.
    pub redis_configured: bool,
}

/// Every figure, for both views.
#[derive(Debug)]
pub struct Metrics {
    enabled: bool,
    registry: Registry,
    requests: requests::RequestMetrics,
    cache: cache::CacheMetrics,
    redis: redis::RedisMetrics,
    quota: quota::QuotaMetrics,
    trace: trace::TraceMetrics,
    rate_limit: rate_limit::RateLimitMetrics,
    resilience: resilience::ResilienceMetrics,
    system: system::SystemMetrics,
    baseline: legacy::Baseline,
    /// Configuration reloads, by result (`applied`, `refused`).
    reloads: prometheus::IntCounterVec,
    /// One scrape at a time brings the registry up to date.
    scrape: Mutex<()>,
}

impl Metrics {
    pub fn new(cfg: &Config, sources: Sources) -> Arc<Self> {
        let route_names: Arc<[String]> = cfg.routes.iter().map(|r| r.name.clone()).collect();
        let r = Registry::new();
        Arc::new(Self {
            enabled: cfg.metrics_enabled,
            requests: requests::RequestMetrics::new(
                &r,
                route_names,
                cfg.threads,
                sources.spool,
                sources.memory,
            ),
            cache: cache::CacheMetrics::new(&r, sources.cache, sources.redis_configured),
            redis: redis::RedisMetrics::new(&r, sources.redis_errors),
            quota: quota::QuotaMetrics::new(&r, sources.quota),
            trace: trace::TraceMetrics::new(&r, sources.spans),
            rate_limit: rate_limit::RateLimitMetrics::new(&r, sources.rate_limit),
            resilience: resilience::ResilienceMetrics::new(
                &r,
                sources.failures,
                sources.retries,
                sources.circuits,
            ),
            system: system::SystemMetrics::new(&r, sources.system, sources.probe),
            reloads: {
                let v = series!(
                    &r,
                    IntCounterVec,
                    opts(
                        "config_reloads_total",
                        "Configuration reloads (SIGHUP or the file changed), by result"
                    ),
                    &["result"]
                );
                for result in ["applied", "refused"] {
                    let _ = v.get_metric_with_label_values(&[result]);
                }
                v
            },
            registry: r,
            baseline: legacy::Baseline::default(),
            scrape: Mutex::new(()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A reload was `applied` or `refused`.
    pub fn reloaded(&self, result: &str) {
        if let Ok(c) = self.reloads.get_metric_with_label_values(&[result]) {
            c.inc();
        }
    }

    /// Worker `worker`'s recording handle.
    pub fn recorder(&self, worker: usize) -> Arc<Recorder> {
        self.requests.recorder(worker)
    }

    pub fn uptime(&self) -> Duration {
        self.requests.started().elapsed()
    }

    /// (requests, 5xx answers) of the last 5 minutes.
    pub fn error_window(&self) -> (u64, u64) {
        self.requests.error_window()
    }

    /// The health score from the current figures.
    /// The routes with an upstream quota in force (configured or learned),
    /// for `/api/health/detailed`.
    pub fn quota_json(&self) -> serde_json::Value {
        self.quota.source().to_json()
    }

    pub fn health(&self) -> Health {
        crate::health::score(&self.health_inputs())
    }

    pub fn health_inputs(&self) -> Inputs {
        let sys = self.system.latest();
        let (total, errors) = self.error_window();
        Inputs {
            cpu_percent: sys.as_ref().map(|s| s.cpu_percent),
            memory_percent: sys.as_ref().map(|s| s.memory.percent()),
            disk_percent: sys
                .as_ref()
                .and_then(|s| s.disk.as_ref())
                .map(|d| d.percent()),
            error_rate_percent: (self.enabled && total > 0)
                .then(|| errors as f64 * 100.0 / total as f64),
            open_circuits: self.resilience.open_circuits(),
            redis_connected: self.cache.redis_connected(),
        }
    }

    /// The Prometheus text exposition, brought up to date first.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let _one = lock(&self.scrape);
        self.requests.sync();
        self.cache.sync();
        self.redis.sync();
        self.quota.sync();
        self.trace.sync();
        self.rate_limit.sync();
        self.resilience.sync();
        self.system.sync(self.health().health_score);
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}
