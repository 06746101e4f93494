//! Live reload: weights shift when the file changes, atomically, without failing a request.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::proxy::{eventually, with_server};
use support::{spec_bucket, variants, Backend, Client, ConfigFile, Edit, Proxy};

const WAIT: Duration = Duration::from_secs(10);

fn split(control: &Backend, treatment: &Backend, treatment_weight: f64) -> String {
    variants(&[
        ("control", control, 100.0 - treatment_weight),
        ("treatment", treatment, treatment_weight),
    ])
}

/// Keeps `connections` keep-alive clients busy until stopped; counts answers and failures.
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(proxy: &Proxy, connections: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let tasks = (0..connections)
            .map(|task| {
                let (client, stop, answered) =
                    (Client::new(proxy.addr), stop.clone(), answered.clone());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        match client
                            .get("/predict")
                            .user(&format!("load-{task}-{n}"))
                            .try_send()
                            .await
                        {
                            Ok(reply)
                                if reply.status == 200
                                    && reply.variant() == Some(reply.model().as_str()) => {}
                            Ok(reply) => failures.push(format!(
                                "{} {:?}: {}",
                                reply.status,
                                reply.variant(),
                                reply.text()
                            )),
                            Err(err) => failures.push(err),
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    failures
                })
            })
            .collect();
        Load {
            stop,
            answered,
            tasks,
        }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for task in self.tasks {
            failures.extend(task.await.expect("load task"));
        }
        (self.answered.load(Ordering::Relaxed), failures)
    }
}

async fn weight_in_status(proxy: &Proxy, variant: usize) -> f64 {
    proxy.status().await["variants"][variant]["weight"]
        .as_f64()
        .unwrap_or(-1.0)
}

async fn twenty_changes_under_load(config: ConfigFile, edits: &[Edit]) {
    let control = Backend::start("control").await;
    let treatment = Backend::start("treatment").await;
    config.write(&with_server(&split(&control, &treatment, 50.0)), edits[0]);
    let proxy = Proxy::start_on(config).await;
    let load = Load::start(&proxy, 4);
    for change in 1..=20 {
        let weight = f64::from(change * 4);
        let edit = edits[change as usize % edits.len()];
        let generation = proxy.status().await["generation"].as_u64().unwrap_or(0);
        proxy.edit_config(&split(&control, &treatment, weight), edit);
        proxy.wait_for_generation(generation + 1).await;
        assert_eq!(
            weight_in_status(&proxy, 1).await,
            weight,
            "change {change} by {edit:?}"
        );
        assert_eq!(proxy.weight("treatment").await, weight);
    }
    let (answered, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {answered} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(answered > 100, "the load kept going ({answered} requests)");
    assert!(
        proxy
            .metric("abproxy_config_reloads_total", &[("result", "ok")])
            .await
            >= 20.0
    );
    assert_eq!(
        proxy
            .metric("abproxy_config_reloads_total", &[("result", "error")])
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_weight_changes_by_rename_and_in_place_write_drop_no_request() {
    twenty_changes_under_load(ConfigFile::plain(""), &[Edit::Rename, Edit::InPlace]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_weight_changes_through_a_configmap_volume_drop_no_request() {
    twenty_changes_under_load(
        ConfigFile::config_map(""),
        &[Edit::ConfigMapSwap, Edit::InPlace, Edit::Rename],
    )
    .await;
}

#[tokio::test]
async fn an_invalid_file_keeps_the_old_routing_until_it_is_fixed() {
    let control = Backend::start("control").await;
    let treatment = Backend::start("treatment").await;
    let proxy = Proxy::start(&split(&control, &treatment, 20.0)).await;
    let broken = [
        ("bad TOML", "[[variant]\nname = ".to_owned()),
        (
            "weights not summing to 100",
            split(&control, &treatment, 20.0).replace("weight = 80", "weight = 70"),
        ),
        (
            "unknown key",
            format!(
                "[limits]\nmax_bodyy = 5\n{}",
                split(&control, &treatment, 20.0)
            ),
        ),
    ];
    for (errors, (class, text)) in broken.iter().enumerate() {
        proxy.edit_config(text, Edit::Rename);
        eventually(WAIT, || async {
            proxy
                .metric("abproxy_config_reloads_total", &[("result", "error")])
                .await
                == (errors + 1) as f64
        })
        .await;
        let status = proxy.status().await;
        assert_eq!(status["generation"], 1, "{class}");
        let error = &status["last_reload_error"];
        assert!(
            error["error"]
                .as_str()
                .unwrap_or_default()
                .contains("abproxy.toml:"),
            "{class}: {error}"
        );
        assert_eq!(error["sha256"].as_str().map(str::len), Some(64), "{class}");
        assert_eq!(
            proxy.client.get("/").user("user-2").send().await.variant(),
            Some("treatment"),
            "{class}"
        );
        assert_eq!(
            proxy.client.get("/").user("alice").send().await.variant(),
            Some("control"),
            "{class}"
        );
    }
    // Putting the serving file back clears the error without a new generation.
    proxy.edit_config(&split(&control, &treatment, 20.0), Edit::Rename);
    eventually(WAIT, || async {
        proxy.status().await["last_reload_error"].is_null()
    })
    .await;
    assert_eq!(proxy.status().await["generation"], 1);

    proxy.edit_config(&split(&control, &treatment, 90.0), Edit::Rename);
    proxy.wait_for_generation(2).await;
    assert_eq!(
        proxy.status().await["last_reload_error"],
        serde_json::Value::Null
    );
    assert_eq!(
        proxy.client.get("/").user("alice").send().await.variant(),
        Some("treatment")
    );
}

#[tokio::test]
async fn a_canary_ramp_moves_users_only_into_the_canary() {
    let control = Backend::start("control").await;
    let treatment = Backend::start("treatment").await;
    let proxy = Proxy::start(&split(&control, &treatment, 5.0)).await;
    let probes: Vec<String> = (0..300).map(|n| format!("probe-{n}")).collect();
    let mut treated_before: Vec<bool> = vec![false; probes.len()];
    for (step, weight) in [5.0, 10.0, 25.0, 50.0].into_iter().enumerate() {
        if step > 0 {
            proxy.edit_config(&split(&control, &treatment, weight), Edit::Rename);
            proxy.wait_for_generation(step as u64 + 1).await;
        }
        for (probe, was_treated) in probes.iter().zip(treated_before.iter_mut()) {
            let expected = if f64::from(spec_bucket("", probe, 100)) < 100.0 - weight {
                "control"
            } else {
                "treatment"
            };
            let variant = proxy
                .client
                .get("/")
                .user(probe)
                .send()
                .await
                .variant()
                .map(str::to_owned);
            assert_eq!(variant.as_deref(), Some(expected), "{probe} at {weight}%");
            assert!(
                !*was_treated || expected == "treatment",
                "{probe} left treatment at {weight}%"
            );
            *was_treated = expected == "treatment";
        }
    }
}

#[tokio::test]
async fn a_request_to_a_removed_variant_finishes_on_its_generation() {
    let control = Backend::start("control").await;
    let slow = Backend::slow("treatment", Duration::from_millis(800)).await;
    let config = format!(
        "[assignment]\noverride_header = \"x-force-variant\"\n{}",
        split(&control, &slow, 50.0)
    );
    let proxy = Proxy::start(&config).await;
    let in_flight = tokio::spawn(
        proxy
            .client
            .get("/")
            .header("x-force-variant", "treatment")
            .send(),
    );
    eventually(WAIT, || async { slow.count() == 1 }).await;

    proxy.edit_config(&variants(&[("control", &control, 100.0)]), Edit::Rename);
    proxy.wait_for_generation(2).await;
    assert_eq!(
        proxy.client.get("/").user("user-2").send().await.variant(),
        Some("control")
    );

    let reply = in_flight.await.expect("request task");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.model(), "treatment");
    assert_eq!(proxy.weight("treatment").await, 0.0);
    // With the last request on the old generation done, its pool to the removed upstream goes.
    eventually(WAIT, || async { slow.connections_open() == 0 }).await;
}

#[tokio::test]
async fn upstream_connections_survive_a_reload() {
    let control = Backend::start("control").await;
    let treatment = Backend::start("treatment").await;
    let proxy = Proxy::start(&split(&control, &treatment, 20.0)).await;
    proxy.client.get("/").user("alice").send().await;
    assert_eq!(control.connections_accepted(), 1);
    proxy.edit_config(&split(&control, &treatment, 30.0), Edit::Rename);
    proxy.wait_for_generation(2).await;
    for _ in 0..5 {
        assert_eq!(
            proxy.client.get("/").user("alice").send().await.variant(),
            Some("control")
        );
    }
    assert_eq!(
        control.connections_accepted(),
        1,
        "the reload reconnected to an unchanged upstream"
    );
}

#[tokio::test]
async fn a_listen_address_change_is_reported_and_the_rest_applies() {
    let control = Backend::start("control").await;
    let treatment = Backend::start("treatment").await;
    let proxy = Proxy::start(&split(&control, &treatment, 20.0)).await;
    let moved = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:0\"\n{}",
        split(&control, &treatment, 90.0)
    );
    proxy.config.write(&moved, Edit::Rename);
    proxy.wait_for_generation(2).await;
    let status = proxy.status().await;
    let restart = status["restart_required"].to_string();
    assert!(restart.contains("server.listen"), "{restart}");
    assert_eq!(
        status["listen"],
        proxy.addr.to_string(),
        "still listening where it was bound"
    );
    assert_eq!(
        proxy.client.get("/").user("alice").send().await.variant(),
        Some("treatment")
    );
}
