//! The settings table: one [`Setting`] per scalar setting, with everything
//! the rest of `config` needs to know about it. The defaults, the file's
//! shape, every layer, the error names, the whole-configuration checks,
//! `check-config`'s output and the reference page's table are all read
//! from [`SETTINGS`]; adding a setting is its field in `Config` plus one
//! entry here. (A field directly in `Config` also needs its zero in
//! `Config::blank`, which the compiler asks for; a flag also needs its
//! field in `Overrides` and the binary's command line, which a test
//! checks for the first.) Entries are in the order `check-config` prints
//! them.

use super::Config;
use super::field::{
    ADDR, CIDRS, Dur, FILE_PATH, FORMAT, Flag, HEADER_NAMES, LEVEL, Number, OTLP, Opt, PATH,
    Patterns, RATE, RATE_KEY, RedisUrl, STRING, Slot, TOKEN, U32, U64, UPSTREAM, USIZE, field,
};
use super::legacy::LEGACY;
use super::parse::mask_url_password;
use super::validate::{fraction, nonzero, not_blank, positive, ratio, thread_count};

/// The file key of the route table, the one key that is not a setting.
pub(super) const ROUTES: &str = "routes";

/// One setting.
pub(super) struct Setting {
    /// The TOML key path: `circuit_breaker.threshold`.
    pub(super) key: &'static str,
    /// The environment variables that set it, legacy and new names; the
    /// first one set is read.
    pub(super) env: &'static [&'static str],
    /// The command-line flag that sets it, if any.
    pub(super) flag: Option<&'static str>,
    /// Its value before any source is read.
    pub(super) default: DefaultValue,
    /// Masked when printed and in errors (a URL: its password only).
    pub(super) secret: bool,
    /// One line for the reference page.
    pub(super) doc: &'static str,
    /// Its field, parser and check: `field!(path.of.field, PARSER[, check])`.
    pub(super) value: &'static dyn Slot,
}

/// A default, written as the file would give it.
#[derive(Debug, Clone, Copy)]
pub(super) enum DefaultValue {
    Unset,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'static str),
    List(&'static [&'static str]),
    /// Found at start-up; `doc` says what it is.
    Computed {
        value: fn() -> toml_edit::Value,
        doc: &'static str,
    },
}

use DefaultValue::{Bool, Computed, Float, Int, List as Strs, Str, Unset};

impl DefaultValue {
    /// The default as the file would give it; `None`: unset.
    pub(super) fn to_value(self) -> Option<toml_edit::Value> {
        Some(match self {
            Unset => return None,
            Bool(b) => b.into(),
            Int(i) => i.into(),
            Float(f) => f.into(),
            Str(s) => s.into(),
            Strs(l) => toml_edit::Value::Array(l.iter().copied().collect()),
            Computed { value, .. } => value(),
        })
    }
}

fn cpus() -> toml_edit::Value {
    let n = std::thread::available_parallelism().map_or(2, |n| n.get());
    i64::try_from(n).unwrap_or(2).into()
}

pub(super) const SETTINGS: &[Setting] = &[
    Setting {
        key: "listen",
        env: &["LISTEN_ADDR"],
        flag: Some("--listen"),
        default: Str("0.0.0.0:5003"),
        secret: false,
        doc: "Where clients connect (`IP:PORT`).",
        value: field!(listen, ADDR),
    },
    Setting {
        key: "upstream",
        env: &["UPSTREAM_URL"],
        flag: Some("--upstream"),
        default: Str("http://127.0.0.1:5000"),
        secret: false,
        doc: "The legacy app: `http://HOST:PORT`, no path (https is refused: the app is local).",
        value: field!(upstream, UPSTREAM),
    },
    Setting {
        key: "admin_listen",
        env: &[],
        flag: Some("--admin-listen"),
        default: Unset,
        secret: false,
        doc: "Serve the sidecar's own endpoints on this address instead of `listen`.",
        value: field!(admin_listen, Opt(ADDR)),
    },
    Setting {
        key: "shutdown_grace",
        env: &[],
        flag: None,
        default: Str("25s"),
        secret: false,
        doc: "After SIGTERM/SIGINT, how long in-flight requests get to finish.",
        value: field!(shutdown_grace, Dur),
    },
    Setting {
        key: "max_inflight",
        env: &[],
        flag: None,
        default: Int(1024),
        secret: false,
        doc: "Requests processed at once; beyond this, 503 at once (not queued).",
        value: field!(max_inflight, USIZE, Some(positive)),
    },
    Setting {
        key: "max_connections",
        env: &[],
        flag: None,
        default: Int(4096),
        secret: false,
        doc: "Client connections open at once on the proxy port; beyond this a new one is closed at once.",
        value: field!(max_connections, USIZE, Some(positive)),
    },
    Setting {
        key: "trusted_proxies",
        env: &[],
        flag: None,
        default: Strs(&[]),
        secret: false,
        doc: "CIDRs whose `X-Forwarded-For`/`-Proto`/`-Host` are believed.",
        value: field!(trusted_proxies, CIDRS),
    },
    Setting {
        key: "header_read_timeout",
        env: &[],
        flag: None,
        default: Str("10s"),
        secret: false,
        doc: "Slowloris guard: the request head must arrive within this (also the keep-alive idle time).",
        value: field!(header_read_timeout, Dur, Some(nonzero)),
    },
    Setting {
        key: "client_body_timeout",
        env: &[],
        flag: None,
        default: Str("1m"),
        secret: false,
        doc: "Longest pause between two reads of a request body; a body that stalls longer gets 408.",
        value: field!(client_body_timeout, Dur, Some(nonzero)),
    },
    Setting {
        key: "client_body_deadline",
        env: &[],
        flag: None,
        default: Str("10m"),
        secret: false,
        doc: "Longest a whole request body may take from its first read, however steadily it drips; a body still arriving then gets 408.",
        value: field!(client_body_deadline, Dur, Some(nonzero)),
    },
    Setting {
        key: "send_timeout",
        env: &[],
        flag: None,
        default: Str("1m"),
        secret: false,
        doc: "Longest a client may leave an answer unread (nothing taken off its socket); one that reads nothing for longer is disconnected and its connection slot freed.",
        value: field!(send_timeout, Dur, Some(nonzero)),
    },
    Setting {
        key: "upstream_idle_timeout",
        env: &["UPSTREAM_IDLE_TIMEOUT"],
        flag: None,
        default: Str("1.5s"),
        secret: false,
        doc: "A pooled upstream connection idle this long is closed by the sidecar; keep it below the app server's keep-alive (gunicorn 2 s).",
        value: field!(upstream_idle_timeout, Dur, Some(nonzero)),
    },
    Setting {
        key: "max_request_body",
        env: &[],
        flag: None,
        default: Int(50 * 1024 * 1024 + 64 * 1024),
        secret: false,
        doc: "Request bodies above this many bytes get 413 (50 MiB + multipart slack).",
        value: field!(max_request_body, U64, Some(positive)),
    },
    Setting {
        key: "spool_max_bytes",
        env: &[],
        flag: None,
        default: Int(1024 * 1024 * 1024),
        secret: false,
        doc: "Request bodies spooled to disk at once (routes with `request_buffering`), in bytes over all; beyond it 503.",
        value: field!(spool_max_bytes, U64, Some(positive)),
    },
    Setting {
        key: "response_buffer",
        env: &[],
        flag: None,
        default: Int(1024 * 1024),
        secret: false,
        doc: "Answers up to this many bytes are read from the app at once (never `text/event-stream`), so a slow reader does not hold an app worker; 0 turns it off.",
        value: field!(response_buffer, U64),
    },
    Setting {
        key: "memory_budget",
        env: &[],
        flag: None,
        default: Int(64 * 1024 * 1024),
        secret: false,
        doc: "Bytes held for clients at once, over all requests: answers read ahead (`response_buffer`) and the backlog slow readers leave on shared streams. Beyond it an answer streams unbuffered and a stream reader further behind than its share is cut.",
        value: field!(memory_budget, U64, Some(positive)),
    },
    Setting {
        key: "threads",
        env: &["NUM_THREADS"],
        flag: Some("--threads"),
        default: Computed {
            value: cpus,
            doc: "the number of CPUs",
        },
        secret: false,
        doc: "Tokio worker threads (1 to 1024).",
        value: field!(threads, USIZE, Some(thread_count)),
    },
    Setting {
        key: "readiness_path",
        env: &[],
        flag: None,
        default: Str("/api/health"),
        secret: false,
        doc: "The cheap upstream request behind `/readyz` (below 500 = ready).",
        value: field!(readiness_path, PATH),
    },
    Setting {
        key: "log.level",
        env: &["LOG_LEVEL"],
        flag: Some("--log-level"),
        default: Str("info"),
        secret: false,
        doc: "`DEBUG`, `INFO`, `WARNING`, `ERROR`, `CRITICAL`, or a tracing filter (`info,rag_sidecar=debug`).",
        value: field!(log.level, LEVEL),
    },
    Setting {
        key: "log.format",
        env: &["LOG_FORMAT"],
        flag: Some("--log-format"),
        default: Str("text"),
        secret: false,
        doc: "`text` or `json`.",
        value: field!(log.format, FORMAT),
    },
    Setting {
        key: "log.file",
        env: &["LOG_FILE"],
        flag: None,
        default: Unset,
        secret: false,
        doc: "Also write the log to this file (its directory is created); stderr always gets it.",
        value: field!(log.file, FILE_PATH),
    },
    Setting {
        key: "cache.default_ttl",
        env: &["CACHE_DEFAULT_TTL"],
        flag: None,
        default: Str("1h"),
        secret: false,
        doc: "TTL for routes that cache without naming their own.",
        value: field!(cache.default_ttl, Dur, Some(nonzero)),
    },
    Setting {
        key: "cache.max_memory_items",
        env: &["CACHE_MAX_MEMORY_ITEMS"],
        flag: None,
        default: Int(1000),
        secret: false,
        doc: "Item cap for routes that cache without naming their own.",
        value: field!(cache.max_memory_items, USIZE, Some(positive)),
    },
    Setting {
        key: "cache.max_memory_bytes",
        env: &[],
        flag: None,
        default: Int(128 * 1024 * 1024),
        secret: false,
        doc: "The memory layer's byte budget, shared by the namespaces in proportion to their `max_items`.",
        value: field!(cache.max_memory_bytes, U64),
    },
    Setting {
        key: "cache.max_body_bytes",
        env: &[],
        flag: None,
        default: Int(1024 * 1024),
        secret: false,
        doc: "Answers larger than this stream through uncached.",
        value: field!(cache.max_body_bytes, U64),
    },
    Setting {
        key: "cache.stale_if_error",
        env: &[],
        flag: None,
        default: Str("1h"),
        secret: false,
        doc: "How long past its TTL an entry is kept to answer when the upstream fails.",
        value: field!(cache.stale_if_error, Dur),
    },
    Setting {
        key: "cache.identity_headers",
        env: &[],
        flag: None,
        default: Strs(&["authorization", "x-api-key", "x-user-id", "cookie"]),
        secret: false,
        doc: "Request headers that are part of the cache key: one user never gets another's answer.",
        value: field!(cache.identity_headers, HEADER_NAMES),
    },
    Setting {
        key: "cache.vary_headers",
        env: &[],
        flag: None,
        default: Strs(&[
            "accept",
            "accept-language",
            "content-type",
            "accept-encoding",
        ]),
        secret: false,
        doc: "Request headers that select a representation, also in the key (Accept-Encoding reduced to the codings it allows).",
        value: field!(cache.vary_headers, HEADER_NAMES),
    },
    Setting {
        key: "cache.lease_ttl",
        env: &[],
        flag: None,
        default: Str("5s"),
        secret: false,
        doc: "With Redis: how long a sidecar's lease on a question outlives it (renewed while it calls the upstream); the others wait for its answer.",
        value: field!(cache.lease_ttl, Dur, Some(nonzero)),
    },
    Setting {
        key: "cache.generation_poll",
        env: &[],
        flag: None,
        default: Str("1s"),
        secret: false,
        doc: "With Redis: how often each sidecar re-reads the fleet's invalidations (besides the message it gets at once).",
        value: field!(cache.generation_poll, Dur, Some(nonzero)),
    },
    Setting {
        key: "redis.url",
        env: &[],
        flag: None,
        default: Unset,
        secret: true,
        doc: "Unset: memory only. `redis://[:password@]host:port/db`, `redis-cluster://…`, `redis-sentinel://…` (no `rediss://`).",
        value: field!(redis.url, Opt(RedisUrl)),
    },
    Setting {
        key: "redis.timeout",
        env: &[],
        flag: None,
        default: Str("50ms"),
        secret: false,
        doc: "Every Redis call gives up after this; the request goes on without Redis.",
        value: field!(redis.timeout, Dur, Some(nonzero)),
    },
    Setting {
        key: "redis.key_prefix",
        env: &[],
        flag: None,
        default: Str("rag-sidecar:"),
        secret: false,
        doc: "Prefix of every Redis key the sidecar writes.",
        value: field!(redis.key_prefix, STRING),
    },
    Setting {
        key: "rate_limit.enabled",
        env: &["ENABLE_RATE_LIMIT"],
        flag: None,
        default: Bool(true),
        secret: false,
        doc: "`false`: nothing is rate limited.",
        value: field!(rate_limit.enabled, Flag),
    },
    Setting {
        key: "rate_limit.default",
        env: &["DEFAULT_RATE_LIMIT"],
        flag: None,
        default: Str("60 per minute"),
        secret: false,
        doc: "The limit of routes without their own, Flask-Limiter syntax, several joined by `;`.",
        value: field!(rate_limit.default, RATE),
    },
    Setting {
        key: "rate_limit.key",
        env: &[],
        flag: None,
        default: Str("ip"),
        secret: false,
        doc: "Who a limit counts: `ip` (the peer, or the `X-Forwarded-For` entry left of `trusted_proxies`) or `header:NAME`.",
        value: field!(rate_limit.key, RATE_KEY),
    },
    Setting {
        key: "rate_limit.dry_run",
        env: &[],
        flag: None,
        default: Bool(false),
        secret: false,
        doc: "Count and log would-be rejections but let every request through.",
        value: field!(rate_limit.dry_run, Flag),
    },
    Setting {
        key: "retry.max_retries",
        env: &["MAX_RETRIES"],
        flag: None,
        default: Int(3),
        secret: false,
        doc: "Retries after the first try.",
        value: field!(retry.max_retries, U32),
    },
    Setting {
        key: "retry.initial_wait",
        env: &["RETRY_INITIAL_WAIT"],
        flag: None,
        default: Str("1s"),
        secret: false,
        doc: "First backoff; it doubles up to `max_wait`, with jitter.",
        value: field!(retry.initial_wait, Dur, Some(nonzero)),
    },
    Setting {
        key: "retry.max_wait",
        env: &["RETRY_MAX_WAIT"],
        flag: None,
        default: Str("10s"),
        secret: false,
        doc: "Longest backoff (at least `initial_wait`).",
        value: field!(retry.max_wait, Dur),
    },
    Setting {
        key: "retry.budget_percent",
        env: &[],
        flag: None,
        default: Float(20.0),
        secret: false,
        doc: "Retries stay under this share (0 to 100) of the requests of the last 10 s.",
        value: field!(retry.budget_percent, Number, Some(ratio)),
    },
    Setting {
        key: "retry.max_replay_bytes",
        env: &[],
        flag: None,
        default: Int(256 * 1024),
        secret: false,
        doc: "Request bodies up to this size are kept so they can be replayed; larger ones go once.",
        value: field!(retry.max_replay_bytes, U64),
    },
    Setting {
        key: "retry.enabled",
        env: &[],
        flag: None,
        default: Bool(true),
        secret: false,
        doc: "`false`: every request goes upstream exactly once.",
        value: field!(retry.enabled, Flag),
    },
    Setting {
        key: "retry.budget_min_per_second",
        env: &[],
        flag: None,
        default: Int(10),
        secret: false,
        doc: "Retries allowed per second on top of the budget, so a quiet sidecar can still retry.",
        value: field!(retry.budget_min_per_second, U32),
    },
    Setting {
        key: "retry.rate_limit_patterns",
        env: &[],
        flag: None,
        default: Strs(&["RESOURCE_EXHAUSTED", "Resource exhausted", "quota", "429"]),
        secret: false,
        doc: "A 5xx whose body (first 4 KiB) contains one is a `gemini_rate_limit`; a 429 always is.",
        value: field!(retry.rate_limit_patterns, Patterns),
    },
    Setting {
        key: "circuit_breaker.enabled",
        env: &[],
        flag: None,
        default: Bool(true),
        secret: false,
        doc: "`false`: circuits never open.",
        value: field!(circuit_breaker.enabled, Flag),
    },
    Setting {
        key: "circuit_breaker.threshold",
        env: &["CIRCUIT_BREAKER_THRESHOLD"],
        flag: None,
        default: Int(5),
        secret: false,
        doc: "Consecutive failures that open a circuit.",
        value: field!(circuit_breaker.threshold, U32, Some(positive)),
    },
    Setting {
        key: "circuit_breaker.timeout",
        env: &["CIRCUIT_BREAKER_TIMEOUT"],
        flag: None,
        default: Str("1m"),
        secret: false,
        doc: "How long a circuit stays open before one probe.",
        value: field!(circuit_breaker.timeout, Dur, Some(nonzero)),
    },
    Setting {
        key: "rate_limit.key_secret",
        env: &[],
        flag: None,
        default: Unset,
        secret: true,
        doc: "Secret of the keyed hash (HMAC-SHA256) that names a client in Redis; unset: one is made and kept in Redis for the fleet.",
        value: field!(rate_limit.key_secret, TOKEN),
    },
    Setting {
        key: "admin.token",
        env: &["ADMIN_TOKEN"],
        flag: None,
        default: Unset,
        secret: true,
        doc: "Bearer token for the mutating admin endpoints; set, every caller needs it (loopback too); unset, loopback callers only.",
        value: field!(admin_token, TOKEN),
    },
    Setting {
        key: "metrics.enabled",
        env: &["ENABLE_METRICS"],
        flag: None,
        default: Bool(true),
        secret: false,
        doc: "`false` records nothing; the metrics endpoints answer 503.",
        value: field!(metrics_enabled, Flag),
    },
    Setting {
        key: "tracing.otlp_endpoint",
        env: &["OTEL_EXPORTER_OTLP_ENDPOINT"],
        flag: None,
        default: Unset,
        secret: false,
        doc: "OTLP/HTTP collector (`http://collector:4318`): spans go to its `/v1/traces`; unset, the trace context is only passed on. `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the whole URL) wins.",
        value: field!(tracing.otlp_endpoint, Opt(OTLP)),
    },
    Setting {
        key: "tracing.service_name",
        env: &["OTEL_SERVICE_NAME"],
        flag: None,
        default: Str("rag-sidecar"),
        secret: false,
        doc: "`service.name` of the exported spans.",
        value: field!(tracing.service_name, STRING, Some(not_blank)),
    },
    Setting {
        key: "tracing.sample_ratio",
        env: &[],
        flag: None,
        default: Float(1.0),
        secret: false,
        doc: "Share (0 to 1) of new traces sampled; a client's sampled flag is followed. `OTEL_TRACES_SAMPLER` (with `OTEL_TRACES_SAMPLER_ARG`) wins.",
        value: field!(tracing.sample_ratio, Number, Some(fraction)),
    },
];

/// Writes every setting's default onto `cfg`.
pub(super) fn write_defaults(cfg: &mut Config) {
    for s in SETTINGS {
        if let Some(v) = s.default.to_value() {
            // A default that does not parse is a bug of this table: the
            // test `every_default_reads_back` finds it.
            let written = s.value.set_toml(cfg, &v);
            debug_assert!(written.is_ok(), "the default of {} is refused", s.key);
        }
    }
}

/// Whether `path` is a section of the file (`cache`): a prefix of keys.
pub(super) fn is_section(path: &str) -> bool {
    SETTINGS.iter().any(|s| {
        s.key
            .strip_prefix(path)
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// The keys and sections directly in `section` (`""`: the top level), in
/// table order, for an unknown key's error.
pub(super) fn fields_of(section: &str) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for s in SETTINGS {
        let rest = match section {
            "" => Some(s.key),
            _ => s
                .key
                .strip_prefix(section)
                .and_then(|r| r.strip_prefix('.')),
        };
        let Some(rest) = rest else { continue };
        let first = rest.split('.').next().unwrap_or(rest);
        if !out.contains(&first) {
            out.push(first);
        }
    }
    if section.is_empty() {
        out.push(ROUTES);
    }
    out
}

/// `value` as an error may show it under `name` (a key, variable or flag):
/// a secret setting's is masked.
pub(super) fn mask_for(name: &str, value: &str) -> String {
    let setting = SETTINGS
        .iter()
        .find(|s| s.key == name || s.env.contains(&name) || s.flag == Some(name));
    match setting {
        Some(s) if s.secret => s.value.mask(value),
        Some(_) => value.to_string(),
        None if LEGACY.iter().any(|l| l.secret && l.env.contains(&name)) => {
            mask_url_password(value)
        }
        None => value.to_string(),
    }
}

/// Every environment name the settings and the legacy table read, written
/// to `out` while it has room; returns how many there are.
const fn env_names(out: &mut [&'static str]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < SETTINGS.len() + LEGACY.len() {
        let names = match i < SETTINGS.len() {
            true => SETTINGS[i].env,
            false => LEGACY[i - SETTINGS.len()].env,
        };
        let mut j = 0;
        while j < names.len() {
            if n < out.len() {
                out[n] = names[j];
            }
            n += 1;
            j += 1;
        }
        i += 1;
    }
    n
}

const ENV_COUNT: usize = env_names(&mut []);

const ENV_LIST: [&str; ENV_COUNT] = {
    let mut out = [""; ENV_COUNT];
    env_names(&mut out);
    out
};

/// The environment names read, besides `RAG_SIDECAR_CONFIG`: the
/// settings' and the legacy table's, derived from both at compile time.
pub const ENV_NAMES: &[&str] = &ENV_LIST;
