//! The upstream connection pool (src/proxy/pool.rs) over real sockets: one
//! keep-alive connection serves a worker's sequential requests, a
//! connection the app closed while idle is never used for a request, an
//! answer with `Connection: close` ends its connection, and an answer whose
//! client went away does not leave a half-read connection in the pool. The
//! retry layer is off here, so what passes is the pool's own doing.

mod common;

use common::scripted::{After, Seen, next, next_request, scripted_app, scripted_app_with_close};
use common::{Sidecar, client};

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
    let first = next_request(&mut seen).await;
    for _ in 0..20 {
        assert_eq!(get(&sc).await, (200, 1024));
        assert_eq!(next_request(&mut seen).await, first);
    }
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
