//! `Classify`: one upstream attempt, bounded by the route's deadline and
//! sorted into the legacy error types of PRODUCT.md "Retry and circuit
//! breaking": `gemini_rate_limit` (a 429, or a 5xx whose body carries one of
//! the quota patterns), `upstream_5xx`, `connect_error`, `timeout`.
//!
//! It sits right over the upstream client, under the circuit breaker and the
//! retry layer, so both read the same verdict: a failed answer carries an
//! [`UpstreamFailure`] extension, a failed exchange is a typed error
//! ([`Failure::of_error`]). Failures are counted by type in the metrics'
//! [`FailureCounts`]. Timeouts are the route timeout's: it counts them, and
//! the breaker's permit, dropped at the deadline, counts them as failures,
//! without a second timer per attempt.
//!
//! Body sniffing is bounded: at most [`SNIFF_BYTES`] (plus one chunk) and
//! [`SNIFF_WAIT`]; the bytes read are put back in front of the rest, so the
//! client still gets the whole body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use tokio::time::Instant;

use crate::BoxError;
use crate::body::{self, Body};
use crate::error::Failure;
use crate::extensions::{Deadline, UpstreamFailure};
use crate::metrics::Recorder;
use crate::metrics::resilience::FailureCounts;
use crate::route::MatchedRoute;
use crate::service::BoxResponseFuture;

/// How much of a 5xx body is searched for the quota patterns.
pub const SNIFF_BYTES: usize = 4096;
/// How long the sniff waits for those bytes.
pub const SNIFF_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Shared {
    patterns: Vec<String>,
    counts: Arc<FailureCounts>,
    /// This worker's metrics, for the `upstream.<route>` timers.
    recorder: Option<Arc<Recorder>>,
}

#[derive(Debug, Clone)]
pub struct ClassifyLayer {
    shared: Arc<Shared>,
}

impl ClassifyLayer {
    pub fn new(patterns: Vec<String>, counts: Arc<FailureCounts>) -> Self {
        Self {
            shared: Arc::new(Shared {
                patterns,
                counts,
                recorder: None,
            }),
        }
    }

    /// Also times each attempt on this worker's metrics recorder.
    pub fn timing(self, recorder: Option<Arc<Recorder>>) -> Self {
        let sh = &self.shared;
        Self {
            shared: Arc::new(Shared {
                patterns: sh.patterns.clone(),
                counts: Arc::clone(&sh.counts),
                recorder,
            }),
        }
    }
}

impl<S> tower::Layer<S> for ClassifyLayer {
    type Service = Classify<S>;

    fn layer(&self, inner: S) -> Classify<S> {
        Classify {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Classify<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> tower::Service<Request<Body>> for Classify<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let deadline = req.extensions().get::<Deadline>().copied();
        let timed = self.shared.recorder.as_ref().and_then(|rec| {
            let route = req.extensions().get::<MatchedRoute>()?;
            Some((rec.route(&route.name)?, Instant::now()))
        });
        ResponseFuture::Call {
            fut: self.inner.call(req),
            shared: Some(Arc::clone(&self.shared)),
            deadline,
            timed,
        }
    }
}

pin_project_lite::pin_project! {
    /// Passes a good answer straight through; only a 5xx goes to the boxed
    /// sniffing step.
    #[project = Proj]
    pub enum ResponseFuture<F> {
        Call {
            #[pin] fut: F,
            shared: Option<Arc<Shared>>,
            deadline: Option<Deadline>,
            // The route's index and when the attempt began, when timed.
            timed: Option<(usize, Instant)>,
        },
        Sniff { fut: BoxResponseFuture },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (sh, resp, deadline) = match self.as_mut().project() {
            Proj::Sniff { fut } => return fut.as_mut().poll(cx),
            Proj::Call {
                fut,
                shared,
                deadline,
                timed,
            } => {
                let result = std::task::ready!(fut.poll(cx));
                let Some(sh) = shared.take() else {
                    return Poll::Ready(result);
                };
                if let (Some(rec), Some((route, start))) = (&sh.recorder, timed.take()) {
                    rec.upstream(route, start.elapsed());
                }
                match result {
                    Ok(resp) if resp.status().is_server_error() => (sh, resp, *deadline),
                    other => {
                        let other = other.map(mark_429);
                        if let Some(f) = UpstreamFailure::of(&other) {
                            sh.counts.record(f);
                        }
                        return Poll::Ready(other);
                    }
                }
            }
        };
        let fut: BoxResponseFuture = Box::pin(async move {
            let resp = classify_5xx(&sh, resp, deadline).await;
            if let Some(f) = resp.extensions().get::<UpstreamFailure>() {
                sh.counts.record(f.0);
            }
            Ok(resp)
        });
        self.set(ResponseFuture::Sniff { fut });
        self.poll(cx)
    }
}

/// A 429 is a `gemini_rate_limit` whatever its body says.
fn mark_429(mut resp: Response<Body>) -> Response<Body> {
    if resp.status() == StatusCode::TOO_MANY_REQUESTS {
        resp.extensions_mut()
            .insert(UpstreamFailure(Failure::GeminiRateLimit));
    }
    resp
}

/// Sorts a 5xx by the first few KiB of its body.
async fn classify_5xx(
    sh: &Shared,
    resp: Response<Body>,
    deadline: Option<Deadline>,
) -> Response<Body> {
    let until = Instant::now() + SNIFF_WAIT;
    let until = deadline.map_or(until, |d| d.at.min(until));
    let (parts, b) = resp.into_parts();
    let (head, rest) = sniff(b, until).await;
    let quota = quota_match(&sh.patterns, &head);
    let f = if quota {
        Failure::GeminiRateLimit
    } else {
        Failure::Upstream5xx
    };
    let mut resp = Response::from_parts(parts, rest);
    resp.extensions_mut().insert(UpstreamFailure(f));
    resp
}

/// Reads the first [`SNIFF_BYTES`] of `b` (or until `until`), and gives them
/// back with the body rebuilt to yield them first. Each chunk is searched on
/// its own; a pattern split across two chunks is missed (rare for a JSON
/// error body, which arrives in one piece).
async fn sniff(mut b: Body, until: Instant) -> (Vec<Bytes>, Body) {
    let mut frames: Vec<Frame<Bytes>> = Vec::new();
    let mut seen = 0usize;
    let mut ended = false;
    while seen < SNIFF_BYTES {
        match tokio::time::timeout_at(until, b.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    seen += d.len();
                }
                frames.push(frame);
            }
            Ok(None) => {
                ended = true;
                break;
            }
            // A broken body or a slow one: classify by what was read and let
            // the client see the rest (or the break) as it comes.
            Ok(Some(Err(e))) => {
                let head = data_of(&frames);
                let read = futures_util::stream::iter(frames.into_iter().map(Ok));
                let failed = futures_util::stream::iter([Err::<Frame<Bytes>, BoxError>(e)]);
                return (head, body::boxed(StreamBody::new(read.chain(failed))));
            }
            Err(_elapsed) => break,
        }
    }
    let head = data_of(&frames);
    let read = futures_util::stream::iter(frames.into_iter().map(Ok::<_, BoxError>));
    let rest = if ended {
        body::boxed(StreamBody::new(read))
    } else {
        body::boxed(StreamBody::new(read.chain(BodyStream::new(b))))
    };
    (head, rest)
}

fn data_of(frames: &[Frame<Bytes>]) -> Vec<Bytes> {
    frames
        .iter()
        .filter_map(|f| f.data_ref().cloned())
        .collect()
}

/// Whether any chunk contains any of the patterns (each chunk searched on
/// its own).
pub fn quota_match(patterns: &[String], chunks: &[Bytes]) -> bool {
    patterns
        .iter()
        .any(|p| chunks.iter().any(|chunk| contains(chunk, p.as_bytes())))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
#[allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "scripted test services record their calls under a plain lock"
)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt};

    fn patterns() -> Vec<String> {
        crate::config::Config::default().retry.rate_limit_patterns
    }

    async fn verdict(status: u16, chunks: &[&'static str]) -> (Option<Failure>, Bytes) {
        let chunks: Vec<Bytes> = chunks
            .iter()
            .map(|c| Bytes::from_static(c.as_bytes()))
            .collect();
        let upstream = tower::service_fn(move |_req: Request<Body>| {
            let frames = chunks
                .clone()
                .into_iter()
                .map(|c| Ok::<_, BoxError>(Frame::data(c)));
            let b = body::boxed(StreamBody::new(futures_util::stream::iter(frames)));
            let mut resp = Response::new(b);
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            async move { Ok::<_, BoxError>(resp) }
        });
        let counts = Arc::new(FailureCounts::default());
        let svc = ClassifyLayer::new(patterns(), Arc::clone(&counts)).layer(upstream);
        let result = svc.oneshot(Request::new(body::empty())).await;
        let f = UpstreamFailure::of(&result);
        assert_eq!(f.map(|f| counts.get(f)), f.map(|_| 1));
        let resp = result.unwrap();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (f, bytes)
    }

    #[tokio::test]
    async fn sorts_answers_into_the_legacy_types_and_keeps_the_body() {
        assert_eq!(verdict(200, &["ok"]).await.0, None);
        assert_eq!(verdict(404, &["nope"]).await.0, None);
        assert_eq!(
            verdict(429, &["slow down"]).await.0,
            Some(Failure::GeminiRateLimit)
        );
        let (f, body) = verdict(500, &["{\"message\": \"429 RESOURCE_", "EXHAUSTED\"}"]).await;
        // "429" is in the first chunk; the split pattern alone would be missed.
        assert_eq!(f, Some(Failure::GeminiRateLimit));
        assert_eq!(&body[..], b"{\"message\": \"429 RESOURCE_EXHAUSTED\"}");
        assert_eq!(
            verdict(503, &["daily quota exceeded"]).await.0,
            Some(Failure::GeminiRateLimit)
        );
        assert_eq!(
            verdict(502, &["bad gateway"]).await.0,
            Some(Failure::Upstream5xx)
        );
        // Only the first few KiB are searched; the body still arrives whole.
        let filler: &'static str = Box::leak("x".repeat(SNIFF_BYTES + 10).into_boxed_str());
        let (f, body) = verdict(500, &[filler, "quota"]).await;
        assert_eq!(f, Some(Failure::Upstream5xx));
        assert_eq!(body.len(), SNIFF_BYTES + 15);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_error_body_is_classified_by_status_after_the_wait() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let rx = std::sync::Mutex::new(Some(rx));
        let upstream = tower::service_fn(move |_req: Request<Body>| {
            let rx = rx.lock().unwrap().take().unwrap();
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|f| (f, rx))
            });
            let mut resp = Response::new(body::boxed(StreamBody::new(stream)));
            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            async move { Ok::<_, BoxError>(resp) }
        });
        let svc = ClassifyLayer::new(patterns(), Arc::default()).layer(upstream);
        let start = Instant::now();
        let result = svc.oneshot(Request::new(body::empty())).await;
        assert_eq!(start.elapsed(), SNIFF_WAIT);
        assert_eq!(UpstreamFailure::of(&result), Some(Failure::Upstream5xx));
        tx.send(Ok(Frame::data(Bytes::from_static(b"late quota"))))
            .await
            .unwrap();
        drop(tx);
        let body = result
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"late quota");
    }
}
