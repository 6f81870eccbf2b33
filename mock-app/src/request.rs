//! Reading requests: the JSON body and its `query` / `top_k`, query-string
//! parameters, percent-decoding of path segments, and the per-request fault
//! headers (`X-Mock-Delay-Ms`, `X-Mock-Status`) with the answer they inject.

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, StatusCode};
use serde_json::{Value, json};

use crate::body::{Resp, json_response, static_json};
use crate::state::Fault;

/// Largest JSON request body accepted by the JSON endpoints.
const MAX_JSON_BODY: usize = 8 * 1024 * 1024;
/// Upper bound for `top_k`.
const MAX_TOP_K: u64 = 100;

/// Reads and parses a JSON body; the error is a message for a 400 answer.
pub(crate) async fn read_json(body: Incoming) -> Result<Value, String> {
    let limited = http_body_util::Limited::new(body, MAX_JSON_BODY);
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return Err(format!("could not read request body: {e}")),
    };
    serde_json::from_slice::<Value>(&bytes).map_err(|e| format!("invalid JSON body: {e}"))
}

/// The non-empty `query` string of a search / RAG body.
pub(crate) fn query_of(v: &Value) -> Result<String, String> {
    match v.get("query") {
        Some(Value::String(q)) if !q.trim().is_empty() => Ok(q.clone()),
        Some(Value::String(_)) => Err("'query' must not be empty".to_owned()),
        Some(_) => Err("'query' must be a string".to_owned()),
        None => Err("missing 'query'".to_owned()),
    }
}

pub(crate) fn top_k_of(v: &Value) -> Result<u64, String> {
    match v.get("top_k") {
        None | Some(Value::Null) => Ok(5),
        Some(t) => t
            .as_u64()
            .map(|k| k.min(MAX_TOP_K))
            .ok_or_else(|| "'top_k' must be a non-negative integer".to_owned()),
    }
}

pub(crate) fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// The fault requested by `X-Mock-Delay-Ms` / `X-Mock-Status`, if any.
pub(crate) fn header_fault(headers: &HeaderMap) -> Option<Fault> {
    let delay = header_u64(headers, "x-mock-delay-ms");
    let status = header_u64(headers, "x-mock-status").and_then(valid_status);
    if delay.is_none() && status.is_none() {
        return None;
    }
    Some(Fault {
        status,
        delay_ms: delay.unwrap_or(0),
    })
}

pub(crate) fn valid_status(s: u64) -> Option<StatusCode> {
    u16::try_from(s)
        .ok()
        .filter(|s| (200..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
}

pub(crate) fn injected(status: StatusCode) -> Resp {
    if status == StatusCode::TOO_MANY_REQUESTS {
        let mut resp = static_json(
            status,
            r#"{"error":"Resource exhausted (quota)","message":"429 RESOURCE_EXHAUSTED: quota exceeded"}"#,
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        resp
    } else {
        json_response(
            status,
            &json!({"error": "Injected", "message": format!("injected status {}", status.as_u16())}),
        )
    }
}

pub(crate) async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}
