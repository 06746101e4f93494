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

#[cfg(test)]
mod tests {
    use http::header::{CONTENT_TYPE, COOKIE};

    use super::*;
    use crate::assign::UserIdSource;

    #[test]
    fn fields_kept_as_lines_are_found_in_any_case_and_repeated_ones_in_order() {
        let fields = Fields::of_request(
            b"GET /?u=q HTTP/1.1\r\nHost: m\r\nCookie: a=1\r\nX-User-Id: u\r\ncookie: uid=2\r\n\r\n",
        );
        let (uri, map) = (Uri::from_static("/?u=q"), HeaderMap::new());
        let head = RequestHead::new(&uri, &map, Some(&fields));
        let user_id = HeaderName::from_static("x-user-id");
        assert_eq!(head.get(&user_id), Some(&b"u"[..]));
        assert_eq!(head.get(&CONTENT_TYPE), None);
        assert_eq!(
            head.get_all(&COOKIE).collect::<Vec<_>>(),
            [&b"a=1"[..], b"uid=2"]
        );
        let source = |text: &str| text.parse::<UserIdSource>().expect("source");
        assert_eq!(
            source("cookie:uid").extract(head, None).as_deref(),
            Some("2")
        );
        assert_eq!(
            source("header:x-user-id").extract(head, None).as_deref(),
            Some("u")
        );
        assert_eq!(source("query:u").extract(head, None).as_deref(), Some("q"));
    }
}
