//! Cache keys: `namespace:` + a 128-bit SHA-256 digest (32 hex digits) over
//! what makes two requests the same question for the same caller: method,
//! path, the query string with its parameters sorted by name (repeated names
//! kept in their order: Flask reads the first, so `?top=999&top=1` and
//! `?top=1&top=999` are different questions), the body in canonical form,
//! and the values of the keyed headers: the identity headers (so one user
//! never receives another's answer; `Cookie` among them) and the headers
//! that select a representation (`cache.vary_headers`: `Accept`,
//! `Accept-Language`, `Content-Type`, and `Accept-Encoding` reduced to the
//! codings it allows, so a gzip body never reaches an identity client).
//! `Host` is in the key (as in Varnish's built-in hash): an app that writes
//! the request's host into its answers answers each host differently, so
//! replicas share entries when their clients use one name (a Service's).
//! Query text never appears in a key, only its digest.
//!
//! A JSON body is canonicalised: keys sorted, no whitespace, and the
//! top-level `query` field Unicode-NFC-normalised with whitespace trimmed and
//! collapsed (the legacy clients send the same Vietnamese question in NFC
//! and NFD and with stray spaces). Any other body is hashed as bytes.
//!
//! SHA-256 rather than BLAKE3: a search body is one or two KiB, too short
//! for BLAKE3's SIMD parallelism, and the sha2 crate uses the CPU's SHA
//! instructions where present (x86 SHA-NI, ARMv8 SHA2). On the project
//! machine (2026-11-24, a timing loop of 200 000 `blake3::hash` and
//! `Sha256::digest` calls over the criterion bench's 1,177-byte body,
//! release build), SHA-256 took ~1.0 µs a body and BLAKE3 ~2.3 µs. The digest must be collision-resistant (a forged
//! collision would hand one caller another's answer), so a fast
//! non-cryptographic hash is not an option.

use http::{HeaderMap, HeaderName, Method, Uri};
use serde_json::Value;
use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

/// Feeds one length-prefixed field, so `("ab", "c")` and `("a", "bc")` differ.
fn field(h: &mut Sha256, tag: u8, bytes: &[u8]) {
    h.update([tag]);
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The cache key of a request.
pub fn cache_key(
    namespace: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    identity_headers: &[HeaderName],
    body: &[u8],
) -> String {
    let mut h = Sha256::new();
    field(&mut h, b'm', method.as_str().as_bytes());
    field(&mut h, b'p', uri.path().as_bytes());
    // The host the client asked for (an HTTP/2 client's :authority): an app
    // that writes it into its answers (absolute links) answers each host
    // differently, and an attacker's Host must not reach a victim.
    let host = headers
        .get(http::header::HOST)
        .map(|h| h.as_bytes())
        .or_else(|| uri.authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or_default();
    field(&mut h, b'H', host);
    if let Some(q) = uri.query().filter(|q| !q.is_empty()) {
        let mut pairs: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
        // By name only, and stable: repeats keep their order.
        pairs.sort_by_key(|p| p.split_once('=').map_or(*p, |(name, _)| name));
        for p in pairs {
            field(&mut h, b'q', p.as_bytes());
        }
    }
    match canonical_json(body) {
        Some(canonical) => field(&mut h, b'j', &canonical),
        None => field(&mut h, b'b', body),
    }
    for name in identity_headers {
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            field(&mut h, b'n', name.as_str().as_bytes());
        } else {
            field(&mut h, b'h', name.as_str().as_bytes());
            if name == http::header::ACCEPT_ENCODING {
                let joined: Vec<&[u8]> = values.map(|v| v.as_bytes()).collect();
                field(&mut h, b'v', reduced_codings(&joined).as_bytes());
            } else {
                for v in values {
                    field(&mut h, b'v', v.as_bytes());
                }
            }
        }
    }
    let digest = h.finalize();
    let mut key = String::with_capacity(namespace.len() + 33);
    key.push_str(namespace);
    key.push(':');
    let mut hex = [0u8; 32];
    if hex::encode_to_slice(&digest[..16], &mut hex).is_ok() {
        key.push_str(std::str::from_utf8(&hex).unwrap_or_default());
    }
    key
}

/// `Accept-Encoding` as the codings it allows: lower case, sorted, without
/// duplicates, parameters and the ones refused (`q=0`). `gzip, br` and
/// `br,gzip;q=0.8` are one key; `identity` and no header are not `gzip`.
pub fn reduced_codings(values: &[&[u8]]) -> String {
    let mut codings: Vec<String> = values
        .iter()
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .filter_map(|c| {
            let mut parts = c.split(';');
            let name = parts.next()?.trim().to_ascii_lowercase();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (!name.is_empty() && !refused).then_some(name)
        })
        .collect();
    codings.sort();
    codings.dedup();
    codings.join(",")
}

/// The canonical bytes of a JSON body, or `None` if it is not a JSON object
/// or array.
pub fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    let value = canonical_value(body)?;
    // Sized once: the canonical form is rarely longer than the body (it
    // drops whitespace and unescapes what the client escaped).
    let mut canonical = Vec::with_capacity(body.len() + 16);
    serde_json::to_writer(&mut canonical, &value).ok()?;
    Some(canonical)
}

/// A JSON object or array body with its `query` normalised; serialised, it
/// is the canonical form (serde_json's map is ordered by key, and its writer
/// emits no whitespace).
fn canonical_value(body: &[u8]) -> Option<Value> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if !matches!(first, b'{' | b'[') {
        return None;
    }
    let mut value: Value = serde_json::from_slice(body).ok()?;
    if let Some(Value::String(q)) = value.as_object_mut().and_then(|o| o.get_mut("query")) {
        if let Some(normalised) = normalise_query(q) {
            *q = normalised;
        }
    }
    Some(value)
}

/// NFC, trimmed, inner whitespace runs collapsed to one space; `None` when
/// the query already is.
pub fn normalise_query(q: &str) -> Option<String> {
    // Most queries are already NFC (the quick check answers in tens of
    // nanoseconds; full NFC costs about a microsecond), and many are tidy.
    let is_nfc =
        unicode_normalization::is_nfc_quick(q.chars()) == unicode_normalization::IsNormalized::Yes;
    let tidy = !q.starts_with(char::is_whitespace)
        && !q.ends_with(char::is_whitespace)
        && !q.contains(|c: char| c.is_whitespace() && c != ' ')
        && !q.contains("  ");
    if is_nfc && tidy {
        return None;
    }
    let nfc: std::borrow::Cow<'_, str> = if is_nfc {
        q.into()
    } else {
        q.nfc().collect::<String>().into()
    };
    let mut out = String::with_capacity(nfc.len());
    for word in nfc.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids() -> Vec<HeaderName> {
        ["authorization", "x-api-key", "x-user-id"]
            .iter()
            .map(|h| HeaderName::from_static(h))
            .collect()
    }

    fn key(body: &str, headers: &[(&str, &str)]) -> String {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        cache_key(
            "search",
            &Method::POST,
            &"/api/search".parse().unwrap(),
            &h,
            &ids(),
            body.as_bytes(),
        )
    }

    #[test]
    fn shape() {
        let k = key(r#"{"query":"x"}"#, &[]);
        assert!(k.starts_with("search:"));
        assert_eq!(k.len(), "search:".len() + 32);
        assert!(!k.contains('x') || k[7..].chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn vietnamese_nfc_nfd_and_whitespace_share_a_key() {
        let nfc = "Học máy là gì?";
        let nfd: String = nfc.nfd().collect();
        assert_ne!(nfc, nfd);
        let a = key(&format!(r#"{{"query": "{nfc}", "top_k": 5}}"#), &[]);
        let b = key(&format!(r#"{{"top_k":5,"query":"  {nfd}\t "}}"#), &[]);
        let c = key(r#"{"top_k":5,"query":"Học  máy   là gì?"}"#, &[]);
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_ne!(a, key(r#"{"query":"Học máy là gì?","top_k":6}"#, &[]));
    }

    #[test]
    fn normalise_query_says_when_nothing_changes() {
        assert_eq!(normalise_query("Học máy là gì?"), None);
        let nfd: String = "Học máy".nfd().collect();
        assert_eq!(normalise_query(&nfd).as_deref(), Some("Học máy"));
        // NFC already, but untidy: only the whitespace changes.
        assert_eq!(
            normalise_query(" Học\tmáy  là ").as_deref(),
            Some("Học máy là")
        );
    }

    #[test]
    fn query_string_order_does_not_matter() {
        let h = HeaderMap::new();
        let k = |u: &str| cache_key("n", &Method::GET, &u.parse().unwrap(), &h, &ids(), b"");
        assert_eq!(k("/a?x=1&y=2"), k("/a?y=2&x=1"));
        assert_ne!(k("/a?x=1&y=2"), k("/a?x=1&y=3"));
        assert_ne!(k("/a"), k("/b"));
        // Repeated names keep their order: the app reads the first.
        assert_ne!(k("/a?top=999&top=1"), k("/a?top=1&top=999"));
        assert_eq!(k("/a?top=999&x=1&top=1"), k("/a?x=1&top=999&top=1"));
    }

    #[test]
    fn accept_encoding_is_reduced_to_the_codings_it_allows() {
        let r = |v: &[&str]| {
            let v: Vec<&[u8]> = v.iter().map(|s| s.as_bytes()).collect();
            reduced_codings(&v)
        };
        assert_eq!(r(&["gzip, br"]), "br,gzip");
        assert_eq!(r(&["br;q=1.0,GZIP;q=0.8", "br"]), "br,gzip");
        assert_eq!(r(&["gzip;q=0, identity"]), "identity");
        assert_eq!(r(&["gzip; q=0.0"]), "");
        assert_eq!(r(&[]), "");
    }

    #[test]
    fn big_numbers_stay_distinct() {
        // Integers beyond f64's precision stay distinct (serde_json's
        // arbitrary_precision keeps their digits).
        assert_ne!(
            key(r#"{"id": 12345678901234567890123}"#, &[]),
            key(r#"{"id": 12345678901234567890124}"#, &[])
        );
    }

    #[test]
    fn non_json_bodies_are_bytes() {
        assert_ne!(key("query=a", &[]), key("query=b", &[]));
        assert_eq!(key("not json {", &[]), key("not json {", &[]));
        assert_ne!(key("{\"a\":1}", &[]), key("{\"a\": 2}", &[]));
    }

    proptest! {
        #[test]
        fn key_order_and_whitespace_never_matter(
            q in "[a-zA-Z0-9 àáạảãăắằẳẵặâấầẩẫậèéẹẻẽêềếểễệđìíịỉĩòóọỏõôốồổỗộơớờởỡợùúụủũưừứửữựỳýỵỷỹ?]{0,40}",
            top_k in 0u32..100,
            lang in "[a-z]{0,5}",
            pad in "[ \t\n]{0,3}",
        ) {
            let a = serde_json::json!({"query": q, "top_k": top_k, "language": lang}).to_string();
            let nfd: String = q.nfd().collect();
            let b = format!(
                "{pad}{{{pad}\"language\":{pad}{}{pad},\"top_k\":{top_k},{pad}\"query\":{}}}{pad}",
                serde_json::to_string(&lang).unwrap(),
                serde_json::to_string(&format!("{pad}{nfd}{pad}")).unwrap(),
            );
            prop_assert_eq!(key(&a, &[]), key(&b, &[]));
        }

        #[test]
        fn different_identities_never_share_a_key(
            q in ".{0,20}",
            u1 in "[a-z0-9]{1,12}",
            u2 in "[a-z0-9]{1,12}",
            which in 0usize..3,
        ) {
            prop_assume!(u1 != u2);
            let name = ["authorization", "x-api-key", "x-user-id"][which];
            let body = serde_json::json!({"query": q}).to_string();
            let anon = key(&body, &[]);
            let one = key(&body, &[(name, &u1)]);
            let two = key(&body, &[(name, &u2)]);
            prop_assert_ne!(&one, &two);
            prop_assert_ne!(&one, &anon);
            // The same value under another identity header is another caller too.
            let other = ["authorization", "x-api-key", "x-user-id"][(which + 1) % 3];
            prop_assert_ne!(&one, &key(&body, &[(other, &u1)]));
        }
    }
}
