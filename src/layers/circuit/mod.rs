//! `Circuit`: one breaker per named circuit (built-ins `upstream`, `gemini`,
//! `embedding`, plus any a route names), per PRODUCT.md "Retry and circuit
//! breaking". A request on a route whose circuit is open fails at once with
//! [`CircuitOpen`] (503 with `Retry-After`, or a stale answer from the cache
//! layer above) and never reaches the upstream; otherwise the attempt's
//! verdict from [`super::classify`] below is recorded on its circuit.
//!
//! [`Circuits`] is the registry the admin endpoints read and reset; with
//! Redis, [`fleet`] makes each circuit one for the fleet.

pub mod breaker;
pub mod fleet;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use serde_json::{Value, json};

use self::breaker::{Admission, Breaker, Permit};
use crate::BoxError;
use crate::body::Body;
use crate::config::Config;
use crate::error::CircuitOpen;
use crate::error::Failure;
use crate::extensions::{BodySent, ClientAddr, ClientId, Deadline, QuotaLearning, UpstreamFailure};
use crate::metrics::resilience::{CircuitFigures, CircuitReading};
use crate::route::MatchedRoute;

/// Circuits every sidecar has, named or not by a route.
pub const BUILTIN: [&str; 3] = ["upstream", "gemini", "embedding"];

/// Every circuit, by name.
#[derive(Debug)]
pub struct Circuits {
    by_name: BTreeMap<Arc<str>, Arc<Breaker>>,
    enabled: bool,
    /// With Redis: the fleet's probe lease (shared by every worker's copy).
    fleet: Arc<OnceLock<Arc<fleet::FleetLink>>>,
}

impl Circuits {
    pub fn new(cfg: &Config) -> Arc<Self> {
        Self::built(cfg, |_| None)
    }

    /// The circuits of a reloaded configuration: one whose threshold and
    /// timeout are unchanged keeps its state (open stays open); a new or
    /// changed one starts closed. The fleet's link carries over.
    pub fn reloaded(&self, cfg: &Config) -> Arc<Self> {
        let cb = &cfg.circuit_breaker;
        let next = Self::built(cfg, |n| {
            self.by_name
                .get(n)
                .filter(|b| b.threshold() == cb.threshold.max(1) && b.open_for() == cb.timeout)
                .cloned()
        });
        if let Some(link) = self.fleet() {
            next.join_fleet(Arc::clone(link));
        }
        next
    }

    /// Every circuit `cfg` names (the built-ins, then the routes'), each
    /// `kept` or new.
    fn built(cfg: &Config, kept: impl Fn(&str) -> Option<Arc<Breaker>>) -> Arc<Self> {
        let cb = &cfg.circuit_breaker;
        let names = BUILTIN
            .iter()
            .copied()
            .chain(cfg.routes.iter().map(|r| r.circuit.as_str()));
        let by_name = names
            .map(|n| {
                let b = kept(n).unwrap_or_else(|| Breaker::new(n, cb.threshold, cb.timeout));
                (Arc::from(n), b)
            })
            .collect();
        Arc::new(Self {
            by_name,
            enabled: cb.enabled,
            fleet: Arc::default(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Breaker>> {
        self.by_name.get(name)
    }

    /// The same circuits through handles of one worker's own.
    pub fn for_worker(&self) -> Arc<Self> {
        Arc::new(Self {
            by_name: self
                .by_name
                .iter()
                .map(|(n, b)| (Arc::clone(n), b.handle()))
                .collect(),
            enabled: self.enabled,
            fleet: Arc::clone(&self.fleet),
        })
    }

    /// The breaker a request's route names, when circuits are on.
    pub fn for_request<B>(&self, req: &Request<B>) -> Option<&Arc<Breaker>> {
        self.for_route(req.extensions().get::<MatchedRoute>()?)
    }

    /// The breaker a route names, when circuits are on.
    pub fn for_route(&self, route: &crate::config::Route) -> Option<&Arc<Breaker>> {
        if !self.enabled {
            return None;
        }
        self.get(&route.circuit)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Breaker>> {
        self.by_name.values()
    }

    /// Closes every circuit.
    pub fn reset_all(&self) {
        for b in self.iter() {
            b.reset();
        }
        tracing::info!("all circuit breakers reset");
    }

    /// The legacy `/api/circuit-breakers` body: `{name: {state, ...}}`.
    pub fn to_json(&self) -> Value {
        let map = self
            .by_name
            .iter()
            .map(|(name, b)| {
                let s = b.snapshot();
                let v = json!({
                    "state": s.state.as_str(),
                    "failure_count": s.failure_count,
                    "failure_threshold": s.failure_threshold,
                    "last_failure_time": s.last_failure_time,
                    "time_until_retry": s.time_until_retry,
                });
                (name.to_string(), v)
            })
            .collect::<serde_json::Map<_, _>>();
        Value::Object(map)
    }
}

#[derive(Debug, Clone)]
pub struct CircuitLayer {
    circuits: Arc<Circuits>,
}

/// The breakers report their state and failures to the metrics.
impl CircuitFigures for Circuits {
    fn circuits(&self) -> Vec<CircuitReading> {
        self.iter()
            .map(|b| {
                let snap = b.snapshot();
                CircuitReading {
                    name: Arc::clone(b.name()),
                    state: snap.state,
                    consecutive_failures: snap.failure_count,
                }
            })
            .collect()
    }
}

/// The figures of the circuits in force, through every reload.
impl CircuitFigures for arc_swap::ArcSwap<Circuits> {
    fn circuits(&self) -> Vec<CircuitReading> {
        self.load().circuits()
    }
}

impl CircuitLayer {
    pub fn new(circuits: Arc<Circuits>) -> Self {
        Self { circuits }
    }
}

impl<S> tower::Layer<S> for CircuitLayer {
    type Service = Circuit<S>;

    fn layer(&self, inner: S) -> Circuit<S> {
        // `build_stack` runs once per worker: each gets its own handles.
        Circuit {
            inner,
            circuits: self.circuits.for_worker(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Circuit<S> {
    inner: S,
    circuits: Arc<Circuits>,
}

impl<S> tower::Service<Request<Body>> for Circuit<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(b) = self.circuits.for_request(&req) else {
            return ResponseFuture::Pass {
                fut: self.inner.call(req),
            };
        };
        let permit = match b.admit() {
            Admission::Permitted(p) => {
                let p = p.watching(req.extensions().get::<BodySent>().cloned());
                match req.extensions().get::<Deadline>() {
                    Some(d) => p.expires_at(d.at),
                    None => p,
                }
            }
            Admission::Rejected { retry_after } => {
                let err = CircuitOpen {
                    circuit: Arc::clone(b.name()),
                    retry_after: breaker::ceil_secs(retry_after).max(1),
                };
                return ResponseFuture::Open {
                    err: Some(Box::new(err)),
                };
            }
        };
        // Who asked, for a plain 500 (the rate limiter's key; the peer when
        // rate limiting is off).
        // (Copied now, hashed only for a plain 500: most calls never need it.)
        let client = match req.extensions().get::<ClientId>() {
            Some(id) => Asker::Id(*id),
            None => match req.extensions().get::<ClientAddr>() {
                Some(a) => Asker::Addr(a.0.ip()),
                None => Asker::Unknown,
            },
        };
        let learning = req.extensions().get::<QuotaLearning>().is_some();
        if permit.is_probe() {
            if let Some(fleet) = self.circuits.fleet() {
                // The lease for as long as the call may take.
                let hold = req
                    .extensions()
                    .get::<Deadline>()
                    .map_or(b.open_for(), |d| {
                        d.at.saturating_duration_since(tokio::time::Instant::now())
                    })
                    + std::time::Duration::from_secs(1);
                // The one call of HALF-OPEN, once the fleet's probe is this
                // sidecar's (boxed: rare). The call's future is not polled
                // before.
                let call = ResponseFuture::Call {
                    fut: self.inner.call(req),
                    permit: Some(permit),
                    client,
                    learning,
                };
                return ResponseFuture::Probe {
                    fut: fleet.probe(Arc::clone(b), call, hold),
                };
            }
        }
        // Built in place: the common path moves no future.
        ResponseFuture::Call {
            fut: self.inner.call(req),
            permit: Some(permit),
            client,
            learning,
        }
    }
}

/// Who made a call, as cheaply as it can be kept until the answer.
#[derive(Debug, Clone, Copy)]
pub enum Asker {
    /// The rate limiter's key, hashed.
    Id(ClientId),
    /// Rate limiting off: the peer.
    Addr(std::net::IpAddr),
    Unknown,
}

impl Asker {
    fn id(self) -> Option<u64> {
        match self {
            Self::Id(id) => Some(id.0),
            Self::Addr(ip) => Some(ClientId::of(&ip).0),
            Self::Unknown => None,
        }
    }
}

pin_project_lite::pin_project! {
    /// The call, and its permit to report on (no boxing: this is on every
    /// request's path).
    #[project = Proj]
    pub enum ResponseFuture<F> {
        Pass { #[pin] fut: F },
        Call { #[pin] fut: F, permit: Option<Permit>, client: Asker, learning: bool },
        Open { err: Option<BoxError> },
        Probe { fut: fleet::BoxAnswer },
    }
}

impl<F> ResponseFuture<F> {
    /// The call will not be made: its permit says nothing.
    fn forget(self: Pin<&mut Self>) {
        if let Proj::Call { permit, .. } = self.project() {
            if let Some(p) = permit.take() {
                p.forget();
            }
        }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Proj::Pass { fut } => fut.poll(cx),
            Proj::Call {
                fut,
                permit,
                client,
                learning,
            } => {
                let result = std::task::ready!(fut.poll(cx));
                if let Some(permit) = permit.take() {
                    match (&result, UpstreamFailure::of(&result)) {
                        // A plain 500: once per client in a run. 502, 503,
                        // 504, quota signals and connection failures count
                        // each time (Envoy's gateway errors versus 5xx).
                        (Ok(r), Some(Failure::Upstream5xx))
                            if r.status() == StatusCode::INTERNAL_SERVER_ERROR =>
                        {
                            permit.plain_500(client.id())
                        }
                        // A quota signal on a call made with no quota in
                        // force teaches the route its limit (the upstream
                        // quota's learned limit): no failure of the app's.
                        (_, Some(Failure::GeminiRateLimit)) if *learning => permit.forget(),
                        (_, Some(_)) => permit.failure(),
                        (Ok(_), None) => permit.success(),
                        // Not the upstream's doing (the client's body broke
                        // off...): counts as nothing.
                        (Err(_), None) => permit.forget(),
                    }
                }
                Poll::Ready(result)
            }
            Proj::Probe { fut } => fut.as_mut().poll(cx),
            Proj::Open { err } => Poll::Ready(Err(err
                .take()
                .unwrap_or_else(|| "circuit future polled after completion".into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::RouteTable;
    use http::StatusCode;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    use tower::{Layer, ServiceExt};

    #[tokio::test(start_paused = true)]
    async fn open_circuit_fails_fast_without_calling_and_one_probe_closes_it() {
        let mut cfg = Config::default();
        cfg.circuit_breaker.threshold = 2;
        cfg.circuit_breaker.timeout = Duration::from_secs(30);
        let table = RouteTable::new(&cfg);
        let circuits = Circuits::new(&cfg);
        let calls = Arc::new(AtomicU64::new(0));
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, h) = (Arc::clone(&calls), Arc::clone(&healthy));
        let upstream = tower::service_fn(move |_req: Request<Body>| {
            c.fetch_add(1, Ordering::SeqCst);
            let mut resp = Response::new(crate::body::empty());
            if !h.load(Ordering::SeqCst) {
                *resp.status_mut() = StatusCode::BAD_GATEWAY;
                resp.extensions_mut()
                    .insert(UpstreamFailure(crate::error::Failure::Upstream5xx));
            }
            async move { Ok::<_, BoxError>(resp) }
        });
        let svc = CircuitLayer::new(Arc::clone(&circuits)).layer(upstream);
        let req = || {
            let mut r = Request::new(crate::body::empty());
            r.extensions_mut()
                .insert(table.matched(&http::Method::POST, "/api/rag/query"));
            r
        };
        for _ in 0..2 {
            let resp = svc.clone().oneshot(req()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        }
        let err = svc.clone().oneshot(req()).await.unwrap_err();
        let open = err.downcast_ref::<CircuitOpen>().unwrap();
        assert_eq!((&*open.circuit, open.retry_after), ("gemini", 30));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Other circuits are untouched.
        let json = circuits.to_json();
        assert_eq!(json["gemini"]["state"], "open");
        assert_eq!(json["gemini"]["failure_count"], 2);
        assert_eq!(json["upstream"]["state"], "closed");

        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(circuits.to_json()["gemini"]["state"], "half_open");
        healthy.store(true, Ordering::SeqCst);
        let resp = svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(circuits.to_json()["gemini"]["state"], "closed");
    }

    #[test]
    fn registry_holds_builtins_and_route_circuits() {
        let mut cfg = Config::default();
        let mut extra = cfg.routes[0].clone();
        extra.name = "ocr".into();
        extra.circuit = "ocr-backend".into();
        cfg.routes.insert(0, extra);
        let json = Circuits::new(&cfg).to_json();
        let names: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert_eq!(names, ["embedding", "gemini", "ocr-backend", "upstream"]);
        assert_eq!(
            json["upstream"],
            json!({"state": "closed", "failure_count": 0, "failure_threshold": 5,
                   "last_failure_time": null, "time_until_retry": 0})
        );
    }
}
