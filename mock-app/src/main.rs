//! `mock-legacy-app`: a self-contained, deterministic mock of the legacy Flask
//! "RAG Services" application that `rag-sidecar` fronts.
//!
//! It is the upstream used by the end-to-end tests, `make run` and the
//! throughput benchmark, so it is built to be fast (no per-request logging,
//! atomics for counters, no lock held across an `.await`) and deterministic
//! (every answer is derived from the request text with a fixed hash).
//!
//! Besides the legacy JSON API (`/api/...`) it offers:
//!
//! * fault injection on every non-`/__mock/` request, per request through the
//!   `X-Mock-Delay-Ms` / `X-Mock-Status` headers (with `X-Mock-Body` as the
//!   injected answer's message) or globally through `POST /__mock/faults`
//!   (`DELETE /__mock/faults` clears);
//! * control and inspection endpoints under `/__mock/` (never faulted, never
//!   counted): `stats`, `stats/reset`, `echo`, `sse`, `gate/{name}`, `fast`.
//!
//! After binding, it prints exactly one line,
//! `mock-legacy-app listening on <addr>`, to stdout and exits with status 0 on
//! SIGTERM or SIGINT.

#![allow(
    clippy::disallowed_types,
    reason = "the mock app is test scaffolding, not the request path: plain locks over its scripted state"
)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::error::Error;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};

/// Largest JSON request body accepted by the JSON endpoints.
const MAX_JSON_BODY: usize = 8 * 1024 * 1024;
/// Distinct paths tracked individually in `by_path`; the rest go to `<other>`.
const MAX_TRACKED_PATHS: usize = 1024;
/// Upper bound for `top_k`.
const MAX_TOP_K: u64 = 100;
/// Upper bound for `/__mock/sse?events=`.
const MAX_SSE_EVENTS: u64 = 100_000;
/// Bytes per simulated chunk of an uploaded document.
const UPLOAD_CHUNK_BYTES: u64 = 1000;
/// Number of floats in every embedding.
const EMBEDDING_DIMS: u64 = 8;

/// Command line of the mock.
#[derive(Debug, Parser)]
#[command(
    name = "mock-legacy-app",
    about = "Mock of the legacy Flask RAG Services app"
)]
struct Cli {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    /// Simulated work time of /api/search, in milliseconds.
    #[arg(long, default_value_t = 250)]
    search_latency_ms: u64,
    /// Simulated work time of /api/rag/query, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    rag_latency_ms: u64,
    /// Number of tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

// ---------------------------------------------------------------------------
// Response body
// ---------------------------------------------------------------------------

/// Response body: either a complete buffer or a channel fed by a task (SSE).
enum MockBody {
    Full(Option<Bytes>),
    Channel(mpsc::Receiver<Bytes>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            MockBody::Full(data) => Poll::Ready(
                data.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            MockBody::Channel(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MockBody::Full(data) => data.as_ref().is_none_or(Bytes::is_empty),
            MockBody::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |b| b.len() as u64))
            }
            MockBody::Channel(_) => SizeHint::default(),
        }
    }
}

type Resp = Response<MockBody>;

fn response(status: StatusCode, content_type: &'static str, body: Bytes) -> Resp {
    let mut resp = Response::new(MockBody::Full(Some(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json_response(status: StatusCode, value: &Value) -> Resp {
    // Serialising a `Value` cannot fail (all map keys are strings).
    let body = serde_json::to_vec(value).unwrap_or_default();
    response(status, "application/json", Bytes::from(body))
}

fn static_json(status: StatusCode, body: &'static str) -> Resp {
    response(
        status,
        "application/json",
        Bytes::from_static(body.as_bytes()),
    )
}

fn bad_request(message: impl Into<String>) -> Resp {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": "Bad request", "message": message.into()}),
    )
}

fn not_found(message: impl Into<String>) -> Resp {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"error": "Not found", "message": message.into()}),
    )
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

/// A global fault armed through `POST /__mock/faults`.
#[derive(Clone, Copy, Debug)]
struct GlobalFault {
    status: Option<StatusCode>,
    delay_ms: u64,
    /// Requests still to be faulted; `None` means until cleared.
    remaining: Option<u64>,
}

/// A fault applied to one request.
#[derive(Clone, Copy, Debug, Default)]
struct Fault {
    status: Option<StatusCode>,
    delay_ms: u64,
}

/// A document of the in-memory store.
struct Document {
    name: String,
    chunks: u64,
}

/// State of one named SSE gate.
#[derive(Default)]
struct Gate {
    notify: Arc<Notify>,
    /// Streams currently waiting on the gate.
    waiting: usize,
    /// Bumped each time the gate releases its waiters.
    generation: u64,
    /// An open that arrived while nobody was waiting; released by the next wait.
    pending_open: bool,
}

struct State {
    search_latency: Duration,
    rag_latency: Duration,
    requests: AtomicU64,
    in_flight: AtomicI64,
    upload_bytes_in_progress: AtomicU64,
    upload_bytes_total: AtomicU64,
    by_path: Mutex<HashMap<String, u64>>,
    documents: Mutex<Vec<Document>>,
    faults_armed: AtomicBool,
    fault: Mutex<Option<GlobalFault>>,
    gates: Mutex<HashMap<String, Gate>>,
}

/// Locks a std mutex, ignoring poisoning (the data stays usable).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    fn new(cli: &Cli) -> Self {
        let documents = (1..=3)
            .map(|i| Document {
                name: format!("doc-{i}.pdf"),
                chunks: 12,
            })
            .collect();
        State {
            search_latency: Duration::from_millis(cli.search_latency_ms),
            rag_latency: Duration::from_millis(cli.rag_latency_ms),
            requests: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            upload_bytes_in_progress: AtomicU64::new(0),
            upload_bytes_total: AtomicU64::new(0),
            by_path: Mutex::new(HashMap::new()),
            documents: Mutex::new(documents),
            faults_armed: AtomicBool::new(false),
            fault: Mutex::new(None),
            gates: Mutex::new(HashMap::new()),
        }
    }

    fn record_path(&self, path: &str) {
        let mut map = lock(&self.by_path);
        if let Some(n) = map.get_mut(path) {
            *n += 1;
        } else if map.len() < MAX_TRACKED_PATHS {
            map.insert(path.to_owned(), 1);
        } else {
            *map.entry("<other>".to_owned()).or_insert(0) += 1;
        }
    }

    /// Takes one use of the global fault, if one is armed.
    fn take_global_fault(&self) -> Option<Fault> {
        if !self.faults_armed.load(Ordering::Acquire) {
            return None;
        }
        let mut slot = lock(&self.fault);
        let armed = (*slot)?;
        let fault = Fault {
            status: armed.status,
            delay_ms: armed.delay_ms,
        };
        match armed.remaining {
            None => {}
            // `set_global_fault` never stores `Some(0)`: this is the last use.
            Some(n) if n <= 1 => {
                *slot = None;
                self.faults_armed.store(false, Ordering::Release);
            }
            Some(n) => {
                *slot = Some(GlobalFault {
                    remaining: Some(n - 1),
                    ..armed
                });
            }
        }
        Some(fault)
    }

    fn set_global_fault(&self, fault: Option<GlobalFault>) {
        let mut slot = lock(&self.fault);
        *slot = fault.filter(|f| f.remaining != Some(0));
        self.faults_armed.store(slot.is_some(), Ordering::Release);
    }

    /// Opens gate `name`: releases every stream waiting on it, or the next one
    /// to wait if none is waiting yet.
    fn open_gate(&self, name: &str) {
        let mut gates = lock(&self.gates);
        let gate = gates.entry(name.to_owned()).or_default();
        if gate.waiting > 0 {
            gate.waiting = 0;
            gate.generation += 1;
            gate.notify.notify_waiters();
        } else {
            gate.pending_open = true;
        }
    }

    /// Waits until gate `name` is opened (or consumes an earlier open).
    async fn wait_gate(&self, name: &str) {
        let (notify, generation) = {
            let mut gates = lock(&self.gates);
            let gate = gates.entry(name.to_owned()).or_default();
            if gate.pending_open {
                gate.pending_open = false;
                return;
            }
            gate.waiting += 1;
            (gate.notify.clone(), gate.generation)
        };
        let mut guard = GateWaitGuard {
            state: self,
            name,
            generation,
            released: false,
        };
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if guard.is_released() {
                break;
            }
            notified.await;
        }
        guard.released = true;
    }
}

/// Un-registers a cancelled gate waiter so that a later open is not lost.
struct GateWaitGuard<'a> {
    state: &'a State,
    name: &'a str,
    generation: u64,
    released: bool,
}

impl GateWaitGuard<'_> {
    fn is_released(&self) -> bool {
        lock(&self.state.gates)
            .get(self.name)
            .is_none_or(|g| g.generation != self.generation)
    }
}

impl Drop for GateWaitGuard<'_> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let mut gates = lock(&self.state.gates);
        if let Some(gate) = gates.get_mut(self.name) {
            if gate.generation == self.generation && gate.waiting > 0 {
                gate.waiting -= 1;
            }
        }
    }
}

/// Keeps `in_flight` accurate even when a request future is dropped.
struct InFlightGuard<'a>(&'a AtomicI64);

impl<'a> InFlightGuard<'a> {
    fn new(counter: &'a AtomicI64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(counter)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Removes an upload's bytes from `upload_bytes_in_progress` when it ends.
struct UploadGuard<'a> {
    in_progress: &'a AtomicU64,
    bytes: u64,
}

impl Drop for UploadGuard<'_> {
    fn drop(&mut self) {
        self.in_progress.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Deterministic content
// ---------------------------------------------------------------------------

/// 64-bit FNV-1a: stable across runs, platforms and compiler versions.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64 step, used to derive a sequence of values from one hash.
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn round(x: f64, decimals: i32) -> f64 {
    let p = 10f64.powi(decimals);
    (x * p).round() / p
}

/// `top_k` deterministic search hits for `query`, best first.
fn search_results(query: &str, top_k: u64) -> Vec<Value> {
    let seed = fnv1a(query.as_bytes());
    (0..top_k)
        .map(|i| {
            let r = mix(seed, i);
            let doc = r % 50 + 1;
            let chunk = (r >> 8) % 40 + 1;
            let jitter = ((r >> 16) % 1000) as f64 / 1_000_000.0;
            let score = round((0.95 - i as f64 * 0.04 - jitter).max(0.01), 4);
            json!({
                "document": format!("doc-{doc}.pdf"),
                "chunk": format!("Chunk {chunk} of doc-{doc}.pdf: passage relevant to \"{query}\"."),
                "score": score,
            })
        })
        .collect()
}

fn embedding(text: &str) -> Vec<f64> {
    let seed = fnv1a(text.as_bytes());
    (0..EMBEDDING_DIMS)
        .map(|i| round((mix(seed, i) % 2_000_001) as f64 / 1_000_000.0 - 1.0, 6))
        .collect()
}

// ---------------------------------------------------------------------------
// Request helpers
// ---------------------------------------------------------------------------

/// Reads and parses a JSON body; the error is a message for a 400 answer.
async fn read_json(body: Incoming) -> Result<Value, String> {
    let limited = http_body_util::Limited::new(body, MAX_JSON_BODY);
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return Err(format!("could not read request body: {e}")),
    };
    serde_json::from_slice::<Value>(&bytes).map_err(|e| format!("invalid JSON body: {e}"))
}

/// The non-empty `query` string of a search / RAG body.
fn query_of(v: &Value) -> Result<String, String> {
    match v.get("query") {
        Some(Value::String(q)) if !q.trim().is_empty() => Ok(q.clone()),
        Some(Value::String(_)) => Err("'query' must not be empty".to_owned()),
        Some(_) => Err("'query' must be a string".to_owned()),
        None => Err("missing 'query'".to_owned()),
    }
}

fn top_k_of(v: &Value) -> Result<u64, String> {
    match v.get("top_k") {
        None | Some(Value::Null) => Ok(5),
        Some(t) => t
            .as_u64()
            .map(|k| k.min(MAX_TOP_K))
            .ok_or_else(|| "'top_k' must be a non-negative integer".to_owned()),
    }
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn percent_decode(s: &str) -> String {
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
fn header_fault(headers: &HeaderMap) -> Option<Fault> {
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

fn valid_status(s: u64) -> Option<StatusCode> {
    u16::try_from(s)
        .ok()
        .filter(|s| (200..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
}

fn injected(status: StatusCode) -> Resp {
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

async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Resp, Infallible> {
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

async fn search(req: Request<Incoming>, state: &State) -> Resp {
    let body = match read_json(req.into_body()).await {
        Ok(v) => v,
        Err(msg) => return bad_request(msg),
    };
    let (query, top_k) = match (query_of(&body), top_k_of(&body)) {
        (Ok(q), Ok(k)) => (q, k),
        (Err(msg), _) | (_, Err(msg)) => return bad_request(msg),
    };
    if !state.search_latency.is_zero() {
        tokio::time::sleep(state.search_latency).await;
    }
    let results = search_results(&query, top_k);
    json_response(
        StatusCode::OK,
        &json!({"query": query, "results": results, "count": top_k}),
    )
}

async fn rag_query(req: Request<Incoming>, state: &State) -> Resp {
    let body = match read_json(req.into_body()).await {
        Ok(v) => v,
        Err(msg) => return bad_request(msg),
    };
    let (query, top_k) = match (query_of(&body), top_k_of(&body)) {
        (Ok(q), Ok(k)) => (q, k),
        (Err(msg), _) | (_, Err(msg)) => return bad_request(msg),
    };
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
    json_response(
        StatusCode::OK,
        &json!({"query": query, "answer": answer, "sources": sources, "language": language}),
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
    json_response(
        StatusCode::OK,
        &json!({"success": true, "filename": filename, "bytes": bytes}),
    )
}

// ---------------------------------------------------------------------------
// Control endpoints
// ---------------------------------------------------------------------------

async fn control(req: Request<Incoming>, state: &Arc<State>) -> Resp {
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
    let events = match query_param(req, "events") {
        None => 3,
        Some(s) => match s.parse::<u64>() {
            Ok(n) => n.min(MAX_SSE_EVENTS),
            Err(_) => return bad_request("'events' must be a non-negative integer"),
        },
    };
    let gate = query_param(req, "gate").filter(|g| !g.is_empty());
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let event = |i: u64| Bytes::from(format!("data: event {i}\n\n"));
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

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

fn main() -> Result<(), Box<dyn Error>> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .thread_name("mock-legacy-app")
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve(cli));
    runtime.shutdown_background();
    result
}

async fn serve(cli: Cli) -> Result<(), Box<dyn Error>> {
    // Install the signal handlers before announcing the address, so that a
    // SIGTERM sent right after the line is read still exits with status 0.
    let shutdown = shutdown_signal()?;
    let listener = TcpListener::bind(cli.listen).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State::new(&cli));
    // Run the accept loop on the worker threads, not on the main thread.
    let accept = tokio::spawn(accept_loop(listener, state));
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "mock-legacy-app listening on {addr}")?;
        stdout.flush()?;
    }
    shutdown.await;
    accept.abort();
    Ok(())
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // E.g. EMFILE: back off briefly instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Best effort; latency matters more than packet count here.
        let _ = stream.set_nodelay(true);
        let builder = Arc::clone(&builder);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, Arc::clone(&state)));
            // Connection errors (resets, bad requests) are not interesting here.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Registers the SIGTERM / SIGINT handlers; the future completes on either.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
