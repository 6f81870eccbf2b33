//! Criterion benches of the metrics: recording one finished request on a
//! worker's shard (the hot path), and one scrape of `/metrics` (bringing the
//! registry up to date and encoding it) with 10 routes and 3 circuits, after
//! traffic on every route. Target for the scrape: under 1 ms.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rag_sidecar::config::{Config, PathMatch, Route};
use rag_sidecar::extensions::CacheOutcome;
use rag_sidecar::layers::Resilience;
use rag_sidecar::layers::buffer::spool::SpoolBudget;
use rag_sidecar::layers::cache::store::CacheStore;
use rag_sidecar::layers::rate_limit::RateLimitLayer;
use rag_sidecar::metrics::{Finished, Metrics, Sources};
use rag_sidecar::proxy::UpstreamClient;
use rag_sidecar::proxy::ready::Readiness;
use rag_sidecar::system::Monitor;

fn setup() -> (tokio::runtime::Runtime, Arc<Metrics>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let _in = rt.enter();
    let mut cfg = Config::default();
    // The 6 built-in routes plus 4 more: 10 routes; circuits: the 3 built-ins.
    for i in 0..4 {
        let route = Route::plain(
            &format!("extra-{i}"),
            PathMatch::Exact(format!("/api/extra/{i}")),
        );
        cfg.routes.insert(0, route);
    }
    cfg.threads = 2;
    let cache = CacheStore::new(&cfg, None).unwrap_or_else(|e| panic!("{e}"));
    let resilience = Resilience::new(&cfg);
    let sources = Sources {
        cache,
        rate_limit: Arc::new(RateLimitLayer::new(&cfg, None)),
        failures: resilience.failures,
        retries: resilience.retries,
        circuits: resilience.circuits,
        system: Arc::new(Monitor::default()),
        probe: Arc::new(Readiness::new(UpstreamClient::new(&cfg), "/api/health")),
        spool: SpoolBudget::new(cfg.spool_max_bytes),
        memory: rag_sidecar::memory::MemoryBudget::new(cfg.memory_budget),
        redis_errors: Default::default(),
        quota: rag_sidecar::metrics::quota::QuotaStats::new([]),
        spans: std::sync::Arc::default(),
        redis_configured: false,
    };
    let metrics = Metrics::new(&cfg, sources);
    (rt, metrics)
}

fn request(route: usize, status: u16) -> Finished<'static> {
    Finished {
        route: Some(route),
        method: (route % 2),
        status,
        at: tokio::time::Instant::now(),
        elapsed: Duration::from_micros(300 + route as u64 * 100),
        cache: Some(CacheOutcome::Miss),
        own_error: None,
        upstream_failure: None,
        request_id: None,
    }
}

fn record(c: &mut Criterion) {
    let (_rt, metrics) = setup();
    let rec = metrics.recorder(0);
    c.bench_function("metrics/record_request", |b| {
        b.iter(|| {
            rec.started();
            rec.finished(black_box(&request(3, 200)));
        })
    });
}

fn scrape(c: &mut Criterion) {
    let (_rt, metrics) = setup();
    for worker in 0..2 {
        let rec = metrics.recorder(worker);
        for route in 0..10 {
            for status in [200, 201, 304, 404, 429, 500, 503] {
                for _ in 0..20 {
                    rec.started();
                    rec.finished(&request(route, status));
                    rec.upstream(route, Duration::from_micros(250));
                }
            }
        }
    }
    let text = metrics.render().unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "/metrics: {} lines, {} bytes",
        text.lines().count(),
        text.len()
    );
    c.bench_function("metrics/scrape_10_routes_3_circuits", |b| {
        b.iter(|| black_box(metrics.render()))
    });
    c.bench_function("metrics/legacy_json", |b| {
        b.iter(|| black_box(metrics.to_json()))
    });
}

criterion_group!(benches, record, scrape);
criterion_main!(benches);
