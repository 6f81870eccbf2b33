//! The route table: the first route matching a request's method and path
//! decides its timeout, cache, rate limit, circuit and retry policy. The match
//! is made once per request and travels with it as a [`MatchedRoute`]
//! extension, so every layer reads the same decision.
//!
//! Routing reads the path as the app will: [`normalise_path`] decodes
//! percent-encoded unreserved characters and merges repeated slashes first
//! (Werkzeug and gunicorn decode and merge, nginx normalises before its
//! `location` match, Envoy has `normalize_path` and `merge_slashes`), and
//! the normalised path is what the app receives. Otherwise `/api/%73earch`
//! or `//api/search` would reach the app's search as the `default` route,
//! past its cache, its rate limit and its circuit.

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;

use crate::config::{Config, DEFAULT_ROUTE, PathMatch, Route};

/// The route a request matched, as a request extension.
#[derive(Debug, Clone)]
pub struct MatchedRoute(pub Arc<Route>);

impl std::ops::Deref for MatchedRoute {
    type Target = Route;

    fn deref(&self) -> &Route {
        &self.0
    }
}

/// The ordered routes; the last one matches everything.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Arc<[Arc<Route>]>,
    fallback: Arc<Route>,
}

impl RouteTable {
    pub fn new(cfg: &Config) -> Self {
        let routes: Vec<Arc<Route>> = cfg.routes.iter().cloned().map(Arc::new).collect();
        let fallback = routes
            .iter()
            .find(|r| r.name == DEFAULT_ROUTE)
            .cloned()
            .unwrap_or_else(|| Arc::new(Route::plain(DEFAULT_ROUTE, PathMatch::Any)));
        Self {
            routes: routes.into(),
            fallback,
        }
    }

    /// The first route that matches; the default route when none does.
    pub fn matched(&self, method: &Method, path: &str) -> MatchedRoute {
        let route = self
            .routes
            .iter()
            .find(|r| r.matches(method, path))
            .unwrap_or(&self.fallback);
        MatchedRoute(Arc::clone(route))
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

/// Why a path is refused at the edge (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    #[error("an encoded slash (%2F) is not allowed in paths")]
    EncodedSlash,
}

/// The path the app will read: `%XX` of an unreserved character (RFC 3986
/// §2.3: letters, digits, `-._~`) decoded, runs of `/` merged into one;
/// any other `%XX` kept as sent. An encoded `/` is refused: the app would
/// read a different path than the one routed. Borrowed when unchanged.
pub fn normalise_path(path: &str) -> Result<Cow<'_, str>, PathRefused> {
    let b = path.as_bytes();
    let needs = b.contains(&b'%') || b.windows(2).any(|w| w == b"//");
    if !needs {
        return Ok(Cow::Borrowed(path));
    }
    let hex = |c: u8| (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let mut c = b[i];
        let mut width = 1;
        if c == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                let v = h * 16 + l;
                if v == b'/' {
                    return Err(PathRefused::EncodedSlash);
                }
                if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                    c = v;
                    width = 3;
                }
            }
        }
        if width == 1 && c >= 0x80 {
            // A raw multi-byte character: copy it whole.
            let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&path[i..i + ch_len]);
            i += ch_len;
            continue;
        }
        if !(c == b'/' && out.ends_with('/')) {
            out.push(char::from(c));
        }
        i += width;
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_matches_product_md() {
        let t = RouteTable::new(&Config::default());
        let name = |m: Method, p: &str| t.matched(&m, p).name.clone();
        assert_eq!(name(Method::POST, "/api/search"), "search");
        assert_eq!(name(Method::GET, "/api/search"), "default");
        assert_eq!(name(Method::POST, "/api/search/x"), "default");
        assert_eq!(name(Method::POST, "/api/rag/query"), "rag");
        assert_eq!(name(Method::POST, "/api/embed"), "embeddings");
        assert_eq!(name(Method::POST, "/api/embeddings/batch"), "embeddings");
        assert_eq!(name(Method::POST, "/api/upload"), "upload");
        assert_eq!(
            name(Method::DELETE, "/api/documents/a.pdf"),
            "documents-delete"
        );
        assert_eq!(name(Method::GET, "/api/documents"), "default");
        assert_eq!(name(Method::GET, "/api/health"), "default");
    }

    #[test]
    fn paths_are_normalised_as_the_app_reads_them() {
        for (sent, read) in [
            ("/api/search", "/api/search"),
            ("/api/%73earch", "/api/search"),
            ("/api/%53EARCH", "/api/SEARCH"),
            ("//api//search", "/api/search"),
            ("/api/rag/%71uery", "/api/rag/query"),
            ("/api/documents/%64oc%2d1.pdf", "/api/documents/doc-1.pdf"),
            ("/a%7e%5F%2E", "/a~_."),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/a%20b", "/a%20b"),
            ("/a%zz", "/a%zz"),
            ("/a%4", "/a%4"),
            ("/học//x", "/học/x"),
        ] {
            assert_eq!(normalise_path(sent).as_deref(), Ok(read), "{sent}");
        }
        assert!(matches!(
            normalise_path("/api/search"),
            Ok(Cow::Borrowed(_))
        ));
        for sent in ["/api%2Fsearch", "/api%2fsearch", "/x/%2F/y"] {
            assert_eq!(
                normalise_path(sent),
                Err(PathRefused::EncodedSlash),
                "{sent}"
            );
        }
    }
}
