//! End-to-end proxy behaviour over real sockets: the sidecar in front of the
//! mock legacy app (a real process). Streaming both ways, header rewriting,
//! request ids, h2c, and every error the proxy answers itself.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock and a plain lock are right here"
)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Mock, Sidecar, client, closed_port};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn json_of(resp: reqwest::Response) -> Value {
    resp.json().await.unwrap()
}

#[tokio::test]
async fn forwards_and_returns_the_apps_answer() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let resp = client()
        .post(sc.url("/api/search"))
        .json(&serde_json::json!({"query": "Học máy là gì?", "top_k": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = json_of(resp).await;
    assert_eq!(body["count"], 3);
    assert_eq!(body["query"], "Học máy là gì?");
    assert_eq!(mock.stats().await["by_path"]["/api/search"], 1);
}

#[tokio::test]
async fn h2c_clients_are_served_and_forwarded_as_http11() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2.get(sc.url("/__mock/echo?x=1")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let echo = json_of(resp).await;
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["query"], "x=1");
    assert_eq!(echo["headers"]["host"][0], sc.addr.to_string());
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let resp = client()
        .get(sc.url("/__mock/echo"))
        .header("Connection", "X-Secret-Hop, keep-alive")
        .header("X-Secret-Hop", "must-not-pass")
        .header("Keep-Alive", "timeout=5")
        .header("Proxy-Authorization", "Basic Zm9vOmJhcg==")
        .header("TE", "trailers")
        .header("X-Kept", "yes")
        .send()
        .await
        .unwrap();
    // The app's hop-by-hop headers, and the one its Connection names, stop here.
    for h in ["x-mock-hop", "keep-alive", "proxy-authenticate"] {
        assert!(resp.headers().get(h).is_none(), "{h} leaked to the client");
    }
    assert_eq!(resp.headers()["x-mock-end"], "kept");
    let echo = json_of(resp).await;
    let headers = echo["headers"].as_object().unwrap();
    for h in ["x-secret-hop", "keep-alive", "proxy-authorization", "te"] {
        assert!(!headers.contains_key(h), "{h} leaked upstream: {echo}");
    }
    assert_eq!(headers["x-kept"][0], "yes");
}

#[tokio::test]
async fn forwarded_headers_are_set() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let resp = client()
        .get(sc.url("/__mock/echo"))
        .header("X-Forwarded-For", "203.0.113.9")
        .header("X-Forwarded-Proto", "https")
        .header("Host", "rag.example.com")
        .send()
        .await
        .unwrap();
    let echo = json_of(resp).await;
    let h = &echo["headers"];
    // Appended, not replaced; -Proto from an untrusted peer is not believed.
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["x-forwarded-host"][0], "rag.example.com");
    assert_eq!(h["host"][0], "rag.example.com");

    let trusted = Sidecar::start(&mock.url(), "trusted_proxies = [\"127.0.0.0/8\"]").await;
    let echo = json_of(
        client()
            .get(trusted.url("/__mock/echo"))
            .header("X-Forwarded-Proto", "https")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");
}

#[tokio::test]
async fn request_id_is_kept_or_generated_and_sent_both_ways() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let resp = client()
        .get(sc.url("/__mock/echo"))
        .header("X-Request-Id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "req-42");
    assert_eq!(json_of(resp).await["headers"]["x-request-id"][0], "req-42");

    let resp = client().get(sc.url("/__mock/echo")).send().await.unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(
        json_of(resp).await["headers"]["x-request-id"][0],
        id.as_str()
    );

    // An id that is too long (it would be forwarded, echoed and logged in
    // full) or not plain visible ASCII is replaced by a fresh one.
    for unfit in ["x".repeat(20_000), "two words".to_string()] {
        let resp = client()
            .get(sc.url("/__mock/echo"))
            .header("X-Request-Id", unfit.as_str())
            .send()
            .await
            .unwrap();
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(id.len(), 36, "a UUID instead of {:.20}: {id}", unfit);
        assert_eq!(
            json_of(resp).await["headers"]["x-request-id"][0],
            id.as_str()
        );
    }

    // The sidecar's own error answers carry it too.
    let dead = closed_port();
    // (Retries off: connection errors would otherwise be retried first.)
    let down = Sidecar::start(&dead.url(), "[retry]\nenabled = false\n").await;
    let resp = client()
        .get(down.url("/api/stats"))
        .header("X-Request-Id", "req-43")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-request-id"], "req-43");
}

#[tokio::test]
async fn sse_reaches_the_client_chunk_by_chunk() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let resp = client()
        .get(sc.url("/__mock/sse?events=3&gate=g1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    // The first event arrives while the app is still blocked on the gate:
    // nothing between the app and the client holds the body back.
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first event did not arrive before the upstream finished")
        .unwrap()
        .unwrap();
    assert_eq!(first, Bytes::from_static(b"data: event 1\n\n"));
    client()
        .post(format!("{}/__mock/gate/g1", mock.url()))
        .send()
        .await
        .unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, b"data: event 2\n\ndata: event 3\n\n");
}

#[tokio::test]
async fn an_unbuffered_upload_streams_to_the_app_without_being_held() {
    let mock = Mock::start();
    // request_buffering off: the body goes to the app as it is read (on by
    // default for upload; tests/app_server.rs shows why).
    let sc = Sidecar::start(
        &mock.url(),
        "[[routes]]\nname = \"upload\"\nrequest_buffering = false\n",
    )
    .await;
    const CHUNK: usize = 1 << 20;
    const TOTAL: usize = 20 * CHUNK;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let req = client()
        .post(sc.url("/api/upload"))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send();
    let upload = tokio::spawn(req);
    tx.send(Ok(Bytes::from(vec![b'a'; CHUNK]))).await.unwrap();
    // The app has the first megabyte while the client still holds the other
    // nineteen: the sidecar forwards as it reads.
    mock.wait_stats("first chunk upstream", |s| {
        s["upload_bytes_in_progress"].as_u64() >= Some(CHUNK as u64)
    })
    .await;
    for _ in 1..20 {
        tx.send(Ok(Bytes::from(vec![b'b'; CHUNK]))).await.unwrap();
    }
    drop(tx);
    let resp = upload.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(json_of(resp).await["bytes"], TOTAL);
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn upstream_refused_is_502_json() {
    let dead = closed_port();
    let sc = Sidecar::start(&dead.url(), "[retry]\nenabled = false\n").await;
    let resp = client().get(sc.url("/api/documents")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body = json_of(resp).await;
    assert_eq!(body["error"], "Bad gateway");
    assert!(
        body["message"].as_str().unwrap().contains("unreachable"),
        "{body}"
    );
}

#[tokio::test]
async fn route_timeout_is_504_json() {
    let mock = Mock::start();
    let sc = Sidecar::start(
        &mock.url(),
        "[[routes]]\nname = \"default\"\ntimeout = \"300ms\"\n",
    )
    .await;
    let started = std::time::Instant::now();
    let resp = client()
        .get(sc.url("/api/stats"))
        .header("X-Mock-Delay-Ms", "5000")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let body = json_of(resp).await;
    assert_eq!(body["error"], "Gateway timeout");
    assert!(
        body["message"].as_str().unwrap().contains("300ms"),
        "{body}"
    );
    // Another route keeps its own timeout.
    let ok = client().get(sc.url("/api/stats")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn oversized_bodies_are_413_json() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "max_request_body = 1024\n").await;
    // Declared length over the limit: refused before anything is forwarded.
    let resp = client()
        .post(sc.url("/api/upload"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body = json_of(resp).await;
    assert_eq!(body["error"], "Payload too large");
    assert!(body["message"].as_str().unwrap().contains("1024"), "{body}");
    assert_eq!(mock.stats().await["requests"], 0);
    // Chunked (no length): cut off mid-stream, still a 413 answer.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; 512]))),
    );
    let resp = client()
        .post(sc.url("/api/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(json_of(resp).await["error"], "Payload too large");
    // On a cached route too, at once: the cache's key reads the body first,
    // and a declared 60 MB must not wait for it.
    let mut s = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    s.write_all(
        b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000000\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    // Within the limit: forwarded.
    let resp = client()
        .post(sc.url("/api/upload"))
        .body(vec![b'z'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn inflight_cap_sheds_with_503_json() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "max_inflight = 2\n").await;
    let slow = |c: reqwest::Client, url: String| {
        tokio::spawn(async move {
            c.get(url)
                .header("X-Mock-Delay-Ms", "2000")
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let a = slow(client(), sc.url("/api/stats"));
    let b = slow(client(), sc.url("/api/stats"));
    mock.wait_stats("two requests in flight", |s| s["in_flight"] == 2)
        .await;
    let started = std::time::Instant::now();
    let resp = client().get(sc.url("/api/stats")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "shed at once, not queued"
    );
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(json_of(resp).await["error"], "Service unavailable");
    // The admin endpoints are not behind the cap.
    assert_eq!(sc.get_status("/healthz").await, 200);
    assert_eq!(a.await.unwrap(), 200);
    assert_eq!(b.await.unwrap(), 200);
    assert_eq!(sc.get_status("/api/stats").await, 200);
}

#[tokio::test]
async fn slowloris_connections_are_closed() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "header_read_timeout = \"300ms\"\n").await;
    // The sidecar closes the connection (hyper may first write a 408).
    let buf = closed_after(&sc, b"GET /api/stats HTTP/1.1\r\nHost: x\r\nX-Slow: ").await;
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(mock.stats().await["requests"], 0);
    // Connections that send nothing, or half an h2c preface, are closed too.
    for opening in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        closed_after(&sc, opening).await;
    }
    // The server still serves others.
    assert_eq!(sc.get_status("/api/stats").await, 200);
}

#[tokio::test]
async fn idle_h2c_connections_are_closed_and_busy_ones_kept() {
    let mock = Mock::start_with(&["--search-latency-ms", "1000"]);
    let sc = Sidecar::start(&mock.url(), "header_read_timeout = \"300ms\"\n").await;
    // A full preface and SETTINGS, then no stream: closed (a GOAWAY, then
    // the connection), as an HTTP/1.1 connection idle that long is.
    let buf = closed_after(&sc, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await;
    // GOAWAY is frame type 7.
    assert!(h2_frame_types(&buf).contains(&7), "no GOAWAY in {buf:?}");
    // A stream that takes longer than the idle bound is not cut.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let search = |q: &str| {
        h2.post(sc.url("/api/search"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"query": "{q}", "top_k": 1}}"#))
            .send()
    };
    let resp = search("slow one").await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(search("slow two").await.unwrap().status(), 200);
}

/// What the sidecar wrote on a connection that sent `opening` and nothing
/// more, until it closed it; fails if it is still open after 5 s.
async fn closed_after(sc: &Sidecar, opening: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    s.write_all(opening).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "still open after 5 s, having sent {opening:?}"
    );
    buf
}

/// The types of the HTTP/2 frames in `bytes` (after no preface: a server's).
fn h2_frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = usize::from(bytes[at]) << 16
            | usize::from(bytes[at + 1]) << 8
            | usize::from(bytes[at + 2]);
        types.push(bytes[at + 3]);
        at += 9 + len;
    }
    types
}

#[tokio::test]
async fn a_port_another_sidecar_holds_is_an_error_not_shared() {
    let mock = Mock::start();
    let addr = common::free_addr();
    let toml = format!("listen = \"{addr}\"\nupstream = \"{}\"\n", mock.url());
    let first = rag_sidecar::app::App::bind(common::config(&toml, &[]))
        .await
        .unwrap();
    // Both would set SO_REUSEPORT; the second must still be refused, or the
    // kernel would split connections between two configurations.
    let second = rag_sidecar::app::App::bind(common::config(&toml, &[])).await;
    let err = second.expect_err("second bind refused");
    assert!(err.to_string().contains("cannot listen"), "{err}");
    drop(first);
}
