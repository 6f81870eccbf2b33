//! Metrics: what every request and upstream attempt records, and the two
//! views of it — the legacy `/api/metrics` JSON and the Prometheus
//! exposition at `/metrics`.
//!
//! Recording is sharded: each worker thread writes only its own [`Shard`]
//! (plain atomics, never contended) through its [`Recorder`]; readers add the
//! shards up. The counters are monotonic. `POST /api/metrics/reset` (the
//! legacy reset) does not zero them: it remembers a baseline that the legacy
//! view subtracts, and clears the legacy timers and recent errors, so a
//! reset never makes a Prometheus counter go backwards.
//!
//! Figures other layers own (cache, rate limits, retries, upstream failure
//! types, circuits) are read from them when a view is rendered; the
//! Prometheus registry is brought up to date from all sources at each scrape.

pub mod layer;
#[cfg(target_os = "linux")]
mod process;
pub mod window;

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde_json::{Value, json};

use self::window::{ErrorRate, Window, summary};
use crate::admin::ready::Readiness;
use crate::config::Config;
use crate::error::ErrorKind;
use crate::layers::Resilience;
use crate::layers::cache::store::CacheStore;
use crate::layers::circuit::breaker::State;
use crate::layers::classify::Failure;
use crate::layers::rate_limit::RateLimitLayer;
use crate::system::Monitor;

/// Methods as labels: a bounded set, anything else is `OTHER`.
pub const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "OTHER",
];
/// Status classes as labels.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// The sidecar's own error answers counted by kind (the upstream's failures
/// are counted by type in [`crate::layers::classify::FailureCounts`]).
pub const OWN_ERRORS: [ErrorKind; 7] = [
    ErrorKind::RateLimited,
    ErrorKind::ClientTimeout,
    ErrorKind::ClientBody,
    ErrorKind::BodyTooLarge,
    ErrorKind::Overloaded,
    ErrorKind::CircuitOpen,
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

fn method_index(m: &http::Method) -> usize {
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

/// Where the figures other layers own are read from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub cache: Arc<CacheStore>,
    pub rate_limit: RateLimitLayer,
    pub resilience: Resilience,
    pub system: Arc<Monitor>,
    pub readiness: Arc<Readiness>,
    /// Whether a Redis URL is configured.
    pub redis_configured: bool,
}

/// A worker's recording handle (see [`layer::MetricsLayer`]).
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
    pub x_cache: Option<&'a [u8]>,
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
        match f.x_cache {
            Some(b"HIT") => s.cache_hits.fetch_add(1, Ordering::Relaxed),
            Some(b"MISS") => s.cache_misses.fetch_add(1, Ordering::Relaxed),
            Some(b"STALE") => s.cache_stale.fetch_add(1, Ordering::Relaxed),
            _ => 0,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The Prometheus side: the registry and the series kept up to date at each
/// scrape.
#[derive(Debug)]
struct Prom {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    active: IntGauge,
    upstream_errors: IntCounterVec,
    own_errors: IntCounterVec,
    cache_requests: IntCounterVec,
    cache_items: IntGaugeVec,
    cache_bytes: IntGaugeVec,
    redis_up: IntGauge,
    redis_configured: IntGauge,
    ratelimit_rejected: IntCounterVec,
    ratelimit_dry_run: IntCounterVec,
    ratelimit_clients: IntGauge,
    retries: IntCounter,
    retry_budget_exhausted: IntCounter,
    circuit_state: IntGaugeVec,
    circuit_failures: IntGaugeVec,
    health_score: IntGauge,
    cpu: Gauge,
    memory_total: IntGauge,
    memory_available: IntGauge,
    disk_total: IntGauge,
    disk_free: IntGauge,
    upstream_up: IntGauge,
    upstream_probe: Gauge,
}

/// Registers `c` on `r`; a clash is a programming error caught by the tests.
fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!("metrics registration: {e}");
    }
    c
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace("rag_sidecar")
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

impl Prom {
    fn new() -> Self {
        let r = Registry::new();
        let hist = |name: &str, help: &str| {
            HistogramOpts::from(opts(name, help)).buckets(BUCKETS.to_vec())
        };
        let p = Self {
            requests: series!(
                &r,
                IntCounterVec,
                opts(
                    "requests_total",
                    "Requests answered, by route, method and status class"
                ),
                &["route", "method", "status_class"]
            ),
            request_duration: series!(
                &r,
                HistogramVec,
                hist(
                    "request_duration_seconds",
                    "Time from request to response head, by route"
                ),
                &["route"]
            ),
            upstream_duration: series!(
                &r,
                HistogramVec,
                hist(
                    "upstream_duration_seconds",
                    "Time of each upstream attempt to its response head, by route"
                ),
                &["route"]
            ),
            active: series!(
                &r,
                IntGauge,
                opts("active_requests", "Requests being answered")
            ),
            upstream_errors: series!(
                &r,
                IntCounterVec,
                opts(
                    "upstream_errors_total",
                    "Failed upstream attempts, by legacy error type"
                ),
                &["type"]
            ),
            own_errors: series!(
                &r,
                IntCounterVec,
                opts(
                    "errors_total",
                    "Error answers of the sidecar itself, by kind"
                ),
                &["kind"]
            ),
            cache_requests: series!(
                &r,
                IntCounterVec,
                opts(
                    "cache_requests_total",
                    "Cache lookups, by namespace and result"
                ),
                &["namespace", "result"]
            ),
            cache_items: series!(
                &r,
                IntGaugeVec,
                opts("cache_items", "Entries in the memory cache, by namespace"),
                &["namespace"]
            ),
            cache_bytes: series!(
                &r,
                IntGaugeVec,
                opts(
                    "cache_bytes",
                    "Bytes of the entries in the memory cache, by namespace"
                ),
                &["namespace"]
            ),
            redis_up: series!(
                &r,
                IntGauge,
                opts("cache_redis_up", "1 when Redis is configured and connected")
            ),
            redis_configured: series!(
                &r,
                IntGauge,
                opts("cache_redis_configured", "1 when a Redis URL is configured")
            ),
            ratelimit_rejected: series!(
                &r,
                IntCounterVec,
                opts(
                    "ratelimit_rejected_total",
                    "Requests answered 429, by route"
                ),
                &["route"]
            ),
            ratelimit_dry_run: series!(
                &r,
                IntCounterVec,
                opts(
                    "ratelimit_dry_run_rejected_total",
                    "Requests a dry-run limit would have rejected, by route"
                ),
                &["route"]
            ),
            ratelimit_clients: series!(
                &r,
                IntGauge,
                opts(
                    "ratelimit_tracked_clients",
                    "Client keys the rate limiters hold state for (forgotten once recovered)"
                )
            ),
            retries: series!(
                &r,
                IntCounter,
                opts("retries_total", "Upstream attempts made as retries")
            ),
            retry_budget_exhausted: series!(
                &r,
                IntCounter,
                opts(
                    "retry_budget_exhausted_total",
                    "Retries not made because the retry budget was spent"
                )
            ),
            circuit_state: series!(
                &r,
                IntGaugeVec,
                opts("circuit_state", "1 for the state each circuit is in"),
                &["circuit", "state"]
            ),
            circuit_failures: series!(
                &r,
                IntGaugeVec,
                opts(
                    "circuit_consecutive_failures",
                    "Consecutive failures counted by each circuit"
                ),
                &["circuit"]
            ),
            health_score: series!(
                &r,
                IntGauge,
                opts("health_score", "The legacy health score (0-100)")
            ),
            cpu: series!(
                &r,
                Gauge,
                opts("system_cpu_usage_ratio", "Host CPU use (0-1)")
            ),
            memory_total: series!(
                &r,
                IntGauge,
                opts(
                    "system_memory_total_bytes",
                    "Memory of the host, or the cgroup limit when one is set"
                )
            ),
            memory_available: series!(
                &r,
                IntGauge,
                opts(
                    "system_memory_available_bytes",
                    "Memory available (under the cgroup limit when one is set)"
                )
            ),
            disk_total: series!(
                &r,
                IntGauge,
                opts(
                    "system_disk_total_bytes",
                    "Size of the filesystem holding the working directory"
                )
            ),
            disk_free: series!(
                &r,
                IntGauge,
                opts("system_disk_free_bytes", "Free space on that filesystem")
            ),
            upstream_up: series!(
                &r,
                IntGauge,
                opts(
                    "upstream_up",
                    "1 when the last readiness probe of the app answered below 500"
                )
            ),
            upstream_probe: series!(
                &r,
                Gauge,
                opts(
                    "upstream_probe_duration_seconds",
                    "Duration of the last readiness probe of the app"
                )
            ),
            registry: r,
        };
        let build = series!(
            &p.registry,
            IntGaugeVec,
            opts("build_info", "Build information; always 1"),
            &["version"]
        );
        if let Ok(g) = build.get_metric_with_label_values(&[env!("CARGO_PKG_VERSION")]) {
            g.set(1);
        }
        #[cfg(target_os = "linux")]
        {
            let pc = process::ProcessMetrics::new(
                i32::try_from(std::process::id()).unwrap_or(0),
                "rag_sidecar",
            );
            if let Err(e) = p.registry.register(Box::new(pc)) {
                tracing::error!("process metrics: {e}");
            }
        }
        p
    }
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

/// Every figure, for both views.
#[derive(Debug)]
pub struct Metrics {
    enabled: bool,
    started: Instant,
    /// Route names in table order, shared with the recorders.
    route_names: Arc<[String]>,
    shards: Vec<Arc<Shard>>,
    recent: Arc<Mutex<VecDeque<Value>>>,
    /// Legacy counters and errors at the last reset.
    baseline: Mutex<BTreeMap<String, u64>>,
    sources: Sources,
    prom: Prom,
    /// One scrape at a time brings the registry up to date.
    scrape: Mutex<()>,
}

impl Metrics {
    pub fn new(cfg: &Config, sources: Sources) -> Arc<Self> {
        let route_names: Arc<[String]> = cfg.routes.iter().map(|r| r.name.clone()).collect();
        Arc::new(Self {
            enabled: cfg.metrics_enabled,
            started: Instant::now(),
            shards: (0..cfg.threads.max(1))
                .map(|_| Arc::new(Shard::new(route_names.len())))
                .collect(),
            route_names,
            recent: Arc::default(),
            baseline: Mutex::default(),
            sources,
            prom: Prom::new(),
            scrape: Mutex::new(()),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn sources(&self) -> &Sources {
        &self.sources
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
            request_duration: hist(&self.prom.request_duration),
            upstream_duration: hist(&self.prom.upstream_duration),
            started: self.started,
            recent: Arc::clone(&self.recent),
        })
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn sum(&self, f: impl Fn(&Shard) -> u64) -> u64 {
        self.shards.iter().map(|s| f(s)).sum()
    }

    fn load(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Requests of route `r` by class, over all methods.
    fn route_classes(&self, r: usize) -> [u64; 5] {
        let mut out = [0; 5];
        for s in &self.shards {
            for m in 0..METHODS.len() {
                for (c, o) in out.iter_mut().enumerate() {
                    let i = (r * METHODS.len() + m) * CLASSES.len() + c;
                    *o += s.requests.get(i).map_or(0, Self::load);
                }
            }
        }
        out
    }

    /// The legacy counters and errors as recorded since start.
    fn raw(&self) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
        let mut c = BTreeMap::new();
        c.insert(
            "requests".to_string(),
            self.sum(|s| s.requests.iter().map(Self::load).sum()),
        );
        for st in 0..500 {
            let n = self.sum(|s| Self::load(&s.status[st]));
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
        c.insert("cache.hits".into(), self.sum(|s| Self::load(&s.cache_hits)));
        c.insert(
            "cache.misses".into(),
            self.sum(|s| Self::load(&s.cache_misses)),
        );
        c.insert(
            "cache.stale".into(),
            self.sum(|s| Self::load(&s.cache_stale)),
        );
        let rl: u64 = self
            .sources
            .rate_limit
            .policies()
            .map(|(_, p)| Self::load(&p.rejected))
            .sum();
        c.insert("rate_limit.rejected".into(), rl);
        let rs = &self.sources.resilience.retries;
        c.insert("retries".into(), Self::load(&rs.retries));
        c.insert(
            "retry.budget_exhausted".into(),
            Self::load(&rs.budget_exhausted),
        );
        let mut e = BTreeMap::new();
        for f in Failure::ALL {
            e.insert(
                f.as_str().to_string(),
                self.sources.resilience.failures.get(f),
            );
        }
        for (i, k) in OWN_ERRORS.iter().enumerate() {
            e.insert(
                k.as_str().to_string(),
                self.sum(|s| Self::load(&s.own_errors[i])),
            );
        }
        (c, e)
    }

    /// `POST /api/metrics/reset`: the legacy view starts again from zero.
    pub fn reset(&self) {
        let (c, e) = self.raw();
        let mut base = lock(&self.baseline);
        base.clear();
        base.extend(c.into_iter().map(|(k, v)| (format!("c:{k}"), v)));
        base.extend(e.into_iter().map(|(k, v)| (format!("e:{k}"), v)));
        drop(base);
        for s in &self.shards {
            s.request_duration.reset();
            s.error_rate.reset();
            for w in s.upstream.iter() {
                w.reset();
            }
        }
        lock(&self.recent).clear();
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

    /// The legacy counters, since the last reset.
    pub fn counters(&self) -> Value {
        self.since_reset().0
    }

    fn since_reset(&self) -> (Value, Value) {
        let (c, e) = self.raw();
        let base = lock(&self.baseline);
        let sub = |prefix: &str, m: BTreeMap<String, u64>| {
            Value::Object(
                m.into_iter()
                    .map(|(k, v)| {
                        let b = base.get(&format!("{prefix}{k}")).copied().unwrap_or(0);
                        (k, json!(v.saturating_sub(b)))
                    })
                    .collect(),
            )
        };
        (sub("c:", c), sub("e:", e))
    }

    /// The legacy `/api/metrics` body.
    pub fn to_json(&self) -> Value {
        let (counters, errors) = self.since_reset();
        let mut gauges = serde_json::Map::new();
        gauges.insert(
            "active_requests".into(),
            json!(
                self.shards
                    .iter()
                    .map(|s| s.active.load(Ordering::Relaxed))
                    .sum::<i64>()
            ),
        );
        gauges.insert(
            "cache_size".into(),
            json!(self.sources.cache.memory_items()),
        );
        for b in self.sources.resilience.circuits.iter() {
            let v = match b.snapshot().state {
                State::Closed => 0.0,
                State::HalfOpen => 0.5,
                State::Open => 1.0,
            };
            gauges.insert(format!("circuit_state.{}", b.name()), json!(v));
        }
        json!({
            "counters": counters,
            "timers": self.timers(),
            "gauges": gauges,
            "errors": errors,
            "recent_errors": lock(&self.recent).iter().cloned().collect::<Vec<_>>(),
            "uptime_seconds": self.uptime().as_secs(),
        })
    }

    /// (requests, 5xx answers) of the last 5 minutes.
    pub fn error_window(&self) -> (u64, u64) {
        let now = self.started.elapsed().as_secs();
        self.shards
            .iter()
            .map(|s| s.error_rate.totals(now))
            .fold((0, 0), |(t, e), (a, b)| (t + a, e + b))
    }

    /// The health score from the current figures.
    pub fn health(&self) -> crate::health::Health {
        crate::health::score(&self.health_inputs())
    }

    pub fn health_inputs(&self) -> crate::health::Inputs {
        let sys = self.sources.system.latest();
        let (total, errors) = self.error_window();
        crate::health::Inputs {
            cpu_percent: sys.as_ref().map(|s| s.cpu_percent),
            memory_percent: sys.as_ref().map(|s| s.memory.percent()),
            disk_percent: sys
                .as_ref()
                .and_then(|s| s.disk.as_ref())
                .map(|d| d.percent()),
            error_rate_percent: (self.enabled && total > 0)
                .then(|| errors as f64 * 100.0 / total as f64),
            open_circuits: self
                .sources
                .resilience
                .circuits
                .iter()
                .filter(|b| b.snapshot().state != State::Closed)
                .map(|b| b.name().to_string())
                .collect(),
            redis_connected: self
                .sources
                .redis_configured
                .then(|| self.sources.cache.redis_connected()),
        }
    }

    /// The Prometheus text exposition, brought up to date first.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let _one = lock(&self.scrape);
        self.sync();
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.prom.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }

    fn sync(&self) {
        let p = &self.prom;
        for (r, route) in self.route_names.iter().enumerate() {
            for (m, method) in METHODS.iter().enumerate() {
                for (c, class) in CLASSES.iter().enumerate() {
                    let i = (r * METHODS.len() + m) * CLASSES.len() + c;
                    let v = self.sum(|s| s.requests.get(i).map_or(0, Self::load));
                    // Only combinations that occurred: 240 zero series
                    // would bloat every scrape.
                    if v > 0 {
                        raise_vec(&p.requests, &[route, method, class], v);
                    }
                }
            }
        }
        p.active.set(
            self.shards
                .iter()
                .map(|s| s.active.load(Ordering::Relaxed))
                .sum(),
        );
        for f in Failure::ALL {
            raise_vec(
                &p.upstream_errors,
                &[f.as_str()],
                self.sources.resilience.failures.get(f),
            );
        }
        for (i, k) in OWN_ERRORS.iter().enumerate() {
            raise_vec(
                &p.own_errors,
                &[k.as_str()],
                self.sum(|s| Self::load(&s.own_errors[i])),
            );
        }
        for ns in self.sources.cache.namespaces() {
            let c = &ns.counters;
            for (result, v) in [
                ("hit", &c.hits),
                ("miss", &c.misses),
                ("stale", &c.stale),
                ("bypass", &c.bypass),
                ("coalesced", &c.coalesced),
            ] {
                raise_vec(&p.cache_requests, &[&ns.name, result], Self::load(v));
            }
            if let Ok(g) = p.cache_items.get_metric_with_label_values(&[&ns.name]) {
                g.set(i64::try_from(ns.items()).unwrap_or(i64::MAX));
            }
            if let Ok(g) = p.cache_bytes.get_metric_with_label_values(&[&ns.name]) {
                g.set(i64::try_from(ns.bytes()).unwrap_or(i64::MAX));
            }
        }
        p.redis_up
            .set(i64::from(self.sources.cache.redis_connected()));
        p.redis_configured
            .set(i64::from(self.sources.redis_configured));
        for (route, policy) in self.sources.rate_limit.policies() {
            raise_vec(
                &p.ratelimit_rejected,
                &[route],
                Self::load(&policy.rejected),
            );
            raise_vec(
                &p.ratelimit_dry_run,
                &[route],
                Self::load(&policy.dry_run_rejected),
            );
        }
        p.ratelimit_clients
            .set(i64::try_from(self.sources.rate_limit.tracked_keys()).unwrap_or(i64::MAX));
        let rs = &self.sources.resilience.retries;
        raise(&p.retries, Self::load(&rs.retries));
        raise(&p.retry_budget_exhausted, Self::load(&rs.budget_exhausted));
        for b in self.sources.resilience.circuits.iter() {
            let snap = b.snapshot();
            for st in [State::Closed, State::Open, State::HalfOpen] {
                if let Ok(g) = p
                    .circuit_state
                    .get_metric_with_label_values(&[b.name(), st.as_str()])
                {
                    g.set(i64::from(snap.state == st));
                }
            }
            if let Ok(g) = p.circuit_failures.get_metric_with_label_values(&[b.name()]) {
                g.set(i64::from(snap.failure_count));
            }
        }
        p.health_score.set(i64::from(self.health().health_score));
        if let Some(s) = self.sources.system.latest() {
            p.cpu.set(s.cpu_percent / 100.0);
            p.memory_total
                .set(i64::try_from(s.memory.total).unwrap_or(i64::MAX));
            p.memory_available
                .set(i64::try_from(s.memory.available).unwrap_or(i64::MAX));
            if let Some(d) = &s.disk {
                p.disk_total.set(i64::try_from(d.total).unwrap_or(i64::MAX));
                p.disk_free.set(i64::try_from(d.free).unwrap_or(i64::MAX));
            }
        }
        if let Some(probe) = self.sources.readiness.last() {
            p.upstream_up.set(i64::from(probe.reachable));
            p.upstream_probe.set(probe.latency.as_secs_f64());
        }
    }
}
