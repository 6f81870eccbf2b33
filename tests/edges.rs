//! Drop-in edges (issue 15), over real sockets: system figures from the first
//! request, pooled upstream connections closed after `upstream_idle_timeout`,
//! and an upstream answer that is not valid HTTP/1.1. (The metrics-off shape
//! of `/api/health/detailed` is in observability.rs.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::scripted::{After, Seen, is_probe, next, next_request, scripted_app};
use common::{Mock, Sidecar, client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test]
async fn system_figures_answer_from_the_first_request() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    // No wait: the first sample is taken before the sidecar serves.
    let r = client().get(sc.url("/api/system")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["memory"]["total_mb"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    // psutil's first call: 0.0 until a second sample exists.
    assert!(v["cpu_percent"].is_number(), "{v}");
    let h = sc.get_json("/api/health/detailed").await;
    assert!(h["system"].is_object(), "{h}");
}

#[tokio::test]
async fn an_idle_upstream_connection_is_closed_by_the_sidecar_after_the_idle_timeout() {
    let (upstream, mut seen) = scripted_app(After::KeepAlive, 2).await;
    // One worker, so both requests share one pool.
    let toml = "threads = 1\nupstream_idle_timeout = \"300ms\"\n";
    let sc = Sidecar::start(&upstream, toml).await;

    let r = client().get(sc.url("/api/stats")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let sent = tokio::time::Instant::now();
    let first = next_request(&mut seen).await;
    // The sidecar closes the idle connection itself, after the timeout and
    // not before; no other request came on it meanwhile.
    match next(&mut seen).await {
        Seen::Ended {
            conn,
            by_app: false,
        } if conn == first => {}
        other => panic!("expected the connection closed, saw {other:?}"),
    }
    // The pool (src/proxy/pool.rs) sweeps idle connections every idle
    // timeout, so one is closed between 1× and 2× after its last use (a
    // checkout never takes an expired one).
    let idle = sent.elapsed();
    assert!(idle >= Duration::from_millis(250), "closed after {idle:?}");
    assert!(idle < Duration::from_millis(1500), "closed after {idle:?}");

    let r = client().get(sc.url("/api/stats")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let conn = next_request(&mut seen).await;
    assert_ne!(conn, first, "the next request takes a new connection");
}

#[tokio::test]
async fn the_default_idle_timeout_is_below_gunicorns_keep_alive() {
    let cfg = common::config("", &[]);
    assert!(cfg.upstream_idle_timeout < Duration::from_secs(2));
    let env = common::config("", &[("UPSTREAM_IDLE_TIMEOUT", "0.5")]);
    assert_eq!(env.upstream_idle_timeout, Duration::from_millis(500));
}

/// An upstream that answers every request with `answer` and counts them.
async fn broken_upstream(answer: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&count);
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (counted, answer) = (Arc::clone(&counted), Arc::clone(&answer));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if !is_probe(&buf) {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                let _ = sock.write_all(&answer).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (url, count)
}

#[tokio::test]
async fn an_invalid_upstream_answer_is_a_502_bad_response_never_retried() {
    let mut huge_head = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    huge_head.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    huge_head.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "garbage status line",
            b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        (
            "two differing Content-Lengths",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nokxyz".to_vec(),
        ),
        ("oversized head", huge_head),
    ];
    for (what, answer) in cases {
        let (upstream, count) = broken_upstream(answer).await;
        // GET on the default route: idempotent, so retried if it were a
        // connection error.
        let sc = Sidecar::start(&upstream, "").await;
        let r = client().get(sc.url("/api/stats")).send().await.unwrap();
        assert_eq!(r.status(), 502, "{what}");
        let v: serde_json::Value = r.json().await.unwrap();
        let message = v["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("Upstream sent an invalid response: "),
            "{what}: {v}"
        );
        assert_eq!(count.load(Ordering::SeqCst), 1, "{what}: never retried");
        let m = sc.get_json("/api/metrics").await;
        assert_eq!(m["errors"]["bad_response"], 1, "{what}: {m}");
        assert_eq!(m["errors"]["connect_error"], 0, "{what}: {m}");
        let prom = sc.get_text("/metrics").await;
        assert!(
            prom.contains("rag_sidecar_upstream_errors_total{type=\"bad_response\"} 1"),
            "{what}"
        );
    }
}

#[tokio::test]
async fn request_framing_reaches_the_app_unchanged() {
    // The body wrapper that cuts stalled uploads must not turn a bodiless
    // GET or a sized POST into a chunked request.
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let echo = async |r: reqwest::RequestBuilder| -> serde_json::Value {
        r.send().await.unwrap().json().await.unwrap()
    };
    let get = echo(client().get(sc.url("/__mock/echo"))).await;
    let h = &get["headers"];
    assert!(h.get("transfer-encoding").is_none(), "{get}");
    assert_eq!(get["body_bytes"], 0);
    let post = echo(client().post(sc.url("/__mock/echo")).body("hello")).await;
    let h = &post["headers"];
    assert!(h.get("transfer-encoding").is_none(), "{post}");
    assert_eq!(h["content-length"], serde_json::json!(["5"]), "{post}");
    assert_eq!(post["body_bytes"], 5);
}
