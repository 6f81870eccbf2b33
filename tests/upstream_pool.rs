//! The upstream connection pool (src/proxy/pool.rs) over real sockets: one
//! keep-alive connection serves a worker's sequential requests (with
//! bodies, and answers without one), a
//! connection the app closed while idle is never used for a request, an
//! answer with `Connection: close` ends its connection, an answer whose
//! client went away does not leave a half-read connection in the pool, and
//! a connection still sending a request's body when its answer has ended
//! (the app answered early) is not given to the next request. The
//! retry layer is off here, so what passes is the pool's own doing.

mod common;

use common::scripted::{After, Seen, next, next_request, scripted_app, scripted_app_with_close};
use common::{Sidecar, client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One worker (one pool), no retries: a failed exchange would show as 502.
const ONE_WORKER: &str = "threads = 1\n[retry]\nenabled = false\n";

async fn get(sc: &Sidecar) -> (u16, usize) {
    let r = client().get(sc.url("/api/stats")).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap().len())
}

/// Sends `n` requests one after another (each made by `request`) through a
/// one-worker sidecar to a keep-alive app answering `body_len` bytes:
/// each is answered whole, and the app sees them all on one connection.
async fn all_on_one_connection(
    body_len: usize,
    n: usize,
    request: impl Fn(&Sidecar) -> reqwest::RequestBuilder,
) {
    let (app, mut seen) = scripted_app(After::KeepAlive, body_len).await;
    let sc = Sidecar::start(&app, ONE_WORKER).await;
    let mut conns = Vec::new();
    for _ in 0..n {
        let r = request(&sc).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().len(), body_len);
        conns.push(next_request(&mut seen).await);
    }
    assert!(conns.iter().all(|c| *c == conns[0]), "{conns:?}");
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    all_on_one_connection(1024, 21, |sc| client().get(sc.url("/api/stats"))).await;
}

#[tokio::test]
async fn answers_without_a_body_give_their_connection_back() {
    // `Content-Length: 0`: the answer's body is over before anyone polls
    // it, so the connection goes back when the body is dropped.
    all_on_one_connection(0, 11, |sc| client().get(sc.url("/api/stats"))).await;
}

#[tokio::test]
async fn sequential_requests_with_bodies_share_one_upstream_connection() {
    // A body sent whole before the answer ends leaves the connection free
    // for the next request (the watch on the body's end lets it go back).
    all_on_one_connection(2, 10, |sc| {
        client().post(sc.url("/api/stats")).body("0123456789")
    })
    .await;
}

#[tokio::test]
async fn a_connection_the_app_closed_while_idle_is_never_used() {
    let (app, mut seen, close) = scripted_app_with_close(After::CloseWhenTold, 2).await;
    let sc = Sidecar::start(&app, ONE_WORKER).await;
    let mut last = None;
    for n in 0..10 {
        assert_eq!(get(&sc).await, (200, 2), "request {n}");
        let conn = next_request(&mut seen).await;
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
        let conn = next_request(&mut seen).await;
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
    let conn = next_request(&mut seen).await;
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
    let next_conn = next_request(&mut seen).await;
    assert_ne!(next_conn, conn);
}

#[tokio::test]
async fn a_connection_still_sending_the_request_body_is_not_reused() {
    // The app answers at the request's head, before reading its body (an
    // early 401 or 413 does that), and keeps the connection. The client
    // sends the head and a little of a large body, then pauses.
    let (app, mut seen) = scripted_app(After::KeepAlive, 2).await;
    let sc = Sidecar::start(&app, ONE_WORKER).await;
    let mut uploader = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    let head = "POST /api/stats HTTP/1.1\r\nHost: sidecar\r\nContent-Length: 100000\r\n\r\n";
    uploader.write_all(head.as_bytes()).await.unwrap();
    uploader.write_all(&[b'a'; 1000]).await.unwrap();
    let busy = next_request(&mut seen).await;
    // Its answer has come whole; the upload is far from over.
    let answer = read_answer(&mut uploader).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The next request must not wait on that connection (its upload holds
    // it until the client goes on, up to `client_body_timeout`): it is
    // answered at once, on another.
    let next_get = tokio::time::timeout(std::time::Duration::from_secs(5), get(&sc)).await;
    assert_eq!(next_get.expect("answered within 5 s"), (200, 2));
    let other = next_request(&mut seen).await;
    assert_ne!(other, busy);

    // The upload ends; its connection was not kept, so it is closed then.
    uploader.write_all(&[b'a'; 99_000]).await.unwrap();
    assert_eq!(
        next(&mut seen).await,
        Seen::Ended {
            conn: busy,
            by_app: false
        }
    );
    assert_eq!(get(&sc).await, (200, 2));
    assert_eq!(next_request(&mut seen).await, other);
}

/// An answer's head and its 2-byte body, read off a raw connection.
async fn read_answer(sock: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"xx") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "the sidecar closed the connection");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}
