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

pub mod fleet;
pub mod pubsub;
pub mod scripts;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::scan::Scanner;
use futures_util::StreamExt;

use crate::config::RedisConfig;

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
    /// The fleet's scripts ([`fleet`]).
    fleet: std::sync::Arc<fleet::FleetScripts>,
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
    /// The client `redis.url` asks for, started; `None` without a URL.
    pub fn from_config(cfg: &RedisConfig) -> Result<Option<Self>, RedisError> {
        cfg.url
            .as_deref()
            .map(|url| Self::start(url, cfg.timeout, &cfg.key_prefix))
            .transpose()
    }

    /// Builds the clients and starts connecting in the background; never
    /// waits for Redis, so a sidecar starts (memory-only) while it is down.
    pub fn start(url: &str, timeout: Duration, prefix: &str) -> Result<Self, RedisError> {
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
            fleet: std::sync::Arc::new(fleet::FleetScripts::new()),
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

    /// Bounds a call by the timeout even if fred's own does not fire.
    ///
    /// Boxed: fred's command futures are several KiB, and every future that
    /// awaits a Redis call inline (the cache's request future among them)
    /// would grow by as much and be copied whole on each request, Redis used
    /// or not.
    pub(crate) fn bounded<'a, T: Send + 'a>(
        &self,
        fut: impl Future<Output = Result<T, fred::error::Error>> + Send + 'a,
    ) -> Pin<Box<dyn Future<Output = Result<T, RedisError>> + Send + 'a>> {
        let limit = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(limit + Duration::from_millis(5), fut).await {
                Ok(r) => Ok(r?),
                Err(_) => Err(RedisError::Timeout(limit)),
            }
        })
    }

    pub(crate) fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RedisError> {
        if !self.is_connected() {
            return Err(RedisError::Disconnected);
        }
        let c = self.client.with_options(&self.opts());
        self.bounded(c.get::<Option<Vec<u8>>, _>(self.full_key(key)))
            .await
    }

    /// `SET key value PX ttl`.
    pub async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), RedisError> {
        if !self.is_connected() {
            return Err(RedisError::Disconnected);
        }
        let px = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let c = self.client.with_options(&self.opts());
        self.bounded(c.set::<(), _, _>(
            self.full_key(key),
            value,
            Some(Expiration::PX(px)),
            None,
            false,
        ))
        .await
    }

    /// The fleet's secret for keyed hashes: made by whichever sidecar asks
    /// first (`SET NX`, never expiring), then read by every one.
    pub async fn fleet_secret(&self) -> Result<String, RedisError> {
        if !self.is_connected() {
            return Err(RedisError::Disconnected);
        }
        let key = self.full_key(FLEET_SECRET_KEY);
        // 244 random bits (two v4 UUIDs, from a CSPRNG).
        let fresh = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let c = self.client.with_options(&self.opts());
        self.bounded(c.set::<Option<String>, _, _>(
            key.clone(),
            fresh,
            None,
            Some(SetOptions::NX),
            false,
        ))
        .await?;
        self.bounded(c.get::<Option<String>, _>(key.clone()))
            .await?
            .ok_or(RedisError::Missing(key))
    }

    /// Deletes the keys matching a glob (under the prefix) with SCAN MATCH and
    /// UNLINK in pages of 100, never KEYS. Returns how many were removed.
    pub async fn clear(&self, pattern: &str) -> Result<usize, RedisError> {
        if !self.is_connected() {
            return Err(RedisError::Disconnected);
        }
        let full = self.full_key(pattern);
        let mut removed = 0usize;
        let mut pages = if self.client.is_clustered() {
            self.client.scan_cluster(full, Some(100), None).boxed()
        } else {
            self.client.scan(full, Some(100), None).boxed()
        };
        loop {
            let page = match tokio::time::timeout(self.timeout * 4, pages.next()).await {
                Ok(Some(p)) => p?,
                Ok(None) => break,
                Err(_) => return Err(RedisError::Timeout(self.timeout * 4)),
            };
            let mut page = page;
            if let Some(mut keys) = page.take_results() {
                // The rate limiter's and the fleet's keys share the prefix:
                // a cache clear must not reset anyone's limits, nor the
                // generations and leases.
                let limiter = format!("{}{RATE_LIMIT_SPACE}", self.prefix);
                let fleet = format!("{}{}", self.prefix, fleet::FLEET_SPACE);
                keys.retain(|k| {
                    k.as_str()
                        .is_none_or(|k| !k.starts_with(&limiter) && !k.starts_with(&fleet))
                });
                if !keys.is_empty() {
                    let c = self.client.with_options(&self.opts());
                    let n: i64 = self.bounded(c.unlink(keys)).await?;
                    removed += usize::try_from(n).unwrap_or(0);
                }
            }
            page.next();
        }
        Ok(removed)
    }
}
