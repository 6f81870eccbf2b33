//! The proxy's own figures: every answer by route, method and status, its
//! duration, the upstream attempts' durations, the requests in flight, the
//! sidecar's own error answers by kind, and the recent errors the legacy
//! view lists.
//!
//! Recording is sharded: each worker thread writes only its own [`Shard`]
//! (plain atomics, never contended) through its [`Recorder`]; readers add the
//! shards up. The counters are monotonic. The two Prometheus duration
//! histograms (one series per route) are the exception: the workers share
//! them, as prometheus's `Histogram` is one set of atomics. On the project
//! machine (2 workers) taking their observations out entirely changed
//! nothing measurable (hits, 10 alternating rounds: 0.971×, rounds
//! 0.83–1.15), so they were not sharded; with many workers on many cores
//! they are the first place to look for contention.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "the locks guard the recent-errors list, the reset baseline and the scrape: held for a copy or an insert, never across an await, and taken only on failures, resets and scrapes"
)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Registry,
};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::window::{ErrorRate, Window, summary};
use super::{load, lock, opts, raise_vec, reg};
use crate::error::{ErrorKind, Failure};
use crate::extensions::CacheOutcome;
use crate::memory::{MemoryBudget, Use};

/// Methods as labels: a bounded set, anything else is `OTHER`.
pub const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER",
];
/// Status classes as labels.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// The sidecar's own error answers counted by kind (the upstream's failures
/// are counted by type in [`super::resilience::FailureCounts`]).
pub const OWN_ERRORS: [ErrorKind; 9] = [
    ErrorKind::RateLimited,
    ErrorKind::ClientTimeout,
    ErrorKind::ClientBody,
    ErrorKind::BodyTooLarge,
    ErrorKind::Overloaded,
    ErrorKind::SpoolFull,
    ErrorKind::CircuitOpen,
    ErrorKind::UpstreamQuota,
    ErrorKind::Internal,
];
/// Request and upstream duration buckets, in seconds: from a cache hit
/// (sub-millisecond) to a slow RAG answer (two minutes).
pub const BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];
/// Recent errors kept for `/api/metrics`.
pub const RECENT_ERRORS: usize = 20;

pub(super) fn method_index(m: &http::Method) -> usize {
    METHODS[..7]
        .iter()
        .position(|n| *n == m.as_str())
        .unwrap_or(7)
}

/// One worker's figures.
#[derive(Debug)]
pub struct Shard {
    /// [route][method][class]
    requests: Box<[AtomicU64]>,
    /// By status, 100..=599.
    status: Box<[AtomicU64]>,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    cache_stale: AtomicU64,
    own_errors: [AtomicU64; OWN_ERRORS.len()],
    active: AtomicI64,
    request_duration: Window,
    /// Per route.
    upstream: Box<[Window]>,
    error_rate: ErrorRate,
}

impl Shard {
    fn new(routes: usize) -> Self {
        Self {
            requests: (0..routes * METHODS.len() * CLASSES.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            status: (0..500).map(|_| AtomicU64::new(0)).collect(),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            cache_stale: AtomicU64::new(0),
            own_errors: Default::default(),
            active: AtomicI64::new(0),
            request_duration: Window::default(),
            upstream: (0..routes).map(|_| Window::default()).collect(),
            error_rate: ErrorRate::default(),
        }
    }
}

/// A worker's recording handle (see [`super::layer::MetricsLayer`]).
#[derive(Debug)]
pub struct Recorder {
    shard: Arc<Shard>,
    /// Route names in table order: a linear scan of a handful of short
    /// names is cheaper than hashing one.
    route_names: Arc<[String]>,
    request_duration: Vec<Histogram>,
    upstream_duration: Vec<Histogram>,
    started: Instant,
    recent: Arc<Mutex<VecDeque<Value>>>,
}

/// What a finished request looked like.
#[derive(Debug)]
pub struct Finished<'a> {
    pub route: Option<usize>,
    pub method: usize,
    pub status: u16,
    /// When the answer came (the end of `elapsed`).
    pub at: Instant,
    pub elapsed: Duration,
    pub cache: Option<CacheOutcome>,
    pub own_error: Option<(ErrorKind, &'a str)>,
    pub upstream_failure: Option<Failure>,
    pub request_id: Option<&'a str>,
}

impl Recorder {
    pub fn route(&self, name: &str) -> Option<usize> {
        self.route_names.iter().position(|n| n == name)
    }

    pub fn started(&self) {
        self.shard.active.fetch_add(1, Ordering::Relaxed);
    }

    /// A request that got no answer (its client went away).
    pub fn cancelled(&self) {
        self.shard.active.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn finished(&self, f: &Finished<'_>) {
        let s = &self.shard;
        s.active.fetch_sub(1, Ordering::Relaxed);
        let class = usize::from(f.status / 100).clamp(1, 5) - 1;
        if let Some(r) = f.route {
            let i = (r * METHODS.len() + f.method) * CLASSES.len() + class;
            if let Some(c) = s.requests.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(h) = self.request_duration.get(r) {
                h.observe(f.elapsed.as_secs_f64());
            }
        }
        if let Some(c) = s.status.get(usize::from(f.status).wrapping_sub(100)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        s.request_duration.record(f.elapsed);
        s.error_rate.record(
            f.at.saturating_duration_since(self.started).as_secs(),
            f.status >= 500,
        );
        match f.cache {
            Some(CacheOutcome::Hit) => s.cache_hits.fetch_add(1, Ordering::Relaxed),
            Some(CacheOutcome::Miss) => s.cache_misses.fetch_add(1, Ordering::Relaxed),
            Some(CacheOutcome::Stale) => s.cache_stale.fetch_add(1, Ordering::Relaxed),
            Some(CacheOutcome::Bypass) | None => 0,
        };
        let kind = f.own_error.map(|(k, _)| k);
        if let Some(i) = kind.and_then(|k| OWN_ERRORS.iter().position(|o| *o == k)) {
            s.own_errors[i].fetch_add(1, Ordering::Relaxed);
        }
        // The recent-errors list (locked, but only on failures).
        let upstream = || format!("HTTP {} from the upstream", f.status);
        let what = match (f.own_error, f.upstream_failure) {
            (Some((k, msg)), _) => Some((k.as_str(), msg.to_string())),
            (None, Some(u)) => Some((u.as_str(), upstream())),
            (None, None) if f.status >= 500 => Some(("upstream_5xx", upstream())),
            _ => None,
        };
        if let Some((kind, message)) = what {
            let unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| (d.as_secs_f64() * 1e3).round() / 1e3);
            let mut recent = lock(&self.recent);
            if recent.len() == RECENT_ERRORS {
                recent.pop_front();
            }
            recent.push_back(json!({
                "timestamp": unix,
                "type": kind,
                "status": f.status,
                "route": f.route.and_then(|r| self.route_names.get(r)),
                "request_id": f.request_id,
                "message": message,
            }));
        }
    }

    /// One upstream attempt of route `route` took `elapsed`.
    pub fn upstream(&self, route: usize, elapsed: Duration) {
        if let Some(w) = self.shard.upstream.get(route) {
            w.record(elapsed);
        }
        if let Some(h) = self.upstream_duration.get(route) {
            h.observe(elapsed.as_secs_f64());
        }
    }
}

/// The request figures: the shards and their Prometheus series.
#[derive(Debug)]
pub struct RequestMetrics {
    started: Instant,
    /// Route names in table order, shared with the recorders.
    route_names: Arc<[String]>,
    shards: Vec<Arc<Shard>>,
    recent: Arc<Mutex<VecDeque<Value>>>,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    active: IntGauge,
    own_errors: IntCounterVec,
    spool: Arc<dyn SpoolFigures>,
    spooled: IntGauge,
    memory: Arc<MemoryBudget>,
    memory_used: IntGaugeVec,
    memory_limit: IntGauge,
}

/// What the request spool (`request_buffering`) reports: the bytes of
/// request bodies on disk now, against `spool_max_bytes`.
pub trait SpoolFigures: Send + Sync + std::fmt::Debug {
    fn spooled_bytes(&self) -> u64;
}

impl RequestMetrics {
    pub fn new(
        r: &Registry,
        route_names: Arc<[String]>,
        workers: usize,
        spool: Arc<dyn SpoolFigures>,
        memory: Arc<MemoryBudget>,
    ) -> Self {
        let hist = |name: &str, help: &str| {
            HistogramOpts::from(opts(name, help)).buckets(BUCKETS.to_vec())
        };
        Self {
            started: Instant::now(),
            shards: (0..workers.max(1))
                .map(|_| Arc::new(Shard::new(route_names.len())))
                .collect(),
            route_names,
            recent: Arc::default(),
            requests: series!(
                r,
                IntCounterVec,
                opts(
                    "requests_total",
                    "Requests answered, by route, method and status class"
                ),
                &["route", "method", "status_class"]
            ),
            request_duration: series!(
                r,
                HistogramVec,
                hist(
                    "request_duration_seconds",
                    "Time from request to response head, by route"
                ),
                &["route"]
            ),
            upstream_duration: series!(
                r,
                HistogramVec,
                hist(
                    "upstream_duration_seconds",
                    "Time of each upstream attempt to its response head, by route"
                ),
                &["route"]
            ),
            active: series!(
                r,
                IntGauge,
                opts("active_requests", "Requests being answered")
            ),
            spool,
            spooled: series!(
                r,
                IntGauge,
                opts(
                    "request_spool_bytes",
                    "Bytes of request bodies spooled to disk now (request_buffering), against spool_max_bytes"
                )
            ),
            memory_used: series!(
                r,
                IntGaugeVec,
                opts(
                    "memory_budget_bytes",
                    "Bytes held for clients now, against memory_budget: answers read ahead, streams' copies for the cache, stream backlogs"
                ),
                &["use"]
            ),
            memory_limit: series!(
                r,
                IntGauge,
                opts("memory_budget_limit_bytes", "The memory_budget")
            ),
            memory,
            own_errors: series!(
                r,
                IntCounterVec,
                opts(
                    "errors_total",
                    "Error answers of the sidecar itself, by kind"
                ),
                &["kind"]
            ),
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Worker `worker`'s recording handle.
    pub fn recorder(&self, worker: usize) -> Arc<Recorder> {
        let shard = Arc::clone(&self.shards[worker % self.shards.len()]);
        let hist = |v: &HistogramVec| {
            self.route_names
                .iter()
                .filter_map(|r| v.get_metric_with_label_values(&[r.as_str()]).ok())
                .collect()
        };
        Arc::new(Recorder {
            shard,
            route_names: Arc::clone(&self.route_names),
            request_duration: hist(&self.request_duration),
            upstream_duration: hist(&self.upstream_duration),
            started: self.started,
            recent: Arc::clone(&self.recent),
        })
    }

    fn sum(&self, f: impl Fn(&Shard) -> u64) -> u64 {
        self.shards.iter().map(|s| f(s)).sum()
    }

    fn active(&self) -> i64 {
        self.shards
            .iter()
            .map(|s| s.active.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests of route `r` by class, over all methods.
    fn route_classes(&self, r: usize) -> [u64; 5] {
        let mut out = [0; 5];
        for s in &self.shards {
            for m in 0..METHODS.len() {
                for (c, o) in out.iter_mut().enumerate() {
                    let i = (r * METHODS.len() + m) * CLASSES.len() + c;
                    *o += s.requests.get(i).map_or(0, load);
                }
            }
        }
        out
    }

    /// The legacy counters of requests, statuses, routes and the cache's
    /// verdicts; the own errors by kind.
    pub fn legacy(&self, c: &mut BTreeMap<String, u64>, e: &mut BTreeMap<String, u64>) {
        c.insert(
            "requests".to_string(),
            self.sum(|s| s.requests.iter().map(load).sum()),
        );
        for st in 0..500 {
            let n = self.sum(|s| load(&s.status[st]));
            if n > 0 {
                c.insert(format!("response.{}", st + 100), n);
            }
        }
        for (r, name) in self.route_names.iter().enumerate() {
            let by = self.route_classes(r);
            let (ok, err) = (by[1] + by[2], by[3] + by[4]);
            if ok > 0 {
                c.insert(format!("{name}.success"), ok);
            }
            if err > 0 {
                c.insert(format!("{name}.error"), err);
            }
        }
        c.insert("cache.hits".into(), self.sum(|s| load(&s.cache_hits)));
        c.insert("cache.misses".into(), self.sum(|s| load(&s.cache_misses)));
        c.insert("cache.stale".into(), self.sum(|s| load(&s.cache_stale)));
        for (i, k) in OWN_ERRORS.iter().enumerate() {
            e.insert(k.as_str().to_string(), self.sum(|s| load(&s.own_errors[i])));
        }
    }

    /// The legacy gauges: requests in flight, and the memory held for
    /// clients against `memory_budget`.
    pub fn legacy_gauges(&self, g: &mut serde_json::Map<String, Value>) {
        g.insert("active_requests".into(), json!(self.active()));
        let m = &self.memory;
        for what in Use::ALL {
            g.insert(
                format!("memory_budget.{}", what.as_str()),
                json!(m.used(what)),
            );
        }
        g.insert("memory_budget.limit".into(), json!(m.max()));
    }

    /// The legacy timers: `request_duration` and `upstream.<route>`.
    pub fn timers(&self) -> Value {
        let mut t = serde_json::Map::new();
        if let Some(v) = summary(self.shards.iter().map(|s| &s.request_duration)) {
            t.insert("request_duration".into(), v);
        }
        for (r, name) in self.route_names.iter().enumerate() {
            if let Some(v) = summary(self.shards.iter().filter_map(|s| s.upstream.get(r))) {
                t.insert(format!("upstream.{name}"), v);
            }
        }
        Value::Object(t)
    }

    pub fn recent_errors(&self) -> Vec<Value> {
        lock(&self.recent).iter().cloned().collect()
    }

    /// The legacy reset: the timers, the error-rate window and the recent
    /// errors start again (the counters are monotonic).
    pub fn reset(&self) {
        for s in &self.shards {
            s.request_duration.reset();
            s.error_rate.reset();
            for w in s.upstream.iter() {
                w.reset();
            }
        }
        lock(&self.recent).clear();
    }

    /// (requests, 5xx answers) of the last 5 minutes.
    pub fn error_window(&self) -> (u64, u64) {
        let now = self.started.elapsed().as_secs();
        self.shards
            .iter()
            .map(|s| s.error_rate.totals(now))
            .fold((0, 0), |(t, e), (a, b)| (t + a, e + b))
    }

    /// Brings the series up to date.
    pub fn sync(&self) {
        for (r, route) in self.route_names.iter().enumerate() {
            for (m, method) in METHODS.iter().enumerate() {
                for (c, class) in CLASSES.iter().enumerate() {
                    let i = (r * METHODS.len() + m) * CLASSES.len() + c;
                    let v = self.sum(|s| s.requests.get(i).map_or(0, load));
                    // Only combinations that occurred: 240 zero series
                    // would bloat every scrape.
                    if v > 0 {
                        raise_vec(&self.requests, &[route, method, class], v);
                    }
                }
            }
        }
        self.active.set(self.active());
        self.spooled
            .set(i64::try_from(self.spool.spooled_bytes()).unwrap_or(i64::MAX));
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for what in Use::ALL {
            self.memory_used
                .with_label_values(&[what.as_str()])
                .set(gauge(self.memory.used(what)));
        }
        self.memory_limit.set(gauge(self.memory.max()));
        for (i, k) in OWN_ERRORS.iter().enumerate() {
            raise_vec(
                &self.own_errors,
                &[k.as_str()],
                self.sum(|s| load(&s.own_errors[i])),
            );
        }
    }
}
