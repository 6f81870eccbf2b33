//! The legacy health score, exactly (PRODUCT.md "Observability endpoints"):
//! start at 100; CPU > 90 % −20; memory > 90 % −20; disk > 90 % −10; error
//! rate (5xx share of the last 5 minutes) > 5 % −30. ≥ 80 healthy, ≥ 50
//! degraded, else unhealthy. `issues` names each deduction, and also any open
//! circuit and a configured Redis that is down (those cost no points: the
//! legacy algorithm has no line for them).

use serde::Serialize;

/// What the score is computed from; `None` is "not measured (yet)".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    pub cpu_percent: Option<f64>,
    pub memory_percent: Option<f64>,
    pub disk_percent: Option<f64>,
    /// 5xx answers / answers over the last 5 minutes, in percent.
    pub error_rate_percent: Option<f64>,
    pub open_circuits: Vec<String>,
    /// `Some(false)`: Redis is configured and down.
    pub redis_connected: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    pub status: &'static str,
    pub health_score: i32,
    pub issues: Vec<String>,
}

pub fn score(i: &Inputs) -> Health {
    let mut score = 100;
    let mut issues = Vec::new();
    let over = |v: Option<f64>, limit: f64| v.filter(|v| *v > limit);
    if let Some(v) = over(i.cpu_percent, 90.0) {
        score -= 20;
        issues.push(format!("High CPU usage: {v:.1}%"));
    }
    if let Some(v) = over(i.memory_percent, 90.0) {
        score -= 20;
        issues.push(format!("High memory usage: {v:.1}%"));
    }
    if let Some(v) = over(i.disk_percent, 90.0) {
        score -= 10;
        issues.push(format!("High disk usage: {v:.1}%"));
    }
    if let Some(v) = over(i.error_rate_percent, 5.0) {
        score -= 30;
        issues.push(format!(
            "High error rate: {v:.1}% of requests in the last 5 minutes"
        ));
    }
    for c in &i.open_circuits {
        issues.push(format!("Circuit breaker OPEN: {c}"));
    }
    if i.redis_connected == Some(false) {
        issues.push("Redis unreachable: cache running from memory only".to_string());
    }
    let status = if score >= 80 {
        "healthy"
    } else if score >= 50 {
        "degraded"
    } else {
        "unhealthy"
    };
    Health {
        status,
        health_score: score,
        issues,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(cpu: f64, mem: f64, disk: f64, err: f64) -> Health {
        score(&Inputs {
            cpu_percent: Some(cpu),
            memory_percent: Some(mem),
            disk_percent: Some(disk),
            error_rate_percent: Some(err),
            ..Inputs::default()
        })
    }

    #[test]
    fn every_threshold_edge() {
        // (cpu, memory, disk, error rate) → (score, status, issues)
        type Row = ((f64, f64, f64, f64), (i32, &'static str, usize));
        let table: &[Row] = &[
            ((0.0, 0.0, 0.0, 0.0), (100, "healthy", 0)),
            ((90.0, 90.0, 90.0, 5.0), (100, "healthy", 0)), // "> 90", not ">="
            ((90.1, 0.0, 0.0, 0.0), (80, "healthy", 1)),
            ((0.0, 90.1, 0.0, 0.0), (80, "healthy", 1)),
            ((0.0, 0.0, 90.1, 0.0), (90, "healthy", 1)),
            ((0.0, 0.0, 0.0, 5.01), (70, "degraded", 1)),
            ((90.1, 90.1, 0.0, 0.0), (60, "degraded", 2)),
            ((90.1, 0.0, 90.1, 0.0), (70, "degraded", 2)),
            ((90.1, 90.1, 90.1, 0.0), (50, "degraded", 3)),
            ((0.0, 90.1, 90.1, 5.1), (40, "unhealthy", 3)),
            ((90.1, 90.1, 90.1, 5.1), (20, "unhealthy", 4)),
            ((100.0, 100.0, 100.0, 100.0), (20, "unhealthy", 4)),
        ];
        for &((c, m, d, e), (s, status, n)) in table {
            let h = with(c, m, d, e);
            assert_eq!(
                (h.health_score, h.status, h.issues.len()),
                (s, status, n),
                "{c} {m} {d} {e}: {h:?}"
            );
        }
    }

    #[test]
    fn issues_name_each_deduction_and_the_free_ones() {
        let h = score(&Inputs {
            cpu_percent: Some(95.0),
            error_rate_percent: Some(12.5),
            open_circuits: vec!["gemini".into()],
            redis_connected: Some(false),
            ..Inputs::default()
        });
        assert_eq!(h.health_score, 50);
        assert_eq!(
            h.issues,
            [
                "High CPU usage: 95.0%",
                "High error rate: 12.5% of requests in the last 5 minutes",
                "Circuit breaker OPEN: gemini",
                "Redis unreachable: cache running from memory only",
            ]
        );
        // Nothing measured yet: nothing deducted.
        assert_eq!(score(&Inputs::default()).health_score, 100);
    }
}
