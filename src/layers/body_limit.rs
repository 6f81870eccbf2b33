//! `BodyLimit`: request bodies above the route's limit (or the global
//! `max_request_body`) are refused with 413. A declared `Content-Length` over
//! the limit is refused before anything is forwarded; a chunked body is
//! wrapped in `http_body_util::Limited`, whose error, raised mid-stream while
//! the proxy forwards it, the rescue recognises and answers 413 too. Nothing
//! is buffered here.

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, header};
use http_body_util::Limited;

use crate::BoxError;
use crate::body::{self, Body};
use crate::error::BodyTooLarge;
use crate::route::MatchedRoute;

#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    default_limit: u64,
}

impl BodyLimitLayer {
    pub fn new(default_limit: u64) -> Self {
        Self { default_limit }
    }
}

impl<S> tower::Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> BodyLimit<S> {
        BodyLimit {
            inner,
            default_limit: self.default_limit,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    default_limit: u64,
}

impl<S, R> tower::Service<Request<Body>> for BodyLimit<S>
where
    S: tower::Service<Request<Body>, Response = R, Error = BoxError>,
{
    type Response = R;
    type Error = BoxError;
    type Future = Either<Ready<Result<R, BoxError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let limit = req
            .extensions()
            .get::<MatchedRoute>()
            .and_then(|r| r.max_request_body)
            .unwrap_or(self.default_limit);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Either::Left(ready(Err(Box::new(BodyTooLarge(limit)))));
        }
        let req = if declared.is_some() {
            // hyper already enforces the declared length exactly.
            req
        } else {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            req.map(|b| body::boxed(Limited::new(b, limit)))
        };
        Either::Right(self.inner.call(req))
    }
}
