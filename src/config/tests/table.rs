//! The settings table itself: its defaults are what `check-config` prints,
//! its names are unique and are the ones PRODUCT.md promises, every
//! variable and flag reads back what `check-config` prints, and the
//! reference page's table is generated from it.

use super::super::legacy::LEGACY;
use super::super::settings::{DefaultValue, SETTINGS};
use super::*;

/// A setting's printed value as an environment variable or flag gives it.
fn as_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[test]
fn every_default_reads_back() {
    let defaults = Config::default();
    for s in SETTINGS {
        let Some(v) = s.default.to_value() else {
            assert!(s.value.show(&defaults).is_none(), "{} is unset", s.key);
            continue;
        };
        let mut blank = Config::blank();
        assert!(s.value.set_toml(&mut blank, &v).is_ok(), "{}", s.key);
        // The table's default (as the reference page shows it) is what
        // check-config prints for it.
        if !matches!(s.default, DefaultValue::Computed { .. }) {
            let shown = s.value.show(&defaults).map(|v| v.to_string());
            assert_eq!(shown, Some(v.to_string()), "{}", s.key);
        }
    }
}

#[test]
fn keys_names_and_flags_are_unique() {
    let mut keys: Vec<_> = SETTINGS.iter().map(|s| s.key).collect();
    let mut flags: Vec<_> = SETTINGS.iter().filter_map(|s| s.flag).collect();
    let mut names: Vec<_> = ENV_NAMES.iter().chain(IGNORED_ENV).copied().collect();
    for list in [&mut keys, &mut flags, &mut names] {
        let n = list.len();
        list.sort_unstable();
        list.dedup();
        assert_eq!(list.len(), n, "a duplicate in {list:?}");
    }
    // No key is a section of another.
    for k in &keys {
        assert!(!keys.iter().any(|o| o.starts_with(&format!("{k}."))), "{k}");
    }
}

/// The names of PRODUCT.md's "Running it", besides `OTEL_*` and the
/// ignored `BATCH_SIZE`: exactly these are read.
#[test]
fn env_names_are_the_promised_ones() {
    let mut promised = [
        "USE_REDIS",
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
        "LOG_FILE",
        "NUM_THREADS",
        "RAG_UPSTREAM_LIMIT",
        "ENABLE_EMBEDDING_CACHE",
        "LISTEN_ADDR",
        "UPSTREAM_URL",
        "REDIS_URL",
        "ADMIN_TOKEN",
        "LOG_FORMAT",
        // Issue 15 (newer than the page): in the style of the others.
        "UPSTREAM_IDLE_TIMEOUT",
        // Issue 22: OpenTelemetry's own names (PRODUCT.md "OTEL_*").
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SERVICE_NAME",
    ];
    let mut read = ENV_NAMES.to_vec();
    promised.sort_unstable();
    read.sort_unstable();
    assert_eq!(read, promised);
    assert_eq!(IGNORED_ENV, ["BATCH_SIZE"]);
}

#[test]
fn every_flag_has_its_override() {
    let all = Overrides {
        config: None,
        listen: Some(String::new()),
        upstream: Some(String::new()),
        admin_listen: Some(String::new()),
        log_level: Some(String::new()),
        log_format: Some(String::new()),
        threads: Some(String::new()),
    };
    for flag in SETTINGS.iter().filter_map(|s| s.flag) {
        assert!(all.flag(flag).is_some(), "{flag} has no field in Overrides");
    }
}

/// Each variable and flag of a setting reads the value `check-config`
/// prints for it, to the same effective value.
#[test]
fn every_variable_and_flag_reads_the_printed_value() {
    let d = Dir::new();
    let defaults = Config::default();
    for s in SETTINGS {
        let Some(v) = s.value.show(&defaults) else {
            continue;
        };
        let text = as_text(&v);
        for name in s.env {
            let c = d.load(&Overrides::default(), &[(name, &text)]).unwrap();
            assert_eq!(s.value.show(&c), Some(v.clone()), "{name}={text}");
        }
    }
    let o = Overrides {
        listen: Some("127.0.0.1:7001".into()),
        upstream: Some("http://app:1".into()),
        admin_listen: Some("127.0.0.1:7002".into()),
        log_level: Some("debug".into()),
        log_format: Some("json".into()),
        threads: Some("3".into()),
        ..Overrides::default()
    };
    let c = d.load(&o, &[]).unwrap();
    for s in SETTINGS {
        if let Some(flag) = s.flag {
            let shown = s.value.show(&c).map(|v| as_text(&v));
            assert_eq!(shown.as_deref(), o.flag(flag), "{flag}");
        }
    }
}

/// Unlike serde's first error, every shape error of the file gives its line.
#[test]
fn every_shape_error_gives_its_line() {
    let text = "listen = \"0.0.0.0:5003\"\nbogus = 1\n[cache]\nfoo = 2\nmax_memory_items = \"x\"\n\
                [[routes]]\nname = \"search\"\ntimeout = 5\nmethods = [\"GET\", 7]\n";
    let all = Config::from_toml(text).unwrap_err().to_string();
    let lines: Vec<_> = all.lines().collect();
    assert_eq!(lines.len(), 5, "{all}");
    for (key, n) in [
        ("bogus", 2),
        ("cache.foo", 4),
        ("cache.max_memory_items", 5),
        ("routes[0].timeout", 8),
        ("routes[0].methods[1]", 9),
    ] {
        let key = format!("key `{key}`");
        let line = lines.iter().find(|l| l.contains(&key));
        assert!(
            line.is_some_and(|l| l.ends_with(&format!("(line {n})"))),
            "{key}: {all}"
        );
    }
}

#[test]
fn legacy_names_are_documented() {
    for l in LEGACY {
        assert!(!l.env.is_empty() && !l.doc.is_empty() && !l.sets.is_empty());
    }
}

const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
const BEGIN: &str = "<!-- settings:begin -->\n";
const END: &str = "<!-- settings:end -->";

/// `docs/configuration.md` carries the table this code generates;
/// `UPDATE_DOCS=1 cargo test --lib config::` rewrites it.
#[test]
fn the_reference_page_shows_this_table() {
    let page = std::fs::read_to_string(DOCS).unwrap();
    let (Some(b), Some(e)) = (page.find(BEGIN), page.find(END)) else {
        panic!("{DOCS} lacks the markers {BEGIN:?} and {END:?}");
    };
    let (start, end) = (b + BEGIN.len(), e);
    let table = settings_markdown();
    if page[start..end] == table {
        return;
    }
    if std::env::var_os("UPDATE_DOCS").is_some() {
        let page = format!("{}{table}{}", &page[..start], &page[end..]);
        std::fs::write(DOCS, page).unwrap();
        return;
    }
    panic!(
        "{DOCS}'s settings table differs from the settings table in src/config/settings.rs; \
         regenerate it with `UPDATE_DOCS=1 cargo test --lib config::`"
    );
}

/// `check-config` prints a duration as one number and unit, the way a
/// person writes it, and that text reads back to the same duration.
#[test]
fn durations_print_as_they_are_written() {
    let cases = [
        (Duration::from_millis(1500), "1.5s"),
        (Duration::from_millis(1250), "1.25s"),
        (Duration::from_millis(250), "250ms"),
        (Duration::from_secs(30), "30s"),
        (Duration::from_secs(90), "90s"),
        (Duration::from_secs(60), "1m"),
        (Duration::from_secs(3600), "1h"),
        (Duration::from_secs(86_400), "24h"),
        (Duration::from_micros(1500), "1500us"),
        (Duration::ZERO, "0s"),
    ];
    for (d, text) in cases {
        assert_eq!(fmt_duration(d), text);
        assert_eq!(super::super::parse::duration(text), Ok(d), "{text}");
    }
}
