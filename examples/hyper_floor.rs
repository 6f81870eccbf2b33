//! The floor of `bench/bench.sh`: a bare hyper HTTP/1.1 server that answers
//! every request with the same bytes, on the sidecar's runtime setup (one
//! current-thread tokio runtime per worker thread, each accepting on its own
//! `SO_REUSEPORT` listener, `TCP_NODELAY`) and with its server settings
//! (hyper's header-read timeout on a tokio timer, unless `--no-timer`). What
//! the sidecar costs above this is its own stack; this is hyper and tokio
//! alone.
//!
//! Usage: `hyper_floor ADDR THREADS BODY_BYTES [--no-timer]`

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
    let body = Bytes::from(vec![b'x'; len.parse()?]);
    let timer = !args.iter().any(|a| a == "--no-timer");
    // Worker 0 on this thread, as in the sidecar (bench/instructions.sh
    // counts the main thread's instructions).
    let workers: Vec<_> = (1..threads.max(1))
        .map(|_| {
            let listener = bind(addr)?;
            let body = body.clone();
            Ok(std::thread::spawn(move || serve(listener, body, timer)))
        })
        .collect::<Result<_, std::io::Error>>()?;
    serve(bind(addr)?, body, timer)?;
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

fn serve(listener: std::net::TcpListener, body: Bytes, timer: bool) -> std::io::Result<()> {
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
            let conn = h1.serve_connection(TokioIo::new(stream), svc);
            tokio::spawn(conn);
        }
    })
}
