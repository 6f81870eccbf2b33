//! Accepting connections and serving them: hyper's HTTP/1.1 and h2c
//! connections on one port (told apart by their first bytes), the slowloris
//! guard, the bound on connections, per-connection dispatch to the admin
//! router or the proxy stack, and graceful shutdown. It builds
//! nothing: the composition root ([`crate::app`]) hands it the listeners,
//! one stack per worker and the admin router.
//!
//! Thread per core, as nginx's workers: `threads` workers, each a
//! current-thread tokio runtime with its own `SO_REUSEPORT` listener on the
//! proxy address and its own upstream connection pool, so a request is read,
//! forwarded and answered on one thread with no cross-thread wake-ups. This
//! measured ~10 % less CPU per request than tokio's work-stealing runtime on
//! the same hardware, and a lower p99 (docs/dependencies.md, "Thread per
//! core"). State that must be global (the in-flight cap, the admin state,
//! the caches and limiters) is shared behind `Arc`. Worker 0 runs on the
//! caller's runtime.
//!
//! Shutdown, on the future passed to [`Server::run`] (SIGTERM/SIGINT in the
//! binary): `/readyz` turns 503, every worker closes its listener, in-flight
//! requests finish for up to `shutdown_grace`, then `run` returns. A separate
//! admin listener keeps answering (so probes see 503, not a refused
//! connection) until `run` returns.
//!
//! Here: binding and the workers' lives. [`accept`] holds the accept loop
//! and its sweeps, [`conn`] one connection and the dispatch of its
//! requests, [`stack`] the stack a reload replaces, [`slots`] the bound on
//! connections, [`edge`] the checks of a request's head before any layer.

mod accept;
mod conn;
mod edge;
mod slots;
mod stack;

pub use self::stack::StackCell;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::watch;

use crate::admin::Admin;
use crate::config::Config;
use crate::layers::ProxyStack;

use self::accept::{accept_until, to_tokio, worker};
use self::conn::{Dispatch, Protocols};
use self::slots::{ConnPolicy, ConnSlots};
use self::stack::OwnStack;

/// The largest request head (request line and headers) accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The bound, not yet serving sockets.
#[derive(Debug)]
pub struct Listeners {
    proxy: Vec<std::net::TcpListener>,
    addr: SocketAddr,
    admin: Option<std::net::TcpListener>,
}

impl Listeners {
    /// How many proxy listeners (one per worker) there are.
    pub fn workers(&self) -> usize {
        self.proxy.len()
    }
}

/// One worker: a listener on the shared address and its own stack (and so
/// its own upstream pool).
#[derive(Debug)]
struct Worker {
    listener: std::net::TcpListener,
    /// The stack in force; a reload replaces it.
    stack: Arc<StackCell>,
}

/// A bound, not yet running server.
#[derive(Debug)]
pub struct Server {
    workers: Vec<Worker>,
    addr: SocketAddr,
    admin_listener: Option<std::net::TcpListener>,
    admin: Admin,
    builder: Arc<Protocols>,
    grace: Duration,
    /// How long a new connection may take to start its first request, and
    /// the bound on open proxy connections.
    policy: ConnPolicy,
}

impl Server {
    /// Binds the proxy listeners (one per worker, `SO_REUSEPORT`) and the
    /// admin listener, before anything else is built: a port in use is an
    /// error at once.
    pub fn bind(cfg: &Config) -> Result<Listeners, ServerError> {
        // SO_REUSEPORT would let us share a port another process holds:
        // probe it with a plain bind first, so "in use" is an error.
        if cfg.listen.port() != 0 {
            drop(
                std::net::TcpListener::bind(cfg.listen).map_err(|source| ServerError::Bind {
                    addr: cfg.listen,
                    source,
                })?,
            );
        }
        // The first bind picks the port when it is 0; the others share it.
        let first = bind_reuseport(cfg.listen)?;
        let addr = first.local_addr().map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let mut proxy = vec![first];
        for _ in 1..cfg.threads.max(1) {
            proxy.push(bind_reuseport(addr)?);
        }
        let admin = cfg
            .admin_listen
            .map(|addr| {
                std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(|source| ServerError::Bind { addr, source })
            })
            .transpose()?;
        Ok(Listeners { proxy, addr, admin })
    }

    /// The server over bound listeners: worker `i` serves `stacks[i]` (one
    /// per proxy listener), the admin router its endpoints.
    pub fn new(cfg: &Config, listeners: Listeners, stacks: Vec<ProxyStack>, admin: Admin) -> Self {
        let Listeners {
            proxy,
            addr,
            admin: admin_listener,
        } = listeners;
        let workers = proxy
            .into_iter()
            .zip(stacks)
            .map(|(listener, stack)| Worker {
                listener,
                stack: Arc::new(StackCell::new(stack)),
            })
            .collect();
        let mut h1 = hyper::server::conn::http1::Builder::new();
        // Without a timer the header-read timeout is silently off.
        h1.timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            // A request head larger than this is refused with 431 (hyper
            // would otherwise buffer up to 400 KiB of headers). The buffer
            // bound alone is soft (a read may fill the buffer past it and
            // complete the head), the head's own bound is exact.
            .max_header_size(MAX_HEAD_BYTES)
            .max_buf_size(MAX_HEAD_BYTES)
            .keep_alive(true);
        // Idle h2c connections are pinged; a peer that stopped answering is
        // closed instead of holding its slot forever.
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        let builder = Arc::new(Protocols { h1, h2 });
        Self {
            workers,
            addr,
            admin_listener,
            admin,
            builder,
            grace: cfg.shutdown_grace,
            policy: ConnPolicy {
                head_timeout: cfg.header_read_timeout,
                body_timeout: cfg.client_body_timeout,
                body_deadline: cfg.client_body_deadline,
                send_timeout: cfg.send_timeout,
                slots: Some(ConnSlots::new(cfg.max_connections)),
            },
        }
    }

    /// What a reload replaces: each worker's stack, and the admin router
    /// (whose state every copy shares).
    pub fn reloadable(&self) -> (Vec<Arc<StackCell>>, Admin) {
        (
            self.workers.iter().map(|w| Arc::clone(&w.stack)).collect(),
            self.admin.clone(),
        )
    }

    /// Where the proxy listens (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }

    /// Where the admin endpoints listen, when on their own port.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains (see the module doc).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            workers,
            admin_listener,
            admin,
            builder,
            grace,
            policy,
            ..
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = admin_listener.and_then(|l| {
            let l = to_tokio(l)?;
            let svc = Dispatch::Admin(admin.clone());
            let stop = async {
                let _ = admin_stopped.await;
            };
            let admin_policy = ConnPolicy {
                slots: None,
                ..policy.clone()
            };
            Some(tokio::spawn(accept_until(
                l,
                svc,
                Arc::new(Protocols::clone(&builder)),
                stop,
                admin_policy,
            )))
        });
        // The proxy port's dispatch: with the admin endpoints, or refusing them.
        let moved = admin_task.is_some();
        let dispatch = |stack| match moved {
            true => Dispatch::Proxy {
                moved: admin.clone(),
                stack: OwnStack::new(stack),
            },
            false => Dispatch::Both {
                admin: admin.clone(),
                stack: OwnStack::new(stack),
            },
        };

        let mut workers = workers.into_iter();
        let Some(first) = workers.next() else {
            return;
        };
        let mut done = Vec::new();
        for (i, w) in workers.enumerate() {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            // Each worker its own copy: its connections' pointer to it is
            // counted on this core only.
            let builder = Arc::new(Protocols::clone(&builder));
            let (svc, stop) = (dispatch(w.stack), stop_rx.clone());
            let policy = policy.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("rag-sidecar-w{}", i + 1))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => {
                            rt.block_on(worker(w.listener, svc, builder, stop, grace, policy))
                        }
                        Err(e) => tracing::error!("worker runtime: {e}"),
                    }
                    let _ = tx.send(());
                });
            match spawned {
                Ok(_) => done.push(rx),
                Err(e) => tracing::error!("cannot start a worker thread: {e}"),
            }
        }
        let svc = dispatch(first.stack);
        let own = worker(first.listener, svc, builder, stop_rx, grace, policy);
        let signal = async {
            shutdown.await;
            admin.state().readiness.begin_drain();
            tracing::info!(grace = ?grace, "shutting down: listeners closed, draining in-flight requests");
            let _ = stop_tx.send(true);
        };
        tokio::join!(own, signal);
        for rx in done {
            let _ = rx.await;
        }
        tracing::info!("drained; exiting");
        let _ = admin_stop.send(());
        if let Some(t) = admin_task {
            let _ = t.await;
        }
    }
}

fn bind_reuseport(addr: SocketAddr) -> Result<std::net::TcpListener, ServerError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| ServerError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    #[cfg(unix)]
    socket.set_reuse_port(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(4096).map_err(err)?;
    Ok(socket.into())
}
