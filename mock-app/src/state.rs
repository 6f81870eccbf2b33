//! What requests share: the counters behind `/__mock/stats`, the document
//! store, the armed global fault, the named SSE gates, and the guards that
//! keep the in-flight and upload counters right when a request is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hyper::StatusCode;
use tokio::sync::Notify;

use crate::Cli;

/// Distinct paths tracked individually in `by_path`; the rest go to `<other>`.
const MAX_TRACKED_PATHS: usize = 1024;

/// A global fault armed through `POST /__mock/faults`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GlobalFault {
    pub(crate) status: Option<StatusCode>,
    pub(crate) delay_ms: u64,
    /// Requests still to be faulted; `None` means until cleared.
    pub(crate) remaining: Option<u64>,
}

/// A fault applied to one request.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Fault {
    pub(crate) status: Option<StatusCode>,
    pub(crate) delay_ms: u64,
}

/// A document of the in-memory store.
pub(crate) struct Document {
    pub(crate) name: String,
    pub(crate) chunks: u64,
}

/// State of one named SSE gate.
#[derive(Default)]
struct Gate {
    notify: Arc<Notify>,
    /// Streams currently waiting on the gate.
    waiting: usize,
    /// Bumped each time the gate releases its waiters.
    generation: u64,
    /// An open that arrived while nobody was waiting; released by the next wait.
    pending_open: bool,
}

/// Everything the requests of one mock share.
pub(crate) struct State {
    pub(crate) search_latency: Duration,
    pub(crate) rag_latency: Duration,
    pub(crate) requests: AtomicU64,
    pub(crate) in_flight: AtomicI64,
    pub(crate) upload_bytes_in_progress: AtomicU64,
    pub(crate) upload_bytes_total: AtomicU64,
    pub(crate) by_path: Mutex<HashMap<String, u64>>,
    pub(crate) documents: Mutex<Vec<Document>>,
    /// Bumped by every upload and deletion: search and RAG answers carry
    /// it, so a test can tell an answer from before a corpus change.
    pub(crate) corpus_version: AtomicU64,
    /// Gemini's quota on RAG calls: `(calls allowed, window)`, a sliding
    /// window (at most that many calls in any window's span); the times of
    /// the calls in it; calls refused over it.
    pub(crate) quota: Option<(u64, Duration)>,
    pub(crate) quota_window: Mutex<std::collections::VecDeque<std::time::Instant>>,
    pub(crate) quota_errors: AtomicU64,
    /// The RAG questions in the order they arrived (the last 1000).
    pub(crate) rag_queries: Mutex<std::collections::VecDeque<String>>,
    /// Bytes of `/__mock/blob` and `/__mock/sse` bodies handed to the
    /// server so far: it stops growing when the reader (the proxy) stops
    /// reading.
    pub(crate) bytes_sent: AtomicU64,
    faults_armed: AtomicBool,
    pub(crate) fault: Mutex<Option<GlobalFault>>,
    gates: Mutex<HashMap<String, Gate>>,
}

/// Locks a std mutex, ignoring poisoning (the data stays usable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    pub(crate) fn new(cli: &Cli) -> Self {
        let documents = (1..=3)
            .map(|i| Document {
                name: format!("doc-{i}.pdf"),
                chunks: 12,
            })
            .collect();
        State {
            search_latency: Duration::from_millis(cli.search_latency_ms),
            rag_latency: Duration::from_millis(cli.rag_latency_ms),
            requests: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            upload_bytes_in_progress: AtomicU64::new(0),
            upload_bytes_total: AtomicU64::new(0),
            by_path: Mutex::new(HashMap::new()),
            documents: Mutex::new(documents),
            corpus_version: AtomicU64::new(0),
            quota: (cli.quota > 0)
                .then(|| (cli.quota, Duration::from_millis(cli.quota_window_ms.max(1)))),
            quota_window: Mutex::new(std::collections::VecDeque::new()),
            quota_errors: AtomicU64::new(0),
            rag_queries: Mutex::new(std::collections::VecDeque::new()),
            bytes_sent: AtomicU64::new(0),
            faults_armed: AtomicBool::new(false),
            fault: Mutex::new(None),
            gates: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one RAG call of the quota; `false` when it is spent.
    pub(crate) fn take_quota(&self) -> bool {
        let Some((limit, window)) = self.quota else {
            return true;
        };
        let mut w = lock(&self.quota_window);
        let now = std::time::Instant::now();
        while w.front().is_some_and(|t| now.duration_since(*t) >= window) {
            w.pop_front();
        }
        if w.len() as u64 >= limit {
            // A refused call does not count against the quota.
            self.quota_errors.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        w.push_back(now);
        true
    }

    pub(crate) fn record_rag_query(&self, q: &str) {
        let mut l = lock(&self.rag_queries);
        if l.len() >= 1000 {
            l.pop_front();
        }
        l.push_back(q.to_owned());
    }

    pub(crate) fn record_path(&self, path: &str) {
        let mut map = lock(&self.by_path);
        if let Some(n) = map.get_mut(path) {
            *n += 1;
        } else if map.len() < MAX_TRACKED_PATHS {
            map.insert(path.to_owned(), 1);
        } else {
            *map.entry("<other>".to_owned()).or_insert(0) += 1;
        }
    }

    /// Takes one use of the global fault, if one is armed.
    pub(crate) fn take_global_fault(&self) -> Option<Fault> {
        if !self.faults_armed.load(Ordering::Acquire) {
            return None;
        }
        let mut slot = lock(&self.fault);
        let armed = (*slot)?;
        let fault = Fault {
            status: armed.status,
            delay_ms: armed.delay_ms,
        };
        match armed.remaining {
            None => {}
            // `set_global_fault` never stores `Some(0)`: this is the last use.
            Some(n) if n <= 1 => {
                *slot = None;
                self.faults_armed.store(false, Ordering::Release);
            }
            Some(n) => {
                *slot = Some(GlobalFault {
                    remaining: Some(n - 1),
                    ..armed
                });
            }
        }
        Some(fault)
    }

    pub(crate) fn set_global_fault(&self, fault: Option<GlobalFault>) {
        let mut slot = lock(&self.fault);
        *slot = fault.filter(|f| f.remaining != Some(0));
        self.faults_armed.store(slot.is_some(), Ordering::Release);
    }

    /// Opens gate `name`: releases every stream waiting on it, or the next one
    /// to wait if none is waiting yet.
    pub(crate) fn open_gate(&self, name: &str) {
        let mut gates = lock(&self.gates);
        let gate = gates.entry(name.to_owned()).or_default();
        if gate.waiting > 0 {
            gate.waiting = 0;
            gate.generation += 1;
            gate.notify.notify_waiters();
        } else {
            gate.pending_open = true;
        }
    }

    /// Waits until gate `name` is opened (or consumes an earlier open).
    pub(crate) async fn wait_gate(&self, name: &str) {
        let (notify, generation) = {
            let mut gates = lock(&self.gates);
            let gate = gates.entry(name.to_owned()).or_default();
            if gate.pending_open {
                gate.pending_open = false;
                return;
            }
            gate.waiting += 1;
            (gate.notify.clone(), gate.generation)
        };
        let mut guard = GateWaitGuard {
            state: self,
            name,
            generation,
            released: false,
        };
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if guard.is_released() {
                break;
            }
            notified.await;
        }
        guard.released = true;
    }
}

/// Un-registers a cancelled gate waiter so that a later open is not lost.
struct GateWaitGuard<'a> {
    state: &'a State,
    name: &'a str,
    generation: u64,
    released: bool,
}

impl GateWaitGuard<'_> {
    fn is_released(&self) -> bool {
        lock(&self.state.gates)
            .get(self.name)
            .is_none_or(|g| g.generation != self.generation)
    }
}

impl Drop for GateWaitGuard<'_> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let mut gates = lock(&self.state.gates);
        if let Some(gate) = gates.get_mut(self.name) {
            if gate.generation == self.generation && gate.waiting > 0 {
                gate.waiting -= 1;
            }
        }
    }
}

/// Keeps `in_flight` accurate even when a request future is dropped.
pub(crate) struct InFlightGuard<'a>(&'a AtomicI64);

impl<'a> InFlightGuard<'a> {
    pub(crate) fn new(counter: &'a AtomicI64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(counter)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Removes an upload's bytes from `upload_bytes_in_progress` when it ends.
pub(crate) struct UploadGuard<'a> {
    pub(crate) in_progress: &'a AtomicU64,
    pub(crate) bytes: u64,
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        self.in_progress.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}
