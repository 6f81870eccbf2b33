//! The tower plumbing the layers share: the boxed response future, the
//! bound on an inner service a layer clones into its own async work, the
//! per-worker handle, and [`OnAnswer`], the inner service's future with one
//! piece of work run on its output as it arrives (the metrics recording,
//! the access-log line, the rate-limit fields), so that layers that only look
//! at (or add to) the answer share one future instead of each writing its
//! own. A leaf: it knows requests and bodies, no layer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};

use crate::BoxError;
use crate::body::Body;

/// A boxed response future, for layers that await the inner service inside
/// their own async logic.
pub type BoxResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// What a layer that clones its inner service into its own async work
/// (cache, rate limit in shared mode, retry) needs of it.
pub trait Inner:
    tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = BoxError,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> Inner for S where
    S: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = BoxError,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Calls the inner service behind a boxed future: awaiting `S::Future`
/// directly inside an async block trips rustc's higher-ranked `Send` check
/// over the boxed error's lifetime.
pub fn call_boxed<S>(inner: &mut S, req: Request<Body>) -> BoxResponseFuture
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    Box::pin(inner.call(req))
}

/// The service that `poll_ready` made ready, for a request's own async
/// work, leaving a fresh clone in its place (tower's rule: the clone has
/// not been polled ready, the original has).
pub fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

/// Counts one in `n` while it lives: a request waiting somewhere (for a
/// lease, for room under a quota), gone from the count when it is done or
/// its client hangs up.
#[derive(Debug)]
pub struct Counted<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> Counted<'a> {
    pub fn new(n: &'a std::sync::atomic::AtomicU64) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whole seconds, rounded up: "retry in 0 s" would invite a retry too soon.
pub fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A worker's own handle on process-wide state. Layer services are cloned
/// for every request, and cloning an `Arc` that every worker shares writes
/// one cache line from all cores at once; a handle made per worker (when
/// `build_stack` applies the layer) keeps that write on its own core.
pub type WorkerHandle<T> = Arc<Arc<T>>;

/// What a layer does with the answer, once, when it is ready. Dropped
/// without being run when the request is abandoned first.
pub trait Hook<B, E> {
    fn run(self, out: &mut Result<Response<B>, E>);
}

pin_project_lite::pin_project! {
    #[derive(Debug)]
    pub struct OnAnswer<F, H> {
        #[pin]
        inner: F,
        hook: Option<H>,
    }
}

impl<F, H> OnAnswer<F, H> {
    /// `hook: None` passes the answer through untouched.
    pub fn new(inner: F, hook: Option<H>) -> Self {
        Self { inner, hook }
    }
}

impl<F, H, B, E> Future for OnAnswer<F, H>
where
    F: Future<Output = Result<Response<B>, E>>,
    H: Hook<B, E>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut out = std::task::ready!(this.inner.poll(cx));
        if let Some(hook) = this.hook.take() {
            hook.run(&mut out);
        }
        Poll::Ready(out)
    }
}
