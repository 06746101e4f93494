//! HTTP/1.1 on the wire, as both of abproxy's sides write it: answers to clients
//! (`proxy::http1`) and requests to upstreams (`upstream::http1`).

mod date;
mod fields;
mod outgoing;

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use http::header::{self, HeaderName};
use http::HeaderMap;
use tokio::io::AsyncRead;

pub(crate) use date::Date;
pub(crate) use fields::{fill, locate, within, Fields, InvalidField, Span};
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

/// Whether a field name as it came off the wire (any case) is `known`.
pub(crate) fn is_named(name: &[u8], known: &HeaderName) -> bool {
    name.eq_ignore_ascii_case(known.as_str().as_bytes())
}

/// Whether a field, named as it came (any case), is for one hop only, never passed on:
/// `Connection` and what RFC 9110 §7.6.1 has it name in practice, with `Proxy-Authenticate`.
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    // A length switch and one comparison, where trying each of the seven names is seven.
    let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
    match name.len() {
        2 => is("te"),
        7 => is("upgrade"),
        10 => is("connection") || is("keep-alive"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        18 => is("proxy-authenticate"),
        _ => false,
    }
}

/// Writes `values` and then `last` as one field value, a comma between each (RFC 9110 §5.3:
/// how lines of one field combine).
pub(crate) fn fold<'v>(buffer: &mut Vec<u8>, values: impl Iterator<Item = &'v [u8]>, last: &[u8]) {
    for value in values {
        buffer.extend_from_slice(value);
        buffer.extend_from_slice(b", ");
    }
    buffer.extend_from_slice(last);
}

/// Whether a `Connection` value names a field to drop with it, not only `close` or
/// `keep-alive`.
pub(crate) fn names_fields(connection: &[u8]) -> bool {
    connection.split(|&byte| byte == b',').any(|token| {
        let token = token.trim_ascii();
        !token.is_empty()
            && !token.eq_ignore_ascii_case(b"close")
            && !token.eq_ignore_ascii_case(b"keep-alive")
    })
}

/// Whether a comma-separated field value (`Connection`, `TE`, `Upgrade`) lists `token`.
pub(crate) fn lists(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&byte| byte == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// A `Content-Length` value: digits only (RFC 9110 §8.6), where `parse` would take a sign.
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |length, &byte| {
        let digit = char::from(byte).to_digit(10)?;
        length.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Reads what the peer sent into `buffer`; 0 once it has closed. Room for `size` bytes is
/// made first when less than half of that is free, and `size` doubles, up to `largest`,
/// while reads fill the room: a large message takes few reads, a small one little memory.
pub(crate) fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buffer: &mut BytesMut,
    size: &mut usize,
    largest: usize,
) -> Poll<io::Result<usize>> {
    if buffer.capacity() - buffer.len() < *size / 2 {
        buffer.reserve(*size);
    }
    let room = buffer.capacity() - buffer.len();
    let read = ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, buffer))?;
    if read == room {
        *size = (*size * 2).min(largest);
    }
    Poll::Ready(Ok(read))
}

pub(crate) fn header_line(buffer: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    buffer.extend_from_slice(name);
    buffer.extend_from_slice(b": ");
    buffer.extend_from_slice(value);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_length_is_digits_alone() {
        assert_eq!(content_length(b"42"), Some(42));
        assert_eq!(content_length(b" 42 "), Some(42));
        for refused in [
            &b""[..],
            b"+42",
            b"-1",
            b"4 2",
            b"0x10",
            b"99999999999999999999999",
        ] {
            assert_eq!(content_length(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn a_connection_value_names_fields_beyond_close_and_keep_alive() {
        for plain in [
            &b"close"[..],
            b"Keep-Alive",
            b"keep-alive, close",
            b" close , ",
        ] {
            assert!(!names_fields(plain), "{plain:?}");
        }
        for naming in [&b"x-hop"[..], b"close, x-hop", b"Keep-Alive,Upgrade"] {
            assert!(names_fields(naming), "{naming:?}");
        }
    }

    #[test]
    fn a_listed_token_is_found_in_any_case_and_spacing() {
        assert!(lists(b"keep-alive, Upgrade", b"upgrade"));
        assert!(!lists(b"upgrade-insecure", b"upgrade"));
    }
}
