//! A model server that speaks HTTP/1.1 and h2c on one port (as most do) and does what the
//! HTTP/2 and streaming tests need: answers with trailers, streams server-sent events, says
//! GOAWAY after a number of requests, and records when a client cancels a stream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A response body fed by a channel, so that the server sees the moment its client is gone
/// (`Sender::closed`), not only at its next write.
pub struct Body(mpsc::Receiver<Frame<Bytes>>);

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

/// What the server does with each request.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Reads the whole request, then answers `{"model": NAME}` with a trailer naming the
    /// request's trailer `x-request-trailer` (if it had one), after `delay`.
    Echo { delay: Duration },
    /// Answers `count` server-sent events, one every `every`.
    Events { count: usize, every: Duration },
    /// As `Echo`, and each connection is shut down gracefully (GOAWAY) after `requests`.
    GoAwayAfter { requests: usize, delay: Duration },
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub version: http::Version,
    pub headers: HeaderMap,
    pub trailers: Option<HeaderMap>,
}

#[derive(Default)]
struct Record {
    seen: Mutex<Vec<Seen>>,
    connections: AtomicUsize,
    /// When each events stream found its client gone.
    cancelled: Mutex<Vec<Instant>>,
    /// When each event was handed to the connection.
    sent: Mutex<Vec<Instant>>,
}

pub struct StreamServer {
    pub addr: SocketAddr,
    record: Arc<Record>,
    stop: CancellationToken,
}

impl StreamServer {
    pub async fn start(name: &str, mode: Mode) -> StreamServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let record = Arc::new(Record::default());
        let stop = CancellationToken::new();
        let server = StreamServer {
            addr,
            record: record.clone(),
            stop: stop.clone(),
        };
        let name: Arc<str> = name.into();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                    () = stop.cancelled() => return,
                };
                record.connections.fetch_add(1, Ordering::SeqCst);
                // As model servers do: an event is a small write, not one for Nagle to hold.
                let _ = stream.set_nodelay(true);
                let (record, name) = (record.clone(), name.clone());
                tokio::spawn(serve(stream, name, mode, record));
            }
        });
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn connections(&self) -> usize {
        self.record.connections.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.record.seen.lock().expect("lock").clone()
    }

    pub fn sent(&self) -> Vec<Instant> {
        self.record.sent.lock().expect("lock").clone()
    }

    pub fn cancelled(&self) -> Vec<Instant> {
        self.record.cancelled.lock().expect("lock").clone()
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(stream: tokio::net::TcpStream, name: Arc<str>, mode: Mode, record: Arc<Record>) {
    let served = Arc::new(AtomicUsize::new(0));
    let enough = CancellationToken::new();
    let service = {
        let (served, enough) = (served.clone(), enough.clone());
        service_fn(move |request: Request<Incoming>| {
            let (name, record) = (name.clone(), record.clone());
            let count = served.fetch_add(1, Ordering::SeqCst) + 1;
            if let Mode::GoAwayAfter { requests, .. } = mode {
                if count == requests {
                    enough.cancel();
                }
            }
            async move { Ok::<_, Infallible>(answer(request, &name, mode, &record).await) }
        })
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = enough.cancelled() => connection.as_mut().graceful_shutdown(),
    }
    let _ = connection.await;
}

async fn answer(
    request: Request<Incoming>,
    name: &str,
    mode: Mode,
    record: &Arc<Record>,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let grpc = parts
        .headers
        .get("content-type")
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
    let collected = body.collect().await.ok();
    let trailers = collected.as_ref().and_then(|c| c.trailers().cloned());
    record.seen.lock().expect("lock").push(Seen {
        version: parts.version,
        headers: parts.headers,
        trailers: trailers.clone(),
    });
    let (sender, receiver) = mpsc::channel(16);
    let body = Body(receiver);
    match mode {
        Mode::Echo { delay } | Mode::GoAwayAfter { delay, .. } => {
            tokio::time::sleep(delay).await;
            let mut answer_trailers = HeaderMap::new();
            answer_trailers.insert("x-answer-trailer", HeaderValue::from_static("sent"));
            if grpc {
                answer_trailers.insert("grpc-status", HeaderValue::from_static("0"));
            }
            if let Some(value) = trailers.as_ref().and_then(|t| t.get("x-request-trailer")) {
                answer_trailers.insert("x-seen-trailer", value.clone());
            }
            let data = Bytes::from(serde_json::json!({ "model": name }).to_string());
            let _ = sender.try_send(Frame::data(data));
            let _ = sender.try_send(Frame::trailers(answer_trailers));
            Response::builder()
                .header("content-type", "application/json")
                .body(body)
                .expect("response")
        }
        Mode::Events { count, every } => {
            let (name, record) = (name.to_owned(), record.clone());
            tokio::spawn(async move {
                for event in 0..count {
                    let data = format!("data: {{\"model\":\"{name}\",\"event\":{event}}}\n\n");
                    if sender.send(Frame::data(Bytes::from(data))).await.is_err() {
                        break;
                    }
                    record.sent.lock().expect("lock").push(Instant::now());
                    tokio::select! {
                        () = tokio::time::sleep(every) => {}
                        () = sender.closed() => break,
                    }
                }
                if sender.is_closed() {
                    record.cancelled.lock().expect("lock").push(Instant::now());
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .expect("response")
        }
    }
}
