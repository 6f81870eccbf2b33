//! What the fleet of sidecars shares in Redis to behave like one cache: the
//! generation of each cache namespace, and the leases that make one
//! sidecar the caller for a key while the others wait for its entry.
//!
//! Both live in the `fleet:` space under the prefix, which a cache clear
//! never touches. Every script here names exactly one key (the generations
//! hash, or one lease), so each runs on one hash slot of a Redis Cluster
//! without hash tags; `PUBLISH` names a channel, not a key.

use std::time::Duration;

use fred::types::scripts::Script;

use super::{RedisError, RedisStore};
use crate::metrics::redis::RedisOp;

/// The key space (after the prefix) of the fleet's own keys.
pub const FLEET_SPACE: &str = "fleet:";

/// One hash: field `<namespace>` is its generation, `<namespace>:purged`
/// the generation below which its entries are unusable even as stale.
const GENERATIONS_KEY: &str = "fleet:gen";

/// A lease on a key: `fleet:lease:<cache key>`.
const LEASE_SPACE: &str = "fleet:lease:";

/// Bumps the generations of the namespaces in ARGV[2..] to
/// `max(old + 1, server time in ms)` (so that a generation only grows, even
/// across a Redis that lost its data), and with ARGV[1] == '1' raises their
/// purge floor to it. Returns {generation, purge floor} per namespace.
// Cluster: one key (KEYS[1]), so one slot.
const BUMP_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 2, #ARGV do
  local ns = ARGV[i]
  local g = tonumber(redis.call('HGET', KEYS[1], ns) or '0') + 1
  if g < now then g = now end
  local s = string.format('%.0f', g)
  redis.call('HSET', KEYS[1], ns, s)
  if ARGV[1] == '1' then redis.call('HSET', KEYS[1], ns .. ':purged', s) end
  out[#out + 1] = g
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[1], ns .. ':purged') or '0')
end
return out
"#;

/// Reads the generations of the namespaces in ARGV; a namespace the hash
/// does not hold (a new fleet, or a Redis that lost its data, and with it
/// any invalidation it held) is given the server's time in ms, a
/// generation no stored entry carries. Returns {generation, purge floor}
/// per namespace.
// Cluster: one key (KEYS[1]), so one slot.
const SYNC_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #ARGV do
  local g = redis.call('HGET', KEYS[1], ARGV[i])
  if not g then
    g = string.format('%.0f', now)
    redis.call('HSET', KEYS[1], ARGV[i], g)
  end
  out[#out + 1] = tonumber(g)
  out[#out + 1] = tonumber(redis.call('HGET', KEYS[1], ARGV[i] .. ':purged') or '0')
end
return out
"#;

/// Takes the lease KEYS[1] for token ARGV[1] for ARGV[2] ms, unless a live
/// holder has it (0) or its holder stored the entry under generation
/// ARGV[3] a moment ago (2: read the entry). A `done:` mark of another
/// generation is taken over like a free lease.
// Cluster: one key (KEYS[1]), so one slot.
const ACQUIRE_LUA: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then
  if v == 'done:' .. ARGV[3] then return 2 end
  if string.sub(v, 1, 5) ~= 'done:' then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"#;

/// Extends the lease KEYS[1] to ARGV[2] ms if token ARGV[1] still holds it.
// Cluster: one key (KEYS[1]), so one slot.
const RENEW_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Ends token ARGV[1]'s lease KEYS[1]: replaced by the mark ARGV[2] for
/// ARGV[3] ms when the entry was stored (closing the window in which a
/// sidecar that just missed it would take a free lease and call the
/// upstream again), deleted otherwise; then wakes the waiters with the
/// message ARGV[5] on channel ARGV[4].
// Cluster: one key (KEYS[1]), so one slot.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] ~= '' then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  else
    redis.call('DEL', KEYS[1])
  end
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"#;

/// How long a stored lease's `done:` mark stays.
const DONE_MARK: Duration = Duration::from_secs(1);

/// The scripts, loaded once per process.
pub(super) struct FleetScripts {
    bump: Script,
    sync: Script,
    acquire: Script,
    renew: Script,
    release: Script,
}

impl FleetScripts {
    pub(super) fn new() -> Self {
        Self {
            bump: Script::from_lua(BUMP_LUA),
            sync: Script::from_lua(SYNC_LUA),
            acquire: Script::from_lua(ACQUIRE_LUA),
            renew: Script::from_lua(RENEW_LUA),
            release: Script::from_lua(RELEASE_LUA),
        }
    }
}

/// A namespace's generation and purge floor, as Redis holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub current: u64,
    pub purged: u64,
}

/// What an attempt at a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// This sidecar holds it now.
    Taken,
    /// Another sidecar holds it and is calling the upstream.
    Held,
    /// Its holder stored the entry a moment ago: read it.
    Stored,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn pairs(v: &[i64]) -> Vec<Generation> {
    let at = |i: usize| u64::try_from(v.get(i).copied().unwrap_or(0)).unwrap_or(0);
    (0..v.len() / 2)
        .map(|i| Generation {
            current: at(2 * i),
            purged: at(2 * i + 1),
        })
        .collect()
}

impl RedisStore {
    /// Runs one of the fleet's scripts on `key` (under the prefix):
    /// `EVALSHA`, loading it again after a Redis restart emptied its cache.
    pub(super) async fn run<T: fred::types::FromValue + Send>(
        &self,
        op: RedisOp,
        script: &Script,
        key: &str,
        args: Vec<String>,
    ) -> Result<T, RedisError> {
        self.check(op)?;
        self.bounded(
            op,
            script.evalsha_with_reload(&self.client, self.full_key(key), args),
        )
        .await
    }

    pub(super) fn stored_channel(&self) -> String {
        format!("{}stored", self.prefix)
    }

    /// Bumps the namespaces' generations (and with `purge` their purge
    /// floors), atomically in one script on the one generations key.
    pub async fn bump_generations(
        &self,
        namespaces: &[String],
        purge: bool,
    ) -> Result<Vec<Generation>, RedisError> {
        let mut args = vec![if purge { "1" } else { "0" }.to_string()];
        args.extend(namespaces.iter().cloned());
        let v: Vec<i64> = self
            .run(
                RedisOp::Generations,
                &self.fleet.bump,
                GENERATIONS_KEY,
                args,
            )
            .await?;
        Ok(pairs(&v))
    }

    /// Reads the namespaces' generations (giving one to a namespace that
    /// has none), in one script on the one generations key.
    pub async fn sync_generations(
        &self,
        namespaces: &[String],
    ) -> Result<Vec<Generation>, RedisError> {
        let v: Vec<i64> = self
            .run(
                RedisOp::Generations,
                &self.fleet.sync,
                GENERATIONS_KEY,
                namespaces.to_vec(),
            )
            .await?;
        Ok(pairs(&v))
    }

    /// One attempt at the lease of `key` (a cache key) for `token`.
    pub async fn acquire_lease(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
        generation: u64,
    ) -> Result<Acquired, RedisError> {
        let n: i64 = self
            .run(
                RedisOp::Lease,
                &self.fleet.acquire,
                &format!("{LEASE_SPACE}{key}"),
                vec![
                    token.to_string(),
                    ms(ttl).to_string(),
                    generation.to_string(),
                ],
            )
            .await?;
        Ok(match n {
            1 => Acquired::Taken,
            2 => Acquired::Stored,
            _ => Acquired::Held,
        })
    }

    /// Extends the lease while its holder works; `false` once it lost it.
    pub async fn renew_lease(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        let n: i64 = self
            .run(
                RedisOp::Lease,
                &self.fleet.renew,
                &format!("{LEASE_SPACE}{key}"),
                vec![token.to_string(), ms(ttl).to_string()],
            )
            .await?;
        Ok(n == 1)
    }

    /// Ends the lease and wakes the sidecars waiting on it; `stored`: the
    /// entry is in Redis under `generation`.
    pub async fn release_lease(
        &self,
        key: &str,
        token: &str,
        stored: Option<u64>,
    ) -> Result<(), RedisError> {
        let mark = stored.map(|g| format!("done:{g}")).unwrap_or_default();
        let _: i64 = self
            .run(
                RedisOp::Lease,
                &self.fleet.release,
                &format!("{LEASE_SPACE}{key}"),
                vec![
                    token.to_string(),
                    mark,
                    ms(DONE_MARK).to_string(),
                    self.stored_channel(),
                    key.to_string(),
                ],
            )
            .await?;
        Ok(())
    }
}
