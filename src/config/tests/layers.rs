//! What each layer gives: the defaults, the legacy `.env` block verbatim,
//! precedence from defaults to flags, and the route table's overrides.

use super::*;

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
    assert_eq!(
        c.route("upload").unwrap().invalidate_mode,
        InvalidateMode::Stale
    );
    assert_eq!(
        c.route("documents-delete").unwrap().invalidate_mode,
        InvalidateMode::Purge
    );
}

#[test]
fn shipped_config_file_equals_the_defaults() {
    let text = include_str!("../../../config/rag-sidecar.toml");
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
invalidate_mode = "stale"

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
    assert_eq!(new.invalidate_mode, InvalidateMode::Stale);
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
fn from_toml_round_trips_a_rendering_and_names_bad_keys() {
    let cfg = Config::from_toml(&Config::default().to_toml()).unwrap();
    assert_eq!(cfg.to_toml(), Config::default().to_toml());
    let err = Config::from_toml("[retry]\nmax_wait = \"soon\"\n").unwrap_err();
    assert!(err.to_string().contains("retry.max_wait"), "{err}");
}

/// The shipped file is every setting written out and commented: a new
/// setting is written there too (set, or commented out when it has no
/// default), under its section.
#[test]
fn shipped_config_file_names_every_setting() {
    let text = include_str!("../../../config/rag-sidecar.toml");
    for s in crate::config::settings::SETTINGS {
        let (section, leaf) = match s.key.rsplit_once('.') {
            Some((section, leaf)) => (Some(section), leaf),
            None => (None, s.key),
        };
        // The part of the file where the key belongs.
        let part = match section {
            None => text.split("\n[").next().unwrap_or(text),
            Some(sec) => {
                let header = format!("\n[{sec}]\n");
                let at = text
                    .find(&header)
                    .unwrap_or_else(|| panic!("config/rag-sidecar.toml has no [{sec}]"));
                let rest = &text[at + header.len()..];
                rest.split("\n[").next().unwrap_or(rest)
            }
        };
        let written = part.lines().any(|l| {
            let l = l.trim_start_matches('#').trim_start();
            l.starts_with(&format!("{leaf} ="))
        });
        assert!(written, "config/rag-sidecar.toml does not name {}", s.key);
    }
}

/// docs/configuration.md's worked example (the `rag` route's TTL raised to
/// two hours) does what the page says: only the TTL changes.
#[test]
fn the_reference_pages_ttl_example_changes_only_the_ttl() {
    let page = include_str!("../../../docs/configuration.md");
    let at = page
        .find("### Example: keep RAG answers for two hours")
        .expect("docs/configuration.md lost its TTL example");
    let block = page[at..]
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the example has no toml block");
    let d = Dir::new();
    let o = Overrides {
        config: Some(d.file(block)),
        ..Overrides::default()
    };
    let c = d.load(&o, &[]).unwrap();
    let built_in = Dir::new().load(&Overrides::default(), &[]).unwrap();
    let (rag, before) = (c.route("rag").unwrap(), built_in.route("rag").unwrap());
    let (cache, was) = (rag.cache.as_ref().unwrap(), before.cache.as_ref().unwrap());
    assert_eq!(cache.ttl, Duration::from_secs(7200));
    assert_ne!(was.ttl, cache.ttl);
    assert_eq!(
        (cache.namespace.as_str(), cache.max_items),
        (was.namespace.as_str(), was.max_items)
    );
    assert_eq!(
        (rag.timeout, &rag.circuit),
        (before.timeout, &before.circuit)
    );
    // A bare number is refused, naming the key.
    let bare = d.file("[[routes]]\nname = \"rag\"\ncache = { ttl = 7200 }\n");
    let err = d
        .load(
            &Overrides {
                config: Some(bare),
                ..Overrides::default()
            },
            &[],
        )
        .unwrap_err();
    assert!(err.to_string().contains("routes[0].cache.ttl"), "{err}");
}
