//! gRPC through abproxy: a real tonic client on abproxy's h2c listener, real gRPC model
//! servers behind it on `protocol = "h2c"` upstreams. The first tests check the test server
//! itself, client to server with no proxy between.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tonic::{Code, Status};

use support::grpc::{h2c_variant, h2c_variants, PREDICT};
use support::{spec_bucket, Backend, GrpcBackend, GrpcClient, Proxy};

// The harness, without abproxy.

#[tokio::test]
async fn the_grpc_backend_answers_a_real_grpc_client_with_its_name_and_records_the_metadata() {
    let backend = GrpcBackend::start("control").await;
    let client = GrpcClient::connect(backend.addr()).await;
    for (user, input) in [("alice", 0.25), ("bob", 1.5), ("carol", -2.0)] {
        let reply = client.predict(user, input).await.expect("OK answer");
        assert_eq!(reply.model, "control");
        assert_eq!(reply.prediction, 2.0 * input);
        assert_eq!(reply.variant, None, "no proxy named a variant");
    }
    let received = backend.received();
    assert_eq!(received.len(), 3);
    assert_eq!(received[0].path, PREDICT);
    assert_eq!(received[1].headers["x-user-id"], "bob");
    assert_eq!(received[0].headers["te"], "trailers");
    assert_eq!(received[0].headers["content-type"], "application/grpc");
    assert_eq!(backend.connections_accepted(), 1, "one client connection");
}

#[tokio::test]
async fn the_grpc_backend_fails_every_nth_call_with_the_chosen_status() {
    let backend = GrpcBackend::failing_one_in("canary", 3, Code::Internal).await;
    let client = GrpcClient::connect(backend.addr()).await;
    let mut codes = Vec::new();
    for n in 0..6 {
        let answer = client.predict(&format!("user-{n}"), 1.0).await;
        codes.push(answer.map_or_else(|status| status.code(), |_| Code::Ok));
    }
    use Code::{Internal, Ok};
    assert_eq!(codes, [Ok, Ok, Internal, Ok, Ok, Internal]);
}

#[tokio::test]
async fn the_going_away_grpc_backend_answers_the_call_in_flight_then_takes_a_new_connection() {
    // The third call on a connection sends GOAWAY and is answered 100 ms later.
    let backend = GrpcBackend::going_away_after("control", 3, Duration::from_millis(100)).await;
    let client = GrpcClient::connect(backend.addr()).await;
    for n in 0..3 {
        let reply = client.predict(&format!("user-{n}"), 1.0).await;
        assert_eq!(reply.expect("answered").model, "control");
    }
    assert_eq!(backend.went_away(), 1);
    let again = GrpcClient::connect(backend.addr()).await;
    let reply = again.predict("user-3", 1.0).await.expect("answered");
    assert_eq!(reply.model, "control");
    assert_eq!(backend.connections_accepted(), 2);
}

// Through abproxy.

#[tokio::test]
async fn grpc_calls_through_abproxy_are_answered_by_the_h2c_upstream() {
    let backend = GrpcBackend::start("control").await;
    let proxy = Proxy::start(&h2c_variants(&[("control", &backend, 100.0)])).await;
    let client = GrpcClient::connect(proxy.addr).await;
    let reply = client.predict("alice", 0.75).await.expect("OK answer");
    assert_eq!(reply.model, "control");
    assert_eq!(reply.prediction, 1.5, "the messages crossed intact");
    assert_eq!(reply.variant.as_deref(), Some("control"));
    let received = backend.received();
    assert_eq!(received[0].path, PREDICT);
    assert_eq!(received[0].headers["x-user-id"], "alice");
    wait_for_grpc_answers(&proxy, "control", "OK", 1.0).await;
}

#[tokio::test]
async fn grpc_users_are_split_by_the_spec_rule_and_x_variant_names_the_model_that_answered() {
    let control = GrpcBackend::start("control").await;
    let treatment = GrpcBackend::start("treatment").await;
    let config = h2c_variants(&[("control", &control, 50.0), ("treatment", &treatment, 50.0)]);
    let proxy = Proxy::start(&config).await;
    let client = GrpcClient::connect(proxy.addr).await;
    for n in 0..40 {
        let user = format!("user-{n}");
        let reply = client.predict(&user, 1.0).await.expect("OK answer");
        assert_eq!(reply.model, half_and_half(&user), "{user} against the rule");
        assert_eq!(reply.variant.as_deref(), Some(reply.model.as_str()));
    }
    let treated = (0..40)
        .filter(|n| half_and_half(&format!("user-{n}")) == "treatment")
        .count();
    assert_eq!(treatment.count(), treated);
    assert_eq!(control.count(), 40 - treated);
}

#[tokio::test]
async fn a_grpc_error_status_is_counted_under_its_variant_with_its_grpc_code() {
    let control = GrpcBackend::start("control").await;
    let treatment = GrpcBackend::failing_one_in("treatment", 1, Code::Internal).await;
    let config = h2c_variants(&[("control", &control, 50.0), ("treatment", &treatment, 50.0)]);
    let proxy = Proxy::start(&config).await;
    let client = GrpcClient::connect(proxy.addr).await;
    let mut treated = 0.0;
    for n in 0..20 {
        let user = format!("user-{n}");
        let answer = client.predict(&user, 1.0).await;
        if half_and_half(&user) == "treatment" {
            treated += 1.0;
            let status = answer.expect_err("the treatment fails every call");
            assert_eq!(status.code(), Code::Internal, "{status:?}");
        } else {
            assert_eq!(answer.expect("control answers").model, "control");
        }
    }
    wait_for_grpc_answers(&proxy, "treatment", "Internal", treated).await;
    wait_for_grpc_answers(&proxy, "control", "OK", 20.0 - treated).await;
    assert_eq!(grpc_answers(&proxy, "treatment", "OK").await, 0.0);
    assert_eq!(grpc_answers(&proxy, "control", "Internal").await, 0.0);
}

#[tokio::test]
async fn a_dead_h2c_upstream_is_unavailable_to_the_grpc_client_and_counted_as_connect() {
    let config = h2c_variant("control", &Backend::down_url().await, 100.0);
    let proxy = Proxy::start(&config).await;
    let client = GrpcClient::connect(proxy.addr).await;
    let status = client
        .predict("alice", 1.0)
        .await
        .expect_err("nothing can answer");
    // A gRPC status the client can read (HTTP 200, grpc-status 14), not an HTTP 502.
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    wait_for_grpc_answers(&proxy, "control", "Unavailable", 1.0).await;
    assert_eq!(proxy.upstream_errors("control", "connect").await, 1.0);
    assert_eq!(proxy.requests("control", "502").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_calls_reach_an_h2c_upstream_over_at_most_h2_connections() {
    // Each call takes 50 ms, so all 200 are in flight together.
    let backend = GrpcBackend::slow("control", Duration::from_millis(50)).await;
    let config = format!(
        "[limits]\nh2_connections = 2\n\n{}",
        h2c_variants(&[("control", &backend, 100.0)])
    );
    let proxy = Proxy::start(&config).await;
    let answers = concurrent_calls(proxy.addr, 8, 25).await;
    assert_all_answered_by(&answers, "control");
    assert_eq!(backend.count(), 200);
    assert!(
        backend.connections_accepted() <= 2,
        "{} upstream connections for h2_connections = 2",
        backend.connections_accepted()
    );
    wait_for_grpc_answers(&proxy, "control", "OK", 200.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upstream_going_away_mid_load_fails_no_call() {
    // Each upstream connection sends GOAWAY after 25 calls, with calls still in flight on it.
    let backend = GrpcBackend::going_away_after("control", 25, Duration::from_millis(20)).await;
    let config = format!(
        "[limits]\nh2_connections = 2\n\n{}",
        h2c_variants(&[("control", &backend, 100.0)])
    );
    let proxy = Proxy::start(&config).await;
    let answers = concurrent_calls(proxy.addr, 8, 25).await;
    assert_all_answered_by(&answers, "control");
    // At most two connections at a time, so some connection got its 25 calls and went away.
    assert!(backend.went_away() >= 1, "the upstream never went away");
    wait_for_grpc_answers(&proxy, "control", "OK", 200.0).await;
}

#[tokio::test]
async fn te_trailers_reaches_the_h2c_upstream_for_grpc_calls() {
    let backend = GrpcBackend::start("control").await;
    let proxy = Proxy::start(&h2c_variants(&[("control", &backend, 100.0)])).await;
    let client = GrpcClient::connect(proxy.addr).await;
    client.predict("alice", 1.0).await.expect("OK answer");
    let received = backend.received();
    assert_eq!(received[0].headers["te"], "trailers");
    assert_eq!(received[0].headers["content-type"], "application/grpc");
}

/// The variant the spec rule gives `user` under a 50/50 split (control first).
fn half_and_half(user: &str) -> &'static str {
    if spec_bucket("", user, 100) < 50 {
        "control"
    } else {
        "treatment"
    }
}

/// `calls` calls at once on each of `clients` gRPC connections to `addr`: the model that
/// answered each, or its status.
async fn concurrent_calls(
    addr: SocketAddr,
    clients: usize,
    calls: usize,
) -> Vec<Result<String, Status>> {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let client = GrpcClient::connect(addr).await;
        for n in 0..calls {
            let client = client.clone();
            tasks.spawn(async move {
                let answer = client.predict(&format!("user-{c}-{n}"), 1.0).await;
                answer.map(|reply| reply.model)
            });
        }
    }
    let mut answers = Vec::new();
    while let Some(answer) = tasks.join_next().await {
        answers.push(answer.expect("call task"));
    }
    answers
}

/// Fails the test unless every one of `answers` came from `model`.
fn assert_all_answered_by(answers: &[Result<String, Status>], model: &str) {
    let failed: Vec<&Status> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed, the first with {:?}",
        failed.len(),
        answers.len(),
        failed[0]
    );
    assert!(answers.iter().flatten().all(|answered| answered == model));
}

/// `abproxy_requests_total` for gRPC answers (HTTP 200) of `variant` with `grpc_code`.
async fn grpc_answers(proxy: &Proxy, variant: &str, grpc_code: &str) -> f64 {
    let labels = [
        ("variant", variant),
        ("code", "200"),
        ("grpc_code", grpc_code),
    ];
    proxy.metric("abproxy_requests_total", &labels).await
}

/// Polls `/metrics` until `grpc_answers` reaches `count`; the count lands when the answer's
/// trailers have passed, which can be just after the client has them.
async fn wait_for_grpc_answers(proxy: &Proxy, variant: &str, grpc_code: &str, count: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = grpc_answers(proxy, variant, grpc_code).await;
        if seen == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{variant}'s gRPC answers with {grpc_code}: {seen} after 5 s, expected {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
