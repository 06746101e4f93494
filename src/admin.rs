//! The admin port: `/metrics`, `/healthz`, `/readyz`, `/status`, the canary guard's
//! `/canary` with its operator commands, and the live page at `/` (`ui`).
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
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::canary::run::Command;
use crate::canary::{CommandError, Guard};
use crate::metrics::Metrics;
use crate::reload::Reloader;

mod ui;

/// Largest body an admin command reads (`{"action": "rollback"}`).
const MAX_COMMAND_BODY: usize = 4096;

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
    pub listen_plain: Option<SocketAddr>,
    pub admin: SocketAddr,
    /// The listener's certificates, when `listen` terminates TLS.
    pub tls: Option<Arc<crate::tls::Terminator>>,
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub guard: Arc<Guard>,
}

impl Admin {
    /// Serves admin requests until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
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
                async move { Ok::<_, Infallible>(admin.route(request, peer).await) }
            });
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    }

    async fn route(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = request.uri().path();
        if request.method() == Method::POST {
            let command = match path {
                "/rollback" => Some(None),
                _ => path
                    .strip_prefix("/canary/")
                    .and_then(|action| action.parse::<Command>().ok())
                    .map(Some),
            };
            return match command {
                Some(command) => self.command(request, peer, command).await,
                None => error(StatusCode::NOT_FOUND, "POST /canary/rollback, /canary/promote, /canary/pause, /canary/resume or /rollback"),
            };
        }
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET, and POST for canary commands\n",
            );
        }
        match path {
            "/metrics" => {
                let mut response = text(StatusCode::OK, self.metrics_text());
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
            "/status" => json_response(StatusCode::OK, &self.status()),
            "/canary" => json_response(StatusCode::OK, &self.guard.status()),
            "/ui/snapshot" => ui::snapshot_response(&self.metrics_text()),
            _ => ui::asset(path).unwrap_or_else(|| {
                text(
                    StatusCode::NOT_FOUND,
                    "not found: try / (the live page), /metrics, /healthz, /readyz, /status or /canary\n",
                )
            }),
        }
    }

    /// An operator's command to the canary guard (`None`: `POST /rollback`, whose body names
    /// the action, as existing monitor scripts send it). Commands change what users are
    /// served, so they need the bearer token when one is configured, and otherwise come
    /// from this machine only.
    async fn command(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        command: Option<Command>,
    ) -> Response<Full<Bytes>> {
        let token_file = self
            .reloader
            .current()
            .load()
            .config
            .server
            .admin_token_file
            .clone();
        if let Err(refusal) = authorize(token_file.as_deref(), request.headers(), peer) {
            return refusal.into_response();
        }
        let command = match command {
            Some(command) => command,
            None => match action_in(request.into_body()).await {
                Ok(command) => command,
                Err(message) => return error(StatusCode::BAD_REQUEST, &message),
            },
        };
        match self.guard.command(command) {
            Ok(weight_changed) => {
                if weight_changed {
                    // A task of its own: the weight changes even if this caller hangs up.
                    let reloader = self.reloader.clone();
                    let _ = tokio::spawn(async move { reloader.rebuild().await }).await;
                }
                json_response(StatusCode::OK, &self.guard.status())
            }
            Err(CommandError::NoCanary) => {
                error(StatusCode::NOT_FOUND, &CommandError::NoCanary.to_string())
            }
            Err(err @ CommandError::Refused(_)) => error(StatusCode::CONFLICT, &err.to_string()),
        }
    }

    /// The Prometheus text: the registry's series, then those read at scrape time.
    fn metrics_text(&self) -> String {
        let mut text = self.metrics.render();
        if let Some(tls) = &self.tls {
            tls.render_expiry(&mut text);
        }
        text
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
            "listen_plain": self.listen_plain.map(|addr| addr.to_string()),
            "tls": self.tls.as_ref().map(|tls| tls.status()),
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
            "canary": self.guard.summary(),
            "last_reload_error": reload.last_error,
            "restart_required": reload.restart_required,
        })
    }
}

/// Why a canary command was refused before it was looked at.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    status: StatusCode,
    message: &'static str,
}

impl Refusal {
    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = error(self.status, self.message);
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Commands need the bearer token in `token_file` when one is configured, and otherwise
/// must come from this machine.
fn authorize(
    token_file: Option<&std::path::Path>,
    headers: &http::HeaderMap,
    peer: SocketAddr,
) -> Result<(), Refusal> {
    let Some(token_file) = token_file else {
        if peer.ip().to_canonical().is_loopback() {
            return Ok(());
        }
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            message: "canary commands are taken from loopback only unless [server] admin_token_file is set",
        });
    };
    let expected = match std::fs::read_to_string(token_file) {
        Ok(token) if !token.trim().is_empty() => token.trim().to_owned(),
        _ => {
            tracing::error!(path = %token_file.display(), "cannot read admin_token_file; refusing canary commands");
            return Err(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the admin token file cannot be read",
            });
        }
    };
    let presented = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .map(str::trim);
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(Refusal {
            status: StatusCode::UNAUTHORIZED,
            message: "a valid bearer token is required",
        }),
    }
}

/// The command in a `POST /rollback` body: `{"action": "rollback"}` (or another command).
async fn action_in(body: Incoming) -> Result<Command, String> {
    let bytes = Limited::new(body, MAX_COMMAND_BODY)
        .collect()
        .await
        .map_err(|err| format!("cannot read the request body: {err}"))?
        .to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|err| {
        format!("the body must be JSON such as {{\"action\": \"rollback\"}}: {err}")
    })?;
    value["action"]
        .as_str()
        .and_then(|action| action.parse().ok())
        .ok_or_else(|| "\"action\" must be one of rollback, promote, pause, resume".to_owned())
}

/// Compares secrets in time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = text(status, value.to_string());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message }))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: [u8; 4]) -> SocketAddr {
        SocketAddr::from((ip, 40_000))
    }

    fn bearer(token: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Bearer {token}")).expect("header value");
        headers.insert(http::header::AUTHORIZATION, value);
        headers
    }

    #[test]
    fn without_a_token_file_only_loopback_peers_may_command() {
        let none = http::HeaderMap::new();
        assert_eq!(authorize(None, &none, peer([127, 0, 0, 1])), Ok(()));
        let refused = authorize(None, &none, peer([10, 1, 2, 3])).expect_err("refused");
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
    }

    #[test]
    fn with_a_token_file_every_peer_needs_the_token() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").expect("token written");
        let remote = peer([10, 1, 2, 3]);
        assert_eq!(authorize(Some(&file), &bearer("s3cret"), remote), Ok(()));
        for headers in [bearer("s3cre"), bearer("s3cret2"), http::HeaderMap::new()] {
            let refused =
                authorize(Some(&file), &headers, peer([127, 0, 0, 1])).expect_err("refused");
            assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        }
        std::fs::remove_file(&file).expect("removed");
        let unreadable = authorize(Some(&file), &bearer("s3cret"), remote).expect_err("refused");
        assert_eq!(unreadable.status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
