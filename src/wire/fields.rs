//! A head's fields as the parser found them, kept as offsets: the buffer is split off once
//! the parser lets go of it, and the values share its bytes (no copy, one reference count).

use std::cell::RefCell;

use bytes::Bytes;
use http::header::InvalidHeaderName;
use http::{HeaderMap, HeaderName, HeaderValue};

/// How many `x-` names a thread keeps: a client's and its upstreams' own few, and no more
/// whatever names a client makes up.
const MOST_KEPT: usize = 16;

thread_local! {
    static KEPT: RefCell<Vec<HeaderName>> = const { RefCell::new(Vec::new()) };
}

/// Where a field's name and value lie in the buffer it was parsed from.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

/// A field the parser took and `http` does not.
#[derive(Debug)]
pub(crate) enum InvalidField {
    Name,
    Value(HeaderName),
}

/// A head's fields as its sender sent them: the head, split off the read buffer after the
/// parser accepted it, and where each field lies. An upstream's answer, or a client's
/// request, passed through is written out from these, where a map would cost a name parse,
/// a hashed insert and a reference count a field.
#[derive(Debug)]
pub(crate) struct Fields {
    head: Bytes,
    spans: Box<[Span]>,
}

/// One field of a head as it came.
pub(crate) struct Field<'a> {
    /// In the case it came in.
    pub name: &'a [u8],
    pub value: &'a [u8],
    /// Name to value, with the whitespace between them as sent: copied whole when the field
    /// is passed on.
    pub line: &'a [u8],
}

impl Fields {
    /// `spans`: where the fields of `head` lie.
    pub(crate) fn new(head: Bytes, spans: Box<[Span]>) -> Fields {
        Fields { head, spans }
    }

    /// The fields in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Field<'_>> + '_ {
        self.spans.iter().map(|span| Field {
            name: &self.head[range(span.name)],
            value: &self.head[range(span.value)],
            line: &self.head[range((span.name.0, span.value.1))],
        })
    }

    /// The value of the first field named `name` (in any case).
    pub(crate) fn value(&self, name: &HeaderName) -> Option<&[u8]> {
        let name = name.as_str().as_bytes();
        let span = self
            .spans
            .iter()
            .find(|span| self.head[range(span.name)].eq_ignore_ascii_case(name))?;
        Some(&self.head[range(span.value)])
    }

    /// The values of the fields named `name` (in any case), in order.
    pub(crate) fn values<'s, 'n>(
        &'s self,
        name: &'n HeaderName,
    ) -> impl Iterator<Item = &'s [u8]> + 'n
    where
        's: 'n,
    {
        self.iter()
            .filter(move |field| super::is_named(field.name, name))
            .map(|field| field.value)
    }

    /// The fields appended to `headers`, for a writer or reader that takes a map: values
    /// share the head's bytes.
    pub(crate) fn append_to(&self, headers: &mut HeaderMap) {
        self.append_those_to(headers, |_| true);
    }

    /// `append_to`, of the fields whose name `keep` keeps.
    pub(crate) fn append_those_to(&self, headers: &mut HeaderMap, keep: impl Fn(&[u8]) -> bool) {
        headers.reserve(self.spans.len());
        for Field { name, value, .. } in self.iter().filter(|field| keep(field.name)) {
            // The parser checks names and values as `http` does: neither fails here, but for
            // a name over 64 KiB (in a head read whole in one large read).
            let (Ok(name), Ok(value)) = (
                field_name(name),
                HeaderValue::from_maybe_shared(self.head.slice_ref(value)),
            ) else {
                tracing::debug!(field = %String::from_utf8_lossy(name), "field dropped: not a valid header");
                continue;
            };
            headers.append(name, value);
        }
    }
}

#[cfg(test)]
impl Fields {
    /// The fields of a request head, as abproxy's server keeps them.
    pub(crate) fn of_request(head: &'static [u8]) -> Fields {
        let mut fields = [httparse::EMPTY_HEADER; 16];
        let mut request = httparse::Request::new(&mut fields);
        request.parse(head).expect("a request head");
        let mut spans = [Span::default(); 16];
        let spans = locate(head, request.headers, &mut spans);
        Fields::new(Bytes::from_static(head), spans.into())
    }
}

/// Where `part`, a slice of `whole`, lies in it.
pub(crate) fn within(whole: &[u8], part: &[u8]) -> (u32, u32) {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    let offset = |at: usize| u32::try_from(at).unwrap_or(u32::MAX);
    (offset(start), offset(start + part.len()))
}

/// Notes where each of `fields` (parsed from `buffer`) lies, in `spans`.
pub(crate) fn locate<'s>(
    buffer: &[u8],
    fields: &[httparse::Header<'_>],
    spans: &'s mut [Span],
) -> &'s [Span] {
    for (span, field) in spans.iter_mut().zip(fields) {
        *span = Span::of(buffer, field);
    }
    &spans[..fields.len().min(spans.len())]
}

impl Span {
    /// Where `field`, parsed from `buffer`, lies in it.
    pub(crate) fn of(buffer: &[u8], field: &httparse::Header<'_>) -> Span {
        Span {
            name: within(buffer, field.name.as_bytes()),
            value: within(buffer, field.value),
        }
    }
}

/// Appends the fields at `spans` of `bytes` (the buffer they were parsed from, split off
/// and frozen) to `headers`.
pub(crate) fn fill(
    headers: &mut HeaderMap,
    bytes: &Bytes,
    spans: &[Span],
) -> Result<(), InvalidField> {
    for span in spans {
        let name = field_name(&bytes[range(span.name)]).map_err(|_| InvalidField::Name)?;
        let Ok(value) = HeaderValue::from_maybe_shared(bytes.slice(range(span.value))) else {
            return Err(InvalidField::Value(name));
        };
        headers.append(name, value);
    }
    Ok(())
}

fn range((start, end): (u32, u32)) -> std::ops::Range<usize> {
    start as usize..end as usize
}

/// A field's name. `http` knows the standard names; any other it copies into an allocation
/// of its own. Names of the `x-` kind (`x-user-id`, `x-request-id`) come with most requests:
/// those a thread has seen are cloned from its few kept ones, a reference count.
fn field_name(raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
    if !raw
        .get(..2)
        .is_some_and(|start| start.eq_ignore_ascii_case(b"x-"))
    {
        return HeaderName::from_bytes(raw);
    }
    KEPT.with_borrow_mut(|kept| {
        // Names are kept lowercased; one that matches in any case is the same name.
        let same = |name: &&HeaderName| super::is_named(raw, name);
        if let Some(name) = kept.iter().find(same) {
            return Ok(name.clone());
        }
        let name = HeaderName::from_bytes(raw)?;
        if kept.len() < MOST_KEPT {
            kept.push(name.clone());
        }
        Ok(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_again_in_the_frozen_buffer_sharing_its_bytes() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Tag: a\r\nx-tag: b\r\n\r\n";
        let mut fields = [httparse::EMPTY_HEADER; 8];
        let mut response = httparse::Response::new(&mut fields);
        response.parse(head).expect("a head");
        let mut spans = [Span::default(); 8];
        let spans = locate(head, response.headers, &mut spans);
        let bytes = Bytes::from_static(head);
        let mut headers = HeaderMap::new();
        fill(&mut headers, &bytes, spans).expect("valid fields");
        assert_eq!(headers["content-type"], "text/plain");
        let tags: Vec<_> = headers.get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"]);
    }

    #[test]
    fn kept_names_match_in_any_case_and_made_up_ones_are_not_kept_past_the_limit() {
        assert_eq!(field_name(b"X-User-Id").expect("valid"), "x-user-id");
        assert_eq!(field_name(b"x-USER-id").expect("valid"), "x-user-id");
        assert!(field_name(b"x-bad name").is_err());
        for made_up in 0..100 {
            let name = format!("x-made-up-{made_up}");
            assert_eq!(field_name(name.as_bytes()).expect("valid"), name.as_str());
        }
        KEPT.with_borrow(|kept| assert_eq!(kept.len(), MOST_KEPT));
        assert_eq!(field_name(b"x-made-up-99").expect("valid"), "x-made-up-99");
        assert_eq!(field_name(b"Content-Type").expect("valid"), "content-type");
    }
}
