//! Rate limiting end to end, memory mode: Flask-Limiter's burst behaviour,
//! the legacy 429, the headers on every answer of a limited route, per-route
//! limits, client keys (address, trusted X-Forwarded-For, header), dry run,
//! exemptions, and switching it off.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock and a plain lock are right here"
)]

mod common;

use common::{Mock, Sidecar, client};
use serde_json::{Value, json};

async fn search(sc: &Sidecar, i: usize, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client()
        .post(sc.url("/api/search"))
        .json(&json!({"query": format!("q{i}"), "top_k": 1}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn h(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn thirty_pass_and_the_thirty_first_gets_the_legacy_429() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "").await;
    for i in 0..30 {
        let r = search(&sc, i, &[]).await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(h(&r, "x-ratelimit-limit"), "30");
        assert_eq!(h(&r, "x-ratelimit-remaining"), (29 - i).to_string());
        assert_eq!(h(&r, "ratelimit-policy"), "\"search\";q=30;w=60");
        assert!(h(&r, "ratelimit").starts_with(&format!("\"search\";r={};t=", 29 - i)));
        let reset: u64 = h(&r, "x-ratelimit-reset").parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(reset >= now && reset <= now + 61, "{reset} vs {now}");
    }
    let before = mock.stats().await["requests"].as_u64().unwrap();
    let r = search(&sc, 30, &[]).await;
    assert_eq!(r.status(), 429);
    let retry_after: u64 = h(&r, "retry-after").parse().unwrap();
    assert!(
        (1..=2).contains(&retry_after),
        "one cell every 2 s: {retry_after}"
    );
    assert_eq!(h(&r, "x-ratelimit-remaining"), "0");
    assert_eq!(h(&r, "x-ratelimit-limit"), "30");
    assert!(r.headers().contains_key("ratelimit"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": "Rate limit exceeded", "message": "30 requests per minute limit reached", "retry_after": retry_after})
    );
    // The rejected request reached neither the cache nor the app.
    assert_eq!(mock.stats().await["requests"].as_u64().unwrap(), before);
    // A repeated (cacheable) question is limited too: the limit sits before the cache.
    assert_eq!(search(&sc, 0, &[]).await.status(), 429);
    // Both rejections are counted for the route, on /metrics.
    let metrics = sc.get_text("/metrics").await;
    assert!(
        metrics.contains("rag_sidecar_ratelimit_rejected_total{route=\"search\"} 2"),
        "{metrics}"
    );
}

/// The fields are on the sidecar's own answers of a limited route too: an
/// unreachable app (502), the route's deadline (504), an oversized upload
/// (413). On the cached search route the failed miss says so in `X-Cache`.
#[tokio::test]
async fn the_sidecars_own_answers_on_a_limited_route_carry_the_fields() {
    let closed = common::closed_port();
    let sc = Sidecar::start(&closed.url(), "").await;
    let r = search(&sc, 0, &[]).await;
    assert_eq!(r.status(), 502);
    assert_eq!(h(&r, "x-ratelimit-limit"), "30");
    assert_eq!(h(&r, "x-ratelimit-remaining"), "29");
    assert_eq!(h(&r, "ratelimit-policy"), "\"search\";q=30;w=60");
    assert!(h(&r, "ratelimit").starts_with("\"search\";r=29;t="));
    assert_eq!(h(&r, "x-cache"), "MISS");
    assert_eq!(h(&r, "cache-status"), "rag-sidecar; fwd=miss; detail=error");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "Bad gateway", "{body}");

    let mock = Mock::start();
    let toml = "max_request_body = 1024\n[[routes]]\nname = \"search\"\ntimeout = \"300ms\"\n";
    let sc = Sidecar::start(&mock.url(), toml).await;
    let r = search(&sc, 1, &[("X-Mock-Delay-Ms", "5000")]).await;
    assert_eq!(r.status(), 504);
    assert_eq!(h(&r, "x-ratelimit-remaining"), "29");
    assert_eq!(h(&r, "x-cache"), "MISS");
    let r = client()
        .post(sc.url("/api/upload"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(h(&r, "x-ratelimit-limit"), "10");
    assert_eq!(h(&r, "ratelimit-policy"), "\"upload\";q=10;w=60");
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "Payload too large"
    );
}

#[tokio::test]
async fn routes_have_their_own_limits_and_the_default_applies_elsewhere() {
    let mock = Mock::start();
    let sc = Sidecar::start_env(&mock.url(), "", &[("DEFAULT_RATE_LIMIT", "3 per minute")]).await;
    for _ in 0..3 {
        assert_eq!(sc.get_status("/api/stats").await, 200);
    }
    let r = client().get(sc.url("/api/stats")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.json::<Value>().await.unwrap()["message"],
        "3 requests per minute limit reached"
    );
    // Every path of the default route shares its counter...
    assert_eq!(sc.get_status("/api/documents").await, 429);
    // ...while another route class with the default limit counts on its own.
    let del = client()
        .delete(sc.url("/api/documents/doc-1.pdf"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    // Search has its own 30 per minute, untouched by the default's exhaustion.
    assert_eq!(search(&sc, 0, &[]).await.status(), 200);
    // The sidecar's own endpoints are exempt.
    for _ in 0..10 {
        assert_eq!(sc.get_status("/healthz").await, 200);
    }
}

#[tokio::test]
async fn several_limits_all_hold() {
    let mock = Mock::start();
    let sc = Sidecar::start(
        &mock.url(),
        "[[routes]]\nname = \"search\"\nrate_limit = \"100 per minute; 2 per hour\"\n",
    )
    .await;
    let r = search(&sc, 0, &[]).await;
    assert_eq!(
        h(&r, "ratelimit-policy"),
        "\"search\";q=100;w=60, \"search-2\";q=2;w=3600"
    );
    assert_eq!(
        h(&r, "x-ratelimit-limit"),
        "2",
        "the most restrictive is reported"
    );
    assert_eq!(search(&sc, 1, &[]).await.status(), 200);
    let r = search(&sc, 2, &[]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.json::<Value>().await.unwrap()["message"],
        "2 requests per hour limit reached"
    );
}

#[tokio::test]
async fn client_keys_address_trusted_forwarded_for_and_header() {
    let mock = Mock::start();
    let limit = "[[routes]]\nname = \"search\"\nrate_limit = \"2 per minute\"\n";
    // Untrusted peer: a spoofed X-Forwarded-For does not buy a new key.
    let sc = Sidecar::start(&mock.url(), limit).await;
    for (i, ip) in ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
        .iter()
        .enumerate()
    {
        let status = search(&sc, i, &[("X-Forwarded-For", ip)]).await.status();
        assert_eq!(status, if i < 2 { 200 } else { 429 }, "{ip}");
    }
    // Loopback trusted as a proxy: the forwarded client is the key.
    let behind = Sidecar::start(
        &mock.url(),
        &format!("trusted_proxies = [\"127.0.0.0/8\"]\n{limit}"),
    )
    .await;
    for i in 0..2 {
        assert_eq!(
            search(&behind, i, &[("X-Forwarded-For", "198.51.100.1")])
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        search(&behind, 2, &[("X-Forwarded-For", "198.51.100.1")])
            .await
            .status(),
        429
    );
    assert_eq!(
        search(&behind, 3, &[("X-Forwarded-For", "198.51.100.2")])
            .await
            .status(),
        200
    );
    // A header key, falling back to the address without it.
    let keyed = Sidecar::start(
        &mock.url(),
        &format!("[rate_limit]\nkey = \"header:X-API-Key\"\n{limit}"),
    )
    .await;
    for i in 0..2 {
        assert_eq!(
            search(&keyed, i, &[("X-API-Key", "alice")]).await.status(),
            200
        );
    }
    assert_eq!(
        search(&keyed, 2, &[("X-API-Key", "alice")]).await.status(),
        429
    );
    assert_eq!(
        search(&keyed, 3, &[("X-API-Key", "bob")]).await.status(),
        200
    );
    assert_eq!(search(&keyed, 4, &[]).await.status(), 200);
}

#[tokio::test]
async fn dry_run_exempt_and_disabled_let_everything_through() {
    let mock = Mock::start();
    let dry = Sidecar::start(&mock.url(), "[rate_limit]\ndry_run = true\n[[routes]]\nname = \"search\"\nrate_limit = \"2 per minute\"\n").await;
    for i in 0..5 {
        let r = search(&dry, i, &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            h(&r, "x-ratelimit-remaining"),
            if i < 2 {
                (1 - i).to_string()
            } else {
                "0".into()
            }
        );
    }
    // Dry run on one route only: others still reject.
    let per_route = Sidecar::start(
        &mock.url(),
        "[[routes]]\nname = \"search\"\nrate_limit = \"1 per minute\"\ndry_run = true\n[[routes]]\nname = \"default\"\nrate_limit = \"1 per minute\"\n",
    )
    .await;
    for i in 0..3 {
        assert_eq!(search(&per_route, i, &[]).await.status(), 200);
    }
    assert_eq!(per_route.get_status("/api/stats").await, 200);
    assert_eq!(per_route.get_status("/api/stats").await, 429);
    let exempt = Sidecar::start(
        &mock.url(),
        "[[routes]]\nname = \"search\"\nrate_limit = \"exempt\"\n",
    )
    .await;
    let off = Sidecar::start_env(
        &mock.url(),
        "",
        &[
            ("ENABLE_RATE_LIMIT", "False"),
            ("SEARCH_RATE_LIMIT", "1 per hour"),
        ],
    )
    .await;
    for sc in [&exempt, &off] {
        for i in 0..40 {
            let r = search(sc, i, &[]).await;
            assert_eq!(r.status(), 200);
            assert!(r.headers().get("x-ratelimit-limit").is_none());
        }
    }
}

mod shared {
    //! Redis mode: one limit for every replica, local fallback while Redis
    //! is away.

    use super::*;
    use common::{Redis, eventually};

    async fn with_redis(mock: &Mock, redis: &Redis, limit: &str) -> Sidecar {
        let sc = Sidecar::start(
            &mock.url(),
            &format!(
                "[redis]\nurl = \"{}\"\n[[routes]]\nname = \"search\"\nrate_limit = \"{limit}\"\n",
                redis.url()
            ),
        )
        .await;
        eventually("redis_connected", async || {
            sc.get_json("/api/cache/stats").await["redis_connected"] == true
        })
        .await;
        sc
    }

    #[tokio::test]
    async fn two_replicas_share_one_limit() {
        let (mock, redis) = (Mock::start(), Redis::start());
        let a = with_redis(&mock, &redis, "10 per minute").await;
        let b = with_redis(&mock, &redis, "10 per minute").await;
        let mut rejected = 0;
        for i in 0..6 {
            for sc in [&a, &b] {
                let r = search(sc, i, &[]).await;
                if r.status() == 429 {
                    rejected += 1;
                } else {
                    assert_eq!(r.status(), 200);
                }
            }
        }
        // 12 requests against one shared 10 per minute: exactly 2 rejected
        // (each replica alone would have let all 6 through).
        assert_eq!(rejected, 2);
        // One key for the client, shared: both replicas took the fleet's
        // secret from Redis.
        let keys = redis.keys("rag-sidecar:rl:search:*");
        assert_eq!(keys.len(), 1, "{keys:?}");
        let secret = redis.cli(&["GET", "rag-sidecar:rl:secret"]);
        assert!(secret.trim().len() >= 32, "the fleet's secret: {secret:?}");
        // A keyed hash of the address, not a plain digest anyone can table.
        let plain = {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest("127.0.0.1")[..16])
        };
        assert!(!keys[0].contains("127.0.0.1"), "{}", keys[0]);
        assert!(!keys[0].ends_with(&plain), "unsalted digest: {}", keys[0]);
        let pttl: i64 = redis.cli(&["PTTL", &keys[0]]).trim().parse().unwrap();
        assert!(pttl > 0 && pttl <= 60_000, "expires by itself: {pttl}");
    }

    #[tokio::test]
    async fn a_configured_secret_keys_the_hash_of_the_client() {
        use hmac::Mac;
        let (mock, redis) = (Mock::start(), Redis::start());
        let sc = Sidecar::start(
            &mock.url(),
            &format!(
                "[redis]\nurl = \"{}\"\n[rate_limit]\nkey_secret = \"fleet-secret\"\n",
                redis.url()
            ),
        )
        .await;
        eventually("redis_connected", async || {
            sc.get_json("/api/cache/stats").await["redis_connected"] == true
        })
        .await;
        assert_eq!(search(&sc, 0, &[]).await.status(), 200);
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"fleet-secret").unwrap();
        mac.update(b"ip:127.0.0.1");
        let expected = hex::encode(&mac.finalize().into_bytes()[..16]);
        let keys = redis.keys("rag-sidecar:rl:search:*");
        assert_eq!(keys, [format!("rag-sidecar:rl:search:{expected}")]);
        // Configured: none is made in Redis.
        assert_eq!(redis.cli(&["EXISTS", "rag-sidecar:rl:secret"]).trim(), "0");
    }

    #[tokio::test]
    async fn replicas_fall_back_to_local_limits_while_redis_is_down() {
        let (mock, mut redis) = (Mock::start(), Redis::start());
        let sc = with_redis(&mock, &redis, "3 per minute").await;
        redis.stop();
        eventually("redis_connected false", async || {
            sc.get_json("/api/cache/stats").await["redis_connected"] == false
        })
        .await;
        for i in 0..3 {
            let t = std::time::Instant::now();
            assert_eq!(search(&sc, i, &[]).await.status(), 200);
            assert!(t.elapsed() < std::time::Duration::from_millis(500));
        }
        assert_eq!(
            search(&sc, 3, &[]).await.status(),
            429,
            "the local limiter still limits"
        );
        // Back: the shared limiter answers again (a fresh Redis: allowed).
        redis.restart();
        eventually("redis_connected", async || {
            sc.get_json("/api/cache/stats").await["redis_connected"] == true
        })
        .await;
        assert_eq!(search(&sc, 4, &[]).await.status(), 200);
        assert_eq!(redis.keys("rag-sidecar:rl:search:*").len(), 1);
    }
}
