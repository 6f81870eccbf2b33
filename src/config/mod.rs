//! Configuration: the one [`Config`] every part of the sidecar reads, built
//! once at start-up from layered sources and validated in one place.
//!
//! Precedence, lowest first: built-in defaults < TOML file (`--config` or
//! `RAG_SIDECAR_CONFIG`) < `.env` in the working directory < process
//! environment < command-line flags. Every bad value is collected as a
//! [`ConfigError`] naming its key (TOML path, env name or flag) and value, so
//! `check-config` can list them all. Environment access goes through the
//! [`Strings`] trait so tests inject a map instead of mutating the process.

pub mod dotenv;
mod file;
pub mod rate;
pub mod routes;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use ipnet::IpNet;

pub use self::file::FileConfig;
use self::file::RouteFile;
pub use self::rate::{Rate, RateLimits};
pub use self::routes::{DEFAULT_ROUTE, PathMatch, RetryMode, Route, RouteCache, RouteRate};

/// Where environment-style settings come from (the process, or a map in tests).
pub trait Strings {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Strings for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Strings for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

/// The process environment over the `.env` file: the process wins.
struct EnvLayers<'a> {
    process: &'a dyn Strings,
    dotenv: HashMap<String, String>,
}

impl Strings for EnvLayers<'_> {
    fn get(&self, key: &str) -> Option<String> {
        self.process
            .get(key)
            .or_else(|| self.dotenv.get(key).cloned())
    }
}

/// One bad setting: which key, what value, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub value: Option<String>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{} = {:?}: {}", self.key, v, self.reason),
            None => write!(f, "{}: {}", self.key, self.reason),
        }
    }
}

/// Every error found while loading; start-up stops if there is any.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "config error: {e}")?;
        }
        Ok(())
    }
}

/// The values given on the command line (the highest-precedence layer).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub admin_listen: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub threads: Option<String>,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A tracing filter directive (`info`, `warn,rag_sidecar=debug`); the
    /// Python names WARNING and CRITICAL are accepted and mapped.
    pub level: String,
    pub format: LogFormat,
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub default_ttl: Duration,
    pub max_memory_items: usize,
    /// The memory layer's byte budget, shared by the namespaces.
    pub max_memory_bytes: u64,
    pub max_body_bytes: u64,
    pub stale_if_error: Duration,
    pub identity_headers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `None`: memory only. Holds the password, so never print it raw.
    pub url: Option<String>,
    pub timeout: Duration,
    pub key_prefix: String,
}

/// Which value identifies a client for rate limiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKey {
    Ip,
    Header(http::HeaderName),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub enabled: bool,
    pub default: RateLimits,
    pub key: RateLimitKey,
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq)]
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreakerConfig {
    /// `false` never opens a circuit (the layer is left out).
    pub enabled: bool,
    pub threshold: u32,
    pub timeout: Duration,
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
    pub trusted_proxies: Vec<IpNet>,
    /// Slowloris guard: a client must send its request head within this.
    pub header_read_timeout: Duration,
    /// Request bodies above this many bytes get 413.
    pub max_request_body: u64,
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
    /// Whether loopback callers may use the mutating admin endpoints without
    /// the token. Turn off under a service mesh whose proxy connects from
    /// loopback (Istio's 127.0.0.6), where every caller would look local.
    pub admin_trust_loopback: bool,
    /// `ENABLE_METRICS`.
    pub metrics_enabled: bool,
    pub routes: Vec<Route>,
}

const SECRET_MASK: &str = "***";

fn must_rate(s: &str) -> RateLimits {
    // Built-in constants, covered by `defaults_are_valid`.
    rate::parse(s).unwrap_or_else(|_| unreachable!("built-in rate {s:?} is valid"))
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 5003)),
            upstream: Upstream {
                scheme: Scheme::HTTP,
                authority: Authority::from_static("127.0.0.1:5000"),
            },
            admin_listen: None,
            shutdown_grace: Duration::from_secs(25),
            max_inflight: 1024,
            trusted_proxies: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            max_request_body: 50 * 1024 * 1024 + 64 * 1024,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            readiness_path: "/api/health".into(),
            log: LogConfig {
                level: "info".into(),
                format: LogFormat::Text,
                file: None,
            },
            cache: CacheConfig {
                default_ttl: Duration::from_secs(3_600),
                max_memory_items: 1_000,
                max_memory_bytes: 128 * 1024 * 1024,
                max_body_bytes: 1024 * 1024,
                stale_if_error: Duration::from_secs(3_600),
                identity_headers: vec![
                    "authorization".into(),
                    "x-api-key".into(),
                    "x-user-id".into(),
                ],
            },
            redis: RedisConfig {
                url: None,
                timeout: Duration::from_millis(50),
                key_prefix: "rag-sidecar:".into(),
            },
            rate_limit: RateLimitConfig {
                enabled: true,
                default: must_rate("60 per minute"),
                key: RateLimitKey::Ip,
                dry_run: false,
            },
            retry: RetryConfig {
                enabled: true,
                max_retries: 3,
                initial_wait: Duration::from_secs(1),
                max_wait: Duration::from_secs(10),
                budget_percent: 20.0,
                budget_min_per_second: 10,
                max_replay_bytes: 256 * 1024,
                rate_limit_patterns: ["RESOURCE_EXHAUSTED", "Resource exhausted", "quota", "429"]
                    .map(String::from)
                    .to_vec(),
            },
            circuit_breaker: CircuitBreakerConfig {
                enabled: true,
                threshold: 5,
                timeout: Duration::from_secs(60),
            },
            admin_token: None,
            admin_trust_loopback: true,
            metrics_enabled: true,
            routes: routes::builtin(must_rate("30 per minute"), must_rate("10 per minute")),
        }
    }
}

/// Legacy `.env` names that mean nothing to a proxy: accepted and ignored.
pub const IGNORED_ENV: &[&str] = &["BATCH_SIZE"];

/// The environment names read, besides `RAG_SIDECAR_CONFIG`.
pub const ENV_NAMES: &[&str] = &[
    "LISTEN_ADDR",
    "UPSTREAM_URL",
    "USE_REDIS",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "REDIS_DB",
    "CACHE_DEFAULT_TTL",
    "CACHE_MAX_MEMORY_ITEMS",
    "ENABLE_RATE_LIMIT",
    "DEFAULT_RATE_LIMIT",
    "SEARCH_RATE_LIMIT",
    "UPLOAD_RATE_LIMIT",
    "MAX_RETRIES",
    "RETRY_INITIAL_WAIT",
    "RETRY_MAX_WAIT",
    "CIRCUIT_BREAKER_THRESHOLD",
    "CIRCUIT_BREAKER_TIMEOUT",
    "ENABLE_METRICS",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "LOG_FILE",
    "NUM_THREADS",
    "ENABLE_EMBEDDING_CACHE",
    "ADMIN_TOKEN",
];

/// The env name of the config file path.
pub const ENV_CONFIG: &str = "RAG_SIDECAR_CONFIG";

/// What loading found besides the configuration itself, for logging once
/// the logger exists.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub config_file: Option<PathBuf>,
    pub dotenv_file: Option<PathBuf>,
    pub ignored_env: Vec<String>,
}

impl Config {
    /// Loads from every layer; `cwd` is where `.env` is looked for.
    pub fn load(
        overrides: &Overrides,
        env: &dyn Strings,
        cwd: &Path,
    ) -> Result<(Self, LoadReport), ConfigErrors> {
        let mut cfg = Config::default();
        let mut errs = Errors::default();
        let mut report = LoadReport::default();
        let mut pending = Pending::default();

        // Errors name where the path came from: the flag or the variable.
        let path = overrides
            .config
            .clone()
            .map(|p| (p, "--config"))
            .or_else(|| {
                env.get(ENV_CONFIG)
                    .filter(|s| !s.is_empty())
                    .map(|p| (PathBuf::from(p), ENV_CONFIG))
            });
        if let Some((path, given_as)) = path {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let shown = path.display().to_string();
                    cfg.apply_text(&text, &shown, &mut errs, &mut pending);
                }
                Err(e) => errs.push(given_as, Some(&path.display().to_string()), e.to_string()),
            }
            report.config_file = Some(path);
        }

        let dotenv_path = cwd.join(".env");
        let dotenv = match std::fs::read_to_string(&dotenv_path) {
            Ok(text) => {
                report.dotenv_file = Some(dotenv_path.clone());
                dotenv::parse(&text).unwrap_or_else(|e| {
                    errs.push(&dotenv_path.display().to_string(), None, e.to_string());
                    HashMap::new()
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                errs.push(&dotenv_path.display().to_string(), None, e.to_string());
                HashMap::new()
            }
        };
        let layers = EnvLayers {
            process: env,
            dotenv,
        };
        cfg.apply_env(&layers, &mut errs, &mut pending);
        report.ignored_env = IGNORED_ENV
            .iter()
            .filter(|k| layers.get(k).is_some())
            .map(|k| k.to_string())
            .collect();

        cfg.apply_overrides(overrides, &mut errs);
        cfg.finish(pending, &mut errs);

        if errs.list.is_empty() {
            Ok((cfg, report))
        } else {
            Err(ConfigErrors(errs.list))
        }
    }

    /// The configuration a TOML text alone gives (defaults < the text), for
    /// tools and fuzzing: no file, `.env` or environment is read.
    pub fn from_toml(text: &str) -> Result<Self, ConfigErrors> {
        let mut cfg = Config::default();
        let mut errs = Errors::default();
        let mut pending = Pending::default();
        cfg.apply_text(text, "config", &mut errs, &mut pending);
        cfg.finish(pending, &mut errs);
        if errs.list.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errs.list))
        }
    }

    /// The route table's entry for this name.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.name == name)
    }

    fn route_mut(&mut self, name: &str) -> Option<&mut Route> {
        self.routes.iter_mut().find(|r| r.name == name)
    }

    /// A TOML text's shape errors (under `name`, the file), then its values,
    /// so that one run reports both kinds.
    fn apply_text(&mut self, text: &str, name: &str, errs: &mut Errors, pending: &mut Pending) {
        let parsed = file::parse(text);
        for e in parsed.errors {
            errs.push(name, None, e);
        }
        if let Some(f) = parsed.config {
            self.apply_file(&f, &parsed.route_numbers, errs, pending);
        }
    }

    /// `route_numbers`: the text's number of each route, when some routes
    /// were left out for shape errors (else their position).
    fn apply_file(
        &mut self,
        f: &FileConfig,
        route_numbers: &[usize],
        errs: &mut Errors,
        pending: &mut Pending,
    ) {
        errs.set(&mut self.listen, "listen", f.listen.as_deref(), parse_addr);
        errs.set(
            &mut self.upstream,
            "upstream",
            f.upstream.as_deref(),
            parse_upstream,
        );
        if let Some(v) = &f.admin_listen {
            errs.set_some(&mut self.admin_listen, "admin_listen", v, parse_addr);
        }
        errs.set(
            &mut self.shutdown_grace,
            "shutdown_grace",
            f.shutdown_grace.as_deref(),
            parse_duration,
        );
        set_plain(&mut self.max_inflight, f.max_inflight);
        if let Some(list) = &f.trusted_proxies {
            let mut nets = Vec::new();
            for (i, v) in list.iter().enumerate() {
                match parse_cidr(v) {
                    Ok(n) => nets.push(n),
                    Err(e) => errs.push(&format!("trusted_proxies[{i}]"), Some(v), e),
                }
            }
            self.trusted_proxies = nets;
        }
        errs.set(
            &mut self.header_read_timeout,
            "header_read_timeout",
            f.header_read_timeout.as_deref(),
            parse_duration,
        );
        set_plain(&mut self.max_request_body, f.max_request_body);
        set_plain(&mut self.threads, f.threads);
        errs.set(
            &mut self.readiness_path,
            "readiness_path",
            f.readiness_path.as_deref(),
            parse_path,
        );
        if let Some(l) = &f.log {
            errs.set(
                &mut self.log.level,
                "log.level",
                l.level.as_deref(),
                parse_level,
            );
            errs.set(
                &mut self.log.format,
                "log.format",
                l.format.as_deref(),
                parse_format,
            );
            if let Some(p) = &l.file {
                self.log.file = non_empty(p).map(PathBuf::from);
            }
        }
        if let Some(c) = &f.cache {
            errs.set(
                &mut self.cache.default_ttl,
                "cache.default_ttl",
                c.default_ttl.as_deref(),
                parse_duration,
            );
            set_plain(&mut self.cache.max_memory_items, c.max_memory_items);
            set_plain(&mut self.cache.max_memory_bytes, c.max_memory_bytes);
            set_plain(&mut self.cache.max_body_bytes, c.max_body_bytes);
            errs.set(
                &mut self.cache.stale_if_error,
                "cache.stale_if_error",
                c.stale_if_error.as_deref(),
                parse_duration,
            );
            if let Some(h) = &c.identity_headers {
                let mut names = Vec::new();
                for (i, v) in h.iter().enumerate() {
                    match http::HeaderName::try_from(v.as_str()) {
                        Ok(n) => names.push(n.as_str().to_string()),
                        Err(_) => errs.push(
                            &format!("cache.identity_headers[{i}]"),
                            Some(v),
                            "not a valid header name".into(),
                        ),
                    }
                }
                self.cache.identity_headers = names;
            }
        }
        if let Some(r) = &f.redis {
            if let Some(url) = &r.url {
                errs.set_some(&mut self.redis.url, "redis.url", url, parse_redis_url);
            }
            errs.set(
                &mut self.redis.timeout,
                "redis.timeout",
                r.timeout.as_deref(),
                parse_duration,
            );
            set_plain(&mut self.redis.key_prefix, r.key_prefix.clone());
        }
        if let Some(r) = &f.rate_limit {
            set_plain(&mut self.rate_limit.enabled, r.enabled);
            errs.set(
                &mut self.rate_limit.default,
                "rate_limit.default",
                r.default.as_deref(),
                rate::parse,
            );
            errs.set(
                &mut self.rate_limit.key,
                "rate_limit.key",
                r.key.as_deref(),
                parse_rate_key,
            );
            set_plain(&mut self.rate_limit.dry_run, r.dry_run);
        }
        if let Some(r) = &f.retry {
            set_plain(&mut self.retry.max_retries, r.max_retries);
            errs.set(
                &mut self.retry.initial_wait,
                "retry.initial_wait",
                r.initial_wait.as_deref(),
                parse_duration,
            );
            errs.set(
                &mut self.retry.max_wait,
                "retry.max_wait",
                r.max_wait.as_deref(),
                parse_duration,
            );
            set_plain(&mut self.retry.budget_percent, r.budget_percent);
            set_plain(&mut self.retry.max_replay_bytes, r.max_replay_bytes);
            set_plain(&mut self.retry.enabled, r.enabled);
            set_plain(
                &mut self.retry.budget_min_per_second,
                r.budget_min_per_second,
            );
            if let Some(p) = &r.rate_limit_patterns {
                if p.iter().any(|s| s.is_empty()) {
                    errs.push(
                        "retry.rate_limit_patterns",
                        Some("\"\""),
                        "patterns must not be empty (an empty one matches every body)".into(),
                    );
                } else {
                    self.retry.rate_limit_patterns = p.clone();
                }
            }
        }
        if let Some(c) = &f.circuit_breaker {
            set_plain(&mut self.circuit_breaker.enabled, c.enabled);
            set_plain(&mut self.circuit_breaker.threshold, c.threshold);
            errs.set(
                &mut self.circuit_breaker.timeout,
                "circuit_breaker.timeout",
                c.timeout.as_deref(),
                parse_duration,
            );
        }
        if let Some(a) = &f.admin {
            if let Some(t) = &a.token {
                self.admin_token = non_empty(t).map(str::to_string);
            }
            set_plain(&mut self.admin_trust_loopback, a.trust_loopback);
        }
        if let Some(m) = &f.metrics {
            set_plain(&mut self.metrics_enabled, m.enabled);
        }
        for (i, rf) in f.routes.iter().flatten().enumerate() {
            let n = route_numbers.get(i).copied().unwrap_or(i);
            self.apply_route(n, rf, errs, pending);
        }
    }

    fn apply_route(&mut self, i: usize, rf: &RouteFile, errs: &mut Errors, pending: &mut Pending) {
        let key = |field: &str| format!("routes[{i}].{field}");
        if let Err(e) = parse_name(&rf.name) {
            errs.push(&key("name"), Some(&rf.name), e);
            return;
        }
        let idx = match self.routes.iter().position(|r| r.name == rf.name) {
            Some(idx) => idx,
            None => {
                let Some(path) = &rf.path else {
                    errs.push(
                        &key("path"),
                        None,
                        format!("required for the new route {:?}", rf.name),
                    );
                    return;
                };
                let path = match PathMatch::parse(path) {
                    Ok(p) => p,
                    Err(e) => return errs.push(&key("path"), Some(path), e),
                };
                let new = Route::plain(&rf.name, path);
                // New routes go before the catch-all, in file order.
                let at = self
                    .routes
                    .iter()
                    .position(|r| r.name == DEFAULT_ROUTE)
                    .unwrap_or(self.routes.len());
                self.routes.insert(at, new);
                at
            }
        };
        self.apply_route_fields(i, idx, rf, errs, pending);
    }

    fn apply_route_fields(
        &mut self,
        i: usize,
        idx: usize,
        rf: &RouteFile,
        errs: &mut Errors,
        pending: &mut Pending,
    ) {
        let key = |field: &str| format!("routes[{i}].{field}");
        let Some(route) = self.routes.get_mut(idx) else {
            return;
        };
        if let Some(methods) = &rf.methods {
            let mut parsed = Vec::new();
            for (j, m) in methods.iter().enumerate() {
                match parse_method(m) {
                    Ok(m) => parsed.push(m),
                    Err(e) => errs.push(&format!("routes[{i}].methods[{j}]"), Some(m), e),
                }
            }
            route.methods = parsed;
        }
        errs.set(
            &mut route.path,
            &key("path"),
            rf.path.as_deref(),
            PathMatch::parse,
        );
        errs.set(
            &mut route.timeout,
            &key("timeout"),
            rf.timeout.as_deref(),
            parse_nonzero_duration,
        );
        match &rf.cache {
            None => {}
            Some(file::RouteCacheFile::Enabled(false)) => route.cache = None,
            Some(file::RouteCacheFile::Enabled(true)) if route.cache.is_none() => {
                route.cache = Some(RouteCache {
                    namespace: route.name.clone(),
                    ttl: Duration::ZERO,
                    max_items: 0,
                });
                pending.cache_ttl.push(route.name.clone());
                pending.cache_items.push(route.name.clone());
            }
            Some(file::RouteCacheFile::Enabled(true)) => {}
            Some(file::RouteCacheFile::Table(t)) => {
                let fresh = route.cache.is_none();
                let mut c = route.cache.clone().unwrap_or(RouteCache {
                    namespace: route.name.clone(),
                    ttl: Duration::ZERO,
                    max_items: 0,
                });
                if let Some(ns) = &t.namespace {
                    match parse_name(ns) {
                        Ok(()) => c.namespace = ns.clone(),
                        Err(e) => errs.push(&key("cache.namespace"), Some(ns), e),
                    }
                }
                match &t.ttl {
                    Some(v) => errs.set(
                        &mut c.ttl,
                        &key("cache.ttl"),
                        Some(v),
                        parse_nonzero_duration,
                    ),
                    None if fresh => pending.cache_ttl.push(route.name.clone()),
                    None => {}
                }
                match t.max_items {
                    Some(n) => c.max_items = n,
                    None if fresh => pending.cache_items.push(route.name.clone()),
                    None => {}
                }
                route.cache = Some(c);
            }
        }
        if let Some(v) = &rf.rate_limit {
            errs.set(
                &mut route.rate_limit,
                &key("rate_limit"),
                Some(v),
                parse_route_rate,
            );
        }
        if rf.dry_run.is_some() {
            route.dry_run = rf.dry_run;
        }
        if let Some(c) = &rf.circuit {
            match parse_name(c) {
                Ok(()) => route.circuit = c.clone(),
                Err(e) => errs.push(&key("circuit"), Some(c), e),
            }
        }
        match &rf.retry {
            None => {}
            Some(file::RetryFlag::Bool(true)) => route.retry = RetryMode::Always,
            Some(file::RetryFlag::Bool(false)) => route.retry = RetryMode::Never,
            Some(file::RetryFlag::Mode(m)) => match m.as_str() {
                "idempotent" => route.retry = RetryMode::IdempotentOnly,
                "always" => route.retry = RetryMode::Always,
                "never" => route.retry = RetryMode::Never,
                _ => errs.push(
                    &key("retry"),
                    Some(m),
                    "expected true, false or \"idempotent\"".into(),
                ),
            },
        }
        if let Some(inv) = &rf.invalidate {
            route.invalidate = inv.clone();
        }
        if rf.max_request_body.is_some() {
            route.max_request_body = rf.max_request_body;
        }
    }

    fn apply_env(&mut self, env: &dyn Strings, errs: &mut Errors, pending: &mut Pending) {
        let get = |k: &str| env.get(k);
        errs.set(
            &mut self.listen,
            "LISTEN_ADDR",
            get("LISTEN_ADDR").as_deref(),
            parse_addr,
        );
        errs.set(
            &mut self.upstream,
            "UPSTREAM_URL",
            get("UPSTREAM_URL").as_deref(),
            parse_upstream,
        );

        // Redis: REDIS_URL, else USE_REDIS=True with the legacy parts;
        // USE_REDIS=False switches it off whatever else is set.
        let mut use_redis = None;
        errs.set_opt(
            &mut use_redis,
            "USE_REDIS",
            get("USE_REDIS").as_deref(),
            parse_bool,
        );
        let url = get("REDIS_URL").filter(|s| !s.is_empty());
        if let Some(url) = &url {
            errs.set_some(&mut self.redis.url, "REDIS_URL", url, parse_redis_url);
        } else if use_redis == Some(true) {
            let host = get("REDIS_HOST")
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "localhost".into());
            let mut port = 6379u16;
            errs.set(
                &mut port,
                "REDIS_PORT",
                get("REDIS_PORT").as_deref(),
                parse_port,
            );
            let mut db = 0u32;
            errs.set(&mut db, "REDIS_DB", get("REDIS_DB").as_deref(), |s| {
                s.parse::<u32>()
                    .map_err(|_| "expected a database number".to_string())
            });
            let auth = match get("REDIS_PASSWORD").filter(|s| !s.is_empty()) {
                Some(p) => format!(":{}@", url_encode(&p)),
                None => String::new(),
            };
            let built = format!("redis://{auth}{host}:{port}/{db}");
            errs.set_some(&mut self.redis.url, "REDIS_HOST", &built, parse_redis_url);
        }
        if use_redis == Some(false) {
            self.redis.url = None;
        }

        let mut ttl = None;
        errs.set_opt(
            &mut ttl,
            "CACHE_DEFAULT_TTL",
            get("CACHE_DEFAULT_TTL").as_deref(),
            parse_env_duration,
        );
        if let Some(ttl) = ttl {
            self.cache.default_ttl = ttl;
        }
        errs.set(
            &mut self.cache.max_memory_items,
            "CACHE_MAX_MEMORY_ITEMS",
            get("CACHE_MAX_MEMORY_ITEMS").as_deref(),
            parse_count,
        );

        errs.set(
            &mut self.rate_limit.enabled,
            "ENABLE_RATE_LIMIT",
            get("ENABLE_RATE_LIMIT").as_deref(),
            parse_bool,
        );
        errs.set(
            &mut self.rate_limit.default,
            "DEFAULT_RATE_LIMIT",
            get("DEFAULT_RATE_LIMIT").as_deref(),
            rate::parse,
        );
        for (var, route) in [
            ("SEARCH_RATE_LIMIT", "search"),
            ("UPLOAD_RATE_LIMIT", "upload"),
        ] {
            if let Some(v) = get(var) {
                let mut r = RouteRate::Default;
                errs.set(&mut r, var, Some(&v), |s| {
                    rate::parse(s).map(RouteRate::Limits)
                });
                if let Some(route) = self.route_mut(route) {
                    route.rate_limit = r;
                }
            }
        }

        errs.set(
            &mut self.retry.max_retries,
            "MAX_RETRIES",
            get("MAX_RETRIES").as_deref(),
            |s| {
                s.parse::<u32>()
                    .map_err(|_| "expected a whole number".to_string())
            },
        );
        errs.set(
            &mut self.retry.initial_wait,
            "RETRY_INITIAL_WAIT",
            get("RETRY_INITIAL_WAIT").as_deref(),
            parse_env_duration,
        );
        errs.set(
            &mut self.retry.max_wait,
            "RETRY_MAX_WAIT",
            get("RETRY_MAX_WAIT").as_deref(),
            parse_env_duration,
        );
        errs.set(
            &mut self.circuit_breaker.threshold,
            "CIRCUIT_BREAKER_THRESHOLD",
            get("CIRCUIT_BREAKER_THRESHOLD").as_deref(),
            |s| {
                s.parse::<u32>()
                    .map_err(|_| "expected a whole number".to_string())
            },
        );
        errs.set(
            &mut self.circuit_breaker.timeout,
            "CIRCUIT_BREAKER_TIMEOUT",
            get("CIRCUIT_BREAKER_TIMEOUT").as_deref(),
            parse_env_duration,
        );

        errs.set(
            &mut self.metrics_enabled,
            "ENABLE_METRICS",
            get("ENABLE_METRICS").as_deref(),
            parse_bool,
        );
        errs.set(
            &mut self.log.level,
            "LOG_LEVEL",
            get("LOG_LEVEL").as_deref(),
            parse_level,
        );
        errs.set(
            &mut self.log.format,
            "LOG_FORMAT",
            get("LOG_FORMAT").as_deref(),
            parse_format,
        );
        if let Some(f) = get("LOG_FILE") {
            self.log.file = non_empty(&f).map(PathBuf::from);
        }
        errs.set(
            &mut self.threads,
            "NUM_THREADS",
            get("NUM_THREADS").as_deref(),
            parse_count,
        );

        let mut embedding_cache = true;
        errs.set(
            &mut embedding_cache,
            "ENABLE_EMBEDDING_CACHE",
            get("ENABLE_EMBEDDING_CACHE").as_deref(),
            parse_bool,
        );
        if !embedding_cache {
            if let Some(r) = self.route_mut("embeddings") {
                r.cache = None;
                pending.cache_ttl.retain(|n| n != "embeddings");
                pending.cache_items.retain(|n| n != "embeddings");
            }
        }
        if let Some(t) = get("ADMIN_TOKEN") {
            self.admin_token = non_empty(&t).map(str::to_string);
        }
    }

    fn apply_overrides(&mut self, o: &Overrides, errs: &mut Errors) {
        errs.set(
            &mut self.listen,
            "--listen",
            o.listen.as_deref(),
            parse_addr,
        );
        errs.set(
            &mut self.upstream,
            "--upstream",
            o.upstream.as_deref(),
            parse_upstream,
        );
        if let Some(v) = &o.admin_listen {
            errs.set_some(&mut self.admin_listen, "--admin-listen", v, parse_addr);
        }
        errs.set(
            &mut self.log.level,
            "--log-level",
            o.log_level.as_deref(),
            parse_level,
        );
        errs.set(
            &mut self.log.format,
            "--log-format",
            o.log_format.as_deref(),
            parse_format,
        );
        errs.set(
            &mut self.threads,
            "--threads",
            o.threads.as_deref(),
            parse_count,
        );
    }

    /// Fills the per-route defaults that depend on other keys, then checks
    /// what only the whole configuration can tell.
    fn finish(&mut self, pending: Pending, errs: &mut Errors) {
        for r in &mut self.routes {
            if let Some(c) = &mut r.cache {
                if pending.cache_ttl.contains(&r.name) {
                    c.ttl = self.cache.default_ttl;
                }
                if pending.cache_items.contains(&r.name) {
                    c.max_items = self.cache.max_memory_items;
                }
            }
        }
        let positive = [
            ("max_inflight", self.max_inflight as u64),
            ("threads", self.threads as u64),
            ("max_request_body", self.max_request_body),
            ("cache.max_memory_items", self.cache.max_memory_items as u64),
            (
                "circuit_breaker.threshold",
                u64::from(self.circuit_breaker.threshold),
            ),
        ];
        for (key, v) in positive {
            if v == 0 {
                errs.push_checked(key, "0", "must be at least 1".into());
            }
        }
        if self.threads > 1024 {
            errs.push_checked("threads", &self.threads.to_string(), "at most 1024".into());
        }
        for (key, d) in [
            ("header_read_timeout", self.header_read_timeout),
            ("cache.default_ttl", self.cache.default_ttl),
            ("redis.timeout", self.redis.timeout),
            ("retry.initial_wait", self.retry.initial_wait),
            ("circuit_breaker.timeout", self.circuit_breaker.timeout),
        ] {
            if d.is_zero() {
                errs.push_checked(key, "0s", "must be more than zero".into());
            }
        }
        if self.retry.initial_wait > self.retry.max_wait {
            let initial = errs.name_of("retry.initial_wait");
            let reason = format!(
                "smaller than {initial} ({})",
                fmt_duration(self.retry.initial_wait)
            );
            errs.push_checked("retry.max_wait", &fmt_duration(self.retry.max_wait), reason);
        }
        if !(0.0..=100.0).contains(&self.retry.budget_percent) || self.retry.budget_percent.is_nan()
        {
            errs.push(
                "retry.budget_percent",
                Some(&self.retry.budget_percent.to_string()),
                "must be between 0 and 100".into(),
            );
        }
        if self.admin_listen == Some(self.listen) && self.listen.port() != 0 {
            let listen = errs.name_of("listen");
            errs.push_checked(
                "admin_listen",
                &self.listen.to_string(),
                format!("must differ from {listen}"),
            );
        }
    }

    /// The effective configuration in the file's shape, secrets masked:
    /// what `check-config` prints.
    pub fn to_file(&self) -> FileConfig {
        use self::file::*;
        let routes = self
            .routes
            .iter()
            .map(|r| RouteFile {
                name: r.name.clone(),
                methods: Some(r.methods.iter().map(|m| m.to_string()).collect()),
                path: Some(r.path.as_str().to_string()),
                timeout: Some(fmt_duration(r.timeout)),
                cache: Some(match &r.cache {
                    None => RouteCacheFile::Enabled(false),
                    Some(c) => RouteCacheFile::Table(RouteCacheTable {
                        namespace: Some(c.namespace.clone()),
                        ttl: Some(fmt_duration(c.ttl)),
                        max_items: Some(c.max_items),
                    }),
                }),
                rate_limit: Some(match &r.rate_limit {
                    RouteRate::Default => "default".into(),
                    RouteRate::Exempt => "exempt".into(),
                    RouteRate::Limits(l) => l.to_string(),
                }),
                dry_run: r.dry_run,
                circuit: Some(r.circuit.clone()),
                retry: Some(match r.retry {
                    RetryMode::Always => RetryFlag::Bool(true),
                    RetryMode::Never => RetryFlag::Bool(false),
                    RetryMode::IdempotentOnly => RetryFlag::Mode("idempotent".into()),
                }),
                invalidate: Some(r.invalidate.clone()),
                max_request_body: r.max_request_body,
            })
            .collect();
        FileConfig {
            listen: Some(self.listen.to_string()),
            upstream: Some(self.upstream.to_string()),
            admin_listen: self.admin_listen.map(|a| a.to_string()),
            shutdown_grace: Some(fmt_duration(self.shutdown_grace)),
            max_inflight: Some(self.max_inflight),
            trusted_proxies: Some(self.trusted_proxies.iter().map(|n| n.to_string()).collect()),
            header_read_timeout: Some(fmt_duration(self.header_read_timeout)),
            max_request_body: Some(self.max_request_body),
            threads: Some(self.threads),
            readiness_path: Some(self.readiness_path.clone()),
            log: Some(LogFile {
                level: Some(self.log.level.clone()),
                format: Some(match self.log.format {
                    LogFormat::Text => "text".into(),
                    LogFormat::Json => "json".into(),
                }),
                file: self.log.file.as_ref().map(|p| p.display().to_string()),
            }),
            cache: Some(CacheFile {
                default_ttl: Some(fmt_duration(self.cache.default_ttl)),
                max_memory_items: Some(self.cache.max_memory_items),
                max_memory_bytes: Some(self.cache.max_memory_bytes),
                max_body_bytes: Some(self.cache.max_body_bytes),
                stale_if_error: Some(fmt_duration(self.cache.stale_if_error)),
                identity_headers: Some(self.cache.identity_headers.clone()),
            }),
            redis: Some(RedisFile {
                url: self.redis.url.as_deref().map(mask_url_password),
                timeout: Some(fmt_duration(self.redis.timeout)),
                key_prefix: Some(self.redis.key_prefix.clone()),
            }),
            rate_limit: Some(RateLimitFile {
                enabled: Some(self.rate_limit.enabled),
                default: Some(self.rate_limit.default.to_string()),
                key: Some(match &self.rate_limit.key {
                    RateLimitKey::Ip => "ip".into(),
                    RateLimitKey::Header(h) => format!("header:{h}"),
                }),
                dry_run: Some(self.rate_limit.dry_run),
            }),
            retry: Some(RetryFile {
                max_retries: Some(self.retry.max_retries),
                initial_wait: Some(fmt_duration(self.retry.initial_wait)),
                max_wait: Some(fmt_duration(self.retry.max_wait)),
                budget_percent: Some(self.retry.budget_percent),
                max_replay_bytes: Some(self.retry.max_replay_bytes),
                enabled: Some(self.retry.enabled),
                budget_min_per_second: Some(self.retry.budget_min_per_second),
                rate_limit_patterns: Some(self.retry.rate_limit_patterns.clone()),
            }),
            circuit_breaker: Some(CircuitBreakerFile {
                enabled: Some(self.circuit_breaker.enabled),
                threshold: Some(self.circuit_breaker.threshold),
                timeout: Some(fmt_duration(self.circuit_breaker.timeout)),
            }),
            admin: Some(AdminFile {
                token: self.admin_token.as_ref().map(|_| SECRET_MASK.to_string()),
                trust_loopback: Some(self.admin_trust_loopback),
            }),
            metrics: Some(MetricsFile {
                enabled: Some(self.metrics_enabled),
            }),
            routes: Some(routes),
        }
    }

    /// [`Self::to_file`] as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.to_file())
            .unwrap_or_else(|e| format!("# could not render the configuration: {e}\n"))
    }
}

/// Per-route cache fields left unset in the file, filled from the `[cache]`
/// defaults once every layer is applied.
#[derive(Default)]
struct Pending {
    cache_ttl: Vec<String>,
    cache_items: Vec<String>,
}

/// The file keys that an environment variable or a flag also sets, and
/// that [`Config::finish`] checks on the effective value: its errors name
/// the variable or flag when one of them gave the value.
const ALIASES: &[(&str, &str)] = &[
    ("NUM_THREADS", "threads"),
    ("--threads", "threads"),
    ("CACHE_MAX_MEMORY_ITEMS", "cache.max_memory_items"),
    ("CACHE_DEFAULT_TTL", "cache.default_ttl"),
    ("RETRY_INITIAL_WAIT", "retry.initial_wait"),
    ("RETRY_MAX_WAIT", "retry.max_wait"),
    ("CIRCUIT_BREAKER_THRESHOLD", "circuit_breaker.threshold"),
    ("CIRCUIT_BREAKER_TIMEOUT", "circuit_breaker.timeout"),
    ("LISTEN_ADDR", "listen"),
    ("--listen", "listen"),
    ("--admin-listen", "admin_listen"),
];

#[derive(Default)]
struct Errors {
    list: Vec<ConfigError>,
    /// File key → the variable or flag that set its effective value, and
    /// the value as given there.
    given: HashMap<&'static str, (&'static str, String)>,
}

impl Errors {
    /// Notes who set a key, for [`Self::push_checked`].
    fn note(&mut self, key: &str, raw: &str) {
        if let Some(&(by, file_key)) = ALIASES.iter().find(|(by, _)| *by == key) {
            self.given.insert(file_key, (by, raw.trim().to_string()));
        }
    }

    /// An error found on the effective value of file key `key`: named as
    /// the variable or flag that gave it, with the value as given, if one did.
    fn push_checked(&mut self, key: &'static str, value: &str, reason: String) {
        let value = self
            .given
            .get(key)
            .map_or_else(|| value.to_string(), |(_, raw)| raw.clone());
        self.push(self.name_of(key), Some(&value), reason);
    }

    /// What set file key `key`'s effective value: a variable, a flag or the key.
    fn name_of(&self, key: &'static str) -> &'static str {
        self.given.get(key).map_or(key, |(by, _)| *by)
    }

    fn push(&mut self, key: &str, value: Option<&str>, reason: String) {
        // A Redis URL may carry its password: never print it.
        let secret = matches!(key, "redis.url" | "REDIS_URL" | "REDIS_HOST");
        self.list.push(ConfigError {
            key: key.to_string(),
            value: value.map(|v| {
                if secret {
                    mask_url_password(v)
                } else {
                    v.to_string()
                }
            }),
            reason,
        });
    }

    /// Parses `raw` (when given) into `slot`, or records the error.
    fn set<T>(
        &mut self,
        slot: &mut T,
        key: &str,
        raw: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) {
        if let Some(raw) = raw {
            match parse(raw) {
                Ok(v) => {
                    *slot = v;
                    self.note(key, raw);
                }
                Err(e) => self.push(key, Some(raw), e),
            }
        }
    }

    fn set_some<T>(
        &mut self,
        slot: &mut Option<T>,
        key: &str,
        raw: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) {
        match parse(raw) {
            Ok(v) => {
                *slot = Some(v);
                self.note(key, raw);
            }
            Err(e) => self.push(key, Some(raw), e),
        }
    }

    fn set_opt<T>(
        &mut self,
        slot: &mut Option<T>,
        key: &str,
        raw: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) {
        if let Some(raw) = raw {
            self.set_some(slot, key, raw, parse);
        }
    }
}

fn set_plain<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

fn non_empty(s: &str) -> Option<&str> {
    let s = s.trim();
    (!s.is_empty()).then_some(s)
}

// === value parsers: each returns the reason a value is bad ===

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected IP:PORT with a port from 0 to 65535, e.g. 0.0.0.0:5003".into())
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err("not a port number (1-65535)".into()),
    }
}

fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let uri: http::Uri = s.trim().parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https upstreams are not supported: the app runs beside the sidecar; use http://"
                    .into(),
            );
        }
        _ => return Err("expected http://HOST:PORT".into()),
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("the upstream URL cannot have a path or query".into());
    }
    let authority = uri.authority().cloned().ok_or("missing host")?;
    if authority.as_str().contains('@') {
        return Err("credentials in the upstream URL are not supported".into());
    }
    if authority.port_u16() == Some(0) {
        return Err("port 0 is not a valid upstream port".into());
    }
    Ok(Upstream {
        scheme: Scheme::HTTP,
        authority,
    })
}

fn parse_redis_url(s: &str) -> Result<String, String> {
    let url = url::Url::parse(s.trim()).map_err(|e| format!("not a URL: {e}"))?;
    match url.scheme() {
        "redis" | "redis-cluster" | "redis-sentinel" => {}
        "rediss" | "rediss-cluster" | "rediss-sentinel" => {
            return Err(
                "TLS to Redis (rediss://) is not built in; use redis:// inside the cluster".into(),
            );
        }
        other => {
            return Err(format!(
                "unsupported scheme {other:?} (redis, redis-cluster, redis-sentinel)"
            ));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("missing host".into());
    }
    Ok(s.trim().to_string())
}

/// Replaces the password of a URL with `***` for display; a URL too broken
/// to parse loses everything between `://` and `@` instead.
pub fn mask_url_password(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some(SECRET_MASK));
            u.to_string()
        }
        Ok(_) => s.to_string(),
        Err(_) => match (s.find("://"), s.rfind('@')) {
            (Some(start), Some(at)) if at > start + 3 => {
                format!("{}{SECRET_MASK}{}", &s[..start + 3], &s[at..])
            }
            _ => s.to_string(),
        },
    }
}

fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| "expected a CIDR such as 10.0.0.0/8 or an IP address".into())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("expected a duration with a unit such as \"500ms\", \"30s\" or \"1h\" ({e})")
    })
}

fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// The legacy env durations are seconds (`1.0`, `60`); a unit is also fine.
fn parse_env_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    match t.parse::<f64>() {
        Ok(secs) if (0.0..1e9).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        Ok(_) => Err("expected a number of seconds from 0 to 1e9".into()),
        Err(_) => parse_duration(t)
            .map_err(|_| "expected seconds (\"1.0\") or a duration with a unit (\"500ms\")".into()),
    }
}

/// Formats a duration for display and for the TOML output (`1h 30m`).
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected True or False".into()),
    }
}

fn parse_count(s: &str) -> Result<usize, String> {
    s.trim()
        .parse::<usize>()
        .map_err(|_| "expected a whole number".to_string())
}

fn parse_level(s: &str) -> Result<String, String> {
    let lc = s.trim().to_ascii_lowercase();
    let mapped = match lc.as_str() {
        "warning" => "warn".to_string(),
        "critical" | "fatal" => "error".to_string(),
        "notset" => "trace".to_string(),
        _ => lc,
    };
    let is_level = |l: &str| matches!(l, "trace" | "debug" | "info" | "warn" | "error" | "off");
    // A bare word must be a level: tracing would read `loud` as a target name.
    let plausible = is_level(&mapped)
        || mapped
            .split(',')
            .all(|d| is_level(d.trim()) || d.contains('='));
    match tracing_subscriber::EnvFilter::builder().parse(&mapped) {
        Ok(_) if plausible => Ok(mapped),
        _ => Err("expected DEBUG, INFO, WARNING, ERROR, CRITICAL or a tracing filter such as \"info,rag_sidecar=debug\"".into()),
    }
}

fn parse_format(s: &str) -> Result<LogFormat, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected text or json".into()),
    }
}

fn parse_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') && s.parse::<http::uri::PathAndQuery>().is_ok() {
        Ok(s.to_string())
    } else {
        Err("expected a path starting with '/'".into())
    }
}

fn parse_rate_key(s: &str) -> Result<RateLimitKey, String> {
    match s.trim() {
        "ip" => Ok(RateLimitKey::Ip),
        other => other
            .strip_prefix("header:")
            .and_then(|h| http::HeaderName::try_from(h.trim()).ok())
            .map(RateLimitKey::Header)
            .ok_or_else(|| "expected \"ip\" or \"header:NAME\"".into()),
    }
}

fn parse_route_rate(s: &str) -> Result<RouteRate, String> {
    match s.trim() {
        "default" => Ok(RouteRate::Default),
        "exempt" | "none" | "off" => Ok(RouteRate::Exempt),
        other => rate::parse(other).map(RouteRate::Limits),
    }
}

fn parse_method(s: &str) -> Result<http::Method, String> {
    let up = s.trim().to_ascii_uppercase();
    http::Method::from_bytes(up.as_bytes()).map_err(|_| "not an HTTP method".into())
}

/// Route, namespace and circuit names become metric labels and cache key
/// prefixes: short, lowercase, no separators.
fn parse_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err("expected 1-64 characters of a-z, 0-9, '-' and '_'".into())
    }
}

#[cfg(test)]
mod tests;
