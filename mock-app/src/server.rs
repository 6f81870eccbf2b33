//! The server: binds the listener, announces the address on stdout, accepts
//! connections (HTTP/1 and HTTP/2) onto `routing::handle`, and exits on
//! SIGTERM / SIGINT.

use std::error::Error;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::Cli;
use crate::routing::handle;
use crate::state::State;

pub(crate) async fn serve(cli: Cli) -> Result<(), Box<dyn Error>> {
    // Install the signal handlers before announcing the address, so that a
    // SIGTERM sent right after the line is read still exits with status 0.
    let shutdown = shutdown_signal()?;
    let listener = TcpListener::bind(cli.listen).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State::new(&cli));
    // Run the accept loop on the worker threads, not on the main thread.
    let accept = tokio::spawn(accept_loop(listener, state));
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "mock-legacy-app listening on {addr}")?;
        stdout.flush()?;
    }
    shutdown.await;
    accept.abort();
    Ok(())
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // E.g. EMFILE: back off briefly instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Best effort; latency matters more than packet count here.
        let _ = stream.set_nodelay(true);
        let builder = Arc::clone(&builder);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, Arc::clone(&state)));
            // Connection errors (resets, bad requests) are not interesting here.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Registers the SIGTERM / SIGINT handlers; the future completes on either.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
