//! Trace export figures: the spans the exporter sent, those the collector
//! refused or never took, and those dropped because the bounded queue in
//! front of the exporter was full. The trace module records them
//! ([`SpanCounts`]); they are exported as
//! `rag_sidecar_trace_spans_total{outcome}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{IntCounterVec, Registry};

use super::{opts, raise_vec, reg};

/// Spans by what became of them, since start.
#[derive(Debug, Default)]
pub struct SpanCounts {
    /// Accepted by the collector.
    pub exported: AtomicU64,
    /// Sent and refused, or not sent (the collector down, slow or failing).
    pub failed: AtomicU64,
    /// Never queued: the queue was full.
    pub dropped: AtomicU64,
}

impl SpanCounts {
    pub fn add(n: &AtomicU64, by: u64) {
        n.fetch_add(by, Ordering::Relaxed);
    }

    fn get(n: &AtomicU64) -> u64 {
        n.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct TraceMetrics {
    source: Arc<SpanCounts>,
    spans: IntCounterVec,
}

impl TraceMetrics {
    pub fn new(r: &Registry, source: Arc<SpanCounts>) -> Self {
        Self {
            source,
            spans: series!(
                r,
                IntCounterVec,
                opts(
                    "trace_spans_total",
                    "Finished spans by outcome: exported, failed (the collector refused them or could not be reached), dropped (the export queue was full)"
                ),
                &["outcome"]
            ),
        }
    }

    pub fn sync(&self) {
        let s = &self.source;
        for (outcome, n) in [
            ("exported", &s.exported),
            ("failed", &s.failed),
            ("dropped", &s.dropped),
        ] {
            raise_vec(&self.spans, &[outcome], SpanCounts::get(n));
        }
    }
}
