#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test's record of the order requests arrive: a plain lock, held for a push or a copy"
)]

use std::sync::Mutex;

use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::body;
use crate::config::rate;

#[test]
fn reservation_table() {
    // 2 per 2 s: an interval of 1 s, a burst of 2.
    let mut tat = 0;
    let r = |tat: &mut u64, now, max_wait| reserve(tat, now, 1_000, 2, max_wait);
    assert_eq!(r(&mut tat, 10_000, 0), Ok(0));
    assert_eq!(r(&mut tat, 10_000, 0), Ok(0));
    // The burst is spent: the third waits a second, or is refused.
    assert_eq!(r(&mut tat, 10_000, 999), Err(1_000));
    assert_eq!(r(&mut tat, 10_000, 5_000), Ok(1_000));
    assert_eq!(r(&mut tat, 10_000, 5_000), Ok(2_000));
    // A refusal reserves nothing.
    assert_eq!(tat, 14_000);
    assert_eq!(r(&mut tat, 10_000, 1_000), Err(3_000));
    assert_eq!(tat, 14_000);
    // Idle long enough, the whole burst is back.
    assert_eq!(r(&mut tat, 60_000, 0), Ok(0));
    assert_eq!(r(&mut tat, 60_000, 0), Ok(0));
    assert_eq!(r(&mut tat, 60_000, 0), Err(1_000));
}

#[test]
fn messages_name_the_limit() {
    let d = |s: &str| describe(rate::parse(s).unwrap().limits()[0]);
    assert_eq!(d("15 per minute"), "15 per minute");
    assert_eq!(d("15/minute"), "15 per minute");
    assert_eq!(d("100 per 2 hours"), "100 per 2 hours");
}

fn config(limit: &str, queue: Duration) -> Config {
    let mut cfg = Config::default();
    let rag = cfg.routes.iter_mut().find(|r| r.name == "rag").unwrap();
    rag.upstream_limit = Some(rate::parse(limit).unwrap());
    rag.upstream_queue = queue;
    cfg
}

type Svc = tower::util::BoxCloneService<Request<Body>, Response<Body>, BoxError>;
/// The ids of the requests that reached the app, and when.
type Seen = Arc<Mutex<Vec<(String, tokio::time::Instant)>>>;

/// The quota over a service that records the order requests reach it.
fn service(cfg: &Config) -> (Svc, Seen, Arc<QuotaStats>) {
    let stats = QuotaStats::new(QuotaLayer::routes(cfg));
    let layer = QuotaLayer::new(cfg, None, Arc::clone(&stats));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let inner = tower::service_fn(move |req: Request<Body>| {
        let s = Arc::clone(&s);
        async move {
            let id = req.headers()["x-id"].to_str().unwrap_or("").to_string();
            s.lock().unwrap().push((id, tokio::time::Instant::now()));
            Ok::<_, BoxError>(Response::new(body::empty()))
        }
    });
    (Svc::new(layer.layer(inner)), seen, stats)
}

fn request(cfg: &Config, id: usize) -> Request<Body> {
    let table = crate::route::RouteTable::new(cfg);
    let mut req = Request::post("/api/rag/query")
        .header("x-id", id.to_string())
        .body(body::empty())
        .unwrap();
    let m = table.matched(&http::Method::POST, "/api/rag/query");
    req.extensions_mut().insert(m);
    req
}

#[tokio::test(start_paused = true)]
async fn requests_over_the_budget_wait_their_turn_in_order_or_are_refused_at_once() {
    // 1 per second, wait at most 2.5 s: of six at once, the first goes now,
    // the next two after 1 and 2 s, in arrival order; the rest are refused
    // at once.
    let cfg = config("1 per second", Duration::from_millis(2_500));
    let (svc, seen, stats) = service(&cfg);
    let start = tokio::time::Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let mut svc = svc.clone();
            let req = request(&cfg, i);
            tokio::spawn(async move {
                let r = svc.ready().await?.call(req).await;
                r.map(|_| tokio::time::Instant::now())
            })
        })
        .collect();
    let mut refused = Vec::new();
    for (i, c) in calls.into_iter().enumerate() {
        match c.await.unwrap() {
            Ok(_) => {}
            Err(e) => {
                let q = e.downcast_ref::<UpstreamQuota>().unwrap();
                assert_eq!(q.message, "Upstream quota of 1 per second reached");
                assert!((3..=4).contains(&q.retry_after), "{}", q.retry_after);
                refused.push(i);
            }
        }
    }
    assert_eq!(refused, [3, 4, 5]);
    let seen = seen.lock().unwrap().clone();
    let order: Vec<&str> = seen.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(order, ["0", "1", "2"]);
    let at: Vec<u128> = seen.iter().map(|(_, t)| (*t - start).as_millis()).collect();
    assert_eq!(at, [0, 1_000, 2_000]);
    let route = stats.route("rag").unwrap();
    assert_eq!(route.rejected.load(Ordering::Relaxed), 3);
    assert_eq!(route.waiting.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn the_wait_never_passes_the_deadline_and_a_client_that_leaves_frees_its_place() {
    let cfg = config("1 per second", Duration::from_secs(10));
    let (mut svc, _seen, stats) = service(&cfg);
    // The budget's one request now.
    svc.ready()
        .await
        .unwrap()
        .call(request(&cfg, 0))
        .await
        .unwrap();
    // A deadline 500 ms away: the next slot (1 s) is past it.
    let mut req = request(&cfg, 1);
    req.extensions_mut().insert(Deadline {
        at: tokio::time::Instant::now() + Duration::from_millis(500),
        route_timeout: Duration::from_millis(500),
    });
    let e = svc.ready().await.unwrap().call(req).await.unwrap_err();
    assert!(e.downcast_ref::<UpstreamQuota>().is_some());
    // A waiting request whose client goes away leaves the queue.
    let mut waiter = Box::pin(svc.ready().await.unwrap().call(request(&cfg, 2)));
    assert!(futures_util::poll!(&mut waiter).is_pending());
    let route = stats.route("rag").unwrap();
    assert_eq!(route.waiting.load(Ordering::Relaxed), 1);
    drop(waiter);
    assert_eq!(route.waiting.load(Ordering::Relaxed), 0);
}
