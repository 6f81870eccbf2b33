//! Redis Cluster as a backend: a real three-primary cluster (redis-server in
//! cluster mode, formed with `redis-cli --cluster create`) under two or
//! three sidecars. Shared entries and limits, invalidation and
//! `/api/cache/clear` over keys of many slots on every node (one `UNLINK`
//! of a page of such keys failed with `CROSSSLOT` before), the fleet's
//! generations and leases, the upstream quota's shared budget, and Redis
//! failures visible in `/metrics`.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock is right here"
)]

mod common;

use common::{Mock, RedisCluster, Sidecar, client, eventually};
use serde_json::{Value, json};

async fn search(sc: &Sidecar, q: &str) -> (String, Value) {
    let r = client()
        .post(sc.url("/api/search"))
        .header("host", "rag-services")
        .json(&json!({"query": q, "top_k": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let x = r
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (x, r.json().await.unwrap())
}

async fn sidecar(mock: &Mock, cluster: &RedisCluster, extra: &str) -> Sidecar {
    let sc = Sidecar::start(
        &mock.url(),
        &format!("[redis]\nurl = \"{}\"\n{extra}", cluster.url()),
    )
    .await;
    eventually("connected to the cluster, generations read", async || {
        let s = sc.get_json("/api/cache/stats").await;
        s["redis_connected"] == true && s["namespaces"]["search"]["generation"].as_u64() > Some(0)
    })
    .await;
    sc
}

/// Fills `n` searches through `sc`: keys of `n` slots, on every node.
async fn fill(sc: &Sidecar, cluster: &RedisCluster, n: usize) {
    for i in 0..n {
        search(sc, &format!("question {i}")).await;
    }
    let by_node = cluster.keys_by_node("rag-sidecar:search:*");
    assert_eq!(by_node.concat().len(), n, "{by_node:?}");
    assert!(by_node.iter().all(|k| !k.is_empty()), "{by_node:?}");
}

async fn clear(sc: &Sidecar, body: &str) -> (u16, Value) {
    let r = client()
        .post(sc.url("/api/cache/clear"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn two_sidecars_share_entries_and_one_rate_limit_on_a_cluster() {
    let mock = Mock::start();
    let cluster = RedisCluster::start(3);
    let limit = "[[routes]]\nname = \"search\"\nrate_limit = \"4 per minute\"\n";
    let a = sidecar(&mock, &cluster, limit).await;
    let b = sidecar(&mock, &cluster, limit).await;
    assert_eq!(search(&a, "shared?").await.0, "MISS");
    assert_eq!(search(&b, "shared?").await.0, "HIT");
    // Two from each (one limit for the fleet), then the fifth is refused.
    search(&a, "another").await;
    search(&b, "and another").await;
    let r = client()
        .post(b.url("/api/search"))
        .json(&json!({"query": "one too many"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(!cluster.keys("rag-sidecar:rl:*").is_empty());
}

#[tokio::test]
async fn invalidation_and_clear_reach_keys_on_every_node() {
    let mock = Mock::start();
    let cluster = RedisCluster::start(3);
    let unlimited = "[rate_limit]\nenabled = false\n";
    let a = sidecar(&mock, &cluster, unlimited).await;
    let b = sidecar(&mock, &cluster, unlimited).await;
    fill(&a, &cluster, 30).await;
    assert_eq!(search(&b, "question 7").await.0, "HIT");
    // An upload (mode stale): a new generation on every sidecar, the
    // entries kept for stale-if-error.
    assert_eq!(a.post("/api/upload", "new doc").await.status(), 200);
    eventually("B answers from after the upload", async || {
        search(&b, "question 7").await.1["corpus_version"] == 1
    })
    .await;
    // A deletion (mode purge): every key of every slot, on every node.
    let del = a
        .status_of(http::Method::DELETE, "/api/documents/doc-1.pdf")
        .await;
    assert_eq!(del, 200);
    assert_eq!(cluster.keys("rag-sidecar:search:*"), Vec::<String>::new());
    // /api/cache/clear with a pattern, then without.
    fill(&a, &cluster, 20).await;
    let rag = client()
        .post(a.url("/api/rag/query"))
        .json(&json!({"query": "kept?", "top_k": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(rag.status(), 200);
    let (status, body) = clear(&b, r#"{"pattern": "search:*"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true, "{body}");
    assert_eq!(body["redis_cleared"], 20, "{body}");
    assert_eq!(body["redis_errors"], 0, "{body}");
    assert!(cluster.keys("rag-sidecar:search:*").is_empty());
    assert_eq!(cluster.keys("rag-sidecar:rag:*").len(), 1);
    let (status, body) = clear(&b, "").await;
    assert_eq!(
        (status, body["success"].clone()),
        (200, json!(true)),
        "{body}"
    );
    assert!(cluster.keys("rag-sidecar:rag:*").is_empty());
    // The limiter's and the fleet's keys stay.
    assert!(!cluster.keys("rag-sidecar:fleet:*").is_empty());
    // A's memory too (by the generation B's clear bumped).
    eventually("A cleared by B's clear", async || {
        search(&a, "question 3").await.0 == "MISS"
    })
    .await;
}

#[tokio::test]
async fn leases_make_one_upstream_call_on_a_cluster() {
    let mock = Mock::start_with(&["--search-latency-ms", "500"]);
    let cluster = RedisCluster::start(3);
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(sidecar(&mock, &cluster, "").await);
    }
    let answers =
        futures_util::future::join_all((0..15).map(|i| search(&fleet[i % 3], "leased?"))).await;
    assert_eq!(mock.stats().await["by_path"]["/api/search"], 1);
    assert!(answers.iter().all(|a| a.1 == answers[0].1));
}

#[tokio::test]
async fn redis_failures_are_counted_by_operation() {
    let mock = Mock::start();
    let mut cluster = RedisCluster::start(3);
    let a = sidecar(&mock, &cluster, "").await;
    for i in 0..3 {
        cluster.kill(i);
    }
    eventually("A sees the cluster down", async || {
        a.get_json("/api/cache/stats").await["redis_connected"] == false
    })
    .await;
    // Requests go on without Redis.
    assert_eq!(search(&a, "while down").await.0, "MISS");
    let (status, body) = clear(&a, "").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["success"], false, "{body}");
    let metrics = a.get_text("/metrics").await;
    let count = |op: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("rag_sidecar_redis_errors_total{") && l.contains(op))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(count("op=\"get\"") >= 1, "{metrics}");
    assert!(count("op=\"clear\"") >= 1, "{metrics}");
}

#[tokio::test]
async fn the_upstream_quota_is_one_for_the_fleet_on_a_cluster() {
    let mock = Mock::start();
    let cluster = RedisCluster::start(3);
    // Two windows: the script names every key of the route (one per
    // window, the queue's), all in the route's one hash slot.
    let quota = "[rate_limit]\nenabled = false\n[[routes]]\nname = \"rag\"\nupstream_limit = \"1 per 10 seconds; 100 per day\"\nupstream_queue = \"1s\"\n";
    let a = sidecar(&mock, &cluster, quota).await;
    let b = sidecar(&mock, &cluster, quota).await;
    let ask = |sc: &Sidecar, q: &str| {
        client()
            .post(sc.url("/api/rag/query"))
            .json(&json!({"query": q, "top_k": 1}))
            .send()
    };
    assert_eq!(ask(&a, "first").await.unwrap().status(), 200);
    // B's budget is A's: spent for 10 s.
    let r = ask(&b, "second").await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(mock.stats().await["by_path"]["/api/rag/query"], 1);
    // The calls of both windows (and the recent calls), on one node.
    let by_node = cluster.keys_by_node("rag-sidecar:rl:{quota:rag}:*");
    let holding: Vec<&Vec<String>> = by_node.iter().filter(|k| !k.is_empty()).collect();
    assert_eq!(holding.len(), 1, "{by_node:?}");
    assert!(holding[0].len() >= 3, "{by_node:?}");
}
