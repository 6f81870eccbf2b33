//! Request cache directives (RFC 9111 §5.2.1): never a panic, whatever the
//! `Cache-Control` bytes; every delta-seconds read is capped at 2^31; the
//! decision for any freshness is one of the three, and a fresh entry is
//! never turned away without a directive that says why.
#![no_main]
use http::{HeaderMap, HeaderValue, header::CACHE_CONTROL};
use libfuzzer_sys::fuzz_target;
use rag_sidecar::layers::cache::directives::{MaxStale, Use, decide, directives};
use rag_sidecar::layers::cache::policy::Freshness;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut h = HeaderMap::new();
    h.insert(CACHE_CONTROL, v);
    let d = directives(&h);
    let cap = 1u64 << 31;
    assert!(d.max_age.is_none_or(|n| n <= cap));
    assert!(d.min_fresh.is_none_or(|n| n <= cap));
    assert!(!matches!(d.max_stale, Some(MaxStale::Secs(n)) if n > cap));
    for f in [
        Freshness::Fresh { age_secs: 5, ttl_left: 10 },
        Freshness::Stale { age_secs: 20, over: 5 },
        Freshness::Expired,
    ] {
        match decide(&d, f) {
            Use::Forward { detail: None } => {
                assert!(!matches!(f, Freshness::Fresh { .. }))
            }
            Use::Hit => assert!(matches!(f, Freshness::Fresh { .. })),
            Use::Stale => assert!(matches!(f, Freshness::Stale { .. })),
            Use::Forward { detail: Some(_) } => {}
        }
    }
});
