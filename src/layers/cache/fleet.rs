//! The fleet: several sidecars on one Redis behaving like one cache.
//!
//! * **Invalidation that cannot be lost.** Each namespace has a generation
//!   in Redis ([`crate::redis::fleet`]); an entry records the generation it
//!   was asked under and is a hit only while that is still the current one.
//!   An invalidating sidecar bumps the generations in one script and
//!   publishes them; the others take them from the message at once, and
//!   also re-read them every `cache.generation_poll` and right after either
//!   Redis client (re)connects, so a lost message costs at most one poll.
//!   An invalidation Redis cannot take (it is down) applies here at once
//!   and is kept per namespace (the stronger mode wins) until it can.
//! * **One upstream call per question.** A miss that leads on this sidecar
//!   takes a lease on its key in Redis ([`Fleet::lease`]); while another
//!   sidecar holds it, this one waits for its entry, woken by the holder's
//!   release message or by polling every 100 ms, at most the route's time.
//!   A holder renews its lease every third of `cache.lease_ttl`; when it
//!   fails, stores nothing or dies, one waiter takes the lease over. Any
//!   Redis failure on the way: the sidecar goes on alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use super::entry::Entry;
use super::store::{CacheStore, Counters, Namespace};
use crate::redis::RedisStore;
use crate::redis::fleet::Acquired;
use crate::redis::pubsub::FleetEvent;
use crate::service::Counted;

/// How often a waiter looks at a held lease without a message.
const LEASE_POLL: Duration = Duration::from_millis(100);

/// The fleet's coordination of one sidecar.
#[derive(Debug)]
pub struct Fleet {
    shared: Arc<FleetShared>,
}

#[derive(Debug)]
struct FleetShared {
    redis: RedisStore,
    lease_ttl: Duration,
    poll: Duration,
    /// Wakes the generation poller at once (a reconnect).
    poll_now: Notify,
    /// Keys this sidecar waits on, woken by their lease's end.
    #[allow(
        clippy::disallowed_types,
        reason = "held for one insert, lookup or remove, never across an await"
    )]
    waiting: std::sync::Mutex<HashMap<String, Arc<Notify>>>,
    /// Makes lease tokens unique: this process, then a count.
    origin: String,
    next: AtomicU64,
}

/// What a leading miss found in the fleet.
#[derive(Debug)]
pub enum Remote {
    /// This sidecar holds the lease: it calls the upstream.
    Holder(LeaseGuard),
    /// Another sidecar's call stored this entry.
    Served(Arc<Entry>),
    /// No coordination (Redis failed or is down): go alone.
    Alone,
    /// Waited the route's whole time for another sidecar's answer.
    TimedOut,
}

impl Fleet {
    pub fn new(redis: RedisStore, lease_ttl: Duration, poll: Duration) -> Self {
        Self {
            shared: Arc::new(FleetShared {
                redis,
                lease_ttl,
                poll,
                poll_now: Notify::new(),
                #[allow(
                    clippy::disallowed_methods,
                    clippy::disallowed_types,
                    reason = "held for one insert, lookup or remove, never across an await"
                )]
                waiting: std::sync::Mutex::new(HashMap::new()),
                origin: uuid::Uuid::new_v4().simple().to_string(),
                next: AtomicU64::new(0),
            }),
        }
    }

    /// Starts following the fleet: its messages, and the poller of the
    /// generations (which also delivers owed invalidations).
    pub(super) fn follow(&self, store: &Arc<CacheStore>) {
        let weak = Arc::downgrade(store);
        let shared = Arc::downgrade(&self.shared);
        self.shared.redis.listen(move |event| {
            let (Some(store), Some(shared)) = (weak.upgrade(), shared.upgrade()) else {
                return;
            };
            match event {
                FleetEvent::Invalidated {
                    patterns,
                    generations,
                } => {
                    for (name, g) in generations {
                        if let Some(ns) = store.namespace(&name) {
                            ns.adopt(g, false);
                        }
                    }
                    for p in &patterns {
                        store.clear_memory(Some(p));
                    }
                    tracing::debug!(?patterns, "took another sidecar's invalidation");
                }
                FleetEvent::LeaseEnded(key) => {
                    if let Some(n) = shared.waiting().get(&key) {
                        n.notify_waiters();
                    }
                }
                FleetEvent::Reconnected => shared.poll_now.notify_one(),
            }
        });
        tokio::spawn(poll_generations(
            Arc::downgrade(store),
            Arc::downgrade(&self.shared),
        ));
    }

    /// Delivers this sidecar's invalidation to the fleet: the generations
    /// of `whole` bumped in Redis (taken here too) and published with the
    /// `narrow` patterns. `false`: Redis did not take it.
    pub(super) async fn invalidate(
        &self,
        store: &CacheStore,
        whole: &[Arc<Namespace>],
        purge: bool,
        narrow: &[String],
    ) -> bool {
        let redis = &self.shared.redis;
        let mut generations = Vec::new();
        if !whole.is_empty() {
            let names: Vec<String> = whole.iter().map(|ns| ns.name.clone()).collect();
            match redis.bump_generations(&names, purge).await {
                Ok(gens) => {
                    for (ns, g) in whole.iter().zip(gens) {
                        ns.adopt(g, true);
                        generations.push((ns.name.clone(), g));
                    }
                }
                Err(e) => {
                    store.error("generation bump", &e);
                    return false;
                }
            }
        }
        if let Err(e) = redis.publish_invalidation(narrow, &generations).await {
            // The generations are in Redis: the others find them by polling.
            store.error("publish", &e);
            return narrow.is_empty();
        }
        true
    }

    /// For a miss this sidecar leads: takes the lease on `key`, or waits
    /// (at most `limit`) for the entry of the sidecar that holds it, taking
    /// the lease over if that one gives up or dies.
    pub async fn lease(
        &self,
        store: &CacheStore,
        ns: &Namespace,
        key: &str,
        generation: u64,
        limit: Duration,
    ) -> Remote {
        let shared = &self.shared;
        let token = format!(
            "{}:{}",
            shared.origin,
            shared.next.fetch_add(1, Ordering::Relaxed)
        );
        let deadline = tokio::time::Instant::now() + limit;
        let waiting = Waiting::new(&self.shared, key);
        let mut waited = false;
        let mut _counted = None;
        loop {
            let woken = waiting.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let acquired = match shared
                .redis
                .acquire_lease(key, &token, shared.lease_ttl, generation)
                .await
            {
                Ok(a) => a,
                Err(e) => {
                    store.error("lease", &e);
                    return Remote::Alone;
                }
            };
            if acquired == Acquired::Taken {
                if waited {
                    Counters::add(&store.counters.lease_takeovers);
                    Counters::add(&ns.counters.lease_takeovers);
                }
                return Remote::Holder(LeaseGuard::new(&self.shared, key, token));
            }
            if waited || acquired == Acquired::Stored {
                match store.get_remote(ns, key).await {
                    Ok(Some(e)) if ns.is_current(&e) => return Remote::Served(e),
                    Ok(_) => {}
                    Err(()) => return Remote::Alone,
                }
            }
            waited = true;
            _counted.get_or_insert_with(|| Counted::new(&ns.remote_waiting));
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep(LEASE_POLL) => {}
                () = tokio::time::sleep_until(deadline) => return Remote::TimedOut,
            }
        }
    }
}

impl FleetShared {
    #[allow(
        clippy::disallowed_types,
        reason = "held for one insert, lookup or remove, never across an await"
    )]
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A key this sidecar waits on (one leader per key per sidecar, so one
/// registration), removed on drop.
struct Waiting<'a> {
    shared: &'a FleetShared,
    key: &'a str,
    notify: Arc<Notify>,
}

impl<'a> Waiting<'a> {
    fn new(shared: &'a FleetShared, key: &'a str) -> Self {
        let notify = Arc::clone(
            shared
                .waiting()
                .entry(key.to_string())
                .or_insert_with(|| Arc::new(Notify::new())),
        );
        Self {
            shared,
            key,
            notify,
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.shared.waiting().remove(self.key);
    }
}

/// The lease this sidecar holds on a key, renewed in the background until
/// released; dropped unreleased (the call failed or stored nothing), it is
/// released at once so that a waiter takes over.
#[derive(Debug)]
pub struct LeaseGuard {
    shared: Weak<FleetShared>,
    key: String,
    token: String,
    renew: tokio::task::JoinHandle<()>,
    released: bool,
}

impl LeaseGuard {
    fn new(shared: &Arc<FleetShared>, key: &str, token: String) -> Self {
        let weak = Arc::downgrade(shared);
        let renew = {
            let (weak, key, token) = (weak.clone(), key.to_string(), token.clone());
            tokio::spawn(async move {
                loop {
                    let Some(every) = weak.upgrade().map(|s| s.lease_ttl / 3) else {
                        return;
                    };
                    tokio::time::sleep(every).await;
                    let Some(s) = weak.upgrade() else {
                        return;
                    };
                    // A failed renewal is tried again; a lost lease ends it.
                    if let Ok(false) = s.redis.renew_lease(&key, &token, s.lease_ttl).await {
                        return;
                    }
                }
            })
        };
        Self {
            shared: weak,
            key: key.to_string(),
            token,
            renew,
            released: false,
        }
    }

    /// Ends the lease; `stored`: the entry is in Redis under that
    /// generation, for the waiters to read.
    pub async fn release(mut self, stored: Option<u64>) {
        self.released = true;
        self.renew.abort();
        if let Some(s) = self.shared.upgrade() {
            if let Err(e) = s.redis.release_lease(&self.key, &self.token, stored).await {
                tracing::debug!("lease release: {e}");
            }
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.renew.abort();
        if self.released {
            return;
        }
        let (Some(s), Ok(rt)) = (self.shared.upgrade(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let (key, token) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        rt.spawn(async move {
            if let Err(e) = s.redis.release_lease(&key, &token, None).await {
                tracing::debug!("lease release: {e}");
            }
        });
    }
}

/// Re-reads the generations every `generation_poll` and at once after a
/// reconnect, first delivering any invalidation Redis could not take.
async fn poll_generations(store: Weak<CacheStore>, shared: Weak<FleetShared>) {
    loop {
        let (Some(store), Some(shared)) = (store.upgrade(), shared.upgrade()) else {
            return;
        };
        if shared.redis.is_usable() {
            sync_once(&store, &shared.redis).await;
        }
        let poll = shared.poll;
        let wake = async {
            tokio::select! {
                () = shared.poll_now.notified() => {}
                () = tokio::time::sleep(poll) => {}
            }
        };
        drop(store);
        wake.await;
    }
}

/// One round: owed invalidations delivered, then the generations read.
pub(super) async fn sync_once(store: &CacheStore, redis: &RedisStore) {
    let (mut purged, mut stale): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
    for ns in store.namespaces() {
        match ns.take_owed() {
            Some(true) => purged.push(Arc::clone(ns)),
            Some(false) => stale.push(Arc::clone(ns)),
            None => {}
        }
    }
    let rounds = [(true, purged), (false, stale)];
    for (i, (purge, owed)) in rounds.iter().enumerate() {
        if owed.is_empty() {
            continue;
        }
        let names: Vec<String> = owed.iter().map(|ns| ns.name.clone()).collect();
        match redis.bump_generations(&names, *purge).await {
            Ok(gens) => {
                let mut published = Vec::new();
                for (ns, g) in owed.iter().zip(gens) {
                    ns.adopt(g, true);
                    published.push((ns.name.clone(), g));
                }
                tracing::info!(namespaces = ?names, purge, "delivered invalidations made while Redis was unreachable");
                if let Err(e) = redis.publish_invalidation(&[], &published).await {
                    store.error("publish", &e);
                }
            }
            Err(e) => {
                // Kept for the next round, this one's and the rest.
                for (purge, owed) in &rounds[i..] {
                    for ns in owed {
                        ns.restore_owed(*purge);
                    }
                }
                store.error("generation bump", &e);
                return;
            }
        }
    }
    let mut names: Vec<String> = store.namespaces().map(|ns| ns.name.clone()).collect();
    names.sort();
    match redis.sync_generations(&names).await {
        Ok(gens) => {
            for (name, g) in names.iter().zip(gens) {
                let Some(ns) = store.namespace(name) else {
                    continue;
                };
                let known = ns.generations();
                if g.current < known.current || g.purged < known.purged {
                    // Redis lost a bump this sidecar had taken (a failover
                    // to a replica that had not received it): made again,
                    // so that a sidecar that missed its message learns it.
                    tracing::warn!(namespace = %name, redis = g.current, known = known.current, "Redis holds an older generation than this sidecar knows: invalidating again");
                    ns.restore_owed(g.purged < known.purged);
                } else if ns.adopt(g, false) {
                    tracing::debug!(namespace = %name, generation = g.current, "took the fleet's generation");
                }
            }
        }
        Err(e) => store.error("generation sync", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis::fleet::Generation;

    #[test]
    fn generation_is_an_equality_and_the_floor_a_bound() {
        let store = CacheStore::new(&crate::config::Config::default(), None).unwrap();
        let ns = store.namespace("search").unwrap();
        let e = |g: u64| {
            Entry::new(
                http::StatusCode::OK,
                http::HeaderMap::new(),
                bytes::Bytes::new(),
                0,
                1,
            )
            .with_generation(g)
        };
        use super::super::store::Standing::*;
        assert_eq!(ns.standing(&e(0)), Current);
        assert!(ns.adopt(
            Generation {
                current: 10,
                purged: 5
            },
            false
        ));
        assert_eq!(ns.standing(&e(10)), Current);
        assert_eq!(ns.standing(&e(7)), Invalidated);
        assert_eq!(ns.standing(&e(11)), Invalidated);
        assert_eq!(ns.standing(&e(4)), Purged);
        // Generations never go back.
        assert!(!ns.adopt(
            Generation {
                current: 9,
                purged: 0
            },
            false
        ));
        assert_eq!(ns.generation(), 10);
    }
}
