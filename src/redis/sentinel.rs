//! Following a Sentinel failover at once (PRODUCT.md "Cache": Sentinel).
//!
//! fred asks the sentinels for the primary, and checks that server's role,
//! on every (re)connection; but nothing makes it reconnect while the old
//! primary keeps its connections open: frozen, cut off, or alive and not yet
//! demoted. In the fault trial of issue 34 the sidecars stayed ~10 s on a
//! resumed old primary (split brain). Here one fred [`SentinelClient`] per
//! sentinel the URL names listens for `+switch-master`, and asks every
//! [`POLL_EVERY`] who the primary is (a message lost while a sentinel
//! connection was down is made up for). When the primary named is not the
//! server the sidecar's connections go to, both clients reconnect: fred asks
//! the sentinels again and checks the new server's role before it sends
//! anything. A `READONLY` reply (a demoted primary) asks at once.

use std::sync::Arc;
use std::time::Duration;

use fred::clients::{SentinelClient, SubscriberClient};
use fred::prelude::*;
use fred::types::config::SentinelConfig;

use super::RedisStore;

/// How often a sentinel is asked who the primary is.
pub(super) const POLL_EVERY: Duration = Duration::from_secs(1);

/// The channel on which sentinels announce a new primary:
/// `<service> <old-ip> <old-port> <new-ip> <new-port>`.
const SWITCH_MASTER: &str = "+switch-master";

/// How long one reconnection of a client may take before it is left to
/// fred's own reconnect policy.
const RECONNECT_LIMIT: Duration = Duration::from_secs(2);

/// The sidecar's two clients, and who to ask about them.
pub(super) struct Follower {
    client: Client,
    subscriber: SubscriberClient,
    service: String,
    /// One reconnection at a time: every sentinel announces the same switch.
    busy: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("service", &self.service)
            .finish()
    }
}

/// Starts following the sentinels `hosts` for `service` (credentials for
/// the sentinels from the URL's `sentinelUsername`/`sentinelPassword`).
pub(super) fn follow(
    store: &RedisStore,
    hosts: Vec<Server>,
    service: String,
    auth: (Option<String>, Option<String>),
) -> Arc<Follower> {
    let follower = Arc::new(Follower {
        client: store.client.clone(),
        subscriber: store.subscriber.clone(),
        service,
        busy: tokio::sync::Mutex::new(()),
    });
    let sentinels: Vec<SentinelClient> = hosts
        .iter()
        .map(|h| {
            SentinelClient::new(
                SentinelConfig {
                    host: h.host.to_string(),
                    port: h.port,
                    username: auth.0.clone(),
                    password: auth.1.clone(),
                },
                Some(PerformanceConfig {
                    default_command_timeout: Duration::from_secs(1),
                    ..PerformanceConfig::default()
                }),
                Some(ConnectionConfig {
                    connection_timeout: Duration::from_secs(1),
                    internal_command_timeout: Duration::from_secs(1),
                    max_command_attempts: 1,
                    ..ConnectionConfig::default()
                }),
                Some(ReconnectPolicy::new_constant(0, 500)),
            )
        })
        .collect();
    for s in &sentinels {
        drop(s.connect());
        listen(s.clone(), Arc::clone(&follower));
    }
    tokio::spawn(poll(sentinels, Arc::downgrade(&follower)));
    follower
}

/// Subscribes to `+switch-master` on every (re)connection of `sentinel`
/// and follows what it announces.
fn listen(sentinel: SentinelClient, follower: Arc<Follower>) {
    let mut reconnects = sentinel.reconnect_rx();
    let on_connect = sentinel.clone();
    tokio::spawn(async move {
        loop {
            if on_connect.is_connected() {
                // A sentinel does not keep subscriptions across a
                // reconnection: made again after each.
                if let Err(e) = on_connect.subscribe(SWITCH_MASTER).await {
                    tracing::debug!("sentinel: cannot subscribe to {SWITCH_MASTER}: {e}");
                }
            }
            match reconnects.recv().await {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let mut messages = sentinel.message_rx();
    tokio::spawn(async move {
        loop {
            match messages.recv().await {
                Ok(m) if *m.channel == *SWITCH_MASTER => {
                    let Some(text) = m.value.as_string() else {
                        continue;
                    };
                    if let Some(primary) = switch_master(&text, &follower.service) {
                        tracing::info!(%primary, "Sentinel announced a new primary");
                        follower.to(Some(primary)).await;
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// Asks a connected sentinel who the primary is, every [`POLL_EVERY`],
/// while the follower lives.
async fn poll(sentinels: Vec<SentinelClient>, follower: std::sync::Weak<Follower>) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(f) = follower.upgrade() else {
            for s in &sentinels {
                drop(s.quit().await);
            }
            return;
        };
        for s in sentinels.iter().filter(|s| s.is_connected()) {
            if let Ok(Some((host, port))) = s
                .get_master_addr_by_name::<Option<(String, u16)>, _>(f.service.as_str())
                .await
            {
                f.to(Some(Server::new(host, port))).await;
                break;
            }
        }
    }
}

/// The new primary a `+switch-master` message announces for `service`.
fn switch_master(text: &str, service: &str) -> Option<Server> {
    let mut words = text.split_ascii_whitespace();
    if words.next()? != service {
        return None;
    }
    let (_old_host, _old_port) = (words.next()?, words.next()?);
    let host = words.next()?;
    let port = words.next()?.parse().ok()?;
    Some(Server::new(host, port))
}

impl Follower {
    /// Moves both clients to `primary` unless they are there already;
    /// `None` (a `READONLY` reply): reconnects them, fred asks the
    /// sentinels who leads and checks its role.
    pub(super) async fn to(&self, primary: Option<Server>) {
        let _one = self.busy.lock().await;
        // A client with no connection is reconnecting already, and fred
        // asks the sentinels then: only one connected elsewhere is moved
        // (no reconnection storm, no log line a second, while a primary is
        // down before the failover).
        let elsewhere = |conns: Vec<Server>| {
            !conns.is_empty()
                && primary
                    .as_ref()
                    .is_none_or(|p| !conns.iter().any(|s| s.host == p.host && s.port == p.port))
        };
        let move_client = elsewhere(self.client.active_connections());
        let move_subscriber = elsewhere(self.subscriber.active_connections());
        if !move_client && !move_subscriber {
            return;
        }
        let was = self.client.active_connections();
        tracing::warn!(
            was = ?was.iter().map(ToString::to_string).collect::<Vec<_>>(),
            now = %primary.as_ref().map(ToString::to_string).unwrap_or_else(|| "(ask the sentinels)".into()),
            "Redis primary changed: reconnecting to the one Sentinel names"
        );
        tokio::join!(
            reconnect(&self.client, move_client),
            reconnect(&self.subscriber, move_subscriber),
        );
    }
}

/// Makes `client` connect again (fred asks the sentinels), when `go`.
async fn reconnect(client: &impl ClientLike, go: bool) {
    if !go {
        return;
    }
    match tokio::time::timeout(RECONNECT_LIMIT, client.force_reconnection()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!("Redis: reconnecting after a failover failed: {e} (fred retries)")
        }
        Err(_) => tracing::warn!(
            "Redis: reconnecting after a failover took over {RECONNECT_LIMIT:?} (fred retries)"
        ),
    }
}

/// A `READONLY` reply: the server the sidecar writes to is a replica now.
pub(super) fn on_readonly(store: &RedisStore) {
    if let Some(f) = store.follower.clone() {
        // Once at a time: replies to commands in flight are all READONLY.
        if f.busy.try_lock().is_ok() {
            tokio::spawn(async move { f.to(None).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_master_message_names_the_new_primary_of_its_service() {
        let s =
            switch_master("mymaster 127.0.0.1 6379 127.0.0.2 6380", "mymaster").expect("a switch");
        assert_eq!((&*s.host, s.port), ("127.0.0.2", 6380));
        assert!(switch_master("other 127.0.0.1 6379 127.0.0.2 6380", "mymaster").is_none());
        assert!(switch_master("mymaster 127.0.0.1", "mymaster").is_none());
    }
}
