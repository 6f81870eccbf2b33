//! `GET /api/cache/stats` and `POST /api/cache/clear` (guarded), with the
//! legacy JSON shapes.

use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};

use super::Ctx;
use crate::body::{self, Body};

pub async fn stats(ctx: Ctx) -> http::Response<Body> {
    body::json(StatusCode::OK, &ctx.state.cache.stats_json())
}

/// Body `{"pattern": "search:*"}`, or empty (or `{}`) for everything.
pub async fn clear(ctx: Ctx) -> http::Response<Body> {
    let bad = |m: &str| {
        body::json(
            StatusCode::BAD_REQUEST,
            &json!({"error": "Bad request", "message": m}),
        )
    };
    let bytes = match Limited::new(ctx.req.into_body(), 64 * 1024).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return bad("body unreadable or over 64 KiB"),
    };
    let pattern = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(o)) => match o.get("pattern") {
                None | Some(Value::Null) => None,
                Some(Value::String(p)) if !p.is_empty() => {
                    if glob::Pattern::new(p).is_err() {
                        return bad("pattern is not a valid glob");
                    }
                    Some(p.clone())
                }
                Some(_) => return bad("pattern must be a non-empty string such as \"search:*\""),
            },
            _ => return bad("expected a JSON object such as {\"pattern\": \"search:*\"}"),
        }
    };
    let (memory, redis) = ctx.state.cache.clear(pattern.as_deref()).await;
    tracing::info!(pattern = pattern.as_deref().unwrap_or("*"), memory, redis, client = %ctx.peer, "cache cleared");
    body::json(
        StatusCode::OK,
        &json!({
            "success": true,
            "cleared": memory.max(redis),
            "memory_cleared": memory,
            "redis_cleared": redis,
            "pattern": pattern,
        }),
    )
}
