//! TOML configuration: never a panic, and a configuration that loads
//! renders (`check-config`) to a TOML that loads to the same rendering.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rag_sidecar::config::Config;

fuzz_target!(|text: &str| {
    if let Ok(cfg) = Config::from_toml(text) {
        let rendered = cfg.to_toml();
        let again = Config::from_toml(&rendered).unwrap_or_else(|e| {
            panic!("{text:?} loaded, but its rendering did not: {e}\n{rendered}")
        });
        assert_eq!(again.to_toml(), rendered);
    }
});
