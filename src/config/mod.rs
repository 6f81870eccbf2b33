//! Configuration: the one [`Config`] every part of the sidecar reads, built
//! once at start-up from layered sources and validated in one place.
//!
//! Every scalar setting is one entry of the table in `settings`: its key
//! path, environment names, flag, parser, default, whether it is secret,
//! and a line of doc. The defaults ([`Config::default`]), the TOML file's
//! shape check, the `.env` / environment / flag layers, the error names,
//! the whole-configuration checks, `check-config`'s printing and the
//! reference page `docs/configuration.md` all read that table, so adding a
//! setting is its field in the structs below plus one entry.
//!
//! What is not a scalar setting keeps its own code: the `[[routes]]` array
//! (`route_file`, over the route types of `routes`) and the legacy
//! environment names that build or switch something composite
//! (`USE_REDIS` + `REDIS_*`, `SEARCH_RATE_LIMIT`, …), a small table of their
//! own in `legacy`.
//!
//! The modules, by job:
//! - `settings`: the table; `field`: how one entry reads, writes and shows its field;
//! - `parse`: the value parsers; `rate`: Flask-Limiter rate strings;
//! - `sources`: the layers and their precedence (file, `.env`, process
//!   environment, flags) and the [`Strings`] trait tests inject;
//! - `file`: the TOML text's shape, checked against the table; `dotenv`: the `.env` syntax;
//! - `legacy`: the composite legacy environment names; `routes`, `route_file`: the route table;
//! - `validate`: the whole-configuration checks; `error`: how errors are named;
//! - `print`: the effective configuration as TOML (secrets masked) and the
//!   settings table as Markdown.

pub mod dotenv;
mod error;
mod field;
mod file;
mod legacy;
mod parse;
mod print;
pub mod rate;
mod reload;
mod route_file;
pub mod routes;
mod settings;
mod sources;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use ipnet::IpNet;

pub use self::error::{ConfigError, ConfigErrors};
pub use self::legacy::IGNORED_ENV;
pub use self::parse::{fmt_duration, mask_url_password};
pub use self::print::settings_markdown;
pub use self::rate::{Rate, RateLimits};
pub use self::reload::{NeedsRestart, RESTART_ONLY};
pub use self::routes::{
    DEFAULT_ROUTE, InvalidateMode, PathMatch, RetryMode, Route, RouteCache, RouteRate,
};
pub use self::settings::ENV_NAMES;
pub use self::sources::{ENV_CONFIG, LoadReport, Overrides, ProcessEnv, Strings};

// The field structs derive `Default` as the blank the settings table's
// defaults are written onto (zeros, empty lists): the defaults themselves
// are `Config::default()`'s.

/// The upstream app's address (plain HTTP: the app sits on the same host or
/// pod, so TLS to it buys nothing and is not supported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogConfig {
    /// A tracing filter directive (`info`, `warn,rag_sidecar=debug`); the
    /// Python names WARNING and CRITICAL are accepted and mapped.
    pub level: String,
    pub format: LogFormat,
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CacheConfig {
    pub default_ttl: Duration,
    pub max_memory_items: usize,
    /// The memory layer's byte budget, shared by the namespaces.
    pub max_memory_bytes: u64,
    pub max_body_bytes: u64,
    pub stale_if_error: Duration,
    pub identity_headers: Vec<String>,
    /// Request headers that select a representation, in the key too.
    pub vary_headers: Vec<String>,
    /// How long a lease on a key outlives its holder (with Redis: one
    /// upstream call per question across the fleet).
    pub lease_ttl: Duration,
    /// How often the namespaces' generations are re-read from Redis.
    pub generation_poll: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedisConfig {
    /// `None`: memory only. Holds the password, so never print it raw.
    pub url: Option<String>,
    pub timeout: Duration,
    pub key_prefix: String,
}

/// Which value identifies a client for rate limiting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RateLimitKey {
    #[default]
    Ip,
    Header(http::HeaderName),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub default: RateLimits,
    pub key: RateLimitKey,
    pub dry_run: bool,
    /// The fleet's secret for the keyed hash of client keys in Redis; unset:
    /// made once and kept in Redis (`SET NX`).
    pub key_secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RetryConfig {
    /// `false` forwards every request once (the layer is left out).
    pub enabled: bool,
    pub max_retries: u32,
    pub initial_wait: Duration,
    pub max_wait: Duration,
    pub budget_percent: f64,
    /// Retries always allowed per second on top of the percentage, so a
    /// quiet sidecar can still retry.
    pub budget_min_per_second: u32,
    pub max_replay_bytes: u64,
    /// Body fragments that make a 5xx a `gemini_rate_limit` (a 429 always is).
    pub rate_limit_patterns: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CircuitBreakerConfig {
    /// `false` never opens a circuit (the layer is left out).
    pub enabled: bool,
    pub threshold: u32,
    pub timeout: Duration,
}

/// Traces (`[tracing]`): where spans go and which are kept. The standard
/// `OTEL_*` variables the SDK reads itself (`OTEL_TRACES_SAMPLER`,
/// `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_TRACES_*`) win over these.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans
    /// go to `<it>/v1/traces`. Unset: nothing is exported.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// The share of new traces sampled (a client's sampled flag is
    /// followed), 0 to 1.
    pub sample_ratio: f64,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    /// When set, the sidecar's own endpoints move to this address.
    pub admin_listen: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    pub max_inflight: usize,
    /// Client connections open at once on the proxy port.
    pub max_connections: usize,
    pub trusted_proxies: Vec<IpNet>,
    /// Slowloris guard: a client must send its request head within this.
    pub header_read_timeout: Duration,
    /// Pooled upstream connections idle longer are closed (below the app
    /// server's keep-alive, so the sidecar never sends on a connection the
    /// app is closing).
    pub upstream_idle_timeout: Duration,
    /// The longest pause between two reads of a request body (408).
    pub client_body_timeout: Duration,
    /// The longest a whole request body may take, from its first read (408).
    pub client_body_deadline: Duration,
    /// The longest a client may leave an answer unread (its socket full)
    /// before it is disconnected.
    pub send_timeout: Duration,
    /// Request bodies above this many bytes get 413.
    pub max_request_body: u64,
    /// Bytes of request bodies spooled to disk at once, over all requests.
    pub spool_max_bytes: u64,
    /// Answers up to this size are read from the app at once (0: off).
    pub response_buffer: u64,
    /// Bytes held for clients at once: answers read ahead, stream backlogs.
    pub memory_budget: u64,
    /// Tokio worker threads (`NUM_THREADS`).
    pub threads: usize,
    /// The cheap upstream request behind `/readyz`.
    pub readiness_path: String,
    pub log: LogConfig,
    pub cache: CacheConfig,
    pub redis: RedisConfig,
    pub rate_limit: RateLimitConfig,
    pub retry: RetryConfig,
    pub circuit_breaker: CircuitBreakerConfig,
    /// `ADMIN_TOKEN`: bearer token for the mutating admin endpoints.
    pub admin_token: Option<String>,
    /// `ENABLE_METRICS`.
    pub metrics_enabled: bool,
    pub tracing: TracingConfig,
    pub routes: Vec<Route>,
}

impl Config {
    /// The route table's entry for this name.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.name == name)
    }

    fn route_mut(&mut self, name: &str) -> Option<&mut Route> {
        self.routes.iter_mut().find(|r| r.name == name)
    }

    /// Every field zero or empty: what the settings' defaults are written onto.
    fn blank() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            upstream: Upstream {
                scheme: Scheme::HTTP,
                authority: Authority::from_static("0.0.0.0"),
            },
            admin_listen: None,
            shutdown_grace: Duration::ZERO,
            max_inflight: 0,
            max_connections: 0,
            trusted_proxies: Vec::new(),
            header_read_timeout: Duration::ZERO,
            upstream_idle_timeout: Duration::ZERO,
            client_body_timeout: Duration::ZERO,
            client_body_deadline: Duration::ZERO,
            send_timeout: Duration::ZERO,
            max_request_body: 0,
            spool_max_bytes: 0,
            response_buffer: 0,
            memory_budget: 0,
            threads: 0,
            readiness_path: String::new(),
            log: LogConfig::default(),
            cache: CacheConfig::default(),
            redis: RedisConfig::default(),
            rate_limit: RateLimitConfig::default(),
            retry: RetryConfig::default(),
            circuit_breaker: CircuitBreakerConfig::default(),
            admin_token: None,
            metrics_enabled: false,
            tracing: TracingConfig::default(),
            routes: Vec::new(),
        }
    }
}

/// A built-in rate string, covered by the test `defaults_are_valid`.
fn must_rate(s: &str) -> RateLimits {
    rate::parse(s).unwrap_or_else(|_| unreachable!("built-in rate {s:?} is valid"))
}

impl Default for Config {
    /// The built-in defaults: every setting's table default, and the
    /// built-in route table.
    fn default() -> Self {
        let mut cfg = Self::blank();
        settings::write_defaults(&mut cfg);
        cfg.routes = routes::builtin(must_rate("30 per minute"), must_rate("10 per minute"));
        cfg
    }
}

#[cfg(test)]
mod tests;
