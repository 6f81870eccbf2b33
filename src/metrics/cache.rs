//! The cache's figures: lookups by namespace and result, the memory layer's
//! entries and bytes, whether Redis is configured and connected, and the
//! fleet's: each namespace's generation, lease takeovers and invalidations
//! queued while Redis was unreachable. The
//! cache store reports them through [`CacheFigures`], which it implements:
//! metrics never imports the cache.

use std::sync::Arc;

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Registry};
use serde_json::{Value, json};

use super::{opts, raise_vec, reg};

/// One namespace's figures, as read at a scrape.
#[derive(Debug, Clone, Default)]
pub struct NamespaceFigures {
    pub name: String,
    pub hits: u64,
    pub misses: u64,
    pub stale: u64,
    pub bypass: u64,
    pub coalesced: u64,
    /// Misses answered by another sidecar's call.
    pub coalesced_remote: u64,
    pub lease_takeovers: u64,
    pub invalidations_queued: u64,
    /// An invalidation is waiting for Redis.
    pub invalidation_pending: bool,
    pub generation: u64,
    pub items: usize,
    pub bytes: u64,
}

/// What the cache reports.
pub trait CacheFigures: Send + Sync + std::fmt::Debug {
    fn namespaces(&self) -> Vec<NamespaceFigures>;
    /// Entries in the memory layer, over every namespace.
    fn memory_items(&self) -> usize;
    fn redis_connected(&self) -> bool;
}

#[derive(Debug)]
pub struct CacheMetrics {
    source: Arc<dyn CacheFigures>,
    redis_configured: bool,
    requests: IntCounterVec,
    items: IntGaugeVec,
    bytes: IntGaugeVec,
    redis_up: IntGauge,
    redis_configured_gauge: IntGauge,
    generation: IntGaugeVec,
    takeovers: IntCounterVec,
    queued: IntCounterVec,
    pending: IntGaugeVec,
}

impl CacheMetrics {
    pub fn new(r: &Registry, source: Arc<dyn CacheFigures>, redis_configured: bool) -> Self {
        Self {
            source,
            redis_configured,
            requests: series!(
                r,
                IntCounterVec,
                opts(
                    "cache_requests_total",
                    "Cache lookups, by namespace and result"
                ),
                &["namespace", "result"]
            ),
            items: series!(
                r,
                IntGaugeVec,
                opts("cache_items", "Entries in the memory cache, by namespace"),
                &["namespace"]
            ),
            bytes: series!(
                r,
                IntGaugeVec,
                opts(
                    "cache_bytes",
                    "Bytes of the entries in the memory cache, by namespace"
                ),
                &["namespace"]
            ),
            redis_up: series!(
                r,
                IntGauge,
                opts("cache_redis_up", "1 when Redis is configured and connected")
            ),
            redis_configured_gauge: series!(
                r,
                IntGauge,
                opts("cache_redis_configured", "1 when a Redis URL is configured")
            ),
            generation: series!(
                r,
                IntGaugeVec,
                opts(
                    "cache_generation",
                    "The namespace's current generation as this sidecar knows it (grows with every invalidation)"
                ),
                &["namespace"]
            ),
            takeovers: series!(
                r,
                IntCounterVec,
                opts(
                    "cache_lease_takeovers_total",
                    "Leases taken over from another sidecar that failed, stored nothing or died"
                ),
                &["namespace"]
            ),
            queued: series!(
                r,
                IntCounterVec,
                opts(
                    "cache_invalidations_queued_total",
                    "Invalidations kept for Redis while it was unreachable"
                ),
                &["namespace"]
            ),
            pending: series!(
                r,
                IntGaugeVec,
                opts(
                    "cache_invalidation_pending",
                    "1 while an invalidation waits for Redis"
                ),
                &["namespace"]
            ),
        }
    }

    /// Whether Redis is connected; `None` when none is configured.
    pub fn redis_connected(&self) -> Option<bool> {
        self.redis_configured.then(|| self.source.redis_connected())
    }

    /// The legacy gauge `cache_size`.
    pub fn legacy_gauges(&self, g: &mut serde_json::Map<String, Value>) {
        g.insert("cache_size".into(), json!(self.source.memory_items()));
    }

    pub fn sync(&self) {
        for ns in self.source.namespaces() {
            for (result, v) in [
                ("hit", ns.hits),
                ("miss", ns.misses),
                ("stale", ns.stale),
                ("bypass", ns.bypass),
                ("coalesced", ns.coalesced),
                ("coalesced_remote", ns.coalesced_remote),
            ] {
                raise_vec(&self.requests, &[&ns.name, result], v);
            }
            raise_vec(&self.takeovers, &[&ns.name], ns.lease_takeovers);
            raise_vec(&self.queued, &[&ns.name], ns.invalidations_queued);
            if let Ok(g) = self.generation.get_metric_with_label_values(&[&ns.name]) {
                g.set(i64::try_from(ns.generation).unwrap_or(i64::MAX));
            }
            if let Ok(g) = self.pending.get_metric_with_label_values(&[&ns.name]) {
                g.set(i64::from(ns.invalidation_pending));
            }
            if let Ok(g) = self.items.get_metric_with_label_values(&[&ns.name]) {
                g.set(i64::try_from(ns.items).unwrap_or(i64::MAX));
            }
            if let Ok(g) = self.bytes.get_metric_with_label_values(&[&ns.name]) {
                g.set(i64::try_from(ns.bytes).unwrap_or(i64::MAX));
            }
        }
        self.redis_up.set(i64::from(self.source.redis_connected()));
        self.redis_configured_gauge
            .set(i64::from(self.redis_configured));
    }
}
