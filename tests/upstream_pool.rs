//! The upstream connection pool (src/proxy/pool.rs) over real sockets: one
//! keep-alive connection serves a worker's sequential requests, a
//! connection the app closed while idle is never used for a request, an
//! answer with `Connection: close` ends its connection, and an answer whose
//! client went away does not leave a half-read connection in the pool. The
//! retry layer is off here, so what passes is the pool's own doing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Sidecar, client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

/// How the scripted app treats a connection after each answer.
#[derive(Debug, Clone, Copy)]
enum After {
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
enum Seen {
    Request { conn: usize },
    Ended { conn: usize, by_app: bool },
}

const PROBE_PATH: &[u8] = b"/__mock/fast";

/// A minimal HTTP/1.1 app: every request (bodiless) gets `200` with a body
/// of `body_len` bytes; readiness probes are answered and not reported.
async fn scripted_app(after: After, body_len: usize) -> (String, mpsc::UnboundedReceiver<Seen>) {
    let (url, seen, _) = scripted_app_with_close(after, body_len).await;
    (url, seen)
}

/// [`scripted_app`], and the trigger that closes its open connection
/// ([`After::CloseWhenTold`]).
async fn scripted_app_with_close(
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
                        probe_conn = head.windows(PROBE_PATH.len()).any(|w| w == PROBE_PATH);
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
async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("the app saw something within 5 s")
        .expect("the app is running")
}

/// One worker (one pool), no retries: a failed exchange would show as 502.
const ONE_WORKER: &str = "threads = 1\n[retry]\nenabled = false\n";

async fn get(sc: &Sidecar) -> (u16, usize) {
    let r = client().get(sc.url("/api/stats")).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap().len())
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let (app, mut seen) = scripted_app(After::KeepAlive, 1024).await;
    let sc = Sidecar::start(&app, ONE_WORKER).await;
    assert_eq!(get(&sc).await, (200, 1024));
    let Seen::Request { conn: first } = next(&mut seen).await else {
        panic!("expected a request");
    };
    for _ in 0..20 {
        assert_eq!(get(&sc).await, (200, 1024));
        assert_eq!(next(&mut seen).await, Seen::Request { conn: first });
    }
}

#[tokio::test]
async fn a_connection_the_app_closed_while_idle_is_never_used() {
    let (app, mut seen, close) = scripted_app_with_close(After::CloseWhenTold, 2).await;
    let sc = Sidecar::start(&app, ONE_WORKER).await;
    let mut last = None;
    for n in 0..10 {
        assert_eq!(get(&sc).await, (200, 2), "request {n}");
        let Seen::Request { conn } = next(&mut seen).await else {
            panic!("expected a request");
        };
        assert_ne!(Some(conn), last, "a new connection for request {n}");
        // The app closes it, idle in the pool, before the next request.
        close.notify_one();
        assert_eq!(next(&mut seen).await, Seen::Ended { conn, by_app: true });
        last = Some(conn);
    }
}

#[tokio::test]
async fn an_answer_with_connection_close_ends_its_connection() {
    let (app, mut seen) = scripted_app(After::SayClose, 2).await;
    let sc = Sidecar::start(&app, ONE_WORKER).await;
    let mut last = None;
    for n in 0..5 {
        assert_eq!(get(&sc).await, (200, 2), "request {n}");
        let Seen::Request { conn } = next(&mut seen).await else {
            panic!("expected a request");
        };
        assert_ne!(Some(conn), last, "a new connection for request {n}");
        // The sidecar closes it (the app waits for that), never reusing it.
        assert_eq!(
            next(&mut seen).await,
            Seen::Ended {
                conn,
                by_app: false
            }
        );
        last = Some(conn);
    }
}

#[tokio::test]
async fn an_answer_left_half_read_closes_its_connection() {
    // 4 MiB: more than the sockets buffer, so the sidecar is mid-body when
    // its client goes away.
    let (app, mut seen) = scripted_app(After::KeepAlive, 4 << 20).await;
    let sc = Sidecar::start(&app, ONE_WORKER).await;
    let mut r = client().get(sc.url("/api/stats")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("a first chunk");
    assert!(!first.is_empty());
    drop(r);
    let Seen::Request { conn } = next(&mut seen).await else {
        panic!("expected a request");
    };
    // The rest of that answer is never read: its connection is closed, and
    // the next request takes a new one and gets a whole answer.
    assert_eq!(
        next(&mut seen).await,
        Seen::Ended {
            conn,
            by_app: false
        }
    );
    assert_eq!(get(&sc).await, (200, 4 << 20));
    let seen_next = next(&mut seen).await;
    let Seen::Request { conn: next_conn } = seen_next else {
        panic!("expected a request, saw {seen_next:?}");
    };
    assert_ne!(next_conn, conn);
}
