//! The cache layer end to end, memory only: hits replayed byte for byte,
//! canonical keys, identities, request directives, what is not stored,
//! coalescing, stale-if-error, invalidation, and the cache endpoints.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock and a plain lock are right here"
)]

mod common;

use std::time::{Duration, Instant};

use common::{Mock, Sidecar, assert_needs_token, client, token_only_sidecar};
use reqwest::Response;
use serde_json::{Value, json};

fn search_body(q: &str) -> Value {
    json!({"query": q, "top_k": 3})
}

async fn search(sc: &Sidecar, body: &Value, headers: &[(&str, &str)]) -> Response {
    let mut req = client().post(sc.url("/api/search")).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn h<'a>(r: &'a Response, name: &str) -> &'a str {
    r.headers().get(name).map_or("", |v| v.to_str().unwrap())
}

async fn upstream_searches(mock: &Mock) -> u64 {
    mock.stats().await["by_path"]["/api/search"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_hit_replays_the_answer_byte_for_byte() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let first = search(&sc, &search_body("Học máy là gì?"), &[]).await;
    assert_eq!(first.status(), 200);
    assert_eq!(h(&first, "x-cache"), "MISS");
    assert_eq!(
        h(&first, "cache-status"),
        "rag-sidecar; fwd=miss; stored; ttl=3600"
    );
    let first_headers = first.headers().clone();
    let first_body = first.bytes().await.unwrap();

    // The same question in NFD with stray whitespace and other key order.
    let nfd: String = unicode_normalization::UnicodeNormalization::nfd("Học máy là gì?").collect();
    let again = search(&sc, &json!({"top_k": 3, "query": format!("  {nfd} ")}), &[]).await;
    assert_eq!(again.status(), 200);
    assert_eq!(h(&again, "x-cache"), "HIT");
    assert!(h(&again, "cache-status").starts_with("rag-sidecar; hit; ttl="));
    assert_eq!(h(&again, "age"), "0");
    for (name, value) in &first_headers {
        let per_response = [
            "x-cache",
            "cache-status",
            "date",
            "x-request-id",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "ratelimit",
        ];
        if !per_response.contains(&name.as_str()) {
            assert_eq!(again.headers().get(name), Some(value), "{name}");
        }
    }
    assert_ne!(
        h(&again, "x-request-id"),
        first_headers["x-request-id"].to_str().unwrap()
    );
    assert_eq!(again.bytes().await.unwrap(), first_body);
    assert_eq!(upstream_searches(&mock).await, 1);
}

#[tokio::test]
async fn identities_never_share_an_answer() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let body = search_body("same question");
    for (who, expect) in [("alice", "MISS"), ("bob", "MISS"), ("alice", "HIT")] {
        let r = search(&sc, &body, &[("X-User-Id", who)]).await;
        assert_eq!(h(&r, "x-cache"), expect, "{who}");
    }
    let r = search(&sc, &body, &[("Authorization", "Bearer t1")]).await;
    assert_eq!(h(&r, "x-cache"), "MISS");
    assert_eq!(upstream_searches(&mock).await, 3);
}

#[tokio::test]
async fn no_cache_refreshes_and_no_store_bypasses() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let body = search_body("directives");
    search(&sc, &body, &[]).await;
    let r = search(&sc, &body, &[("Cache-Control", "no-cache")]).await;
    assert_eq!(h(&r, "x-cache"), "MISS");
    assert_eq!(
        h(&r, "cache-status"),
        "rag-sidecar; fwd=request; stored; ttl=3600"
    );
    assert_eq!(upstream_searches(&mock).await, 2);
    let r = search(&sc, &body, &[("Cache-Control", "no-store")]).await;
    assert_eq!(h(&r, "x-cache"), "BYPASS");
    assert_eq!(upstream_searches(&mock).await, 3);
    let r = search(&sc, &body, &[]).await;
    assert_eq!(h(&r, "x-cache"), "HIT");
    assert_eq!(upstream_searches(&mock).await, 3);
}

#[tokio::test]
async fn uncacheable_answers_are_not_stored() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "[cache]\nmax_body_bytes = 600\n").await;
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 5] = [
        (
            "vary",
            // A header outside the key (Cookie is in it now: an identity
            // header).
            &[("X-Mock-Response-Header", "Vary: X-Device")],
            "detail=vary",
        ),
        ("404", &[("X-Mock-Status", "404")], "detail=status"),
        (
            "cookie",
            &[("X-Mock-Response-Header", "Set-Cookie: session=abc")],
            "detail=set-cookie",
        ),
        (
            "private",
            &[("X-Mock-Response-Header", "Cache-Control: private")],
            "detail=private",
        ),
        (
            "no-store",
            &[("X-Mock-Response-Header", "Cache-Control: no-store")],
            "detail=private",
        ),
    ];
    for (q, headers, detail) in cases {
        for _ in 0..2 {
            let r = search(&sc, &search_body(q), headers).await;
            assert_eq!(h(&r, "x-cache"), "MISS", "{q}");
            assert!(
                h(&r, "cache-status").ends_with(detail),
                "{q}: {}",
                h(&r, "cache-status")
            );
        }
    }
    // Over max_body_bytes: streamed through whole, not stored.
    let big = json!({"query": "big", "top_k": 50});
    for _ in 0..2 {
        let r = search(&sc, &big, &[]).await;
        assert_eq!(h(&r, "x-cache"), "MISS");
        assert!(h(&r, "cache-status").contains("detail=too-large"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["count"], 50);
    }
    assert_eq!(upstream_searches(&mock).await, 12);
    let stats: Value = sc.get_json("/api/cache/stats").await;
    assert_eq!(stats["memory_items"], 0);
}

#[tokio::test]
async fn fifty_identical_concurrent_misses_make_one_upstream_call() {
    let mock = Mock::start_with(&["--search-latency-ms", "300"]);
    // Not a rate-limit test: 50 at once would pass search's 30 per minute.
    let sc = Sidecar::start(&mock.url(), "[rate_limit]\nenabled = false\n").await;
    let body = search_body("thundering herd");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (url, body) = (sc.url("/api/search"), body.clone());
            tokio::spawn(async move {
                let r = client().post(url).json(&body).send().await.unwrap();
                let status = r.headers()["cache-status"].to_str().unwrap().to_string();
                (r.status(), status, r.bytes().await.unwrap())
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(upstream_searches(&mock).await, 1);
    assert!(
        results
            .iter()
            .all(|(s, _, b)| *s == 200 && *b == results[0].2)
    );
    let stored = results
        .iter()
        .filter(|(_, c, _)| c.contains("stored"))
        .count();
    let collapsed = results
        .iter()
        .filter(|(_, c, _)| c.contains("collapsed"))
        .count();
    assert_eq!(stored, 1);
    // Requests that arrived after the answer was stored are plain hits.
    assert_eq!(
        collapsed + results.iter().filter(|(_, c, _)| c.contains("hit")).count(),
        49
    );
}

#[tokio::test]
async fn waiters_take_turns_when_the_shared_call_fails_and_are_not_left_hanging() {
    let mock = Mock::start();
    let sc = Sidecar::start(
        &mock.url(),
        // No retries: this is about the cache's coalescing alone.
        "[[routes]]\nname = \"search\"\ntimeout = \"3s\"\nretry = false\n",
    )
    .await;
    let body = search_body("failing herd");
    let started = Instant::now();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (url, body) = (sc.url("/api/search"), body.clone());
            tokio::spawn(async move {
                client()
                    .post(url)
                    .header("X-Mock-Status", "503")
                    .header("X-Mock-Delay-Ms", "500")
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().as_u16());
    }
    // Each gets the app's 503, the open circuit's (five failures open it),
    // or, once its route timeout is spent waiting its turn, 504: after the
    // first call failed, one waiter led the next attempt and the others
    // waited on it (500 ms each), instead of all ten calling the failing
    // app at once.
    assert!(
        statuses.iter().all(|s| [503, 504].contains(s)),
        "{statuses:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let calls = upstream_searches(&mock).await;
    assert!((2..10).contains(&calls), "{calls} calls, {statuses:?}");
}

#[tokio::test]
async fn stale_entries_answer_when_the_upstream_fails() {
    let mock = Mock::start();
    let sc = Sidecar::start(
        &mock.url(),
        "[[routes]]\nname = \"search\"\ntimeout = \"500ms\"\ncache = { ttl = \"300ms\" }\n",
    )
    .await;
    let body = search_body("stale please");
    let fresh = search(&sc, &body, &[]).await;
    assert_eq!(h(&fresh, "x-cache"), "MISS");
    let original = fresh.bytes().await.unwrap();
    // Let the entry pass its 300 ms TTL (it stays for stale_if_error, 1 h).
    tokio::time::sleep(Duration::from_millis(400)).await;

    let r = search(&sc, &body, &[("X-Mock-Status", "503")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(h(&r, "x-cache"), "STALE");
    assert!(
        h(&r, "cache-status").starts_with("rag-sidecar; fwd=stale; fwd-status=503; ttl=-"),
        "{}",
        h(&r, "cache-status")
    );
    assert_eq!(r.bytes().await.unwrap(), original);

    // A timeout too.
    let r = search(&sc, &body, &[("X-Mock-Delay-Ms", "2000")]).await;
    assert_eq!(h(&r, "x-cache"), "STALE");
    assert!(h(&r, "cache-status").contains("detail=upstream-error"));

    // When the upstream answers again, the entry is refreshed from it.
    let r = search(&sc, &body, &[]).await;
    assert_eq!(h(&r, "x-cache"), "MISS");
    assert!(h(&r, "cache-status").starts_with("rag-sidecar; fwd=stale; stored"));
    assert_eq!(h(&search(&sc, &body, &[]).await, "x-cache"), "HIT");
}

#[tokio::test]
async fn corpus_changes_invalidate_search_and_rag() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let body = search_body("before upload");
    search(&sc, &body, &[]).await;
    let rag = || {
        client()
            .post(sc.url("/api/rag/query"))
            .json(&json!({"query": "q", "top_k": 5, "language": "auto"}))
    };
    rag().send().await.unwrap();
    assert_eq!(h(&rag().send().await.unwrap(), "x-cache"), "HIT");
    assert_eq!(h(&search(&sc, &body, &[]).await, "x-cache"), "HIT");

    let up = sc.post("/api/upload?filename=new.pdf", "pdf bytes").await;
    assert_eq!(up.status(), 200);
    assert_eq!(h(&search(&sc, &body, &[]).await, "x-cache"), "MISS");
    assert_eq!(h(&rag().send().await.unwrap(), "x-cache"), "MISS");

    // A failed corpus change clears nothing.
    let del = client()
        .delete(sc.url("/api/documents/absent.pdf"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 404);
    assert_eq!(h(&search(&sc, &body, &[]).await, "x-cache"), "HIT");
    let del = client()
        .delete(sc.url("/api/documents/new.pdf"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    assert_eq!(h(&search(&sc, &body, &[]).await, "x-cache"), "MISS");
}

#[tokio::test]
async fn cache_stats_and_clear_endpoints() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    for q in ["one", "two"] {
        search(&sc, &search_body(q), &[]).await;
    }
    search(&sc, &search_body("one"), &[]).await;
    sc.post_json("/api/rag/query", &json!({"query": "r"})).await;

    let stats: Value = sc.get_json("/api/cache/stats").await;
    for field in [
        "backend",
        "hits",
        "misses",
        "hit_rate",
        "sets",
        "deletes",
        "errors",
        "memory_items",
        "redis_connected",
    ] {
        assert!(stats.get(field).is_some(), "{field} missing: {stats}");
    }
    assert_eq!(stats["backend"], "memory");
    assert_eq!(stats["redis_connected"], false);
    assert_eq!(
        (stats["hits"].as_u64(), stats["misses"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(stats["hit_rate"], 25.0);
    assert_eq!(stats["sets"], 3);
    assert_eq!(stats["memory_items"], 3);
    assert_eq!(stats["namespaces"]["search"]["items"], 2);
    assert_eq!(stats["namespaces"]["rag"]["items"], 1);

    let clear = |body: &'static str| client().post(sc.url("/api/cache/clear")).body(body).send();
    let r: Value = clear(r#"{"pattern": "search:*"}"#)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        r,
        json!({
            "success": true,
            "cleared": 2,
            "memory_cleared": 2,
            "redis_cleared": 0,
            "redis_errors": 0,
            "redis_not_cleared": 0,
            "pattern": "search:*"
        })
    );
    assert_eq!(
        h(&search(&sc, &search_body("one"), &[]).await, "x-cache"),
        "MISS"
    );
    let r = sc.post_json("/api/rag/query", &json!({"query": "r"})).await;
    assert_eq!(h(&r, "x-cache"), "HIT", "other namespaces untouched");

    let r: Value = clear("").await.unwrap().json().await.unwrap();
    assert_eq!(
        (r["cleared"].as_u64(), &r["pattern"]),
        (Some(2), &Value::Null)
    );
    let bad = clear("{not json").await.unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.json::<Value>().await.unwrap()["error"], "Bad request");
    let stats: Value = sc.get_json("/api/cache/stats").await;
    assert_eq!(stats["memory_items"], 0);
    assert_eq!(stats["deletes"], 4);
}

#[tokio::test]
async fn clear_is_guarded() {
    let mock = Mock::start();
    let sc = token_only_sidecar(&mock.url(), "t0k").await;
    assert_needs_token(&sc, "/api/cache/clear", "t0k").await;
    // Stats are read-only and open.
    assert_eq!(sc.get_status("/api/cache/stats").await, 200);
}

#[tokio::test]
async fn embedding_cache_can_be_switched_off() {
    let mock = Mock::start();
    let on = Sidecar::start(&mock.url(), "").await;
    let off = Sidecar::start_env(&mock.url(), "", &[("ENABLE_EMBEDDING_CACHE", "False")]).await;
    let embed = |sc: &Sidecar| {
        client()
            .post(sc.url("/api/embed"))
            .json(&json!({"text": "x"}))
            .send()
    };
    embed(&on).await.unwrap();
    assert_eq!(h(&embed(&on).await.unwrap(), "x-cache"), "HIT");
    let r = embed(&off).await.unwrap();
    assert!(r.headers().get("x-cache").is_none());
    let stats: Value = off.get_json("/api/cache/stats").await;
    assert!(stats["namespaces"].get("embedding").is_none(), "{stats}");
}

#[tokio::test]
async fn namespaces_hold_at_most_their_max_items() {
    let mock = Mock::start();
    let sc = Sidecar::start(
        &mock.url(),
        "[rate_limit]\nenabled = false\n[[routes]]\nname = \"search\"\ncache = { max_items = 8 }\n",
    )
    .await;
    for i in 0..40 {
        assert_eq!(
            search(&sc, &search_body(&format!("q{i}")), &[])
                .await
                .status(),
            200
        );
    }
    let stats: Value = sc.get_json("/api/cache/stats").await;
    let items = stats["namespaces"]["search"]["items"].as_u64().unwrap();
    assert!((1..=8).contains(&items), "{items} items for max_items = 8");
    assert_eq!(stats["namespaces"]["search"]["sets"], 40);
}

#[tokio::test]
async fn an_answer_fetched_across_a_corpus_change_is_not_stored() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    let body = search_body("asked during an upload");
    let slow = {
        let (url, body) = (sc.url("/api/search"), body.clone());
        tokio::spawn(async move {
            client()
                .post(url)
                .header("X-Mock-Delay-Ms", "500")
                .json(&body)
                .send()
                .await
                .unwrap()
        })
    };
    mock.wait_stats("the search upstream", |s| s["in_flight"] == 1)
        .await;
    let up = sc.post("/api/upload", "new").await;
    assert_eq!(up.status(), 200);
    let r = slow.await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        h(&r, "cache-status").ends_with("detail=invalidated"),
        "{}",
        h(&r, "cache-status")
    );
    assert_eq!(h(&search(&sc, &body, &[]).await, "x-cache"), "MISS");
}

#[tokio::test]
async fn waiters_serve_stale_at_once_when_the_shared_call_fails() {
    let mock = Mock::start();
    let sc = Sidecar::start(
        &mock.url(),
        "[[routes]]\nname = \"search\"\ncache = { ttl = \"200ms\" }\nretry = false\n",
    )
    .await;
    let body = search_body("stale herd");
    search(&sc, &body, &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = upstream_searches(&mock).await;
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let (url, body) = (sc.url("/api/search"), body.clone());
            tokio::spawn(async move {
                let r = client()
                    .post(url)
                    .header("X-Mock-Status", "503")
                    .header("X-Mock-Delay-Ms", "300")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                (r.status(), h(&r, "x-cache").to_string())
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            (reqwest::StatusCode::OK, "STALE".to_string())
        );
    }
    // One call went to the failing app; the waiters did not retry it.
    assert_eq!(upstream_searches(&mock).await, before + 1);
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = Mock::start();
    let sc = Sidecar::start(
        &mock.url(),
        "[[routes]]\nname = \"search\"\ntimeout = \"300ms\"\n",
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    s.write_all(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"query\":")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("Request timeout"), "{text}");
    assert_eq!(upstream_searches(&mock).await, 0);
}
