//! HTTP/1.1 to clients, served on the connection's own task.
//!
//! hyper's server parses into a buffer of 8 KiB and writes from another (two per connection,
//! with no setting to shrink them), hands each request to a dispatcher, and moves the
//! request's future into a slot of its own. Here the connection reads a request's head, and
//! a body that came with it, into a buffer that starts at 1 KiB; runs the request's future
//! in place, watching for the client to hang up; and writes the answer's head and its first
//! data in one write, the rest as the body yields it.
//!
//! Requests of any other shape (a body still on its way, `Expect: 100-continue`, an upgrade,
//! CONNECT, HTTP/1.0, a head over 64 KiB or that does not parse) hand the connection, and
//! what was read of it, to hyper for the rest of its life: it streams, upgrades and refuses
//! as before.

mod request;
mod response;
mod rewind;

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;

use super::listener::Finish;
use super::{Answer, Peer, Proxy, ResponseBody};
use crate::alarm::Alarm;
use crate::clock;
use crate::wire::{self, Encoding, Outgoing, WriteFailure};
use request::{Head, Parsed};
use response::Asked;
pub(super) use rewind::Rewind;

/// A new connection's read buffer: most request heads fit (nginx starts at 1 KiB too).
const FIRST_READ: usize = 1024;
/// Heads longer than this go to hyper, which takes up to ~400 KiB before its 431.
const LONGEST_HEAD: usize = 64 * 1024;
/// A read buffer grown past this for one large request is let go once the request is done.
const KEPT_READ: usize = 16 * 1024;
/// Likewise the buffer answers' heads are encoded in.
const KEPT_HEAD: usize = 4 * 1024;

/// How a connection's time here ended.
pub(super) enum Served<S> {
    Closed,
    /// A request of a shape served by hyper arrived: hyper serves the connection from
    /// here on, beginning with the bytes already read.
    HandOff(Rewind<S>),
}

/// Serves requests on `io` until the client closes, the header timeout passes between
/// requests, `finish` asks (after the request in flight), or a request calls for hyper.
pub(super) async fn serve<S>(
    io: S,
    proxy: &Proxy,
    peer: &Peer,
    finish: &mut Finish,
    header_timeout: Duration,
) -> Served<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut connection = Connection {
        io,
        read: BytesMut::new(),
        read_size: FIRST_READ,
        head: Vec::new(),
        headers: None,
    };
    // The header timeout's one timer for the connection's life.
    let mut alarm = Alarm::default();
    loop {
        let deadline = Instant::from_std(clock::coarse_now()) + header_timeout;
        // No step's values are bound past it, so that what each holds (the request, its
        // 3.5 KB future, the answer) shares its room in this future with the next step's.
        let (request, lines, asked) =
            match connection.next_request(&mut alarm, deadline, finish).await {
                Next::Request(Parsed {
                    request,
                    lines,
                    keep_alive,
                    trailers,
                }) => {
                    let asked = Asked {
                        head: request.method() == Method::HEAD,
                        keep_alive,
                        trailers,
                    };
                    (request, lines, asked)
                }
                Next::Closed => return Served::Closed,
                Next::Other => {
                    let read = connection.read.freeze();
                    return Served::HandOff(Rewind::new(connection.io, read));
                }
            };
        let Some(answer) = ({
            // Made in its pinned place: moved, the 3.5 KB future would be copied.
            let handling = proxy.handle(request, lines, peer);
            tokio::pin!(handling);
            poll_fn(|cx| connection.poll_answer(handling.as_mut(), cx)).await
        }) else {
            tracing::debug!("client closed its connection before its answer");
            return Served::Closed;
        };
        let (delivered, keep_alive) = {
            let (outgoing, keep_alive) = connection.outgoing(answer, asked, finish);
            tokio::pin!(outgoing);
            let delivered = poll_fn(|cx| connection.poll_deliver(outgoing.as_mut(), cx)).await;
            connection.head = outgoing.take_buffer();
            (delivered, keep_alive && !finish.asked())
        };
        match delivered.map(|()| keep_alive) {
            Ok(true) => connection.trim(),
            Ok(false) => {
                let _ = connection.io.shutdown().await;
                return Served::Closed;
            }
            Err(err) => {
                tracing::debug!(error = %err, "answer not delivered");
                return Served::Closed;
            }
        }
    }
}

struct Connection<S> {
    io: S,
    /// What the client sent that is not yet a request: empty between requests, unless it
    /// pipelines.
    read: BytesMut,
    /// How much to make room for before a read; doubled while reads fill it.
    read_size: usize,
    /// The last answer's head, kept for its allocation.
    head: Vec<u8>,
    /// The last answer's header map, emptied, for the next request's.
    headers: Option<HeaderMap>,
}

// Returned once per request and matched at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(Parsed),
    Closed,
    Other,
}

/// What one read brought.
enum Read {
    More,
    Closed,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Reads until the buffer holds a whole request, within the header timeout. An idle
    /// connection closes when `finish` asks.
    async fn next_request(
        &mut self,
        alarm: &mut Alarm,
        deadline: Instant,
        finish: &mut Finish,
    ) -> Next {
        loop {
            if !self.read.is_empty() {
                match request::parse(&mut self.read, &mut self.headers) {
                    Head::Request(parsed) => return Next::Request(parsed),
                    // hyper, asked to finish as it starts, would close before this request.
                    Head::Other | Head::Incomplete(_) if finish.asked() => return Next::Closed,
                    Head::Other => return Next::Other,
                    Head::Partial if self.read.len() >= LONGEST_HEAD => return Next::Other,
                    Head::Partial => {}
                    // A body that is on its way, rather than here already, streams through
                    // hyper; one that a read can finish is read here.
                    Head::Incomplete(length) if length > LONGEST_HEAD => return Next::Other,
                    Head::Incomplete(length) => {
                        self.read.reserve(length - self.read.len());
                        match poll_fn(|cx| Poll::Ready(self.poll_read(cx))).await {
                            Poll::Ready(Read::More) => continue,
                            Poll::Ready(Read::Closed) => return Next::Closed,
                            Poll::Pending => return Next::Other,
                        }
                    }
                }
            }
            let read = poll_fn(|cx| {
                let read = self.poll_read(cx);
                if read.is_ready() {
                    return read;
                }
                // Only a connection that waits looks at `finish` (a request that came is
                // served, and the connection closes after it): one look a request, not two.
                if self.read.is_empty() && Pin::new(&mut *finish).poll(cx).is_ready() {
                    return Poll::Ready(Read::Closed);
                }
                alarm.poll_passed(cx, deadline).map(|()| {
                    tracing::debug!("no whole request within the header timeout; closing");
                    Read::Closed
                })
            })
            .await;
            if let Read::Closed = read {
                return Next::Closed;
            }
        }
    }

    /// Reads more of a request into the buffer.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Read> {
        let filled = wire::poll_fill(
            &mut self.io,
            cx,
            &mut self.read,
            &mut self.read_size,
            LONGEST_HEAD,
        );
        match ready!(filled) {
            Ok(0) => Poll::Ready(Read::Closed),
            Ok(_) => Poll::Ready(Read::More),
            Err(err) => {
                tracing::debug!(error = %err, "client connection failed");
                Poll::Ready(Read::Closed)
            }
        }
    }

    /// Polls the request's future for its answer; `None` if the client hangs up first (the
    /// future, dropped, counts the request as the client's 499).
    fn poll_answer<F>(
        &mut self,
        handling: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Answer>>
    where
        F: Future<Output = Answer>,
    {
        if let Poll::Ready(answer) = handling.poll(cx) {
            return Poll::Ready(Some(answer));
        }
        if self.client_left(cx) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// Whether the client closed its side while its answer is under way. Like hyper, it
    /// stops looking once the client has sent anything more (a pipelined request).
    fn client_left(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        if self.read.capacity() == 0 {
            self.read.reserve(FIRST_READ);
        }
        match poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read) {
            Poll::Ready(Ok(0) | Err(_)) => true,
            Poll::Ready(Ok(_)) | Poll::Pending => false,
        }
    }

    /// Encodes the answer's head; the message to write, and whether the connection may
    /// serve another request after it. A plain function, so that the message is made where
    /// it is written from rather than in a future of its own moved into this one's.
    fn outgoing(
        &mut self,
        answer: Answer,
        asked: Asked,
        finish: &mut Finish,
    ) -> (Outgoing<ResponseBody>, bool) {
        // Rebound and matched in place, never moved: the answer is a few hundred bytes.
        let (response, variant) = answer.into_parts();
        let (mut parts, mut body) = response.into_parts();
        let interim = parts.status.is_informational();
        if interim {
            // No interim answer is ever final; hyper answers a 500 in its place, and closes.
            parts = Response::new(()).into_parts().0;
            parts.status = StatusCode::INTERNAL_SERVER_ERROR;
            body = ResponseBody::full(Bytes::new());
        }
        let asked = Asked {
            keep_alive: asked.keep_alive && !interim && !finish.asked(),
            ..asked
        };
        let mut head = std::mem::take(&mut self.head);
        // The 500 in place of an interim answer is abproxy's, as hyper's path has it.
        let named = variant.get().filter(|_| !interim);
        let framed = response::encode(&parts, &body, named, &asked, &mut head);
        drop((variant, body.take_fields()));
        parts.headers.clear();
        self.headers = Some(parts.headers);
        let mut outgoing = match framed.encoding {
            Some(encoding) => Outgoing::new(head, Bytes::new(), Some(body), encoding),
            None => Outgoing::new(head, Bytes::new(), None, Encoding::Length(0)),
        };
        outgoing.hold_head_for_data();
        (outgoing, framed.keep_alive)
    }

    /// Writes the answer, watching for the client to hang up.
    fn poll_deliver(
        &mut self,
        outgoing: Pin<&mut Outgoing<ResponseBody>>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Undelivered>> {
        match outgoing.poll_write(&mut self.io, cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(WriteFailure::Io(err))) => Poll::Ready(Err(Undelivered::Io(err))),
            Poll::Ready(Err(WriteFailure::Body(err))) => {
                Poll::Ready(Err(Undelivered::Body(err.to_string())))
            }
            Poll::Ready(Err(WriteFailure::Length)) => Poll::Ready(Err(Undelivered::Length)),
            Poll::Pending if self.client_left(cx) => Poll::Ready(Err(Undelivered::ClientLeft)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Lets go of buffers that one large request grew, once it is done.
    fn trim(&mut self) {
        if self.read.is_empty() && self.read.capacity() > KEPT_READ {
            self.read = BytesMut::new();
            self.read_size = FIRST_READ;
        }
        if self.head.capacity() > KEPT_HEAD {
            self.head = Vec::new();
        }
    }
}

/// Why an answer did not reach the client whole.
#[derive(Debug, thiserror::Error)]
enum Undelivered {
    #[error("writing to the client failed: {0}")]
    Io(std::io::Error),
    #[error("{0}")]
    Body(String),
    #[error("the answer's body did not match its content-length")]
    Length,
    #[error("the client closed its connection")]
    ClientLeft,
}
