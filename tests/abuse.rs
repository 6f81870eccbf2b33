//! Bounded under abuse (PRODUCT.md "Hostile clients"), each reproduced as an
//! attacker would, over raw sockets against a sidecar process:
//! - clients that stop reading large streams, or large answers, never take
//!   the process past the pod's memory limit (`memory_budget`);
//! - slow uploads that declare large bodies never fill the spool for
//!   everyone (bytes charged as written, a quarter per client key, and
//!   `client_body_deadline` for a whole upload);
//! - a call to the app, once made, is finished for the requests coalesced on
//!   it when its own client hangs up, and a failed one is tried again by one
//!   waiter, not by each.
//!
//! Memory is read from /proc (the peak, VmHWM) once the traffic has settled:
//! the app has stopped sending (its `bytes_sent` no longer grows) and the
//! sidecar's RSS no longer moves. No timing is asserted.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Mock, Sidecar, SidecarProcess, client, free_addr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The pod's memory limit in deploy/ (192 Mi).
const POD_LIMIT_KIB: u64 = 192 * 1024;

/// A sidecar process in front of `mock`, rate limits off, with `extra` TOML.
fn process(mock: &Mock, extra: &str) -> (SidecarProcess, SocketAddr) {
    let addr = free_addr();
    let toml = format!(
        "listen = \"{addr}\"\nupstream = \"{}\"\nreadiness_path = \"/__mock/fast\"\n\
         [rate_limit]\nenabled = false\n{extra}",
        mock.url()
    );
    (SidecarProcess::start(&toml, &[], addr), addr)
}

/// `n` connections, each sending `request(i)` and never reading a byte.
async fn non_readers(
    addr: SocketAddr,
    n: usize,
    request: impl Fn(usize) -> String,
) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request(i).as_bytes()).await.unwrap();
        conns.push(s);
    }
    conns
}

/// Waits (60 s at most) until the app has stopped sending and the
/// sidecar's RSS has stopped moving for a second; returns the sidecar's
/// peak RSS in KiB.
async fn settled_peak(mock: &Mock, sc: &SidecarProcess) -> u64 {
    let mut last = (u64::MAX, u64::MAX);
    let mut still = 0;
    for _ in 0..240 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let sent = mock.stats().await["bytes_sent"].as_u64().unwrap_or(0);
        let now = (sent, sc.rss_kib() / 1024);
        still = if now == last { still + 1 } else { 0 };
        last = now;
        if still >= 4 {
            break;
        }
    }
    let peak = sc.peak_rss_kib();
    eprintln!("sidecar peak RSS: {peak} KiB");
    peak
}

/// A plain request the sidecar must still answer.
async fn still_serves(addr: SocketAddr) {
    let r = client()
        .get(format!("http://{addr}/api/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `n` clients of a sidecar process (with `extra` TOML) that send
/// `request(i)` and never read: its peak RSS stays under the pod's limit,
/// and it still answers.
async fn stays_within_the_pod_limit(extra: &str, n: usize, request: impl Fn(usize) -> String) {
    let mock = Mock::start();
    let (sc, addr) = process(&mock, extra);
    let conns = non_readers(addr, n, request).await;
    let peak = settled_peak(&mock, &sc).await;
    assert!(
        peak < POD_LIMIT_KIB,
        "peak RSS {peak} KiB with {n} non-reading clients"
    );
    still_serves(addr).await;
    drop(conns);
}

/// 150 clients that stop reading 16 MiB event streams on a cached route
/// (each its own stream): each may trail by up to 8 MiB alone, but the
/// backlogs share `memory_budget`, so a reader that falls further behind
/// than its share is cut. Before the budget: 1.49 GB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_streams_stay_within_the_pod_limit() {
    let route = "[[routes]]\nname = \"streams\"\nmethods = [\"GET\"]\npath = \"/__mock/sse\"\n\
                 cache = { namespace = \"streams\", ttl = \"1h\" }\n";
    // 16 384 events of about 1 KiB.
    stays_within_the_pod_limit(route, 150, |i| {
        format!("GET /__mock/sse?events=16384&pad=1010&n={i} HTTP/1.1\r\nHost: x\r\n\r\n")
    })
    .await;
}

/// 800 clients that never read a 1 MB answer: answers are read from the app
/// at once only while `memory_budget` has room; past it they stream
/// unbuffered (the app's worker waits on that client, as without
/// buffering). Before the budget: 735 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_answers_stay_within_the_pod_limit() {
    stays_within_the_pod_limit("", 800, |i| {
        format!("GET /__mock/blob?bytes=1000000&n={i} HTTP/1.1\r\nHost: x\r\n\r\n")
    })
    .await;
}

/// An upload's head declaring `len` bytes from `key`, and its first six bytes.
fn upload_head(len: u64, key: &str) -> String {
    format!(
        "POST /api/upload?filename=slow.pdf HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n\
         Content-Length: {len}\r\n\r\nstart!"
    )
}

/// Twenty-one connections declare 50 MiB uploads and send six bytes: the
/// spool charges what is written, not what is declared, so a small upload
/// from someone else still goes through (before: 503 `spool_full`, with
/// almost nothing on disk).
#[tokio::test]
async fn slow_uploads_declaring_large_bodies_do_not_block_anyones_upload() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "[rate_limit]\nenabled = false\n").await;
    let mut slow = Vec::new();
    for _ in 0..21 {
        let mut s = TcpStream::connect(sc.addr).await.unwrap();
        s.write_all(upload_head(50 * 1024 * 1024, "slow").as_bytes())
            .await
            .unwrap();
        slow.push(s);
    }
    common::eventually("the slow uploads' first bytes to be spooled", async || {
        sc.spooled().await >= 21 * 6
    })
    .await;
    let r = client()
        .post(sc.url("/api/upload?filename=small.pdf"))
        .body(vec![b'z'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(sc.spooled().await, 21 * 6, "charged as written");
    drop(slow);
}

/// The answer's head to a raw request on a fresh connection (10 s at most).
async fn head_of(addr: SocketAddr, request: &[u8], then: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let _ = s.write_all(then).await;
    common::read_head(&mut s, Duration::from_secs(10)).await
}

/// One client key holds at most a quarter of `spool_max_bytes`; another
/// key's upload still fits beside it.
#[tokio::test]
async fn one_client_key_holds_at_most_a_quarter_of_the_spool() {
    let mock = Mock::start();
    // Clients keyed by their API key (the rate limiter's key).
    let toml = "spool_max_bytes = 400000\n[rate_limit]\nkey = \"header:X-API-Key\"\n\
                default = \"1000 per minute\"\n[[routes]]\nname = \"upload\"\n\
                rate_limit = \"1000 per minute\"\n";
    let sc = Sidecar::start(&mock.url(), toml).await;
    // 90 000 bytes from "greedy" are on disk (under its quarter, 100 000).
    let mut held = TcpStream::connect(sc.addr).await.unwrap();
    held.write_all(upload_head(95_000, "greedy").as_bytes())
        .await
        .unwrap();
    held.write_all(&vec![b'g'; 89_994]).await.unwrap();
    common::eventually("greedy's bytes to be spooled", async || {
        sc.spooled().await == 90_000
    })
    .await;
    // Its second upload takes it past the quarter: 503, the contract's JSON.
    let head = head_of(
        sc.addr,
        upload_head(20_000, "greedy").as_bytes(),
        &[b'h'; 19_994],
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.contains("spool"), "{head}");
    // Someone else's fits.
    let r = client()
        .post(sc.url("/api/upload?filename=other.pdf"))
        .header("X-API-Key", "other")
        .body(vec![b'o'; 90_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    drop(held);
}

/// An upload that drips (each pause under `client_body_timeout`) is cut
/// with 408 once `client_body_deadline` has passed since its head.
#[tokio::test]
async fn an_upload_is_cut_at_client_body_deadline_however_it_drips() {
    let mock = Mock::start();
    let toml = "client_body_deadline = \"2s\"\nclient_body_timeout = \"5s\"\n[rate_limit]\nenabled = false\n";
    let sc = Sidecar::start(&mock.url(), toml).await;
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    s.write_all(upload_head(1000, "drip").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    // A byte every 200 ms for up to 10 s, reading whatever comes back.
    for _ in 0..50 {
        if s.write_all(b"d").await.is_err() {
            break;
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("client_body_deadline"), "{head}");
    assert_eq!(mock.stats().await["upload_bytes_total"], 0);
}

/// The cache's miss count (each of the identical requests counts one).
async fn misses(sc: &Sidecar) -> u64 {
    sc.get_json("/api/cache/stats").await["misses"]
        .as_u64()
        .unwrap_or(0)
}

const SEARCH: &str = r#"{"query":"who leads","top_k":3}"#;

/// The search as reqwest sends it (`Host` and `Accept` are in the key).
fn search_request(addr: SocketAddr) -> String {
    format!(
        "POST /api/search HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{SEARCH}",
        SEARCH.len()
    )
}

/// Twenty identical searches; the first one's client hangs up while the app
/// answers. The call goes on in its own task and its answer serves the
/// other nineteen: one app call (before: twenty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_hangs_up_leaves_its_call_to_the_waiters() {
    let mock = Mock::start_with(&["--search-latency-ms", "1500"]);
    let sc = Sidecar::start(&mock.url(), "[rate_limit]\nenabled = false\n").await;
    let mut leader = TcpStream::connect(sc.addr).await.unwrap();
    leader
        .write_all(search_request(sc.addr).as_bytes())
        .await
        .unwrap();
    common::eventually("the leader's call to reach the app", async || {
        mock.stats().await["in_flight"] == 1
    })
    .await;
    let url = sc.url("/api/search");
    let waiters: Vec<_> = (0..19)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .header("Content-Type", "application/json")
                    .body(SEARCH)
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.text().await.unwrap_or_default())
            })
        })
        .collect();
    common::eventually("all twenty to wait on the one call", async || {
        misses(&sc).await == 20
    })
    .await;
    drop(leader);
    for w in waiters {
        let (status, body) = w.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("who leads"), "{body}");
    }
    let stats = mock.stats().await;
    assert_eq!(stats["by_path"]["/api/search"], 1, "{stats}");
}

/// The shared call fails (a 500 from the app, no retries): one waiter
/// leads the next attempt and its answer serves the rest: two app calls for
/// ten identical requests (before: ten).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_shared_call_fails_one_waiter_leads_the_next() {
    let mock = Mock::start();
    let toml = "[rate_limit]\nenabled = false\n[retry]\nmax_retries = 0\n\
                [circuit_breaker]\nthreshold = 100\n";
    let sc = Sidecar::start(&mock.url(), toml).await;
    // The first call waits a second, then fails.
    client()
        .post(format!("{}/__mock/faults", mock.url()))
        .json(&serde_json::json!({"status": 500, "delay_ms": 1000, "count": 1}))
        .send()
        .await
        .unwrap();
    let url = sc.url("/api/search");
    let all: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                client()
                    .post(url)
                    .header("Content-Type", "application/json")
                    .body(SEARCH)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for r in all {
        statuses.push(r.await.unwrap());
    }
    statuses.sort_unstable();
    let stats = mock.stats().await;
    assert_eq!(stats["by_path"]["/api/search"], 2, "{stats} {statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        9,
        "{statuses:?}"
    );
}

/// `/api/cache/clear/` and `/API/cache/clear` are not the admin endpoint:
/// the admin match reads the path as routing does, and as the app does
/// (Werkzeug's rules are case-sensitive and `/x/` is not `/x`). They reach
/// the app, which has no such route (404), and the cache is untouched.
#[tokio::test]
async fn admin_paths_are_matched_as_the_app_reads_paths() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "[rate_limit]\nenabled = false\n").await;
    let search = || {
        client()
            .post(sc.url("/api/search"))
            .header("Content-Type", "application/json")
            .body(SEARCH)
            .send()
    };
    search().await.unwrap();
    for path in [
        "/api/cache/clear/",
        "/API/cache/clear",
        "/api//cache/clear/",
    ] {
        let r = client().post(sc.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let stats = mock.stats().await;
    assert_eq!(stats["by_path"]["/api/cache/clear/"], 2, "{stats}");
    assert_eq!(stats["by_path"]["/API/cache/clear"], 1, "{stats}");
    let again = search().await.unwrap();
    assert_eq!(
        again.headers()["x-cache"],
        "HIT",
        "the cache was not cleared"
    );
}

/// A gauge of `/metrics` (the first series whose line starts with `series`).
fn gauge(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// An answer read ahead for a client that does not read is charged to
/// `memory_budget` (`/metrics` and the legacy JSON) until its bytes are
/// written or dropped: the charge is given back when the client leaves.
#[tokio::test]
async fn answers_read_ahead_are_charged_until_written() {
    let mock = Mock::start();
    let toml = "response_buffer = 16777216\n[rate_limit]\nenabled = false\n";
    let sc = Sidecar::start(&mock.url(), toml).await;
    let answers = "rag_sidecar_memory_budget_bytes{use=\"answers\"}";
    let mut held = TcpStream::connect(sc.addr).await.unwrap();
    held.write_all(b"GET /__mock/blob?bytes=16000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // More than the sockets' buffers can take stays charged.
    common::eventually("the unread answer to be charged", async || {
        gauge(&sc.get_text("/metrics").await, answers).unwrap_or(0.0) > 4_000_000.0
    })
    .await;
    let text = sc.get_text("/metrics").await;
    assert_eq!(
        gauge(&text, "rag_sidecar_memory_budget_limit_bytes"),
        Some(67_108_864.0)
    );
    let legacy = sc.get_json("/api/metrics").await;
    assert!(
        legacy["gauges"]["memory_budget.answers"]
            .as_u64()
            .unwrap_or(0)
            > 4_000_000,
        "{legacy}"
    );
    assert_eq!(legacy["gauges"]["memory_budget.limit"], 67_108_864);
    drop(held);
    common::eventually("the charge to be given back", async || {
        gauge(&sc.get_text("/metrics").await, answers) == Some(0.0)
    })
    .await;
}
