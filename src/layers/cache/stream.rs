//! A streamed answer (`text/event-stream`) shared as it arrives: one task
//! reads the upstream body ([`pump`]) into an append-only buffer ([`Tee`])
//! that every client of the stream follows at its own pace
//! ([`Tee::reader`]), the leader's client and the identical requests that
//! joined it alike. The upstream is read as fast as it sends, whatever the
//! readers do; a reader that hangs up leaves the others (and the upstream
//! read) untouched, and the stream goes on to its end for the cache even
//! when every client has gone.
//!
//! The buffer keeps every event while the stream fits `max_body_bytes`: that
//! copy becomes the cache entry when the upstream ends cleanly, and lets a
//! request that joins late start from the first event. Once the stream
//! outgrows the limit the copy is dropped at once: events every reader has
//! passed are freed, a request can no longer join, and a reader that falls
//! further behind the newest event than the stream's share of
//! `memory_budget` ([`MemoryBudget::stream_share`], at most [`MAX_LAG`]) is
//! cut off (its answer ends in an error) rather than hold the stream's
//! memory; the stream goes on for the others, and for the cache. What the
//! buffer holds is charged to the budget (`streams`) as it changes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::watch;

use crate::BoxError;
use crate::body::Body;
use crate::memory::{Backlog, Charge, MemoryBudget, Use};

/// How far (in bytes) a reader may trail the newest event once the copy is
/// dropped, when the memory budget has room.
pub const MAX_LAG: usize = 8 * 1024 * 1024;

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The upstream ended it.
    Clean,
    /// The upstream broke it, fell silent past the route's timeout, or
    /// nobody was left to read an oversized one.
    Failed,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the upstream broke the stream")]
    Broken,
    #[error("this client fell too far behind the stream")]
    Behind,
}

/// The shared buffer of one stream.
#[derive(Debug)]
pub struct Tee {
    #[allow(
        clippy::disallowed_types,
        reason = "held to append, read or trim one chunk, never across an await"
    )]
    state: std::sync::Mutex<State>,
    /// Bumped at every change, for the readers to wait on.
    changed: watch::Sender<u64>,
    max_copy: usize,
    budget: Arc<MemoryBudget>,
}

#[derive(Debug)]
struct State {
    /// The absolute index of `chunks[0]`.
    base: usize,
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks`.
    held: usize,
    /// Bytes seen.
    total: usize,
    /// Every chunk is still kept (the stream fits the limit).
    copy: bool,
    end: Option<End>,
    /// Each reader's next absolute index.
    readers: HashMap<u64, usize>,
    next_id: u64,
    /// `held`, charged to the memory budget (as a copy, then as a backlog).
    charge: Charge,
    /// Counted as a stream keeping a backlog once the copy is dropped.
    backlog: Option<Backlog>,
}

impl State {
    /// Frees what every reader has passed (only once the copy is dropped),
    /// cutting off readers that trail by more than the stream's share of
    /// the budget; charges what is left.
    fn trim(&mut self, budget: &MemoryBudget) {
        if self.copy {
            self.charge.set(self.held as u64);
            return;
        }
        let lag = budget.stream_share(MAX_LAG);
        while self.held > lag {
            let Some(front) = self.chunks.pop_front() else {
                break;
            };
            self.held -= front.len();
            self.base += 1;
        }
        let min = self.readers.values().copied().min().unwrap_or(usize::MAX);
        while self.base < min {
            let Some(front) = self.chunks.pop_front() else {
                break;
            };
            self.held -= front.len();
            self.base += 1;
        }
        self.charge.set(self.held as u64);
    }
}

impl Tee {
    pub fn new(max_copy: u64, budget: Arc<MemoryBudget>) -> Arc<Self> {
        let (changed, _) = watch::channel(0);
        Arc::new(Self {
            #[allow(
                clippy::disallowed_methods,
                clippy::disallowed_types,
                reason = "held to append, read or trim one chunk, never across an await"
            )]
            state: std::sync::Mutex::new(State {
                base: 0,
                chunks: VecDeque::new(),
                held: 0,
                total: 0,
                copy: true,
                end: None,
                readers: HashMap::new(),
                next_id: 0,
                charge: budget.charge(Use::Copies),
                backlog: None,
            }),
            changed,
            max_copy: usize::try_from(max_copy).unwrap_or(usize::MAX),
            budget,
        })
    }

    #[allow(
        clippy::disallowed_types,
        reason = "held to append, read or trim one chunk, never across an await"
    )]
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn push(&self, chunk: Bytes) {
        {
            let mut s = self.state();
            s.total += chunk.len();
            s.held += chunk.len();
            s.chunks.push_back(chunk);
            // Too large to store, or the memory budget is spent: the copy
            // goes, its memory with it (the stream goes on, unstored).
            if s.copy && (s.total > self.max_copy || self.budget.spent()) {
                s.copy = false;
                s.charge.move_to(Use::Streams);
                s.backlog = Some(self.budget.backlog());
            }
            s.trim(&self.budget);
        }
        self.bump();
    }

    fn finish(&self, end: End) {
        self.state().end = Some(end);
        self.bump();
    }

    /// Whether every reader has gone and the copy was dropped: nobody wants
    /// the rest.
    fn abandoned(&self) -> bool {
        let s = self.state();
        !s.copy && s.readers.is_empty()
    }

    /// The whole stream, when the upstream ended it cleanly within the
    /// limit (one allocation of its exact size).
    pub fn copy(&self) -> Option<Bytes> {
        let s = self.state();
        if !(s.copy && s.end == Some(End::Clean) && s.base == 0) {
            return None;
        }
        let mut out = BytesMut::with_capacity(s.total);
        for c in &s.chunks {
            out.extend_from_slice(c);
        }
        Some(out.freeze())
    }

    /// Bytes held now (for the tests and the figures).
    pub fn held(&self) -> usize {
        self.state().held
    }

    /// A client's body, from the first event; `None` when the first events
    /// are gone (the stream outgrew the copy).
    pub fn reader(self: &Arc<Self>) -> Option<Body> {
        let id = {
            let mut s = self.state();
            if s.base > 0 || !s.copy {
                return None;
            }
            let id = s.next_id;
            s.next_id += 1;
            s.readers.insert(id, 0);
            id
        };
        let reader = Reader {
            tee: Arc::clone(self),
            id,
            rx: self.changed.subscribe(),
        };
        let frames = futures_util::stream::unfold(Some(reader), |reader| async move {
            let mut reader = reader?;
            match reader.next().await {
                Ok(Some(chunk)) => Some((Ok(Frame::data(chunk)), Some(reader))),
                Ok(None) => None,
                Err(e) => Some((Err(BoxError::from(e)), None)),
            }
        });
        Some(StreamBody::new(frames).boxed_unsync())
    }
}

/// One client following the stream; leaves it on drop.
struct Reader {
    tee: Arc<Tee>,
    id: u64,
    rx: watch::Receiver<u64>,
}

impl Reader {
    async fn next(&mut self) -> Result<Option<Bytes>, StreamError> {
        loop {
            // Marked seen before looking, so that a change made after the
            // look wakes the wait below.
            self.rx.borrow_and_update();
            {
                let mut s = self.tee.state();
                let Some(&pos) = s.readers.get(&self.id) else {
                    return Err(StreamError::Behind);
                };
                if pos < s.base {
                    s.readers.remove(&self.id);
                    return Err(StreamError::Behind);
                }
                if let Some(chunk) = s.chunks.get(pos - s.base).cloned() {
                    s.readers.insert(self.id, pos + 1);
                    s.trim(&self.tee.budget);
                    return Ok(Some(chunk));
                }
                match s.end {
                    Some(End::Clean) => return Ok(None),
                    Some(End::Failed) => return Err(StreamError::Broken),
                    None => {}
                }
            }
            if self.rx.changed().await.is_err() {
                return Err(StreamError::Broken);
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut s = self.tee.state();
        s.readers.remove(&self.id);
        s.trim(&self.tee.budget);
    }
}

/// Reads the upstream body into `tee` until it ends, breaks, stays silent
/// for `idle`, or (oversized) nobody is left to read it.
pub async fn pump(tee: Arc<Tee>, mut body: Body, idle: Duration) -> End {
    let end = loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        tee.push(data);
                    }
                }
                if tee.abandoned() {
                    break End::Failed;
                }
            }
            Ok(None) => break End::Clean,
            Ok(Some(Err(e))) => {
                tracing::debug!("stream from the upstream broken: {e}");
                break End::Failed;
            }
            Err(_) => {
                tracing::debug!("stream from the upstream silent for {idle:?}");
                break End::Failed;
            }
        }
    };
    tee.finish(end);
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(n: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(format!("data: {i}\n\n")))
            .collect()
    }

    async fn read_all(body: Body) -> Result<Vec<u8>, BoxError> {
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn readers_get_every_event_and_the_copy_is_whole() {
        let tee = Tee::new(1 << 20, MemoryBudget::new(u64::MAX));
        let a = tee.reader().unwrap();
        for c in chunks(3) {
            tee.push(c);
        }
        let b = tee.reader().unwrap(); // joined late: from the first event
        tee.push(Bytes::from_static(b"data: [DONE]\n\n"));
        tee.finish(End::Clean);
        let want = b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n".to_vec();
        assert_eq!(read_all(a).await.unwrap(), want);
        assert_eq!(read_all(b).await.unwrap(), want);
        assert_eq!(tee.copy().unwrap().to_vec(), want);
    }

    #[tokio::test]
    async fn a_broken_stream_is_no_copy_and_an_error_for_its_readers() {
        let tee = Tee::new(1 << 20, MemoryBudget::new(u64::MAX));
        let a = tee.reader().unwrap();
        tee.push(Bytes::from_static(b"data: 0\n\n"));
        tee.finish(End::Failed);
        assert!(read_all(a).await.is_err());
        assert!(tee.copy().is_none());
    }

    #[tokio::test]
    async fn an_oversized_stream_drops_its_copy_and_frees_what_was_read() {
        let tee = Tee::new(25, MemoryBudget::new(u64::MAX));
        let mut a = tee.reader().unwrap();
        for c in chunks(3) {
            tee.push(c); // 9 bytes each: over 25 at the third
        }
        assert!(tee.reader().is_none(), "no joining once the copy is gone");
        // Nothing read yet: all held for `a`.
        assert_eq!(tee.held(), 27);
        let first = a.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"data: 0\n\n");
        assert_eq!(tee.held(), 18);
        drop(a);
        assert_eq!(tee.held(), 0);
        tee.finish(End::Clean);
        assert!(tee.copy().is_none());
    }

    #[tokio::test]
    async fn a_reader_too_far_behind_is_cut_off_and_the_others_go_on() {
        let tee = Tee::new(0, MemoryBudget::new(u64::MAX));
        let slow = tee.reader().unwrap();
        let mut fast = tee.reader().unwrap();
        let big = Bytes::from(vec![b'x'; 1 << 20]);
        for _ in 0..12 {
            tee.push(big.clone());
            assert_eq!(
                fast.frame()
                    .await
                    .unwrap()
                    .unwrap()
                    .into_data()
                    .unwrap()
                    .len(),
                1 << 20
            );
        }
        assert!(tee.held() <= MAX_LAG, "{}", tee.held());
        tee.finish(End::Clean);
        assert!(fast.frame().await.is_none());
        assert!(read_all(slow).await.is_err());
    }

    #[tokio::test]
    async fn the_pump_ends_on_silence() {
        tokio::time::pause();
        let tee = Tee::new(1 << 20, MemoryBudget::new(u64::MAX));
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let body = StreamBody::new(tokio_stream_from(rx)).boxed_unsync();
        let end = pump(Arc::clone(&tee), body, Duration::from_secs(5)).await;
        assert_eq!(end, End::Failed);
        assert!(tee.copy().is_none());
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
