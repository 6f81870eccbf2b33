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
//!   counted): `stats`, `stats/reset`, `echo`, `sse`, `gate/{name}`, `fast`;
//! * a streamed RAG answer: `POST /api/rag/query` with
//!   `Accept: text/event-stream` answers in server-sent events
//!   (`X-Mock-Stream-Events`, default 5, one every
//!   `X-Mock-Stream-Interval-Ms`, default 20, each padded by
//!   `X-Mock-Stream-Pad` bytes), and `X-Mock-Stream-Break-After: k` breaks
//!   the connection after k events;
//! * a `corpus_version` in every search and RAG answer, bumped by every
//!   upload and deletion;
//! * Gemini's quota on `/api/rag/query` (`--quota N --quota-window-ms W`),
//!   with the calls over it (`quota_errors`) and the order the questions
//!   arrived in (`rag_queries`, the last 1000) in `/__mock/stats`.
//!
//! After binding, it prints exactly one line,
//! `mock-legacy-app listening on <addr>`, to stdout and exits with status 0 on
//! SIGTERM or SIGINT.
//!
//! This file owns the command line and the runtime; `server` the listener and
//! the signals, `routing` the legacy API, `control` the `/__mock/` endpoints,
//! `state` what requests share, `request` the parsing and fault helpers,
//! `content` the deterministic answers and `body` the response type.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "the mock app is test scaffolding, not the request path: plain locks over its scripted state"
)]

mod body;
mod content;
mod control;
mod request;
mod routing;
mod server;
mod state;

use std::error::Error;
use std::net::SocketAddr;

use clap::Parser;

/// Command line of the mock.
#[derive(Debug, Parser)]
#[command(
    name = "mock-legacy-app",
    about = "Mock of the legacy Flask RAG Services app"
)]
pub(crate) struct Cli {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub(crate) listen: SocketAddr,
    /// Simulated work time of /api/search, in milliseconds.
    #[arg(long, default_value_t = 250)]
    pub(crate) search_latency_ms: u64,
    /// Simulated work time of /api/rag/query, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub(crate) rag_latency_ms: u64,
    /// Number of tokio worker threads.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// Gemini's quota: at most this many /api/rag/query calls per
    /// `--quota-window-ms` (a sliding window, as Gemini's per-minute
    /// quota is: never more than that many in any span of the window); beyond it the Gemini quota
    /// error (429 RESOURCE_EXHAUSTED). 0: no quota.
    #[arg(long, default_value_t = 0)]
    pub(crate) quota: u64,
    /// The quota's window, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub(crate) quota_window_ms: u64,
}

fn main() -> Result<(), Box<dyn Error>> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .thread_name("mock-legacy-app")
        .enable_all()
        .build()?;
    let result = runtime.block_on(server::serve(cli));
    runtime.shutdown_background();
    result
}
