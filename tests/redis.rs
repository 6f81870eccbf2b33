//! The cache's Redis layer against a real redis-server the test starts on a
//! free port: shared entries between sidecars, TTLs in Redis, fallback to
//! memory while Redis is down or slow, reconnection by itself, clearing with
//! SCAN, invalidation through pub/sub, and a Sentinel-managed server.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock and a plain lock are right here"
)]

mod common;

use std::time::{Duration, Instant};

use common::{Mock, Redis, Sidecar, client, eventually, x_cache};
use serde_json::{Value, json};

/// A search under the one name every replica is reached by (a Service's):
/// `Host` is in the cache key.
async fn search(sc: &Sidecar, q: &str) -> reqwest::Response {
    client()
        .post(sc.url("/api/search"))
        .header("host", "rag-services")
        .json(&json!({"query": q, "top_k": 2}))
        .send()
        .await
        .unwrap()
}

async fn stats(sc: &Sidecar) -> Value {
    sc.get_json("/api/cache/stats").await
}

async fn sidecar(mock: &Mock, redis: &Redis) -> Sidecar {
    Sidecar::start(
        &mock.url(),
        &format!("[redis]\nurl = \"{}\"\n", redis.url()),
    )
    .await
}

async fn connected(sc: &Sidecar) {
    common::until_redis_connected(&format!("http://{}", sc.addr)).await;
}

#[tokio::test]
async fn entries_are_shared_through_redis_with_their_ttl() {
    let (mock, redis) = (Mock::start(), Redis::start());
    let a = sidecar(&mock, &redis).await;
    let b = sidecar(&mock, &redis).await;
    connected(&a).await;
    connected(&b).await;
    assert_eq!(x_cache(&search(&a, "shared").await), "MISS");
    let keys = redis.keys("rag-sidecar:search:*");
    assert_eq!(keys.len(), 1, "{keys:?}");
    // TTL + stale_if_error: 1 h + 1 h.
    let pttl: u64 = redis.cli(&["PTTL", &keys[0]]).trim().parse().unwrap();
    assert!(pttl > 7_100_000 && pttl <= 7_200_000, "{pttl}");
    // B has never seen it: a Redis hit, which fills B's memory...
    let hit = search(&b, "shared").await;
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(mock.stats().await["by_path"]["/api/search"], 1);
    assert_eq!(stats(&b).await["memory_items"], 1);
    let s = stats(&b).await;
    assert_eq!(
        (s["backend"].as_str(), s["redis_connected"].as_bool()),
        (Some("redis"), Some(true))
    );
    // ...so B answers from memory even with Redis gone.
    drop(redis);
    assert_eq!(x_cache(&search(&b, "shared").await), "HIT");
}

#[tokio::test]
async fn redis_down_or_slow_never_fails_or_stalls_a_request() {
    let (mock, mut redis) = (Mock::start(), Redis::start());
    let sc = sidecar(&mock, &redis).await;
    connected(&sc).await;
    redis.stop();
    eventually("redis_connected false", async || {
        stats(&sc).await["redis_connected"] == false
    })
    .await;
    // The legacy reading of a Redis outage: the cache runs on memory.
    assert_eq!(stats(&sc).await["backend"], "memory");
    for (i, expect) in [(0, "MISS"), (1, "HIT")] {
        let t = Instant::now();
        let r = search(&sc, "while down").await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(x_cache(&r), expect);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    assert!(stats(&sc).await["errors"].as_u64().unwrap() >= 1);

    // Back on the same port: the sidecar reconnects by itself.
    redis.restart();
    connected(&sc).await;
    assert_eq!(stats(&sc).await["backend"], "redis");
    assert_eq!(x_cache(&search(&sc, "after restart").await), "MISS");
    assert_eq!(redis.keys("rag-sidecar:search:*").len(), 1);

    // Slow (blocked for 2 s): requests go on within the 50 ms timeout.
    let blocker = {
        let port = redis.port.to_string();
        std::thread::spawn(move || {
            std::process::Command::new("redis-cli")
                .args(["-p", &port, "DEBUG", "SLEEP", "2"])
                .output()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let r = search(&sc, "while slow").await;
    assert_eq!(r.status(), 200);
    assert!(
        t.elapsed() < Duration::from_millis(600),
        "stalled {:?}",
        t.elapsed()
    );
    let _ = blocker.join();
}

#[tokio::test]
async fn a_sidecar_starts_while_redis_is_down() {
    let (mock, mut redis) = (Mock::start(), Redis::start());
    redis.stop();
    let sc = sidecar(&mock, &redis).await;
    let r = search(&sc, "no redis yet").await;
    assert_eq!(r.status(), 200);
    assert_eq!(stats(&sc).await["redis_connected"], false);
    redis.restart();
    connected(&sc).await;
}

#[tokio::test]
async fn clear_uses_scan_in_redis_and_counts() {
    let (mock, redis) = (Mock::start(), Redis::start());
    let sc = sidecar(&mock, &redis).await;
    connected(&sc).await;
    for q in ["a", "b", "c"] {
        search(&sc, q).await;
    }
    sc.post_json("/api/rag/query", &json!({"query": "r"})).await;
    assert_eq!(redis.keys("rag-sidecar:search:*").len(), 3);
    assert_eq!(redis.keys("rag-sidecar:rag:*").len(), 1);
    let limiter_keys = redis.keys("rag-sidecar:rl:*").len();
    assert!(limiter_keys > 0);
    let r: Value = sc
        .post_json("/api/cache/clear", &json!({"pattern": "search:*"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            r["memory_cleared"].as_u64(),
            r["redis_cleared"].as_u64(),
            r["cleared"].as_u64()
        ),
        (Some(3), Some(3), Some(3))
    );
    assert!(redis.keys("rag-sidecar:search:*").is_empty());
    assert_eq!(redis.keys("rag-sidecar:rag:*").len(), 1);
    // Clearing everything clears the cache, not the rate limiter's state.
    client()
        .post(sc.url("/api/cache/clear"))
        .send()
        .await
        .unwrap();
    assert!(redis.keys("rag-sidecar:rag:*").is_empty());
    assert_eq!(redis.keys("rag-sidecar:rl:*").len(), limiter_keys);
}

#[tokio::test]
async fn invalidation_reaches_every_sidecar() {
    let (mock, redis) = (Mock::start(), Redis::start());
    let a = sidecar(&mock, &redis).await;
    let b = sidecar(&mock, &redis).await;
    connected(&a).await;
    connected(&b).await;
    search(&a, "corpus question").await;
    assert_eq!(x_cache(&search(&b, "corpus question").await), "HIT"); // now in B's memory too
    // Give B's subscriber time to be subscribed (it subscribes once connected).
    eventually("B subscribed", async || {
        redis
            .cli(&["PUBSUB", "NUMSUB", "rag-sidecar:invalidate"])
            .lines()
            .nth(1)
            == Some("2")
    })
    .await;
    let up = a.post("/api/upload", "new doc").await;
    assert_eq!(up.status(), 200);
    // An upload leaves the old entries as stale (in memory and Redis), never
    // a hit again; B learns of it by the message.
    eventually("B answers from after the upload", async || {
        let r = search(&b, "corpus question").await;
        r.json::<Value>().await.unwrap()["corpus_version"] == 1
    })
    .await;
    // A deletion purges them: gone from Redis and from B's memory.
    let del = a
        .status_of(http::Method::DELETE, "/api/documents/doc-1.pdf")
        .await;
    assert_eq!(del, 200);
    assert!(redis.keys("rag-sidecar:search:*").is_empty());
    eventually("B's memory purged", async || {
        stats(&b).await["namespaces"]["search"]["items"] == 0
    })
    .await;
}

/// A Sentinel-managed Redis: the sidecars ask the Sentinel for the primary.
#[tokio::test]
async fn a_sentinel_managed_redis_is_followed() {
    let (mock, redis) = (Mock::start(), Redis::start());
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_addr().port();
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {} 1\n",
            redis.port
        ),
    )
    .unwrap();
    /// Killed on drop, also when an assertion fails.
    struct Sentinel(std::process::Child);
    impl Drop for Sentinel {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _sentinel = Sentinel(
        std::process::Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server --sentinel"),
    );
    let url = format!("redis-sentinel://127.0.0.1:{port}/0?sentinelServiceName=mymaster");
    let toml = format!("[redis]\nurl = \"{url}\"\n");
    let a = Sidecar::start(&mock.url(), &toml).await;
    let b = Sidecar::start(&mock.url(), &toml).await;
    connected(&a).await;
    connected(&b).await;
    assert_eq!(x_cache(&search(&a, "through the sentinel").await), "MISS");
    assert_eq!(x_cache(&search(&b, "through the sentinel").await), "HIT");
    assert_eq!(redis.keys("rag-sidecar:search:*").len(), 1);
}

/// A streamed answer, stored once it ended, is in Redis like any entry: the
/// other sidecar replays it byte for byte.
#[tokio::test]
async fn a_streamed_answer_is_shared_through_redis() {
    let (mock, redis) = (Mock::start(), Redis::start());
    let a = sidecar(&mock, &redis).await;
    let b = sidecar(&mock, &redis).await;
    connected(&a).await;
    connected(&b).await;
    let ask = |sc: &Sidecar| {
        client()
            .post(sc.url("/api/rag/query"))
            .header("host", "rag-services")
            .header("accept", "text/event-stream")
            .json(&json!({"query": "streamed and shared", "top_k": 2}))
            .send()
    };
    let first = ask(&a).await.unwrap();
    assert_eq!(x_cache(&first), "MISS");
    let streamed = first.bytes().await.unwrap();
    eventually("the stream stored in Redis", async || {
        redis.keys("rag-sidecar:rag:*").len() == 1
    })
    .await;
    let hit = ask(&b).await.unwrap();
    assert_eq!(x_cache(&hit), "HIT");
    assert!(
        hit.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(hit.bytes().await.unwrap(), streamed);
}
