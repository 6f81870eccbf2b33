//! `RateLimit`: Flask-Limiter-compatible per-client limits, per PRODUCT.md
//! "Rate limiting", checked before the cache so rejected requests reach
//! neither the cache, the upstream nor the retry layer.
//!
//! Each route has its own limiters (Flask-Limiter applies default limits per
//! route): its own limits, or the global default, one GCRA limiter per limit
//! string part, keyed by the client key ([`key::client_key`]). The limiters
//! are governor's keyed `RateLimiter` (a `DashMap` of GCRA cells, ~30 ns a
//! check) inside this layer rather than tower_governor's: that crate's
//! service only works with axum's or tonic's body types, holds one quota per
//! layer (no per-route dispatch) and rounds sub-second `Retry-After` down to
//! 0. A limit of `N per P` is a GCRA with burst `N` and one cell every
//! `P / N`: N quick requests pass, the next is rejected, and capacity comes
//! back gradually (Flask-Limiter's default is a fixed window; GCRA gives the
//! same answer to a burst without a window edge that admits 2N).
//!
//! Allowed responses of a limited route carry `X-RateLimit-*` and the IETF
//! `RateLimit-Policy` / `RateLimit` fields; rejections are a typed
//! [`RateLimited`] error the rescue answers with 429 and the legacy body.
//! `dry_run` computes and counts everything but lets requests through.
//!
//! With Redis configured, the limits are shared by every replica: each check
//! runs a GCRA Lua script on the Redis server ([`GCRA_LUA`](crate::redis::scripts::GCRA_LUA): atomic, on the
//! server's clock, keys expiring once the client's allowance is whole). The
//! client key is hashed in the Redis key name (an API key never appears
//! there). While Redis is down or slow (the cache's short timeout), each
//! replica falls back to its local limiter, and returns to the shared one as
//! soon as Redis answers again.

pub mod key;
mod reload;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, Ready, ready};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::{HeaderValue, Request, Response};
use ipnet::IpNet;

use self::key::{ClientKey, client_key};
use crate::BoxError;
use crate::body::{self, Body};
use crate::config::{Config, Rate, RateLimitKey, RouteRate};
use crate::error::{Decorated, RateHeaders, RateLimited};
use crate::extensions::{ClientAddr, ClientId};
use crate::redis::{RATE_LIMIT_SPACE, RedisStore};
use crate::route::MatchedRoute;
use crate::service::{BoxResponseFuture, Hook, Inner, OnAnswer, call_boxed, ceil_secs, take_ready};

type Limiter = RateLimiter<
    ClientKey,
    DefaultKeyedStateStore<ClientKey>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// One part of a route's limit string, with its limiter.
#[derive(Debug)]
struct Limit {
    rate: Rate,
    /// The IETF policy name: the route's name, with `-2`, `-3`… for further parts.
    name: String,
    limiter: Limiter,
    /// `X-RateLimit-Limit`, rendered once.
    limit_header: HeaderValue,
}

/// A route's limits and figures.
#[derive(Debug)]
pub struct RoutePolicy {
    limits: Vec<Limit>,
    /// `RateLimit-Policy`, rendered once: it never changes.
    policy_header: Option<HeaderValue>,
    dry_run: bool,
    /// Rejections (would-be rejections in dry run are counted separately).
    pub rejected: AtomicU64,
    pub dry_run_rejected: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    routes: HashMap<String, Arc<RoutePolicy>>,
    trusted: Vec<IpNet>,
    key: RateLimitKey,
    /// Shared limits across replicas when Redis is configured.
    redis: Option<RedisStore>,
    /// The secret of the keyed hash of client keys in Redis: configured, or
    /// the fleet's, read from Redis on first use.
    secret: tokio::sync::OnceCell<Vec<u8>>,
    /// Checks answered by the local limiter because Redis did not.
    pub fallbacks: AtomicU64,
}

/// Shared by every worker's stack: one set of counters per process.
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    shared: Option<Arc<Shared>>,
    /// The Redis client, kept while limits are off, for a reload that
    /// turns them on.
    redis: Option<RedisStore>,
}

fn quota(rate: Rate) -> Option<Quota> {
    let burst = u32::try_from(rate.count).ok().and_then(NonZeroU32::new)?;
    Quota::with_period(rate.period / burst.get()).map(|q| q.allow_burst(burst))
}

impl RateLimitLayer {
    /// `None` inside when `ENABLE_RATE_LIMIT=False`: the layer passes through.
    /// With `redis`, limits are shared through it (local while it is down).
    pub fn new(cfg: &Config, redis: Option<RedisStore>) -> Self {
        if !cfg.rate_limit.enabled {
            return Self {
                shared: None,
                redis,
            };
        }
        let mut routes = HashMap::new();
        for r in &cfg.routes {
            let limits = match &r.rate_limit {
                RouteRate::Exempt => continue,
                RouteRate::Default => &cfg.rate_limit.default,
                RouteRate::Limits(l) => l,
            };
            let limits = limits
                .limits()
                .iter()
                .enumerate()
                .filter_map(|(i, rate)| {
                    let q = quota(*rate)?;
                    Some(Limit {
                        rate: *rate,
                        name: if i == 0 {
                            r.name.clone()
                        } else {
                            format!("{}-{}", r.name, i + 1)
                        },
                        limiter: RateLimiter::keyed(q)
                            .with_middleware::<StateInformationMiddleware>(),
                        limit_header: HeaderValue::from(rate.count),
                    })
                })
                .collect::<Vec<Limit>>();
            let policy_header = HeaderValue::try_from(
                limits
                    .iter()
                    .map(|l| {
                        format!(
                            "\"{}\";q={};w={}",
                            l.name,
                            l.rate.count,
                            l.rate.period.as_secs()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            )
            .ok();
            routes.insert(
                r.name.clone(),
                Arc::new(RoutePolicy {
                    limits,
                    policy_header,
                    dry_run: r.dry_run.unwrap_or(cfg.rate_limit.dry_run),
                    rejected: AtomicU64::new(0),
                    dry_run_rejected: AtomicU64::new(0),
                }),
            );
        }
        Self {
            shared: Some(Arc::new(Shared {
                routes,
                trusted: cfg.trusted_proxies.clone(),
                key: cfg.rate_limit.key.clone(),
                redis: redis.clone(),
                secret: match &cfg.rate_limit.key_secret {
                    Some(s) => tokio::sync::OnceCell::new_with(Some(s.clone().into_bytes())),
                    None => tokio::sync::OnceCell::new(),
                },
                fallbacks: AtomicU64::new(0),
            })),
            redis,
        }
    }

    /// Drops the state of clients whose limits have fully recovered, so the
    /// maps do not grow with every address ever seen. Run on a timer.
    pub fn sweep(&self) {
        for policy in self.shared.iter().flat_map(|s| s.routes.values()) {
            for l in &policy.limits {
                l.limiter.retain_recent();
                l.limiter.shrink_to_fit();
            }
        }
    }

    /// Client keys currently tracked, over every limiter.
    pub fn tracked_keys(&self) -> usize {
        self.shared
            .iter()
            .flat_map(|s| s.routes.values())
            .flat_map(|p| p.limits.iter())
            .map(|l| l.limiter.len())
            .sum()
    }

    /// Checks the local limiter answered because Redis did not.
    pub fn fallbacks(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.fallbacks.load(Ordering::Relaxed))
    }

    /// Every route's policy, by route name (for the metrics).
    pub fn policies(&self) -> impl Iterator<Item = (&str, &Arc<RoutePolicy>)> {
        self.shared
            .iter()
            .flat_map(|s| s.routes.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// The policy of a route, for its counters.
    pub fn route(&self, name: &str) -> Option<Arc<RoutePolicy>> {
        self.shared.as_ref()?.routes.get(name).cloned()
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    shared: Option<Arc<Shared>>,
}

/// What one limit said about one request.
struct Verdict<'a> {
    limit: &'a Limit,
    remaining: u64,
    reset: Duration,
    /// `Some(wait)` when rejected.
    wait: Option<Duration>,
}

/// `30 requests per minute`, `2 requests per 5 minutes`.
pub fn describe(rate: Rate) -> String {
    let what = if rate.count == 1 {
        "request"
    } else {
        "requests"
    };
    format!("{} {what} per {}", rate.count, rate.period_text())
}

fn interval(rate: Rate) -> Duration {
    rate.period / u32::try_from(rate.count).unwrap_or(u32::MAX).max(1)
}

fn check_local<'p>(l: &'p Limit, key: &ClientKey) -> Verdict<'p> {
    let interval = interval(l.rate);
    match l.limiter.check_key(key) {
        Ok(snap) => {
            let remaining = u64::from(snap.remaining_burst_capacity());
            let used = l.rate.count.saturating_sub(remaining);
            Verdict {
                limit: l,
                remaining,
                reset: interval * u32::try_from(used).unwrap_or(u32::MAX),
                wait: None,
            }
        }
        Err(not_until) => {
            let wait = not_until.wait_time_from(l.limiter.clock().now());
            let rest = u32::try_from(l.rate.count.saturating_sub(1)).unwrap_or(u32::MAX);
            Verdict {
                limit: l,
                remaining: 0,
                reset: wait + interval * rest,
                wait: Some(wait),
            }
        }
    }
}

/// The Redis key part for a client: a keyed hash (HMAC-SHA256 with the
/// fleet's secret), so neither an API key nor an address appears in key
/// names, and a plain digest of every IPv4 address cannot be tabled to
/// reverse them.
fn key_digest(secret: &[u8], key: &ClientKey) -> Option<String> {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).ok()?;
    match key {
        ClientKey::Ip(ip) => {
            mac.update(b"ip:");
            mac.update(ip.to_string().as_bytes());
        }
        ClientKey::Header(v) => {
            mac.update(b"h:");
            mac.update(v.as_bytes());
        }
    }
    Some(hex::encode(&mac.finalize().into_bytes()[..16]))
}

impl Shared {
    fn check<'p>(&self, policy: &'p RoutePolicy, key: &ClientKey) -> Vec<Verdict<'p>> {
        policy.limits.iter().map(|l| check_local(l, key)).collect()
    }

    /// Each limit on the Redis server; a limit Redis cannot answer in time
    /// is checked locally instead.
    async fn check_shared<'p>(
        &self,
        redis: &RedisStore,
        policy: &'p RoutePolicy,
        key: &ClientKey,
    ) -> Vec<Verdict<'p>> {
        // The fleet's secret, from the configuration or (once) from Redis;
        // without it, this check is local, as when Redis is down.
        let secret = self
            .secret
            .get_or_try_init(|| async { redis.fleet_secret().await.map(String::into_bytes) })
            .await;
        let Some(digest) = secret.ok().and_then(|s| key_digest(s, key)) else {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            return self.check(policy, key);
        };
        let mut out = Vec::with_capacity(policy.limits.len());
        for l in &policy.limits {
            let redis_key = format!("{RATE_LIMIT_SPACE}{}:{}", l.name, digest);
            match redis.gcra(&redis_key, interval(l.rate), l.rate.count).await {
                Ok(o) => out.push(Verdict {
                    limit: l,
                    remaining: o.remaining,
                    reset: o.reset,
                    wait: (!o.allowed).then_some(o.wait),
                }),
                Err(e) => {
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("rate limit: local fallback: {e}");
                    out.push(check_local(l, key));
                }
            }
        }
        out
    }

    /// Turns the verdicts into the answer: the headers to add, or the
    /// rejection (not in dry run).
    fn decide(
        policy: &RoutePolicy,
        verdicts: &[Verdict<'_>],
    ) -> Result<Option<RateHeaders>, Box<RateLimited>> {
        let headers = headers(policy, verdicts);
        if let Some(v) = verdicts.iter().find(|v| v.wait.is_some()) {
            let message = format!("{} limit reached", describe(v.limit.rate));
            let retry_after = ceil_secs(v.wait.unwrap_or_default()).max(1);
            if policy.dry_run {
                policy.dry_run_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::info!(route = %v.limit.name, retry_after, "dry run: would reject: {message}");
            } else {
                policy.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(route = %v.limit.name, retry_after, "rejected: {message}");
                return Err(Box::new(RateLimited {
                    message,
                    retry_after,
                    headers,
                }));
            }
        }
        Ok(headers)
    }
}

/// The rate-limit headers for these verdicts: `X-RateLimit-*` and
/// `RateLimit` from the most restrictive limit, `RateLimit-Policy` for all.
fn headers(policy: &RoutePolicy, verdicts: &[Verdict<'_>]) -> Option<RateHeaders> {
    let worst = verdicts
        .iter()
        .min_by_key(|v| (v.wait.is_none(), v.remaining))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let reset = ceil_secs(worst.reset);
    Some(RateHeaders {
        limit: worst.limit.limit_header.clone(),
        remaining: worst.remaining,
        reset_at: now.as_secs() + reset,
        policy: policy.policy_header.clone(),
        current: HeaderValue::try_from(current(&worst.limit.name, worst.remaining, reset)).ok(),
    })
}

/// `"name";r=remaining;t=reset`, without the formatting machinery (this is
/// on every answer of a limited route).
fn current(name: &str, remaining: u64, reset: u64) -> String {
    let mut digits = itoa::Buffer::new();
    let mut s = String::with_capacity(name.len() + 48);
    s.push('"');
    s.push_str(name);
    s.push_str("\";r=");
    s.push_str(digits.format(remaining));
    s.push_str(";t=");
    s.push_str(digits.format(reset));
    s
}

impl<S: Inner> tower::Service<Request<Body>> for RateLimit<S> {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Either<
        Either<Ready<Result<Response<Body>, BoxError>>, OnAnswer<S::Future, RateHeaders>>,
        BoxResponseFuture,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let pass = |inner: &mut S, req, headers| {
            Either::Left(Either::Right(OnAnswer::new(inner.call(req), headers)))
        };
        let Some(shared) = &self.shared else {
            return pass(&mut self.inner, req, None);
        };
        let policy = req
            .extensions()
            .get::<MatchedRoute>()
            .and_then(|r| shared.routes.get(&r.name));
        let (Some(policy), Some(ClientAddr(peer))) = (policy, req.extensions().get::<ClientAddr>())
        else {
            return pass(&mut self.inner, req, None);
        };
        let key = client_key(peer.ip(), req.headers(), &shared.trusted, &shared.key);
        // The breaker counts a plain 500 once per client: it keys clients
        // as this layer does.
        let mut req = req;
        req.extensions_mut().insert(ClientId::of(&key));
        if shared.redis.is_none() {
            return match Shared::decide(policy, &shared.check(policy, &key)) {
                Ok(headers) => pass(&mut self.inner, req, headers),
                Err(limited) => Either::Left(Either::Left(ready(Err(limited)))),
            };
        }
        // Shared mode: the check awaits Redis, with the ready service.
        let mut inner = take_ready(&mut self.inner);
        let (shared, policy) = (Arc::clone(shared), Arc::clone(policy));
        Either::Right(Box::pin(async move {
            let verdicts = match &shared.redis {
                Some(redis) => shared.check_shared(redis, &policy, &key).await,
                None => shared.check(&policy, &key),
            };
            let headers = Shared::decide(&policy, &verdicts).map_err(|e| -> BoxError { e })?;
            let mut out = call_boxed(&mut inner, req).await;
            if let Some(h) = headers {
                h.run(&mut out);
            }
            out
        }))
    }
}

/// "The headers are on every response of a limited route": the sidecar's
/// own answers too (502, 504, 413, an open circuit). Those arrive here as
/// errors: the fields go onto the error ([`Decorated`]), and the rescue above
/// writes them on the answer it makes.
impl Hook<Body, BoxError> for RateHeaders {
    fn run(self, out: &mut Result<Response<Body>, BoxError>) {
        if let Ok(resp) = out {
            return self.write_to(resp.headers_mut());
        }
        if let Err(e) = std::mem::replace(out, Ok(Response::new(body::empty()))) {
            let mut d = Decorated::new(e);
            self.write_to(&mut d.headers);
            *out = Err(Box::new(d));
        }
    }
}

#[cfg(test)]
mod tests;
