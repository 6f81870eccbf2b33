//! The invalidation channel: `<prefix>invalidate` carries the patterns an
//! upload or a clear removed, so that every sidecar clears its memory layer.

use std::time::Duration;

use fred::prelude::*;

use serde_json::json;

use super::{RedisError, RedisStore};

impl RedisStore {
    fn channel(&self) -> String {
        format!("{}invalidate", self.prefix)
    }

    /// Tells every sidecar (this one included: it ignores its own) to clear
    /// these patterns from its memory layer.
    pub async fn publish_invalidation(&self, patterns: &[String]) -> Result<(), RedisError> {
        let msg = json!({"origin": self.origin, "patterns": patterns}).to_string();
        let c = self.client.with_options(&self.opts());
        self.bounded(c.publish::<i64, _, _>(self.channel(), msg))
            .await
            .map(|_| ())
    }

    /// Calls `on_patterns` for every invalidation another sidecar publishes.
    /// Subscribes as soon as Redis is reachable; fred re-subscribes after a
    /// reconnect.
    pub fn listen(&self, on_patterns: impl Fn(Vec<String>) + Send + 'static) {
        let sub = self.subscriber.clone();
        let channel = self.channel();
        tokio::spawn(async move {
            loop {
                if sub.is_connected() && sub.subscribe(channel.clone()).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let mut rx = self.subscriber.message_rx();
        let origin = self.origin.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(msg) => {
                        let Some(text) = msg.value.as_string() else {
                            continue;
                        };
                        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                            continue;
                        };
                        if v["origin"].as_str() == Some(origin.as_str()) {
                            continue;
                        }
                        let patterns = v["patterns"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|p| p.as_str().map(str::to_string))
                                    .collect()
                            })
                            .unwrap_or_default();
                        on_patterns(patterns);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
    }
}
