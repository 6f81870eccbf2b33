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

/// The shortest a probe lease is held (it is held as long as the circuit
/// stays open after a failure, so that it runs out before the next probe
/// is due).
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
        let weak = Arc::downgrade(self);
        link.redis.on_circuit_messages(move |name, state| {
            let Some(circuits) = weak.upgrade() else {
                return false; // replaced by a reload
            };
            if let Some(b) = circuits.get(name) {
                b.adopt(state.version, state.open_for);
            }
            true
        });
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
    /// sidecar holds the fleet's probe; another sidecar holding it, it
    /// answers as open without polling `call`.
    pub(super) fn probe<F>(
        self: &Arc<Self>,
        breaker: Arc<Breaker>,
        call: ResponseFuture<F>,
    ) -> BoxAnswer
    where
        F: Future<Output = Result<Response<Body>, BoxError>> + Send + 'static,
    {
        let link = Arc::clone(self);
        let name = Arc::clone(breaker.name());
        let ttl = breaker.open_for().max(MIN_PROBE_LEASE);
        let taking: Taking = Box::pin(async move {
            let taken = link.redis.take_probe(&name, &link.token, ttl).await;
            (link, name, taken)
        });
        Box::pin(Probe {
            taking: Some(taking),
            call,
            breaker,
            lease: None,
        })
    }
}

/// The attempt at the fleet's probe lease.
type Taking = Pin<
    Box<
        dyn Future<
                Output = (
                    Arc<FleetLink>,
                    Arc<str>,
                    Result<bool, crate::redis::RedisError>,
                ),
            > + Send,
    >,
>;

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
            let (link, circuit, taken) = std::task::ready!(taking.as_mut().poll(cx));
            *this.taking = None;
            match taken {
                Ok(true) => {
                    *this.lease = Some(Lease {
                        link,
                        circuit,
                        armed: true,
                    });
                }
                Ok(false) => {
                    this.call.as_mut().forget();
                    this.breaker.probing_elsewhere();
                    return std::task::Poll::Ready(Err(Box::new(CircuitOpen {
                        circuit,
                        retry_after: 1,
                    })));
                }
                // Redis cannot say: this sidecar's own probe, as without it.
                Err(_) => {}
            }
        }
        let answer = std::task::ready!(this.call.poll(cx));
        if let Some(lease) = this.lease.as_mut() {
            // A result closed or re-opened the circuit, and the fleet hears
            // it: the lease runs out by itself, after the next probe could
            // be due. No result: given back at once.
            lease.armed = this.breaker.awaits_probe();
        }
        std::task::Poll::Ready(answer)
    }
}

/// The fleet's probe held by this sidecar; given back when dropped armed
/// (the probe ended without a result, or its client left).
struct Lease {
    link: Arc<FleetLink>,
    circuit: Arc<str>,
    armed: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let (true, Ok(rt)) = (self.armed, tokio::runtime::Handle::try_current()) {
            let link = Arc::clone(&self.link);
            let circuit = Arc::clone(&self.circuit);
            rt.spawn(async move {
                let _ = link.redis.give_probe(&circuit, &link.token).await;
            });
        }
    }
}
