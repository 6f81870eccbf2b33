//! `GET /api/cache/stats` and `POST /api/cache/clear` (guarded), with the
//! legacy JSON shapes.

use http::StatusCode;
use serde_json::{Value, json};

use super::Ctx;
use crate::body::{self, Body};
use crate::error::{ClientBodyStalled, find_cause};
use crate::layers::rescue::rescue;

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
    let bytes = match body::read_bounded(ctx.req.into_body(), 64 * 1024).await {
        Ok(body::Buffered::Whole(bytes)) => bytes,
        Ok(body::Buffered::Partial(_)) => return bad("body over 64 KiB"),
        // The body paused past `client_body_timeout`: the 408 a proxied
        // route answers (the stack's rescue makes it).
        Err(e) if find_cause::<ClientBodyStalled>(e.as_ref()).is_some() => return rescue(&e),
        Err(_) => return bad("body unreadable"),
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
    let r = ctx.state.cache.clear(pattern.as_deref()).await;
    let failed = r.redis_errors > 0 || r.queued;
    let mut body = json!({
        "success": !failed,
        "cleared": r.memory.max(r.redis),
        "memory_cleared": r.memory,
        "redis_cleared": r.redis,
        "redis_errors": r.redis_errors,
        "redis_not_cleared": r.redis_failed,
        "pattern": pattern,
    });
    if failed {
        // Never a success it did not have: the memory layers are cleared and
        // the namespaces' generations bumped (or queued until Redis takes
        // them), so no sidecar serves a cleared entry; what Redis kept
        // takes room there until its TTL.
        tracing::warn!(pattern = pattern.as_deref().unwrap_or("*"), memory = r.memory, redis = r.redis, errors = r.redis_errors, not_cleared = r.redis_failed, queued = r.queued, client = %ctx.peer, "cache clear incomplete");
        body["error"] = json!("Cache clear incomplete");
        body["message"] = json!(if r.queued {
            "Redis is unreachable: cleared in this sidecar's memory; the clear reaches Redis and the other sidecars when it is back"
        } else {
            "Some Redis deletions failed (see redis_errors): no sidecar serves the cleared entries, but Redis keeps some until their TTL"
        });
        return body::json(StatusCode::SERVICE_UNAVAILABLE, &body);
    }
    tracing::info!(pattern = pattern.as_deref().unwrap_or("*"), memory = r.memory, redis = r.redis, client = %ctx.peer, "cache cleared");
    body::json(StatusCode::OK, &body)
}
