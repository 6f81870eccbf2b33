//! Typed errors of the request path and the one rescue that turns each into
//! the legacy-style JSON answer (`{"error": ..., "message": ...}`).
//!
//! Layers return these inside a [`BoxError`]; [`rescue`] walks the source
//! chain (a hyper client error wraps the body error that caused it), picks the
//! most specific kind, and answers with its status. hyper never sees an `Err`,
//! which would drop the connection without a reply. [`ErrorKind::as_str`] is
//! the bounded label the metrics use.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::BoxError;
use crate::body::{self, Body};
use crate::layers::rate_limit::RateLimited;

/// The upstream could not be reached (connection refused, reset, DNS).
#[derive(Debug, thiserror::Error)]
#[error("upstream unreachable: {0}")]
pub struct UpstreamUnavailable(#[source] pub BoxError);

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

/// The request body is larger than allowed.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// The route's circuit is open: the upstream was not called.
#[derive(Debug, thiserror::Error)]
#[error("Circuit breaker OPEN: Service unavailable")]
pub struct CircuitOpen {
    pub circuit: std::sync::Arc<str>,
    /// Whole seconds until a probe may go through (at least 1).
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
    CircuitOpen,
    UpstreamTimeout,
    UpstreamUnavailable,
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
            Self::CircuitOpen => "circuit_open",
            Self::UpstreamTimeout => "timeout",
            Self::UpstreamUnavailable => "connect_error",
            Self::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::ClientBody => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded | Self::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::RateLimited => "Rate limit exceeded",
            Self::ClientTimeout => "Request timeout",
            Self::ClientBody => "Bad request",
            Self::BodyTooLarge => "Payload too large",
            Self::Overloaded | Self::CircuitOpen => "Service unavailable",
            Self::UpstreamTimeout => "Gateway timeout",
            Self::UpstreamUnavailable => "Bad gateway",
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
    } else if find_cause::<ClientTimeout>(err).is_some() {
        ErrorKind::ClientTimeout
    } else if find_cause::<BodyTooLarge>(err).is_some()
        || find_cause::<http_body_util::LengthLimitError>(err).is_some()
    {
        ErrorKind::BodyTooLarge
    } else if find_cause::<ClientBodyError>(err).is_some() {
        // Before the upstream kinds: the hyper client error that reports a
        // request body's failure wraps it.
        ErrorKind::ClientBody
    } else if find_cause::<tower::load_shed::error::Overloaded>(err).is_some() {
        ErrorKind::Overloaded
    } else if find_cause::<CircuitOpen>(err).is_some() {
        ErrorKind::CircuitOpen
    } else if find_cause::<UpstreamTimeout>(err).is_some() {
        ErrorKind::UpstreamTimeout
    } else if find_cause::<UpstreamUnavailable>(err).is_some() {
        ErrorKind::UpstreamUnavailable
    } else {
        ErrorKind::Internal
    }
}

/// The answer a layer's result stands for: the response, or the error's
/// rescue. For layers that must decorate the sidecar's own answers too.
pub fn rescued(result: Result<Response<Body>, BoxError>) -> Response<Body> {
    result.unwrap_or_else(|e| rescue(&e))
}

/// Turns an error from the stack into its JSON response, marked with a
/// [`Rescued`] extension.
pub fn rescue(err: &BoxError) -> Response<Body> {
    let kind = classify(err.as_ref());
    let mut resp = answer(err, kind);
    let message = match kind {
        ErrorKind::Internal => "Internal proxy error".to_string(),
        _ => capitalise(&err.to_string()),
    };
    resp.extensions_mut().insert(Rescued { kind, message });
    resp
}

fn answer(err: &BoxError, kind: ErrorKind) -> Response<Body> {
    if let Some(r) = find_cause::<RateLimited>(err.as_ref()) {
        // The legacy 429: its body, Retry-After and the rate-limit headers.
        let mut resp = body::json(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"error": "Rate limit exceeded", "message": r.message, "retry_after": r.retry_after}),
        );
        if let Some(h) = &r.headers {
            h.write_to(resp.headers_mut());
        }
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(r.retry_after));
        return resp;
    }
    if let Some(c) = find_cause::<CircuitOpen>(err.as_ref()) {
        // The legacy open-circuit answer, naming the circuit.
        let mut resp = body::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "Service unavailable", "message": c.to_string(),
                    "circuit": &*c.circuit, "retry_after": c.retry_after}),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(c.retry_after));
        return resp;
    }
    let message = match kind {
        ErrorKind::Overloaded => "Too many requests in flight; try again shortly".to_string(),
        ErrorKind::BodyTooLarge => match find_cause::<BodyTooLarge>(err.as_ref()) {
            Some(e) => capitalise(&e.to_string()),
            None => "Request body exceeds the configured limit".to_string(),
        },
        ErrorKind::Internal | ErrorKind::RateLimited => "Internal proxy error".to_string(),
        _ => capitalise(&err.to_string()),
    };
    let mut resp = body::json(
        kind.status(),
        &json!({"error": kind.title(), "message": message}),
    );
    if kind == ErrorKind::Overloaded {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The response for a panic caught in the stack (tower-http `CatchPanic`).
pub fn panic_response(
    _panic: Box<dyn std::any::Any + Send + 'static>,
) -> Response<http_body_util::Full<bytes::Bytes>> {
    let body = serde_json::to_vec(&json!({
        "error": "Internal server error",
        "message": "Internal proxy error",
    }))
    .unwrap_or_default();
    let mut resp = Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] BoxError);

    #[test]
    fn classification_walks_the_chain() {
        let nested: BoxError = Box::new(Wrapper(Box::new(BodyTooLarge(10))));
        assert_eq!(classify(nested.as_ref()), ErrorKind::BodyTooLarge);
        let t: BoxError = Box::new(Wrapper(Box::new(UpstreamTimeout(Duration::from_secs(3)))));
        assert_eq!(classify(t.as_ref()), ErrorKind::UpstreamTimeout);
        let o: BoxError = Box::new(tower::load_shed::error::Overloaded::new());
        assert_eq!(rescue(&o).status(), StatusCode::SERVICE_UNAVAILABLE);
        let other: BoxError = "boom".into();
        assert_eq!(rescue(&other).status(), StatusCode::INTERNAL_SERVER_ERROR);
        let u: BoxError = Box::new(UpstreamUnavailable("refused".into()));
        assert_eq!(rescue(&u).status(), StatusCode::BAD_GATEWAY);
    }
}
