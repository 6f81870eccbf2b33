//! `Book`: one route's upstream quota in memory, the arithmetic the Redis
//! script (`redis::scripts::QUOTA_LUA`) does for the fleet: exact sliding
//! windows (a log of call times per limit) and the fair choice of which
//! waiting request goes next.
//!
//! Pure: the caller passes the time (ms on its clock) in, so the tests drive
//! it step by step.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// A client, as the rate limiter keys it (hashed).
pub type Client = u64;

/// What a request asking for a call is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go now: the call is counted in every window.
    Go,
    /// Every window must have room first; the first one has it in this
    /// many ms.
    RoomIn(u64),
    /// There is room, but another waiting request is due first (fewer calls
    /// for its client, or earlier from the same client).
    NotYourTurn,
}

/// One limit: at most `count` calls in any `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub count: u64,
    pub window_ms: u64,
}

/// One route's windows and waiting requests.
#[derive(Debug)]
pub struct Book {
    limits: Vec<Limit>,
    /// A call counts in a window for `window_ms + guard_ms`, so that the
    /// app's own window, which sees each call a little after it left, is
    /// never exceeded either.
    guard_ms: u64,
    /// Per limit, the time of each call still in its window, oldest first.
    calls: Vec<VecDeque<u64>>,
    /// The calls of the last two spans of the shortest window, with their
    /// client: what fairness compares. Two, because a window has room just
    /// as its oldest calls leave it: counted over one, the client whose
    /// calls just left would look as if it had had none.
    fair: VecDeque<(u64, Client)>,
    /// The index of the shortest window.
    fair_limit: usize,
    /// Requests waiting, by arrival (a sequence number).
    waiting: BTreeMap<u64, Client>,
}

impl Book {
    pub fn new(limits: Vec<Limit>, guard_ms: u64) -> Self {
        let fair_limit = limits
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| l.window_ms)
            .map_or(0, |(i, _)| i);
        Self {
            calls: vec![VecDeque::new(); limits.len()],
            limits,
            guard_ms,
            fair: VecDeque::new(),
            fair_limit,
            waiting: BTreeMap::new(),
        }
    }

    /// Forgets the calls that have left their windows.
    fn expire(&mut self, now: u64) {
        for (limit, log) in self.limits.iter().zip(&mut self.calls) {
            let span = limit.window_ms + self.guard_ms;
            while log.front().is_some_and(|t| t + span <= now) {
                log.pop_front();
            }
        }
        if let Some(limit) = self.limits.get(self.fair_limit) {
            let span = 2 * (limit.window_ms + self.guard_ms);
            while self.fair.front().is_some_and(|(t, _)| t + span <= now) {
                self.fair.pop_front();
            }
        }
    }

    /// How long until every window has room for one more call (0: now).
    pub fn room_in(&mut self, now: u64) -> u64 {
        self.expire(now);
        let mut wait = 0;
        for (limit, log) in self.limits.iter().zip(&self.calls) {
            let len = log.len() as u64;
            if len >= limit.count {
                // The call that must leave for one to fit.
                let idx = usize::try_from(len - limit.count).unwrap_or(usize::MAX);
                if let Some(t) = log.get(idx) {
                    wait = wait.max((t + limit.window_ms + self.guard_ms).saturating_sub(now));
                } else {
                    // A limit of zero calls never has room.
                    wait = u64::MAX;
                }
            }
        }
        wait
    }

    /// Request `seq` of `client` asks for a call at `now`; it is added to
    /// the waiting requests if it is not among them yet, and taken off
    /// them when it goes.
    pub fn take(&mut self, now: u64, client: Client, seq: u64) -> Verdict {
        self.waiting.entry(seq).or_insert(client);
        let wait = self.room_in(now);
        if wait > 0 {
            return Verdict::RoomIn(wait);
        }
        if self.next_due() != Some(seq) {
            return Verdict::NotYourTurn;
        }
        self.waiting.remove(&seq);
        self.record(now, client);
        Verdict::Go
    }

    /// What a waiting request `seq` of `client` may expect within
    /// `max_wait` ms of `now`: the waiting requests due before it (those
    /// of clients with no more calls than its own, and earlier ones of its
    /// own) and the calls that every window will have room for by then
    /// (each of a window's N places is free now or when its call leaves,
    /// and again a window later). A request with as many ahead as there
    /// will be calls cannot go in time, and is told so at once.
    pub fn outlook(&mut self, now: u64, client: Client, seq: u64, max_wait: u64) -> (u64, u64) {
        self.expire(now);
        let per_client = self.per_client();
        let mine = self.rank(&per_client, client, seq);
        let ahead = self
            .waiting
            .iter()
            .filter(|(s, c)| self.rank(&per_client, **c, **s) < mine)
            .count() as u64;
        let mut slots = u64::MAX;
        for (limit, log) in self.limits.iter().zip(&self.calls) {
            let span = limit.window_ms + self.guard_ms;
            // Each of the window's N places is free now or when its call
            // leaves, and then once every span.
            let taken = log
                .len()
                .min(usize::try_from(limit.count).unwrap_or(usize::MAX));
            let free_now = limit.count - taken as u64;
            let lanes = log.iter().skip(log.len() - taken).map(|t| t + span);
            let calls: u64 = std::iter::repeat_n(now, usize::try_from(free_now).unwrap_or(0))
                .chain(lanes)
                .filter(|free_at| *free_at <= now + max_wait)
                .map(|free_at| 1 + (now + max_wait - free_at) / span.max(1))
                .sum();
            slots = slots.min(calls);
        }
        (ahead, slots)
    }

    /// Each recent client's calls and its last call.
    fn per_client(&self) -> HashMap<Client, (usize, u64)> {
        let mut per_client: HashMap<Client, (usize, u64)> = HashMap::new();
        for (t, c) in &self.fair {
            let e = per_client.entry(*c).or_default();
            *e = (e.0 + 1, *t);
        }
        per_client
    }

    /// A call made elsewhere (the fleet's windows said go) is counted here
    /// too, so that these windows know this sidecar's own calls if Redis is
    /// lost.
    pub fn record(&mut self, now: u64, client: Client) {
        self.expire(now);
        for log in &mut self.calls {
            log.push_back(now);
        }
        self.fair.push_back((now, client));
    }

    /// Limit `i` now allows `count` calls (a learned limit changes).
    pub fn set_count(&mut self, i: usize, count: u64) {
        if let Some(l) = self.limits.get_mut(i) {
            l.count = count;
        }
    }

    /// The windows start again from calls made before they were kept:
    /// `(time, calls)` pairs, oldest first (a learned limit coming into
    /// force, with the calls of the last minute).
    pub fn seed(&mut self, calls: &[(u64, u64)]) {
        for log in &mut self.calls {
            log.clear();
            for (t, n) in calls {
                log.extend(std::iter::repeat_n(*t, usize::try_from(*n).unwrap_or(0)));
            }
        }
    }

    /// A waiting request gave up (its client left, or its wait ran out).
    pub fn leave(&mut self, seq: u64) {
        self.waiting.remove(&seq);
    }

    /// The waiting request due next: the first (by arrival) of the client
    /// with the fewest calls in the last two spans of the shortest window
    /// (of those, the one served longest ago).
    fn next_due(&self) -> Option<u64> {
        let per_client = self.per_client();
        self.waiting
            .iter()
            .min_by_key(|(seq, client)| self.rank(&per_client, **client, **seq))
            .map(|(seq, _)| *seq)
    }

    /// The order waiting requests go in: fewest recent calls, then served
    /// longest ago (never first), then first come.
    fn rank(
        &self,
        per_client: &HashMap<Client, (usize, u64)>,
        client: Client,
        seq: u64,
    ) -> (usize, Option<u64>, u64) {
        match per_client.get(&client) {
            Some((calls, last)) => (*calls, Some(*last), seq),
            None => (0, None, seq),
        }
    }

    /// The calls in each window now.
    pub fn used(&mut self, now: u64) -> Vec<u64> {
        self.expire(now);
        self.calls.iter().map(|l| l.len() as u64).collect()
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(limits: &[(u64, u64)], guard: u64) -> Book {
        Book::new(
            limits
                .iter()
                .map(|&(count, window_ms)| Limit { count, window_ms })
                .collect(),
            guard,
        )
    }

    #[test]
    fn n_calls_go_at_once_and_the_next_waits_for_the_oldest_to_leave() {
        let mut b = book(&[(3, 1000)], 100);
        assert_eq!(b.take(0, 1, 1), Verdict::Go);
        assert_eq!(b.take(10, 1, 2), Verdict::Go);
        assert_eq!(b.take(20, 1, 3), Verdict::Go);
        // The oldest (at 0) leaves at 0 + 1000 + 100.
        assert_eq!(b.take(500, 1, 4), Verdict::RoomIn(600));
        assert_eq!(b.take(1099, 1, 4), Verdict::RoomIn(1));
        assert_eq!(b.take(1100, 1, 4), Verdict::Go);
        // Then the one at 10 is next to leave.
        assert_eq!(b.take(1100, 1, 5), Verdict::RoomIn(10));
    }

    #[test]
    fn no_window_of_the_span_ever_holds_more_than_n() {
        let mut b = book(&[(5, 1000)], 0);
        let mut sent = Vec::new();
        let mut seq = 0;
        for now in (0..10_000).step_by(7) {
            seq += 1;
            if b.take(now, 1, seq) == Verdict::Go {
                sent.push(now);
            } else {
                b.leave(seq);
            }
        }
        for (i, t) in sent.iter().enumerate() {
            let within = sent[i..].iter().take_while(|u| **u < t + 1000).count();
            assert!(within <= 5, "{within} calls from {t}");
        }
        // And no allowance is left unused: 5 a second over 10 s.
        assert!(sent.len() >= 50, "{}", sent.len());
    }

    #[test]
    fn two_windows_are_both_held() {
        let mut b = book(&[(2, 100), (3, 1000)], 0);
        assert_eq!(b.take(0, 1, 1), Verdict::Go);
        assert_eq!(b.take(0, 1, 2), Verdict::Go);
        assert_eq!(b.take(50, 1, 3), Verdict::RoomIn(50));
        assert_eq!(b.take(100, 1, 3), Verdict::Go);
        // The short window has room at 200, the long one only at 1000.
        assert_eq!(b.take(200, 1, 4), Verdict::RoomIn(800));
        assert_eq!(b.used(200), vec![0, 3]);
        assert_eq!(b.take(1000, 1, 4), Verdict::Go);
    }

    #[test]
    fn the_client_with_fewest_calls_goes_first_fifo_within_one() {
        let mut b = book(&[(2, 1000)], 0);
        // The flooder takes both calls, and queues three more.
        assert_eq!(b.take(0, 7, 1), Verdict::Go);
        assert_eq!(b.take(0, 7, 2), Verdict::Go);
        for seq in 3..6 {
            assert_eq!(b.take(10, 7, seq), Verdict::RoomIn(990));
        }
        // The victim arrives last.
        assert_eq!(b.take(20, 9, 6), Verdict::RoomIn(980));
        // Room: the victim (no calls) before the flooder's earlier ones.
        assert_eq!(b.take(1000, 7, 3), Verdict::NotYourTurn);
        assert_eq!(b.take(1000, 9, 6), Verdict::Go);
        // Next the flooder, its oldest first.
        assert_eq!(b.take(1000, 7, 4), Verdict::NotYourTurn);
        assert_eq!(b.take(1000, 7, 3), Verdict::Go);
        assert_eq!(b.waiting(), 2);
    }

    #[test]
    fn the_outlook_counts_who_is_ahead_and_what_frees_in_time() {
        let mut b = book(&[(2, 1000)], 0);
        assert_eq!(b.take(0, 7, 1), Verdict::Go);
        assert_eq!(b.take(500, 7, 2), Verdict::Go);
        assert_eq!(b.take(600, 7, 3), Verdict::RoomIn(400));
        // Within 450 ms one call leaves (the one at 0); within 1 s both;
        // within 2.5 s (until 3100) the place freed at 1000 is free again
        // at 2000 and 3000, the one freed at 1500 again at 2500.
        assert_eq!(b.outlook(600, 7, 3, 450), (0, 1));
        assert_eq!(b.outlook(600, 7, 3, 1000), (0, 2));
        assert_eq!(b.outlook(600, 7, 3, 2500), (0, 5));
        // Another of the flooder's is behind 3; a new client is ahead of
        // both (no calls), so nobody is ahead of it.
        assert_eq!(b.take(600, 7, 4), Verdict::RoomIn(400));
        assert_eq!(b.outlook(600, 7, 4, 450), (1, 1));
        assert_eq!(b.take(600, 9, 5), Verdict::RoomIn(400));
        assert_eq!(b.outlook(600, 9, 5, 450), (0, 1));
    }

    #[test]
    fn a_seeded_window_holds_the_calls_made_before_it() {
        let mut b = book(&[(1, 60_000)], 0);
        b.set_count(0, 3);
        b.seed(&[(1_000, 2), (5_000, 1)]);
        assert_eq!(b.take(6_000, 1, 1), Verdict::RoomIn(55_000));
        b.set_count(0, 4);
        assert_eq!(b.take(6_000, 1, 1), Verdict::Go);
    }

    #[test]
    fn a_request_that_leaves_passes_its_turn() {
        let mut b = book(&[(1, 1000)], 0);
        assert_eq!(b.take(0, 1, 1), Verdict::Go);
        assert_eq!(b.take(10, 2, 2), Verdict::RoomIn(990));
        assert_eq!(b.take(20, 3, 3), Verdict::RoomIn(980));
        b.leave(2);
        assert_eq!(b.take(1000, 3, 3), Verdict::Go);
    }
}
