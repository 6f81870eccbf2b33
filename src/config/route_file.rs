//! The `[[routes]]` array of the file: a record per route rather than a
//! scalar setting, so it keeps its own serde shape ([`RouteFile`]), its own
//! application onto the route table (a built-in name changes only the
//! fields given; a new name adds a route before `default`), and its own
//! rendering for `check-config`. Per-route cache fields left unset are
//! [`Pending`] until every layer has set the `[cache]` defaults they take.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Config;
use super::error::Errors;
use super::parse::{self, fmt_duration};
use super::routes::{
    DEFAULT_ROUTE, InvalidateMode, PathMatch, RetryMode, Route, RouteCache, RouteRate,
};

/// One `[[routes]]` entry. For a built-in name only the given fields change;
/// a new name needs at least `path`.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteFile {
    pub(super) name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) methods: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) cache: Option<RouteCacheFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) rate_limit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) dry_run: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) circuit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) retry: Option<RetryFlag>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) invalidate: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) invalidate_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) max_request_body: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) request_buffering: Option<bool>,
    /// A rate string, or `"none"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) upstream_limit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) upstream_queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) upstream_queue_stale: Option<bool>,
}

/// `cache = false` turns a route's cache off; a table sets (some of) its
/// fields.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub(super) enum RouteCacheFile {
    Enabled(bool),
    Table(RouteCacheTable),
}

/// By hand rather than `#[serde(untagged)]`: an untagged enum reports any
/// mistake inside the table as "did not match any variant", where this
/// names the field (`routes[0].cache.ttl: invalid type: integer 7200,
/// expected a string`).
impl<'de> Deserialize<'de> for RouteCacheFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Shape;
        impl<'de> serde::de::Visitor<'de> for Shape {
            type Value = RouteCacheFile;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("false, or a table { namespace, ttl, max_items }")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(RouteCacheFile::Enabled(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                RouteCacheTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RouteCacheFile::Table)
            }
        }
        d.deserialize_any(Shape)
    }
}

#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteCacheTable {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) max_items: Option<usize>,
}

/// `retry = true | false | "idempotent"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub(super) enum RetryFlag {
    Bool(bool),
    Mode(String),
}

/// Per-route cache fields left unset in the file, filled from the `[cache]`
/// defaults once every layer is applied.
#[derive(Debug, Default)]
pub(super) struct Pending {
    cache_ttl: Vec<String>,
    cache_items: Vec<String>,
}

impl Pending {
    /// A route whose cache was switched off after the file named it.
    pub(super) fn forget(&mut self, route: &str) {
        self.cache_ttl.retain(|n| n != route);
        self.cache_items.retain(|n| n != route);
    }

    /// Gives the pending routes the effective `[cache]` defaults.
    pub(super) fn fill(self, cfg: &mut Config) {
        for r in &mut cfg.routes {
            if let Some(c) = &mut r.cache {
                if self.cache_ttl.contains(&r.name) {
                    c.ttl = cfg.cache.default_ttl;
                }
                if self.cache_items.contains(&r.name) {
                    c.max_items = cfg.cache.max_memory_items;
                }
            }
        }
    }
}

/// Applies the file's `i`-th route entry (`i` as numbered in the text).
pub(super) fn apply(
    cfg: &mut Config,
    i: usize,
    rf: &RouteFile,
    errs: &mut Errors,
    pending: &mut Pending,
) {
    let key = |field: &str| format!("routes[{i}].{field}");
    if let Err(e) = parse::name(&rf.name) {
        return errs.push(&key("name"), Some(&rf.name), e);
    }
    let idx = match cfg.routes.iter().position(|r| r.name == rf.name) {
        Some(idx) => idx,
        None => {
            let Some(path) = &rf.path else {
                let reason = format!("required for the new route {:?}", rf.name);
                return errs.push(&key("path"), None, reason);
            };
            let Some(path) = errs.parse(&key("path"), path, PathMatch::parse) else {
                return;
            };
            // New routes go before the catch-all, in file order.
            let at = cfg
                .routes
                .iter()
                .position(|r| r.name == DEFAULT_ROUTE)
                .unwrap_or(cfg.routes.len());
            cfg.routes.insert(at, Route::plain(&rf.name, path));
            at
        }
    };
    if let Some(route) = cfg.routes.get_mut(idx) {
        apply_fields(route, i, rf, errs, pending);
    }
}

fn apply_fields(
    route: &mut Route,
    i: usize,
    rf: &RouteFile,
    errs: &mut Errors,
    pending: &mut Pending,
) {
    let key = |field: &str| format!("routes[{i}].{field}");
    if let Some(methods) = &rf.methods {
        route.methods = methods
            .iter()
            .enumerate()
            .filter_map(|(j, m)| errs.parse(&format!("routes[{i}].methods[{j}]"), m, parse::method))
            .collect();
    }
    if let Some(p) = &rf.path {
        if let Some(p) = errs.parse(&key("path"), p, PathMatch::parse) {
            route.path = p;
        }
    }
    if let Some(t) = &rf.timeout {
        if let Some(t) = errs.parse(&key("timeout"), t, parse::nonzero_duration) {
            route.timeout = t;
        }
    }
    apply_cache(route, i, rf.cache.as_ref(), errs, pending);
    if let Some(v) = &rf.rate_limit {
        if let Some(r) = errs.parse(&key("rate_limit"), v, parse::route_rate) {
            route.rate_limit = r;
        }
    }
    if rf.dry_run.is_some() {
        route.dry_run = rf.dry_run;
    }
    if let Some(c) = &rf.circuit {
        if errs.parse(&key("circuit"), c, parse::name).is_some() {
            route.circuit = c.clone();
        }
    }
    match &rf.retry {
        None => {}
        Some(RetryFlag::Bool(true)) => route.retry = RetryMode::Always,
        Some(RetryFlag::Bool(false)) => route.retry = RetryMode::Never,
        Some(RetryFlag::Mode(m)) => match m.as_str() {
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
    if let Some(m) = &rf.invalidate_mode {
        match InvalidateMode::parse(m) {
            Some(mode) => route.invalidate_mode = mode,
            None => errs.push(
                &key("invalidate_mode"),
                Some(m),
                "expected \"stale\" or \"purge\"".into(),
            ),
        }
    }
    if rf.max_request_body.is_some() {
        route.max_request_body = rf.max_request_body;
    }
    if let Some(b) = rf.request_buffering {
        route.request_buffering = b;
    }
    match rf.upstream_limit.as_deref() {
        None => {}
        Some("none") => route.upstream_limit = None,
        Some(v) => {
            if let Some(l) = errs.parse(&key("upstream_limit"), v, super::rate::parse) {
                route.upstream_limit = Some(l);
            }
        }
    }
    if let Some(v) = &rf.upstream_queue {
        if let Some(d) = errs.parse(&key("upstream_queue"), v, parse::duration) {
            route.upstream_queue = d;
        }
    }
    if let Some(v) = rf.upstream_queue_stale {
        route.upstream_queue_stale = v;
    }
}

/// `cache = false | true | { namespace, ttl, max_items }`: fields a new
/// cache leaves out wait for the `[cache]` defaults.
fn apply_cache(
    route: &mut Route,
    i: usize,
    cache: Option<&RouteCacheFile>,
    errs: &mut Errors,
    pending: &mut Pending,
) {
    let key = |field: &str| format!("routes[{i}].{field}");
    let blank = |route: &Route| RouteCache {
        namespace: route.name.clone(),
        ttl: Duration::ZERO,
        max_items: 0,
    };
    match cache {
        None => {}
        Some(RouteCacheFile::Enabled(false)) => route.cache = None,
        Some(RouteCacheFile::Enabled(true)) if route.cache.is_none() => {
            route.cache = Some(blank(route));
            pending.cache_ttl.push(route.name.clone());
            pending.cache_items.push(route.name.clone());
        }
        Some(RouteCacheFile::Enabled(true)) => {}
        Some(RouteCacheFile::Table(t)) => {
            let fresh = route.cache.is_none();
            let mut c = route.cache.clone().unwrap_or_else(|| blank(route));
            if let Some(ns) = &t.namespace {
                if errs
                    .parse(&key("cache.namespace"), ns, parse::name)
                    .is_some()
                {
                    c.namespace = ns.clone();
                }
            }
            match &t.ttl {
                Some(v) => {
                    if let Some(ttl) = errs.parse(&key("cache.ttl"), v, parse::nonzero_duration) {
                        c.ttl = ttl;
                    }
                }
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
}

/// The route table in the file's shape, for `check-config`.
pub(super) fn render(routes: &[Route]) -> Vec<RouteFile> {
    routes
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
            invalidate_mode: Some(r.invalidate_mode.as_str().into()),
            max_request_body: r.max_request_body,
            request_buffering: Some(r.request_buffering),
            upstream_limit: Some(
                r.upstream_limit
                    .as_ref()
                    .map_or_else(|| "none".to_string(), ToString::to_string),
            ),
            upstream_queue: Some(fmt_duration(r.upstream_queue)),
            upstream_queue_stale: Some(r.upstream_queue_stale),
        })
        .collect()
}
