//! `RouteQuota`: one route's quota: its limits (configured, or learned by
//! [`super::learn::Learner`]), this sidecar's windows ([`super::book::Book`]),
//! the fleet's keys, and what a call's result teaches a learning route.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::Response;

use super::book::{Book, Limit};
use super::learn::{Learner, MINUTE_MS, Signal};
use super::{GUARD, describe, ms};
use crate::BoxError;
use crate::body::Body;
use crate::config::Route;
use crate::error::Failure;
use crate::extensions::UpstreamFailure;
use crate::metrics::quota::RouteQuotaStats;
use crate::redis::RATE_LIMIT_SPACE;

/// One route's quota.
#[derive(Debug)]
pub(super) struct RouteQuota {
    pub(super) name: String,
    pub(super) limits: Vec<Limit>,
    /// The index of the shortest window (the one fairness counts in).
    pub(super) fair: usize,
    pub(super) queue: Duration,
    pub(super) stale_first: bool,
    /// `Upstream quota of 15 per minute reached`
    pub(super) message: String,
    /// The fleet's keys: one per limit, then the waiting set, its liveness
    /// and the recent calls fairness counts; one hash slot (`{quota:<route>}`), in the limiter's space
    /// (a cache clear leaves it).
    pub(super) keys: Vec<String>,
    /// This sidecar's windows: the whole quota while Redis is away.
    #[allow(
        clippy::disallowed_types,
        reason = "held for a few list operations, never across an await"
    )]
    pub(super) book: std::sync::Mutex<Book>,
    /// Woken when a call is taken or a waiting request leaves.
    pub(super) changed: tokio::sync::Notify,
    pub(super) stats: Arc<RouteQuotaStats>,
    /// A route with no `upstream_limit`: its limit, when one is learned.
    pub(super) learner: Option<Learner>,
}

impl RouteQuota {
    /// The quota of `route`: its `upstream_limit`, or one to learn.
    pub(super) fn new(route: &Route, stats: Arc<RouteQuotaStats>) -> Self {
        let (limits, message, learner) = match &route.upstream_limit {
            Some(limits) => {
                let text: Vec<String> = limits.limits().iter().map(|l| describe(*l)).collect();
                let limits = limits
                    .limits()
                    .iter()
                    .map(|r| Limit {
                        count: r.count,
                        window_ms: ms(r.period).max(1),
                    })
                    .collect();
                (
                    limits,
                    format!("Upstream quota of {} reached", text.join("; ")),
                    None,
                )
            }
            // Its count is set from the learner at every turn.
            None => (
                vec![Limit {
                    count: 1,
                    window_ms: MINUTE_MS,
                }],
                String::new(),
                Some(Learner::default()),
            ),
        };
        Self::with(route, limits, message, learner, stats)
    }

    pub(super) fn with(
        route: &Route,
        limits: Vec<Limit>,
        message: String,
        learner: Option<Learner>,
        stats: Arc<RouteQuotaStats>,
    ) -> Self {
        let name = route.name.as_str();
        let fair = limits
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| l.window_ms)
            .map_or(0, |(i, _)| i);
        let tag = format!("{RATE_LIMIT_SPACE}{{quota:{name}}}");
        let mut keys: Vec<String> = (0..limits.len()).map(|i| format!("{tag}:{i}")).collect();
        keys.push(format!("{tag}:waiting"));
        keys.push(format!("{tag}:alive"));
        keys.push(format!("{tag}:recent"));
        #[allow(
            clippy::disallowed_methods,
            clippy::disallowed_types,
            reason = "held for a few list operations, never across an await"
        )]
        let book = std::sync::Mutex::new(Book::new(limits.clone(), ms(GUARD)));
        Self {
            name: name.to_string(),
            book,
            limits,
            fair,
            queue: route.upstream_queue,
            stale_first: route.upstream_queue_stale,
            message,
            keys,
            changed: tokio::sync::Notify::new(),
            stats,
            learner,
        }
    }

    /// The refusal's message: `Upstream quota of 15 per minute reached`
    /// (`… (learned) reached` for a learned one).
    pub(super) fn message(&self, now: u64) -> String {
        match self.learner.as_ref().and_then(|l| l.limit(now)) {
            Some(n) => format!("Upstream quota of {n} per minute (learned) reached"),
            None => self.message.clone(),
        }
    }

    /// What a call's result teaches a learning route: a success counts, a
    /// quota signal may set its limit.
    pub(super) fn observe(&self, result: &Result<Response<Body>, BoxError>, now: u64) {
        let Some(learner) = &self.learner else {
            return;
        };
        match UpstreamFailure::of(result) {
            None if result.is_ok() => learner.success(now),
            Some(Failure::GeminiRateLimit) => match learner.signal(now) {
                Signal::Lone => {}
                Signal::Spent => {
                    self.stats.learned.store(0, Ordering::Relaxed);
                    tracing::warn!(
                        route = %self.name,
                        "upstream quota signals with no call succeeding for a minute: nothing to learn, the circuit breaker counts them"
                    );
                }
                Signal::Engaged(n) => {
                    // The windows start with the calls of the last minute.
                    let mut book = self.book();
                    book.set_count(0, n);
                    book.seed(&learner.recent(now));
                    drop(book);
                    self.stats.learned.store(n, Ordering::Relaxed);
                    tracing::warn!(
                        route = %self.name,
                        "upstream quota signals repeat: the route now holds its calls to a learned limit of {n} per minute"
                    );
                }
                Signal::Relearned(n) => {
                    self.book().set_count(0, n);
                    self.stats.learned.store(n, Ordering::Relaxed);
                    tracing::warn!(
                        route = %self.name,
                        "an upstream quota signal under the learned limit: now {n} per minute"
                    );
                }
            },
            _ => {}
        }
    }

    pub(super) fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
