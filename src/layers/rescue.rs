//! `Rescue`: the one place where a typed error from the layers below
//! ([`crate::error`]) becomes its legacy JSON answer ([`rescue`]), so nothing
//! above — and hyper least of all — ever sees an `Err`. tower's `MapResult`
//! cannot do this: it needs `From<S::Error>` for the new error type, and
//! `Infallible` has none. Headers and extensions that layers attached to an
//! error ([`Decorated`]) go onto its answer here. A panic below becomes a
//! 500 of the same shape ([`panic_response`], for tower-http's `CatchPanic`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::BoxError;
use crate::body::{self, Body};
use crate::error::{
    BodyTooLarge, CircuitOpen, Decorated, ErrorKind, RateLimited, Rescued, UpstreamQuota, classify,
    find_cause,
};

#[derive(Debug, Clone, Copy, Default)]
pub struct RescueLayer;

impl<S> tower::Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue {
            inner,
            not_ready: None,
        }
    }
}

#[derive(Debug)]
pub struct Rescue<S> {
    inner: S,
    /// An error from `poll_ready`, answered on the next `call`.
    not_ready: Option<BoxError>,
}

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            not_ready: None,
        }
    }
}

impl<S, Req> tower::Service<Req> for Rescue<S>
where
    S: tower::Service<Req, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.not_ready.is_none() {
            if let Err(e) = std::task::ready!(self.inner.poll_ready(cx)) {
                self.not_ready = Some(e);
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.not_ready.take() {
            Some(e) => ResponseFuture::Failed {
                resp: Some(rescue(&e)),
            },
            None => ResponseFuture::Inner {
                fut: self.inner.call(req),
            },
        }
    }
}

pin_project_lite::pin_project! {
    #[project = Proj]
    #[derive(Debug)]
    pub enum ResponseFuture<F> {
        Inner { #[pin] fut: F },
        Failed { resp: Option<Response<Body>> },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Inner { fut } => Poll::Ready(Ok(rescued(std::task::ready!(fut.poll(cx))))),
            Proj::Failed { resp } => Poll::Ready(Ok(resp.take().unwrap_or_else(|| {
                body::json(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({}),
                )
            }))),
        }
    }
}

/// The answer a layer's result stands for: the response, or the error's
/// rescue.
fn rescued(result: Result<Response<Body>, BoxError>) -> Response<Body> {
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
    decorate(err, &mut resp);
    resp
}

/// Applies the [`Decorated`] errors of the chain, innermost first, so that
/// an outer layer's fields win.
fn decorate(err: &BoxError, resp: &mut Response<Body>) {
    let mut found = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
    while let Some(e) = cur {
        if let Some(d) = e.downcast_ref::<Decorated>() {
            found.push(d);
        }
        cur = e.source();
    }
    for d in found.into_iter().rev() {
        for (name, value) in &d.headers {
            resp.headers_mut().insert(name, value.clone());
        }
        resp.extensions_mut().extend(d.extensions.clone());
    }
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
    if let Some(q) = find_cause::<UpstreamQuota>(err.as_ref()) {
        let mut resp = body::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": "Service unavailable", "message": q.message, "retry_after": q.retry_after}),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(q.retry_after));
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
    if matches!(kind, ErrorKind::Overloaded | ErrorKind::SpoolFull) {
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
    use std::time::Duration;

    use super::*;
    use crate::error::{UpstreamTimeout, UpstreamUnavailable};

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
