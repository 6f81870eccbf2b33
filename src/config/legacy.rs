//! The legacy `.env` names that are not one setting each, kept as the
//! legacy app read them: a small table of its own ([`LEGACY`]) beside the
//! settings table, each entry with the names it reads, what it sets (for
//! the reference page) and the function that applies it, after the
//! settings' own variables in the environment layer.
//!
//! - `REDIS_URL`, else `USE_REDIS=True` with `REDIS_HOST`, `REDIS_PORT`,
//!   `REDIS_PASSWORD`, `REDIS_DB` building the URL; `USE_REDIS=False`
//!   turns Redis off whatever else is set;
//! - `SEARCH_RATE_LIMIT`, `UPLOAD_RATE_LIMIT`: the `search` and `upload`
//!   routes' limits;
//! - `RAG_UPSTREAM_LIMIT`: the `rag` route's upstream quota;
//! - `ENABLE_EMBEDDING_CACHE=False`: the `embeddings` route's cache off;
//! - [`IGNORED_ENV`]: names that mean nothing to a proxy (`BATCH_SIZE`),
//!   accepted and ignored.

use super::Config;
use super::error::Errors;
use super::parse;
use super::rate;
use super::route_file::Pending;
use super::routes::RouteRate;
use super::sources::Strings;

/// Legacy `.env` names that mean nothing to a proxy: accepted and ignored.
pub const IGNORED_ENV: &[&str] = &["BATCH_SIZE"];

/// One composite legacy rule.
pub(super) struct Legacy {
    /// The names it reads.
    pub(super) env: &'static [&'static str],
    /// What it sets, for the reference page.
    pub(super) sets: &'static str,
    /// Its values are masked in errors as URLs (their password).
    pub(super) secret: bool,
    /// One line for the reference page.
    pub(super) doc: &'static str,
    pub(super) apply: fn(&mut Config, &dyn Strings, &mut Errors, &mut Pending),
}

pub(super) const LEGACY: &[Legacy] = &[
    Legacy {
        env: &[
            "USE_REDIS",
            "REDIS_URL",
            "REDIS_HOST",
            "REDIS_PORT",
            "REDIS_PASSWORD",
            "REDIS_DB",
        ],
        sets: "`redis.url`",
        secret: true,
        doc: "`REDIS_URL` turns Redis on; else `USE_REDIS=True` builds \
              `redis://[:REDIS_PASSWORD@]REDIS_HOST:REDIS_PORT/REDIS_DB` (defaults localhost, \
              6379, 0); `USE_REDIS=False` turns Redis off even with `REDIS_URL` set.",
        apply: redis,
    },
    Legacy {
        env: &["SEARCH_RATE_LIMIT"],
        sets: "`rate_limit` of route `search`",
        secret: false,
        doc: "Flask-Limiter syntax.",
        apply: |cfg, env, errs, _| route_rate(cfg, env, errs, "SEARCH_RATE_LIMIT", "search"),
    },
    Legacy {
        env: &["UPLOAD_RATE_LIMIT"],
        sets: "`rate_limit` of route `upload`",
        secret: false,
        doc: "Flask-Limiter syntax.",
        apply: |cfg, env, errs, _| route_rate(cfg, env, errs, "UPLOAD_RATE_LIMIT", "upload"),
    },
    Legacy {
        env: &["RAG_UPSTREAM_LIMIT"],
        sets: "`upstream_limit` of route `rag`",
        secret: false,
        doc: "Flask-Limiter syntax, e.g. `15 per minute` (Gemini's free tier): requests sent to the app on that route, fleet-wide with Redis.",
        apply: rag_upstream_limit,
    },
    Legacy {
        env: &["ENABLE_EMBEDDING_CACHE"],
        sets: "`cache` of route `embeddings`",
        secret: false,
        doc: "`False` turns that route's cache off.",
        apply: embedding_cache,
    },
];

/// `REDIS_URL`, else `USE_REDIS=True` with the legacy parts;
/// `USE_REDIS=False` switches Redis off whatever else is set.
fn redis(cfg: &mut Config, env: &dyn Strings, errs: &mut Errors, _: &mut Pending) {
    let use_redis = env
        .get("USE_REDIS")
        .and_then(|v| errs.parse("USE_REDIS", &v, parse::bool));
    if let Some(url) = env.get("REDIS_URL").filter(|s| !s.is_empty()) {
        if let Some(url) = errs.parse("REDIS_URL", &url, parse::redis_url) {
            cfg.redis.url = Some(url);
        }
    } else if use_redis == Some(true) {
        let host = env
            .get("REDIS_HOST")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let port = match env.get("REDIS_PORT") {
            Some(p) => errs.parse("REDIS_PORT", &p, parse::port),
            None => Some(6379),
        };
        let db = match env.get("REDIS_DB") {
            Some(db) => errs.parse("REDIS_DB", &db, |s| {
                s.parse::<u32>()
                    .map_err(|_| "expected a database number".to_string())
            }),
            None => Some(0),
        };
        let auth = match env.get("REDIS_PASSWORD").filter(|s| !s.is_empty()) {
            Some(p) => format!(":{}@", parse::url_encode(&p)),
            None => String::new(),
        };
        // A bad port or database is reported; the URL is still checked,
        // with the legacy default in its place.
        let built = format!(
            "redis://{auth}{host}:{}/{}",
            port.unwrap_or(6379),
            db.unwrap_or(0)
        );
        if let Some(url) = errs.parse("REDIS_HOST", &built, parse::redis_url) {
            cfg.redis.url = Some(url);
        }
    }
    if use_redis == Some(false) {
        cfg.redis.url = None;
    }
}

fn route_rate(cfg: &mut Config, env: &dyn Strings, errs: &mut Errors, var: &str, route: &str) {
    if let Some(v) = env.get(var) {
        let r = errs
            .parse(var, &v, |s| rate::parse(s).map(RouteRate::Limits))
            .unwrap_or(RouteRate::Default);
        if let Some(route) = cfg.route_mut(route) {
            route.rate_limit = r;
        }
    }
}

fn rag_upstream_limit(cfg: &mut Config, env: &dyn Strings, errs: &mut Errors, _: &mut Pending) {
    if let Some(v) = env.get("RAG_UPSTREAM_LIMIT") {
        if let Some(limits) = errs.parse("RAG_UPSTREAM_LIMIT", &v, rate::parse) {
            if let Some(route) = cfg.route_mut("rag") {
                route.upstream_limit = Some(limits);
            }
        }
    }
}

fn embedding_cache(cfg: &mut Config, env: &dyn Strings, errs: &mut Errors, pending: &mut Pending) {
    let Some(v) = env.get("ENABLE_EMBEDDING_CACHE") else {
        return;
    };
    if errs.parse("ENABLE_EMBEDDING_CACHE", &v, parse::bool) == Some(false) {
        if let Some(r) = cfg.route_mut("embeddings") {
            r.cache = None;
            pending.forget("embeddings");
        }
    }
}
