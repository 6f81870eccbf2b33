//! Layer tests of the rate limiter: limits, headers, keys and dry run,
//! through the layer with a mock inner service.

use super::*;
use crate::error::{RATELIMIT, RATELIMIT_POLICY, X_RATELIMIT_LIMIT, X_RATELIMIT_REMAINING};
use http::HeaderMap;

#[test]
fn describes_like_flask_limiter() {
    let r = |count, secs| Rate {
        count,
        period: Duration::from_secs(secs),
    };
    assert_eq!(describe(r(30, 60)), "30 requests per minute");
    assert_eq!(describe(r(2, 300)), "2 requests per 5 minutes");
    assert_eq!(describe(r(1, 1)), "1 request per second");
    assert_eq!(describe(r(100, 86_400)), "100 requests per day");
    assert_eq!(describe(r(5, 90)), "5 requests per 90 seconds");
}

#[test]
fn burst_then_reject_then_headers() {
    let mut cfg = Config::default();
    cfg.rate_limit.default = crate::config::rate::parse("3 per minute; 100 per hour").unwrap();
    let layer = RateLimitLayer::new(&cfg, None);
    let shared = layer.shared.as_ref().unwrap();
    let policy = shared.routes.get("default").unwrap();
    let key = ClientKey::Ip("192.0.2.1".parse().unwrap());
    for expect_remaining in [2, 1, 0] {
        let v = shared.check(policy, &key);
        assert!(v.iter().all(|v| v.wait.is_none()));
        let mut h = HeaderMap::new();
        headers(policy, &v).unwrap().write_to(&mut h);
        assert_eq!(h[&X_RATELIMIT_LIMIT], "3");
        assert_eq!(
            h[&X_RATELIMIT_REMAINING],
            expect_remaining.to_string().as_str()
        );
        assert_eq!(
            h[&RATELIMIT],
            // t: until the bucket is full again, 20 s per token spent.
            format!(
                "\"default\";r={expect_remaining};t={}",
                (3 - expect_remaining) * 20
            )
            .as_str()
        );
        assert_eq!(
            h[&RATELIMIT_POLICY],
            "\"default\";q=3;w=60, \"default-2\";q=100;w=3600"
        );
    }
    let v = shared.check(policy, &key);
    let rejected = v.iter().find(|v| v.wait.is_some()).unwrap();
    assert_eq!(rejected.limit.name, "default");
    let wait = ceil_secs(rejected.wait.unwrap());
    assert!((1..=20).contains(&wait), "{wait}");
    // Deciding on it rejects and counts; in dry run it counts apart and passes.
    assert!(Shared::decide(policy, &v).is_err());
    assert_eq!(policy.rejected.load(Ordering::Relaxed), 1);
    let mut dry_cfg = cfg.clone();
    dry_cfg.rate_limit.dry_run = true;
    let dry = RateLimitLayer::new(&dry_cfg, None);
    let dry_shared = dry.shared.as_ref().unwrap();
    let dry_policy = dry_shared.routes.get("default").unwrap();
    for _ in 0..4 {
        let v = dry_shared.check(dry_policy, &key);
        assert!(Shared::decide(dry_policy, &v).is_ok());
    }
    assert_eq!(dry_policy.dry_run_rejected.load(Ordering::Relaxed), 1);
    assert_eq!(dry_policy.rejected.load(Ordering::Relaxed), 0);
    // Another client is not affected.
    let other = ClientKey::Ip("192.0.2.2".parse().unwrap());
    assert!(
        shared
            .check(policy, &other)
            .iter()
            .all(|v| v.wait.is_none())
    );
    // Exempt and own limits: search has its own 30 per minute.
    assert_eq!(shared.routes["search"].limits[0].rate.count, 30);
}

#[test]
fn idle_clients_are_forgotten() {
    let mut cfg = Config::default();
    cfg.rate_limit.default = crate::config::rate::parse("1000 per second").unwrap();
    let layer = RateLimitLayer::new(&cfg, None);
    let shared = layer.shared.as_ref().unwrap();
    let policy = shared.routes.get("default").unwrap();
    for i in 0..200_000u32 {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        shared.check(policy, &ClientKey::Ip(ip.into()));
    }
    assert_eq!(layer.tracked_keys(), 200_000);
    // Once every client's limit has recovered (one period), a sweep drops them.
    std::thread::sleep(Duration::from_millis(1100));
    layer.sweep();
    assert_eq!(layer.tracked_keys(), 0);
}

#[test]
fn disabled_means_no_limiters() {
    let mut cfg = Config::default();
    cfg.rate_limit.enabled = false;
    assert!(RateLimitLayer::new(&cfg, None).shared.is_none());
}
