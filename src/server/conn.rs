//! One connection: its protocol (HTTP/1.1 or h2c, told apart by the first
//! bytes), the slowloris guard on its first request, the dispatch of each
//! request to the admin router or the proxy stack, the request's edge
//! checks and guarded body, and its end (finish what it answers, or cut).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpStream;

use super::edge::{Proto, drop_underscored, normalised, refused, request_started};
use super::slots::{self, ConnHandle, ConnPolicy, Slot, Tracked, Watched};
use super::stack::{Answer, OwnStack, ResponseBody};
use crate::BoxError;
use crate::admin::Admin;
use crate::body::{self, Body};
use crate::error::{ClientBodyError, ClientBodyStalled};
use crate::extensions::ClientAddr;
use crate::proxy::{drop_unfit_request_id, strip_hop_by_hop};

/// One connection's life: its first request must start in time; asked to
/// close (near the bound, or at shutdown), it finishes what it is answering
/// and closes.
pub(super) async fn serve(
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
pub(super) struct Protocols {
    pub(super) h1: hyper::server::conn::http1::Builder,
    pub(super) h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

/// Where a connection's requests go.
#[derive(Debug, Clone)]
pub(super) enum Dispatch {
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
