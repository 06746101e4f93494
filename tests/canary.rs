//! The canary guard against real models on loopback: it rolls back a failing, slow or
//! drifting treatment, ramps a healthy one, waits out thin traffic, flags a broken split,
//! survives restarts, and takes operators' commands.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::proxy::{eventually, sample};
use support::{spec_bucket, Backend, Edit, Model, Proxy};
use tokio_util::sync::CancellationToken;

/// The two models a canary test puts side by side.
struct Arms {
    control: Backend,
    treatment: Backend,
}

impl Arms {
    async fn start(control: Model, treatment: Model) -> Arms {
        Arms {
            control: Backend::model("control", control).await,
            treatment: Backend::model("treatment", treatment).await,
        }
    }

    fn config(&self, canary_keys: &str, checks: &str) -> String {
        canary_config(&self.control, &self.treatment, canary_keys, checks)
    }
}

/// A 50/50 split of `control` and `treatment` with a guard judging every 250 ms, from 30
/// requests an arm, unless `canary_keys` say otherwise.
fn canary_config(
    control: &Backend,
    treatment: &Backend,
    canary_keys: &str,
    checks: &str,
) -> String {
    let min_requests = if canary_keys.contains("min_requests") {
        ""
    } else {
        "min_requests = 30"
    };
    let interval = if canary_keys.contains("interval") {
        ""
    } else {
        "interval = \"250ms\""
    };
    format!(
        "[metrics]\nprediction = \"/prediction\"\n\n\
         [[variant]]\nname = \"control\"\nupstream = \"{}\"\nweight = 50\n\n\
         [[variant]]\nname = \"treatment\"\nupstream = \"{}\"\nweight = 50\n\n\
         [canary]\nvariant = \"treatment\"\nbaseline = \"control\"\n{interval}\n\
         {min_requests}\n{canary_keys}\n\n[canary.checks]\n{checks}\n",
        control.url(),
        treatment.url()
    )
}

/// One answer the traffic got.
#[derive(Debug, Clone)]
struct Answer {
    user: String,
    status: u16,
    variant: Option<String>,
    model: Option<String>,
}

/// Clients sending requests for users `u0`..`u1999` in turn, four at a time, until stopped.
struct Traffic {
    stop: CancellationToken,
    answers: Arc<Mutex<Vec<Answer>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(proxy: &Proxy) -> Traffic {
        Self::start_for(proxy, |_| true)
    }

    /// Traffic from the users `include` accepts only.
    fn start_for(proxy: &Proxy, include: impl Fn(&str) -> bool + Send + Sync + 'static) -> Traffic {
        let stop = CancellationToken::new();
        let answers = Arc::new(Mutex::new(Vec::new()));
        let next = Arc::new(AtomicU64::new(0));
        let include = Arc::new(include);
        let tasks = (0..4)
            .map(|_| {
                let (client, stop, answers, next, include) = (
                    proxy.client.clone(),
                    stop.clone(),
                    answers.clone(),
                    next.clone(),
                    include.clone(),
                );
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let user = format!("u{}", next.fetch_add(1, Ordering::SeqCst) % 2000);
                        if !include(&user) {
                            continue;
                        }
                        let Ok(reply) = client.get("/predict").user(&user).try_send().await else {
                            continue;
                        };
                        let model = serde_json::from_slice::<serde_json::Value>(&reply.body)
                            .ok()
                            .and_then(|body| body["model"].as_str().map(str::to_owned));
                        answers.lock().expect("lock").push(Answer {
                            user,
                            status: reply.status.as_u16(),
                            variant: reply.variant().map(str::to_owned),
                            model,
                        });
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            answers,
            tasks,
        }
    }

    async fn stop(self) -> Vec<Answer> {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("traffic task");
        }
        let answers = self.answers.lock().expect("lock").clone();
        answers
    }
}

async fn canary(proxy: &Proxy) -> serde_json::Value {
    proxy.admin.get("/canary").send().await.json()
}

async fn wait_for_state(proxy: &Proxy, state: &str, limit: Duration) -> serde_json::Value {
    eventually(limit, || async { canary(proxy).await["state"] == state }).await;
    canary(proxy).await
}

/// The verdicts of the analyses so far, oldest first.
fn verdicts(status: &serde_json::Value) -> Vec<String> {
    let mut verdicts: Vec<String> = status["last_checks"]
        .as_array()
        .expect("last_checks")
        .iter()
        .map(|record| record["verdict"].as_str().unwrap_or_default().to_owned())
        .collect();
    verdicts.reverse();
    verdicts
}

fn check<'a>(record: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    record["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|check| check["check"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {record}"))
}

fn in_treatment(user: &str) -> bool {
    spec_bucket("", user, 100) >= 50
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_treatment_failing_five_percent_is_rolled_back_after_three_failed_intervals() {
    let arms = Arms::start(Model::failing_one_in(200), Model::failing_one_in(20)).await;
    let proxy = Proxy::start(&arms.config(
        "failures_to_rollback = 3",
        "max_error_rate = 0.02\nmax_error_rate_increase = 0.005",
    ))
    .await;

    let traffic = Traffic::start(&proxy);
    let status = wait_for_state(&proxy, "rolled_back", Duration::from_secs(30)).await;
    let before_rollback = traffic.stop().await;

    let judged: Vec<String> = verdicts(&status)
        .into_iter()
        .filter(|verdict| verdict != "inconclusive")
        .collect();
    assert_eq!(judged, ["fail", "fail", "fail"], "{status:#}");
    let reason = status["reason"].as_str().expect("a reason");
    assert!(reason.starts_with("rolled back: error rate"), "{reason}");
    assert!(reason.ends_with("3rd consecutive failure"), "{reason}");
    assert_eq!(status["weight"], 0.0);

    // No request failed but for the models' own 500s, and 502/504s never happened.
    assert!(before_rollback.len() > 100);
    for answer in &before_rollback {
        assert!(answer.status == 200 || answer.status == 500, "{answer:?}");
        assert_eq!(answer.model, answer.variant, "{answer:?}");
    }

    // The treatment's users are on control from then on.
    let after = Traffic::start(&proxy);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = after.stop().await;
    assert!(after.iter().any(|answer| in_treatment(&answer.user)));
    for answer in &after {
        assert_eq!(answer.variant.as_deref(), Some("control"), "{answer:?}");
        assert_eq!(answer.model.as_deref(), Some("control"), "{answer:?}");
    }
    assert_eq!(proxy.weight("treatment").await, 0.0);
    assert_eq!(proxy.weight("control").await, 100.0);
    let metrics = proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "abproxy_canary_rollbacks_total",
            &[("variant", "treatment")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            "abproxy_canary_state",
            &[("state", "rolled_back")]
        ),
        1.0
    );
    assert_eq!(
        sample(&metrics, "abproxy_canary_state", &[("state", "running")]),
        0.0
    );
    assert_eq!(
        sample(
            &metrics,
            "abproxy_canary_checks_total",
            &[("check", "error_rate"), ("outcome", "fail")]
        ),
        3.0
    );
    let status = proxy.status().await;
    assert_eq!(status["canary"]["state"], "rolled_back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_treatment_slower_by_forty_milliseconds_is_rolled_back_on_latency() {
    let arms = Arms::start(Model::healthy(), Model::delayed(Duration::from_millis(40))).await;
    let proxy = Proxy::start(&arms.config(
        "min_requests = 10",
        "max_p99_ratio = 1.5\nmax_error_rate = 0.01",
    ))
    .await;

    let traffic = Traffic::start(&proxy);
    let status = wait_for_state(&proxy, "rolled_back", Duration::from_secs(30)).await;
    traffic.stop().await;

    let last = &status["last_checks"][0];
    assert_eq!(check(last, "p99_ratio")["outcome"], "fail", "{last:#}");
    assert!(check(last, "p99_ratio")["value"].as_f64() > Some(1.5));
    assert_eq!(check(last, "error_rate")["outcome"], "pass");
    assert!(status["reason"].as_str().expect("reason").contains("p99"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_treatment_whose_predictions_shift_is_rolled_back_on_drift() {
    let arms = Arms::start(Model::healthy(), Model::shifted(0.3)).await;
    let proxy =
        Proxy::start(&arms.config("", "max_prediction_psi = 0.1\nmin_predictions = 30")).await;

    let traffic = Traffic::start(&proxy);
    let status = wait_for_state(&proxy, "rolled_back", Duration::from_secs(30)).await;
    traffic.stop().await;

    let drift = check(&status["last_checks"][0], "prediction_psi");
    assert_eq!(drift["outcome"], "fail");
    let psi = drift["value"].as_f64().expect("a PSI");
    assert!(psi > 0.25, "a 0.3 shift of U(0,1) is a major change: {psi}");
    assert!(status["reason"].as_str().expect("reason").contains("PSI"));
    // The predictions are in the metrics too, for PromQL.
    let metrics = proxy.metrics().await;
    let count = |variant| {
        sample(
            &metrics,
            "abproxy_prediction_count",
            &[("variant", variant)],
        )
    };
    assert!(count("control") > 0.0 && count("treatment") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_treatment_ramps_through_every_step_and_keeps_its_users() {
    let arms = Arms::start(Model::failing_one_in(100), Model::failing_one_in(100)).await;
    let config = arms.config(
        "steps = [10, 20, 30]\nanalyses_per_step = 1\nfailures_to_rollback = 3\nmin_requests = 10",
        // A floor well above loopback latencies: on a loaded test machine a few scheduling
        // stalls must not read as a slow canary.
        "max_error_rate = 0.1\nmax_error_rate_increase = 0.02\nmax_p99_ratio = 4\n\
         p99_floor = \"250ms\"\nmax_prediction_psi = 0.2\nmin_predictions = 10",
    );
    let proxy = Proxy::start(&config).await;
    assert_eq!(canary(&proxy).await["weight"], 10.0);
    assert_eq!(proxy.weight("treatment").await, 10.0);
    assert_eq!(proxy.weight("control").await, 90.0);

    // Users in the canary at 10 % are still there at every later step.
    let treated_at_first: Vec<String> = (0..400)
        .map(|n| format!("u{n}"))
        .filter(|user| spec_bucket("", user, 100) >= 90)
        .collect();
    let traffic = Traffic::start(&proxy);
    let status = wait_for_state(&proxy, "promoted", Duration::from_secs(40)).await;
    let answers = traffic.stop().await;

    assert_eq!(status["weight"], 30.0);
    assert_eq!(status["step"]["index"], 3);
    assert_eq!(proxy.weight("treatment").await, 30.0);
    assert_eq!(proxy.weight("control").await, 70.0);
    for answer in answers
        .iter()
        .filter(|a| treated_at_first.contains(&a.user))
    {
        assert_eq!(answer.variant.as_deref(), Some("treatment"), "{answer:?}");
    }
    for user in &treated_at_first {
        let reply = proxy.client.get("/predict").user(user).send().await;
        assert_eq!(reply.variant(), Some("treatment"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_traffic_is_inconclusive_and_never_advances_nor_rolls_back() {
    let arms = Arms::start(Model::healthy(), Model::failing_one_in(2)).await;
    let proxy = Proxy::start(&arms.config(
        "steps = [10, 50]\nanalyses_per_step = 1\nmin_requests = 50000",
        "max_error_rate = 0.01",
    ))
    .await;

    let traffic = Traffic::start(&proxy);
    eventually(Duration::from_secs(10), || async {
        verdicts(&canary(&proxy).await).len() >= 4
    })
    .await;
    traffic.stop().await;

    let status = canary(&proxy).await;
    assert!(
        verdicts(&status)
            .iter()
            .all(|verdict| verdict == "inconclusive"),
        "{status:#}"
    );
    assert_eq!(status["state"], "running");
    assert_eq!(status["step"]["index"], 1);
    assert_eq!(status["consecutive_failures"], 0);
    let traffic_check = check(&status["last_checks"][0], "traffic");
    assert!(traffic_check["detail"]
        .as_str()
        .expect("detail")
        .contains("too little traffic"));
    assert!(
        sample(
            &proxy.metrics().await,
            "abproxy_canary_checks_total",
            &[("check", "traffic"), ("outcome", "inconclusive")]
        ) >= 4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_treatment_receiving_half_its_share_is_flagged_as_srm_and_not_judged_further() {
    let arms = Arms::start(Model::healthy(), Model::failing_one_in(2)).await;
    let proxy = Proxy::start(&arms.config(
        // Enough users an interval for the test to see a halved share at p < 0.001.
        "failures_to_rollback = 1000\nmin_requests = 150\ninterval = \"1s\"",
        "max_error_rate = 0.01",
    ))
    .await;

    // Half of the treatment's users never come: what a redirect loop or a crash on load does.
    let traffic = Traffic::start_for(&proxy, |user| {
        !in_treatment(user)
            || user
                .trim_start_matches('u')
                .parse::<u64>()
                .is_ok_and(|n| n % 2 == 0)
    });
    let srm_failed = |record: &serde_json::Value| {
        record["checks"].as_array().is_some_and(|checks| {
            checks
                .iter()
                .any(|c| c["check"] == "srm" && c["outcome"] == "fail")
        })
    };
    eventually(Duration::from_secs(40), || async {
        canary(&proxy).await["last_checks"]
            .as_array()
            .is_some_and(|records| records.iter().any(srm_failed))
    })
    .await;
    traffic.stop().await;

    let status = canary(&proxy).await;
    let flagged = status["last_checks"]
        .as_array()
        .expect("records")
        .iter()
        .find(|record| srm_failed(record))
        .expect("a mismatched interval");
    assert_eq!(flagged["verdict"], "fail");
    assert_eq!(check(flagged, "srm")["outcome"], "fail", "{flagged:#}");
    assert!(check(flagged, "srm")["p_value"].as_f64() < Some(0.001));
    assert_eq!(
        check(flagged, "error_rate")["outcome"],
        "skipped",
        "{flagged:#}"
    );
    assert!(flagged["summary"]
        .as_str()
        .expect("summary")
        .starts_with("sample-ratio mismatch"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_canary_stays_rolled_back_after_a_restart_until_its_upstream_changes() {
    let arms = Arms::start(Model::healthy(), Model::healthy()).await;
    let state = tempfile::tempdir().expect("temp dir");
    let state_file = state.path().join("canary-state.json");
    let config = arms.config(
        &format!(
            "steps = [5, 25]\nstate_file = {:?}",
            state_file.display().to_string()
        ),
        "max_error_rate = 0.01",
    );
    let proxy = Proxy::start(&config).await;
    let reply = proxy.admin.post("/canary/rollback", "").send().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(proxy.weight("treatment").await, 0.0);
    proxy.stop().await;

    let restarted = Proxy::start(&config).await;
    let status = canary(&restarted).await;
    assert_eq!(status["state"], "rolled_back");
    assert_eq!(status["reason"], "rolled back by an operator");
    assert_eq!(restarted.weight("treatment").await, 0.0);
    let treated = (0..1000)
        .map(|n| format!("u{n}"))
        .find(|u| spec_bucket("", u, 100) >= 99);
    let reply = restarted
        .client
        .get("/predict")
        .user(&treated.expect("a user"))
        .send()
        .await;
    assert_eq!(reply.variant(), Some("control"));

    // A new version of the treatment is a new run, from the first step.
    let fixed = Backend::model("treatment", Model::healthy()).await;
    let edited = config.replace(&arms.treatment.url(), &fixed.url());
    restarted.edit_config(&edited, Edit::Rename);
    let status = wait_for_state(&restarted, "running", Duration::from_secs(10)).await;
    assert_eq!(status["weight"], 5.0);
    eventually(Duration::from_secs(5), || async {
        restarted.weight("treatment").await == 5.0
    })
    .await;
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).expect("state file")).expect("JSON");
    assert_eq!(saved["phase"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_edit_is_not_a_new_run_and_the_rollback_still_holds() {
    let arms = Arms::start(Model::healthy(), Model::healthy()).await;
    let config = arms.config("", "max_error_rate = 0.01");
    let proxy = Proxy::start(&config).await;
    proxy.admin.post("/canary/rollback", "").send().await;
    let generation = proxy.status().await["generation"]
        .as_u64()
        .expect("generation");

    let reweighted =
        config
            .replacen("weight = 50", "weight = 40", 1)
            .replacen("weight = 50", "weight = 60", 1);
    proxy.edit_config(&reweighted, Edit::Rename);
    proxy.wait_for_generation(generation + 1).await;
    assert_eq!(canary(&proxy).await["state"], "rolled_back");
    assert_eq!(proxy.weight("treatment").await, 0.0);
    assert_eq!(proxy.weight("control").await, 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_endpoints_need_the_bearer_token_when_one_is_configured() {
    let arms = Arms::start(Model::healthy(), Model::healthy()).await;
    let secrets = tempfile::tempdir().expect("temp dir");
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, "s3cret\n").expect("token written");
    let proxy = Proxy::start_with_server(
        &format!(
            "admin_token_file = {:?}\n",
            token_file.display().to_string()
        ),
        &arms.config("", "max_error_rate = 0.01"),
    )
    .await;

    let refused = proxy.admin.post("/canary/pause", "").send().await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.headers["www-authenticate"], "Bearer");
    let wrong = proxy
        .admin
        .post("/canary/pause", "")
        .header("authorization", "Bearer guess")
        .send()
        .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(canary(&proxy).await["state"], "running");

    let call = |path: &'static str, body: &'static str| {
        proxy
            .admin
            .post(path, body)
            .header("authorization", "Bearer s3cret")
            .send()
    };
    assert_eq!(call("/canary/pause", "").await.json()["state"], "paused");
    assert_eq!(call("/canary/resume", "").await.json()["state"], "running");
    let conflict = call("/canary/resume", "").await;
    assert_eq!(conflict.status, 409);
    assert!(conflict
        .error()
        .contains("only a paused canary can be resumed"));
    let bad = call("/rollback", "{\"action\": \"explode\"}").await;
    assert_eq!(bad.status, 400);

    // What an existing monitor script sends.
    let rolled_back = call("/rollback", "{\"action\": \"rollback\"}").await;
    assert_eq!(rolled_back.status, 200);
    assert_eq!(rolled_back.json()["state"], "rolled_back");
    assert_eq!(proxy.weight("treatment").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_loopback_callers_may_roll_back() {
    let arms = Arms::start(Model::healthy(), Model::healthy()).await;
    let proxy = Proxy::start(&arms.config("", "max_error_rate = 0.01")).await;

    let reply = proxy
        .admin
        .post("/rollback", "{\"action\":\"rollback\"}")
        .send()
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(canary(&proxy).await["state"], "rolled_back");
    assert_eq!(proxy.weight("treatment").await, 0.0);
}

#[tokio::test]
async fn without_a_canary_the_endpoints_say_so() {
    let control = Backend::start("control").await;
    let proxy = Proxy::start(&support::variants(&[("control", &control, 100.0)])).await;
    assert_eq!(
        canary(&proxy).await,
        serde_json::json!({ "enabled": false })
    );
    let reply = proxy.admin.post("/canary/rollback", "").send().await;
    assert_eq!(reply.status, 404);
    assert!(reply.error().contains("no [canary]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_hears_of_each_change_of_the_run() {
    let arms = Arms::start(Model::healthy(), Model::healthy()).await;
    let deployer = Backend::start("deployer").await;
    let proxy = Proxy::start(&arms.config(
        &format!("webhook = \"{}/hooks/abproxy\"", deployer.url()),
        "max_error_rate = 0.01",
    ))
    .await;
    proxy.admin.post("/canary/rollback", "").send().await;

    eventually(Duration::from_secs(10), || async { deployer.count() == 2 }).await;
    let events: Vec<serde_json::Value> = deployer
        .received()
        .iter()
        .map(|request| serde_json::from_slice(&request.body).expect("a JSON event"))
        .collect();
    assert_eq!(events[0]["event"], "started");
    assert_eq!(events[1]["event"], "rolled_back");
    assert_eq!(events[1]["state"], "rolled_back");
    assert_eq!(events[1]["weight"], 0.0);
    assert_eq!(events[1]["reason"], "rolled back by an operator");
    let request = &deployer.received()[1];
    assert_eq!(request.method, "POST");
    assert_eq!(request.uri.path(), "/hooks/abproxy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_the_canary_and_rolls_it_back() {
    let arms = Arms::start(Model::healthy(), Model::healthy()).await;
    let proxy = Proxy::start(&arms.config("", "max_error_rate = 0.01")).await;
    let admin = format!("http://{}", proxy.admin_addr);
    let abproxy = |action: &'static str| {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_abproxy"))
                .args(["canary", action, "--admin", &admin])
                .output()
                .expect("abproxy runs")
        })
    };

    let status = abproxy("status").await.expect("joined");
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{table}");
    assert!(table.contains("treatment (baseline control)"), "{table}");
    assert!(table.contains("running"), "{table}");

    let rollback = abproxy("rollback").await.expect("joined");
    assert!(
        rollback.status.success(),
        "{}",
        String::from_utf8_lossy(&rollback.stderr)
    );
    assert_eq!(canary(&proxy).await["state"], "rolled_back");
    let again = abproxy("rollback").await.expect("joined");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already rolled back"));
}
