//! Value parsers: each turns the text of one setting (a file string, an
//! environment variable, a flag) into its typed value, or returns the reason
//! the value is bad. They know nothing of keys; the caller names the key.
//! Also the two formatters the rest of the crate shares: [`fmt_duration`]
//! and [`mask_url_password`].

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::Scheme;
use ipnet::IpNet;

use super::rate::{self, RateLimits};
use super::routes::RouteRate;
use super::{LogFormat, RateLimitKey, Upstream};

/// What a secret is printed as.
pub(super) const SECRET_MASK: &str = "***";

pub(super) fn addr(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected IP:PORT with a port from 0 to 65535, e.g. 0.0.0.0:5003".into())
}

pub(super) fn port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err("not a port number (1-65535)".into()),
    }
}

/// `s` as an `http://` URL; `https` is refused with `why_not_https`.
fn http_url(s: &str, why_not_https: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = s.trim().parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => Ok(uri),
        Some("https") => Err(why_not_https.into()),
        _ => Err("expected http://HOST:PORT".into()),
    }
}

pub(super) fn upstream(s: &str) -> Result<Upstream, String> {
    let uri = http_url(
        s,
        "https upstreams are not supported: the app runs beside the sidecar; use http://",
    )?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("the upstream URL cannot have a path or query".into());
    }
    let authority = uri.authority().cloned().ok_or("missing host")?;
    if authority.as_str().contains('@') {
        return Err("credentials in the upstream URL are not supported".into());
    }
    if authority.port_u16() == Some(0) {
        return Err("port 0 is not a valid upstream port".into());
    }
    Ok(Upstream {
        scheme: Scheme::HTTP,
        authority,
    })
}

/// An OTLP/HTTP collector's base URL, without a trailing slash. Plain HTTP:
/// the collector runs beside the pod or on its node (no TLS stack is built).
pub(super) fn otlp_endpoint(s: &str) -> Result<String, String> {
    let s = s.trim();
    let uri = http_url(
        s,
        "https is not supported: send to a Collector beside the pod or on the node over http://",
    )?;
    if uri.authority().is_none() {
        return Err("missing host".into());
    }
    if uri.query().is_some() {
        return Err("the endpoint cannot have a query".into());
    }
    Ok(s.trim_end_matches('/').to_string())
}

pub(super) fn redis_url(s: &str) -> Result<String, String> {
    let url = url::Url::parse(s.trim()).map_err(|e| format!("not a URL: {e}"))?;
    match url.scheme() {
        "redis" | "redis-cluster" | "redis-sentinel" => {}
        "rediss" | "rediss-cluster" | "rediss-sentinel" => {
            return Err(
                "TLS to Redis (rediss://) is not built in; use redis:// inside the cluster".into(),
            );
        }
        other => {
            return Err(format!(
                "unsupported scheme {other:?} (redis, redis-cluster, redis-sentinel)"
            ));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("missing host".into());
    }
    Ok(s.trim().to_string())
}

/// Replaces the password of a URL with `***` for display; a URL too broken
/// to parse loses everything between `://` and `@` instead.
pub fn mask_url_password(s: &str) -> String {
    match url::Url::parse(s) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some(SECRET_MASK));
            u.to_string()
        }
        Ok(_) => s.to_string(),
        Err(_) => match (s.find("://"), s.rfind('@')) {
            (Some(start), Some(at)) if at > start + 3 => {
                format!("{}{SECRET_MASK}{}", &s[..start + 3], &s[at..])
            }
            _ => s.to_string(),
        },
    }
}

pub(super) fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub(super) fn cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| "expected a CIDR such as 10.0.0.0/8 or an IP address".into())
}

/// A header name, lowercased as HTTP/2 writes it.
pub(super) fn header_name(s: &str) -> Result<String, String> {
    http::HeaderName::try_from(s)
        .map(|n| n.as_str().to_string())
        .map_err(|_| "not a valid header name".into())
}

/// A file duration: a unit is required (`"500ms"`, `"30s"`).
pub(super) fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("expected a duration with a unit such as \"500ms\", \"30s\" or \"1h\" ({e})")
    })
}

pub(super) fn nonzero_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// The legacy env durations are seconds (`1.0`, `60`); a unit is also fine.
pub(super) fn env_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    match t.parse::<f64>() {
        Ok(secs) if (0.0..1e9).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        Ok(_) => Err("expected a number of seconds from 0 to 1e9".into()),
        Err(_) => duration(t)
            .map_err(|_| "expected seconds (\"1.0\") or a duration with a unit (\"500ms\")".into()),
    }
}

/// Formats a duration for display and for the TOML output the way people
/// write one: a single number and unit (`1.5s`, `90m`, `250ms`), which
/// [`duration`] reads back to the same value. humantime's own formatter
/// splits it into parts (`1s 500ms`), which nobody writes.
pub fn fmt_duration(d: Duration) -> String {
    const UNITS: [(&str, u128); 6] = [
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
        ("ns", 1),
    ];
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    if ns > 1_000_000_000 && ns % 1_000_000 == 0 {
        // Whole milliseconds past a second: `1.5s`, not `1500ms`, unless
        // a larger unit divides it.
        if ns % 1_000_000_000 != 0 {
            let ms = format!("{:03}", (ns / 1_000_000) % 1000);
            return format!("{}.{}s", ns / 1_000_000_000, ms.trim_end_matches('0'));
        }
    }
    let (unit, size) = UNITS
        .into_iter()
        .find(|(_, size)| ns % size == 0)
        .unwrap_or(("ns", 1));
    format!("{}{unit}", ns / size)
}

pub(super) fn bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("expected True or False".into()),
    }
}

/// A whole number of any unsigned width.
pub(super) fn whole<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse::<T>()
        .map_err(|_| "expected a whole number".to_string())
}

pub(super) fn float(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .map_err(|_| "expected a number".to_string())
}

pub(super) fn level(s: &str) -> Result<String, String> {
    let lc = s.trim().to_ascii_lowercase();
    let mapped = match lc.as_str() {
        "warning" => "warn".to_string(),
        "critical" | "fatal" => "error".to_string(),
        "notset" => "trace".to_string(),
        _ => lc,
    };
    let is_level = |l: &str| matches!(l, "trace" | "debug" | "info" | "warn" | "error" | "off");
    // A bare word must be a level: tracing would read `loud` as a target name.
    let plausible = is_level(&mapped)
        || mapped
            .split(',')
            .all(|d| is_level(d.trim()) || d.contains('='));
    match tracing_subscriber::EnvFilter::builder().parse(&mapped) {
        Ok(_) if plausible => Ok(mapped),
        _ => Err("expected DEBUG, INFO, WARNING, ERROR, CRITICAL or a tracing filter such as \"info,rag_sidecar=debug\"".into()),
    }
}

pub(super) fn format(s: &str) -> Result<LogFormat, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected text or json".into()),
    }
}

pub(super) fn show_format(f: &LogFormat) -> String {
    match f {
        LogFormat::Text => "text".into(),
        LogFormat::Json => "json".into(),
    }
}

/// An upstream request path (`/api/health`).
pub(super) fn path(s: &str) -> Result<String, String> {
    if s.starts_with('/') && s.parse::<http::uri::PathAndQuery>().is_ok() {
        Ok(s.to_string())
    } else {
        Err("expected a path starting with '/'".into())
    }
}

pub(super) fn rate(s: &str) -> Result<RateLimits, String> {
    rate::parse(s)
}

pub(super) fn rate_key(s: &str) -> Result<RateLimitKey, String> {
    match s.trim() {
        "ip" => Ok(RateLimitKey::Ip),
        other => other
            .strip_prefix("header:")
            .and_then(|h| http::HeaderName::try_from(h.trim()).ok())
            .map(RateLimitKey::Header)
            .ok_or_else(|| "expected \"ip\" or \"header:NAME\"".into()),
    }
}

pub(super) fn show_rate_key(k: &RateLimitKey) -> String {
    match k {
        RateLimitKey::Ip => "ip".into(),
        RateLimitKey::Header(h) => format!("header:{h}"),
    }
}

pub(super) fn route_rate(s: &str) -> Result<RouteRate, String> {
    match s.trim() {
        "default" => Ok(RouteRate::Default),
        "exempt" | "none" | "off" => Ok(RouteRate::Exempt),
        other => rate::parse(other).map(RouteRate::Limits),
    }
}

pub(super) fn method(s: &str) -> Result<http::Method, String> {
    let up = s.trim().to_ascii_uppercase();
    http::Method::from_bytes(up.as_bytes()).map_err(|_| "not an HTTP method".into())
}

/// Route, namespace and circuit names become metric labels and cache key
/// prefixes: short, lowercase, no separators.
pub(super) fn name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err("expected 1-64 characters of a-z, 0-9, '-' and '_'".into())
    }
}

/// The trimmed text, or `None` when there is none (`LOG_FILE=`).
pub(super) fn non_empty(s: &str) -> Option<&str> {
    let s = s.trim();
    (!s.is_empty()).then_some(s)
}
