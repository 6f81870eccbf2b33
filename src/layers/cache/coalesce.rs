//! Identical misses joined: the first leads the upstream call (and, with
//! Redis, takes the fleet's lease); the others wait for its answer, and one
//! of them leads the next attempt when the shared call fails.

use std::sync::Arc;

use http::Response;

use super::entry::Entry;
use super::fleet::LeaseGuard;
use super::inflight::LeaderGuard;
use super::store::Namespace;
use super::*;
use crate::BoxError;
use crate::body::Body;
use crate::extensions::CacheOutcome;

/// A miss about to join the identical ones under way.
#[derive(Clone, Copy)]
pub(super) struct Miss<'a> {
    pub(super) sh: &'a Shared,
    pub(super) ns: &'a Arc<Namespace>,
    pub(super) key: &'a str,
    /// The corpus generation it is asked under (for the fleet's lease).
    pub(super) generation: u64,
    pub(super) limit: std::time::Duration,
    /// An answer at hand if the shared call fails.
    pub(super) stale: Option<&'a Stale>,
}

/// Where an identical miss under way leaves this one.
pub(super) enum Coalescing {
    /// It goes upstream for the others (and, with a lease, for the fleet).
    Lead(LeaderGuard, Option<LeaseGuard>),
    /// It goes upstream alone (the shared answer could not be shared).
    Alone,
    /// It is answered: shared, stale, or refused.
    Answered(Result<Response<Body>, BoxError>),
}

impl Coalescing {
    /// Answered with the entry another request's call stored.
    fn shared(e: &Entry) -> Self {
        let resp = replay(e, CacheOutcome::Miss, COLLAPSED.into(), 0);
        Self::Answered(Ok(collapsed(resp)))
    }
}

/// Joins the identical misses under way: the first leads; the others wait
/// (the route's timeout in all, then 504) for its answer. When the shared
/// call fails and no stale answer is at hand, one waiter leads the next
/// attempt and the rest wait on it, instead of each calling on its own.
pub(super) async fn coalesce(miss: Miss<'_>) -> Coalescing {
    let Miss {
        sh,
        ns,
        key,
        limit,
        stale,
        ..
    } = miss;
    let counters = (&sh.store.counters, &ns.counters);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut rx = match sh.inflight.join(key) {
            Join::Leader(guard) => return lead(miss, guard).await,
            Join::Waiter(rx) => rx,
        };
        let outcome =
            tokio::time::timeout_at(deadline, rx.wait_for(|o| !matches!(o, Outcome::Pending)))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|o| o.clone());
        match (outcome, stale) {
            (Some(Outcome::Stored(e)), _) => {
                count(counters, |c| &c.coalesced);
                return Coalescing::shared(&e);
            }
            // A stream under way: followed from its first event.
            (Some(Outcome::Streaming(head)), _) => {
                // Its first events are gone (too large to keep): alone.
                let Some(body) = head.tee.reader() else {
                    return Coalescing::Alone;
                };
                count(counters, |c| &c.coalesced);
                let mut resp = Response::new(body);
                *resp.status_mut() = head.status;
                *resp.headers_mut() = head.headers.clone();
                mark(&mut resp, CacheOutcome::Miss, COLLAPSED.into(), None);
                return Coalescing::Answered(Ok(collapsed(resp)));
            }
            // The shared call failed (or never answered) and an old answer
            // is at hand: serve it now rather than try again.
            (Some(Outcome::Failed) | None, Some(s)) => {
                return Coalescing::Answered(Ok(serve_stale(sh, ns, s, "upstream-error")));
            }
            // It failed: the next attempt is led by whoever joins first,
            // unless one already led it and stored its answer while this
            // waiter was not yet scheduled.
            (Some(Outcome::Failed), None) => {
                if let Some(e) = ns.current(key) {
                    count(counters, |c| &c.coalesced);
                    return Coalescing::shared(&e);
                }
            }
            // The route's time is spent waiting: 504, as for the leader.
            (None, None) => {
                let late = failed_miss(UpstreamTimeout(limit), "miss");
                return Coalescing::Answered(Err(late));
            }
            // It stored nothing (an answer not to share): upstream alone.
            _ => return Coalescing::Alone,
        }
    }
}

/// The leader of a miss, which with Redis first takes the fleet's lease:
/// another sidecar holding it means waiting for that one's entry instead.
async fn lead(miss: Miss<'_>, guard: LeaderGuard) -> Coalescing {
    let Miss {
        sh,
        ns,
        key,
        generation,
        limit,
        stale,
    } = miss;
    let Some(fleet) = sh.store.fleet() else {
        return Coalescing::Lead(guard, None);
    };
    match fleet.lease(&sh.store, ns, key, generation, limit).await {
        Remote::Holder(l) => Coalescing::Lead(guard, Some(l)),
        Remote::Alone => Coalescing::Lead(guard, None),
        Remote::Served(e) => {
            count((&sh.store.counters, &ns.counters), |c| &c.coalesced_remote);
            guard.finish(Outcome::Stored(Arc::clone(&e)));
            Coalescing::shared(&e)
        }
        Remote::TimedOut => {
            guard.finish(Outcome::Failed);
            Coalescing::Answered(match stale {
                Some(s) => Ok(serve_stale(sh, ns, s, "timeout")),
                None => Err(failed_miss(UpstreamTimeout(limit), "miss")),
            })
        }
    }
}

/// The `Cache-Status` of an answer shared with another request.
const COLLAPSED: &str = "rag-sidecar; fwd=miss; collapsed";

/// An answer shared with another request (here or on another sidecar),
/// marked so for the layers above.
fn collapsed(mut resp: Response<Body>) -> Response<Body> {
    resp.extensions_mut().insert(Coalesced);
    resp
}
