//! Built-in mock model servers, so `abproxy demo` shows a real split with nothing else installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The demo config, built in so that `abproxy demo` works from any directory.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// A stand-in for a model server: answers every request with a JSON prediction.
///
/// The prediction is a deterministic score of the request, shifted by `bias`, so two models
/// visibly disagree and a shadow comparison has a difference to measure.
#[derive(Debug, Clone)]
pub struct MockModel {
    pub name: String,
    pub version: String,
    pub bias: f64,
    pub latency: Duration,
}

impl MockModel {
    pub fn new(name: &str, version: &str, bias: f64) -> MockModel {
        MockModel {
            name: name.to_owned(),
            version: version.to_owned(),
            bias,
            latency: Duration::ZERO,
        }
    }

    /// Serves on `listener` until `shutdown`.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                () = shutdown.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let model = self.clone();
            let service = service_fn(move |request| {
                let model = model.clone();
                async move { Ok::<_, Infallible>(model.answer(request).await) }
            });
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            tokio::spawn(connection);
        }
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let user = request
            .headers()
            .get("x-user-id")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(request.into_body(), 1 << 20)
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .unwrap_or_default();
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let mut input = Sha256::new();
        input.update(user.as_deref().unwrap_or_default());
        input.update(&body);
        let digest = input.finalize();
        let score = f64::from(u16::from_be_bytes([digest[0], digest[1]])) / 65_536.0;
        let prediction = ((score + self.bias).clamp(0.0, 1.0) * 1000.0).round() / 1000.0;
        let answer = json!({
            "model": self.name,
            "version": self.version,
            "prediction": prediction,
            "user_id": user,
        });
        let mut response = Response::new(Full::new(Bytes::from(answer.to_string())));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

/// The models the demo puts behind each upstream, in config order: control, treatment, then
/// any further arms or shadows.
pub fn demo_models() -> impl Iterator<Item = MockModel> {
    [
        MockModel::new("control", "v1", 0.0),
        MockModel::new("treatment", "v2", 0.05),
        MockModel::new("candidate", "v3", 0.02),
    ]
    .into_iter()
    .chain((4..).map(|n| MockModel::new(&format!("model-{n}"), "v1", 0.0)))
}

/// What the demo prints once it is up.
pub fn instructions(proxy: SocketAddr, admin: SocketAddr, config: &std::path::Path) -> String {
    format!(
        "\nabproxy demo is up: mock models behind a {proxy} proxy.\n\n\
         Two users, two variants (see the x-variant header and the model field):\n  \
         curl -si -H 'x-user-id: alice'  http://{proxy}/predict\n  \
         curl -si -H 'x-user-id: user-2' http://{proxy}/predict\n\n\
         Other ways to send the user ID:\n  \
         curl -s --cookie 'user_id=alice' http://{proxy}/predict\n  \
         curl -s 'http://{proxy}/predict?user_id=alice'\n  \
         curl -s -d '{{\"user_id\":\"alice\"}}' http://{proxy}/predict\n  \
         curl -s -H 'x-force-variant: treatment' http://{proxy}/predict   # QA override\n\n\
         Shadow: every request is mirrored to the candidate model; see\n  \
         curl -s http://{admin}/metrics | grep abproxy_shadow_   and demo-shadow.jsonl\n\n\
         Canary guard: the treatment is judged against control every 10 s; see\n  \
         curl -s http://{admin}/canary   or   abproxy canary status --admin http://{admin}\n  \
         roll it back by hand: abproxy canary rollback --admin http://{admin}\n\n\
         Metrics: http://{admin}/metrics   Status: http://{admin}/status\n\
         Edit {} to shift the weights while it runs; Ctrl-C stops.\n",
        config.display()
    )
}
