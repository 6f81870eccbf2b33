//! `GET /api/circuit-breakers` and `POST /api/circuit-breakers/reset`
//! (guarded), with the legacy JSON shapes.

use http::StatusCode;
use serde_json::json;

use super::Ctx;
use crate::body::{self, Body};

/// `{"gemini": {"state": "closed", "failure_count": 0, ...}, ...}`.
pub async fn states(ctx: Ctx) -> http::Response<Body> {
    body::json(StatusCode::OK, &ctx.state.resilience.circuits.to_json())
}

pub async fn reset(ctx: Ctx) -> http::Response<Body> {
    ctx.state.resilience.circuits.reset_all();
    tracing::info!(client = %ctx.peer, "circuit breakers reset by request");
    body::json(
        StatusCode::OK,
        &json!({"success": true, "message": "All circuit breakers reset"}),
    )
}
