//! The fleet's circuits in Redis (PRODUCT.md "Retry and circuit breaking":
//! one circuit for the fleet). A circuit's state is one key,
//! `fleet:circuit:<name>`, holding `<version>:<open|closed>:<until, server
//! ms>`; every write raises the version and publishes `<name> <version>
//! <state> <ms left>` on `<prefix>circuits`, so every sidecar takes it at
//! once, and a poll of the key makes up for a lost message. Times are the
//! Redis server's (`TIME`), handed out as time left, so the sidecars' clocks
//! need not agree. The half-open probe is one of the fleet's leases
//! ([`super::fleet`]) on `circuit:<name>`.
//!
//! Every script names one key (one hash slot on a Cluster); `PUBLISH`
//! names a channel.

use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;

use super::fleet::Acquired;
use super::{RedisError, RedisStore};
use crate::metrics::redis::RedisOp;

/// `fleet:circuit:<name>`: the fleet's state of a circuit.
const STATE_SPACE: &str = "fleet:circuit:";

/// How long a circuit's state stays in Redis after its last write.
const STATE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Writes state ARGV[1] (`open`, `closed`) until server time + ARGV[2] ms,
/// keeps it ARGV[3] ms, and publishes `ARGV[5] <version> <state> <ms left>`
/// on channel ARGV[4]. Returns the version: above the stored one and at
/// least the server's time in ms, so that it only grows even when the key
/// was lost (expired, a Redis restart, a failover), and the sidecars that
/// took a high version before still take the next.
// Cluster: one key (KEYS[1]), so one slot.
const WRITE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('GET', KEYS[1])
local v = 0
if cur then v = tonumber(string.match(cur, '^(%d+):')) or 0 end
v = v + 1
if v < now then v = now end
local vs = string.format('%.0f', v)
local untl = now + tonumber(ARGV[2])
redis.call('SET', KEYS[1], vs .. ':' .. ARGV[1] .. ':' .. string.format('%.0f', untl), 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ' ' .. vs .. ' ' .. ARGV[1] .. ' ' .. ARGV[2])
return v
"#;

/// Reads KEYS[1]: {version, state, ms left (0 once due a probe)}, or nil.
// Cluster: one key (KEYS[1]), so one slot.
const READ_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return nil end
local v, st, u = string.match(cur, '^(%d+):(%a+):(%d+)$')
if not v then return nil end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local left = tonumber(u) - now
if left < 0 then left = 0 end
return {tonumber(v), st, left}
"#;

/// The scripts, loaded once per process.
pub(super) struct CircuitScripts {
    write: Script,
    read: Script,
}

impl CircuitScripts {
    pub(super) fn new() -> Self {
        Self {
            write: Script::from_lua(WRITE_LUA),
            read: Script::from_lua(READ_LUA),
        }
    }
}

/// A circuit's state as the fleet holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetCircuit {
    pub version: u64,
    /// `Some(left)`: open for `left` more (zero: due a probe); `None`:
    /// closed.
    pub open_for: Option<Duration>,
}

impl FleetCircuit {
    fn new(version: u64, state: &str, left_ms: u64) -> Self {
        Self {
            version,
            open_for: (state == "open").then(|| Duration::from_millis(left_ms)),
        }
    }
}

/// A message of the circuits' channel: the circuit's name and its state.
pub fn parse_message(text: &str) -> Option<(&str, FleetCircuit)> {
    let mut w = text.split_ascii_whitespace();
    let name = w.next()?;
    let version = w.next()?.parse().ok()?;
    let state = w.next()?;
    let left = w.next()?.parse().ok()?;
    Some((name, FleetCircuit::new(version, state, left)))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The lease key of a circuit's probe.
fn probe_key(name: &str) -> String {
    format!("circuit:{name}")
}

impl RedisStore {
    pub(super) fn circuits_channel(&self) -> String {
        format!("{}circuits", self.prefix)
    }

    /// Writes the fleet's state of circuit `name` (open for `open_for`, or
    /// closed) and tells every sidecar; returns its version.
    pub async fn write_circuit(
        &self,
        name: &str,
        open_for: Option<Duration>,
    ) -> Result<u64, RedisError> {
        let (state, left) = match open_for {
            Some(d) => ("open", ms(d)),
            None => ("closed", 0),
        };
        let v: i64 = self
            .run(
                RedisOp::Circuit,
                &self.circuit.write,
                &format!("{STATE_SPACE}{name}"),
                vec![
                    state.to_string(),
                    left.to_string(),
                    ms(STATE_TTL).to_string(),
                    self.circuits_channel(),
                    name.to_string(),
                ],
            )
            .await?;
        Ok(u64::try_from(v).unwrap_or(0))
    }

    /// The fleet's state of circuit `name`, if any was written.
    pub async fn read_circuit(&self, name: &str) -> Result<Option<FleetCircuit>, RedisError> {
        let v: Option<(i64, String, i64)> = self
            .run(
                RedisOp::Circuit,
                &self.circuit.read,
                &format!("{STATE_SPACE}{name}"),
                Vec::new(),
            )
            .await?;
        Ok(v.map(|(v, state, left)| {
            FleetCircuit::new(
                u64::try_from(v).unwrap_or(0),
                &state,
                u64::try_from(left).unwrap_or(0),
            )
        }))
    }

    /// Takes the fleet's probe of circuit `name` for `token`, for `ttl`;
    /// `false`: another sidecar holds it.
    pub async fn take_probe(
        &self,
        name: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let got = self.acquire_lease(&probe_key(name), token, ttl, 0).await?;
        Ok(got == Acquired::Taken)
    }

    /// Gives the probe back (it ended without a result).
    pub async fn give_probe(&self, name: &str, token: &str) -> Result<(), RedisError> {
        self.release_lease(&probe_key(name), token, None).await
    }

    /// Calls `on_state` for every message of the circuits' channel (the
    /// subscription is [`RedisStore::listen`]'s), until `alive` (asked at
    /// every message of any channel) says no.
    pub fn on_circuit_messages(
        &self,
        alive: impl Fn() -> bool + Send + 'static,
        on_state: impl Fn(&str, FleetCircuit) + Send + 'static,
    ) {
        let mut rx = self.subscriber.message_rx();
        let channel = self.circuits_channel();
        tokio::spawn(async move {
            loop {
                let msg = rx.recv().await;
                if !alive() {
                    return;
                }
                match msg {
                    Ok(msg) if *msg.channel == *channel => {
                        if let Some((name, state)) =
                            msg.value.as_string().as_deref().and_then(parse_message)
                        {
                            on_state(name, state);
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse() {
        assert_eq!(
            parse_message("gemini 7 open 45000"),
            Some((
                "gemini",
                FleetCircuit {
                    version: 7,
                    open_for: Some(Duration::from_secs(45))
                }
            ))
        );
        assert_eq!(
            parse_message("upstream 8 closed 0"),
            Some((
                "upstream",
                FleetCircuit {
                    version: 8,
                    open_for: None
                }
            ))
        );
        assert_eq!(parse_message("upstream x closed 0"), None);
    }
}
