//! `UpstreamQuota`: spends what the app pays per call (Gemini's free tier:
//! 15 requests a minute) to the last call, fairly, on routes with an
//! `upstream_limit`, per PRODUCT.md "Upstream quota".
//!
//! Every request that leaves for the upstream on such a route costs one call
//! (the layer sits below the retry, so each attempt does; below the cache,
//! so hits and coalesced waiters cost nothing; above the circuit breaker, so
//! a request refused here is no failure of the app's).
//!
//! - **Exact sliding windows** ([`book::Book`]): each limit allows at most N
//!   calls in any W, as a log of call times; a call goes the moment every
//!   window has room, so a burst of N goes at once and no idle second's
//!   allowance is lost. A call counts for W plus [`GUARD`], so the app's
//!   own window, which sees each call a little after it left, is never
//!   exceeded either. (This replaced an even spacing, one call every W/N,
//!   which threw away the burst the app allows: `docs/upstream-quota.md`.)
//! - **Fair**: a request that cannot go at once waits in the route's queue;
//!   when a call is free it goes to the waiting client key (the rate
//!   limiter's) with the fewest calls in the last two spans of the shortest
//!   window (then the one served longest ago), first come first served
//!   within one client. Nothing is reserved ahead: the call is
//!   given when it comes due, so a request whose client left (its future
//!   dropped) passes its turn to the next.
//! - **Stale first** (`upstream_queue_stale`): a request that would have to
//!   wait while the cache holds a stale answer for it is refused at once;
//!   the cache above answers with that answer (`detail=quota`).
//! - **Told at once**: a request that the calls freeing within its wait
//!   (`upstream_queue`, never past the route's deadline) cannot reach,
//!   counting those due before it, is refused at once with the time to room
//!   as its `Retry-After`; one that waits and still finds no turn is
//!   refused when its wait is over.
//!
//! - **Learned when none is set** ([`learn::Learner`]): on a route with no
//!   `upstream_limit`, requests pass straight through (marked
//!   [`QuotaLearning`], so that the breaker does not count a quota signal
//!   on them as the app's failure) while the calls that succeed are
//!   counted. Quota signals repeating within a minute give the route a
//!   limit of the last minute's successful calls, rising by one a minute
//!   without a signal; from then on its requests take the same queue as a
//!   configured limit's (this sidecar's windows: a learned limit is each
//!   sidecar's own).
//!
//! The route's state and what a result teaches it live in `route`; the
//! waiting loop of one request in `ticket`.
//!
//! With Redis the windows and the queue are the fleet's: one script run a
//! turn (`redis::scripts::QUOTA_LUA`, the same arithmetic on the server's
//! clock), keys of one hash slot per route. Waiting requests ask again when
//! the room is due (at most every [`POLL`]); a request on a sidecar that died
//! drops out of the fleet's queue after 2 s. While Redis is down or slow,
//! each sidecar keeps its own windows ([`book::Book`], which also records
//! the calls the fleet let this sidecar make).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};

use crate::BoxError;
use crate::body::Body;
use crate::config::{Config, Rate};
use crate::error::UpstreamQuota;
use crate::extensions::{Deadline, Departure, QuotaLearning, QuotaWait, StaleAtHand, client_of};
use crate::metrics::quota::{LEARNED, QuotaStats};
use crate::redis::RedisStore;
use crate::route::MatchedRoute;
use crate::service::{BoxResponseFuture, Counted, Inner, call_boxed, ceil_secs, take_ready};

pub mod book;
pub mod learn;
mod route;
mod ticket;

use self::route::RouteQuota;
use self::ticket::Ticket;

/// How long past its window a call still counts: the app's window sees a
/// call when it arrives, a little after it left here.
pub const GUARD: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct Shared {
    routes: HashMap<String, Arc<RouteQuota>>,
    redis: Option<RedisStore>,
    stats: Arc<QuotaStats>,
    /// The local windows' clock.
    start: tokio::time::Instant,
    /// This sidecar, in the fleet's queue.
    sidecar: String,
    /// Numbers requests in arrival order.
    seq: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct QuotaLayer {
    shared: Arc<Shared>,
}

/// `15 per minute` (Flask-Limiter's words, without "requests").
fn describe(r: Rate) -> String {
    format!("{} per {}", r.count, r.period_text())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl QuotaLayer {
    /// The quotas of the routes with an `upstream_limit`, over `redis` when
    /// configured, recording into `stats`.
    pub fn new(cfg: &Config, redis: Option<RedisStore>, stats: Arc<QuotaStats>) -> Self {
        let routes = cfg
            .routes
            .iter()
            .filter_map(|r| {
                let route_stats = stats.route(&r.name)?;
                Some((r.name.clone(), Arc::new(RouteQuota::new(r, route_stats))))
            })
            .collect();
        Self {
            shared: Arc::new(Shared {
                routes,
                redis,
                stats,
                start: tokio::time::Instant::now(),
                sidecar: uuid::Uuid::new_v4().simple().to_string(),
                seq: AtomicU64::new(0),
            }),
        }
    }

    /// The quotas of a reloaded configuration: a route whose limits, queue
    /// and stale-first choice are unchanged keeps its windows and waiting
    /// requests (a learned limit too); a changed one starts afresh. The
    /// fleet's windows in Redis are kept either way (they are the app's
    /// calls, whatever the limit).
    pub fn reloaded(&self, cfg: &Config) -> Self {
        let old = &self.shared;
        old.stats.reroute(Self::routes(cfg));
        let routes = cfg
            .routes
            .iter()
            .filter_map(|r| {
                let fresh = RouteQuota::new(r, old.stats.route(&r.name)?);
                let kept = old.routes.get(&r.name).filter(|o| {
                    o.limits == fresh.limits
                        && o.queue == fresh.queue
                        && o.stale_first == fresh.stale_first
                        && o.message == fresh.message
                });
                Some((
                    r.name.clone(),
                    kept.map_or_else(|| Arc::new(fresh), Arc::clone),
                ))
            })
            .collect();
        Self {
            shared: Arc::new(Shared {
                routes,
                redis: old.redis.clone(),
                stats: Arc::clone(&old.stats),
                start: old.start,
                sidecar: old.sidecar.clone(),
                seq: AtomicU64::new(old.seq.load(std::sync::atomic::Ordering::Relaxed)),
            }),
        }
    }

    /// Every route and its limits (for the metrics' labels):
    /// `("rag", [("15 per minute", 15)])`, or `[("learned", 0)]` for a
    /// route with no `upstream_limit`.
    pub fn routes(cfg: &Config) -> Vec<(&str, Vec<(String, u64)>)> {
        cfg.routes
            .iter()
            .map(|r| {
                let windows = match &r.upstream_limit {
                    Some(limits) => limits
                        .limits()
                        .iter()
                        .map(|l| (describe(*l), l.count))
                        .collect(),
                    None => vec![(LEARNED.to_string(), 0)],
                };
                (r.name.as_str(), windows)
            })
            .collect()
    }
}

impl<S> tower::Layer<S> for QuotaLayer {
    type Service = QuotaService<S>;

    fn layer(&self, inner: S) -> QuotaService<S> {
        QuotaService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuotaService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Inner> tower::Service<Request<Body>> for QuotaService<S> {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = futures_util::future::Either<Observed<S::Future>, BoxResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let quota = req
            .extensions()
            .get::<MatchedRoute>()
            .and_then(|r| self.shared.routes.get(&r.name))
            .cloned();
        let Some(quota) = quota else {
            return futures_util::future::Either::Left(Observed {
                fut: self.inner.call(req),
                watch: None,
            });
        };
        if let Some(learner) = &quota.learner {
            if learner.limit(self.shared.now_ms()).is_none() {
                // No limit in force: straight through, counted; a quota
                // signal on it teaches, unless the route is spent.
                if !learner.spent() {
                    req.extensions_mut().insert(QuotaLearning);
                }
                return futures_util::future::Either::Left(Observed {
                    fut: self.inner.call(req),
                    watch: Some((quota, self.shared.start)),
                });
            }
        }
        let mut inner = take_ready(&mut self.inner);
        let shared = Arc::clone(&self.shared);
        futures_util::future::Either::Right(Box::pin(async move {
            let asked = tokio::time::Instant::now();
            let mut max_wait = quota.queue;
            if let Some(d) = req.extensions().get::<Deadline>() {
                max_wait = max_wait.min(d.at.saturating_duration_since(asked));
            }
            let stale_at_hand = req.extensions().get::<StaleAtHand>().is_some();
            let ticket = Ticket {
                seq: shared.seq.fetch_add(1, Ordering::Relaxed),
                client: client_of(req.extensions()),
                shared: Arc::clone(&shared),
                quota: Arc::clone(&quota),
                done: false,
            };
            let waiting = Counted::new(&quota.stats.waiting);
            match ticket.wait(asked, max_wait, stale_at_hand).await {
                Ok(()) => {
                    drop(waiting);
                    let waited = asked.elapsed();
                    if !waited.is_zero() {
                        // The call leaves now: what the cache stamps on
                        // its answer is the corpus as it is now.
                        if let Some(d) = req.extensions().get::<Departure>() {
                            d.mark();
                        }
                    }
                    shared.stats.waited(&quota.name, waited.as_secs_f64());
                    let mut out = call_boxed(&mut inner, req).await;
                    quota.observe(&out, shared.now_ms());
                    if let Ok(resp) = &mut out {
                        resp.extensions_mut().insert(QuotaWait(waited));
                    }
                    out
                }
                Err(refused) => {
                    if refused.stale {
                        quota.stats.stale.fetch_add(1, Ordering::Relaxed);
                    } else {
                        quota.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(route = %quota.name, stale = refused.stale, "upstream quota: no call within {max_wait:?} (room in {:?})", refused.room_in);
                    Err(Box::new(UpstreamQuota {
                        message: quota.message(shared.now_ms()),
                        retry_after: ceil_secs(refused.room_in).max(1),
                    }) as BoxError)
                }
            }
        }))
    }
}

pin_project_lite::pin_project! {
    /// A call that went straight through: on a learning route its result
    /// is counted (no boxing: most requests take this path).
    pub struct Observed<F> {
        #[pin]
        fut: F,
        // The route, and the layer's clock (its start).
        watch: Option<(Arc<RouteQuota>, tokio::time::Instant)>,
    }
}

impl<F> std::future::Future for Observed<F>
where
    F: std::future::Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.fut.poll(cx));
        if let Some((quota, start)) = this.watch.take() {
            quota.observe(&result, ms(start.elapsed()));
        }
        Poll::Ready(result)
    }
}

impl Shared {
    /// Now, in ms on the layer's clock.
    fn now_ms(&self) -> u64 {
        ms(self.start.elapsed())
    }
}

#[cfg(test)]
mod tests;
