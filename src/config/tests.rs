//! Table tests of the configuration layers: defaults, the legacy `.env`
//! block, precedence, and every error path naming its key.

use super::*;

/// The `.env` block of the legacy document (shared/seed/PHASE6_COMPLETE.md),
/// verbatim.
const LEGACY_ENV: &str = r#"# ====================
# Phase 6: Performance & Reliability
# ====================

# Caching Configuration
USE_REDIS=False  # Set to True to use Redis
REDIS_HOST=localhost
REDIS_PORT=6379
REDIS_PASSWORD=
REDIS_DB=0
CACHE_DEFAULT_TTL=3600  # 1 hour
CACHE_MAX_MEMORY_ITEMS=1000

# Rate Limiting
ENABLE_RATE_LIMIT=True
DEFAULT_RATE_LIMIT=60 per minute
SEARCH_RATE_LIMIT=30 per minute
UPLOAD_RATE_LIMIT=10 per minute

# Retry & Circuit Breaker
MAX_RETRIES=3
RETRY_INITIAL_WAIT=1.0  # seconds
RETRY_MAX_WAIT=10.0  # seconds
CIRCUIT_BREAKER_THRESHOLD=5
CIRCUIT_BREAKER_TIMEOUT=60  # seconds

# Monitoring
ENABLE_METRICS=True
LOG_LEVEL=INFO
LOG_FILE=logs/rag_services.log

# Performance Tuning
NUM_THREADS=4
BATCH_SIZE=32
ENABLE_EMBEDDING_CACHE=True
"#;

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }
    fn with_dotenv(self, text: &str) -> Self {
        std::fs::write(self.0.path().join(".env"), text).unwrap();
        self
    }
    fn file(&self, text: &str) -> PathBuf {
        let p = self.0.path().join("rag-sidecar.toml");
        std::fs::write(&p, text).unwrap();
        p
    }
    fn load(&self, o: &Overrides, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(o, &env, self.0.path()).map(|(c, _)| c)
    }
}

fn errors_of(r: Result<Config, ConfigErrors>) -> Vec<ConfigError> {
    match r {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.0,
    }
}

fn one_error(r: Result<Config, ConfigErrors>) -> ConfigError {
    let errs = errors_of(r);
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs.into_iter().next().unwrap()
}

#[test]
fn defaults_are_valid() {
    let c = Dir::new().load(&Overrides::default(), &[]).unwrap();
    assert_eq!(c.listen.to_string(), "0.0.0.0:5003");
    assert_eq!(c.upstream.to_string(), "http://127.0.0.1:5000");
    assert_eq!(c.redis.url, None);
    let names: Vec<_> = c.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "search",
            "rag",
            "embeddings",
            "upload",
            "documents-delete",
            "default"
        ]
    );
    let search = c.route("search").unwrap();
    assert_eq!(
        search.cache.as_ref().unwrap().ttl,
        Duration::from_secs(3600)
    );
    assert_eq!(
        search.rate_limit,
        RouteRate::Limits(rate::parse("30 per minute").unwrap())
    );
    assert_eq!(c.route("rag").unwrap().circuit, "gemini");
    assert_eq!(c.route("default").unwrap().retry, RetryMode::IdempotentOnly);
    assert_eq!(c.route("upload").unwrap().invalidate, ["search:*", "rag:*"]);
}

#[test]
fn shipped_config_file_equals_the_defaults() {
    let text = include_str!("../../config/rag-sidecar.toml");
    let d = Dir::new();
    let o = Overrides {
        config: Some(d.file(text)),
        ..Overrides::default()
    };
    let from_file = d.load(&o, &[("NUM_THREADS", "3")]).unwrap();
    let defaults = d
        .load(&Overrides::default(), &[("NUM_THREADS", "3")])
        .unwrap();
    assert_eq!(from_file.to_toml(), defaults.to_toml());
}

#[test]
fn legacy_env_block_verbatim() {
    let d = Dir::new().with_dotenv(LEGACY_ENV);
    let (c, report) = Config::load(&Overrides::default(), &HashMap::new(), d.0.path()).unwrap();
    assert_eq!(c.redis.url, None, "USE_REDIS=False");
    assert_eq!(c.cache.default_ttl, Duration::from_secs(3600));
    assert_eq!(c.cache.max_memory_items, 1000);
    assert!(c.rate_limit.enabled);
    assert_eq!(c.rate_limit.default.as_str(), "60 per minute");
    assert_eq!(c.retry.initial_wait, Duration::from_secs(1));
    assert_eq!(c.retry.max_wait, Duration::from_secs(10));
    assert_eq!(c.circuit_breaker.threshold, 5);
    assert_eq!(c.circuit_breaker.timeout, Duration::from_secs(60));
    assert!(c.metrics_enabled);
    assert_eq!(c.log.level, "info");
    assert_eq!(
        c.log.file.as_deref(),
        Some(Path::new("logs/rag_services.log"))
    );
    assert_eq!(c.threads, 4);
    assert!(c.route("embeddings").unwrap().cache.is_some());
    assert_eq!(report.ignored_env, ["BATCH_SIZE"]);
}

#[test]
fn use_redis_builds_the_url_from_the_legacy_parts() {
    let d = Dir::new();
    let c = d
        .load(
            &Overrides::default(),
            &[
                ("USE_REDIS", "True"),
                ("REDIS_HOST", "cache"),
                ("REDIS_PORT", "6380"),
                ("REDIS_PASSWORD", "p@ss"),
                ("REDIS_DB", "2"),
            ],
        )
        .unwrap();
    assert_eq!(c.redis.url.as_deref(), Some("redis://:p%40ss@cache:6380/2"));
    assert!(
        !c.to_toml().contains("p%40ss"),
        "password masked in check-config"
    );
    // REDIS_URL alone turns Redis on; USE_REDIS=False turns it off again.
    let c = d
        .load(&Overrides::default(), &[("REDIS_URL", "redis://r:6379/0")])
        .unwrap();
    assert_eq!(c.redis.url.as_deref(), Some("redis://r:6379/0"));
    let c = d
        .load(
            &Overrides::default(),
            &[("REDIS_URL", "redis://r:6379/0"), ("USE_REDIS", "false")],
        )
        .unwrap();
    assert_eq!(c.redis.url, None);
}

#[test]
fn precedence_defaults_file_dotenv_env_flags() {
    let d = Dir::new().with_dotenv(
        "LISTEN_ADDR=127.0.0.1:7002\nUPSTREAM_URL=http://127.0.0.1:6002\nLOG_LEVEL=DEBUG\n",
    );
    let path = d.file(
        "listen = \"127.0.0.1:7001\"\nupstream = \"http://127.0.0.1:6001\"\nshutdown_grace = \"5s\"\n[log]\nlevel = \"warn\"\nformat = \"json\"\n",
    );
    let with_file = Overrides {
        config: Some(path.clone()),
        ..Overrides::default()
    };
    // file < .env: .env wins for listen/upstream/level, file keeps the rest.
    let c = d.load(&with_file, &[]).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:7002");
    assert_eq!(c.upstream.to_string(), "http://127.0.0.1:6002");
    assert_eq!(c.shutdown_grace, Duration::from_secs(5));
    assert_eq!(c.log.level, "debug");
    assert_eq!(c.log.format, LogFormat::Json);
    // .env < process env.
    let c = d
        .load(&with_file, &[("LISTEN_ADDR", "127.0.0.1:7003")])
        .unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:7003");
    assert_eq!(c.upstream.to_string(), "http://127.0.0.1:6002");
    // process env < flags.
    let o = Overrides {
        listen: Some("127.0.0.1:7004".into()),
        log_format: Some("text".into()),
        ..with_file.clone()
    };
    let c = d.load(&o, &[("LISTEN_ADDR", "127.0.0.1:7003")]).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:7004");
    assert_eq!(c.log.format, LogFormat::Text);
    // RAG_SIDECAR_CONFIG names the file when --config does not.
    let c = d
        .load(
            &Overrides::default(),
            &[(ENV_CONFIG, path.to_str().unwrap())],
        )
        .unwrap();
    assert_eq!(c.shutdown_grace, Duration::from_secs(5));
}

#[test]
fn routes_override_and_extend() {
    let d = Dir::new();
    let path = d.file(
        r#"
[cache]
default_ttl = "10m"
max_memory_items = 77

[[routes]]
name = "search"
timeout = "5s"
cache = { ttl = "2h" }
rate_limit = "5 per second; 100 per minute"

[[routes]]
name = "summaries"
methods = ["post"]
path = "/api/summar*"
cache = { namespace = "summary" }
retry = true
invalidate = ["summary:*"]

[[routes]]
name = "upload"
cache = false
rate_limit = "exempt"
"#,
    );
    let o = Overrides {
        config: Some(path),
        ..Overrides::default()
    };
    let c = d
        .load(&o, &[("SEARCH_RATE_LIMIT", "7 per minute")])
        .unwrap();
    let s = c.route("search").unwrap();
    assert_eq!(s.timeout, Duration::from_secs(5));
    let sc = s.cache.as_ref().unwrap();
    assert_eq!(
        (sc.namespace.as_str(), sc.ttl, sc.max_items),
        ("search", Duration::from_secs(7200), 500)
    );
    // The env (higher precedence) replaces the file's search limit.
    assert_eq!(
        s.rate_limit,
        RouteRate::Limits(rate::parse("7 per minute").unwrap())
    );
    let names: Vec<_> = c.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names[names.len() - 2..], ["summaries", "default"]);
    let new = c.route("summaries").unwrap();
    assert!(new.matches(&http::Method::POST, "/api/summarize"));
    assert!(!new.matches(&http::Method::GET, "/api/summarize"));
    let nc = new.cache.as_ref().unwrap();
    assert_eq!(
        (nc.namespace.as_str(), nc.ttl, nc.max_items),
        ("summary", Duration::from_secs(600), 77)
    );
    assert_eq!(new.retry, RetryMode::Always);
    assert_eq!(c.route("upload").unwrap().rate_limit, RouteRate::Exempt);
    // The printed configuration reads back to the same configuration.
    let again = d.file(&c.to_toml());
    let o2 = Overrides {
        config: Some(again),
        ..Overrides::default()
    };
    assert_eq!(d.load(&o2, &[]).unwrap().to_toml(), c.to_toml());
}

#[test]
fn legacy_rate_limit_names_map_onto_the_routes() {
    let c = Dir::new()
        .load(
            &Overrides::default(),
            &[
                ("DEFAULT_RATE_LIMIT", "100 per hour"),
                ("SEARCH_RATE_LIMIT", "15 per minute"),
                ("UPLOAD_RATE_LIMIT", "5/minute"),
            ],
        )
        .unwrap();
    assert_eq!(c.rate_limit.default.as_str(), "100 per hour");
    assert_eq!(
        c.route("search").unwrap().rate_limit,
        RouteRate::Limits(rate::parse("15 per minute").unwrap())
    );
    assert_eq!(
        c.route("upload").unwrap().rate_limit,
        RouteRate::Limits(rate::parse("5/minute").unwrap())
    );
    assert_eq!(c.route("rag").unwrap().rate_limit, RouteRate::Default);
}

#[test]
fn embedding_cache_switch() {
    let c = Dir::new()
        .load(
            &Overrides::default(),
            &[("ENABLE_EMBEDDING_CACHE", "False")],
        )
        .unwrap();
    assert!(c.route("embeddings").unwrap().cache.is_none());
}

#[test]
fn every_error_names_key_and_value() {
    let d = Dir::new();
    let env_cases: &[(&str, &str)] = &[
        ("DEFAULT_RATE_LIMIT", "60 per fortnight"),
        ("SEARCH_RATE_LIMIT", "lots"),
        ("UPLOAD_RATE_LIMIT", "0 per minute"),
        ("LISTEN_ADDR", "0.0.0.0:70000"),
        ("UPSTREAM_URL", "ftp://x"),
        ("UPSTREAM_URL", "https://app:5000"),
        ("USE_REDIS", "maybe"),
        ("REDIS_URL", "mysql://x"),
        ("CACHE_DEFAULT_TTL", "soon"),
        ("CACHE_MAX_MEMORY_ITEMS", "-5"),
        ("ENABLE_RATE_LIMIT", "sometimes"),
        ("MAX_RETRIES", "three"),
        ("RETRY_INITIAL_WAIT", "-1"),
        ("RETRY_MAX_WAIT", "forever"),
        ("CIRCUIT_BREAKER_THRESHOLD", "x"),
        ("CIRCUIT_BREAKER_TIMEOUT", "1 fortnight"),
        ("ENABLE_METRICS", "2"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("NUM_THREADS", "many"),
        ("ENABLE_EMBEDDING_CACHE", "perhaps"),
    ];
    for (k, v) in env_cases {
        let r = d.load(&Overrides::default(), &[(k, v)]);
        assert!(r.is_err(), "{k}={v} was accepted");
        let e = one_error(r);
        assert_eq!(e.key, *k, "{e}");
        assert_eq!(e.value.as_deref(), Some(*v), "{e}");
        let line = e.to_string();
        assert!(
            line.contains(k) && line.contains(v) && !line.contains('\n'),
            "{line}"
        );
    }
    let e = one_error(d.load(
        &Overrides::default(),
        &[("USE_REDIS", "True"), ("REDIS_PORT", "70000")],
    ));
    assert_eq!(
        (e.key.as_str(), e.value.as_deref()),
        ("REDIS_PORT", Some("70000"))
    );
    let e = one_error(d.load(&Overrides::default(), &[("NUM_THREADS", "0")]));
    assert_eq!(e.key, "NUM_THREADS");
    // The default max_wait is what is too small: named by its file key.
    let e = one_error(d.load(&Overrides::default(), &[("RETRY_INITIAL_WAIT", "20")]));
    assert_eq!(e.key, "retry.max_wait");
    let flag_cases = [
        Overrides {
            listen: Some("nowhere".into()),
            ..Overrides::default()
        },
        Overrides {
            upstream: Some("http://x/path".into()),
            ..Overrides::default()
        },
        Overrides {
            admin_listen: Some("1.2.3.4".into()),
            ..Overrides::default()
        },
        Overrides {
            log_level: Some("chatty".into()),
            ..Overrides::default()
        },
        Overrides {
            log_format: Some("yaml".into()),
            ..Overrides::default()
        },
        Overrides {
            threads: Some("x".into()),
            ..Overrides::default()
        },
    ];
    for (o, key) in flag_cases.iter().zip([
        "--listen",
        "--upstream",
        "--admin-listen",
        "--log-level",
        "--log-format",
        "--threads",
    ]) {
        assert_eq!(one_error(d.load(o, &[])).key, key);
    }
}

#[test]
fn file_errors_name_the_key() {
    let d = Dir::new();
    let cases: &[(&str, &str)] = &[
        ("listne = \"0.0.0.0:5003\"", "listne"),
        ("[cache]\nttl = \"1h\"", "ttl"),
        ("max_inflight = \"lots\"", "max_inflight"),
        ("listen = \"0.0.0.0:70000\"", "listen"),
        ("shutdown_grace = \"25\"", "shutdown_grace"),
        ("trusted_proxies = [\"10.0.0.0/33\"]", "trusted_proxies[0]"),
        (
            "[rate_limit]\ndefault = \"60 per fortnight\"",
            "rate_limit.default",
        ),
        ("[rate_limit]\nkey = \"cookie\"", "rate_limit.key"),
        ("[redis]\nurl = \"http://x\"", "redis.url"),
        ("[retry]\nbudget_percent = 150.0", "retry.budget_percent"),
        ("[[routes]]\nname = \"x\"", "routes[0].path"),
        (
            "[[routes]]\nname = \"Bad Name\"\npath = \"/x\"",
            "routes[0].name",
        ),
        (
            "[[routes]]\nname = \"x\"\npath = \"nope\"",
            "routes[0].path",
        ),
        (
            "[[routes]]\nname = \"search\"\ntimeout = \"0s\"",
            "routes[0].timeout",
        ),
        (
            "[[routes]]\nname = \"search\"\nretry = \"sometimes\"",
            "routes[0].retry",
        ),
        (
            "[[routes]]\nname = \"search\"\nmethods = [\"G E T\"]",
            "routes[0].methods[0]",
        ),
        (
            "[[routes]]\nname = \"search\"\nrate_limit = \"1 per eon\"",
            "routes[0].rate_limit",
        ),
        (
            "[[routes]]\nname = \"search\"\ncache = { ttl = \"1h\", size = 3 }",
            "routes[0].cache",
        ),
        ("[[routes]]\nname = \"search\"\nbogus = 1", "bogus"),
        ("listen = ", "line 1"),
    ];
    for (text, needle) in cases {
        let o = Overrides {
            config: Some(d.file(text)),
            ..Overrides::default()
        };
        let errs = errors_of(d.load(&o, &[]));
        let all = ConfigErrors(errs).to_string();
        assert!(all.contains(needle), "{text:?} gave {all}");
        assert_eq!(all.lines().count(), 1, "{all}");
    }
    let missing = Overrides {
        config: Some(d.0.path().join("absent.toml")),
        ..Overrides::default()
    };
    assert_eq!(one_error(d.load(&missing, &[])).key, "--config");
    let bad_env = Dir::new().with_dotenv("GOOD=1\nthis line is wrong\n");
    assert!(
        one_error(bad_env.load(&Overrides::default(), &[]))
            .reason
            .contains("line 2")
    );
}

#[test]
fn all_errors_are_reported_together() {
    let errs = errors_of(Dir::new().load(
        &Overrides::default(),
        &[
            ("LISTEN_ADDR", "x"),
            ("MAX_RETRIES", "y"),
            ("LOG_FORMAT", "z"),
        ],
    ));
    assert_eq!(errs.len(), 3);
}

#[test]
fn redis_passwords_never_appear_in_errors() {
    let d = Dir::new();
    for (k, v) in [
        ("REDIS_URL", "mysql://:hunter2@db:1"),
        ("REDIS_URL", "redis://:hunter2@a b:1"),
    ] {
        let e = one_error(d.load(&Overrides::default(), &[(k, v)]));
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
    let e = one_error(d.load(
        &Overrides::default(),
        &[
            ("USE_REDIS", "True"),
            ("REDIS_HOST", "a b"),
            ("REDIS_PASSWORD", "hunter2"),
        ],
    ));
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn from_toml_round_trips_a_rendering_and_names_bad_keys() {
    let cfg = Config::from_toml(&Config::default().to_toml()).unwrap();
    assert_eq!(cfg.to_toml(), Config::default().to_toml());
    let err = Config::from_toml("[retry]\nmax_wait = \"soon\"\n").unwrap_err();
    assert!(err.to_string().contains("retry.max_wait"), "{err}");
}

/// `check-config` "prints every error with its key": shape errors (unknown
/// keys, wrong types, a route without its name) no longer hide each other
/// or the value errors elsewhere in the file, and route numbers stay the
/// text's after a route is left out.
#[test]
fn a_file_with_many_errors_reports_each_with_its_key() {
    let d = Dir::new();
    let text = r#"
listen = "0.0.0.0:70000"
bogus_key = 1
max_inflight = "many"
[cache]
default_ttl = "5 fortnights"
foo = 2
[rate_limit]
default = "60 per fortnight"
[[routes]]
path = "/no-name"
[[routes]]
name = "search"
timeout = 5
[[routes]]
name = "r3"
path = "/r3"
bogus = 1
[[routes]]
name = "r4"
path = "nope"
"#;
    let o = Overrides {
        config: Some(d.file(text)),
        ..Overrides::default()
    };
    let all = ConfigErrors(errors_of(d.load(&o, &[]))).to_string();
    for needle in [
        "key `bogus_key`",
        "key `max_inflight`",
        "key `cache.foo`",
        "key `routes[0]`: missing field `name`",
        "key `routes[1].timeout`",
        "key `routes[2].bogus`",
        "listen = \"0.0.0.0:70000\"",
        "cache.default_ttl = \"5 fortnights\"",
        "rate_limit.default = \"60 per fortnight\"",
        "routes[3].path = \"nope\"",
    ] {
        assert!(all.contains(needle), "{needle} missing from:\n{all}");
    }
    assert_eq!(all.lines().count(), 10, "{all}");
    // The first shape error still gives its line.
    assert!(all.lines().next().unwrap().contains("(line 3)"), "{all}");
}

/// A value checked on the whole configuration is named as it was given:
/// by the variable or flag that set it, with the value as written there.
#[test]
fn whole_config_checks_name_the_variable_or_flag_that_gave_the_value() {
    let d = Dir::new();
    let e = one_error(d.load(&Overrides::default(), &[("NUM_THREADS", "0")]));
    assert_eq!(
        (e.key.as_str(), e.value.as_deref()),
        ("NUM_THREADS", Some("0"))
    );
    let flag = Overrides {
        threads: Some("0".into()),
        ..Overrides::default()
    };
    assert_eq!(one_error(d.load(&flag, &[])).key, "--threads");
    let e = one_error(d.load(&Overrides::default(), &[("CACHE_DEFAULT_TTL", "0")]));
    assert_eq!(
        (e.key.as_str(), e.value.as_deref()),
        ("CACHE_DEFAULT_TTL", Some("0"))
    );
    let e = one_error(d.load(
        &Overrides::default(),
        &[("RETRY_INITIAL_WAIT", "5"), ("RETRY_MAX_WAIT", "2")],
    ));
    assert_eq!(e.key, "RETRY_MAX_WAIT");
    assert!(e.reason.contains("RETRY_INITIAL_WAIT"), "{e}");
    // Set in the file, the file's key is named.
    let o = Overrides {
        config: Some(d.file("threads = 0\n")),
        ..Overrides::default()
    };
    assert_eq!(one_error(d.load(&o, &[])).key, "threads");
    // A config path from RAG_SIDECAR_CONFIG is named as that variable.
    let absent = d.0.path().join("absent.toml");
    let e = one_error(d.load(
        &Overrides::default(),
        &[(ENV_CONFIG, absent.to_str().unwrap())],
    ));
    assert_eq!(e.key, ENV_CONFIG);
}
