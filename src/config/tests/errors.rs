//! Every error path: each names its key, variable or flag and the value as
//! given, on one line, all of them reported together, secrets masked.

use super::*;

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
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
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
        ("[tracing]\nsample_ratio = 1.5", "tracing.sample_ratio"),
        (
            "[tracing]\notlp_endpoint = \"http://c:4318/?x=1\"",
            "tracing.otlp_endpoint",
        ),
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
            "[[routes]]\nname = \"upload\"\ninvalidate_mode = \"forget\"",
            "routes[0].invalidate_mode",
        ),
        ("[cache]\nlease_ttl = \"0s\"", "cache.lease_ttl"),
        (
            "[cache]\ngeneration_poll = \"often\"",
            "cache.generation_poll",
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

#[test]
fn a_bad_value_from_dotenv_says_it_was_set_there() {
    let d = Dir::new().with_dotenv("USE_REDIS=Ture\n");
    let e = one_error(d.load(&Overrides::default(), &[]));
    assert_eq!(e.key, "USE_REDIS");
    assert!(
        e.reason.contains("(set in ") && e.reason.contains(".env)"),
        "{e}"
    );
    // The same value from the process environment (which wins) does not.
    let e = one_error(d.load(&Overrides::default(), &[("USE_REDIS", "Ture")]));
    assert!(!e.reason.contains("set in"), "{e}");
}
