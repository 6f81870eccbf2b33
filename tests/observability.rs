//! The observability endpoints end to end: the legacy metrics JSON and its
//! reset, the Prometheus exposition (checked by promtool), the system
//! monitor, the health score and the detailed health answer, and metrics
//! switched off.

mod common;

use common::{Mock, Redis, Sidecar, assert_needs_token, client, eventually, token_only_sidecar};
use serde_json::{Value, json};

const NO_LIMITS: &str = "[rate_limit]\nenabled = false\n";

fn mock() -> Mock {
    Mock::start_with(&["--search-latency-ms", "0", "--rag-latency-ms", "0"])
}

async fn upload_failing(sc: &Sidecar, request_id: &str) -> u16 {
    client()
        .post(sc.url("/api/upload?filename=a.txt"))
        .header("X-Mock-Status", "503")
        .header("X-Request-Id", request_id)
        .body("x")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn the_legacy_metrics_count_time_and_reset() {
    let mock = mock();
    let sc = Sidecar::start(&mock.url(), NO_LIMITS).await;
    for q in ["a", "b", "a"] {
        let r = sc.post_json("/api/search", &json!({"query": q})).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(upload_failing(&sc, "failing-upload").await, 503);
    let m = sc.get_json("/api/metrics").await;
    let c = &m["counters"];
    assert_eq!(c["requests"], 4, "{m}");
    assert_eq!(c["response.200"], 3);
    assert_eq!(c["response.503"], 1);
    assert_eq!(c["search.success"], 3);
    assert_eq!(c["upload.error"], 1);
    assert_eq!(c["cache.hits"], 1);
    assert_eq!(c["cache.misses"], 2);
    let t = &m["timers"]["request_duration"];
    assert_eq!(t["count"], 4);
    for k in ["min", "max", "avg", "p50", "p95", "p99"] {
        assert!(t[k].as_f64().unwrap() > 0.0, "{k}: {t}");
    }
    assert!(t["min"].as_f64() <= t["p50"].as_f64());
    assert!(t["p99"].as_f64() <= t["max"].as_f64());
    // Two upstream calls for search (one hit), one for the upload.
    assert_eq!(m["timers"]["upstream.search"]["count"], 2);
    assert_eq!(m["timers"]["upstream.upload"]["count"], 1);
    assert_eq!(m["gauges"]["active_requests"], 0);
    assert_eq!(m["gauges"]["cache_size"], 2);
    assert_eq!(m["gauges"]["circuit_state.upstream"], 0.0);
    assert_eq!(m["errors"]["upstream_5xx"], 1);
    assert_eq!(m["errors"]["rate_limited"], 0);
    let recent = m["recent_errors"].as_array().unwrap();
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0]["type"], "upstream_5xx");
    assert_eq!(recent[0]["route"], "upload");
    assert_eq!(recent[0]["request_id"], "failing-upload");
    assert!(recent[0]["timestamp"].as_f64().unwrap() > 1.7e9);
    assert!(m["uptime_seconds"].is_u64());

    let error_rate_issue = async || {
        let h = sc.get_json("/api/health/detailed").await;
        h["issues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i.as_str().unwrap().starts_with("High error rate"))
    };
    assert!(error_rate_issue().await, "one 5xx in four requests");

    let before = sc.get_text("/metrics").await;
    let r = sc.post("/api/metrics/reset", "").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"success": true, "message": "All metrics reset"})
    );
    let m = sc.get_json("/api/metrics").await;
    assert_eq!(m["counters"]["requests"], 0, "{m}");
    assert_eq!(m["counters"]["cache.hits"], 0);
    assert_eq!(m["errors"]["upstream_5xx"], 0);
    assert_eq!(m["timers"], json!({}));
    assert_eq!(m["recent_errors"], json!([]));
    // The health score's error rate starts over with the counters.
    assert!(!error_rate_issue().await);
    // Prometheus counters never go back.
    let after = sc.get_text("/metrics").await;
    let total = |text: &str| series_sum(text, "rag_sidecar_requests_total{");
    assert_eq!(total(&before), 4.0);
    assert_eq!(total(&after), 4.0);
    sc.post_json("/api/search", &json!({"query": "c"})).await;
    assert_eq!(sc.get_json("/api/metrics").await["counters"]["requests"], 1);
}

/// The sum of the samples whose line starts with `prefix`.
fn series_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn prometheus_exposition_passes_promtool_and_keeps_labels_bounded() {
    let mock = mock();
    let sc = Sidecar::start(&mock.url(), NO_LIMITS).await;
    sc.post_json("/api/search", &json!({"query": "private question"}))
        .await;
    let r = client()
        .get(sc.url("/api/documents/secret-report-4711.pdf"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    upload_failing(&sc, "x").await;
    let r = client().get(sc.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool (Debian package `prometheus`) must be installed; .ci/run installs it");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for series in [
        "rag_sidecar_build_info{version=",
        "rag_sidecar_requests_total{method=\"POST\",route=\"search\",status_class=\"2xx\"} 1",
        "rag_sidecar_requests_total{method=\"GET\",route=\"default\",status_class=\"4xx\"} 1",
        "rag_sidecar_request_duration_seconds_bucket{route=\"search\",le=\"0.0005\"}",
        "rag_sidecar_upstream_duration_seconds_count{route=\"upload\"} 1",
        "rag_sidecar_upstream_errors_total{type=\"upstream_5xx\"} 1",
        "rag_sidecar_cache_requests_total{namespace=\"search\",result=\"miss\"} 1",
        "rag_sidecar_cache_items{namespace=\"search\"} 1",
        "rag_sidecar_circuit_state{circuit=\"gemini\",state=\"closed\"} 1",
        "rag_sidecar_circuit_state{circuit=\"gemini\",state=\"open\"} 0",
        "rag_sidecar_retries_total 0",
        "rag_sidecar_health_score ",
        "rag_sidecar_active_requests 0",
        "rag_sidecar_process_resident_memory_bytes ",
    ] {
        assert!(text.contains(series), "missing {series}\n{text}");
    }
    // Bounded labels: no raw path, no client address, no query text in
    // any label (a figure may contain the digits 4711 by chance: a byte
    // count did once).
    let labels: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| Some(&l[l.find('{')?..=l.rfind('}')?]))
        .collect();
    for leak in ["secret-report", "4711", "127.0.0.1", "private question"] {
        assert!(
            !labels.iter().any(|l| l.contains(leak)),
            "{leak} leaked into /metrics"
        );
    }
}

#[tokio::test]
async fn active_requests_counts_requests_in_flight() {
    let mock = mock();
    let sc = Sidecar::start(&mock.url(), NO_LIMITS).await;
    let url = sc.url("/api/documents");
    let slow = tokio::spawn(async move {
        client()
            .get(url)
            .header("X-Mock-Delay-Ms", "2000")
            .send()
            .await
            .unwrap()
            .status()
    });
    eventually("one request in flight", async || {
        sc.get_json("/api/metrics").await["gauges"]["active_requests"] == 1
    })
    .await;
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(
        sc.get_json("/api/metrics").await["gauges"]["active_requests"],
        0
    );
}

#[tokio::test]
async fn the_reset_is_guarded() {
    let mock = mock();
    let sc = token_only_sidecar(&mock.url(), "s3cret").await;
    assert_needs_token(&sc, "/api/metrics/reset", "s3cret").await;
}

#[tokio::test]
async fn system_figures_have_every_legacy_field() {
    let mock = mock();
    let sc = Sidecar::start(&mock.url(), "").await;
    eventually("the first system sample", async || {
        sc.get_status("/api/system").await == 200
    })
    .await;
    let s = sc.get_json("/api/system").await;
    assert!(s["cpu_percent"].is_number(), "{s}");
    for k in ["total_mb", "available_mb", "used_mb", "percent"] {
        assert!(s["memory"][k].is_number(), "memory.{k}: {s}");
    }
    for k in ["total_gb", "used_gb", "free_gb", "percent"] {
        assert!(s["disk"][k].is_number(), "disk.{k}: {s}");
    }
    assert_eq!(s["process"]["pid"], std::process::id());
    for k in ["cpu_percent", "memory_mb", "threads"] {
        assert!(s["process"][k].is_number(), "process.{k}: {s}");
    }
    assert!(s["process"]["status"].is_string());
}

#[tokio::test]
async fn detailed_health_has_the_legacy_fields_and_scores_the_error_rate() {
    let mock = mock();
    let sc = Sidecar::start(&mock.url(), NO_LIMITS).await;
    eventually("the first system sample and upstream probe", async || {
        let h = sc.get_json("/api/health/detailed").await;
        !h["system"].is_null() && h["upstream"]["reachable"] == true
    })
    .await;
    sc.post_json("/api/search", &json!({"query": "q"})).await;
    let h = sc.get_json("/api/health/detailed").await;
    for k in [
        "status",
        "health_score",
        "issues",
        "uptime_seconds",
        "uptime_human",
        "metrics",
        "cache",
        "circuit_breakers",
        "system",
        "upstream",
    ] {
        assert!(!h[k].is_null(), "{k} missing: {h}");
    }
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["metrics"]["counters"]["requests"], 1);
    assert!(h["metrics"]["timers"]["request_duration"]["p95"].is_number());
    assert_eq!(h["cache"]["backend"], "memory");
    assert_eq!(h["cache"]["redis_connected"], false);
    assert_eq!(h["circuit_breakers"]["gemini"]["state"], "closed");
    assert_eq!(h["circuit_breakers"]["gemini"]["failure_threshold"], 5);
    assert!(h["system"]["memory"]["percent"].is_number());
    assert!(h["upstream"]["latency_ms"].is_number());
    assert!(h["upstream"]["last_checked"].as_u64().unwrap() > 1_700_000_000);
    assert!(h["uptime_human"].as_str().unwrap().starts_with("0:00:"));

    // One 5xx in two answers: 50 % errors over the last 5 minutes (-30).
    upload_failing(&sc, "e").await;
    let h = sc.get_json("/api/health/detailed").await;
    let score = h["health_score"].as_i64().unwrap();
    let issues: Vec<&str> = h["issues"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        issues
            .iter()
            .any(|i| i.starts_with("High error rate: 50.0%")),
        "{h}"
    );
    assert!(score <= 70, "{h}");
    assert_eq!(
        h["status"],
        if score >= 50 { "degraded" } else { "unhealthy" }
    );
}

#[tokio::test]
async fn health_issues_name_open_circuits_and_a_redis_that_is_down() {
    let mock = mock();
    let mut redis = Redis::start();
    let toml = format!(
        "{NO_LIMITS}[redis]\nurl = \"{}\"\n[retry]\nmax_retries = 0\n[circuit_breaker]\nthreshold = 1\ntimeout = \"60s\"\n",
        redis.url()
    );
    let sc = Sidecar::start(&mock.url(), &toml).await;
    upload_failing(&sc, "open-it").await;
    redis.stop();
    eventually("both issues", async || {
        let h = sc.get_json("/api/health/detailed").await;
        let issues = h["issues"].to_string();
        issues.contains("Circuit breaker OPEN: upstream") && issues.contains("Redis unreachable")
    })
    .await;
}

#[tokio::test]
async fn with_metrics_off_the_endpoints_say_so() {
    let mock = mock();
    let sc = Sidecar::start_env(&mock.url(), "", &[("ENABLE_METRICS", "False")]).await;
    sc.post_json("/api/search", &json!({"query": "q"})).await;
    for (method, path) in [
        ("GET", "/api/metrics"),
        ("GET", "/metrics"),
        ("POST", "/api/metrics/reset"),
    ] {
        let r = client()
            .request(method.parse().unwrap(), sc.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "Metrics disabled", "{path}");
        assert!(body["message"].as_str().unwrap().contains("ENABLE_METRICS"));
    }
    // The legacy shape stays (the legacy document's Example 4 reads
    // `metrics.counters.requests`), saying it is off; nothing was recorded.
    let h = sc.get_json("/api/health/detailed").await;
    assert_eq!(h["metrics"]["enabled"], false, "{h}");
    assert_eq!(h["metrics"]["counters"]["requests"], 0, "{h}");
    assert_eq!(h["metrics"]["timers"], json!({}), "{h}");
    assert_eq!(h["status"], "healthy");
}
