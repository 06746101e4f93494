//! Copies of request parts that outlive the exchange they came with.
//!
//! hyper parses the URI, header values and small bodies as slices of the client connection's
//! read buffer (8 KiB at least), and reads on into a new buffer while they are alive. Parts
//! kept for a while (a request queued for a connection, a mirror queued for a shadow) are
//! copied here so they pin only their own bytes. (Buffered bodies are copied as they are
//! read, in `read_body`.)

use bytes::{Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue};

/// Bodies up to this size may be a slice of a read buffer and are copied; larger ones were
/// collected from several reads into a buffer of their own.
const SMALL_BODY: usize = 16 * 1024;

pub fn path_and_query(path_and_query: &PathAndQuery) -> PathAndQuery {
    PathAndQuery::try_from(path_and_query.as_str()).unwrap_or_else(|_| path_and_query.clone())
}

/// The same headers, their values copied into one buffer.
pub fn headers(headers: &HeaderMap) -> HeaderMap {
    let mut values = BytesMut::with_capacity(headers.values().map(HeaderValue::len).sum());
    for value in headers.values() {
        values.extend_from_slice(value.as_bytes());
    }
    let mut values = values.freeze();
    let mut copy = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let bytes = values.split_to(value.len());
        let mut owned = HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| value.clone());
        owned.set_sensitive(value.is_sensitive());
        copy.append(name.clone(), owned);
    }
    copy
}

pub fn body(body: Bytes) -> Bytes {
    if body.len() <= SMALL_BODY {
        Bytes::copy_from_slice(&body)
    } else {
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copied_headers_keep_their_order_repeats_and_sensitivity() {
        let mut headers = HeaderMap::new();
        headers.append("x-user-id", HeaderValue::from_static("alice"));
        headers.append("cookie", HeaderValue::from_static("a=1"));
        headers.append("cookie", HeaderValue::from_static("b=2"));
        headers.append("x-empty", HeaderValue::from_static(""));
        let mut secret = HeaderValue::from_static("Bearer t");
        secret.set_sensitive(true);
        headers.append("authorization", secret);

        let copy = super::headers(&headers);
        assert_eq!(copy, headers);
        let cookies: Vec<_> = copy.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert!(copy["authorization"].is_sensitive());
        assert!(!copy["x-user-id"].is_sensitive());
    }

    #[test]
    fn a_copied_path_keeps_its_query() {
        let original = PathAndQuery::from_static("/v1/predict?user=a%20b&x=1");
        assert_eq!(path_and_query(&original), original);
    }

    #[test]
    fn small_bodies_are_copied_and_large_ones_kept() {
        let buffer = Bytes::from(vec![7u8; 64 * 1024]);
        let small = body(buffer.slice(..100));
        assert_eq!(small, buffer.slice(..100));
        assert_ne!(
            small.as_ptr(),
            buffer.as_ptr(),
            "copied out of the big buffer"
        );
        let large = body(buffer.clone());
        assert_eq!(
            large.as_ptr(),
            buffer.as_ptr(),
            "no copy of a buffer of its own"
        );
    }
}
