//! `UpstreamQuota`: protects what the app spends per call (Gemini's free
//! tier: 15 requests a minute) on routes with an `upstream_limit`, per
//! PRODUCT.md "Upstream quota".
//!
//! Every request that leaves for the upstream on such a route costs one unit
//! (the layer sits below the retry, so each attempt does; below the cache,
//! so hits and coalesced waiters cost nothing; above the circuit breaker, so
//! a request refused here is no failure of the app's).
//!
//! The budget is spread evenly: `15 per minute` lets one request go every
//! 4 s (a GCRA schedule with a burst of one). That is what keeps every
//! minute, however the app's own quota window is aligned, at 15: a burst of
//! 15 followed by the steady rate would put 16 or more into some minute.
//!
//! The schedule's slots are *reserved*: an arriving
//! request takes the next free slot (the first one, if the budget has room
//! now) and sleeps until it, then goes. Reservations are made one at a time,
//! in arrival order (a fair, first-in-first-out lock), so a later request
//! never overtakes an earlier one on the same route and sidecar. A request
//! whose slot would come later than it may wait (`upstream_queue`, and never
//! past the route's deadline) reserves nothing and is refused at once, with
//! the wait it would have needed as its `Retry-After`: the cache above then
//! serves a stale answer if it has one. A client that hangs up leaves the
//! queue (its slot passes unused: the budget is never exceeded).
//!
//! With Redis the schedule is one for the fleet: the shared rate limiter's
//! server-side GCRA script (`redis::scripts`), which reserves a slot up to
//! the wait it is given. While Redis is down or slow, each sidecar keeps a
//! schedule of its own, the same arithmetic ([`reserve`]) in memory.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};

use crate::BoxError;
use crate::body::Body;
use crate::config::{Config, Rate, RateLimits};
use crate::error::UpstreamQuota;
use crate::extensions::{Deadline, QuotaWait};
use crate::metrics::quota::{QuotaStats, RouteQuotaStats};
use crate::metrics::redis::RedisOp;
use crate::redis::{RATE_LIMIT_SPACE, RedisStore};
use crate::route::MatchedRoute;
use crate::service::{BoxResponseFuture, Counted, Inner, call_boxed, ceil_secs, take_ready};

/// One rate's schedule in memory: the theoretical arrival time of the next
/// request, in ms on the layer's clock.
#[derive(Debug, Default, Clone, Copy)]
struct Schedule {
    tat_ms: u64,
}

/// GCRA with reservation, the arithmetic of the Redis script: a request at
/// `now` for a budget of `burst` per `burst × interval` takes the next slot
/// if it comes within `max_wait` (the quota uses a burst of one). `Ok(wait)`: reserved, go after `wait`;
/// `Err(wait)`: refused, room only after `wait`.
pub fn reserve(
    tat_ms: &mut u64,
    now_ms: u64,
    interval_ms: u64,
    burst: u64,
    max_wait_ms: u64,
) -> Result<u64, u64> {
    let tat = (*tat_ms).max(now_ms);
    let new_tat = tat + interval_ms;
    let window = interval_ms.saturating_mul(burst);
    let allow_at = new_tat.saturating_sub(window);
    let wait = allow_at.saturating_sub(now_ms);
    if wait > max_wait_ms {
        return Err(wait);
    }
    *tat_ms = new_tat;
    Ok(wait)
}

/// One route's quota.
#[derive(Debug)]
struct RouteQuota {
    name: String,
    limits: RateLimits,
    queue: Duration,
    /// `Upstream quota of 15 per minute reached`
    message: String,
    /// The fleet's key of each limit, in the limiter's space (a cache clear
    /// leaves it); one key per script run, so one slot on a cluster.
    keys: Vec<String>,
    /// Reservations one at a time, in arrival order (tokio's mutex is
    /// fair); the local schedules behind it.
    turn: tokio::sync::Mutex<Vec<Schedule>>,
    stats: Arc<RouteQuotaStats>,
}

#[derive(Debug)]
struct Shared {
    routes: HashMap<String, Arc<RouteQuota>>,
    redis: Option<RedisStore>,
    stats: Arc<QuotaStats>,
    /// The local schedules' clock.
    start: tokio::time::Instant,
}

#[derive(Debug, Clone)]
pub struct QuotaLayer {
    shared: Arc<Shared>,
}

/// `15 per minute` (Flask-Limiter's words, without "requests").
fn describe(r: Rate) -> String {
    format!("{} per {}", r.count, r.period_text())
}

fn interval(r: Rate) -> Duration {
    (r.period / u32::try_from(r.count.max(1)).unwrap_or(u32::MAX)).max(Duration::from_millis(1))
}

impl QuotaLayer {
    /// The quotas of the routes with an `upstream_limit`, over `redis` when
    /// configured, recording into `stats`.
    pub fn new(cfg: &Config, redis: Option<RedisStore>, stats: Arc<QuotaStats>) -> Self {
        let routes = cfg
            .routes
            .iter()
            .filter_map(|r| {
                let limits = r.upstream_limit.clone()?;
                let text: Vec<String> = limits.limits().iter().map(|l| describe(*l)).collect();
                let route_stats = stats.route(&r.name)?;
                let keys = (0..limits.limits().len())
                    .map(|i| format!("{RATE_LIMIT_SPACE}quota:{}:{i}", r.name))
                    .collect();
                Some((
                    r.name.clone(),
                    Arc::new(RouteQuota {
                        name: r.name.clone(),
                        turn: tokio::sync::Mutex::new(vec![
                            Schedule::default();
                            limits.limits().len()
                        ]),
                        limits,
                        queue: r.upstream_queue,
                        message: format!("Upstream quota of {} reached", text.join("; ")),
                        keys,
                        stats: route_stats,
                    }),
                ))
            })
            .collect();
        Self {
            shared: Arc::new(Shared {
                routes,
                redis,
                stats,
                start: tokio::time::Instant::now(),
            }),
        }
    }

    /// The routes with a quota (for the metrics' labels).
    pub fn routes(cfg: &Config) -> Vec<&str> {
        cfg.routes
            .iter()
            .filter(|r| r.upstream_limit.is_some())
            .map(|r| r.name.as_str())
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
    type Future = futures_util::future::Either<S::Future, BoxResponseFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let quota = req
            .extensions()
            .get::<MatchedRoute>()
            .and_then(|r| self.shared.routes.get(&r.name))
            .cloned();
        let Some(quota) = quota else {
            return futures_util::future::Either::Left(self.inner.call(req));
        };
        let mut inner = take_ready(&mut self.inner);
        let shared = Arc::clone(&self.shared);
        futures_util::future::Either::Right(Box::pin(async move {
            let deadline = req.extensions().get::<Deadline>().copied();
            let mut max_wait = quota.queue;
            if let Some(d) = deadline {
                max_wait =
                    max_wait.min(d.at.saturating_duration_since(tokio::time::Instant::now()));
            }
            let waiting = Counted::new(&quota.stats.waiting);
            let asked = tokio::time::Instant::now();
            match shared.reserve(&quota, max_wait).await {
                Ok(wait) => {
                    shared.stats.waited(&quota.name, wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                    drop(waiting);
                    let waited = QuotaWait(asked.elapsed());
                    let mut out = call_boxed(&mut inner, req).await;
                    if let Ok(resp) = &mut out {
                        resp.extensions_mut().insert(waited);
                    }
                    out
                }
                Err(room_in) => {
                    quota.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(route = %quota.name, "upstream quota: no room within {max_wait:?} (room in {room_in:?})");
                    Err(Box::new(UpstreamQuota {
                        message: quota.message.clone(),
                        retry_after: ceil_secs(room_in).max(1),
                    }) as BoxError)
                }
            }
        }))
    }
}

impl Shared {
    /// Takes the next slot of every limit of the route, if it comes within
    /// `max_wait`: `Ok(wait)` to sleep before going, `Err(wait)` for the room
    /// it would have needed.
    async fn reserve(&self, q: &RouteQuota, max_wait: Duration) -> Result<Duration, Duration> {
        let mut local = q.turn.lock().await;
        let mut longest = Duration::ZERO;
        // With several limits, each is reserved in turn; one that refuses
        // leaves the slots already taken unused (the budget is never
        // exceeded, only under-used).
        for (i, rate) in q.limits.limits().iter().enumerate() {
            let interval = interval(*rate);
            let wait = match self.reserve_shared(q, i, interval, max_wait).await {
                Some(r) => r,
                None => {
                    let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
                    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                    reserve(&mut local[i].tat_ms, now, ms(interval), 1, ms(max_wait))
                        .map(Duration::from_millis)
                        .map_err(Duration::from_millis)
                }
            }?;
            longest = longest.max(wait);
        }
        Ok(longest)
    }

    /// The fleet's reservation in Redis; `None` without Redis or when it
    /// fails (then the local schedule decides).
    async fn reserve_shared(
        &self,
        q: &RouteQuota,
        i: usize,
        interval: Duration,
        max_wait: Duration,
    ) -> Option<Result<Duration, Duration>> {
        let redis = self.redis.as_ref()?;
        match redis
            .gcra_within(RedisOp::Quota, q.keys.get(i)?, interval, 1, max_wait)
            .await
        {
            Ok(o) if o.allowed => Some(Ok(o.wait)),
            Ok(o) => Some(Err(o.wait)),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests;
