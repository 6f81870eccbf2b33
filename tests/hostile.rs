//! Hostile input over raw sockets: huge and numerous headers, smuggling
//! attempts, dot segments, invalid UTF-8, malformed and absurdly deep JSON
//! on cached routes, identity collisions and the admin guard on every
//! mutating endpoint. Each gets a 4xx (or the connection closed), and the
//! sidecar serves the next good request.

mod common;

use std::time::Duration;

use common::{Mock, Sidecar, client};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes and reads the first answer's head (or until the peer
/// closes, or 5 s pass); returns its status code, if any.
async fn raw(sc: &Sidecar, bytes: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    // The peer may close before all is written (that is an answer too).
    let _ = s.write_all(bytes).await;
    let text = common::read_head(&mut s, Duration::from_secs(5)).await;
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
}

async fn still_serves(sc: &Sidecar) {
    let r = client().get(sc.url("/api/stats")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the sidecar still serves good requests");
}

#[tokio::test]
async fn huge_or_numerous_headers_are_refused_and_nothing_breaks() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    for size in [100 * 1024, 1024 * 1024] {
        let req = format!(
            "GET /api/stats HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(size)
        );
        let status = raw(&sc, req.as_bytes()).await;
        assert!(
            matches!(status, None | Some(431) | Some(400)),
            "{size}: {status:?}"
        );
        still_serves(&sc).await;
    }
    let many: String = (0..10_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET /api/stats HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    let status = raw(&sc, req.as_bytes()).await;
    assert!(matches!(status, None | Some(431) | Some(400)), "{status:?}");
    still_serves(&sc).await;
    // Only the three good requests reached the app.
    assert_eq!(mock.stats().await["requests"], 3);
}

#[tokio::test]
async fn request_smuggling_attempts_are_refused() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    for req in [
        // Two different Content-Lengths.
        "POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        // Content-Length and chunked together, a smuggled request behind.
        "POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/admin HTTP/1.1\r\nHost: x\r\n\r\n",
        // An absurd length.
        "POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        // A transfer coding that is not chunked.
        "POST /api/search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nxx",
    ] {
        let status = raw(&sc, req.as_bytes()).await;
        assert!(
            matches!(status, None | Some(400) | Some(413) | Some(501)),
            "{req:?}: {status:?}"
        );
        still_serves(&sc).await;
    }
    let stats = mock.stats().await;
    assert!(
        stats["by_path"].get("/api/admin").is_none(),
        "nothing smuggled: {stats}"
    );
    // With both headers, hyper frames the body by Transfer-Encoding (RFC 9112
    // §6.3), drops Content-Length and closes the connection after the
    // answer: the app got one search with the empty chunked body (and
    // answered it 400), never the request hidden behind it.
    assert!(
        stats["by_path"]["/api/search"].as_u64() <= Some(1),
        "{stats}"
    );
    // RFC 9112 §3.2: no Host, or two, is a 400 from the sidecar itself
    // (the app would otherwise see whichever the proxy picked); HTTP/1.0
    // may go without.
    let before = mock.stats().await["requests"].as_u64();
    for req in [
        "GET /api/stats HTTP/1.1\r\n\r\n",
        "GET /api/stats HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET /api/cache/stats HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ] {
        assert_eq!(raw(&sc, req.as_bytes()).await, Some(400), "{req:?}");
    }
    assert_eq!(mock.stats().await["requests"].as_u64(), before);
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    s.write_all(b"GET /api/stats HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
}

#[tokio::test]
async fn dot_segments_and_invalid_utf8_do_not_reach_admin_endpoints() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "[admin]\ntoken = \"t\"\n").await;
    for path in [
        "/api/x/../cache/clear",
        "/api/./cache/clear",
        "/api/cache/clear/.",
        "/api/%2e%2e/api/cache/clear",
        "/api/circuit-breakers/x/%2E%2E/reset",
    ] {
        let req = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        let status = raw(&sc, req.as_bytes()).await;
        assert_eq!(status, Some(400), "{path}");
    }
    assert_eq!(mock.stats().await["requests"], 0, "none reached the app");
    // Invalid UTF-8 in the path (percent-encoded) is the app's business:
    // proxied as it is, no crash.
    let status = raw(
        &sc,
        b"GET /api/documents/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(
        status.is_some_and(|s| (200..500).contains(&s)),
        "{status:?}"
    );
    // Raw bytes above 0x7f in the request line are not HTTP.
    let status = raw(&sc, b"GET /api/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(matches!(status, None | Some(400)), "{status:?}");
    still_serves(&sc).await;
}

#[tokio::test]
async fn malformed_and_absurdly_deep_json_pass_through_uncached() {
    let mock = Mock::start_with(&["--search-latency-ms", "0"]);
    let sc = Sidecar::start(&mock.url(), "[rate_limit]\nenabled = false\n").await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    for body in ["{not json", deep.as_str()] {
        for _ in 0..2 {
            let r = client()
                .post(sc.url("/api/search"))
                .header("Content-Type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            // The app's own 400, never a 500 of ours, and never cached.
            assert_eq!(r.status(), 400);
            assert_ne!(
                r.headers().get("x-cache").map(|v| v.to_str().unwrap()),
                Some("HIT")
            );
        }
    }
    assert_eq!(mock.stats().await["by_path"]["/api/search"], 4);
    still_serves(&sc).await;
}

#[tokio::test]
async fn identities_never_share_cache_entries() {
    let mock = Mock::start_with(&["--search-latency-ms", "0"]);
    let sc = Sidecar::start(&mock.url(), "[rate_limit]\nenabled = false\n").await;
    let ask = |auth: Option<&'static str>| {
        let mut r = client()
            .post(sc.url("/api/search"))
            .json(&json!({"query": "same question"}));
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        r.send()
    };
    let x_cache = |r: &reqwest::Response| r.headers()["x-cache"].to_str().unwrap().to_string();
    assert_eq!(x_cache(&ask(Some("Bearer alice")).await.unwrap()), "MISS");
    assert_eq!(x_cache(&ask(Some("Bearer bob")).await.unwrap()), "MISS");
    assert_eq!(x_cache(&ask(None).await.unwrap()), "MISS");
    // Values made to look like another's with separators added.
    assert_eq!(
        x_cache(&ask(Some("Bearer alice ")).await.unwrap()),
        "HIT",
        "trailing space is not part of a header value"
    );
    assert_eq!(x_cache(&ask(Some("Bearer  alice")).await.unwrap()), "MISS");
    assert_eq!(
        x_cache(&ask(Some("Bearer alice\tx")).await.unwrap()),
        "MISS"
    );
    assert_eq!(x_cache(&ask(Some("Bearer alice")).await.unwrap()), "HIT");
}

#[tokio::test]
async fn every_mutating_admin_endpoint_needs_loopback_or_the_token() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "[admin]\ntoken = \"right\"\n").await;
    for path in [
        "/api/cache/clear",
        "/api/circuit-breakers/reset",
        "/api/metrics/reset",
    ] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("Basic cmlnaHQ="),
            Some("Bearer righ"),
            Some("Bearer right2"),
        ] {
            let mut r = client().post(sc.url(path));
            if let Some(a) = auth {
                r = r.header("Authorization", a);
            }
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 403, "{path} {auth:?}");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"], "Forbidden");
        }
        let r = client()
            .post(sc.url(path))
            .bearer_auth("right")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert_eq!(mock.stats().await["requests"], 0);
}

#[tokio::test]
async fn an_h2_stream_reset_mid_upload_ends_the_upstream_request_and_nothing_else() {
    let mock = Mock::start();
    // Streamed to the app (request_buffering off), so the reset must reach it.
    let toml = "[rate_limit]\nenabled = false\n\
                [[routes]]\nname = \"upload\"\nrequest_buffering = false\n";
    let sc = Sidecar::start(&mock.url(), toml).await;
    let tcp = TcpStream::connect(sc.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/api/upload?filename=big.bin", sc.addr))
        .body(())
        .unwrap();
    let (resp, mut stream) = h2.send_request(req, false).unwrap();
    // Half a megabyte reaches the app, then the client resets the stream.
    stream.reserve_capacity(512 * 1024);
    for _ in 0..8 {
        stream
            .send_data(bytes::Bytes::from(vec![b'x'; 64 * 1024]), false)
            .unwrap();
    }
    let stats = mock
        .wait_stats("the upload under way", |s| {
            s["upload_bytes_in_progress"].as_u64() > Some(0)
        })
        .await;
    assert!(stats["upload_bytes_in_progress"].as_u64() <= Some(512 * 1024));
    stream.send_reset(h2::Reason::CANCEL);
    // The upstream request ends too: nothing is left in progress at the app.
    mock.wait_stats("the upstream upload aborted", |s| {
        s["upload_bytes_in_progress"] == 0 && s["in_flight"] == 0
    })
    .await;
    assert!(resp.await.is_err(), "the stream was reset");
    // The same connection and the sidecar carry on.
    let (resp, _) = h2
        .send_request(
            http::Request::get(format!("http://{}/api/stats", sc.addr))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    still_serves(&sc).await;
}

/// A request body that breaks off is the client's doing, not the app's:
/// a malformed chunk gets a 400 JSON answer, on a streamed route and on a
/// cached one (whose key reads the body first), and uploads abandoned part
/// way (the client stops writing) count as nothing for the shared circuit —
/// before, six of them opened it for every route.
#[tokio::test]
async fn broken_request_bodies_are_the_clients_and_never_open_the_circuit() {
    let mock = Mock::start();
    let toml = "[rate_limit]\nenabled = false\n[retry]\nmax_retries = 0\n\
                [circuit_breaker]\nthreshold = 5\ntimeout = \"60s\"\n";
    let sc = Sidecar::start(&mock.url(), toml).await;
    for path in ["/api/upload", "/api/search"] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n5\r\n{{\"a\":\r\nzz\r\n"
        );
        assert_eq!(raw(&sc, req.as_bytes()).await, Some(400), "{path}");
    }
    for i in 0..6 {
        // The client stops sending and hangs up its side; the sidecar's
        // answer (whatever it is) or its close ends the exchange.
        let head = partial_upload(&sc, true).await;
        assert!(
            head.is_empty() || head.starts_with("HTTP/1.1 400"),
            "abort {i}: {head}"
        );
    }
    upstream_circuit_untouched(&sc).await;
    let m = sc.get_json("/api/metrics").await;
    assert_eq!(m["errors"]["connect_error"], 0, "{m}");
    still_serves(&sc).await;
}

/// Starts an upload of 100 000 bytes, sends a few, then stops (and with
/// `hang_up`, shuts its side down); the answer's head, or "" if the
/// sidecar closed without one (5 s at most).
async fn partial_upload(sc: &Sidecar, hang_up: bool) -> String {
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    s.write_all(
        b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nfirst bytes",
    )
    .await
    .unwrap();
    if hang_up {
        s.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = async {
        while answer.len() < 12 {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The shared `upstream` circuit is closed with no failure counted.
async fn upstream_circuit_untouched(sc: &Sidecar) {
    let c = sc.get_json("/api/circuit-breakers").await;
    assert_eq!(c["upstream"]["state"], "closed", "{c}");
    assert_eq!(c["upstream"]["failure_count"], 0, "{c}");
}

/// An upload that stalls (the client stops sending but keeps the
/// connection) until the route's deadline is the client's timeout: 408,
/// not a 504 counted against the upstream. Three of them leave a
/// two-failure circuit closed.
#[tokio::test]
async fn a_stalled_upload_is_a_client_timeout_not_an_upstream_one() {
    let mock = Mock::start();
    let toml = "[rate_limit]\nenabled = false\n[retry]\nmax_retries = 0\n\
                [circuit_breaker]\nthreshold = 2\ntimeout = \"60s\"\n\
                [[routes]]\nname = \"upload\"\ntimeout = \"300ms\"\n\
                request_buffering = false\n";
    let sc = Sidecar::start(&mock.url(), toml).await;
    for i in 0..3 {
        // The client stops sending but keeps the connection open (the
        // body streams to the app: request_buffering is off).
        let head = partial_upload(&sc, false).await;
        assert!(head.starts_with("HTTP/1.1 408"), "stall {i}: {head}");
    }
    upstream_circuit_untouched(&sc).await;
    let m = sc.get_json("/api/metrics").await;
    assert_eq!(m["errors"]["timeout"], 0, "{m}");
    assert_eq!(m["errors"]["client_timeout"], 3, "{m}");
    // A slow app with the whole body in hand is still the app's timeout:
    // 504, counted.
    let r = client()
        .post(sc.url("/api/upload"))
        .header("X-Mock-Delay-Ms", "2000")
        .body("whole")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let m = sc.get_json("/api/metrics").await;
    assert_eq!(m["errors"]["timeout"], 1, "{m}");
}

/// Sends raw bytes (with `Connection: close`) and returns the whole answer.
async fn raw_answer(sc: &Sidecar, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn search_request(method: &str, path: &str, extra: &str) -> String {
    let body = r#"{"query": "routing", "top_k": 1}"#;
    format!(
        "{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn paths_are_routed_as_the_app_reads_them() {
    let mock = Mock::start_with(&["--search-latency-ms", "0"]);
    let sc = Sidecar::start(&mock.url(), "").await;
    // Encoded unreserved characters and doubled slashes: the search route
    // (cached: X-Cache), and the app receives the normalised path.
    for path in ["/api/%73earch", "//api/search", "/api//%73earch"] {
        let answer = raw_answer(&sc, search_request("POST", path, "").as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        assert!(
            answer.to_ascii_lowercase().contains("\r\nx-cache: "),
            "{path} took the search route: {answer}"
        );
    }
    let stats = mock.stats().await;
    let by_path = stats["by_path"].as_object().unwrap();
    assert_eq!(by_path.get("/api/search"), Some(&json!(1)), "{stats}");
    assert!(
        by_path
            .keys()
            .all(|p| !p.contains('%') && !p.contains("//")),
        "{stats}"
    );
    // Refused with 400 JSON: an encoded slash, a method in lower case.
    for (method, path) in [
        ("POST", "/api%2Fsearch"),
        ("post", "/api/search"),
        ("Post", "/api/search"),
    ] {
        let answer = raw_answer(&sc, search_request(method, path, "").as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{method} {path}: {answer}"
        );
        assert!(answer.contains("\"error\":\"Bad request\""), "{answer}");
    }
    // The encoded admin path is the admin path (not proxied to the app).
    let answer = raw_answer(
        &sc,
        b"GET /api/%63ache/stats HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.contains("\"namespaces\""), "{answer}");
    assert_eq!(mock.stats().await["by_path"].get("/api/cache/stats"), None);
}

#[tokio::test]
async fn header_names_with_underscores_never_reach_the_app() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let answer = raw_answer(
        &sc,
        b"GET /__mock/echo HTTP/1.1\r\nHost: a\r\nX_User_Id: alice\r\nX-Kept: yes\r\nConnection: close\r\n\r\n",
    )
    .await;
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let echo: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
    let headers = echo["headers"].as_object().unwrap();
    assert!(headers.contains_key("x-kept"), "{echo}");
    assert!(
        !headers.keys().any(|k| k.contains('_') || k == "x-user-id"),
        "{echo}"
    );
}

/// X-Cache of a search with these headers (and this query string).
async fn x_cache_of(sc: &Sidecar, query: &str, headers: &[(&str, &str)]) -> String {
    let mut r = client()
        .post(sc.url(&format!("/api/search{query}")))
        .body(r#"{"query": "poison me", "top_k": 2}"#);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn inputs_that_change_the_answer_are_in_the_cache_key() {
    let mock = Mock::start_with(&["--search-latency-ms", "0"]);
    let sc = Sidecar::start(&mock.url(), "").await;
    let json = ("content-type", "application/json");
    // Each: what the attacker sends (stored), what the victim sends (must
    // not be served the attacker's answer), and the victim again (a hit).
    type Header = (&'static str, &'static str);
    let cases: [(&str, Header, Header); 6] = [
        ("Host", ("host", "evil.example"), ("host", "rag-services")),
        (
            "Accept",
            ("accept", "text/html"),
            ("accept", "application/json"),
        ),
        (
            "Accept-Language",
            ("accept-language", "vi"),
            ("accept-language", "en"),
        ),
        (
            "Content-Type",
            ("content-type", "application/json; charset=latin1"),
            ("content-type", "application/json"),
        ),
        (
            "Cookie",
            ("cookie", "session=attacker"),
            ("cookie", "session=victim"),
        ),
        (
            "Accept-Encoding",
            ("accept-encoding", "gzip"),
            ("accept-encoding", "identity"),
        ),
    ];
    for (i, (what, attacker, victim)) in cases.into_iter().enumerate() {
        let q = format!("?case={i}");
        let with = |h: Header| -> Vec<Header> {
            if h.0 == "content-type" {
                vec![h]
            } else {
                vec![json, h]
            }
        };
        assert_eq!(x_cache_of(&sc, &q, &with(attacker)).await, "MISS", "{what}");
        assert_eq!(
            x_cache_of(&sc, &q, &with(victim)).await,
            "MISS",
            "{what}: the attacker's answer"
        );
        assert_eq!(x_cache_of(&sc, &q, &with(victim)).await, "HIT", "{what}");
    }
    // Codings are reduced: the same set in another order is one key.
    let q = "?case=codings";
    assert_eq!(
        x_cache_of(&sc, q, &[json, ("accept-encoding", "gzip, br")]).await,
        "MISS"
    );
    assert_eq!(
        x_cache_of(&sc, q, &[json, ("accept-encoding", "br,gzip;q=0.5")]).await,
        "HIT"
    );
    // Repeated query names: Flask reads the first.
    assert_eq!(x_cache_of(&sc, "?top=999&top=1", &[json]).await, "MISS");
    assert_eq!(x_cache_of(&sc, "?top=1&top=999", &[json]).await, "MISS");
    assert_eq!(x_cache_of(&sc, "?top=1&top=999", &[json]).await, "HIT");
}

/// A connection with a request the app takes `delay_ms` to answer.
async fn busy_connection(sc: &Sidecar, delay_ms: u64) -> TcpStream {
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    let req = format!("GET /api/stats HTTP/1.1\r\nHost: a\r\nX-Mock-Delay-Ms: {delay_ms}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s
}

/// Whether the sidecar closes `s` (EOF) within 5 s.
async fn closed_by_sidecar(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => true,
        Ok(Ok(n)) => panic!(
            "an answer, not a close: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => false,
    }
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_once() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "threads = 1\nmax_connections = 3\n").await;
    // Three connections, each with a request in progress at the app.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(busy_connection(&sc, 3000).await);
    }
    mock.wait_stats("three requests at the app", |s| s["in_flight"] == 3)
        .await;
    // The fourth is closed before it is read.
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    assert!(
        closed_by_sidecar(&mut s).await,
        "closed at once, not left waiting"
    );
    // One closes: its slot is free again.
    drop(held.pop());
    common::eventually("a slot to come back", async || {
        let r = client()
            .get(sc.url("/healthz"))
            .header("connection", "close")
            .send()
            .await;
        r.is_ok_and(|r| r.status() == 200)
    })
    .await;
}

/// Near the bound, idle keep-alive connections are closed to make room,
/// the oldest first; a connection with a request in progress is never cut,
/// nor one that has just connected.
#[tokio::test]
async fn idle_keep_alive_connections_make_room_first_near_the_bound() {
    let mock = Mock::start();
    // Four slots: the last one free is the reserve.
    let sc = Sidecar::start(&mock.url(), "threads = 1\nmax_connections = 4\n").await;
    let mut busy = busy_connection(&sc, 1500).await;
    mock.wait_stats("the busy request at the app", |s| s["in_flight"] == 1)
        .await;
    // An idle keep-alive connection: one request answered, socket kept.
    let mut idle = TcpStream::connect(sc.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // A third connection takes the slot before the reserve: the idle one
    // is asked to close; the new one is served.
    let mut third = TcpStream::connect(sc.addr).await.unwrap();
    assert!(
        closed_by_sidecar(&mut idle).await,
        "the idle connection was kept"
    );
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    third.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    // The busy one gets its answer.
    let mut answer = [0u8; 12];
    busy.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
}

#[tokio::test]
async fn a_body_that_stalls_between_reads_is_cut_with_408_on_any_route() {
    let mock = Mock::start();
    // The route's own timeout is long; the pause between reads is short.
    let toml = "client_body_timeout = \"300ms\"\n\
                [rate_limit]\nenabled = false\n[retry]\nmax_retries = 0\n\
                [circuit_breaker]\nthreshold = 2\ntimeout = \"60s\"\n\
                [[routes]]\nname = \"upload\"\ntimeout = \"30s\"\n";
    let sc = Sidecar::start(&mock.url(), toml).await;
    for i in 0..3 {
        let started = tokio::time::Instant::now();
        let head = partial_upload(&sc, false).await;
        assert!(head.starts_with("HTTP/1.1 408"), "stall {i}: {head}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "cut after the pause, not the route's 30 s"
        );
    }
    upstream_circuit_untouched(&sc).await;
    let m = sc.get_json("/api/metrics").await;
    assert_eq!(m["errors"]["client_timeout"], 3, "{m}");
    assert_eq!(m["errors"]["connect_error"], 0, "{m}");
}

#[tokio::test]
async fn a_stalled_body_on_the_sidecars_own_endpoint_is_cut_with_408() {
    // The cache clear reads its body: a client that pauses must not hold
    // the connection (and its slot) for as long as it likes.
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "client_body_timeout = \"300ms\"\n").await;
    let started = tokio::time::Instant::now();
    let head = raw_answer(
        &sc,
        b"POST /api/cache/clear HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pat",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("Request timeout"), "{head}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut after the pause"
    );
}

#[tokio::test]
async fn a_client_that_leaves_its_answer_unread_is_cut_after_send_timeout() {
    // 16 MiB: far more than the sockets hold, so the sidecar's writes wait
    // on a client that reads only the first bytes.
    let (app, _seen) =
        common::scripted::scripted_app(common::scripted::After::KeepAlive, 16 << 20).await;
    let toml = "send_timeout = \"300ms\"\nmax_connections = 1\nthreads = 1\n";
    let sc = Sidecar::start(&app, toml).await;
    let mut reader = TcpStream::connect(sc.addr).await.unwrap();
    reader
        .write_all(b"GET /api/stats HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    reader.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // It holds the one connection slot while it does not read; cut, it
    // leaves the slot to others.
    common::eventually("another client to be served", async || {
        let r = client().get(sc.url("/api/stats")).send().await;
        match r {
            Ok(r) => r.status() == 200 && r.bytes().await.is_ok_and(|b| b.len() == 16 << 20),
            Err(_) => false,
        }
    })
    .await;
    // The reader's connection was closed before its answer was whole.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the reader's connection is still open");
    assert!(rest.len() < 16 << 20, "{} bytes", rest.len());
}

#[tokio::test]
async fn a_slow_reader_that_keeps_reading_is_not_cut() {
    // 16 MiB (more than the sockets hold, so the sidecar's writes wait on
    // the reader) taken 512 KiB every 50 ms: about 1.6 s in all, far more
    // than the 300 ms `send_timeout`, but never 300 ms without progress.
    let (app, _seen) =
        common::scripted::scripted_app(common::scripted::After::KeepAlive, 16 << 20).await;
    let sc = Sidecar::start(&app, "send_timeout = \"300ms\"\n").await;
    let mut reader = TcpStream::connect(sc.addr).await.unwrap();
    reader
        .write_all(b"GET /api/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 512 << 10];
    loop {
        let n = reader.read(&mut chunk).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body_at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(got.len() - body_at, 16 << 20, "the whole answer");
}

/// A spooled upload (upload's default) that the client abandons reaches
/// the app not at all, and its file and share of the spool are given back;
/// one larger than the room left (here, the client's quarter of
/// `spool_max_bytes`) is refused with 503,
/// Retry-After and the contract's JSON before a byte is read.
#[tokio::test]
async fn spooled_uploads_reach_the_app_whole_or_not_at_all() {
    let mock = Mock::start();
    let toml = "spool_max_bytes = 400000\n[rate_limit]\nenabled = false\n";
    let sc = Sidecar::start(&mock.url(), toml).await;
    // Abandoned part way: the app is never called.
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    s.write_all(
        b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 90000\r\n\r\nfirst bytes",
    )
    .await
    .unwrap();
    // Charged as written: 11 bytes, not the 90 000 declared.
    common::eventually("the upload to be spooled", async || {
        sc.spooled().await == 11
    })
    .await;
    // One that declares more than this client's share (a quarter) is
    // refused before a byte is read.
    let head = raw_answer(
        &sc,
        b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 99995\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(head.contains("spool_max_bytes"), "{head}");
    drop(s);
    common::eventually("the spool to be given back", async || {
        sc.spooled().await == 0
    })
    .await;
    let stats = mock.stats().await;
    assert_eq!(stats["upload_bytes_total"], 0, "{stats}");
    assert_eq!(stats["requests"], 0, "{stats}");
    // Now it fits, and arrives whole.
    let r = client()
        .post(sc.url("/api/upload"))
        .body(vec![b'z'; 20000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["bytes"], 20000);
    let m = sc.get_json("/api/metrics").await;
    assert_eq!(m["errors"]["spool_full"], 1, "{m}");
}
