//! The spool over a channel-fed client body and a recording inner service:
//! the app is called only once the body is complete, with its length, and
//! the budget refuses what would exceed it and is given back afterwards.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt};

use super::*;
use crate::config::Config;
use crate::error::{ErrorKind, classify};
use crate::extensions::ClientId;
use crate::route::RouteTable;

/// What the app received: the request's `Content-Length` and its body.
type Received = (Option<String>, Bytes);

/// An inner service that reports when it is called, then the request it
/// was called with.
#[derive(Clone)]
struct App {
    called: mpsc::UnboundedSender<()>,
    received: mpsc::UnboundedSender<Received>,
}

impl tower::Service<Request<Body>> for App {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> BoxResponseFuture {
        let _ = self.called.send(());
        let tx = self.received.clone();
        Box::pin(async move {
            let len = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .map(|v| v.to_str().unwrap_or_default().to_string());
            let got = req.into_body().collect().await?.to_bytes();
            let _ = tx.send((len, got));
            Ok(Response::new(body::empty()))
        })
    }
}

/// A request to `path`, with a body fed chunk by chunk through the sender,
/// from a client of its own.
fn request(path: &str, declared: Option<u64>) -> (mpsc::Sender<Bytes>, Request<Body>) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    request_from(path, declared, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A request to `path` from `client`.
fn request_from(
    path: &str,
    declared: Option<u64>,
    client: u64,
) -> (mpsc::Sender<Bytes>, Request<Body>) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = tokio_stream_of(rx);
    let mut req = Request::new(body::boxed(StreamBody::new(stream)));
    *req.method_mut() = Method::POST;
    if let Some(n) = declared {
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let table = RouteTable::new(&Config::default());
    req.extensions_mut()
        .insert(table.matched(&Method::POST, path));
    req.extensions_mut().insert(ClientId(client));
    (tx, req)
}

fn tokio_stream_of(
    rx: mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    })
}

/// What a test watches of the app behind the spool.
struct Watch {
    called: mpsc::UnboundedReceiver<()>,
    received: mpsc::UnboundedReceiver<Received>,
}

fn spooling(max: u64) -> (Arc<SpoolBudget>, RequestSpool<App>, Watch) {
    let budget = SpoolBudget::new(max);
    let (svc, watch) = spooling_with(&budget);
    (budget, svc, watch)
}

fn spooling_with(budget: &Arc<SpoolBudget>) -> (RequestSpool<App>, Watch) {
    let (called, called_rx) = mpsc::unbounded_channel();
    let (received, received_rx) = mpsc::unbounded_channel();
    let svc = RequestSpoolLayer::new(Arc::clone(budget)).layer(App { called, received });
    let watch = Watch {
        called: called_rx,
        received: received_rx,
    };
    (svc, watch)
}

#[tokio::test]
async fn the_app_gets_the_body_only_once_it_is_complete_with_its_length() {
    let (budget, svc, mut watch) = spooling(1 << 20);
    let (tx, req) = request("/api/upload", None);
    let call = tokio::spawn(svc.oneshot(req));
    for part in ["first ", "second ", "third"] {
        tx.send(Bytes::from(part)).await.unwrap();
    }
    // The client has not finished: the app has not been called. (A bounded
    // wait for something that must not happen.)
    let early = tokio::time::timeout(Duration::from_millis(200), watch.called.recv()).await;
    assert!(
        early.is_err(),
        "the app was called before the body was complete"
    );
    assert_eq!(budget.used(), 18, "the bytes on disk are counted");
    drop(tx);
    let (len, got) = watch.received.recv().await.unwrap();
    assert_eq!(got, Bytes::from("first second third"));
    assert_eq!(len.as_deref(), Some("18"), "sent with its exact length");
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(budget.used(), 0, "the budget is given back with the file");
}

#[tokio::test]
async fn routes_without_request_buffering_stream_as_before() {
    let (budget, svc, mut watch) = spooling(1 << 20);
    let (tx, req) = request("/api/search", None);
    let call = tokio::spawn(svc.oneshot(req));
    tx.send(Bytes::from("partial")).await.unwrap();
    // Not spooled: the app is called while the body is still coming, and
    // no length is made up.
    watch.called.recv().await.unwrap();
    drop(tx);
    let (len, got) = watch.received.recv().await.unwrap();
    assert_eq!(len, None);
    assert_eq!(got, Bytes::from("partial"));
    assert_eq!(budget.used(), 0);
    call.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_declared_length_over_the_budget_is_refused_before_a_byte_is_read() {
    let (budget, svc, mut watch) = spooling(100);
    let (_tx, req) = request("/api/upload", Some(101));
    let err = svc.oneshot(req).await.unwrap_err();
    assert_eq!(classify(err.as_ref()), ErrorKind::SpoolFull);
    assert_eq!(
        ErrorKind::SpoolFull.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(watch.called.try_recv().is_err(), "the app was not called");
    assert_eq!(budget.used(), 0);
}

#[tokio::test]
async fn a_chunked_body_that_outgrows_the_budget_is_refused_and_its_bytes_given_back() {
    // A share of a quarter (10) for each client; four others hold 34.
    let (budget, svc, mut watch) = spooling(40);
    let mut holders = Vec::new();
    for part in ["1234567890", "1234567890", "1234567890", "abcd"] {
        let (tx, req) = request("/api/upload", None);
        let (holder, _watch) = spooling_with(&budget);
        let call = tokio::spawn(holder.oneshot(req));
        tx.send(Bytes::from(part)).await.unwrap();
        holders.push((tx, call));
    }
    while budget.used() < 34 {
        tokio::task::yield_now().await;
    }
    let (tx, req) = request("/api/upload", None);
    let call = tokio::spawn(svc.oneshot(req));
    tx.send(Bytes::from("12345")).await.unwrap();
    tx.send(Bytes::from("6789")).await.unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(classify(err.as_ref()), ErrorKind::SpoolFull);
    assert!(err.to_string().contains("spool_max_bytes"), "{err}");
    assert!(watch.called.try_recv().is_err(), "the app was not called");
    assert_eq!(budget.used(), 34, "only the others' bytes are held");
    for (tx, call) in holders {
        drop(tx);
        call.await.unwrap().unwrap();
    }
    assert_eq!(budget.used(), 0);
}

/// Bytes are charged as written: a declared length takes nothing until its
/// bytes arrive; one client's bytes stop at a quarter of the budget, and
/// another client's still fit.
#[tokio::test]
async fn one_client_holds_at_most_a_quarter_charged_as_written() {
    let (budget, svc, mut watch) = spooling(400);
    let (tx, req) = request_from("/api/upload", Some(90), 7);
    let call = tokio::spawn(svc.oneshot(req));
    tx.send(Bytes::from(vec![b'a'; 10])).await.unwrap();
    while budget.used() < 10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(budget.used(), 10, "declared 90, written 10");
    // The same client, chunked, past its 100: refused as it outgrows it.
    let (svc2, mut watch2) = spooling_with(&budget);
    let (tx2, req2) = request_from("/api/upload", None, 7);
    let second = tokio::spawn(svc2.oneshot(req2));
    tx2.send(Bytes::from(vec![b'b'; 80])).await.unwrap();
    tx2.send(Bytes::from(vec![b'b'; 20])).await.unwrap();
    let err = second.await.unwrap().unwrap_err();
    assert_eq!(classify(err.as_ref()), ErrorKind::SpoolFull);
    assert!(err.to_string().contains("quarter"), "{err}");
    assert!(watch2.called.try_recv().is_err());
    // Another client fits beside it.
    let (svc3, _watch3) = spooling_with(&budget);
    let (tx3, req3) = request_from("/api/upload", Some(100), 8);
    let third = tokio::spawn(svc3.oneshot(req3));
    tx3.send(Bytes::from(vec![b'c'; 100])).await.unwrap();
    drop(tx3);
    third.await.unwrap().unwrap();
    drop(tx);
    call.await.unwrap().unwrap();
    watch.received.recv().await.unwrap();
    assert_eq!(budget.used(), 0);
}

#[tokio::test]
async fn a_client_body_error_is_passed_on_and_nothing_reaches_the_app() {
    let (budget, mut svc, mut watch) = spooling(1 << 20);
    let broken = futures_util::stream::iter([
        Ok(Frame::data(Bytes::from("part"))),
        Err::<Frame<Bytes>, BoxError>("client went away".into()),
    ]);
    let mut req = Request::new(body::boxed(StreamBody::new(broken)));
    *req.method_mut() = Method::POST;
    let table = RouteTable::new(&Config::default());
    req.extensions_mut()
        .insert(table.matched(&Method::POST, "/api/upload"));
    let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
    assert!(err.to_string().contains("client went away"), "{err}");
    assert!(watch.called.try_recv().is_err());
    assert_eq!(budget.used(), 0);
}
