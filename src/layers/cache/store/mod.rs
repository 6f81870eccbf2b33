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
//!
//! Invalidation is by generation: each namespace has one (the fleet's, in
//! Redis, when there is one: see [`super::fleet`]), each entry records the
//! generation it was asked under, and only an entry of the current
//! generation is a hit: a load and a compare on the hit path. An
//! invalidation of a whole namespace bumps its generation; in `purge` mode
//! it also raises the namespace's purge floor (entries below it are not
//! even served stale) and deletes the entries. A narrower pattern deletes
//! the entries it matches.
//!
//! [`namespace`] holds one namespace (its memory layer and generations),
//! [`figures`] the counters and the stats body.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, OptionsBuilder};

use super::entry::Entry;
use super::fleet::Fleet;

mod figures;
mod namespace;

pub use self::figures::Counters;
use self::namespace::SlotWeighter;
pub use self::namespace::{Namespace, Standing};
use crate::config::{Config, InvalidateMode};
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

/// What a clear or an invalidation did, and what it could not do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClearReport {
    /// Entries deleted from this sidecar's memory.
    pub memory: usize,
    /// Keys deleted from Redis.
    pub redis: usize,
    /// Keys found in Redis but not deleted.
    pub redis_failed: usize,
    /// Redis commands that failed on the way.
    pub redis_errors: usize,
    /// Redis did not take the invalidation: kept until it does.
    pub queued: bool,
}

/// The hybrid store.
#[derive(Debug)]
pub struct CacheStore {
    namespaces: HashMap<String, Arc<Namespace>>,
    redis: Option<RedisStore>,
    /// The fleet's coordination, with Redis.
    fleet: Option<Fleet>,
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
                    ttl_ms: AtomicU64::new(u64::try_from(c.ttl.as_millis()).unwrap_or(u64::MAX)),
                    max_items: c.max_items,
                    cache,
                    counters: Counters::default(),
                    max_body,
                    generation: AtomicU64::new(0),
                    purged: AtomicU64::new(0),
                    epoch: AtomicU64::new(0),
                    owed: AtomicU8::new(0),
                    remote_waiting: AtomicU64::new(0),
                }),
            );
        }
        let fleet = redis
            .as_ref()
            .map(|r| Fleet::new(r.clone(), cfg.cache.lease_ttl, cfg.cache.generation_poll));
        let store = Arc::new(Self {
            namespaces,
            fleet,
            redis,
            counters: Counters::default(),
            clock: Clock::new(),
            stale_ms: u64::try_from(cfg.cache.stale_if_error.as_millis()).unwrap_or(u64::MAX),
        });
        Ok(store)
    }

    /// Follows the fleet (a background task; nothing without Redis): its
    /// invalidations, its generations, its leases.
    pub fn follow_fleet(self: &Arc<Self>) {
        if let Some(f) = &self.fleet {
            f.follow(self);
        }
    }

    pub fn fleet(&self) -> Option<&Fleet> {
        self.fleet.as_ref()
    }

    pub fn namespace(&self, name: &str) -> Option<&Arc<Namespace>> {
        self.namespaces.get(name)
    }

    /// Takes a reloaded configuration's TTLs (entries kept). Returns what
    /// it cannot take without a restart: a namespace it has no memory
    /// layer for, or another size for one it has.
    pub fn retune(&self, cfg: &Config) -> Vec<String> {
        let mut missing = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for c in cfg.routes.iter().filter_map(|r| r.cache.as_ref()) {
            if !seen.insert(c.namespace.as_str()) {
                continue; // the first route of a namespace gives its TTL
            }
            match self.namespaces.get(&c.namespace) {
                Some(ns) => {
                    ns.ttl_ms.store(
                        u64::try_from(c.ttl.as_millis()).unwrap_or(u64::MAX),
                        Ordering::Relaxed,
                    );
                    if ns.max_items != c.max_items {
                        missing.push(format!(
                            "cache namespace {}: max_items {} (running {})",
                            c.namespace, c.max_items, ns.max_items
                        ));
                    }
                }
                None => missing.push(format!("cache namespace {} (new)", c.namespace)),
            }
        }
        missing
    }

    pub(super) fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        Counters::add(&self.counters.errors);
        tracing::debug!("cache {what}: {e}");
    }

    /// Memory first, then Redis; a Redis hit of the current generation
    /// fills memory. An entry that is not current is returned only when no
    /// current one is found (for its caller to serve stale, or not).
    pub async fn get(&self, ns: &Namespace, key: &str) -> Option<Arc<Entry>> {
        let memory = ns.cache.get(key);
        if let Some(e) = &memory {
            if ns.is_current(e) {
                return memory;
            }
        }
        match self.get_remote(ns, key).await {
            Ok(Some(e)) if ns.is_current(&e) => Some(e),
            Ok(remote) => memory.or(remote),
            Err(()) => memory,
        }
    }

    /// The entry in Redis (`Ok(None)`: none, or no Redis); one of the
    /// current generation fills memory. `Err`: Redis failed (counted).
    pub(super) async fn get_remote(
        &self,
        ns: &Namespace,
        key: &str,
    ) -> Result<Option<Arc<Entry>>, ()> {
        let Some(redis) = self.redis.as_ref() else {
            return Ok(None);
        };
        match redis.get(key).await {
            Ok(Some(bytes)) => match Entry::decode(&bytes) {
                Ok(e) => {
                    let e = Arc::new(e);
                    if ns.is_current(&e) {
                        ns.cache.insert(key.to_string(), Arc::clone(&e));
                    }
                    Ok(Some(e))
                }
                Err(err) => {
                    self.error("decode", &err);
                    Ok(None)
                }
            },
            Ok(None) => Ok(None),
            Err(err) => {
                self.error("get", &err);
                Err(())
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

    /// Writes to Redis; whether it is there now.
    pub async fn put_redis(&self, key: &str, entry: &Entry) -> bool {
        let Some(redis) = &self.redis else {
            return false;
        };
        let ttl = Duration::from_millis(entry.ttl_ms.saturating_add(self.stale_ms));
        match redis.set(key, entry.encode(), ttl).await {
            Ok(()) => true,
            Err(err) => {
                self.error("set", &err);
                false
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
            ns.touched();
            removed += before.saturating_sub(ns.cache.len());
        }
        removed
    }

    /// Clears a pattern (or everything) in memory and Redis, and in every
    /// other sidecar's memory: a purge.
    pub async fn clear(&self, pattern: Option<&str>) -> ClearReport {
        let patterns = [pattern.unwrap_or("*").to_string()];
        self.invalidate(&patterns, InvalidateMode::Purge).await
    }

    /// The namespaces a pattern names whole (`*`: all, `search:*`: one, a
    /// namespace not configured here: none); `None`: a narrower pattern.
    pub(super) fn whole_namespaces(&self, pattern: &str) -> Option<Vec<Arc<Namespace>>> {
        if pattern == "*" {
            return Some(self.namespaces.values().cloned().collect());
        }
        let name = pattern.strip_suffix(":*")?;
        if name.contains(['*', '?', '[', ']', '\\']) {
            return None;
        }
        Some(self.namespaces.get(name).cloned().into_iter().collect())
    }

    /// The namespaces a narrow pattern may touch.
    fn touched_by(&self, pattern: &str) -> Vec<Arc<Namespace>> {
        let ns_part = pattern.split_once(':').map(|(n, _)| n);
        self.namespaces
            .values()
            .filter(|ns| match ns_part {
                Some(n) if !n.contains(['*', '?', '[', ']', '\\']) => n == ns.name,
                _ => true,
            })
            .cloned()
            .collect()
    }

    /// After a corpus change (or a clear): here at once, then in Redis and
    /// every other sidecar (see [`super::fleet`]). Whole namespaces get a
    /// new generation (`purge`: and their entries deleted); narrower
    /// patterns delete what they match. Returns what it did and what failed.
    pub async fn invalidate(&self, patterns: &[String], mode: InvalidateMode) -> ClearReport {
        let purge = mode == InvalidateMode::Purge;
        let mut whole: Vec<Arc<Namespace>> = Vec::new();
        let mut narrow: Vec<String> = Vec::new();
        for p in patterns {
            match self.whole_namespaces(p) {
                Some(list) => {
                    for ns in list {
                        if !whole.iter().any(|w| Arc::ptr_eq(w, &ns)) {
                            whole.push(ns);
                        }
                    }
                }
                None => narrow.push(p.clone()),
            }
        }
        let mut memory: usize = whole.iter().map(|ns| ns.bump_local(purge)).sum();
        for p in &narrow {
            memory += self.clear_memory(Some(p));
        }
        let mut report = ClearReport {
            memory,
            queued: false,
            ..ClearReport::default()
        };
        if let Some(fleet) = &self.fleet {
            let delivered = fleet.invalidate(self, &whole, purge, &narrow).await;
            if !delivered {
                report.queued = true;
                // Redis did not take it: kept per namespace until it does. A
                // narrow pattern is kept as its namespaces' invalidation.
                for ns in &whole {
                    ns.owe(purge);
                }
                for p in &narrow {
                    for ns in self.touched_by(p) {
                        ns.owe(purge);
                    }
                }
            }
            // Deleting from Redis frees its memory; the generations already
            // keep what is deleted from being used.
            let deleted: Vec<String> = if purge { patterns.to_vec() } else { narrow };
            if let Some(redis) = &self.redis {
                for p in &deleted {
                    let c = redis.clear(p).await;
                    report.redis += c.removed;
                    report.redis_failed += c.failed;
                    report.redis_errors += c.errors;
                    for _ in 0..c.errors {
                        Counters::add(&self.counters.errors);
                    }
                }
            }
        }
        let n = report.memory.max(report.redis) as u64;
        self.counters.deletes.fetch_add(n, Ordering::Relaxed);
        report
    }

    pub fn redis_connected(&self) -> bool {
        self.redis.as_ref().is_some_and(RedisStore::is_connected)
    }

    /// Readiness waits while this holds: Redis is configured, reachable and
    /// answering, and the fleet's invalidations cannot be heard yet.
    pub fn redis_starting(&self) -> bool {
        // A Redis lost or slow before the first subscription does not hold
        // readiness: the sidecar serves from memory, as when it is down.
        self.redis
            .as_ref()
            .is_some_and(|r| !r.is_settled() && r.is_usable())
    }

    /// Every namespace (for the metrics).
    pub fn namespaces(&self) -> impl Iterator<Item = &Arc<Namespace>> {
        self.namespaces.values()
    }

    pub fn memory_items(&self) -> usize {
        self.namespaces.values().map(|n| n.cache.len()).sum()
    }
}

#[cfg(test)]
mod tests;
