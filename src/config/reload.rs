//! What a reload may change (PRODUCT.md "Running it": reload without a
//! restart). A new configuration takes effect whole, except the settings
//! that only a restart can apply: they keep their running values, and each
//! one the new sources changed is reported, to be logged as needing a
//! restart.
//!
//! Live: the routes (and every per-route setting: timeouts, cache TTLs,
//! limits, quotas, circuits, retries; not a namespace's `max_items`, which
//! sizes its memory layer), `rate_limit.*` but its secret, `retry.*`,
//! `circuit_breaker.*`, `cache.default_ttl`, `cache.identity_headers`,
//! `cache.vary_headers`, `max_request_body`, `response_buffer`,
//! `trusted_proxies`, `log.level` and `admin.token`. Everything else is
//! fixed at start: the listeners and the connection guards, the threads,
//! the upstream and its pool, Redis and the fleet's timings, the memory
//! and spool budgets, the cache's memory sizes, largest body and stale
//! window (its store is kept), logging's format and file, metrics and
//! tracing.

use super::Config;
use super::settings::SETTINGS;

/// The settings a reload keeps at their running values.
pub const RESTART_ONLY: &[&str] = &[
    "listen",
    "upstream",
    "admin_listen",
    "shutdown_grace",
    "max_inflight",
    "max_connections",
    "header_read_timeout",
    "client_body_timeout",
    "client_body_deadline",
    "send_timeout",
    "upstream_idle_timeout",
    "spool_max_bytes",
    "memory_budget",
    "threads",
    "readiness_path",
    "log.format",
    "log.file",
    "cache.max_memory_items",
    "cache.max_memory_bytes",
    "cache.max_body_bytes",
    "cache.stale_if_error",
    "cache.lease_ttl",
    "cache.generation_poll",
    "redis.url",
    "redis.timeout",
    "redis.key_prefix",
    "rate_limit.key_secret",
    "metrics.enabled",
    "tracing.otlp_endpoint",
    "tracing.service_name",
    "tracing.sample_ratio",
];

/// A setting the new sources changed that needs a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedsRestart {
    pub key: &'static str,
    /// The running value, kept (secrets masked).
    pub running: String,
    /// The value the sources now give, not taken (secrets masked).
    pub wanted: String,
}

impl Config {
    /// `next` with every [`RESTART_ONLY`] setting at its value in `self`,
    /// and what of those `next` wanted to change.
    pub fn for_reload(&self, mut next: Config) -> (Config, Vec<NeedsRestart>) {
        let shown = |cfg: &Config, key: &str| -> Option<(String, bool)> {
            let s = SETTINGS.iter().find(|s| s.key == key)?;
            let v = s.value.show(cfg).map(|v| match v {
                toml::Value::String(text) if s.secret => s.value.mask(&text),
                other => other.to_string(),
            });
            Some((v.unwrap_or_else(|| "(unset)".into()), s.secret))
        };
        let changed: Vec<NeedsRestart> = RESTART_ONLY
            .iter()
            .filter_map(|key| {
                let (running, _) = shown(self, key)?;
                let (wanted, _) = shown(&next, key)?;
                (running != wanted).then_some(NeedsRestart {
                    key,
                    running,
                    wanted,
                })
            })
            .collect();
        next.listen = self.listen;
        next.upstream = self.upstream.clone();
        next.admin_listen = self.admin_listen;
        next.shutdown_grace = self.shutdown_grace;
        next.max_inflight = self.max_inflight;
        next.max_connections = self.max_connections;
        next.header_read_timeout = self.header_read_timeout;
        next.client_body_timeout = self.client_body_timeout;
        next.client_body_deadline = self.client_body_deadline;
        next.send_timeout = self.send_timeout;
        next.upstream_idle_timeout = self.upstream_idle_timeout;
        next.spool_max_bytes = self.spool_max_bytes;
        next.memory_budget = self.memory_budget;
        next.threads = self.threads;
        next.readiness_path = self.readiness_path.clone();
        next.log.format = self.log.format;
        next.log.file = self.log.file.clone();
        next.cache.max_memory_items = self.cache.max_memory_items;
        next.cache.max_memory_bytes = self.cache.max_memory_bytes;
        next.cache.max_body_bytes = self.cache.max_body_bytes;
        next.cache.stale_if_error = self.cache.stale_if_error;
        next.cache.lease_ttl = self.cache.lease_ttl;
        next.cache.generation_poll = self.cache.generation_poll;
        next.redis = self.redis.clone();
        next.rate_limit.key_secret = self.rate_limit.key_secret.clone();
        next.metrics_enabled = self.metrics_enabled;
        next.tracing = self.tracing.clone();
        (next, changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    fn load(toml: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let o = Overrides {
            config: Some(path),
            ..Overrides::default()
        };
        let env: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        Config::load(&o, &env, dir.path()).unwrap().0
    }

    #[test]
    fn every_restart_only_setting_is_kept_and_named_and_the_rest_is_taken() {
        let running = load("listen = \"127.0.0.1:8000\"\n");
        // Every restart-only key given another value, and live ones too.
        let next = load(
            "listen = \"127.0.0.1:9000\"\nupstream = \"http://127.0.0.1:1\"\n\
             admin_listen = \"127.0.0.1:9001\"\nshutdown_grace = \"3s\"\nmax_inflight = 7\n\
             max_connections = 9\nheader_read_timeout = \"3s\"\nclient_body_timeout = \"4s\"\n\
             client_body_deadline = \"5s\"\nsend_timeout = \"6s\"\nupstream_idle_timeout = \"1s\"\n\
             spool_max_bytes = 1000000\nmemory_budget = 2000000\nthreads = 3\n\
             readiness_path = \"/x\"\n\
             [log]\nformat = \"json\"\nfile = \"/tmp/x.log\"\nlevel = \"debug\"\n\
             [cache]\nmax_memory_items = 3\nmax_memory_bytes = 3000000\nmax_body_bytes = 1000\n\
             stale_if_error = \"9s\"\nlease_ttl = \"9s\"\n\
             generation_poll = \"9s\"\ndefault_ttl = \"7s\"\n\
             [redis]\nurl = \"redis://:pw@127.0.0.1:6390/0\"\ntimeout = \"70ms\"\nkey_prefix = \"x:\"\n\
             [rate_limit]\nkey_secret = \"s\"\ndefault = \"3 per minute\"\n\
             [metrics]\nenabled = false\n\
             [tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\nservice_name = \"x\"\nsample_ratio = 0.5\n\
             [admin]\ntoken = \"new\"\n",
        );
        let (merged, changed) = running.for_reload(next);
        let keys: Vec<&str> = changed.iter().map(|c| c.key).collect();
        assert_eq!(keys, RESTART_ONLY, "each restart-only key reported once");
        for key in RESTART_ONLY {
            let s = SETTINGS.iter().find(|s| s.key == *key).unwrap();
            assert_eq!(
                s.value.show(&merged),
                s.value.show(&running),
                "{key} kept at its running value"
            );
        }
        let redis = changed.iter().find(|c| c.key == "redis.url").unwrap();
        assert!(!redis.wanted.contains("pw"), "masked: {}", redis.wanted);
        // The live ones taken.
        assert_eq!(merged.admin_token.as_deref(), Some("new"));
        assert_eq!(merged.log.level, "debug");
        assert_eq!(merged.cache.default_ttl, std::time::Duration::from_secs(7));
        // Nothing changed: nothing reported.
        let (_, none) = running.for_reload(running.clone());
        assert!(none.is_empty(), "{none:?}");
    }
}
