//! The admin port: metrics that match the traffic, valid for Prometheus, and health.

mod support;

use support::proxy::sample;
use support::{promtool_check, variants, Backend, Proxy};

async fn split_proxy() -> (Proxy, Backend, Backend) {
    let control = Backend::start("control").await;
    let treatment = Backend::start("treatment").await;
    let config = variants(&[("control", &control, 50.0), ("treatment", &treatment, 50.0)]);
    (Proxy::start(&config).await, control, treatment)
}

#[tokio::test]
async fn per_variant_request_counts_equal_the_requests_sent() {
    let (proxy, control, treatment) = split_proxy().await;
    for n in 0..300 {
        proxy
            .client
            .get("/")
            .user(&format!("user-{n}"))
            .send()
            .await;
    }
    let metrics = proxy.metrics().await;
    let counted = |variant| {
        sample(
            &metrics,
            "abproxy_requests_total",
            &[("variant", variant), ("code", "200")],
        )
    };
    assert_eq!(counted("control"), control.count() as f64);
    assert_eq!(counted("treatment"), treatment.count() as f64);
    assert_eq!(control.count() + treatment.count(), 300);
    let histogram_count = proxy
        .metric(
            "abproxy_request_duration_seconds_count",
            &[("variant", "control")],
        )
        .await;
    assert_eq!(histogram_count, control.count() as f64);
    assert_eq!(proxy.weight("treatment").await, 50.0);
    assert_eq!(proxy.metric("abproxy_config_generation", &[]).await, 1.0);
    assert_eq!(proxy.metric("abproxy_requests_in_flight", &[]).await, 0.0);
}

#[tokio::test]
async fn promtool_accepts_the_metrics() {
    let control = Backend::start("control").await;
    let candidate = Backend::start("candidate").await;
    let config = format!(
        "{}[[shadow]]\nname = \"candidate\"\nupstream = \"{}\"\ncompare = \"/prediction\"\n",
        variants(&[("control", &control, 100.0)]),
        candidate.url()
    );
    let proxy = Proxy::start(&config).await;
    proxy.client.get("/").user("alice").send().await;
    support::proxy::eventually(std::time::Duration::from_secs(10), || async {
        proxy
            .metric("abproxy_shadow_comparisons_total", &[("outcome", "match")])
            .await
            == 1.0
    })
    .await;
    proxy.client.get("/").header("x-user-id", "").send().await;
    let text = proxy.metrics().await;
    for name in [
        "abproxy_requests_total",
        "abproxy_request_duration_seconds_bucket",
        "abproxy_upstream_errors_total",
        "abproxy_variant_weight_percent",
        "abproxy_config_reloads_total",
        "abproxy_config_generation",
        "abproxy_requests_in_flight",
        "abproxy_shadow_requests_total",
        "abproxy_shadow_duration_seconds_bucket",
        "abproxy_shadow_comparisons_total",
        "abproxy_shadow_abs_diff_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    promtool_check(&text);
}

#[tokio::test]
async fn promtool_accepts_the_prediction_and_canary_metrics() {
    let control = Backend::start("control").await;
    let treatment =
        Backend::raw("treatment", "{\"prediction\": \"cat\"}", "application/json").await;
    let config = format!(
        "[metrics]\nprediction = \"/prediction\"\n\n{}\
         [canary]\nvariant = \"treatment\"\nbaseline = \"control\"\ninterval = \"100ms\"\n\
         [canary.checks]\nmax_error_rate = 0.01\n",
        variants(&[("control", &control, 50.0), ("treatment", &treatment, 50.0)])
    );
    let proxy = Proxy::start(&config).await;
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        proxy.client.get("/").user(user).send().await;
    }
    support::proxy::eventually(std::time::Duration::from_secs(10), || async {
        proxy
            .metric("abproxy_canary_checks_total", &[("check", "traffic")])
            .await
            >= 1.0
    })
    .await;
    let text = proxy.metrics().await;
    for name in [
        "abproxy_prediction_bucket",
        "abproxy_prediction_class_total",
        "abproxy_canary_weight_percent",
        "abproxy_canary_state",
        "abproxy_canary_checks_total",
        "abproxy_canary_rollbacks_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    promtool_check(&text);
}

#[tokio::test]
async fn health_readiness_and_status_describe_the_running_config() {
    let (proxy, control, _treatment) = split_proxy().await;
    assert_eq!(proxy.admin.get("/healthz").send().await.status, 200);
    assert_eq!(proxy.admin.get("/readyz").send().await.status, 200);
    assert_eq!(proxy.admin.get("/nope").send().await.status, 404);
    let status = proxy.status().await;
    assert_eq!(status["generation"], 1);
    assert_eq!(status["config"]["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(status["variants"][0]["name"], "control");
    assert_eq!(status["variants"][0]["upstream"], control.url());
    assert_eq!(
        status["variants"][0]["buckets"],
        serde_json::json!({"first": 0, "last": 49, "count": 50})
    );
    assert_eq!(
        status["variants"][1]["buckets"],
        serde_json::json!({"first": 50, "last": 99, "count": 50})
    );
    assert_eq!(status["last_reload_error"], serde_json::Value::Null);
}
