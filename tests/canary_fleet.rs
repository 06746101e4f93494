//! The fleet-wide canary guard (`[canary] source = "prometheus"`) against a real Prometheus
//! on loopback scraping real replicas every second: the replicas judge the fleet's figures,
//! so a canary failing on one replica's share of the traffic only is rolled back by both at
//! the same step; and an interval Prometheus cannot answer, or answers empty, is never a pass.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::proxy::{eventually, sample};
use support::{Backend, Client, Model, Prometheus, Proxy};
use tokio_util::sync::CancellationToken;

/// A replica's config: control and treatment at 50 % each in the file, a guard judging the
/// fleet every 2 s from Prometheus at `prometheus`, 1 s after each interval ends.
fn replica_config(
    control: &Backend,
    treatment: &Backend,
    prometheus: SocketAddr,
    selector: &str,
    canary_keys: &str,
    checks: &str,
) -> String {
    format!(
        "[[variant]]\nname = \"control\"\nupstream = \"{}\"\nweight = 50\n\n\
         [[variant]]\nname = \"treatment\"\nupstream = \"{}\"\nweight = 50\n\n\
         [canary]\nvariant = \"treatment\"\nbaseline = \"control\"\ninterval = \"2s\"\n\
         min_requests = 10\nsource = \"prometheus\"\nprometheus_url = \"http://{prometheus}\"\n\
         prometheus_selector = '{selector}'\nprometheus_query_offset = \"1s\"\n\
         prometheus_timeout = \"1s\"\n{canary_keys}\n\n[canary.checks]\n{checks}\n",
        control.url(),
        treatment.url()
    )
}

/// Four clients sending requests for users `u0`..`u1999` in turn, request `n` to
/// `targets[n % targets.len()]` (list a replica more often to give it more of the traffic),
/// at most about 800 a second, until stopped.
struct Traffic {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(targets: Vec<Client>) -> Traffic {
        let stop = CancellationToken::new();
        let next = Arc::new(AtomicU64::new(0));
        let targets = Arc::new(targets);
        let tasks = (0..4)
            .map(|_| {
                let (stop, next, targets) = (stop.clone(), next.clone(), targets.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        let client = &targets[(n % targets.len() as u64) as usize];
                        let user = format!("u{}", n % 2000);
                        let _ = client.get("/predict").user(&user).try_send().await;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Traffic { stop, tasks }
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            task.await.expect("traffic task");
        }
    }
}

async fn canary(proxy: &Proxy) -> Value {
    proxy.admin.get("/canary").send().await.json()
}

/// The analyses so far, newest first.
fn records(status: &Value) -> Vec<Value> {
    status["last_checks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn check<'a>(record: &'a Value, name: &str) -> Option<&'a Value> {
    record["checks"]
        .as_array()?
        .iter()
        .find(|check| check["check"] == name)
}

/// Whether the analysis was made on figures Prometheus answered.
fn read(record: &Value) -> bool {
    check(record, "source").is_some_and(|source| source["outcome"] == "pass")
}

/// What a judged interval concluded, for comparing replicas.
fn judgement(record: &Value) -> (Value, Value, Value) {
    (
        record["verdict"].clone(),
        record["canary"].clone(),
        record["baseline"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_replicas_roll_back_at_the_same_step_when_the_canary_fails_on_one_replicas_share() {
    let control = Backend::model("control", Model::healthy()).await;
    // Replica A's treatment fails every other answer; replica B's never does.
    let failing = Backend::model("treatment", Model::failing_one_in(2)).await;
    let healthy = Backend::model("treatment", Model::healthy()).await;
    let prometheus_addr = Prometheus::reserve_addr();
    let config = |treatment: &Backend| {
        replica_config(
            &control,
            treatment,
            prometheus_addr,
            "job=\"abproxy\"",
            "steps = [20, 50]\nanalyses_per_step = 3\nfailures_to_rollback = 2",
            "max_error_rate = 0.05\nmax_error_rate_increase = 0.01",
        )
    };
    let a = Proxy::start(&config(&failing)).await;
    let b = Proxy::start(&config(&healthy)).await;
    let prometheus = Prometheus::start(prometheus_addr, &[a.admin_addr, b.admin_addr]).await;

    // B gets four requests in five: A's failures are a tenth of the fleet's canary answers,
    // over the 5 % ceiling, while B alone sees none.
    let traffic = Traffic::start(vec![
        a.client.clone(),
        b.client.clone(),
        b.client.clone(),
        b.client.clone(),
        b.client.clone(),
    ]);
    let rolled_back = || async {
        canary(&a).await["state"] == "rolled_back" && canary(&b).await["state"] == "rolled_back"
    };
    let limit = Duration::from_secs(60);
    let deadline = tokio::time::Instant::now() + limit;
    while !rolled_back().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not both rolled back within {limit:?}:\nA {:#}\nB {:#}\nprometheus log:\n{}",
            canary(&a).await,
            canary(&b).await,
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    traffic.stop().await;

    let (status_a, status_b) = (canary(&a).await, canary(&b).await);
    for status in [&status_a, &status_b] {
        assert_eq!(status["weight"], 0.0, "{status:#}");
        assert_eq!(
            status["step"]["index"], 1,
            "rolled back at the first step: {status:#}"
        );
        assert_eq!(status["source"]["kind"], "prometheus");
        let reason = status["reason"].as_str().expect("a reason");
        assert!(reason.starts_with("rolled back: error rate"), "{reason}");
        assert!(reason.ends_with("2nd consecutive failure"), "{reason}");
    }
    // The same interval, judged on the same figures, rolled both back.
    let last_failure = |status: &Value| {
        records(status)
            .into_iter()
            .find(|record| record["verdict"] == "fail")
            .expect("a failed analysis")
    };
    let (fail_a, fail_b) = (last_failure(&status_a), last_failure(&status_b));
    assert_eq!(fail_a["judged_until"], fail_b["judged_until"]);
    assert_eq!(judgement(&fail_a), judgement(&fail_b));
    assert_eq!(fail_a["summary"], fail_b["summary"]);
    // Every interval both read, both judged alike.
    let mut compared = 0;
    for record in records(&status_a).iter().filter(|r| read(r)) {
        let twin = records(&status_b)
            .into_iter()
            .find(|r| r["judged_until"] == record["judged_until"] && read(r));
        if let Some(twin) = twin {
            assert_eq!(judgement(record), judgement(&twin), "{record:#}\n{twin:#}");
            compared += 1;
        }
    }
    assert!(compared >= 2, "{status_a:#}\n{status_b:#}");
    // What B decided on was the fleet's: its own answers never failed.
    let treatment_answers = b.requests("treatment", "200").await;
    assert!(treatment_answers > 0.0);
    assert_eq!(b.requests("treatment", "500").await, 0.0);
    assert!(a.requests("treatment", "500").await > 0.0);
    for replica in [&a, &b] {
        assert_eq!(replica.weight("treatment").await, 0.0);
        assert_eq!(replica.weight("control").await, 100.0);
        let metrics = replica.metrics().await;
        assert!(
            sample(
                &metrics,
                "abproxy_canary_checks_total",
                &[("check", "source"), ("outcome", "pass")]
            ) >= 2.0
        );
        assert_eq!(
            sample(
                &metrics,
                "abproxy_canary_rollbacks_total",
                &[("variant", "treatment")]
            ),
            1.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_stopped_mid_run_or_answering_empty_makes_intervals_inconclusive() {
    let control = Backend::model("control", Model::healthy()).await;
    let treatment = Backend::model("treatment", Model::healthy()).await;
    let prometheus_addr = Prometheus::reserve_addr();
    let config = |selector: &str| {
        replica_config(
            &control,
            &treatment,
            prometheus_addr,
            selector,
            "steps = [10, 20]\nanalyses_per_step = 3",
            "max_error_rate = 0.05",
        )
    };
    let replica = Proxy::start(&config("job=\"abproxy\"")).await;
    // A replica whose selector matches none of the fleet's series: every answer is empty.
    let astray = Proxy::start(&config("job=\"elsewhere\"")).await;
    let mut prometheus =
        Prometheus::start(prometheus_addr, &[replica.admin_addr, astray.admin_addr]).await;
    let traffic = Traffic::start(vec![replica.client.clone(), astray.client.clone()]);

    eventually(Duration::from_secs(40), || async {
        records(&canary(&replica).await)
            .iter()
            .any(|record| record["verdict"] == "pass")
    })
    .await;
    let status = canary(&astray).await;
    let analyses = records(&status);
    assert!(!analyses.is_empty(), "{status:#}");
    for record in &analyses {
        assert_eq!(record["verdict"], "inconclusive", "{record:#}");
        let source = check(record, "source").expect("a source check");
        assert_eq!(source["outcome"], "inconclusive");
    }
    let newest = &analyses[0]["summary"];
    assert!(
        newest
            .as_str()
            .is_some_and(|summary| summary.contains("no abproxy_requests_total series")),
        "{newest}"
    );
    assert_eq!(
        (
            status["step"]["index"].clone(),
            status["step"]["passed"].clone()
        ),
        (1.into(), 0.into())
    );

    prometheus.stop();
    let unreachable = |record: &Value| {
        check(record, "source").is_some_and(|source| {
            source["outcome"] == "inconclusive"
                && source["detail"]
                    .as_str()
                    .is_some_and(|detail| detail.contains("cannot connect"))
        })
    };
    let count_unreachable =
        |status: &Value| records(status).iter().filter(|r| unreachable(r)).count();
    eventually(Duration::from_secs(10), || async {
        count_unreachable(&canary(&replica).await) >= 1
    })
    .await;
    let stopped = canary(&replica).await;
    eventually(Duration::from_secs(20), || async {
        count_unreachable(&canary(&replica).await) >= 4
    })
    .await;
    traffic.stop().await;

    let status = canary(&replica).await;
    assert_eq!(status["state"], "running", "{status:#}");
    assert_eq!(status["step"], stopped["step"], "{status:#}");
    assert_eq!(status["weight"], stopped["weight"]);
    let newest = records(&status);
    let since_stop: Vec<&Value> = newest.iter().take_while(|r| unreachable(r)).collect();
    assert!(since_stop.len() >= 4, "{status:#}");
    for record in since_stop {
        assert_eq!(record["verdict"], "inconclusive", "{record:#}");
        assert!(record["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!(
                "no fleet figures from Prometheus at http://{prometheus_addr}: cannot connect"
            ))));
    }
    assert!(status["source"]["last_error"]
        .as_str()
        .is_some_and(|error| error.contains("cannot connect")));
    assert!(
        replica
            .metric(
                "abproxy_canary_checks_total",
                &[("check", "source"), ("outcome", "inconclusive")]
            )
            .await
            >= 4.0
    );
    assert_eq!(replica.weight("treatment").await, stopped["weight"]);
}
