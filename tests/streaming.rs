//! Streamed answers (server-sent events): each event passes as it comes, the end of the
//! stream is timed, and a client that leaves mid-stream stops the model.

mod support;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::stream::{Mode, StreamServer};
use support::Proxy;

fn variant(server: &StreamServer, protocol: &str) -> String {
    format!(
        "[[variant]]\nname = \"model\"\nupstream = \"{}\"\nweight = 100\nprotocol = \"{protocol}\"\n",
        server.url()
    )
}

/// A client speaking HTTP/1.1 or, with `h2c`, HTTP/2 by prior knowledge.
fn client(h2c: bool) -> Client<hyper_util::client::legacy::connect::HttpConnector, String> {
    Client::builder(TokioExecutor::new())
        .http2_only(h2c)
        .build_http()
}

fn events_request(proxy: &Proxy) -> http::Request<String> {
    http::Request::get(format!("http://{}/v1/generate", proxy.addr))
        .header("x-user-id", "alice")
        .header("accept", "text/event-stream")
        .body(String::new())
        .expect("request")
}

async fn each_event_arrives_as_it_is_sent(protocol: &str, h2c_client: bool) {
    let every = Duration::from_millis(100);
    let model = StreamServer::start("model", Mode::Events { count: 6, every }).await;
    let proxy = Proxy::start(&variant(&model, protocol)).await;
    let response = client(h2c_client)
        .request(events_request(&proxy))
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("frame");
        if let Some(data) = frame.data_ref() {
            let events = data.windows(2).filter(|pair| pair == b"\n\n").count();
            arrivals.extend(std::iter::repeat(Instant::now()).take(events));
        }
    }
    let sent = model.sent();
    assert_eq!((sent.len(), arrivals.len()), (6, 6));
    for (index, (sent, arrived)) in sent.iter().zip(&arrivals).enumerate() {
        let late = arrived.saturating_duration_since(*sent);
        assert!(
            late < Duration::from_millis(30),
            "event {index} reached the client {late:?} after the model sent it"
        );
    }
    // Time to first byte is the head; the end of the body is the whole stream.
    let labels = [("variant", "model")];
    proxy.wait_for_requests("model", "200", 1.0).await;
    let head = proxy
        .metric("abproxy_request_duration_seconds_sum", &labels)
        .await;
    let whole = proxy
        .metric("abproxy_response_duration_seconds_sum", &labels)
        .await;
    assert!(head < 0.1, "time to the head: {head} s");
    assert!(whole >= 0.5, "time to the end of the stream: {whole} s");
}

#[tokio::test]
async fn events_from_an_http1_model_reach_an_http1_client_as_they_are_sent() {
    each_event_arrives_as_it_is_sent("http1", false).await;
}

#[tokio::test]
async fn events_from_an_h2c_model_reach_an_h2c_client_as_they_are_sent() {
    each_event_arrives_as_it_is_sent("h2c", true).await;
}

async fn a_client_leaving_mid_stream_is_499_and_stops_the_model(protocol: &str, h2c_client: bool) {
    let every = Duration::from_millis(100);
    let model = StreamServer::start("model", Mode::Events { count: 100, every }).await;
    let proxy = Proxy::start(&variant(&model, protocol)).await;
    let response = client(h2c_client)
        .request(events_request(&proxy))
        .await
        .expect("answer");
    let mut body = response.into_body();
    for _ in 0..2 {
        body.frame().await.expect("an event").expect("frame");
    }
    let left = Instant::now();
    drop(body);
    support::proxy::eventually(Duration::from_secs(5), || async {
        !model.cancelled().is_empty()
    })
    .await;
    let stopped = model.cancelled()[0].saturating_duration_since(left);
    assert!(
        stopped <= Duration::from_millis(100),
        "the model learnt {stopped:?} after the client left"
    );
    proxy.wait_for_requests("model", "499", 1.0).await;
    let abandoned = proxy
        .metric("abproxy_abandoned_answers_total", &[("variant", "model")])
        .await;
    assert_eq!(
        abandoned, 1.0,
        "a user who stops a stream is not the variant's failure"
    );
    assert_eq!(proxy.requests("model", "200").await, 0.0);
    assert_eq!(proxy.upstream_errors("model", "reset").await, 0.0);
}

#[tokio::test]
async fn an_http1_client_leaving_an_http1_stream_is_499_and_stops_the_model() {
    a_client_leaving_mid_stream_is_499_and_stops_the_model("http1", false).await;
}

#[tokio::test]
async fn an_h2c_client_leaving_an_h2c_stream_is_499_and_stops_the_model() {
    a_client_leaving_mid_stream_is_499_and_stops_the_model("h2c", true).await;
}
