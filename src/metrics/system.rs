//! The process and machine figures: host CPU, memory and disk (from
//! [`crate::system::Monitor`]), the health score, the upstream readiness
//! probe (reported through [`ProbeFigures`], which the probe implements),
//! the build information, and prometheus's process families with an exact
//! CPU counter.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Gauge, IntGauge, IntGaugeVec, Registry};

use super::{opts, reg};
use crate::system::{Monitor, Snapshot};

/// The last readiness probe of the upstream, as a reading.
#[derive(Debug, Clone, Copy)]
pub struct ProbeReading {
    /// The app answered below 500.
    pub reachable: bool,
    pub latency: Duration,
}

/// What the readiness probe reports.
pub trait ProbeFigures: Send + Sync + std::fmt::Debug {
    fn last_probe(&self) -> Option<ProbeReading>;
}

#[derive(Debug)]
pub struct SystemMetrics {
    monitor: Arc<Monitor>,
    probe: Arc<dyn ProbeFigures>,
    health_score: IntGauge,
    cpu: Gauge,
    memory_total: IntGauge,
    memory_available: IntGauge,
    disk_total: IntGauge,
    disk_free: IntGauge,
    upstream_up: IntGauge,
    upstream_probe: Gauge,
}

impl SystemMetrics {
    pub fn new(r: &Registry, monitor: Arc<Monitor>, probe: Arc<dyn ProbeFigures>) -> Self {
        let m = Self {
            monitor,
            probe,
            health_score: series!(
                r,
                IntGauge,
                opts("health_score", "The legacy health score (0-100)")
            ),
            cpu: series!(
                r,
                Gauge,
                opts("system_cpu_usage_ratio", "Host CPU use (0-1)")
            ),
            memory_total: series!(
                r,
                IntGauge,
                opts(
                    "system_memory_total_bytes",
                    "Memory of the host, or the cgroup limit when one is set"
                )
            ),
            memory_available: series!(
                r,
                IntGauge,
                opts(
                    "system_memory_available_bytes",
                    "Memory available (under the cgroup limit when one is set)"
                )
            ),
            disk_total: series!(
                r,
                IntGauge,
                opts(
                    "system_disk_total_bytes",
                    "Size of the filesystem holding the working directory"
                )
            ),
            disk_free: series!(
                r,
                IntGauge,
                opts("system_disk_free_bytes", "Free space on that filesystem")
            ),
            upstream_up: series!(
                r,
                IntGauge,
                opts(
                    "upstream_up",
                    "1 when the last readiness probe of the app answered below 500"
                )
            ),
            upstream_probe: series!(
                r,
                Gauge,
                opts(
                    "upstream_probe_duration_seconds",
                    "Duration of the last readiness probe of the app"
                )
            ),
        };
        let build = series!(
            r,
            IntGaugeVec,
            opts("build_info", "Build information; always 1"),
            &["version"]
        );
        if let Ok(g) = build.get_metric_with_label_values(&[env!("CARGO_PKG_VERSION")]) {
            g.set(1);
        }
        #[cfg(target_os = "linux")]
        {
            let pc = super::process::ProcessMetrics::new(
                i32::try_from(std::process::id()).unwrap_or(0),
                "rag_sidecar",
            );
            if let Err(e) = r.register(Box::new(pc)) {
                tracing::error!("process metrics: {e}");
            }
        }
        m
    }

    /// The latest machine sample, if one was taken.
    pub fn latest(&self) -> Option<Snapshot> {
        self.monitor.latest()
    }

    pub fn sync(&self, health_score: i32) {
        self.health_score.set(i64::from(health_score));
        if let Some(s) = self.monitor.latest() {
            self.cpu.set(s.cpu_percent / 100.0);
            self.memory_total
                .set(i64::try_from(s.memory.total).unwrap_or(i64::MAX));
            self.memory_available
                .set(i64::try_from(s.memory.available).unwrap_or(i64::MAX));
            if let Some(d) = &s.disk {
                self.disk_total
                    .set(i64::try_from(d.total).unwrap_or(i64::MAX));
                self.disk_free
                    .set(i64::try_from(d.free).unwrap_or(i64::MAX));
            }
        }
        if let Some(probe) = self.probe.last_probe() {
            self.upstream_up.set(i64::from(probe.reachable));
            self.upstream_probe.set(probe.latency.as_secs_f64());
        }
    }
}
