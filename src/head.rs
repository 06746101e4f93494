//! A request's head as abproxy reads it: its target, and its fields wherever they are kept.
//!
//! A request abproxy's HTTP/1.1 server read may keep its fields as they came, with no map:
//! assignment and gRPC detection look up the few fields they read in the lines, and the
//! lines go upstream as they came. Every other request has its fields in its map.

use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};

use crate::wire::Fields;

/// A request's target and fields, borrowed.
#[derive(Clone, Copy)]
pub struct RequestHead<'a> {
    uri: &'a Uri,
    fields: Kept<'a>,
}

/// Where a request's fields are.
#[derive(Clone, Copy)]
enum Kept<'a> {
    Map(&'a HeaderMap),
    /// As they came; the request's map is empty.
    Lines(&'a Fields),
}

impl<'a> RequestHead<'a> {
    /// A head whose fields are in `lines` when it has them, else in `map`.
    pub(crate) fn new(uri: &'a Uri, map: &'a HeaderMap, lines: Option<&'a Fields>) -> Self {
        let fields = match lines {
            Some(lines) => Kept::Lines(lines),
            None => Kept::Map(map),
        };
        RequestHead { uri, fields }
    }

    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The first value of the field `name`.
    pub fn get(&self, name: &HeaderName) -> Option<&'a [u8]> {
        match self.fields {
            Kept::Map(map) => map.get(name).map(HeaderValue::as_bytes),
            Kept::Lines(lines) => lines.value(name),
        }
    }

    /// Every value of the field `name`, in order.
    pub fn get_all<'n>(&self, name: &'n HeaderName) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        let (map, lines) = match self.fields {
            Kept::Map(map) => (Some(map), None),
            Kept::Lines(lines) => (None, Some(lines)),
        };
        let in_map = map
            .into_iter()
            .flat_map(move |map| map.get_all(name).into_iter().map(HeaderValue::as_bytes));
        in_map.chain(lines.into_iter().flat_map(move |lines| lines.values(name)))
    }
}

impl<'a> From<&'a Parts> for RequestHead<'a> {
    fn from(parts: &'a Parts) -> Self {
        RequestHead::new(&parts.uri, &parts.headers, None)
    }
}
