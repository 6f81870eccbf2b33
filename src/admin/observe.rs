//! The observability endpoints with the legacy JSON shapes:
//! `GET /api/metrics`, `POST /api/metrics/reset` (guarded), `GET /metrics`
//! (Prometheus), `GET /api/system` and `GET /api/health/detailed`.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::{Value, json};

use super::Ctx;
use crate::body::{self, Body};

fn disabled() -> Response<Body> {
    body::json(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"error": "Metrics disabled",
                "message": "ENABLE_METRICS is False: no metrics are recorded"}),
    )
}

pub async fn metrics(ctx: Ctx) -> Response<Body> {
    let m = &ctx.state.metrics;
    if !m.enabled() {
        return disabled();
    }
    body::json(StatusCode::OK, &m.to_json())
}

pub async fn reset(ctx: Ctx) -> Response<Body> {
    let m = &ctx.state.metrics;
    if !m.enabled() {
        return disabled();
    }
    m.reset();
    tracing::info!(client = %ctx.peer, "metrics reset by request");
    body::json(
        StatusCode::OK,
        &json!({"success": true, "message": "All metrics reset"}),
    )
}

pub async fn prometheus(ctx: Ctx) -> Response<Body> {
    let m = &ctx.state.metrics;
    if !m.enabled() {
        return disabled();
    }
    match m.render() {
        Ok(text) => {
            let mut resp = Response::new(body::full(text));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        Err(e) => body::json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"error": "Internal server error", "message": format!("metrics encoding failed: {e}")}),
        ),
    }
}

fn not_sampled() -> Response<Body> {
    body::json(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"error": "Not ready",
                "message": "system figures are not available: the system monitor could not start (see the log)"}),
    )
}

pub async fn system(ctx: Ctx) -> Response<Body> {
    match ctx.state.system.latest() {
        Some(s) => body::json(StatusCode::OK, &s.to_json()),
        None => not_sampled(),
    }
}

/// Python's `str(timedelta(seconds=n))`: `1:00:00`, `2 days, 3:04:05`.
pub fn uptime_human(d: Duration) -> String {
    let s = d.as_secs();
    let (days, rest) = (s / 86_400, s % 86_400);
    let hms = format!("{}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60);
    match days {
        0 => hms,
        1 => format!("1 day, {hms}"),
        n => format!("{n} days, {hms}"),
    }
}

pub async fn health_detailed(ctx: Ctx) -> Response<Body> {
    let st = &ctx.state;
    let m = &st.metrics;
    let health = m.health();
    let uptime = m.uptime();
    // The legacy shape either way (Example 4 of the legacy document reads
    // `metrics.counters.requests`): with metrics off, nothing is recorded,
    // so the request counters read 0 and the timers are empty.
    let metrics = json!({
        "enabled": m.enabled(),
        "counters": m.counters(),
        "timers": m.timers(),
    });
    let upstream = match st.readiness.last() {
        Some(p) => p.to_json(),
        None => json!({"reachable": null, "latency_ms": null, "last_checked": null}),
    };
    body::json(
        StatusCode::OK,
        &json!({
            "status": health.status,
            "health_score": health.health_score,
            "issues": health.issues,
            "uptime_seconds": uptime.as_secs(),
            "uptime_human": uptime_human(uptime),
            "metrics": metrics,
            "cache": st.cache.stats_json(),
            "circuit_breakers": st.resilience.circuits.to_json(),
            "system": st.system.latest().map_or(Value::Null, |s| s.to_json()),
            "upstream": upstream,
            "upstream_quota": st.metrics.quota_json(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_reads_like_pythons_timedelta() {
        assert_eq!(uptime_human(Duration::from_secs(0)), "0:00:00");
        assert_eq!(uptime_human(Duration::from_secs(3600)), "1:00:00");
        assert_eq!(uptime_human(Duration::from_secs(86_399)), "23:59:59");
        assert_eq!(
            uptime_human(Duration::from_secs(86_400 + 62)),
            "1 day, 0:01:02"
        );
        assert_eq!(
            uptime_human(Duration::from_secs(3 * 86_400 + 3725)),
            "3 days, 1:02:05"
        );
    }
}
