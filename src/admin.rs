//! The admin port: `/metrics`, `/healthz`, `/readyz`, `/status`.
//!
//! Kept off the client listener so that scrapes and probes never compete with, or are
//! exposed alongside, model traffic.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::reload::Reloader;

/// Where the process is in its life, as load balancers see it through `/readyz`.
#[derive(Debug, Default)]
pub struct Health(AtomicU8);

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

impl Health {
    pub fn set_ready(&self) {
        self.0.store(READY, Ordering::Release);
    }

    pub fn set_draining(&self) {
        self.0.store(DRAINING, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire) == READY
    }

    fn state(&self) -> &'static str {
        match self.0.load(Ordering::Acquire) {
            STARTING => "starting",
            READY => "ready",
            _ => "draining",
        }
    }
}

/// What the admin endpoints read from.
pub struct Admin {
    pub reloader: Arc<Reloader>,
    /// Where the listeners are actually bound (the file may say port 0).
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: Metrics,
    pub health: Arc<Health>,
}

impl Admin {
    /// Serves admin requests until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::warn!(error = %err, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            let admin = self.clone();
            let service = service_fn(move |request| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.route(&request)) }
            });
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    }

    fn route(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match request.uri().path() {
            "/metrics" => {
                let mut response = text(StatusCode::OK, self.metrics.render());
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if self.health.is_ready() => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}\n", self.health.state()),
            ),
            "/status" => {
                let mut response = text(StatusCode::OK, self.status().to_string());
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                response
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /readyz or /status\n",
            ),
        }
    }

    fn status(&self) -> serde_json::Value {
        let generation = self.reloader.current().load_full();
        let config = &generation.config;
        let reload = self.reloader.status();
        let variants: Vec<_> = config
            .variants
            .iter()
            .enumerate()
            .map(|(index, variant)| {
                let range = generation.split.range(index);
                json!({
                    "name": variant.name,
                    "upstream": variant.upstream.to_string(),
                    "weight": variant.weight,
                    // Inclusive, as `abproxy check` prints them; null when the weight is 0.
                    "buckets": {
                        "first": (!range.is_empty()).then_some(range.start),
                        "last": (!range.is_empty()).then(|| range.end - 1),
                        "count": range.len(),
                    },
                })
            })
            .collect();
        let shadows: Vec<_> = config
            .shadows
            .iter()
            .map(|shadow| {
                json!({
                    "name": shadow.name,
                    "upstream": shadow.upstream.to_string(),
                    "percent": shadow.percent,
                    "compare": shadow.compare,
                    "log": shadow.log.as_ref().map(|path| path.display().to_string()),
                })
            })
            .collect();
        json!({
            "state": self.health.state(),
            "generation": generation.number,
            "config": {
                "path": self.reloader.path().display().to_string(),
                "sha256": generation.sha256,
            },
            "listen": self.listen.to_string(),
            "admin": self.admin.to_string(),
            "assignment": {
                "sources": config.assignment.sources.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "salt": config.assignment.salt,
                "buckets": config.assignment.buckets,
                "on_missing": config.assignment.on_missing.to_string(),
                "override_header": config.assignment.override_header.as_ref().map(|h| h.as_str()),
            },
            "variants": variants,
            "shadows": shadows,
            "last_reload_error": reload.last_error,
            "restart_required": reload.restart_required,
        })
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}
