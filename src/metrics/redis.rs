//! Redis command failures by operation and kind ([`RedisErrors`], which the
//! Redis client records into), exported as
//! `rag_sidecar_redis_errors_total{op, kind}`. Every series of the bounded
//! label set exists from the start, at 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{IntCounterVec, Registry};

use super::{opts, raise_vec, reg};

/// What the sidecar asked Redis to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOp {
    /// Read a cache entry.
    Get,
    /// Write a cache entry.
    Set,
    /// Delete entries (a clear or a purge: SCAN, UNLINK).
    Clear,
    /// Publish an invalidation.
    Publish,
    /// The shared rate limiter's check.
    RateLimit,
    /// The upstream quota's reservation.
    Quota,
    /// The fleet's secret for keyed client hashes.
    Secret,
    /// Read or bump the namespaces' generations.
    Generations,
    /// Take, renew or release a lease.
    Lease,
    /// Write or read the fleet's state of a circuit.
    Circuit,
}

impl RedisOp {
    pub const ALL: [RedisOp; 10] = [
        Self::Get,
        Self::Set,
        Self::Clear,
        Self::Publish,
        Self::RateLimit,
        Self::Quota,
        Self::Secret,
        Self::Generations,
        Self::Lease,
        Self::Circuit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Set => "set",
            Self::Clear => "clear",
            Self::Publish => "publish",
            Self::RateLimit => "rate_limit",
            Self::Quota => "quota",
            Self::Secret => "secret",
            Self::Generations => "generations",
            Self::Lease => "lease",
            Self::Circuit => "circuit",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// How it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisErrorKind {
    /// Redis answered with an error (`CROSSSLOT`, `NOSCRIPT`, `OOM`, …) or
    /// the connection broke during the call.
    Error,
    /// No answer within `redis.timeout`.
    Timeout,
    /// Not sent: not connected (reconnecting in the background).
    Disconnected,
}

impl RedisErrorKind {
    pub const ALL: [RedisErrorKind; 3] = [Self::Error, Self::Timeout, Self::Disconnected];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::Disconnected => "disconnected",
        }
    }
}

const OPS: usize = RedisOp::ALL.len();
const KINDS: usize = RedisErrorKind::ALL.len();

/// Failures since start, by operation and kind.
#[derive(Debug, Default)]
pub struct RedisErrors([[AtomicU64; KINDS]; OPS]);

impl RedisErrors {
    pub fn record(&self, op: RedisOp, kind: RedisErrorKind) {
        self.0[op.index()][kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, op: RedisOp, kind: RedisErrorKind) -> u64 {
        self.0[op.index()][kind as usize].load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct RedisMetrics {
    source: Arc<RedisErrors>,
    errors: IntCounterVec,
}

impl RedisMetrics {
    pub fn new(r: &Registry, source: Arc<RedisErrors>) -> Self {
        Self {
            source,
            errors: series!(
                r,
                IntCounterVec,
                opts(
                    "redis_errors_total",
                    "Redis commands that failed, by operation and kind (error, timeout, disconnected)"
                ),
                &["op", "kind"]
            ),
        }
    }

    pub fn sync(&self) {
        for op in RedisOp::ALL {
            for kind in RedisErrorKind::ALL {
                raise_vec(
                    &self.errors,
                    &[op.as_str(), kind.as_str()],
                    self.source.get(op, kind),
                );
            }
        }
    }
}
