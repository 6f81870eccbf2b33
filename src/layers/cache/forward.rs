//! The call a miss makes: its answer stored when cacheable (a stream as it
//! arrives, [`Stream`]) and shared with the identical requests coalesced on
//! it. A leader's call, the one its waiters (here, and on other sidecars
//! through the lease) depend on, runs in a task of its own
//! ([`Call::detached`]): when its client hangs up, the call goes on, its
//! answer is stored and the waiters are served with it. A call that was
//! made (and paid for, under an upstream quota) is never thrown away.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, header};
use tracing::Instrument;

use super::entry::Entry;
use super::fleet::LeaseGuard;
use super::inflight::{LeaderGuard, Outcome, StreamHead};
use super::store::{CacheStore, Namespace};
use super::stream::{self, End, Tee};
use super::{Shared, Stale, failed_miss, mark, policy, serve_stale};
use crate::BoxError;
use crate::body::{self, Body, Buffered, read_bounded};
use crate::error::{UpstreamQuota, UpstreamTimeout, UpstreamUnavailable, find_cause};
use crate::extensions::{CacheOutcome, Departure};
use crate::service::BoxResponseFuture;

/// A miss on its way upstream, with what storing and sharing its answer
/// needs.
pub(super) struct Call {
    pub(super) sh: Arc<Shared>,
    pub(super) ns: Arc<Namespace>,
    pub(super) key: String,
    /// An answer at hand for when the upstream fails.
    pub(super) stale: Option<Stale>,
    /// Held when identical requests wait on this call.
    pub(super) leader: Option<LeaderGuard>,
    /// Held when other sidecars wait on this call.
    pub(super) lease: Option<LeaseGuard>,
    /// `Cache-Status`'s `fwd=` and its detail.
    pub(super) fwd: &'static str,
    pub(super) fwd_why: String,
    pub(super) limit: Duration,
    pub(super) departure: Departure,
}

impl Call {
    /// Runs the call; a leader's in its own task, which its client leaving
    /// does not end (the answer then goes to the cache and the waiters).
    pub(super) async fn detached(
        self,
        answer: BoxResponseFuture,
    ) -> Result<Response<Body>, BoxError> {
        if self.leader.is_none() && self.lease.is_none() {
            return self.run(answer).await;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let run = async move {
            // Nobody to give it to when the client has gone: it is stored
            // (and its waiters served) all the same.
            let _ = tx.send(self.run(answer).await);
        };
        tokio::spawn(run.in_current_span());
        rx.await
            .unwrap_or_else(|_| Err("the upstream call's task ended without an answer".into()))
    }

    async fn run(self, answer: BoxResponseFuture) -> Result<Response<Body>, BoxError> {
        let Call {
            sh,
            ns,
            key,
            stale,
            mut leader,
            lease,
            fwd,
            fwd_why,
            limit,
            departure,
        } = self;
        let sh = &*sh;
        let result = answer.await;
        let (generation, epoch) = departure.read();
        let failed = match &result {
            Err(_) => true,
            Ok(r) => r.status().is_server_error(),
        };
        if failed {
            if let Some(guard) = leader.take() {
                guard.finish(Outcome::Failed);
            }
        }
        let resp = match (result, &stale) {
            (Err(e), Some(s)) => {
                // The upstream quota refused the call (no room, or it leaves
                // the calls to questions with no answer at hand): `detail=quota`.
                let why = if find_cause::<UpstreamQuota>(e.as_ref()).is_some() {
                    "quota"
                } else {
                    "upstream-error"
                };
                tracing::debug!("serving stale: {why}: {e}");
                return Ok(serve_stale(sh, &ns, s, why));
            }
            (Err(e), None) => return Err(failed_miss(e, fwd)),
            (Ok(r), Some(s)) if r.status().is_server_error() => {
                return Ok(serve_stale(sh, &ns, s, r.status().as_str()));
            }
            (Ok(r), _) => r,
        };
        let declared = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        if let Err(why) = policy::response_cacheable(
            resp.status(),
            resp.headers(),
            declared,
            ns.max_body,
            &sh.identity,
        ) {
            let mut resp = resp;
            mark(
                &mut resp,
                CacheOutcome::Miss,
                format!("rag-sidecar; fwd={fwd}; detail={}", why.as_str()),
                None,
            );
            return Ok(resp);
        }
        if policy::is_event_stream(resp.headers()) {
            let tee = Tee::new(ns.max_body, Arc::clone(&sh.memory));
            let to_store = Stream {
                store: Arc::clone(&sh.store),
                ns: Arc::clone(&ns),
                key,
                generation,
                epoch,
                leader,
                lease,
            };
            let mut resp = to_store.start(resp, tee, limit);
            mark(
                &mut resp,
                CacheOutcome::Miss,
                format!("rag-sidecar; fwd={fwd}{fwd_why}; detail=stream"),
                None,
            );
            return Ok(resp);
        }
        let (rparts, rbody) = resp.into_parts();
        let read = tokio::time::timeout(limit, read_bounded(rbody, ns.max_body)).await;
        let Ok(read) = read else {
            return Err(failed_miss(UpstreamTimeout(limit), fwd));
        };
        let bytes = match read {
            Ok(Buffered::Whole(b)) => b,
            Ok(Buffered::Partial(rest)) => {
                let mut resp = Response::from_parts(rparts, rest);
                mark(
                    &mut resp,
                    CacheOutcome::Miss,
                    format!("rag-sidecar; fwd={fwd}; detail=too-large"),
                    None,
                );
                return Ok(resp);
            }
            Err(e) => return Err(failed_miss(UpstreamUnavailable(e), fwd)),
        };
        let ttl_ms = u64::try_from(ns.ttl().as_millis()).unwrap_or(u64::MAX);
        // An exact-size copy: the body read from the upstream may be a slice of a
        // larger connection buffer that the entry would otherwise pin.
        let entry = Arc::new(
            Entry::new(
                rparts.status,
                policy::stored_headers(&rparts.headers),
                Bytes::copy_from_slice(&bytes),
                sh.store.clock.now_ms(),
                ttl_ms,
            )
            .with_generation(generation),
        );
        let mut resp = Response::from_parts(rparts, body::full(entry.body.clone()));
        // A corpus change during the call makes its answer unfit to store.
        if ns.epoch() != epoch {
            mark(
                &mut resp,
                CacheOutcome::Miss,
                format!("rag-sidecar; fwd={fwd}; detail=invalidated"),
                None,
            );
            return Ok(resp);
        }
        // Memory first and the waiters released; then Redis (bounded by its timeout).
        sh.store.put_memory(&ns, key.clone(), Arc::clone(&entry));
        if let Some(guard) = leader {
            guard.finish(Outcome::Stored(Arc::clone(&entry)));
        }
        let in_redis = sh.store.put_redis(&key, &entry).await;
        if let Some(lease) = lease {
            // The waiting sidecars read the entry now.
            lease.release(in_redis.then_some(entry.generation)).await;
        }
        mark(
            &mut resp,
            CacheOutcome::Miss,
            format!(
                "rag-sidecar; fwd={fwd}{fwd_why}; stored; ttl={}",
                ns.ttl().as_secs()
            ),
            None,
        );
        Ok(resp)
    }
}

/// A streamed answer on its way to its clients and, if it ends cleanly
/// within the limit, to the cache.
struct Stream {
    store: Arc<CacheStore>,
    ns: Arc<Namespace>,
    key: String,
    generation: u64,
    epoch: u64,
    leader: Option<LeaderGuard>,
    lease: Option<LeaseGuard>,
}

impl Stream {
    /// The leader's answer, reading the stream from the tee; the upstream
    /// body is read by a task of its own (bounded by `idle` between
    /// events), which stores the copy when the stream ends cleanly. The
    /// identical requests waiting here join at once; the lead (and a lease)
    /// is held until the stream ends.
    fn start(
        self,
        resp: Response<Body>,
        tee: Arc<Tee>,
        idle: std::time::Duration,
    ) -> Response<Body> {
        let (parts, upstream) = resp.into_parts();
        let head = Arc::new(StreamHead {
            status: parts.status,
            headers: policy::stored_headers(&parts.headers),
            tee: Arc::clone(&tee),
        });
        let body = tee.reader().unwrap_or_else(body::empty);
        if let Some(l) = &self.leader {
            l.publish(Outcome::Streaming(Arc::clone(&head)));
        }
        tokio::spawn(async move {
            let end = stream::pump(Arc::clone(&tee), upstream, idle).await;
            self.finish(end, &head).await;
        });
        Response::from_parts(parts, body)
    }

    async fn finish(self, end: End, head: &StreamHead) {
        let copy = if end == End::Clean && self.ns.epoch() == self.epoch {
            head.tee.copy()
        } else {
            None
        };
        let Some(bytes) = copy else {
            // Broken, silent, oversized or overtaken by an invalidation:
            // nothing stored; dropping the lead and the lease lets the
            // others go upstream.
            return;
        };
        let ttl_ms = u64::try_from(self.ns.ttl().as_millis()).unwrap_or(u64::MAX);
        let entry = Arc::new(
            Entry::new(
                head.status,
                head.headers.clone(),
                bytes,
                self.store.clock.now_ms(),
                ttl_ms,
            )
            .with_generation(self.generation),
        );
        self.store
            .put_memory(&self.ns, self.key.clone(), Arc::clone(&entry));
        if let Some(l) = self.leader {
            l.finish(Outcome::Stored(Arc::clone(&entry)));
        }
        let in_redis = self.store.put_redis(&self.key, &entry).await;
        if let Some(l) = self.lease {
            l.release(in_redis.then_some(self.generation)).await;
        }
    }
}
