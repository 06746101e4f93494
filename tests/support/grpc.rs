//! A gRPC model server and a gRPC client: tonic's codec and call handling, hyper's HTTP/2
//! server underneath, and the message types written by hand so no protoc or build script is
//! needed.
//!
//! The service is `abproxy.test.Model/Predict`: a user ID and an input in, the model's name
//! and `2 × input` out, so a reply shows both who answered and that the message crossed intact.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderMap, Request};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::server::UnaryService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

/// The one method the test server serves.
pub const PREDICT: &str = "/abproxy.test.Model/Predict";

/// How long a client call may take before the test fails: well past any answer, so only a
/// hang reaches it.
const CALL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Clone, PartialEq, prost::Message)]
pub struct PredictRequest {
    #[prost(string, tag = "1")]
    pub user_id: String,
    #[prost(double, tag = "2")]
    pub input: f64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PredictReply {
    #[prost(string, tag = "1")]
    pub model: String,
    #[prost(double, tag = "2")]
    pub prediction: f64,
}

/// What the server does with each call and each connection.
#[derive(Clone, Debug)]
pub struct GrpcModel {
    /// Every `fail_every`-th call (counted over the whole server) is answered with `code`;
    /// 0 never fails, 1 fails every call.
    pub fail_every: u64,
    pub code: Code,
    /// Time each call takes before its answer.
    pub delay: Duration,
    /// Once a connection has received this many calls, it is shut down gracefully (GOAWAY;
    /// calls already received are still answered); 0 keeps connections open. As h2 does, a
    /// call whose stream arrives after the final GOAWAY may still run although the client is
    /// told it did not, so a client that retries it can run a call twice.
    pub go_away_after: usize,
}

impl Default for GrpcModel {
    fn default() -> GrpcModel {
        GrpcModel {
            fail_every: 0,
            code: Code::Internal,
            delay: Duration::ZERO,
            go_away_after: 0,
        }
    }
}

/// One call as the server saw it, before tonic decoded it.
#[derive(Debug, Clone)]
pub struct ReceivedCall {
    pub path: String,
    /// The request's metadata: every HTTP/2 header, `te` included.
    pub headers: HeaderMap,
}

pub struct GrpcBackend {
    pub name: String,
    addr: SocketAddr,
    received: Arc<Mutex<Vec<ReceivedCall>>>,
    accepted: Arc<AtomicUsize>,
    went_away: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl GrpcBackend {
    /// A model that answers every call OK with its name.
    pub async fn start(name: &str) -> GrpcBackend {
        Self::with(name, GrpcModel::default()).await
    }

    /// A model that answers every `n`-th call with `code` (every call when `n` is 1).
    pub async fn failing_one_in(name: &str, n: u64, code: Code) -> GrpcBackend {
        let model = GrpcModel {
            fail_every: n,
            code,
            ..GrpcModel::default()
        };
        Self::with(name, model).await
    }

    /// A model that takes `delay` over each call, so concurrent calls overlap.
    pub async fn slow(name: &str, delay: Duration) -> GrpcBackend {
        let model = GrpcModel {
            delay,
            ..GrpcModel::default()
        };
        Self::with(name, model).await
    }

    /// A model that shuts each connection down gracefully (GOAWAY) once it has received
    /// `calls` calls on it, and keeps accepting new connections.
    pub async fn going_away_after(name: &str, calls: usize, delay: Duration) -> GrpcBackend {
        let model = GrpcModel {
            go_away_after: calls,
            delay,
            ..GrpcModel::default()
        };
        Self::with(name, model).await
    }

    pub async fn with(name: &str, model: GrpcModel) -> GrpcBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gRPC backend");
        let backend = GrpcBackend {
            name: name.to_owned(),
            addr: listener.local_addr().expect("gRPC backend addr"),
            received: Arc::default(),
            accepted: Arc::default(),
            went_away: Arc::default(),
            stop: CancellationToken::new(),
        };
        let predict = Predict {
            name: name.to_owned(),
            model: model.clone(),
            calls: Arc::default(),
        };
        let (received, accepted, went_away, stop) = (
            backend.received.clone(),
            backend.accepted.clone(),
            backend.went_away.clone(),
            backend.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    () = stop.cancelled() => return,
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_connection(
                    stream,
                    predict.clone(),
                    received.clone(),
                    model.go_away_after,
                    went_away.clone(),
                ));
            }
        });
        backend
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls received so far, in arrival order.
    pub fn received(&self) -> Vec<ReceivedCall> {
        self.received.lock().expect("lock").clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    /// TCP connections this server has accepted.
    pub fn connections_accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections this server has shut down with GOAWAY (see `GrpcModel::go_away_after`).
    pub fn went_away(&self) -> usize {
        self.went_away.load(Ordering::SeqCst)
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves one HTTP/2 connection; after `go_away_after` calls on it, shuts it down gracefully,
/// which sends GOAWAY and lets the calls already received finish.
async fn serve_connection(
    mut stream: TcpStream,
    predict: Predict,
    received: Arc<Mutex<Vec<ReceivedCall>>>,
    go_away_after: usize,
    went_away: Arc<AtomicUsize>,
) {
    let going_away = Arc::new(Notify::new());
    let calls_here = AtomicUsize::new(0);
    let service = service_fn({
        let going_away = going_away.clone();
        move |request: Request<Incoming>| {
            received.lock().expect("lock").push(ReceivedCall {
                path: request.uri().path().to_owned(),
                headers: request.headers().clone(),
            });
            if calls_here.fetch_add(1, Ordering::SeqCst) + 1 == go_away_after {
                going_away.notify_one();
            }
            let predict = predict.clone();
            async move {
                if request.uri().path() != PREDICT {
                    return Ok::<_, Infallible>(Status::unimplemented(PREDICT).into_http());
                }
                let mut grpc =
                    tonic::server::Grpc::new(ProstCodec::<PredictReply, PredictRequest>::default());
                Ok(grpc.unary(predict, request).await)
            }
        }
    });
    {
        let connection = http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(&mut stream), service);
        tokio::pin!(connection);
        let ended = tokio::select! {
            _ = connection.as_mut() => true,
            () = going_away.notified() => {
                went_away.fetch_add(1, Ordering::SeqCst);
                connection.as_mut().graceful_shutdown();
                false
            }
        };
        if !ended {
            let _ = connection.await;
        }
    }
    linger(stream).await;
}

/// Closes `stream` after reading what the client still sends (until it closes, at most 1 s):
/// closing with unread input resets the connection, and a reset can destroy the last answers
/// still in the client's receive buffer.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut buf = [0u8; 4096];
    let drained = async { while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
}

/// The `Predict` method: counts calls, fails the configured ones, names the model otherwise.
#[derive(Clone)]
struct Predict {
    name: String,
    model: GrpcModel,
    calls: Arc<AtomicU64>,
}

type PredictFuture =
    Pin<Box<dyn Future<Output = Result<tonic::Response<PredictReply>, Status>> + Send>>;

impl UnaryService<PredictRequest> for Predict {
    type Response = PredictReply;
    type Future = PredictFuture;

    fn call(&mut self, request: tonic::Request<PredictRequest>) -> PredictFuture {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let fails = self.model.fail_every > 0 && n % self.model.fail_every == 0;
        let (model, name) = (self.model.clone(), self.name.clone());
        Box::pin(async move {
            tokio::time::sleep(model.delay).await;
            if fails {
                return Err(Status::new(model.code, format!("{name} failed call {n}")));
            }
            Ok(tonic::Response::new(PredictReply {
                model: name,
                prediction: 2.0 * request.get_ref().input,
            }))
        })
    }
}

/// A real gRPC client (tonic's `Channel`: h2c with prior knowledge) on one connection.
#[derive(Clone)]
pub struct GrpcClient {
    grpc: tonic::client::Grpc<Channel>,
}

/// A successful `Predict` answer and the variant the proxy named in its metadata.
#[derive(Debug, Clone)]
pub struct GrpcReply {
    /// The `x-variant` response metadata, when present.
    pub variant: Option<String>,
    pub model: String,
    pub prediction: f64,
}

impl GrpcClient {
    /// Connects to `addr`, failing the test if that takes more than 5 s.
    pub async fn connect(addr: SocketAddr) -> GrpcClient {
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint URI");
        let channel = tokio::time::timeout(Duration::from_secs(5), endpoint.connect())
            .await
            .expect("gRPC client connects within 5 s")
            .unwrap_or_else(|err| panic!("gRPC client connects to {addr}: {err}"));
        GrpcClient {
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    /// Calls `Predict` as `user` (the `x-user-id` metadata); the test fails if no answer
    /// comes within `CALL_LIMIT`.
    pub async fn predict(&self, user: &str, input: f64) -> Result<GrpcReply, Status> {
        let mut request = tonic::Request::new(PredictRequest {
            user_id: user.to_owned(),
            input,
        });
        request.metadata_mut().insert(
            "x-user-id",
            user.parse().expect("user ID is valid metadata"),
        );
        let mut grpc = self.grpc.clone();
        let call = async move {
            grpc.ready().await.expect("gRPC client is usable");
            grpc.unary(
                request,
                PathAndQuery::from_static(PREDICT),
                ProstCodec::<PredictRequest, PredictReply>::default(),
            )
            .await
        };
        let response = tokio::time::timeout(CALL_LIMIT, call)
            .await
            .unwrap_or_else(|_| panic!("no gRPC answer for {user} within {CALL_LIMIT:?}"))?;
        let variant = response
            .metadata()
            .get("x-variant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let reply = response.into_inner();
        Ok(GrpcReply {
            variant,
            model: reply.model,
            prediction: reply.prediction,
        })
    }
}

/// `[[variant]]` tables reaching each gRPC backend over h2c, for `(name, backend, weight)`.
pub fn h2c_variants(arms: &[(&str, &GrpcBackend, f64)]) -> String {
    arms.iter()
        .map(|(name, backend, weight)| h2c_variant(name, &backend.url(), *weight))
        .collect()
}

/// One `[[variant]]` table reaching `upstream` over h2c.
pub fn h2c_variant(name: &str, upstream: &str, weight: f64) -> String {
    format!(
        "[[variant]]\nname = \"{name}\"\nupstream = \"{upstream}\"\nweight = {weight}\nprotocol = \"h2c\"\n\n"
    )
}
