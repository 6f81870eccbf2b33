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

use self::book::{Book, Client, Limit, Verdict};
use self::learn::{Learner, MINUTE_MS, Signal};
use crate::BoxError;
use crate::body::Body;
use crate::config::{Config, Rate, Route};
use crate::error::Failure;
use crate::error::UpstreamQuota;
use crate::extensions::{
    ClientAddr, ClientId, Deadline, Departure, QuotaLearning, QuotaWait, StaleAtHand,
    UpstreamFailure,
};
use crate::metrics::quota::{LEARNED, QuotaStats, RouteQuotaStats};
use crate::redis::scripts::QuotaTurn;
use crate::redis::{RATE_LIMIT_SPACE, RedisStore};
use crate::route::MatchedRoute;
use crate::service::{BoxResponseFuture, Counted, Inner, call_boxed, ceil_secs, take_ready};

pub mod book;
pub mod learn;

/// How long past its window a call still counts: the app's window sees a
/// call when it arrives, a little after it left here.
pub const GUARD: Duration = Duration::from_millis(250);

/// The longest a waiting request sleeps before asking again (with Redis, so
/// that the fleet's queue knows it is alive; in memory a wake-up comes with
/// every change).
const POLL: Duration = Duration::from_millis(250);

/// How soon a request asks again when another is due first (that one takes
/// its call, or leaves, within about this).
const TURN_POLL: Duration = Duration::from_millis(20);

/// One route's quota.
#[derive(Debug)]
struct RouteQuota {
    name: String,
    limits: Vec<Limit>,
    /// The index of the shortest window (the one fairness counts in).
    fair: usize,
    queue: Duration,
    stale_first: bool,
    /// `Upstream quota of 15 per minute reached`
    message: String,
    /// The fleet's keys: one per limit, then the waiting set, its liveness
    /// and the recent calls fairness counts; one hash slot (`{quota:<route>}`), in the limiter's space
    /// (a cache clear leaves it).
    keys: Vec<String>,
    /// This sidecar's windows: the whole quota while Redis is away.
    #[allow(
        clippy::disallowed_types,
        reason = "held for a few list operations, never across an await"
    )]
    book: std::sync::Mutex<Book>,
    /// Woken when a call is taken or a waiting request leaves.
    changed: tokio::sync::Notify,
    stats: Arc<RouteQuotaStats>,
    /// A route with no `upstream_limit`: its limit, when one is learned.
    learner: Option<Learner>,
}

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

impl RouteQuota {
    /// The quota of `route`: its `upstream_limit`, or one to learn.
    fn new(route: &Route, stats: Arc<RouteQuotaStats>) -> Self {
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

    fn with(
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
    fn message(&self, now: u64) -> String {
        match self.learner.as_ref().and_then(|l| l.limit(now)) {
            Some(n) => format!("Upstream quota of {n} per minute (learned) reached"),
            None => self.message.clone(),
        }
    }

    /// What a call's result teaches a learning route: a success counts, a
    /// quota signal may set its limit.
    fn observe(&self, result: &Result<Response<Body>, BoxError>, now: u64) {
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

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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

/// The client a request counts for: the rate limiter's key (hashed), or the
/// peer's address when rate limiting is off.
fn client_of(ext: &http::Extensions) -> Client {
    match (ext.get::<ClientId>(), ext.get::<ClientAddr>()) {
        (Some(id), _) => id.0,
        (None, Some(a)) => ClientId::of(&a.0.ip()).0,
        (None, None) => 0,
    }
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

/// Why a request was not given a call.
struct Refused {
    room_in: Duration,
    /// It has a stale answer at hand, which the cache serves.
    stale: bool,
}

/// What one turn said.
struct Turn {
    verdict: Verdict,
    /// Due before this request, and calls free within its wait.
    ahead: u64,
    slots: u64,
}

/// One request's place in the route's queue: leaves it when dropped before
/// its call (its client went away, or it was refused).
struct Ticket {
    seq: u64,
    client: Client,
    shared: Arc<Shared>,
    quota: Arc<RouteQuota>,
    /// It went (its place is already given up).
    done: bool,
}

impl Ticket {
    /// `<client>|<sidecar>:<seq>`: the request in the fleet's queue.
    fn member(&self) -> String {
        // The sequence zero-padded: requests that arrive in the same ms are
        // ordered by the member's text.
        format!(
            "{:016x}|{}:{:016}",
            self.client, self.shared.sidecar, self.seq
        )
    }

    fn now_ms(&self) -> u64 {
        self.shared.now_ms()
    }

    /// Waits for this request's call: `Ok` when it may go.
    async fn wait(
        mut self,
        asked: tokio::time::Instant,
        max_wait: Duration,
        stale_at_hand: bool,
    ) -> Result<(), Refused> {
        let give_up = asked + max_wait;
        let mut first = true;
        loop {
            let changed = self.quota.changed.notified();
            let stale = stale_at_hand && self.quota.stale_first;
            let turn = self.take(max_wait, (first, stale)).await;
            let room_in = match turn.verdict {
                Verdict::Go => {
                    self.done = true;
                    return Ok(());
                }
                Verdict::RoomIn(ms) => Duration::from_millis(ms),
                Verdict::NotYourTurn => Duration::ZERO,
            };
            let now = tokio::time::Instant::now();
            if first {
                first = false;
                if stale {
                    return Err(Refused {
                        room_in,
                        stale: true,
                    });
                }
                if turn.ahead >= turn.slots {
                    // Those due first take every call that frees in time.
                    return Err(Refused {
                        room_in: room_in.max(max_wait),
                        stale: false,
                    });
                }
            }
            if now >= give_up {
                return Err(Refused {
                    room_in,
                    stale: false,
                });
            }
            let pause = if room_in.is_zero() {
                TURN_POLL
            } else {
                room_in.min(POLL)
            };
            let until = (now + pause).min(give_up);
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                () = changed => {}
            }
        }
    }

    /// One turn: the fleet's when Redis answers, else this sidecar's.
    async fn take(&self, max_wait: Duration, first_stale: (bool, bool)) -> Turn {
        let q = &self.quota;
        if let Some(learner) = &q.learner {
            // A learned limit is this sidecar's own: its windows only.
            let limit = learner.limit(self.now_ms()).unwrap_or(1);
            q.stats.learned.store(limit, Ordering::Relaxed);
            q.stats.set_counts(&[limit]);
            q.book().set_count(0, limit);
            return self.take_here(max_wait);
        }
        if let Some(redis) = &self.shared.redis {
            let limits: Vec<(u64, Duration)> = q
                .limits
                .iter()
                .map(|l| (l.count, Duration::from_millis(l.window_ms)))
                .collect();
            if let Ok(o) = redis
                .quota_take(&QuotaTurn {
                    keys: &q.keys,
                    member: &self.member(),
                    guard: GUARD,
                    fair: q.fair,
                    max_wait,
                    limits: &limits,
                    first: first_stale.0,
                    stale: first_stale.1,
                })
                .await
            {
                let verdict = match o.verdict {
                    1 => Verdict::Go,
                    2 => Verdict::NotYourTurn,
                    _ => Verdict::RoomIn(o.ms.max(1)),
                };
                if verdict == Verdict::Go {
                    q.book().record(self.now_ms(), self.client);
                }
                q.stats.set_used(&o.used);
                return Turn {
                    verdict,
                    ahead: o.ahead,
                    slots: o.slots,
                };
            }
        }
        self.take_here(max_wait)
    }

    /// One turn on this sidecar's windows.
    fn take_here(&self, max_wait: Duration) -> Turn {
        let q = &self.quota;
        let now = self.now_ms();
        let mut book = q.book();
        let verdict = book.take(now, self.client, self.seq);
        let (ahead, slots) = book.outlook(now, self.client, self.seq, ms(max_wait));
        q.stats.set_used(&book.used(now));
        drop(book);
        if verdict == Verdict::Go {
            q.changed.notify_waiters();
        }
        Turn {
            verdict,
            ahead,
            slots,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.quota.book().leave(self.seq);
        self.quota.changed.notify_waiters();
        if let (Some(redis), Ok(rt)) = (&self.shared.redis, tokio::runtime::Handle::try_current()) {
            let (redis, keys, member) = (redis.clone(), self.quota.keys.clone(), self.member());
            // Best effort: a place left behind drops out after 2 s anyway.
            rt.spawn(async move {
                let _ = redis.quota_leave(&keys, &member).await;
            });
        }
    }
}

#[cfg(test)]
mod tests;
