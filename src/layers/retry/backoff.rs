//! How long to wait before retry number `n`: exponential from
//! `initial_wait`, doubling up to `max_wait`, each wait drawn between half and
//! all of its nominal step ("equal jitter"), or the upstream's `Retry-After`
//! (delta-seconds or an HTTP date) capped at `max_wait`.
//!
//! tower's `ExponentialBackoff` adds its jitter on top of the step (up to
//! twice it); the contract wants the step as the ceiling, so the two lines of
//! arithmetic are here, with tower's `HasherRng` as the random source.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::RETRY_AFTER;
use tower::util::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The nominal step before retry `n` (0-based): initial × 2ⁿ, capped.
    pub fn nominal(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The step before retry `n`, jittered into [nominal/2, nominal].
    pub fn wait(&self, n: u32, rng: &mut impl Rng) -> Duration {
        let step = self.nominal(n);
        step / 2 + step.mul_f64(rng.next_f64() / 2.0)
    }

    /// The wait an upstream asked for, capped at the max wait.
    pub fn retry_after(&self, headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
        parse_retry_after(headers, now).map(|d| d.min(self.max))
    }
}

/// `Retry-After: 120` or `Retry-After: Wed, 21 Oct 2026 07:28:00 GMT`.
pub fn parse_retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use tower::util::rng::HasherRng;

    const B: Backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(10),
    };

    #[test]
    fn doubles_from_initial_to_max() {
        let steps: Vec<u64> = (0..6).map(|n| B.nominal(n).as_secs()).collect();
        assert_eq!(steps, [1, 2, 4, 8, 10, 10]);
        assert_eq!(B.nominal(200), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_step() {
        let mut rng = HasherRng::new();
        for n in 0..5 {
            let step = B.nominal(n);
            let waits: Vec<Duration> = (0..200).map(|_| B.wait(n, &mut rng)).collect();
            assert!(waits.iter().all(|w| *w >= step / 2 && *w <= step), "{n}");
            // Actually jittered, not a constant.
            assert!(waits.iter().any(|w| *w != waits[0]));
        }
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date_capped_at_max() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            B.retry_after(&h, now)
        };
        assert_eq!(with("1"), Some(Duration::from_secs(1)));
        assert_eq!(with("120"), Some(Duration::from_secs(10)));
        let in_3s = httpdate::fmt_http_date(now + Duration::from_secs(3));
        assert_eq!(with(&in_3s), Some(Duration::from_secs(3)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(3));
        assert_eq!(with(&past), Some(Duration::ZERO));
        assert_eq!(with("soon"), None);
        assert_eq!(with("-1"), None);
        assert_eq!(B.retry_after(&HeaderMap::new(), now), None);
    }
}
