//! Layer tests of the retry: scripted upstream answers under paused time,
//! through timeout → retry → circuit → classify.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "scripted test services record their calls under a plain lock"
)]
use super::*;
use crate::layers::circuit::{CircuitLayer, Circuits};
use crate::layers::classify::ClassifyLayer;
use crate::layers::timeout::RouteTimeoutLayer;
use crate::route::RouteTable;
use http::Method;
use http_body_util::BodyExt;
use std::collections::VecDeque;
use std::sync::Mutex;
use tower::ServiceBuilder;

/// A status, and a `Retry-After` value to send with it.
type Answer = (u16, Option<&'static str>);

/// A scripted upstream: answers with the queued statuses (then 200) and
/// records the body of every call.
#[derive(Clone, Default)]
struct Script {
    answers: Arc<Mutex<VecDeque<Answer>>>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
    /// Whether each call carried the route and the deadline.
    marked: Arc<Mutex<Vec<bool>>>,
}

impl Script {
    fn new(answers: &[Answer]) -> Self {
        let s = Self::default();
        s.answers.lock().unwrap().extend(answers.iter().copied());
        s
    }

    fn calls(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }
}

impl tower::Service<Request<Body>> for Script {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> BoxResponseFuture {
        let s = self.clone();
        let ext = req.extensions();
        let marked = ext.get::<MatchedRoute>().is_some() && ext.get::<Deadline>().is_some();
        s.marked.lock().unwrap().push(marked);
        Box::pin(async move {
            let got = req.into_body().collect().await?.to_bytes();
            s.bodies.lock().unwrap().push(got);
            let next = s.answers.lock().unwrap().pop_front();
            let (status, retry_after) = next.unwrap_or((200, None));
            let mut resp = Response::new(body::full("answer"));
            *resp.status_mut() = StatusCode::from_u16(status)?;
            if let Some(ra) = retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, http::HeaderValue::from_static(ra));
            }
            Ok(resp)
        })
    }
}

/// What `build_stack` gives the retry layer.
fn is_open(circuits: &Arc<Circuits>) -> CircuitIsOpen {
    let circuits = Arc::clone(circuits);
    CircuitIsOpen(Arc::new(move |r| {
        circuits.for_route(r).is_some_and(|b| b.is_open())
    }))
}

struct Rig {
    cfg: Config,
    script: Script,
}

impl Rig {
    fn new(answers: &[Answer]) -> Self {
        let mut cfg = Config::default();
        cfg.circuit_breaker.threshold = 100;
        Self {
            cfg,
            script: Script::new(answers),
        }
    }

    /// Sends one request through timeout → retry → circuit → classify.
    async fn send(&self, method: Method, path: &str, b: Body) -> (StatusCode, Duration) {
        let circuits = Circuits::new(&self.cfg);
        self.send_with(&circuits, &Arc::default(), method, path, b)
            .await
    }

    async fn send_with(
        &self,
        circuits: &Arc<Circuits>,
        stats: &Arc<RetryStats>,
        method: Method,
        path: &str,
        b: Body,
    ) -> (StatusCode, Duration) {
        let table = RouteTable::new(&self.cfg);
        let svc = ServiceBuilder::new()
            .layer(RouteTimeoutLayer::new(Duration::from_secs(30)))
            .layer(RetryLayer::new(
                &self.cfg,
                is_open(circuits),
                Arc::clone(stats),
                0,
                1,
            ))
            .layer(CircuitLayer::new(Arc::clone(circuits)))
            .layer(ClassifyLayer::new(
                self.cfg.retry.rate_limit_patterns.clone(),
                Arc::default(),
            ))
            .service(self.script.clone());
        let mut req = Request::new(b);
        *req.method_mut() = method.clone();
        req.extensions_mut().insert(table.matched(&method, path));
        let start = Instant::now();
        let resp = svc.oneshot(req).await.unwrap();
        (resp.status(), start.elapsed())
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[tokio::test(start_paused = true)]
async fn two_failures_then_success_with_jittered_doubling_waits() {
    let rig = Rig::new(&[(503, None), (502, None)]);
    let (status, took) = rig
        .send(Method::POST, "/api/search", body::full("{\"query\":\"q\"}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rig.script.calls(), 3);
    // 1 s then 2 s nominal, each jittered into [half, all].
    assert!(took >= secs(1.5) && took <= secs(3.0), "{took:?}");
    // Every attempt carried the whole body, the route and the deadline.
    let bodies = rig.script.bodies.lock().unwrap().clone();
    assert!(bodies.iter().all(|b| &b[..] == b"{\"query\":\"q\"}"));
    assert_eq!(*rig.script.marked.lock().unwrap(), [true, true, true]);
}

#[tokio::test(start_paused = true)]
async fn gives_up_after_max_retries_with_the_last_answer() {
    let rig = Rig::new(&[(500, None); 10]);
    let (status, took) = rig
        .send(Method::POST, "/api/rag/query", body::empty())
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(rig.script.calls(), 4);
    assert!(took >= secs(3.5) && took <= secs(7.0), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn honours_retry_after_and_returns_at_once_when_it_passes_the_deadline() {
    let rig = Rig::new(&[(429, Some("2"))]);
    let (status, took) = rig.send(Method::POST, "/api/search", body::empty()).await;
    assert_eq!(
        (status, took, rig.script.calls()),
        (StatusCode::OK, secs(2.0), 2)
    );

    // Retry-After 120 is capped at max_wait (10 s), which still passes
    // the 5 s route timeout: the 503 comes back at once, not a 504 later.
    let mut rig = Rig::new(&[(503, Some("120"))]);
    rig.cfg.routes[0].timeout = Duration::from_secs(5);
    let (status, took) = rig.send(Method::POST, "/api/search", body::empty()).await;
    assert_eq!(
        (status, took, rig.script.calls()),
        (StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn only_retryable_routes_and_statuses_are_retried() {
    for (method, path, calls) in [
        (Method::POST, "/api/upload", 1),
        (Method::DELETE, "/api/documents/a.pdf", 1),
        (Method::POST, "/api/other", 1), // default route: POST is not idempotent
        (Method::GET, "/api/other", 2),
        (Method::POST, "/api/embed", 2),
    ] {
        let rig = Rig::new(&[(503, None)]);
        rig.send(method.clone(), path, body::empty()).await;
        assert_eq!(rig.script.calls(), calls, "{method} {path}");
    }
    // 501 is a failure but not one a retry would fix.
    let rig = Rig::new(&[(501, None)]);
    let (status, _) = rig.send(Method::POST, "/api/search", body::empty()).await;
    assert_eq!(
        (status, rig.script.calls()),
        (StatusCode::NOT_IMPLEMENTED, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_replay_bound_goes_once_and_whole() {
    let mut rig = Rig::new(&[(503, None)]);
    rig.cfg.retry.max_replay_bytes = 1000;
    let big = Bytes::from(vec![b'x'; 5000]);
    // Streamed in chunks with no length: read past the bound, then sent on.
    let chunks = big
        .chunks(700)
        .map(Bytes::copy_from_slice)
        .collect::<Vec<_>>();
    let stream = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, BoxError>(http_body::Frame::data(c))),
    );
    let b = body::boxed(http_body_util::StreamBody::new(stream));
    let (status, _) = rig.send(Method::POST, "/api/search", b).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(rig.script.calls(), 1);
    assert_eq!(rig.script.bodies.lock().unwrap()[0], big);
}

#[tokio::test(start_paused = true)]
async fn retries_stop_once_the_circuit_opens() {
    let mut rig = Rig::new(&[(503, None); 10]);
    rig.cfg.circuit_breaker.threshold = 2;
    let circuits = Circuits::new(&rig.cfg);
    let (status, _) = rig
        .send_with(
            &circuits,
            &Arc::default(),
            Method::POST,
            "/api/search",
            body::empty(),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(rig.script.calls(), 2);
    assert!(circuits.get("upstream").unwrap().is_open());
}

#[test]
fn the_floor_is_split_over_the_workers_without_loss() {
    for (floor, workers) in [(10, 2), (1, 2), (7, 3), (0, 4), (5, 1)] {
        let parts: Vec<u32> = (0..workers)
            .map(|i| floor_share(floor, i, workers))
            .collect();
        assert_eq!(
            parts.iter().sum::<u32>(),
            floor,
            "{floor} over {workers}: {parts:?}"
        );
        assert!(parts.iter().max().unwrap() - parts.iter().min().unwrap() <= 1);
    }
}

#[tokio::test(start_paused = true)]
async fn an_empty_budget_allows_no_retry() {
    let mut rig = Rig::new(&[(503, None); 10]);
    rig.cfg.retry.budget_percent = 0.0;
    rig.cfg.retry.budget_min_per_second = 0;
    let stats = Arc::new(RetryStats::default());
    let circuits = Circuits::new(&rig.cfg);
    rig.send_with(
        &circuits,
        &stats,
        Method::POST,
        "/api/search",
        body::empty(),
    )
    .await;
    assert_eq!(rig.script.calls(), 1);
    assert_eq!(stats.budget_exhausted.load(Ordering::Relaxed), 1);
    assert_eq!(stats.retries.load(Ordering::Relaxed), 0);
}
