//! Who a request counts against: the client address, or, behind trusted
//! proxies, the right-most `X-Forwarded-For` address that is not one of
//! them; or a header's value (`key = "header:X-API-Key"`), falling back to
//! the address when the header is absent. An `X-Forwarded-For` from a peer
//! that is not trusted is ignored, so a client cannot pick its own key.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

use crate::config::RateLimitKey;

/// The key a limit is counted under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    Ip(IpAddr),
    Header(String),
}

pub fn client_key(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    how: &RateLimitKey,
) -> ClientKey {
    if let RateLimitKey::Header(name) = how {
        if let Some(v) = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
        {
            if !v.is_empty() {
                return ClientKey::Header(v.to_string());
            }
        }
    }
    ClientKey::Ip(client_ip(peer, headers, trusted))
}

/// The peer, or the right-most untrusted `X-Forwarded-For` entry when the
/// peer is a trusted proxy (every line of the header, in order). Walking
/// from the right, an entry that is not an address (`unknown`, garbage)
/// ends the walk: what lies to its left was written by someone no trusted
/// proxy vouches for, so the request counts against the nearest trusted hop
/// instead (as nginx's realip stops there). `IP:port` entries, which some
/// load balancers append, are read as their address.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut nearest = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = hop_address(entry) else {
            return nearest;
        };
        if !is_trusted(&ip) {
            return ip;
        }
        nearest = ip;
    }
    // Every hop trusted: the left-most.
    nearest
}

/// `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1` or `[2001:db8::1]:4711`.
fn hop_address(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn xff(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static(v));
        h
    }

    #[test]
    fn trusted_proxies_table() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        // Untrusted peer: its X-Forwarded-For is a spoof and ignored.
        assert_eq!(
            client_ip(ip("203.0.113.5"), &xff("1.1.1.1"), &trusted),
            ip("203.0.113.5")
        );
        // Trusted peer: the right-most address that is not a trusted proxy.
        assert_eq!(
            client_ip(
                ip("10.0.0.2"),
                &xff("6.6.6.6, 198.51.100.7, 10.0.0.9"),
                &trusted
            ),
            ip("198.51.100.7")
        );
        // All hops trusted: the left-most.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("10.1.1.1, 10.0.0.9"), &trusted),
            ip("10.1.1.1")
        );
        // No header, or garbage: the peer.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &HeaderMap::new(), &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("not-an-ip"), &trusted),
            ip("10.0.0.2")
        );
        // An entry that is not an address ends the walk at the trusted hop
        // to its right: nothing the client wrote left of it is believed.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("9.9.9.9, 203.0.113.50:4711"), &trusted),
            ip("203.0.113.50"),
            "IP:port is read as its address"
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("9.9.9.9, unknown"), &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("9.9.9.9, bogus, 10.0.0.9"), &trusted),
            ip("10.0.0.9")
        );
        // Several header lines are one list, in order.
        let mut two = xff("6.6.6.6");
        two.append("x-forwarded-for", HeaderValue::from_static("198.51.100.7"));
        assert_eq!(
            client_ip(ip("10.0.0.2"), &two, &trusted),
            ip("198.51.100.7")
        );
        // No trusted proxies configured: always the peer.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("1.1.1.1"), &[]),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn header_key_falls_back_to_the_address() {
        let how = RateLimitKey::Header(http::HeaderName::from_static("x-api-key"));
        let peer: IpAddr = "127.0.0.1".parse().unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(client_key(peer, &h, &[], &how), ClientKey::Ip(peer));
        h.insert("x-api-key", HeaderValue::from_static("k1"));
        assert_eq!(
            client_key(peer, &h, &[], &how),
            ClientKey::Header("k1".into())
        );
    }
}
