//! The innermost service: forwards a request to the upstream app over a
//! pooled keep-alive HTTP/1.1 client and streams both bodies through.
//!
//! Requests from HTTP/2 clients are rewritten to HTTP/1.1 with an absolute
//! URI (the legacy app speaks only HTTP/1.1); hop-by-hop headers are dropped
//! from responses here (from requests by the server, before the stack) and
//! `X-Forwarded-*` set. A client error becomes a typed
//! [`UpstreamUnavailable`] unless it was caused by the request body (an
//! over-limit upload), whose error is kept so the rescue answers 413, or by
//! an answer that is not valid HTTP/1.1 ([`UpstreamBadResponse`], 502
//! `bad_response`, never retried).

mod headers;
pub mod ready;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Request, Response, Version, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ipnet::IpNet;

pub use self::headers::{
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID, drop_unfit_request_id,
    set_forwarded, strip_hop_by_hop,
};
use crate::BoxError;
use crate::body::{self, Body};
use crate::config::{Config, Upstream};
use crate::error::{
    ClientBodyError, ClientBodyStalled, UpstreamBadResponse, UpstreamUnavailable, find_cause,
};
use crate::extensions::ClientAddr;

/// The pooled HTTP/1.1 client to the upstream app (one `Arc` to clone: the
/// proxy clones it for every request).
#[derive(Debug, Clone)]
pub struct UpstreamClient(Arc<ClientInner>);

#[derive(Debug)]
struct ClientInner {
    client: Client<HttpConnector, Body>,
    upstream: Upstream,
}

impl UpstreamClient {
    pub fn new(cfg: &Config) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            // Closed before the app server's own keep-alive ends it
            // (gunicorn 2 s): a request sent as the app closes gets 502.
            .pool_idle_timeout(cfg.upstream_idle_timeout)
            .pool_max_idle_per_host(cfg.max_inflight.min(1024))
            .build(connector);
        Self(Arc::new(ClientInner {
            client,
            upstream: cfg.upstream.clone(),
        }))
    }

    /// The app's address.
    pub fn upstream(&self) -> &Upstream {
        &self.0.upstream
    }

    /// The absolute upstream URI for this path and query.
    pub fn uri_for(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.0.upstream.scheme.clone())
            .authority(self.0.upstream.authority.clone())
            .path_and_query(pq.map_or("/", |p| p.as_str()))
            .build()
    }

    /// Sends a prepared request; connection-level failures become
    /// [`UpstreamUnavailable`].
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Body>, BoxError> {
        match self.0.client.request(req).await {
            Ok(resp) => Ok(resp.map(body::boxed)),
            Err(e) => Err(upstream_error(e)),
        }
    }
}

/// Keeps an error of the request body (over the limit, or broken off by the
/// client) visible as what it is; an answer hyper could not parse is the
/// upstream's [`UpstreamBadResponse`]; everything else from the client means
/// the upstream could not be used.
fn upstream_error(e: hyper_util::client::legacy::Error) -> BoxError {
    if find_cause::<http_body_util::LengthLimitError>(&e).is_some()
        || find_cause::<ClientBodyError>(&e).is_some()
        || find_cause::<ClientBodyStalled>(&e).is_some()
    {
        return Box::new(e);
    }
    match find_cause::<hyper::Error>(&e) {
        Some(h) if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() => {
            Box::new(UpstreamBadResponse(h.to_string()))
        }
        _ => Box::new(UpstreamUnavailable(Box::new(e))),
    }
}

/// The proxy service at the bottom of the stack.
#[derive(Debug, Clone)]
pub struct Proxy {
    client: UpstreamClient,
    trusted_proxies: Arc<[IpNet]>,
}

impl Proxy {
    pub fn new(client: UpstreamClient, cfg: &Config) -> Self {
        Self {
            client,
            trusted_proxies: cfg.trusted_proxies.clone().into(),
        }
    }

    /// Rewrites a client request into the upstream request.
    fn prepare(&self, req: Request<Body>) -> Result<Request<Body>, BoxError> {
        let (mut parts, body) = req.into_parts();
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        // Hop-by-hop headers are already gone: the server strips them before
        // the stack (so the cache never keys on them).
        if let Some(ClientAddr(peer)) = parts.extensions.get::<ClientAddr>() {
            set_forwarded(
                &mut parts.headers,
                peer.ip(),
                host.clone(),
                &self.trusted_proxies,
            );
        }
        // The app sees the Host the client asked for (as with nginx's
        // `proxy_set_header Host $host`); HTTP/2 clients send it as :authority.
        if let Some(h) = host {
            parts.headers.insert(header::HOST, h);
        }
        parts.uri = self.client.uri_for(parts.uri.path_and_query())?;
        parts.version = Version::HTTP_11;
        Ok(Request::from_parts(parts, body))
    }
}

impl tower::Service<Request<Body>> for Proxy {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let version = req.version();
        let prepared = self.prepare(req);
        let client = self.client.clone();
        Box::pin(async move {
            let mut resp = client.send(prepared?).await?;
            strip_hop_by_hop(resp.headers_mut());
            *resp.version_mut() = version;
            Ok(resp)
        })
    }
}
