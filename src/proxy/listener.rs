//! Accepts client connections and serves each with HTTP/1.1 or h2 until shutdown: over TLS
//! when the listener terminates it (ALPN chooses), else HTTP/1.1 or h2c (the first bytes do).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::http1::{self as own_http1, Served};
use super::stall::WriteStallLimit;
use super::{ClientBody, Peer, Proxy};
use crate::tls::{HandshakeFailure, Terminator};

/// How long an h2c connection may stay silent before abproxy pings it; a peer that does not
/// answer within hyper's 20 s is gone (HTTP/1.1's idle connections end at the header timeout).
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// The first bytes of an h2c connection (RFC 9113 §3.4); no HTTP/1.1 request starts so.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Asks one connection to finish: the accept loop holds every open connection's sender and
/// drops them all when shutdown begins. Polled at every wake-up of its connection, a oneshot
/// costs an atomic load, where a `CancellationToken` takes a mutex. Once asked, it stays
/// asked.
pub(super) struct Finish(Option<oneshot::Receiver<()>>);

impl Finish {
    /// Whether finishing was asked, without waiting for it.
    pub fn asked(&mut self) -> bool {
        match &mut self.0 {
            None => true,
            Some(receiver) => match receiver.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => false,
                _ => {
                    self.0 = None;
                    true
                }
            },
        }
    }
}

impl Future for Finish {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(receiver) = &mut self.0 {
            let _ = ready!(Pin::new(receiver).poll(cx));
            self.0 = None;
        }
        Poll::Ready(())
    }
}

/// The HTTP versions a client may speak, and how abproxy serves each.
struct Protocols {
    /// `[limits] client_header_timeout` when these were built.
    header_timeout: Duration,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// For the rare connection whose first bytes could begin either.
    either: auto::Builder<TokioExecutor>,
}

enum Protocol {
    Http1,
    Http2,
    Undecided,
}

impl Protocols {
    fn new(header_timeout: Duration) -> Protocols {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEP_ALIVE);
        let mut either = auto::Builder::new(TokioExecutor::new());
        either
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        either
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEP_ALIVE);
        Protocols {
            header_timeout,
            http1,
            http2,
            either,
        }
    }
}

/// Tells h2c from HTTP/1.1 by peeking at the first bytes, leaving them in the socket.
///
/// hyper-util's `auto` builder reads them into a side buffer and replays it, which makes
/// hyper grow its read buffer from 8 to 16 KiB on every connection; one peek costs a system
/// call per connection and no memory. When the bytes so far are only the start of the h2c
/// preface, `auto` decides after all: peeking again would poll, as the socket stays readable.
async fn sniff(stream: &TcpStream) -> io::Result<Protocol> {
    let mut first = [0; H2_PREFACE.len()];
    let read = stream.peek(&mut first).await?;
    Ok(if read == 0 || !H2_PREFACE.starts_with(&first[..read]) {
        Protocol::Http1
    } else if read == H2_PREFACE.len() {
        Protocol::Http2
    } else {
        Protocol::Undecided
    })
}

/// Whether the client opened the TLS port with plain HTTP: a TLS connection starts with a
/// handshake record (0x16), an HTTP/1.x request with its method's first capital letter.
async fn starts_as_plain_http(stream: &TcpStream) -> io::Result<bool> {
    let mut first = [0; 1];
    let read = stream.peek(&mut first).await?;
    Ok(read == 1 && first[0].is_ascii_uppercase())
}

/// Tells a plain-HTTP client that it reached the TLS port, as nginx does, rather than
/// resetting it: the answer, then the client's bytes read and dropped until it closes (up
/// to 64 KiB), so that unread input does not turn the close into a reset before the client
/// has read the answer.
async fn refuse_plain_http(mut stream: TcpStream) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BODY: &str = "This port speaks HTTPS: the request came as plain HTTP. Use https://.\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await?;
    let mut unread = [0; 4096];
    let mut dropped = 0;
    while dropped < 64 * 1024 {
        match stream.read(&mut unread).await? {
            0 => break,
            read => dropped += read,
        }
    }
    Ok(())
}

/// What a listener speaks: plain HTTP, or TLS with the live certificates.
#[derive(Clone)]
enum Transport {
    Plain,
    Tls(Arc<Terminator>),
}

/// Serves HTTP/1.1 and h2c on `listener` until `shutdown` fires, then closes it so new
/// connections are refused, and gives open connections up to the configured grace period to
/// finish their requests.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    serve_with(listener, Transport::Plain, proxy, shutdown).await;
}

/// Like [`serve`], for TLS: each connection's handshake must finish within
/// `handshake_timeout`, and then ALPN chooses h2 or HTTP/1.1.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<Terminator>,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
) {
    serve_with(listener, Transport::Tls(tls), proxy, shutdown).await;
}

async fn serve_with(
    listener: TcpListener,
    transport: Transport,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
) {
    let mut protocols = Arc::new(Protocols::new(proxy.client_header_timeout()));
    let connections = GracefulShutdown::new();
    // Owns every connection task, so that those still open when the grace period ends are
    // closed rather than left running; finished ones are reaped as the loop goes.
    let mut tasks = JoinSet::new();
    let mut finishers = HashMap::new();
    loop {
        let (stream, client) = tokio::select! {
            Some(ended) = tasks.join_next_with_id() => {
                finishers.remove(&ended.map_or_else(|err| err.id(), |(id, ())| id));
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        // Rebuilt only when a reload changed the timeout; new connections get the new one.
        let header_timeout = proxy.client_header_timeout();
        if protocols.header_timeout != header_timeout {
            protocols = Arc::new(Protocols::new(header_timeout));
        }
        let connection = Connection {
            proxy: proxy.clone(),
            client,
            protocols: protocols.clone(),
            watcher: connections.watcher(),
        };
        let transport = transport.clone();
        let (finisher, finish) = oneshot::channel();
        let finish = Finish(Some(finish));
        let task = tasks.spawn(async move {
            match transport {
                Transport::Plain => connection.plain(stream, finish).await,
                // Boxed, as h2 below: a TLS session is large, and plain connections'
                // tasks would otherwise reserve room for one.
                Transport::Tls(tls) => Box::pin(connection.tls(stream, &tls, finish)).await,
            }
        });
        finishers.insert(task.id(), finisher);
    }
    drop(listener);
    // Every open connection is asked to finish: HTTP/1.1 ones end after the request in
    // flight, if any; h2 ones (watched) send GOAWAY when the drain below begins.
    drop(finishers);

    let grace = proxy.shutdown_grace();
    let open = connections.count();
    tracing::info!(open_connections = open, grace = %humantime::format_duration(grace), "draining");
    if tokio::time::timeout(grace, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period ended with requests still in flight; closing them");
    }
    tasks.shutdown().await;
}

impl Proxy {
    /// `[limits] client_header_timeout` of the live config.
    fn client_header_timeout(&self) -> Duration {
        self.current.load().config.limits.client_header_timeout
    }

    /// `[server.tls] handshake_timeout` of the live config.
    fn handshake_timeout(&self) -> Duration {
        let generation = self.current.load();
        let config = &generation.config;
        config
            .server
            .tls
            .as_ref()
            .map_or(config.limits.client_header_timeout, |tls| {
                tls.handshake_timeout
            })
    }
}

/// One accepted connection, until it has said which protocol it speaks.
struct Connection {
    proxy: Arc<Proxy>,
    client: std::net::SocketAddr,
    protocols: Arc<Protocols>,
    watcher: Watcher,
}

impl Connection {
    /// HTTP/1.1 or h2c, told apart by the first bytes.
    async fn plain(self, stream: TcpStream, mut finish: Finish) {
        let sniffed = tokio::select! {
            sniffed = tokio::time::timeout(self.protocols.header_timeout, sniff(&stream)) => sniffed,
            // A connection that has sent nothing yet has no request to finish.
            _ = &mut finish => return,
        };
        let protocol = match sniffed {
            Ok(Ok(protocol)) => protocol,
            Ok(Err(err)) => {
                tracing::debug!(client = %self.client, error = %err, "connection failed before a request");
                return;
            }
            Err(_) => return,
        };
        let peer = Peer::new(self.client);
        self.serve(stream, protocol, peer, finish).await;
    }

    /// A TLS handshake within `handshake_timeout`, then h2 if ALPN chose it, else HTTP/1.1.
    /// A failed handshake is counted by reason; it never reached a variant, so no request
    /// metric sees it. Plain HTTP is answered `400` (one `peek` a connection tells it).
    async fn tls(self, stream: TcpStream, tls: &Terminator, mut finish: Finish) {
        let timeout = self.proxy.handshake_timeout();
        // One deadline for the handshake, or for telling a plain-HTTP client off.
        let deadline = tokio::time::Instant::now() + timeout;
        // `Err`: the connection opened with plain HTTP, and is given back to be answered.
        let handshake = async {
            if starts_as_plain_http(&stream).await? {
                return Ok(Err(stream));
            }
            tls.acceptor().accept(stream).await.map(Ok)
        };
        let accepted = tokio::select! {
            accepted = tokio::time::timeout_at(deadline, handshake) => accepted,
            _ = &mut finish => return,
        };
        let stream = match accepted {
            Ok(Ok(Ok(stream))) => stream,
            Ok(Ok(Err(plain))) => {
                tracing::debug!(client = %self.client, "plain HTTP on the TLS port, answered 400");
                tls.handshake_failed(HandshakeFailure::NotTls);
                // A client that keeps the connection open must not hold up shutdown.
                tokio::select! {
                    _ = tokio::time::timeout_at(deadline, refuse_plain_http(plain)) => {}
                    _ = &mut finish => {}
                }
                return;
            }
            Ok(Err(err)) => {
                let reason = HandshakeFailure::of(&err);
                tracing::debug!(client = %self.client, reason = reason.as_str(), error = %err, "TLS handshake failed");
                tls.handshake_failed(reason);
                return;
            }
            Err(_) => {
                tracing::debug!(client = %self.client, "TLS handshake timed out");
                tls.handshake_failed(HandshakeFailure::Timeout);
                return;
            }
        };
        let protocol = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => Protocol::Http2,
            _ => Protocol::Http1,
        };
        let peer = Peer::over_tls(self.client);
        self.serve(stream, protocol, peer, finish).await;
    }

    async fn serve<S>(self, stream: S, protocol: Protocol, peer: Peer, mut finish: Finish)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            proxy,
            client,
            protocols,
            watcher,
        } = self;
        let stall_limit = {
            let proxy = proxy.clone();
            move || proxy.client_stall_limit()
        };
        let io = WriteStallLimit::new(stream, stall_limit);
        let header_timeout = proxy.client_header_timeout();
        // hyper times the HTTP/1.1 request head but not the h2 preface: an h2 client that
        // sends no request within the header timeout is closed here.
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let service = |proxy: Arc<Proxy>, peer: Peer, asked: Arc<std::sync::atomic::AtomicBool>| {
            service_fn(move |request: http::Request<hyper::body::Incoming>| {
                asked.store(true, std::sync::atomic::Ordering::Relaxed);
                let (proxy, peer) = (proxy.clone(), peer.clone());
                let request = request.map(ClientBody::Streaming);
                async move {
                    let answer = proxy.handle(request, None, &peer).await;
                    Ok::<_, Infallible>(answer.into_response())
                }
            })
        };
        let served = match protocol {
            // abproxy's own server first, hyper's (upgradeable, for WebSocket) for requests
            // of other shapes. hyper-util's watcher takes no upgradeable connection, so it is
            // only held (the drain waits for its connections to drop theirs) while `finish`
            // asks this one to finish.
            Protocol::Http1 => {
                let _drained_after = watcher;
                let io =
                    match own_http1::serve(io, &proxy, &peer, &mut finish, header_timeout).await {
                        Served::Closed => return,
                        Served::HandOff(io) => io,
                    };
                // Boxed, as h2 below: every connection's task would otherwise reserve room
                // for hyper's, used by few.
                let mut connection = Box::pin(
                    protocols
                        .http1
                        .serve_connection(TokioIo::new(io), service(proxy, peer, asked))
                        .with_upgrades(),
                );
                let served = tokio::select! {
                    served = connection.as_mut() => served,
                    () = &mut finish => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                served.map_err(Into::into)
            }
            // Boxed: h2's connection state is large and rare here, and every HTTP/1.1
            // connection's task would otherwise reserve room for it.
            Protocol::Http2 => {
                let connection = protocols
                    .http2
                    .serve_connection(TokioIo::new(io), service(proxy, peer, asked.clone()));
                let connection = Box::pin(watcher.watch(connection));
                match until_first_request(connection, header_timeout, &asked).await {
                    Some(served) => served.map_err(Into::into),
                    None => return,
                }
            }
            Protocol::Undecided => {
                let connection = protocols
                    .either
                    .serve_connection(TokioIo::new(io), service(proxy, peer, asked.clone()));
                let connection = Box::pin(watcher.watch(connection));
                match until_first_request(connection, header_timeout, &asked).await {
                    Some(served) => served,
                    None => return,
                }
            }
        };
        if let Err(err) = served {
            tracing::debug!(%client, error = %err, "connection ended with an error");
        }
    }
}

/// Serves `connection`, giving up (`None`) if no request has come within `timeout`.
async fn until_first_request<F: std::future::Future + Unpin>(
    mut connection: F,
    timeout: Duration,
    asked: &std::sync::atomic::AtomicBool,
) -> Option<F::Output> {
    tokio::select! {
        served = &mut connection => return Some(served),
        () = tokio::time::sleep(timeout) => {}
    }
    if asked.load(std::sync::atomic::Ordering::Relaxed) {
        Some(connection.await)
    } else {
        tracing::debug!("no request within the header timeout; closing");
        None
    }
}
