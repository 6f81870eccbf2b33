//! `AttemptSpan`: one client span per upstream attempt, a child of the
//! server span, when spans are exported and the trace is sampled; the app
//! then receives a `traceparent` naming the attempt as its parent. Below
//! the retry (each attempt is its own span, its number from
//! [`Attempt`]) and the upstream quota (a wait for room is the server
//! span's, not the attempt's), above the breaker (an attempt the open
//! circuit refuses is a span with `error.type` `circuit_open`). Attributes
//! follow OpenTelemetry's HTTP client conventions: method, status,
//! `http.request.resend_count`, `error.type` (the legacy failure type).
//! Left out of the stack when nothing is exported.

use std::task::{Context, Poll};

use http::{Request, Response};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceState, Tracer as _};
use opentelemetry_sdk::trace::{SdkTracer, Span};

use crate::BoxError;
use crate::body::Body;
use crate::error::classify;
use crate::extensions::{Attempt, UpstreamFailure};
use crate::service::{Hook, OnAnswer};
use crate::trace::context::{TRACEPARENT, TRACESTATE, TraceParent};

#[derive(Debug, Clone)]
pub struct AttemptSpanLayer {
    tracer: SdkTracer,
}

impl AttemptSpanLayer {
    pub fn new(tracer: SdkTracer) -> Self {
        Self { tracer }
    }
}

impl<S> tower::Layer<S> for AttemptSpanLayer {
    type Service = AttemptSpan<S>;

    fn layer(&self, inner: S) -> AttemptSpan<S> {
        AttemptSpan {
            inner,
            tracer: self.tracer.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AttemptSpan<S> {
    inner: S,
    tracer: SdkTracer,
}

impl<S> tower::Service<Request<Body>> for AttemptSpan<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = OnAnswer<S::Future, Box<ClientSpan>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // The server span above wrote the request's traceparent; an
        // unsampled one stays as it is (its parent is the server span).
        let sampled = req
            .headers()
            .get(TRACEPARENT)
            .is_some_and(TraceParent::written_sampled);
        let parent = sampled
            .then(|| TraceParent::from_headers(req.headers()))
            .flatten();
        let Some(parent) = parent else {
            return OnAnswer::new(self.inner.call(req), None);
        };
        let cx = parent.as_parent(false, TraceState::default());
        let builder = self
            .tracer
            .span_builder(req.method().as_str().to_string())
            .with_kind(SpanKind::Client);
        let span = self.tracer.build_with_context(builder, &cx);
        if !span.is_recording() {
            return OnAnswer::new(self.inner.call(req), None);
        }
        // The app's parent is this attempt; the tracestate stays as the
        // server span left it.
        let state = req.headers().get(TRACESTATE).cloned();
        TraceParent::of(span.span_context()).write(req.headers_mut(), state);
        let attempt = req.extensions().get::<Attempt>().map_or(1, |a| a.0);
        let hook = Box::new(ClientSpan {
            span,
            attempt,
            method: req.method().as_str().to_string(),
            path: req.uri().path().to_string(),
        });
        OnAnswer::new(self.inner.call(req), Some(hook))
    }
}

/// A sampled attempt's span.
#[derive(Debug)]
pub struct ClientSpan {
    span: Span,
    attempt: u32,
    method: String,
    path: String,
}

impl Hook<Body, BoxError> for Box<ClientSpan> {
    fn run(mut self, out: &mut Result<Response<Body>, BoxError>) {
        let mut attrs = vec![
            KeyValue::new("http.request.method", self.method),
            KeyValue::new("url.path", self.path),
            KeyValue::new("rag_sidecar.attempt", i64::from(self.attempt)),
        ];
        if self.attempt > 1 {
            attrs.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(self.attempt - 1),
            ));
        }
        let failure = UpstreamFailure::of(out);
        if let Ok(resp) = out {
            attrs.push(KeyValue::new(
                "http.response.status_code",
                i64::from(resp.status().as_u16()),
            ));
        }
        let error = match (&*out, failure) {
            (_, Some(f)) => Some(f.as_str()),
            (Err(e), None) => Some(classify(e.as_ref()).as_str()),
            (Ok(_), None) => None,
        };
        attrs.push(KeyValue::new(
            "rag_sidecar.outcome",
            if error.is_some() { "failure" } else { "ok" },
        ));
        if let Some(e) = error {
            attrs.push(KeyValue::new("error.type", e));
            self.span.set_status(Status::error(""));
        }
        self.span.set_attributes(attrs);
        self.span.end();
    }
}
