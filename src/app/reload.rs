//! Reload without a restart (PRODUCT.md "Running it"): what starts one
//! (SIGHUP, a change of the config file's content) and what it does.
//!
//! A reload reads every source again ([`crate::config::Config::load`], as
//! at start). An invalid configuration is refused whole: the old one stays,
//! each error is logged as `check-config` prints it. A valid one keeps the
//! settings only a restart can apply (each one it changed is logged as
//! such, see [`crate::config::RESTART_ONLY`]), then a new stack is built
//! for every worker over the same process state (the cache's entries, the
//! limiters and circuits of unchanged routes, the metrics, the upstream
//! pools) and put in force at once: the next request on every connection
//! takes it, the requests in flight finish on theirs, no connection is
//! touched. The admin endpoints' state (the admin token among it) and the
//! log level change with it. `rag_sidecar_config_reloads_total{result}`
//! counts both outcomes.
//!
//! The file is watched by reading it every [`WATCH_EVERY`] and comparing
//! its content: a Kubernetes ConfigMap volume replaces the file by
//! swapping a `..data` symlink, which an inotify watch on the file would
//! not see (it watches the old inode, which is never written), and which
//! reading the path always follows. A read of a few KiB a second is the
//! whole cost.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::{Admin, AdminState};
use crate::config::{Config, ConfigErrors};
use crate::layers::circuit::Circuits;
use crate::layers::rate_limit::RateLimitLayer;
use crate::layers::{Resilience, Shared, build_stack};
use crate::proxy::Proxy;
use crate::route::RouteTable;
use crate::server::StackCell;

/// How often the config file is read to see whether it changed.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// What a reload rebuilds from, and what it replaces.
#[derive(Debug)]
pub(super) struct Parts {
    pub(super) cfg: Arc<Config>,
    pub(super) shared: Shared,
    /// Each worker's proxy (its upstream pool), kept through reloads.
    pub(super) proxies: Vec<Proxy>,
    pub(super) cells: Vec<Arc<StackCell>>,
    pub(super) admin: Admin,
    /// What the metrics read the limits' and circuits' figures through.
    pub(super) rate_figures: Arc<arc_swap::ArcSwap<RateLimitLayer>>,
    pub(super) circuit_figures: Arc<arc_swap::ArcSwap<Circuits>>,
}

/// Applies reloads, one at a time.
#[derive(Debug, Clone)]
pub struct Reloader {
    parts: Arc<tokio::sync::Mutex<Parts>>,
}

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// In force; these settings changed but need a restart (kept).
    Applied { needs_restart: Vec<&'static str> },
    /// Refused whole: the old configuration stays.
    Refused,
}

impl Reloader {
    pub(super) fn new(parts: Parts) -> Self {
        Self {
            parts: Arc::new(tokio::sync::Mutex::new(parts)),
        }
    }

    /// Puts `loaded` in force, or refuses it (see the module doc).
    pub async fn reload(&self, loaded: Result<Config, ConfigErrors>, why: &str) -> Reloaded {
        let mut parts = self.parts.lock().await;
        let metrics = Arc::clone(&parts.shared.metrics);
        let next = match loaded {
            Ok(next) => next,
            Err(errors) => {
                for line in errors.to_string().lines() {
                    tracing::error!("config reload refused: {line}");
                }
                tracing::error!(
                    trigger = why,
                    "config reload refused: the running configuration stays"
                );
                metrics.reloaded("refused");
                return Reloaded::Refused;
            }
        };
        let (next, restart) = parts.cfg.for_reload(next);
        for r in &restart {
            tracing::warn!(
                key = r.key,
                running = %r.running,
                wanted = %r.wanted,
                "config reload: {} needs a restart; keeping {}",
                r.key,
                r.running
            );
        }
        if let Err(e) = crate::logging::set_level(&next.log.level) {
            tracing::warn!("config reload: log.level: {e}; keeping the running level");
        }
        let next = Arc::new(next);
        for what in parts.shared.cache.store().retune(&next) {
            tracing::warn!(
                "config reload: {what} needs a restart; the running memory layer is kept (a new namespace's route is not cached until then)"
            );
        }
        apply(&mut parts, next);
        metrics.reloaded("applied");
        tracing::info!(
            trigger = why,
            needs_restart = restart.len(),
            "config reloaded: new requests use it; requests in flight finish on the old one"
        );
        Reloaded::Applied {
            needs_restart: restart.iter().map(|r| r.key).collect(),
        }
    }
}

/// Builds the new stacks over the kept state and puts them in force.
fn apply(parts: &mut Parts, cfg: Arc<Config>) {
    let old = &parts.shared;
    let circuits = old.resilience.circuits.reloaded(&cfg);
    let resilience = Resilience {
        circuits: Arc::clone(&circuits),
        failures: Arc::clone(&old.resilience.failures),
        retries: Arc::clone(&old.resilience.retries),
    };
    let rate_limit = old.rate_limit.reloaded(&cfg);
    let shared = Shared {
        inflight: Arc::clone(&old.inflight),
        cache: old.cache.reloaded(&super::keyed_headers(&cfg)),
        rate_limit: rate_limit.clone(),
        quota: old.quota.reloaded(&cfg),
        resilience,
        metrics: Arc::clone(&old.metrics),
        spool: Arc::clone(&old.spool),
        memory: Arc::clone(&old.memory),
        tracing: old.tracing.clone(),
    };
    let routes = RouteTable::new(&cfg);
    parts.proxies = parts.proxies.iter().map(|p| p.reconfigured(&cfg)).collect();
    for (i, (cell, proxy)) in parts.cells.iter().zip(&parts.proxies).enumerate() {
        cell.replace(build_stack(&cfg, routes.clone(), proxy.clone(), &shared, i));
    }
    let state = parts.admin.state();
    parts.admin.replace(Arc::new(AdminState {
        config: Arc::clone(&cfg),
        readiness: Arc::clone(&state.readiness),
        metrics: Arc::clone(&state.metrics),
        started: state.started,
        cache: Arc::clone(&state.cache),
        resilience: shared.resilience.clone(),
        system: Arc::clone(&state.system),
    }));
    parts.rate_figures.store(Arc::new(rate_limit));
    parts.circuit_figures.store(circuits);
    parts.shared = shared;
    parts.cfg = cfg;
}

/// Reloads on SIGHUP and whenever the config file's content changes from
/// what was loaded (`file`: its path and the content loaded), with the
/// configuration `load` reads, until the process ends.
pub async fn watch(
    reloader: Reloader,
    file: Option<(PathBuf, Option<Vec<u8>>)>,
    load: impl Fn() -> Result<Config, ConfigErrors>,
) {
    let mut hup = hangups();
    let (file, mut last) = match file {
        Some((path, loaded)) => (Some(path), loaded),
        None => (None, None),
    };
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            () = next_hangup(&mut hup) => "SIGHUP",
            _ = tick.tick() => {
                let Some(path) = &file else { continue };
                // Unreadable for a moment (a swap in progress): next tick.
                let Ok(now) = std::fs::read(path) else { continue };
                if last.as_deref() == Some(now.as_slice()) {
                    continue;
                }
                last = Some(now);
                "the config file changed"
            }
        };
        tracing::info!(trigger = why, "reloading the configuration");
        // The file as it is before this reload reads it: a change made
        // while it loads is seen at the next tick.
        if let Some(now) = file.as_ref().and_then(|p| std::fs::read(p).ok()) {
            last = Some(now);
        }
        reloader.reload(load(), why).await;
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

#[cfg(unix)]
fn hangups() -> Hangups {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP ({e}): reload by changing the config file");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangups() -> Hangups {}

#[cfg(unix)]
async fn next_hangup(h: &mut Hangups) {
    match h {
        Some(s) => {
            if s.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangups) {
    std::future::pending::<()>().await;
}
