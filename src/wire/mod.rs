//! HTTP/1.1 on the wire, as both of abproxy's sides write it: answers to clients
//! (`proxy::http1`) and requests to upstreams (`upstream::http1`).

mod date;
mod fields;
mod outgoing;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

pub(crate) use date::Date;
pub(crate) use fields::{fill, locate, within, InvalidField, Span};
pub(crate) use outgoing::{Encoding, Outgoing, WriteFailure};

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

pub(crate) fn header_line(buffer: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    buffer.extend_from_slice(name.as_str().as_bytes());
    buffer.extend_from_slice(b": ");
    buffer.extend_from_slice(value.as_bytes());
    buffer.extend_from_slice(b"\r\n");
}

/// Fields that framing, routing or authentication depend on may not come as trailers
/// (RFC 9110 §6.5.1; the list hyper applies).
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
