//! Criterion bench of the rate limiter on the request path: one allowed
//! request through the layer (client key, GCRA check, the five headers),
//! memory mode. Target: under 1 µs.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{Method, Request, Response};
use rag_sidecar::body::{self, Body};
use rag_sidecar::config::{Config, rate};
use rag_sidecar::extensions::ClientAddr;
use rag_sidecar::layers::rate_limit::RateLimitLayer;
use rag_sidecar::route::RouteTable;
use tower::{Layer, Service};

fn allowed_request(c: &mut Criterion) {
    let mut cfg = Config::default();
    // High enough never to reject: the cost of an allowed request.
    cfg.rate_limit.default = rate::parse("1000000000 per second").unwrap_or_else(|e| panic!("{e}"));
    let table = RouteTable::new(&cfg);
    let layer = RateLimitLayer::new(&cfg, None);
    let inner = tower::service_fn(|_req: Request<Body>| async {
        Ok::<_, rag_sidecar::BoxError>(Response::new(body::empty()))
    });
    let mut svc = layer.layer(inner);
    let route = table.matched(&Method::GET, "/api/stats");
    let mut i: u32 = 0;
    c.bench_function("rate_limit/allowed_request", |b| {
        b.iter(|| {
            // A few thousand distinct clients, as behind a real front end.
            i = i.wrapping_add(1);
            let peer = SocketAddr::from(([10, 0, (i >> 8) as u8 & 0x0f, i as u8], 40000));
            let mut req = Request::new(body::empty());
            req.extensions_mut().insert(route.clone());
            req.extensions_mut().insert(ClientAddr(peer));
            let resp = svc.call(black_box(req)).now_or_never();
            black_box(resp)
        })
    });
}

criterion_group!(benches, allowed_request);
criterion_main!(benches);
