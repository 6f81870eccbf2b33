//! The innermost service: forwards a request to the upstream app over a
//! pooled keep-alive HTTP/1.1 connection ([`pool`]: per worker, each
//! connection driven by a task of its own) and streams both bodies through.
//!
//! Requests from HTTP/2 clients are rewritten to HTTP/1.1, their target in
//! origin form and their `:authority` as `Host` (the legacy app speaks only
//! HTTP/1.1); hop-by-hop headers are dropped
//! from responses here (from requests by the server, before the stack) and
//! `X-Forwarded-*` set. A client error becomes a typed
//! [`UpstreamUnavailable`] unless it was caused by the request body (an
//! over-limit upload), whose error is kept so the rescue answers 413, or by
//! an answer that is not valid HTTP/1.1 ([`UpstreamBadResponse`], 502
//! `bad_response`, never retried).

mod headers;
mod pool;
pub mod ready;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Request, Response, Version, header};
use ipnet::IpNet;

pub use self::headers::{
    X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID, drop_unfit_request_id,
    set_forwarded, strip_hop_by_hop,
};
use self::pool::Pool;
pub use self::pool::SendError;
use crate::BoxError;
use crate::body::{self, Body};
use crate::config::{Config, Upstream};
use crate::error::{
    ClientBodyError, ClientBodyStalled, UpstreamBadResponse, UpstreamUnavailable, find_cause,
};
use crate::extensions::ClientAddr;

/// The pooled HTTP/1.1 client to the upstream app (one `Arc` to clone). Each
/// worker's stack has its own (see [`crate::app`]), and within one the
/// connections are kept per thread.
#[derive(Debug, Clone)]
pub struct UpstreamClient(Arc<ClientInner>);

#[derive(Debug)]
struct ClientInner {
    pool: Arc<Pool>,
    upstream: Upstream,
    /// The `Host` a request without one is sent with.
    host: HeaderValue,
}

impl UpstreamClient {
    pub fn new(cfg: &Config) -> Self {
        let authority = &cfg.upstream.authority;
        let addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        // Closed before the app server's own keep-alive ends it (gunicorn
        // 2 s): a request sent as the app closes gets 502.
        let pool = Pool::new(
            addr,
            cfg.upstream_idle_timeout,
            cfg.max_inflight.clamp(1, 1024),
        );
        let host = HeaderValue::from_str(authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self(Arc::new(ClientInner {
            pool,
            upstream: cfg.upstream.clone(),
            host,
        }))
    }

    /// The app's address.
    pub fn upstream(&self) -> &Upstream {
        &self.0.upstream
    }

    /// Sends a request (its target in origin form, `/path?query`, or
    /// absolute); connection-level failures become [`UpstreamUnavailable`].
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Body>, BoxError> {
        // What an HTTP/1.1 server expects: the target in origin form and a
        // Host header (the app's authority when the client sent none).
        if req.uri().authority().is_some() || req.uri().path().is_empty() {
            let pq = req
                .uri()
                .path_and_query()
                .filter(|pq| !pq.path().is_empty())
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(pq);
        }
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.0.host.clone());
        }
        match self.0.pool.send(req).await {
            Ok(resp) => Ok(resp.map(body::boxed)),
            Err(e) => Err(upstream_error(e)),
        }
    }
}

/// Keeps an error of the request body (over the limit, or broken off by the
/// client) visible as what it is; an answer hyper could not parse is the
/// upstream's [`UpstreamBadResponse`]; everything else from the client means
/// the upstream could not be used.
fn upstream_error(e: SendError) -> BoxError {
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
    /// The same upstream pool with a reloaded configuration's trusted
    /// proxies.
    pub fn reconfigured(&self, cfg: &Config) -> Self {
        Self::new(self.client.clone(), cfg)
    }

    pub fn new(client: UpstreamClient, cfg: &Config) -> Self {
        Self {
            client,
            trusted_proxies: cfg.trusted_proxies.clone().into(),
        }
    }

    /// Rewrites a client request into the upstream request.
    fn prepare(&self, req: Request<Body>) -> Request<Body> {
        let (mut parts, body) = req.into_parts();
        // The app sees the Host the client asked for (as with nginx's
        // `proxy_set_header Host $host`); HTTP/2 clients send it as
        // :authority, and it is written as a header only then.
        let (host, from_authority) = match parts.headers.get(header::HOST) {
            Some(h) => (Some(h.clone()), false),
            None => (
                parts
                    .uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
                true,
            ),
        };
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
        if let Some(h) = host.filter(|_| from_authority) {
            parts.headers.insert(header::HOST, h);
        }
        // The target goes in origin form (UpstreamClient::send).
        parts.version = Version::HTTP_11;
        Request::from_parts(parts, body)
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
            let mut resp = client.send(prepared).await?;
            strip_hop_by_hop(resp.headers_mut());
            *resp.version_mut() = version;
            Ok(resp)
        })
    }
}
