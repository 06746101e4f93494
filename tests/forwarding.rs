//! What crosses the proxy: the request as the client sent it, minus connection-level
//! headers, and upstream failures as 502/504 with their counters.

mod support;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use support::{variants, Backend, Proxy};

/// The proxy with one variant, `control`, at `url`: an upstream the test scripts itself.
async fn one_variant_at(url: &str, extra: &str) -> Proxy {
    Proxy::start(&format!(
        "{extra}\n[[variant]]\nname = \"control\"\nupstream = \"{url}\"\nweight = 100\n"
    ))
    .await
}

async fn one_variant(backend: &Backend, extra: &str) -> Proxy {
    Proxy::start(&format!(
        "{extra}\n{}",
        variants(&[("control", backend, 100.0)])
    ))
    .await
}

#[tokio::test]
async fn method_path_query_headers_and_body_reach_the_upstream() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let reply = proxy
        .client
        .post("/v1/models/m:predict?verbose=1", r#"{"instances":[1,2]}"#)
        .user("alice")
        .header("content-type", "application/json")
        .header("x-request-id", "req-7")
        .send()
        .await;
    assert_eq!(reply.status, 200);
    let received = &backend.received()[0];
    assert_eq!(received.method, "POST");
    assert_eq!(received.uri.to_string(), "/v1/models/m:predict?verbose=1");
    assert_eq!(received.headers["x-request-id"], "req-7");
    assert_eq!(received.headers["x-user-id"], "alice");
    assert_eq!(
        received.headers["host"],
        proxy.addr.to_string(),
        "Host is kept"
    );
    assert_eq!(received.body, r#"{"instances":[1,2]}"#);
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded_either_way() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let reply = proxy
        .client
        .get("/")
        .header("connection", "x-client-hop")
        .header("x-client-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-connection", "keep-alive")
        .header("x-end-to-end", "kept")
        .send()
        .await;
    let headers = &backend.received()[0].headers;
    for hop in ["x-client-hop", "keep-alive", "te", "proxy-connection"] {
        assert!(!headers.contains_key(hop), "{hop} reached the upstream");
    }
    assert_eq!(headers["x-end-to-end"], "kept");
    // The backend answers with `connection: keep-alive, x-upstream-hop`.
    assert!(
        !reply.headers.contains_key("x-upstream-hop"),
        "upstream hop header reached the client"
    );
    assert_eq!(reply.variant(), Some("control"));
}

#[tokio::test]
async fn x_forwarded_for_is_appended_and_proto_is_set() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    proxy
        .client
        .get("/")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await;
    proxy.client.get("/").send().await;
    let received = backend.received();
    assert_eq!(
        received[0].headers["x-forwarded-for"],
        "203.0.113.9, 127.0.0.1"
    );
    assert_eq!(received[1].headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(received[1].headers["x-forwarded-proto"], "http");
}

#[tokio::test]
async fn host_is_the_upstreams_when_preserve_host_is_off() {
    let backend = Backend::start("control").await;
    let config = variants(&[("control", &backend, 100.0)]);
    let proxy = Proxy::start_with_server("preserve_host = false", &config).await;
    proxy.client.get("/").send().await;
    assert_eq!(
        backend.received()[0].headers["host"],
        backend.url().trim_start_matches("http://")
    );
}

#[tokio::test]
async fn an_upstream_that_is_down_is_a_502_counted_as_connect() {
    let config = format!(
        "[[variant]]\nname = \"control\"\nupstream = \"{}\"\nweight = 100\n",
        Backend::down_url().await
    );
    let proxy = Proxy::start(&config).await;
    let reply = proxy.client.get("/").user("alice").send().await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.variant(), Some("control"));
    assert_eq!(reply.json()["variant"], "control");
    assert_eq!(reply.json()["kind"], "connect");
    assert_eq!(proxy.upstream_errors("control", "connect").await, 1.0);
    assert_eq!(proxy.requests("control", "502").await, 1.0);
}

#[tokio::test]
async fn an_upstream_slower_than_request_timeout_is_a_504() {
    let backend = Backend::slow("control", Duration::from_secs(5)).await;
    let proxy = one_variant(&backend, "[limits]\nrequest_timeout = \"200ms\"").await;
    let reply = proxy.client.get("/").send().await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.json()["kind"], "timeout");
    assert_eq!(proxy.upstream_errors("control", "timeout").await, 1.0);
}

#[tokio::test]
async fn a_client_that_hangs_up_before_the_answer_is_counted_as_499_under_its_variant() {
    let backend = Backend::slow("control", Duration::from_secs(2)).await;
    let proxy = one_variant(&backend, "").await;
    let stream = sending(
        &proxy,
        b"GET /predict HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\n\r\n",
    )
    .await;
    support::proxy::eventually(Duration::from_secs(5), || async { backend.count() == 1 }).await;
    drop(stream);
    proxy.wait_for_requests("control", "499", 1.0).await;
    assert_eq!(proxy.metric("abproxy_requests_in_flight", &[]).await, 0.0);
    // The upstream's late answer is not counted a second time.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(proxy.metric("abproxy_requests_total", &[]).await, 1.0);
}

#[tokio::test]
async fn a_client_that_hangs_up_while_its_body_is_read_is_counted_as_499_unassigned() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "[assignment]\nsources = [\"json:/user_id\"]").await;
    let stream = sending(
        &proxy,
        b"POST /predict HTTP/1.1\r\nhost: abproxy\r\ncontent-length: 100\r\n\r\n{\"user_id\":",
    )
    .await;
    support::proxy::eventually(Duration::from_secs(5), || async {
        proxy.metric("abproxy_requests_in_flight", &[]).await == 1.0
    })
    .await;
    drop(stream);
    proxy.wait_for_requests("none", "499", 1.0).await;
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn an_h2c_client_that_cancels_its_request_is_counted_as_499() {
    let backend = Backend::slow("control", Duration::from_secs(2)).await;
    let proxy = one_variant(&backend, "").await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let request = |path: &str| {
        http::Request::get(format!("http://{}{path}", proxy.addr))
            .header("x-user-id", "alice")
            .body(Default::default())
            .expect("request")
    };
    // Dropping the response future resets the stream (RST_STREAM), not the connection.
    let cancelled = tokio::time::timeout(Duration::from_millis(300), client.request(request("/a")));
    assert!(cancelled.await.is_err(), "the slow backend answered early");
    proxy.wait_for_requests("control", "499", 1.0).await;
    let answered = client.request(request("/b")).await.expect("h2c response");
    assert_eq!(answered.status(), 200);
    assert_eq!(proxy.requests("control", "200").await, 1.0);
}

#[tokio::test]
async fn an_h2c_client_that_cancels_its_upload_is_counted_as_499_unassigned() {
    use http_body_util::channel::Channel;
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "[assignment]\nsources = [\"json:/user_id\"]").await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Channel<bytes::Bytes>>();
    let (mut upload, body) = Channel::<bytes::Bytes>::new(1);
    let request = http::Request::post(format!("http://{}/predict", proxy.addr))
        .header("content-length", "100")
        .body(body)
        .expect("request");
    let exchange = tokio::spawn(client.request(request));
    upload
        .send_data(bytes::Bytes::from_static(b"{\"user_id\":"))
        .await
        .expect("first piece");
    support::proxy::eventually(Duration::from_secs(5), || async {
        proxy.metric("abproxy_requests_in_flight", &[]).await == 1.0
    })
    .await;
    // Dropping the exchange resets the stream (RST_STREAM); the connection stays up.
    exchange.abort();
    proxy.wait_for_requests("none", "499", 1.0).await;
    assert_eq!(proxy.requests("none", "400").await, 0.0);
    assert_eq!(backend.count(), 0);
}

/// A raw connection to the proxy that has sent `bytes`, for what a well-behaved client would
/// not send.
async fn sending(proxy: &Proxy, bytes: &[u8]) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    stream
}

/// Sends `request`, a head and the start of its body, on a connection of its own, and
/// returns once the upstream has the head: the body streams, so the head goes ahead of it.
async fn upload_under_way(proxy: &Proxy, backend: &Backend, request: &[u8]) -> TcpStream {
    let stream = sending(proxy, request).await;
    support::proxy::eventually(Duration::from_secs(5), || async {
        backend.connections_accepted() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_upload_is_a_499_not_an_upstream_error() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let stream = upload_under_way(
        &proxy,
        &backend,
        b"POST /predict HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\ncontent-length: 100\r\n\r\n{\"inputs\":",
    )
    .await;
    drop(stream);
    proxy.wait_for_requests("control", "499", 1.0).await;
    let errors = proxy.metric("abproxy_upstream_errors_total", &[]).await;
    assert_eq!(
        errors, 0.0,
        "the client's hang-up was blamed on the upstream"
    );
}

#[tokio::test]
async fn a_malformed_streamed_upload_is_a_400_not_an_upstream_error() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut stream = upload_under_way(
        &proxy,
        &backend,
        b"POST /predict HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n",
    )
    .await;
    stream.write_all(b"zz\r\n").await.expect("write");
    proxy.wait_for_requests("control", "400", 1.0).await;
    assert_eq!(
        proxy.metric("abproxy_upstream_errors_total", &[]).await,
        0.0
    );
    assert_eq!(proxy.requests("control", "499").await, 0.0);
}

#[tokio::test]
async fn a_client_that_stops_reading_its_answer_is_cut_off_and_frees_the_upstream_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Larger than the socket buffers between the proxy and a client that reads nothing.
    let answer: &'static str = Box::leak("0".repeat(16 << 20).into_boxed_str());
    let backend = Backend::raw("control", answer, "text/plain").await;
    let proxy = one_variant(
        &backend,
        "[limits]\nrequest_timeout = \"1s\"\nmax_upstream_connections = 1",
    )
    .await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let mut idle_reader = socket.connect(proxy.addr).await.expect("connect");
    idle_reader
        .write_all(b"GET /big HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\n\r\n")
        .await
        .expect("write");
    support::proxy::eventually(Duration::from_secs(5), || async { backend.count() == 1 }).await;

    // Past the stall limit, the one upstream connection is free for someone else.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply = proxy.client.get("/small").user("bob").send().await;
    assert_eq!(reply.status, 200);

    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(10), idle_reader.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the proxy kept the idle reader's connection open"
    );
    assert!(
        rest.len() < answer.len(),
        "the idle reader got the whole answer"
    );
}

#[tokio::test]
async fn an_upstream_that_resets_the_connection_is_a_502_counted_as_reset() {
    let backend = Backend::resetting("control").await;
    let proxy = one_variant(&backend, "").await;
    let reply = proxy.client.get("/").send().await;
    assert_eq!(reply.status, 502);
    assert_eq!(proxy.upstream_errors("control", "reset").await, 1.0);
}

#[tokio::test]
async fn an_upstream_path_prefix_is_prepended() {
    let backend = Backend::start("control").await;
    let config = format!(
        "[[variant]]\nname = \"control\"\nupstream = \"{}/serving/\"\nweight = 100\n",
        backend.url()
    );
    let proxy = Proxy::start(&config).await;
    proxy.client.get("/predict?x=1").send().await;
    assert_eq!(
        backend.received()[0].uri.to_string(),
        "/serving/predict?x=1"
    );
}

#[tokio::test]
async fn h2c_clients_are_served_and_forwarded_over_http1() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let request = http::Request::get(format!("http://{}/h2", proxy.addr))
        .header("x-user-id", "alice")
        .body(Default::default())
        .expect("request");
    let response = client.request(request).await.expect("h2c response");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-variant"], "control");
    assert_eq!(
        backend.received()[0].headers["host"],
        proxy.addr.to_string(),
        "authority becomes Host"
    );
}

#[tokio::test]
async fn an_h2c_preface_that_arrives_in_pieces_is_still_served_as_http2() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let io = hyper_util::rt::TokioIo::new(SplitFirstWrite::new(stream));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let request = http::Request::get(format!("http://{}/h2", proxy.addr))
        .header("x-user-id", "alice")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("h2c response");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.headers()["x-variant"], "control");
}

#[tokio::test]
async fn an_http1_request_whose_first_byte_arrives_alone_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    // "P" could begin the h2c preface ("PRI * HTTP/2.0"): the proxy must read on to decide.
    stream.write_all(b"P").await.expect("write");
    tokio::time::sleep(Duration::from_millis(30)).await;
    stream
        .write_all(b"OST /p HTTP/1.1\r\nhost: x\r\nx-user-id: a\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(backend.received()[0].method, "POST");
}

#[tokio::test]
async fn a_client_that_sends_half_the_h2c_preface_and_hangs_up_is_let_go_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut stream = sending(&proxy, b"PRI * HTTP/2.0\r\n").await;
    stream.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the proxy held the connection open");
    assert_eq!(backend.count(), 0);
}

/// Sends the first few bytes of its first write alone, then the rest 30 ms later, as a
/// client on a slow network might.
struct SplitFirstWrite {
    stream: TcpStream,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    first: bool,
}

impl SplitFirstWrite {
    fn new(stream: TcpStream) -> SplitFirstWrite {
        stream.set_nodelay(true).expect("nodelay");
        SplitFirstWrite {
            stream,
            pause: None,
            first: true,
        }
    }
}

impl AsyncRead for SplitFirstWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SplitFirstWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(pause) = self.pause.as_mut() {
            ready!(pause.as_mut().poll(cx));
            self.pause = None;
        }
        if std::mem::take(&mut self.first) {
            let written =
                ready!(Pin::new(&mut self.stream).poll_write(cx, &buf[..buf.len().min(5)]))?;
            self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(30))));
            return Poll::Ready(Ok(written));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Ten requests of one user, one after another with `pause` between, each answered 200.
async fn ten_requests_in_turn(proxy: &Proxy, pause: Duration) {
    for n in 0..10 {
        let reply = proxy
            .client
            .get(&format!("/{n}"))
            .user("alice")
            .send()
            .await;
        assert_eq!(reply.status, 200, "request {n}: {}", reply.text());
        tokio::time::sleep(pause).await;
    }
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_reused() {
    let backend = Backend::closing_after_each_answer("control").await;
    let proxy = one_variant(&backend, "").await;
    // A pause for the upstream's close to arrive before the next request.
    ten_requests_in_turn(&proxy, Duration::from_millis(20)).await;
    assert_eq!(backend.connections_accepted(), 10);
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    ten_requests_in_turn(&proxy, Duration::ZERO).await;
    assert_eq!(backend.connections_accepted(), 1);
}

#[tokio::test]
async fn an_empty_answer_leaves_its_connection_reusable() {
    let backend = Backend::raw("control", "", "text/plain").await;
    let proxy = one_variant(&backend, "").await;
    for _ in 0..5 {
        let reply = proxy.client.get("/").user("alice").send().await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "");
    }
    assert_eq!(backend.connections_accepted(), 1);
}

#[tokio::test]
async fn a_connection_still_sending_a_stalled_upload_does_not_hold_up_the_next_request() {
    use tokio::io::AsyncWriteExt;
    // An upstream that answers each read at once, before the request body is all in, as a
    // 401 or 413 would, and keeps the connection open.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 4096];
                while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {
                    let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let config = format!(
        "[limits]\nrequest_timeout = \"3s\"\n\n[[variant]]\nname = \"control\"\n\
         upstream = \"http://{upstream}\"\nweight = 100\n"
    );
    let proxy = Proxy::start(&config).await;
    let uploader = sending(
        &proxy,
        b"POST /upload HTTP/1.1\r\nhost: x\r\nx-user-id: a\r\n\
              content-length: 100000\r\n\r\n0123456789",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let reply = proxy.client.get("/next").user("b").send().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?} behind the stalled upload",
        started.elapsed()
    );
    drop(uploader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_upstream_connections_wait_their_turn() {
    let backend = Backend::slow("control", Duration::from_millis(100)).await;
    let proxy = one_variant(&backend, "[limits]\nmax_upstream_connections = 2").await;
    let replies: Vec<_> = (0..10)
        .map(|n| {
            let call = proxy.client.get(&format!("/queued/{n}?n={n}"));
            tokio::spawn(call.user(&format!("u{n}")).send())
        })
        .collect();
    for reply in replies {
        assert_eq!(reply.await.expect("request task").status, 200);
    }
    assert_eq!(backend.count(), 10);
    assert!(
        backend.connections_accepted() <= 2,
        "{} upstream connections",
        backend.connections_accepted()
    );
    // Requests that queued were copied out of their connection's buffer: nothing was lost.
    for received in backend.received() {
        let n = &received.headers["x-user-id"].to_str().expect("ascii")[1..];
        assert_eq!(received.uri.to_string(), format!("/queued/{n}?n={n}"));
    }
}

#[tokio::test]
async fn waiting_for_an_upstream_connection_counts_against_request_timeout() {
    let backend = Backend::slow("control", Duration::from_secs(2)).await;
    let proxy = one_variant(
        &backend,
        "[limits]\nmax_upstream_connections = 1\nrequest_timeout = \"300ms\"",
    )
    .await;
    let first = tokio::spawn(proxy.client.get("/").send());
    let second = proxy.client.get("/").send().await;
    assert_eq!(second.status, 504);
    assert_eq!(first.await.expect("first request").status, 504);
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off_and_frees_its_connection() {
    let backend = Backend::stalling_mid_body("control").await;
    let proxy = one_variant(
        &backend,
        "[limits]\nrequest_timeout = \"300ms\"\nmax_upstream_connections = 1",
    )
    .await;
    for attempt in 0..2 {
        // The head arrives and the body never completes: the proxy cuts it off rather than
        // answer 504, which it would if the first attempt still held the only connection.
        let result = tokio::time::timeout(Duration::from_secs(5), proxy.client.get("/").try_send())
            .await
            .expect("the proxy ends a stalled body within request_timeout");
        let error = result.expect_err("a truncated body must not look complete");
        assert!(!error.contains("504"), "attempt {attempt}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_running_when_the_grace_period_ends_are_cut_off() {
    let backend = Backend::slow("control", Duration::from_secs(30)).await;
    let proxy = one_variant(&backend, "[limits]\nshutdown_grace = \"200ms\"").await;
    let in_flight = tokio::spawn(proxy.client.get("/").try_send());
    support::proxy::eventually(Duration::from_secs(5), || async { backend.count() == 1 }).await;
    tokio::time::timeout(Duration::from_secs(5), proxy.stop())
        .await
        .expect("shutdown ends soon after the grace period");
    let reply = in_flight.await.expect("request task");
    assert!(
        reply.is_err(),
        "the cut-off request must not look answered: {reply:?}"
    );
}

#[tokio::test]
async fn connect_tunnels_are_refused_with_405() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    use tokio::io::AsyncReadExt;
    let mut stream = sending(
        &proxy,
        b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n",
    )
    .await;
    let mut answer = vec![0u8; 256];
    let read = stream.read(&mut answer).await.expect("read");
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert_eq!(backend.count(), 0);
}

/// Reads what the proxy answered on a raw connection, up to the end of the head.
async fn status_line(stream: &mut TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The client on `stream` was answered 408, counted as 408 under its variant and not as an
/// upstream error.
async fn answered_408_as_the_clients_delay(proxy: &Proxy, stream: &mut TcpStream) {
    assert_eq!(status_line(stream).await, "HTTP/1.1 408 Request Timeout");
    proxy.wait_for_requests("control", "408", 1.0).await;
    assert_eq!(
        proxy.metric("abproxy_upstream_errors_total", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn a_stalled_upload_is_a_408_for_the_variant_not_an_upstream_timeout() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "[limits]\nclient_body_timeout = \"300ms\"").await;
    let mut stream = upload_under_way(
        &proxy,
        &backend,
        b"POST /predict HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\ncontent-length: 100\r\n\r\n{\"inputs\":",
    )
    .await;
    answered_408_as_the_clients_delay(&proxy, &mut stream).await;
}

#[tokio::test]
async fn an_upload_still_under_way_when_the_answer_is_due_is_the_clients_delay() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start("control").await;
    let proxy = one_variant(
        &backend,
        "[limits]\nrequest_timeout = \"500ms\"\nclient_body_timeout = \"10s\"",
    )
    .await;
    let mut stream = upload_under_way(
        &proxy,
        &backend,
        b"POST /predict HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\ncontent-length: 100\r\n\r\n{",
    )
    .await;
    // A slow but steady client: never paused long enough for client_body_timeout.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.write_all(b" ").await;
    }
    answered_408_as_the_clients_delay(&proxy, &mut stream).await;
}

/// The upstream's time starts when the request can go to it: a slow but steady upload read
/// first (here for a `json:` source) takes none of it.
#[tokio::test]
async fn a_slow_upload_read_for_a_json_source_leaves_the_upstream_its_whole_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::start("control").await;
    let proxy = one_variant(
        &backend,
        "[limits]\nrequest_timeout = \"300ms\"\nclient_body_timeout = \"5s\"\n[assignment]\nsources = [\"json:/user_id\"]",
    )
    .await;
    let body = br#"{"user_id":"alice","inputs":[1,2,3]}"#;
    let head = format!(
        "POST /predict HTTP/1.1\r\nhost: abproxy\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut stream = sending(&proxy, head.as_bytes()).await;
    // 600 ms in all, twice the upstream's timeout.
    for piece in body.chunks(6) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream.write_all(piece).await.expect("write");
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer));
    read.await.expect("answered").expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    proxy.wait_for_requests("control", "200", 1.0).await;
}

#[tokio::test]
async fn a_stalled_upload_read_for_a_json_source_is_a_408() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(
        &backend,
        "[limits]\nclient_body_timeout = \"300ms\"\n[assignment]\nsources = [\"json:/user_id\"]",
    )
    .await;
    let mut stream = sending(
        &proxy,
        b"POST /predict HTTP/1.1\r\nhost: abproxy\r\ncontent-length: 100\r\n\r\n{\"user_id\":",
    )
    .await;
    assert_eq!(
        status_line(&mut stream).await,
        "HTTP/1.1 408 Request Timeout"
    );
    proxy.wait_for_requests("none", "408", 1.0).await;
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_a_whole_upload_is_still_its_timeout() {
    let backend = Backend::blackhole("control").await;
    let proxy = one_variant(&backend, "[limits]\nrequest_timeout = \"300ms\"").await;
    let reply = proxy
        .client
        .post("/predict", "{\"inputs\": [1, 2, 3]}")
        .user("alice")
        .send()
        .await;
    assert_eq!(reply.status, 504);
    assert_eq!(proxy.upstream_errors("control", "timeout").await, 1.0);
}

/// `[limits] client_header_timeout` closes a client that sends nothing (before the h2c
/// sniff decides) and one whose request head never ends.
#[tokio::test]
async fn clients_slower_than_client_header_timeout_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let control = Backend::start("control").await;
    let proxy = Proxy::start(&format!(
        "[limits]\nclient_header_timeout = \"300ms\"\n{}",
        variants(&[("control", &control, 100.0)])
    ))
    .await;
    // Nothing; half a request head; half the h2c preface; the whole preface and no request.
    for first_bytes in [
        &b""[..],
        b"GET / HTTP/1.1\r\nhost: x\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        stream.write_all(first_bytes).await.expect("write");
        let started = std::time::Instant::now();
        let mut buf = [0; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while stream.read(&mut buf).await.is_ok_and(|read| read > 0) {}
        })
        .await;
        assert!(closed.is_ok(), "{first_bytes:?}: still open after 5 s");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{first_bytes:?}: closed after {:?}",
            started.elapsed()
        );
    }
    assert_eq!(control.count(), 0);
}

#[tokio::test]
async fn an_upstream_that_stops_reading_an_upload_is_its_timeout_not_the_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Reads the request head and a little more, then never reads again.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            held.push(stream);
        }
    });
    let proxy = Proxy::start(&format!(
        "[limits]\nrequest_timeout = \"1s\"\nclient_body_timeout = \"10s\"\n\n\
         [[variant]]\nname = \"control\"\nupstream = \"http://{upstream}\"\nweight = 100\n"
    ))
    .await;
    let mut stream = sending(
        &proxy,
        b"POST /predict HTTP/1.1\r\nhost: x\r\nx-user-id: a\r\ncontent-length: 268435456\r\n\r\n",
    )
    .await;
    let (mut reader, mut writer) = stream.split();
    // A client that keeps sending as fast as it is read: it never makes anyone wait.
    let chunk = vec![b'0'; 64 * 1024];
    let sender = async { while writer.write_all(&chunk).await.is_ok() {} };
    let answer = async {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match reader.read(&mut buf).await {
                Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let status = tokio::select! {
        biased;
        status = tokio::time::timeout(Duration::from_secs(10), answer) => status.expect("answered"),
        () = sender => String::from("the client could not send"),
    };
    assert_eq!(status, "HTTP/1.1 504 Gateway Timeout");
    drop(stream);
    assert_eq!(proxy.upstream_errors("control", "timeout").await, 1.0);
    assert_eq!(proxy.requests("control", "408").await, 0.0);
}

#[tokio::test]
async fn a_chunked_upload_streams_to_the_upstream_chunked_and_whole() {
    use tokio::io::AsyncWriteExt;
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut stream = upload_under_way(
        &proxy,
        &backend,
        b"POST /predict HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\ntransfer-encoding: chunked\r\n\r\nb\r\n{\"inputs\":[\r\n",
    )
    .await;
    stream.write_all(b"3\r\n1,2\r\n").await.expect("write");
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream
        .write_all(b"2\r\n]}\r\n0\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(status_line(&mut stream).await, "HTTP/1.1 200 OK");
    let received = &backend.received()[0];
    assert_eq!(received.body, r#"{"inputs":[1,2]}"#);
    assert_eq!(received.headers["transfer-encoding"], "chunked");
}

/// Reads from `stream` into `seen` until a message head has ended; false if it closed first.
async fn read_head<R: AsyncRead + Unpin>(stream: &mut R, seen: &mut Vec<u8>) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    true
}

/// An upstream that answers `reply` as soon as it has a request's head, reads nothing more,
/// and keeps the connection open.
async fn answering_on_the_head(reply: &'static [u8]) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        if !read_head(&mut stream, &mut Vec::new()).await {
            return;
        }
        let _ = stream.write_all(reply).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    (url, task)
}

#[tokio::test]
async fn an_answer_given_before_the_upload_ends_reaches_the_client() {
    let (url, _upstream) = answering_on_the_head(
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large",
    )
    .await;
    let proxy = one_variant_at(&url, "").await;
    let mut stream = sending(
        &proxy,
        b"POST /predict HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\ncontent-length: 1000000\r\n\r\n{\"inputs\":",
    )
    .await;
    assert_eq!(
        status_line(&mut stream).await,
        "HTTP/1.1 413 Payload Too Large"
    );
    proxy.wait_for_requests("control", "413", 1.0).await;
    assert_eq!(
        proxy.metric("abproxy_upstream_errors_total", &[]).await,
        0.0
    );
}

/// An upstream that answers the first request on each connection and, reading the second,
/// closes the connection without a word: its keep-alive timeout racing the proxy's reuse.
async fn timing_out_each_connection_on_reuse() -> (String, Arc<AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // Heads only: the test's requests carry at most a tiny body, sent with the head.
                for answered in 0.. {
                    if !read_head(&mut stream, &mut Vec::new()).await || answered > 0 {
                        return;
                    }
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

#[tokio::test]
async fn an_idempotent_request_on_a_connection_the_upstream_times_out_is_sent_again() {
    let (url, accepted) = timing_out_each_connection_on_reuse().await;
    let proxy = one_variant_at(&url, "").await;
    for _ in 0..3 {
        let reply = proxy.client.get("/v1/models/m").user("alice").send().await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "each request after the first was sent again on a fresh connection"
    );
    assert_eq!(
        proxy.metric("abproxy_upstream_errors_total", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn a_post_on_a_connection_the_upstream_times_out_is_not_sent_twice() {
    let (url, accepted) = timing_out_each_connection_on_reuse().await;
    let proxy = one_variant_at(&url, "").await;
    let first = proxy
        .client
        .post("/predict", "{}")
        .user("alice")
        .send()
        .await;
    assert_eq!(first.status, 200);
    let second = proxy
        .client
        .post("/predict", "{}")
        .user("alice")
        .send()
        .await;
    assert_eq!(second.status, 502);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(
        proxy
            .metric("abproxy_upstream_errors_total", &[("kind", "reset")])
            .await,
        1.0
    );
}

/// An upstream that hands the test the raw bytes of the first request it gets, a chunked
/// one read to its empty last line, and answers 200.
async fn recording_one_chunked_request() -> (String, tokio::sync::oneshot::Receiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (recorded, received) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let complete = |seen: &[u8]| {
            let last_chunk = seen.windows(5).position(|w| w == b"\r\n0\r\n");
            last_chunk.is_some_and(|at| {
                seen[at + 5..].windows(4).any(|w| w == b"\r\n\r\n")
                    || seen[at + 5..].starts_with(b"\r\n")
            })
        };
        while !complete(&seen) {
            match stream.read(&mut buf).await {
                Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        let _ = recorded.send(String::from_utf8_lossy(&seen).into_owned());
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    (url, received)
}

#[tokio::test]
async fn declared_request_trailers_follow_a_chunked_upload_upstream() {
    let (url, received) = recording_one_chunked_request().await;
    let proxy = one_variant_at(&url, "").await;
    let mut stream = sending(
        &proxy,
        b"POST /predict HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n2\r\n{}\r\n0\r\nx-checksum: abc\r\nx-undeclared: no\r\n\r\n",
    )
    .await;
    assert_eq!(status_line(&mut stream).await, "HTTP/1.1 200 OK");
    let request = tokio::time::timeout(Duration::from_secs(5), received)
        .await
        .expect("in time")
        .expect("recorded");
    assert!(
        request.ends_with("\r\n\r\n2\r\n{}\r\n0\r\nx-checksum: abc\r\n\r\n"),
        "{request}"
    );
    assert!(
        request.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{request}"
    );
}

#[tokio::test]
async fn an_upstream_that_gives_up_on_a_stalled_upload_and_closes_is_the_clients_delay() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        // The model server's own body timeout, shorter than abproxy's.
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    let proxy = one_variant_at(
        &url,
        "[limits]
client_body_timeout = \"10s\"",
    )
    .await;
    let mut stream = sending(
        &proxy,
        b"POST /predict HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\ncontent-length: 100\r\n\r\n{\"inputs\":",
    )
    .await;
    answered_408_as_the_clients_delay(&proxy, &mut stream).await;
}
