//! Accepting connections and serving them: hyper-util's auto builder (HTTP/1.1
//! and h2c on one port), the slowloris guard, per-connection dispatch to the
//! admin router or the proxy stack, and graceful shutdown.
//!
//! Shutdown, on the future passed to [`Server::run`] (SIGTERM/SIGINT in the
//! binary): `/readyz` turns 503, the proxy listener closes, in-flight requests
//! finish for up to `shutdown_grace`, then `run` returns. A separate admin
//! listener keeps answering (so probes see 503, not a refused connection)
//! until `run` returns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::admin::{Admin, AdminState, Endpoint, ready::Readiness};
use crate::body::{self, Body};
use crate::config::Config;
use crate::layers::{ProxyStack, build_stack};
use crate::proxy::{Proxy, UpstreamClient};
use crate::route::RouteTable;

/// The TCP peer of the connection a request came on, as a request extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

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

/// A bound, not yet running sidecar.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    admin: Admin,
    stack: ProxyStack,
    builder: auto::Builder<TokioExecutor>,
    grace: Duration,
}

impl Server {
    /// Binds the listeners and builds the stack.
    pub async fn bind(cfg: Config) -> Result<Self, ServerError> {
        Self::bind_with(cfg, Vec::new()).await
    }

    /// Like [`Self::bind`], serving extra admin endpoints besides the built-in ones.
    pub async fn bind_with(cfg: Config, extra: Vec<Endpoint>) -> Result<Self, ServerError> {
        let listener = bind(cfg.listen).await?;
        let admin_listener = match cfg.admin_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let cfg = Arc::new(cfg);
        let client = UpstreamClient::new(&cfg);
        let state = Arc::new(AdminState {
            readiness: Readiness::new(client.clone(), &cfg.readiness_path),
            config: Arc::clone(&cfg),
            started: Instant::now(),
        });
        let mut endpoints = crate::admin::builtin_endpoints();
        endpoints.extend(extra);
        let admin = Admin::with_endpoints(state, endpoints);
        let stack = build_stack(&cfg, RouteTable::new(&cfg), Proxy::new(client, &cfg));

        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Without a timer the header-read timeout is silently off.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .keep_alive(true);
        builder.http2().timer(TokioTimer::new());
        Ok(Self {
            listener,
            admin_listener,
            admin,
            stack,
            builder,
            grace: cfg.shutdown_grace,
        })
    }

    /// Where the proxy listens (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
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
            listener,
            admin_listener,
            admin,
            stack,
            builder,
            grace,
        } = self;
        let graceful = GracefulShutdown::new();
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = admin_listener.map(|l| {
            let svc = Dispatch::new(Some(admin.clone()), None);
            tokio::spawn(accept_until(
                l,
                svc,
                builder.clone(),
                async {
                    let _ = admin_stopped.await;
                },
                None,
            ))
        });
        let proxy_svc = Dispatch::new(admin_task.is_none().then(|| admin.clone()), Some(stack));
        accept_until(listener, proxy_svc, builder, shutdown, Some(&graceful)).await;

        admin.state().readiness.begin_drain();
        let n = graceful.count();
        tracing::info!(connections = n, grace = ?grace, "shutting down: listener closed, draining in-flight requests");
        match tokio::time::timeout(grace, graceful.shutdown()).await {
            Ok(()) => tracing::info!("drained; exiting"),
            Err(_) => {
                tracing::warn!(grace = ?grace, "shutdown grace expired; closing the remaining connections")
            }
        }
        let _ = admin_stop.send(());
        if let Some(t) = admin_task {
            let _ = t.await;
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Accepts and serves connections until `stop` resolves. Connections are
/// watched by `graceful` when given (the proxy port), so they can drain.
async fn accept_until(
    listener: TcpListener,
    svc: Dispatch,
    builder: auto::Builder<TokioExecutor>,
    stop: impl Future<Output = ()>,
    graceful: Option<&GracefulShutdown>,
) {
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut stop => break,
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
        serve(stream, peer, svc.clone(), &builder, graceful);
    }
}

fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    svc: Dispatch,
    builder: &auto::Builder<TokioExecutor>,
    graceful: Option<&GracefulShutdown>,
) {
    let _ = stream.set_nodelay(true);
    let conn = builder
        .serve_connection(TokioIo::new(stream), ConnService { svc, peer })
        .into_owned();
    let on_err = move |e: Box<dyn std::error::Error + Send + Sync>| {
        tracing::debug!(client = %peer, "connection ended with an error: {e}");
    };
    match graceful {
        Some(g) => {
            let fut = g.watch(conn);
            tokio::spawn(async move { fut.await.unwrap_or_else(on_err) });
        }
        None => {
            tokio::spawn(async move { conn.await.unwrap_or_else(on_err) });
        }
    }
}

/// Sends each request to the admin router or the proxy stack.
#[derive(Debug, Clone)]
struct Dispatch {
    admin: Option<Admin>,
    stack: Option<ProxyStack>,
}

impl Dispatch {
    fn new(admin: Option<Admin>, stack: Option<ProxyStack>) -> Self {
        Self { admin, stack }
    }
}

/// [`Dispatch`] for one connection, knowing its peer.
#[derive(Debug, Clone)]
struct ConnService {
    svc: Dispatch,
    peer: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let Dispatch { admin, stack } = &self.svc;
        if let Some(admin) = admin {
            if stack.is_none() || admin.handles(req.uri().path()) {
                let fut = admin.call(req, self.peer);
                return Box::pin(async move { Ok(fut.await.map(Either::Left)) });
            }
        }
        match stack {
            Some(stack) => {
                req.extensions_mut().insert(ClientAddr(self.peer));
                let req: Request<Body> = req.map(body::boxed);
                let fut = ServiceExt::<Request<Body>>::oneshot(stack.clone(), req);
                // A combinator, not an async block: rustc cannot prove the
                // boxed-error lifetimes of an async block over `Oneshot` general.
                Box::pin(fut.map(|r| r.map(|resp| resp.map(Either::Right))))
            }
            // Unreachable by construction: a Dispatch has an admin or a stack.
            None => Box::pin(std::future::ready(Ok(Response::new(Either::Left(
                body::empty(),
            ))))),
        }
    }
}
