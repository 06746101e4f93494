//! HTTP/1.1 to an upstream, run inside the request's own future.
//!
//! hyper's client drives each connection on a task of its own and hands requests, responses
//! and body chunks across channels: two task wake-ups and a channel send per request, and
//! 29 % of abproxy's user time at max load. Here the request's future writes the request and
//! reads the response head itself (`Exchange`), and the response body reads the socket as
//! the client's side asks for it (`Body`); the connection goes back to the pool when the
//! body ends.
//!
//! Upgrades (WebSocket) still go through hyper, on connections of their own.

mod body;
mod pool;
mod request;
mod response;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, Request, Response};
use http_body::Body as _;
use http_body_util::{Either, Full};
use tokio::io::AsyncRead;
use tokio::time::Instant;

pub use body::Body;
pub(super) use pool::Pool;
use request::{Outgoing, Payload, WriteFailure};

use super::error::{io_failure_kind, SendError};
use super::{Appended, Stream, UpstreamBody, UpstreamError, UpstreamErrorKind};
use crate::alarm::Alarm;
use crate::wire;

/// An upload that did not match its declared length: hyper and h2 check the client's, so
/// only a body of abproxy's own making could.
const LENGTH_MISMATCH: &str = "the request body did not match its declared length";

/// The first read of a response; doubled while reads fill it, for a large body.
const FIRST_READ: usize = 8 * 1024;
const LARGEST_READ: usize = 256 * 1024;
/// A kept header map with room for more fields than this is let go, as the buffers are.
const SPARE_FIELDS: usize = 64;

/// A keep-alive connection to an upstream, idle between exchanges.
pub(super) struct Connection {
    io: Stream,
    /// What the upstream sent and was not yet parsed: empty between exchanges.
    read: BytesMut,
    read_size: usize,
    /// The last request's head, kept for its allocation.
    head: Vec<u8>,
    /// Whether it has served before, and so may have been timed out by the upstream.
    reused: bool,
    /// Whether the upstream has sent anything, an interim answer included, since the
    /// request began.
    heard: bool,
    /// Watches each exchange's deadline for its response head.
    alarm: Alarm,
    /// The last request's header map, emptied, for the next response's head: maps go round
    /// between the client's side and the upstream's instead of being made and freed.
    spare: Option<HeaderMap>,
}

impl Connection {
    /// Boxed once, when it is opened: it moves from the pool to an exchange, to a response
    /// body and back with every request, and a pointer moves for less than the connection.
    pub fn new(io: Stream) -> Box<Connection> {
        Box::new(Connection {
            io,
            read: BytesMut::new(),
            read_size: FIRST_READ,
            head: Vec::new(),
            reused: false,
            heard: false,
            alarm: Alarm::default(),
            spare: None,
        })
    }

    /// Sends `request` and reads the response head. The response's body holds the
    /// connection, and returns it to `pool` once read to its end if it can serve again.
    /// A request none of which could be written comes back in `SendError::NotSent`.
    /// No response head by `deadline` is an upstream timeout (`timeout` long).
    pub fn send<'a>(
        self: Box<Self>,
        request: Request<UpstreamBody>,
        appended: Appended<'a>,
        pool: &'a Arc<Pool>,
        deadline: Instant,
        timeout: Duration,
    ) -> Exchange<'a> {
        Exchange {
            connection: Some(self),
            state: State::Start(request),
            appended,
            pool,
            deadline,
            timeout,
        }
    }

    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<response::Head, UpstreamError>> {
        loop {
            if !self.read.is_empty() {
                let parsed = response::parse_head(&mut self.read, head_request, &mut self.spare)?;
                if let Some(head) = parsed {
                    return Poll::Ready(Ok(head));
                }
            }
            let read = ready!(self.poll_fill(cx))?;
            self.heard |= read > 0;
            if read == 0 {
                return Poll::Ready(Err(UpstreamError {
                    kind: UpstreamErrorKind::Reset,
                    detail: "the upstream closed the connection before answering".into(),
                }));
            }
        }
    }

    /// Reads what the upstream has sent into `read`; 0 once it has closed the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, UpstreamError>> {
        wire::poll_fill(
            &mut self.io,
            cx,
            &mut self.read,
            &mut self.read_size,
            LARGEST_READ,
        )
        .map_err(|err| io_error("reading the response", &err))
    }

    /// Keeps a sent request's header map for the next response head.
    fn keep_map(&mut self, sent: Option<Parts>) {
        if let Some(parts) = sent {
            let mut map = parts.headers;
            map.clear();
            self.spare = Some(map);
        }
    }

    /// Lets go of buffers a large answer or request head grew, so that an idle connection
    /// holds no more than a small one.
    fn trim(&mut self) {
        if self
            .spare
            .as_ref()
            .is_some_and(|map| map.capacity() > SPARE_FIELDS)
        {
            self.spare = None;
        }
        if self.read.capacity() > 2 * FIRST_READ {
            self.read = BytesMut::new();
        }
        if self.head.capacity() > 2 * FIRST_READ {
            self.head = Vec::new();
        }
    }

    /// Whether an idle connection can take a request: the upstream has neither closed it
    /// nor sent anything unasked. No system call unless the socket turned readable.
    fn is_usable(&mut self, cx: &mut Context<'_>) -> bool {
        let mut probe = [0u8; 1];
        let mut probe = tokio::io::ReadBuf::new(&mut probe);
        // Pending: nothing arrived (a TLS session ticket is read and kept by rustls).
        Pin::new(&mut self.io)
            .poll_read(cx, &mut probe)
            .is_pending()
    }
}

/// One request and its response head, on one connection: written out rather than an
/// `async fn`, which would keep the request twice over in a future that lives inside every
/// client connection's.
pub(super) struct Exchange<'a> {
    /// Until the head arrives; then the response body's.
    connection: Option<Box<Connection>>,
    state: State,
    /// Written after the request's map (`Upstream::send`).
    appended: Appended<'a>,
    pool: &'a Arc<Pool>,
    deadline: Instant,
    timeout: Duration,
}

enum State {
    Start(Request<UpstreamBody>),
    Sending {
        outgoing: Outgoing,
        written: bool,
        /// Kept only while the request may yet go elsewhere: its header values share the
        /// client connection's read buffer, which they pin until then (until the answer's
        /// head, for a request that may be sent again).
        unsent: Option<Parts>,
        /// The body of an idempotent request on a reused connection, to send it again on a
        /// fresh one if the upstream closes this one without a word of an answer.
        replay: Option<Bytes>,
        /// A write that failed: believed only once reading shows no answer came first (an
        /// upstream may answer a 413 and close without reading the rest).
        write_error: Option<std::io::Error>,
        head_request: bool,
    },
    Done,
}

/// Why an exchange brought no answer.
enum Failure {
    Write(WriteFailure),
    Read(UpstreamError),
}

impl Future for Exchange<'_> {
    type Output = Result<Response<Body>, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(connection) = this.connection.as_mut() else {
            return Poll::Pending;
        };
        if let State::Start(_) = this.state {
            let State::Start(request) = std::mem::replace(&mut this.state, State::Done) else {
                unreachable!("just matched")
            };
            this.state = start(request, this.appended, connection, cx);
        }
        let State::Sending {
            outgoing,
            written,
            unsent,
            replay,
            write_error,
            head_request,
        } = &mut this.state
        else {
            return Poll::Pending;
        };
        if !*written {
            match Pin::new(&mut *outgoing).poll_write(&mut connection.io, cx) {
                Poll::Ready(Ok(())) => {
                    *written = true;
                    if replay.is_none() {
                        connection.keep_map(unsent.take());
                    }
                }
                Poll::Ready(Err(WriteFailure::Io(err))) => {
                    *written = true;
                    *write_error = Some(err);
                }
                Poll::Ready(Err(failure)) => {
                    return Poll::Ready(Err(this.failed(Failure::Write(failure))))
                }
                Poll::Pending => {}
            }
        }
        // Read while writing: an upstream may answer (a 413, say) before the upload ends.
        let head = match connection.poll_head(cx, *head_request) {
            Poll::Ready(Ok(head)) => head,
            Poll::Pending => {
                if connection.alarm.poll_passed(cx, this.deadline).is_pending() {
                    return Poll::Pending;
                }
                // Given up on: the connection, mid-exchange, serves no other.
                this.connection = None;
                this.state = State::Done;
                let timeout = UpstreamError::no_response_within(this.timeout);
                return Poll::Ready(Err(timeout.into()));
            }
            Poll::Ready(Err(err)) => {
                let failure = match write_error.take() {
                    Some(io) => Failure::Write(WriteFailure::Io(io)),
                    None => Failure::Read(err),
                };
                return Poll::Ready(Err(this.failed(failure)));
            }
        };
        let State::Sending {
            outgoing,
            write_error,
            unsent,
            ..
        } = std::mem::replace(&mut this.state, State::Done)
        else {
            unreachable!("just matched")
        };
        let Some(mut connection) = this.connection.take() else {
            unreachable!("taken only here")
        };
        connection.keep_map(unsent);
        connection.read_size = FIRST_READ;
        // An answer before the request was all written (a model streaming as it reads an
        // upload, or a 413): the rest goes out beside the answer, as the body is read. A
        // failed write ends the sending, not the answer, and the connection is not kept.
        let keep_alive = head.keep_alive && write_error.is_none();
        let rest = if outgoing.is_finished() || write_error.is_some() {
            connection.head = outgoing.into_parts().1;
            None
        } else {
            Some(Box::new(outgoing))
        };
        let body = Body::new(
            connection,
            head.fields,
            head.framing,
            keep_alive,
            rest,
            this.pool,
        );
        Poll::Ready(Ok(head.response.map(|()| body)))
    }
}

impl Exchange<'_> {
    /// No answer came. The request is given back (`NotSent`) if none of it was written, or
    /// if it may be sent again: an idempotent request on a reused connection that the
    /// upstream closed before a byte of an answer, which is what a keep-alive race looks
    /// like (the upstream timed the connection out as the request went out on it).
    fn failed(&mut self, failure: Failure) -> SendError {
        let answered = self
            .connection
            .take()
            .is_some_and(|connection| connection.heard);
        let err = match failure {
            Failure::Write(WriteFailure::Body(err)) => return SendError::client(&err),
            Failure::Write(WriteFailure::Length) => {
                return SendError::ClientBody(LENGTH_MISMATCH.into())
            }
            Failure::Write(WriteFailure::Io(err)) => io_error("sending the request", &err),
            Failure::Read(err) => err,
        };
        let State::Sending {
            outgoing,
            unsent: Some(parts),
            replay,
            ..
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return err.into();
        };
        let payload = match (outgoing.into_parts().0, replay) {
            (Some(untouched), _) => Payload::untouched(untouched),
            (None, Some(body)) if err.kind == UpstreamErrorKind::Reset && !answered => {
                Payload::Bytes(body)
            }
            (None, _) => return err.into(),
        };
        SendError::not_sent(err, Request::from_parts(parts, payload.into()))
    }
}

/// Encodes the request's head into the connection's buffer and readies its body to follow.
fn start(
    request: Request<UpstreamBody>,
    appended: Appended<'_>,
    connection: &mut Connection,
    cx: &mut Context<'_>,
) -> State {
    let (parts, body) = request.into_parts();
    let payload = match body {
        Either::Left(upload) => Payload::Upload(upload),
        Either::Right(full) => Payload::Bytes(bytes_of(full, cx)),
    };
    let replay = match &payload {
        Payload::Bytes(bytes) if connection.reused && parts.method.is_idempotent() => {
            Some(bytes.clone())
        }
        _ => None,
    };
    let buffer = std::mem::take(&mut connection.head);
    connection.heard = false;
    State::Sending {
        outgoing: request::outgoing(&parts, appended, payload, buffer),
        written: false,
        write_error: None,
        head_request: parts.method == http::Method::HEAD,
        unsent: Some(parts),
        replay,
    }
}

/// A `Full` body's bytes: it holds one frame, ready at once (none when empty).
fn bytes_of(mut full: Full<Bytes>, cx: &mut Context<'_>) -> Bytes {
    match Pin::new(&mut full).poll_frame(cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

impl From<Payload> for UpstreamBody {
    fn from(payload: Payload) -> UpstreamBody {
        match payload {
            Payload::Bytes(bytes) => Either::Right(Full::new(bytes)),
            Payload::Upload(upload) => Either::Left(upload),
        }
    }
}

fn io_error(doing: &str, err: &std::io::Error) -> UpstreamError {
    // Short of TLS and a timeout, an I/O failure mid-exchange is the connection's end.
    UpstreamError {
        kind: io_failure_kind(err).unwrap_or(UpstreamErrorKind::Reset),
        detail: format!("{doing}: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use std::future::poll_fn;

    use http_body_util::BodyExt as _;

    use crate::upstream::BodyError;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// What a scripted upstream does after a reply.
    #[derive(Clone, Copy, PartialEq)]
    enum Then {
        KeepOpen,
        Close,
    }

    /// A model server that answers each request, on whatever connection, with the next
    /// scripted reply, and records the requests as they arrived on the wire.
    struct Scripted {
        addr: SocketAddr,
        connections: Arc<AtomicUsize>,
        requests: Arc<Mutex<Vec<String>>>,
    }

    impl Scripted {
        async fn start(replies: &[(&'static str, Then)]) -> Scripted {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let replies = Arc::new(Mutex::new(replies.iter().copied().collect::<VecDeque<_>>()));
            let connections = Arc::new(AtomicUsize::new(0));
            let requests = Arc::new(Mutex::new(Vec::new()));
            let (counted, recorded) = (connections.clone(), requests.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(stream, replies.clone(), recorded.clone()));
                }
            });
            Scripted {
                addr,
                connections,
                requests,
            }
        }

        async fn connect(&self) -> Box<Connection> {
            let stream = TcpStream::connect(self.addr).await.expect("connect");
            Connection::new(Stream::Left(stream))
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }

        fn requests(&self) -> Vec<String> {
            self.requests.lock().expect("lock").clone()
        }
    }

    async fn serve(
        mut stream: TcpStream,
        replies: Arc<Mutex<VecDeque<(&'static str, Then)>>>,
        requests: Arc<Mutex<Vec<String>>>,
    ) {
        let mut buffer = Vec::new();
        loop {
            let Some(request) = read_request(&mut stream, &mut buffer).await else {
                return;
            };
            requests.lock().expect("lock").push(request);
            let Some((reply, then)) = replies.lock().expect("lock").pop_front() else {
                return;
            };
            if stream.write_all(reply.as_bytes()).await.is_err() || then == Then::Close {
                return;
            }
        }
    }

    /// One request off the wire: its head and a body of its `content-length`, or chunked to
    /// its last chunk.
    async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<String> {
        let complete = |buffer: &[u8]| -> Option<usize> {
            let head_end = buffer.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
            let head = String::from_utf8_lossy(&buffer[..head_end]).to_lowercase();
            if head.contains("transfer-encoding: chunked") {
                let tail = buffer[head_end..]
                    .windows(5)
                    .position(|w| w == b"0\r\n\r\n")?;
                return Some(head_end + tail + 5);
            }
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .map_or(0, |length| length.trim().parse().expect("length"));
            (buffer.len() >= head_end + length).then_some(head_end + length)
        };
        loop {
            if let Some(end) = complete(buffer) {
                let request = String::from_utf8_lossy(&buffer[..end]).into_owned();
                buffer.drain(..end);
                return Some(request);
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        }
    }

    /// The answer's fields, passed through or in its map.
    fn fields(response: &mut Response<Body>) -> HeaderMap {
        let mut headers = response.headers().clone();
        if let Some(fields) = response.body_mut().take_fields() {
            fields.append_to(&mut headers);
        }
        headers
    }

    fn get(path: &str) -> Request<UpstreamBody> {
        Request::get(path)
            .header("host", "model")
            .body(Either::Right(Full::new(Bytes::new())))
            .expect("request")
    }

    fn post(path: &str, body: &'static str) -> Request<UpstreamBody> {
        Request::post(path)
            .header("host", "model")
            .body(Either::Right(Full::new(Bytes::from_static(
                body.as_bytes(),
            ))))
            .expect("request")
    }

    /// The plainest answer a model server gives.
    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    /// The answer to `request` on a new connection to `upstream`, and the pool that the
    /// connection goes back to.
    async fn first_answer(
        upstream: &Scripted,
        request: Request<UpstreamBody>,
    ) -> (Response<Body>, Arc<Pool>) {
        let pool = Arc::new(Pool::default());
        let response = send(upstream.connect().await, request, &pool).await;
        (response, pool)
    }

    /// A connection to an upstream that, once it has a request's head, hands its socket and
    /// the count of body bytes that came with the head to `then`.
    async fn on_request_head<F, Fut>(then: F) -> Box<Connection>
    where
        F: FnOnce(TcpStream, usize) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buf = [0u8; 65536];
            let head_end = loop {
                if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                    break at + 4;
                }
                let read = stream.read(&mut buf).await.expect("read");
                assert!(read > 0, "closed before its head");
                seen.extend_from_slice(&buf[..read]);
            };
            then(stream, seen.len() - head_end).await;
        });
        let stream = TcpStream::connect(addr).await.expect("connect");
        Connection::new(Stream::Left(stream))
    }

    /// A POST of 16 MiB: more than loopback sockets buffer, so it is still being written
    /// when an upstream answers its head.
    const LARGE: usize = 16 << 20;

    fn large_post(path: &str) -> Request<UpstreamBody> {
        Request::post(path)
            .header("host", "model")
            .body(Either::Right(Full::new(Bytes::from(vec![b'x'; LARGE]))))
            .expect("request")
    }

    /// A timeout no test reaches.
    const MINUTE: Duration = Duration::from_secs(60);

    fn far() -> Instant {
        Instant::now() + MINUTE
    }

    async fn pooled(pool: &Pool) -> Option<Box<Connection>> {
        poll_fn(|cx| Poll::Ready(pool.take(cx, std::time::Instant::now()))).await
    }

    async fn send(
        connection: Box<Connection>,
        request: Request<UpstreamBody>,
        pool: &Arc<Pool>,
    ) -> Response<Body> {
        match connection
            .send(request, Appended::default(), pool, far(), MINUTE)
            .await
        {
            Ok(response) => response,
            Err(err) => panic!("failed: {err}"),
        }
    }

    /// The body's bytes and trailers, or how it failed.
    async fn read(body: Body) -> Result<(Bytes, Option<HeaderMap>), UpstreamError> {
        let collected = body.collect().await.map_err(|err| match err {
            BodyError::Upstream(err) => err,
            BodyError::Client(err) => panic!("no client here: {err}"),
        })?;
        let trailers = collected.trailers().cloned();
        Ok((collected.to_bytes(), trailers))
    }

    #[tokio::test]
    async fn a_connection_serves_the_next_request_once_its_body_is_read() {
        let upstream = Scripted::start(&[
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst",
                Then::KeepOpen,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond",
                Then::KeepOpen,
            ),
        ])
        .await;
        let (response, pool) = first_answer(&upstream, post("/predict", "{}")).await;
        assert!(pooled(&pool).await.is_none(), "lent until its body is read");
        let (first, _) = read(response.into_body()).await.expect("body");
        assert_eq!(first, "first");

        let connection = pooled(&pool).await.expect("back in the pool");
        let response = send(connection, get("/health"), &pool).await;
        assert_eq!(read(response.into_body()).await.expect("body").0, "second");
        assert_eq!(upstream.connections(), 1);
        assert_eq!(
            upstream.requests(),
            [
                "POST /predict HTTP/1.1\r\nhost: model\r\ncontent-length: 2\r\n\r\n{}",
                "GET /health HTTP/1.1\r\nhost: model\r\n\r\n",
            ]
        );
    }

    #[tokio::test]
    async fn an_answer_read_into_the_last_requests_map_has_only_its_own_fields() {
        let upstream = Scripted::start(&[
            (OK, Then::KeepOpen),
            (
                "HTTP/1.1 200 OK\r\nx-answer: 2\r\ncontent-length: 2\r\n\r\nok",
                Then::KeepOpen,
            ),
        ])
        .await;
        let names = |response: &mut Response<Body>| {
            let names = fields(response).into_iter().flat_map(|(name, _)| name);
            names
                .map(|name| name.as_str().to_owned())
                .collect::<Vec<_>>()
        };
        let with_user = || {
            let mut request = get("/");
            let alice = http::HeaderValue::from_static("alice");
            request.headers_mut().insert("x-user-id", alice);
            request
        };
        // Written whole before the answer: its map holds the answer.
        let (mut response, pool) = first_answer(&upstream, with_user()).await;
        assert_eq!(names(&mut response), ["content-length"]);
        read(response.into_body()).await.expect("body");

        // Kept until the answer on a reused connection (it might be sent again), then kept
        // for the next answer.
        let connection = pooled(&pool).await.expect("kept");
        let mut response = send(connection, with_user(), &pool).await;
        assert_eq!(names(&mut response), ["x-answer", "content-length"]);
        read(response.into_body()).await.expect("body");
        let connection = pooled(&pool).await.expect("kept");
        assert!(connection.spare.is_some(), "the sent request's map is kept");
    }

    #[tokio::test]
    async fn a_connection_idles_with_small_buffers_after_a_large_answer() {
        let body_length = 1_000_000;
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {body_length}\r\n\r\n{}",
            "x".repeat(body_length)
        );
        let reply: &'static str = Box::leak(reply.into_boxed_str());
        let upstream = Scripted::start(&[(reply, Then::KeepOpen)]).await;
        let (response, pool) = first_answer(&upstream, get("/")).await;
        let (body, _) = read(response.into_body()).await.expect("body");
        assert_eq!(body.len(), body_length);
        let connection = pooled(&pool).await.expect("kept");
        assert!(connection.read.capacity() <= 2 * FIRST_READ);
    }

    #[tokio::test]
    async fn a_chunked_answer_arrives_whole_with_its_trailers_and_frees_its_connection() {
        let upstream = Scripted::start(&[(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\n{\"a\":1\r\n1\r\n}\r\n0\r\ngrpc-status: 0\r\n\r\n",
            Then::KeepOpen,
        )])
        .await;
        let (response, pool) = first_answer(&upstream, get("/")).await;
        assert_eq!(
            response.body().size_hint().exact(),
            None,
            "no length to tell"
        );
        let (body, trailers) = read(response.into_body()).await.expect("body");
        assert_eq!(body, "{\"a\":1}");
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
        assert!(pooled(&pool).await.is_some());
    }

    #[tokio::test]
    async fn an_answer_that_ends_with_its_connection_is_read_to_the_close_and_not_kept() {
        let upstream = Scripted::start(&[(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end",
            Then::Close,
        )])
        .await;
        let (response, pool) = first_answer(&upstream, get("/")).await;
        assert_eq!(
            read(response.into_body()).await.expect("body").0,
            "until the end"
        );
        assert!(pooled(&pool).await.is_none());
    }

    #[tokio::test]
    async fn answers_that_close_their_connection_leave_nothing_in_the_pool() {
        for reply in [
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ] {
            let upstream = Scripted::start(&[(reply, Then::KeepOpen)]).await;
            let pool = Arc::new(Pool::default());
            let response = send(upstream.connect().await, get("/"), &pool).await;
            assert_eq!(read(response.into_body()).await.expect("body").0, "ok");
            assert!(pooled(&pool).await.is_none(), "{reply}");
        }
    }

    #[tokio::test]
    async fn a_head_answer_has_no_body_whatever_its_length_says() {
        let upstream = Scripted::start(&[
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
                Then::KeepOpen,
            ),
            (OK, Then::KeepOpen),
        ])
        .await;
        let pool = Arc::new(Pool::default());
        let mut head = get("/");
        *head.method_mut() = http::Method::HEAD;
        let mut response = send(upstream.connect().await, head, &pool).await;
        assert_eq!(fields(&mut response)["content-length"], "1000");
        assert!(response.body().is_end_stream());
        drop(response);
        let connection = pooled(&pool).await.expect("kept: nothing was left to read");
        let response = send(connection, get("/"), &pool).await;
        assert_eq!(read(response.into_body()).await.expect("body").0, "ok");
    }

    #[tokio::test]
    async fn interim_answers_give_way_to_the_final_one() {
        let upstream = Scripted::start(&[(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            Then::KeepOpen,
        )])
        .await;
        let (response, _pool) = first_answer(&upstream, post("/", "{}")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(read(response.into_body()).await.expect("body").0, "ok");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_taken_from_the_pool() {
        let upstream = Scripted::start(&[(OK, Then::Close)]).await;
        let (response, pool) = first_answer(&upstream, get("/")).await;
        read(response.into_body()).await.expect("body");
        // The upstream closed it without saying so first: only its FIN tells.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(pooled(&pool).await.is_none());
    }

    #[tokio::test]
    async fn an_upstream_that_closes_mid_body_fails_the_body_as_a_reset() {
        let upstream = Scripted::start(&[(
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
            Then::Close,
        )])
        .await;
        let (response, pool) = first_answer(&upstream, get("/")).await;
        let err = read(response.into_body()).await.expect_err("cut short");
        assert_eq!(err.kind, UpstreamErrorKind::Reset);
        assert!(pooled(&pool).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_silent_past_the_deadline_is_a_timeout_and_its_connection_dropped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let holding = tokio::spawn(async move { listener.accept().await });
        let stream = TcpStream::connect(addr).await.expect("connect");
        let pool = Arc::new(Pool::default());
        let started = Instant::now();
        let timeout = Duration::from_secs(5);
        let failed = Connection::new(Stream::Left(stream))
            .send(
                get("/"),
                Appended::default(),
                &pool,
                started + timeout,
                timeout,
            )
            .await;
        let Err(SendError::Upstream(err)) = failed else {
            panic!("no answer came, and the request went out");
        };
        assert_eq!(err.kind, UpstreamErrorKind::Timeout);
        assert_eq!(started.elapsed(), timeout);
        assert!(pooled(&pool).await.is_none());
        drop(holding);
    }

    /// A pooled connection's deadline, watched for a task other than the one that used it
    /// last: the upstream answers once, then reads the next request and stays silent.
    #[tokio::test(start_paused = true)]
    async fn a_pooled_connection_silent_past_the_deadline_times_out_in_another_task() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let upstream = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buf = [0; 4096];
            let _ = stream.read(&mut buf).await;
            stream.write_all(OK.as_bytes()).await.expect("answer");
            let _ = stream.read(&mut buf).await;
            std::future::pending::<()>().await;
        });
        let pool = Arc::new(Pool::default());
        let stream = TcpStream::connect(addr).await.expect("connect");
        let response = send(Connection::new(Stream::Left(stream)), get("/"), &pool).await;
        read(response.into_body()).await.expect("body");
        let timeout = Duration::from_secs(5);
        let second = tokio::spawn({
            let pool = pool.clone();
            async move {
                let started = Instant::now();
                let connection = pooled(&pool).await.expect("kept");
                let failed = connection
                    .send(
                        get("/again"),
                        Appended::default(),
                        &pool,
                        started + timeout,
                        timeout,
                    )
                    .await;
                (failed.err(), started.elapsed())
            }
        });
        let (failed, waited) = tokio::time::timeout(Duration::from_secs(60), second)
            .await
            .expect("woken by the deadline")
            .expect("task");
        let Some(SendError::Upstream(err)) = failed else {
            panic!("the request went out, and no answer came");
        };
        assert_eq!(err.kind, UpstreamErrorKind::Timeout);
        assert_eq!(waited, timeout);
        upstream.abort();
    }

    #[tokio::test]
    async fn an_upstream_that_closes_before_answering_is_a_reset() {
        let upstream = Scripted::start(&[]).await;
        let pool = Arc::new(Pool::default());
        let failed = upstream
            .connect()
            .await
            .send(get("/"), Appended::default(), &pool, far(), MINUTE)
            .await;
        let Err(SendError::Upstream(err)) = failed else {
            panic!("the request went out, and no answer came");
        };
        assert_eq!(err.kind, UpstreamErrorKind::Reset);
    }

    /// A connection that served one request, on which the upstream then reads the next and
    /// closes without answering: a keep-alive timeout racing the request.
    async fn timed_out_on_reuse(upstream: &Scripted, pool: &Arc<Pool>) -> Box<Connection> {
        let response = send(upstream.connect().await, get("/"), pool).await;
        read(response.into_body()).await.expect("body");
        pooled(pool).await.expect("kept")
    }

    #[tokio::test]
    async fn an_idempotent_request_a_reused_connection_lost_unanswered_is_given_back() {
        let upstream = Scripted::start(&[(OK, Then::KeepOpen)]).await;
        let pool = Arc::new(Pool::default());
        let connection = timed_out_on_reuse(&upstream, &pool).await;
        let failed = connection
            .send(get("/again"), Appended::default(), &pool, far(), MINUTE)
            .await;
        let Err(SendError::NotSent { source, request }) = failed else {
            panic!("not given back to be sent again");
        };
        assert_eq!(source.kind, UpstreamErrorKind::Reset);
        assert_eq!(request.0.uri(), "/again");
        assert_eq!(upstream.requests().len(), 2, "it did reach the upstream");
    }

    #[tokio::test]
    async fn a_post_a_reused_connection_lost_unanswered_is_not_sent_again() {
        let upstream = Scripted::start(&[(OK, Then::KeepOpen)]).await;
        let pool = Arc::new(Pool::default());
        let connection = timed_out_on_reuse(&upstream, &pool).await;
        let failed = connection
            .send(
                post("/predict", "{}"),
                Appended::default(),
                &pool,
                far(),
                MINUTE,
            )
            .await;
        let Err(SendError::Upstream(err)) = failed else {
            panic!("a POST that reached the upstream may not be sent twice");
        };
        assert_eq!(err.kind, UpstreamErrorKind::Reset);
    }

    #[tokio::test]
    async fn an_idempotent_request_the_upstream_began_to_answer_is_not_sent_again() {
        let upstream = Scripted::start(&[
            (OK, Then::KeepOpen),
            ("HTTP/1.1 100 Continue\r\n\r\n", Then::Close),
        ])
        .await;
        let pool = Arc::new(Pool::default());
        let connection = timed_out_on_reuse(&upstream, &pool).await;
        let failed = connection
            .send(get("/again"), Appended::default(), &pool, far(), MINUTE)
            .await;
        assert!(
            matches!(failed, Err(SendError::Upstream(_))),
            "an upstream that said anything was alive when the request arrived"
        );
    }

    #[tokio::test]
    async fn an_answer_sent_before_the_upstream_stops_reading_wins_over_the_write_error() {
        let connection = on_request_head(|mut stream, _| async move {
            let reply = b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 9\r\n\r\ntoo large";
            stream.write_all(reply).await.expect("write");
            // Closed with the upload unread: the kernel answers the rest with a reset.
        })
        .await;
        let pool = Arc::new(Pool::default());
        let response = connection
            .send(
                large_post("/predict"),
                Appended::default(),
                &pool,
                far(),
                MINUTE,
            )
            .await
            .expect("the upstream's answer, not the reset of the upload");
        assert_eq!(response.status(), 413);
        assert_eq!(
            read(response.into_body()).await.expect("body").0,
            "too large"
        );
        assert!(pooled(&pool).await.is_none());
    }

    #[tokio::test]
    async fn an_answer_begun_before_the_upload_ends_goes_on_beside_it() {
        let connection = on_request_head(|mut stream, mut uploaded| async move {
            // A model that streams as it reads: its answer's head first, then the upload.
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            stream.write_all(head).await.expect("write");
            let mut buf = [0u8; 65536];
            while uploaded < LARGE {
                let read = stream.read(&mut buf).await.expect("read");
                assert!(read > 0, "the upload stopped at {uploaded} bytes");
                uploaded += read;
            }
            let count = uploaded.to_string();
            let tail = format!("{:x}\r\n{count}\r\n0\r\n\r\n", count.len());
            stream.write_all(tail.as_bytes()).await.expect("write");
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let pool = Arc::new(Pool::default());
        let response = send(connection, large_post("/transcribe"), &pool).await;
        assert_eq!(response.status(), 200);
        let answer = tokio::time::timeout(Duration::from_secs(10), read(response.into_body()))
            .await
            .expect("the answer ends once the upload is in")
            .expect("body");
        assert_eq!(answer.0, LARGE.to_string());
        assert!(pooled(&pool).await.is_some(), "all written, all read: kept");
    }

    #[tokio::test]
    async fn a_garbled_answer_is_a_protocol_error() {
        let upstream = Scripted::start(&[("HTTP/1.1 OK 200\r\n\r\n", Then::KeepOpen)]).await;
        let pool = Arc::new(Pool::default());
        let failed = upstream
            .connect()
            .await
            .send(get("/"), Appended::default(), &pool, far(), MINUTE)
            .await;
        let Err(SendError::Upstream(err)) = failed else {
            panic!("a garbled answer was taken");
        };
        assert_eq!(err.kind, UpstreamErrorKind::Protocol);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_takes_its_connection_with_it() {
        let upstream = Scripted::start(&[(
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
            Then::KeepOpen,
        )])
        .await;
        let (response, pool) = first_answer(&upstream, get("/")).await;
        drop(response);
        assert!(pooled(&pool).await.is_none());
    }

    #[tokio::test]
    async fn a_request_the_upstream_could_not_take_is_given_back_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        // The upstream resets the connection before the request is written.
        let (accepted, _) = listener.accept().await.expect("accept");
        accepted.set_zero_linger().expect("linger");
        drop(accepted);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pool = Arc::new(Pool::default());
        let failed = Connection::new(Stream::Left(stream))
            .send(
                post("/predict", "{\"x\":1}"),
                Appended::default(),
                &pool,
                far(),
                MINUTE,
            )
            .await;
        let Err(SendError::NotSent { source, request }) = failed else {
            panic!("the request was not given back");
        };
        assert_eq!(source.kind, UpstreamErrorKind::Reset);
        assert_eq!(request.0.uri(), "/predict");
        let body = match request.0.into_body() {
            Either::Right(full) => full.collect().await.expect("infallible").to_bytes(),
            Either::Left(_) => panic!("the body changed kind"),
        };
        assert_eq!(body, "{\"x\":1}");
    }
}
