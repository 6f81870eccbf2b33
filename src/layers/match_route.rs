//! `MatchRoute`: matches the request against the route table once and
//! inserts the [`MatchedRoute`] extension every later layer reads.

use std::task::{Context, Poll};

use http::Request;

use crate::route::RouteTable;

#[derive(Debug, Clone)]
pub struct MatchRouteLayer {
    table: RouteTable,
}

impl MatchRouteLayer {
    pub fn new(table: RouteTable) -> Self {
        Self { table }
    }
}

impl<S> tower::Layer<S> for MatchRouteLayer {
    type Service = MatchRoute<S>;

    fn layer(&self, inner: S) -> MatchRoute<S> {
        MatchRoute {
            inner,
            table: self.table.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MatchRoute<S> {
    inner: S,
    table: RouteTable,
}

impl<S, B> tower::Service<Request<B>> for MatchRoute<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let matched = self.table.matched(req.method(), req.uri().path());
        req.extensions_mut().insert(matched);
        self.inner.call(req)
    }
}
