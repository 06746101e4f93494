//! The request path: accept, assign, forward, respond.

mod body;
mod error;
mod forward;
mod listener;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{Request, Response};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use metrics::Gauge;

pub use body::ResponseBody;
pub use error::ProxyError;
pub use listener::serve;

use crate::metrics::{Metrics, VariantMetrics};
use crate::route::Generation;
use upstream::UpstreamBody;

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
        client: SocketAddr,
    ) -> Response<ResponseBody> {
        let _in_flight = InFlight::enter(&self.in_flight);
        let started = Instant::now();
        // The one arc-swap load of this request: it runs on this generation even if a reload
        // swaps in another before it ends.
        let generation = self.current.load_full();
        let (parts, body) = request.into_parts();

        // 1. Read the body only when a `json:` source needs it; otherwise it streams through.
        let (body, buffered): (UpstreamBody, Option<Bytes>) = if generation.needs_body {
            match read_body(&parts, body, generation.config.limits.max_body).await {
                Ok(bytes) => (Either::Right(Full::new(bytes.clone())), Some(bytes)),
                Err(err) => return self.refuse(err, started),
            }
        } else {
            (Either::Left(body), None)
        };

        // 2. Assign the variant that owns the user's bucket.
        let route = match generation.assign(&parts, buffered.as_deref()) {
            Ok(assignment) => &generation.routes[assignment.route],
            Err(err) => return self.refuse(err.into(), started),
        };

        // 3. Forward to the variant's upstream.
        let config = &generation.config;
        let response = match forward::upstream_request(parts, body, &route.upstream, client, config.server.preserve_host) {
            Ok(upstream_request) => route
                .upstream
                .send(upstream_request, config.limits.request_timeout)
                .await
                .map_err(|source| {
                    route.metrics.upstream_error(source.kind);
                    tracing::debug!(variant = %route.name, upstream = %route.upstream.target(), error = %source, "upstream failed");
                    ProxyError::Upstream { variant: route.name.clone(), source }
                }),
            Err(err) => Err(ProxyError::BadTarget(err)),
        };

        // 4. Respond, naming the variant, and record.
        let mut response = match response {
            Ok(upstream_response) => {
                let (mut parts, body) = upstream_response.into_parts();
                forward::client_response_headers(&mut parts.headers);
                Response::from_parts(parts, ResponseBody::from(body))
            }
            Err(err) => err.into_response(),
        };
        response.headers_mut().insert(
            config.server.variant_header.clone(),
            route.header_value.clone(),
        );
        route.metrics.record(response.status(), started.elapsed());
        response
    }

    /// How long open connections may run on after shutdown begins, per the live config.
    pub fn shutdown_grace(&self) -> std::time::Duration {
        self.current.load().config.limits.shutdown_grace
    }

    /// Answers a request that never reached a variant.
    fn refuse(&self, err: ProxyError, started: Instant) -> Response<ResponseBody> {
        tracing::debug!(error = %err, "request refused");
        let response = err.into_response();
        self.unassigned.record(response.status(), started.elapsed());
        response
    }
}

/// Buffers a request body up to `limit` bytes; larger bodies are a 413, not a memory spike.
async fn read_body(parts: &Parts, body: Incoming, limit: u64) -> Result<Bytes, ProxyError> {
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<LengthLimitError>() => Err(ProxyError::BodyTooLarge { limit }),
        Err(err) => Err(ProxyError::BodyRead(err.to_string())),
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
