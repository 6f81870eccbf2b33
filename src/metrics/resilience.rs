//! The figures of retries and circuits: upstream failures by legacy type
//! ([`FailureCounts`], which the classifier and the route timeout record
//! into), retries made and refused for want of budget ([`RetryStats`], the
//! retry layer's), and each circuit's state and consecutive failures, which
//! the breakers report through [`CircuitFigures`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Registry};
use serde_json::{Value, json};

use super::{load, opts, raise, raise_vec, reg};
use crate::error::Failure;

/// Upstream failures by type since start.
#[derive(Debug, Default)]
pub struct FailureCounts([AtomicU64; Failure::ALL.len()]);

impl FailureCounts {
    pub fn record(&self, f: Failure) {
        self.0[f.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, f: Failure) -> u64 {
        self.0[f.index()].load(Ordering::Relaxed)
    }

    pub fn reset(&self) {
        for c in &self.0 {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// Retry figures since start.
#[derive(Debug, Default)]
pub struct RetryStats {
    /// Retries made.
    pub retries: AtomicU64,
    /// Retries not made because the budget was spent.
    pub budget_exhausted: AtomicU64,
}

/// A circuit's state, as the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub const ALL: [CircuitState; 3] = [Self::Closed, Self::Open, Self::HalfOpen];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The legacy gauge's value.
    fn legacy(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 0.5,
            Self::Open => 1.0,
        }
    }
}

/// One circuit, as read at a scrape.
#[derive(Debug, Clone)]
pub struct CircuitReading {
    pub name: Arc<str>,
    pub state: CircuitState,
    pub consecutive_failures: u32,
}

/// What the breakers report.
pub trait CircuitFigures: Send + Sync + std::fmt::Debug {
    fn circuits(&self) -> Vec<CircuitReading>;
}

#[derive(Debug)]
pub struct ResilienceMetrics {
    failures: Arc<FailureCounts>,
    retry: Arc<RetryStats>,
    circuits: Arc<dyn CircuitFigures>,
    upstream_errors: IntCounterVec,
    retries: IntCounter,
    retry_budget_exhausted: IntCounter,
    circuit_state: IntGaugeVec,
    circuit_failures: IntGaugeVec,
}

impl ResilienceMetrics {
    pub fn new(
        r: &Registry,
        failures: Arc<FailureCounts>,
        retry: Arc<RetryStats>,
        circuits: Arc<dyn CircuitFigures>,
    ) -> Self {
        Self {
            failures,
            retry,
            circuits,
            upstream_errors: series!(
                r,
                IntCounterVec,
                opts(
                    "upstream_errors_total",
                    "Failed upstream attempts, by legacy error type"
                ),
                &["type"]
            ),
            retries: series!(
                r,
                IntCounter,
                opts("retries_total", "Upstream attempts made as retries")
            ),
            retry_budget_exhausted: series!(
                r,
                IntCounter,
                opts(
                    "retry_budget_exhausted_total",
                    "Retries not made because the retry budget was spent"
                )
            ),
            circuit_state: series!(
                r,
                IntGaugeVec,
                opts("circuit_state", "1 for the state each circuit is in"),
                &["circuit", "state"]
            ),
            circuit_failures: series!(
                r,
                IntGaugeVec,
                opts(
                    "circuit_consecutive_failures",
                    "Consecutive failures counted by each circuit"
                ),
                &["circuit"]
            ),
        }
    }

    /// The circuits not closed, for the health score.
    pub fn open_circuits(&self) -> Vec<String> {
        self.circuits
            .circuits()
            .into_iter()
            .filter(|c| c.state != CircuitState::Closed)
            .map(|c| c.name.to_string())
            .collect()
    }

    /// The legacy counters `retries`, `retry.budget_exhausted`; the upstream
    /// failures by type.
    pub fn legacy(&self, c: &mut BTreeMap<String, u64>, e: &mut BTreeMap<String, u64>) {
        c.insert("retries".into(), load(&self.retry.retries));
        c.insert(
            "retry.budget_exhausted".into(),
            load(&self.retry.budget_exhausted),
        );
        for f in Failure::ALL {
            e.insert(f.as_str().to_string(), self.failures.get(f));
        }
    }

    /// The legacy gauges `circuit_state.<name>`.
    pub fn legacy_gauges(&self, g: &mut serde_json::Map<String, Value>) {
        for c in self.circuits.circuits() {
            g.insert(format!("circuit_state.{}", c.name), json!(c.state.legacy()));
        }
    }

    pub fn sync(&self) {
        for f in Failure::ALL {
            raise_vec(&self.upstream_errors, &[f.as_str()], self.failures.get(f));
        }
        raise(&self.retries, load(&self.retry.retries));
        raise(
            &self.retry_budget_exhausted,
            load(&self.retry.budget_exhausted),
        );
        for c in self.circuits.circuits() {
            for st in CircuitState::ALL {
                if let Ok(g) = self
                    .circuit_state
                    .get_metric_with_label_values(&[&c.name, st.as_str()])
                {
                    g.set(i64::from(c.state == st));
                }
            }
            if let Ok(g) = self
                .circuit_failures
                .get_metric_with_label_values(&[&c.name])
            {
                g.set(i64::from(c.consecutive_failures));
            }
        }
    }
}
