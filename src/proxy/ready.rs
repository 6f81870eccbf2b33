//! Readiness: the sidecar is ready when it is not draining and the upstream
//! answers a cheap request (`readiness_path`, default `GET /api/health`) with
//! a status below 500. The probe result is cached for a second so frequent
//! kubelet probes cost the app at most one request a second, and concurrent
//! probes share one upstream call. A background task also probes every few
//! seconds; the health endpoint and the metrics read that last result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, Request};
use serde_json::json;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::UpstreamClient;
use crate::body;
use crate::metrics::system::{ProbeFigures, ProbeReading};

const CACHE_FOR: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One probe of the upstream.
#[derive(Debug, Clone)]
pub struct Probe {
    pub at: Instant,
    /// When, in unix seconds.
    pub checked_unix: u64,
    pub reachable: bool,
    pub status: Option<u16>,
    pub latency: Duration,
    pub error: Option<String>,
}

impl Probe {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "reachable": self.reachable,
            "status": self.status,
            "latency_ms": (self.latency.as_secs_f64() * 1e6).round() / 1e3,
            "error": self.error,
            "last_checked": self.checked_unix,
        })
    }
}

/// The probe reports its last result to the metrics.
impl ProbeFigures for Readiness {
    fn last_probe(&self) -> Option<ProbeReading> {
        self.last().map(|p| ProbeReading {
            reachable: p.reachable,
            latency: p.latency,
        })
    }
}

#[derive(Debug)]
pub struct Readiness {
    client: UpstreamClient,
    path: http::uri::PathAndQuery,
    draining: AtomicBool,
    last: Mutex<Option<Probe>>,
    /// A copy of the last probe for readers that must not wait or probe.
    #[allow(
        clippy::disallowed_types,
        clippy::disallowed_methods,
        reason = "held for a copy of the last probe, never across an await: readers must not wait on a probe under way"
    )]
    latest: std::sync::Mutex<Option<Probe>>,
}

impl Readiness {
    pub fn new(client: UpstreamClient, path: &str) -> Self {
        Self {
            client,
            path: path
                .parse()
                .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/")),
            draining: AtomicBool::new(false),
            last: Mutex::new(None),
            #[allow(
                clippy::disallowed_types,
                clippy::disallowed_methods,
                reason = "see the field"
            )]
            latest: std::sync::Mutex::new(None),
        }
    }

    /// From now on `/readyz` answers 503.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The upstream's state, probed at most once per second.
    pub async fn upstream(&self) -> Probe {
        let mut last = self.last.lock().await;
        if let Some(p) = last.as_ref().filter(|p| p.at.elapsed() < CACHE_FOR) {
            return p.clone();
        }
        let before = last.as_ref().map(|p| p.reachable);
        let probe = self.probe().await;
        self.log_change(before, &probe);
        *last = Some(probe.clone());
        *self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(probe.clone());
        probe
    }

    /// The last probe, without probing (for the health endpoint).
    pub fn last(&self) -> Option<Probe> {
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Probes every `every` in the background, so that `/readyz`,
    /// `/api/health/detailed` and `/metrics` read a recent result even when
    /// nobody asks for readiness.
    pub fn spawn_periodic(self: &std::sync::Arc<Self>, every: Duration) {
        let me = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                me.upstream().await;
            }
        });
    }

    /// Says when the app stops or starts answering (the first probe counts
    /// as a change when it fails): a wrong `UPSTREAM_URL` shows in the log
    /// at start, not only as 502s.
    fn log_change(&self, before: Option<bool>, now: &Probe) {
        let upstream = self.client.upstream();
        match (before, now.reachable) {
            (None | Some(true), false) => tracing::warn!(
                %upstream,
                error = now.error.as_deref().unwrap_or("-"),
                status = now.status,
                "the app does not answer its readiness probe: proxied requests get 502 until it does (is UPSTREAM_URL / --upstream right?)"
            ),
            (Some(false), true) => tracing::info!(%upstream, "the app answers again"),
            _ => {}
        }
    }

    async fn probe(&self) -> Probe {
        let start = Instant::now();
        let mut req = Request::new(body::empty());
        *req.method_mut() = Method::GET;
        *req.uri_mut() = http::Uri::from(self.path.clone());
        let result = tokio::time::timeout(PROBE_TIMEOUT, self.client.send(req))
            .await
            .map_err(|_| format!("no answer within {}s", PROBE_TIMEOUT.as_secs()))
            .and_then(|r| r.map_err(|e| e.to_string()));
        let latency = start.elapsed();
        let checked_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match result {
            Ok(resp) => Probe {
                at: Instant::now(),
                checked_unix,
                reachable: resp.status().as_u16() < 500,
                status: Some(resp.status().as_u16()),
                latency,
                error: None,
            },
            Err(e) => Probe {
                at: Instant::now(),
                checked_unix,
                reachable: false,
                status: None,
                latency,
                error: Some(e),
            },
        }
    }
}
