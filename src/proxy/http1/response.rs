//! Writing an answer's head, framed as hyper's server frames it (RFC 9112 §6).

use std::io::Write as _;

use http::header::{self, HeaderName, HeaderValue};
use http::response::Parts;
use http::StatusCode;
use http_body::Body as _;

use crate::proxy::ResponseBody;
use crate::wire::{
    content_length, header_line, is_hop_by_hop, is_named, lists, names_listed_in, Date, Encoding,
};

/// What the request said that shapes its answer.
pub(super) struct Asked {
    pub head: bool,
    pub keep_alive: bool,
    /// The client takes trailers (`TE: trailers`).
    pub trailers: bool,
}

/// An answer's head, encoded.
pub(super) struct Framed {
    /// How its body follows; `None` when it has none to send (HEAD, 204, 304).
    pub encoding: Option<Encoding>,
    /// The connection serves another request after this one.
    pub keep_alive: bool,
}

/// Encodes `parts` into `buffer` (cleared first), with the framing its body needs: the
/// answer's own `content-length` if it has one, else the body's exact length, else chunked.
/// An upstream answer's fields that pass through as they came are written first, less the
/// hop-by-hop ones (its map is empty then), then the map's, then the field that names the
/// variant (which replaces any of that name: the name is abproxy's to say).
pub(super) fn encode(
    parts: &Parts,
    body: &ResponseBody,
    variant: Option<(&HeaderName, &HeaderValue)>,
    asked: &Asked,
    buffer: &mut Vec<u8>,
) -> Framed {
    buffer.clear();
    let status = parts.status;
    status_line(buffer, parts);
    // 1xx, 204 and 304 answers have no body and say no length; an answer to HEAD has no
    // body but may say the length a GET would get (RFC 9112 §6.3, RFC 9110 §8.6).
    let may_have_length = !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED);
    let bodiless = asked.head || !may_have_length;
    let ended = body.is_end_stream();
    let mut lines = Lines {
        buffer,
        // Said once, of a body there is (or, to HEAD, of one there would be).
        length_wanted: may_have_length && (asked.head || !ended),
        bodiless,
        length: None,
        keep_alive: asked.keep_alive,
        says_close: false,
        dated: false,
    };
    let is_variant = |name: &[u8]| variant.is_some_and(|(variant, _)| is_named(name, variant));
    if let Some(fields) = body.fields() {
        for field in fields.iter() {
            if !is_hop_by_hop(field.name)
                && !is_variant(field.name)
                && lines.admits(field.name, field.value)
            {
                lines.buffer.extend_from_slice(field.line);
                lines.buffer.extend_from_slice(b"\r\n");
            }
        }
    }
    for (name, value) in &parts.headers {
        let (name, value) = (name.as_str().as_bytes(), value.as_bytes());
        if !is_variant(name) && lines.admits(name, value) {
            header_line(lines.buffer, name, value);
        }
    }
    if let Some((name, value)) = variant {
        header_line(lines.buffer, name.as_str().as_bytes(), value.as_bytes());
    }
    let Lines {
        buffer,
        length,
        keep_alive,
        says_close,
        dated,
        ..
    } = lines;
    if !keep_alive && !says_close {
        buffer.extend_from_slice(b"connection: close\r\n");
    }
    let hint = body.size_hint().exact();
    let encoding = match (length, hint) {
        _ if bodiless => {
            if let (true, None, Some(hint @ 1..)) = (may_have_length, length, hint) {
                let _ = write!(buffer, "content-length: {hint}\r\n");
            }
            None
        }
        (Some(length), _) => Some(Encoding::Length(length)),
        (None, _) if ended => {
            buffer.extend_from_slice(b"content-length: 0\r\n");
            Some(Encoding::Length(0))
        }
        (None, Some(hint)) => {
            let _ = write!(buffer, "content-length: {hint}\r\n");
            Some(Encoding::Length(hint))
        }
        (None, None) => {
            buffer.extend_from_slice(b"transfer-encoding: chunked\r\n");
            let trailers = if asked.trailers {
                names_listed_in(&parts.headers, &header::TRAILER)
            } else {
                Vec::new()
            };
            Some(Encoding::Chunked { trailers })
        }
    };
    if !dated {
        Date::write_line(buffer);
    }
    buffer.extend_from_slice(b"\r\n");
    Framed {
        encoding,
        keep_alive,
    }
}

/// The field lines of a head being written, and what they said of its framing.
struct Lines<'a> {
    buffer: &'a mut Vec<u8>,
    length_wanted: bool,
    bodiless: bool,
    length: Option<u64>,
    keep_alive: bool,
    says_close: bool,
    dated: bool,
}

impl Lines<'_> {
    /// Notes what a field (named in any case) says; false if it is not to be written, as
    /// framing is abproxy's to say. (Fields passed through come without their hop-by-hop
    /// ones, and an upstream's map without them too: `Connection` and `Transfer-Encoding`
    /// reach here from abproxy's own answers only.)
    fn admits(&mut self, name: &[u8], value: &[u8]) -> bool {
        if is_named(name, &header::CONTENT_LENGTH) {
            match content_length(value) {
                Some(stated) if self.length.is_none() && self.length_wanted => {
                    self.length = Some(stated);
                }
                _ => return false,
            }
        } else if is_named(name, &header::TRANSFER_ENCODING)
            || (self.bodiless && is_named(name, &header::TRAILER))
        {
            return false;
        } else if is_named(name, &header::CONNECTION) && lists(value, b"close") {
            self.keep_alive = false;
            self.says_close = true;
        } else if is_named(name, &header::DATE) {
            self.dated = true;
        }
        true
    }
}

fn status_line(buffer: &mut Vec<u8>, parts: &Parts) {
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    if parts.status == StatusCode::OK && reason.is_none() {
        buffer.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    buffer.extend_from_slice(b"HTTP/1.1 ");
    buffer.extend_from_slice(parts.status.as_str().as_bytes());
    buffer.push(b' ');
    match reason {
        Some(reason) => buffer.extend_from_slice(reason.as_bytes()),
        // A reason must be written: many parsers expect one.
        None => buffer.extend_from_slice(
            parts
                .status
                .canonical_reason()
                .unwrap_or("<none>")
                .as_bytes(),
        ),
    }
    buffer.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Response;

    fn asked() -> Asked {
        Asked {
            head: false,
            keep_alive: true,
            trailers: false,
        }
    }

    /// The head as written, without its date line (checked on its own).
    fn written(response: Response<ResponseBody>, asked: &Asked) -> (String, Framed) {
        let (parts, body) = response.into_parts();
        let mut buffer = Vec::new();
        let framed = encode(&parts, &body, None, asked, &mut buffer);
        let text = String::from_utf8(buffer).expect("ascii");
        let without_date = text
            .lines()
            .filter(|line| !line.starts_with("date: "))
            .collect::<Vec<_>>()
            .join("\r\n");
        assert_eq!(text.matches("date: ").count(), 1, "one date line");
        (without_date, framed)
    }

    fn full(body: &'static str) -> ResponseBody {
        ResponseBody::full(bytes::Bytes::from_static(body.as_bytes()))
    }

    #[test]
    fn a_body_in_hand_is_framed_by_its_length() {
        let response = Response::builder()
            .header("x-variant", "control")
            .body(full("{}"))
            .expect("response");
        let (head, framed) = written(response, &asked());
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nx-variant: control\r\ncontent-length: 2\r\n"
        );
        assert!(matches!(framed.encoding, Some(Encoding::Length(2))));
        assert!(framed.keep_alive);
    }

    #[test]
    fn the_variant_is_named_once_after_the_maps_fields_in_place_of_the_upstreams_word() {
        let response = Response::builder()
            .header("content-type", "application/json")
            .header("X-Variant", "upstream")
            .body(full("{}"))
            .expect("response");
        let (parts, body) = response.into_parts();
        let name = HeaderName::from_static("x-variant");
        let value = HeaderValue::from_static("treatment");
        let mut buffer = Vec::new();
        encode(&parts, &body, Some((&name, &value)), &asked(), &mut buffer);
        let text = String::from_utf8(buffer).expect("ascii");
        assert!(
            text.starts_with(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-variant: treatment\r\n\
                 content-length: 2\r\n"
            ),
            "{text}"
        );
        assert_eq!(text.matches("x-variant").count(), 1, "{text}");
    }

    #[test]
    fn an_empty_body_says_so_but_not_on_a_204() {
        let (head, _) = written(Response::new(full("")), &asked());
        assert_eq!(head, "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n");
        let no_content = Response::builder()
            .status(204)
            .header("content-length", "0")
            .body(full(""))
            .expect("response");
        let (head, framed) = written(no_content, &asked());
        assert_eq!(head, "HTTP/1.1 204 No Content\r\n");
        assert!(framed.encoding.is_none());
    }

    #[test]
    fn an_answer_to_head_keeps_its_stated_length_and_sends_no_body() {
        let response = Response::builder()
            .header("content-length", "1234")
            .body(full(""))
            .expect("response");
        let head_request = Asked {
            head: true,
            ..asked()
        };
        let (head, framed) = written(response, &head_request);
        assert_eq!(head, "HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n");
        assert!(framed.encoding.is_none());
    }

    #[test]
    fn a_closing_connection_says_so_and_a_reason_phrase_is_kept() {
        let mut response = Response::builder()
            .status(503)
            .body(full(""))
            .expect("response");
        response
            .extensions_mut()
            .insert(hyper::ext::ReasonPhrase::try_from(&b"Warming Up"[..]).expect("reason"));
        let closing = Asked {
            keep_alive: false,
            ..asked()
        };
        let (head, framed) = written(response, &closing);
        assert_eq!(
            head,
            "HTTP/1.1 503 Warming Up\r\nconnection: close\r\ncontent-length: 0\r\n"
        );
        assert!(!framed.keep_alive);
    }

    #[test]
    fn an_answer_that_says_close_ends_the_connection() {
        let response = Response::builder()
            .header("connection", "close")
            .body(full("x"))
            .expect("response");
        let (head, framed) = written(response, &asked());
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n"
        );
        assert!(!framed.keep_alive);
    }
}
