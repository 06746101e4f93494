//! The relay-floor binary in front of a real HTTP/1.1 server on 127.0.0.1: what it relays
//! must arrive whole, in order, on one upstream connection per client connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// Answers `METHOD PATH BODY` back, and counts the connections it was reached on.
async fn start_echo() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound address");
    let connections = Arc::new(AtomicU64::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    let (head, body) = request.into_parts();
                    let body = body.collect().await.expect("request body").to_bytes();
                    let echo = format!(
                        "{} {} {}",
                        head.method,
                        head.uri,
                        String::from_utf8_lossy(&body)
                    );
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(echo))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, connections)
}

/// The relay, killed when the test ends.
struct Relay {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_relay(upstream: SocketAddr) -> Relay {
    // A port that was free a moment ago: the relay binds it itself.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port");
    let child = Command::new(env!("CARGO_BIN_EXE_relay-floor"))
        .args([
            "--listen",
            &addr.to_string(),
            "--upstream",
            &upstream.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("relay-floor starts");
    let relay = Relay { child, addr };
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return relay;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("relay-floor did not listen on {addr}");
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: &'static str,
) -> String {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "relay.test")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a request");
    // Bounded: a relay that frames an answer wrongly fails the test rather than hanging it.
    let exchange = async {
        let response = sender.send_request(request).await.expect("an answer");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.expect("answer body")
    };
    let body = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .expect("an answer within 5 s");
    String::from_utf8(body.to_bytes().to_vec()).expect("UTF-8")
}

#[tokio::test]
async fn requests_on_one_connection_are_relayed_whole_and_in_order_on_one_upstream_connection() {
    let (upstream, connections) = start_echo().await;
    let relay = start_relay(upstream).await;
    let stream = TcpStream::connect(relay.addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);

    assert_eq!(send(&mut sender, "GET", "/first", "").await, "GET /first ");
    assert_eq!(
        send(&mut sender, "POST", "/predict", "{\"x\":1}").await,
        "POST /predict {\"x\":1}"
    );
    assert_eq!(
        send(&mut sender, "GET", "/third?q=1", "").await,
        "GET /third?q=1 "
    );
    assert_eq!(connections.load(Ordering::Relaxed), 1);
}
