//! The proxy stack a connection calls: each worker's current one in a
//! [`StackCell`] that a reload replaces, and each connection's own copy of
//! it ([`OwnStack`]), called in place and refreshed when the cell's version
//! moves. A request in flight keeps the stack it started with (its future
//! owns what it needs); the next request on any connection takes the new
//! one; no connection is touched.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Either;
use tower::ServiceExt;

use crate::body::Body;
use crate::layers::ProxyStack;

/// A worker's stack in force, and its version.
#[derive(Debug)]
pub struct StackCell {
    /// Bumped after every replacement; a connection compares it with its
    /// copy's (one atomic load a request).
    version: AtomicU64,
    /// Behind a lock, not an `ArcSwap`: the stack is `Send` but not `Sync`
    /// (tower's boxed service). Taken to copy it when a connection starts
    /// and after a reload, never on a request otherwise.
    #[allow(
        clippy::disallowed_types,
        reason = "held to clone or replace the stack, never across an await"
    )]
    stack: std::sync::Mutex<ProxyStack>,
}

impl StackCell {
    #[allow(
        clippy::disallowed_types,
        clippy::disallowed_methods,
        reason = "see the field: held to clone or replace, never across an await"
    )]
    pub fn new(stack: ProxyStack) -> Self {
        Self {
            version: AtomicU64::new(0),
            stack: std::sync::Mutex::new(stack),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProxyStack> {
        self.stack
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stack for every request from now on.
    pub fn replace(&self, stack: ProxyStack) {
        *self.lock() = stack;
        self.version.fetch_add(1, Ordering::Release);
    }

    fn current(&self) -> (u64, ProxyStack) {
        // The version first: a stack newer than it is only refreshed again.
        let v = self.version.load(Ordering::Acquire);
        (v, self.lock().clone())
    }
}

/// A connection's own copy of the stack, called in place: every layer is
/// ready at once (each passes its inner service's readiness down to the
/// proxy, which is always ready), so a request needs neither a clone of
/// the whole stack (an allocation and a reference count per layer) nor
/// `oneshot`. Only the connection's task calls it, one request at a time.
#[derive(Debug)]
pub(super) struct OwnStack {
    cell: Arc<StackCell>,
    mine: std::cell::RefCell<(u64, ProxyStack)>,
}

impl Clone for OwnStack {
    fn clone(&self) -> Self {
        Self::new(Arc::clone(&self.cell))
    }
}

impl OwnStack {
    pub(super) fn new(cell: Arc<StackCell>) -> Self {
        let mine = std::cell::RefCell::new(cell.current());
        Self { cell, mine }
    }

    pub(super) fn answer(&self, req: Request<Body>) -> Answer {
        let mut mine = self.mine.borrow_mut();
        if mine.0 != self.cell.version.load(Ordering::Acquire) {
            *mine = self.cell.current();
        }
        let stack = &mut mine.1;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match tower::Service::poll_ready(stack, &mut cx) {
            std::task::Poll::Ready(Ok(())) => Answer::Stack(tower::Service::call(stack, req)),
            // Not ready (no layer does this today): a copy that waits for
            // its own readiness, as before.
            _ => {
                let fut = ServiceExt::<Request<Body>>::oneshot(stack.clone(), req);
                Answer::Own(Box::pin(fut.map(|r| r.map(|resp| resp.map(Either::Right)))))
            }
        }
    }
}

/// The body of an answer: the sidecar's own, or the stack's.
pub(super) type ResponseBody =
    Either<Body, tower_http::body::UnsyncBoxBody<bytes::Bytes, crate::BoxError>>;

/// An answer on its way: the sidecar's own (its endpoints, a refusal), or
/// the stack's future, already boxed by the stack's type erasure.
pub(super) enum Answer {
    Own(Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>),
    Stack(<ProxyStack as tower::Service<Request<Body>>>::Future),
}

impl Answer {
    pub(super) fn ready(resp: Response<Body>) -> Self {
        Self::Own(Box::pin(std::future::ready(Ok(resp.map(Either::Left)))))
    }
}
