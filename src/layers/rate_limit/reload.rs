//! The limits' figures for the metrics, and the limits across a
//! configuration reload: what a route keeps (its limiters, so every
//! client's count) when its limits did not change.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::RateLimitLayer;
use crate::config::Config;
use crate::metrics::rate_limit::{RateLimitFigures, RouteRejections};

impl RateLimitLayer {
    /// The limits of a reloaded configuration: a route whose limits and
    /// dry run are unchanged keeps its limiters (and so every client's
    /// count); a changed one starts afresh, its figures carried over.
    /// Shared limits live in Redis under their names, and are kept either
    /// way while the rates are the same.
    pub fn reloaded(&self, cfg: &Config) -> Self {
        let old = self.shared.as_ref();
        let mut next = Self::new(cfg, self.redis.clone());
        let (Some(old), Some(new)) = (old, next.shared.as_mut().and_then(Arc::get_mut)) else {
            return next;
        };
        for (route, policy) in &mut new.routes {
            let Some(before) = old.routes.get(route) else {
                continue;
            };
            let same = before.dry_run == policy.dry_run
                && before.limits.len() == policy.limits.len()
                && before
                    .limits
                    .iter()
                    .zip(&policy.limits)
                    .all(|(a, b)| a.rate == b.rate);
            if same {
                *policy = Arc::clone(before);
            } else if let Some(p) = Arc::get_mut(policy) {
                p.rejected = AtomicU64::new(before.rejected.load(Ordering::Relaxed));
                p.dry_run_rejected =
                    AtomicU64::new(before.dry_run_rejected.load(Ordering::Relaxed));
            }
        }
        new.fallbacks = AtomicU64::new(old.fallbacks.load(Ordering::Relaxed));
        if let Some(secret) = old.secret.get() {
            new.secret = tokio::sync::OnceCell::new_with(Some(secret.clone()));
        }
        next
    }
}

/// The figures of the limits in force, through every reload.
impl RateLimitFigures for arc_swap::ArcSwap<RateLimitLayer> {
    fn routes(&self) -> Vec<RouteRejections> {
        self.load().routes()
    }

    fn tracked_keys(&self) -> usize {
        RateLimitLayer::tracked_keys(&self.load())
    }
}

/// The limiter reports its rejections and tracked keys to the metrics.
impl RateLimitFigures for RateLimitLayer {
    fn routes(&self) -> Vec<RouteRejections> {
        self.policies()
            .map(|(route, p)| RouteRejections {
                route: route.to_string(),
                rejected: p.rejected.load(Ordering::Relaxed),
                dry_run_rejected: p.dry_run_rejected.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn tracked_keys(&self) -> usize {
        RateLimitLayer::tracked_keys(self)
    }
}
