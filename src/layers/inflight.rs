//! `InflightLimit`: at most `max_inflight` requests are processed at once;
//! one more is answered 503 at once (tower's `Overloaded`, which the rescue
//! turns into JSON with `Retry-After: 1`) instead of queueing work the
//! upstream cannot absorb. The permit is held until the response head.
//!
//! tower's `LoadShed` + `GlobalConcurrencyLimit` do the same, but the stack
//! is cloned for every request and `ConcurrencyLimit`'s clone allocates a
//! new boxed acquire future each time; a `try_acquire_owned` here costs one
//! atomic operation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::BoxError;

#[derive(Debug, Clone)]
pub struct InflightLimitLayer {
    permits: Arc<Semaphore>,
}

impl InflightLimitLayer {
    /// `permits` is shared by every worker's stack: the cap is per process.
    pub fn new(permits: Arc<Semaphore>) -> Self {
        Self { permits }
    }
}

impl<S> tower::Layer<S> for InflightLimitLayer {
    type Service = InflightLimit<S>;

    fn layer(&self, inner: S) -> InflightLimit<S> {
        InflightLimit {
            inner,
            permits: Arc::clone(&self.permits),
        }
    }
}

#[derive(Debug, Clone)]
pub struct InflightLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, Req> tower::Service<Req> for InflightLimit<S>
where
    S: tower::Service<Req, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Either<Ready<Result<S::Response, BoxError>>, Holding<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => Either::Right(Holding {
                inner: self.inner.call(req),
                _permit: permit,
            }),
            Err(_) => Either::Left(ready(Err(Box::new(
                tower::load_shed::error::Overloaded::new(),
            )))),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner future, holding its permit until it completes.
    #[derive(Debug)]
    pub struct Holding<F> {
        #[pin]
        inner: F,
        _permit: OwnedSemaphorePermit,
    }
}

impl<F: Future> Future for Holding<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, ServiceExt};

    #[tokio::test]
    async fn sheds_beyond_the_cap_and_frees_on_completion() {
        let permits = Arc::new(Semaphore::new(1));
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let gate = Arc::new(tokio::sync::Mutex::new(Some(gate_rx)));
        let inner = tower::service_fn(move |_: ()| {
            let gate = Arc::clone(&gate);
            async move {
                if let Some(rx) = gate.lock().await.take() {
                    let _ = rx.await;
                }
                Ok::<_, BoxError>("done")
            }
        });
        let svc = InflightLimitLayer::new(Arc::clone(&permits)).layer(inner);
        let first = tokio::spawn(svc.clone().oneshot(()));
        while permits.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let err = svc.clone().oneshot(()).await.unwrap_err();
        assert!(
            err.downcast_ref::<tower::load_shed::error::Overloaded>()
                .is_some()
        );
        gate_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), "done");
        assert_eq!(permits.available_permits(), 1);
        assert_eq!(svc.oneshot(()).await.unwrap(), "done");
    }
}
