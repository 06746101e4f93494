//! Writing a request to an upstream: its head, and the framing of its body.

use std::io::Write as _;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, TRAILER, TRANSFER_ENCODING};
use http::request::Parts;
use http::Method;
use http_body::Body as _;

use crate::upstream::upload::{Upload, UploadError};
use crate::upstream::Appended;
use crate::wire::{self, header_line, names_listed_in, Encoding};

/// A request on its way out, its body framed by abproxy.
pub(super) type Outgoing = wire::Outgoing<Upload>;

/// Why a request could not be written.
pub(super) type WriteFailure = wire::WriteFailure<UploadError>;

/// What the request's body is: bytes in hand, or a client upload still arriving.
pub(super) enum Payload {
    Bytes(Bytes),
    Upload(Upload),
}

impl Payload {
    /// The payload of a request of which nothing was written.
    pub fn untouched((data, upload): (Bytes, Option<Upload>)) -> Payload {
        match upload {
            Some(upload) => Payload::Upload(upload),
            None => Payload::Bytes(data),
        }
    }
}

/// Encodes `parts`' head into `buffer` (cleared first), with the body's framing: a
/// `content-length` when the length is known, chunked otherwise. The client's own framing
/// headers are dropped; the body decides.
pub(super) fn outgoing(
    parts: &Parts,
    appended: Appended<'_>,
    payload: Payload,
    mut buffer: Vec<u8>,
) -> Outgoing {
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
            header_line(&mut buffer, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    for field in appended.lines.iter().flat_map(|lines| lines.iter()) {
        if appended.passes_on(field.name) {
            buffer.extend_from_slice(field.line);
            buffer.extend_from_slice(b"\r\n");
        }
    }
    if let Some((name, _)) = appended.folded {
        buffer.extend_from_slice(name.as_str().as_bytes());
        buffer.extend_from_slice(b": ");
        appended.write_folded(&mut buffer);
        buffer.extend_from_slice(b"\r\n");
    }
    for (name, value) in appended.fields {
        header_line(&mut buffer, name.as_str().as_bytes(), value.as_bytes());
    }
    let (data, upload, encoding) = match payload {
        Payload::Bytes(bytes) => {
            let length = bytes.len() as u64;
            // A GET says nothing of a body it does not have; a POST says it is empty.
            if length > 0 || expects_body(&parts.method) {
                let _ = write!(buffer, "content-length: {length}\r\n");
            }
            (bytes, None, Encoding::Length(length))
        }
        Payload::Upload(upload) => match upload.size_hint().exact() {
            Some(length) => {
                let _ = write!(buffer, "content-length: {length}\r\n");
                (Bytes::new(), Some(upload), Encoding::Length(length))
            }
            None => {
                buffer.extend_from_slice(b"transfer-encoding: chunked\r\n");
                let trailers = names_listed_in(&parts.headers, &TRAILER);
                (Bytes::new(), Some(upload), Encoding::Chunked { trailers })
            }
        },
    };
    buffer.extend_from_slice(b"\r\n");
    Outgoing::new(buffer, data, upload, encoding)
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
        head_appending(request, body, Appended::default())
    }

    fn head_appending(request: Request<()>, body: &'static [u8], appended: Appended<'_>) -> String {
        let (parts, ()) = request.into_parts();
        let payload = Payload::Bytes(Bytes::from_static(body));
        let outgoing = outgoing(&parts, appended, payload, Vec::new());
        String::from_utf8(outgoing.into_parts().1).expect("ascii")
    }

    #[test]
    fn appended_fields_follow_the_maps() {
        let request = Request::get("/")
            .header("host", "m")
            .body(())
            .expect("request");
        let fields = [(
            http::HeaderName::from_static("x-forwarded-for"),
            http::HeaderValue::from_static("10.0.0.1"),
        )];
        let appended = Appended {
            lines: None,
            fields: &fields,
            folded: None,
        };
        assert_eq!(
            head_appending(request, b"", appended),
            "GET / HTTP/1.1\r\nhost: m\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
        );
    }

    #[test]
    fn lines_follow_the_map_less_hop_by_hop_and_framing_with_the_folded_field_after_them() {
        let request = Request::get("/")
            .header("host", "m")
            .body(())
            .expect("request");
        let lines = crate::wire::Fields::of_request(
            b"GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\nAccept:  */*\r\nTE: trailers\r\n\
              Content-Length: 0\r\nx-forwarded-for: 10.0.0.2\r\n\r\n",
        );
        let folded = (
            http::HeaderName::from_static("x-forwarded-for"),
            http::HeaderValue::from_static("127.0.0.1"),
        );
        let appended = Appended {
            lines: Some(&lines),
            fields: &[],
            folded: Some(&folded),
        };
        assert_eq!(
            head_appending(request, b"", appended),
            "GET / HTTP/1.1\r\nhost: m\r\nAccept:  */*\r\n\
             x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\n\r\n"
        );
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
