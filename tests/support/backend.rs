//! A model backend: a hyper server that answers JSON naming its model and records what it got.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Clone)]
enum Behaviour {
    /// `{"model": NAME, "prediction": P}` after `delay`.
    Answer { prediction: f64, delay: Duration },
    /// A fixed body and content type.
    Raw {
        body: &'static str,
        content_type: &'static str,
    },
    /// Accept connections and never answer.
    Blackhole,
    /// Accept, read the request, then reset the connection.
    Reset,
    /// Answer a response head and part of the body, then send nothing more.
    StallMidBody,
    /// Answer one request as if keeping the connection alive, then close it.
    CloseAfterAnswer,
    /// A model with the faults a canary can have.
    Model(Model),
}

/// A model whose answers are counted: every `fail_every`-th is a 500, each takes `delay`, and
/// predictions are spread evenly over [0, 1) (a golden-ratio sequence) plus `shift`.
#[derive(Clone, Default)]
pub struct Model {
    pub fail_every: u64,
    pub delay: Duration,
    pub shift: f64,
    answered: Arc<std::sync::atomic::AtomicU64>,
}

impl Model {
    pub fn healthy() -> Model {
        Model::default()
    }

    pub fn failing_one_in(fail_every: u64) -> Model {
        Model {
            fail_every,
            ..Model::default()
        }
    }

    pub fn delayed(delay: Duration) -> Model {
        Model {
            delay,
            ..Model::default()
        }
    }

    pub fn shifted(shift: f64) -> Model {
        Model {
            shift,
            ..Model::default()
        }
    }

    fn answer(&self) -> (StatusCode, f64) {
        let n = self.answered.fetch_add(1, Ordering::SeqCst) + 1;
        let status = if self.fail_every > 0 && n % self.fail_every == 0 {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        let spread = (n as f64 * 0.618_033_988_749_895).fract();
        (status, spread + self.shift)
    }
}

pub struct Backend {
    pub name: String,
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    connections: Arc<Connections>,
    stop: CancellationToken,
}

/// Connections accepted so far, and those still open.
#[derive(Default)]
struct Connections {
    accepted: AtomicUsize,
    open: AtomicUsize,
}

impl Backend {
    /// A model that answers at once with prediction 0.5.
    pub async fn start(name: &str) -> Backend {
        Self::spawn(
            name,
            Behaviour::Answer {
                prediction: 0.5,
                delay: Duration::ZERO,
            },
        )
        .await
    }

    pub async fn predicting(name: &str, prediction: f64) -> Backend {
        Self::spawn(
            name,
            Behaviour::Answer {
                prediction,
                delay: Duration::ZERO,
            },
        )
        .await
    }

    pub async fn slow(name: &str, delay: Duration) -> Backend {
        Self::spawn(
            name,
            Behaviour::Answer {
                prediction: 0.5,
                delay,
            },
        )
        .await
    }

    pub async fn model(name: &str, model: Model) -> Backend {
        Self::spawn(name, Behaviour::Model(model)).await
    }

    pub async fn raw(name: &str, body: &'static str, content_type: &'static str) -> Backend {
        Self::spawn(name, Behaviour::Raw { body, content_type }).await
    }

    pub async fn blackhole(name: &str) -> Backend {
        Self::spawn(name, Behaviour::Blackhole).await
    }

    pub async fn stalling_mid_body(name: &str) -> Backend {
        Self::spawn(name, Behaviour::StallMidBody).await
    }

    /// Drops each connection after one answer, as an upstream whose keep-alive timeout is
    /// shorter than the proxy's would.
    pub async fn closing_after_each_answer(name: &str) -> Backend {
        Backend::spawn(name, Behaviour::CloseAfterAnswer).await
    }

    pub async fn resetting(name: &str) -> Backend {
        Self::spawn(name, Behaviour::Reset).await
    }

    /// An address where nothing listens, and nothing can: a port bound (without
    /// `SO_REUSEADDR`) and never listened on refuses connections, and is held for the rest
    /// of the test process. A port bound and released could be taken by another test's
    /// server meanwhile, which would then answer (a 404 where a refusal was expected).
    pub async fn down_url() -> String {
        static HELD: Mutex<Vec<tokio::net::TcpSocket>> = Mutex::new(Vec::new());
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        HELD.lock().expect("lock").push(socket);
        format!("http://{addr}")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Connections this backend has accepted.
    pub fn connections_accepted(&self) -> usize {
        self.connections.accepted.load(Ordering::SeqCst)
    }

    /// Connections still open from the proxy's side.
    pub fn connections_open(&self) -> usize {
        self.connections.open.load(Ordering::SeqCst)
    }

    pub fn count(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    async fn spawn(name: &str, behaviour: Behaviour) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let connections = Arc::new(Connections::default());
        let backend = Backend {
            connections: connections.clone(),
            name: name.to_owned(),
            addr,
            received: received.clone(),
            stop: stop.clone(),
        };
        let name = name.to_owned();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                    () = stop.cancelled() => return,
                };
                connections.accepted.fetch_add(1, Ordering::SeqCst);
                match behaviour.clone() {
                    Behaviour::Blackhole => held.push(stream),
                    Behaviour::StallMidBody => {
                        tokio::spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut stream = stream;
                            let mut buf = [0u8; 4096];
                            while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {
                                let head =
                                    "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"partial\":";
                                if stream.write_all(head.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    Behaviour::CloseAfterAnswer => {
                        tokio::spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut stream = stream;
                            let mut buf = [0u8; 4096];
                            if stream.read(&mut buf).await.is_ok_and(|n| n > 0) {
                                let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                                let _ = stream.write_all(answer.as_bytes()).await;
                            }
                        });
                    }
                    Behaviour::Reset => {
                        tokio::spawn(async move {
                            use tokio::io::AsyncReadExt;
                            let mut stream = stream;
                            let mut buf = [0u8; 4096];
                            let _ = stream.read(&mut buf).await;
                            let _ = stream.set_zero_linger();
                            drop(stream);
                        });
                    }
                    behaviour => {
                        let (name, received) = (name.clone(), received.clone());
                        let service = service_fn(move |request: Request<Incoming>| {
                            let (name, received, behaviour) =
                                (name.clone(), received.clone(), behaviour.clone());
                            async move {
                                Ok::<_, Infallible>(
                                    answer(&name, behaviour, &received, request).await,
                                )
                            }
                        });
                        let connections = connections.clone();
                        connections.open.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(async move {
                            let _ = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                            connections.open.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                }
            }
        });
        backend
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn answer(
    name: &str,
    behaviour: Behaviour,
    received: &Mutex<Vec<Received>>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    received.lock().expect("lock").push(Received {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
    });
    let mut status = StatusCode::OK;
    let (body, content_type) = match behaviour {
        Behaviour::Model(model) => {
            tokio::time::sleep(model.delay).await;
            let (answered, prediction) = model.answer();
            status = answered;
            (
                serde_json::json!({ "model": name, "prediction": prediction }).to_string(),
                "application/json",
            )
        }
        Behaviour::Answer { prediction, delay } => {
            tokio::time::sleep(delay).await;
            (
                serde_json::json!({ "model": name, "prediction": prediction }).to_string(),
                "application/json",
            )
        }
        Behaviour::Raw { body, content_type } => (body.to_owned(), content_type),
        Behaviour::Blackhole
        | Behaviour::Reset
        | Behaviour::StallMidBody
        | Behaviour::CloseAfterAnswer => {
            unreachable!("handled at accept")
        }
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("connection", "keep-alive, x-upstream-hop")
        .header("x-upstream-hop", "must not reach the client")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

/// A model server's answer head, in its own case and order, with fields for one hop only
/// and a variant header of its own (abproxy's names the variant).
pub const FIELDS_AS_SENT: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
    X-Model-Version:  v7\r\nSet-Cookie: a=1\r\nKeep-Alive: timeout=5\r\nSet-Cookie: b=2\r\n\
    Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nConnection: keep-alive\r\n\
    Content-Length: 2\r\nDate: Tue, 01 Dec 2026 06:00:00 GMT\r\nX-Variant: upstream\r\n\r\n{}";

/// An upstream that answers every request on a connection with `reply`, bytes as given: for
/// answers a hyper server would not write.
pub async fn answering(reply: &'static [u8]) -> String {
    answering_and_keeping_heads(reply).await.0
}

/// The request heads an upstream read, each as it came (bodiless requests only).
pub type Heads = Arc<Mutex<Vec<String>>>;

/// `answering`, keeping the heads of the requests it answered.
pub async fn answering_and_keeping_heads(reply: &'static [u8]) -> (String, Heads) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let heads = Heads::default();
    let kept = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0; 4096];
                while let Ok(read @ 1..) = stream.read(&mut buf).await {
                    seen.extend_from_slice(&buf[..read]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = seen.drain(..end + 4).collect::<Vec<_>>();
                        let head = String::from_utf8_lossy(&head).into_owned();
                        kept.lock().expect("heads").push(head);
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, heads)
}
