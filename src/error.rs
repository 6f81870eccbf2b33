//! Every typed error of the request path, and the bounded kinds they are
//! sorted into. A leaf: layers return these inside a [`BoxError`], and the
//! rescue layer (`layers::rescue`) is the one place that turns an error into
//! an answer. [`classify`] walks the source chain (a hyper client error
//! wraps the body error that caused it) and picks the most specific kind;
//! [`ErrorKind::as_str`] is the bounded label the metrics use, and
//! [`Failure`] the legacy type of a failed upstream attempt.
//!
//! A layer that wants headers (or response extensions) on the answer its
//! error becomes attaches them to the error with [`Decorated`], instead of
//! answering the error itself.

use std::time::Duration;

use http::{Extensions, HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::BoxError;

/// The upstream could not be reached (connection refused, reset, DNS). Its
/// message walks the cause chain: "client error (Connect)" alone would not
/// tell an operator that the app refused the connection.
#[derive(Debug, thiserror::Error)]
#[error("upstream unreachable: {}", causes(.0.as_ref()))]
pub struct UpstreamUnavailable(#[source] pub BoxError);

/// An error and its causes, `: `-separated, each said once.
pub fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// The upstream answered with something that is not valid HTTP/1.1: a
/// malformed or oversized head, two differing `Content-Length`s, a garbage
/// status line. Never retried (the app would only say it again); a circuit
/// failure like any other of the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("upstream sent an invalid response: {0}")]
pub struct UpstreamBadResponse(pub String);

/// The upstream did not answer within the route's timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream did not answer within {}", crate::config::fmt_duration(*.0))]
pub struct UpstreamTimeout(pub Duration);

/// The client did not send its request body within the route's timeout.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {}", crate::config::fmt_duration(*.0))]
pub struct ClientTimeout(pub Duration);

/// Reading the client's request body failed: the client hung up part way
/// through an upload, or sent a malformed chunk. The client's doing, not
/// the upstream's: it answers 400 and never counts against a circuit, the
/// upstream's failure figures or the health score's error rate.
#[derive(Debug, thiserror::Error)]
#[error("request body broke off: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// The client's request body was cut: nothing arrived for
/// `client_body_timeout` between two reads, or it was still arriving
/// `client_body_deadline` after it began, however steadily it dripped. The
/// client's doing (408), never the upstream's: a slow client must not hold
/// an app worker, nor the spool, nor count against a circuit.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyStalled {
    #[error("request body stalled: nothing received for {}", crate::config::fmt_duration(*.0))]
    Pause(Duration),
    #[error(
        "request body not complete within client_body_deadline ({})",
        crate::config::fmt_duration(*.0)
    )]
    Deadline(Duration),
}

/// The request body is larger than allowed.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// A request body to be spooled (`request_buffering`) would take the
/// spool past `spool_max_bytes`: 503 with `Retry-After`, nothing sent on.
#[derive(Debug, thiserror::Error)]
#[error(
    "request bodies waiting on disk would exceed spool_max_bytes ({0} bytes); try again shortly"
)]
pub struct SpoolFull(pub u64);

/// One client key's request bodies on disk would exceed its share (a
/// quarter of `spool_max_bytes`): 503 with `Retry-After`, as a full spool.
#[derive(Debug, thiserror::Error)]
#[error(
    "this client's request bodies waiting on disk would exceed its share of the spool ({0} bytes, a quarter of spool_max_bytes); try again shortly"
)]
pub struct SpoolShare(pub u64);

/// A request body could not be written to (or read back from) its
/// temporary file: the disk is full or failing. 503, as for a full spool.
#[derive(Debug, thiserror::Error)]
#[error("cannot spool the request body: {0}")]
pub struct SpoolIo(#[source] pub std::io::Error);

/// The route's circuit is open: the upstream was not called.
#[derive(Debug, thiserror::Error)]
#[error("Circuit breaker OPEN: Service unavailable")]
pub struct CircuitOpen {
    pub circuit: std::sync::Arc<str>,
    /// Whole seconds until a probe may go through (at least 1).
    pub retry_after: u64,
}

/// The route's upstream quota (`upstream_limit`) leaves no room within the
/// request's wait: the upstream was not called.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamQuota {
    /// `Upstream quota of 15 per minute reached`
    pub message: String,
    /// Whole seconds until there is room (at least 1).
    pub retry_after: u64,
}

/// On a response the rescue made: what went wrong, for the metrics.
#[derive(Debug, Clone)]
pub struct Rescued {
    pub kind: ErrorKind,
    pub message: String,
}

/// The bounded kinds of failure, for responses and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    RateLimited,
    ClientTimeout,
    ClientBody,
    BodyTooLarge,
    Overloaded,
    SpoolFull,
    CircuitOpen,
    UpstreamQuota,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamBadResponse,
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::ClientTimeout => "client_timeout",
            Self::ClientBody => "client_body",
            Self::BodyTooLarge => "body_too_large",
            Self::Overloaded => "overloaded",
            Self::SpoolFull => "spool_full",
            Self::CircuitOpen => "circuit_open",
            Self::UpstreamQuota => "upstream_quota",
            Self::UpstreamTimeout => "timeout",
            Self::UpstreamUnavailable => "connect_error",
            Self::UpstreamBadResponse => "bad_response",
            Self::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::ClientBody => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded | Self::SpoolFull | Self::CircuitOpen | Self::UpstreamQuota => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamUnavailable | Self::UpstreamBadResponse => StatusCode::BAD_GATEWAY,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The legacy `error` field of its answer.
    pub fn title(self) -> &'static str {
        match self {
            Self::RateLimited => "Rate limit exceeded",
            Self::ClientTimeout => "Request timeout",
            Self::ClientBody => "Bad request",
            Self::BodyTooLarge => "Payload too large",
            Self::Overloaded | Self::SpoolFull | Self::CircuitOpen | Self::UpstreamQuota => {
                "Service unavailable"
            }
            Self::UpstreamTimeout => "Gateway timeout",
            Self::UpstreamUnavailable | Self::UpstreamBadResponse => "Bad gateway",
            Self::Internal => "Internal server error",
        }
    }
}

/// Whether `err` or anything in its source chain is a `T`.
pub fn find_cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        cur = e.source();
    }
    None
}

/// The kind of an error from the stack. Body limits are looked for first: a
/// body that overflowed mid-upload surfaces as a client error wrapping it.
pub fn classify(err: &(dyn std::error::Error + 'static)) -> ErrorKind {
    if find_cause::<RateLimited>(err).is_some() {
        ErrorKind::RateLimited
    } else if find_cause::<ClientTimeout>(err).is_some()
        || find_cause::<ClientBodyStalled>(err).is_some()
    {
        ErrorKind::ClientTimeout
    } else if find_cause::<BodyTooLarge>(err).is_some()
        || find_cause::<http_body_util::LengthLimitError>(err).is_some()
    {
        ErrorKind::BodyTooLarge
    } else if find_cause::<SpoolFull>(err).is_some()
        || find_cause::<SpoolShare>(err).is_some()
        || find_cause::<SpoolIo>(err).is_some()
    {
        ErrorKind::SpoolFull
    } else if find_cause::<ClientBodyError>(err).is_some() {
        // Before the upstream kinds: the hyper client error that reports a
        // request body's failure wraps it.
        ErrorKind::ClientBody
    } else if find_cause::<tower::load_shed::error::Overloaded>(err).is_some() {
        ErrorKind::Overloaded
    } else if find_cause::<CircuitOpen>(err).is_some() {
        ErrorKind::CircuitOpen
    } else if find_cause::<UpstreamQuota>(err).is_some() {
        ErrorKind::UpstreamQuota
    } else if find_cause::<UpstreamTimeout>(err).is_some() {
        ErrorKind::UpstreamTimeout
    } else if find_cause::<UpstreamBadResponse>(err).is_some() {
        ErrorKind::UpstreamBadResponse
    } else if find_cause::<UpstreamUnavailable>(err).is_some() {
        ErrorKind::UpstreamUnavailable
    } else {
        ErrorKind::Internal
    }
}

/// A request over its limit (answered 429 with the legacy body).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RateLimited {
    /// `30 requests per minute limit reached`
    pub message: String,
    /// Whole seconds, at least 1.
    pub retry_after: u64,
    /// The rate-limit headers of the answer.
    pub headers: Option<RateHeaders>,
}

pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The rate-limit fields of one answer, written straight into its header
/// map (building a map of their own and merging it would hash and store
/// every field twice). On every answer of a limited route: the 429's, the
/// app's, and the sidecar's own errors (through [`Decorated`]).
#[derive(Debug, Clone)]
pub struct RateHeaders {
    pub limit: HeaderValue,
    pub remaining: u64,
    /// Unix time, seconds.
    pub reset_at: u64,
    pub policy: Option<HeaderValue>,
    /// `RateLimit`: `"name";r=…;t=…`.
    pub current: Option<HeaderValue>,
}

impl RateHeaders {
    pub fn write_to(&self, h: &mut HeaderMap) {
        h.reserve(5);
        h.insert(X_RATELIMIT_LIMIT, self.limit.clone());
        h.insert(X_RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        h.insert(X_RATELIMIT_RESET, HeaderValue::from(self.reset_at));
        if let Some(p) = &self.policy {
            h.insert(RATELIMIT_POLICY, p.clone());
        }
        if let Some(c) = &self.current {
            h.insert(RATELIMIT, c.clone());
        }
    }
}

/// An error with headers and response extensions for the answer it becomes,
/// added by a layer it passed through (the rate-limit fields, the cache's
/// `X-Cache`). Its message is its source's; the rescue applies every
/// `Decorated` in the chain, the outermost last.
#[derive(Debug)]
pub struct Decorated {
    pub source: BoxError,
    pub headers: HeaderMap,
    pub extensions: Extensions,
}

impl Decorated {
    /// `err` with nothing added yet (an already decorated error is reused).
    pub fn new(err: BoxError) -> Self {
        Self {
            source: err,
            headers: HeaderMap::new(),
            extensions: Extensions::new(),
        }
    }
}

impl std::fmt::Display for Decorated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

impl std::error::Error for Decorated {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// The legacy error types of an upstream attempt (PRODUCT.md "Retry and
/// circuit breaking").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    GeminiRateLimit,
    Upstream5xx,
    ConnectError,
    Timeout,
    /// An answer that is not valid HTTP/1.1 ([`UpstreamBadResponse`]).
    BadResponse,
}

impl Failure {
    pub const ALL: [Failure; 5] = [
        Self::GeminiRateLimit,
        Self::Upstream5xx,
        Self::ConnectError,
        Self::Timeout,
        Self::BadResponse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::GeminiRateLimit => "gemini_rate_limit",
            Self::Upstream5xx => "upstream_5xx",
            Self::ConnectError => "connect_error",
            Self::Timeout => "timeout",
            Self::BadResponse => "bad_response",
        }
    }

    /// The type of a failed exchange; `None` for errors that are not the
    /// upstream's (a client body that broke off or stalled, a body too large).
    pub fn of_error(err: &BoxError) -> Option<Self> {
        // A body error of the client's shows up inside a hyper client error
        // too: the typed causes are checked before the generic ones.
        match classify(err.as_ref()) {
            ErrorKind::BodyTooLarge
            | ErrorKind::ClientBody
            | ErrorKind::ClientTimeout
            | ErrorKind::SpoolFull => None,
            _ if find_cause::<UpstreamTimeout>(err.as_ref()).is_some() => Some(Self::Timeout),
            _ if find_cause::<UpstreamBadResponse>(err.as_ref()).is_some() => {
                Some(Self::BadResponse)
            }
            _ if find_cause::<UpstreamUnavailable>(err.as_ref()).is_some() => {
                Some(Self::ConnectError)
            }
            _ => None,
        }
    }

    /// Its position in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}
