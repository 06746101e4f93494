//! HTTP/2 model servers (`protocol = "h2c"`), trailers end to end, and the fallback variant.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Version};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use support::backend::{answering, FIELDS_AS_SENT};
use support::client::h2c_client;
use support::stream::{Mode, StreamServer};
use support::{Backend, Proxy};

fn h2c_variant(name: &str, server: &StreamServer, keys: &str) -> String {
    format!(
        "[[variant]]\nname = \"{name}\"\nupstream = \"{}\"\nweight = 100\nprotocol = \"h2c\"\n{keys}\n",
        server.url()
    )
}

/// An h2c model that echoes at once, and abproxy in front of it as the one variant.
async fn echo_model_behind_proxy() -> (StreamServer, Proxy) {
    let model = StreamServer::start(
        "model",
        Mode::Echo {
            delay: Duration::ZERO,
        },
    )
    .await;
    let proxy = Proxy::start(&h2c_variant("model", &model, "")).await;
    (model, proxy)
}

/// One GET for each user, all sent before any answer is awaited.
async fn all_at_once(proxy: &Proxy, users: &[String]) -> Vec<support::Reply> {
    let calls: Vec<_> = users
        .iter()
        .map(|user| {
            let call = proxy.client.get("/predict").user(user);
            tokio::spawn(call.send())
        })
        .collect();
    let mut replies = Vec::with_capacity(calls.len());
    for call in calls {
        replies.push(call.await.expect("task"));
    }
    replies
}

#[tokio::test]
async fn two_hundred_requests_in_flight_share_the_configured_connections() {
    let model = StreamServer::start(
        "model",
        Mode::Echo {
            delay: Duration::from_millis(50),
        },
    )
    .await;
    let proxy = Proxy::start(&format!(
        "[limits]\nh2_connections = 2\n\n{}",
        h2c_variant("model", &model, "")
    ))
    .await;
    let users: Vec<String> = (0..200).map(|user| format!("user-{user}")).collect();
    for reply in all_at_once(&proxy, &users).await {
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.model(), "model");
    }
    assert!(
        model.connections() <= 2,
        "{} connections",
        model.connections()
    );
    assert!(model
        .seen()
        .iter()
        .all(|seen| seen.version == Version::HTTP_2));
    assert_eq!(proxy.requests("model", "200").await, 200.0);
}

/// An HTTP/1.1 request whose fields came as lines reaches an h2c upstream from a map: each
/// field once, no hop-by-hop field and no `Host` (h2 names the host in `:authority`).
#[tokio::test]
async fn an_http1_requests_fields_reach_an_h2c_upstream_once_each() {
    let (model, proxy) = echo_model_behind_proxy().await;
    let reply = proxy
        .client
        .get("/predict")
        .user("alice")
        .header("x-tag", "1")
        .header("te", "trailers")
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = model.seen();
    let headers = &seen[0].headers;
    assert_eq!(seen[0].version, Version::HTTP_2);
    for (name, value) in [
        ("x-user-id", "alice"),
        ("x-tag", "1"),
        ("x-forwarded-for", "127.0.0.1"),
        ("x-forwarded-proto", "http"),
    ] {
        let values: Vec<_> = headers.get_all(name).iter().collect();
        assert_eq!(values, [value], "{name}");
    }
    for absent in ["host", "te", "connection"] {
        assert!(
            !headers.contains_key(absent),
            "{absent} reached the upstream"
        );
    }
}

#[tokio::test]
async fn an_upstream_that_says_goaway_mid_load_fails_no_request() {
    let model = StreamServer::start(
        "model",
        Mode::GoAwayAfter {
            requests: 25,
            delay: Duration::from_millis(10),
        },
    )
    .await;
    let proxy = Proxy::start(&h2c_variant("model", &model, "")).await;
    for wave in 0..4 {
        let users: Vec<String> = (0..50).map(|user| format!("user-{wave}-{user}")).collect();
        for reply in all_at_once(&proxy, &users).await {
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    }
    // Every connection went away after 25 requests: 200 of them needed several.
    assert!(
        model.connections() >= 8,
        "{} connections",
        model.connections()
    );
    assert_eq!(proxy.requests("model", "200").await, 200.0);
    assert_eq!(proxy.upstream_errors("model", "reset").await, 0.0);
}

#[tokio::test]
async fn trailers_cross_the_proxy_both_ways_and_te_trailers_only_for_grpc() {
    let (model, proxy) = echo_model_behind_proxy().await;
    let mut client = h2c_client::<Channel<Bytes>>(&proxy).await;
    let call = |content_type: &'static str| {
        let (mut sender, body) = Channel::<Bytes>::new(2);
        let request = Request::post(format!("http://{}/model.Predict/Run", proxy.addr))
            .header("content-type", content_type)
            .header("te", "trailers")
            .header("x-user-id", "alice")
            .body(body)
            .expect("request");
        tokio::spawn(async move {
            sender
                .send_data(Bytes::from_static(b"payload"))
                .await
                .expect("data");
            let mut trailers = HeaderMap::new();
            trailers.insert("x-request-trailer", HeaderValue::from_static("from-client"));
            sender.send_trailers(trailers).await.expect("trailers");
        });
        request
    };

    let response = client
        .send_request(call("application/grpc"))
        .await
        .expect("answer");
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reach the client");
    assert_eq!(trailers["x-answer-trailer"], "sent");
    assert_eq!(trailers["x-seen-trailer"], "from-client");
    assert_eq!(trailers["grpc-status"], "0");

    let response = client
        .send_request(call("application/json"))
        .await
        .expect("answer");
    response.into_body().collect().await.expect("body");

    let seen = model.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].headers["te"], "trailers", "gRPC keeps te: trailers");
    assert_eq!(
        seen[0]
            .trailers
            .as_ref()
            .map(|t| t["x-request-trailer"].clone()),
        Some(HeaderValue::from_static("from-client"))
    );
    assert!(
        !seen[1].headers.contains_key("te"),
        "te is hop-by-hop for others"
    );
    for request in &seen {
        assert_eq!(request.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(request.headers["x-forwarded-proto"], "http");
    }
    let grpc_ok = proxy
        .metric(
            "abproxy_requests_total",
            &[("variant", "model"), ("code", "200"), ("grpc_code", "OK")],
        )
        .await;
    assert_eq!(grpc_ok, 1.0);
}

#[tokio::test]
async fn a_grpc_call_to_a_dead_upstream_is_answered_unavailable_and_counted_as_a_failure() {
    let proxy = Proxy::start(&format!(
        "[[variant]]\nname = \"model\"\nupstream = \"{}\"\nweight = 100\nprotocol = \"h2c\"\n",
        Backend::down_url().await
    ))
    .await;
    let mut client = h2c_client::<Full<Bytes>>(&proxy).await;
    let request = Request::post(format!("http://{}/model.Predict/Run", proxy.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-user-id", "alice")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .expect("request");
    let response = client.send_request(request).await.expect("answer");
    assert_eq!(response.status(), 200, "gRPC errors travel in grpc-status");
    assert_eq!(response.headers()["content-type"], "application/grpc");
    assert_eq!(response.headers()["grpc-status"], "14", "UNAVAILABLE");
    assert!(response.headers().contains_key("grpc-message"));
    let counted = proxy
        .metric(
            "abproxy_requests_total",
            &[
                ("variant", "model"),
                ("code", "200"),
                ("grpc_code", "Unavailable"),
            ],
        )
        .await;
    assert_eq!(counted, 1.0);
    assert_eq!(proxy.upstream_errors("model", "connect").await, 1.0);
}

#[tokio::test]
async fn a_treatment_whose_upstream_is_down_falls_back_to_control() {
    let control = Backend::start("control").await;
    let proxy = Proxy::start(&format!(
        "[[variant]]\nname = \"control\"\nupstream = \"{}\"\nweight = 50\n\n\
         [[variant]]\nname = \"treatment\"\nupstream = \"{}\"\nweight = 50\nfallback = \"control\"\n",
        control.url(),
        Backend::down_url().await
    ))
    .await;
    let users: Vec<String> = (0..40).map(|user| format!("user-{user}")).collect();
    let assigned_to_treatment = users
        .iter()
        .filter(|user| support::spec_bucket("", user, 100) >= 50)
        .count() as f64;
    assert!(assigned_to_treatment > 0.0);
    for user in &users {
        let reply = proxy.client.get("/predict").user(user).send().await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.model(), "control");
        assert_eq!(reply.variant(), Some("control"), "names who answered");
    }
    assert_eq!(proxy.requests("control", "200").await, 40.0);
    assert_eq!(
        proxy.upstream_errors("treatment", "connect").await,
        assigned_to_treatment
    );
    let fallbacks = proxy
        .metric(
            "abproxy_fallbacks_total",
            &[("variant", "treatment"), ("fallback", "control")],
        )
        .await;
    assert_eq!(fallbacks, assigned_to_treatment);
    // Those that fell back were forwarded as those that did not.
    for request in control.received() {
        assert_eq!(request.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(request.headers["x-forwarded-proto"], "http");
    }
}

/// A loopback address that never completes a TCP handshake: its accept queue is full, so
/// the kernel drops the SYNs (the listener and the queued connections must stay alive).
#[cfg(target_os = "linux")]
async fn unanswering() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>, String) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(0).expect("listen");
    let address = listener.local_addr().expect("addr");
    let mut queued = Vec::new();
    for _ in 0..8 {
        let attempt = tokio::net::TcpStream::connect(address);
        match tokio::time::timeout(Duration::from_millis(200), attempt).await {
            Ok(stream) => queued.push(stream.expect("connect")),
            Err(_) => return (listener, queued, format!("http://{address}")),
        }
    }
    panic!("the accept queue never filled");
}

// Linux drops the SYNs to a full accept queue; other kernels may refuse them at once.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_treatment_that_never_accepts_falls_back_within_the_connect_timeout() {
    for protocol in ["http1", "h2c"] {
        let control = Backend::start("control").await;
        let (_listener, _queued, treatment) = unanswering().await;
        let proxy = Proxy::start(&format!(
            "[limits]\nconnect_timeout = \"300ms\"\n\n\
             [[variant]]\nname = \"control\"\nupstream = \"{}\"\nweight = 0\n\n\
             [[variant]]\nname = \"treatment\"\nupstream = \"{treatment}\"\nweight = 100\n\
             protocol = \"{protocol}\"\nfallback = \"control\"\n",
            control.url(),
        ))
        .await;
        for user in ["alice", "bob", "carol"] {
            let started = std::time::Instant::now();
            let reply = proxy.client.get("/predict").user(user).send().await;
            assert_eq!(reply.status, 200, "{protocol}: {}", reply.text());
            assert_eq!(
                reply.variant(),
                Some("control"),
                "{protocol}: names who answered"
            );
            // The connect timeout (300 ms) bounds the wait, not the request timeout (30 s).
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{protocol}: answered after {:?}",
                started.elapsed()
            );
        }
        assert_eq!(
            proxy.upstream_errors("treatment", "connect").await,
            3.0,
            "{protocol}"
        );
        let fallbacks = proxy
            .metric(
                "abproxy_fallbacks_total",
                &[("variant", "treatment"), ("fallback", "control")],
            )
            .await;
        assert_eq!(fallbacks, 3.0, "{protocol}");
        assert_eq!(proxy.requests("control", "200").await, 3.0, "{protocol}");
    }
}

#[tokio::test]
async fn a_request_that_reached_the_upstream_is_never_sent_to_the_fallback() {
    let control = Backend::start("control").await;
    let treatment = Backend::resetting("treatment").await;
    let proxy = Proxy::start(&format!(
        "[[variant]]\nname = \"control\"\nupstream = \"{}\"\nweight = 0\n\n\
         [[variant]]\nname = \"treatment\"\nupstream = \"{}\"\nweight = 100\nfallback = \"control\"\n",
        control.url(),
        treatment.url()
    ))
    .await;
    let reply = proxy
        .client
        .post("/predict", "{}")
        .user("alice")
        .send()
        .await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.variant(), Some("treatment"));
    assert_eq!(control.count(), 0);
    assert_eq!(proxy.upstream_errors("treatment", "reset").await, 1.0);
}

#[tokio::test]
async fn shadows_reach_h2c_upstreams_too() {
    let primary = Backend::start("primary").await;
    let candidate = StreamServer::start(
        "candidate",
        Mode::Echo {
            delay: Duration::ZERO,
        },
    )
    .await;
    let proxy = Proxy::start(&format!(
        "[[variant]]\nname = \"primary\"\nupstream = \"{}\"\nweight = 100\n\n\
         [[shadow]]\nname = \"candidate\"\nupstream = \"{}\"\nprotocol = \"h2c\"\n",
        primary.url(),
        candidate.url()
    ))
    .await;
    for user in 0..5 {
        let reply = proxy
            .client
            .post("/predict", "{}")
            .user(&format!("user-{user}"))
            .send()
            .await;
        assert_eq!(reply.model(), "primary");
    }
    support::proxy::eventually(Duration::from_secs(5), || async {
        candidate.seen().len() == 5
    })
    .await;
    assert!(candidate
        .seen()
        .iter()
        .all(|seen| seen.version == Version::HTTP_2));
    assert!(candidate
        .seen()
        .iter()
        .all(|seen| seen.headers["x-abproxy-shadow"] == "1"));
    support::proxy::eventually(Duration::from_secs(5), || async {
        let ok = [("shadow", "candidate"), ("result", "ok")];
        proxy.metric("abproxy_shadow_requests_total", &ok).await == 5.0
    })
    .await;
}

/// A body of one frame and unknown length, which says it has ended as that frame is taken:
/// what an h2 client sends as DATA with END_STREAM and no `content-length`.
struct OneFrame(Option<Bytes>);

impl hyper::body::Body for OneFrame {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.take().map(|data| Ok(hyper::body::Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

#[tokio::test]
async fn an_h2c_upload_of_unknown_length_reaches_an_http1_upstream_whole() {
    let control = Backend::start("control").await;
    let proxy = Proxy::start(&support::variants(&[("control", &control, 100.0)])).await;
    let mut client = h2c_client::<OneFrame>(&proxy).await;
    let request = Request::post(format!("http://{}/predict", proxy.addr))
        .version(Version::HTTP_2)
        .header("x-user-id", "alice")
        .body(OneFrame(Some(Bytes::from_static(br#"{"x":1}"#))))
        .expect("request");
    let response = client.send_request(request).await.expect("answer");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("body");
    assert_eq!(control.received()[0].body, r#"{"x":1}"#);
}

/// hyper's h2 server writes only a response's map: the fields an HTTP/1.1 upstream's answer
/// came with reach an h2c client all the same, and those for one hop (which h2 forbids) do not.
#[tokio::test]
async fn an_http1_upstreams_answer_reaches_an_h2c_client_with_its_fields() {
    let upstream = answering(FIELDS_AS_SENT).await;
    let proxy = Proxy::in_front_of(&upstream).await;
    let mut client = h2c_client::<Full<Bytes>>(&proxy).await;
    let request = Request::get(format!("http://{}/predict", proxy.addr))
        .version(Version::HTTP_2)
        .header("x-user-id", "alice")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client.send_request(request).await.expect("answer");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-model-version"], "v7");
    let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    let variants: Vec<_> = headers.get_all("x-variant").iter().collect();
    assert_eq!(variants, ["control"]);
    for hop in ["keep-alive", "proxy-connection", "upgrade", "connection"] {
        assert!(!headers.contains_key(hop), "{hop} reached the client");
    }
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, "{}");
}
