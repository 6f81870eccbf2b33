//! The guard of the mutating admin endpoints: allowed from a loopback peer,
//! or with `Authorization: Bearer <ADMIN_TOKEN>`; anything else gets 403.

use std::net::IpAddr;

use http::{HeaderMap, header};
use subtle::ConstantTimeEq;

/// Why a request was refused (the reason goes into the 403 body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Forbidden {
    #[error("admin endpoints accept only loopback callers or a valid bearer token")]
    NotAllowed,
    #[error("invalid admin token")]
    BadToken,
}

/// Whether a caller may use a mutating endpoint.
pub fn authorize(
    peer: IpAddr,
    headers: &HeaderMap,
    token: Option<&str>,
    trust_loopback: bool,
) -> Result<(), Forbidden> {
    if trust_loopback && is_loopback(peer) {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
    match (token, presented) {
        // Constant-time, so the token cannot be guessed byte by byte.
        (Some(t), Some(p)) if bool::from(t.as_bytes().ct_eq(p.as_bytes())) => Ok(()),
        (Some(_), Some(_)) => Err(Forbidden::BadToken),
        _ => Err(Forbidden::NotAllowed),
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        h
    }

    #[test]
    fn loopback_or_token() {
        let none = HeaderMap::new();
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            authorize("127.0.0.1".parse().unwrap(), &none, None, true),
            Ok(())
        );
        assert_eq!(authorize("::1".parse().unwrap(), &none, None, true), Ok(()));
        assert_eq!(
            authorize("::ffff:127.0.0.1".parse().unwrap(), &none, None, true),
            Ok(())
        );
        assert_eq!(
            authorize(remote, &none, Some("s3cret"), true),
            Err(Forbidden::NotAllowed)
        );
        assert_eq!(
            authorize(remote, &bearer("s3cret"), Some("s3cret"), true),
            Ok(())
        );
        assert_eq!(
            authorize(remote, &bearer("guess"), Some("s3cret"), true),
            Err(Forbidden::BadToken)
        );
        assert_eq!(
            authorize(remote, &bearer("s3cret"), None, true),
            Err(Forbidden::NotAllowed)
        );
        assert_eq!(
            authorize(remote, &bearer(""), Some("s3cret"), true),
            Err(Forbidden::NotAllowed)
        );
    }
}
