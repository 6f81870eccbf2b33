//! `MemoryBudget`: the bytes held for clients, over every request and
//! worker, bounded by `memory_budget` (PRODUCT.md "Hostile clients").
//!
//! Two things are charged, each by what it actually holds:
//! - **answers** read ahead from the app (`response_buffer`): each chunk
//!   read carries its [`Charge`] inside its `Bytes` ([`charged`]), so the
//!   charge is given back when the last copy of the chunk is freed, that is
//!   once hyper has written it to the client's socket, not when the body
//!   was handed over. An answer that does not fit streams unbuffered.
//! - **streams**: a shared stream keeps every event while it may still be
//!   stored (its copy for the cache, up to `max_body_bytes`); a copy that
//!   would take the budget past its limit is dropped (that stream is then
//!   not stored; it goes on for its readers). Past its copy, a stream keeps
//!   only the events its slowest readers have not taken, at most its
//!   [`MemoryBudget::stream_share`]: what answers and copies leave of the
//!   budget, split between the streams keeping such a backlog (never more
//!   than the stream's own cap, never less than [`MIN_SHARE`]); a reader
//!   further behind is cut, and the stream goes on for the others.
//!
//! Per-connection buffers (hyper's, at most `MAX_HEAD_BYTES` each on the
//! proxy port) and the cache itself (`cache.max_memory_bytes`) are bounded
//! on their own and not charged here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;

/// The least backlog a stream may keep whatever the pressure: a few
/// events, so that a reader that keeps up is never cut.
pub const MIN_SHARE: usize = 64 * 1024;

/// What a charge is for (the gauges' `use` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Answers read ahead.
    Answers,
    /// Streams' copies for the cache.
    Copies,
    /// Streams' backlogs past their copy.
    Streams,
}

impl Use {
    pub const ALL: [Use; 3] = [Use::Answers, Use::Copies, Use::Streams];

    pub fn as_str(self) -> &'static str {
        match self {
            Use::Answers => "answers",
            Use::Copies => "stream_copies",
            Use::Streams => "stream_backlogs",
        }
    }
}

#[derive(Debug)]
pub struct MemoryBudget {
    max: u64,
    answers: AtomicU64,
    copies: AtomicU64,
    streams: AtomicU64,
    /// Streams keeping a backlog past their cache copy.
    backlogs: AtomicUsize,
}

impl MemoryBudget {
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(Self {
            max,
            answers: AtomicU64::new(0),
            copies: AtomicU64::new(0),
            streams: AtomicU64::new(0),
            backlogs: AtomicUsize::new(0),
        })
    }

    /// The budget (`memory_budget`).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Bytes charged now for `what`.
    pub fn used(&self, what: Use) -> u64 {
        self.counter(what).load(Ordering::Relaxed)
    }

    fn counter(&self, what: Use) -> &AtomicU64 {
        match what {
            Use::Answers => &self.answers,
            Use::Copies => &self.copies,
            Use::Streams => &self.streams,
        }
    }

    /// Bytes charged now, for every use.
    pub fn total(&self) -> u64 {
        Use::ALL.iter().map(|u| self.used(*u)).sum()
    }

    /// Whether the charges are past the budget.
    pub fn spent(&self) -> bool {
        self.total() > self.max
    }

    /// A charge of nothing yet, for `what`.
    pub fn charge(self: &Arc<Self>, what: Use) -> Charge {
        Charge {
            budget: Arc::clone(self),
            what,
            bytes: 0,
        }
    }

    /// `n` more bytes for an answer, if the budget has room for them.
    pub fn try_answer(self: &Arc<Self>, n: u64) -> Option<Charge> {
        let mut cur = self.answers.load(Ordering::Relaxed);
        loop {
            let others = self.used(Use::Copies) + self.used(Use::Streams);
            let total = cur.saturating_add(others).saturating_add(n);
            if total > self.max {
                return None;
            }
            match self.answers.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Charge {
                        budget: Arc::clone(self),
                        what: Use::Answers,
                        bytes: n,
                    });
                }
                Err(now) => cur = now,
            }
        }
    }

    /// How far (bytes) a stream's readers may trail its newest event now:
    /// what answers and copies leave of the budget, split between the
    /// streams keeping a backlog, within `[MIN_SHARE, cap]`.
    pub fn stream_share(&self, cap: usize) -> usize {
        let taken = self.used(Use::Answers) + self.used(Use::Copies);
        let left = self.max.saturating_sub(taken);
        let streams = self.backlogs.load(Ordering::Relaxed).max(1) as u64;
        let share = usize::try_from(left / streams).unwrap_or(usize::MAX);
        share.clamp(MIN_SHARE.min(cap), cap)
    }

    /// Counts one more stream keeping a backlog, until the guard drops.
    pub fn backlog(self: &Arc<Self>) -> Backlog {
        self.backlogs.fetch_add(1, Ordering::Relaxed);
        Backlog(Arc::clone(self))
    }
}

/// Bytes charged to the budget, given back on drop.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<MemoryBudget>,
    what: Use,
    bytes: u64,
}

impl Charge {
    /// Makes the charge `n` bytes (more or fewer), whatever the budget says:
    /// for memory already held (a stream's events).
    pub fn set(&mut self, n: u64) {
        let c = self.budget.counter(self.what);
        if n > self.bytes {
            c.fetch_add(n - self.bytes, Ordering::AcqRel);
        } else {
            c.fetch_sub(self.bytes - n, Ordering::AcqRel);
        }
        self.bytes = n;
    }

    /// The same bytes, charged for `what` from now on.
    pub fn move_to(&mut self, what: Use) {
        let n = self.bytes;
        self.set(0);
        self.what = what;
        self.set(n);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget
            .counter(self.what)
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// One stream counted as keeping a backlog.
#[derive(Debug)]
pub struct Backlog(Arc<MemoryBudget>);

impl Drop for Backlog {
    fn drop(&mut self) {
        self.0.backlogs.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `bytes` carrying `charge`: the charge is given back when the last clone
/// of the returned `Bytes` is dropped (hyper's, once written).
pub fn charged(bytes: Bytes, charge: Charge) -> Bytes {
    Bytes::from_owner(Held {
        bytes,
        _charge: charge,
    })
}

struct Held {
    bytes: Bytes,
    _charge: Charge,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_fit_or_are_refused_and_charges_follow_the_bytes() {
        let b = MemoryBudget::new(100);
        let c = b.try_answer(60).unwrap();
        assert!(b.try_answer(41).is_none(), "past the budget");
        let bytes = charged(Bytes::from(vec![1u8; 60]), c);
        let copy = bytes.clone();
        drop(bytes);
        assert_eq!(b.used(Use::Answers), 60, "a copy still holds the chunk");
        drop(copy);
        assert_eq!(b.used(Use::Answers), 0);
        assert!(b.try_answer(100).is_some());
    }

    #[test]
    fn streams_share_what_answers_leave() {
        let b = MemoryBudget::new(64 * 1024 * 1024);
        let cap = 8 * 1024 * 1024;
        assert_eq!(b.stream_share(cap), cap, "one stream alone: its cap");
        let backlogs: Vec<_> = (0..16).map(|_| b.backlog()).collect();
        assert_eq!(b.stream_share(cap), 4 * 1024 * 1024);
        let answers = b.try_answer(16 * 1024 * 1024).unwrap();
        let mut copies = b.charge(Use::Copies);
        copies.set(16 * 1024 * 1024);
        assert_eq!(b.stream_share(cap), 2 * 1024 * 1024);
        assert!(b.try_answer(33 * 1024 * 1024).is_none());
        copies.set(64 * 1024 * 1024);
        assert!(b.spent());
        let more: Vec<_> = (0..10_000).map(|_| b.backlog()).collect();
        assert_eq!(b.stream_share(cap), MIN_SHARE, "never below the floor");
        drop((backlogs, more, copies, answers));
        let mut s = b.charge(Use::Copies);
        s.set(1000);
        s.set(400);
        assert_eq!(b.used(Use::Copies), 400);
        s.move_to(Use::Streams);
        assert_eq!((b.used(Use::Copies), b.used(Use::Streams)), (0, 400));
        drop(s);
        assert_eq!(b.total(), 0);
    }
}
