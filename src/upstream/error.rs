//! What an upstream's failures mean: for the metrics' `kind` label and the client's status.

use std::error::Error as _;

use super::upload::UploadError;

/// Why an exchange brought no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// No connection could be had (refused, timed out, TLS refused): no byte of the request
    /// reached the upstream, so another variant may serve it. Here it is, untouched. (Within
    /// `upstream`, also an idempotent request that a reused connection lost before any
    /// answer, to be sent again on a fresh one.)
    #[error("{source}")]
    NotSent {
        source: UpstreamError,
        request: Unsent,
    },
    /// The client hung up mid-upload while its body streamed upstream: not the upstream's
    /// failure, and not counted as one.
    #[error("the client closed the connection during its upload: {0}")]
    ClientGone(String),
    /// The client's streamed body was malformed (bad chunked encoding, say).
    #[error("the client's request body failed: {0}")]
    ClientBody(String),
    /// The client stopped sending its body for longer than `client_body_timeout`.
    #[error("{0}")]
    ClientStalled(String),
}

/// Why an upstream's answer ended early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The client's upload, still streaming beside the answer, failed: its doing, not the
    /// upstream's.
    #[error("{0}")]
    Client(String),
}

/// A request that was never sent, given back.
pub struct Unsent(pub Box<http::Request<super::UpstreamBody>>);

impl std::fmt::Debug for Unsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Unsent({} {})", self.0.method(), self.0.uri())
    }
}

impl SendError {
    pub(super) fn not_sent(
        source: UpstreamError,
        request: http::Request<super::UpstreamBody>,
    ) -> SendError {
        SendError::NotSent {
            source,
            request: Unsent(Box::new(request)),
        }
    }

    pub(super) fn from_hyper(err: &hyper::Error) -> SendError {
        // The request body is the client's `Upload` or an infallible `Full`, so an upload
        // error among the causes is the client's doing, not the upstream's.
        let mut source = err.source();
        while let Some(cause) = source {
            match cause.downcast_ref::<UploadError>() {
                Some(upload) => return SendError::client(upload),
                None => source = cause.source(),
            }
        }
        SendError::Upstream(UpstreamError::from_hyper(err))
    }

    /// The client's upload failed on its way upstream: the client's doing, never the
    /// upstream's.
    pub(super) fn client(err: &UploadError) -> SendError {
        match err {
            UploadError::Stalled(_) => SendError::ClientStalled(err.to_string()),
            UploadError::Read(read) if client_went_away(read) => {
                SendError::ClientGone(err.to_string())
            }
            UploadError::Read(_) => SendError::ClientBody(err.to_string()),
        }
    }
}

/// A failed exchange with an upstream, classified for metrics and status codes.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {detail}", kind.as_str())]
pub struct UpstreamError {
    pub kind: UpstreamErrorKind,
    pub detail: String,
}

impl UpstreamError {
    pub(super) fn from_hyper(err: &hyper::Error) -> UpstreamError {
        let mut detail = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            detail.push_str(": ");
            detail.push_str(&cause.to_string());
            source = cause.source();
        }
        UpstreamError {
            kind: classify(err),
            detail,
        }
    }

    pub(super) fn no_response_within(timeout: std::time::Duration) -> UpstreamError {
        UpstreamError {
            kind: UpstreamErrorKind::Timeout,
            detail: format!("no response within {}", humantime::format_duration(timeout)),
        }
    }

    pub(super) fn closed() -> UpstreamError {
        UpstreamError {
            kind: UpstreamErrorKind::Connect,
            detail: "the upstream's connection pool is closed".into(),
        }
    }
}

fn classify(err: &hyper::Error) -> UpstreamErrorKind {
    if err.is_incomplete_message() || err.is_canceled() || err.is_closed() {
        return UpstreamErrorKind::Reset;
    }
    if err.is_timeout() {
        return UpstreamErrorKind::Timeout;
    }
    let mut source = err.source();
    while let Some(cause) = source {
        let io = cause.downcast_ref::<std::io::Error>();
        if let Some(kind) = io.and_then(io_failure_kind) {
            return kind;
        }
        source = cause.source();
    }
    UpstreamErrorKind::Protocol
}

/// What an I/O failure on an upstream connection says of the upstream, when it says
/// anything: TLS refused, the connection closed under it, or a timeout.
pub(super) fn io_failure_kind(io: &std::io::Error) -> Option<UpstreamErrorKind> {
    if super::tls::is_tls_failure(io) {
        Some(UpstreamErrorKind::Tls)
    } else if connection_closed(io) {
        Some(UpstreamErrorKind::Reset)
    } else if io.kind() == std::io::ErrorKind::TimedOut {
        Some(UpstreamErrorKind::Timeout)
    } else {
        None
    }
}

/// Whether a client body error means the client's connection closed under it (a 499), rather
/// than a body that was malformed (a 400).
pub(crate) fn client_went_away(err: &(dyn std::error::Error + 'static)) -> bool {
    let Some(err) = err.downcast_ref::<hyper::Error>() else {
        return false;
    };
    let cause = std::error::Error::source(err);
    err.is_incomplete_message()
        || err.is_closed()
        || cause
            .and_then(|cause| cause.downcast_ref::<std::io::Error>())
            .is_some_and(connection_closed)
        // An h2c client resets its stream, goes away, or drops the connection.
        || cause
            .and_then(|cause| cause.downcast_ref::<h2::Error>())
            .is_some_and(|h2| (h2.is_remote() && (h2.is_reset() || h2.is_go_away())) || h2.is_io())
}

/// An I/O error that means the peer closed or reset the connection, whichever peer it was.
pub(crate) fn connection_closed(io: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(
        io.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

/// Why an upstream exchange failed, as the `kind` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect = 0,
    Timeout = 1,
    Reset = 2,
    Protocol = 3,
    /// The TLS handshake or session failed: a certificate refused either way, an alert.
    Tls = 4,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 5] = [
        Self::Connect,
        Self::Timeout,
        Self::Reset,
        Self::Protocol,
        Self::Tls,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Protocol => "protocol",
            Self::Tls => "tls",
        }
    }
}
