//! `Ticket`: one request's place in its route's queue, and the loop that
//! waits for its call: a turn at the fleet's windows (Redis) or this
//! sidecar's, stale first, told at once when it cannot go in time, and
//! leaving the queue when dropped before its call.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::book::{Client, Verdict};
use super::route::RouteQuota;
use super::{GUARD, Shared, ms};
use crate::redis::scripts::QuotaTurn;

/// The longest a waiting request sleeps before asking again (with Redis, so
/// that the fleet's queue knows it is alive; in memory a wake-up comes with
/// every change).
const POLL: Duration = Duration::from_millis(250);

/// How soon a request asks again when another is due first (that one takes
/// its call, or leaves, within about this).
const TURN_POLL: Duration = Duration::from_millis(20);

/// Why a request was not given a call.
pub(super) struct Refused {
    pub(super) room_in: Duration,
    /// It has a stale answer at hand, which the cache serves.
    pub(super) stale: bool,
}

/// What one turn said.
pub(super) struct Turn {
    pub(super) verdict: Verdict,
    /// Due before this request, and calls free within its wait.
    pub(super) ahead: u64,
    pub(super) slots: u64,
}

/// One request's place in the route's queue: leaves it when dropped before
/// its call (its client went away, or it was refused).
pub(super) struct Ticket {
    pub(super) seq: u64,
    pub(super) client: Client,
    pub(super) shared: Arc<Shared>,
    pub(super) quota: Arc<RouteQuota>,
    /// It went (its place is already given up).
    pub(super) done: bool,
}

impl Ticket {
    /// `<client>|<sidecar>:<seq>`: the request in the fleet's queue.
    fn member(&self) -> String {
        // The sequence zero-padded: requests that arrive in the same ms are
        // ordered by the member's text.
        format!(
            "{:016x}|{}:{:016}",
            self.client, self.shared.sidecar, self.seq
        )
    }

    fn now_ms(&self) -> u64 {
        self.shared.now_ms()
    }

    /// Waits for this request's call: `Ok` when it may go.
    pub(super) async fn wait(
        mut self,
        asked: tokio::time::Instant,
        max_wait: Duration,
        stale_at_hand: bool,
    ) -> Result<(), Refused> {
        let give_up = asked + max_wait;
        let mut first = true;
        loop {
            let changed = self.quota.changed.notified();
            let stale = stale_at_hand && self.quota.stale_first;
            let turn = self.take(max_wait, (first, stale)).await;
            let room_in = match turn.verdict {
                Verdict::Go => {
                    self.done = true;
                    return Ok(());
                }
                Verdict::RoomIn(ms) => Duration::from_millis(ms),
                Verdict::NotYourTurn => Duration::ZERO,
            };
            let now = tokio::time::Instant::now();
            if first {
                first = false;
                if stale {
                    return Err(Refused {
                        room_in,
                        stale: true,
                    });
                }
                if turn.ahead >= turn.slots {
                    // Those due first take every call that frees in time.
                    return Err(Refused {
                        room_in: room_in.max(max_wait),
                        stale: false,
                    });
                }
            }
            if now >= give_up {
                return Err(Refused {
                    room_in,
                    stale: false,
                });
            }
            let pause = if room_in.is_zero() {
                TURN_POLL
            } else {
                room_in.min(POLL)
            };
            let until = (now + pause).min(give_up);
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                () = changed => {}
            }
        }
    }

    /// One turn: the fleet's when Redis answers, else this sidecar's.
    async fn take(&self, max_wait: Duration, first_stale: (bool, bool)) -> Turn {
        let q = &self.quota;
        if let Some(learner) = &q.learner {
            // A learned limit is this sidecar's own: its windows only.
            let limit = learner.limit(self.now_ms()).unwrap_or(1);
            q.stats.learned.store(limit, Ordering::Relaxed);
            q.stats.set_counts(&[limit]);
            q.book().set_count(0, limit);
            return self.take_here(max_wait);
        }
        if let Some(redis) = &self.shared.redis {
            let limits: Vec<(u64, Duration)> = q
                .limits
                .iter()
                .map(|l| (l.count, Duration::from_millis(l.window_ms)))
                .collect();
            if let Ok(o) = redis
                .quota_take(&QuotaTurn {
                    keys: &q.keys,
                    member: &self.member(),
                    guard: GUARD,
                    fair: q.fair,
                    max_wait,
                    limits: &limits,
                    first: first_stale.0,
                    stale: first_stale.1,
                })
                .await
            {
                let verdict = match o.verdict {
                    1 => Verdict::Go,
                    2 => Verdict::NotYourTurn,
                    _ => Verdict::RoomIn(o.ms.max(1)),
                };
                if verdict == Verdict::Go {
                    q.book().record(self.now_ms(), self.client);
                }
                q.stats.set_used(&o.used);
                return Turn {
                    verdict,
                    ahead: o.ahead,
                    slots: o.slots,
                };
            }
        }
        self.take_here(max_wait)
    }

    /// One turn on this sidecar's windows.
    fn take_here(&self, max_wait: Duration) -> Turn {
        let q = &self.quota;
        let now = self.now_ms();
        let mut book = q.book();
        let verdict = book.take(now, self.client, self.seq);
        let (ahead, slots) = book.outlook(now, self.client, self.seq, ms(max_wait));
        q.stats.set_used(&book.used(now));
        drop(book);
        if verdict == Verdict::Go {
            q.changed.notify_waiters();
        }
        Turn {
            verdict,
            ahead,
            slots,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.quota.book().leave(self.seq);
        self.quota.changed.notify_waiters();
        if let (Some(redis), Ok(rt)) = (&self.shared.redis, tokio::runtime::Handle::try_current()) {
            let (redis, keys, member) = (redis.clone(), self.quota.keys.clone(), self.member());
            // Best effort: a place left behind drops out after 2 s anyway.
            rt.spawn(async move {
                let _ = redis.quota_leave(&keys, &member).await;
            });
        }
    }
}
