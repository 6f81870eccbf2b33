//! The route table's entries: what a route matches and the per-route
//! decisions every layer reads (timeout, cache, rate limit, circuit, retry,
//! invalidation), plus the built-in table of PRODUCT.md.

use std::time::Duration;

use http::Method;

use super::rate::RateLimits;

/// How a route's path is matched.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Every path (the `default` route).
    Any,
    /// This path exactly.
    Exact(String),
    /// A glob (`*` also crosses `/`): `/api/embed*`, `/api/documents/*`.
    Glob(glob::Pattern),
}

impl PathMatch {
    /// `*`, `?` or `[` make a glob; anything else is an exact path.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('/') && text != "*" {
            return Err("a path must start with '/'".into());
        }
        if text == "*" || text == "/*" {
            return Ok(Self::Any);
        }
        if text.contains(['*', '?', '[']) {
            glob::Pattern::new(text)
                .map(Self::Glob)
                .map_err(|e| format!("bad glob: {}", e.msg))
        } else {
            Ok(Self::Exact(text.to_string()))
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(p) => p == path,
            Self::Glob(g) => g.matches(path),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Any => "*",
            Self::Exact(p) => p,
            Self::Glob(g) => g.as_str(),
        }
    }
}

/// A route's cache settings (the cache layer reads them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCache {
    pub namespace: String,
    pub ttl: Duration,
    pub max_items: usize,
}

/// A route's rate limit (the rate-limit layer reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteRate {
    /// The global `rate_limit.default`.
    Default,
    /// This route's own limits, replacing the default (Flask-Limiter).
    Limits(RateLimits),
    /// Not limited (Flask-Limiter's `exempt`).
    Exempt,
}

/// Whether a route's requests may be retried (the retry layer reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryMode {
    Always,
    Never,
    /// Only GET, HEAD, OPTIONS, PUT, DELETE and TRACE (RFC 9110 §9.2.2).
    IdempotentOnly,
}

impl RetryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Never => "never",
            Self::IdempotentOnly => "idempotent",
        }
    }

    /// Whether a request with this method may be retried on this route.
    pub fn allows(self, method: &Method) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::IdempotentOnly => method.is_idempotent(),
        }
    }
}

/// What an invalidation leaves of the entries it invalidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidateMode {
    /// Never a hit again, but still served (`STALE`) when the upstream
    /// fails, its circuit is open or its quota leaves no room.
    Stale,
    /// Removed for every purpose: a deleted document's content is never
    /// served again.
    Purge,
}

impl InvalidateMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stale => "stale",
            Self::Purge => "purge",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stale" => Some(Self::Stale),
            "purge" => Some(Self::Purge),
            _ => None,
        }
    }
}

/// One entry of the route table.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Empty: any method.
    pub methods: Vec<Method>,
    pub path: PathMatch,
    /// The whole upstream exchange, retries included, up to response headers.
    pub timeout: Duration,
    pub cache: Option<RouteCache>,
    pub rate_limit: RouteRate,
    /// Overrides `rate_limit.dry_run` for this route when set.
    pub dry_run: Option<bool>,
    pub circuit: String,
    pub retry: RetryMode,
    /// Cache patterns cleared after a 2xx, e.g. `search:*`.
    pub invalidate: Vec<String>,
    /// What the invalidation leaves of the old entries.
    pub invalidate_mode: InvalidateMode,
    /// Overrides the global `max_request_body` when set.
    pub max_request_body: Option<u64>,
    /// The body is spooled to a temporary file and sent to the app only
    /// once complete, so a slow client never holds an app worker.
    pub request_buffering: bool,
    /// Requests sent to the app on this route (every attempt), fleet-wide
    /// with Redis; `None`: no quota.
    pub upstream_limit: Option<RateLimits>,
    /// The longest a request waits for room under `upstream_limit` (never
    /// past the route's timeout).
    pub upstream_queue: Duration,
    /// A request that would have to wait for room under `upstream_limit`
    /// and has a stale answer at hand is answered with it at once, leaving
    /// the calls to questions that have none.
    pub upstream_queue_stale: bool,
}

impl Route {
    /// A route as a new `[[routes]]` entry starts: any method, 30 s, not
    /// cached, the default rate limit, the `upstream` circuit, idempotent
    /// methods retried (the `default` route's settings).
    pub fn plain(name: &str, path: PathMatch) -> Self {
        Self {
            name: name.into(),
            methods: Vec::new(),
            path,
            timeout: Duration::from_secs(30),
            cache: None,
            rate_limit: RouteRate::Default,
            dry_run: None,
            circuit: "upstream".into(),
            retry: RetryMode::IdempotentOnly,
            invalidate: Vec::new(),
            invalidate_mode: InvalidateMode::Purge,
            max_request_body: None,
            request_buffering: false,
            upstream_limit: None,
            upstream_queue: Duration::from_secs(10),
            upstream_queue_stale: true,
        }
    }

    pub fn matches(&self, method: &Method, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method)) && self.path.matches(path)
    }
}

/// The name of the catch-all route, always last.
pub const DEFAULT_ROUTE: &str = "default";

fn cache(namespace: &str, ttl_secs: u64, max_items: usize) -> Option<RouteCache> {
    Some(RouteCache {
        namespace: namespace.into(),
        ttl: Duration::from_secs(ttl_secs),
        max_items,
    })
}

fn route(name: &str, method: Option<Method>, path: PathMatch, timeout_secs: u64) -> Route {
    Route {
        methods: method.into_iter().collect(),
        timeout: Duration::from_secs(timeout_secs),
        retry: RetryMode::Never,
        ..Route::plain(name, path)
    }
}

fn glob(p: &str) -> PathMatch {
    // The built-in patterns are constants known to be valid globs.
    PathMatch::parse(p).unwrap_or(PathMatch::Any)
}

/// The built-in route table of PRODUCT.md, in match order. The default rate
/// limits given here (search 30/min, upload 10/min) are the legacy ones;
/// `SEARCH_RATE_LIMIT`/`UPLOAD_RATE_LIMIT` and `[[routes]]` replace them.
pub fn builtin(search_rate: RateLimits, upload_rate: RateLimits) -> Vec<Route> {
    let corpus_changes = || vec!["search:*".to_string(), "rag:*".to_string()];
    vec![
        Route {
            cache: cache("search", 3_600, 500),
            rate_limit: RouteRate::Limits(search_rate),
            retry: RetryMode::Always,
            ..route(
                "search",
                Some(Method::POST),
                PathMatch::Exact("/api/search".into()),
                30,
            )
        },
        Route {
            cache: cache("rag", 1_800, 200),
            circuit: "gemini".into(),
            retry: RetryMode::Always,
            ..route(
                "rag",
                Some(Method::POST),
                PathMatch::Exact("/api/rag/query".into()),
                60,
            )
        },
        Route {
            cache: cache("embedding", 86_400, 1_000),
            circuit: "embedding".into(),
            retry: RetryMode::Always,
            ..route("embeddings", Some(Method::POST), glob("/api/embed*"), 30)
        },
        Route {
            rate_limit: RouteRate::Limits(upload_rate),
            invalidate: corpus_changes(),
            // A new document makes old answers incomplete, not wrong: they
            // may still answer while the upstream fails.
            invalidate_mode: InvalidateMode::Stale,
            // Uploads are where slow clients hurt: a dripping 50 MiB file
            // would hold one of the app's few sync workers for its whole
            // transfer.
            request_buffering: true,
            ..route(
                "upload",
                Some(Method::POST),
                PathMatch::Exact("/api/upload".into()),
                120,
            )
        },
        Route {
            invalidate: corpus_changes(),
            ..route(
                "documents-delete",
                Some(Method::DELETE),
                glob("/api/documents/*"),
                30,
            )
        },
        Route {
            retry: RetryMode::IdempotentOnly,
            ..route(DEFAULT_ROUTE, None, PathMatch::Any, 30)
        },
    ]
}
