//! The upstream quota (`upstream_limit`) over real processes: the mock app
//! enforces Gemini's quota on its RAG route (`--quota`), and bursts through
//! one or two sidecars never trip it; requests wait their turn first come
//! first served; a stale answer stands in when there is no room; Redis
//! killed mid-burst fails no request; the windows are exact (a burst of N
//! goes at once, the next when the oldest leave); the next call goes to the
//! client with the fewest, across the fleet; a client that hangs up passes
//! its turn on.

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
    two_with(mock, redis, quota_toml, limit, queue).await
}

/// Two sidecars on one Redis, connected, configured by `toml(limit, queue,
/// the [redis] section)`.
async fn two_with(
    mock: &Mock,
    redis: &Redis,
    toml: fn(&str, &str, &str) -> String,
    limit: &str,
    queue: &str,
) -> (Sidecar, Sidecar) {
    let toml = toml(
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
    // Marked as the quota's doing.
    let again = client()
        .post(sc.url("/api/rag/query"))
        .header("host", "rag-services")
        .json(&json!({"query": "kept", "top_k": 1}))
        .send()
        .await
        .unwrap();
    let status = again.headers()["cache-status"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(status.contains("fwd=stale; detail=quota"), "{status}");
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

/// `ask` as a client named by `X-Client` (the rate limiter's key here).
async fn ask_as(url: String, who: &str, q: String) -> u16 {
    client()
        .post(url)
        .header("X-Client", who)
        .json(&json!({"query": q, "top_k": 1}))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// The questions the app was asked, in order.
async fn asked(mock: &Mock) -> Vec<String> {
    mock.stats().await["rag_queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_str().unwrap().to_string())
        .collect()
}

/// Rate limits keyed by the `X-Client` header (high enough never to bite),
/// so that clients on one address are told apart.
const BY_CLIENT: &str = "[rate_limit]\nkey = \"header:X-Client\"\ndefault = \"1000 per minute\"\n";

fn fair_toml(limit: &str, queue: &str, extra: &str) -> String {
    format!(
        "{BY_CLIENT}{extra}[[routes]]\nname = \"rag\"\nupstream_limit = \"{limit}\"\nupstream_queue = \"{queue}\"\n"
    )
}

#[tokio::test]
async fn a_burst_of_n_goes_at_once_and_the_rest_when_the_oldest_leave() {
    // The app allows 3 calls in any 2 s (a sliding window, as Gemini's);
    // the sidecar the same. Six at once: three now, three when the first
    // have been 2 s (and the guard) in the window, none over the app's
    // quota. Spaced one every 667 ms, the sixth would have gone at 3.3 s.
    let mock = Mock::start_with(&["--quota", "3", "--quota-window-ms", "2000"]);
    let sc = Sidecar::start(&mock.url(), &quota_toml("3 per 2 seconds", "5s", "")).await;
    let t = std::time::Instant::now();
    let answers = futures_util::future::join_all(
        (0..6).map(|i| ask(sc.url("/api/rag/query"), format!("exact {i}"))),
    )
    .await;
    let took = t.elapsed();
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");
    let stats = mock.stats().await;
    assert_eq!(stats["quota_errors"], 0, "{stats}");
    assert_eq!(stats["by_path"]["/api/rag/query"], 6);
    // The second three waited for the window (the mock answers at once).
    assert!(took >= Duration::from_millis(2_250), "{took:?}");
    let m = sc.get_text("/metrics").await;
    assert!(
        m.contains(r#"rag_sidecar_upstream_quota_calls{route="rag",state="used",window="3 per 2 seconds"} 3"#),
        "{m}"
    );
}

#[tokio::test]
async fn the_next_call_goes_to_the_client_with_the_fewest_across_the_fleet() {
    // The app allows 2 calls a second. A flooder on sidecar A sends eight
    // distinct questions at once; a second client on sidecar B asks two
    // once the flood is queued. B's two take the first two calls that
    // free, ahead of A's six waiting ones.
    let mock = Mock::start_with(&["--quota", "2", "--quota-window-ms", "1000"]);
    let redis = Redis::start();
    let (a, b) = two_with(&mock, &redis, fair_toml, "2 per second", "10s").await;
    let flood = futures_util::future::join_all(
        (0..8).map(|i| ask_as(a.url("/api/rag/query"), "flooder", format!("flood {i}"))),
    );
    let victim = async {
        eventually("the flood queued", async || {
            a.get_json("/api/metrics").await["gauges"]["upstream_queue.rag"] == 6
        })
        .await;
        futures_util::future::join_all(
            (0..2).map(|i| ask_as(b.url("/api/rag/query"), "victim", format!("victim {i}"))),
        )
        .await
    };
    let (flood, victim) = tokio::join!(flood, victim);
    assert_eq!(victim, [200, 200]);
    assert!(
        flood.iter().filter(|s| **s == 200).count() >= 6,
        "{flood:?}"
    );
    let order = asked(&mock).await;
    assert!(
        order[..2].iter().all(|q| q.starts_with("flood")),
        "{order:?}"
    );
    let mut next: Vec<&str> = order[2..4].iter().map(String::as_str).collect();
    next.sort_unstable();
    assert_eq!(next, ["victim 0", "victim 1"], "{order:?}");
    assert_eq!(mock.stats().await["quota_errors"], 0);
}

#[tokio::test]
async fn clients_that_hang_up_pass_their_calls_on_and_the_budget_is_spent() {
    // A client asks two questions every 500 ms and hangs up on each after
    // 600 ms; the app takes 2 calls in any 2 s (the sidecar the same). The
    // calls freed at 2.25 s go to the questions still waiting then, not to
    // places held by requests long gone: the app is given its whole budget
    // (2 at once, 2 more when the first leave the window), and a second
    // client that asks at 1 s is among the next two.
    let mock = Mock::start_with(&["--quota", "2", "--quota-window-ms", "2000"]);
    let sc = Sidecar::start(&mock.url(), &fair_toml("2 per 2 seconds", "10s", "")).await;
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(600))
        .build()
        .unwrap();
    let leavers = futures_util::future::join_all((0..12).map(|i| {
        let (quick, url) = (quick.clone(), sc.url("/api/rag/query"));
        async move {
            tokio::time::sleep(Duration::from_millis(500 * (i / 2))).await;
            let _ = quick
                .post(url)
                .header("X-Client", "leaver")
                .json(&json!({"query": format!("left {i}")}))
                .send()
                .await;
        }
    }));
    let stayer = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        ask_as(sc.url("/api/rag/query"), "stayer", "stays".into()).await
    };
    let (_, status) = tokio::join!(leavers, stayer);
    assert_eq!(status, 200);
    let order = asked(&mock).await;
    // Two at once, two at 2.25 s: the stayer (fewer calls) and the
    // leaver's question still waiting then.
    assert_eq!(order.len(), 4, "{order:?}");
    assert!(
        order[..2].iter().all(|q| q.starts_with("left")),
        "{order:?}"
    );
    assert!(order[2..].contains(&"stays".to_string()), "{order:?}");
    assert_eq!(mock.stats().await["quota_errors"], 0);
}

/// A sidecar with no `upstream_limit`, rate limits off, and these retry
/// and other settings.
fn learning_toml(retry: &str, extra: &str) -> String {
    format!("[rate_limit]\nenabled = false\n[retry]\n{retry}\n{extra}")
}

#[tokio::test]
async fn with_no_limit_set_the_route_learns_the_apps_quota_and_the_circuit_stays_closed() {
    // The app takes 4 RAG calls in any minute. Ten distinct questions at
    // once: 4 answered, and the quota signals that follow give the route a
    // limit of the 4 that succeeded, instead of opening its circuit.
    let mock = Mock::start_with(&["--quota", "4", "--quota-window-ms", "60000"]);
    // Quick retries; the breaker's default threshold (5).
    let retry = "initial_wait = \"50ms\"\nmax_wait = \"100ms\"";
    let sc = Sidecar::start(&mock.url(), &learning_toml(retry, "")).await;
    let answers = futures_util::future::join_all(
        (0..10).map(|i| ask(sc.url("/api/rag/query"), format!("learn {i}"))),
    )
    .await;
    assert_eq!(
        answers.iter().filter(|a| a.0 == 200).count(),
        4,
        "{answers:?}"
    );
    let learned = "Upstream quota of 4 per minute (learned) reached";
    let refused = answers.iter().filter(|a| a.3["message"] == learned).count();
    assert!(refused >= 4, "{answers:?}");
    let errors_then = mock.stats().await["quota_errors"].as_u64().unwrap();
    // Each failing question met a quota error on its first attempt, and at
    // most on one retry before the limit was learned (then it waited its
    // turn, and was refused).
    assert!(errors_then <= 12, "{errors_then}");
    // The learned limit, seen in all three places.
    let m = sc.get_json("/api/metrics").await;
    assert_eq!(m["gauges"]["upstream_quota_learned.rag"], 4, "{m}");
    let h = sc.get_json("/api/health/detailed").await;
    assert_eq!(h["upstream_quota"]["rag"]["learned_per_minute"], 4, "{h}");
    let text = sc.get_text("/metrics").await;
    assert!(
        text.contains("rag_sidecar_upstream_quota_learned{route=\"rag\"} 4"),
        "{text}"
    );
    // Quota signals were the only failures: the circuit stayed closed.
    assert_eq!(h["circuit_breakers"]["gemini"]["state"], "closed", "{h}");
    // Under the learned limit nothing more reaches the app this minute:
    // five more questions are refused at once, with no new quota error.
    let t = std::time::Instant::now();
    let more = futures_util::future::join_all(
        (0..5).map(|i| ask(sc.url("/api/rag/query"), format!("more {i}"))),
    )
    .await;
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    for (status, retry_after, _, body) in &more {
        assert_eq!(*status, 503, "{body}");
        assert_eq!(body["message"], learned, "{body}");
        assert!(retry_after.is_some());
    }
    assert_eq!(mock.stats().await["quota_errors"], errors_then);
}

#[tokio::test]
async fn the_circuit_still_opens_when_every_call_fails_with_no_limit_to_learn() {
    // Every RAG answer is a quota error (a daily quota spent). For a minute
    // the route tries to learn and the circuit stays closed; then, with no
    // call having succeeded, the signals count as failures and the circuit
    // opens.
    let mock = Mock::start();
    let sc = Sidecar::start(
        &mock.url(),
        &learning_toml("max_retries = 0", "[circuit_breaker]\nthreshold = 3\n"),
    )
    .await;
    let t = std::time::Instant::now();
    let mut opened_after = None;
    while t.elapsed() < Duration::from_secs(90) {
        let r = client()
            .post(sc.url("/api/rag/query"))
            .header("X-Mock-Status", "429")
            .header("X-Mock-Body", "429 RESOURCE_EXHAUSTED")
            .json(&json!({"query": "spent"}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if status == 503 && body["message"] == "Circuit breaker OPEN: Service unavailable" {
            opened_after = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let opened_after = opened_after.expect("the circuit never opened");
    assert!(
        (Duration::from_secs(55)..Duration::from_secs(75)).contains(&opened_after),
        "{opened_after:?}"
    );
    let m = sc.get_json("/api/metrics").await;
    assert!(
        m["gauges"].get("upstream_quota_learned.rag").is_none(),
        "{m}"
    );
}

#[tokio::test]
async fn an_answer_that_waited_through_an_upload_is_kept() {
    // The question waits its turn; an upload (a corpus change) lands during
    // the wait. The call leaves after it, so its answer is of the corpus as
    // it now is: stored and a hit for the next asker, not thrown away as
    // "changed during the call" (which spent a call of the quota for
    // nothing).
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), &quota_toml("1 per 2 seconds", "5s", "")).await;
    assert_eq!(ask(sc.url("/api/rag/query"), "first".into()).await.0, 200);
    let waiting = tokio::spawn(ask(sc.url("/api/rag/query"), "kept".into()));
    eventually("queued", async || {
        sc.get_json("/api/metrics").await["gauges"]["upstream_queue.rag"] == 1
    })
    .await;
    let up = client()
        .post(sc.url("/api/upload?filename=new.txt"))
        .header("content-type", "application/octet-stream")
        .body(vec![b'x'; 100])
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 200);
    let kept = waiting.await.unwrap();
    assert_eq!((kept.0, kept.2.as_str()), (200, "MISS"), "{:?}", kept.3);
    let again = ask(sc.url("/api/rag/query"), "kept".into()).await;
    assert_eq!((again.0, again.2.as_str()), (200, "HIT"), "{:?}", again.3);
    assert_eq!(again.3["corpus_version"], kept.3["corpus_version"]);
    assert_eq!(mock.stats().await["by_path"]["/api/rag/query"], 2);
}
