//! [`OnAnswer`]: the inner service's future, with one piece of work run on
//! its output as it arrives — the metrics recording, the access-log line,
//! the rate-limit fields. Layers that only need to look at (or add to) the
//! answer share this instead of each writing its own future.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;

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
