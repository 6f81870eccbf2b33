//! Cache-key canonicalisation: never a panic (deep or huge JSON included),
//! canonical JSON is a fixed point, and query normalisation is idempotent.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rag_sidecar::layers::cache::key::{canonical_json, normalise_query};

fuzz_target!(|data: &[u8]| {
    if let Some(c) = canonical_json(data) {
        assert_eq!(
            canonical_json(&c).as_deref(),
            Some(&c[..]),
            "not a fixed point"
        );
    }
    if let Ok(q) = std::str::from_utf8(data) {
        // `None` means "already normal": the fast path must agree with the
        // full one, and a normalised query stays as it is.
        let once = normalise_query(q).unwrap_or_else(|| q.to_string());
        let twice = normalise_query(&once).unwrap_or_else(|| once.clone());
        assert_eq!(twice, once);
    }
});
