//! One circuit for the fleet (PRODUCT.md "Retry and circuit breaking":
//! with Redis, a circuit that opens on any sidecar is open on every sidecar
//! within 1 s, one probe goes through for the whole fleet in HALF-OPEN, and
//! its result closes or re-opens the circuit everywhere).
//!
//! Each breaker tells its own transitions ([`super::breaker::Change`]); a
//! task writes them to Redis ([`crate::redis::circuit`]), which publishes
//! them; every sidecar adopts what it hears, and reads every circuit's
//! state every [`POLL_EVERY`] in case a message was lost. In HALF-OPEN a
//! sidecar's probe first takes the fleet's probe lease: the sidecar that
//! cannot asks again a second later, unless the result reached it first.
//! Redis down or slow: every step fails fast and each sidecar's circuits
//! are its own, as without Redis.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::Response;

use super::breaker::{Breaker, Change};
use super::{Circuits, ResponseFuture};
use crate::BoxError;
use crate::body::Body;
use crate::error::CircuitOpen;
use crate::redis::RedisStore;

/// How often every circuit's state is read from Redis (the backstop of
/// the messages; the contract's bound is 1 s).
pub const POLL_EVERY: Duration = Duration::from_millis(500);

/// The shortest a probe lease is held (it is held for the call's time
/// left, and given back when the probe ends).
const MIN_PROBE_LEASE: Duration = Duration::from_secs(1);

/// A boxed answer future: only a fleet's probe takes this path.
pub type BoxAnswer = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// The circuits' link to the fleet: one per process, through reloads.
#[derive(Debug)]
pub struct FleetLink {
    redis: RedisStore,
    /// This sidecar's name on the probe lease.
    token: String,
    /// Where every circuit tells its transitions, for the writer.
    changes: tokio::sync::mpsc::UnboundedSender<Change>,
}

impl Circuits {
    /// Makes every circuit one for the fleet through `redis`.
    pub fn follow_fleet(self: &Arc<Self>, redis: RedisStore) {
        let (changes, mut rx) = tokio::sync::mpsc::unbounded_channel::<Change>();
        let writer = redis.clone();
        // Until every circuit that can tell a change is gone.
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                // A failure is counted by the store; the circuit stays this
                // sidecar's until Redis takes its next change.
                if let Ok(v) = writer
                    .write_circuit(&change.circuit, change.opened_for)
                    .await
                {
                    if let Some(core) = change.core.upgrade() {
                        core.wrote(v);
                    }
                }
            }
        });
        self.join_fleet(Arc::new(FleetLink {
            redis,
            token: uuid::Uuid::new_v4().simple().to_string(),
            changes,
        }));
    }

    /// Links every circuit to the fleet, and follows the fleet's states
    /// while these circuits are the ones in force.
    pub(super) fn join_fleet(self: &Arc<Self>, link: Arc<FleetLink>) {
        for b in self.iter() {
            b.link(link.changes.clone());
        }
        let (weak, alive) = (Arc::downgrade(self), Arc::downgrade(self));
        link.redis.on_circuit_messages(
            // Until a reload replaced these circuits.
            move || alive.strong_count() > 0,
            move |name, state| {
                if let Some(b) = weak.upgrade().as_ref().and_then(|c| c.get(name)) {
                    b.adopt(state.version, state.open_for);
                }
            },
        );
        tokio::spawn(poll(Arc::downgrade(self), link.redis.clone()));
        let _ = self.fleet.set(link);
    }

    pub(super) fn fleet(&self) -> Option<&Arc<FleetLink>> {
        self.fleet.get()
    }
}

/// Reads every circuit's state every [`POLL_EVERY`] while the circuits live.
async fn poll(circuits: Weak<Circuits>, redis: RedisStore) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(circuits) = circuits.upgrade() else {
            return;
        };
        if !redis.is_usable() {
            continue;
        }
        for b in circuits.iter() {
            if let Ok(Some(state)) = redis.read_circuit(b.name()).await {
                b.adopt(state.version, state.open_for);
            }
        }
    }
}

impl FleetLink {
    /// The half-open probe `call` makes (its permit a probe's), once this
    /// sidecar holds the fleet's probe for `hold` (the call's time left);
    /// another sidecar holding it, it answers as open without polling
    /// `call`. The lease is given back when the probe ends, whatever its
    /// end: a result reaches the fleet at once through its own write.
    pub(super) fn probe<F>(
        self: &Arc<Self>,
        breaker: Arc<Breaker>,
        call: ResponseFuture<F>,
        hold: Duration,
    ) -> BoxAnswer
    where
        F: Future<Output = Result<Response<Body>, BoxError>> + Send + 'static,
    {
        let name = Arc::clone(breaker.name());
        let ttl = hold.max(MIN_PROBE_LEASE);
        // A task of its own: a lease Redis grants after this request is
        // gone is still given back (see the drop below).
        let taking = tokio::spawn({
            let (link, name) = (Arc::clone(self), Arc::clone(&name));
            async move { link.redis.take_probe(&name, &link.token, ttl).await }
        });
        Box::pin(Probe {
            taking: Some(taking),
            call,
            breaker,
            lease: None,
            link: Arc::clone(self),
            name,
        })
    }
}

/// The attempt at the fleet's probe lease.
type Taking = tokio::task::JoinHandle<Result<bool, crate::redis::RedisError>>;

pin_project_lite::pin_project! {
    /// A probe waiting for the fleet's lease, then making its call. (A
    /// future of its own rather than an async block: the call's future is
    /// generic, and an async block holding it is not proven `Send`.)
    struct Probe<F> {
        taking: Option<Taking>,
        #[pin]
        call: ResponseFuture<F>,
        breaker: Arc<Breaker>,
        lease: Option<Lease>,
        link: Arc<FleetLink>,
        name: Arc<str>,
    }

    impl<F> PinnedDrop for Probe<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Dropped while the lease was being taken: given back if taken.
            if let (Some(taking), Ok(rt)) = (this.taking.take(), tokio::runtime::Handle::try_current()) {
                let (link, name) = (Arc::clone(this.link), Arc::clone(this.name));
                rt.spawn(async move {
                    if let Ok(Ok(true)) = taking.await {
                        let _ = link.redis.give_probe(&name, &link.token).await;
                    }
                });
            }
        }
    }
}

impl<F> Future for Probe<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let mut this = self.project();
        if let Some(taking) = this.taking.as_mut() {
            let taken = std::task::ready!(Pin::new(taking).poll(cx));
            *this.taking = None;
            match taken {
                Ok(Ok(true)) => {
                    *this.lease = Some(Lease {
                        link: Arc::clone(this.link),
                        circuit: Arc::clone(this.name),
                    });
                }
                Ok(Ok(false)) => {
                    this.call.as_mut().forget();
                    this.breaker.probing_elsewhere();
                    return std::task::Poll::Ready(Err(Box::new(CircuitOpen {
                        circuit: Arc::clone(this.name),
                        retry_after: 1,
                    })));
                }
                // Redis cannot say: this sidecar's own probe, as without it.
                Ok(Err(_)) | Err(_) => {}
            }
        }
        // The lease (if any) is given back when this future is dropped.
        this.call.poll(cx)
    }
}

/// The fleet's probe held by this sidecar, given back when dropped: the
/// probe ended (its result, if any, is written and published by then or
/// on its way), or its client left.
struct Lease {
    link: Arc<FleetLink>,
    circuit: Arc<str>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let link = Arc::clone(&self.link);
            let circuit = Arc::clone(&self.circuit);
            rt.spawn(async move {
                let _ = link.redis.give_probe(&circuit, &link.token).await;
            });
        }
    }
}
