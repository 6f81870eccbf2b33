//! Server-side scripts: each runs atomically on the Redis server, with the
//! server's clock, so that replicas agree.

use std::time::Duration;

use super::{RedisError, RedisStore};
use crate::metrics::redis::RedisOp;

/// GCRA on the Redis server, atomically (one script run per check), with the
/// server's clock so replicas agree. It touches one key, so on a Redis
/// Cluster it runs on that key's slot (no hash tag needed). KEYS[1] holds the theoretical arrival
/// time (ms) and expires when the client's allowance is whole again.
/// ARGV: emission interval (ms), burst, and optionally the longest wait
/// (ms, default 0) a request may be given: a request that would conform
/// within it reserves its slot now and is told how long to wait for it (the
/// upstream quota's fair queue; the rate limiter asks for 0: conform now or
/// be refused). Returns {allowed, remaining, wait_ms, reset_ms}.
pub const GCRA_LUA: &str = r#"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3] or '0')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local window = interval * burst
local new_tat = tat + interval
local allow_at = new_tat - window
if allow_at - now > max_wait then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.max(1, new_tat - now))
return {1, math.max(0, math.floor((window - (new_tat - now)) / interval)), math.max(0, allow_at - now), new_tat - now}
"#;

/// What the shared limiter said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcraOutcome {
    pub allowed: bool,
    pub remaining: u64,
    pub wait: Duration,
    pub reset: Duration,
}

impl RedisStore {
    /// One GCRA check on the shared limiter (`EVALSHA`, loading the script
    /// again after a Redis restart emptied its cache).
    pub async fn gcra(
        &self,
        key: &str,
        interval: Duration,
        burst: u64,
    ) -> Result<GcraOutcome, RedisError> {
        self.gcra_within(RedisOp::RateLimit, key, interval, burst, Duration::ZERO)
            .await
    }

    /// One GCRA check that reserves a slot up to `max_wait` ahead: allowed
    /// with the `wait` to sleep before going, or refused with the wait it
    /// would have needed.
    pub async fn gcra_within(
        &self,
        op: RedisOp,
        key: &str,
        interval: Duration,
        burst: u64,
        max_wait: Duration,
    ) -> Result<GcraOutcome, RedisError> {
        self.check(op)?;
        let interval_ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let key = self.full_key(key);
        let max_wait_ms = u64::try_from(max_wait.as_millis()).unwrap_or(u64::MAX);
        let v: Vec<i64> = self
            .bounded(
                op,
                self.gcra.evalsha_with_reload(
                    &self.client,
                    key,
                    vec![interval_ms, burst, max_wait_ms],
                ),
            )
            .await?;
        let at = |i: usize| u64::try_from(v.get(i).copied().unwrap_or(0)).unwrap_or(0);
        Ok(GcraOutcome {
            allowed: at(0) == 1,
            remaining: at(1),
            wait: Duration::from_millis(at(2)),
            reset: Duration::from_millis(at(3)),
        })
    }
}
