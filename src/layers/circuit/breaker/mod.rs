//! One circuit's state machine: CLOSED → OPEN after `threshold` consecutive
//! failures → HALF-OPEN once `open_for` has passed, where exactly one probe
//! goes through (success closes, failure re-opens, a cancelled probe frees
//! the slot for the next caller) → CLOSED.
//!
//! Owned here rather than taken from failsafe 1.3 (see ../shared/CRATES.md):
//! failsafe reads `std::time::Instant` (its mock clock is a thread-local for
//! synchronous scopes), so its open → half-open step cannot run under paused
//! tokio time; it has no readers for state, failure count or retry time, so
//! a wrapper would keep a second copy of the very state machine it wraps;
//! and its half-open state lets every concurrent call through where the
//! contract wants one probe. This is the linkerd `failfast` shape instead:
//! a closed fast path of two atomic loads, a mutex only on transitions.
//!
//! With Redis the circuit is one for the fleet ([`super::fleet`]): the
//! transitions this sidecar makes are told through [`Core::link`], and the
//! fleet's are taken with [`Core::adopt`].

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "the mutex is taken on state transitions only (the closed path reads two atomics), never across an await"
)]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// The state an operator sees: the metrics' own type, so that the breaker
/// reports its state without a translation.
pub use crate::metrics::resilience::CircuitState as State;

#[derive(Debug)]
enum Phase {
    Closed,
    /// Rejecting until `until`; after it, one probe at a time.
    Open {
        until: Instant,
        probing: bool,
    },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    last_failure: Option<SystemTime>,
    /// Clients whose plain 500 already counted in this run of failures.
    plain_500_from: Vec<u64>,
}

/// How long a sidecar waits before asking again for the fleet's probe
/// that another holds.
const PROBE_ELSEWHERE: Duration = Duration::from_secs(1);

/// At most this many clients are remembered in a run (a run opens the
/// circuit at `threshold` failures long before).
const MAX_RUN_CLIENTS: usize = 1024;

/// A handle on a named circuit breaker. The state lives in one shared
/// [`Core`]; each worker holds its own handle (see [`Breaker::handle`]), so
/// the reference counting that every request's [`Permit`] does stays on that
/// worker's core instead of bouncing one cache line between threads.
#[derive(Debug)]
pub struct Breaker {
    core: Arc<Core>,
}

impl std::ops::Deref for Breaker {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

/// One circuit's state, shared by every worker's handle.
#[derive(Debug)]
pub struct Core {
    name: Arc<str>,
    threshold: u32,
    open_for: Duration,
    /// `phase != Closed`: the closed fast path reads only this...
    tripped: AtomicBool,
    /// ...and this (consecutive failures).
    failures: AtomicU32,
    inner: Mutex<Inner>,
    /// With Redis: where the transitions this sidecar makes go, to be the
    /// fleet's; unset, the circuit is this sidecar's alone.
    changes: OnceLock<tokio::sync::mpsc::UnboundedSender<Change>>,
    /// The fleet's version of the state last written or taken here.
    applied: AtomicU64,
    /// Itself, for the changes it tells (the fleet's writer reports the
    /// version back to it).
    me: std::sync::Weak<Core>,
}

/// A transition this sidecar made, for the fleet.
#[derive(Debug, Clone)]
pub struct Change {
    pub circuit: Arc<str>,
    /// `Some(d)`: opened for `d`; `None`: closed.
    pub opened_for: Option<Duration>,
    /// The circuit that made it.
    pub core: std::sync::Weak<Core>,
}

/// What a caller may do.
#[derive(Debug)]
pub enum Admission {
    /// Go ahead; report the outcome on the permit.
    Permitted(Permit),
    /// Fail at once; a probe may go in this long.
    Rejected { retry_after: Duration },
}

/// A figure-for-figure view for `/api/circuit-breakers`.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub state: State,
    pub failure_count: u32,
    pub failure_threshold: u32,
    /// Unix seconds of the last recorded failure.
    pub last_failure_time: Option<u64>,
    /// Whole seconds until a probe may go (0 unless open).
    pub time_until_retry: u64,
}

impl Breaker {
    pub fn new(name: &str, threshold: u32, open_for: Duration) -> Arc<Self> {
        let core = Arc::new_cyclic(|me| Core {
            name: name.into(),
            threshold: threshold.max(1),
            open_for,
            tripped: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                last_failure: None,
                plain_500_from: Vec::new(),
            }),
            changes: OnceLock::new(),
            applied: AtomicU64::new(0),
            me: me.clone(),
        });
        Arc::new(Self { core })
    }

    /// Another handle on the same circuit (for one worker).
    pub fn handle(&self) -> Arc<Self> {
        Arc::new(Self {
            core: Arc::clone(&self.core),
        })
    }

    /// Asks to call the upstream now.
    pub fn admit(self: &Arc<Self>) -> Admission {
        if !self.tripped.load(Ordering::Acquire) {
            return Admission::Permitted(self.permit(false));
        }
        let now = Instant::now();
        let mut inner = self.lock();
        match &mut inner.phase {
            Phase::Closed => Admission::Permitted(self.permit(false)),
            Phase::Open { until, probing } => {
                if now < *until {
                    Admission::Rejected {
                        retry_after: *until - now,
                    }
                } else if *probing {
                    // One probe at a time; the others fail fast meanwhile.
                    Admission::Rejected {
                        retry_after: Duration::from_secs(1),
                    }
                } else {
                    *probing = true;
                    tracing::info!(circuit = %self.name, "circuit HALF-OPEN: sending one probe");
                    Admission::Permitted(self.permit(true))
                }
            }
        }
    }

    fn permit(self: &Arc<Self>, probe: bool) -> Permit {
        Permit {
            breaker: Arc::clone(self),
            probe,
            done: false,
            deadline: None,
            body: None,
        }
    }
}

impl Core {
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// How long the circuit stays open after a failure.
    pub fn open_for(&self) -> Duration {
        self.open_for
    }

    /// Consecutive failures that open it.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the fleet of every transition this sidecar makes from now on.
    pub fn link(&self, changes: tokio::sync::mpsc::UnboundedSender<Change>) {
        let _ = self.changes.set(changes);
    }

    /// Whether the circuit is the fleet's (Redis configured).
    pub fn is_linked(&self) -> bool {
        self.changes.get().is_some()
    }

    fn tell(&self, opened_for: Option<Duration>) {
        if let Some(tx) = self.changes.get() {
            let _ = tx.send(Change {
                circuit: Arc::clone(&self.name),
                opened_for,
                core: self.me.clone(),
            });
        }
    }

    /// The fleet holds version `v` of the state, written by this sidecar.
    pub fn wrote(&self, v: u64) {
        self.applied.fetch_max(v, Ordering::AcqRel);
    }

    /// Takes version `v` of the fleet's state, unless it has it already:
    /// open for `Some(d)` more (`Duration::ZERO`: due a probe), or closed.
    pub fn adopt(&self, v: u64, open_for: Option<Duration>) {
        // Checked under the lock: of two versions taken at once (the
        // poll's and a message's), the older must not land last.
        let mut inner = self.lock();
        if self.applied.fetch_max(v, Ordering::AcqRel) >= v {
            return;
        }
        // A value from Redis: never past what an `Instant` can hold.
        let until = |left: Duration| {
            let now = Instant::now();
            now.checked_add(left).unwrap_or(now + self.open_for)
        };
        match (open_for, &mut inner.phase) {
            (Some(left), Phase::Open { until: u, .. }) => *u = until(left),
            (Some(left), Phase::Closed) => {
                inner.phase = Phase::Open {
                    until: until(left),
                    probing: false,
                };
                self.tripped.store(true, Ordering::Release);
                tracing::warn!(circuit = %self.name, "circuit OPEN on another sidecar of the fleet; retrying in {:.1}s", left.as_secs_f64());
            }
            (None, Phase::Open { .. }) => {
                inner.phase = Phase::Closed;
                inner.plain_500_from.clear();
                self.failures.store(0, Ordering::Release);
                self.tripped.store(false, Ordering::Release);
                tracing::info!(circuit = %self.name, "circuit CLOSED: the fleet's probe succeeded");
            }
            (None, Phase::Closed) => {}
        }
    }

    /// Another sidecar holds the fleet's probe: this one asks again in a
    /// second, unless the probe's result comes first.
    pub fn probing_elsewhere(&self) {
        if let Phase::Open { until, probing } = &mut self.lock().phase {
            *until = Instant::now() + PROBE_ELSEWHERE;
            *probing = false;
        }
    }

    /// Whether calls are being refused right now (open and not yet due a
    /// probe). The retry layer stops retrying on this.
    pub fn is_open(&self) -> bool {
        if !self.tripped.load(Ordering::Acquire) {
            return false;
        }
        matches!(self.lock().phase, Phase::Open { until, .. } if Instant::now() < until)
    }

    fn on_success(&self, probe: bool) {
        if !probe && self.failures.load(Ordering::Acquire) == 0 {
            return; // the closed fast path
        }
        let mut inner = self.lock();
        match inner.phase {
            Phase::Closed => {
                self.failures.store(0, Ordering::Release);
                inner.plain_500_from.clear();
            }
            Phase::Open { .. } if probe => {
                inner.phase = Phase::Closed;
                inner.plain_500_from.clear();
                self.failures.store(0, Ordering::Release);
                self.tripped.store(false, Ordering::Release);
                tracing::info!(circuit = %self.name, "circuit CLOSED: probe succeeded");
                self.tell(None);
            }
            // A call admitted before the circuit opened: the probe decides.
            Phase::Open { .. } => {}
        }
    }

    fn on_failure(&self, probe: bool) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.last_failure = Some(SystemTime::now());
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        match &mut inner.phase {
            Phase::Closed if failures >= self.threshold => {
                inner.phase = Phase::Open {
                    until: now + self.open_for,
                    probing: false,
                };
                self.tripped.store(true, Ordering::Release);
                tracing::warn!(
                    circuit = %self.name,
                    failures,
                    "circuit OPEN after {failures} consecutive failures; retrying in {:.1}s",
                    self.open_for.as_secs_f64()
                );
                self.tell(Some(self.open_for));
            }
            Phase::Closed => {}
            Phase::Open { until, probing } if probe => {
                *until = now + self.open_for;
                *probing = false;
                tracing::warn!(circuit = %self.name, "circuit OPEN again: probe failed");
                self.tell(Some(self.open_for));
            }
            Phase::Open { .. } => {}
        }
    }

    /// A plain 500, often the answer to one client's bad input: it counts
    /// once per client within a run of failures, so no single client can
    /// open a circuit for everyone. A probe's 500 counts as a failure.
    fn on_plain_500(&self, probe: bool, client: Option<u64>) {
        if let (false, Some(client)) = (probe, client) {
            let mut inner = self.lock();
            if inner.plain_500_from.contains(&client) {
                inner.last_failure = Some(SystemTime::now());
                return;
            }
            if inner.plain_500_from.len() < MAX_RUN_CLIENTS {
                inner.plain_500_from.push(client);
            }
        }
        self.on_failure(probe);
    }

    fn on_cancel(&self, probe: bool) {
        if probe {
            if let Phase::Open { probing, .. } = &mut self.lock().phase {
                *probing = false;
            }
        }
    }

    /// Closes the circuit and forgets its failures (manual reset).
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.phase = Phase::Closed;
        inner.last_failure = None;
        inner.plain_500_from.clear();
        self.failures.store(0, Ordering::Release);
        self.tripped.store(false, Ordering::Release);
        self.tell(None);
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let inner = self.lock();
        let (state, left) = match inner.phase {
            Phase::Closed => (State::Closed, Duration::ZERO),
            Phase::Open { until, .. } if now < until => (State::Open, until - now),
            Phase::Open { .. } => (State::HalfOpen, Duration::ZERO),
        };
        Snapshot {
            state,
            failure_count: self.failures.load(Ordering::Acquire),
            failure_threshold: self.threshold,
            last_failure_time: inner
                .last_failure
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            time_until_retry: ceil_secs(left),
        }
    }
}

pub use crate::service::ceil_secs;

/// The right to make one call; report how it went. Dropped unreported
/// after its deadline (the route timeout above gave up on the call), it
/// counts as a failure; dropped earlier (the client went away), as nothing,
/// but a probe frees its slot. So an outer timeout is seen without a second
/// timer per call (the failsafe trap of ../shared/CRATES.md, where a
/// cancelled call counts as nothing).
#[derive(Debug)]
pub struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    done: bool,
    deadline: Option<Instant>,
    /// The request's body delivery: a deadline that passes before the
    /// client sent it all is the client's, not a failure.
    body: Option<crate::extensions::BodySent>,
}

impl Permit {
    /// Whether this is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Watches the request body's delivery (see `body`).
    pub fn watching(mut self, body: Option<crate::extensions::BodySent>) -> Self {
        self.body = body;
        self
    }

    /// A drop at or after `deadline` is a timeout: a failure.
    pub fn expires_at(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    pub fn success(mut self) {
        self.done = true;
        self.breaker.on_success(self.probe);
    }

    pub fn failure(mut self) {
        self.done = true;
        self.breaker.on_failure(self.probe);
    }

    /// The upstream answered a plain 500 to `client` (see
    /// `Breaker::on_plain_500`).
    pub fn plain_500(mut self, client: Option<u64>) {
        self.done = true;
        self.breaker.on_plain_500(self.probe, client);
    }

    /// The call ended in a way that says nothing about the upstream.
    pub fn forget(mut self) {
        self.done = true;
        self.breaker.on_cancel(self.probe);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let body_pending = self.body.as_ref().is_some_and(|b| !b.is_sent());
        if self.deadline.is_some_and(|d| Instant::now() >= d) && !body_pending {
            self.breaker.on_failure(self.probe);
        } else {
            self.breaker.on_cancel(self.probe);
        }
    }
}

#[cfg(test)]
mod tests;
