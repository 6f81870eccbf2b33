//! rag-sidecar: a reverse-proxy sidecar that puts caching, rate limiting,
//! retries, circuit breaking and observability in front of a legacy Flask
//! RAG app without touching it.
//!
//! # Layering
//!
//! A module may use what sits below it, never above it; a layer never uses
//! another layer. `tests/architecture.rs` reads every `crate::` and
//! `super::` path of the library against its table of allowed dependencies,
//! so this stays true: a new module gets a row there and a place here.
//!
//! ```text
//! main (binary)       parses the CLI, loads the config, runs the app
//!  └ app              composition root: builds the process-wide state,
//!    │                starts the background tasks, one stack per worker
//!    └ server         accepts and serves connections; dispatch (an enum)
//!      └ admin        the sidecar's own endpoints: reads layer state, metrics
//!        └ layers     build_stack: which layer wraps which, and why
//!          └ layers::{match_route, access_log, rescue, inflight, rate_limit,
//!          │          body_limit, cache, buffer, timeout, retry, quota,
//!          │          circuit, classify, trace_span, attempt_span}
//!          │          one concern each; none uses another
//!          └ trace    the W3C trace context, span export (OTLP/HTTP)
//!          └ proxy    the upstream client, headers, the readiness probe
//!            └ redis  one Redis client (cache, limiter, quota): scripts,
//!              │      the fleet's keys, pub/sub
//!              └ metrics   per concern; each layer records into it or
//!                │         reports through a trait it defines
//!                └ system · health
//!                  └ extensions   what layers pass each other on a request
//!                    └ service    the shared tower plumbing (OnAnswer, …)
//!                      └ error    every typed error of the request path
//!                        └ logging · route · config · body · memory
//! ```
//!
//! Two answers are made before the stack, in [`server`], on purpose: 400 for
//! a request refused at the edge, and 404 for an admin path on the proxy
//! port when `admin_listen` moved the endpoints.
//!
//! What two layers share travels as a typed extension ([`extensions`]): the
//! client address, the deadline, the body-sent flag, a stale answer at hand,
//! the upstream failure, the cache outcome. An error becomes a response in
//! one place, the rescue layer; a layer that wants headers on its error
//! attaches them to the error ([`error::Decorated`]). Metrics imports no
//! layer: the cache, the limiter, the breakers and the readiness probe
//! report through traits of [`metrics`] that they implement.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]

pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod error;
pub mod extensions;
pub mod health;
pub mod layers;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod proxy;
pub mod redis;
pub mod route;
pub mod server;
pub mod service;
pub mod system;
pub mod trace;

/// The error type inside the stack; the rescue layer turns it into a response.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
