//! The edge, before any layer: a connection must start its request in time;
//! a request with a lower-case method, a missing or doubled `Host`, a dot
//! segment or an encoded slash is refused (400); the path is rewritten to
//! what the app will read; header names with `_` are dropped.

use std::borrow::Cow;
use std::time::Duration;

use http::Request;
use tokio::net::TcpStream;

use crate::route::{PathRefused, normalise_path};

/// The protocol a client speaks, told from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proto {
    Http1,
    /// HTTP/2 with prior knowledge (its connection preface).
    H2c,
}

/// Waits (at most `within`) until the client has sent enough to tell
/// HTTP/1.1 from an h2c preface, and says which; `None` if it sent nothing
/// (or half a preface) in time, or closed. hyper's header-read timeout
/// starts only once a connection is served: without this, a client that
/// connects and sends nothing would hold a connection forever.
pub(super) async fn request_started(stream: &TcpStream, within: Duration) -> Option<Proto> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 24];
    let mut pause = FIRST_PAUSE;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return None,
        };
        if n == 0 {
            return None;
        }
        if buf[..n] != PREFACE[..n] {
            return Some(Proto::Http1);
        }
        if n == PREFACE.len() {
            return Some(Proto::H2c);
        }
        // Part of an h2 preface: wait for the rest. `peek` returns at once
        // while bytes are waiting, so the pause between two looks grows: a
        // client that sends half a preface and stalls costs a few dozen
        // wake-ups until the deadline, not one every 5 ms.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
            .await
            .is_err()
        {
            return None;
        }
        pause = next_pause(pause);
    }
}

/// The first pause between two looks at half a preface.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause between two looks.
const MAX_PAUSE: Duration = Duration::from_millis(250);

fn next_pause(pause: Duration) -> Duration {
    (pause * 2).min(MAX_PAUSE)
}

/// Requests refused at the edge, before routing: a method not written in
/// upper case; a path with dot segments, literal or percent-encoded (`/api/x/../cache/clear` must neither reach
/// the app as the admin path it resolves to nor dodge the admin router).
/// (Smuggling by `Content-Length` + `Transfer-Encoding` is hyper's to
/// refuse: it frames by the latter, drops the former and closes the
/// connection after the answer.)
///
/// And, as RFC 9112 §3.2 requires, an HTTP/1.1 request without a `Host`
/// field or with more than one: which host is meant would be the proxy's
/// guess, and the app's and the cache's could differ.
pub(super) fn refused<B>(req: &Request<B>) -> Option<&'static str> {
    // Werkzeug upper-cases the method it reads: "post" would reach the
    // app's POST handler past a route that matches "POST" only.
    if req
        .method()
        .as_str()
        .bytes()
        .any(|b| b.is_ascii_lowercase())
    {
        return Some("methods are written in upper case");
    }
    if req.version() == http::Version::HTTP_11 {
        let mut hosts = req.headers().get_all(http::header::HOST).iter();
        if hosts.next().is_none() || hosts.next().is_some() {
            return Some("an HTTP/1.1 request needs exactly one Host header");
        }
    }
    let raw = req.uri().path();
    // No '.' and no '%': no dot segment, literal or encoded (most paths; the
    // decoding below cost more than all the other checks here).
    if !raw.bytes().any(|b| b == b'.' || b == b'%') {
        return None;
    }
    let path = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    path.split('/')
        .any(|s| s == "." || s == "..")
        .then_some("dot segments are not allowed in paths")
}

/// Rewrites the request's path to what the app will read
/// ([`normalise_path`]), so that routing, the cache key and the app agree.
pub(super) fn normalised<B>(req: &mut Request<B>) -> Result<(), &'static str> {
    let path = req.uri().path();
    let new = match normalise_path(path) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(p)) => p,
        Err(PathRefused::EncodedSlash) => {
            return Err("an encoded slash (%2F) is not allowed in paths");
        }
    };
    let pq = match req.uri().query() {
        Some(q) => format!("{new}?{q}"),
        None => new,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(pq.parse().map_err(|_| "the path cannot be read")?);
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| "the path cannot be read")?;
    Ok(())
}

/// Drops header names with `_` (nginx's `underscores_in_headers off`): an
/// app server that reads `X_User_Id` as `X-User-Id` (gunicorn 21 does) would
/// otherwise see a header the cache key and the identity checks did not.
pub(super) fn drop_underscored(headers: &mut http::HeaderMap) {
    if !headers.keys().any(|n| n.as_str().contains('_')) {
        return;
    }
    let names: Vec<http::HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().contains('_'))
        .cloned()
        .collect();
    for n in names {
        headers.remove(&n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_a_preface_is_looked_at_a_few_dozen_times_not_every_5_ms() {
        // The looks a client that stalls mid-preface costs over the default
        // 10 s `header_read_timeout`.
        let (mut pause, mut waited, mut looks) = (FIRST_PAUSE, Duration::ZERO, 0);
        while waited < Duration::from_secs(10) {
            waited += pause;
            looks += 1;
            pause = next_pause(pause);
        }
        assert!(looks <= 50, "{looks} looks");
        assert_eq!(pause, MAX_PAUSE);
        // The first looks stay quick: a preface split by the network is
        // told apart within milliseconds.
        assert_eq!(next_pause(FIRST_PAUSE), Duration::from_millis(10));
    }
}
