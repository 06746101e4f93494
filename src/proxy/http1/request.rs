//! Reading a request's head, and a body that came with it, off the connection's buffer.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, Method, Request, Uri, Version};

use super::LONGEST_HEAD;
use crate::proxy::ClientBody;
use crate::wire::{
    content_length, fill, is_named, lists, locate, names_fields, within, Fields, Span,
};

/// More header lines than this go to hyper, which takes up to 100.
const MOST_HEADERS: usize = 64;
/// As many as most requests carry.
const FEW_HEADERS: usize = 16;

/// What the buffer holds.
// Returned once per request and matched at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Head {
    /// A request of the shape served here, with its whole body.
    Request(Parsed),
    /// Not yet a whole head: read on.
    Partial,
    /// A whole head of that shape whose body is not all read: the message is this long.
    Incomplete(usize),
    /// A request of another shape, or none that parses: hyper's to serve or to refuse.
    Other,
}

pub(super) struct Parsed {
    /// Its map is empty when `lines` holds its fields.
    pub request: Request<ClientBody>,
    /// The request's fields as they came, when none needs editing on the way upstream (see
    /// `Facts::edited`): passed on as they came, with no map filled.
    pub lines: Option<Fields>,
    /// HTTP/1.1's default, unless the client said `Connection: close`.
    pub keep_alive: bool,
    /// The client takes trailers (`TE: trailers`).
    pub trailers: bool,
}

/// The framing and connection facts the head states, beside the fields themselves.
#[derive(Default)]
struct Facts {
    length: Option<usize>,
    close: bool,
    trailers: bool,
    /// Anything served by hyper: a chunked or `Expect`ing body, an upgrade, repeated or
    /// unreadable lengths.
    other: bool,
    /// A field to edit on the way upstream: a `Connection` that names fields to drop with
    /// it. (The writer appends the client to an `X-Forwarded-For` that came as lines.)
    edited: bool,
}

impl Facts {
    /// Notes what a field says, its name compared as it came (any case).
    fn note(&mut self, name: &[u8], value: &[u8]) {
        let is = |known: &HeaderName| is_named(name, known);
        if is(&header::CONTENT_LENGTH) {
            match (self.length, content_length(value)) {
                // Past what a `usize` holds is past any body read here: hyper's.
                (None, Some(length)) => match usize::try_from(length) {
                    Ok(length) => self.length = Some(length),
                    Err(_) => self.other = true,
                },
                _ => self.other = true,
            }
        } else if is(&header::CONNECTION) {
            self.close |= lists(value, b"close");
            self.edited |= names_fields(value);
        } else if is(&header::TE) {
            self.trailers |= lists(value, b"trailers");
        } else if is(&header::TRANSFER_ENCODING) || is(&header::EXPECT) || is(&header::UPGRADE) {
            self.other = true;
        }
    }
}

/// Takes the next request off `buffer` if it is whole and of the common shape: HTTP/1.1,
/// no upgrade, no `Expect`, and a body of a single `Content-Length`, all of it read.
/// `headers` is a map to fill, kept from an earlier exchange for its allocation.
pub(super) fn parse(buffer: &mut BytesMut, headers: &mut Option<HeaderMap>) -> Head {
    // Not zeroed: 2 KiB a request that the parser overwrites anyway.
    let mut uninit = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MOST_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let head_length = match parsed.parse_with_uninit_headers(buffer, &mut uninit) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::Other,
    };
    let (Some(method), Some(target), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Head::Other;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Head::Other;
    };
    if method == Method::CONNECT || head_length > LONGEST_HEAD {
        return Head::Other;
    }
    let base = buffer.as_ref();
    let target = within(base, target.as_bytes());
    let mut facts = Facts::default();
    for field in parsed.headers.iter() {
        facts.note(field.name.as_bytes(), field.value);
    }
    // Room on the stack for the fields of most requests, rather than zeroing 1 KiB for all.
    let (mut few, mut many) = ([Span::default(); FEW_HEADERS], Vec::new());
    let room = if parsed.headers.len() <= FEW_HEADERS {
        &mut few[..]
    } else {
        many.resize(parsed.headers.len(), Span::default());
        &mut many[..]
    };
    let spans = locate(base, parsed.headers, room);
    let body_length = facts.length.unwrap_or(0);
    // A body longer than the longest head streams through hyper.
    if facts.other || body_length > LONGEST_HEAD {
        return Head::Other;
    }
    if buffer.len() - head_length < body_length {
        return Head::Incomplete(head_length + body_length);
    }
    let message = buffer.split_to(head_length + body_length).freeze();
    let slice = |(start, end): (u32, u32)| message.slice(start as usize..end as usize);
    let Ok(uri) = Uri::from_maybe_shared(slice(target)) else {
        return rejoined(message, buffer);
    };
    let body = if body_length == 0 {
        Bytes::new()
    } else {
        message.slice(head_length..)
    };
    let (map, lines) = if facts.edited {
        let mut map = headers.take().unwrap_or_default();
        map.clear();
        map.reserve(spans.len());
        if fill(&mut map, &message, spans).is_err() {
            return rejoined(message, buffer);
        }
        (Some(map), None)
    } else {
        // httparse checks names and values as `http` does: a map made of these later takes
        // them all.
        (None, Some(Fields::new(message, spans.into())))
    };
    let mut request = Request::new(ClientBody::Complete(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    if let Some(map) = map {
        *request.headers_mut() = map;
    }
    Head::Request(Parsed {
        request,
        lines,
        keep_alive: !facts.close,
        trailers: facts.trailers,
    })
}

/// Puts a message taken off the buffer back in front of it, for hyper to refuse (a target,
/// field name or value that httparse takes and `http` does not).
fn rejoined(message: Bytes, buffer: &mut BytesMut) -> Head {
    let mut whole = BytesMut::with_capacity(message.len() + buffer.len());
    whole.extend_from_slice(&message);
    whole.extend_from_slice(buffer);
    *buffer = whole;
    Head::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> (Head, BytesMut) {
        let mut buffer = BytesMut::from(bytes);
        let head = parse(&mut buffer, &mut None);
        (head, buffer)
    }

    fn served_here(bytes: &[u8]) -> (Parsed, BytesMut) {
        match parsed(bytes) {
            (Head::Request(parsed), rest) => (parsed, rest),
            _ => panic!("{:?} not served here", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn a_request_with_its_body_is_taken_off_the_buffer_and_the_next_left() {
        let (parsed, rest) = served_here(
            b"POST /predict?x=1 HTTP/1.1\r\nHost: m\r\nX-Tag: a\r\nx-tag: b\r\ncontent-length: 2\r\n\r\n{}GET /next",
        );
        let request = parsed.request;
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "/predict?x=1");
        assert!(request.headers().is_empty(), "the fields stay as they came");
        let lines = parsed.lines.expect("lines");
        assert_eq!(lines.value(&header::HOST), Some(&b"m"[..]));
        let tag = HeaderName::from_static("x-tag");
        assert_eq!(lines.values(&tag).collect::<Vec<_>>(), [b"a", b"b"]);
        assert!(matches!(request.body(), ClientBody::Complete(body) if body == "{}"));
        assert!(parsed.keep_alive);
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn fields_to_edit_on_the_way_upstream_are_read_into_the_map() {
        for edited in [
            &b"GET / HTTP/1.1\r\nHost: m\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: m\r\nCONNECTION: X-Hop\r\nX-Hop: 1\r\n\r\n",
        ] {
            let (parsed, _) = served_here(edited);
            assert!(parsed.lines.is_none());
            assert_eq!(parsed.request.headers()["host"], "m");
        }
        for kept in [
            &b"GET / HTTP/1.1\r\nHost: m\r\nConnection: keep-alive\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: m\r\nx-FORWARDED-for: 10.0.0.1\r\n\r\n",
        ] {
            let (parsed, _) = served_here(kept);
            assert!(
                parsed.lines.is_some(),
                "{:?}",
                String::from_utf8_lossy(kept)
            );
        }
    }

    #[test]
    fn connection_close_and_te_trailers_are_noted() {
        let (parsed, _) =
            served_here(b"GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\nTE: trailers\r\n\r\n");
        assert!(!parsed.keep_alive);
        assert!(parsed.trailers);
    }

    #[test]
    fn a_head_not_yet_whole_waits_for_more() {
        assert!(matches!(
            parsed(b"GET / HTTP/1.1\r\nhost:").0,
            Head::Partial
        ));
    }

    #[test]
    fn a_body_not_yet_read_is_reported_with_the_message_length() {
        let head = b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\n";
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(b"12345");
        assert!(matches!(parsed(&bytes).0, Head::Incomplete(length) if length == head.len() + 10));
    }

    #[test]
    fn requests_of_other_shapes_are_left_whole_for_hyper() {
        for other in [
            &b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\nexpect: 100-continue\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"CONNECT m:443 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx",
            b"POST / HTTP/1.1\r\ncontent-length: +1\r\n\r\nx",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET /\x7f HTTP/1.1\r\n\r\n",
            b"GET {} HTTP/1.1\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
            b"GET http://[::1/ HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 18446744073709551615\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 99999999999999999999999\r\n\r\n",
        ] {
            let (head, rest) = parsed(other);
            assert!(
                matches!(head, Head::Other),
                "{:?} served here",
                String::from_utf8_lossy(other)
            );
            assert_eq!(&rest[..], other, "nothing taken off the buffer");
        }
    }

    #[test]
    fn more_header_lines_than_are_read_here_go_to_hyper() {
        let mut request = b"GET / HTTP/1.1\r\n".to_vec();
        for line in 0..=MOST_HEADERS {
            request.extend_from_slice(format!("x-{line}: v\r\n").as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        assert!(matches!(parsed(&request).0, Head::Other));
    }
}
