//! One upstream's pooled keep-alive client, and what its failures mean.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::detach;
use crate::config;
use crate::metrics::UpstreamErrorKind;

/// What abproxy sends upstream: the client's body streamed through, or one it buffered.
pub type UpstreamBody = Either<Incoming, Full<Bytes>>;

/// How long an idle upstream connection stays in the pool.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A pooled client for one upstream base URL.
///
/// Generations share it by `Arc` while the upstream and connect timeout stay the same,
/// so a reload keeps warm connections; it is dropped with the last generation using it.
#[derive(Debug)]
pub struct Upstream {
    target: config::Upstream,
    connect_timeout: Duration,
    max_connections: usize,
    /// One permit per request in flight, held until its response body is done.
    connections: Arc<Semaphore>,
    client: Client<HttpConnector, UpstreamBody>,
}

impl Upstream {
    pub fn new(target: config::Upstream, limits: &config::Limits) -> Upstream {
        let connect_timeout = limits.connect_timeout;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Upstream {
            target,
            connect_timeout,
            max_connections: limits.max_upstream_connections,
            connections: Arc::new(Semaphore::new(limits.max_upstream_connections)),
            client,
        }
    }

    /// Whether this client can serve `target` unchanged, so a reload may keep it.
    pub fn serves(&self, target: &config::Upstream, limits: &config::Limits) -> bool {
        &self.target == target
            && self.connect_timeout == limits.connect_timeout
            && self.max_connections == limits.max_upstream_connections
    }

    pub fn target(&self) -> &config::Upstream {
        &self.target
    }

    /// The upstream URI for a client request's path and query.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let builder = Uri::builder()
            .scheme(self.target.scheme.clone())
            .authority(self.target.authority.clone());
        match path_and_query {
            // The common case shares the client's bytes: no copy, no re-parse.
            Some(path_and_query) if self.target.path_prefix.is_empty() => {
                builder.path_and_query(path_and_query.clone()).build()
            }
            _ => {
                let path_and_query = path_and_query.map_or("/", PathAndQuery::as_str);
                builder
                    .path_and_query(format!("{}{path_and_query}", self.target.path_prefix))
                    .build()
            }
        }
    }

    /// Sends `request` and waits at most `timeout` for a free connection and the response
    /// head. The permit returned with the response holds the connection's place until the
    /// caller has finished with the body.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
        timeout: Duration,
    ) -> Result<(Response<Incoming>, OwnedSemaphorePermit), UpstreamError> {
        let exchange = async {
            let (permit, request) = match self.connections.clone().try_acquire_owned() {
                Ok(permit) => (Ok(permit), request),
                Err(_) => {
                    let request = detach(request);
                    (self.connections.clone().acquire_owned().await, request)
                }
            };
            let response = self.client.request(request).await;
            (permit, response)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok((Ok(permit), Ok(response))) => Ok((response, permit)),
            Ok((_, Err(err))) => Err(UpstreamError::from_client(&err)),
            Ok((Err(_), Ok(_))) => unreachable!("the connection semaphore is never closed"),
            Err(_) => Err(UpstreamError {
                kind: UpstreamErrorKind::Timeout,
                detail: format!("no response within {}", humantime::format_duration(timeout)),
            }),
        }
    }
}

/// Copies the URI and headers of a request that must queue for a connection, so that while
/// it waits it does not pin its client connection's read buffer (see `detach`).
fn detach(mut request: Request<UpstreamBody>) -> Request<UpstreamBody> {
    if let Some(path_and_query) = request.uri().path_and_query() {
        let mut parts = request.uri().clone().into_parts();
        parts.path_and_query = Some(detach::path_and_query(path_and_query));
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    *request.headers_mut() = detach::headers(request.headers());
    request
}

/// A failed exchange with an upstream, classified for metrics and status codes.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {detail}", kind.as_str())]
pub struct UpstreamError {
    pub kind: UpstreamErrorKind,
    pub detail: String,
}

impl UpstreamError {
    fn from_client(err: &hyper_util::client::legacy::Error) -> UpstreamError {
        let kind = classify(err);
        let mut detail = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            detail.push_str(": ");
            detail.push_str(&cause.to_string());
            source = cause.source();
        }
        UpstreamError { kind, detail }
    }
}

fn classify(err: &hyper_util::client::legacy::Error) -> UpstreamErrorKind {
    if err.is_connect() {
        return UpstreamErrorKind::Connect;
    }
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ) {
                return UpstreamErrorKind::Reset;
            }
            if io.kind() == TimedOut {
                return UpstreamErrorKind::Timeout;
            }
        }
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed() {
                return UpstreamErrorKind::Reset;
            }
            if hyper.is_timeout() {
                return UpstreamErrorKind::Timeout;
            }
        }
        source = cause.source();
    }
    UpstreamErrorKind::Protocol
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detached_request_keeps_its_uri_headers_and_their_sensitivity() {
        let mut request = Request::post("http://model:8501/v1/predict?user=a%20b")
            .header("x-user-id", "alice")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(Either::Right(Full::new(Bytes::from_static(b"{}"))))
            .expect("request");
        if let Some(user) = request.headers_mut().get_mut("x-user-id") {
            user.set_sensitive(true);
        }
        let (uri, headers) = (request.uri().clone(), request.headers().clone());
        let (after, _) = detach(request).into_parts();
        assert_eq!(after.uri, uri);
        assert_eq!(after.headers, headers);
        assert!(after.headers["x-user-id"].is_sensitive());
    }
}
