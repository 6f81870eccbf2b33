//! Retries, the retry budget and circuit breakers end to end, driving the
//! mock legacy app's fault injection over real sockets: what the client
//! sees, and how many calls the upstream saw.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock and a plain lock are right here"
)]

mod common;

use std::time::{Duration, Instant};

use common::{Mock, Sidecar, assert_needs_token, client, eventually, token_only_sidecar};
use serde_json::{Value, json};

/// Fast waits so that the tests do not sleep through real backoff; `retry`
/// adds keys to the `[retry]` table.
fn fast(retry: &str) -> String {
    format!(
        "[rate_limit]\nenabled = false\n\
         [retry]\ninitial_wait = \"20ms\"\nmax_wait = \"200ms\"\n{retry}\n\
         [circuit_breaker]\nthreshold = 5\ntimeout = \"1s\"\n"
    )
}

fn mock() -> Mock {
    Mock::start_with(&["--search-latency-ms", "0", "--rag-latency-ms", "0"])
}

async fn arm(mock: &Mock, fault: Value) {
    let r = client()
        .post(format!("{}/__mock/faults", mock.url()))
        .json(&fault)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn upstream_calls(mock: &Mock) -> u64 {
    mock.stats().await["requests"].as_u64().unwrap()
}

async fn search(sc: &Sidecar, q: &str, fault: Option<u16>) -> reqwest::Response {
    let mut req = client()
        .post(sc.url("/api/search"))
        .json(&json!({"query": q, "top_k": 1}));
    if let Some(status) = fault {
        req = req.header("X-Mock-Status", status.to_string());
    }
    req.send().await.unwrap()
}

async fn circuits(sc: &Sidecar) -> Value {
    sc.get_json("/api/circuit-breakers").await
}

#[tokio::test]
async fn two_failures_then_success_reach_the_client_as_one_200() {
    let mock = mock();
    let sc = Sidecar::start(&mock.url(), &fast("")).await;
    arm(&mock, json!({"status": 503, "count": 2})).await;
    let r = search(&sc, "retry me", None).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["query"], "retry me",
        "the replayed body reached the app"
    );
    assert_eq!(upstream_calls(&mock).await, 3);
}

#[tokio::test]
async fn a_failing_upload_is_not_retried() {
    let mock = mock();
    let sc = Sidecar::start(&mock.url(), &fast("")).await;
    arm(&mock, json!({"status": 503, "count": 1})).await;
    let r = client()
        .post(sc.url("/api/upload?filename=a.txt"))
        .body("file contents")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["message"], "injected status 503",
        "the app's own answer"
    );
    assert_eq!(upstream_calls(&mock).await, 1);
}

#[tokio::test]
async fn a_429_with_retry_after_is_retried_after_that_wait() {
    let mock = mock();
    // A max wait above the Retry-After, which it would otherwise cap.
    let toml = fast("").replace("max_wait = \"200ms\"", "max_wait = \"5s\"");
    let sc = Sidecar::start(&mock.url(), &toml).await;
    arm(&mock, json!({"status": 429, "count": 1})).await;
    let start = Instant::now();
    let r = client()
        .post(sc.url("/api/rag/query"))
        .json(&json!({"query": "why?"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The mock's 429 carries Retry-After: 1, longer than the 20 ms backoff.
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(upstream_calls(&mock).await, 2);
}

#[tokio::test]
async fn five_failures_open_the_circuit_one_probe_closes_it_and_reset_closes_it() {
    let mock = mock();
    // No retries: each request is exactly one failure.
    let sc = Sidecar::start(&mock.url(), &fast("max_retries = 0")).await;
    let before = circuits(&sc).await;
    assert_eq!(before["upstream"]["state"], "closed");

    // 503s: a gateway error counts each time (a plain 500 counts once per
    // client in a run; see below).
    for i in 0..5 {
        let r = search(&sc, &format!("q{i}"), Some(503)).await;
        assert_eq!(r.status(), 503, "the app's own 503 while closed");
    }
    let c = circuits(&sc).await;
    let up = &c["upstream"];
    assert_eq!(up["state"], "open");
    assert_eq!(up["failure_count"], 5);
    assert_eq!(up["failure_threshold"], 5);
    assert_eq!(up["time_until_retry"], 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let last = up["last_failure_time"].as_u64().unwrap();
    assert!(last <= now && last + 5 >= now);
    assert_eq!(c["gemini"]["state"], "closed", "circuits are separate");

    // Open: an answer at once, without reaching the app.
    let r = search(&sc, "fine now", None).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "Service unavailable",
               "message": "Circuit breaker OPEN: Service unavailable",
               "circuit": "upstream", "retry_after": 1})
    );
    assert_eq!(upstream_calls(&mock).await, 5);
    // Another circuit's route still goes through.
    let r = client()
        .post(sc.url("/api/rag/query"))
        .json(&json!({"query": "q"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(upstream_calls(&mock).await, 6);

    // After the timeout: half-open, and one good probe closes it.
    eventually("the circuit to turn half-open", async || {
        circuits(&sc).await["upstream"]["state"] == "half_open"
    })
    .await;
    assert_eq!(search(&sc, "probe", None).await.status(), 200);
    let c = circuits(&sc).await;
    assert_eq!(c["upstream"]["state"], "closed");
    assert_eq!(c["upstream"]["failure_count"], 0);
    assert_eq!(upstream_calls(&mock).await, 7);

    // Open it again; the guarded reset closes every circuit.
    for i in 0..5 {
        search(&sc, &format!("again{i}"), Some(502)).await;
    }
    assert_eq!(circuits(&sc).await["upstream"]["state"], "open");
    let r = sc.post("/api/circuit-breakers/reset", "").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"success": true, "message": "All circuit breakers reset"})
    );
    let c = circuits(&sc).await;
    assert_eq!(c["upstream"]["state"], "closed");
    assert_eq!(c["upstream"]["last_failure_time"], Value::Null);
    assert_eq!(search(&sc, "after reset", None).await.status(), 200);
}

#[tokio::test]
async fn the_reset_is_guarded() {
    let mock = mock();
    let sc = token_only_sidecar(&mock.url(), "s3cret").await;
    assert_needs_token(&sc, "/api/circuit-breakers/reset", "s3cret").await;
    // Reading the states needs no token.
    assert_eq!(sc.get_status("/api/circuit-breakers").await, 200);
}

#[tokio::test]
async fn an_open_circuit_serves_a_stale_cached_answer() {
    let mock = mock();
    // The circuit stays open for a minute: the entry expires meanwhile.
    let toml = format!(
        "{}\n[[routes]]\nname = \"search\"\ncache = {{ namespace = \"search\", ttl = \"1s\" }}\n",
        fast("max_retries = 0").replace("timeout = \"1s\"", "timeout = \"60s\"")
    );
    let sc = Sidecar::start(&mock.url(), &toml).await;
    let r = search(&sc, "cached", None).await;
    assert_eq!(r.headers()["x-cache"], "MISS");
    for i in 0..5 {
        search(&sc, &format!("fail{i}"), Some(503)).await;
    }
    assert_eq!(circuits(&sc).await["upstream"]["state"], "open");
    let calls = upstream_calls(&mock).await;
    // The entry's TTL running out is the event here: nothing to await.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = search(&sc, "cached", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "STALE");
    assert_eq!(upstream_calls(&mock).await, calls);
    // Nothing cached for this question: the open circuit's 503.
    assert_eq!(search(&sc, "never asked", None).await.status(), 503);
}

#[tokio::test]
async fn with_the_upstream_down_under_load_retries_stay_within_the_budget() {
    let mock = mock();
    let toml = r#"
[rate_limit]
enabled = false
[retry]
initial_wait = "1ms"
max_wait = "2ms"
budget_percent = 20.0
budget_min_per_second = 1
[circuit_breaker]
enabled = false
"#;
    let sc = Sidecar::start(&mock.url(), toml).await;
    arm(&mock, json!({"status": 503})).await;
    const N: u64 = 300;
    let url = sc.url("/api/documents");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                for _ in 0..N / 10 {
                    let r = client().get(&url).send().await.unwrap();
                    assert_eq!(r.status(), 503);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let attempts = upstream_calls(&mock).await;
    // 20 % of the requests plus the floor (1/s over the 10 s window), where
    // unbounded retries would have made 4 × N attempts.
    let bound = N + N / 5 + 10;
    assert!(
        attempts <= bound,
        "{attempts} attempts for {N} requests (bound {bound})"
    );
    assert!(attempts > N, "some retries were allowed: {attempts}");
}

#[tokio::test]
async fn route_timeouts_count_as_circuit_failures() {
    let mock = mock();
    let toml = format!(
        "{}\n[[routes]]\nname = \"search\"\ntimeout = \"200ms\"\n",
        fast("max_retries = 0").replace("threshold = 5", "threshold = 2")
    );
    let sc = Sidecar::start(&mock.url(), &toml).await;
    for i in 0..2 {
        let r = client()
            .post(sc.url("/api/search"))
            .header("X-Mock-Delay-Ms", "1000")
            .json(&json!({"query": format!("slow{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 504);
    }
    let c = circuits(&sc).await;
    assert_eq!(c["upstream"]["state"], "open", "{c}");
    assert_eq!(c["upstream"]["failure_count"], 2);
}

#[tokio::test]
async fn with_a_stale_answer_at_hand_a_failure_is_not_retried_but_served_stale_at_once() {
    let mock = mock();
    // Default backoff (1 s): a retry would show in the time taken.
    // (One retry at most, to keep the second half short.)
    let toml = "[rate_limit]\nenabled = false\n[retry]\nmax_retries = 1\n\
                [[routes]]\nname = \"search\"\ncache = { ttl = \"1s\" }\n";
    let sc = Sidecar::start(&mock.url(), toml).await;
    assert_eq!(
        search(&sc, "stale soon", None).await.headers()["x-cache"],
        "MISS"
    );
    // The entry's TTL running out is the event here: nothing to await.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    arm(&mock, json!({"status": 503})).await;
    let before = upstream_calls(&mock).await;
    let start = Instant::now();
    let r = search(&sc, "stale soon", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "STALE");
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        upstream_calls(&mock).await,
        before + 1,
        "one attempt, no retry"
    );
    // Without a stale answer the same failure is retried as usual.
    let before = upstream_calls(&mock).await;
    let r = search(&sc, "never cached", None).await;
    assert_eq!(r.status(), 503);
    assert_eq!(upstream_calls(&mock).await, before + 2);
}

#[tokio::test]
async fn one_client_cannot_open_a_circuit_for_everyone_with_plain_500s() {
    let mock = mock();
    // Clients told apart by their API key (all connect from 127.0.0.1);
    // threshold 2, retries on: each failing search is 4 attempts.
    let toml = fast("max_retries = 3")
        .replace("threshold = 5", "threshold = 2")
        .replace(
            "[rate_limit]\nenabled = false\n",
            "[rate_limit]\nkey = \"header:X-API-Key\"\ndefault = \"10000 per minute\"\n",
        );
    let sc = Sidecar::start(
        &mock.url(),
        &format!("{toml}[[routes]]\nname = \"search\"\nrate_limit = \"10000 per minute\"\n"),
    )
    .await;
    let bad = |key: &'static str, q: &'static str, status: u16| {
        let sc = &sc;
        async move {
            client()
                .post(sc.url("/api/search"))
                .header("X-API-Key", key)
                .header("X-Mock-Status", status.to_string())
                .json(&json!({"query": q, "top_k": 1}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // One client's input the app cannot handle: 500s, retried, several
    // times. Counted once: the circuit stays closed for everyone.
    for q in ["abc", "abc again", "and again"] {
        assert_eq!(bad("mallory", q, 500).await, 500);
    }
    let c = circuits(&sc).await;
    assert_eq!(c["upstream"]["state"], "closed", "{c}");
    assert_eq!(c["upstream"]["failure_count"], 1, "{c}");
    let ok = client()
        .post(sc.url("/api/search"))
        .header("X-API-Key", "alice")
        .json(&json!({"query": "a normal question", "top_k": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200, "another client is served");
    // A success ended that run. A second client's 500 in a new run, and a
    // third's: two clients, two failures, the circuit opens.
    assert_eq!(bad("mallory", "new run", 500).await, 500);
    assert_eq!(bad("bob", "bob's", 500).await, 500);
    assert_eq!(circuits(&sc).await["upstream"]["state"], "open");
    // A gateway error counts each time, from one client too.
    let r = sc.post("/api/circuit-breakers/reset", "").await;
    assert_eq!(r.status(), 200);
    assert_eq!(bad("mallory", "gateway", 502).await, 502);
    assert_eq!(
        circuits(&sc).await["upstream"]["state"],
        "open",
        "4 attempts of 502"
    );
}
