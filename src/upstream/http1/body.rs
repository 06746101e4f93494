//! A response body read off its connection as the client's side asks for it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::request::{Outgoing, WriteFailure};
use super::response::{Framing, Piece};
use super::{Connection, Pool};
use crate::upstream::{BodyError, SendError, UpstreamError, UpstreamErrorKind};
use crate::wire::Fields;

/// Dropped before its end, it closes the connection: the rest of the body is still on it.
pub struct Body {
    connection: Option<Box<Connection>>,
    framing: Framing,
    keep_alive: bool,
    /// The rest of a request the upstream began to answer before it was all written.
    sending: Option<Box<Outgoing>>,
    pool: Arc<Pool>,
    /// The answer's fields, when they pass through as they came rather than in its map.
    fields: Option<Fields>,
}

impl Body {
    pub(super) fn new(
        connection: Box<Connection>,
        fields: Option<Fields>,
        framing: Framing,
        keep_alive: bool,
        sending: Option<Box<Outgoing>>,
        pool: &Arc<Pool>,
    ) -> Body {
        let mut body = Body {
            connection: Some(connection),
            framing,
            keep_alive,
            sending,
            pool: pool.clone(),
            fields,
        };
        body.finish_if_done();
        body
    }

    pub(crate) fn fields(&self) -> Option<&Fields> {
        self.fields.as_ref()
    }

    pub(crate) fn take_fields(&mut self) -> Option<Fields> {
        self.fields.take()
    }

    /// Once the body is read, the connection serves the next request if it can: not if
    /// the request is still going out, nor if the upstream sent more than it framed.
    fn finish_if_done(&mut self) {
        if !self.framing.is_done() {
            return;
        }
        if let Some(connection) = self.connection.take() {
            if self.keep_alive && self.sending.is_none() && connection.read.is_empty() {
                self.pool.put(connection);
            }
        }
        self.sending = None;
    }

    /// Sends more of the request the upstream is already answering.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), BodyError> {
        let (Some(outgoing), Some(connection)) = (self.sending.as_mut(), self.connection.as_mut())
        else {
            return Ok(());
        };
        match Pin::new(&mut **outgoing).poll_write(&mut connection.io, cx) {
            Poll::Pending => Ok(()),
            Poll::Ready(Ok(())) => {
                if let Some(outgoing) = self.sending.take() {
                    connection.head = outgoing.into_parts().1;
                }
                Ok(())
            }
            // The upstream stopped reading: its answer stands, its connection does not.
            Poll::Ready(Err(WriteFailure::Io(_))) => {
                self.sending = None;
                self.keep_alive = false;
                Ok(())
            }
            Poll::Ready(Err(WriteFailure::Body(err))) => {
                self.sending = None;
                self.connection = None;
                Err(BodyError::Client(SendError::client(&err).to_string()))
            }
            Poll::Ready(Err(WriteFailure::Length)) => {
                self.sending = None;
                self.connection = None;
                Err(BodyError::Client(super::LENGTH_MISMATCH.into()))
            }
        }
    }

    /// Takes the next piece the connection holds, reading it if need be.
    fn poll_piece(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Piece, UpstreamError>>> {
        let Some(connection) = self.connection.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            match self.framing.decode(&mut connection.read) {
                Ok(Some(piece)) => {
                    // A chunked body's end may be read with its last data: say so now.
                    self.framing.settle(&mut connection.read);
                    return Poll::Ready(Some(Ok(piece)));
                }
                Ok(None) if self.framing.is_done() => return Poll::Ready(None),
                Ok(None) => {}
                Err(err) => {
                    self.connection = None;
                    return Poll::Ready(Some(Err(err)));
                }
            }
            match ready!(connection.poll_fill(cx)) {
                Ok(0) if self.framing == Framing::UntilClose => {
                    self.framing = Framing::Empty;
                    self.connection = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.connection = None;
                    return Poll::Ready(Some(Err(UpstreamError {
                        kind: UpstreamErrorKind::Reset,
                        detail: "the upstream closed the connection mid-body".into(),
                    })));
                }
                Ok(_) => {}
                Err(err) => {
                    self.connection = None;
                    return Poll::Ready(Some(Err(err)));
                }
            }
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Err(err) = this.poll_send(cx) {
            return Poll::Ready(Some(Err(err)));
        }
        let piece = ready!(this.poll_piece(cx));
        // The end noticed with the last piece, so that `is_end_stream` says so at once.
        this.finish_if_done();
        Poll::Ready(piece.map(|piece| match piece {
            Ok(Piece::Data(data)) => Ok(Frame::data(data)),
            Ok(Piece::Trailers(trailers)) => Ok(Frame::trailers(trailers)),
            Err(err) => Err(BodyError::Upstream(err)),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing.remaining() {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("framing", &self.framing)
            .finish()
    }
}
