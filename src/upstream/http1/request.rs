//! Writing a request to an upstream: its head, then its body, framed by abproxy.

use std::io::{IoSlice, Write as _};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::header::{self, HeaderName, CONTENT_LENGTH, TRAILER, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method};
use http_body::Body as _;
use tokio::io::AsyncWrite;

use crate::upstream::upload::{Upload, UploadError};

/// A request on its way out: the bytes due now (head, chunk framing) and the payload after
/// them, written together; then the rest of a streamed upload, as it arrives.
pub(super) struct Outgoing {
    /// Head or chunk framing due before `data`; its allocation is the connection's, reused.
    framing: Vec<u8>,
    framed: usize,
    data: Bytes,
    upload: Option<Upload>,
    chunked: bool,
    /// A chunk's data went out and its closing line break has not.
    chunk_open: bool,
    /// The trailer fields the request's `Trailer` header declares: only those are sent, as
    /// hyper's client did (RFC 9110 §6.5.1).
    trailers: Vec<HeaderName>,
    wrote_any: bool,
}

/// Why a request could not be written.
pub(super) enum WriteFailure {
    Io(std::io::Error),
    /// The client's upload failed; the request is cut short and the connection unusable.
    Upload(UploadError),
}

/// What the request's body is: bytes in hand, or a client upload still arriving.
pub(super) enum Payload {
    Bytes(Bytes),
    Upload(Upload),
}

impl Outgoing {
    /// Encodes `parts`' head into `buffer` (cleared first), with the body's framing: a
    /// `content-length` when the length is known, chunked otherwise. The client's own framing
    /// headers are dropped; the body decides.
    pub fn new(parts: &Parts, payload: Payload, mut buffer: Vec<u8>) -> Outgoing {
        buffer.clear();
        buffer.extend_from_slice(parts.method.as_str().as_bytes());
        buffer.push(b' ');
        let target = parts
            .uri
            .path_and_query()
            .map_or("/", |target| target.as_str());
        buffer.extend_from_slice(target.as_bytes());
        buffer.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            if name != CONTENT_LENGTH && name != TRANSFER_ENCODING {
                header_line(&mut buffer, name, value);
            }
        }
        let (data, upload, length) = match payload {
            Payload::Bytes(bytes) => {
                let length = bytes.len() as u64;
                // A GET says nothing of a body it does not have; a POST says it is empty.
                let length = (length > 0 || expects_body(&parts.method)).then_some(length);
                (bytes, None, length)
            }
            Payload::Upload(upload) => {
                let length = upload.size_hint().exact();
                (Bytes::new(), Some(upload), length)
            }
        };
        let chunked = upload.is_some() && length.is_none();
        let trailers = if chunked {
            names_listed_in(&parts.headers, &TRAILER)
        } else {
            Vec::new()
        };
        match length {
            Some(length) => {
                let _ = write!(buffer, "content-length: {length}\r\n");
            }
            None if chunked => buffer.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            None => {}
        }
        buffer.extend_from_slice(b"\r\n");
        Outgoing {
            framing: buffer,
            framed: 0,
            data,
            upload,
            chunked,
            chunk_open: false,
            trailers,
            wrote_any: false,
        }
    }

    /// Writes what it can; ready once the whole request is out and flushed.
    pub fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteFailure>> {
        loop {
            let framing = &self.framing[self.framed..];
            if !framing.is_empty() || !self.data.is_empty() {
                let io = Pin::new(&mut *io);
                // One slice when there is one: rustls gathers several into a `Vec` per write.
                let written = ready!(match (framing.is_empty(), self.data.is_empty()) {
                    (false, true) => io.poll_write(cx, framing),
                    (true, false) => io.poll_write(cx, &self.data),
                    _ => {
                        let pieces = [IoSlice::new(framing), IoSlice::new(&self.data)];
                        io.poll_write_vectored(cx, &pieces)
                    }
                })
                .map_err(WriteFailure::Io)?;
                if written == 0 {
                    return Poll::Ready(Err(WriteFailure::Io(
                        std::io::ErrorKind::WriteZero.into(),
                    )));
                }
                self.wrote_any = true;
                let from_framing = written.min(framing.len());
                self.framed += from_framing;
                self.data.advance(written - from_framing);
                continue;
            }
            let Some(upload) = self.upload.as_mut() else {
                return Pin::new(io).poll_flush(cx).map_err(WriteFailure::Io);
            };
            match Pin::new(upload).poll_frame(cx) {
                Poll::Pending => {
                    // What is written reaches the upstream while the client is slow.
                    let _ = Pin::new(io).poll_flush(cx);
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(data) if data.is_empty() => continue,
                        Ok(data) => data,
                        // Trailers come last: they end the body, in place of the empty
                        // trailer section (a request with a length has none to send).
                        Err(frame) => {
                            if let (true, Ok(trailers)) = (self.chunked, frame.into_trailers()) {
                                self.upload = None;
                                self.start_piece();
                                self.framing.extend_from_slice(b"0\r\n");
                                self.encode_trailers(&trailers);
                                self.framing.extend_from_slice(b"\r\n");
                            }
                            continue;
                        }
                    };
                    self.start_piece();
                    if self.chunked {
                        let _ = write!(self.framing, "{:x}\r\n", data.len());
                        self.chunk_open = true;
                    }
                    self.data = data;
                }
                Poll::Ready(None) => {
                    self.upload = None;
                    self.start_piece();
                    if self.chunked {
                        self.framing.extend_from_slice(b"0\r\n\r\n");
                    }
                }
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(WriteFailure::Upload(err))),
            }
        }
    }

    fn encode_trailers(&mut self, trailers: &HeaderMap) {
        for (name, value) in trailers {
            if self.trailers.contains(name) && may_trail(name) {
                header_line(&mut self.framing, name, value);
            }
        }
    }

    /// Clears the framing for the next piece, opening it with the line break that closes the
    /// last chunk.
    fn start_piece(&mut self) {
        self.framing.clear();
        self.framed = 0;
        if std::mem::take(&mut self.chunk_open) {
            self.framing.extend_from_slice(b"\r\n");
        }
    }

    /// Whether the upload is still to be sent (the upstream answered before it was).
    pub fn is_finished(&self) -> bool {
        self.upload.is_none() && self.framed == self.framing.len() && self.data.is_empty()
    }

    /// The body, untouched, when nothing was written; and the head buffer back for reuse.
    pub fn into_parts(self) -> (Option<Payload>, Vec<u8>) {
        let payload = match (self.wrote_any, self.upload) {
            (true, _) => None,
            (false, Some(upload)) => Some(Payload::Upload(upload)),
            (false, None) => Some(Payload::Bytes(self.data)),
        };
        (payload, self.framing)
    }
}

/// The field names that the lines of `field` (`Trailer`, `Connection`) list, comma-separated.
pub(crate) fn names_listed_in(headers: &HeaderMap, field: &HeaderName) -> Vec<HeaderName> {
    headers
        .get_all(field)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|names| names.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

fn header_line(buffer: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    buffer.extend_from_slice(name.as_str().as_bytes());
    buffer.extend_from_slice(b": ");
    buffer.extend_from_slice(value.as_bytes());
    buffer.extend_from_slice(b"\r\n");
}

/// Fields that framing, routing or authentication depend on may not come as trailers
/// (RFC 9110 §6.5.1; the list hyper's client applies).
fn may_trail(name: &HeaderName) -> bool {
    ![
        header::AUTHORIZATION,
        header::CACHE_CONTROL,
        header::CONTENT_ENCODING,
        header::CONTENT_LENGTH,
        header::CONTENT_RANGE,
        header::CONTENT_TYPE,
        header::HOST,
        header::MAX_FORWARDS,
        header::SET_COOKIE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::TE,
    ]
    .contains(name)
}

/// Methods whose requests carry a body by definition, so that an empty one is declared.
fn expects_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn head(request: Request<()>, body: &'static [u8]) -> String {
        let (parts, ()) = request.into_parts();
        let outgoing = Outgoing::new(&parts, Payload::Bytes(Bytes::from_static(body)), Vec::new());
        String::from_utf8(outgoing.framing).expect("ascii")
    }

    #[test]
    fn a_request_head_is_origin_form_with_the_body_length() {
        let request = Request::post("/v1/models/m:predict?x=1")
            .header("host", "model:8501")
            .header("content-length", "999")
            .header("transfer-encoding", "chunked")
            .body(())
            .expect("request");
        assert_eq!(
            head(request, b"{}"),
            "POST /v1/models/m:predict?x=1 HTTP/1.1\r\nhost: model:8501\r\ncontent-length: 2\r\n\r\n"
        );
    }

    #[test]
    fn an_empty_get_declares_no_body_and_an_empty_post_declares_zero() {
        let get = Request::get("/health").body(()).expect("request");
        assert_eq!(head(get, b""), "GET /health HTTP/1.1\r\n\r\n");
        let post = Request::post("/predict").body(()).expect("request");
        assert_eq!(
            head(post, b""),
            "POST /predict HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn repeated_header_lines_are_kept_in_order() {
        let request = Request::get("/")
            .header("x-tag", "a")
            .header("x-tag", "b")
            .body(())
            .expect("request");
        assert_eq!(
            head(request, b""),
            "GET / HTTP/1.1\r\nx-tag: a\r\nx-tag: b\r\n\r\n"
        );
    }
}
