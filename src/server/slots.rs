//! What every accepted connection is held to: the head timeout, the pause
//! allowed between reads of a body, and the bound on open connections
//! (`max_connections`, over every worker).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

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
    pub(super) open: AtomicUsize,
    pub(super) max: usize,
}

/// One open connection's slot, given back when the connection ends.
#[derive(Debug)]
pub(super) struct Slot(Arc<ConnSlots>);

impl ConnSlots {
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
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}
