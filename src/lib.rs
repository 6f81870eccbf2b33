//! rag-sidecar: a reverse-proxy sidecar that puts caching, rate limiting,
//! retries, circuit breaking and observability in front of a legacy Flask
//! RAG app without touching it.
//!
//! The tree shows the stack: [`server`] accepts connections and hands each
//! request to [`admin`] (the sidecar's own endpoints) or to the proxy stack
//! assembled in [`layers::build_stack`], which ends in [`proxy`], the pooled
//! upstream client. [`config`] builds the one configuration every part reads;
//! [`error`] is the one place typed errors become JSON responses. [`metrics`]
//! records and renders the figures, [`system`] watches the machine and
//! [`health`] scores it all.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]

pub mod admin;
pub mod body;
pub mod config;
pub mod error;
pub mod health;
pub mod layers;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod server;
pub mod system;

/// The error type inside the stack; [`error::rescue`] turns it into a response.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
