//! `Retry-After` parsing: never a panic; any wait it returns is capped at
//! the maximum wait.
#![no_main]
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue, header::RETRY_AFTER};
use libfuzzer_sys::fuzz_target;
use rag_sidecar::layers::retry::backoff::Backoff;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut h = HeaderMap::new();
    h.insert(RETRY_AFTER, v);
    let b = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(10),
    };
    for now in [SystemTime::UNIX_EPOCH, SystemTime::now()] {
        if let Some(w) = b.retry_after(&h, now) {
            assert!(w <= b.max);
        }
    }
});
