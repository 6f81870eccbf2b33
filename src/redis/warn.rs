//! Redis failures in the log without flooding it: the first failure of
//! each operation at WARN with its cause, then at most every 30 s one WARN
//! summing up the failures since, by operation, with the last cause. (A
//! lost connection is logged once by the connection's own handler.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::redis::RedisOp;

use super::RedisError;

const SUMMARY_EVERY: Duration = Duration::from_secs(30);
const OPS: usize = RedisOp::ALL.len();

#[derive(Debug)]
pub(super) struct Warnings {
    seen: [AtomicBool; OPS],
    since: [AtomicU64; OPS],
    /// Milliseconds since `start` of the last summary.
    last_summary_ms: AtomicU64,
    start: tokio::time::Instant,
}

impl Default for Warnings {
    fn default() -> Self {
        Self {
            seen: Default::default(),
            since: Default::default(),
            last_summary_ms: AtomicU64::new(0),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Warnings {
    pub(super) fn failed(&self, op: RedisOp, e: &RedisError) {
        if let Some(line) = self.line(op, e) {
            tracing::warn!(op = op.as_str(), "{line}");
        }
    }

    /// What to log for this failure, if anything.
    fn line(&self, op: RedisOp, e: &RedisError) -> Option<String> {
        if !self.seen[op.index()].swap(true, Ordering::Relaxed) {
            return Some(format!(
                "Redis {} failed: {e} (the request went on without Redis; further failures are summed up at most every {} s)",
                op.as_str(),
                SUMMARY_EVERY.as_secs()
            ));
        }
        self.since[op.index()].fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_summary_ms.load(Ordering::Relaxed);
        let every = u64::try_from(SUMMARY_EVERY.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(last) < every
            || self
                .last_summary_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let counts: Vec<String> = RedisOp::ALL
            .iter()
            .filter_map(|op| {
                let n = self.since[op.index()].swap(0, Ordering::Relaxed);
                (n > 0).then(|| format!("{} {n}", op.as_str()))
            })
            .collect();
        Some(format!(
            "Redis failures in the last {} s: {} (last: {e})",
            Duration::from_millis(now.saturating_sub(last)).as_secs(),
            counts.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_first_of_each_then_a_summary_at_most_every_30_s() {
        let w = Warnings::default();
        let e = RedisError::Timeout(Duration::from_millis(50));
        let first = w.line(RedisOp::Get, &e).unwrap();
        assert!(
            first.starts_with("Redis get failed: redis: no answer"),
            "{first}"
        );
        assert!(
            w.line(RedisOp::Set, &e)
                .unwrap()
                .starts_with("Redis set failed")
        );
        for _ in 0..100 {
            assert_eq!(w.line(RedisOp::Get, &e), None);
        }
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(w.line(RedisOp::Set, &e), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        let summary = w.line(RedisOp::Get, &e).unwrap();
        assert_eq!(
            summary,
            "Redis failures in the last 30 s: get 101, set 1 (last: redis: no answer within 50ms)"
        );
        assert_eq!(w.line(RedisOp::Get, &e), None);
    }
}
