//! Server-side scripts: each runs atomically on the Redis server, with the
//! server's clock, so that replicas agree.

use std::time::Duration;

use super::{RedisError, RedisStore};
use crate::metrics::redis::RedisOp;

/// GCRA on the Redis server, atomically (one script run per check), with the
/// server's clock so replicas agree. It touches one key, so on a Redis
/// Cluster it runs on that key's slot (no hash tag needed). KEYS[1] holds the theoretical arrival
/// time (ms) and expires when the client's allowance is whole again.
/// ARGV: emission interval (ms), burst: a request conforms now or is
/// refused. Returns {allowed, remaining, wait_ms (until it would conform),
/// reset_ms}.
pub const GCRA_LUA: &str = r#"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local window = interval * burst
local new_tat = tat + interval
local allow_at = new_tat - window
if allow_at > now then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.max(1, new_tat - now))
return {1, math.max(0, math.floor((window - (new_tat - now)) / interval)), math.max(0, allow_at - now), new_tat - now}
"#;

/// The upstream quota of one route, for the fleet: exact sliding windows
/// and the fair choice of the next request, the arithmetic of
/// `layers::quota::book` on the server's clock. KEYS: one sorted set of
/// calls per limit (member: the request, score: when it left), then the
/// waiting requests (score: arrival) and when each was last asked for
/// (score: ms); all in one hash slot (`{quota:<route>}`), so one script run
/// on a cluster. A request's member is `<client>|<sidecar>:<seq>`.
/// ARGV: `take` or `leave`, the member, the guard (ms a call counts past its
/// window), the index of the shortest window (1-based), the request's
/// longest wait (ms), the number of limits, then each limit's count and
/// window (ms), then `1` on the request's first turn and `1` when it has a
/// stale answer at hand (either: on its first turn, a request that will
/// not wait leaves the queue in the same run).
/// Returns {verdict, ms, ahead, slots, used…}: verdict 1 go (counted in
/// every window), 0 every window has room only in `ms`, 2 another waiting
/// request is due first; the waiting requests due before this one and the
/// calls every window will have room for within its wait (`Book::outlook`);
/// then the calls in each window.
/// A waiting request not asked for in `QUOTA_LIVE_MS` (its sidecar died or
/// lost Redis) is dropped, so it cannot hold a turn.
pub const QUOTA_LUA: &str = r#"
local mode, member = ARGV[1], ARGV[2]
local guard, fair, max_wait = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local first, stale = ARGV[7 + 2 * n] == '1', ARGV[8 + 2 * n] == '1'
local waitk, alivek, recentk = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3]
if mode == 'leave' then
  redis.call('ZREM', waitk, member)
  redis.call('ZREM', alivek, member)
  return {3, 0, 0, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local count, win = {}, {}
for i = 1, n do
  count[i] = tonumber(ARGV[5 + 2 * i])
  win[i] = tonumber(ARGV[6 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - win[i] - guard)
end
local dead = redis.call('ZRANGEBYSCORE', alivek, '-inf', now - 2000)
for _, d in ipairs(dead) do
  redis.call('ZREM', waitk, d)
  redis.call('ZREM', alivek, d)
end
local arrived = redis.call('ZSCORE', waitk, member)
if not arrived then
  redis.call('ZADD', waitk, now, member)
end
redis.call('ZADD', alivek, now, member)
redis.call('PEXPIRE', waitk, 60000)
redis.call('PEXPIRE', alivek, 60000)
local used, room, slots = {}, 0, nil
for i = 1, n do
  local len = redis.call('ZCARD', KEYS[i])
  used[i] = len
  local span, horizon = win[i] + guard, now + max_wait
  local free = count[i] - len
  if free < 0 then free = 0 end
  local calls
  if max_wait < span then
    -- Each place is free once at most within the wait.
    calls = free + redis.call('ZCOUNT', KEYS[i], '-inf', horizon - span)
  else
    calls = free * (1 + math.floor(max_wait / span))
    local from = len - count[i]
    if from < 0 then from = 0 end
    local placed = redis.call('ZRANGE', KEYS[i], from, -1, 'WITHSCORES')
    for j = 2, #placed, 2 do
      local at = tonumber(placed[j]) + span
      if at <= horizon then
        calls = calls + 1 + math.floor((horizon - at) / span)
      end
    end
  end
  if slots == nil or calls < slots then slots = calls end
  if len >= count[i] then
    local e = redis.call('ZRANGE', KEYS[i], len - count[i], len - count[i], 'WITHSCORES')
    local at = 86400000
    if e[2] then at = tonumber(e[2]) + win[i] + guard - now end
    if at > room then room = at end
  end
end
local fair_span = 2 * (win[fair] + guard)
redis.call('ZREMRANGEBYSCORE', recentk, '-inf', now - fair_span)
local per, last = {}, {}
local recent = redis.call('ZRANGE', recentk, 0, -1, 'WITHSCORES')
for j = 1, #recent, 2 do
  local c = string.match(recent[j], '^([^|]*)|') or ''
  local at = tonumber(recent[j + 1])
  per[c] = (per[c] or 0) + 1
  if last[c] == nil or at > last[c] then last[c] = at end
end
local function rank(m, pos)
  local c = string.match(m, '^([^|]*)|') or ''
  return {per[c] or 0, last[c] or -1, pos}
end
local function before(x, y)
  if x[1] ~= y[1] then return x[1] < y[1] end
  if x[2] ~= y[2] then return x[2] < y[2] end
  return x[3] < y[3]
end
local queue = redis.call('ZRANGE', waitk, 0, -1)
local mine
for pos, w in ipairs(queue) do
  if w == member then mine = rank(w, pos) end
end
local best, best_rank, ahead = nil, nil, 0
for pos, w in ipairs(queue) do
  local r = rank(w, pos)
  if best_rank == nil or before(r, best_rank) then best, best_rank = w, r end
  if mine and w ~= member and before(r, mine) then ahead = ahead + 1 end
end
if room > 0 or best ~= member then
  -- On its first turn a request that will not wait (a stale answer at
  -- hand, or those due first take every call in time) leaves the queue
  -- here, so that no other request counts it as ahead meanwhile.
  if first and (stale or ahead >= (slots or 0)) then
    redis.call('ZREM', waitk, member)
    redis.call('ZREM', alivek, member)
  end
  if room > 0 then return {0, room, ahead, slots or 0, unpack(used)} end
  return {2, 0, ahead, slots or 0, unpack(used)}
end
redis.call('ZREM', waitk, member)
redis.call('ZREM', alivek, member)
for i = 1, n do
  redis.call('ZADD', KEYS[i], now, member)
  redis.call('PEXPIRE', KEYS[i], win[i] + guard + 1000)
  used[i] = used[i] + 1
end
redis.call('ZADD', recentk, now, member)
redis.call('PEXPIRE', recentk, fair_span + 1000)
return {1, 0, ahead, slots or 0, unpack(used)}
"#;

/// What the quota script said: the verdict (as [`QUOTA_LUA`] numbers it)
/// and the calls in each window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaOutcome {
    pub verdict: i64,
    pub ms: u64,
    pub ahead: u64,
    pub slots: u64,
    pub used: Vec<u64>,
}

/// One request's turn at the fleet's upstream quota.
#[derive(Debug)]
pub struct QuotaTurn<'a> {
    /// The route's keys: one per limit, then the waiting set, its liveness
    /// and the recent calls.
    pub keys: &'a [String],
    /// The request: `<client>|<sidecar>:<seq>`.
    pub member: &'a str,
    /// How long past its window a call still counts.
    pub guard: Duration,
    /// The index of the shortest window.
    pub fair: usize,
    /// The request's longest wait.
    pub max_wait: Duration,
    /// Each limit's (count, window).
    pub limits: &'a [(u64, Duration)],
    /// The request's first turn.
    pub first: bool,
    /// It has a stale answer at hand.
    pub stale: bool,
}

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
        let op = RedisOp::RateLimit;
        self.check(op)?;
        let interval_ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let key = self.full_key(key);
        let v: Vec<i64> = self
            .bounded(
                op,
                self.gcra
                    .evalsha_with_reload(&self.client, key, vec![interval_ms, burst]),
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

    /// One turn of the fleet's upstream quota ([`QUOTA_LUA`]).
    pub async fn quota_take(&self, turn: &QuotaTurn<'_>) -> Result<QuotaOutcome, RedisError> {
        let t = turn;
        self.quota_script(
            "take",
            t.keys,
            t.member,
            (t.guard, t.fair, t.max_wait),
            t.limits,
            (t.first, t.stale),
        )
        .await
    }

    /// A waiting request gives up its place in the fleet's queue.
    pub async fn quota_leave(&self, keys: &[String], member: &str) -> Result<(), RedisError> {
        let none = (Duration::ZERO, 0, Duration::ZERO);
        self.quota_script("leave", keys, member, none, &[], (false, false))
            .await
            .map(|_| ())
    }

    async fn quota_script(
        &self,
        mode: &str,
        keys: &[String],
        member: &str,
        (guard, fair, max_wait): (Duration, usize, Duration),
        limits: &[(u64, Duration)],
        (first, stale): (bool, bool),
    ) -> Result<QuotaOutcome, RedisError> {
        self.check(RedisOp::Quota)?;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let keys: Vec<String> = keys.iter().map(|k| self.full_key(k)).collect();
        // `leave` reads no limits but must name the same keys' count.
        let n = keys.len().saturating_sub(3);
        let mut args = vec![
            mode.to_string(),
            member.to_string(),
            ms(guard).to_string(),
            (fair + 1).to_string(),
            ms(max_wait).to_string(),
            n.to_string(),
        ];
        for (count, window) in limits {
            args.push(count.to_string());
            args.push(ms(*window).to_string());
        }
        args.push(u8::from(first).to_string());
        args.push(u8::from(stale).to_string());
        let v: Vec<i64> = self
            .bounded(
                RedisOp::Quota,
                self.quota.evalsha_with_reload(&self.client, keys, args),
            )
            .await?;
        let at = |i: usize| u64::try_from(v.get(i).copied().unwrap_or(0)).unwrap_or(0);
        Ok(QuotaOutcome {
            verdict: v.first().copied().unwrap_or(0),
            ms: at(1),
            ahead: at(2),
            slots: at(3),
            used: (4..v.len()).map(at).collect(),
        })
    }
}
