//! Every way the request path can fail, and the one place each becomes an HTTP response.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};

use super::body::ResponseBody;
use crate::grpc;
use crate::route::AssignError;
use crate::upstream::{UpstreamError, UpstreamErrorKind};

pub use crate::metrics::CLIENT_CLOSED_REQUEST;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("abproxy is a reverse proxy: CONNECT tunnels are not served")]
    Connect,
    #[error("request body is larger than the {limit}-byte limit")]
    BodyTooLarge { limit: u64 },
    #[error("cannot read request body: {0}")]
    BodyRead(String),
    /// The client hung up before its request was whole; nobody reads the answer, but the
    /// request is still counted, as nginx does, with 499.
    #[error("the client closed the connection before sending its whole request: {0}")]
    ClientGone(String),
    /// The client stopped sending its request (`client_body_timeout`), or was still sending
    /// it when the answer was due: its own delay, answered 408 and never counted against the
    /// variant's upstream.
    #[error("request timeout: {0}")]
    ClientTimeout(String),
    #[error(transparent)]
    Assign(#[from] AssignError),
    #[error("cannot build upstream request: {0}")]
    BadTarget(#[from] http::Error),
    /// WebSocket and other `Upgrade`s are HTTP/1.1's; an h2/h2c upstream cannot take one.
    #[error("variant {0:?} reaches its upstream over HTTP/2, which has no HTTP/1.1 Upgrade (WebSocket); give it protocol = \"http1\" to pass upgrades through")]
    UpgradeOverHttp2(String),
    #[error("upstream of variant {variant:?} failed: {source}")]
    Upstream {
        variant: String,
        #[source]
        source: UpstreamError,
    },
}

impl ProxyError {
    /// The gRPC status a gRPC client gets. Only the upstream's failures get codes that count
    /// as the server's (`Unavailable`, `DeadlineExceeded`); what the client caused gets codes
    /// that are the client's, as a 4xx is.
    pub fn grpc_code(&self) -> grpc::Code {
        match self {
            ProxyError::Upstream { source, .. } if source.kind == UpstreamErrorKind::Timeout => {
                grpc::Code::DEADLINE_EXCEEDED
            }
            ProxyError::Upstream { .. } => grpc::Code::UNAVAILABLE,
            ProxyError::BodyTooLarge { .. } => grpc::Code::RESOURCE_EXHAUSTED,
            ProxyError::ClientGone(_) | ProxyError::ClientTimeout(_) => grpc::Code::CANCELLED,
            ProxyError::UpgradeOverHttp2(_) => grpc::Code::UNIMPLEMENTED,
            ProxyError::Connect
            | ProxyError::BodyRead(_)
            | ProxyError::Assign(_)
            | ProxyError::BadTarget(_) => grpc::Code::INVALID_ARGUMENT,
        }
    }

    /// A trailers-only gRPC answer: HTTP 200, the status in the head, no body.
    fn into_grpc_response(self) -> Response<ResponseBody> {
        let code = self.grpc_code();
        let mut response = Response::new(ResponseBody::full(Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(grpc::GRPC_STATUS.clone(), code.header_value());
        if let Ok(message) = HeaderValue::from_str(&grpc::percent_encode(&self.to_string())) {
            headers.insert(grpc::GRPC_MESSAGE.clone(), message);
        }
        response
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UpgradeOverHttp2(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::ClientGone(_) => CLIENT_CLOSED_REQUEST,
            ProxyError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BodyRead(_) | ProxyError::Assign(_) | ProxyError::BadTarget(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Upstream { source, .. } => match source.kind {
                UpstreamErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
                UpstreamErrorKind::Connect
                | UpstreamErrorKind::Reset
                | UpstreamErrorKind::Protocol
                | UpstreamErrorKind::Tls => StatusCode::BAD_GATEWAY,
            },
        }
    }

    /// The answer to the client: for a gRPC call, a gRPC status it can read; otherwise a
    /// small JSON body that says what went wrong and, once assigned, which variant it was.
    pub fn into_response(self, grpc: bool) -> Response<ResponseBody> {
        if grpc {
            return self.into_grpc_response();
        }
        let status = self.status();
        let mut body = serde_json::json!({ "error": self.to_string() });
        if let ProxyError::Upstream { variant, source } = &self {
            body["variant"] = variant.as_str().into();
            body["kind"] = source.kind.as_str().into();
        }
        let mut response = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}
