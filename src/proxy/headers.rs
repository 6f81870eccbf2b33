//! Header rewriting at the proxy boundary (RFC 9110 §7.6.1): hop-by-hop
//! headers, including every name listed in `Connection`, never cross; the
//! `X-Forwarded-*` family tells the app who the client was.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// Headers that describe one connection, not the message. A `static`, not a
/// `const`: a `const` array is built afresh (and dropped, name by name) at
/// every use, here once per header of every request and answer.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Removes hop-by-hop headers and those the `Connection` header names.
/// `Transfer-Encoding` goes too: hyper frames each side itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present (usually none of them is): cheaper
    // than nine hashed removals on every request and response.
    let mut found: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if name == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(name) {
            found.push(name.clone());
        }
    }
    if found.is_empty() {
        return;
    }
    if found.contains(&header::CONNECTION) {
        let named = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::try_from(n.trim()).ok());
        found.extend(named);
    }
    for name in found {
        headers.remove(name);
    }
}

/// The longest client `X-Request-Id` kept (a UUID is 36; W3C trace ids 55).
const MAX_REQUEST_ID: usize = 128;

/// Drops a client's `X-Request-Id` that is too long or not plain visible
/// ASCII, so a fresh one is minted: the id is forwarded, returned and
/// written to every log line of the request.
pub fn drop_unfit_request_id(headers: &mut HeaderMap) {
    let unfit = headers.get(X_REQUEST_ID).is_some_and(|v| {
        v.len() > MAX_REQUEST_ID || !v.as_bytes().iter().all(|b| b.is_ascii_graphic())
    });
    if unfit {
        headers.remove(X_REQUEST_ID);
    }
}

/// The peer's address as a header value. An IPv4 address is written with
/// `itoa`, not `Display`: formatting it through `fmt` was a third of the
/// proxy's own header work on every request (callgrind).
fn peer_value(peer: IpAddr) -> HeaderValue {
    let v4 = match peer {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => {
            return HeaderValue::try_from(v6.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        }
    };
    let mut out = [0u8; 15];
    let mut n = 0;
    let mut digits = itoa::Buffer::new();
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out[n] = b'.';
            n += 1;
        }
        let d = digits.format(octet).as_bytes();
        out[n..n + d.len()].copy_from_slice(d);
        n += d.len();
    }
    HeaderValue::from_bytes(&out[..n]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Sets `X-Forwarded-For` (appending the peer, written as [`peer_value`]
/// writes it), `-Proto` and `-Host`. The incoming `-Proto`/`-Host` are
/// kept only from a trusted proxy.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    host: Option<HeaderValue>,
    trusted: &[IpNet],
) {
    let peer_value = peer_value(peer);
    // Every line the request carried, in order (HAProxy, for one, adds a
    // line of its own), then the peer.
    let mut xff = String::new();
    for prev in headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        xff.push_str(prev);
        xff.push_str(", ");
    }
    if xff.is_empty() {
        // The usual case: the peer alone.
        headers.insert(X_FORWARDED_FOR, peer_value);
    } else {
        xff.push_str(peer_value.to_str().unwrap_or_default());
        if let Ok(v) = HeaderValue::try_from(xff) {
            headers.insert(X_FORWARDED_FOR, v);
        }
    }
    let from_trusted = trusted.iter().any(|n| n.contains(&peer));
    if !from_trusted || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !from_trusted || !headers.contains_key(&X_FORWARDED_HOST) {
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST, h);
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(h: &mut HeaderMap, peer: &str, host: Option<HeaderValue>, trusted: &[IpNet]) {
        set_forwarded(h, peer.parse().unwrap(), host, trusted);
    }

    #[test]
    fn peer_values_read_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "127.0.0.1",
            "192.168.100.255",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(peer_value(ip), ip.to_string().as_str());
        }
    }

    #[test]
    fn connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("X-Secret, keep-alive"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn forwarded_trust() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        forward(
            &mut h,
            "10.1.1.1",
            Some(HeaderValue::from_static("app")),
            &trusted,
        );
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 10.1.1.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        forward(&mut h, "8.8.8.8", None, &trusted);
        assert_eq!(
            h[&X_FORWARDED_PROTO], "http",
            "an untrusted peer cannot claim https"
        );
        assert!(!h.contains_key(&X_FORWARDED_HOST));
    }

    #[test]
    fn every_forwarded_for_line_is_kept_in_order() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        forward(&mut h, "127.0.0.1", None, &[]);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "6.6.6.6, 203.0.113.7, 127.0.0.1");
        let mut none = HeaderMap::new();
        forward(&mut none, "127.0.0.1", None, &[]);
        assert_eq!(none[&X_FORWARDED_FOR], "127.0.0.1");
    }
}
