//! HTTP/1.1 `Upgrade` (WebSocket) through the split: passed to the assigned variant, and a
//! tunnel once the variant's model server agrees.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A model server that takes WebSocket upgrades and then echoes every byte, prefixed once
/// with its name; `refuses` answers 426 instead.
async fn websocket_model(name: &'static str, refuses: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(move |mut request: Request<Incoming>| async move {
                let asked = request.headers().get("upgrade").cloned();
                let Some(protocol) = asked.filter(|_| !refuses) else {
                    let mut refused = Response::new(Full::new(Bytes::from_static(b"no")));
                    *refused.status_mut() = StatusCode::UPGRADE_REQUIRED;
                    return Ok::<_, Infallible>(refused);
                };
                let upgraded = hyper::upgrade::on(&mut request);
                tokio::spawn(async move {
                    let Ok(upgraded) = upgraded.await else { return };
                    let mut io = TokioIo::new(upgraded);
                    let _ = io.write_all(format!("{name}:").as_bytes()).await;
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = io.read(&mut buf).await {
                        if io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut switching = Response::new(Full::new(Bytes::new()));
                *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                switching.headers_mut().insert("upgrade", protocol);
                switching
                    .headers_mut()
                    .insert("connection", http::HeaderValue::from_static("upgrade"));
                Ok(switching)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    addr
}

fn variant(name: &str, addr: SocketAddr, keys: &str) -> String {
    format!("[[variant]]\nname = \"{name}\"\nupstream = \"http://{addr}\"\nweight = 100\n{keys}\n")
}

/// Sends a WebSocket handshake and returns the response head and the open stream.
async fn handshake(proxy: &Proxy) -> (String, TcpStream) {
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(
            b"GET /v1/chat HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\n\
              connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\
              sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("handshake");
    (read_head(&mut stream).await, stream)
}

/// The response head, lower-cased, read byte by byte so nothing after it is consumed.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
        match read.expect("a response head within 5 s").expect("read") {
            0 => break,
            _ => head.push(byte[0]),
        }
    }
    String::from_utf8_lossy(&head).to_lowercase()
}

async fn read_exactly(stream: &mut TcpStream, length: usize) -> String {
    let mut buf = vec![0u8; length];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .expect("bytes within 5 s")
        .expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn a_websocket_is_tunnelled_to_the_assigned_variant() {
    let model = websocket_model("treatment", false).await;
    let proxy = Proxy::start(&variant("treatment", model, "")).await;
    let (head, mut stream) = handshake(&proxy).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("x-variant: treatment"), "{head}");
    assert_eq!(read_exactly(&mut stream, 10).await, "treatment:");
    for message in ["hello", "again"] {
        stream.write_all(message.as_bytes()).await.expect("write");
        assert_eq!(read_exactly(&mut stream, 5).await, message);
    }
    assert_eq!(proxy.requests("treatment", "101").await, 1.0);
}

#[tokio::test]
async fn a_refused_upgrade_is_an_ordinary_answer() {
    let model = websocket_model("control", true).await;
    let proxy = Proxy::start(&variant("control", model, "")).await;
    let (head, _stream) = handshake(&proxy).await;
    assert!(head.starts_with("http/1.1 426"), "{head}");
    proxy.wait_for_requests("control", "426", 1.0).await;
}

#[tokio::test]
async fn an_upgrade_to_an_http2_variant_is_refused_with_a_reason() {
    let model = websocket_model("control", false).await;
    let proxy = Proxy::start(&variant("control", model, "protocol = \"h2c\"")).await;
    let (head, mut stream) = handshake(&proxy).await;
    assert!(head.starts_with("http/1.1 501"), "{head}");
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .and_then(|length| length.trim().parse().ok())
        .expect("a content-length");
    let body = read_exactly(&mut stream, length).await;
    assert!(body.contains("HTTP/2"), "{body}");
    // The config cannot serve it: not the variant's failure.
    proxy.wait_for_requests("none", "501", 1.0).await;
    assert_eq!(proxy.requests("control", "501").await, 0.0);
}

#[tokio::test]
async fn an_h2c_upgrade_offer_is_served_as_a_plain_request() {
    // The model switches protocols whenever it sees `Upgrade`, and answers 426 otherwise.
    let model = websocket_model("control", false).await;
    let proxy = Proxy::start(&variant("control", model, "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(
            b"GET /predict HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\n\
              connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n\
              http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        )
        .await
        .expect("request");
    let head = read_head(&mut stream).await;
    assert!(
        head.starts_with("http/1.1 426"),
        "the model saw no upgrade: {head}"
    );
    assert_eq!(proxy.requests("control", "101").await, 0.0);
}
