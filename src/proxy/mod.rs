//! The request path: accept, assign, forward, respond.

mod body;
mod error;
mod forward;
mod http1;
mod listener;
mod mirror;
mod stall;
mod tally;
mod upgrade;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use metrics::Gauge;

pub use body::ResponseBody;
pub use error::ProxyError;
use forward::ClientHead;
pub use forward::Peer;
pub use listener::{serve, serve_tls};

use crate::config::Limits;
use crate::detach;
use crate::grpc;
use crate::head::RequestHead;
use crate::metrics::{Metrics, VariantMetrics};
use crate::route::{Generation, Route};
use crate::upstream::{
    self, client_went_away, Lease, SendError, Upload, UploadError, UploadProgress, UpstreamBody,
    UpstreamErrorKind,
};
use crate::wire::Fields;
use mirror::Mirrors;
use tally::{Tally, Unassigned};
use upgrade::Upgrade;

/// State shared by every connection: the live generation and process-wide metrics.
pub struct Proxy {
    current: Arc<ArcSwap<Generation>>,
    in_flight: Gauge,
    /// Requests refused before assignment are counted under `variant="none"`.
    unassigned: VariantMetrics,
}

impl Proxy {
    pub fn new(current: Arc<ArcSwap<Generation>>, metrics: &Metrics) -> Proxy {
        Proxy {
            current,
            in_flight: metrics.process().in_flight,
            unassigned: metrics.unassigned(),
        }
    }

    /// Serves one client request from start to end on one config generation. `lines`: the
    /// request's fields as they came, if its map is empty (see `head`).
    pub(crate) async fn handle(
        &self,
        request: Request<ClientBody>,
        lines: Option<Fields>,
        client: &Peer,
    ) -> Answer {
        let _in_flight = InFlight::enter(&self.in_flight);
        let started = Instant::now();
        // The one arc-swap load of this request: it runs on this generation even if a reload
        // swaps in another before it ends.
        let generation = self.current.load_full();
        let config = &generation.config;
        let (mut parts, body) = request.into_parts();
        // abproxy's server hands every upgrade to hyper: a body read whole came with none.
        let (upgrade, arrived_whole) = match body {
            ClientBody::Complete(_) => (None, true),
            ClientBody::Streaming(_) => (Upgrade::requested(&mut parts), false),
        };
        let grpc_call = grpc::is_call(RequestHead::new(&parts.uri, &parts.headers, lines.as_ref()));
        // Fields that came as lines are passed on so, unless something on the request's way
        // reads a map: a gRPC call's `te` is kept, and the generation may need one.
        let lines = match lines {
            Some(lines) if grpc_call || !generation.passes_lines => {
                lines.append_to(&mut parts.headers);
                None
            }
            lines => lines,
        };
        let head = RequestHead::new(&parts.uri, &parts.headers, lines.as_ref());
        let tally = Unassigned::new(&self.unassigned, started, grpc_call);
        if parts.method == http::Method::CONNECT {
            return refuse(ProxyError::Connect, tally).into();
        }

        // 1. Read the body only when a `json:` source needs it; otherwise it streams through.
        let limits = &config.limits;
        let mut body = if generation.needs_body(head) {
            match Box::pin(read_body(&parts, body, limits)).await {
                Ok(bytes) => RequestBody::Buffered(bytes),
                Err(err) => return refuse(err, tally).into(),
            }
        } else {
            RequestBody::Unread(body)
        };

        // 2. Assign the variant that owns the user's bucket.
        let assignment = match generation.assign(head, body.buffered()) {
            Ok(assignment) => assignment,
            Err(err) => return refuse(err.into(), tally).into(),
        };
        let assigned = assignment.route;
        let route = &generation.routes[assigned];
        // A WebSocket for a variant on HTTP/2 is refused as unassigned: the config cannot
        // serve it, and that is no failure of the variant's.
        if upgrade.is_some() && route.upstream.is_http2() {
            return refuse(ProxyError::UpgradeOverHttp2(route.name.clone()), tally).into();
        }
        let mut tally = tally.assign(route.metrics.clone(), assignment.unit);

        // 3. Choose the shadows that mirror this user; they need the body in memory.
        let mirrors = match upgrade {
            None => Mirrors::select(&generation.shadows, assignment.user_id.as_deref()),
            Some(_) => Mirrors::none(),
        };
        if !mirrors.is_empty() {
            if let Err(err) = Box::pin(body.buffer_for_mirror(&parts, limits)).await {
                let response = err.into_response(tally.is_grpc());
                return answered(generation, assigned, response, tally);
            }
        }

        // 4. Forward to the variant's upstream, keeping a copy for the shadows (and of the
        //    head for the fallback variant, if the upstream cannot be reached).
        // A HEAD answer has no body to read a prediction from.
        let head = parts.method == http::Method::HEAD;
        let spare = route.fallback.map(|_| ClientHead::copy(&parts));
        let mirror = mirrors.source(&parts, body.shared_bytes(), assignment.user_id);
        let (upload, progress) = body.into_upstream(limits.client_body_timeout);
        let request = forward::upstream_request(
            parts,
            lines.as_ref(),
            upload,
            &route.upstream,
            client,
            config.server.preserve_host,
            tally.is_grpc(),
        );
        let forwarded = request
            .as_ref()
            .ok()
            .map(|(request, appended)| (request, *appended));
        let mirror = mirror.and_then(|source| source.copy(forwarded, &generation.shadows));
        let exchange = Exchange {
            generation: &generation,
            client,
            progress,
        };
        let (mut request, appended) = match request {
            Ok(request) => request,
            Err(err) => {
                let response = ProxyError::BadTarget(err).into_response(tally.is_grpc());
                return answered(generation, assigned, response, tally);
            }
        };
        if let Some(upgrade) = upgrade {
            // hyper's client writes the map alone.
            upstream::append_to_map(request.headers_mut(), appended);
            // Boxed, as the other rare paths here (a JSON body, a mirror's copy, the fallback
            // variant): inline, their futures would size every request's.
            let response = Box::pin(exchange.upgrade(route, request, upgrade)).await;
            return answered(generation, assigned, response, tally);
        }
        // The upstream's time runs from when the request can go: a body still on its way
        // may have been read first (for a `json:` source, for the shadows), on the client's
        // time. One that came with its head costs no second clock read.
        let ready = if arrived_whole {
            started
        } else {
            Instant::now()
        };
        let (answering, response) = match route
            .upstream
            .send(request, appended, ready.into(), limits.request_timeout)
            .await
        {
            Ok(answer) => (assigned, Ok(answer)),
            Err(failed) => Box::pin(exchange.recover(assigned, failed, spare, &mut tally)).await,
        };
        let route = &generation.routes[answering];

        // 5. Build the client's response; a successful answer's prediction is read as it
        //    passes.
        let mut response = match response {
            Ok((upstream_response, lease)) => {
                let response = client_response(upstream_response, limits.request_timeout, lease);
                match &route.predictions {
                    Some(predictions) if response.status().is_success() && !head => {
                        response.map(|body| body.inspect(predictions.clone()))
                    }
                    _ => response,
                }
            }
            Err(err) => err.into_response(tally.is_grpc()),
        };

        // 6. Mirror, now that the primary has answered: this only queues work for the shadows.
        if let Some(mirror) = mirror {
            response = mirror.dispatch(response, &route.name, started, &generation.shadows);
        }

        // 7. Name the variant that answered, and count the request (now, or as its body ends).
        answered(generation, answering, response, tally)
    }

    /// How long a client may leave its answer unread before its connection is cut: as long
    /// as an upstream may leave a body waiting (`request_timeout`), per the live config.
    pub fn client_stall_limit(&self) -> Duration {
        self.current.load().config.limits.request_timeout
    }

    /// How long open connections may run on after shutdown begins, per the live config.
    pub fn shutdown_grace(&self) -> Duration {
        self.current.load().config.limits.shutdown_grace
    }
}

/// Answers a request that never reached a variant.
fn refuse(err: ProxyError, tally: Unassigned<'_>) -> Response<ResponseBody> {
    tracing::debug!(error = %err, "request refused");
    let response = err.into_response(tally.is_grpc());
    tally.refused(response.status(), response.headers());
    response
}

/// A response, and the variant that answered it if one did.
///
/// The variant's field is written by the response's writer, from the generation the request
/// ran on: abproxy's HTTP/1.1 server writes it as a line of its own, where an insert into the
/// map would clone the name and value and hash the name on every request.
pub struct Answer {
    response: Response<ResponseBody>,
    variant: VariantField,
}

impl Answer {
    /// The response with the variant's field and the upstream's fields in its map: for a
    /// writer that reads the map alone (hyper's server).
    pub fn into_response(self) -> Response<ResponseBody> {
        let mut response = self.response;
        body::fields_into_map(&mut response);
        if let Some((name, value)) = self.variant.get() {
            response.headers_mut().insert(name.clone(), value.clone());
        }
        response
    }

    /// The response without the variant's field, and the field.
    pub(crate) fn into_parts(self) -> (Response<ResponseBody>, VariantField) {
        (self.response, self.variant)
    }
}

/// The field that names the variant an answer came from: the request's generation, and the
/// index of the route that answered in it.
pub(crate) struct VariantField(Option<(Arc<Generation>, usize)>);

impl VariantField {
    pub fn get(&self) -> Option<(&HeaderName, &HeaderValue)> {
        self.0.as_ref().map(|(generation, route)| {
            (
                &generation.config.server.variant_header,
                &generation.routes[*route].header_value,
            )
        })
    }
}

/// An answer no variant gave.
impl From<Response<ResponseBody>> for Answer {
    fn from(response: Response<ResponseBody>) -> Answer {
        Answer {
            response,
            variant: VariantField(None),
        }
    }
}

/// Counts an answer to an assigned request (now, or when its body ends) and names the
/// variant that gave it, `route` of `generation`.
fn answered(
    generation: Arc<Generation>,
    route: usize,
    mut response: Response<ResponseBody>,
    tally: Tally,
) -> Answer {
    if tally.is_grpc() {
        // Its status may be a field of the head.
        body::fields_into_map(&mut response);
    }
    let streams = response.body().streams();
    if let Some(ending) = tally.head(response.status(), response.headers(), streams) {
        response.body_mut().count_at_end(ending);
    }
    Answer {
        response,
        variant: VariantField(Some((generation, route))),
    }
}

/// The upstream's answer as the client gets it: without its connection-level headers, its
/// body streamed through (and failing if the upstream pauses past `idle_timeout`).
fn client_response(
    upstream: Response<upstream::Body>,
    idle_timeout: Duration,
    lease: Lease,
) -> Response<ResponseBody> {
    let (mut parts, body) = upstream.into_parts();
    forward::client_response_headers(&mut parts.headers);
    Response::from_parts(parts, ResponseBody::upstream(body, idle_timeout, lease))
}

/// One request's exchange with its variant's upstream, and its fallback's.
struct Exchange<'a> {
    generation: &'a Generation,
    client: &'a Peer,
    progress: Option<UploadProgress>,
}

type Reply = Result<(Response<upstream::Body>, Lease), ProxyError>;

impl<'a> Exchange<'a> {
    /// Answers a request its route's upstream did not. One that could not be sent at all (no
    /// connection) goes to the route's fallback variant, if it has one: an upstream error of
    /// the route all the same, which the canary guard sees, answered by the fallback.
    async fn recover(
        &self,
        assigned: usize,
        failed: SendError,
        spare: Option<ClientHead>,
        tally: &mut Tally,
    ) -> (usize, Reply) {
        let config = &self.generation.config;
        let route = &self.generation.routes[assigned];
        let (source, request, fallback_index, spare) = match (failed, route.fallback, spare) {
            (SendError::NotSent { source, request }, Some(fallback), Some(spare)) => {
                (source, request, fallback, spare)
            }
            (failed, _, _) => return (assigned, Err(self.failure(route, failed))),
        };
        let fallback = &self.generation.routes[fallback_index];
        tracing::debug!(variant = %route.name, fallback = %fallback.name, error = %source, "upstream unreachable, falling back");
        route.metrics.upstream_error(source.kind);
        route.metrics.fell_back(tally.elapsed(), tally.unit());
        tally.served_by(fallback.metrics.clone());
        let body = request.0.into_body();
        let request = forward::upstream_request(
            spare.into_parts(),
            None,
            body,
            &fallback.upstream,
            self.client,
            config.server.preserve_host,
            tally.is_grpc(),
        );
        let answer = match request {
            Ok((request, appended)) => match fallback
                .upstream
                .send(
                    request,
                    appended,
                    Instant::now().into(),
                    config.limits.request_timeout,
                )
                .await
            {
                Ok(answer) => Ok(answer),
                Err(failed) => Err(self.failure(fallback, failed)),
            },
            Err(err) => Err(ProxyError::BadTarget(err)),
        };
        (fallback_index, answer)
    }

    /// Passes an `Upgrade` (WebSocket) to the route's HTTP/1.1 upstream on a connection of its
    /// own; a `101` turns both connections into a tunnel.
    async fn upgrade(
        &self,
        route: &Route,
        mut request: Request<UpstreamBody>,
        upgrade: Upgrade,
    ) -> Response<ResponseBody> {
        upgrade.ask(request.headers_mut());
        let timeout = self.generation.config.limits.request_timeout;
        match route.upstream.upgrade(request, timeout).await {
            Ok((mut response, lease))
                if response.status() == http::StatusCode::SWITCHING_PROTOCOLS =>
            {
                upgrade.tunnel(&mut response, lease);
                let (parts, _) = response.into_parts();
                Response::from_parts(parts, ResponseBody::full(Bytes::new()))
            }
            // Refused: an ordinary answer, with the connection back in no pool.
            Ok((response, lease)) => client_response(response, timeout, lease),
            Err(failed) => self.failure(route, failed).into_response(false),
        }
    }

    /// Counts a failure against the variant unless it was the client's doing.
    fn failure(&self, route: &Route, failed: SendError) -> ProxyError {
        let timeout = self.generation.config.limits.request_timeout;
        match failed {
            // The answer was due, or the upstream gave up and closed, while it still waited
            // for the client's body.
            SendError::Upstream(source)
                if matches!(
                    source.kind,
                    UpstreamErrorKind::Timeout | UpstreamErrorKind::Reset
                ) && self
                    .progress
                    .as_ref()
                    .is_some_and(UploadProgress::waiting_on_client) =>
            {
                ProxyError::ClientTimeout(match source.kind {
                    UpstreamErrorKind::Timeout => format!(
                        "the client was still sending its request body after {}",
                        humantime::format_duration(timeout)
                    ),
                    _ => "the upstream closed the connection while the client was still \
                          sending its request body"
                        .into(),
                })
            }
            SendError::Upstream(source) | SendError::NotSent { source, .. } => {
                route.metrics.upstream_error(source.kind);
                tracing::debug!(variant = %route.name, upstream = %route.upstream.target(), error = %source, "upstream failed");
                ProxyError::Upstream {
                    variant: route.name.clone(),
                    source,
                }
            }
            SendError::ClientGone(detail) => ProxyError::ClientGone(detail),
            SendError::ClientBody(detail) => ProxyError::BodyRead(detail),
            SendError::ClientStalled(detail) => ProxyError::ClientTimeout(detail),
        }
    }
}

/// A client's request body as its connection delivers it.
pub enum ClientBody {
    /// Read whole with its head (by abproxy's HTTP/1.1 server); empty for most requests.
    Complete(Bytes),
    /// Still arriving, through hyper.
    Streaming(Incoming),
}

impl ClientBody {
    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Complete(bytes) => bytes.is_empty(),
            ClientBody::Streaming(incoming) => incoming.is_end_stream(),
        }
    }
}

/// Buffers a request body up to `max_body` bytes; larger bodies are a 413, not a memory
/// spike, and a client that stops sending for `client_body_timeout` gets a 408.
async fn read_body(parts: &Parts, body: ClientBody, limits: &Limits) -> Result<Bytes, ProxyError> {
    let limit = limits.max_body;
    if declared_length(parts).is_some_and(|length| length > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let body = match body {
        ClientBody::Complete(bytes) if bytes.len() as u64 > limit => {
            return Err(ProxyError::BodyTooLarge { limit })
        }
        // Copied when small, as below.
        ClientBody::Complete(bytes) => return Ok(detach::body(bytes)),
        ClientBody::Streaming(incoming) => incoming,
    };
    let (upload, _) = Upload::new(body, limits.client_body_timeout);
    let limited = Limited::new(upload, usize::try_from(limit).unwrap_or(usize::MAX));
    match limited.collect().await {
        // Copied when small: it may wait in a queue, and must not pin the read buffer then.
        Ok(collected) => Ok(detach::body(collected.to_bytes())),
        Err(err) if err.is::<LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
        Err(err) => Err(match err.downcast_ref::<UploadError>() {
            Some(UploadError::Stalled(_)) => ProxyError::ClientTimeout(err.to_string()),
            Some(UploadError::Read(read)) if client_went_away(read) => {
                ProxyError::ClientGone(err.to_string())
            }
            _ => ProxyError::BodyRead(err.to_string()),
        }),
    }
}

fn declared_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The client's body: as its connection delivers it, or read into memory (and held to
/// `max_body`) for a `json:` source or a mirror.
enum RequestBody {
    Unread(ClientBody),
    Buffered(Bytes),
}

impl RequestBody {
    fn buffered(&self) -> Option<&[u8]> {
        match self {
            RequestBody::Buffered(bytes) => Some(bytes),
            RequestBody::Unread(_) => None,
        }
    }

    /// Reads a streaming body into memory when its declared length fits `limit`; a body of
    /// unknown length (chunked) or over the limit keeps streaming and is not mirrored.
    async fn buffer_for_mirror(
        &mut self,
        parts: &Parts,
        limits: &Limits,
    ) -> Result<(), ProxyError> {
        let RequestBody::Unread(body) = self else {
            return Ok(());
        };
        let fits = body.is_end_stream()
            || declared_length(parts).is_some_and(|length| length <= limits.max_body);
        if fits {
            if let RequestBody::Unread(body) =
                std::mem::replace(self, RequestBody::Buffered(Bytes::new()))
            {
                *self = RequestBody::Buffered(read_body(parts, body, limits).await?);
            }
        }
        Ok(())
    }

    /// The buffered bytes, shared rather than copied.
    fn shared_bytes(&self) -> Option<Bytes> {
        match self {
            RequestBody::Buffered(bytes) => Some(bytes.clone()),
            RequestBody::Unread(_) => None,
        }
    }

    /// The body to send upstream and, for one still streaming, how its upload is going.
    fn into_upstream(self, stall_limit: Duration) -> (UpstreamBody, Option<UploadProgress>) {
        match self {
            // Nothing to send (a GET), or all of it here: no upload to time.
            RequestBody::Unread(ClientBody::Complete(bytes)) => {
                (Either::Right(Full::new(bytes)), None)
            }
            RequestBody::Unread(ClientBody::Streaming(incoming)) if incoming.is_end_stream() => {
                (Either::Right(Full::new(Bytes::new())), None)
            }
            RequestBody::Unread(ClientBody::Streaming(incoming)) => {
                let (upload, progress) = Upload::new(incoming, stall_limit);
                (Either::Left(upload), Some(progress))
            }
            RequestBody::Buffered(bytes) => (Either::Right(Full::new(bytes)), None),
        }
    }
}

/// Keeps `abproxy_requests_in_flight` right on every exit path, early returns included.
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a Gauge) -> Self {
        gauge.increment(1.0);
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
