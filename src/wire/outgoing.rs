//! Writing a message: its head, then its body as the body yields it, framed by abproxy.

use std::io::{IoSlice, Write as _};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::header::HeaderName;
use http::HeaderMap;
use http_body::{Body, Frame};
use tokio::io::AsyncWrite;

use super::{header_line, may_trail};

/// How the body is delimited on the wire.
pub(crate) enum Encoding {
    /// By `content-length`: this many bytes are still due.
    Length(u64),
    /// In chunks, followed by those of the body's trailers that were declared (in `Trailer`,
    /// RFC 9110 §6.5.1) and may trail.
    Chunked { trailers: Vec<HeaderName> },
}

pin_project_lite::pin_project! {
    /// A message on its way out: the bytes due now (head, chunk framing) and the data after
    /// them, written together; then the rest of its body, as it arrives.
    pub(crate) struct Outgoing<B> {
        framer: Framer,
        // Polled in place: an answer's body holds its timer inline.
        #[pin]
        body: Option<B>,
    }
}

struct Framer {
    /// Head or chunk framing due before `data`; its allocation is the connection's, reused.
    framing: Vec<u8>,
    framed: usize,
    data: Bytes,
    encoding: Encoding,
    /// A chunk's data went out and its closing line break has not.
    chunk_open: bool,
    /// The body has ended; the last chunk follows once the data in hand is written.
    ending: bool,
    /// Take the body's first data before writing the head, so that both go out in one write.
    hold_head: bool,
    wrote_any: bool,
}

/// Why a message could not be written.
#[derive(Debug)]
pub(crate) enum WriteFailure<E> {
    Io(std::io::Error),
    /// The body failed; the message is cut short and the connection unusable.
    Body(E),
    /// The body was longer or shorter than its `content-length`.
    Length,
}

impl<B> Outgoing<B>
where
    B: Body<Data = Bytes>,
{
    /// A message whose `head` (in a buffer the caller may have back) is followed by `data`
    /// and then `body`'s frames; `encoding` counts `data` too.
    pub fn new(head: Vec<u8>, data: Bytes, body: Option<B>, encoding: Encoding) -> Outgoing<B> {
        let encoding = match encoding {
            Encoding::Length(length) => Encoding::Length(length.saturating_sub(data.len() as u64)),
            chunked => chunked,
        };
        Outgoing {
            framer: Framer {
                framing: head,
                framed: 0,
                data,
                encoding,
                chunk_open: false,
                ending: false,
                hold_head: false,
                wrote_any: false,
            },
            body,
        }
    }

    /// Holds the head back until the body's first data is in hand (or the body waits), to
    /// write both at once.
    pub fn hold_head_for_data(&mut self) {
        self.framer.hold_head = true;
    }

    /// Writes what it can; ready once the whole message is out and flushed.
    pub fn poll_write<W: AsyncWrite + Unpin>(
        self: Pin<&mut Self>,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteFailure<B::Error>>> {
        let mut this = self.project();
        let framer = &mut *this.framer;
        let mut body_waits = false;
        loop {
            let framing_written = framer.framed == framer.framing.len();
            let gather = framer.data.is_empty() && (framing_written || framer.hold_head);
            if let (false, true, Some(body)) = (body_waits, gather, this.body.as_mut().as_pin_mut())
            {
                let ended = match body.poll_frame(cx) {
                    Poll::Pending => {
                        body_waits = true;
                        false
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        let ends = this
                            .body
                            .as_ref()
                            .as_pin_ref()
                            .is_some_and(|body| body.is_end_stream());
                        framer
                            .take(frame, ends)
                            .map_err(|()| WriteFailure::Length)?
                    }
                    Poll::Ready(None) => {
                        framer.end().map_err(|()| WriteFailure::Length)?;
                        true
                    }
                    Poll::Ready(Some(Err(err))) => {
                        return Poll::Ready(Err(WriteFailure::Body(err)))
                    }
                };
                if ended {
                    this.body.set(None);
                }
                if !body_waits {
                    continue;
                }
            }
            let framing = &framer.framing[framer.framed..];
            if !framing.is_empty() || !framer.data.is_empty() {
                let io = Pin::new(&mut *io);
                // One slice when there is one: rustls gathers several into a `Vec` per write.
                let written = ready!(match (framing.is_empty(), framer.data.is_empty()) {
                    (false, true) => io.poll_write(cx, framing),
                    (true, false) => io.poll_write(cx, &framer.data),
                    _ => {
                        let pieces = [IoSlice::new(framing), IoSlice::new(&framer.data)];
                        io.poll_write_vectored(cx, &pieces)
                    }
                })
                .map_err(WriteFailure::Io)?;
                if written == 0 {
                    return Poll::Ready(Err(WriteFailure::Io(
                        std::io::ErrorKind::WriteZero.into(),
                    )));
                }
                framer.wrote_any = true;
                let from_framing = written.min(framing.len());
                framer.framed += from_framing;
                framer.data.advance(written - from_framing);
                continue;
            }
            if std::mem::take(&mut framer.ending) {
                framer.end().map_err(|()| WriteFailure::Length)?;
                continue;
            }
            if this.body.is_some() {
                // What is written reaches the peer while the body is slow.
                let _ = Pin::new(io).poll_flush(cx);
                return Poll::Pending;
            }
            return Pin::new(io).poll_flush(cx).map_err(WriteFailure::Io);
        }
    }

    /// Whether the body is still to be sent (the peer answered before it was).
    pub fn is_finished(&self) -> bool {
        let framer = &self.framer;
        self.body.is_none() && framer.framed == framer.framing.len() && framer.data.is_empty()
    }

    /// The head's buffer back for reuse, once the message is done with.
    pub fn take_buffer(self: Pin<&mut Self>) -> Vec<u8> {
        std::mem::take(&mut self.project().framer.framing)
    }

    /// The data and body, untouched, when nothing was written; and the head's buffer back
    /// for reuse.
    pub fn into_parts(self) -> (Option<(Bytes, Option<B>)>, Vec<u8>) {
        let Framer {
            framing,
            data,
            wrote_any,
            ..
        } = self.framer;
        ((!wrote_any).then_some((data, self.body)), framing)
    }
}

impl Framer {
    /// Frames one of the body's frames; whether it was the body's last (`ends`: the body
    /// says it has ended), which ends the message.
    fn take(&mut self, frame: Frame<Bytes>, ends: bool) -> Result<bool, ()> {
        let data = match frame.into_data() {
            Ok(data) => data,
            // Trailers come last: they end the body, in place of the empty trailer section
            // (a body with a length has none to send).
            Err(frame) => {
                if let (Encoding::Chunked { .. }, Ok(trailers)) =
                    (&self.encoding, frame.into_trailers())
                {
                    self.start_piece();
                    self.framing.extend_from_slice(b"0\r\n");
                    self.encode_trailers(&trailers);
                    self.framing.extend_from_slice(b"\r\n");
                    return Ok(true);
                }
                self.end()?;
                return Ok(true);
            }
        };
        if !data.is_empty() {
            match &mut self.encoding {
                Encoding::Length(due) => {
                    *due = due.checked_sub(data.len() as u64).ok_or(())?;
                }
                Encoding::Chunked { .. } => {
                    self.start_piece();
                    let _ = write!(self.framing, "{:x}\r\n", data.len());
                    self.chunk_open = true;
                }
            }
            self.data = data;
        }
        // Once the declared length is out, or the body says it has ended, it is not polled
        // again (its end may come only in a later, empty frame). The last chunk follows the
        // data in hand.
        if ends || matches!(self.encoding, Encoding::Length(0)) {
            if self.data.is_empty() {
                self.end()?;
            } else {
                self.ending = true;
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// The body ended: so does the message, with the chunked encoding's last chunk.
    fn end(&mut self) -> Result<(), ()> {
        match self.encoding {
            Encoding::Length(0) => Ok(()),
            Encoding::Length(_) => Err(()),
            Encoding::Chunked { .. } => {
                self.start_piece();
                self.framing.extend_from_slice(b"0\r\n\r\n");
                Ok(())
            }
        }
    }

    fn encode_trailers(&mut self, trailers: &HeaderMap) {
        let Encoding::Chunked { trailers: declared } = &self.encoding else {
            return;
        };
        for (name, value) in trailers {
            if declared.contains(name) && may_trail(name) {
                header_line(
                    &mut self.framing,
                    name.as_str().as_bytes(),
                    value.as_bytes(),
                );
            }
        }
    }

    /// Readies the framing for the next piece, opening it with the line break that closes
    /// the last chunk; framing not yet written (a head held for data) stays ahead of it.
    fn start_piece(&mut self) {
        if self.framed == self.framing.len() {
            self.framing.clear();
            self.framed = 0;
        }
        if std::mem::take(&mut self.chunk_open) {
            self.framing.extend_from_slice(b"\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::convert::Infallible;

    /// A body of the given frames, each ready at once, that says it has ended as soon as
    /// its last frame is taken.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    fn data(pieces: &[&'static str]) -> Frames {
        Frames(
            pieces
                .iter()
                .map(|piece| Frame::data(Bytes::from_static(piece.as_bytes())))
                .collect(),
        )
    }

    async fn written(
        encoding: Encoding,
        body: Frames,
    ) -> (String, Result<(), WriteFailure<Infallible>>) {
        let mut outgoing =
            Outgoing::new(b"HEAD\r\n\r\n".to_vec(), Bytes::new(), Some(body), encoding);
        outgoing.hold_head_for_data();
        let mut wire = Vec::new();
        let result =
            std::future::poll_fn(|cx| Pin::new(&mut outgoing).poll_write(&mut wire, cx)).await;
        (String::from_utf8(wire).expect("ascii"), result)
    }

    #[tokio::test]
    async fn a_body_of_its_declared_length_follows_the_head() {
        let (wire, result) = written(Encoding::Length(5), data(&["he", "llo"])).await;
        assert!(result.is_ok());
        assert_eq!(wire, "HEAD\r\n\r\nhello");
    }

    #[tokio::test]
    async fn a_chunked_body_whose_last_data_ends_it_is_closed_after_that_data() {
        let (wire, result) = written(
            Encoding::Chunked {
                trailers: Vec::new(),
            },
            data(&["he", "llo"]),
        )
        .await;
        assert!(result.is_ok());
        assert_eq!(wire, "HEAD\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n");
    }

    #[tokio::test]
    async fn a_body_longer_or_shorter_than_declared_fails() {
        let (_, longer) = written(Encoding::Length(3), data(&["hello"])).await;
        assert!(matches!(longer, Err(WriteFailure::Length)));
        let (_, shorter) = written(Encoding::Length(9), data(&["hello"])).await;
        assert!(matches!(shorter, Err(WriteFailure::Length)));
    }

    #[tokio::test]
    async fn a_chunked_body_ends_with_its_declared_trailers_only() {
        let mut body = data(&["hello", "", "!"]);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "42".parse().expect("value"));
        trailers.insert("x-undeclared", "1".parse().expect("value"));
        trailers.insert("content-length", "6".parse().expect("value"));
        body.0.push_back(Frame::trailers(trailers));
        let declared = vec![
            HeaderName::from_static("x-checksum"),
            HeaderName::from_static("content-length"),
        ];
        let (wire, result) = written(Encoding::Chunked { trailers: declared }, body).await;
        assert!(result.is_ok());
        assert_eq!(
            wire,
            "HEAD\r\n\r\n5\r\nhello\r\n1\r\n!\r\n0\r\nx-checksum: 42\r\n\r\n"
        );
    }
}
