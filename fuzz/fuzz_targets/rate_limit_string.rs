//! Flask-Limiter strings: never a panic, and a parsed limit prints back to a
//! string that parses to the same limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rag_sidecar::config::rate;

fuzz_target!(|text: &str| {
    if let Ok(limits) = rate::parse(text) {
        let back = rate::parse(limits.as_str())
            .unwrap_or_else(|e| panic!("{text:?} → {:?} does not parse: {e}", limits.as_str()));
        assert_eq!(back.limits(), limits.limits());
    }
});
