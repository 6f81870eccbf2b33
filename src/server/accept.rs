//! Accepting: each worker's listener and its accept loop under the bound
//! on connections (the oldest idle ones closed first near it), the sweeps
//! of idle connections, and the drain at shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use super::conn::{Dispatch, Protocols, serve};
use super::slots::{ConnPolicy, DRAIN_BATCH, Open};

/// Registers a std listener with the current runtime.
pub(super) fn to_tokio(l: std::net::TcpListener) -> Option<TcpListener> {
    TcpListener::from_std(l)
        .map_err(|e| tracing::error!("cannot register a listener: {e}"))
        .ok()
}

/// One worker's life: accept until told to stop, then drain its connections
/// for up to `grace`.
pub(super) async fn worker(
    listener: std::net::TcpListener,
    svc: Dispatch,
    builder: Arc<Protocols>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    policy: ConnPolicy,
) {
    let Some(listener) = to_tokio(listener) else {
        return;
    };
    let stop_signal = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let tracker = TaskTracker::new();
    accept_loop(listener, svc, &builder, stop_signal, &tracker, &policy).await;
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(grace = ?grace, "shutdown grace expired; closing the remaining connections");
    }
}

/// Accepts and serves connections until `stop` resolves (the admin port).
pub(super) async fn accept_until(
    listener: TcpListener,
    svc: Dispatch,
    builder: Arc<Protocols>,
    stop: impl Future<Output = ()>,
    policy: ConnPolicy,
) {
    let tracker = TaskTracker::new();
    accept_loop(listener, svc, &builder, stop, &tracker, &policy).await;
}

/// Accepts until `stop`, then asks every connection it opened to finish
/// what it is answering and close (the caller waits on `tracker`).
async fn accept_loop(
    listener: TcpListener,
    svc: Dispatch,
    builder: &Arc<Protocols>,
    stop: impl Future<Output = ()>,
    tracker: &TaskTracker,
    policy: &ConnPolicy,
) {
    tokio::pin!(stop);
    let mut open = Open::default();
    // The sweeps of this worker's connections: clients that leave their
    // answer unread (`send_timeout`), idle h2c connections
    // (`header_read_timeout`). Each connection is looked at once a period,
    // so it goes 1× to 2× the bound after it stopped.
    let mut writes = sweep_every(policy.send_timeout);
    let mut idle_h2 = sweep_every(policy.head_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut stop => break,
            _ = writes.tick() => {
                open.sweep_writes();
                continue;
            }
            _ = idle_h2.tick() => {
                open.sweep_idle_h2();
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match &policy.slots {
            Some(slots) => {
                let slot = slots.take();
                if slots.running_low() {
                    // Idle keep-alive connections make room first.
                    let asked = open.close_idle(DRAIN_BATCH);
                    tracing::debug!(
                        asked,
                        "free connections low: idle keep-alive connections asked to close"
                    );
                }
                match slot {
                    Some(slot) => Some(slot),
                    None => {
                        // At max_connections: closed at once.
                        tracing::debug!(client = %peer, "connection refused: max_connections reached");
                        drop(stream);
                        continue;
                    }
                }
            }
            None => None,
        };
        let handle = open.add();
        tracker.spawn(serve(
            stream,
            peer,
            svc.clone(),
            builder.clone(),
            handle,
            policy.clone(),
            slot,
        ));
    }
    open.close_all();
}

/// A sweep's clock: every `period`, from `period` on.
fn sweep_every(period: Duration) -> tokio::time::Interval {
    let period = period.max(Duration::from_millis(1));
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}
