//! The system monitor behind `/api/system`, the health score and the
//! `rag_sidecar_system_*` series: sysinfo, refreshed by a background task
//! every [`REFRESH`] (never on a request's path). The first reading is taken
//! at start, before the sidecar serves, so both endpoints answer from the
//! first request as the legacy app (psutil) did; CPU use is a difference of
//! two samples, so it reads 0.0 until the second, half a second later (as
//! psutil's first call does).
//!
//! What is reported: host CPU use; memory of the host, or of the container
//! when a cgroup memory limit is set (then `source` is `"cgroup"`: `total_mb`
//! is the limit and `available_mb` what is left under it); the filesystem
//! holding the working directory; and this process (CPU in percent of one
//! core, so up to 100 × cores; resident memory; threads; status).

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use serde_json::{Value, json};
use sysinfo::{
    CpuRefreshKind, Disks, MemoryRefreshKind, Pid, ProcessRefreshKind, ProcessesToUpdate, System,
};

/// How often the figures are refreshed.
pub const REFRESH: Duration = Duration::from_secs(5);
/// When the first figures are read.
const FIRST: Duration = Duration::from_millis(500);

/// One reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub cpu_percent: f64,
    pub memory: Memory,
    pub disk: Option<Disk>,
    pub process: Option<Process>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Memory {
    pub total: u64,
    pub available: u64,
    /// `"host"` or `"cgroup"`.
    pub source: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Disk {
    pub mount: PathBuf,
    pub total: u64,
    pub free: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Process {
    pub pid: u32,
    pub cpu_percent: f64,
    pub memory: u64,
    pub threads: usize,
    pub status: String,
}

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = MIB * 1024.0;

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        round1(part as f64 * 100.0 / whole as f64)
    }
}

impl Memory {
    /// The host's figures, or the cgroup's `(limit, free)` when a limit
    /// below the host's memory is set (a container with a memory limit).
    pub fn of(host_total: u64, host_available: u64, cgroup: Option<(u64, u64)>) -> Self {
        match cgroup {
            Some((limit, free)) if limit > 0 && limit < host_total => Self {
                total: limit,
                available: free,
                source: "cgroup",
            },
            _ => Self {
                total: host_total,
                available: host_available,
                source: "host",
            },
        }
    }

    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }

    pub fn percent(&self) -> f64 {
        percent(self.used(), self.total)
    }
}

impl Disk {
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.free)
    }

    pub fn percent(&self) -> f64 {
        percent(self.used(), self.total)
    }
}

impl Snapshot {
    /// The legacy `/api/system` body (plus `memory.source`, `disk.mount`).
    pub fn to_json(&self) -> Value {
        let m = &self.memory;
        json!({
            "cpu_percent": round1(self.cpu_percent),
            "memory": {
                "total_mb": (m.total as f64 / MIB).round(),
                "available_mb": (m.available as f64 / MIB).round(),
                "used_mb": (m.used() as f64 / MIB).round(),
                "percent": m.percent(),
                "source": m.source,
            },
            "disk": self.disk.as_ref().map(|d| json!({
                "total_gb": round1(d.total as f64 / GIB),
                "used_gb": round1(d.used() as f64 / GIB),
                "free_gb": round1(d.free as f64 / GIB),
                "percent": d.percent(),
                "mount": d.mount.display().to_string(),
            })),
            "process": self.process.as_ref().map(|p| json!({
                "pid": p.pid,
                "cpu_percent": round1(p.cpu_percent),
                "memory_mb": round1(p.memory as f64 / MIB),
                "threads": p.threads,
                "status": p.status,
            })),
        })
    }
}

/// The latest reading, shared with the admin endpoints.
#[derive(Debug, Default)]
pub struct Monitor {
    latest: RwLock<Option<Snapshot>>,
}

impl Monitor {
    pub fn latest(&self) -> Option<Snapshot> {
        self.latest
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn store(&self, s: Snapshot) {
        *self.latest.write().unwrap_or_else(PoisonError::into_inner) = Some(s);
    }

    /// Takes the first reading (awaited: the figures exist once this
    /// returns), then starts the refreshing task on the current runtime.
    /// Reads happen on the blocking pool (sysinfo reads /proc synchronously).
    pub async fn start(self: &Arc<Self>, workdir: PathBuf) {
        let dir = workdir.clone();
        let first = tokio::task::spawn_blocking(move || {
            Sampler::new().map(|mut s| {
                let snapshot = s.first_sample(&dir);
                (s, snapshot)
            })
        })
        .await;
        let mut sampler = match first {
            Ok(Ok((sampler, snapshot))) => {
                self.store(snapshot);
                sampler
            }
            Ok(Err(e)) => {
                tracing::warn!("system monitor off: {e}");
                return;
            }
            Err(e) => {
                tracing::warn!("system monitor off: {e}");
                return;
            }
        };
        let monitor = Arc::clone(self);
        tokio::spawn(async move {
            // CPU use is a difference of two samples: the second reading
            // comes after a short gap, then one every REFRESH.
            tokio::time::sleep(FIRST).await;
            let mut tick = tokio::time::interval(REFRESH);
            loop {
                tick.tick().await;
                let dir = workdir.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let s = sampler.sample(&dir);
                    (sampler, s)
                })
                .await;
                match read {
                    Ok((back, snapshot)) => {
                        sampler = back;
                        monitor.store(snapshot);
                    }
                    Err(e) => {
                        tracing::warn!("system monitor stopped: {e}");
                        return;
                    }
                }
            }
        });
    }
}

/// sysinfo state kept between samples (CPU use is a difference).
struct Sampler {
    system: System,
    disks: Disks,
    pid: Pid,
}

impl Sampler {
    fn new() -> Result<Self, String> {
        let mut system = System::new().map_err(|e| e.to_string())?;
        let pid = sysinfo::get_current_pid().map_err(|e| e.to_string())?;
        system.refresh_cpu_specifics(CpuRefreshKind::nothing().with_usage());
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            false,
            ProcessRefreshKind::nothing().with_cpu(),
        );
        let disks = Disks::new_with_refreshed_list().map_err(|e| e.to_string())?;
        Ok(Self { system, disks, pid })
    }

    /// The reading at start: everything but CPU use, which reads 0.0 (no
    /// interval to measure it over yet), as psutil's first call.
    fn first_sample(&mut self, workdir: &Path) -> Snapshot {
        let mut s = self.sample(workdir);
        s.cpu_percent = 0.0;
        if let Some(p) = &mut s.process {
            p.cpu_percent = 0.0;
        }
        s
    }

    fn sample(&mut self, workdir: &Path) -> Snapshot {
        let s = &mut self.system;
        s.refresh_cpu_specifics(CpuRefreshKind::nothing().with_usage());
        s.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        s.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[self.pid]),
            false,
            ProcessRefreshKind::nothing()
                .with_cpu()
                .with_memory()
                .with_tasks(),
        );
        self.disks.refresh(true);
        let cgroup = s.cgroup_limits().map(|c| (c.total_memory, c.free_memory));
        let memory = Memory::of(s.total_memory(), s.available_memory(), cgroup);
        let disk = self
            .disks
            .iter()
            .filter(|d| workdir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map(|d| Disk {
                mount: d.mount_point().to_path_buf(),
                total: d.total_space(),
                free: d.available_space(),
            });
        let process = s.process(self.pid).map(|p| Process {
            pid: self.pid.as_u32(),
            cpu_percent: f64::from(p.cpu_usage()),
            memory: p.memory(),
            threads: p.tasks().map_or(1, |t| t.len().max(1)),
            status: psutil_status(p.status()).to_string(),
        });
        Snapshot {
            cpu_percent: f64::from(s.global_cpu_usage()),
            memory,
            disk,
            process,
        }
    }
}

/// The process state as the legacy app's psutil names it (`STATUS_*`:
/// "running", "sleeping", "disk-sleep", ...), which the legacy
/// `/api/system` shape carries; sysinfo's own labels differ ("Runnable").
fn psutil_status(s: sysinfo::ProcessStatus) -> &'static str {
    use sysinfo::ProcessStatus as S;
    match s {
        S::Run => "running",
        S::Sleep => "sleeping",
        S::Idle => "idle",
        S::Stop => "stopped",
        S::Zombie => "zombie",
        S::Tracing => "tracing-stop",
        S::Dead => "dead",
        S::Wakekill => "wake-kill",
        S::Waking => "waking",
        S::Parked => "parked",
        S::LockBlocked => "locked",
        S::UninterruptibleDiskSleep => "disk-sleep",
        S::Suspended => "suspended",
        S::Unknown(_) => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_sample_has_every_legacy_field() {
        let mut s = Sampler::new().unwrap();
        std::thread::sleep(Duration::from_millis(250));
        let dir = std::env::current_dir().unwrap();
        let snap = s.sample(&dir);
        assert!(snap.memory.total > 0);
        assert!((0.0..=100.0).contains(&snap.memory.percent()));
        let j = snap.to_json();
        for k in ["total_mb", "available_mb", "used_mb", "percent"] {
            assert!(j["memory"][k].is_number(), "memory.{k}: {j}");
        }
        for k in ["total_gb", "used_gb", "free_gb", "percent"] {
            assert!(j["disk"][k].is_number(), "disk.{k}: {j}");
        }
        assert_eq!(j["process"]["pid"], std::process::id());
        assert!(j["process"]["threads"].as_u64().unwrap() >= 1);
        assert!(j["process"]["memory_mb"].as_f64().unwrap() > 0.0);
        let status = j["process"]["status"].as_str().unwrap();
        assert!(
            ["running", "sleeping", "disk-sleep", "idle"].contains(&status),
            "psutil's name for a live process: {status}"
        );
        assert!(j["cpu_percent"].is_number());
    }

    #[test]
    fn process_states_have_psutil_names() {
        use sysinfo::ProcessStatus as S;
        assert_eq!(psutil_status(S::Run), "running");
        assert_eq!(psutil_status(S::Sleep), "sleeping");
        assert_eq!(psutil_status(S::UninterruptibleDiskSleep), "disk-sleep");
        assert_eq!(psutil_status(S::Tracing), "tracing-stop");
    }

    #[test]
    fn a_cgroup_limit_below_the_host_memory_is_what_is_reported() {
        const G: u64 = 1 << 30;
        let m = Memory::of(24 * G, 20 * G, Some((G, G / 4)));
        assert_eq!((m.total, m.available, m.source), (G, G / 4, "cgroup"));
        assert_eq!(m.percent(), 75.0);
        // No limit, or "no limit" written as a huge one: the host's figures.
        for cgroup in [None, Some((u64::MAX, 0)), Some((0, 0))] {
            let m = Memory::of(24 * G, 20 * G, cgroup);
            assert_eq!((m.total, m.source), (24 * G, "host"));
        }
    }

    #[test]
    fn percentages() {
        let m = Memory {
            total: 16 * 1024 * 1024 * 1024,
            available: 4 * 1024 * 1024 * 1024,
            source: "host",
        };
        assert_eq!(m.percent(), 75.0);
        let j = Snapshot {
            memory: m,
            ..Snapshot::default()
        }
        .to_json();
        assert_eq!(j["memory"]["total_mb"], 16384.0);
        assert_eq!(j["memory"]["used_mb"], 12288.0);
    }
}
