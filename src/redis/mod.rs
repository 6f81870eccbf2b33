//! The one Redis client of the sidecar, on fred, shared by the cache and the
//! rate limiter (neither reaches into the other): connection options,
//! timeouts, the key spaces under the prefix, and the commands on entries.
//! [`scripts`] holds the rate limiter's script, [`fleet`] the shared cache
//! state (generations and leases), [`circuit`] the fleet's circuits,
//! [`pubsub`] the fleet's channels.
//! Every command is sent with
//! `fail_fast` and a short timeout (`redis.timeout`, 50 ms), and one attempt:
//! fred's default is to queue commands forever while Redis is down, which
//! would stall requests. A failed call is an error for the caller to count
//! and fall back from; fred reconnects by itself in the background
//! (constant 500 ms policy). [`health`] stops requests waiting on a Redis
//! that keeps timing out, and tracks the subscription that
//! [`RedisStore::is_connected`] also needs; [`sentinel`] follows a
//! Sentinel failover at once.
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

pub mod circuit;
mod clear;
pub mod fleet;
pub mod health;
pub mod pubsub;
pub mod scripts;
mod sentinel;
mod warn;

pub use self::clear::Cleared;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;

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
    /// The fleet's circuits' scripts ([`circuit`]).
    circuit: std::sync::Arc<circuit::CircuitScripts>,
    /// Failures, counted and logged.
    errors: std::sync::Arc<RedisErrors>,
    warnings: std::sync::Arc<warn::Warnings>,
    /// The breaker over Redis's answers and the subscription's state.
    health: std::sync::Arc<health::Health>,
    /// What the URL names (no credentials), for the log.
    target: std::sync::Arc<str>,
    /// Under Sentinel: what follows a failover.
    follower: Option<std::sync::Arc<sentinel::Follower>>,
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
/// every 500 ms while Redis is down): one warning with the legacy app's
/// words when it is lost or cannot be made, and one line when it is back,
/// each naming the server (fred names none for a failure to connect: the
/// URL's target is named then).
fn log_connection_changes(client: &Client, target: &std::sync::Arc<str>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // Up until told otherwise, so that a first failure is reported.
    let up = Arc::new(AtomicBool::new(true));
    let on_error = Arc::clone(&up);
    let target = Arc::clone(target);
    drop(client.on_error(move |(e, server)| {
        if on_error.swap(false, Ordering::Relaxed) {
            let server = server.map_or_else(|| target.to_string(), |s| s.to_string());
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

/// The servers a configuration names, without credentials.
fn describe(server: &ServerConfig) -> String {
    let list = |hosts: &[Server]| {
        hosts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    match server {
        ServerConfig::Centralized { server } => server.to_string(),
        ServerConfig::Clustered { hosts, .. } => format!("cluster {}", list(hosts)),
        ServerConfig::Sentinel {
            hosts,
            service_name,
            ..
        } => format!("{service_name} via sentinels {}", list(hosts)),
    }
}

/// How long a sidecar's readiness waits for Redis at start before it
/// starts on memory alone (fred's connection timeout is 1 s).
const START_WAIT: Duration = Duration::from_secs(2);

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
        let server = config.server.clone();
        let target: std::sync::Arc<str> = describe(&server).into();
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
        log_connection_changes(&client, &target);
        drop(client.connect());
        drop(subscriber.connect());
        drop(subscriber.manage_subscriptions());
        let health = std::sync::Arc::new(health::Health::default());
        let first = client.clone();
        let settle = std::sync::Arc::clone(&health);
        tokio::spawn(async move {
            if !matches!(
                tokio::time::timeout(START_WAIT, first.wait_for_connect()).await,
                Ok(Ok(()))
            ) {
                settle.settle();
            }
        });
        let mut store = Self {
            client,
            subscriber,
            prefix: prefix.to_string(),
            timeout,
            origin: uuid::Uuid::new_v4().to_string(),
            gcra: std::sync::Arc::new(fred::types::scripts::Script::from_lua(scripts::GCRA_LUA)),
            quota: std::sync::Arc::new(fred::types::scripts::Script::from_lua(scripts::QUOTA_LUA)),
            fleet: std::sync::Arc::new(fleet::FleetScripts::new()),
            circuit: std::sync::Arc::new(circuit::CircuitScripts::new()),
            errors,
            warnings: std::sync::Arc::new(warn::Warnings::default()),
            health,
            target,
            follower: None,
        };
        if let ServerConfig::Sentinel {
            hosts,
            service_name,
            username,
            password,
        } = server
        {
            store.follower = Some(sentinel::follow(
                &store,
                hosts,
                service_name,
                (username, password),
            ));
        }
        Ok(store)
    }

    /// `redis_connected`: commands are answered in time and the fleet's
    /// invalidations can be heard (PRODUCT.md "Cache").
    pub fn is_connected(&self) -> bool {
        self.is_usable() && self.subscriber.is_connected() && self.health.is_subscribed()
    }

    /// Commands may be sent: connected, and not bypassed as slow.
    pub fn is_usable(&self) -> bool {
        self.client.is_connected() && !self.health.is_bypassed()
    }

    /// Readiness waits for this at start: the first subscription made, or
    /// Redis unreachable at start (the sidecar then starts on memory).
    pub fn is_settled(&self) -> bool {
        self.health.is_settled()
    }

    /// The server the commands go to (`host:port`), if connected.
    pub fn server(&self) -> Option<String> {
        self.client
            .active_connections()
            .first()
            .map(ToString::to_string)
    }

    pub(crate) fn opts(&self) -> Options {
        Options {
            fail_fast: true,
            timeout: Some(self.timeout),
            max_attempts: Some(1),
            ..Options::default()
        }
    }

    /// `Err(Disconnected)`, counted, while the client is not connected or
    /// Redis is bypassed as slow: nothing is sent (fred would queue it until
    /// Redis is back) and nothing is waited for.
    pub(crate) fn check(&self, op: RedisOp) -> Result<(), RedisError> {
        if self.is_usable() {
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
        if kind == RedisErrorKind::Timeout && self.health.timed_out() {
            self.check_until_in_time();
        }
        if let RedisError::Command(e) = e {
            if e.details().starts_with("READONLY") {
                // A demoted primary: under Sentinel, ask again who leads.
                sentinel::on_readonly(self);
            }
        }
    }

    /// Redis stopped answering in time: requests stop waiting for it, and
    /// one `PING` every [`health::CHECK_EVERY`] looks for an answer in time.
    fn check_until_in_time(&self) {
        tracing::warn!(
            server = %self.target,
            "Redis is slow: {} commands in a row took over {:?}; requests stop waiting for it (memory cache, per-sidecar limits) until it answers in time again",
            health::TRIP_AFTER,
            self.timeout
        );
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(health::CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !this.client.is_connected() {
                    continue;
                }
                let c = this.client.with_options(&this.opts());
                let ping = tokio::time::timeout(this.timeout, c.ping::<String>(None)).await;
                if matches!(ping, Ok(Ok(_))) {
                    this.health.recovered();
                    tracing::info!(server = %this.server().unwrap_or_default(), "Redis answers in time again: requests use it again");
                    return;
                }
            }
        });
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
                // fred's own timeout (the same limit) fires first.
                Ok(Err(e)) if *e.kind() == fred::error::ErrorKind::Timeout => {
                    Err(RedisError::Timeout(limit))
                }
                Ok(r) => r.map_err(RedisError::from),
                Err(_) => Err(RedisError::Timeout(limit)),
            };
            match &r {
                Err(e) => self.failed(op, e),
                Ok(_) => self.health.answered(),
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
}
