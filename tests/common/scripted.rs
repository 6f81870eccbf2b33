//! A scripted HTTP/1.1 app for the tests of upstream connections
//! (tests/upstream_pool.rs, tests/edges.rs): it numbers its connections,
//! answers every bodiless request `200` and reports what it saw, leaving
//! out the sidecar's readiness probes.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

/// The path of the sidecar's background readiness probe in the tests (its
/// own pool), which the scripted app answers and does not report.
pub const PROBE_PATH: &[u8] = b"/__mock/fast";

/// Whether a request head is the readiness probe's.
pub fn is_probe(head: &[u8]) -> bool {
    head.windows(PROBE_PATH.len()).any(|w| w == PROBE_PATH)
}

/// The next `Request`'s connection number (within 5 s); panics on another
/// event.
pub async fn next_request(rx: &mut mpsc::UnboundedReceiver<Seen>) -> usize {
    match next(rx).await {
        Seen::Request { conn } => conn,
        other => panic!("expected a request, saw {other:?}"),
    }
}

/// How the scripted app treats a connection after each answer.
#[derive(Debug, Clone, Copy)]
pub enum After {
    /// Keep it open for the next request.
    KeepAlive,
    /// Keep it open until the test says, then close it (the app's
    /// keep-alive ran out) without saying so.
    CloseWhenTold,
    /// Say `Connection: close` and wait for the peer to close it.
    SayClose,
}

/// What the app saw: each request's connection number, and each
/// connection's end (`by_app` when the app closed it).
#[derive(Debug, PartialEq)]
pub enum Seen {
    Request { conn: usize },
    Ended { conn: usize, by_app: bool },
}

/// A minimal HTTP/1.1 app: every request (bodiless) gets `200` with a body
/// of `body_len` bytes; readiness probes are answered and not reported.
pub async fn scripted_app(
    after: After,
    body_len: usize,
) -> (String, mpsc::UnboundedReceiver<Seen>) {
    let (url, seen, _) = scripted_app_with_close(after, body_len).await;
    (url, seen)
}

/// [`scripted_app`], and the trigger that closes its open connection
/// ([`After::CloseWhenTold`]).
pub async fn scripted_app_with_close(
    after: After,
    body_len: usize,
) -> (String, mpsc::UnboundedReceiver<Seen>, Arc<Notify>) {
    let close = Arc::new(Notify::new());
    let told = Arc::clone(&close);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for conn in 0.. {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (tx, told) = (tx.clone(), Arc::clone(&told));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut probe_conn = false;
                loop {
                    let close_on_word = matches!(after, After::CloseWhenTold) && !probe_conn;
                    let read = tokio::select! {
                        read = sock.read(&mut chunk) => read.unwrap_or(0),
                        () = told.notified(), if close_on_word => {
                            drop(sock);
                            let _ = tx.send(Seen::Ended { conn, by_app: true });
                            return;
                        }
                    };
                    if read == 0 {
                        if !probe_conn {
                            let _ = tx.send(Seen::Ended {
                                conn,
                                by_app: false,
                            });
                        }
                        return;
                    }
                    buf.extend_from_slice(&chunk[..read]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        probe_conn = is_probe(&head);
                        let say_close = matches!(after, After::SayClose) && !probe_conn;
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {body_len}\r\n{}\r\n{}",
                            if say_close {
                                "Connection: close\r\n"
                            } else {
                                ""
                            },
                            "x".repeat(body_len)
                        );
                        if !probe_conn {
                            let _ = tx.send(Seen::Request { conn });
                        }
                        if sock.write_all(answer.as_bytes()).await.is_err() {
                            // The peer closed it mid-answer.
                            if !probe_conn {
                                let _ = tx.send(Seen::Ended {
                                    conn,
                                    by_app: false,
                                });
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, rx, close)
}

/// The next event the app reports (within 5 s).
pub async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the app saw something within 5 s")
        .expect("the app is running")
}
