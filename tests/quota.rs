//! The upstream quota (`upstream_limit`) over real processes: the mock app
//! enforces Gemini's quota on its RAG route (`--quota`), and bursts through
//! one or two sidecars never trip it; requests wait their turn first come
//! first served; a stale answer stands in when there is no room; Redis
//! killed mid-burst fails no request.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock is right here"
)]

mod common;

use std::time::Duration;

use common::{Mock, Redis, Sidecar, client, eventually};
use serde_json::{Value, json};

fn quota_toml(limit: &str, queue: &str, extra: &str) -> String {
    format!(
        "[rate_limit]\nenabled = false\n{extra}[[routes]]\nname = \"rag\"\nupstream_limit = \"{limit}\"\nupstream_queue = \"{queue}\"\n"
    )
}

async fn ask(url: String, q: String) -> (u16, Option<String>, String, Value) {
    let r = client()
        .post(url)
        .header("host", "rag-services")
        .json(&json!({"query": q, "top_k": 1}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let x_cache = r
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (
        status,
        retry_after,
        x_cache,
        r.json().await.unwrap_or(Value::Null),
    )
}

/// Two sidecars on one Redis, connected.
async fn two_on(mock: &Mock, redis: &Redis, limit: &str, queue: &str) -> (Sidecar, Sidecar) {
    let toml = quota_toml(
        limit,
        queue,
        &format!("[redis]\nurl = \"{}\"\n", redis.url()),
    );
    let a = Sidecar::start(&mock.url(), &toml).await;
    let b = Sidecar::start(&mock.url(), &toml).await;
    for sc in [&a, &b] {
        eventually("connected", async || {
            sc.get_json("/api/cache/stats").await["redis_connected"] == true
        })
        .await;
    }
    (a, b)
}

/// Every answer a 200, or the quota's 503 with `Retry-After`.
fn only_answers_or_quota(answers: &[(u16, Option<String>, String, Value)], limit: &str) {
    for (status, retry_after, _, body) in answers {
        match status {
            200 => {}
            503 => {
                assert!(retry_after.is_some(), "{body}");
                assert_eq!(body["error"], "Service unavailable", "{body}");
                assert_eq!(
                    body["message"],
                    format!("Upstream quota of {limit} reached"),
                    "{body}"
                );
                assert!(body["retry_after"].as_u64() >= Some(1), "{body}");
            }
            s => panic!("{s}: {body}"),
        }
    }
}

#[tokio::test]
async fn a_burst_through_two_sidecars_on_redis_never_trips_the_apps_quota() {
    // The app allows 6 RAG calls per 3 s; the sidecars 5 per 3 s (one every
    // 600 ms), fleet-wide.
    let mock = Mock::start_with(&["--quota", "6", "--quota-window-ms", "3000"]);
    let redis = Redis::start();
    let (a, b) = two_on(&mock, &redis, "5 per 3 seconds", "2s").await;
    let answers = futures_util::future::join_all((0..24).map(|i| {
        let sc = if i % 2 == 0 { &a } else { &b };
        ask(sc.url("/api/rag/query"), format!("distinct question {i}"))
    }))
    .await;
    let stats = mock.stats().await;
    assert_eq!(stats["quota_errors"], 0, "{stats}");
    only_answers_or_quota(&answers, "5 per 3 seconds");
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    // One now, then one every 600 ms within the 2 s wait: 4, whichever
    // sidecar the requests came through.
    assert!((3..=5).contains(&ok), "{ok} answered: {answers:?}");
    assert_eq!(stats["by_path"]["/api/rag/query"], ok);
    let metrics = a.get_json("/api/metrics").await;
    assert!(
        metrics["counters"]["upstream_quota.rejected"].as_u64() > Some(0),
        "{metrics}"
    );
    assert_eq!(metrics["gauges"]["upstream_queue.rag"], 0, "{metrics}");
}

#[tokio::test]
async fn requests_wait_their_turn_first_come_first_served() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), &quota_toml("4 per second", "10s", "")).await;
    let mut calls = Vec::new();
    for i in 0..6 {
        calls.push(tokio::spawn(ask(sc.url("/api/rag/query"), format!("q{i}"))));
        // The next one only once this one is in the app or in the queue.
        eventually("queued", async || {
            let m = sc.get_json("/api/metrics").await;
            let queued = m["gauges"]["upstream_queue.rag"].as_u64().unwrap_or(0);
            let sent = mock.stats().await["rag_queries"].as_array().unwrap().len() as u64;
            queued + sent == i + 1
        })
        .await;
    }
    for c in calls {
        assert_eq!(c.await.unwrap().0, 200);
    }
    let order: Vec<String> = mock.stats().await["rag_queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, ["q0", "q1", "q2", "q3", "q4", "q5"]);
    let metrics = sc.get_text("/metrics").await;
    assert!(
        metrics.contains("rag_sidecar_upstream_queue_wait_seconds_count{route=\"rag\"} 6"),
        "{metrics}"
    );
}

#[tokio::test]
async fn with_no_room_a_stale_answer_stands_in_else_503() {
    let mock = Mock::start();
    let sc = Sidecar::start(
        &mock.url(),
        &quota_toml(
            "1 per 10 seconds",
            "1s",
            "[[routes]]\nname = \"rag\"\ncache = { ttl = \"1s\" }\n",
        ),
    )
    .await;
    let first = ask(sc.url("/api/rag/query"), "kept".into()).await;
    assert_eq!((first.0, first.2.as_str()), (200, "MISS"));
    // Expired: the budget has no room for 10 s, the wait is 1 s: the old
    // answer, at once.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t = std::time::Instant::now();
    let stale = ask(sc.url("/api/rag/query"), "kept".into()).await;
    assert_eq!((stale.0, stale.2.as_str()), (200, "STALE"), "{:?}", stale.3);
    assert_eq!(stale.3["answer"], first.3["answer"]);
    // A question never answered: 503, at once (not after the second).
    let refused = ask(sc.url("/api/rag/query"), "never asked".into()).await;
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    only_answers_or_quota(std::slice::from_ref(&refused), "1 per 10 seconds");
    assert_eq!(refused.0, 503);
    let retry: u64 = refused.1.unwrap().parse().unwrap();
    assert!((8..=10).contains(&retry), "{retry}");
    assert_eq!(mock.stats().await["by_path"]["/api/rag/query"], 1);
}

#[tokio::test]
async fn redis_killed_mid_burst_fails_no_request() {
    let mock = Mock::start();
    let mut redis = Redis::start();
    let (a, b) = two_on(&mock, &redis, "10 per second", "3s").await;
    let burst = |from: usize| {
        futures_util::future::join_all((from..from + 20).map(|i| {
            let sc = if i % 2 == 0 { &a } else { &b };
            ask(sc.url("/api/rag/query"), format!("burst {i}"))
        }))
    };
    let (first, ()) = tokio::join!(burst(0), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.stop();
    });
    let second = burst(100).await;
    only_answers_or_quota(&first, "10 per second");
    only_answers_or_quota(&second, "10 per second");
    assert!(second.iter().filter(|a| a.0 == 200).count() >= 10);
}
