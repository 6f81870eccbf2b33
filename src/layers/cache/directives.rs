//! The request's own cache directives (RFC 9111 §5.2.1) and what they make
//! of an entry: pure functions over a header map and an entry's freshness,
//! tested as tables (and fuzzed: `fuzz/fuzz_targets/cache_directives.rs`).
//!
//! `no-cache` (or `Pragma: no-cache`) skips the lookup and refreshes the
//! entry; `no-store` bypasses the cache; `max-age=N`: an entry older than N
//! s is not used; `min-fresh=N`: an entry with less than N s of freshness
//! left is not used; `max-stale[=N]`: an expired entry at most N s (without
//! N: any, within the stale window) past its TTL is served at once;
//! `only-if-cached`: a miss answers 504 without calling the upstream.
//! Unknown directives, and known ones with an invalid value, are ignored;
//! the first of a repeated directive counts.

use http::{HeaderMap, header};

use super::policy::Freshness;

/// RFC 9111 §1.2.2: a delta-seconds too large to hold is taken as 2^31.
const DELTA_MAX: u64 = 1 << 31;

/// `max-stale` with or without its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxStale {
    /// Any staleness (within the stale window the entry is kept for).
    Any,
    /// At most this many seconds past its TTL.
    Secs(u64),
}

/// What the request asks of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Directives {
    pub no_cache: bool,
    pub no_store: bool,
    pub max_age: Option<u64>,
    pub min_fresh: Option<u64>,
    pub max_stale: Option<MaxStale>,
    pub only_if_cached: bool,
}

/// What the cache does with the entry it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Fresh and acceptable: a hit.
    Hit,
    /// Expired, but the request accepts it (`max-stale`): served at once.
    Stale,
    /// Not to be used now; `detail` names the directive that refused it.
    /// An expired entry is still kept for stale-if-error.
    Forward { detail: Option<&'static str> },
}

/// The directives of a request's `Cache-Control` fields (and `Pragma`).
pub fn directives(headers: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    let (mut max_age, mut min_fresh, mut max_stale) = (false, false, false);
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for (name, arg) in split(value) {
            match name.to_ascii_lowercase().as_str() {
                "no-cache" => d.no_cache = true,
                "no-store" => d.no_store = true,
                "only-if-cached" => d.only_if_cached = true,
                "max-age" if !max_age => {
                    if let Some(n) = arg.and_then(delta_seconds) {
                        d.max_age = Some(n);
                        max_age = true;
                    }
                }
                "min-fresh" if !min_fresh => {
                    if let Some(n) = arg.and_then(delta_seconds) {
                        d.min_fresh = Some(n);
                        min_fresh = true;
                    }
                }
                "max-stale" if !max_stale => match arg {
                    None => {
                        d.max_stale = Some(MaxStale::Any);
                        max_stale = true;
                    }
                    Some(a) => {
                        if let Some(n) = delta_seconds(a) {
                            d.max_stale = Some(MaxStale::Secs(n));
                            max_stale = true;
                        }
                    }
                },
                _ => {}
            }
        }
    }
    if headers
        .get_all(header::PRAGMA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("no-cache"))
    {
        d.no_cache = true;
    }
    d
}

/// `name[=value]` items of a comma-separated list, a quoted value's commas
/// and escapes respected; the value unquoted.
fn split(list: &str) -> Vec<(&str, Option<String>)> {
    let mut out = Vec::new();
    let bytes = list.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // One item: up to a comma outside quotes.
        let start = i;
        let mut quoted = false;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                b',' if !quoted => break,
                _ => {}
            }
            i += 1;
        }
        let item = list.get(start..i.min(bytes.len())).unwrap_or("").trim();
        i += 1;
        if item.is_empty() {
            continue;
        }
        match item.split_once('=') {
            None => out.push((item, None)),
            Some((n, v)) => out.push((n.trim(), Some(unquote(v.trim())))),
        }
    }
    out
}

fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return v.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// RFC 9111 §1.2.2 delta-seconds: digits only, capped at 2^31.
fn delta_seconds(v: String) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<u64>().map_or(DELTA_MAX, |n| n.min(DELTA_MAX)))
}

/// What the directives make of an entry of this freshness.
pub fn decide(d: &Directives, f: Freshness) -> Use {
    match f {
        Freshness::Fresh { age_secs, ttl_left } => {
            if d.max_age.is_some_and(|m| age_secs > m) {
                Use::Forward {
                    detail: Some("max-age"),
                }
            } else if d.min_fresh.is_some_and(|m| ttl_left < m) {
                Use::Forward {
                    detail: Some("min-fresh"),
                }
            } else {
                Use::Hit
            }
        }
        Freshness::Stale { age_secs, over } => {
            if d.max_age.is_some_and(|m| age_secs > m) {
                return Use::Forward {
                    detail: Some("max-age"),
                };
            }
            match d.max_stale {
                Some(MaxStale::Any) => Use::Stale,
                Some(MaxStale::Secs(n)) if over <= n => Use::Stale,
                _ => Use::Forward { detail: None },
            }
        }
        Freshness::Expired => Use::Forward { detail: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(values: &[&'static str]) -> Directives {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::CACHE_CONTROL, HeaderValue::from_static(v));
        }
        directives(&h)
    }

    #[test]
    fn parsing_table() {
        let none = Directives::default();
        let cases: &[(&[&'static str], Directives)] = &[
            (&[], none),
            (&[""], none),
            (
                &["max-age=60"],
                Directives {
                    max_age: Some(60),
                    ..none
                },
            ),
            (
                &["Max-Age = 60"],
                Directives {
                    max_age: Some(60),
                    ..none
                },
            ),
            (
                &["max-age=\"60\""],
                Directives {
                    max_age: Some(60),
                    ..none
                },
            ),
            // Invalid values are ignored, not taken as 0.
            (&["max-age=-1"], none),
            (&["max-age=abc"], none),
            (&["max-age="], none),
            (&["max-age"], none),
            (
                &["max-age=99999999999999999999"],
                Directives {
                    max_age: Some(DELTA_MAX),
                    ..none
                },
            ),
            // The first of a repeated directive counts.
            (
                &["max-age=5, max-age=50"],
                Directives {
                    max_age: Some(5),
                    ..none
                },
            ),
            (
                &["max-age=5", "max-age=50"],
                Directives {
                    max_age: Some(5),
                    ..none
                },
            ),
            (
                &["min-fresh=30"],
                Directives {
                    min_fresh: Some(30),
                    ..none
                },
            ),
            (
                &["max-stale"],
                Directives {
                    max_stale: Some(MaxStale::Any),
                    ..none
                },
            ),
            (
                &["max-stale=120"],
                Directives {
                    max_stale: Some(MaxStale::Secs(120)),
                    ..none
                },
            ),
            (&["max-stale=x"], none),
            (
                &["only-if-cached"],
                Directives {
                    only_if_cached: true,
                    ..none
                },
            ),
            (
                &["no-cache"],
                Directives {
                    no_cache: true,
                    ..none
                },
            ),
            (
                &["no-store"],
                Directives {
                    no_store: true,
                    ..none
                },
            ),
            // Unknown directives, and commas inside quoted values.
            (
                &["community=\"a, b\", max-age=7, x-custom"],
                Directives {
                    max_age: Some(7),
                    ..none
                },
            ),
            (
                &["private=\"x\\\"y, z\", only-if-cached"],
                Directives {
                    only_if_cached: true,
                    ..none
                },
            ),
            (
                &[" , ,max-stale=3,,min-fresh=4 "],
                Directives {
                    max_stale: Some(MaxStale::Secs(3)),
                    min_fresh: Some(4),
                    ..none
                },
            ),
        ];
        for (values, want) in cases {
            assert_eq!(parse(values), *want, "{values:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::PRAGMA, HeaderValue::from_static("No-Cache"));
        assert!(directives(&h).no_cache);
    }

    #[test]
    fn decision_table() {
        let none = Directives::default();
        let fresh = |age_secs, ttl_left| Freshness::Fresh { age_secs, ttl_left };
        let stale = |age_secs, over| Freshness::Stale { age_secs, over };
        let fwd = |detail| Use::Forward { detail };
        let cases = [
            (none, fresh(10, 50), Use::Hit),
            (none, stale(70, 10), fwd(None)),
            (none, Freshness::Expired, fwd(None)),
            (
                Directives {
                    max_age: Some(10),
                    ..none
                },
                fresh(10, 50),
                Use::Hit,
            ),
            (
                Directives {
                    max_age: Some(9),
                    ..none
                },
                fresh(10, 50),
                fwd(Some("max-age")),
            ),
            (
                Directives {
                    max_age: Some(0),
                    ..none
                },
                fresh(1, 50),
                fwd(Some("max-age")),
            ),
            (
                Directives {
                    min_fresh: Some(50),
                    ..none
                },
                fresh(10, 50),
                Use::Hit,
            ),
            (
                Directives {
                    min_fresh: Some(51),
                    ..none
                },
                fresh(10, 50),
                fwd(Some("min-fresh")),
            ),
            (
                Directives {
                    max_stale: Some(MaxStale::Any),
                    ..none
                },
                stale(70, 10),
                Use::Stale,
            ),
            (
                Directives {
                    max_stale: Some(MaxStale::Secs(10)),
                    ..none
                },
                stale(70, 10),
                Use::Stale,
            ),
            (
                Directives {
                    max_stale: Some(MaxStale::Secs(9)),
                    ..none
                },
                stale(70, 10),
                fwd(None),
            ),
            (
                Directives {
                    max_stale: Some(MaxStale::Any),
                    ..none
                },
                Freshness::Expired,
                fwd(None),
            ),
            // max-age bounds the age of a stale one too.
            (
                Directives {
                    max_stale: Some(MaxStale::Any),
                    max_age: Some(60),
                    ..none
                },
                stale(70, 10),
                fwd(Some("max-age")),
            ),
        ];
        for (d, f, want) in cases {
            assert_eq!(decide(&d, f), want, "{d:?} {f:?}");
        }
    }
}
