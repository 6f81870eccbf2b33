//! The cache's storage: a memory layer (quick_cache, one cache per
//! namespace) always, and a Redis layer when configured. Reads go memory
//! first, then Redis (a Redis hit fills memory); writes go to both. Redis
//! failures never fail a read or write: they are counted and the memory
//! layer answers alone.
//!
//! Memory bounds: each namespace holds at most its route's `max_items`
//! entries and its share (by `max_items`) of `cache.max_memory_bytes`. Both
//! hold through one weight: an entry weighs `max(its bytes, budget /
//! max_items)`, so small entries count as one slot each and large ones as
//! several. quick_cache evicts by its CLOCK-Pro-like policy (hot/cold/ghost
//! entries), not strict LRU: a burst of one-off queries does not flush the
//! answers that are asked again and again, which is the access pattern of a
//! RAG front end.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};
use serde_json::{Value, json};

use super::entry::Entry;
use crate::config::Config;
use crate::metrics::cache::{CacheFigures, NamespaceFigures};
use crate::redis::RedisStore;

/// Wall-clock milliseconds derived from tokio's clock: comparable across
/// replicas (entries in Redis carry it), and paused/advanced in tests.
#[derive(Debug, Clone)]
pub struct Clock {
    base_unix_ms: u64,
    base: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Self {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            base_unix_ms: u64::try_from(unix.as_millis()).unwrap_or(0),
            base: tokio::time::Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.base_unix_ms + u64::try_from(self.base.elapsed().as_millis()).unwrap_or(0)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Copy)]
struct SlotWeighter {
    slot: u64,
}

impl Weighter<String, Arc<Entry>> for SlotWeighter {
    fn weight(&self, _key: &String, val: &Arc<Entry>) -> u64 {
        val.weight.max(self.slot)
    }
}

type MemCache = Cache<
    String,
    Arc<Entry>,
    SlotWeighter,
    DefaultHashBuilder,
    DefaultLifecycle<String, Arc<Entry>>,
>;

/// Counters, process-wide and per namespace (relaxed atomics: figures, not
/// synchronisation).
#[derive(Debug, Default)]
pub struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stale: AtomicU64,
    pub bypass: AtomicU64,
    pub coalesced: AtomicU64,
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

/// One namespace's memory cache and figures.
#[derive(Debug)]
pub struct Namespace {
    pub name: String,
    pub ttl: Duration,
    pub max_items: usize,
    cache: MemCache,
    pub counters: Counters,
    /// Largest body this namespace stores: the route's limit, capped so an
    /// entry always fits one quick_cache shard (a heavier one would be
    /// dropped silently).
    pub max_body: u64,
    /// Bumped by every clear: a fetch that started before a clear does not
    /// store its (possibly outdated) answer.
    generation: AtomicU64,
}

impl Namespace {
    /// Entries held in memory.
    pub fn items(&self) -> usize {
        self.cache.len()
    }

    /// Bytes of the entries held in memory (weights are rounded up to slots).
    pub fn bytes(&self) -> u64 {
        self.cache.iter().map(|(_, e)| e.weight).sum()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// The hybrid store.
#[derive(Debug)]
pub struct CacheStore {
    namespaces: HashMap<String, Arc<Namespace>>,
    redis: Option<RedisStore>,
    pub counters: Counters,
    pub clock: Clock,
    pub stale_ms: u64,
}

impl CacheStore {
    /// Builds the memory layer for every cached route over `redis`, the
    /// process's Redis client when one is configured (started by the
    /// composition root, shared with the rate limiter).
    pub fn new(cfg: &Config, redis: Option<RedisStore>) -> Result<Arc<Self>, String> {
        let cached: Vec<_> = cfg.routes.iter().filter_map(|r| r.cache.as_ref()).collect();
        let total_items: u64 = cached
            .iter()
            .map(|c| c.max_items.max(1) as u64)
            .sum::<u64>()
            .max(1);
        let mut namespaces = HashMap::new();
        for c in cached {
            if namespaces.contains_key(&c.namespace) {
                continue;
            }
            let items = c.max_items.max(1) as u64;
            let budget =
                (cfg.cache.max_memory_bytes.saturating_mul(items) / total_items).max(64 * 1024);
            let slot = (budget / items).max(1);
            // Enough shards for concurrency, few enough that a shard holds
            // the largest entry.
            let default_shards = std::thread::available_parallelism().map_or(4, |n| n.get() * 4);
            let max_body = cfg.cache.max_body_bytes.min(budget);
            let shards = (budget / max_body.max(1)).clamp(1, default_shards as u64);
            let shards = 1usize << (63 - shards.leading_zeros()); // a power of two
            let options = OptionsBuilder::new()
                // An estimate for pre-sizing only; capped so a huge
                // max_items does not allocate a huge table at start-up.
                .estimated_items_capacity(c.max_items.clamp(1, 65_536))
                .weight_capacity(budget)
                .shards(shards)
                .build()
                .map_err(|e| format!("cache {}: {e}", c.namespace))?;
            let cache = Cache::with_options(
                options,
                SlotWeighter { slot },
                DefaultHashBuilder::default(),
                DefaultLifecycle::default(),
            );
            let max_body = max_body.min(cache.shard_capacity());
            namespaces.insert(
                c.namespace.clone(),
                Arc::new(Namespace {
                    name: c.namespace.clone(),
                    ttl: c.ttl,
                    max_items: c.max_items,
                    cache,
                    counters: Counters::default(),
                    max_body,
                    generation: AtomicU64::new(0),
                }),
            );
        }
        let store = Arc::new(Self {
            namespaces,
            redis,
            counters: Counters::default(),
            clock: Clock::new(),
            stale_ms: u64::try_from(cfg.cache.stale_if_error.as_millis()).unwrap_or(u64::MAX),
        });
        Ok(store)
    }

    /// Clears the memory layer on every invalidation another sidecar
    /// publishes (a background task; nothing without Redis).
    pub fn follow_invalidations(self: &Arc<Self>) {
        if let Some(r) = &self.redis {
            let weak = Arc::downgrade(self);
            r.listen(move |patterns| {
                if let Some(s) = weak.upgrade() {
                    for p in &patterns {
                        s.clear_memory(Some(p));
                    }
                    tracing::debug!(?patterns, "cleared on another sidecar's invalidation");
                }
            });
        }
    }

    pub fn namespace(&self, name: &str) -> Option<&Arc<Namespace>> {
        self.namespaces.get(name)
    }

    fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        Counters::add(&self.counters.errors);
        tracing::debug!("cache {what}: {e}");
    }

    /// Memory first, then Redis; a Redis hit fills memory.
    pub async fn get(&self, ns: &Namespace, key: &str) -> Option<Arc<Entry>> {
        if let Some(e) = ns.cache.get(key) {
            return Some(e);
        }
        let redis = self.redis.as_ref()?;
        match redis.get(key).await {
            Ok(Some(bytes)) => match Entry::decode(&bytes) {
                Ok(e) => {
                    let e = Arc::new(e);
                    ns.cache.insert(key.to_string(), Arc::clone(&e));
                    Some(e)
                }
                Err(err) => {
                    self.error("decode", &err);
                    None
                }
            },
            Ok(None) => None,
            Err(err) => {
                self.error("get", &err);
                None
            }
        }
    }

    /// Writes to memory and Redis (where it lives for TTL + stale window).
    pub async fn put(&self, ns: &Namespace, key: String, entry: Arc<Entry>) {
        self.put_memory(ns, key.clone(), Arc::clone(&entry));
        self.put_redis(&key, &entry).await;
    }

    pub fn put_memory(&self, ns: &Namespace, key: String, entry: Arc<Entry>) {
        Counters::add(&self.counters.sets);
        Counters::add(&ns.counters.sets);
        ns.cache.insert(key, entry);
    }

    pub async fn put_redis(&self, key: &str, entry: &Entry) {
        if let Some(redis) = &self.redis {
            let ttl = Duration::from_millis(entry.ttl_ms.saturating_add(self.stale_ms));
            if let Err(err) = redis.set(key, entry.encode(), ttl).await {
                self.error("set", &err);
            }
        }
    }

    /// Removes matching keys from memory; `None` clears everything.
    pub fn clear_memory(&self, pattern: Option<&str>) -> usize {
        let glob = match pattern {
            None => None,
            Some(p) => match glob::Pattern::new(p) {
                Ok(g) => Some((p, g)),
                Err(_) => return 0,
            },
        };
        let mut removed = 0;
        for ns in self.namespaces.values() {
            let before = ns.cache.len();
            match &glob {
                // `search:*` (or everything) clears the whole namespace at once.
                None => ns.cache.clear(),
                Some((p, _)) if *p == "*" || p.strip_suffix(":*") == Some(ns.name.as_str()) => {
                    ns.cache.clear()
                }
                // A pattern for another namespace leaves this one alone.
                Some((p, _))
                    if p.split_once(':')
                        .is_some_and(|(n, _)| !n.contains(['*', '?', '[']) && n != ns.name) =>
                {
                    continue;
                }
                Some((_, g)) => ns.cache.retain(|k, _| !g.matches(k)),
            }
            ns.bump();
            removed += before.saturating_sub(ns.cache.len());
        }
        removed
    }

    /// Clears a pattern (or everything) in memory and Redis; returns
    /// `(memory, redis)` counts.
    pub async fn clear(&self, pattern: Option<&str>) -> (usize, usize) {
        let memory = self.clear_memory(pattern);
        let mut redis_removed = 0;
        if let Some(redis) = &self.redis {
            match redis.clear(pattern.unwrap_or("*")).await {
                Ok(n) => redis_removed = n,
                Err(err) => self.error("clear", &err),
            }
        }
        let n = memory.max(redis_removed) as u64;
        self.counters.deletes.fetch_add(n, Ordering::Relaxed);
        (memory, redis_removed)
    }

    /// After a corpus change: clear memory here, tell the other sidecars to
    /// clear theirs, then clear Redis.
    pub async fn invalidate(&self, patterns: &[String]) {
        let mut removed = 0;
        for p in patterns {
            removed += self.clear_memory(Some(p));
        }
        if let Some(redis) = &self.redis {
            if let Err(err) = redis.publish_invalidation(patterns).await {
                self.error("publish", &err);
            }
            for p in patterns {
                match redis.clear(p).await {
                    Ok(n) => removed = removed.max(n),
                    Err(err) => self.error("clear", &err),
                }
            }
        }
        self.counters
            .deletes
            .fetch_add(removed as u64, Ordering::Relaxed);
    }

    pub fn redis_connected(&self) -> bool {
        self.redis.as_ref().is_some_and(RedisStore::is_connected)
    }

    /// Every namespace (for the metrics).
    pub fn namespaces(&self) -> impl Iterator<Item = &Arc<Namespace>> {
        self.namespaces.values()
    }

    pub fn memory_items(&self) -> usize {
        self.namespaces.values().map(|n| n.cache.len()).sum()
    }

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
        let mut names: Vec<_> = self.namespaces.values().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        let per: serde_json::Map<String, Value> = names
            .into_iter()
            .map(|n| {
                let mut v = n.counters.to_json();
                v.insert("items".into(), json!(n.items()));
                v.insert("bytes".into(), json!(n.bytes()));
                v.insert("max_items".into(), json!(n.max_items));
                v.insert("ttl_seconds".into(), json!(n.ttl.as_secs()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn entry(body_len: usize) -> Arc<Entry> {
        Arc::new(Entry::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(vec![b'x'; body_len]),
            0,
            60_000,
        ))
    }

    #[tokio::test]
    async fn item_cap_and_byte_budget_both_hold() {
        let mut cfg = Config::default();
        cfg.cache.max_memory_bytes = 4 * 1024 * 1024;
        let store = CacheStore::new(&cfg, None).unwrap();
        let ns = Arc::clone(store.namespace("search").unwrap());
        // The namespace's share of the budget, by max_items (500 of 1700).
        let budget = ns.cache.capacity();
        assert!(budget > 1_000_000 && budget < 1_300_000, "{budget}");
        // Small entries: the item cap binds.
        for i in 0..2_000 {
            store.put(&ns, format!("search:{i}"), entry(100)).await;
        }
        assert!(ns.cache.len() <= 500, "{}", ns.cache.len());
        assert!(ns.cache.weight() <= budget);
        // Large entries: the byte budget binds well before 500 items.
        store.clear_memory(None);
        for i in 0..200 {
            store
                .put(&ns, format!("search:big{i}"), entry(64 * 1024))
                .await;
        }
        assert!(ns.cache.weight() <= budget);
        assert!(
            ns.cache.len() <= (budget / (64 * 1024)) as usize,
            "{}",
            ns.cache.len()
        );
        // An entry never exceeds what one shard can hold (else quick_cache
        // would drop it silently).
        assert!(ns.max_body <= ns.cache.shard_capacity());
    }

    #[tokio::test]
    async fn clear_patterns() {
        let store = CacheStore::new(&Config::default(), None).unwrap();
        let search = Arc::clone(store.namespace("search").unwrap());
        let rag = Arc::clone(store.namespace("rag").unwrap());
        store.put(&search, "search:aa".into(), entry(1)).await;
        store.put(&search, "search:ab".into(), entry(1)).await;
        store.put(&rag, "rag:aa".into(), entry(1)).await;
        assert_eq!(store.clear_memory(Some("search:a[b]")), 1);
        assert_eq!(store.clear_memory(Some("search:*")), 1);
        assert_eq!(store.memory_items(), 1);
        assert_eq!(store.clear_memory(Some("nothing:*")), 0);
        assert_eq!(store.clear_memory(None), 1);
    }
}
