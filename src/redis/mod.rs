//! The one Redis client of the sidecar, on fred, shared by the cache and the
//! rate limiter (neither reaches into the other): connection options,
//! timeouts, the key spaces under the prefix, and the commands on entries.
//! [`scripts`] holds the rate limiter's script, [`fleet`] the shared cache
//! state (generations and leases), [`pubsub`] the fleet's channels.
//! Every command is sent with
//! `fail_fast` and a short timeout (`redis.timeout`, 50 ms), and one attempt:
//! fred's default is to queue commands forever while Redis is down, which
//! would stall requests. A failed call is an error for the caller to count
//! and fall back from; fred reconnects by itself in the background
//! (constant 500 ms policy) and [`RedisStore::is_connected`] follows it.
//!
//! One client, one connection and one reconnect policy serve the cache's
//! entries, the invalidation messages and the rate limiter's shared mode.
//!
//! Every failure is counted by operation and kind
//! ([`crate::metrics::redis::RedisErrors`], in `/metrics`) and logged at
//! WARN ([`warn::Warnings`]: the first of each operation, then a summary at
//! most every 30 s). A single server, a Sentinel-managed one or a Redis
//! Cluster (`redis-cluster://`) are all served: every command names one key,
//! or keys of one hash slot, so none fails with `CROSSSLOT` (each
//! multi-key operation says how it stays in one slot).

pub mod fleet;
pub mod pubsub;
pub mod scripts;
mod warn;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::scan::Scanner;
use futures_util::StreamExt;

use crate::config::RedisConfig;
use crate::metrics::redis::{RedisErrorKind, RedisErrors, RedisOp};

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis: {0}")]
    Command(#[from] fred::error::Error),
    #[error("redis: no answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: not connected (reconnecting in the background)")]
    Disconnected,
    #[error("redis: {0} is missing")]
    Missing(String),
}

/// The key space (after the prefix) of the rate limiter's keys.
pub const RATE_LIMIT_SPACE: &str = "rl:";

/// The fleet's secret of the keyed hash of client keys (in the limiter's
/// space, so a cache clear leaves it).
pub const FLEET_SECRET_KEY: &str = "rl:secret";

#[derive(Clone)]
pub struct RedisStore {
    client: Client,
    subscriber: SubscriberClient,
    prefix: String,
    timeout: Duration,
    /// Identifies this process's own invalidation messages.
    origin: String,
    /// The rate limiter's script ([`scripts::GCRA_LUA`]).
    gcra: std::sync::Arc<fred::types::scripts::Script>,
    /// The upstream quota's script ([`scripts::QUOTA_LUA`]).
    quota: std::sync::Arc<fred::types::scripts::Script>,
    /// The fleet's scripts ([`fleet`]).
    fleet: std::sync::Arc<fleet::FleetScripts>,
    /// Failures, counted and logged.
    errors: std::sync::Arc<RedisErrors>,
    warnings: std::sync::Arc<warn::Warnings>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("connected", &self.client.is_connected())
            .finish()
    }
}

/// Logs the connection's changes, not every failed attempt (fred retries
/// every 500 ms while Redis is down): a warning with the legacy app's words
/// when it is lost or cannot be made, and a line when it is back.
fn log_connection_changes(client: &Client) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // Up until told otherwise, so that a first failure is reported.
    let up = Arc::new(AtomicBool::new(true));
    let on_error = Arc::clone(&up);
    drop(client.on_error(move |(e, server)| {
        if on_error.swap(false, Ordering::Relaxed) {
            let server = server.map(|s| s.to_string()).unwrap_or_default();
            tracing::warn!(%server, "Redis connection failed, falling back to in-memory cache: {e}");
        } else {
            tracing::debug!("redis: still unreachable: {e}");
        }
        std::future::ready(Ok(()))
    }));
    drop(client.on_reconnect(move |server| {
        if !up.swap(true, Ordering::Relaxed) {
            tracing::info!(%server, "Redis connected again: the cache is shared again");
        } else {
            tracing::info!(%server, "Redis connected");
        }
        std::future::ready(Ok(()))
    }));
}

impl RedisStore {
    /// The client `redis.url` asks for, started, counting its failures in
    /// `errors`; `None` without a URL.
    pub fn from_config(
        cfg: &RedisConfig,
        errors: std::sync::Arc<RedisErrors>,
    ) -> Result<Option<Self>, RedisError> {
        cfg.url
            .as_deref()
            .map(|url| Self::start(url, cfg.timeout, &cfg.key_prefix, errors))
            .transpose()
    }

    /// Builds the clients and starts connecting in the background; never
    /// waits for Redis, so a sidecar starts (memory-only) while it is down.
    pub fn start(
        url: &str,
        timeout: Duration,
        prefix: &str,
        errors: std::sync::Arc<RedisErrors>,
    ) -> Result<Self, RedisError> {
        let mut config = Config::from_url(url)?;
        // Reconnect on the first connection too, rather than giving up.
        config.fail_fast = false;
        let mut builder = Builder::from_config(config);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(1);
                c.internal_command_timeout = Duration::from_secs(1);
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
            })
            .set_policy(ReconnectPolicy::new_constant(0, 500));
        let client = builder.build()?;
        let subscriber = builder.build_subscriber_client()?;
        // The connection tasks run detached: dropping a JoinHandle does not
        // stop its task.
        log_connection_changes(&client);
        drop(client.connect());
        drop(subscriber.connect());
        drop(subscriber.manage_subscriptions());
        Ok(Self {
            client,
            subscriber,
            prefix: prefix.to_string(),
            timeout,
            origin: uuid::Uuid::new_v4().to_string(),
            gcra: std::sync::Arc::new(fred::types::scripts::Script::from_lua(scripts::GCRA_LUA)),
            quota: std::sync::Arc::new(fred::types::scripts::Script::from_lua(scripts::QUOTA_LUA)),
            fleet: std::sync::Arc::new(fleet::FleetScripts::new()),
            errors,
            warnings: std::sync::Arc::new(warn::Warnings::default()),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    pub(crate) fn opts(&self) -> Options {
        Options {
            fail_fast: true,
            timeout: Some(self.timeout),
            max_attempts: Some(1),
            ..Options::default()
        }
    }

    /// `Err(Disconnected)`, counted, while the client is not connected:
    /// nothing is sent (fred would queue it until Redis is back).
    pub(crate) fn check(&self, op: RedisOp) -> Result<(), RedisError> {
        if self.is_connected() {
            Ok(())
        } else {
            self.errors.record(op, RedisErrorKind::Disconnected);
            Err(RedisError::Disconnected)
        }
    }

    /// Counts and logs a failure of `op`.
    pub(crate) fn failed(&self, op: RedisOp, e: &RedisError) {
        let kind = match e {
            RedisError::Timeout(_) => RedisErrorKind::Timeout,
            RedisError::Disconnected => RedisErrorKind::Disconnected,
            RedisError::Command(_) | RedisError::Missing(_) => RedisErrorKind::Error,
        };
        self.errors.record(op, kind);
        // A lost connection is logged once by itself, not per command.
        if kind != RedisErrorKind::Disconnected {
            self.warnings.failed(op, e);
        }
    }

    /// Bounds a call of `op` by the timeout even if fred's own does not
    /// fire, and counts its failure.
    ///
    /// Boxed: fred's command futures are several KiB, and every future that
    /// awaits a Redis call inline (the cache's request future among them)
    /// would grow by as much and be copied whole on each request, Redis used
    /// or not.
    pub(crate) fn bounded<'a, T: Send + 'a>(
        &'a self,
        op: RedisOp,
        fut: impl Future<Output = Result<T, fred::error::Error>> + Send + 'a,
    ) -> Pin<Box<dyn Future<Output = Result<T, RedisError>> + Send + 'a>> {
        let limit = self.timeout;
        Box::pin(async move {
            let r = match tokio::time::timeout(limit + Duration::from_millis(5), fut).await {
                Ok(r) => r.map_err(RedisError::from),
                Err(_) => Err(RedisError::Timeout(limit)),
            };
            if let Err(e) = &r {
                self.failed(op, e);
            }
            r
        })
    }

    pub(crate) fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RedisError> {
        self.check(RedisOp::Get)?;
        let c = self.client.with_options(&self.opts());
        self.bounded(
            RedisOp::Get,
            c.get::<Option<Vec<u8>>, _>(self.full_key(key)),
        )
        .await
    }

    /// `SET key value PX ttl`.
    pub async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), RedisError> {
        self.check(RedisOp::Set)?;
        let px = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let c = self.client.with_options(&self.opts());
        self.bounded(
            RedisOp::Set,
            c.set::<(), _, _>(
                self.full_key(key),
                value,
                Some(Expiration::PX(px)),
                None,
                false,
            ),
        )
        .await
    }

    /// The fleet's secret for keyed hashes: made by whichever sidecar asks
    /// first (`SET NX`, never expiring), then read by every one.
    pub async fn fleet_secret(&self) -> Result<String, RedisError> {
        self.check(RedisOp::Secret)?;
        let key = self.full_key(FLEET_SECRET_KEY);
        // 244 random bits (two v4 UUIDs, from a CSPRNG).
        let fresh = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let c = self.client.with_options(&self.opts());
        // One key, two commands: one slot.
        self.bounded(
            RedisOp::Secret,
            c.set::<Option<String>, _, _>(key.clone(), fresh, None, Some(SetOptions::NX), false),
        )
        .await?;
        let secret = self
            .bounded(RedisOp::Secret, c.get::<Option<String>, _>(key.clone()))
            .await?;
        secret.ok_or_else(|| {
            let e = RedisError::Missing(key);
            self.failed(RedisOp::Secret, &e);
            e
        })
    }

    /// Deletes the keys matching a glob (under the prefix) with SCAN MATCH
    /// (on every primary of a cluster) and UNLINK, never KEYS; the
    /// limiter's and the fleet's keys are never deleted. A failure does not
    /// stop the clear: it goes on with the rest and counts what it could
    /// not do.
    pub async fn clear(&self, pattern: &str) -> Cleared {
        let mut out = Cleared::default();
        if self.check(RedisOp::Clear).is_err() {
            out.errors += 1;
            return out;
        }
        let full = self.full_key(pattern);
        let clustered = self.client.is_clustered();
        let mut pages = if clustered {
            self.client.scan_cluster(full, Some(100), None).boxed()
        } else {
            self.client.scan(full, Some(100), None).boxed()
        };
        // The rate limiter's and the fleet's keys share the prefix: a cache
        // clear must not reset anyone's limits, nor the generations and
        // leases.
        let limiter = format!("{}{RATE_LIMIT_SPACE}", self.prefix);
        let fleet = format!("{}{}", self.prefix, fleet::FLEET_SPACE);
        let page_limit = self.timeout * 4;
        // A scan that keeps failing (a node down) is given up after this
        // many failed pages in a row.
        let mut failing = 0;
        loop {
            let page = match tokio::time::timeout(page_limit, pages.next()).await {
                Ok(Some(Ok(p))) => p,
                Ok(Some(Err(e))) => {
                    self.failed(RedisOp::Clear, &RedisError::Command(e));
                    out.errors += 1;
                    failing += 1;
                    if failing >= 3 {
                        break;
                    }
                    continue;
                }
                Ok(None) => break,
                Err(_) => {
                    self.failed(RedisOp::Clear, &RedisError::Timeout(page_limit));
                    out.errors += 1;
                    break;
                }
            };
            failing = 0;
            let mut page = page;
            if let Some(mut keys) = page.take_results() {
                keys.retain(|k| {
                    k.as_str()
                        .is_none_or(|k| !k.starts_with(&limiter) && !k.starts_with(&fleet))
                });
                // UNLINK names several keys: on a cluster they must be of
                // one hash slot, so a page (one node's, but of many slots)
                // is deleted one slot at a time.
                let groups: Vec<Vec<Key>> = if clustered {
                    let mut by_slot: std::collections::BTreeMap<u16, Vec<Key>> =
                        std::collections::BTreeMap::new();
                    for k in keys {
                        by_slot.entry(k.cluster_hash()).or_default().push(k);
                    }
                    by_slot.into_values().collect()
                } else if keys.is_empty() {
                    Vec::new()
                } else {
                    vec![keys]
                };
                for group in groups {
                    let n = group.len();
                    let c = self.client.with_options(&self.opts());
                    match self
                        .bounded(RedisOp::Clear, c.unlink::<i64, _>(group))
                        .await
                    {
                        Ok(removed) => out.removed += usize::try_from(removed).unwrap_or(0),
                        Err(_) => {
                            out.errors += 1;
                            out.failed += n;
                        }
                    }
                }
            }
            page.next();
        }
        out
    }
}

/// What a clear did in Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Keys deleted.
    pub removed: usize,
    /// Keys found but not deleted (their command failed).
    pub failed: usize,
    /// Commands that failed (a failed scan leaves an unknown number of keys).
    pub errors: usize,
}
