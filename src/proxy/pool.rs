//! The upstream connections: HTTP/1.1 to the app over
//! `hyper::client::conn::http1`, pooled per worker thread and driven by the
//! task of the request that uses them.
//!
//! hyper-util's legacy `Client` (used before) boxes its send future, clones
//! its pool and connector per request, takes a mutex over SipHash maps on
//! checkout and return, spawns a task per HTTP/1 request to give the
//! connection back, and drives every connection from a task of its own, so
//! request, answer and body cross tasks through channels. Here a worker's
//! idle connections sit in its own slot of a [`ThreadLocal`] (no lock, no
//! hash: the sidecar's workers are one thread each). A request takes the
//! most recently used one, polls it itself while it waits for the answer
//! and while the answer's body is read ([`Driven`] carries the connection
//! inside the body), and puts it back when the body has ended: the upstream
//! hop runs in the task of the client's connection.
//!
//! An idle connection has no task: one the app closed is found closed when
//! it is next taken (its poll reads the end of the stream) or dropped by the
//! worker's sweep, which closes connections idle for `upstream_idle_timeout`
//! (so the sidecar, not the app, ends them: gunicorn closes after 2 s). What
//! the legacy client did is kept: a 5 s connect timeout, `TCP_NODELAY`, TCP
//! keep-alive, the `Host` header and origin-form target the app expects,
//! and a request that never reached a reused connection (the app had closed
//! it) is sent again on another.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
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

use crate::body::Body;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

type Connection = http1::Connection<TokioIo<TcpStream>, Body>;

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

/// One connection: the handle requests go in by and the state machine that
/// reads and writes the socket, polled by whoever holds the connection.
#[derive(Debug)]
struct Conn {
    sender: http1::SendRequest<Body>,
    /// `None` once it has ended: dropping it hands a request it never
    /// wrote back to its sender.
    conn: Option<Pin<Box<Connection>>>,
    idle_since: Instant,
}

impl Conn {
    /// Polls the connection once: `true` when it has ended (closed by
    /// either side, or failed).
    fn poll_ended(&mut self, cx: &mut Context<'_>) -> bool {
        let open = self
            .conn
            .as_mut()
            .is_some_and(|c| c.as_mut().poll(cx).is_pending());
        if !open {
            self.conn = None;
        }
        !open
    }

    /// Sends `req` and waits for the answer's head, driving the connection.
    /// On failure, the request comes back when it never reached the socket.
    async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, (hyper::Error, Option<Request<Body>>)> {
        let mut answer = pin!(self.sender.try_send_request(req));
        let mut ended = false;
        poll_fn(|cx| {
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if !ended {
                // A connection that ends before the answer makes the answer
                // an error (its request returned when it was never written).
                ended = self.poll_ended(cx);
            }
            answer.as_mut().poll(cx)
        })
        .await
        .map_err(|mut e| {
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
    ) -> Result<Response<Driven>, SendError> {
        loop {
            let (mut conn, reused) = match self.checkout().await {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            match conn.send(req).await {
                Ok(resp) => {
                    let pool = Arc::clone(self);
                    return Ok(resp.map(|body| Driven {
                        body,
                        conn: Some(conn),
                        pool,
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

    /// The most recently used idle connection that is still open and
    /// ready for a request.
    async fn checkout(&self) -> Option<Conn> {
        loop {
            let mut c = self.slot().borrow_mut().conns.pop_back()?;
            if self.expired(&c, Instant::now()) {
                continue; // dropped: closed
            }
            // One poll: a connection the app closed reads the end of stream.
            let ended = poll_fn(|cx| Poll::Ready(c.poll_ended(cx))).await;
            if !ended && c.sender.is_ready() {
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
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        Ok(Conn {
            sender,
            conn: Some(Box::pin(conn)),
            idle_since: Instant::now(),
        })
    }

    /// Puts a connection whose answer has been read back in the pool, if it
    /// is ready for another request (an answer with `Connection: close`, or
    /// an HTTP/1.0 one, ends it).
    fn release(self: &Arc<Self>, mut c: Conn) {
        // One poll with no waker: the connection takes in the end of the
        // answer and turns idle. Whoever takes it next polls it with theirs.
        if c.poll_ended(&mut Context::from_waker(Waker::noop())) || !c.sender.is_ready() {
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

/// An answer's body with the connection it arrives on: reading the body
/// drives the connection, and a body read to its end gives the connection
/// back to the pool (one dropped before its end closes it).
#[derive(Debug)]
pub struct Driven {
    body: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    ended: bool,
}

impl Driven {
    fn finish(&mut self) {
        self.ended = true;
        if let Some(c) = self.conn.take() {
            self.pool.release(c);
        }
    }
}

impl http_body::Body for Driven {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending() {
            // Nothing buffered: let the connection read, then look again.
            if let Some(c) = &mut this.conn {
                if c.poll_ended(cx) {
                    this.conn = None;
                }
                polled = Pin::new(&mut this.body).poll_frame(cx);
            }
        }
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

impl Drop for Driven {
    fn drop(&mut self) {
        // An answer with no body (HEAD, 204, 304, length 0) is never polled.
        if !self.ended && http_body::Body::is_end_stream(&self.body) {
            self.finish();
        }
    }
}
