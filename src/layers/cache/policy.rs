//! What may be cached and how fresh it is: pure functions over headers,
//! statuses and times, tested as tables.

use http::{HeaderMap, HeaderName, StatusCode, header};

use super::directives::Directives;

/// What the request asks of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestMode {
    /// Look up, and store on a miss.
    Normal,
    /// `Cache-Control: no-cache`: skip the lookup, forward, refresh the entry.
    Refresh,
    /// `Cache-Control: no-store`: neither look up nor store.
    Bypass,
}

fn cache_control_has(headers: &HeaderMap, directives: &[&str]) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.split('=').next().unwrap_or("").trim())
        .any(|d| directives.iter().any(|x| d.eq_ignore_ascii_case(x)))
}

pub fn request_mode(d: &Directives) -> RequestMode {
    if d.no_store {
        RequestMode::Bypass
    } else if d.no_cache {
        RequestMode::Refresh
    } else {
        RequestMode::Normal
    }
}

/// Why a response is not stored (for logs and `Cache-Status` detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCacheable {
    Status,
    SetCookie,
    Private,
    TooLarge,
    /// `Vary` names a header outside the key: the answer could be another
    /// caller's (a session cookie, an origin, an encoding).
    Vary,
}

impl NotCacheable {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::SetCookie => "set-cookie",
            Self::Private => "private",
            Self::TooLarge => "too-large",
            Self::Vary => "vary",
        }
    }
}

/// Whether a response head may be stored; the body size is checked as it is
/// read (`declared` is its Content-Length, when given).
pub fn response_cacheable(
    status: StatusCode,
    headers: &HeaderMap,
    declared: Option<u64>,
    max_body: u64,
    keyed_headers: &[HeaderName],
) -> Result<(), NotCacheable> {
    if !status.is_success() {
        return Err(NotCacheable::Status);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotCacheable::SetCookie);
    }
    if cache_control_has(headers, &["private", "no-store"]) {
        return Err(NotCacheable::Private);
    }
    if declared.is_some_and(|n| n > max_body) {
        return Err(NotCacheable::TooLarge);
    }
    let varies_outside_key = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .any(|n| {
            n == "*"
                || !keyed_headers
                    .iter()
                    .any(|k| k.as_str().eq_ignore_ascii_case(n))
        });
    if varies_outside_key {
        return Err(NotCacheable::Vary);
    }
    Ok(())
}

/// Headers never replayed from the cache: per-response ones, and the ones
/// the cache itself sets. A `static`: a `const` array would be built and
/// dropped again for every header looked at.
static NOT_STORED: [HeaderName; 7] = [
    header::SET_COOKIE,
    header::AGE,
    header::DATE,
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-cache"),
    HeaderName::from_static("cache-status"),
    header::CONNECTION,
];

/// The headers kept in an entry (hop-by-hop ones are already gone: the proxy
/// strips them). Names and values are copied: parsed ones point into the
/// connection's read buffer, which an entry would otherwise keep alive.
pub fn stored_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if NOT_STORED.contains(name) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            http::HeaderValue::from_bytes(value.as_bytes()),
        ) {
            out.append(n, v);
        }
    }
    out
}

/// How usable an entry is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within its TTL: serve it. `ttl_left` in whole seconds.
    Fresh { age_secs: u64, ttl_left: u64 },
    /// Past its TTL but within the stale-if-error window: serve it only when
    /// the upstream fails. `over` is how many seconds past its TTL.
    Stale { age_secs: u64, over: u64 },
    /// Past both: as if absent.
    Expired,
}

pub fn freshness(stored_at_ms: u64, ttl_ms: u64, stale_ms: u64, now_ms: u64) -> Freshness {
    let age = now_ms.saturating_sub(stored_at_ms);
    if age < ttl_ms {
        Freshness::Fresh {
            age_secs: age / 1000,
            ttl_left: (ttl_ms - age).div_ceil(1000),
        }
    } else if age < ttl_ms.saturating_add(stale_ms) {
        Freshness::Stale {
            age_secs: age / 1000,
            over: (age - ttl_ms) / 1000,
        }
    } else {
        Freshness::Expired
    }
}

/// Whether an answer is a stream of server-sent events.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    fn request_mode(h: &HeaderMap) -> RequestMode {
        super::request_mode(&crate::layers::cache::directives::directives(h))
    }

    #[test]
    fn request_modes() {
        assert_eq!(request_mode(&h(&[])), RequestMode::Normal);
        assert_eq!(
            request_mode(&h(&[("cache-control", "no-cache")])),
            RequestMode::Refresh
        );
        assert_eq!(
            request_mode(&h(&[("cache-control", "max-age=0, No-Cache")])),
            RequestMode::Refresh
        );
        assert_eq!(
            request_mode(&h(&[("pragma", "no-cache")])),
            RequestMode::Refresh
        );
        assert_eq!(
            request_mode(&h(&[("cache-control", "no-store")])),
            RequestMode::Bypass
        );
        assert_eq!(
            request_mode(&h(&[("cache-control", "max-age=60")])),
            RequestMode::Normal
        );
    }

    #[test]
    fn cacheability_table() {
        let ok = StatusCode::OK;
        let max = 1024;
        let ids = [
            HeaderName::from_static("authorization"),
            HeaderName::from_static("x-user-id"),
        ];
        assert_eq!(response_cacheable(ok, &h(&[]), None, max, &ids), Ok(()));
        assert_eq!(
            response_cacheable(StatusCode::CREATED, &h(&[]), Some(10), max, &ids),
            Ok(())
        );
        for s in [301, 400, 404, 429, 500, 503] {
            let s = StatusCode::from_u16(s).unwrap();
            assert_eq!(
                response_cacheable(s, &h(&[]), None, max, &ids),
                Err(NotCacheable::Status)
            );
        }
        assert_eq!(
            response_cacheable(ok, &h(&[("set-cookie", "a=b")]), None, max, &ids),
            Err(NotCacheable::SetCookie)
        );
        assert_eq!(
            response_cacheable(ok, &h(&[("cache-control", "private")]), None, max, &ids),
            Err(NotCacheable::Private)
        );
        assert_eq!(
            response_cacheable(
                ok,
                &h(&[("cache-control", "public, no-store")]),
                None,
                max,
                &ids
            ),
            Err(NotCacheable::Private)
        );
        assert_eq!(
            response_cacheable(ok, &h(&[("cache-control", "max-age=60")]), None, max, &ids),
            Ok(())
        );
        // A stream is stored once it ends cleanly (the layer's tee).
        assert_eq!(
            response_cacheable(
                ok,
                &h(&[("content-type", "text/event-stream")]),
                None,
                max,
                &ids
            ),
            Ok(())
        );
        assert_eq!(
            response_cacheable(ok, &h(&[]), Some(1025), max, &ids),
            Err(NotCacheable::TooLarge)
        );
    }

    #[test]
    fn stored_headers_drop_per_response_ones() {
        let s = stored_headers(&h(&[
            ("set-cookie", "a"),
            ("x-request-id", "r"),
            ("date", "d"),
            ("content-type", "application/json"),
            ("x-app", "1"),
        ]));
        assert_eq!(s.len(), 2);
        assert!(s.contains_key("content-type") && s.contains_key("x-app"));
    }

    #[test]
    fn freshness_table() {
        let (ttl, stale) = (10_000, 60_000);
        assert_eq!(
            freshness(0, ttl, stale, 0),
            Freshness::Fresh {
                age_secs: 0,
                ttl_left: 10
            }
        );
        assert_eq!(
            freshness(0, ttl, stale, 9_999),
            Freshness::Fresh {
                age_secs: 9,
                ttl_left: 1
            }
        );
        assert_eq!(
            freshness(0, ttl, stale, 10_000),
            Freshness::Stale {
                age_secs: 10,
                over: 0
            }
        );
        assert_eq!(
            freshness(0, ttl, stale, 69_999),
            Freshness::Stale {
                age_secs: 69,
                over: 59
            }
        );
        assert_eq!(freshness(0, ttl, stale, 70_000), Freshness::Expired);
        assert_eq!(freshness(0, ttl, 0, 10_000), Freshness::Expired);
        // A clock behind the writer's (another replica) reads as age 0.
        assert_eq!(
            freshness(5_000, ttl, stale, 1_000),
            Freshness::Fresh {
                age_secs: 0,
                ttl_left: 10
            }
        );
    }
}
