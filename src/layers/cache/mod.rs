//! `Cache`: answers repeated questions from memory or Redis instead of the
//! upstream, per PRODUCT.md "Cache". For a request on a cached route:
//!
//! 1. `Cache-Control: no-store` → forwarded untouched (`X-Cache: BYPASS`);
//!    `no-cache` → the lookup is skipped and the answer refreshes the entry.
//! 2. The body is read (up to [`KEY_BODY_LIMIT`]; a larger one is forwarded
//!    uncached, streaming) and the key computed ([`key::cache_key`]).
//! 3. A fresh entry is replayed (`HIT`); an expired one inside the
//!    stale-if-error window is kept aside.
//! 4. Identical concurrent misses are coalesced: the first goes upstream,
//!    the others wait (at most the route timeout) for its stored answer; if
//!    it is not stored (error, uncacheable), each waiter goes upstream alone,
//!    at once. quick_cache's own placeholder guard is not used for this: with
//!    it, a failed loader hands the guard to one waiter at a time, so waiters
//!    would load one after another. With Redis, the first then takes a
//!    lease for the whole fleet ([`fleet`]): if another sidecar holds it,
//!    this one waits for that one's entry instead of calling the upstream.
//! 5. The upstream's answer is stored when cacheable ([`policy`]); if the
//!    upstream fails (an error from below, or a 5xx), the stale entry is
//!    served instead (`STALE`). The circuit breaker's open-circuit error
//!    arrives here as an error from below, so an open circuit serves stale
//!    entries too.
//!
//! A 2xx from the upstream on a route with `invalidate` patterns invalidates
//! them here, in Redis and in every other sidecar, as its `invalidate_mode`
//! says ([`store::CacheStore::invalidate`]).

mod coalesce;
pub mod directives;
pub mod entry;
pub mod fleet;
mod forward;
mod inflight;
pub mod key;
pub mod policy;
pub mod store;
pub mod stream;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response, header};

use self::coalesce::{Coalescing, Miss, coalesce};
use self::directives::Use;
use self::entry::Entry;
use self::fleet::Remote;
use self::inflight::{Inflight, Join, Outcome};
use self::policy::{Freshness, RequestMode};
use self::store::{CacheStore, Counters, Namespace, Standing};
use crate::BoxError;
use crate::body::{self, Body, Buffered, read_bounded};
use crate::error::{ClientTimeout, Decorated, UpstreamTimeout};
use crate::extensions::{CacheOutcome, Coalesced, Departure, StaleAtHand};
use crate::memory::MemoryBudget;
use crate::route::MatchedRoute;
use crate::service::{BoxResponseFuture, Inner, call_boxed, take_ready};

pub use self::store::Clock;

/// Request bodies up to this size are read to compute the key; a larger one
/// (not a search question) is forwarded uncached.
pub const KEY_BODY_LIMIT: u64 = 256 * 1024;

pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

#[derive(Debug, Clone)]
pub struct CacheLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    store: Arc<CacheStore>,
    identity: Vec<HeaderName>,
    inflight: Arc<Inflight>,
    /// What shared streams' backlogs are charged to.
    memory: Arc<MemoryBudget>,
}

impl CacheLayer {
    /// `keyed_headers`: the identity headers, then the vary headers, all in
    /// the key. Shared streams' backlogs are charged to `memory`.
    pub fn new(
        store: Arc<CacheStore>,
        keyed_headers: &[String],
        memory: Arc<MemoryBudget>,
    ) -> Self {
        Self::over(store, keyed_headers, Arc::default(), memory)
    }

    /// The same store, coalescing and budget with a reloaded
    /// configuration's keyed headers (a miss in flight still leads the
    /// requests that join it after the reload).
    pub fn reloaded(&self, keyed_headers: &[String]) -> Self {
        let s = &self.shared;
        Self::over(
            Arc::clone(&s.store),
            keyed_headers,
            Arc::clone(&s.inflight),
            Arc::clone(&s.memory),
        )
    }

    /// The store's entries and namespaces.
    pub fn store(&self) -> &Arc<CacheStore> {
        &self.shared.store
    }

    fn over(
        store: Arc<CacheStore>,
        keyed_headers: &[String],
        inflight: Arc<Inflight>,
        memory: Arc<MemoryBudget>,
    ) -> Self {
        let mut identity: Vec<HeaderName> = Vec::new();
        for h in keyed_headers {
            if let Ok(name) = HeaderName::try_from(h.as_str()) {
                if !identity.contains(&name) {
                    identity.push(name);
                }
            }
        }
        Self {
            shared: Arc::new(Shared {
                store,
                identity,
                inflight,
                memory,
            }),
        }
    }
}

impl<S> tower::Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> CacheService<S> {
        CacheService {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CacheService<S> {
    inner: S,
    shared: Arc<Shared>,
}

type BoxFut = BoxResponseFuture;

impl<S: Inner> tower::Service<Request<Body>> for CacheService<S> {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = futures_util::future::Either<S::Future, BoxFut>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // Routes that neither cache nor invalidate pass straight through,
        // without a boxed future.
        // The route and its namespace are looked up once, here.
        let route = req.extensions().get::<MatchedRoute>().cloned();
        let ns = route
            .as_ref()
            .and_then(|r| r.cache.as_ref())
            .and_then(|c| self.shared.store.namespace(&c.namespace))
            .cloned();
        let invalidates = route.as_ref().is_some_and(|r| !r.invalidate.is_empty());
        if ns.is_none() && !invalidates {
            return futures_util::future::Either::Left(self.inner.call(req));
        }
        let inner = take_ready(&mut self.inner);
        let shared = Arc::clone(&self.shared);
        futures_util::future::Either::Right(Box::pin(async move {
            let resp = handle(&shared, inner, req, route.as_ref(), ns).await?;
            if let Some(route) = route.filter(|r| !r.invalidate.is_empty()) {
                let from_upstream =
                    resp.extensions().get::<CacheOutcome>() != Some(&CacheOutcome::Hit);
                if resp.status().is_success() && from_upstream {
                    // In its own task: a client that hangs up now must not
                    // cancel the invalidation half way.
                    let store = Arc::clone(&shared.store);
                    let (patterns, mode) = (route.invalidate.clone(), route.invalidate_mode);
                    let _ =
                        tokio::spawn(async move { store.invalidate(&patterns, mode).await }).await;
                }
            }
            Ok(resp)
        }))
    }
}

async fn handle<S>(
    sh: &Arc<Shared>,
    mut inner: S,
    req: Request<Body>,
    route: Option<&MatchedRoute>,
    ns: Option<Arc<Namespace>>,
) -> Result<Response<Body>, BoxError>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    let Some(ns) = ns else {
        return call_boxed(&mut inner, req).await;
    };
    let counters = (&sh.store.counters, &ns.counters);
    let d = directives::directives(req.headers());
    let mode = policy::request_mode(&d);
    if mode == RequestMode::Bypass {
        count(counters, |c| &c.bypass);
        return marked(
            call_boxed(&mut inner, req).await,
            CacheOutcome::Bypass,
            "rag-sidecar; fwd=bypass".into(),
        );
    }
    let limit = route.map_or(std::time::Duration::from_secs(30), |r| r.timeout);
    let (parts, req_body) = req.into_parts();
    // A client that stops sending its body must not hold an in-flight slot.
    let read = tokio::time::timeout(limit, read_bounded(req_body, KEY_BODY_LIMIT)).await;
    let read = read.map_err(|_| -> BoxError { Box::new(ClientTimeout(limit)) })?;
    let req_body = match read? {
        Buffered::Whole(b) => b,
        Buffered::Partial(rest) => {
            count(counters, |c| &c.bypass);
            return marked(
                call_boxed(&mut inner, Request::from_parts(parts, rest)).await,
                CacheOutcome::Bypass,
                "rag-sidecar; fwd=bypass; detail=large-request".into(),
            );
        }
    };
    let key = key::cache_key(
        &ns.name,
        &parts.method,
        &parts.uri,
        &parts.headers,
        &sh.identity,
        &req_body,
    );

    let mut stale = None;
    // Which request directive turned a stored answer away, if one did.
    let mut refused = None;
    if mode == RequestMode::Normal {
        if let Some(e) = sh.store.get(&ns, &key).await {
            let now = sh.store.clock.now_ms();
            let f = policy::freshness(e.stored_at_ms, e.ttl_ms, sh.store.stale_ms, now);
            match (ns.standing(&e), directives::decide(&d, f)) {
                (Standing::Current, Use::Hit) => {
                    if let Freshness::Fresh { age_secs, ttl_left } = f {
                        count(counters, |c| &c.hits);
                        return Ok(replay(
                            &e,
                            CacheOutcome::Hit,
                            {
                                let mut digits = itoa::Buffer::new();
                                ["rag-sidecar; hit; ttl=", digits.format(ttl_left)].concat()
                            },
                            age_secs,
                        ));
                    }
                }
                // `max-stale`: the client takes it as it is, at once.
                (Standing::Current, Use::Stale) => {
                    if let Freshness::Stale { age_secs, over } = f {
                        count(counters, |c| &c.stale);
                        return Ok(replay(
                            &e,
                            CacheOutcome::Stale,
                            format!("rag-sidecar; hit; ttl=-{over}; detail=max-stale"),
                            age_secs,
                        ));
                    }
                }
                (Standing::Current, Use::Forward { detail }) => {
                    refused = detail;
                    // Expired: kept for stale-if-error, unless the client
                    // bounded the age it accepts.
                    if matches!(f, Freshness::Stale { .. }) && detail.is_none() {
                        stale = Some(Stale {
                            entry: e,
                            invalidated: false,
                        });
                    }
                }
                // Left by an invalidation in `stale` mode: never a hit, but
                // an answer while the upstream fails.
                (Standing::Invalidated, _)
                    if matches!(f, Freshness::Fresh { .. } | Freshness::Stale { .. }) =>
                {
                    stale = Some(Stale {
                        entry: e,
                        invalidated: true,
                    });
                }
                _ => {}
            }
        }
    }
    if d.only_if_cached {
        // Nothing usable stored, and the client forbids going further.
        count(counters, |c| &c.misses);
        let mut resp = body::json(
            http::StatusCode::GATEWAY_TIMEOUT,
            &serde_json::json!({"error": "Gateway timeout", "message": "Not in cache (only-if-cached)"}),
        );
        mark(
            &mut resp,
            CacheOutcome::Miss,
            "rag-sidecar; detail=only-if-cached".into(),
            None,
        );
        return Ok(resp);
    }
    count(counters, |c| &c.misses);

    // The generation the question is asked under, and the epoch a clear
    // during the call would change (its answer is then not stored).
    let generation = ns.generation();
    let epoch = ns.epoch();
    let (mut leader, mut lease) = (None, None);
    if mode == RequestMode::Normal {
        let miss = Miss {
            sh,
            ns: &ns,
            key: &key,
            generation,
            limit,
            stale: stale.as_ref(),
        };
        // Boxed, here and for the call below: a miss's futures are large,
        // and inline they would make every hit's future as large.
        match Box::pin(coalesce(miss)).await {
            Coalescing::Lead(guard, l) => (leader, lease) = (Some(guard), l),
            Coalescing::Alone => {}
            Coalescing::Answered(answer) => return answer,
        }
    }

    let fwd = if stale.is_some() {
        "stale"
    } else if mode == RequestMode::Refresh {
        "request"
    } else {
        "miss"
    };
    let fwd_why = refused.map_or(String::new(), |d| format!("; detail={d}"));
    let mut parts = parts;
    if stale.is_some() {
        // A stale answer is at hand: one try upstream, then serve it, rather
        // than keep the client waiting through the retries' backoff.
        parts.extensions.insert(StaleAtHand);
    }
    // The generation and epoch the call leaves under: as now, and marked
    // again by the upstream quota when the call is given after a wait, so
    // that an upload during the wait does not throw the answer away.
    let departure = {
        let now = Arc::clone(&ns);
        Departure(
            Arc::new(move || (now.generation(), now.epoch())),
            Arc::new([AtomicU64::new(generation), AtomicU64::new(epoch)]),
        )
    };
    parts.extensions.insert(departure.clone());
    let answer = call_boxed(&mut inner, Request::from_parts(parts, body::full(req_body)));
    let call = forward::Call {
        sh: Arc::clone(sh),
        ns,
        key,
        stale,
        leader,
        lease,
        fwd,
        fwd_why,
        limit,
        departure,
    };
    Box::pin(call.detached(answer)).await
}

/// A miss whose forwarding failed, with no stale answer at hand: the error,
/// carrying `X-Cache` and `Cache-Status` for the answer the rescue makes of
/// it, like every other answer of a cached route.
fn failed_miss(e: impl Into<BoxError>, fwd: &str) -> BoxError {
    decorated(
        e.into(),
        CacheOutcome::Miss,
        format!("rag-sidecar; fwd={fwd}; detail=error"),
    )
}

/// A forwarded result, marked: the answer, or the error decorated with the
/// same fields.
fn marked(
    result: Result<Response<Body>, BoxError>,
    outcome: CacheOutcome,
    status: String,
) -> Result<Response<Body>, BoxError> {
    match result {
        Ok(mut resp) => {
            mark(&mut resp, outcome, status, None);
            Ok(resp)
        }
        Err(e) => Err(decorated(e, outcome, status)),
    }
}

fn decorated(e: BoxError, outcome: CacheOutcome, status: String) -> BoxError {
    let mut d = Decorated::new(e);
    d.headers
        .insert(X_CACHE, HeaderValue::from_static(outcome.as_str()));
    if let Ok(v) = HeaderValue::try_from(status) {
        d.headers.insert(CACHE_STATUS, v);
    }
    d.extensions.insert(outcome);
    Box::new(d)
}

fn count(
    counters: (&Counters, &Counters),
    which: impl Fn(&Counters) -> &std::sync::atomic::AtomicU64,
) {
    Counters::add(which(counters.0));
    Counters::add(which(counters.1));
}

/// An answer at hand for when the upstream fails: expired within the
/// stale window, or left by an invalidation in `stale` mode.
struct Stale {
    entry: Arc<Entry>,
    invalidated: bool,
}

fn serve_stale(sh: &Shared, ns: &Namespace, s: &Stale, why: &str) -> Response<Body> {
    count((&sh.store.counters, &ns.counters), |c| &c.stale);
    let e = &s.entry;
    let (age, over) =
        match policy::freshness(e.stored_at_ms, e.ttl_ms, u64::MAX, sh.store.clock.now_ms()) {
            Freshness::Stale { age_secs, over } => (age_secs, over),
            Freshness::Fresh { age_secs, .. } => (age_secs, 0),
            Freshness::Expired => (0, 0),
        };
    let numeric = why.chars().all(|c| c.is_ascii_digit());
    let status = match (s.invalidated, numeric) {
        (true, true) => format!("rag-sidecar; fwd=stale; detail=invalidated; fwd-status={why}"),
        (true, false) => "rag-sidecar; fwd=stale; detail=invalidated".to_string(),
        (false, true) => format!("rag-sidecar; fwd=stale; fwd-status={why}; ttl=-{over}"),
        (false, false) => format!("rag-sidecar; fwd=stale; detail={why}; ttl=-{over}"),
    };
    replay(e, CacheOutcome::Stale, status, age)
}

/// The stored answer, with the cache's headers.
fn replay(e: &Entry, outcome: CacheOutcome, status: String, age_secs: u64) -> Response<Body> {
    let mut resp = Response::new(body::full(e.body.clone()));
    *resp.status_mut() = e.status;
    // Sized for the stored fields, the cache's three and what the layers
    // above add (request id, rate-limit fields), so none of the inserts
    // grows the map; a clone would copy it at its stored size.
    let h = resp.headers_mut();
    h.reserve(e.headers.len() + 10);
    for (name, value) in &e.headers {
        h.append(name.clone(), value.clone());
    }
    mark(&mut resp, outcome, status, Some(age_secs));
    resp
}

/// `X-Cache`, `Cache-Status` and `Age` on the answer, and its
/// [`CacheOutcome`] for the layers above.
fn mark(resp: &mut Response<Body>, outcome: CacheOutcome, status: String, age: Option<u64>) {
    resp.extensions_mut().insert(outcome);
    let h = resp.headers_mut();
    h.insert(X_CACHE, HeaderValue::from_static(outcome.as_str()));
    if let Ok(v) = HeaderValue::try_from(status) {
        h.insert(CACHE_STATUS, v);
    }
    if let Some(age) = age {
        h.insert(header::AGE, HeaderValue::from(age));
    }
}
