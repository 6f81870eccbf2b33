//! `Rescue`: the one edge where a typed error from the layers below becomes
//! its JSON answer ([`crate::error::rescue`]), so nothing above — and hyper
//! least of all — ever sees an `Err`. tower's `MapResult` cannot do this: it
//! needs `From<S::Error>` for the new error type, and `Infallible` has none.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;

use crate::BoxError;
use crate::body::Body;

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
                resp: Some(crate::error::rescue(&e)),
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
            Proj::Inner { fut } => {
                Poll::Ready(Ok(crate::error::rescued(std::task::ready!(fut.poll(cx)))))
            }
            Proj::Failed { resp } => Poll::Ready(Ok(resp.take().unwrap_or_else(|| {
                crate::body::json(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({}),
                )
            }))),
        }
    }
}
