//! Predictions read from the models' answers as they stream through: every byte reaches the
//! client unchanged and unbuffered, and what cannot be read is counted, never failed.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use support::proxy::eventually;
use support::{variants, Backend, Model, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// One model answering through `upstream`, its predictions read at `/prediction`.
fn config(upstream: &str, metrics_keys: &str) -> String {
    format!(
        "[metrics]\nprediction = \"/prediction\"\n{metrics_keys}\n\n\
         [[variant]]\nname = \"model\"\nupstream = \"{upstream}\"\nweight = 100\n"
    )
}

/// An upstream that answers each request with `frames` as HTTP/1.1 chunks, holding the last
/// one back until `release` is notified.
async fn streaming_upstream(frames: &'static [&'static str], release: Arc<Notify>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let release = release.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let start = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             transfer-encoding: chunked\r\n\r\n";
                if stream.write_all(start.as_bytes()).await.is_err() {
                    return;
                }
                for (index, frame) in frames.iter().enumerate() {
                    if index + 1 == frames.len() {
                        release.notified().await;
                    }
                    let chunk = format!("{:x}\r\n{frame}\r\n", frame.len());
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    stream.flush().await.ok();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let _ = stream.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    format!("http://{addr}")
}

async fn predictions(proxy: &Proxy, variant: &str) -> (f64, f64) {
    let labels = [("variant", variant)];
    (
        proxy.metric("abproxy_prediction_count", &labels).await,
        proxy.metric("abproxy_prediction_sum", &labels).await,
    )
}

async fn class(proxy: &Proxy, variant: &str, class: &str) -> f64 {
    proxy
        .metric(
            "abproxy_prediction_class_total",
            &[("variant", variant), ("class", class)],
        )
        .await
}

async fn unread(proxy: &Proxy, reason: &str) -> f64 {
    proxy
        .metric(
            "abproxy_prediction_unread_total",
            &[("variant", "model"), ("reason", reason)],
        )
        .await
}

#[tokio::test]
async fn an_answer_in_many_frames_streams_through_unbuffered_and_its_prediction_is_read() {
    const FRAMES: &[&str] = &[
        "{\"model\": \"m\", \"predic",
        "tion\": 0.",
        "73, \"tail\": [1, 2",
        ", 3]}",
    ];
    let release = Arc::new(Notify::new());
    let upstream = streaming_upstream(FRAMES, release.clone()).await;
    let proxy = Proxy::start(&config(&upstream, "")).await;

    let client = HyperClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = http::Request::get(format!("http://{}/predict", proxy.addr))
        .header("x-user-id", "alice")
        .body(Empty::new())
        .expect("request");
    let response = client.request(request).await.expect("response head");
    let mut body = response.into_body();
    let first = body
        .frame()
        .await
        .expect("a frame")
        .expect("no error")
        .into_data()
        .expect("data");
    // The upstream has not sent its last frame yet, and the client already has the first.
    assert_eq!(first, FRAMES[0]);
    let mut received = first.to_vec();
    release.notify_one();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("no error").into_data() {
            received.extend_from_slice(&data);
        }
    }
    assert_eq!(String::from_utf8(received).expect("UTF-8"), FRAMES.concat());

    eventually(Duration::from_secs(5), || async {
        predictions(&proxy, "model").await == (1.0, 0.73)
    })
    .await;
}

#[tokio::test]
async fn answers_that_are_not_json_are_counted_as_such_and_passed_through() {
    let model = Backend::raw("model", "<html>oops</html>", "text/html").await;
    let proxy = Proxy::start(&config(&model.url(), "")).await;
    let reply = proxy.client.get("/").user("alice").send().await;
    assert_eq!(
        (reply.status.as_u16(), reply.text().as_str()),
        (200, "<html>oops</html>")
    );
    eventually(Duration::from_secs(5), || async {
        unread(&proxy, "not_json").await == 1.0
    })
    .await;
    assert_eq!(predictions(&proxy, "model").await.0, 0.0);
}

#[tokio::test]
async fn answers_over_the_inspection_cap_are_not_read_but_reach_the_client_whole() {
    const LONG: &str =
        "{\"prediction\": 0.5, \"embedding\": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}";
    let model = Backend::raw("model", LONG, "application/json").await;
    let proxy = Proxy::start(&config(&model.url(), "prediction_max_bytes = 32")).await;
    let reply = proxy.client.get("/").user("alice").send().await;
    assert_eq!(reply.text(), LONG);
    eventually(Duration::from_secs(5), || async {
        unread(&proxy, "over_cap").await == 1.0
    })
    .await;
    assert_eq!(predictions(&proxy, "model").await.0, 0.0);
}

#[tokio::test]
async fn class_labels_are_counted_up_to_the_configured_number_then_as_other() {
    let cat = Backend::raw("cat", "{\"prediction\": \"cat\"}", "application/json").await;
    let dog = Backend::raw("dog", "{\"prediction\": \"dog\"}", "application/json").await;
    let proxy = Proxy::start(&format!(
        "[metrics]\nprediction = \"/prediction\"\nprediction_classes = 1\n\n[assignment]\noverride_header = \"x-force-variant\"\n\n{}",
        variants(&[("cat", &cat, 50.0), ("dog", &dog, 50.0)])
    ))
    .await;
    for variant in ["cat", "cat", "dog"] {
        proxy
            .client
            .get("/")
            .user("alice")
            .header("x-force-variant", variant)
            .send()
            .await;
    }
    eventually(Duration::from_secs(5), || async {
        class(&proxy, "cat", "cat").await == 2.0 && class(&proxy, "dog", "other").await == 1.0
    })
    .await;
    assert_eq!(class(&proxy, "dog", "dog").await, 0.0);
}

#[tokio::test]
async fn pointers_are_tried_in_order_and_a_json_answer_without_one_is_counted() {
    let scored = Backend::raw(
        "scored",
        "{\"outputs\": [{\"score\": 0.25}]}",
        "application/json",
    )
    .await;
    let proxy = Proxy::start(&format!(
        "[metrics]\nprediction = [\"/prediction\", \"/outputs/0/score\"]\n\n{}",
        variants(&[("scored", &scored, 100.0)])
    ))
    .await;
    proxy.client.get("/").user("alice").send().await;
    eventually(Duration::from_secs(5), || async {
        predictions(&proxy, "scored").await == (1.0, 0.25)
    })
    .await;

    let labelless = Backend::raw("model", "{\"result\": null}", "application/json").await;
    let proxy = Proxy::start(&config(&labelless.url(), "")).await;
    proxy.client.get("/").user("alice").send().await;
    eventually(Duration::from_secs(5), || async {
        unread(&proxy, "no_prediction").await == 1.0
    })
    .await;
}

#[tokio::test]
async fn failed_answers_are_not_read_as_predictions() {
    let model = Backend::model("model", Model::failing_one_in(1)).await;
    let proxy = Proxy::start(&config(&model.url(), "")).await;
    let reply = proxy.client.get("/").user("alice").send().await;
    assert_eq!(reply.status, 500);
    proxy.wait_for_requests("model", "500", 1.0).await;
    assert_eq!(predictions(&proxy, "model").await.0, 0.0);
    for reason in ["over_cap", "not_json", "no_prediction"] {
        assert_eq!(unread(&proxy, reason).await, 0.0);
    }
}

#[tokio::test]
async fn an_answer_cut_short_is_not_read() {
    let model = Backend::stalling_mid_body("model").await;
    let proxy = Proxy::start(&config(&model.url(), "").replace(
        "[[variant]]",
        "[limits]\nrequest_timeout = \"300ms\"\n\n[[variant]]",
    ))
    .await;
    let cut = proxy.client.get("/").user("alice").try_send().await;
    assert!(cut.is_err(), "the body was cut: {cut:?}");
    // Its head said 200, but the upstream stalled mid-body: the variant's 504.
    proxy.wait_for_requests("model", "504", 1.0).await;
    assert_eq!(proxy.upstream_errors("model", "timeout").await, 1.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(predictions(&proxy, "model").await.0, 0.0);
    for reason in ["over_cap", "not_json", "no_prediction"] {
        assert_eq!(unread(&proxy, reason).await, 0.0, "{reason}");
    }
}
