//! The sidecar's own endpoints, answered before the proxy stack and never
//! proxied: `/healthz` and `/readyz` now, and the legacy observability and
//! reset endpoints as their concerns land. Each endpoint is a row of one
//! table (method, path, guarded?, handler); guarded rows pass through
//! [`guard::authorize`] first. With `admin_listen` set they are served on
//! that port only.

pub mod cache;
pub mod circuits;
pub mod guard;
pub mod observe;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::time::Instant;

use crate::body::{self, Body};
use crate::config::Config;
use crate::layers::Resilience;
use crate::layers::cache::store::CacheStore;
use crate::metrics::Metrics;
use crate::proxy::ready::Readiness;
use crate::system::Monitor;

/// What a handler gets: shared state, the caller and the request.
#[derive(Debug)]
pub struct Ctx {
    pub state: Arc<AdminState>,
    pub peer: SocketAddr,
    /// Its body is the connection's, stall-guarded (`client_body_timeout`)
    /// as a proxied request's is.
    pub req: Request<Body>,
}

pub type HandlerFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
pub type Handler = fn(Ctx) -> HandlerFuture;

/// One admin endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    /// Mutating endpoints: loopback or bearer token only.
    pub guarded: bool,
    pub handler: Handler,
}

/// State the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    pub config: Arc<Config>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    pub cache: Arc<CacheStore>,
    /// Circuits, retry and upstream-failure figures.
    pub resilience: Resilience,
    /// The machine's figures (`/api/system`).
    pub system: Arc<Monitor>,
}

/// The admin router.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Replaced by a reload ([`Admin::replace`]); every copy sees it.
    state: Arc<arc_swap::ArcSwap<AdminState>>,
    endpoints: Arc<[Endpoint]>,
}

impl Admin {
    pub fn new(state: Arc<AdminState>) -> Self {
        Self::with_endpoints(state, builtin_endpoints())
    }

    /// A router over these endpoints (tests add their own).
    pub fn with_endpoints(state: Arc<AdminState>, endpoints: Vec<Endpoint>) -> Self {
        Self {
            state: Arc::new(arc_swap::ArcSwap::new(state)),
            endpoints: endpoints.into(),
        }
    }

    /// The state in force.
    pub fn state(&self) -> Arc<AdminState> {
        self.state.load_full()
    }

    /// A reloaded configuration's state, for every request from now on
    /// (those in flight finish with theirs).
    pub fn replace(&self, state: Arc<AdminState>) {
        self.state.store(state);
    }

    /// Whether this path is one of the sidecar's own (any method). The path
    /// is percent-decoded first: `/api/cache/%63lear` is `/api/cache/clear`
    /// to the app behind us, so it is to us too.
    pub fn handles(&self, path: &str) -> bool {
        if !path.contains('%') {
            return self.endpoints.iter().any(|e| e.path == path);
        }
        let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
        self.endpoints.iter().any(|e| e.path == decoded)
    }

    /// Answers a request for one of [`Self::handles`]' paths; anything else
    /// gets a JSON 404 (on the admin port).
    pub fn call(&self, req: Request<Body>, peer: SocketAddr) -> HandlerFuture {
        let decoded = percent_encoding::percent_decode_str(req.uri().path())
            .decode_utf8_lossy()
            .into_owned();
        let path = decoded.as_str();
        let mut allowed = Vec::new();
        let mut found = None;
        for e in self.endpoints.iter().filter(|e| e.path == path) {
            if e.method == req.method() || (req.method() == Method::HEAD && e.method == Method::GET)
            {
                found = Some(e);
                break;
            }
            allowed.push(e.method.as_str());
        }
        let Some(endpoint) = found else {
            let resp = if allowed.is_empty() {
                body::json(
                    StatusCode::NOT_FOUND,
                    &json!({"error": "Not found", "message": format!("no admin endpoint at {path}")}),
                )
            } else {
                let mut r = body::json(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &json!({"error": "Method not allowed", "message": format!("{path} accepts {}", allowed.join(", "))}),
                );
                if let Ok(v) = http::HeaderValue::from_str(&allowed.join(", ")) {
                    r.headers_mut().insert(http::header::ALLOW, v);
                }
                r
            };
            return Box::pin(std::future::ready(resp));
        };
        let state = self.state();
        if endpoint.guarded {
            if let Err(e) = guard::authorize(
                peer.ip(),
                req.headers(),
                state.config.admin_token.as_deref(),
            ) {
                tracing::warn!(path = %crate::logging::escaped(path), client = %peer, "admin request refused: {e}");
                return Box::pin(std::future::ready(body::json(
                    StatusCode::FORBIDDEN,
                    &json!({"error": "Forbidden", "message": e.to_string()}),
                )));
            }
        }
        (endpoint.handler)(Ctx { state, peer, req })
    }
}

/// The endpoints every build serves.
pub fn builtin_endpoints() -> Vec<Endpoint> {
    vec![
        Endpoint {
            method: Method::GET,
            path: "/healthz",
            guarded: false,
            handler: |ctx| Box::pin(healthz(ctx)),
        },
        Endpoint {
            method: Method::GET,
            path: "/readyz",
            guarded: false,
            handler: |ctx| Box::pin(readyz(ctx)),
        },
        Endpoint {
            method: Method::GET,
            path: "/api/cache/stats",
            guarded: false,
            handler: |ctx| Box::pin(cache::stats(ctx)),
        },
        Endpoint {
            method: Method::POST,
            path: "/api/cache/clear",
            guarded: true,
            handler: |ctx| Box::pin(cache::clear(ctx)),
        },
        Endpoint {
            method: Method::GET,
            path: "/api/circuit-breakers",
            guarded: false,
            handler: |ctx| Box::pin(circuits::states(ctx)),
        },
        Endpoint {
            method: Method::POST,
            path: "/api/circuit-breakers/reset",
            guarded: true,
            handler: |ctx| Box::pin(circuits::reset(ctx)),
        },
        Endpoint {
            method: Method::GET,
            path: "/api/metrics",
            guarded: false,
            handler: |ctx| Box::pin(observe::metrics(ctx)),
        },
        Endpoint {
            method: Method::POST,
            path: "/api/metrics/reset",
            guarded: true,
            handler: |ctx| Box::pin(observe::reset(ctx)),
        },
        Endpoint {
            method: Method::GET,
            path: "/metrics",
            guarded: false,
            handler: |ctx| Box::pin(observe::prometheus(ctx)),
        },
        Endpoint {
            method: Method::GET,
            path: "/api/system",
            guarded: false,
            handler: |ctx| Box::pin(observe::system(ctx)),
        },
        Endpoint {
            method: Method::GET,
            path: "/api/health/detailed",
            guarded: false,
            handler: |ctx| Box::pin(observe::health_detailed(ctx)),
        },
    ]
}

/// Liveness: 200 while the process serves.
async fn healthz(ctx: Ctx) -> Response<Body> {
    body::json(
        StatusCode::OK,
        &json!({"status": "alive", "uptime_seconds": ctx.state.started.elapsed().as_secs()}),
    )
}

/// Readiness: 200 when the upstream answers and the sidecar is not draining.
async fn readyz(ctx: Ctx) -> Response<Body> {
    let r = &ctx.state.readiness;
    if r.is_draining() {
        return body::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "not_ready", "reason": "shutting down"}),
        );
    }
    if ctx.state.cache.redis_starting() {
        return body::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "not_ready", "reason": "Redis reachable, the fleet's invalidations not yet subscribed"}),
        );
    }
    let probe = r.upstream().await;
    if probe.reachable {
        body::json(
            StatusCode::OK,
            &json!({"status": "ready", "upstream": probe.to_json()}),
        )
    } else {
        body::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "not_ready", "reason": "upstream unreachable", "upstream": probe.to_json()}),
        )
    }
}
