//! The client side: one upstream's connections (a pool of keep-alive HTTP/1.1 connections, or
//! a few multiplexed HTTP/2 ones), how they are opened (`connect`), and what their failures
//! mean (`error`). Routing and shadows use it; it knows nothing of either.
//!
//! A pool of its own rather than hyper-util's client: one upstream per pool means no pool map
//! and key hashing per request, and an HTTP/1.1 connection goes back to the pool when its
//! response body ends, where hyper-util spawns a task per request to wait for that. HTTP/1.1
//! exchanges run in the request's own future (`http1`); HTTP/2 and upgrades use hyper's
//! client connections.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use http_body::{Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::{self, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout_at, Instant};

mod connect;
mod error;
mod http1;
mod idle;
mod multiplex;
mod tls;
mod upload;

pub(crate) use error::client_went_away;
use error::io_failure_kind;
pub use error::{BodyError, SendError, Unsent, UpstreamError, UpstreamErrorKind};
pub use idle::PauseTimer;
pub use tls::{ClientTls, TlsError, TlsSettings};
pub use upload::{Upload, UploadError, UploadProgress};

use crate::config::{self, Protocol};
use crate::detach;
use crate::wire::{self, Fields};
use connect::dial;
use multiplex::{Multiplexed, Returnable};

/// What abproxy sends upstream: the client's body streamed through, or one it buffered.
pub type UpstreamBody = Either<Upload, Full<Bytes>>;

/// How often an idle HTTP/2 connection is pinged, so a dead peer is found and replaced
/// before a request is sent on it.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// A connection pool for one upstream base URL.
///
/// Generations share it by `Arc` while the upstream and connect timeout stay the same,
/// so a reload keeps warm connections; it is dropped with the last generation using it.
pub struct Upstream {
    target: config::Upstream,
    connect_timeout: Duration,
    max_connections: usize,
    /// One permit per request in flight, held until its response body is done.
    connections: Arc<Semaphore>,
    transport: Transport,
    /// `Host` for requests that do not keep the client's: the authority, default port left out.
    host: HeaderValue,
}

/// How requests reach the upstream.
enum Transport {
    /// A connection per request in flight, kept alive between requests; hyper's builder
    /// for the connections that may be upgraded.
    Http1 {
        idle: Arc<http1::Pool>,
        builder: conn::http1::Builder,
    },
    /// Requests multiplexed over a few connections.
    Http2 {
        connections: Multiplexed,
        builder: http2::Builder<TokioExecutor>,
    },
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("target", &self.target)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub fn new(target: config::Upstream, limits: &config::Limits) -> Upstream {
        let authority = &target.authority;
        let default_port = if target.tls.is_some() { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port == default_port => HeaderValue::from_str(authority.host()),
            _ => HeaderValue::from_str(authority.as_str()),
        }
        // An authority is always a valid header value; this only satisfies the types.
        .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Upstream {
            host,
            connect_timeout: limits.connect_timeout,
            max_connections: limits.max_upstream_connections,
            connections: Arc::new(Semaphore::new(limits.max_upstream_connections)),
            transport: match target.protocol {
                Protocol::Http1 => Transport::Http1 {
                    idle: Arc::default(),
                    builder: conn::http1::Builder::new(),
                },
                Protocol::H2 | Protocol::H2c => {
                    let mut builder = http2::Builder::new(TokioExecutor::new());
                    builder
                        .timer(TokioTimer::new())
                        .keep_alive_interval(H2_KEEP_ALIVE)
                        .keep_alive_timeout(H2_KEEP_ALIVE / 2)
                        .keep_alive_while_idle(true);
                    Transport::Http2 {
                        connections: Multiplexed::new(target.h2_connections),
                        builder,
                    }
                }
            },
            target,
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

    /// The URI sent upstream for a client request's path and query. Origin-form for
    /// HTTP/1.1, as the connection already names the host (sent in `Host`); absolute for
    /// HTTP/2, whose `:authority` is `host`.
    pub fn uri_for(
        &self,
        path_and_query: Option<&PathAndQuery>,
        host: &HeaderValue,
    ) -> Result<Uri, http::Error> {
        let path_and_query = match path_and_query {
            // The common case shares the client's bytes: no copy, no re-parse.
            Some(path_and_query) if self.target.path_prefix.is_empty() => path_and_query.clone(),
            _ => {
                let path_and_query = path_and_query.map_or("/", PathAndQuery::as_str);
                let prefixed = format!("{}{path_and_query}", self.target.path_prefix);
                PathAndQuery::try_from(prefixed)?
            }
        };
        if !self.is_http2() {
            return Ok(Uri::from(path_and_query));
        }
        let authority = match http::uri::Authority::try_from(host.as_bytes()) {
            Ok(authority) => authority,
            Err(_) => self.target.authority.clone(),
        };
        Uri::builder()
            .scheme(self.target.scheme.clone())
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
    }

    /// Whether requests go out as HTTP/2, which names the host in `:authority`, not `Host`.
    pub fn is_http2(&self) -> bool {
        self.target.protocol.is_http2()
    }

    /// The `Host` header value that names this upstream.
    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// Sends `request` and waits at most `timeout` from `started` for a free connection and
    /// the response head. `started` is the caller's clock read, taken when the request was
    /// ready to go: the deadline and the pool's idle check need no other. The lease returned
    /// with the response holds the request's place in the connection limit until the caller
    /// drops it with the body.
    ///
    /// Only the rare waits (for a connection's place, a new connection, an HTTP/2 stream)
    /// arm a timer of their own; on a pooled HTTP/1.1 connection the deadline is watched by
    /// the connection's `Alarm`.
    ///
    /// `appended`: fields the request gets after its map's. abproxy's HTTP/1.1 writer
    /// appends a line for each, where an insert into the map would hash the name (the
    /// client's fields as they came, and the forwarding fields, on nearly every request);
    /// hyper's HTTP/2 client gets them in the map. None of them may be in the map already,
    /// nor be a forwarding field as well as a line (the lines' `X-Forwarded-For` is
    /// `folded` with the client's address), and of the lines the hop-by-hop and framing ones
    /// are left out. A request given back unsent (`SendError::NotSent`) may or
    /// may not have them in its map: build it again rather than send it on. A request that
    /// waits for a connection's place copies its map (`detach`), but the lines are
    /// borrowed: it keeps its head's bytes while it waits.
    ///
    /// Most HTTP/1.1 answers keep their fields as they came, in the body (`Body::fields`),
    /// and leave the response's map empty.
    pub async fn send(
        &self,
        mut request: Request<UpstreamBody>,
        appended: Appended<'_>,
        started: Instant,
        timeout: Duration,
    ) -> Result<(Response<Body>, Lease), SendError> {
        // `request` is reassigned, never rebound: every binding of it would be one more slot
        // in this future, which lives in every client connection's.
        let deadline = started + timeout;
        let late = || SendError::from(UpstreamError::no_response_within(timeout));
        let permit = match self.connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                request = detach(request);
                let waiting = self.connections.clone().acquire_owned();
                let permit = timeout_at(deadline, waiting).await.map_err(|_| late())?;
                permit.map_err(|_| UpstreamError::closed())?
            }
        };
        let response = match &self.transport {
            // Inline rather than a function of its own: each layer of future would hold
            // (and copy) the request again.
            Transport::Http1 { idle, .. } => {
                let pooled = poll_fn(|cx| Poll::Ready(idle.take(cx, started.into_std()))).await;
                let reused = pooled.is_some();
                // Boxed, as every connect below: opening a connection (TCP, maybe TLS) is the
                // rare path, and inline its future would size every request's.
                let sent = match pooled {
                    Some(connection) => {
                        let sent = connection
                            .send(request, appended, idle, deadline, timeout)
                            .await;
                        sent.map(|response| response.map(Body::http1))
                    }
                    None => {
                        let new =
                            self.send_on_new_http1(request, appended, idle, deadline, timeout);
                        Box::pin(new).await
                    }
                };
                match sent {
                    Ok(response) => response,
                    // Given back unsent by a pooled connection (none of it written, or an
                    // idempotent request the upstream closed the connection under before
                    // answering): sent again on a fresh one.
                    Err(SendError::NotSent { request, .. }) if reused => {
                        let new =
                            self.send_on_new_http1(*request.0, appended, idle, deadline, timeout);
                        Box::pin(new).await?
                    }
                    Err(err) => return Err(err),
                }
            }
            Transport::Http2 { connections, .. } => {
                append_to_map(request.headers_mut(), appended);
                // Boxed: its retry and replay state would triple every HTTP/1.1 request's
                // future; an HTTP/2 request pays one allocation for it.
                let send = connections.send(request, || Box::pin(self.connect_http2()));
                let answer = timeout_at(deadline, Box::pin(send)).await;
                answer.map_err(|_| late())??.map(Body::hyper)
            }
        };
        Ok((response, Lease { _permit: permit }))
    }

    /// `request` on a new HTTP/1.1 connection; one that never went out may go elsewhere.
    async fn send_on_new_http1(
        &self,
        request: Request<UpstreamBody>,
        appended: Appended<'_>,
        idle: &Arc<http1::Pool>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Response<Body>, SendError> {
        let stream = match timeout_at(deadline, self.connect()).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => return Err(SendError::not_sent(err, request)),
            Err(_) => return Err(UpstreamError::no_response_within(timeout).into()),
        };
        let connection = http1::Connection::new(stream);
        let response = connection
            .send(request, appended, idle, deadline, timeout)
            .await?;
        Ok(response.map(Body::http1))
    }

    /// A new HTTP/1.1 connection driven by hyper, that may become a tunnel (`101`).
    async fn dial_upgradable(
        &self,
    ) -> Result<conn::http1::SendRequest<UpstreamBody>, UpstreamError> {
        let Transport::Http1 { builder, .. } = &self.transport else {
            return Err(UpstreamError {
                kind: UpstreamErrorKind::Protocol,
                detail: format!(
                    "{} is an HTTP/2 upstream; HTTP/1.1 connections are not opened to it",
                    self.target.authority
                ),
            });
        };
        let stream = self.connect().await?;
        let (connection, driver) = builder
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|err| self.handshake_failed(&err))?;
        self.drive(driver.with_upgrades());
        Ok(connection)
    }

    /// Sends an HTTP/1.1 `Upgrade` request (a WebSocket handshake) on a connection of its
    /// own, which becomes the upstream end of the tunnel if the upstream agrees (`101`).
    /// The lease holds the connection's place in the limit for as long as it is kept.
    pub async fn upgrade(
        &self,
        request: Request<UpstreamBody>,
        timeout: Duration,
    ) -> Result<(Response<Body>, Lease), SendError> {
        let exchange = async {
            let permit = self
                .connections
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| UpstreamError::closed())?;
            let mut connection = match self.dial_upgradable().await {
                Ok(connection) => connection,
                Err(err) => return Err(SendError::not_sent(err, request)),
            };
            let response = connection
                .send_request(request)
                .await
                .map_err(|err| SendError::from_hyper(&err))?;
            Ok((response.map(Body::hyper), Lease { _permit: permit }))
        };
        Deadline::new(timeout, exchange).await
    }

    /// A new HTTP/2 connection, driven on a task of its own.
    async fn connect_http2(&self) -> Result<http2::SendRequest<Returnable>, UpstreamError> {
        let Transport::Http2 { builder, .. } = &self.transport else {
            unreachable!("an HTTP/2 connection is dialled for an HTTP/2 upstream only")
        };
        let stream = self.connect().await?;
        let (connection, driver) = builder
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|err| self.handshake_failed(&err))?;
        self.drive(driver);
        Ok(connection)
    }

    /// Drives a connection on a task of its own until it ends.
    fn drive<F>(&self, driver: F)
    where
        F: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
    {
        let authority = self.target.authority.clone();
        tokio::spawn(async move {
            if let Err(err) = driver.await {
                tracing::debug!(upstream = %authority, error = %err, "upstream connection ended");
            }
        });
    }

    fn handshake_failed(&self, err: &hyper::Error) -> UpstreamError {
        UpstreamError {
            kind: UpstreamErrorKind::Connect,
            detail: format!("handshake with {}: {err}", self.target.authority),
        }
    }

    /// A connected stream to the upstream, TLS done if it is `https://`.
    async fn connect(&self) -> Result<Stream, UpstreamError> {
        let authority = &self.target.authority;
        // `host()` keeps an IPv6 literal's brackets, which the resolver does not take.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let started = tokio::time::Instant::now();
        let stream = dial(host, self.target.port(), self.connect_timeout)
            .await
            .map_err(|detail| UpstreamError {
                kind: UpstreamErrorKind::Connect,
                detail: format!("connect to {authority}: {detail}"),
            })?;
        let _ = stream.set_nodelay(true);
        let Some(tls) = &self.target.tls else {
            return Ok(Stream::Left(stream));
        };
        // The TLS handshake shares `connect_timeout` with the TCP connect.
        let left = self.connect_timeout.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, tls.connect(stream)).await {
            Ok(Ok(stream)) => {
                if self.target.protocol == Protocol::H2
                    && stream.get_ref().1.alpn_protocol() != Some(b"h2")
                {
                    return Err(UpstreamError {
                        kind: UpstreamErrorKind::Protocol,
                        detail: format!("{authority} did not agree to HTTP/2 (ALPN h2)"),
                    });
                }
                Ok(Stream::Right(Box::new(stream)))
            }
            Ok(Err(err)) => {
                // A certificate refused or an alert is TLS; a pod that reset the connection
                // mid-handshake is an ordinary reset; anything else failed the connect.
                let kind = match io_failure_kind(&err) {
                    Some(kind @ (UpstreamErrorKind::Tls | UpstreamErrorKind::Reset)) => kind,
                    _ => UpstreamErrorKind::Connect,
                };
                Err(UpstreamError {
                    kind,
                    detail: format!("TLS with {authority}: {err}"),
                })
            }
            Err(_) => Err(UpstreamError {
                kind: UpstreamErrorKind::Connect,
                detail: format!(
                    "TLS with {authority}: no handshake within {}",
                    humantime::format_duration(self.connect_timeout)
                ),
            }),
        }
    }
}

/// Fields a request gets after its map's, written as lines by abproxy's HTTP/1.1 writer
/// (`Upstream::send`), where inserts into the map would parse and hash each name.
#[derive(Clone, Copy, Default)]
pub struct Appended<'a> {
    /// The client's fields as they came (its map then holds only fields abproxy set), less
    /// the hop-by-hop and framing ones.
    pub(crate) lines: Option<&'a Fields>,
    /// Fields abproxy adds (the forwarding ones).
    pub fields: &'a [(HeaderName, HeaderValue)],
    /// A field of the lines that goes on as one, its value appended to theirs:
    /// `X-Forwarded-For`, with the client's address.
    pub(crate) folded: Option<&'a (HeaderName, HeaderValue)>,
}

impl<'a> Appended<'a> {
    /// Whether a line goes on as it came.
    pub(crate) fn passes_on(&self, name: &[u8]) -> bool {
        passes_on(name)
            && !self
                .folded
                .is_some_and(|(folded, _)| wire::is_named(name, folded))
    }

    /// The folded field's value: the lines' values, then the appended one, a comma between.
    pub(crate) fn write_folded(&self, buffer: &mut Vec<u8>) -> Option<&'a HeaderName> {
        let (name, appended) = self.folded?;
        let values = self.lines.into_iter().flat_map(|lines| lines.values(name));
        wire::fold(buffer, values, appended.as_bytes());
        Some(name)
    }
}

/// Whether a client's field goes upstream as it came: a hop-by-hop field is the client
/// connection's, and framing is the writer's to say.
fn passes_on(name: &[u8]) -> bool {
    !wire::is_hop_by_hop(name) && !wire::is_named(name, &http::header::CONTENT_LENGTH)
}

/// `appended` in `headers`, for a writer that takes only the map (hyper's clients, a
/// shadow's copy).
pub fn append_to_map(headers: &mut HeaderMap, appended: Appended<'_>) {
    if let Some(lines) = appended.lines {
        lines.append_those_to(headers, |name| appended.passes_on(name));
    }
    let mut value = Vec::new();
    if let Some(name) = appended.write_folded(&mut value) {
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            headers.append(name.clone(), value);
        }
    }
    for (name, value) in appended.fields {
        headers.append(name.clone(), value.clone());
    }
}

/// A connection to an upstream before HTTP starts on it: plain TCP, or TLS over it.
type Stream = tokio_util::either::Either<
    tokio::net::TcpStream,
    Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
>;

/// An exchange's place in the upstream's connection limit, held until its response body is
/// done with. (The body itself holds an HTTP/1.1 connection, and returns it to the pool.)
#[derive(Debug)]
pub struct Lease {
    _permit: OwnedSemaphorePermit,
}

/// An upstream's response body, whose failures tell the upstream's from the client's (an
/// upload that fails while the answer streams).
#[derive(Debug)]
pub struct Body(Inner);

#[derive(Debug)]
enum Inner {
    Http1(http1::Body),
    Hyper(Incoming),
}

impl Body {
    fn http1(body: http1::Body) -> Body {
        Body(Inner::Http1(body))
    }

    fn hyper(body: Incoming) -> Body {
        Body(Inner::Hyper(body))
    }

    /// An HTTP/1.1 answer's fields when they pass through as they came: its response's map
    /// then holds none of them. (Most answers' do; `take_fields` moves them into the map.)
    pub(crate) fn fields(&self) -> Option<&Fields> {
        match &self.0 {
            Inner::Http1(body) => body.fields(),
            Inner::Hyper(_) => None,
        }
    }

    pub(crate) fn take_fields(&mut self) -> Option<Fields> {
        match &mut self.0 {
            Inner::Http1(body) => body.take_fields(),
            Inner::Hyper(_) => None,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Inner::Http1(body) => Pin::new(body).poll_frame(cx),
            // An upload that fails beside the answer fails the answer too, in hyper's hands.
            Inner::Hyper(body) => {
                Pin::new(body)
                    .poll_frame(cx)
                    .map_err(|err| match SendError::from_hyper(&err) {
                        SendError::Upstream(err) => BodyError::Upstream(err),
                        client => BodyError::Client(client.to_string()),
                    })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Http1(body) => body.is_end_stream(),
            Inner::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Http1(body) => body.size_hint(),
            Inner::Hyper(body) => body.size_hint(),
        }
    }
}

pin_project_lite::pin_project! {
    /// An exchange that fails as an upstream timeout once its deadline passes.
    struct Deadline<F> {
        #[pin]
        exchange: tokio::time::Timeout<F>,
        timeout: Duration,
    }
}

impl<F: Future> Deadline<F> {
    fn new(timeout: Duration, exchange: F) -> Self {
        Deadline {
            exchange: tokio::time::timeout(timeout, exchange),
            timeout,
        }
    }
}

impl<F, T> Future for Deadline<F>
where
    F: Future<Output = Result<T, SendError>>,
{
    type Output = Result<T, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match ready!(this.exchange.poll(cx)) {
            Ok(answer) => Poll::Ready(answer),
            Err(_elapsed) => {
                Poll::Ready(Err(UpstreamError::no_response_within(*this.timeout).into()))
            }
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
