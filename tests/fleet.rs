//! The fleet: three real sidecar processes on one real `redis-server` (the
//! shape of a deployment: one sidecar per pod, one Redis), in front of one
//! mock app. One upstream call per question across the fleet, a holder's
//! death taken over, and invalidations that reach every sidecar within the
//! contract's bound however they are sent: while Redis is down, or with the
//! pub/sub message lost. The mock's answers carry its `corpus_version`, so
//! an answer from before a corpus change can be told apart.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock is right here"
)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Mock, Redis, SidecarProcess, client, eventually, fleet_member, get_json_at};
use serde_json::{Value, json};

/// One sidecar process and its address.
struct Member {
    process: SidecarProcess,
    addr: SocketAddr,
}

impl Member {
    fn start(mock: &Mock, redis: &Redis, extra: &str) -> Self {
        let (process, addr) = fleet_member(&mock.url(), &redis.url(), extra);
        Self { process, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn stats(&self) -> Value {
        get_json_at(self.url("/api/cache/stats")).await
    }

    async fn search(&self, q: &str, headers: &[(&str, &str)]) -> Answer {
        search_at(self.url("/api/search"), q, headers).await
    }

    async fn post(&self, path: &str) -> u16 {
        client()
            .post(self.url(path))
            .body("new document")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Asks `q` until the answer carries the corpus after one upload (its
    /// `corpus_version` 1), which must come within `within` of now.
    async fn answers_from_after_the_upload(&self, q: &str, within: Duration) -> Answer {
        let since = Instant::now();
        loop {
            let answer = self.search(q, &[]).await;
            if answer.corpus() == 1 {
                return answer;
            }
            assert!(
                since.elapsed() < within,
                "still answering from before the upload {:?} on: {answer:?}",
                since.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Connected to Redis, with the fleet's generations read.
    async fn ready(&self) {
        eventually("connected and in sync", async || {
            let s = self.stats().await;
            s["redis_connected"] == true
                && s["namespaces"]["search"]["generation"].as_u64() > Some(0)
        })
        .await;
    }
}

/// Two members on one Redis, both ready.
async fn pair(mock: &Mock, redis: &Redis) -> (Member, Member) {
    let (a, b) = (
        Member::start(mock, redis, ""),
        Member::start(mock, redis, ""),
    );
    a.ready().await;
    b.ready().await;
    (a, b)
}

#[derive(Debug)]
struct Answer {
    status: u16,
    x_cache: String,
    cache_status: String,
    body: Value,
}

impl Answer {
    fn corpus(&self) -> u64 {
        self.body["corpus_version"].as_u64().unwrap()
    }
}

/// A search, as every replica is reached (one `Host`: it is in the key).
async fn search_at(url: String, q: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = client()
        .post(url)
        .header("host", "rag-services")
        .json(&json!({"query": q, "top_k": 2}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (x_cache, cache_status) = (header("x-cache"), header("cache-status"));
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        x_cache,
        cache_status,
        body,
    }
}

async fn upstream_searches(mock: &Mock) -> u64 {
    mock.stats().await["by_path"]["/api/search"]
        .as_u64()
        .unwrap_or(0)
}

fn sum(stats: &[Value], field: &str) -> u64 {
    stats
        .iter()
        .map(|s| s["namespaces"]["search"][field].as_u64().unwrap())
        .sum()
}

/// Waits until every member's pub/sub connection is subscribed again.
async fn subscribed(redis: &Redis, n: usize) {
    eventually("every sidecar subscribed", async || {
        redis
            .cli(&["PUBSUB", "NUMSUB", "rag-sidecar:invalidate"])
            .lines()
            .nth(1)
            == Some(&n.to_string())
    })
    .await;
}

#[tokio::test]
async fn thirty_identical_searches_over_three_sidecars_make_one_upstream_call() {
    let mock = Mock::start_with(&["--search-latency-ms", "600"]);
    let redis = Redis::start();
    let fleet: Vec<Member> = (0..3).map(|_| Member::start(&mock, &redis, "")).collect();
    for m in &fleet {
        m.ready().await;
    }
    let answers = futures_util::future::join_all(
        (0..30).map(|i| fleet[i % 3].search("what is a vector store?", &[])),
    )
    .await;
    assert_eq!(upstream_searches(&mock).await, 1, "{answers:#?}");
    assert!(answers.iter().all(|a| a.status == 200), "{answers:#?}");
    assert!(
        answers.iter().all(|a| a.body == answers[0].body),
        "not all answers identical: {answers:#?}"
    );
    let mut stats = Vec::new();
    for m in &fleet {
        stats.push(m.stats().await);
    }
    // Two sidecars waited for the third's call (unless a request came after
    // it stored: then a hit).
    assert_eq!(
        sum(&stats, "coalesced_remote") + sum(&stats, "hits").min(2),
        2,
        "{stats:#?}"
    );
    assert!(sum(&stats, "coalesced_remote") >= 1, "{stats:#?}");
    let collapsed = answers
        .iter()
        .filter(|a| a.cache_status.ends_with("fwd=miss; collapsed"))
        .count();
    assert!(collapsed >= 27, "{collapsed} collapsed: {answers:#?}");
}

#[tokio::test]
async fn a_holder_killed_mid_call_is_taken_over() {
    let mock = Mock::start();
    let redis = Redis::start();
    let lease_ttl = Duration::from_secs(2);
    let extra = "[cache]\nlease_ttl = \"2s\"\n";
    let mut fleet: Vec<Member> = (0..3)
        .map(|_| Member::start(&mock, &redis, extra))
        .collect();
    for m in &fleet {
        m.ready().await;
    }
    let q = "who holds the lease?";
    // A's call hangs in the app (its request alone asks for the delay: the
    // header is not in the key).
    let held = tokio::spawn(search_at(
        fleet[0].url("/api/search"),
        q,
        &[("x-mock-delay-ms", "20000")],
    ));
    mock.wait_stats("A's call in the app", |s| s["in_flight"] == 1)
        .await;
    let waiters: Vec<_> = [1, 2]
        .map(|i| tokio::spawn(search_at(fleet[i].url("/api/search"), q, &[])))
        .into();
    for m in &fleet[1..] {
        eventually("waiting on A's lease", async || {
            m.stats().await["namespaces"]["search"]["remote_waiting"] == 1
        })
        .await;
    }
    let killed = Instant::now();
    let _ = fleet[0].process.child.kill();
    let _ = fleet[0].process.child.wait();
    let mut answers = Vec::new();
    for w in waiters {
        answers.push(w.await.unwrap());
    }
    let took = killed.elapsed();
    assert!(answers.iter().all(|a| a.status == 200), "{answers:#?}");
    assert_eq!(answers[0].body, answers[1].body);
    // The app answers at once: the bound is the lease's expiry.
    assert!(
        took < lease_ttl + Duration::from_millis(700),
        "answered {took:?} after the holder died"
    );
    // A's call (still in the app) and the one that took over.
    assert_eq!(upstream_searches(&mock).await, 2);
    let stats = vec![fleet[1].stats().await, fleet[2].stats().await];
    assert_eq!(sum(&stats, "lease_takeovers"), 1, "{stats:#?}");
    assert_eq!(sum(&stats, "coalesced_remote"), 1, "{stats:#?}");
    held.abort();
}

#[tokio::test]
async fn an_upload_while_redis_is_down_reaches_the_others_when_it_is_back() {
    let mock = Mock::start();
    let mut redis = Redis::start();
    let (a, b) = pair(&mock, &redis).await;
    let q = "what changed?";
    assert_eq!(b.search(q, &[]).await.x_cache, "MISS");
    let before = b.search(q, &[]).await;
    assert_eq!((before.x_cache.as_str(), before.corpus()), ("HIT", 0));
    // Redis goes down keeping its data (as one with persistence would): the
    // generations survive, so only the queued invalidation can tell B.
    redis.cli(&["SAVE"]);
    redis.stop();
    eventually("A sees Redis down", async || {
        a.stats().await["redis_connected"] == false
    })
    .await;
    assert_eq!(a.post("/api/upload").await, 200);
    let s = a.stats().await;
    assert_eq!(
        s["namespaces"]["search"]["invalidation_pending"], true,
        "{s}"
    );
    assert_eq!(s["namespaces"]["search"]["invalidations_queued"], 1, "{s}");
    // A itself no longer answers from before the upload.
    let on_a = a.search(q, &[]).await;
    assert_eq!((on_a.x_cache.as_str(), on_a.corpus()), ("MISS", 1));
    // B, cut off, keeps its memory layer (the contract's exception).
    assert_eq!(b.search(q, &[]).await.corpus(), 0);
    redis.restart();
    for m in [&a, &b] {
        eventually("reconnected", async || {
            m.stats().await["redis_connected"] == true
        })
        .await;
    }
    b.answers_from_after_the_upload(q, Duration::from_secs(2))
        .await;
    let s = a.stats().await;
    assert_eq!(
        s["namespaces"]["search"]["invalidation_pending"], false,
        "{s}"
    );
}

#[tokio::test]
async fn a_lost_invalidation_message_is_made_up_within_a_second() {
    let mock = Mock::start();
    let redis = Redis::start();
    let (a, b) = pair(&mock, &redis).await;
    subscribed(&redis, 2).await;
    let q = "is this still true?";
    b.search(q, &[]).await;
    assert_eq!(b.search(q, &[]).await.x_cache, "HIT");
    // Every pub/sub connection dropped: the upload's message goes nowhere.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(a.post("/api/upload").await, 200);
    let answer = b
        .answers_from_after_the_upload(q, Duration::from_secs(2))
        .await;
    assert_eq!(answer.x_cache, "MISS");
}

#[tokio::test]
async fn an_upload_leaves_stale_answers_and_a_deletion_purges_them() {
    let mock = Mock::start();
    let redis = Redis::start();
    let (a, b) = pair(&mock, &redis).await;
    let q = "what does doc-1 say?";
    b.search(q, &[]).await;
    let fail = [("x-mock-status", "503")];
    // An upload (mode stale): never a hit again, but an answer while the
    // app fails, on B too.
    assert_eq!(a.post("/api/upload").await, 200);
    eventually("B took the upload's generation", async || {
        b.search(q, &fail).await.x_cache == "STALE"
    })
    .await;
    let stale = b.search(q, &fail).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.corpus(), 0);
    assert!(
        stale.cache_status.contains("fwd=stale; detail=invalidated"),
        "{stale:?}"
    );
    // Through A too, which reads the entry from Redis.
    assert_eq!(a.search(q, &fail).await.x_cache, "STALE");
    // A deletion (mode purge): gone for every purpose, in every sidecar.
    let deleted = client()
        .delete(a.url("/api/documents/doc-1.pdf"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    eventually("B purged", async || {
        b.stats().await["namespaces"]["search"]["items"] == 0
    })
    .await;
    for m in [&a, &b] {
        let failed = m.search(q, &fail).await;
        assert_eq!(failed.status, 503, "{failed:?}");
        assert_ne!(failed.x_cache, "STALE");
    }
    assert!(redis.keys("rag-sidecar:search:*").is_empty());
}

#[tokio::test]
async fn a_generation_redis_lost_is_made_again() {
    let mock = Mock::start();
    let redis = Redis::start();
    let (a, b) = pair(&mock, &redis).await;
    let q = "lost and found";
    b.search(q, &[]).await;
    // An upload through A, whose bump Redis then loses (as a failover to a
    // replica that had not received it would), with B not told: B's own
    // pub/sub connection is closed just before.
    let before = redis.cli(&["HGET", "rag-sidecar:fleet:gen", "search"]);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(a.post("/api/upload").await, 200);
    redis.cli(&["HSET", "rag-sidecar:fleet:gen", "search", before.trim()]);
    // A notices on its next poll and invalidates again: B learns it.
    b.answers_from_after_the_upload(q, Duration::from_secs(3))
        .await;
    // And Redis holds a newer generation again (made by A, or by B if B
    // had learned the lost one before it was lost).
    let before: u64 = before.trim().parse().unwrap();
    eventually("a newer generation in Redis", async || {
        redis
            .cli(&["HGET", "rag-sidecar:fleet:gen", "search"])
            .trim()
            .parse::<u64>()
            .is_ok_and(|now| now > before)
    })
    .await;
}
