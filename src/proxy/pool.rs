//! The upstream connections: HTTP/1.1 to the app over
//! `hyper::client::conn::http1`, pooled per worker thread, each connection
//! driven by a task of its own on its worker.
//!
//! hyper-util's legacy `Client` (used before) boxes its send future, clones
//! its pool and connector per request, takes a mutex over SipHash maps on
//! checkout and return, and spawns a task per HTTP/1 request to give the
//! connection back. Here a worker's idle connections sit in its own slot of
//! a [`ThreadLocal`] (no lock, no hash: the sidecar's workers are one thread
//! each). A request takes the most recently used one and gives it back when
//! the answer's body has ended ([`Pooled`] carries it inside the body),
//! with no task of its own.
//!
//! The connection itself runs in its own task, spawned when it is opened,
//! as hyper-util's does. Driving it from the request's task instead (tried:
//! the request polled the connection while it waited for the answer and
//! while the body was read) saved the channel hops but re-polled the
//! client's whole stack at every upstream read and write: 7 % more
//! instructions a request and a longer tail (`bench/builds.sh`, 16 rounds
//! at `-c32`: p99 3.0 against 1.7 ms; docs/benchmarks.md, "The upstream
//! connection's own task").
//!
//! A connection taken from the pool that is not ready yet (its task has
//! not yet taken in the end of the last answer) is waited for; the wait is
//! short, and bounded by the route's deadline above.
//!
//! A connection goes back only when both halves of the exchange are over:
//! the answer's body has ended and the request's has been taken whole. An
//! app may answer before it reads the body (an early 401 or 413); while the
//! client is still sending it, the connection is busy, and a request that
//! took it from the pool would wait on the upload. Such a connection is not
//! given back: its task sends the rest, then closes it.
//!
//! An idle connection whose app closed it ends its task, which closes its
//! handle: it is skipped when next taken, and the worker's sweep drops
//! those idle for `upstream_idle_timeout` (so the sidecar, not the app,
//! ends them: gunicorn closes after 2 s). What the legacy client did is
//! kept: a 5 s connect timeout, `TCP_NODELAY`, TCP keep-alive, the `Host`
//! header and origin-form target the app expects, and a request that never
//! reached a reused connection (the app had closed it) is sent again on
//! another.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use thread_local::ThreadLocal;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::BoxError;
use crate::body::{self, Body};

/// The most one upstream connection buffers (its read buffer: an answer's
/// head and the body chunks not yet taken).
const UPSTREAM_BUF_BYTES: usize = 16 * 1024;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Why a request got no answer from the app.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to the app at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no connection to the app at {0} within 5 s")]
    ConnectTimeout(String),
    /// hyper's error: the exchange failed (the request body's own error is
    /// in its source chain).
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// One connection's handle; the connection runs in its own task, which
/// ends (closing the handle) when either side closes it.
#[derive(Debug)]
struct Conn {
    sender: http1::SendRequest<Body>,
    idle_since: Instant,
}

impl Conn {
    /// Sends `req` and waits for the answer's head. On failure, the request
    /// comes back when it never reached the socket.
    async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, (hyper::Error, Option<Request<Body>>)> {
        self.sender.try_send_request(req).await.map_err(|mut e| {
            let req = e.take_message();
            (e.into_error(), req)
        })
    }
}

/// A worker's idle connections, the most recently used last.
#[derive(Debug, Default)]
struct Idle {
    conns: VecDeque<Conn>,
    /// This worker's sweep task runs.
    sweeping: bool,
}

/// The pool of one upstream client.
#[derive(Debug)]
pub(super) struct Pool {
    idle: ThreadLocal<RefCell<Idle>>,
    /// Where to connect: `host:port`.
    addr: String,
    idle_timeout: Duration,
    max_idle: usize,
}

impl Pool {
    pub(super) fn new(addr: String, idle_timeout: Duration, max_idle: usize) -> Arc<Self> {
        Arc::new(Self {
            idle: ThreadLocal::new(),
            addr,
            idle_timeout,
            max_idle,
        })
    }

    fn slot(&self) -> &RefCell<Idle> {
        self.idle.get_or_default()
    }

    /// Idle for the timeout or longer: never used again.
    fn expired(&self, c: &Conn, now: Instant) -> bool {
        now.duration_since(c.idle_since) >= self.idle_timeout
    }

    /// Sends `req` on a pooled connection or a new one; the answer's body
    /// drives the connection and returns it to the pool when it has ended.
    pub(super) async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<Pooled>, SendError> {
        // A body to send: its end is watched (a bodiless request is sent
        // whole with its head).
        let sent = (!http_body::Body::is_end_stream(req.body())).then(|| {
            let sent = Arc::new(AtomicBool::new(false));
            let b = std::mem::replace(req.body_mut(), body::empty());
            *req.body_mut() = body::boxed(Sending {
                body: b,
                sent: Arc::clone(&sent),
            });
            sent
        });
        loop {
            let (mut conn, reused) = match self.checkout().await {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            match conn.send(req).await {
                Ok(resp) => {
                    let pool = Arc::clone(self);
                    return Ok(resp.map(|body| Pooled {
                        body,
                        conn: Some(conn),
                        pool,
                        sent,
                        ended: false,
                    }));
                }
                // The app had closed a pooled connection before the request
                // reached it: nothing was sent, so send it again.
                Err((_, Some(again))) if reused => req = again,
                Err((e, _)) => return Err(SendError::Http(e)),
            }
        }
    }

    /// The most recently used idle connection that is still open, once it
    /// is ready for a request (at once, or as soon as its task has taken in
    /// the end of the last answer).
    async fn checkout(&self) -> Option<Conn> {
        loop {
            let mut c = self.slot().borrow_mut().conns.pop_back()?;
            if self.expired(&c, Instant::now()) || c.sender.is_closed() {
                continue; // dropped: closed
            }
            if c.sender.ready().await.is_ok() {
                return Some(c);
            }
        }
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let stream =
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr.as_str()))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => {
                    return Err(SendError::Connect {
                        addr: self.addr.clone(),
                        source,
                    });
                }
                Err(_) => return Err(SendError::ConnectTimeout(self.addr.clone())),
            };
        // Best effort, as hyper-util's connector: a socket without them
        // still works.
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
        // hyper reads an answer into a buffer that grows to 400 KiB by
        // default; an answer streamed to a client that does not read holds
        // that buffer for as long as the client lets it (800 such clients:
        // 320 MB). 64 KiB bounds it, as the proxy port's own buffers, and
        // still holds any answer head an app sends.
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(UPSTREAM_BUF_BYTES)
            .handshake(TokioIo::new(stream))
            .await?;
        // Its own task on this worker: it ends when the app closes the
        // connection or when its handle is dropped (idle, or an answer left
        // half read).
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream connection: {e}");
            }
        });
        Ok(Conn {
            sender,
            idle_since: Instant::now(),
        })
    }

    /// Puts a connection whose answer has been read back in the pool, unless
    /// it has closed (an answer with `Connection: close`, or an HTTP/1.0 one,
    /// ends it; one that closes a moment later is skipped at checkout).
    fn release(self: &Arc<Self>, mut c: Conn) {
        if c.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        c.idle_since = now;
        let slot = self.slot();
        let mut idle = slot.borrow_mut();
        // The oldest first, so that a busy worker keeps no stale ones.
        while idle.conns.front().is_some_and(|o| self.expired(o, now)) {
            idle.conns.pop_front();
        }
        if idle.conns.len() >= self.max_idle {
            return;
        }
        idle.conns.push_back(c);
        if !idle.sweeping {
            idle.sweeping = self.spawn_sweep();
        }
    }

    /// Closes this worker's connections idle for the timeout or longer,
    /// every timeout (each between 1× and 2× the timeout after its last
    /// use), for as long as the pool lives. On the sidecar's current-thread
    /// workers the sweep runs on the thread whose slot it sweeps.
    fn spawn_sweep(self: &Arc<Self>) -> bool {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let pool: Weak<Self> = Arc::downgrade(self);
        let every = self.idle_timeout.max(Duration::from_millis(1));
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let now = Instant::now();
                let mut idle = pool.slot().borrow_mut();
                idle.conns.retain(|c| !pool.expired(c, now));
            }
        });
        true
    }
}

/// A request body that records when the connection has taken it whole.
struct Sending {
    body: Body,
    sent: Arc<AtomicBool>,
}

impl http_body::Body for Sending {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || this.body.is_end_stream() {
            this.sent.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // hyper stops polling a body of known length once it has it all.
        let end = self.body.is_end_stream();
        if end {
            self.sent.store(true, Ordering::Release);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An answer's body with the connection it arrives on: a body read to its
/// end gives the connection back to the pool, if the request's body has
/// been sent whole (one dropped before its end closes it).
#[derive(Debug)]
pub struct Pooled {
    body: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    /// The request's body taken whole; `None` for a bodiless request.
    sent: Option<Arc<AtomicBool>>,
    ended: bool,
}

impl Pooled {
    fn finish(&mut self) {
        self.ended = true;
        let Some(c) = self.conn.take() else { return };
        // Still sending the request: dropped here, closed by its task
        // once the body is sent.
        if self.sent.as_ref().is_none_or(|s| s.load(Ordering::Acquire)) {
            self.pool.release(c);
        }
    }
}

impl http_body::Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.finish(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // An answer with no body (HEAD, 204, 304, length 0) is never polled.
        if !self.ended && http_body::Body::is_end_stream(&self.body) {
            self.finish();
        }
    }
}
