//! One namespace: its memory layer (quick_cache, weighed in slots), its
//! generation and purge floor as this sidecar knows them, and what an
//! entry may still be used for under them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, Weighter};

use super::Counters;
use crate::layers::cache::entry::Entry;
use crate::redis::fleet::Generation;

/// An entry weighs its bytes, and at least one slot of the namespace's
/// budget (see the store's module doc).
#[derive(Debug, Clone, Copy)]
pub(in crate::layers::cache) struct SlotWeighter {
    pub(in crate::layers::cache) slot: u64,
}

impl Weighter<String, Arc<Entry>> for SlotWeighter {
    fn weight(&self, _key: &String, val: &Arc<Entry>) -> u64 {
        val.weight.max(self.slot)
    }
}

/// A namespace's memory layer.
pub(in crate::layers::cache) type MemCache = Cache<
    String,
    Arc<Entry>,
    SlotWeighter,
    DefaultHashBuilder,
    DefaultLifecycle<String, Arc<Entry>>,
>;

/// One namespace's memory cache and figures.
#[derive(Debug)]
pub struct Namespace {
    pub name: String,
    /// In milliseconds: a reload changes it ([`CacheStore::retune`]).
    pub(in crate::layers::cache) ttl_ms: AtomicU64,
    pub max_items: usize,
    pub(in crate::layers::cache) cache: MemCache,
    pub counters: Counters,
    /// Largest body this namespace stores: the route's limit, capped so an
    /// entry always fits one quick_cache shard (a heavier one would be
    /// dropped silently).
    pub max_body: u64,
    /// The namespace's generation as this sidecar knows it: entries of
    /// another are not hits.
    pub(in crate::layers::cache) generation: AtomicU64,
    /// Entries of a generation below this one are not served even stale.
    pub(in crate::layers::cache) purged: AtomicU64,
    /// Bumped by every clear and change of generation: a fetch that started
    /// before does not store its (possibly outdated) answer.
    pub(in crate::layers::cache) epoch: AtomicU64,
    /// Misses of this namespace waiting now for another sidecar's answer.
    pub remote_waiting: AtomicU64,
    /// An invalidation Redis has not taken yet ([`OWED_STALE`],
    /// [`OWED_PURGE`], or 0): at most one per namespace, the stronger kept.
    pub(in crate::layers::cache) owed: AtomicU8,
}

const OWED_STALE: u8 = 1;
const OWED_PURGE: u8 = 2;

/// What an entry may still be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Of the current generation: a hit while fresh.
    Current,
    /// Invalidated (`stale` mode): served only when the upstream fails.
    Invalidated,
    /// Purged: not used at all.
    Purged,
}

impl Namespace {
    /// How long an entry is fresh.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

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

    /// Where the generation and purge floor stand now.
    pub fn generations(&self) -> Generation {
        Generation {
            current: self.generation(),
            purged: self.purged.load(Ordering::Acquire),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The entry in memory under `key`, if it is of the current generation
    /// (one just stored by another request's call, say).
    pub(in crate::layers::cache) fn current(&self, key: &str) -> Option<Arc<Entry>> {
        self.cache.get(key).filter(|e| self.is_current(e))
    }

    /// The hit path's check: one load and a compare.
    #[inline]
    pub fn is_current(&self, e: &Entry) -> bool {
        e.generation == self.generation.load(Ordering::Acquire)
    }

    pub fn standing(&self, e: &Entry) -> Standing {
        if self.is_current(e) {
            Standing::Current
        } else if e.generation >= self.purged.load(Ordering::Acquire) {
            Standing::Invalidated
        } else {
            Standing::Purged
        }
    }

    pub(in crate::layers::cache) fn touched(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Invalidates here, at once: a new generation (and with `purge` the
    /// floor raised to it and the entries deleted). Returns the entries
    /// deleted.
    pub(in crate::layers::cache) fn bump_local(&self, purge: bool) -> usize {
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let mut removed = 0;
        if purge {
            self.purged.fetch_max(g, Ordering::AcqRel);
            removed = self.cache.len();
            self.cache.clear();
        }
        self.touched();
        removed
    }

    /// Takes a generation the fleet has (never going back: generations
    /// only grow). Not while an invalidation of this sidecar is owed:
    /// delivering it bumps past what Redis holds. `force`: this sidecar's
    /// own bump, just made. Returns whether anything changed.
    pub(in crate::layers::cache) fn adopt(&self, g: Generation, force: bool) -> bool {
        if !force && self.owed.load(Ordering::Acquire) != 0 {
            return false;
        }
        let before = self.generation.fetch_max(g.current, Ordering::AcqRel);
        let floor = self.purged.fetch_max(g.purged, Ordering::AcqRel);
        if g.purged > floor {
            // Free what can no longer be used.
            self.cache.retain(|_, e| e.generation >= g.purged);
        }
        let changed = g.current > before || g.purged > floor;
        if changed {
            self.touched();
        }
        changed
    }

    /// Keeps an invalidation for Redis to take later.
    pub(in crate::layers::cache) fn owe(&self, purge: bool) {
        self.owed.fetch_max(
            if purge { OWED_PURGE } else { OWED_STALE },
            Ordering::AcqRel,
        );
        Counters::add(&self.counters.invalidations_queued);
    }

    /// Takes the owed invalidation: `Some(purge)`.
    pub(in crate::layers::cache) fn take_owed(&self) -> Option<bool> {
        match self.owed.swap(0, Ordering::AcqRel) {
            0 => None,
            o => Some(o == OWED_PURGE),
        }
    }

    /// Puts back an owed invalidation Redis did not take.
    pub(in crate::layers::cache) fn restore_owed(&self, purge: bool) {
        self.owed.fetch_max(
            if purge { OWED_PURGE } else { OWED_STALE },
            Ordering::AcqRel,
        );
    }

    pub fn owes(&self) -> bool {
        self.owed.load(Ordering::Acquire) != 0
    }
}
