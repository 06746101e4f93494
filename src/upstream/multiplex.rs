//! HTTP/2 to an upstream: every request in flight shares a few long-lived connections
//! (`h2_connections`), where HTTP/1.1 needs a connection per request.
//!
//! Each connection has a slot; requests take the slots in turn. A slot whose connection
//! closed (GOAWAY, a dead peer found by the keep-alive ping, an I/O error) is dialled again
//! by the first request that finds it so, while the others wait for that one dial rather
//! than opening connections of their own.
//!
//! A request the upstream refused without processing it (a stream above the last one a
//! GOAWAY accepted, `REFUSED_STREAM`, or one that met the connection closing) is sent again
//! on a fresh connection, as RFC 9113 §8.7 allows for any method: its body is replayed from
//! what was read of it so far (kept by reference, up to `REPLAY_LIMIT`), then the rest.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use tokio::sync::oneshot;

use super::{SendError, UpstreamBody, UpstreamError};

/// Bytes of a request body kept for a replay; past this, a refused request fails instead.
const REPLAY_LIMIT: usize = 256 * 1024;
/// Sends of one request, the first included, before a refusal is given up as an error.
const ATTEMPTS: usize = 6;
/// How long a refused request waits for the connection to let go of its body.
const HAND_BACK_WAIT: Duration = Duration::from_secs(1);
/// How long a failed dial answers for the requests to its slot.
const FAILED_DIAL_HOLD: Duration = Duration::from_millis(100);

pub(super) struct Multiplexed {
    slots: Box<[Slot]>,
    next: AtomicUsize,
    dialled: AtomicU64,
}

#[derive(Default)]
struct Slot {
    /// The connection and its dial number, so that a request evicts only the connection that
    /// refused it, never a newer one another request dialled since.
    connection: Mutex<Option<(u64, SendRequest<Returnable>)>>,
    /// Held while the slot's connection is dialled, so that one request dials and the rest
    /// wait for it.
    dialling: tokio::sync::Mutex<()>,
    /// The last dial's failure: the requests that waited on that dial, and those that come
    /// within `FAILED_DIAL_HOLD` of it, fail with it at once rather than each dialling (and
    /// timing out) in turn, so that a dead upstream's requests can fall back at once.
    failed: Mutex<Option<(Instant, UpstreamError)>>,
}

/// A slot's connection lent to one request.
struct Lent {
    slot: usize,
    number: u64,
    sender: SendRequest<Returnable>,
}

impl Multiplexed {
    pub(super) fn new(connections: usize) -> Multiplexed {
        Multiplexed {
            slots: (0..connections.max(1)).map(|_| Slot::default()).collect(),
            next: AtomicUsize::new(0),
            dialled: AtomicU64::new(0),
        }
    }

    /// A live connection of the next slot, dialled with `dial` if it has none.
    async fn connection<F, Fut>(&self, dial: F) -> Result<Lent, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<SendRequest<Returnable>, UpstreamError>>,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[index];
        if let Some(lent) = slot.live(index) {
            return Ok(lent);
        }
        if let Some(failed) = slot.recent_failure(FAILED_DIAL_HOLD) {
            return Err(failed);
        }
        let waited = Instant::now();
        let _dialling = slot.dialling.lock().await;
        // Another request may have dialled while this one waited.
        if let Some(lent) = slot.live(index) {
            return Ok(lent);
        }
        if let Some(failed) = slot.recent_failure(waited.elapsed() + FAILED_DIAL_HOLD) {
            return Err(failed);
        }
        let sender = match dial().await {
            Ok(sender) => sender,
            Err(err) => {
                *slot.failures() = Some((Instant::now(), err.clone()));
                return Err(err);
            }
        };
        let number = self.dialled.fetch_add(1, Ordering::Relaxed);
        *slot.lock() = Some((number, sender.clone()));
        Ok(Lent {
            slot: index,
            number,
            sender,
        })
    }

    /// Sends `request` on a live connection, and again on a fresh one if the upstream
    /// refused it unprocessed.
    pub(super) async fn send<F, Fut>(
        &self,
        request: Request<UpstreamBody>,
        dial: F,
    ) -> Result<Response<Incoming>, SendError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<SendRequest<Returnable>, UpstreamError>>,
    {
        let mut lent = match self.connection(&dial).await {
            Ok(lent) => lent,
            Err(err) => return Err(SendError::not_sent(err, request)),
        };
        let (mut request, mut replay) = Replay::keep(request.map(Returnable::new));
        let mut attempt = 1;
        loop {
            let mut failed = match lent.sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(failed) => failed,
            };
            let refused = if failed.error().is_canceled() {
                Some(Refused::Connection)
            } else {
                refused_unprocessed(failed.error())
            };
            let Some(refused) = refused.filter(|_| attempt < ATTEMPTS) else {
                return Err(SendError::from_hyper(failed.error()));
            };
            // A refused stream says nothing of its connection; a GOAWAY or a closing one does.
            if refused == Refused::Connection {
                self.slots[lent.slot].evict(lent.number);
            }
            let again = match failed.take_message() {
                // Never handed to the connection: nothing of it was read.
                Some(request) => Some(request),
                None => replay.request().await,
            };
            let Some(again) = again else {
                return Err(SendError::from_hyper(failed.error()));
            };
            (request, replay) = Replay::keep(again);
            if refused == Refused::Connection {
                lent = self.connection(&dial).await?;
            }
            attempt += 1;
        }
    }
}

impl Slot {
    fn live(&self, index: usize) -> Option<Lent> {
        let mut connection = self.lock();
        match connection.as_ref() {
            Some((number, sender)) if !sender.is_closed() => Some(Lent {
                slot: index,
                number: *number,
                sender: sender.clone(),
            }),
            Some(_) => {
                *connection = None;
                None
            }
            None => None,
        }
    }

    /// The failure of a dial that ended less than `within` ago.
    fn recent_failure(&self, within: Duration) -> Option<UpstreamError> {
        match &*self.failures() {
            Some((at, err)) if at.elapsed() < within => Some(err.clone()),
            _ => None,
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, Option<(Instant, UpstreamError)>> {
        self.failed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops connection `number` from the slot, if it is still there: it is going away.
    fn evict(&self, number: u64) {
        let mut connection = self.lock();
        if connection.as_ref().is_some_and(|(held, _)| *held == number) {
            *connection = None;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, SendRequest<Returnable>)>> {
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// How the upstream turned a request away without processing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// This stream only (`REFUSED_STREAM`): the connection still serves.
    Stream,
    /// The connection is going away: a stream above the last one a GOAWAY accepted (or opened
    /// after it), or one that met the connection closing.
    Connection,
}

fn refused_unprocessed(err: &hyper::Error) -> Option<Refused> {
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            if h2.is_go_away() && h2.is_remote() {
                return Some(Refused::Connection);
            }
            return (h2.reason() == Some(h2::Reason::REFUSED_STREAM)).then_some(Refused::Stream);
        }
        source = cause.source();
    }
    None
}

/// What it takes to send a request again: a copy of its head, and its body as the
/// connection hands it back (see `Returnable`).
struct Replay {
    method: http::Method,
    uri: http::Uri,
    headers: HeaderMap,
    handed_back: oneshot::Receiver<Replayed>,
}

impl Replay {
    /// Copies the head, and has the body hand itself back here when it is dropped.
    fn keep(mut request: Request<Returnable>) -> (Request<Returnable>, Replay) {
        let (sender, handed_back) = oneshot::channel();
        request.body_mut().handed_back = Some(sender);
        let replay = Replay {
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
            handed_back,
        };
        (request, replay)
    }

    /// The request again, if its body could be kept. The connection may report the refusal
    /// a moment before it drops the body: wait for that moment, not longer.
    async fn request(self) -> Option<Request<Returnable>> {
        let handed_back = tokio::time::timeout(HAND_BACK_WAIT, self.handed_back).await;
        let Ok(Ok(Replayed { read, rest })) = handed_back else {
            return None;
        };
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method;
        parts.uri = self.uri;
        parts.version = http::Version::HTTP_2;
        parts.headers = self.headers;
        let mut body = Returnable::new_from(rest);
        body.unread = read;
        Some(Request::from_parts(parts, body))
    }
}

/// A body as it was when the connection let go of it: what had been read, then the rest.
struct Replayed {
    read: VecDeque<Frame<Bytes>>,
    rest: Option<UpstreamBody>,
}

/// The body of an HTTP/2 request. It keeps the frames it has yielded (by reference, up to
/// `REPLAY_LIMIT` bytes), and when the connection drops it, it hands them back with the rest
/// of the body, so a refused request can be sent again.
pub(super) struct Returnable {
    /// Frames yielded so far, while they fit the limit.
    read: VecDeque<Frame<Bytes>>,
    /// Frames to yield before `rest` (a replay's).
    unread: VecDeque<Frame<Bytes>>,
    rest: Option<UpstreamBody>,
    /// Bytes in `read`; `usize::MAX` once over the limit (no replay).
    kept: usize,
    handed_back: Option<oneshot::Sender<Replayed>>,
}

impl Returnable {
    fn new(body: UpstreamBody) -> Returnable {
        Returnable::new_from(Some(body))
    }

    fn new_from(rest: Option<UpstreamBody>) -> Returnable {
        Returnable {
            read: VecDeque::new(),
            unread: VecDeque::new(),
            rest,
            kept: 0,
            handed_back: None,
        }
    }

    fn keep(&mut self, frame: &Frame<Bytes>) {
        if self.kept == usize::MAX {
            return;
        }
        // The exchange has its answer (a stream going on after it): no replay will be asked.
        if self
            .handed_back
            .as_ref()
            .map_or(true, oneshot::Sender::is_closed)
        {
            self.kept = usize::MAX;
            self.read = VecDeque::new();
            return;
        }
        let size = frame.data_ref().map_or(0, Bytes::len);
        if self.kept + size > REPLAY_LIMIT {
            self.kept = usize::MAX;
            self.read = VecDeque::new();
            return;
        }
        self.kept += size;
        let copy = match (frame.data_ref(), frame.trailers_ref()) {
            (Some(data), _) => Frame::data(data.clone()),
            (None, Some(trailers)) => Frame::trailers(trailers.clone()),
            (None, None) => return,
        };
        self.read.push_back(copy);
    }
}

impl Body for Returnable {
    type Data = Bytes;
    type Error = <UpstreamBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = match this.unread.pop_front() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None => match this.rest.as_mut() {
                Some(rest) => Pin::new(rest).poll_frame(cx),
                None => Poll::Ready(None),
            },
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            this.keep(frame);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.unread.is_empty() && self.rest.as_ref().map_or(true, Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let unread: u64 = self
            .unread
            .iter()
            .filter_map(Frame::data_ref)
            .map(|data| data.len() as u64)
            .sum();
        let mut hint = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        // The upper bound first: `set_lower` asserts it stays at or below the upper.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + unread);
        }
        hint.set_lower(hint.lower() + unread);
        hint
    }
}

impl Drop for Returnable {
    fn drop(&mut self) {
        let Some(handed_back) = self.handed_back.take() else {
            return;
        };
        // Nobody waits once the exchange has its answer.
        if self.kept == usize::MAX || handed_back.is_closed() {
            return;
        }
        let mut read = std::mem::take(&mut self.read);
        read.extend(std::mem::take(&mut self.unread));
        let replayed = Replayed {
            read,
            rest: self.rest.take(),
        };
        let _ = handed_back.send(replayed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Either, Full};

    /// A body replayed after its first send read all of it: the frames kept, then nothing.
    fn replayed(body: &'static [u8]) -> Returnable {
        let mut first = Returnable::new(Either::Right(Full::new(Bytes::from_static(body))));
        let (sender, receiver) = oneshot::channel();
        first.handed_back = Some(sender);
        let mut receiver = receiver;
        let frame = block_on(first.frame()).and_then(|frame| frame.ok()?.into_data().ok());
        assert_eq!(frame.as_deref(), Some(body));
        drop(first);
        let Ok(Replayed { read, rest }) = receiver.try_recv() else {
            panic!("the body was handed back");
        };
        let mut again = Returnable::new_from(rest);
        again.unread = read;
        again
    }

    #[test]
    fn a_replayed_body_declares_and_yields_what_was_read() {
        let body = replayed(b"{\"input\": 1}");
        let hint = body.size_hint();
        assert_eq!(hint.exact(), Some(12));
        let collected = block_on(body.collect()).expect("body").to_bytes();
        assert_eq!(&collected[..], b"{\"input\": 1}");
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }
}
