//! A head's fields as the parser found them, kept as offsets: the buffer is split off once
//! the parser lets go of it, and the values share its bytes (no copy, one reference count).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

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
        *span = Span {
            name: within(buffer, field.name.as_bytes()),
            value: within(buffer, field.value),
        };
    }
    &spans[..fields.len().min(spans.len())]
}

/// Appends the fields at `spans` of `bytes` (the buffer they were parsed from, split off
/// and frozen) to `headers`.
pub(crate) fn fill(
    headers: &mut HeaderMap,
    bytes: &Bytes,
    spans: &[Span],
) -> Result<(), InvalidField> {
    let range = |(start, end): (u32, u32)| start as usize..end as usize;
    for span in spans {
        let name =
            HeaderName::from_bytes(&bytes[range(span.name)]).map_err(|_| InvalidField::Name)?;
        let Ok(value) = HeaderValue::from_maybe_shared(bytes.slice(range(span.value))) else {
            return Err(InvalidField::Value(name));
        };
        headers.append(name, value);
    }
    Ok(())
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
}
