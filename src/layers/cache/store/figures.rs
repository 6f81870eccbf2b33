//! The cache's figures: its counters, the `/api/cache/stats` body and what
//! the metrics read.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use super::CacheStore;
use crate::metrics::cache::{CacheFigures, NamespaceFigures};
use crate::redis::RedisStore;

/// Counters, process-wide and per namespace (relaxed atomics: figures, not
/// synchronisation).
#[derive(Debug, Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stale: AtomicU64,
    pub bypass: AtomicU64,
    pub coalesced: AtomicU64,
    /// Misses answered by another sidecar's upstream call (its lease).
    pub coalesced_remote: AtomicU64,
    /// Leases taken over from a holder that failed, stored nothing or died.
    pub lease_takeovers: AtomicU64,
    /// Invalidations Redis could not take at once, kept until it could.
    pub invalidations_queued: AtomicU64,
    pub sets: AtomicU64,
    pub deletes: AtomicU64,
    pub errors: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn to_json(&self) -> serde_json::Map<String, Value> {
        let (hits, misses) = (Self::get(&self.hits), Self::get(&self.misses));
        let rate = if hits + misses == 0 {
            0.0
        } else {
            (hits as f64 * 10_000.0 / (hits + misses) as f64).round() / 100.0
        };
        let v = json!({
            "hits": hits,
            "misses": misses,
            "hit_rate": rate,
            "stale": Self::get(&self.stale),
            "bypass": Self::get(&self.bypass),
            "coalesced": Self::get(&self.coalesced),
            "coalesced_remote": Self::get(&self.coalesced_remote),
            "lease_takeovers": Self::get(&self.lease_takeovers),
            "invalidations_queued": Self::get(&self.invalidations_queued),
            "sets": Self::get(&self.sets),
            "deletes": Self::get(&self.deletes),
            "errors": Self::get(&self.errors),
        });
        match v {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        }
    }
}

impl CacheStore {
    /// The `/api/cache/stats` body: the legacy fields plus per-namespace ones.
    pub fn stats_json(&self) -> Value {
        let mut m = self.counters.to_json();
        // The layer in use now, as the legacy app reported it: "memory"
        // while Redis is off or down (its troubleshooting guide's "backend
        // shows memory instead of redis"), "redis" again once reconnected.
        let connected = self.redis_connected();
        m.insert(
            "backend".into(),
            json!(if connected { "redis" } else { "memory" }),
        );
        m.insert("memory_items".into(), json!(self.memory_items()));
        m.insert("redis_connected".into(), json!(connected));
        if let Some(server) = self.redis.as_ref().and_then(RedisStore::server) {
            // Where the commands go now (the primary, under Sentinel).
            m.insert("redis_server".into(), json!(server));
        }
        let mut names: Vec<_> = self.namespaces.values().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        let per: serde_json::Map<String, Value> = names
            .into_iter()
            .map(|n| {
                let mut v = n.counters.to_json();
                v.insert("items".into(), json!(n.items()));
                v.insert("bytes".into(), json!(n.bytes()));
                v.insert("max_items".into(), json!(n.max_items));
                v.insert("ttl_seconds".into(), json!(n.ttl().as_secs()));
                v.insert("generation".into(), json!(n.generation()));
                v.insert("invalidation_pending".into(), json!(n.owes()));
                v.insert(
                    "remote_waiting".into(),
                    json!(n.remote_waiting.load(Ordering::Relaxed)),
                );
                (n.name.clone(), Value::Object(v))
            })
            .collect();
        m.insert("namespaces".into(), Value::Object(per));
        Value::Object(m)
    }
}

/// The store reports its figures to the metrics.
impl CacheFigures for CacheStore {
    fn namespaces(&self) -> Vec<NamespaceFigures> {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        self.namespaces
            .values()
            .map(|ns| {
                let c = &ns.counters;
                NamespaceFigures {
                    name: ns.name.clone(),
                    hits: load(&c.hits),
                    misses: load(&c.misses),
                    stale: load(&c.stale),
                    bypass: load(&c.bypass),
                    coalesced: load(&c.coalesced),
                    coalesced_remote: load(&c.coalesced_remote),
                    lease_takeovers: load(&c.lease_takeovers),
                    invalidations_queued: load(&c.invalidations_queued),
                    invalidation_pending: ns.owes(),
                    generation: ns.generation(),
                    items: ns.items(),
                    bytes: ns.bytes(),
                }
            })
            .collect()
    }

    fn memory_items(&self) -> usize {
        CacheStore::memory_items(self)
    }

    fn redis_connected(&self) -> bool {
        CacheStore::redis_connected(self)
    }
}
