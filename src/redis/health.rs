//! Whether Redis may be waited on, and whether the sidecar can hear the
//! fleet (PRODUCT.md "Cache": a slow Redis, `redis_connected`).
//!
//! A breaker over Redis's answers: [`TRIP_AFTER`] commands in a row that
//! exceed `redis.timeout` stop every request from waiting on Redis at all
//! (the callers see [`super::RedisError::Disconnected`] at once and go on
//! with memory and per-sidecar limits), and a background check sends one
//! `PING` every [`CHECK_EVERY`] until one answers in time. An answer in
//! time ends a run of timeouts. A frozen or overloaded server keeps its TCP connection, so fred
//! still says "connected": without this every request paid the timeout
//! (51.6 ms median against ~1 ms in the fault trial of issue 34).
//!
//! The subscription to the fleet's channels is tracked here too: a sidecar
//! reports Redis as connected only once it can hear invalidations, and its
//! readiness waits for that when Redis was reachable at start.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

/// Consecutive timeouts that stop the sidecar waiting on Redis.
pub const TRIP_AFTER: u32 = 3;

/// How often the background check asks a bypassed Redis.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub(super) struct Health {
    /// Commands in a row without an answer in time.
    timeouts: AtomicU32,
    /// Requests are not waiting on Redis (the background check runs).
    bypassed: AtomicBool,
    /// The fleet's channels are subscribed on the live connection.
    subscribed: AtomicBool,
    /// Start-up is over for readiness: the first subscription was made, or
    /// Redis could not be reached at start (the sidecar then starts on
    /// memory alone, as before).
    settled: AtomicBool,
    /// Bumped whenever Redis may be used again after a bypass: messages may
    /// have been missed, the fleet's state is polled.
    usable_again: tokio::sync::watch::Sender<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            timeouts: AtomicU32::new(0),
            bypassed: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            settled: AtomicBool::new(false),
            usable_again: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Health {
    /// Redis answered in time (a value or an error reply).
    pub(super) fn answered(&self) {
        // A load first: the common case writes nothing to the shared line.
        if self.timeouts.load(Ordering::Relaxed) != 0 {
            self.timeouts.store(0, Ordering::Relaxed);
        }
    }

    /// Redis did not answer in time; `true` when this timeout trips the
    /// breaker (the caller starts the background check, once).
    pub(super) fn timed_out(&self) -> bool {
        let run = self
            .timeouts
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        run >= TRIP_AFTER && !self.bypassed.swap(true, Ordering::AcqRel)
    }

    pub(super) fn is_bypassed(&self) -> bool {
        self.bypassed.load(Ordering::Acquire)
    }

    /// The background check found Redis answering in time.
    pub(super) fn recovered(&self) {
        self.timeouts.store(0, Ordering::Relaxed);
        self.bypassed.store(false, Ordering::Release);
        self.usable_again.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(super) fn usable_again(&self) -> tokio::sync::watch::Receiver<u64> {
        self.usable_again.subscribe()
    }

    pub(super) fn set_subscribed(&self, live: bool) {
        self.subscribed.store(live, Ordering::Release);
        if live {
            self.settled.store(true, Ordering::Release);
        }
    }

    pub(super) fn is_subscribed(&self) -> bool {
        self.subscribed.load(Ordering::Acquire)
    }

    /// Redis could not be reached at start: readiness does not wait for it.
    pub(super) fn settle(&self) {
        self.settled.store(true, Ordering::Release);
    }

    pub(super) fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_once_after_a_run_of_timeouts_and_an_answer_ends_the_run() {
        let h = Health::default();
        assert!(!h.timed_out());
        assert!(!h.timed_out());
        h.answered();
        assert!(!h.timed_out());
        assert!(!h.timed_out());
        assert!(!h.is_bypassed());
        assert!(h.timed_out(), "the third in a row trips it");
        assert!(h.is_bypassed());
        assert!(!h.timed_out(), "tripped once: one background check");
        let again = h.usable_again();
        h.recovered();
        assert!(!h.is_bypassed());
        assert!(again.has_changed().unwrap_or(false));
        assert!(!h.timed_out(), "a new run starts from zero");
    }

    #[test]
    fn settled_by_the_first_subscription_or_by_an_unreachable_start() {
        let h = Health::default();
        assert!(!h.is_settled());
        h.set_subscribed(true);
        assert!(h.is_settled() && h.is_subscribed());
        h.set_subscribed(false);
        assert!(h.is_settled(), "a later loss does not unsettle start-up");
        let h = Health::default();
        h.settle();
        assert!(h.is_settled() && !h.is_subscribed());
    }
}
