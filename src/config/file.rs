//! The TOML file's shape: every key optional, unknown keys rejected. Values
//! that need more than a type check (durations, addresses, rate strings) stay
//! strings here and are parsed in `mod.rs`, where errors get their key path.
//! The same structs, filled from the effective configuration, are what
//! `check-config` prints, so its output is itself a valid config file.

use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_proxies: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_read_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_body: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readiness_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<LogFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<RouteFile>>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_items: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_if_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_headers: Option<Vec<String>>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_wait: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wait: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_replay_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_min_per_second: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_patterns: Option<Vec<String>>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_loopback: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// One `[[routes]]` entry. For a built-in name only the given fields change;
/// a new name needs at least `path`.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<RouteCacheFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryFlag>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalidate: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_body: Option<u64>,
}

/// `cache = false` turns a route's cache off; a table sets (some of) its
/// fields.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum RouteCacheFile {
    Enabled(bool),
    Table(RouteCacheTable),
}

#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheTable {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_items: Option<usize>,
}

/// `retry = true | false | "idempotent"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum RetryFlag {
    Bool(bool),
    Mode(String),
}

/// What a TOML text gives: the file's configuration and every error in its
/// shape (bad syntax, unknown keys, wrong types), each naming its key path.
/// When there are shape errors, `config` is what the rest of the text gives
/// with the offending keys left out, so that the value checks can report
/// their errors too: `check-config` prints every error at once.
#[derive(Debug, Default)]
pub struct Parsed {
    pub config: Option<FileConfig>,
    pub errors: Vec<String>,
    /// When routes were left out: the text's number of each route of
    /// `config`, for the value errors' key paths.
    pub route_numbers: Vec<usize>,
}

/// Past this many shape errors in one text, the rest are not looked for.
const MAX_SHAPE_ERRORS: usize = 50;

/// One step of the key path serde_path_to_error reports.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// A shape error: where (when the path can be followed) and the message.
struct ShapeError {
    path: Option<Vec<Step>>,
    message: String,
}

/// Reads a TOML text. serde stops at the first error, so after one the text
/// is read again as a plain table, the offending key taken out and the rest
/// deserialized again, until what is left is a valid file. Only the first
/// error can give its line: the later passes read a table, not the text.
pub fn parse(text: &str) -> Parsed {
    let first = match deserialize(toml::Deserializer::new(text), Some(text), &[]) {
        Ok(config) => {
            return Parsed {
                config: Some(config),
                ..Parsed::default()
            };
        }
        Err(e) => e,
    };
    let mut errors = vec![first.message];
    let mut path = first.path;
    let Ok(mut doc) = text.parse::<toml::Table>() else {
        // Bad syntax: there is no table to read further.
        return Parsed {
            errors,
            ..Parsed::default()
        };
    };
    // `routes[i]` of the pruned table is the text's `routes[origin[i]]`.
    let routes = doc
        .get("routes")
        .and_then(toml::Value::as_array)
        .map_or(0, Vec::len);
    let mut origin: Vec<usize> = (0..routes).collect();
    while errors.len() < MAX_SHAPE_ERRORS {
        let Some(p) = path.take() else { break };
        if !take_out(&mut doc, &p, &mut origin) {
            break;
        }
        match deserialize(toml::Value::Table(doc.clone()), None, &origin) {
            Ok(config) => {
                return Parsed {
                    config: Some(config),
                    errors,
                    route_numbers: origin,
                };
            }
            Err(e) => {
                errors.push(e.message);
                path = e.path;
            }
        }
    }
    Parsed {
        errors,
        ..Parsed::default()
    }
}

fn deserialize<'de, D: serde::Deserializer<'de, Error = toml::de::Error>>(
    de: D,
    text: Option<&str>,
    origin: &[usize],
) -> Result<FileConfig, ShapeError> {
    serde_path_to_error::deserialize::<_, FileConfig>(de).map_err(|e| {
        let mut steps = Vec::new();
        let mut followable = true;
        for seg in e.path().iter() {
            match seg {
                serde_path_to_error::Segment::Map { key } => steps.push(Step::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => steps.push(Step::Index(*index)),
                _ => followable = false,
            }
        }
        // The text's own route numbers, not the pruned table's.
        if let [Step::Key(k), Step::Index(i), ..] = steps.as_mut_slice() {
            if k == "routes" {
                *i = origin.get(*i).copied().unwrap_or(*i);
            }
        }
        let shown = show(&steps);
        let inner = e.into_inner();
        let line = text
            .zip(inner.span())
            .map(|(text, span)| {
                let start = span.start.min(text.len());
                format!(" (line {})", text[..start].matches('\n').count() + 1)
            })
            .unwrap_or_default();
        let msg = inner.message().replace('\n', " ");
        let message = if shown.is_empty() {
            format!("{msg}{line}")
        } else {
            format!("key `{shown}`: {msg}{line}")
        };
        ShapeError {
            path: (followable && !steps.is_empty()).then_some(steps),
            message,
        }
    })
}

/// `routes[0].timeout`, as serde_path_to_error writes a path.
fn show(steps: &[Step]) -> String {
    let mut s = String::new();
    for step in steps {
        match step {
            Step::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Step::Index(i) => {
                s.push('[');
                s.push_str(&i.to_string());
                s.push(']');
            }
        }
    }
    s
}

/// Takes the key at `path` (as reported, so `routes` indices are the text's)
/// out of `doc`. A route that cannot be read at all leaves its array; an
/// element of any other array takes its whole array with it. False when
/// there is nothing to take out, which ends the search.
fn take_out(doc: &mut toml::Table, reported: &[Step], origin: &mut Vec<usize>) -> bool {
    let mut path = reported.to_vec();
    let routes = matches!(path.first(), Some(Step::Key(k)) if k == "routes");
    if routes {
        if let Some(Step::Index(i)) = path.get_mut(1) {
            match origin.iter().position(|o| o == i) {
                Some(pos) => *i = pos,
                None => return false,
            }
        }
    }
    let skip = if routes { 2 } else { 0 };
    if let Some(j) = path
        .iter()
        .skip(skip)
        .position(|s| matches!(s, Step::Index(_)))
    {
        path.truncate(skip + j);
    }
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut root = toml::Value::Table(std::mem::take(doc));
    let mut at = Some(&mut root);
    for step in parents {
        at = at.and_then(|v| child(v, step));
    }
    let removed = match (at, last) {
        (Some(toml::Value::Table(t)), Step::Key(k)) => t.remove(k).is_some(),
        (Some(toml::Value::Array(a)), Step::Index(i)) if routes && *i < a.len() => {
            a.remove(*i);
            origin.remove(*i);
            true
        }
        _ => false,
    };
    if let toml::Value::Table(t) = root {
        *doc = t;
    }
    removed
}

fn child<'a>(v: &'a mut toml::Value, step: &Step) -> Option<&'a mut toml::Value> {
    match (v, step) {
        (toml::Value::Table(t), Step::Key(k)) => t.get_mut(k),
        (toml::Value::Array(a), Step::Index(i)) => a.get_mut(*i),
        _ => None,
    }
}
