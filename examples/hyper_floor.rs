//! The floor of `bench/bench.sh`: a bare hyper HTTP/1.1 server that answers
//! every request with the same bytes, on the sidecar's runtime setup (one
//! current-thread tokio runtime per worker thread, each accepting on its own
//! `SO_REUSEPORT` listener, `TCP_NODELAY`) and with its server settings
//! (hyper's header-read timeout on a tokio timer, unless `--no-timer`). What
//! the sidecar costs above this is its own stack; this is hyper and tokio
//! alone.
//!
//! With `--proxy UPSTREAM` it is the floor of a proxied request instead:
//! each client connection gets one upstream connection of its own
//! (`hyper::client::conn::http1`, opened with the client's, no pool, no
//! header rewriting), and every request goes to the upstream as it came,
//! its answer streamed back. Nothing a proxy can do over hyper costs less.
//!
//! Usage: `hyper_floor ADDR THREADS BODY_BYTES [--no-timer]`,
//! `hyper_floor ADDR THREADS --proxy UPSTREAM [--no-timer]`

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(threads), Some(len)) = (args.get(1), args.get(2), args.get(3)) else {
        return Err("usage: hyper_floor ADDR THREADS BODY_BYTES [--no-timer]".into());
    };
    let addr: SocketAddr = addr.parse()?;
    let threads: usize = threads.parse()?;
    let timer = !args.iter().any(|a| a == "--no-timer");
    let what = match (len.as_str(), args.get(4)) {
        ("--proxy", Some(up)) => Answer::Proxy(up.parse()?),
        (len, _) => Answer::Bytes(Bytes::from(vec![b'x'; len.parse()?])),
    };
    // Worker 0 on this thread, as in the sidecar (bench/instructions.sh
    // counts the main thread's instructions).
    let workers: Vec<_> = (1..threads.max(1))
        .map(|_| {
            let listener = bind(addr)?;
            let what = what.clone();
            Ok(std::thread::spawn(move || serve(listener, what, timer)))
        })
        .collect::<Result<_, std::io::Error>>()?;
    serve(bind(addr)?, what, timer)?;
    for w in workers {
        w.join().map_err(|_| "a worker panicked")??;
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// What the floor answers with.
#[derive(Clone)]
enum Answer {
    Bytes(Bytes),
    Proxy(SocketAddr),
}

fn serve(listener: std::net::TcpListener, what: Answer, timer: bool) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut h1 = hyper::server::conn::http1::Builder::new();
        if timer {
            h1.timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
        }
        h1.keep_alive(true);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let io = TokioIo::new(stream);
            match &what {
                Answer::Bytes(body) => {
                    let body = body.clone();
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let body = body.clone();
                        async move {
                            // Read as the sidecar reads a search (a POST's body).
                            let _ = req.into_body().collect().await;
                            let mut resp = Response::new(Full::new(body));
                            resp.headers_mut().insert(
                                header::CONTENT_TYPE,
                                HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    tokio::spawn(h1.serve_connection(io, svc));
                }
                Answer::Proxy(up) => {
                    let (up, h1) = (*up, h1.clone());
                    tokio::spawn(async move {
                        let Ok(upstream) = tokio::net::TcpStream::connect(up).await else {
                            return;
                        };
                        let _ = upstream.set_nodelay(true);
                        let Ok((sender, conn)) =
                            hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await
                        else {
                            return;
                        };
                        tokio::spawn(conn);
                        // HTTP/1: the client's requests come one at a time,
                        // so the lock is never contended.
                        let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
                        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let sender = std::sync::Arc::clone(&sender);
                            async move { sender.lock().await.send_request(req).await }
                        });
                        let _ = h1.serve_connection(io, svc).await;
                    });
                }
            }
        }
    })
}
