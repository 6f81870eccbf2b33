//! The rate limiter's figures: rejections and dry-run rejections by route,
//! and the client keys it holds state for. The limiter reports them through
//! [`RateLimitFigures`], which it implements.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus::{IntCounterVec, IntGauge, Registry};

use super::{opts, raise_vec, reg};

/// One route's rejections, as read at a scrape.
#[derive(Debug, Clone, Default)]
pub struct RouteRejections {
    pub route: String,
    pub rejected: u64,
    pub dry_run_rejected: u64,
}

/// What the rate limiter reports.
pub trait RateLimitFigures: Send + Sync + std::fmt::Debug {
    fn routes(&self) -> Vec<RouteRejections>;
    fn tracked_keys(&self) -> usize;
}

#[derive(Debug)]
pub struct RateLimitMetrics {
    source: Arc<dyn RateLimitFigures>,
    rejected: IntCounterVec,
    dry_run: IntCounterVec,
    clients: IntGauge,
}

impl RateLimitMetrics {
    pub fn new(r: &Registry, source: Arc<dyn RateLimitFigures>) -> Self {
        Self {
            source,
            rejected: series!(
                r,
                IntCounterVec,
                opts(
                    "ratelimit_rejected_total",
                    "Requests answered 429, by route"
                ),
                &["route"]
            ),
            dry_run: series!(
                r,
                IntCounterVec,
                opts(
                    "ratelimit_dry_run_rejected_total",
                    "Requests a dry-run limit would have rejected, by route"
                ),
                &["route"]
            ),
            clients: series!(
                r,
                IntGauge,
                opts(
                    "ratelimit_tracked_clients",
                    "Client keys the rate limiters hold state for (forgotten once recovered)"
                )
            ),
        }
    }

    /// The legacy counter `rate_limit.rejected`.
    pub fn legacy(&self, c: &mut BTreeMap<String, u64>) {
        let rejected = self.source.routes().iter().map(|r| r.rejected).sum();
        c.insert("rate_limit.rejected".into(), rejected);
    }

    pub fn sync(&self) {
        for r in self.source.routes() {
            raise_vec(&self.rejected, &[&r.route], r.rejected);
            raise_vec(&self.dry_run, &[&r.route], r.dry_run_rejected);
        }
        self.clients
            .set(i64::try_from(self.source.tracked_keys()).unwrap_or(i64::MAX));
    }
}
