//! What the layers pass each other on a request or a response, as typed
//! extensions. This is a leaf: every layer may use it, so no layer imports
//! another's module to learn what that one left on a request, and nothing
//! reads a header another layer wrote where a typed value can travel.
//!
//! On the request (set by → read by):
//! - [`ClientAddr`]: the server → the rate limiter, the retry, the proxy
//!   (`X-Forwarded-For`), the access log.
//! - [`ClientId`]: the rate limiter (its client key, hashed) → the breaker.
//! - [`Deadline`]: the route timeout → the retry, the breaker's permit.
//! - [`BodySent`]: the route timeout → the breaker's permit.
//! - [`StaleAtHand`]: the cache → the retry, the upstream quota.
//! - [`QuotaLearning`]: the upstream quota → the breaker.
//! - [`Departure`]: the cache → the upstream quota, which marks when the
//!   call leaves after its wait.
//! - [`ClientId`] is read by the upstream quota too (its fair queue).
//! - `MatchedRoute` ([`crate::route`]): the route match → every layer.
//! - [`Attempt`]: the retry, on each copy it sends → the attempt span.
//!
//! On the response:
//! - [`UpstreamFailure`]: the classifier → the retry, the breaker, metrics.
//! - [`CacheOutcome`]: the cache → metrics, the cache's invalidation, the
//!   server span.
//! - [`Coalesced`]: the cache, on an answer shared with another request →
//!   the server span.
//! - [`QuotaWait`]: the upstream quota, on an answer that waited its turn →
//!   the server span.
//! - `Rescued` ([`crate::error`]): the rescue → metrics, the access log.
//!
//! [`Carried`] is the one list of request extensions a request re-made by a
//! layer (a retry's copy) must carry for the layers below it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::{Extensions, Response};

use crate::BoxError;
use crate::body::Body;
use crate::error::Failure;
use crate::route::MatchedRoute;

/// The TCP peer of the connection a request came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Who the client is, as the rate limiter keys it (the peer, the
/// `X-Forwarded-For` entry left of the trusted proxies, or a header),
/// hashed: the breaker counts a plain 500 once per client in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientId(pub u64);

impl ClientId {
    /// The id of anything hashable (a client key, an address).
    pub fn of(key: &impl std::hash::Hash) -> Self {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        Self(BuildHasherDefault::<DefaultHasher>::default().hash_one(key))
    }
}

/// The client a request counts for: the rate limiter's key (hashed), or the
/// peer's address when rate limiting is off (0 when neither is known). The
/// upstream quota's fair shares and the spool's per-client share use it.
pub fn client_of(ext: &Extensions) -> u64 {
    match (ext.get::<ClientId>(), ext.get::<ClientAddr>()) {
        (Some(id), _) => id.0,
        (None, Some(a)) => ClientId::of(&a.0.ip()).0,
        (None, None) => 0,
    }
}

/// When the route's overall time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: tokio::time::Instant,
    /// The route's timeout, for the 504's message.
    pub route_timeout: Duration,
}

/// Whether the request's body has been delivered whole (to the upstream
/// client, or to the retry layer's buffer). Absent when the request had no
/// body to send.
#[derive(Debug, Clone, Default)]
pub struct BodySent(Arc<AtomicBool>);

impl BodySent {
    /// A flag not yet set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The body yielded its end.
    pub fn mark_sent(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_sent(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// On a request the cache forwards while holding a stale answer for it: the
/// retry layer below makes a single attempt, since a failure is answered
/// with the stale entry at once anyway.
#[derive(Debug, Clone, Copy)]
pub struct StaleAtHand;

/// This answer of the upstream is a failure of the given type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFailure(pub Failure);

impl UpstreamFailure {
    /// The failure an attempt's result stands for, if any.
    pub fn of(result: &Result<Response<Body>, BoxError>) -> Option<Failure> {
        match result {
            Ok(resp) => resp.extensions().get::<UpstreamFailure>().map(|f| f.0),
            Err(e) => Failure::of_error(e),
        }
    }
}

/// What the cache did for an answer of a cached route (its `X-Cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheOutcome {
    Hit,
    Miss,
    Stale,
    Bypass,
}

impl CacheOutcome {
    /// The `X-Cache` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "HIT",
            Self::Miss => "MISS",
            Self::Stale => "STALE",
            Self::Bypass => "BYPASS",
        }
    }
}

/// Which attempt of its request this is, from 2 on (the first carries
/// none): the retry puts it on each copy it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt(pub u32);

/// The answer is another request's, shared (collapsed forwarding, here or
/// on another sidecar of the fleet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalesced;

/// The request goes with no upstream quota in force on its route: a Gemini
/// quota signal on it teaches the route a limit (the upstream quota's
/// learned limit) instead of counting as a failure of the app's, so the
/// breaker does not open on quota signals while the route is learning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLearning;

/// The corpus generation and clear epoch of the cache's namespace as they
/// were when the request's call left for the upstream. The cache sets them
/// when it forwards a miss; the upstream quota marks them again when it
/// gives the call after a wait ([`Departure::mark`]), so that an upload
/// during the wait does not make the cache throw away (or stamp as old) an
/// answer the app gave for the corpus as it is now: a call that was paid
/// for is kept.
#[derive(Clone)]
pub struct Departure(
    pub Arc<dyn Fn() -> (u64, u64) + Send + Sync>,
    pub Arc<[AtomicU64; 2]>,
);

impl Departure {
    /// The generation and epoch now, kept as the call's.
    pub fn mark(&self) {
        let (generation, epoch) = (self.0)();
        self.1[0].store(generation, Ordering::Release);
        self.1[1].store(epoch, Ordering::Release);
    }

    /// The generation and epoch the call left under.
    pub fn read(&self) -> (u64, u64) {
        (
            self.1[0].load(Ordering::Acquire),
            self.1[1].load(Ordering::Acquire),
        )
    }
}

impl std::fmt::Debug for Departure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Departure").field(&self.read()).finish()
    }
}

/// How long the request waited for room under its route's upstream quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaWait(pub Duration);

/// The request extensions the layers below the retry read: taken once from
/// the original request, put on each copy a retry makes. Copying the whole
/// extension map up front, for every request, would cost several
/// allocations; a new extension a lower layer reads is added here.
#[derive(Debug, Clone, Default)]
pub struct Carried {
    deadline: Option<Deadline>,
    route: Option<MatchedRoute>,
    client: Option<ClientAddr>,
    id: Option<ClientId>,
    departure: Option<Departure>,
}

impl Carried {
    pub fn take_from(ext: &Extensions) -> Self {
        Self {
            deadline: ext.get::<Deadline>().copied(),
            route: ext.get::<MatchedRoute>().cloned(),
            client: ext.get::<ClientAddr>().copied(),
            id: ext.get::<ClientId>().copied(),
            departure: ext.get::<Departure>().cloned(),
        }
    }

    pub fn put_on(&self, ext: &mut Extensions) {
        if let Some(d) = self.deadline {
            ext.insert(d);
        }
        if let Some(r) = &self.route {
            ext.insert(r.clone());
        }
        if let Some(c) = self.client {
            ext.insert(c);
        }
        if let Some(i) = self.id {
            ext.insert(i);
        }
        if let Some(d) = &self.departure {
            ext.insert(d.clone());
        }
    }

    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    pub fn route(&self) -> Option<&MatchedRoute> {
        self.route.as_ref()
    }
}
