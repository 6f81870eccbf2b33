//! The breaker's state machine under paused tokio time.

use super::*;

fn admitted(b: &Arc<Breaker>) -> Permit {
    match b.admit() {
        Admission::Permitted(p) => p,
        Admission::Rejected { retry_after } => panic!("rejected for {retry_after:?}"),
    }
}

fn rejected(b: &Arc<Breaker>) -> Duration {
    match b.admit() {
        Admission::Rejected { retry_after } => retry_after,
        Admission::Permitted(_) => panic!("admitted"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_plain_500_counts_once_per_client_in_a_run() {
    let b = Breaker::new("upstream", 3, Duration::from_secs(60));
    for _ in 0..5 {
        admitted(&b).plain_500(Some(1));
    }
    assert_eq!(b.snapshot().failure_count, 1);
    // Another client's, and a gateway error: each counts.
    admitted(&b).plain_500(Some(2));
    assert_eq!(b.snapshot().failure_count, 2);
    // A success ends the run: client 1 counts again in the next.
    admitted(&b).success();
    admitted(&b).plain_500(Some(1));
    assert_eq!(b.snapshot().failure_count, 1);
    admitted(&b).failure();
    admitted(&b).plain_500(None);
    assert_eq!(b.snapshot().state, State::Open);
    // A probe's 500 re-opens it, whoever sent it.
    tokio::time::advance(Duration::from_secs(61)).await;
    admitted(&b).plain_500(Some(1));
    assert_eq!(b.snapshot().state, State::Open);
}

#[tokio::test(start_paused = true)]
async fn opens_after_threshold_consecutive_failures_and_probes_once() {
    let b = Breaker::new("gemini", 3, Duration::from_secs(60));
    // A success in between resets the run of failures.
    admitted(&b).failure();
    admitted(&b).failure();
    admitted(&b).success();
    assert_eq!(b.snapshot().failure_count, 0);
    for _ in 0..3 {
        admitted(&b).failure();
    }
    let s = b.snapshot();
    assert_eq!(s.state, State::Open);
    assert_eq!(s.failure_count, 3);
    assert_eq!(s.time_until_retry, 60);
    assert!(s.last_failure_time.is_some());
    assert!(b.is_open());
    assert_eq!(rejected(&b), Duration::from_secs(60));

    tokio::time::advance(Duration::from_secs(45)).await;
    assert_eq!(b.snapshot().time_until_retry, 15);
    assert_eq!(rejected(&b), Duration::from_secs(15));

    tokio::time::advance(Duration::from_secs(15)).await;
    assert_eq!(b.snapshot().state, State::HalfOpen);
    assert!(!b.is_open());
    // Exactly one probe; concurrent callers fail fast meanwhile.
    let probe = admitted(&b);
    for _ in 0..10 {
        rejected(&b);
    }
    probe.success();
    assert_eq!(b.snapshot().state, State::Closed);
    assert_eq!(b.snapshot().failure_count, 0);
    admitted(&b).success();
}

#[tokio::test(start_paused = true)]
async fn failed_probe_reopens_for_a_full_period() {
    let b = Breaker::new("upstream", 1, Duration::from_secs(10));
    admitted(&b).failure();
    tokio::time::advance(Duration::from_secs(10)).await;
    admitted(&b).failure();
    assert_eq!(b.snapshot().state, State::Open);
    assert_eq!(b.snapshot().time_until_retry, 10);
    tokio::time::advance(Duration::from_secs(9)).await;
    rejected(&b);
    tokio::time::advance(Duration::from_secs(1)).await;
    admitted(&b).success();
    assert_eq!(b.snapshot().state, State::Closed);
}

#[tokio::test(start_paused = true)]
async fn cancelled_probe_frees_the_slot_and_counts_nothing() {
    let b = Breaker::new("upstream", 1, Duration::from_secs(1));
    admitted(&b).failure();
    tokio::time::advance(Duration::from_secs(1)).await;
    drop(admitted(&b));
    assert_eq!(b.snapshot().state, State::HalfOpen);
    assert_eq!(b.snapshot().failure_count, 1);
    admitted(&b).success();
    assert_eq!(b.snapshot().state, State::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_permit_dropped_at_its_deadline_is_a_timeout_failure() {
    let b = Breaker::new("upstream", 2, Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(1);
    drop(admitted(&b).expires_at(deadline)); // the client left early
    assert_eq!(b.snapshot().failure_count, 0);
    let p = admitted(&b).expires_at(deadline);
    tokio::time::advance(Duration::from_secs(1)).await;
    drop(p); // the route timeout gave up on it
    assert_eq!(b.snapshot().failure_count, 1);
    assert!(b.snapshot().last_failure_time.is_some());
}

#[tokio::test(start_paused = true)]
async fn late_results_do_not_move_an_open_circuit() {
    let b = Breaker::new("upstream", 2, Duration::from_secs(5));
    let early = admitted(&b);
    admitted(&b).failure();
    admitted(&b).failure();
    early.success(); // admitted while closed, answered after it opened
    assert_eq!(b.snapshot().state, State::Open);
    assert_eq!(b.snapshot().time_until_retry, 5);
}

#[tokio::test(start_paused = true)]
async fn reset_closes_and_forgets() {
    let b = Breaker::new("embedding", 1, Duration::from_secs(60));
    admitted(&b).failure();
    b.reset();
    let s = b.snapshot();
    assert_eq!(
        (
            s.state,
            s.failure_count,
            s.last_failure_time,
            s.time_until_retry
        ),
        (State::Closed, 0, None, 0)
    );
    admitted(&b).success();
}

#[test]
fn ceil_secs_rounds_up() {
    assert_eq!(ceil_secs(Duration::ZERO), 0);
    assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
    assert_eq!(ceil_secs(Duration::from_secs(45)), 45);
    assert_eq!(ceil_secs(Duration::from_millis(44_100)), 45);
}

#[tokio::test(start_paused = true)]
async fn the_fleet_hears_its_transitions_and_it_adopts_the_fleets_once_per_version() {
    let b = Breaker::new("gemini", 2, Duration::from_secs(30));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    b.link(tx);
    assert!(b.is_linked());
    admitted(&b).failure();
    assert!(rx.try_recv().is_err(), "no transition yet");
    admitted(&b).failure();
    assert_eq!(
        rx.try_recv().ok().map(|c| c.opened_for),
        Some(Some(Duration::from_secs(30)))
    );
    b.wrote(1);
    // Its own write heard back changes nothing.
    b.adopt(1, None);
    assert_eq!(b.snapshot().state, State::Open);
    // Another sidecar's probe closed it: taken, and not told back.
    b.adopt(2, None);
    assert_eq!(b.snapshot().state, State::Closed);
    assert!(rx.try_recv().is_err());
    // Opened elsewhere for 10 s more; an older version is ignored.
    b.adopt(4, Some(Duration::from_secs(10)));
    b.adopt(3, None);
    assert_eq!(b.snapshot().state, State::Open);
    assert_eq!(b.snapshot().time_until_retry, 10);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(b.snapshot().state, State::HalfOpen);
    // Another sidecar holds the fleet's probe: a second before asking again.
    let p = admitted(&b);
    assert!(p.is_probe());
    p.forget();
    b.probing_elsewhere();
    assert_eq!(rejected(&b), Duration::from_secs(1));
    tokio::time::advance(Duration::from_secs(1)).await;
    admitted(&b).success();
    assert_eq!(rx.try_recv().ok().map(|c| c.opened_for), Some(None));
    // A manual reset is the fleet's too.
    admitted(&b).failure();
    admitted(&b).failure();
    let _ = rx.try_recv();
    b.reset();
    assert_eq!(rx.try_recv().ok().map(|c| c.opened_for), Some(None));
}
