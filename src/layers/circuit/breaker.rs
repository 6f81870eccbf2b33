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

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "the mutex is taken on state transitions only (the closed path reads two atomics), never across an await"
)]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
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
        let core = Core {
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
        };
        Arc::new(Self {
            core: Arc::new(core),
        })
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

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
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
            }
            Phase::Closed => {}
            Phase::Open { until, probing } if probe => {
                *until = now + self.open_for;
                *probing = false;
                tracing::warn!(circuit = %self.name, "circuit OPEN again: probe failed");
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
mod tests {
    use super::*;

    fn admitted(b: &Arc<Breaker>) -> Permit {
        match b.admit() {
            Admission::Permitted(p) => p,
            Admission::Rejected { retry_after } => panic!("rejected for {retry_after:?}"),
        }
    }

    fn rejected(b: &Arc<Breaker>) -> Duration {
        match b.admit() {
            Admission::Rejected { retry_after } => retry_after,
            Admission::Permitted(_) => panic!("admitted"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_plain_500_counts_once_per_client_in_a_run() {
        let b = Breaker::new("upstream", 3, Duration::from_secs(60));
        for _ in 0..5 {
            admitted(&b).plain_500(Some(1));
        }
        assert_eq!(b.snapshot().failure_count, 1);
        // Another client's, and a gateway error: each counts.
        admitted(&b).plain_500(Some(2));
        assert_eq!(b.snapshot().failure_count, 2);
        // A success ends the run: client 1 counts again in the next.
        admitted(&b).success();
        admitted(&b).plain_500(Some(1));
        assert_eq!(b.snapshot().failure_count, 1);
        admitted(&b).failure();
        admitted(&b).plain_500(None);
        assert_eq!(b.snapshot().state, State::Open);
        // A probe's 500 re-opens it, whoever sent it.
        tokio::time::advance(Duration::from_secs(61)).await;
        admitted(&b).plain_500(Some(1));
        assert_eq!(b.snapshot().state, State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_consecutive_failures_and_probes_once() {
        let b = Breaker::new("gemini", 3, Duration::from_secs(60));
        // A success in between resets the run of failures.
        admitted(&b).failure();
        admitted(&b).failure();
        admitted(&b).success();
        assert_eq!(b.snapshot().failure_count, 0);
        for _ in 0..3 {
            admitted(&b).failure();
        }
        let s = b.snapshot();
        assert_eq!(s.state, State::Open);
        assert_eq!(s.failure_count, 3);
        assert_eq!(s.time_until_retry, 60);
        assert!(s.last_failure_time.is_some());
        assert!(b.is_open());
        assert_eq!(rejected(&b), Duration::from_secs(60));

        tokio::time::advance(Duration::from_secs(45)).await;
        assert_eq!(b.snapshot().time_until_retry, 15);
        assert_eq!(rejected(&b), Duration::from_secs(15));

        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(b.snapshot().state, State::HalfOpen);
        assert!(!b.is_open());
        // Exactly one probe; concurrent callers fail fast meanwhile.
        let probe = admitted(&b);
        for _ in 0..10 {
            rejected(&b);
        }
        probe.success();
        assert_eq!(b.snapshot().state, State::Closed);
        assert_eq!(b.snapshot().failure_count, 0);
        admitted(&b).success();
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_for_a_full_period() {
        let b = Breaker::new("upstream", 1, Duration::from_secs(10));
        admitted(&b).failure();
        tokio::time::advance(Duration::from_secs(10)).await;
        admitted(&b).failure();
        assert_eq!(b.snapshot().state, State::Open);
        assert_eq!(b.snapshot().time_until_retry, 10);
        tokio::time::advance(Duration::from_secs(9)).await;
        rejected(&b);
        tokio::time::advance(Duration::from_secs(1)).await;
        admitted(&b).success();
        assert_eq!(b.snapshot().state, State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_frees_the_slot_and_counts_nothing() {
        let b = Breaker::new("upstream", 1, Duration::from_secs(1));
        admitted(&b).failure();
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(admitted(&b));
        assert_eq!(b.snapshot().state, State::HalfOpen);
        assert_eq!(b.snapshot().failure_count, 1);
        admitted(&b).success();
        assert_eq!(b.snapshot().state, State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_dropped_at_its_deadline_is_a_timeout_failure() {
        let b = Breaker::new("upstream", 2, Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(1);
        drop(admitted(&b).expires_at(deadline)); // the client left early
        assert_eq!(b.snapshot().failure_count, 0);
        let p = admitted(&b).expires_at(deadline);
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(p); // the route timeout gave up on it
        assert_eq!(b.snapshot().failure_count, 1);
        assert!(b.snapshot().last_failure_time.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn late_results_do_not_move_an_open_circuit() {
        let b = Breaker::new("upstream", 2, Duration::from_secs(5));
        let early = admitted(&b);
        admitted(&b).failure();
        admitted(&b).failure();
        early.success(); // admitted while closed, answered after it opened
        assert_eq!(b.snapshot().state, State::Open);
        assert_eq!(b.snapshot().time_until_retry, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn reset_closes_and_forgets() {
        let b = Breaker::new("embedding", 1, Duration::from_secs(60));
        admitted(&b).failure();
        b.reset();
        let s = b.snapshot();
        assert_eq!(
            (
                s.state,
                s.failure_count,
                s.last_failure_time,
                s.time_until_retry
            ),
            (State::Closed, 0, None, 0)
        );
        admitted(&b).success();
    }

    #[test]
    fn ceil_secs_rounds_up() {
        assert_eq!(ceil_secs(Duration::ZERO), 0);
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(45)), 45);
        assert_eq!(ceil_secs(Duration::from_millis(44_100)), 45);
    }
}
