//! The legacy `/api/metrics` view: counters, timers, gauges, errors and the
//! recent errors, in the legacy app's JSON shape, each concern adding its
//! own. `POST /api/metrics/reset` (the legacy reset) does not zero the
//! monotonic counters behind it: it remembers a baseline that this view
//! subtracts, so a reset never makes a Prometheus counter go backwards.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "the locks guard the recent-errors list, the reset baseline and the scrape: held for a copy or an insert, never across an await, and taken only on failures, resets and scrapes"
)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::{Value, json};

use super::{Metrics, lock};

/// The legacy counters and errors at the last reset.
#[derive(Debug, Default)]
pub struct Baseline(Mutex<BTreeMap<String, u64>>);

impl Metrics {
    /// The legacy counters and errors as recorded since start.
    fn raw(&self) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
        let (mut c, mut e) = (BTreeMap::new(), BTreeMap::new());
        self.requests.legacy(&mut c, &mut e);
        self.rate_limit.legacy(&mut c);
        self.quota.legacy(&mut c);
        self.resilience.legacy(&mut c, &mut e);
        (c, e)
    }

    /// `POST /api/metrics/reset`: the legacy view starts again from zero.
    pub fn reset(&self) {
        let (c, e) = self.raw();
        let mut base = lock(&self.baseline.0);
        base.clear();
        base.extend(c.into_iter().map(|(k, v)| (format!("c:{k}"), v)));
        base.extend(e.into_iter().map(|(k, v)| (format!("e:{k}"), v)));
        drop(base);
        self.requests.reset();
    }

    /// The legacy timers: `request_duration` and `upstream.<route>`.
    pub fn timers(&self) -> Value {
        self.requests.timers()
    }

    /// The legacy counters, since the last reset.
    pub fn counters(&self) -> Value {
        self.since_reset().0
    }

    fn since_reset(&self) -> (Value, Value) {
        let (c, e) = self.raw();
        let base = lock(&self.baseline.0);
        let sub = |prefix: &str, m: BTreeMap<String, u64>| {
            Value::Object(
                m.into_iter()
                    .map(|(k, v)| {
                        let b = base.get(&format!("{prefix}{k}")).copied().unwrap_or(0);
                        (k, json!(v.saturating_sub(b)))
                    })
                    .collect(),
            )
        };
        (sub("c:", c), sub("e:", e))
    }

    /// The legacy `/api/metrics` body.
    pub fn to_json(&self) -> Value {
        let (counters, errors) = self.since_reset();
        let mut gauges = serde_json::Map::new();
        self.requests.legacy_gauges(&mut gauges);
        self.cache.legacy_gauges(&mut gauges);
        self.resilience.legacy_gauges(&mut gauges);
        self.quota.legacy_gauges(&mut gauges);
        json!({
            "counters": counters,
            "timers": self.timers(),
            "gauges": gauges,
            "errors": errors,
            "recent_errors": self.requests.recent_errors(),
            "uptime_seconds": self.uptime().as_secs(),
        })
    }
}
