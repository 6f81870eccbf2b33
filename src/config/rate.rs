//! Flask-Limiter rate strings (`60 per minute`, `60/minute`, `2 per 5 minutes`,
//! several joined by `;`, `,` or `|`), parsed once at start-up into
//! [`RateLimits`]. The grammar is the `limits` library's, which Flask-Limiter
//! uses: `COUNT (per|/) [N] UNIT[s]`, units second, minute, hour, day, month
//! (30 days) and year (12 months).

use std::fmt;
use std::time::Duration;

/// One limit: `count` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub period: Duration,
}

impl Rate {
    /// The period in Flask-Limiter's words: `minute`, `5 minutes`.
    pub fn period_text(self) -> String {
        let secs = self.period.as_secs();
        let (n, unit) = [
            (86_400, "day"),
            (3_600, "hour"),
            (60, "minute"),
            (1, "second"),
        ]
        .into_iter()
        .find(|(u, _)| secs >= *u && secs % u == 0)
        .map_or((secs, "second"), |(u, name)| (secs / u, name));
        if n == 1 {
            unit.to_string()
        } else {
            format!("{n} {unit}s")
        }
    }
}

/// Every limit of one rate string; all of them must hold. `Default` is no
/// limit at all (the blank a configuration's defaults are written onto).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateLimits {
    text: String,
    limits: Vec<Rate>,
}

impl RateLimits {
    /// The limits, in the order written.
    pub fn limits(&self) -> &[Rate] {
        &self.limits
    }

    /// The string as the operator wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for RateLimits {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse(s)
    }
}

const UNITS: &[(&str, u64)] = &[
    ("second", 1),
    ("minute", 60),
    ("hour", 3_600),
    ("day", 86_400),
    ("month", 30 * 86_400),
    ("year", 12 * 30 * 86_400),
];

/// Parses a rate string; the error says what is wrong with which part.
pub fn parse(text: &str) -> Result<RateLimits, String> {
    let mut limits = Vec::new();
    for part in text.split([';', ',', '|']) {
        let part = part.trim();
        if part.is_empty() {
            if limits.is_empty() && text.trim().is_empty() {
                return Err("empty rate limit".into());
            }
            continue;
        }
        limits.push(parse_one(part)?);
    }
    if limits.is_empty() {
        return Err("empty rate limit".into());
    }
    Ok(RateLimits {
        text: text.trim().to_string(),
        limits,
    })
}

fn parse_one(part: &str) -> Result<Rate, String> {
    let (count, rest) = if let Some((c, r)) = part.split_once('/') {
        (c.trim(), r.trim())
    } else {
        let mut words = part.splitn(2, char::is_whitespace);
        let c = words.next().unwrap_or_default();
        let rest = words.next().unwrap_or_default().trim_start();
        let rest = rest
            .strip_prefix("per")
            .filter(|r| r.is_empty() || r.starts_with(char::is_whitespace))
            .ok_or_else(|| format!("expected \"N per UNIT\" or \"N/UNIT\" in {part:?}"))?;
        (c, rest.trim())
    };
    let count: u64 = count
        .parse()
        .map_err(|_| format!("{count:?} is not a whole number of requests"))?;
    if count == 0 {
        return Err(format!("a limit of 0 requests in {part:?} allows nothing"));
    }
    let (multiple, unit) = match rest.split_once(char::is_whitespace) {
        Some((n, unit)) if n.chars().all(|c| c.is_ascii_digit()) => {
            let n: u64 = n
                .parse()
                .map_err(|_| format!("{n:?} is not a whole number"))?;
            (n, unit.trim())
        }
        _ => (1, rest),
    };
    if multiple == 0 {
        return Err(format!("a period of 0 in {part:?}"));
    }
    let unit_lc = unit.to_ascii_lowercase();
    let singular = unit_lc.strip_suffix('s').unwrap_or(&unit_lc);
    let secs = UNITS
        .iter()
        .find(|(name, _)| *name == singular)
        .map(|(_, secs)| *secs)
        .ok_or_else(|| {
            format!("unknown unit {unit:?} (second, minute, hour, day, month or year)")
        })?;
    Ok(Rate {
        count,
        period: Duration::from_secs(secs * multiple),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &str) -> (u64, u64) {
        let r = parse(s).unwrap();
        assert_eq!(r.limits().len(), 1, "{s}");
        (r.limits()[0].count, r.limits()[0].period.as_secs())
    }

    #[test]
    fn flask_limiter_forms() {
        assert_eq!(one("60 per minute"), (60, 60));
        assert_eq!(one("60/minute"), (60, 60));
        assert_eq!(one(" 10 per second "), (10, 1));
        assert_eq!(one("1000 per hour"), (1000, 3600));
        assert_eq!(one("100 per day"), (100, 86_400));
        assert_eq!(one("2 per 5 minutes"), (2, 300));
        assert_eq!(one("2/5 minutes"), (2, 300));
        assert_eq!(one("5 per Minutes"), (5, 60));
        let many = parse("10 per second; 100 per minute, 1000/hour").unwrap();
        assert_eq!(many.limits().len(), 3);
        assert_eq!(many.as_str(), "10 per second; 100 per minute, 1000/hour");
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        for bad in [
            "",
            " ; ",
            "60 per fortnight",
            "sixty per minute",
            "60 minute",
            "60 perminute",
            "0 per minute",
            "60 per 0 minutes",
            "-1 per minute",
            "60 per",
            "per minute",
            "99999999999999999999999 per minute",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse("60 per fortnight").unwrap_err().contains("fortnight"));
    }
}
