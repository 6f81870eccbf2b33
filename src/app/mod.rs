//! The composition root: binds the listeners, builds the process-wide state
//! (the Redis client, the cache store, the limiters, the circuits, the
//! metrics, the readiness probe, the machine monitor), starts the background
//! tasks, assembles one proxy stack per worker and the admin router, and
//! hands them to the [`Server`]. The only module that knows every part;
//! nothing imports it but the binary and the tests. [`reload`] rebuilds the
//! stacks over the same parts when the configuration changes.

pub mod reload;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::admin::{Admin, AdminState, Endpoint};
use crate::config::Config;
use crate::layers::buffer::spool::SpoolBudget;
use crate::layers::cache::CacheLayer;
use crate::layers::cache::store::CacheStore;
use crate::layers::quota::QuotaLayer;
use crate::layers::rate_limit::RateLimitLayer;
use crate::layers::{Resilience, Shared, build_stack};
use crate::memory::MemoryBudget;
use crate::metrics::quota::QuotaStats;
use crate::metrics::redis::RedisErrors;
use crate::metrics::{Metrics, Sources};
use crate::proxy::ready::Readiness;
use crate::proxy::{Proxy, UpstreamClient};
use crate::redis::{RedisError, RedisStore};
use crate::route::RouteTable;
use crate::server::{Server, ServerError};
use crate::system::Monitor;
use crate::trace::{Exporting, TraceError, Tracing};

/// How long the last spans may take to reach the collector at shutdown.
const TRACE_FLUSH: Duration = Duration::from_secs(2);

/// How often the upstream is probed in the background (readiness, health,
/// metrics).
const READINESS_EVERY: Duration = Duration::from_secs(5);

/// How often the rate limiters forget clients whose limits have recovered.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("cache: {0}")]
    Cache(String),
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("tracing: {0}")]
    Trace(#[from] TraceError),
}

/// A bound, not yet running sidecar.
#[derive(Debug)]
pub struct App {
    server: Server,
    /// The span export, flushed after the drain.
    exporting: Option<Exporting>,
    reloader: reload::Reloader,
}

/// The headers in the cache key: the identity headers, then the vary ones.
fn keyed_headers(cfg: &Config) -> Vec<String> {
    cfg.cache
        .identity_headers
        .iter()
        .chain(&cfg.cache.vary_headers)
        .cloned()
        .collect()
}

impl App {
    /// Binds the listeners and builds everything.
    pub async fn bind(cfg: Config) -> Result<Self, AppError> {
        Self::bind_with(cfg, Vec::new()).await
    }

    /// Like [`Self::bind`], serving extra admin endpoints besides the built-in ones.
    pub async fn bind_with(cfg: Config, extra: Vec<Endpoint>) -> Result<Self, AppError> {
        let cfg = Arc::new(cfg);
        // First, so that a port in use fails before anything is started.
        let listeners = Server::bind(&cfg)?;

        let routes = RouteTable::new(&cfg);
        let inflight = Arc::new(tokio::sync::Semaphore::new(cfg.max_inflight));
        // One Redis client for the cache and the rate limiter.
        let redis_errors = Arc::new(RedisErrors::default());
        let redis = RedisStore::from_config(&cfg.redis, Arc::clone(&redis_errors))?;
        let cache = CacheStore::new(&cfg, redis.clone()).map_err(AppError::Cache)?;
        cache.follow_fleet();
        let memory = MemoryBudget::new(cfg.memory_budget);
        let cache_layer = CacheLayer::new(
            Arc::clone(&cache),
            &keyed_headers(&cfg),
            Arc::clone(&memory),
        );
        let quota_stats = QuotaStats::new(QuotaLayer::routes(&cfg));
        let quota = QuotaLayer::new(&cfg, redis.clone(), Arc::clone(&quota_stats));
        let rate_limit = RateLimitLayer::new(&cfg, redis.clone());
        let readiness = Arc::new(Readiness::new(
            UpstreamClient::new(&cfg),
            &cfg.readiness_path,
        ));
        readiness.spawn_periodic(READINESS_EVERY);
        let monitor = Arc::new(Monitor::default());
        monitor
            .start(std::env::current_dir().unwrap_or_else(|_| ".".into()))
            .await;
        let resilience = Resilience::new(&cfg);
        if let Some(redis) = redis {
            resilience.circuits.follow_fleet(redis);
        }
        let spool = SpoolBudget::new(cfg.spool_max_bytes);
        let spans = Arc::default();
        let (tracing, exporting) = Tracing::start(&cfg.tracing, Arc::clone(&spans))?;
        // The metrics read the limits and circuits in force, whatever the
        // reloads since.
        let rate_figures = Arc::new(arc_swap::ArcSwap::from_pointee(rate_limit.clone()));
        // The limits in force are swept, whatever the reloads since.
        let sweeper = Arc::clone(&rate_figures);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                sweeper.load().sweep();
            }
        });
        let circuit_figures = Arc::new(arc_swap::ArcSwap::new(Arc::clone(&resilience.circuits)));
        let metrics = Metrics::new(
            &cfg,
            Sources {
                cache: Arc::clone(&cache) as _,
                rate_limit: Arc::clone(&rate_figures) as _,
                failures: Arc::clone(&resilience.failures),
                retries: Arc::clone(&resilience.retries),
                circuits: Arc::clone(&circuit_figures) as _,
                system: Arc::clone(&monitor),
                probe: Arc::clone(&readiness) as _,
                spool: Arc::clone(&spool) as _,
                memory: Arc::clone(&memory),
                redis_errors,
                quota: quota_stats,
                spans,
                redis_configured: cfg.redis.url.is_some(),
            },
        );
        let shared = Shared {
            inflight,
            cache: cache_layer,
            rate_limit,
            quota,
            resilience,
            metrics: Arc::clone(&metrics),
            spool,
            memory,
            tracing,
        };
        // One stack per worker, each over its own upstream pool.
        let proxies: Vec<Proxy> = (0..listeners.workers())
            .map(|_| Proxy::new(UpstreamClient::new(&cfg), &cfg))
            .collect();
        let stacks = proxies
            .iter()
            .enumerate()
            .map(|(i, proxy)| build_stack(&cfg, routes.clone(), proxy.clone(), &shared, i))
            .collect();
        let state = Arc::new(AdminState {
            readiness,
            metrics,
            config: Arc::clone(&cfg),
            started: Instant::now(),
            cache,
            resilience: shared.resilience.clone(),
            system: monitor,
        });
        let mut endpoints = crate::admin::builtin_endpoints();
        endpoints.extend(extra);
        let admin = Admin::with_endpoints(state, endpoints);
        let server = Server::new(&cfg, listeners, stacks, admin);
        let (cells, admin) = server.reloadable();
        let reloader = reload::Reloader::new(reload::Parts {
            cfg,
            shared,
            proxies,
            cells,
            admin,
            rate_figures,
            circuit_figures,
        });
        Ok(Self {
            server,
            exporting,
            reloader,
        })
    }

    /// What applies a new configuration to this sidecar.
    pub fn reloader(&self) -> reload::Reloader {
        self.reloader.clone()
    }

    /// Where the proxy listens (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.server.local_addr()
    }

    /// Where the admin endpoints listen, when on their own port.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.admin_addr()
    }

    /// Serves until `shutdown` resolves, then drains (see [`crate::server`]).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.server.run(shutdown).await;
        if let Some(exporting) = self.exporting {
            // The SDK's shutdown blocks until the last batch is sent (or
            // the time is up): off the runtime's threads.
            let flushed = tokio::task::spawn_blocking(move || exporting.shutdown(TRACE_FLUSH));
            if flushed.await.is_err() {
                tracing::warn!("trace export: the final flush did not finish");
            }
        }
    }
}
