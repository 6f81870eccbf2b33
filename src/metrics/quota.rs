//! The upstream quota's figures, per route with an `upstream_limit`
//! ([`QuotaStats`], which the quota layer records into): requests waiting
//! for room now, the waits, and the requests refused. Exported as
//! `rag_sidecar_upstream_queue_depth{route}`,
//! `rag_sidecar_upstream_queue_wait_seconds{route}` and
//! `rag_sidecar_upstream_quota_rejected_total{route}`, with
//! `rag_sidecar_upstream_quota_stale_total{route}` and
//! `rag_sidecar_upstream_quota_calls{route,window,state}`; in `/api/metrics`
//! as the gauges `upstream_queue.<route>` and the counter
//! `upstream_quota.rejected`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Registry};
use serde_json::{Value, json};

use super::{opts, raise_vec, reg};

/// The window label of a route that learns its limit (the quota layer's
/// `LEARNED`; metrics sit below the layers, so the word is kept here).
pub const LEARNED: &str = "learned";

/// Wait buckets, in seconds: from no wait to the longest `upstream_queue`.
const WAIT_BUCKETS: [f64; 12] = [
    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// One route's figures.
#[derive(Debug, Default)]
pub struct RouteQuotaStats {
    /// Requests waiting for their turn now.
    pub waiting: AtomicU64,
    /// Requests refused (no room within their wait).
    pub rejected: AtomicU64,
    /// Requests that would have waited and were answered from a stale
    /// entry instead (`upstream_queue_stale`).
    pub stale: AtomicU64,
    /// Each limit: its words (`15 per minute`, or `learned`), its count,
    /// and the calls in its window when last looked at (the fleet's, with
    /// Redis).
    pub windows: Vec<(String, AtomicU64, AtomicU64)>,
    /// A route with no `upstream_limit`: the limit it learned (calls per
    /// minute; 0: none).
    pub learned: AtomicU64,
}

impl RouteQuotaStats {
    /// The calls in each window, as the quota last saw them.
    pub fn set_used(&self, used: &[u64]) {
        for ((_, _, at), n) in self.windows.iter().zip(used) {
            at.store(*n, Ordering::Relaxed);
        }
    }

    /// Whether the route has a quota in force: an `upstream_limit`, or a
    /// learned one.
    pub fn limited(&self) -> bool {
        self.learned.load(Ordering::Relaxed) > 0
            || self.windows.iter().any(|(label, _, _)| label != LEARNED)
    }

    /// Each window's count (a learned limit's changes).
    pub fn set_counts(&self, counts: &[u64]) {
        for ((_, at, _), n) in self.windows.iter().zip(counts) {
            at.store(*n, Ordering::Relaxed);
        }
    }

    /// The route's figures for `/api/health/detailed`: its windows, the
    /// requests waiting, and the learned limit, if any.
    pub fn to_json(&self) -> Value {
        let learned = self.learned.load(Ordering::Relaxed);
        let windows: Vec<Value> = self
            .windows
            .iter()
            .map(|(limit, count, used)| {
                let (count, used) = (count.load(Ordering::Relaxed), used.load(Ordering::Relaxed));
                json!({"limit": limit, "calls": count, "used": used, "left": count.saturating_sub(used)})
            })
            .collect();
        json!({
            "windows": windows,
            "waiting": self.waiting.load(Ordering::Relaxed),
            "rejected": self.rejected.load(Ordering::Relaxed),
            "learned_per_minute": (learned > 0).then_some(learned),
        })
    }
}

/// Every quota route's figures, and the wait histogram they record into.
#[derive(Debug)]
pub struct QuotaStats {
    /// Replaced whole by a reload ([`QuotaStats::reroute`]).
    routes: arc_swap::ArcSwap<BTreeMap<String, Arc<RouteQuotaStats>>>,
    waits: HistogramVec,
}

impl QuotaStats {
    /// Figures for these routes (those with an `upstream_limit`).
    pub fn new<'a>(routes: impl IntoIterator<Item = (&'a str, Vec<(String, u64)>)>) -> Arc<Self> {
        let waits = HistogramVec::new(
            HistogramOpts::from(opts(
                "upstream_queue_wait_seconds",
                "Time requests waited for room under the route's upstream quota",
            ))
            .buckets(WAIT_BUCKETS.to_vec()),
            &["route"],
        )
        .unwrap_or_else(|e| {
            tracing::error!("metric: {e}");
            HistogramVec::new(HistogramOpts::new("invalid", "invalid"), &["x"])
                .expect("a literal name is valid")
        });
        Arc::new(Self {
            routes: arc_swap::ArcSwap::from_pointee(Self::table(routes, &BTreeMap::new())),
            waits,
        })
    }

    /// One entry per route; a route whose limits read the same as in
    /// `before` keeps its entry, a changed one carries its counts over.
    fn table<'a>(
        routes: impl IntoIterator<Item = (&'a str, Vec<(String, u64)>)>,
        before: &BTreeMap<String, Arc<RouteQuotaStats>>,
    ) -> BTreeMap<String, Arc<RouteQuotaStats>> {
        routes
            .into_iter()
            .map(|(r, windows)| {
                let old = before.get(r);
                if let Some(old) = old.filter(|o| {
                    o.windows.len() == windows.len()
                        && o.windows.iter().zip(&windows).all(|(a, b)| a.0 == b.0)
                }) {
                    return (r.to_string(), Arc::clone(old));
                }
                let carried = |f: fn(&RouteQuotaStats) -> &AtomicU64| {
                    AtomicU64::new(old.map_or(0, |o| f(o).load(Ordering::Relaxed)))
                };
                let stats = RouteQuotaStats {
                    windows: windows
                        .into_iter()
                        .map(|(text, count)| (text, AtomicU64::new(count), AtomicU64::new(0)))
                        .collect(),
                    rejected: carried(|o| &o.rejected),
                    stale: carried(|o| &o.stale),
                    ..RouteQuotaStats::default()
                };
                (r.to_string(), Arc::new(stats))
            })
            .collect()
    }

    /// The routes of a reloaded configuration.
    pub fn reroute<'a>(&self, routes: impl IntoIterator<Item = (&'a str, Vec<(String, u64)>)>) {
        let next = Self::table(routes, &self.routes.load());
        self.routes.store(Arc::new(next));
    }

    pub fn route(&self, name: &str) -> Option<Arc<RouteQuotaStats>> {
        self.routes.load().get(name).cloned()
    }

    /// A request of `route` waited this long, then went.
    pub fn waited(&self, route: &str, secs: f64) {
        if let Ok(h) = self.waits.get_metric_with_label_values(&[route]) {
            h.observe(secs);
        }
    }

    /// The routes with a quota in force, for `/api/health/detailed`.
    pub fn to_json(&self) -> Value {
        let routes: serde_json::Map<String, Value> = self
            .routes
            .load()
            .iter()
            .filter(|(_, r)| r.limited())
            .map(|(name, r)| (name.clone(), r.to_json()))
            .collect();
        Value::Object(routes)
    }

    /// `upstream_quota.rejected` over every route.
    pub fn rejected(&self) -> u64 {
        self.routes
            .load()
            .values()
            .map(|r| r.rejected.load(Ordering::Relaxed))
            .sum()
    }
}

#[derive(Debug)]
pub struct QuotaMetrics {
    source: Arc<QuotaStats>,
    depth: IntGaugeVec,
    rejected: IntCounterVec,
    stale: IntCounterVec,
    calls: IntGaugeVec,
    learned: IntGaugeVec,
}

impl QuotaMetrics {
    pub fn new(r: &Registry, source: Arc<QuotaStats>) -> Self {
        let waits = reg(r, source.waits.clone());
        for route in source.routes.load().keys() {
            // Every route's series from the start.
            let _ = waits.get_metric_with_label_values(&[route]);
        }
        Self {
            depth: series!(
                r,
                IntGaugeVec,
                opts(
                    "upstream_queue_depth",
                    "Requests waiting for room under the route's upstream quota"
                ),
                &["route"]
            ),
            rejected: series!(
                r,
                IntCounterVec,
                opts(
                    "upstream_quota_rejected_total",
                    "Requests refused by the route's upstream quota (no room within their wait)"
                ),
                &["route"]
            ),
            stale: series!(
                r,
                IntCounterVec,
                opts(
                    "upstream_quota_stale_total",
                    "Requests that would have waited under the route's upstream quota and were answered from a stale entry (upstream_queue_stale)"
                ),
                &["route"]
            ),
            calls: series!(
                r,
                IntGaugeVec,
                opts(
                    "upstream_quota_calls",
                    "Calls in each window of the route's upstream quota (state used) and the room left (state left); the fleet's with Redis"
                ),
                &["route", "window", "state"]
            ),
            learned: series!(
                r,
                IntGaugeVec,
                opts(
                    "upstream_quota_learned",
                    "The upstream quota a route with no upstream_limit learned from the app's quota signals, in calls per minute (0: none)"
                ),
                &["route"]
            ),
            source,
        }
    }

    pub fn source(&self) -> &QuotaStats {
        &self.source
    }

    pub fn sync(&self) {
        for (name, s) in self.source.routes.load().iter() {
            if let Ok(g) = self.depth.get_metric_with_label_values(&[name]) {
                g.set(i64::try_from(s.waiting.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
            }
            raise_vec(&self.rejected, &[name], s.rejected.load(Ordering::Relaxed));
            raise_vec(&self.stale, &[name], s.stale.load(Ordering::Relaxed));
            let learned = s.learned.load(Ordering::Relaxed);
            if let Ok(g) = self.learned.get_metric_with_label_values(&[name]) {
                g.set(i64::try_from(learned).unwrap_or(i64::MAX));
            }
            for (window, count, used) in &s.windows {
                let (count, used) = (count.load(Ordering::Relaxed), used.load(Ordering::Relaxed));
                for (state, v) in [("used", used), ("left", count.saturating_sub(used))] {
                    if let Ok(g) = self
                        .calls
                        .get_metric_with_label_values(&[name, window, state])
                    {
                        g.set(i64::try_from(v).unwrap_or(i64::MAX));
                    }
                }
            }
        }
    }

    /// The legacy counter `upstream_quota.rejected`, once a route has a
    /// quota (configured or learned).
    pub fn legacy(&self, c: &mut BTreeMap<String, u64>) {
        if self.source.routes.load().values().any(|r| r.limited()) {
            c.insert("upstream_quota.rejected".into(), self.source.rejected());
        }
    }

    /// The legacy gauges `upstream_queue.<route>`.
    /// The legacy gauges `upstream_queue.<route>` of the routes with a
    /// quota, and `upstream_quota_learned.<route>` of those that learned
    /// one.
    pub fn legacy_gauges(&self, g: &mut serde_json::Map<String, Value>) {
        for (name, s) in self.source.routes.load().iter() {
            if !s.limited() {
                continue;
            }
            g.insert(
                format!("upstream_queue.{name}"),
                json!(s.waiting.load(Ordering::Relaxed)),
            );
            let learned = s.learned.load(Ordering::Relaxed);
            if learned > 0 {
                g.insert(format!("upstream_quota_learned.{name}"), json!(learned));
            }
        }
    }
}
