//! The `/__mock/` endpoints, never faulted and never counted: `fast`, `echo`
//! (with hop-by-hop headers for the proxy to strip), `stats` and
//! `stats/reset`, the global fault (`faults`), `sse` (`?events=N&pad=B`),
//! `blob` (`?bytes=N`, sent in 64 KiB chunks as the reader takes them) and
//! `gate/{name}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::body::{MockBody, Resp, bad_request, json_response, not_found, response, static_json};
use crate::request::{percent_decode, query_param, read_json, valid_status};
use crate::state::{GlobalFault, State, lock};

/// Upper bound for `/__mock/sse?events=`.
const MAX_SSE_EVENTS: u64 = 100_000;

/// Upper bounds for `/__mock/sse?pad=` and `/__mock/blob?bytes=`.
const MAX_SSE_PAD: usize = 64 * 1024;
const MAX_BLOB_BYTES: u64 = 256 * 1024 * 1024;

/// A numeric query parameter, `default` when absent, capped at `max`.
fn number(req: &Request<Incoming>, name: &str, default: u64, max: u64) -> Result<u64, String> {
    match query_param(req, name) {
        None => Ok(default),
        Some(s) => s
            .parse::<u64>()
            .map(|n| n.min(max))
            .map_err(|_| format!("'{name}' must be a non-negative integer")),
    }
}

pub(crate) async fn control(req: Request<Incoming>, state: &Arc<State>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    match (&method, path.as_str()) {
        (_, "/__mock/fast") => response(StatusCode::OK, "text/plain", Bytes::from_static(b"ok")),
        (_, "/__mock/echo") => echo(req).await,
        (&Method::GET, "/__mock/stats") => {
            let by_path: BTreeMap<String, u64> = lock(&state.by_path)
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            json_response(
                StatusCode::OK,
                &json!({
                    "requests": state.requests.load(Ordering::Relaxed),
                    "by_path": by_path,
                    "in_flight": state.in_flight.load(Ordering::Relaxed),
                    "upload_bytes_in_progress": state.upload_bytes_in_progress.load(Ordering::Relaxed),
                    "upload_bytes_total": state.upload_bytes_total.load(Ordering::Relaxed),
                    "quota_errors": state.quota_errors.load(Ordering::Relaxed),
                    "rag_queries": lock(&state.rag_queries).iter().cloned().collect::<Vec<_>>(),
                    "bytes_sent": state.bytes_sent.load(Ordering::Relaxed),
                }),
            )
        }
        (&Method::POST, "/__mock/stats/reset") => {
            state.requests.store(0, Ordering::Relaxed);
            state.upload_bytes_total.store(0, Ordering::Relaxed);
            lock(&state.by_path).clear();
            static_json(StatusCode::OK, r#"{"reset":true}"#)
        }
        (&Method::GET, "/__mock/faults") => {
            let fault = *lock(&state.fault);
            json_response(StatusCode::OK, &json!({"faults": fault.map(fault_json)}))
        }
        (&Method::POST, "/__mock/faults") => set_faults(req, state).await,
        (&Method::DELETE, "/__mock/faults") => {
            state.set_global_fault(None);
            static_json(StatusCode::OK, r#"{"cleared":true}"#)
        }
        (&Method::GET, "/__mock/sse") => sse(&req, state),
        (&Method::GET, "/__mock/blob") => blob(&req, state),
        (&Method::POST, p) if p.starts_with("/__mock/gate/") => {
            let name = percent_decode(&p["/__mock/gate/".len()..]);
            state.open_gate(&name);
            json_response(StatusCode::OK, &json!({"opened": name}))
        }
        _ => not_found(format!("no mock control route for {method} {path}")),
    }
}

fn fault_json(f: GlobalFault) -> Value {
    json!({
        "status": f.status.map(|s| s.as_u16()),
        "delay_ms": f.delay_ms,
        "count": f.remaining,
    })
}

async fn set_faults(req: Request<Incoming>, state: &State) -> Resp {
    let body = match read_json(req.into_body()).await {
        Ok(v) => v,
        Err(msg) => return bad_request(msg),
    };
    let status = match body.get("status") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(valid_status) {
            Some(s) => Some(s),
            None => return bad_request("'status' must be an integer in 200..=599"),
        },
    };
    let mut numbers = [0u64; 2];
    let mut present = [false; 2];
    for (i, key) in ["delay_ms", "count"].into_iter().enumerate() {
        match body.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64() {
                Some(n) => {
                    numbers[i] = n;
                    present[i] = true;
                }
                None => return bad_request(format!("'{key}' must be a non-negative integer")),
            },
        }
    }
    let fault = GlobalFault {
        status,
        delay_ms: numbers[0],
        remaining: present[1].then_some(numbers[1]),
    };
    state.set_global_fault(Some(fault));
    json_response(StatusCode::OK, &json!({"faults": fault_json(fault)}))
}

async fn echo(req: Request<Incoming>) -> Resp {
    let (parts, mut body) = req.into_parts();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let mut body_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => return bad_request(format!("could not read request body: {e}")),
        }
    }
    let value = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut resp = json_response(StatusCode::OK, &value);
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("X-Mock-Hop"));
    h.insert(
        HeaderName::from_static("x-mock-hop"),
        HeaderValue::from_static("secret"),
    );
    h.insert(
        HeaderName::from_static("keep-alive"),
        HeaderValue::from_static("timeout=5"),
    );
    h.insert(
        header::PROXY_AUTHENTICATE,
        HeaderValue::from_static("Basic"),
    );
    h.insert(
        HeaderName::from_static("x-mock-end"),
        HeaderValue::from_static("kept"),
    );
    resp
}

fn sse(req: &Request<Incoming>, state: &Arc<State>) -> Resp {
    let events = match number(req, "events", 3, MAX_SSE_EVENTS) {
        Ok(n) => n,
        Err(msg) => return bad_request(msg),
    };
    // Each event padded to about `pad` bytes (large streams for the tests
    // of memory held for slow readers).
    let pad = match number(req, "pad", 0, MAX_SSE_PAD as u64) {
        Ok(n) => usize::try_from(n).unwrap_or(MAX_SSE_PAD),
        Err(msg) => return bad_request(msg),
    };
    let gate = query_param(req, "gate").filter(|g| !g.is_empty());
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let filler = "x".repeat(pad);
        let event = |i: u64| {
            let e = Bytes::from(format!("data: event {i}{filler}\n\n"));
            state
                .bytes_sent
                .fetch_add(e.len() as u64, Ordering::Relaxed);
            Ok(e)
        };
        if events == 0 || tx.send(event(1)).await.is_err() {
            return;
        }
        if let Some(gate) = gate {
            tokio::select! {
                () = state.wait_gate(&gate) => {}
                () = tx.closed() => return,
            }
        }
        for i in 2..=events {
            if tx.send(event(i)).await.is_err() {
                return;
            }
        }
    });
    let mut resp = Response::new(MockBody::Channel(rx));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// `bytes` bytes of `application/octet-stream`, fed in 64 KiB chunks by a
/// task as the server takes them (no `Content-Length`: chunked), counted in
/// `bytes_sent`.
fn blob(req: &Request<Incoming>, state: &Arc<State>) -> Resp {
    let total = match number(req, "bytes", 0, MAX_BLOB_BYTES) {
        Ok(n) => n,
        Err(msg) => return bad_request(msg),
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let state = Arc::clone(state);
    tokio::spawn(async move {
        const CHUNK: u64 = 64 * 1024;
        let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
        let mut left = total;
        while left > 0 {
            let n = left.min(CHUNK);
            if tx.send(Ok(chunk.slice(..n as usize))).await.is_err() {
                return;
            }
            state.bytes_sent.fetch_add(n, Ordering::Relaxed);
            left -= n;
        }
    });
    let mut resp = Response::new(MockBody::Channel(rx));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}
