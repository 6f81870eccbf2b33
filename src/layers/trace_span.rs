//! `TraceSpan`: the request's place in a trace. Every request keeps the
//! client's trace (a valid `traceparent`) or starts one, and the request
//! carries on down the stack with a `traceparent` naming the sidecar's span
//! as the parent; the attempt span below, when spans are exported, puts its
//! own id there for each upstream attempt. A client's `tracestate` goes on
//! beside a valid `traceparent` when it is well formed; otherwise neither
//! is passed on as it came.
//!
//! When spans are exported ([`Tracing::tracer`]), this is the server span
//! (OpenTelemetry's HTTP server conventions), ended when the answer's head
//! is ready: cache hits and the sidecar's own answers (429, 503, 504) are
//! spans too. Its attributes are set then, and only on a sampled span:
//! method, route, path (never the query or the body), status, the cache's
//! verdict, whether the answer was shared, the rate limit's outcome, the
//! wait under an upstream quota. Above the rescue, so a local answer's
//! status is the one the client gets.

use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceId, TraceState, Tracer as _};
use opentelemetry::{Context as OtelContext, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use crate::error::{ErrorKind, Rescued, X_RATELIMIT_REMAINING};
use crate::extensions::{CacheOutcome, ClientAddr, Coalesced, QuotaWait};
use crate::route::MatchedRoute;
use crate::service::{Hook, OnAnswer};
use crate::trace::Tracing;
use crate::trace::context::{self, TraceParent};

#[derive(Debug, Clone)]
pub struct TraceSpanLayer {
    tracing: Tracing,
}

impl TraceSpanLayer {
    pub fn new(tracing: Tracing) -> Self {
        Self { tracing }
    }
}

impl<S> tower::Layer<S> for TraceSpanLayer {
    type Service = TraceSpan<S>;

    fn layer(&self, inner: S) -> TraceSpan<S> {
        TraceSpan {
            inner,
            tracing: self.tracing.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TraceSpan<S> {
    inner: S,
    tracing: Tracing,
}

impl<S, B, RB> tower::Service<Request<B>> for TraceSpan<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = OnAnswer<S::Future, Box<ServerSpan>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let incoming = TraceParent::from_headers(req.headers());
        // tracestate travels only with the traceparent it belongs to.
        let state = incoming.and_then(|_| context::tracestate(req.headers()));
        // The trace the request is in: the client's, or a new one whose
        // sampled flag the sample ratio gives (the id drawn here is the one
        // the SDK's span, if any, gets too).
        let (trace, fresh) = match incoming {
            Some(p) => (p, None),
            None => {
                let trace_id = context::new_trace_id();
                let sampled = context::sampled_at(trace_id, self.tracing.ratio());
                let flags = if sampled { context::SAMPLED } else { 0 };
                let new = TraceParent {
                    trace_id,
                    parent_id: 0,
                    flags,
                };
                (new, Some(trace_id))
            }
        };
        // The SDK is asked only for a span that can be kept: with export off,
        // or with the sidecar's own parent-based ratio sampler and a trace it
        // would not sample, the context is passed on with a span id of the
        // sidecar's, and no span is made.
        let tracer = self
            .tracing
            .tracer()
            .filter(|_| trace.sampled() || !self.tracing.presampled());
        let Some(tracer) = tracer else {
            trace
                .child(context::new_span_id())
                .write(req.headers_mut(), state);
            return OnAnswer::new(self.inner.call(req), None);
        };
        let (span, ours) = start(tracer, incoming, fresh, state.as_ref());
        ours.write(req.headers_mut(), state);
        // Boxed: an SDK span is several hundred bytes, which every
        // request's future would otherwise carry, sampled or not.
        let hook = span.is_recording().then(|| {
            Box::new(ServerSpan {
                span,
                method: req.method().clone(),
                path: req.uri().path().to_string(),
                route: req.extensions().get::<MatchedRoute>().cloned(),
                client: req.extensions().get::<ClientAddr>().copied(),
            })
        });
        OnAnswer::new(self.inner.call(req), hook)
    }
}

/// The server span under the client's context (or a new trace), and the
/// `traceparent` that names it.
fn start(
    tracer: &SdkTracer,
    incoming: Option<TraceParent>,
    fresh: Option<u128>,
    state: Option<&HeaderValue>,
) -> (Span, TraceParent) {
    let parent = match incoming {
        Some(p) => {
            let state = state
                .and_then(|s| s.to_str().ok())
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default();
            p.as_parent(true, state)
        }
        None => OtelContext::new(),
    };
    // Named when it ends, and only if sampled: no string is made for a
    // span that is not kept.
    let mut builder = tracer.span_builder("HTTP").with_kind(SpanKind::Server);
    builder.trace_id = fresh.map(TraceId::from);
    let span = tracer.build_with_context(builder, &parent);
    let ours = TraceParent::of(span.span_context());
    (span, ours)
}

/// A sampled server span and what its attributes need from the request.
#[derive(Debug)]
pub struct ServerSpan {
    span: Span,
    method: http::Method,
    path: String,
    route: Option<MatchedRoute>,
    client: Option<ClientAddr>,
}

impl<RB, E> Hook<RB, E> for Box<ServerSpan> {
    fn run(mut self, out: &mut Result<Response<RB>, E>) {
        let route = self.route.as_ref().map_or("-", |r| r.name.as_str());
        self.span.update_name(format!("{} {route}", self.method));
        let mut attrs = vec![
            KeyValue::new("http.request.method", self.method.as_str().to_string()),
            KeyValue::new("http.route", route.to_string()),
            KeyValue::new("url.path", std::mem::take(&mut self.path)),
            KeyValue::new("url.scheme", "http"),
        ];
        if let Some(ClientAddr(peer)) = self.client {
            attrs.push(KeyValue::new("client.address", peer.ip().to_string()));
        }
        if let Ok(resp) = out {
            let status = resp.status();
            attrs.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status.as_u16()),
            ));
            let ext = resp.extensions();
            let rescued = ext.get::<Rescued>().map(|r| r.kind);
            if let Some(c) = ext.get::<CacheOutcome>() {
                attrs.push(KeyValue::new("rag_sidecar.cache", c.as_str()));
            }
            attrs.push(KeyValue::new(
                "rag_sidecar.coalesced",
                ext.get::<Coalesced>().is_some(),
            ));
            if let Some(QuotaWait(w)) = ext.get::<QuotaWait>() {
                attrs.push(KeyValue::new(
                    "rag_sidecar.upstream_quota.wait_seconds",
                    w.as_secs_f64(),
                ));
            }
            // The rate limit writes its fields on every answer of a
            // limited route; its refusal is a rescued RateLimited.
            let limited = rescued == Some(ErrorKind::RateLimited);
            if limited || resp.headers().contains_key(X_RATELIMIT_REMAINING) {
                attrs.push(KeyValue::new(
                    "rag_sidecar.rate_limit",
                    if limited { "limited" } else { "allowed" },
                ));
            }
            if status.is_server_error() {
                let kind =
                    rescued.map_or_else(|| status.as_str().to_string(), |k| k.as_str().to_string());
                attrs.push(KeyValue::new("error.type", kind));
                self.span.set_status(Status::error(""));
            } else if let Some(k) = rescued {
                attrs.push(KeyValue::new("rag_sidecar.refused", k.as_str()));
            }
        }
        self.span.set_attributes(attrs);
        self.span.end();
    }
}
