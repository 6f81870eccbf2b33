//! `Learner`: the quota of a route with no `upstream_limit`, learned from
//! the app's Gemini quota signals (PRODUCT.md "Upstream quota", "a quota
//! learned when none is set").
//!
//! It counts the calls that succeeded in each second of the last minute
//! (a ring of 60 counters: a few atomic operations a call, no lock). A lone
//! quota signal only notes its time (the retry deals with it); a second
//! within a minute gives the route a limit of the calls that succeeded in
//! the last minute (what the app just showed it takes), which rises by one
//! call for every minute that passes without a signal. A signal while the
//! limit is in force sets it again from the last minute's successes.
//!
//! When quota signals have gone on for a minute with no call succeeding,
//! there is no rate to learn: the quota is spent (a daily quota). The route
//! is then [`Learner::spent`]: its calls go straight through and their
//! quota signals count for the circuit breaker like any failure, so the
//! circuit opens, until a call succeeds again. (Within that minute a signal
//! with no success seen yet teaches nothing: in a burst the failures may be
//! seen before the successes that came with them.)
//!
//! Pure of clocks: the caller passes the time in (ms on its clock).

use std::sync::atomic::{AtomicU64, Ordering};

/// The window a learned limit counts in.
pub const MINUTE_MS: u64 = 60_000;

/// One second's successful calls.
#[derive(Debug, Default)]
struct Second {
    /// Which second (ms / 1000, plus one: 0 is none) the count is of.
    at: AtomicU64,
    count: AtomicU64,
}

#[derive(Debug)]
pub struct Learner {
    seconds: [Second; 60],
    /// The time of the last quota signal, plus one (0: none yet).
    last_signal: AtomicU64,
    /// The limit learned at the last signal (0: none in force).
    base: AtomicU64,
    /// Signals went on for a minute with no call succeeding: nothing to
    /// learn until one does.
    spent: std::sync::atomic::AtomicBool,
    /// The first signal since the last success, plus one (0: none).
    failing_since: AtomicU64,
}

/// What a quota signal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The first in a minute (or one while the route is spent): retried,
    /// nothing learned.
    Lone,
    /// The second in a minute: the route now has this limit.
    Engaged(u64),
    /// Under a limit already in force: set again to this.
    Relearned(u64),
    /// Repeated, with no call succeeding in the last minute: the route is
    /// spent (no limit; its signals count as failures).
    Spent,
}

impl Default for Learner {
    fn default() -> Self {
        Self {
            seconds: std::array::from_fn(|_| Second::default()),
            last_signal: AtomicU64::new(0),
            base: AtomicU64::new(0),
            spent: std::sync::atomic::AtomicBool::new(false),
            failing_since: AtomicU64::new(0),
        }
    }
}

impl Learner {
    /// A call succeeded at `now`.
    pub fn success(&self, now: u64) {
        let sec = now / 1000 + 1;
        let slot = &self.seconds[usize::try_from(sec % 60).unwrap_or(0)];
        let at = slot.at.load(Ordering::Relaxed);
        if at != sec
            && slot
                .at
                .compare_exchange(at, sec, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // A call counted by another thread between the two stores is
            // lost: the limit learned is then one lower, never higher.
            slot.count.store(0, Ordering::Relaxed);
        }
        slot.count.fetch_add(1, Ordering::Relaxed);
        if self.failing_since.load(Ordering::Relaxed) != 0 {
            self.failing_since.store(0, Ordering::Relaxed);
        }
        if self.spent.load(Ordering::Relaxed) {
            self.spent.store(false, Ordering::Relaxed);
        }
    }

    /// Signals went on for a minute with no call succeeding, and none has
    /// since: a quota signal now is a failure like any other.
    pub fn spent(&self) -> bool {
        self.spent.load(Ordering::Relaxed)
    }

    /// The calls that succeeded in each second of the last minute, as
    /// `(end of that second, calls)`, oldest first.
    pub fn recent(&self, now: u64) -> Vec<(u64, u64)> {
        let sec = now / 1000 + 1;
        let mut out: Vec<(u64, u64)> = self
            .seconds
            .iter()
            .filter_map(|s| {
                let at = s.at.load(Ordering::Relaxed);
                let n = s.count.load(Ordering::Relaxed);
                (at + 60 > sec && at <= sec && n > 0).then_some((at * 1000, n))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// The calls that succeeded in the last minute.
    pub fn successes(&self, now: u64) -> u64 {
        self.recent(now).iter().map(|(_, n)| n).sum()
    }

    /// A quota signal at `now`.
    pub fn signal(&self, now: u64) -> Signal {
        let previous = self.last_signal.swap(now + 1, Ordering::Relaxed);
        let _ =
            self.failing_since
                .compare_exchange(0, now + 1, Ordering::Relaxed, Ordering::Relaxed);
        if self.spent() {
            // Already said.
            return Signal::Lone;
        }
        let engaged = self.base.load(Ordering::Relaxed) > 0;
        let repeated = previous > 0 && now + 1 - previous <= MINUTE_MS;
        if !engaged && !repeated {
            return Signal::Lone;
        }
        let learned = self.successes(now);
        if learned == 0 {
            let since = self.failing_since.load(Ordering::Relaxed);
            if since == 0 || now + 1 - since < MINUTE_MS {
                return Signal::Lone;
            }
            self.base.store(0, Ordering::Relaxed);
            self.spent.store(true, Ordering::Relaxed);
            return Signal::Spent;
        }
        self.base.store(learned, Ordering::Relaxed);
        if engaged {
            Signal::Relearned(learned)
        } else {
            Signal::Engaged(learned)
        }
    }

    /// The limit in force at `now` (calls per minute), if one was learned:
    /// the learned one plus one for each minute since the last signal.
    pub fn limit(&self, now: u64) -> Option<u64> {
        let base = self.base.load(Ordering::Relaxed);
        if base == 0 {
            return None;
        }
        let since = now.saturating_sub(self.last_signal.load(Ordering::Relaxed).saturating_sub(1));
        Some(base + since / MINUTE_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_signal_teaches_nothing_a_second_within_a_minute_does() {
        let l = Learner::default();
        for t in 0..12 {
            l.success(1_000 + t * 1_000);
        }
        assert_eq!(l.signal(20_000), Signal::Lone);
        assert_eq!(l.limit(20_000), None);
        // A second signal 70 s later: still alone.
        assert_eq!(l.signal(90_000), Signal::Lone);
        for t in 0..15 {
            l.success(91_000 + t * 100);
        }
        assert_eq!(l.signal(100_000), Signal::Engaged(15));
        assert_eq!(l.limit(100_000), Some(15));
    }

    #[test]
    fn the_limit_rises_a_call_a_minute_without_signals_and_is_set_again_by_one() {
        let l = Learner::default();
        for t in 0..10 {
            l.success(t * 100);
        }
        l.signal(2_000);
        assert_eq!(l.signal(3_000), Signal::Engaged(10));
        assert_eq!(l.limit(62_999), Some(10));
        assert_eq!(l.limit(63_000), Some(11));
        assert_eq!(l.limit(3_000 + 5 * MINUTE_MS), Some(15));
        // A signal under it: set again from the last minute's successes.
        let later = 3_000 + 5 * MINUTE_MS;
        for t in 0..4 {
            l.success(later - 10_000 + t);
        }
        assert_eq!(l.signal(later), Signal::Relearned(4));
        assert_eq!(l.limit(later), Some(4));
    }

    #[test]
    fn signals_for_a_minute_with_no_success_make_the_route_spent_until_one() {
        let l = Learner::default();
        // Failures seen before the successes that came with them teach
        // nothing yet; the successes, then a signal, do.
        assert_eq!(l.signal(1_000), Signal::Lone);
        assert_eq!(l.signal(1_001), Signal::Lone);
        l.success(1_002);
        assert_eq!(l.signal(1_050), Signal::Engaged(1));
        // A minute on with every call failing: spent.
        let l = Learner::default();
        for t in (0..60_000).step_by(5_000) {
            assert_eq!(l.signal(t), Signal::Lone, "{t}");
        }
        assert_eq!(l.signal(60_000), Signal::Spent);
        assert!(l.spent());
        assert_eq!(l.limit(60_000), None);
        assert_eq!(l.signal(61_000), Signal::Lone);
        // The quota is back: learning again.
        l.success(70_000);
        assert!(!l.spent());
        assert_eq!(l.signal(71_000), Signal::Engaged(1));
        // Under the learned limit: set again from the minute's one success;
        // with every call failing for a minute since 71 s: spent again.
        assert_eq!(l.signal(100_000), Signal::Relearned(1));
        assert_eq!(l.signal(140_000), Signal::Spent);
        assert_eq!(l.limit(140_000), None);
    }

    #[test]
    fn successes_count_the_last_minute_only() {
        let l = Learner::default();
        l.success(500);
        l.success(30_500);
        l.success(30_600);
        assert_eq!(l.successes(31_000), 3);
        assert_eq!(l.recent(31_000), [(1_000, 1), (31_000, 2)]);
        // At 61 s the first second (0..1 s) has left the minute.
        assert_eq!(l.successes(61_000), 2);
        // The ring's slot of second 0 is reused at second 60.
        l.success(60_200);
        assert_eq!(l.successes(61_000), 3);
        assert_eq!(l.successes(200_000), 0);
    }
}
