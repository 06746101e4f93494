//! Reading an upstream's HTTP/1.1 response: its head, then its body as RFC 9112 §6.3 frames it.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRAILER, TRANSFER_ENCODING};
use http::{HeaderMap, Response, StatusCode, Version};

use crate::upstream::{UpstreamError, UpstreamErrorKind};
use crate::wire::{
    content_length, fill, is_named, lists, locate, names_fields, Fields, InvalidField, Span,
};

/// As hyper's client: more header lines than this is no response a model server sends.
const MAX_HEADERS: usize = 100;
/// The longest response head, or trailer section, read before giving up on it.
const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size line (size and extensions) read before giving up on it.
const MAX_CHUNK_LINE: usize = 4096;

/// A response head, and what it says of its body and its connection.
pub(super) struct Head {
    /// With an empty header map when the fields pass through as they came (`fields`).
    pub response: Response<()>,
    pub fields: Option<Fields>,
    pub framing: Framing,
    /// Whether the connection may carry another request once this body is read.
    pub keep_alive: bool,
}

/// Parses a complete response head off the front of `read`, skipping interim (1xx) ones.
/// `None`: more bytes are needed.
/// `spare`: a header map to fill, if the connection kept one.
pub(super) fn parse_head(
    read: &mut BytesMut,
    head_request: bool,
    spare: &mut Option<HeaderMap>,
) -> Result<Option<Head>, UpstreamError> {
    loop {
        // Not zeroed: 3 KiB a response that the parser overwrites anyway.
        let mut lines = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let parsing = httparse::ParserConfig::default();
        let length = match parsing.parse_response_with_uninit_headers(&mut parsed, read, &mut lines)
        {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) if read.len() > MAX_HEAD => {
                return Err(protocol(format!(
                    "response head over {} KiB",
                    MAX_HEAD / 1024
                )))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(err) => return Err(protocol(format!("malformed response head: {err}"))),
        };
        let code = parsed.code.unwrap_or_default();
        let status = StatusCode::from_u16(code)
            .map_err(|_| protocol(format!("invalid status code {code}")))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(protocol(
                "101 Switching Protocols to a request that asked for no upgrade",
            ));
        }
        if status.is_informational() {
            // `100 Continue` and `103 Early Hints` are for a client that waits on them; the
            // body is sent regardless, and the final answer follows.
            read.advance(length);
            continue;
        }
        // A reason phrase of the upstream's own (not the status's standard one) goes back to
        // the client as it came, as hyper's client kept it.
        let reason = parsed
            .reason
            .filter(|reason| Some(*reason) != status.canonical_reason())
            .and_then(|reason| hyper::ext::ReasonPhrase::try_from(reason.as_bytes()).ok());
        let version = match parsed.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let facts = Facts::of(parsed.headers);
        let framing = Framing::of(status, &facts, head_request)?;
        let mut keep_alive = framing.leaves_connection_usable() && facts.keeps_alive(version);
        if facts.chunked.is_some() {
            // Both framings at once, or chunked from an HTTP/1.0 server: the chunking wins
            // but the message is suspect (RFC 9112 §6.1, §6.3), so the length is not passed
            // on and the connection not kept.
            keep_alive &= version == Version::HTTP_11 && facts.length.is_none();
        }
        let (headers, fields) = if facts.pass_through() {
            // The map is left for what abproxy adds.
            let spans = parsed.headers.iter().map(|field| Span::of(read, field));
            let spans = spans.collect();
            let bytes = read.split_to(length).freeze();
            (
                spare.take().unwrap_or_default(),
                Some(Fields::new(bytes, spans)),
            )
        } else {
            // Header values share the head's bytes: no copy of a value, one reference count.
            let mut spans = [Span::default(); MAX_HEADERS];
            let spans = locate(read, parsed.headers, &mut spans);
            let bytes = read.split_to(length).freeze();
            let mut headers = header_map(&bytes, spans, spare.take())?;
            if facts.chunked.is_some() {
                headers.remove(CONTENT_LENGTH);
            }
            (headers, None)
        };
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        if let Some(reason) = reason {
            response.extensions_mut().insert(reason);
        }
        return Ok(Some(Head {
            response,
            fields,
            framing,
            keep_alive,
        }));
    }
}

fn header_map(
    bytes: &Bytes,
    spans: &[Span],
    spare: Option<HeaderMap>,
) -> Result<HeaderMap, UpstreamError> {
    let mut headers = spare.unwrap_or_default();
    // Room for the variant header abproxy adds, so that adding it does not grow the map.
    headers.reserve(spans.len() + 1);
    fill(&mut headers, bytes, spans).map_err(|invalid| match invalid {
        InvalidField::Name => protocol("invalid header name"),
        InvalidField::Value(name) => protocol(format!("invalid value of header {name}")),
    })?;
    Ok(headers)
}

/// What a head's framing and connection fields say, read off the parsed lines in one pass
/// (comparing names as they came, in any case) rather than looked up in the map.
#[derive(Default)]
struct Facts {
    /// Whether the last coding of the last `Transfer-Encoding` line is `chunked`, if there
    /// is one.
    chunked: Option<bool>,
    /// The `Content-Length`, once every line of it agrees; an error for one that does not
    /// parse or differs.
    length: Option<Result<u64, &'static str>>,
    close: bool,
    keep_alive: bool,
    /// A `Connection` line names a field to drop, not just `close` or `keep-alive`.
    names_fields: bool,
    /// A `Trailer` line: the client's side reads the trailer names it declares from the map.
    trailer: bool,
}

impl Facts {
    fn of(lines: &[httparse::Header<'_>]) -> Facts {
        let mut facts = Facts::default();
        for line in lines {
            let name = line.name.as_bytes();
            if is_named(name, &TRANSFER_ENCODING) {
                let last = line.value.rsplit(|&byte| byte == b',').next();
                let chunked =
                    last.is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                facts.chunked = Some(chunked);
            } else if is_named(name, &CONTENT_LENGTH) {
                facts.length = Some(match (facts.length, content_length(line.value)) {
                    (Some(Err(earlier)), _) => Err(earlier),
                    (_, None) => Err("invalid content-length"),
                    (Some(Ok(earlier)), Some(length)) if earlier != length => {
                        Err("conflicting content-length values")
                    }
                    (_, Some(length)) => Ok(length),
                });
            } else if is_named(name, &CONNECTION) {
                facts.close |= lists(line.value, b"close");
                facts.keep_alive |= lists(line.value, b"keep-alive");
                facts.names_fields |= names_fields(line.value);
            } else if is_named(name, &TRAILER) {
                facts.trailer = true;
            }
        }
        facts
    }

    /// Whether the fields can go to the client as they came, less the hop-by-hop ones by
    /// name: as most answers can. Those that need more (a field named in `Connection`, a
    /// `Content-Length` beside chunking, trailers) are read into a map and edited there.
    fn pass_through(&self) -> bool {
        let both_framings = self.chunked.is_some() && self.length.is_some();
        !(self.names_fields || self.trailer || both_framings)
    }

    /// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 closes it unless told
    /// `keep-alive`.
    fn keeps_alive(&self, version: Version) -> bool {
        match version {
            Version::HTTP_11 => !self.close,
            _ => self.keep_alive,
        }
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body: a `HEAD` answer, `204`, `304`.
    Empty,
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection, which then serves no other request.
    UntilClose,
}

/// Where a chunked body's reader stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
    Size,
    Data(u64),
    /// The line break that closes a chunk's data.
    DataEnd,
    Trailers,
    Done,
}

impl Framing {
    fn of(status: StatusCode, facts: &Facts, head_request: bool) -> Result<Framing, UpstreamError> {
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return Ok(Framing::Empty);
        }
        if let Some(chunked) = facts.chunked {
            return Ok(if chunked {
                Framing::Chunked(Chunk::Size)
            } else {
                Framing::UntilClose
            });
        }
        match facts.length {
            None => Ok(Framing::UntilClose),
            Some(Ok(length)) => Ok(Framing::Length(length)),
            Some(Err(problem)) => Err(protocol(problem)),
        }
    }

    /// A body read to its end leaves the connection ready for another request, unless its end
    /// was the connection's.
    fn leaves_connection_usable(self) -> bool {
        self != Framing::UntilClose
    }

    /// True once the whole body has been read.
    pub(super) fn is_done(self) -> bool {
        matches!(
            self,
            Framing::Empty | Framing::Length(0) | Framing::Chunked(Chunk::Done)
        )
    }

    /// Takes the next piece of the body that `read` holds: data, trailers, or nothing yet.
    pub(super) fn decode(&mut self, read: &mut BytesMut) -> Result<Option<Piece>, UpstreamError> {
        loop {
            match self {
                Framing::Empty | Framing::Length(0) | Framing::Chunked(Chunk::Done) => {
                    return Ok(None)
                }
                Framing::Length(left) | Framing::Chunked(Chunk::Data(left)) => {
                    if read.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(read.len());
                    *left -= take as u64;
                    if *self == Framing::Chunked(Chunk::Data(0)) {
                        *self = Framing::Chunked(Chunk::DataEnd);
                    }
                    return Ok(Some(Piece::Data(read.split_to(take).freeze())));
                }
                Framing::UntilClose => {
                    if read.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Piece::Data(read.split().freeze())));
                }
                Framing::Chunked(chunk) => match decode_chunk_framing(chunk, read)? {
                    Step::Advanced => continue,
                    Step::NeedMore => return Ok(None),
                    Step::Trailers(trailers) => return Ok(Some(Piece::Trailers(trailers))),
                },
            }
        }
    }

    /// Reads on past a chunk's end as far as `read` allows without taking data or trailers,
    /// so that a body whose last chunk and terminator came together is done with its data.
    pub(super) fn settle(&mut self, read: &mut BytesMut) {
        while let Framing::Chunked(chunk @ (Chunk::DataEnd | Chunk::Size | Chunk::Trailers)) = self
        {
            if *chunk == Chunk::Trailers && !(read.starts_with(b"\r\n") || read.starts_with(b"\n"))
            {
                return;
            }
            // An error is left for `decode` to report.
            if !matches!(decode_chunk_framing(chunk, read), Ok(Step::Advanced)) {
                return;
            }
        }
    }

    /// Bytes still due, when known: a body of declared length.
    pub(super) fn remaining(self) -> Option<u64> {
        match self {
            Framing::Empty => Some(0),
            Framing::Length(left) => Some(left),
            Framing::Chunked(Chunk::Done) => Some(0),
            _ => None,
        }
    }
}

/// A piece of a response body.
pub(super) enum Piece {
    Data(Bytes),
    Trailers(HeaderMap),
}

enum Step {
    Advanced,
    NeedMore,
    Trailers(HeaderMap),
}

/// Reads the framing between a chunked body's data: sizes, line breaks, trailers.
fn decode_chunk_framing(chunk: &mut Chunk, read: &mut BytesMut) -> Result<Step, UpstreamError> {
    match chunk {
        // httparse takes a line without digits for the last chunk; a size has at least one.
        Chunk::Size if read.first().is_some_and(|byte| !byte.is_ascii_hexdigit()) => {
            Err(protocol("invalid chunk size"))
        }
        Chunk::Size => match httparse::parse_chunk_size(read) {
            Ok(httparse::Status::Complete((length, size))) => {
                read.advance(length);
                *chunk = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
                Ok(Step::Advanced)
            }
            Ok(httparse::Status::Partial) if read.len() > MAX_CHUNK_LINE => {
                Err(protocol("chunk-size line too long"))
            }
            Ok(httparse::Status::Partial) => Ok(Step::NeedMore),
            Err(_) => Err(protocol("invalid chunk size")),
        },
        Chunk::DataEnd => match read.first() {
            None => Ok(Step::NeedMore),
            Some(b'\n') => {
                read.advance(1);
                *chunk = Chunk::Size;
                Ok(Step::Advanced)
            }
            Some(b'\r') if read.len() < 2 => Ok(Step::NeedMore),
            Some(b'\r') if read[1] == b'\n' => {
                read.advance(2);
                *chunk = Chunk::Size;
                Ok(Step::Advanced)
            }
            Some(_) => Err(protocol("chunk data longer than its size")),
        },
        Chunk::Trailers => {
            if read.starts_with(b"\r\n") || read.starts_with(b"\n") {
                read.advance(if read[0] == b'\r' { 2 } else { 1 });
                *chunk = Chunk::Done;
                return Ok(Step::Advanced);
            }
            let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(read, &mut lines) {
                Ok(httparse::Status::Complete((length, parsed))) => {
                    let mut spans = [Span::default(); MAX_HEADERS];
                    let spans = locate(read, parsed, &mut spans);
                    let bytes = read.split_to(length).freeze();
                    let trailers = header_map(&bytes, spans, None)?;
                    *chunk = Chunk::Done;
                    Ok(Step::Trailers(trailers))
                }
                Ok(httparse::Status::Partial) if read.len() > MAX_HEAD => {
                    Err(protocol("trailer section too long"))
                }
                Ok(httparse::Status::Partial) => Ok(Step::NeedMore),
                Err(err) => Err(protocol(format!("malformed trailers: {err}"))),
            }
        }
        Chunk::Data(_) | Chunk::Done => Ok(Step::Advanced),
    }
}

fn protocol(detail: impl Into<String>) -> UpstreamError {
    UpstreamError {
        kind: UpstreamErrorKind::Protocol,
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8], head_request: bool) -> Result<Option<Head>, UpstreamError> {
        parse_head(&mut BytesMut::from(bytes), head_request, &mut None)
    }

    fn parsed(bytes: &[u8]) -> Head {
        head(bytes, false).expect("valid").expect("complete")
    }

    /// The head's fields, passed through or in its map.
    fn fields(head: Head) -> HeaderMap {
        let mut headers = head.response.headers().clone();
        if let Some(fields) = head.fields {
            fields.append_to(&mut headers);
        }
        headers
    }

    /// Every piece `framing` takes from `wire`, fed to it `step` bytes at a time.
    fn body(
        mut framing: Framing,
        wire: &[u8],
        step: usize,
    ) -> (Vec<u8>, Option<HeaderMap>, Framing) {
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut read = BytesMut::new();
        for piece in wire.chunks(step) {
            read.extend_from_slice(piece);
            while let Some(piece) = framing.decode(&mut read).expect("valid body") {
                match piece {
                    Piece::Data(bytes) => data.extend_from_slice(&bytes),
                    Piece::Trailers(map) => trailers = Some(map),
                }
            }
        }
        (data, trailers, framing)
    }

    #[test]
    fn answers_to_be_edited_are_read_into_a_map_and_the_others_pass_through() {
        for (wire, passes) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"[..],
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nConnection: X-Hop\r\nx-hop: 1\r\n\r\n",
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nTrailer: x-sum\r\n\r\n",
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
                false,
            ),
        ] {
            let head = parsed(wire);
            assert_eq!(head.fields.is_some(), passes, "{wire:?}");
            if !passes {
                assert!(!head.response.headers().is_empty(), "{wire:?}");
            }
        }
    }

    #[test]
    fn a_head_with_a_length_keeps_its_headers_and_its_connection() {
        let head = parsed(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-model: v2\r\n\r\nhello");
        assert_eq!(head.response.status(), 200);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive);
        assert!(head.fields.is_some(), "passed through");
        assert_eq!(fields(head)["x-model"], "v2");
    }

    #[test]
    fn a_reason_phrase_of_the_upstreams_own_is_kept_and_a_standard_one_is_not() {
        let own = parsed(b"HTTP/1.1 429 Slow Down, GPU Busy\r\ncontent-length: 0\r\n\r\n");
        let reason = own.response.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(
            reason.map(|r| r.as_bytes()),
            Some(&b"Slow Down, GPU Busy"[..])
        );
        let standard = parsed(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n");
        assert!(standard.response.extensions().is_empty());
    }

    #[test]
    fn an_incomplete_head_asks_for_more() {
        assert!(head(b"HTTP/1.1 200 OK\r\ncontent-le", false)
            .expect("valid")
            .is_none());
    }

    #[test]
    fn interim_answers_are_skipped() {
        let head = parsed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(head.response.status(), 201);
        assert!(!head.response.headers().contains_key("link"));
    }

    #[test]
    fn answers_without_a_body_ignore_their_length() {
        for (wire, head_request) in [
            (&b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"[..], true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
            (
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
                false,
            ),
        ] {
            let head = head(wire, head_request).expect("valid").expect("complete");
            assert_eq!(head.framing, Framing::Empty);
            assert!(head.keep_alive);
        }
    }

    #[test]
    fn chunked_wins_over_a_length_and_a_body_without_either_runs_to_the_close() {
        let chunked =
            parsed(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n");
        assert_eq!(chunked.framing, Framing::Chunked(Chunk::Size));
        let open_ended = parsed(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(open_ended.framing, Framing::UntilClose);
        assert!(!open_ended.keep_alive);
    }

    #[test]
    fn close_and_http_1_0_end_the_connection_unless_kept_alive() {
        assert!(
            !parsed(b"HTTP/1.1 200 OK\r\nconnection: Close\r\ncontent-length: 0\r\n\r\n")
                .keep_alive
        );
        let old = parsed(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(old.response.version(), Version::HTTP_10);
        assert!(!old.keep_alive);
        assert!(
            parsed(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n")
                .keep_alive
        );
    }

    #[test]
    fn a_length_beside_chunking_is_dropped_and_the_connection_not_kept() {
        for wire in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            let head = parsed(wire);
            assert_eq!(head.framing, Framing::Chunked(Chunk::Size));
            assert!(!head.keep_alive, "{wire:?}");
            assert!(!fields(head).contains_key(CONTENT_LENGTH));
        }
    }

    #[test]
    fn malformed_heads_are_protocol_errors() {
        for wire in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            let err = head(wire, false).err().expect("refused");
            assert_eq!(err.kind, UpstreamErrorKind::Protocol, "{wire:?}");
        }
    }

    #[test]
    fn an_endless_head_is_refused() {
        let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
        while wire.len() <= MAX_HEAD {
            wire.extend_from_slice(
                b"x-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        assert!(head(&wire, false).is_err());
    }

    #[test]
    fn a_length_body_ends_at_its_length_however_it_arrives() {
        for step in [1, 3, 100] {
            let (data, _, framing) = body(Framing::Length(11), b"hello world", step);
            assert_eq!(data, b"hello world");
            assert!(framing.is_done());
        }
    }

    #[test]
    fn a_chunked_body_is_decoded_with_extensions_and_trailers_however_it_arrives() {
        let wire =
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n";
        for step in [1, 2, 7, wire.len()] {
            let (data, trailers, framing) = body(Framing::Chunked(Chunk::Size), wire, step);
            assert_eq!(data, b"hello world", "step {step}");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(trailers["grpc-message"], "ok");
            assert!(framing.is_done());
        }
    }

    #[test]
    fn a_chunked_body_without_trailers_ends_at_its_last_chunk() {
        let (data, trailers, framing) =
            body(Framing::Chunked(Chunk::Size), b"3\r\nabc\r\n0\r\n\r\n", 1);
        assert_eq!(data, b"abc");
        assert!(trailers.is_none());
        assert!(framing.is_done());
    }

    #[test]
    fn bad_chunk_framing_is_a_protocol_error() {
        for wire in [
            &b"zz\r\n"[..],
            b"3\r\nabcdef\r\n",
            b"3\r\nabc\r\n\r\n\r\n",
            b";x\r\n",
        ] {
            let mut framing = Framing::Chunked(Chunk::Size);
            let mut read = BytesMut::from(wire);
            let outcome = std::iter::from_fn(|| Some(framing.decode(&mut read)))
                .find(|step| !matches!(step, Ok(Some(_))));
            assert!(matches!(outcome, Some(Err(_))), "{wire:?}");
        }
    }
}
