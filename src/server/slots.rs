//! What every accepted connection is held to: the head timeout, the pause
//! allowed between reads of a body, and the bound on open connections
//! (`max_connections`, over every worker), with idle keep-alive connections
//! closed first as it nears.
//!
//! Each worker keeps its own connections in an [`Open`] list (touched only
//! by its accept loop, so without a lock); a connection's task marks itself
//! busy for as long as a request of it is being answered ([`Busy`], given
//! back when the answer's body is done); a connection that has not yet
//! sent its first request is not idle. When a worker takes one of the
//! last free slots, it asks up to [`DRAIN_BATCH`] of its idle connections,
//! the oldest first, to close, as nginx drains its reusable (keep-alive)
//! connections when its free connections run out; a busy connection is
//! never cut. The same list tells every connection to finish on shutdown.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

/// Idle connections asked to close at once, per worker, when free slots
/// run low (nginx drains 32 reusable connections at a time).
pub(super) const DRAIN_BATCH: usize = 32;

/// What every accepted connection is held to.
#[derive(Debug, Clone)]
pub(super) struct ConnPolicy {
    /// How long a new connection may take to start its first request.
    pub(super) head_timeout: Duration,
    /// The longest pause between two reads of a request body.
    pub(super) body_timeout: Duration,
    /// The bound on open connections (the proxy port's; `None` on the
    /// admin port, so probes are never refused).
    pub(super) slots: Option<Arc<ConnSlots>>,
}

/// Open connections against `max_connections`, over every worker.
#[derive(Debug)]
pub(super) struct ConnSlots {
    open: AtomicUsize,
    max: usize,
}

/// One open connection's slot, given back when the connection ends.
#[derive(Debug)]
pub(super) struct Slot(Arc<ConnSlots>);

impl ConnSlots {
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// A slot, or `None` at the bound: the connection is refused at once
    /// (closed before a byte is read), so 10 000 idle sockets cannot take
    /// the pod's memory.
    pub(super) fn take(self: &Arc<Self>) -> Option<Slot> {
        let open = self.open.fetch_add(1, Ordering::AcqRel);
        if open >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(Arc::clone(self)))
    }

    /// Whether free slots have run low: fewer than a sixteenth of the
    /// bound (at least one) left.
    pub(super) fn running_low(&self) -> bool {
        let reserve = (self.max / 16).max(1);
        self.open.load(Ordering::Acquire) + reserve >= self.max
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One open connection, as its worker and its requests see it.
#[derive(Debug)]
pub(super) struct ConnHandle {
    /// Requests of this connection being answered (their bodies included).
    busy: AtomicUsize,
    /// No request of it answered yet: a client that has just connected is
    /// about to send, not idle (its first request is bounded by the head
    /// timeout instead).
    fresh: AtomicBool,
    /// Asks the connection to finish what it is answering and close.
    close: Notify,
    /// Requests of it started so far.
    started: AtomicU64,
}

impl ConnHandle {
    /// Resolves when the connection is asked to close (at once if it was
    /// asked before this was awaited).
    pub(super) async fn asked_to_close(&self) {
        self.close.notified().await;
    }

    /// Marks a request of this connection in progress until the guard (or
    /// the body it is moved into) is dropped.
    pub(super) fn busy(self: &Arc<Self>) -> Busy {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(Arc::clone(self))
    }

    /// The requests started so far when none is in progress, `None` while
    /// one is: two equal readings a while apart mean the connection sat
    /// idle all that while.
    pub(super) fn idle_mark(&self) -> Option<u64> {
        (self.busy.load(Ordering::Acquire) == 0).then(|| self.started.load(Ordering::Acquire))
    }

    /// Idle between two requests of a keep-alive connection.
    fn idle(&self) -> bool {
        !self.fresh.load(Ordering::Acquire) && self.busy.load(Ordering::Acquire) == 0
    }

    fn ask_to_close(&self) {
        // A stored permit if the task is not waiting yet.
        self.close.notify_one();
    }
}

/// A request in progress on its connection.
#[derive(Debug)]
pub(super) struct Busy(Arc<ConnHandle>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fresh.store(false, Ordering::Release);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A worker's open connections, in the order they were accepted; only its
/// accept loop touches the list.
#[derive(Debug, Default)]
pub(super) struct Open {
    conns: Vec<Weak<ConnHandle>>,
}

impl Open {
    /// Registers a new connection.
    pub(super) fn add(&mut self) -> Arc<ConnHandle> {
        let live = self.conns.len();
        if live >= 64 && live.is_power_of_two() {
            // Amortised: forget ended connections as the list doubles.
            self.conns.retain(|w| w.strong_count() > 0);
        }
        let handle = Arc::new(ConnHandle {
            busy: AtomicUsize::new(0),
            fresh: AtomicBool::new(true),
            close: Notify::new(),
            started: AtomicU64::new(0),
        });
        self.conns.push(Arc::downgrade(&handle));
        handle
    }

    /// Asks up to `n` idle connections, oldest first, to close; returns how
    /// many were asked.
    pub(super) fn close_idle(&mut self, n: usize) -> usize {
        self.conns.retain(|w| w.strong_count() > 0);
        let mut asked = 0;
        for c in self.conns.iter().filter_map(Weak::upgrade) {
            if asked == n {
                break;
            }
            if c.idle() {
                c.ask_to_close();
                asked += 1;
            }
        }
        asked
    }

    /// Asks every connection to finish and close (shutdown).
    pub(super) fn close_all(&mut self) {
        for c in self.conns.drain(..).filter_map(|w| w.upgrade()) {
            c.ask_to_close();
        }
    }
}

pin_project_lite::pin_project! {
    /// An answer's body that keeps its request marked busy until it is
    /// done (written out, or dropped with its connection).
    pub(super) struct Tracked<B> {
        #[pin]
        inner: B,
        busy: Option<Busy>,
    }
}

impl<B> Tracked<B> {
    pub(super) fn new(inner: B, busy: Option<Busy>) -> Self {
        Self { inner, busy }
    }
}

impl<B> http_body::Body for Tracked<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) {
            // Done: the connection is idle as soon as this is written.
            this.busy.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn asked(c: &ConnHandle) -> bool {
        c.asked_to_close().now_or_never().is_some()
    }

    #[test]
    fn idle_connections_are_asked_to_close_oldest_first_and_busy_ones_never() {
        let mut open = Open::default();
        let a = open.add();
        let b = open.add();
        let c = open.add();
        let d = open.add();
        let e = open.add();
        for served in [&a, &b, &c, &d] {
            drop(served.busy()); // one request answered: keep-alive idle
        }
        let _busy = b.busy();
        drop(c); // ended
        // `e` has not sent its first request yet: not idle, never asked.
        assert_eq!(open.close_idle(1), 1);
        // `a`, the oldest idle one, holds the permit; `d` does not.
        assert!(asked(&a));
        assert!(!asked(&d));
        assert!(!asked(&b));
        assert_eq!(
            open.close_idle(DRAIN_BATCH),
            2,
            "a and d; b is busy, e fresh"
        );
        assert!(!asked(&b));
        assert!(!asked(&e));
        open.close_all();
        assert!(asked(&b));
        assert!(asked(&e));
    }

    #[test]
    fn free_slots_run_low_in_the_last_sixteenth() {
        let slots = ConnSlots::new(32);
        let held: Vec<Slot> = (0..29).filter_map(|_| slots.take()).collect();
        assert!(!slots.running_low());
        let more: Vec<Slot> = (0..1).filter_map(|_| slots.take()).collect();
        assert!(slots.running_low(), "30 of 32 open: 2 left, the reserve");
        let rest: Vec<Slot> = (0..5).filter_map(|_| slots.take()).collect();
        assert_eq!(rest.len(), 2, "refused beyond the bound");
        drop((held, more, rest));
        assert!(!slots.running_low());
    }
}
