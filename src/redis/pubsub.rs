//! The fleet's channels: `<prefix>invalidate` carries the patterns an
//! upload or a clear removed and the generations it left, so that every
//! sidecar updates its memory layer at once; `<prefix>stored` carries the
//! key whose lease just ended, so that the sidecars waiting on it look at
//! once. Both are a fast path only: what a lost message would have said is
//! also found by polling (the generations every `cache.generation_poll`,
//! a lease every 100 ms).

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;

use serde_json::json;

use super::fleet::Generation;
use super::{RedisError, RedisStore};
use crate::metrics::redis::RedisOp;

/// What the fleet's channels and connections tell a sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetEvent {
    /// Another sidecar invalidated: narrow patterns to delete, and the
    /// generations whole namespaces now have.
    Invalidated {
        patterns: Vec<String>,
        generations: Vec<(String, Generation)>,
    },
    /// A lease on this cache key ended (its entry stored, or its holder
    /// gave up).
    LeaseEnded(String),
    /// A connection to Redis was (re)made: messages may have been missed.
    Reconnected,
}

impl RedisStore {
    fn channel(&self) -> String {
        format!("{}invalidate", self.prefix)
    }

    /// Tells every sidecar (this one included: it ignores its own) what an
    /// invalidation did.
    pub async fn publish_invalidation(
        &self,
        patterns: &[String],
        generations: &[(String, Generation)],
    ) -> Result<(), RedisError> {
        let gens: serde_json::Map<String, serde_json::Value> = generations
            .iter()
            .map(|(ns, g)| (ns.clone(), json!([g.current, g.purged])))
            .collect();
        let msg =
            json!({"origin": self.origin, "patterns": patterns, "generations": gens}).to_string();
        self.check(RedisOp::Publish)?;
        let c = self.client.with_options(&self.opts());
        self.bounded(
            RedisOp::Publish,
            c.publish::<i64, _, _>(self.channel(), msg),
        )
        .await
        .map(|_| ())
    }

    /// Calls `on_event` for every message of the fleet's channels from
    /// another sidecar, after every (re)connection of either client, and
    /// when a Redis bypassed as slow answers in time again. Subscribes as
    /// soon as Redis is reachable and again after every reconnection of the
    /// subscriber; only then does the sidecar report Redis as connected
    /// ([`RedisStore::is_connected`]).
    pub fn listen(&self, on_event: impl Fn(FleetEvent) + Send + Sync + 'static) {
        let on_event = Arc::new(on_event);
        let sub = self.subscriber.clone();
        // The circuits' channel too: its messages are read by
        // `on_circuit_messages`, on the same subscription.
        let channels = vec![
            self.channel(),
            self.stored_channel(),
            self.circuits_channel(),
        ];
        let mut resubscribe = self.subscriber.reconnect_rx();
        let mut lost = self.subscriber.error_rx();
        // The subscription is live once a probe published on the channel
        // comes back: fred's SUBSCRIBE is seen to succeed where Redis
        // refused it (an ACL without the channel), and only a message heard
        // proves that the fleet's will be.
        let heard = Arc::new(tokio::sync::Notify::new());
        let probe = json!({"origin": self.origin, "probe": true}).to_string();
        let this = self.clone();
        let probe_sent = probe.clone();
        let heard_probe = Arc::clone(&heard);
        tokio::spawn(async move {
            loop {
                while !this
                    .subscribe_live(&sub, &channels, &probe_sent, &heard_probe)
                    .await
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                this.health.set_subscribed(true);
                tokio::select! {
                    r = resubscribe.recv() => {
                        if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            return;
                        }
                    }
                    r = lost.recv() => {
                        if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            return;
                        }
                    }
                }
                this.health.set_subscribed(false);
            }
        });
        for rx in [self.client.reconnect_rx(), self.subscriber.reconnect_rx()] {
            let on_event = Arc::clone(&on_event);
            let mut rx = rx;
            tokio::spawn(async move {
                // Until the client is gone (a lagged receiver missed
                // reconnects: one poll makes up for them all).
                while let Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) =
                    rx.recv().await
                {
                    on_event(FleetEvent::Reconnected);
                }
            });
        }
        let mut usable = self.health.usable_again();
        let again = Arc::clone(&on_event);
        tokio::spawn(async move {
            while usable.changed().await.is_ok() {
                again(FleetEvent::Reconnected);
            }
        });
        let mut rx = self.subscriber.message_rx();
        let origin = self.origin.clone();
        let stored = self.stored_channel();
        let circuits = self.circuits_channel();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(msg) => {
                        let Some(text) = msg.value.as_string() else {
                            continue;
                        };
                        if *msg.channel == *circuits {
                            continue;
                        } else if text == probe {
                            heard.notify_waiters();
                        } else if *msg.channel == *stored {
                            on_event(FleetEvent::LeaseEnded(text));
                        } else if let Some(e) = parse_invalidation(&text, &origin) {
                            on_event(e);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Messages were dropped: poll as after a reconnect.
                        on_event(FleetEvent::Reconnected);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }
}

impl RedisStore {
    /// Subscribes `sub` to `channels` and publishes `probe` on the first:
    /// `true` once it comes back (within a second).
    async fn subscribe_live(
        &self,
        sub: &fred::clients::SubscriberClient,
        channels: &[String],
        probe: &str,
        heard: &tokio::sync::Notify,
    ) -> bool {
        if !sub.is_connected() || sub.subscribe(channels.to_vec()).await.is_err() {
            return false;
        }
        let back = heard.notified();
        tokio::pin!(back);
        back.as_mut().enable();
        if self.check(RedisOp::Publish).is_err() {
            return false;
        }
        let c = self.client.with_options(&self.opts());
        let sent = self
            .bounded(
                RedisOp::Publish,
                c.publish::<i64, _, _>(channels[0].clone(), probe.to_string()),
            )
            .await;
        sent.is_ok() && tokio::time::timeout(PROBE_WAIT, back).await.is_ok()
    }
}

/// How long a subscription probe may take to come back.
const PROBE_WAIT: Duration = Duration::from_secs(1);

/// An invalidation message of another sidecar (`None`: this one's own, or
/// not one).
fn parse_invalidation(text: &str, origin: &str) -> Option<FleetEvent> {
    let v = serde_json::from_str::<serde_json::Value>(text).ok()?;
    // Its own, and any sidecar's subscription probe, say nothing.
    if v["origin"].as_str() == Some(origin) || v["probe"] == true {
        return None;
    }
    let patterns = v["patterns"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let generations = v["generations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(ns, g)| {
                    Some((
                        ns.clone(),
                        Generation {
                            current: g.get(0)?.as_u64()?,
                            purged: g.get(1)?.as_u64()?,
                        },
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Some(FleetEvent::Invalidated {
        patterns,
        generations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_messages_parse_and_own_ones_are_skipped() {
        let text = r#"{"origin":"a","patterns":["search:ab*"],"generations":{"rag":[7,5]}}"#;
        assert_eq!(parse_invalidation(text, "a"), None);
        assert_eq!(
            parse_invalidation(text, "b"),
            Some(FleetEvent::Invalidated {
                patterns: vec!["search:ab*".into()],
                generations: vec![(
                    "rag".into(),
                    Generation {
                        current: 7,
                        purged: 5
                    }
                )],
            })
        );
        assert_eq!(parse_invalidation("not json", "b"), None);
        assert_eq!(
            parse_invalidation(r#"{"origin":"a","probe":true}"#, "b"),
            None
        );
    }
}
