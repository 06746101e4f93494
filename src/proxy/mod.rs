//! The request path: accept, assign, forward, respond.

mod body;
mod error;
mod forward;
mod listener;
mod mirror;
mod stall;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use metrics::Gauge;

pub use body::ResponseBody;
pub use error::ProxyError;
use error::CLIENT_CLOSED_REQUEST;
pub use forward::Peer;
pub use listener::{serve, serve_tls};

use crate::config::{Config, Limits};
use crate::detach;
use crate::metrics::{Metrics, VariantMetrics};
use crate::route::{Generation, Route, Unit};
use crate::upstream::{
    client_went_away, Lease, SendError, Upload, UploadError, UploadProgress, UpstreamBody,
    UpstreamErrorKind,
};
use mirror::Mirrors;

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

    /// Serves one client request from start to end on one config generation.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: &Peer,
    ) -> Response<ResponseBody> {
        let _in_flight = InFlight::enter(&self.in_flight);
        let started = Instant::now();
        // The one arc-swap load of this request: it runs on this generation even if a reload
        // swaps in another before it ends.
        let generation = self.current.load_full();
        let config = &generation.config;
        let mut tally = Tally::new(&self.unassigned, started);
        let (parts, body) = request.into_parts();
        if parts.method == http::Method::CONNECT {
            return refuse(ProxyError::Connect, tally);
        }

        // 1. Read the body only when a `json:` source needs it; otherwise it streams through.
        let limits = &config.limits;
        let mut body = if generation.needs_body(&parts) {
            match read_body(&parts, body, limits).await {
                Ok(bytes) => RequestBody::Buffered(bytes),
                Err(err) => return refuse(err, tally),
            }
        } else {
            RequestBody::Streaming(body)
        };

        // 2. Assign the variant that owns the user's bucket.
        let assignment = match generation.assign(&parts, body.buffered()) {
            Ok(assignment) => assignment,
            Err(err) => return refuse(err.into(), tally),
        };
        let route = &generation.routes[assignment.route];
        tally.assign(&route.metrics, assignment.unit);

        // 3. Choose the shadows that mirror this user; they need the body in memory.
        let mirrors = Mirrors::select(&generation.shadows, assignment.user_id.as_deref());
        if !mirrors.is_empty() {
            if let Err(err) = body.buffer_for_mirror(&parts, limits).await {
                return answered(route, err.into_response(), tally, config);
            }
        }

        // 4. Forward to the variant's upstream, keeping a copy for the shadows.
        // A HEAD answer has no body to read a prediction from.
        let head = parts.method == http::Method::HEAD;
        let mirror = mirrors.source(&parts, body.shared_bytes(), assignment.user_id);
        let (upload, progress) = body.into_upstream(limits.client_body_timeout);
        let request = forward::upstream_request(
            parts,
            upload,
            &route.upstream,
            client,
            config.server.preserve_host,
        );
        let mirror =
            mirror.and_then(|source| source.copy(request.as_ref().ok(), &generation.shadows));
        let response = match request {
            Ok(request) => send(route, request, limits.request_timeout, progress).await,
            Err(err) => Err(ProxyError::BadTarget(err)),
        };

        // 5. Build the client's response; a successful answer's prediction is read as it
        //    passes.
        let mut response = match response {
            Ok((upstream_response, lease)) => {
                let (mut parts, body) = upstream_response.into_parts();
                forward::client_response_headers(&mut parts.headers);
                let mut body = ResponseBody::upstream(body, limits.request_timeout, lease);
                if let Some(predictions) = &route.predictions {
                    if parts.status.is_success() && !head {
                        body = body.inspect(predictions.clone());
                    }
                }
                Response::from_parts(parts, body)
            }
            Err(err) => err.into_response(),
        };

        // 6. Mirror, now that the primary has answered: this only queues work for the shadows.
        if let Some(mirror) = mirror {
            response = mirror.dispatch(response, &route.name, started, &generation.shadows);
        }

        // 7. Name the variant and record the answer.
        answered(route, response, tally, config)
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
fn refuse(err: ProxyError, tally: Tally<'_>) -> Response<ResponseBody> {
    tracing::debug!(error = %err, "request refused");
    let response = err.into_response();
    tally.answered(response.status());
    response
}

/// Stamps the variant header on a response to an assigned request and counts it.
fn answered(
    route: &Route,
    mut response: Response<ResponseBody>,
    tally: Tally<'_>,
    config: &Config,
) -> Response<ResponseBody> {
    response.headers_mut().insert(
        config.server.variant_header.clone(),
        route.header_value.clone(),
    );
    tally.answered(response.status());
    response
}

/// Counts a request exactly once, under the variant it was assigned to (`none` until then):
/// with the status it was answered with, or as 499 when the client hung up first and hyper
/// dropped the handler. Without the 499s, a treatment slow enough for clients to give up on
/// would look better than it is: its worst requests would vanish from the metrics. (Requests
/// cut when the shutdown grace period ends count as 499 too, as the process exits.)
struct Tally<'a> {
    metrics: &'a VariantMetrics,
    unit: Unit,
    started: Instant,
    counted: bool,
}

impl<'a> Tally<'a> {
    fn new(unassigned: &'a VariantMetrics, started: Instant) -> Self {
        Tally {
            metrics: unassigned,
            unit: Unit::Fixed,
            started,
            counted: false,
        }
    }

    fn assign(&mut self, variant: &'a VariantMetrics, unit: Unit) {
        self.metrics = variant;
        self.unit = unit;
    }

    fn answered(mut self, status: StatusCode) {
        self.metrics
            .record(status, self.started.elapsed(), self.unit);
        self.counted = true;
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        if !self.counted {
            self.metrics
                .record(CLIENT_CLOSED_REQUEST, self.started.elapsed(), self.unit);
        }
    }
}

/// Sends the request to the route's upstream, counting a failure against the variant
/// unless it was the client's doing.
async fn send(
    route: &Route,
    request: Request<UpstreamBody>,
    timeout: Duration,
    upload: Option<UploadProgress>,
) -> Result<(Response<Incoming>, Lease), ProxyError> {
    route
        .upstream
        .send(request, timeout)
        .await
        .map_err(|err| match err {
            // The answer was due while the upstream still waited for the client's body.
            SendError::Upstream(source)
                if source.kind == UpstreamErrorKind::Timeout
                    && upload.as_ref().is_some_and(UploadProgress::waiting_on_client) =>
            {
                ProxyError::ClientTimeout(format!(
                    "the client was still sending its request body after {}",
                    humantime::format_duration(timeout)
                ))
            }
            SendError::Upstream(source) => {
                route.metrics.upstream_error(source.kind);
                tracing::debug!(variant = %route.name, upstream = %route.upstream.target(), error = %source, "upstream failed");
                ProxyError::Upstream { variant: route.name.clone(), source }
            }
            SendError::ClientGone(detail) => ProxyError::ClientGone(detail),
            SendError::ClientBody(detail) => ProxyError::BodyRead(detail),
            SendError::ClientStalled(detail) => ProxyError::ClientTimeout(detail),
        })
}

/// Buffers a request body up to `max_body` bytes; larger bodies are a 413, not a memory
/// spike, and a client that stops sending for `client_body_timeout` gets a 408.
async fn read_body(parts: &Parts, body: Incoming, limits: &Limits) -> Result<Bytes, ProxyError> {
    let limit = limits.max_body;
    if declared_length(parts).is_some_and(|length| length > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
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

/// The client's body: still streaming, or read into memory for a `json:` source or a mirror.
enum RequestBody {
    Streaming(Incoming),
    Buffered(Bytes),
}

impl RequestBody {
    fn buffered(&self) -> Option<&[u8]> {
        match self {
            RequestBody::Buffered(bytes) => Some(bytes),
            RequestBody::Streaming(_) => None,
        }
    }

    /// Reads a streaming body into memory when its declared length fits `limit`; a body of
    /// unknown length (chunked) or over the limit keeps streaming and is not mirrored.
    async fn buffer_for_mirror(
        &mut self,
        parts: &Parts,
        limits: &Limits,
    ) -> Result<(), ProxyError> {
        let RequestBody::Streaming(incoming) = self else {
            return Ok(());
        };
        let fits = incoming.is_end_stream()
            || declared_length(parts).is_some_and(|length| length <= limits.max_body);
        if fits {
            if let RequestBody::Streaming(incoming) =
                std::mem::replace(self, RequestBody::Buffered(Bytes::new()))
            {
                *self = RequestBody::Buffered(read_body(parts, incoming, limits).await?);
            }
        }
        Ok(())
    }

    /// The buffered bytes, shared rather than copied.
    fn shared_bytes(&self) -> Option<Bytes> {
        match self {
            RequestBody::Buffered(bytes) => Some(bytes.clone()),
            RequestBody::Streaming(_) => None,
        }
    }

    /// The body to send upstream and, for one still streaming, how its upload is going.
    fn into_upstream(self, stall_limit: Duration) -> (UpstreamBody, Option<UploadProgress>) {
        match self {
            // Nothing to send (a GET): no upload to time.
            RequestBody::Streaming(incoming) if incoming.is_end_stream() => {
                (Either::Right(Full::new(Bytes::new())), None)
            }
            RequestBody::Streaming(incoming) => {
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
