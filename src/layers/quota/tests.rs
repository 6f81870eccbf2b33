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
use crate::extensions::ClientId;

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

/// Six requests at once (each a client's), `ids` the order they are sent;
/// what each got, and when it reached the app (ms from the start).
async fn burst(svc: &Svc, reqs: Vec<Request<Body>>) -> Vec<Result<u128, UpstreamQuota>> {
    let start = tokio::time::Instant::now();
    let calls: Vec<_> = reqs
        .into_iter()
        .map(|req| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                let r = svc.ready().await?.call(req).await;
                r.map(|_| (tokio::time::Instant::now() - start).as_millis())
            })
        })
        .collect();
    let mut out = Vec::new();
    for c in calls {
        out.push(c.await.unwrap().map_err(|e| {
            let q = e.downcast_ref::<UpstreamQuota>().unwrap();
            UpstreamQuota {
                message: q.message.clone(),
                retry_after: q.retry_after,
            }
        }));
        // Each request is queued before the next is sent.
        tokio::task::yield_now().await;
    }
    out
}

fn from(cfg: &Config, id: usize, client: u64) -> Request<Body> {
    let mut req = request(cfg, id);
    req.extensions_mut().insert(ClientId(client));
    req
}

fn order(seen: &Seen) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(id, _)| id.clone())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn n_go_at_once_and_the_next_go_when_the_oldest_leave_the_window() {
    // 3 per second: three go now; the next two when the first calls have
    // been in the window a second (plus the guard), not one every 333 ms.
    let cfg = config("3 per second", Duration::from_secs(2));
    let (svc, seen, stats) = service(&cfg);
    let reqs = (0..5).map(|i| request(&cfg, i)).collect();
    let got = burst(&svc, reqs).await;
    let at: Vec<u128> = got.into_iter().map(Result::unwrap).collect();
    let guard = GUARD.as_millis();
    assert_eq!(at, [0, 0, 0, 1000 + guard, 1000 + guard]);
    assert_eq!(order(&seen), ["0", "1", "2", "3", "4"]);
    let route = stats.route("rag").unwrap();
    assert_eq!(route.waiting.load(Ordering::Relaxed), 0);
    // The last two went as the first three left: two in the window.
    assert_eq!(route.windows[0].2.load(Ordering::Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_go_within_its_wait_is_refused_at_once() {
    // 1 per second (a call counts 1.25 s with the guard), wait at most
    // 2.5 s: two calls free in that time, so of six at once the first goes,
    // the next two wait for them, and the rest are refused at once with the
    // wait as their Retry-After.
    let cfg = config("1 per second", Duration::from_millis(2_500));
    let (svc, seen, stats) = service(&cfg);
    let start = tokio::time::Instant::now();
    let got = burst(&svc, (0..6).map(|i| request(&cfg, i)).collect()).await;
    let refused: Vec<usize> = (0..6).filter(|i| got[*i].is_err()).collect();
    assert_eq!(refused, [3, 4, 5]);
    for r in &got[3..] {
        let q = r.as_ref().unwrap_err();
        assert_eq!(q.message, "Upstream quota of 1 per second reached");
        assert_eq!(q.retry_after, 3);
    }
    assert_eq!(order(&seen), ["0", "1", "2"]);
    let at: Vec<u128> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, t)| (*t - start).as_millis())
        .collect();
    let span = 1000 + GUARD.as_millis();
    assert_eq!(at, [0, span, 2 * span]);
    let route = stats.route("rag").unwrap();
    assert_eq!(route.rejected.load(Ordering::Relaxed), 3);
    assert_eq!(route.waiting.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn the_next_call_goes_to_the_client_with_the_fewest() {
    // Client 7 floods (five requests), client 9 asks once, last: it goes
    // with the first call that frees, before 7's waiting ones.
    let cfg = config("2 per second", Duration::from_secs(10));
    let (svc, seen, _stats) = service(&cfg);
    let mut reqs: Vec<_> = (0..5).map(|i| from(&cfg, i, 7)).collect();
    reqs.push(from(&cfg, 5, 9));
    let got = burst(&svc, reqs).await;
    assert!(got.iter().all(Result::is_ok));
    assert_eq!(order(&seen), ["0", "1", "5", "2", "3", "4"]);
}

#[tokio::test(start_paused = true)]
async fn a_request_with_a_stale_answer_at_hand_leaves_the_call_to_others() {
    let cfg = config("1 per second", Duration::from_secs(10));
    let (mut svc, seen, stats) = service(&cfg);
    // With room, it goes like any other.
    let mut req = request(&cfg, 0);
    req.extensions_mut().insert(StaleAtHand);
    svc.ready().await.unwrap().call(req).await.unwrap();
    // Without room it is refused at once, for the cache to answer.
    let t = tokio::time::Instant::now();
    let mut req = request(&cfg, 1);
    req.extensions_mut().insert(StaleAtHand);
    let e = svc.ready().await.unwrap().call(req).await.unwrap_err();
    assert!(e.downcast_ref::<UpstreamQuota>().is_some());
    assert_eq!(t.elapsed(), Duration::ZERO);
    let route = stats.route("rag").unwrap();
    assert_eq!(route.stale.load(Ordering::Relaxed), 1);
    assert_eq!(route.rejected.load(Ordering::Relaxed), 0);
    // Unless the route says otherwise: then it waits its turn.
    let mut cfg = cfg;
    cfg.routes
        .iter_mut()
        .find(|r| r.name == "rag")
        .unwrap()
        .upstream_queue_stale = false;
    let (mut svc, _, _) = service(&cfg);
    svc.ready()
        .await
        .unwrap()
        .call(request(&cfg, 2))
        .await
        .unwrap();
    let mut req = request(&cfg, 3);
    req.extensions_mut().insert(StaleAtHand);
    svc.ready().await.unwrap().call(req).await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert_eq!(order(&seen), ["0"]);
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_client_left_passes_its_turn_to_the_next() {
    let cfg = config("1 per second", Duration::from_secs(10));
    let (mut svc, seen, _stats) = service(&cfg);
    let start = tokio::time::Instant::now();
    svc.ready()
        .await
        .unwrap()
        .call(from(&cfg, 0, 1))
        .await
        .unwrap();
    // Client 2 is due next, client 3 after it; client 2 hangs up.
    let mut gone = Box::pin(svc.ready().await.unwrap().call(from(&cfg, 1, 2)));
    assert!(futures_util::poll!(&mut gone).is_pending());
    let next = tokio::spawn({
        let mut svc = svc.clone();
        let req = from(&cfg, 2, 3);
        async move { svc.ready().await?.call(req).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(gone);
    next.await.unwrap().unwrap();
    let seen = seen.lock().unwrap().clone();
    let ids: Vec<&str> = seen.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["0", "2"]);
    // At the first call that freed: the slot was not lost with client 2.
    assert_eq!((seen[1].1 - start).as_millis(), 1000 + GUARD.as_millis());
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
    // A deadline 500 ms away: the next call (1.25 s) is past it.
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
