//! What abproxy needs to know of gRPC: which requests are gRPC calls, how to read the status
//! an answer ends with, and which statuses are the server's failures.
//!
//! gRPC answers HTTP 200 even when a call fails; the outcome is `grpc-status`, in the trailers
//! or, for an answer with no messages, in the headers ("trailers-only").

use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};

use crate::head::RequestHead;

pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// Whether a request is a gRPC call (`application/grpc`, `application/grpc+proto`, …).
/// gRPC-Web (`application/grpc-web…`) is not: its status travels inside the body, and to
/// abproxy it is an ordinary HTTP exchange.
pub fn is_call<'a>(head: impl Into<RequestHead<'a>>) -> bool {
    head.into().get(&CONTENT_TYPE).is_some_and(|value| {
        value
            .strip_prefix(b"application/grpc")
            .is_some_and(|rest| matches!(rest.first(), None | Some(b'+' | b';')))
    })
}

/// A gRPC status code (0 to 16); codes outside the spec's range are read as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code(u8);

impl Code {
    pub const OK: Code = Code(0);
    pub const CANCELLED: Code = Code(1);
    pub const UNKNOWN: Code = Code(2);
    pub const INVALID_ARGUMENT: Code = Code(3);
    pub const DEADLINE_EXCEEDED: Code = Code(4);
    pub const RESOURCE_EXHAUSTED: Code = Code(8);
    pub const UNIMPLEMENTED: Code = Code(12);
    pub const INTERNAL: Code = Code(13);
    pub const UNAVAILABLE: Code = Code(14);
    /// Slots a per-code table needs.
    pub const COUNT: usize = 17;

    /// The code in a `grpc-status` header or trailer, if there is one.
    pub fn of(headers: &HeaderMap) -> Option<Code> {
        headers.get(&GRPC_STATUS).map(Code::parse)
    }

    fn parse(value: &HeaderValue) -> Code {
        std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|text| text.trim().parse::<u8>().ok())
            .filter(|&code| usize::from(code) < Self::COUNT)
            .map_or(Code::UNKNOWN, Code)
    }

    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    pub fn from_index(index: usize) -> Code {
        u8::try_from(index)
            .ok()
            .filter(|&code| usize::from(code) < Self::COUNT)
            .map_or(Code::UNKNOWN, Code)
    }

    /// Whether the call failed on the server's side: the variant's failure, as a 5xx is.
    /// The codes a client causes (a bad argument, a missing permission, a cancelled call)
    /// are its own, as a 4xx is, and never count against the variant.
    pub fn is_server_failure(self) -> bool {
        matches!(self.0, 2 | 4 | 12 | 13 | 14 | 15)
    }

    /// The name go-grpc-prometheus and grpc-go use, for the `grpc_code` label.
    pub fn name(self) -> &'static str {
        const NAMES: [&str; Code::COUNT] = [
            "OK",
            "Canceled",
            "Unknown",
            "InvalidArgument",
            "DeadlineExceeded",
            "NotFound",
            "AlreadyExists",
            "PermissionDenied",
            "ResourceExhausted",
            "FailedPrecondition",
            "Aborted",
            "OutOfRange",
            "Unimplemented",
            "Internal",
            "Unavailable",
            "DataLoss",
            "Unauthenticated",
        ];
        NAMES[self.index()]
    }

    /// The code a `grpc_code` label names.
    pub fn named(name: &str) -> Option<Code> {
        (0..Self::COUNT)
            .map(Code::from_index)
            .find(|code| code.name() == name)
    }

    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from(u16::from(self.0))
    }
}

/// `grpc-message` is percent-encoded: printable ASCII but `%` passes, the rest is `%XX`.
pub fn percent_encode(message: &str) -> String {
    use std::fmt::Write;
    message
        .bytes()
        .fold(String::with_capacity(message.len()), |mut out, byte| {
            if (0x20..=0x7e).contains(&byte) && byte != b'%' {
                out.push(char::from(byte));
            } else {
                let _ = write!(out, "%{byte:02X}");
            }
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(value: &'static str) -> Option<Code> {
        let mut headers = HeaderMap::new();
        headers.insert(&GRPC_STATUS, HeaderValue::from_static(value));
        Code::of(&headers)
    }

    #[test]
    fn a_status_is_read_from_its_header_and_anything_unreadable_is_unknown() {
        assert_eq!(status("0"), Some(Code::OK));
        assert_eq!(status("13"), Some(Code::INTERNAL));
        assert_eq!(status("99"), Some(Code::UNKNOWN));
        assert_eq!(status("internal"), Some(Code::UNKNOWN));
        assert_eq!(Code::of(&HeaderMap::new()), None);
    }

    #[test]
    fn server_failures_count_and_client_errors_do_not() {
        let failures: Vec<&str> = (0..Code::COUNT)
            .map(Code::from_index)
            .filter(|code| code.is_server_failure())
            .map(Code::name)
            .collect();
        assert_eq!(
            failures,
            [
                "Unknown",
                "DeadlineExceeded",
                "Unimplemented",
                "Internal",
                "Unavailable",
                "DataLoss"
            ]
        );
    }

    #[test]
    fn messages_are_percent_encoded_as_grpc_says() {
        assert_eq!(
            percent_encode("upstream 100% down: é"),
            "upstream 100%25 down: %C3%A9"
        );
    }

    #[test]
    fn grpc_calls_are_told_by_their_content_type() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let call =
            |headers: &HeaderMap| is_call(RequestHead::new(&Default::default(), headers, None));
        assert!(call(&headers));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!call(&headers));
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web+proto"),
        );
        assert!(!call(&headers), "gRPC-Web carries its status in the body");
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        assert!(call(&headers));
    }
}
