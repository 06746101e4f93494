//! HTTP/2 to an upstream: every request in flight shares a few long-lived connections
//! (`h2_connections`), where HTTP/1.1 needs a connection per request.
//!
//! Each connection has a slot; requests take the slots in turn. A slot whose connection
//! closed (GOAWAY, a dead peer found by the keep-alive ping, an I/O error) is dialled again
//! by the first request that finds it so, while the others wait for that one dial rather
//! than opening connections of their own.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;

use super::{SendError, UpstreamBody, UpstreamError};

/// The body type of an HTTP/2 request: the h2 client wants an `Unpin` body.
pub(super) type Http2Body = Pin<Box<UpstreamBody>>;

pub(super) struct Multiplexed {
    slots: Box<[Slot]>,
    next: AtomicUsize,
}

#[derive(Default)]
struct Slot {
    connection: Mutex<Option<SendRequest<Http2Body>>>,
    /// Held while the slot's connection is dialled, so that one request dials and the rest
    /// wait for it.
    dialling: tokio::sync::Mutex<()>,
}

impl Multiplexed {
    pub(super) fn new(connections: usize) -> Multiplexed {
        Multiplexed {
            slots: (0..connections.max(1)).map(|_| Slot::default()).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// A live connection of the next slot, dialled with `dial` if it has none.
    pub(super) async fn connection<F, Fut>(
        &self,
        dial: F,
    ) -> Result<SendRequest<Http2Body>, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<SendRequest<Http2Body>, UpstreamError>>,
    {
        let slot = &self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        if let Some(connection) = slot.live() {
            return Ok(connection);
        }
        let _dialling = slot.dialling.lock().await;
        // Another request may have dialled while this one waited.
        if let Some(connection) = slot.live() {
            return Ok(connection);
        }
        let connection = dial().await?;
        *slot.lock() = Some(connection.clone());
        Ok(connection)
    }

    /// Sends `request` on a live connection; one refused before the upstream processed it
    /// (the connection was closing, or a GOAWAY left its stream unprocessed) is sent once
    /// more on a fresh connection, when its body can be sent again.
    pub(super) async fn send<F, Fut>(
        &self,
        request: Request<UpstreamBody>,
        dial: F,
    ) -> Result<Response<Incoming>, SendError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<SendRequest<Http2Body>, UpstreamError>>,
    {
        let replay = Replay::of(&request);
        let mut connection = match self.connection(&dial).await {
            Ok(connection) => connection,
            Err(err) => return Err(SendError::not_sent(err, request)),
        };
        let mut failed = match connection.try_send_request(request.map(Box::pin)).await {
            Ok(response) => return Ok(response),
            Err(failed) => failed,
        };
        let unprocessed = failed.error().is_canceled() || refused_unprocessed(failed.error());
        let request = match (failed.take_message(), replay) {
            // Never handed to the connection: nothing of it was sent.
            (Some(request), _) => request,
            (None, Some(replay)) if unprocessed => replay.request().map(Box::pin),
            (None, _) => return Err(SendError::from_hyper(failed.error())),
        };
        // A second dial that fails is an error: the body is pinned by now, not to be given back.
        let mut connection = self.connection(&dial).await?;
        connection
            .send_request(request)
            .await
            .map_err(|err| SendError::from_hyper(&err))
    }
}

impl Slot {
    fn live(&self) -> Option<SendRequest<Http2Body>> {
        let mut connection = self.lock();
        match connection.as_ref() {
            Some(live) if !live.is_closed() => Some(live.clone()),
            Some(_) => {
                *connection = None;
                None
            }
            None => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<SendRequest<Http2Body>>> {
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether the upstream refused a stream without processing it: one above the last stream
/// a GOAWAY accepted, or one reset with `REFUSED_STREAM` (RFC 9113 §8.7).
fn refused_unprocessed(err: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = cause.source();
    }
    false
}

/// A copy of a request whose body is in memory, to send again if its first stream was
/// refused unprocessed. A streamed upload cannot be sent twice and has none.
struct Replay {
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: UpstreamBody,
}

impl Replay {
    fn of(request: &Request<UpstreamBody>) -> Option<Replay> {
        let http_body_util::Either::Right(full) = request.body() else {
            return None;
        };
        Some(Replay {
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
            body: http_body_util::Either::Right(full.clone()),
        })
    }

    fn request(self) -> Request<UpstreamBody> {
        let (mut parts, _) = Request::new(()).into_parts();
        parts.method = self.method;
        parts.uri = self.uri;
        parts.headers = self.headers;
        Request::from_parts(parts, self.body)
    }
}
