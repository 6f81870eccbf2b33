//! Coalescing inside one sidecar: misses under way by key. The first
//! identical miss leads (goes upstream); the others wait on its
//! [`Outcome`]: the stored entry, a stream to follow from its first event,
//! word that it failed (one waiter then leads the next attempt), or word
//! that nothing was shared (each then goes alone, at once).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::entry::Entry;
use super::stream::Tee;

/// What the leader of a coalesced miss tells its waiters.
#[derive(Debug, Clone)]
pub(super) enum Outcome {
    Pending,
    Stored(Arc<Entry>),
    /// The answer is a stream: follow it from its first event.
    Streaming(Arc<StreamHead>),
    /// The upstream failed: waiters holding a stale entry serve it.
    Failed,
    NotShared,
}

/// Misses under way, by key.
#[derive(Debug, Default)]
#[allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "held for one lookup, insert or remove per miss, never across an await"
)]
pub(super) struct Inflight {
    map: std::sync::Mutex<HashMap<String, watch::Receiver<Outcome>>>,
}

pub(super) enum Join {
    Leader(LeaderGuard),
    Waiter(watch::Receiver<Outcome>),
}

impl Inflight {
    pub(super) fn join(self: &Arc<Self>, key: &str) -> Join {
        // Held only for one map operation, never across an await.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = map.get(key) {
            return Join::Waiter(rx.clone());
        }
        let (tx, rx) = watch::channel(Outcome::Pending);
        map.insert(key.to_string(), rx.clone());
        Join::Leader(LeaderGuard {
            inflight: Arc::clone(self),
            key: key.to_string(),
            tx,
            rx,
        })
    }
}

/// Held by the request that went upstream; dropping it without an answer
/// (error, uncacheable, client gone) releases the waiters to go alone.
pub(super) struct LeaderGuard {
    inflight: Arc<Inflight>,
    key: String,
    tx: watch::Sender<Outcome>,
    /// Its own channel, to tell its entry in the map from a later lead's.
    rx: watch::Receiver<Outcome>,
}

impl LeaderGuard {
    /// Ends the lead: the key is no longer under way (a request joining
    /// from now on leads), then the waiters are told.
    pub(super) fn finish(self, outcome: Outcome) {
        self.leave();
        self.tx.send_replace(outcome);
    }

    /// Removes this lead from the map, unless a later one has taken the key.
    fn leave(&self) {
        let mut map = self.inflight.map.lock().unwrap_or_else(|p| p.into_inner());
        if map
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            map.remove(&self.key);
        }
    }

    /// Tells the waiters without ending the lead: the key stays under way
    /// (a stream, until it ends), so that identical requests still join.
    pub(super) fn publish(&self, outcome: Outcome) {
        self.tx.send_replace(outcome);
    }
}

/// A stream's head, for the requests that join it.
#[derive(Debug)]
pub(super) struct StreamHead {
    pub(super) status: http::StatusCode,
    pub(super) headers: http::HeaderMap,
    pub(super) tee: Arc<Tee>,
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.leave();
        if matches!(*self.tx.borrow(), Outcome::Pending) {
            self.tx.send_replace(Outcome::NotShared);
        }
    }
}
