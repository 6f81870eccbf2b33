//! The process families on `/metrics` (`rag_sidecar_process_*`): prometheus's
//! own `ProcessCollector`, with its CPU figure made exact.
//!
//! prometheus 0.14 computes `process_cpu_seconds_total` as
//! `(utime + stime) / CLK_TCK` in integers (`process_collector.rs`), so the
//! counter moves in whole seconds and a `rate()` over it is a staircase (a
//! sidecar at 0.19 s of CPU read 0). Its other families are right; this
//! collector passes them through and sets the CPU counter from the same
//! `/proc` reading (procfs, which prometheus already uses) in fractions of
//! a second.

use prometheus::core::{Collector, Desc};
use prometheus::process_collector::ProcessCollector;
use prometheus::proto::MetricFamily;

pub struct ProcessMetrics {
    inner: ProcessCollector,
    pid: i32,
}

impl ProcessMetrics {
    pub fn new(pid: i32, namespace: &str) -> Self {
        Self {
            inner: ProcessCollector::new(pid, namespace),
            pid,
        }
    }

    /// User + system CPU time of the process, in seconds.
    fn cpu_seconds(&self) -> Option<f64> {
        let stat = procfs::process::Process::new(self.pid).ok()?.stat().ok()?;
        let ticks = procfs::ticks_per_second();
        (ticks > 0).then(|| (stat.utime + stat.stime) as f64 / ticks as f64)
    }
}

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.inner.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.inner.collect();
        if let Some(secs) = self.cpu_seconds() {
            for f in families
                .iter_mut()
                .filter(|f| f.name().ends_with("process_cpu_seconds_total"))
            {
                for m in f.mut_metric() {
                    let mut c = prometheus::proto::Counter::default();
                    c.set_value(secs);
                    m.set_counter(c);
                }
            }
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_are_not_rounded_down_to_whole_seconds() {
        // Burn a little CPU, so that the figure is more than zero and (at
        // 1/100 s ticks) almost surely not whole.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(150) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let pid = i32::try_from(std::process::id()).unwrap();
        let c = ProcessMetrics::new(pid, "t");
        let before = c.cpu_seconds().unwrap();
        let families = c.collect();
        let after = c.cpu_seconds().unwrap();
        let cpu = families
            .iter()
            .find(|f| f.name() == "t_process_cpu_seconds_total")
            .unwrap();
        let v = cpu.get_metric()[0].get_counter().get_value();
        // Rounded down to whole seconds, it would fall below `before`.
        assert!(
            before > 0.1 && before <= v && v <= after,
            "{before} {v} {after}"
        );
        assert!(
            families
                .iter()
                .any(|f| f.name() == "t_process_resident_memory_bytes")
        );
    }
}
