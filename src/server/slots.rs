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
//! never cut. The same list tells every connection to finish on shutdown,
//! and the worker sweeps it: a connection whose client has left one write
//! waiting (its socket full: it is not reading) for a whole `send_timeout`
//! is cut, and an h2c connection idle for a whole `header_read_timeout` is
//! asked to close, then cut a period later (hyper's h2 server has no idle
//! timer, and its graceful close waits for a ping the client need not
//! answer). A sweep, not a timer per connection: nothing is polled per
//! request.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
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
    /// The longest a whole request body may take (`client_body_deadline`).
    pub(super) body_deadline: Duration,
    /// The longest a write to the client may wait (`send_timeout`).
    pub(super) send_timeout: Duration,
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
    /// Non-zero while a write to the client waits for room in its socket:
    /// the number of that wait (a new one for every write that has to).
    write_wait: AtomicU64,
    /// An h2c connection (hyper's h2 server has no idle timer of its own).
    h2: AtomicBool,
    /// Asked to stop at once, not to finish what it is answering.
    cut: AtomicBool,
    /// What the worker's last sweep saw (only the sweep touches these):
    /// the write wait, the idle mark (`u64::MAX`: busy), and how many
    /// sweeps in a row found it idle.
    seen_wait: AtomicU64,
    seen_idle: AtomicU64,
    idle_sweeps: AtomicU64,
}

impl ConnHandle {
    /// Marks an h2c connection: idle, it is closed by its worker's sweep.
    pub(super) fn mark_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
    }

    /// Whether the connection was asked to stop at once (a client that
    /// leaves its answer unread, or an idle h2c client that does not take
    /// its GOAWAY), rather than to finish what it is answering.
    pub(super) fn cut_asked(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    fn ask_to_cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.close.notify_one();
    }

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

    /// The requests started so far when none is in progress, `u64::MAX`
    /// while one is: two equal readings a while apart mean the connection
    /// sat idle all that while.
    fn idle_mark(&self) -> u64 {
        if self.busy.load(Ordering::Acquire) == 0 {
            self.started.load(Ordering::Acquire)
        } else {
            u64::MAX
        }
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
            write_wait: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            seen_wait: AtomicU64::new(0),
            seen_idle: AtomicU64::new(u64::MAX),
            idle_sweeps: AtomicU64::new(0),
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

    /// Cuts the connections whose client has left the same write waiting
    /// since the last sweep (every `send_timeout`): it is not reading.
    pub(super) fn sweep_writes(&mut self) {
        self.conns.retain(|w| w.strong_count() > 0);
        for c in self.conns.iter().filter_map(Weak::upgrade) {
            let wait = c.write_wait.load(Ordering::Acquire);
            if wait != 0 && wait == c.seen_wait.swap(wait, Ordering::Relaxed) {
                tracing::debug!("client left its answer unread for send_timeout: connection cut");
                c.ask_to_cut();
            }
        }
    }

    /// h2c connections with no request in progress and none started since
    /// the last sweep (every `header_read_timeout`) are asked to close (a
    /// GOAWAY), and cut at the next sweep if still there: h2's graceful
    /// close waits for the client to answer a ping, which one need not.
    pub(super) fn sweep_idle_h2(&mut self) {
        self.conns.retain(|w| w.strong_count() > 0);
        for c in self.conns.iter().filter_map(Weak::upgrade) {
            if !c.h2.load(Ordering::Relaxed) {
                continue;
            }
            let mark = c.idle_mark();
            if mark != u64::MAX && mark == c.seen_idle.swap(mark, Ordering::Relaxed) {
                match c.idle_sweeps.fetch_add(1, Ordering::Relaxed) {
                    0 => c.ask_to_close(),
                    _ => c.ask_to_cut(),
                }
            } else {
                c.seen_idle.store(mark, Ordering::Relaxed);
                c.idle_sweeps.store(0, Ordering::Relaxed);
            }
        }
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

/// A client's socket that tells its connection's handle when a write has
/// to wait for room (the client is not reading what it was sent) and when
/// one goes through again, so that `send_timeout` can cut a client that
/// leaves its answer unread. hyper polls no body while the socket is full:
/// only the socket shows it. A write that goes through at once (nearly
/// all) costs a test of a flag.
#[derive(Debug)]
pub(super) struct Watched {
    stream: TcpStream,
    handle: Arc<ConnHandle>,
    /// The number of the last wait; the handle holds it while it lasts.
    waits: u64,
    waiting: bool,
}

impl Watched {
    pub(super) fn new(stream: TcpStream, handle: Arc<ConnHandle>) -> Self {
        Self {
            stream,
            handle,
            waits: 0,
            waiting: false,
        }
    }

    fn note<T>(&mut self, r: &Poll<T>) {
        match (r.is_pending(), self.waiting) {
            (true, false) => {
                self.waits += 1;
                self.waiting = true;
                self.handle.write_wait.store(self.waits, Ordering::Release);
            }
            (false, true) => {
                self.waiting = false;
                self.handle.write_wait.store(0, Ordering::Release);
            }
            _ => {}
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.stream).poll_write(cx, buf);
        this.note(&r);
        r
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.note(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
