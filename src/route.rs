//! The route table: the first route matching a request's method and path
//! decides its timeout, cache, rate limit, circuit and retry policy. The match
//! is made once per request and travels with it as a [`MatchedRoute`]
//! extension, so every layer reads the same decision.

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
}
