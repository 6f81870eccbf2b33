//! The real binary: graceful shutdown on SIGTERM, memory while spooling a
//! large upload, and logging to a file in JSON.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock and a plain lock are right here"
)]

mod common;

use std::time::{Duration, Instant};

use common::{Mock, SidecarProcess, client, free_addr, get_text_at, sigterm, wait_exit};
use serde_json::Value;

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let mock = Mock::start();
    let (listen, admin) = (free_addr(), free_addr());
    let toml = format!(
        "listen = \"{listen}\"\nadmin_listen = \"{admin}\"\nupstream = \"{}\"\nshutdown_grace = \"10s\"\n",
        mock.url()
    );
    let mut p = SidecarProcess::start(&toml, &[], listen);
    let ready = client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    let slow = tokio::spawn(
        client()
            .get(format!("http://{listen}/api/stats"))
            .header("X-Mock-Delay-Ms", "1500")
            .send(),
    );
    mock.wait_stats("the slow request upstream", |s| s["in_flight"] == 1)
        .await;
    sigterm(p.pid());

    // Readiness turns 503 (the admin port keeps answering while draining)...
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client()
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            assert_eq!(r.json::<Value>().await.unwrap()["reason"], "shutting down");
            break;
        }
        assert!(Instant::now() < deadline, "readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...the proxy port accepts no new connection...
    assert!(
        tokio::net::TcpStream::connect(listen).await.is_err(),
        "still accepting"
    );
    // ...the in-flight request completes normally...
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.json::<Value>().await.unwrap()["documents"].is_number());
    // ...and the process exits 0.
    assert!(wait_exit(&mut p, Duration::from_secs(10)).success());
}

type Pending = tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>;

/// The binary with this `shutdown_grace`, and one request in flight at the
/// app for `delay_ms`.
async fn with_a_stuck_request(
    grace: &str,
    delay_ms: u64,
) -> (SidecarProcess, Mock, std::net::SocketAddr, Pending) {
    let mock = Mock::start();
    let listen = free_addr();
    let toml = format!(
        "listen = \"{listen}\"\nupstream = \"{}\"\nshutdown_grace = \"{grace}\"\n",
        mock.url()
    );
    let p = SidecarProcess::start(&toml, &[], listen);
    let stuck = tokio::spawn(
        client()
            .get(format!("http://{listen}/api/stats"))
            .header("X-Mock-Delay-Ms", delay_ms.to_string())
            .send(),
    );
    mock.wait_stats("the stuck request upstream", |s| s["in_flight"] == 1)
        .await;
    (p, mock, listen, stuck)
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let (mut p, _mock, _listen, stuck) = with_a_stuck_request("300ms", 8000).await;
    let t = Instant::now();
    sigterm(p.pid());
    assert!(wait_exit(&mut p, Duration::from_secs(5)).success());
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(
        stuck.await.unwrap().is_err(),
        "the request past the grace is cut"
    );
}

#[tokio::test]
async fn a_40mb_upload_is_spooled_without_growing_the_sidecars_memory() {
    let mock = Mock::start();
    let listen = free_addr();
    let toml = format!("listen = \"{listen}\"\nupstream = \"{}\"\n", mock.url());
    let p = SidecarProcess::start(&toml, &[("LOG_LEVEL", "warn")], listen);
    // Warm the connection pool and allocator first.
    client()
        .get(format!("http://{listen}/api/stats"))
        .send()
        .await
        .unwrap();
    // The peak resident size (VmHWM): a body held whole for a moment
    // shows there even once it is freed.
    let before = p.peak_rss_kib();
    const CHUNK: usize = 256 * 1024;
    let chunks = futures_util::stream::iter(
        (0..160).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; CHUNK]))),
    );
    let resp = client()
        .post(format!("http://{listen}/api/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["bytes"], 160 * CHUNK);
    let after = p.peak_rss_kib();
    assert!(before > 0);
    // Holding the body would add 40 MiB; spooling it (upload's
    // request_buffering) passes it through in its own chunks to a file.
    assert!(
        after < before + 16 * 1024,
        "peak RSS grew from {before} KiB to {after} KiB"
    );
    // The file and its share of spool_max_bytes are given back.
    let metrics = get_text_at(format!("http://{listen}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "rag_sidecar_request_spool_bytes 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn json_access_log_goes_to_log_file_and_stderr() {
    let mock = Mock::start();
    let listen = free_addr();
    let toml = format!("listen = \"{listen}\"\nupstream = \"{}\"\n", mock.url());
    let mut p = SidecarProcess::start(
        &toml,
        &[
            ("LOG_FORMAT", "json"),
            ("LOG_FILE", "logs/rag_services.log"),
            ("LOG_LEVEL", "INFO"),
        ],
        listen,
    );
    let resp = client()
        .post(format!("http://{listen}/api/search"))
        .header("X-Request-Id", "log-me")
        .json(&serde_json::json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sigterm(p.pid());
    assert!(wait_exit(&mut p, Duration::from_secs(10)).success());
    let file = std::fs::read_to_string(p.dir.path().join("logs/rag_services.log")).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(p.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    for text in [&file, &stderr] {
        let access: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "rag_sidecar::access")
            .collect();
        assert_eq!(access.len(), 1, "{text}");
        let a = &access[0];
        assert_eq!(a["method"], "POST");
        assert_eq!(a["route"], "search");
        assert_eq!(a["status"], 200);
        assert_eq!(a["request_id"], "log-me");
        assert!(a["client"].as_str().unwrap().starts_with("127.0.0.1:"));
        let ms = a["duration_ms"].as_f64().unwrap();
        assert!(ms >= 0.0);
        // To the microsecond, not f64 noise (`254.25262199999997`).
        assert_eq!((ms * 1e3).round() / 1e3, ms, "{a}");
        // The cache's verdict, from its typed outcome.
        assert_eq!(a["cache"], "MISS");
        assert!(!text.contains("\"q\""), "the query text is not logged");
    }
}

#[tokio::test]
async fn num_threads_sets_the_worker_count() {
    let mock = Mock::start();
    let listen = free_addr();
    let toml = format!("listen = \"{listen}\"\nupstream = \"{}\"\n", mock.url());
    let p = SidecarProcess::start(&toml, &[("NUM_THREADS", "3")], listen);
    // Worker 0 is the main thread; workers 1 and 2 are named threads (the
    // port accepts as soon as it is bound, so wait for them to start).
    let workers = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/task", p.pid()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .filter(|c| c.starts_with("rag-sidecar-w"))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers().len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let workers = workers();
    assert_eq!(workers.len(), 2, "{workers:?}");
    // Connections spread over the workers still all get answers.
    for _ in 0..20 {
        let c = client(); // a new connection each time
        assert_eq!(
            c.get(format!("http://{listen}/api/stats"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
}

#[tokio::test]
async fn each_retry_is_logged_at_warning_with_its_type_and_request_id() {
    let mock = Mock::start_with(&["--search-latency-ms", "0"]);
    let listen = free_addr();
    let toml = format!(
        "listen = \"{listen}\"\nupstream = \"{}\"\n[retry]\nmax_retries = 2\ninitial_wait = \"10ms\"\nmax_wait = \"20ms\"\n",
        mock.url()
    );
    let mut p = SidecarProcess::start(&toml, &[("LOG_LEVEL", "WARNING")], listen);
    // A 503 whose body names the Gemini quota: a gemini_rate_limit.
    let resp = client()
        .post(format!("http://{listen}/api/search"))
        .header("X-Request-Id", "retry-me")
        .header("X-Mock-Status", "503")
        .header("X-Mock-Body", "429 RESOURCE_EXHAUSTED")
        .json(&serde_json::json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    sigterm(p.pid());
    assert!(wait_exit(&mut p, Duration::from_secs(10)).success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(p.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let retries: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("Retrying in"))
        .collect();
    assert_eq!(retries.len(), 2, "{stderr}");
    for (i, line) in retries.iter().enumerate() {
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains("retry-me"), "{line}");
        let what = format!(
            "Attempt {}/3 failed: gemini_rate_limit (HTTP 503). Retrying in 0.0",
            i + 1
        );
        assert!(line.contains(&what), "{line}");
    }
}

/// A Redis outage is logged as the legacy app did ("Redis connection
/// failed, falling back to in-memory cache"), once, not at every reconnect
/// attempt, and its end is logged too.
#[tokio::test]
async fn a_redis_outage_is_logged_once_and_so_is_its_end() {
    let (mock, mut redis) = (Mock::start(), common::Redis::start());
    let listen = free_addr();
    let toml = format!("listen = \"{listen}\"\nupstream = \"{}\"\n", mock.url());
    let p = SidecarProcess::start(
        &toml,
        &[
            ("REDIS_URL", &redis.url()),
            ("LOG_FILE", "logs/sidecar.log"),
            ("LOG_LEVEL", "INFO"),
        ],
        listen,
    );
    let log = p.dir.path().join("logs/sidecar.log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let failed = "Redis connection failed, falling back to in-memory cache";
    common::eventually("connected", async || read().contains("Redis connected")).await;
    redis.stop();
    common::eventually("the outage logged", async || read().contains(failed)).await;
    redis.restart();
    common::eventually("the end logged", async || {
        read().contains("Redis connected again")
    })
    .await;
    let text = read();
    assert_eq!(text.matches(failed).count(), 1, "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(failed) && l.contains("WARN")),
        "{text}"
    );
}

/// A second SIGTERM (or Ctrl-C) during the drain ends the process at once,
/// with a failure status, instead of waiting out `shutdown_grace`.
#[tokio::test]
async fn a_second_signal_during_the_drain_exits_at_once() {
    let (mut p, _mock, listen, _stuck) = with_a_stuck_request("20s", 15000).await;
    sigterm(p.pid());
    // The first signal has been handled once the port stops accepting.
    common::eventually("the drain started", async || {
        tokio::net::TcpStream::connect(listen).await.is_err()
    })
    .await;
    let t = Instant::now();
    sigterm(p.pid());
    let status = wait_exit(&mut p, Duration::from_secs(5));
    assert!(!status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_wrong_upstream_is_said_in_the_log_at_start_and_in_the_502() {
    let nothing = common::closed_port();
    let listen = free_addr();
    let toml = format!("listen = \"{listen}\"\nupstream = \"{}\"\n", nothing.url());
    let mut p = SidecarProcess::start(&toml, &[], listen);
    // /readyz waits for a probe of its own (or shares the first one).
    let r = client()
        .get(format!("http://{listen}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let r = client()
        .get(format!("http://{listen}/api/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    // The cause, not only "client error (Connect)".
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("refused"), "{body}");
    sigterm(p.pid());
    assert!(wait_exit(&mut p, Duration::from_secs(10)).success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(p.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let warned = stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("does not answer its readiness probe"))
        .count();
    assert_eq!(warned, 1, "one warning, not one per probe:\n{stderr}");
    assert!(stderr.contains(&nothing.url()), "{stderr}");
}

#[tokio::test]
async fn control_and_format_characters_a_client_sends_are_escaped_in_the_log() {
    use std::io::{Read, Write};
    let mock = Mock::start();
    let listen = free_addr();
    let toml = format!("listen = \"{listen}\"\nupstream = \"{}\"\n", mock.url());
    let mut p = SidecarProcess::start(&toml, &[("LOG_LEVEL", "INFO")], listen);
    // NEL (which a log viewer may show as a line break), the line
    // separator, a right-to-left override: raw UTF-8 in the request target.
    let forged = "/x\u{85}2026-12-01T00:00:00Z_INFO_forged\u{2028}y\u{202e}z";
    let mut s = std::net::TcpStream::connect(listen).unwrap();
    s.write_all(
        format!("GET {forged} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    sigterm(p.pid());
    assert!(wait_exit(&mut p, Duration::from_secs(10)).success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(p.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let access: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("rag_sidecar::access"))
        .collect();
    assert_eq!(access.len(), 1, "{stderr}");
    let line = access[0];
    assert!(
        line.contains(r"/x\xC2\x852026-12-01T00:00:00Z_INFO_forged\xE2\x80\xA8y\xE2\x80\xAEz"),
        "{line}"
    );
    for raw in ['\u{85}', '\u{2028}', '\u{202e}'] {
        assert!(!stderr.contains(raw), "{raw:?} reached the log: {stderr}");
    }
}
