//! Streamed answers through the cache, over real sockets, with the mock
//! app's streamed RAG answer (`Accept: text/event-stream`): stored after a
//! clean end and replayed byte for byte; never stored after a break, a
//! silence past the route's timeout or when too large (and the memory
//! comes back); identical concurrent streams share one upstream call, each
//! client getting the events live; a client that does not read delays
//! nobody. And the request's own cache directives (RFC 9111 §5.2.1).

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock is right here"
)]

mod common;

use std::io::Write;

use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

use common::{Mock, Sidecar, client};
use futures_util::StreamExt;
use serde_json::{Value, json};

const SSE: &str = "text/event-stream";

fn rag(sc: &Sidecar, q: &str, accept: &str, headers: &[(&str, &str)]) -> reqwest::RequestBuilder {
    let mut req = client()
        .post(sc.url("/api/rag/query"))
        .header("accept", accept)
        .json(&json!({"query": q, "top_k": 2}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn upstream_rag(mock: &Mock) -> u64 {
    mock.stats().await["by_path"]["/api/rag/query"]
        .as_u64()
        .unwrap_or(0)
}

async fn rag_ns(sc: &Sidecar) -> Value {
    sc.get_json("/api/cache/stats").await["namespaces"]["rag"].clone()
}

#[tokio::test]
async fn a_clean_stream_is_stored_and_replayed_byte_for_byte() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let first = rag(&sc, "stream me", SSE, &[]).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-cache"), "MISS");
    assert!(header(&first, "content-type").starts_with(SSE));
    let streamed = first.bytes().await.unwrap();
    let text = String::from_utf8_lossy(&streamed).to_string();
    assert_eq!(text.matches("data: ").count(), 6, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // Stored once the stream ended: replayed at once, byte for byte.
    common::eventually("stored", async || rag_ns(&sc).await["items"] == 1).await;
    let hit = rag(&sc, "stream me", SSE, &[]).send().await.unwrap();
    assert_eq!(header(&hit, "x-cache"), "HIT");
    assert!(header(&hit, "cache-status").starts_with("rag-sidecar; hit; ttl="));
    assert!(header(&hit, "content-type").starts_with(SSE));
    assert_eq!(header(&hit, "age"), "0");
    assert_eq!(hit.bytes().await.unwrap(), streamed);
    assert_eq!(upstream_rag(&mock).await, 1);
    // The JSON answer to the same question is another entry (Accept is in
    // the key).
    let json_answer = rag(&sc, "stream me", "application/json", &[])
        .send()
        .await
        .unwrap();
    assert_eq!(header(&json_answer, "x-cache"), "MISS");
    assert!(header(&json_answer, "content-type").starts_with("application/json"));
    assert_eq!(upstream_rag(&mock).await, 2);
}

/// A stream that does not end cleanly: the client's read fails or is cut,
/// nothing is stored and the namespace holds nothing.
async fn not_stored(sc: &Sidecar, mock: &Mock, q: &str, headers: &[(&str, &str)]) {
    let before = upstream_rag(mock).await;
    let r = rag(sc, q, SSE, headers).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.bytes().await;
    if let Ok(b) = &body {
        assert!(
            !String::from_utf8_lossy(b).contains("[DONE]"),
            "the stream was not supposed to end cleanly"
        );
    }
    let ns = rag_ns(sc).await;
    assert_eq!(
        (ns["items"].as_u64(), ns["bytes"].as_u64()),
        (Some(0), Some(0)),
        "{ns}"
    );
    // Asked again: not a hit, the upstream is called again.
    let again = rag(sc, q, SSE, headers).send().await.unwrap();
    assert_eq!(header(&again, "x-cache"), "MISS");
    let _ = again.bytes().await;
    assert_eq!(upstream_rag(mock).await, before + 2);
}

#[tokio::test]
async fn a_broken_stream_is_not_stored() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    not_stored(
        &sc,
        &mock,
        "break me",
        &[("x-mock-stream-break-after", "2")],
    )
    .await;
}

#[tokio::test]
async fn a_stream_silent_past_the_route_timeout_is_not_stored() {
    let mock = Mock::start();
    let sc = Sidecar::start(
        &mock.url(),
        "[[routes]]\nname = \"rag\"\ntimeout = \"300ms\"\n",
    )
    .await;
    not_stored(
        &sc,
        &mock,
        "slow me",
        &[
            ("x-mock-stream-interval-ms", "800"),
            ("x-mock-stream-events", "2"),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_stream_larger_than_the_limit_reaches_its_client_whole_but_is_not_stored() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "[cache]\nmax_body_bytes = 4096\n").await;
    let r = rag(
        &sc,
        "too long",
        SSE,
        &[
            ("x-mock-stream-events", "20"),
            ("x-mock-stream-pad", "1000"),
            ("x-mock-stream-interval-ms", "1"),
        ],
    )
    .send()
    .await
    .unwrap();
    let body = r.bytes().await.unwrap();
    assert!(body.len() > 20_000, "{}", body.len());
    assert!(String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"));
    let ns = rag_ns(&sc).await;
    assert_eq!(
        (ns["items"].as_u64(), ns["bytes"].as_u64()),
        (Some(0), Some(0)),
        "{ns}"
    );
}

#[tokio::test]
async fn five_identical_streams_make_one_upstream_call_and_get_every_event_live() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let interval = [
        ("x-mock-stream-interval-ms", "200"),
        ("x-mock-stream-events", "5"),
    ];
    let start = Instant::now();
    let clients = (0..5).map(|_| {
        let req = rag(&sc, "live", SSE, &interval);
        async move {
            let r = req.send().await.unwrap();
            let x = header(&r, "cache-status");
            let mut body = r.bytes_stream();
            let mut first = None;
            let mut all = Vec::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.unwrap();
                if first.is_none() && !chunk.is_empty() {
                    first = Some(start.elapsed());
                }
                all.extend_from_slice(&chunk);
            }
            (first.unwrap(), start.elapsed(), all, x)
        }
    });
    let results = futures_util::future::join_all(clients).await;
    assert_eq!(upstream_rag(&mock).await, 1);
    let ended = results.iter().map(|r| r.1).min().unwrap();
    for (first, _, all, _) in &results {
        assert!(
            *first < ended,
            "a first event at {first:?}, the stream ended at {ended:?}"
        );
        // The first event comes one interval in, long before the fifth.
        assert!(*first < Duration::from_millis(700), "{first:?}");
        assert_eq!(all, &results[0].2);
    }
    let collapsed = results
        .iter()
        .filter(|r| r.3 == "rag-sidecar; fwd=miss; collapsed")
        .count();
    assert_eq!(
        collapsed,
        4,
        "{:?}",
        results.iter().map(|r| &r.3).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_client_that_does_not_read_delays_nobody() {
    let mock = Mock::start();
    // Room for a 6.4 MiB stream in the copy.
    let sc = Sidecar::start(
        &mock.url(),
        "[cache]\nmax_body_bytes = 8388608\nmax_memory_bytes = 268435456\n",
    )
    .await;
    let stream_headers = "X-Mock-Stream-Events: 100\r\nX-Mock-Stream-Pad: 65536\r\nX-Mock-Stream-Interval-Ms: 10\r\n";
    // The slow client: a raw socket with a 4 KiB receive window that sends
    // its request and reads nothing.
    let addr = sc.url("").trim_start_matches("http://").to_string();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.parse::<std::net::SocketAddr>().unwrap().into())
        .unwrap();
    let mut slow: std::net::TcpStream = sock.into();
    let body = json!({"query": "shared and slow", "top_k": 2}).to_string();
    write!(
        slow,
        "POST /api/rag/query HTTP/1.1\r\nHost: {addr}\r\nAccept: {SSE}\r\nContent-Type: application/json\r\n{stream_headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    common::eventually("the slow client's call in the app", async || {
        upstream_rag(&mock).await == 1
    })
    .await;
    // The fast client joins the same stream and reads it all at once.
    let t = Instant::now();
    let fast = client()
        .post(sc.url("/api/rag/query"))
        .header("host", &addr)
        .header("accept", SSE)
        .header("content-type", "application/json")
        .header("x-mock-stream-events", "100")
        .header("x-mock-stream-pad", "65536")
        .header("x-mock-stream-interval-ms", "10")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let fast_cache = header(&fast, "cache-status");
    let fast_body = fast.bytes().await.unwrap();
    let took = t.elapsed();
    assert_eq!(fast_cache, "rag-sidecar; fwd=miss; collapsed");
    assert!(fast_body.len() > 6_000_000, "{}", fast_body.len());
    assert!(
        took < Duration::from_secs(5),
        "the fast client took {took:?}"
    );
    assert_eq!(upstream_rag(&mock).await, 1);
    // The slow client, reading now, gets every byte too (asynchronously:
    // the sidecar runs on this test's runtime).
    slow.set_nonblocking(true).unwrap();
    let mut slow = tokio::net::TcpStream::from_std(slow).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    // (Chunked: the last chunk is the empty one.)
    while !got.ends_with(b"\r\n0\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
            .await
            .expect("the rest of the stream")
            .unwrap();
        assert!(n > 0, "closed early after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.len() > fast_body.len());
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(text.contains("data: [DONE]\n\n"));
}

#[tokio::test]
async fn request_directives() {
    let mock = Mock::start();
    let sc = Sidecar::start(
        &mock.url(),
        "[rate_limit]\nenabled = false\n[[routes]]\nname = \"search\"\ncache = { ttl = \"1s\" }\n",
    )
    .await;
    let searches = async || {
        mock.stats().await["by_path"]["/api/search"]
            .as_u64()
            .unwrap_or(0)
    };
    let ask = async |cc: &str| {
        let mut req = client()
            .post(sc.url("/api/search"))
            .json(&json!({"query": "directives", "top_k": 2}));
        if !cc.is_empty() {
            req = req.header("cache-control", cc);
        }
        let r = req.send().await.unwrap();
        let out = (
            r.status().as_u16(),
            header(&r, "x-cache"),
            header(&r, "cache-status"),
        );
        (out, r.json::<Value>().await.unwrap())
    };
    // only-if-cached with nothing stored: 504, the app never asked.
    let ((status, x, cs), body) = ask("only-if-cached").await;
    assert_eq!(
        (status, x.as_str(), cs.as_str()),
        (504, "MISS", "rag-sidecar; detail=only-if-cached")
    );
    assert_eq!(
        body,
        json!({"error": "Gateway timeout", "message": "Not in cache (only-if-cached)"})
    );
    assert_eq!(searches().await, 0);
    // Stored, then only-if-cached is a hit; an unknown directive is ignored.
    assert_eq!(ask("").await.0.1, "MISS");
    assert_eq!(ask("only-if-cached, x-unknown=\"a, b\"").await.0.1, "HIT");
    assert_eq!(searches().await, 1);
    // min-fresh beyond the TTL: fetched (and stored) again.
    let ((_, x, cs), _) = ask("min-fresh=3600").await;
    assert_eq!(x, "MISS");
    assert!(
        cs.starts_with("rag-sidecar; fwd=miss; detail=min-fresh; stored"),
        "{cs}"
    );
    assert_eq!(searches().await, 2);
    // Past its 1 s TTL: max-stale serves it at once, marked.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let ((status, x, cs), _) = ask("max-stale").await;
    assert_eq!((status, x.as_str()), (200, "STALE"));
    assert!(
        cs.starts_with("rag-sidecar; hit; ttl=-") && cs.ends_with("detail=max-stale"),
        "{cs}"
    );
    assert_eq!(ask("max-stale=30").await.0.1, "STALE");
    assert_eq!(searches().await, 2);
    // max-age bounds the age it accepts, stale or not.
    let ((_, x, cs), _) = ask("max-stale, max-age=0").await;
    assert_eq!(x, "MISS");
    assert!(
        cs.starts_with("rag-sidecar; fwd=miss; detail=max-age; stored"),
        "{cs}"
    );
    assert_eq!(searches().await, 3);
    // Fresh again: max-age=0 accepts an answer of age 0.
    assert_eq!(ask("max-age=0").await.0.1, "HIT");
    // Without max-stale an expired entry is fetched again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let ((_, x, cs), _) = ask("").await;
    assert_eq!(x, "MISS");
    assert!(cs.starts_with("rag-sidecar; fwd=stale; stored"), "{cs}");
    // no-cache and no-store as before.
    assert!(
        ask("no-cache")
            .await
            .0
            .2
            .starts_with("rag-sidecar; fwd=request")
    );
    assert_eq!(ask("no-store").await.0.1, "BYPASS");
}
