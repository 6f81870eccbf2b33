//! The guard of the mutating admin endpoints. With `ADMIN_TOKEN`
//! configured, every caller needs `Authorization: Bearer <ADMIN_TOKEN>`,
//! loopback callers too: under a service mesh every caller arrives from
//! loopback (Linkerd's proxy, Istio's 127.0.0.6). Without a token, only
//! loopback callers (127.0.0.1, ::1) may use them, as the legacy document's
//! curl examples do. Anything else gets 403.

use std::net::IpAddr;

use http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a request was refused (the reason goes into the 403 body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Forbidden {
    #[error("admin endpoints accept only loopback callers when no ADMIN_TOKEN is set")]
    NotLoopback,
    #[error("admin endpoints need Authorization: Bearer <ADMIN_TOKEN>")]
    NoToken,
    #[error("invalid admin token")]
    BadToken,
}

/// Whether a caller may use a mutating endpoint.
pub fn authorize(peer: IpAddr, headers: &HeaderMap, token: Option<&str>) -> Result<(), Forbidden> {
    let Some(token) = token else {
        return if is_loopback(peer) {
            Ok(())
        } else {
            Err(Forbidden::NotLoopback)
        };
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|p| !p.is_empty())
        .ok_or(Forbidden::NoToken)?;
    // Digests of both, compared in constant time: neither the bytes nor the
    // length of the token can be learnt from how long a refusal takes.
    let same = Sha256::digest(token.as_bytes()).ct_eq(&Sha256::digest(presented.as_bytes()));
    if bool::from(same) {
        Ok(())
    } else {
        Err(Forbidden::BadToken)
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
    fn loopback_without_a_token_and_the_token_from_everyone_with_one() {
        let none = HeaderMap::new();
        let remote: IpAddr = "10.1.2.3".parse().unwrap();
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        // No token configured: loopback only.
        assert_eq!(authorize(local, &none, None), Ok(()));
        assert_eq!(authorize("::1".parse().unwrap(), &none, None), Ok(()));
        assert_eq!(
            authorize("::ffff:127.0.0.1".parse().unwrap(), &none, None),
            Ok(())
        );
        assert_eq!(authorize(remote, &none, None), Err(Forbidden::NotLoopback));
        assert_eq!(
            authorize(remote, &bearer("s3cret"), None),
            Err(Forbidden::NotLoopback)
        );
        // A token configured: required from everyone, loopback (a mesh's
        // proxy, Istio's 127.0.0.6) included.
        let istio: IpAddr = "127.0.0.6".parse().unwrap();
        for peer in [remote, local, istio] {
            assert_eq!(
                authorize(peer, &none, Some("s3cret")),
                Err(Forbidden::NoToken)
            );
            assert_eq!(authorize(peer, &bearer("s3cret"), Some("s3cret")), Ok(()));
            assert_eq!(
                authorize(peer, &bearer("s3cre"), Some("s3cret")),
                Err(Forbidden::BadToken)
            );
            assert_eq!(
                authorize(peer, &bearer("s3cret-and-more"), Some("s3cret")),
                Err(Forbidden::BadToken)
            );
        }
        assert_eq!(
            authorize(remote, &bearer(""), Some("s3cret")),
            Err(Forbidden::NoToken)
        );
    }
}
