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

mod edge;
mod slots;
mod stack;

pub use self::stack::StackCell;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::BoxError;
use crate::admin::Admin;
use crate::body::{self, Body};
use crate::config::Config;
use crate::error::{ClientBodyError, ClientBodyStalled};
use crate::extensions::ClientAddr;
use crate::layers::ProxyStack;
use crate::proxy::{drop_unfit_request_id, strip_hop_by_hop};

use self::edge::{Proto, drop_underscored, normalised, refused, request_started};
use self::slots::{ConnHandle, ConnPolicy, ConnSlots, DRAIN_BATCH, Open, Slot, Tracked, Watched};
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

type ResponseBody = Either<Body, tower_http::body::UnsyncBoxBody<bytes::Bytes, crate::BoxError>>;

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

/// Registers a std listener with the current runtime.
fn to_tokio(l: std::net::TcpListener) -> Option<TcpListener> {
    TcpListener::from_std(l)
        .map_err(|e| tracing::error!("cannot register a listener: {e}"))
        .ok()
}

/// One worker's life: accept until told to stop, then drain its connections
/// for up to `grace`.
async fn worker(
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
async fn accept_until(
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

/// One connection's life: its first request must start in time; asked to
/// close (near the bound, or at shutdown), it finishes what it is answering
/// and closes.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    svc: Dispatch,
    builder: Arc<Protocols>,
    handle: Arc<ConnHandle>,
    policy: ConnPolicy,
    slot: Option<Slot>,
) {
    let _ = stream.set_nodelay(true);
    let proto = tokio::select! {
        proto = request_started(&stream, policy.head_timeout) => proto,
        () = handle.asked_to_close() => None,
    };
    let Some(proto) = proto else {
        return; // dropped: the connection closes
    };
    let svc = ConnService {
        svc,
        peer,
        body_timeout: policy.body_timeout,
        body_deadline: policy.body_deadline,
        handle: Arc::clone(&handle),
    };
    let io = TokioIo::new(Watched::new(stream, Arc::clone(&handle)));
    let result = match proto {
        // hyper's header-read timeout also bounds the idle time between
        // two requests of an HTTP/1.1 connection.
        Proto::Http1 => drive(builder.h1.serve_connection(io, svc), &handle).await,
        // hyper's h2 server has none: the worker's sweep closes an idle
        // h2c connection instead, or a client that opens no stream would
        // hold its slot for good.
        Proto::H2c => {
            handle.mark_h2();
            drive(builder.h2.serve_connection(io, svc), &handle).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %peer, "connection ended with an error: {e}");
    }
    drop(slot);
}

/// Serves a connection to its end. Asked to close, it finishes what it is
/// answering first (HTTP/1.1: the request in progress; h2: a GOAWAY, then
/// the open streams); asked to cut (a client that leaves its answer
/// unread, an idle h2c client that keeps the connection after its
/// GOAWAY), it stops at once, even while it finishes.
async fn drive<C>(conn: C, handle: &ConnHandle) -> Result<(), hyper::Error>
where
    C: GracefulConnection<Error = hyper::Error>,
{
    tokio::pin!(conn);
    let mut finishing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            () = handle.asked_to_close() => {
                if handle.cut_asked() {
                    return Ok(());
                }
                if !finishing {
                    finishing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// hyper's own HTTP/1.1 and h2c connection builders, one per worker, shared
/// by its connections (each holds a pointer, not a copy). The sidecar tells
/// the two apart from the first bytes it peeks anyway (the slowloris guard), so
/// a connection holds only its own protocol's state: hyper-util's auto
/// builder holds room for both in every connection, and re-reads the bytes
/// it sniffed through a rewinding wrapper on every read (measured in
/// docs/proxy.md, "Memory per idle connection").
#[derive(Debug, Clone)]
struct Protocols {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

/// Where a connection's requests go.
#[derive(Debug, Clone)]
enum Dispatch {
    /// The admin port (`admin_listen`): the sidecar's endpoints only.
    Admin(Admin),
    /// The proxy port with the sidecar's endpoints on it (the default): the
    /// admin router's paths go to it, the rest to the stack.
    Both { admin: Admin, stack: OwnStack },
    /// The proxy port when `admin_listen` moved the endpoints away: their
    /// paths are refused (404), never proxied.
    Proxy { moved: Admin, stack: OwnStack },
}

/// [`Dispatch`] for one connection, knowing its peer.
#[derive(Debug, Clone)]
struct ConnService {
    svc: Dispatch,
    peer: SocketAddr,
    /// The longest pause between two reads of a request body.
    body_timeout: Duration,
    /// The longest a whole request body may take.
    body_deadline: Duration,
    /// The connection's handle: each request marks it busy until its
    /// answer is written.
    handle: Arc<ConnHandle>,
}

impl ConnService {
    fn admin(&self, admin: &Admin, req: Request<Incoming>) -> Answer {
        let fut = admin.call(self.guarded(req), self.peer);
        Answer::Own(Box::pin(async move { Ok(fut.await.map(Either::Left)) }))
    }
}

/// An answer on its way: the sidecar's own (its endpoints, a refusal), or
/// the stack's future, already boxed by the stack's type erasure.
pub(super) enum Answer {
    Own(Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, Infallible>> + Send>>),
    Stack(<ProxyStack as tower::Service<Request<Body>>>::Future),
}

impl Answer {
    fn ready(resp: Response<Body>) -> Self {
        Self::Own(Box::pin(std::future::ready(Ok(resp.map(Either::Left)))))
    }
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Tracked<ResponseBody>>;
    type Error = Infallible;
    type Future = Busying;

    fn call(&self, req: Request<Incoming>) -> Busying {
        // Busy from the head's arrival until the answer's body is written.
        Busying {
            busy: Some(self.handle.busy()),
            answer: self.answer(req),
        }
    }
}

/// The answer's future, holding its request's [`slots::Busy`] mark until
/// the answer exists, then moving it into the body.
struct Busying {
    busy: Option<slots::Busy>,
    answer: Answer,
}

impl Future for Busying {
    type Output = Result<Response<Tracked<ResponseBody>>, Infallible>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let resp = match &mut self.answer {
            Answer::Own(f) => std::task::ready!(f.as_mut().poll(cx)),
            Answer::Stack(f) => {
                std::task::ready!(f.as_mut().poll(cx)).map(|r| r.map(Either::Right))
            }
        };
        let busy = self.busy.take();
        std::task::Poll::Ready(resp.map(|r| r.map(|b| Tracked::new(b, busy))))
    }
}

impl ConnService {
    fn answer(&self, mut req: Request<Incoming>) -> Answer {
        let normalised = normalised(&mut req);
        if let Some(why) = normalised.err().or_else(|| refused(&req)) {
            tracing::debug!(client = %self.peer, "request refused: {why}");
            let resp = body::json(
                http::StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "Bad request", "message": why}),
            );
            return Answer::ready(resp);
        }
        let stack = match &self.svc {
            Dispatch::Admin(admin) => return self.admin(admin, req),
            Dispatch::Both { admin, stack } => {
                if admin.handles(req.uri().path()) {
                    return self.admin(admin, req);
                }
                stack
            }
            Dispatch::Proxy { moved, stack } => {
                if moved.handles(req.uri().path()) {
                    let resp = body::json(
                        http::StatusCode::NOT_FOUND,
                        &serde_json::json!({"error": "Not found", "message": "the sidecar's endpoints are served on admin_listen"}),
                    );
                    return Answer::ready(resp);
                }
                stack
            }
        };
        // Hop-by-hop headers (and those `Connection` names) are gone
        // before any layer reads the request: the cache must not key
        // on a header the app will never see.
        strip_hop_by_hop(req.headers_mut());
        drop_underscored(req.headers_mut());
        drop_unfit_request_id(req.headers_mut());
        req.extensions_mut().insert(ClientAddr(self.peer));
        stack.answer(self.guarded(req))
    }

    /// The request with its body typed and guarded: errors reading the
    /// client's body are typed as the client's, so no layer mistakes them
    /// for the upstream's, and a body that stalls longer than
    /// `client_body_timeout` between two reads, or is not complete within
    /// `client_body_deadline`, is cut (408): a slow client must hold
    /// neither an app worker, nor the spool, nor, on the sidecar's own
    /// endpoints, its connection.
    fn guarded(&self, req: Request<Incoming>) -> Request<Body> {
        let (pause, whole) = (self.body_timeout, self.body_deadline);
        req.map(|b| {
            let typed = http_body_util::BodyExt::map_err(b, ClientBodyError);
            body::boxed(body::Stalling::new(
                typed,
                pause,
                whole,
                move |cut| -> BoxError {
                    Box::new(match cut {
                        body::Cut::Stalled => ClientBodyStalled::Pause(pause),
                        body::Cut::Late => ClientBodyStalled::Deadline(whole),
                    })
                },
            ))
        })
    }
}
