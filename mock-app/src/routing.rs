//! The legacy JSON API (`/api/...`): counting each request, applying a
//! header or global fault, then answering health, search, RAG query, embed,
//! upload, documents and stats; `/__mock/` requests go to `control`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use serde_json::{Value, json};

use crate::body::{Resp, bad_request, json_response, not_found, static_json};
use crate::content::{embedding, fnv1a, search_results};
use crate::control::control;
use crate::request::{
    header_fault, injected, percent_decode, query_of, query_param, read_json, sleep_ms, top_k_of,
};
use crate::state::{Document, InFlightGuard, State, UploadGuard, lock};

/// Bytes per simulated chunk of an uploaded document.
const UPLOAD_CHUNK_BYTES: u64 = 1000;

pub(crate) async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Resp, Infallible> {
    if req.uri().path().starts_with("/__mock/") {
        return Ok(control(req, &state).await);
    }
    state.requests.fetch_add(1, Ordering::Relaxed);
    state.record_path(req.uri().path());
    let _in_flight = InFlightGuard::new(&state.in_flight);

    let fault = header_fault(req.headers()).or_else(|| state.take_global_fault());
    if let Some(fault) = fault {
        sleep_ms(fault.delay_ms).await;
        if let Some(status) = fault.status {
            if let Some(message) = req
                .headers()
                .get("x-mock-body")
                .and_then(|v| v.to_str().ok())
            {
                let body = json!({"error": "Injected", "message": message});
                return Ok(json_response(status, &body));
            }
            return Ok(injected(status));
        }
    }
    let extra = extra_response_headers(req.headers());
    let mut resp = api(req, &state).await;
    for (name, value) in extra {
        resp.headers_mut().append(name, value);
    }
    Ok(resp)
}

/// `X-Mock-Response-Header: Name: value` (repeatable) adds that header to the
/// answer, e.g. `Set-Cookie` or `Cache-Control: private` for cache tests.
fn extra_response_headers(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .get_all("x-mock-response-header")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split_once(':'))
        .filter_map(|(n, v)| {
            Some((
                HeaderName::try_from(n.trim()).ok()?,
                HeaderValue::try_from(v.trim()).ok()?,
            ))
        })
        .collect()
}

async fn api(req: Request<Incoming>, state: &State) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    match (&method, path.as_str()) {
        (&Method::GET, "/api/health") => static_json(
            StatusCode::OK,
            r#"{"status":"healthy","service":"mock-legacy-app"}"#,
        ),
        (&Method::POST, "/api/search") => search(req, state).await,
        (&Method::POST, "/api/rag/query") => rag_query(req, state).await,
        (&Method::POST, p) if p.starts_with("/api/embed") => embed(req).await,
        (&Method::POST, "/api/upload") => upload(req, state).await,
        (&Method::GET, "/api/rag/status") => {
            let n = lock(&state.documents).len();
            json_response(
                StatusCode::OK,
                &json!({"status": "ready", "model": "gemini-mock", "documents": n}),
            )
        }
        (&Method::GET, "/api/documents") => {
            let names: Vec<String> = lock(&state.documents)
                .iter()
                .map(|d| d.name.clone())
                .collect();
            let n = names.len();
            json_response(StatusCode::OK, &json!({"documents": names, "count": n}))
        }
        (&Method::DELETE, p) if p.starts_with("/api/documents/") => {
            let name = percent_decode(&p["/api/documents/".len()..]);
            let removed = {
                let mut docs = lock(&state.documents);
                let before = docs.len();
                docs.retain(|d| d.name != name);
                docs.len() != before
            };
            if removed {
                state.corpus_version.fetch_add(1, Ordering::Relaxed);
                json_response(StatusCode::OK, &json!({"success": true, "deleted": name}))
            } else {
                not_found(format!("document '{name}' not found"))
            }
        }
        (&Method::GET, "/api/stats") => {
            let (n, chunks) = {
                let docs = lock(&state.documents);
                (docs.len(), docs.iter().map(|d| d.chunks).sum::<u64>())
            };
            let total = state.requests.load(Ordering::Relaxed);
            json_response(
                StatusCode::OK,
                &json!({"documents": n, "chunks": chunks, "requests": total}),
            )
        }
        _ => not_found(format!("no route for {method} {path}")),
    }
}

/// The JSON body of a search or RAG query with its `query` and `top_k`, or
/// the 400 to answer.
async fn query_body(req: Request<Incoming>) -> Result<(Value, String, u64), Resp> {
    let body = read_json(req.into_body()).await.map_err(bad_request)?;
    match (query_of(&body), top_k_of(&body)) {
        (Ok(q), Ok(k)) => Ok((body, q, k)),
        (Err(msg), _) | (_, Err(msg)) => Err(bad_request(msg)),
    }
}

async fn search(req: Request<Incoming>, state: &State) -> Resp {
    let (_, query, top_k) = match query_body(req).await {
        Ok(parsed) => parsed,
        Err(resp) => return resp,
    };
    if !state.search_latency.is_zero() {
        tokio::time::sleep(state.search_latency).await;
    }
    let results = search_results(&query, top_k);
    json_response(
        StatusCode::OK,
        &json!({
            "query": query,
            "results": results,
            "count": top_k,
            "corpus_version": state.corpus_version.load(Ordering::Relaxed),
        }),
    )
}

async fn rag_query(req: Request<Incoming>, state: &State) -> Resp {
    let stream = stream_options(req.headers());
    let (body, query, top_k) = match query_body(req).await {
        Ok(parsed) => parsed,
        Err(resp) => return resp,
    };
    state.record_rag_query(&query);
    if !state.take_quota() {
        return crate::request::injected(StatusCode::TOO_MANY_REQUESTS);
    }
    let language = match body.get("language").and_then(Value::as_str) {
        None | Some("auto") | Some("") => {
            if query.is_ascii() {
                "en".to_owned()
            } else {
                "vi".to_owned()
            }
        }
        Some(l) => l.to_owned(),
    };
    if !state.rag_latency.is_zero() {
        tokio::time::sleep(state.rag_latency).await;
    }
    let sources = search_results(&query, top_k);
    let answer = format!(
        "Mock answer to \"{query}\" based on {top_k} source(s) [ref {:016x}].",
        fnv1a(query.as_bytes())
    );
    if let Some(opts) = stream {
        let version = state.corpus_version.load(Ordering::Relaxed);
        return streamed_answer(&answer, version, opts);
    }
    json_response(
        StatusCode::OK,
        &json!({
            "query": query,
            "answer": answer,
            "sources": sources,
            "language": language,
            "corpus_version": state.corpus_version.load(Ordering::Relaxed),
        }),
    )
}

async fn embed(req: Request<Incoming>) -> Resp {
    let body = match read_json(req.into_body()).await {
        Ok(v) => v,
        Err(msg) => return bad_request(msg),
    };
    let embeddings: Vec<Vec<f64>> = match (body.get("text"), body.get("texts")) {
        (Some(Value::String(t)), _) => vec![embedding(t)],
        (_, Some(Value::Array(items))) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item.as_str() {
                    Some(t) => out.push(embedding(t)),
                    None => return bad_request("'texts' must be an array of strings"),
                }
            }
            out
        }
        _ => return bad_request("expected 'text' (string) or 'texts' (array of strings)"),
    };
    json_response(StatusCode::OK, &json!({"embeddings": embeddings}))
}

/// Streams the upload body, counting bytes, without ever buffering it.
async fn upload(req: Request<Incoming>, state: &State) -> Resp {
    let filename = query_param(&req, "filename")
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| "upload".to_owned());
    let mut body = req.into_body();
    let mut guard = UploadGuard {
        in_progress: &state.upload_bytes_in_progress,
        bytes: 0,
    };
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return bad_request(format!("upload interrupted: {e}")),
        };
        if let Some(data) = frame.data_ref() {
            let n = data.len() as u64;
            guard.bytes += n;
            state
                .upload_bytes_in_progress
                .fetch_add(n, Ordering::Relaxed);
            state.upload_bytes_total.fetch_add(n, Ordering::Relaxed);
        }
    }
    let bytes = guard.bytes;
    drop(guard);
    {
        let mut docs = lock(&state.documents);
        docs.retain(|d| d.name != filename);
        docs.push(Document {
            name: filename.clone(),
            chunks: bytes.div_ceil(UPLOAD_CHUNK_BYTES).max(1),
        });
    }
    state.corpus_version.fetch_add(1, Ordering::Relaxed);
    json_response(
        StatusCode::OK,
        &json!({"success": true, "filename": filename, "bytes": bytes}),
    )
}

/// How a RAG answer is streamed (`Accept: text/event-stream`), from the
/// request's `X-Mock-Stream-*` headers (not in the sidecar's cache key).
#[derive(Debug, Clone, Copy)]
struct StreamOptions {
    /// Events carrying the answer's words (default 5), then `[DONE]`.
    events: u64,
    /// Pause before each event (default 20 ms).
    interval: std::time::Duration,
    /// Break the connection after this many events, without ending the
    /// stream.
    break_after: Option<u64>,
    /// Bytes of padding added to each event (a comment line), to make
    /// large streams.
    pad: usize,
}

fn stream_options(headers: &HeaderMap) -> Option<StreamOptions> {
    let wants = headers
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"));
    if !wants {
        return None;
    }
    let num = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(StreamOptions {
        events: num("x-mock-stream-events").unwrap_or(5).clamp(1, 100_000),
        interval: std::time::Duration::from_millis(num("x-mock-stream-interval-ms").unwrap_or(20)),
        break_after: num("x-mock-stream-break-after"),
        pad: num("x-mock-stream-pad").unwrap_or(0).min(1 << 20) as usize,
    })
}

/// The answer as server-sent events: its words spread over `events`
/// events, one every `interval`, then `data: [DONE]`.
fn streamed_answer(answer: &str, version: u64, opts: StreamOptions) -> Resp {
    let words: Vec<String> = answer.split(' ').map(str::to_owned).collect();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let per = words.len().div_ceil(opts.events as usize).max(1);
        for i in 0..opts.events {
            if opts.break_after == Some(i) {
                let _ = tx
                    .send(Err(std::io::Error::other("mock: stream broken")))
                    .await;
                return;
            }
            tokio::time::sleep(opts.interval).await;
            let start = (i as usize * per).min(words.len());
            let end = ((i as usize + 1) * per).min(words.len());
            let text = words[start..end].join(" ");
            let event = json!({"index": i, "text": text, "corpus_version": version});
            let pad = if opts.pad > 0 {
                format!(": {}\n", "p".repeat(opts.pad))
            } else {
                String::new()
            };
            let frame = bytes::Bytes::from(format!("{pad}data: {event}\n\n"));
            if tx.send(Ok(frame)).await.is_err() {
                return;
            }
        }
        let _ = tx
            .send(Ok(bytes::Bytes::from_static(b"data: [DONE]\n\n")))
            .await;
    });
    let mut resp = hyper::Response::new(crate::body::MockBody::Channel(rx));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    resp
}
