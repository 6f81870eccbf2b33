//! Bounded-memory timers and the 5-minute error rate.
//!
//! [`Window`] keeps the last [`WINDOW`] samples of one worker in a ring of
//! atomics (plus count, sum, min and max since the last reset); the legacy
//! percentiles are computed over the union of the workers' rings when read,
//! so memory never grows with traffic and recording is a handful of
//! uncontended atomic stores. [`ErrorRate`] counts requests and 5xx answers
//! in 30 buckets of 10 s.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

/// Samples kept per timer and worker.
pub const WINDOW: usize = 1024;

#[derive(Debug)]
pub struct Window {
    /// Nanoseconds + 1; 0 is an empty slot.
    samples: Box<[AtomicU64]>,
    next: AtomicUsize,
    count: AtomicU64,
    sum_ns: AtomicU64,
    min_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            samples: (0..WINDOW).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(0),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            min_ns: AtomicU64::new(u64::MAX),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl Window {
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos())
            .unwrap_or(u64::MAX - 1)
            .min(u64::MAX - 1);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % WINDOW;
        self.samples[i].store(ns + 1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.min_ns.fetch_min(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    pub fn reset(&self) {
        for s in self.samples.iter() {
            s.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Relaxed);
        self.sum_ns.store(0, Ordering::Relaxed);
        self.min_ns.store(u64::MAX, Ordering::Relaxed);
        self.max_ns.store(0, Ordering::Relaxed);
    }
}

/// The legacy timer figures over several workers' windows, in seconds:
/// count, min, max and avg since the last reset; p50, p95 and p99 over the
/// last [`WINDOW`] samples of each worker.
pub fn summary<'a>(windows: impl Iterator<Item = &'a Window>) -> Option<Value> {
    let (mut count, mut sum, mut min, mut max) = (0u64, 0u64, u64::MAX, 0u64);
    let mut samples = Vec::new();
    for w in windows {
        count += w.count.load(Ordering::Relaxed);
        sum = sum.saturating_add(w.sum_ns.load(Ordering::Relaxed));
        min = min.min(w.min_ns.load(Ordering::Relaxed));
        max = max.max(w.max_ns.load(Ordering::Relaxed));
        samples.extend(
            w.samples
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .filter(|&s| s != 0)
                .map(|s| s - 1),
        );
    }
    if count == 0 || samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let pct = |p: f64| {
        let rank = (p / 100.0 * samples.len() as f64).ceil() as usize;
        secs(samples[rank.clamp(1, samples.len()) - 1])
    };
    Some(json!({
        "count": count,
        "min": secs(min),
        "max": secs(max),
        "avg": secs(sum / count),
        "p50": pct(50.0),
        "p95": pct(95.0),
        "p99": pct(99.0),
    }))
}

/// Nanoseconds as seconds, to the microsecond.
fn secs(ns: u64) -> f64 {
    (ns as f64 / 1e3).round() / 1e6
}

/// Buckets of the error-rate window.
const BUCKETS: usize = 30;
/// Seconds per bucket: 30 × 10 s = the legacy 5 minutes.
const BUCKET_SECS: u64 = 10;

#[derive(Debug)]
struct Bucket {
    /// Which 10-second period the counts belong to.
    epoch: AtomicU64,
    total: AtomicU64,
    errors: AtomicU64,
}

/// Requests and 5xx answers of the last 5 minutes (one worker's).
#[derive(Debug)]
pub struct ErrorRate {
    buckets: Box<[Bucket]>,
}

impl Default for ErrorRate {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS)
                .map(|_| Bucket {
                    epoch: AtomicU64::new(u64::MAX),
                    total: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                })
                .collect(),
        }
    }
}

impl ErrorRate {
    /// Records one answer at `now_secs` (seconds since any fixed start).
    /// Each worker records into its own, from one thread.
    pub fn record(&self, now_secs: u64, error: bool) {
        let epoch = now_secs / BUCKET_SECS;
        let b = &self.buckets[(epoch % BUCKETS as u64) as usize];
        if b.epoch.load(Ordering::Acquire) != epoch {
            b.total.store(0, Ordering::Relaxed);
            b.errors.store(0, Ordering::Relaxed);
            b.epoch.store(epoch, Ordering::Release);
        }
        b.total.fetch_add(1, Ordering::Relaxed);
        if error {
            b.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets every answer (the metrics reset: the health score's error
    /// rate starts over with the counters).
    pub fn reset(&self) {
        for b in self.buckets.iter() {
            b.epoch.store(u64::MAX, Ordering::Release);
            b.total.store(0, Ordering::Relaxed);
            b.errors.store(0, Ordering::Relaxed);
        }
    }

    /// (requests, errors) of the buckets still inside the window.
    pub fn totals(&self, now_secs: u64) -> (u64, u64) {
        let epoch = now_secs / BUCKET_SECS;
        self.buckets
            .iter()
            .filter(|b| {
                let e = b.epoch.load(Ordering::Acquire);
                e != u64::MAX && e + BUCKETS as u64 > epoch
            })
            .fold((0, 0), |(t, e), b| {
                (
                    t + b.total.load(Ordering::Relaxed),
                    e + b.errors.load(Ordering::Relaxed),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_over_windows_in_seconds() {
        let (a, b) = (Window::default(), Window::default());
        for ms in 1..=50 {
            a.record(Duration::from_millis(ms));
        }
        for ms in 51..=100 {
            b.record(Duration::from_millis(ms));
        }
        let s = summary([&a, &b].into_iter()).unwrap();
        assert_eq!(s["count"], 100);
        assert_eq!(s["min"], 0.001);
        assert_eq!(s["max"], 0.1);
        assert_eq!(s["avg"], 0.0505);
        assert_eq!(s["p50"], 0.05);
        assert_eq!(s["p95"], 0.095);
        assert_eq!(s["p99"], 0.099);
        a.reset();
        b.reset();
        assert!(summary([&a, &b].into_iter()).is_none());
    }

    #[test]
    fn the_window_keeps_only_the_last_samples() {
        let w = Window::default();
        for _ in 0..WINDOW {
            w.record(Duration::from_secs(9));
        }
        for _ in 0..WINDOW {
            w.record(Duration::from_millis(1));
        }
        let s = summary(std::iter::once(&w)).unwrap();
        // Percentiles see only the recent samples; count/max cover all.
        assert_eq!(s["p99"], 0.001);
        assert_eq!(s["max"], 9.0);
        assert_eq!(s["count"], 2 * WINDOW as u64);
    }

    #[test]
    fn error_rate_forgets_after_five_minutes() {
        let r = ErrorRate::default();
        for i in 0..100 {
            r.record(1000, i % 10 == 0);
        }
        assert_eq!(r.totals(1000), (100, 10));
        assert_eq!(r.totals(1000 + 290), (100, 10));
        assert_eq!(r.totals(1000 + 300), (0, 0));
        r.record(1000 + 300, true); // reuses the old bucket
        assert_eq!(r.totals(1000 + 300), (1, 1));
    }
}
