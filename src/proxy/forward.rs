//! Rewrites a client request for its upstream and the upstream's response for the client.
//!
//! RFC 9110 §7.6.1: hop-by-hop headers, and any header the `Connection` header names, describe
//! one connection and must not cross the proxy in either direction.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Version};

use crate::upstream::{Appended, Upstream, UpstreamBody};
use crate::wire::{self, names_listed_in, Fields};

static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// The client end of a connection, with its forwarding fields made once per connection
/// rather than once per request.
#[derive(Debug, Clone)]
pub struct Peer {
    /// `X-Forwarded-For` (the client's address) and `X-Forwarded-Proto` (how it reached
    /// abproxy), in that order: a request is given all, one or none of them.
    forwarding: [(HeaderName, HeaderValue); 2],
}

impl Peer {
    /// A client on plain HTTP (or h2c).
    pub fn new(addr: SocketAddr) -> Peer {
        Peer::with_proto(addr, "http")
    }

    /// A client whose TLS abproxy terminated.
    pub fn over_tls(addr: SocketAddr) -> Peer {
        Peer::with_proto(addr, "https")
    }

    fn with_proto(addr: SocketAddr, proto: &'static str) -> Peer {
        let forwarded_for = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Peer {
            forwarding: [
                (X_FORWARDED_FOR.clone(), forwarded_for),
                (X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto)),
            ],
        }
    }

    fn forwarded_for(&self) -> &HeaderValue {
        &self.forwarding[0].1
    }
}

/// A copy of a client request's head, kept while its variant has a fallback: the request
/// sent to the first upstream was rewritten for it, and the fallback's needs the original.
pub struct ClientHead {
    method: http::Method,
    uri: http::Uri,
    version: Version,
    headers: HeaderMap,
}

impl ClientHead {
    pub fn copy(parts: &Parts) -> ClientHead {
        ClientHead {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    pub fn into_parts(self) -> Parts {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method;
        parts.uri = self.uri;
        parts.version = self.version;
        parts.headers = self.headers;
        parts
    }
}

/// Turns the client's request into the one sent to `upstream`, with the fields written after
/// its map's. `grpc_call`: the request is a gRPC call (as the tally found when it began; its
/// content-type is read once).
pub fn upstream_request<'c>(
    mut parts: Parts,
    lines: Option<&'c Fields>,
    body: UpstreamBody,
    upstream: &Upstream,
    client: &'c Peer,
    preserve_host: bool,
    grpc_call: bool,
) -> Result<(Request<UpstreamBody>, Appended<'c>), http::Error> {
    let headers = &mut parts.headers;
    // The lines go on as they came only to an HTTP/1.1 upstream that gets the client's `Host`;
    // hyper's HTTP/2 client and a `Host` of abproxy's own take the map.
    let lines = match lines {
        Some(lines) if upstream.is_http2() || !preserve_host => {
            lines.append_to(headers);
            None
        }
        lines => lines,
    };
    let mut present = Present::in_map(headers);
    if let Some(lines) = lines {
        present.note_lines(lines);
    }
    if present.hop_by_hop {
        // gRPC requires `te: trailers` end to end (it tells servers the client reads
        // trailers).
        let keeps_te = grpc_call
            && headers
                .get(header::TE)
                .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
        remove_present_hop_by_hop(headers);
        if keeps_te {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        // `Connection` may have named any field.
        present = Present::in_map(headers);
    }
    let host = if !preserve_host {
        Some(upstream.host().clone())
    } else if present.host {
        None
    } else {
        // HTTP/2 clients send the authority as a pseudo-header, not as `Host`; an HTTP/1.0
        // client may send neither, and an HTTP/1.1 upstream needs one.
        Some(
            parts
                .uri
                .authority()
                .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
                .unwrap_or_else(|| upstream.host().clone()),
        )
    };
    if upstream.is_http2() {
        // HTTP/2 names the host in `:authority` alone.
        let host = match host {
            Some(host) => host,
            None => headers
                .remove(header::HOST)
                .unwrap_or_else(|| upstream.host().clone()),
        };
        headers.remove(header::HOST);
        parts.uri = upstream.uri_for(parts.uri.path_and_query(), &host)?;
        parts.version = Version::HTTP_2;
    } else {
        parts.uri = upstream.uri_for(parts.uri.path_and_query(), upstream.host())?;
        parts.version = Version::HTTP_11;
        if let Some(host) = host {
            headers.insert(header::HOST, host);
        }
    }
    let appended = Appended {
        lines,
        fields: forwarding(&mut parts.headers, &present, client),
        // The lines' own `X-Forwarded-For` goes on as one line, with the client appended.
        folded: present
            .forwarded_for_in_lines
            .then(|| &client.forwarding[0]),
    };
    Ok((Request::from_parts(parts, body), appended))
}

/// What one pass over a request's field names finds: most requests carry no hop-by-hop
/// field and no forwarding field, and a pass over the few names present costs less than a
/// hashed lookup for each name looked for.
#[derive(Default)]
struct Present {
    /// In the map: fields that came as lines are filtered as they are written.
    hop_by_hop: bool,
    /// An `X-Forwarded-For` among the fields that came as lines.
    forwarded_for_in_lines: bool,
    host: bool,
    forwarded_for: bool,
    forwarded_proto: bool,
}

impl Present {
    fn in_map(headers: &HeaderMap) -> Present {
        let mut present = Present::default();
        for name in headers.keys() {
            present.hop_by_hop |= is_hop_by_hop(name);
            present.host |= name == header::HOST;
            present.forwarded_for |= name == X_FORWARDED_FOR;
            present.forwarded_proto |= name == X_FORWARDED_PROTO;
        }
        present
    }

    /// Notes the fields that came as lines.
    fn note_lines(&mut self, lines: &Fields) {
        for field in lines.iter() {
            self.host |= wire::is_named(field.name, &header::HOST);
            self.forwarded_for_in_lines |= wire::is_named(field.name, &X_FORWARDED_FOR);
            self.forwarded_proto |= wire::is_named(field.name, &X_FORWARDED_PROTO);
        }
    }
}

/// `X-Forwarded-For` with the client appended, and `X-Forwarded-Proto` unless a load balancer
/// in front that terminated TLS has said `https` already (its word is kept). Most requests
/// carry neither: both are then written after the map's fields rather than inserted. A
/// client's own `X-Forwarded-For` is folded in the map, or by the writer when it came as
/// lines (`Appended::folded`).
fn forwarding<'c>(
    headers: &mut HeaderMap,
    present: &Present,
    client: &'c Peer,
) -> &'c [(HeaderName, HeaderValue)] {
    if present.forwarded_for {
        append_forwarded_for(headers, client);
    }
    let [for_field, proto_field] = &client.forwarding;
    let forwarded_for = present.forwarded_for || present.forwarded_for_in_lines;
    match (forwarded_for, present.forwarded_proto) {
        (false, false) => &client.forwarding,
        (false, true) => std::slice::from_ref(for_field),
        (true, false) => std::slice::from_ref(proto_field),
        (true, true) => &[],
    }
}

/// Strips the upstream's connection-level headers before the response goes to the client.
pub fn client_response_headers(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers);
}

/// One of `HOP_BY_HOP`.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    wire::is_hop_by_hop(name.as_str().as_bytes())
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the few names present costs less than a hashed
    // lookup for each of the eight (callgrind: 800 → 290 instructions a call, two a request).
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    remove_present_hop_by_hop(headers);
}

/// `remove_hop_by_hop` for a map known to hold one at least.
fn remove_present_hop_by_hop(headers: &mut HeaderMap) {
    // `Connection: keep-alive` or `close` name nothing else to drop: skip the scan.
    let names_fields = headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|value| wire::names_fields(value.as_bytes()));
    if names_fields {
        for name in names_listed_in(headers, &header::CONNECTION) {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends the client to `X-Forwarded-For`, folding earlier lines of it into one.
fn append_forwarded_for(headers: &mut HeaderMap, client: &Peer) {
    let mut value = Vec::new();
    let earlier = headers.get_all(&X_FORWARDED_FOR).into_iter();
    wire::fold(
        &mut value,
        earlier.map(HeaderValue::as_bytes),
        client.forwarded_for().as_bytes(),
    );
    let value = HeaderValue::from_bytes(&value).unwrap_or_else(|_| client.forwarded_for().clone());
    headers.insert(&X_FORWARDED_FOR, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_and_standard_hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret-hop"),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-end-to-end", HeaderValue::from_static("kept"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-end-to-end"));
    }

    #[test]
    fn the_hop_by_hop_match_names_exactly_the_hop_by_hop_headers() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in ["host", "content-type", "x-user-id", "trailer", "tee"] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn every_connection_header_line_is_honoured() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("x-first, x-second"),
        );
        headers.insert("x-first", HeaderValue::from_static("1"));
        headers.insert("x-second", HeaderValue::from_static("2"));
        headers.insert("x-kept", HeaderValue::from_static("3"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn several_forwarded_for_lines_become_one() {
        let mut headers = HeaderMap::new();
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        append_forwarded_for(
            &mut headers,
            &Peer::new("127.0.0.1:5000".parse().expect("addr")),
        );
        let lines: Vec<_> = headers.get_all(&X_FORWARDED_FOR).iter().collect();
        assert_eq!(lines, ["10.0.0.1, 10.0.0.2, 127.0.0.1"]);
    }

    /// The names `forwarding` leaves to the writer, and the map's forwarding fields after it.
    fn forwarded(headers: &[(&'static str, &'static str)]) -> (Vec<String>, Vec<String>) {
        let client = Peer::over_tls("10.9.8.7:5000".parse().expect("addr"));
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_static(value));
        }
        let present = Present::in_map(&map);
        let written = forwarding(&mut map, &present, &client);
        let names = written.iter().map(|(name, _)| name.to_string()).collect();
        let kept = map
            .iter()
            .map(|(name, value)| format!("{name}: {}", value.to_str().expect("ascii")))
            .collect();
        (names, kept)
    }

    #[test]
    fn forwarding_fields_are_left_to_the_writer_unless_the_client_sent_its_own() {
        let (written, kept) = forwarded(&[]);
        assert_eq!(written, ["x-forwarded-for", "x-forwarded-proto"]);
        assert!(kept.is_empty(), "{kept:?}");

        let (written, kept) = forwarded(&[("x-forwarded-for", "192.0.2.1")]);
        assert_eq!(written, ["x-forwarded-proto"]);
        assert_eq!(kept, ["x-forwarded-for: 192.0.2.1, 10.9.8.7"]);

        // A load balancer that terminated TLS said how the client came: its word stands.
        let (written, kept) = forwarded(&[("x-forwarded-proto", "https")]);
        assert_eq!(written, ["x-forwarded-for"]);
        assert_eq!(kept, ["x-forwarded-proto: https"]);

        let both = [
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-proto", "http"),
        ];
        let (written, kept) = forwarded(&both);
        assert!(written.is_empty(), "{written:?}");
        assert_eq!(
            kept,
            [
                "x-forwarded-for: 192.0.2.1, 10.9.8.7",
                "x-forwarded-proto: http"
            ]
        );
    }

    #[test]
    fn forwarded_for_is_appended_not_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.1.2.3"));
        append_forwarded_for(
            &mut headers,
            &Peer::new("127.0.0.1:5000".parse().expect("addr")),
        );
        assert_eq!(headers[&X_FORWARDED_FOR], "10.1.2.3, 127.0.0.1");
    }
}
