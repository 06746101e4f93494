//! Shadow traffic: mirrored, compared and logged, and never felt by the primary path.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use support::process::{rss_bytes, spawn_run, Running};
use support::proxy::{eventually, sample};
use support::{spec_bucket, variants, Backend, Client, Edit, Proxy};

const WAIT: Duration = Duration::from_secs(15);

fn shadow(name: &str, backend: &Backend, extra: &str) -> String {
    format!(
        "[[shadow]]\nname = \"{name}\"\nupstream = \"{}\"\n{extra}\n\n",
        backend.url()
    )
}

/// abproxy as a process of its own, so that its memory is the proxy's alone: all traffic to
/// `primary`, mirrored to `shadows`. Returns the config's directory, the process, and a
/// client for its listener and one for its admin port.
fn spawn_process(primary: &Backend, shadows: &str) -> (tempfile::TempDir, Running, Client, Client) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("abproxy.toml");
    let config = format!(
        "{}{}{shadows}",
        support::proxy::with_server(""),
        variants(&[("control", primary, 100.0)]),
    );
    std::fs::write(&path, config).expect("write config");
    let (child, addr, admin) = spawn_run(&path.display().to_string());
    (dir, child, Client::new(addr), Client::new(admin))
}

async fn shadow_results(proxy: &Proxy, name: &str) -> [f64; 4] {
    let metrics = proxy.metrics().await;
    ["ok", "error", "timeout", "dropped"].map(|result| {
        support::proxy::sample(
            &metrics,
            "abproxy_shadow_requests_total",
            &[("shadow", name), ("result", result)],
        )
    })
}

#[tokio::test]
async fn every_request_is_mirrored_to_both_shadows_and_their_answers_never_reach_the_client() {
    let primary = Backend::start("primary").await;
    let (first, second) = (
        Backend::start("first-shadow").await,
        Backend::start("second-shadow").await,
    );
    let config = format!(
        "{}{}{}",
        variants(&[("control", &primary, 100.0)]),
        shadow("first", &first, ""),
        shadow("second", &second, "")
    );
    let proxy = Proxy::start(&config).await;
    for n in 0..20 {
        let body = format!(r#"{{"features":[{n}]}}"#);
        let reply = proxy
            .client
            .post(&format!("/predict?n={n}"), body)
            .user(&format!("user-{n}"))
            .send()
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.model(),
            "primary",
            "a shadow answer reached the client"
        );
    }
    eventually(WAIT, || async {
        first.count() == 20 && second.count() == 20
    })
    .await;
    for backend in [&first, &second] {
        for mirrored in backend.received() {
            let original = primary
                .received()
                .into_iter()
                .find(|p| p.uri.query() == mirrored.uri.query())
                .expect("the primary got the same request");
            assert_eq!(mirrored.headers["x-abproxy-shadow"], "1");
            assert!(!original.headers.contains_key("x-abproxy-shadow"));
            assert_eq!(mirrored.method, original.method);
            assert_eq!(mirrored.uri, original.uri);
            assert_eq!(mirrored.body, original.body);
            assert_eq!(mirrored.headers["x-user-id"], original.headers["x-user-id"]);
            for forwarding in ["x-forwarded-for", "x-forwarded-proto"] {
                assert_eq!(mirrored.headers[forwarding], original.headers[forwarding]);
            }
        }
    }
    eventually(WAIT, || async {
        shadow_results(&proxy, "second").await == [20.0, 0.0, 0.0, 0.0]
    })
    .await;
}

#[tokio::test]
async fn predictions_are_compared_as_match_mismatch_or_unparsable() {
    let primary = Backend::predicting("primary", 0.50).await;
    let same = Backend::predicting("same", 0.50).await;
    let off = Backend::predicting("off", 0.75).await;
    let html = Backend::raw("html", "<html>busy</html>", "text/html").await;
    let compare = "compare = \"/prediction\"";
    let config = format!(
        "{}{}{}{}",
        variants(&[("control", &primary, 100.0)]),
        shadow("same", &same, compare),
        shadow("off", &off, &format!("{compare}\ntolerance = 0.1")),
        shadow("html", &html, compare),
    );
    let proxy = Proxy::start(&config).await;
    for n in 0..10 {
        assert_eq!(
            proxy
                .client
                .get("/")
                .user(&format!("u{n}"))
                .send()
                .await
                .status,
            200
        );
    }
    let outcome = |name: &'static str, outcome: &'static str| {
        let proxy = &proxy;
        async move {
            proxy
                .metric(
                    "abproxy_shadow_comparisons_total",
                    &[("shadow", name), ("outcome", outcome)],
                )
                .await
        }
    };
    eventually(WAIT, || async {
        outcome("same", "match").await == 10.0
            && outcome("off", "mismatch").await == 10.0
            && outcome("html", "unparsable").await == 10.0
    })
    .await;
    assert_eq!(
        outcome("same", "mismatch").await + outcome("off", "match").await,
        0.0
    );
    let metrics = proxy.metrics().await;
    let diffs =
        |name| support::proxy::sample(&metrics, "abproxy_shadow_abs_diff_sum", &[("shadow", name)]);
    assert!(
        (diffs("off") - 10.0 * 0.25).abs() < 1e-9,
        "10 differences of 0.25"
    );
    assert_eq!(diffs("same"), 0.0);
    assert_eq!(
        support::proxy::sample(
            &metrics,
            "abproxy_shadow_abs_diff_count",
            &[("shadow", "same")]
        ),
        10.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_and_a_resetting_shadow_fail_no_primary_request_and_hold_bounded_memory() {
    let primary = Backend::start("primary").await;
    let blackhole = Backend::blackhole("blackhole").await;
    let resetting = Backend::resetting("resetting").await;
    let budget = "timeout = \"300ms\"\nmax_queue = 16\nmax_concurrency = 4";
    let shadows =
        shadow("blackhole", &blackhole, budget) + &shadow("resetting", &resetting, budget);
    let (_dir, mut child, client, admin) = spawn_process(&primary, &shadows);
    // 64 KiB bodies: 3000 of them kept for the shadows would be 190 MiB.
    let body = format!(r#"{{"pad":"{}"}}"#, "x".repeat(64 * 1024));
    client
        .post("/warm-up", body.clone())
        .user("warm-up")
        .send()
        .await;
    let before = rss_bytes(child.id());
    let requests = 3000;
    let mut tasks = Vec::new();
    for task in 0..8 {
        let (client, body) = (client.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..requests / 8 {
                let reply = client
                    .post("/predict", body.clone())
                    .user(&format!("u{task}-{n}"))
                    .send()
                    .await;
                assert_eq!(reply.status, 200, "a shadow failed a primary request");
                assert_eq!(reply.model(), "primary");
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    let growth = rss_bytes(child.id()).saturating_sub(before);
    assert!(
        growth < 48 << 20,
        "proxy memory grew by {} MiB",
        growth >> 20
    );

    let results = |name: &'static str| {
        let admin = admin.clone();
        async move {
            let metrics = admin.get("/metrics").send().await.text();
            ["ok", "error", "timeout", "dropped"].map(|result| {
                sample(
                    &metrics,
                    "abproxy_shadow_requests_total",
                    &[("shadow", name), ("result", result)],
                )
            })
        }
    };
    let total = f64::from(requests + 1);
    eventually(WAIT, || async {
        results("blackhole").await.iter().sum::<f64>() == total
    })
    .await;
    let [ok, _, timeout, dropped] = results("blackhole").await;
    assert_eq!(ok, 0.0);
    assert!(
        timeout > 0.0 && dropped > 0.0,
        "timeouts {timeout}, dropped {dropped}"
    );
    eventually(WAIT, || async {
        results("resetting").await.iter().sum::<f64>() == total
    })
    .await;
    let [ok, error, ..] = results("resetting").await;
    assert_eq!(ok, 0.0);
    assert!(error > 0.0);
    assert_eq!(primary.count(), requests as usize + 1);
    child.kill().expect("stop proxy");
    let _ = child.wait();
}

#[tokio::test]
async fn percent_10_mirrors_about_a_tenth_of_users_and_always_the_same_ones() {
    let primary = Backend::start("primary").await;
    let candidate = Backend::start("candidate").await;
    let config = format!(
        "{}{}",
        variants(&[("control", &primary, 100.0)]),
        shadow("candidate", &candidate, "percent = 10")
    );
    let proxy = Proxy::start(&config).await;
    let users: Vec<String> = (0..2000).map(|n| format!("user-{n}")).collect();
    for round in 0..2 {
        for user in &users {
            proxy
                .client
                .get(&format!("/?round={round}"))
                .user(user)
                .send()
                .await;
        }
    }
    let expected: HashSet<&str> = users
        .iter()
        .filter(|u| spec_bucket("candidate", u, 10_000) < 1000)
        .map(String::as_str)
        .collect();
    eventually(WAIT, || async { candidate.count() == expected.len() * 2 }).await;
    let mirrored: HashSet<String> = candidate
        .received()
        .iter()
        .map(|r| {
            r.headers["x-user-id"]
                .to_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        mirrored,
        expected
            .iter()
            .map(|u| u.to_string())
            .collect::<HashSet<_>>()
    );
    // 10 % of 2000 has a standard deviation of 13.4: allow five.
    assert!(
        (133..=267).contains(&mirrored.len()),
        "{} users mirrored",
        mirrored.len()
    );
}

#[tokio::test]
async fn the_log_has_one_json_line_per_mirrored_request_and_rotates() {
    let primary = Backend::predicting("primary", 0.5).await;
    let candidate = Backend::predicting("candidate", 0.6).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("shadow.jsonl");
    let extra = format!(
        "compare = \"/prediction\"\nlog = \"{}\"\nlog_max_size = \"16KiB\"\nlog_keep = 3\nlog_user_id = false",
        log.display()
    );
    let config = format!(
        "{}{}",
        variants(&[("control", &primary, 100.0)]),
        shadow("candidate", &candidate, &extra)
    );
    let proxy = Proxy::start(&config).await;
    let requests = 60;
    for n in 0..requests {
        proxy
            .client
            .post("/predict", format!(r#"{{"n":{n}}}"#))
            .user(&format!("user-{n}"))
            .send()
            .await;
    }
    eventually(WAIT, || async {
        proxy
            .metric(
                "abproxy_shadow_comparisons_total",
                &[("shadow", "candidate")],
            )
            .await
            == f64::from(requests)
    })
    .await;
    proxy.stop().await; // flushes the log

    let mut files = vec![log.clone()];
    files.extend(
        (1..=3)
            .map(|n| dir.path().join(format!("shadow.jsonl.{n}")))
            .filter(|p| p.exists()),
    );
    assert!(files.len() >= 2, "the log rotated at 16 KiB");
    assert!(!dir.path().join("shadow.jsonl.4").exists(), "log_keep = 3");
    let mut lines = Vec::new();
    for file in &files {
        assert!(std::fs::metadata(file).expect("log file").len() <= 16 * 1024);
        for line in std::fs::read_to_string(file).expect("read log").lines() {
            lines.push(serde_json::from_str::<serde_json::Value>(line).expect("each line is JSON"));
        }
    }
    // Rotation keeps the newest files; with 60 lines of ~700 bytes nothing has fallen off yet.
    assert_eq!(lines.len(), requests as usize);
    let line = &lines[0];
    assert_eq!(line["shadow"], "candidate");
    assert_eq!(line["variant"], "control");
    assert_eq!(line["primary"]["status"], 200);
    assert_eq!(line["shadow_answer"]["status"], 200);
    assert_eq!(line["compare"]["outcome"], "mismatch");
    assert_eq!(
        line["user_hash"].as_str().map(str::len),
        Some(64),
        "user IDs are hashed"
    );
    assert!(line.get("user_id").is_none());
    assert!(line["request_body"]
        .as_str()
        .unwrap_or_default()
        .starts_with("{\"n\":"));
}

#[tokio::test]
async fn shadows_show_in_status_and_come_and_go_with_reloads() {
    let primary = Backend::start("primary").await;
    let candidate = Backend::start("candidate").await;
    let proxy = Proxy::start(&variants(&[("control", &primary, 100.0)])).await;
    proxy.client.get("/").user("alice").send().await;
    assert_eq!(proxy.status().await["shadows"], serde_json::json!([]));

    let config = format!(
        "{}{}",
        variants(&[("control", &primary, 100.0)]),
        shadow("candidate", &candidate, "percent = 100")
    );
    proxy.edit_config(&config, Edit::Rename);
    proxy.wait_for_generation(2).await;
    assert_eq!(proxy.status().await["shadows"][0]["name"], "candidate");
    proxy.client.get("/").user("alice").send().await;
    eventually(WAIT, || async { candidate.count() == 1 }).await;

    proxy.edit_config(&variants(&[("control", &primary, 100.0)]), Edit::Rename);
    proxy.wait_for_generation(3).await;
    proxy.client.get("/").user("alice").send().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        candidate.count(),
        1,
        "a removed shadow gets no more traffic"
    );
}

#[tokio::test]
async fn a_chunked_body_is_not_buffered_for_a_shadow_and_counts_as_dropped() {
    let primary = Backend::start("primary").await;
    let candidate = Backend::start("candidate").await;
    let config = format!(
        "{}{}",
        variants(&[("control", &primary, 100.0)]),
        shadow("candidate", &candidate, "")
    );
    let proxy = Proxy::start(&config).await;
    // A raw HTTP/1.1 request with a chunked body: its length is unknown until it ends.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    stream
        .write_all(b"POST /p HTTP/1.1\r\nhost: x\r\nx-user-id: u\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(primary.received()[0].body, "hello");
    eventually(WAIT, || async {
        shadow_results(&proxy, "candidate").await[3] == 1.0
    })
    .await;
    assert_eq!(candidate.count(), 0);
}

#[tokio::test]
async fn a_shadow_gets_the_clients_path_under_its_own_prefix() {
    let primary = Backend::start("primary").await;
    let candidate = Backend::start("candidate").await;
    let config = format!(
        "[[variant]]\nname = \"control\"\nupstream = \"{}/primary-prefix\"\nweight = 100\n\n\
         [[shadow]]\nname = \"candidate\"\nupstream = \"{}/shadow-prefix\"\n",
        primary.url(),
        candidate.url()
    );
    let proxy = Proxy::start(&config).await;
    proxy.client.get("/predict?x=1").user("alice").send().await;
    eventually(WAIT, || async { candidate.count() == 1 }).await;
    assert_eq!(
        primary.received()[0].uri.to_string(),
        "/primary-prefix/predict?x=1"
    );
    assert_eq!(
        candidate.received()[0].uri.to_string(),
        "/shadow-prefix/predict?x=1"
    );
}

#[tokio::test]
async fn a_shadow_queue_holds_no_more_bytes_than_max_queue_bytes() {
    let primary = Backend::start("primary").await;
    let blackhole = Backend::blackhole("blackhole").await;
    let budget =
        "timeout = \"10s\"\nmax_queue = 1000\nmax_concurrency = 1\nmax_queue_bytes = \"64KiB\"";
    let config = format!(
        "{}{}",
        variants(&[("control", &primary, 100.0)]),
        shadow("blackhole", &blackhole, budget)
    );
    let proxy = Proxy::start(&config).await;
    let body = "x".repeat(20 * 1024);
    for n in 0..10 {
        let reply = proxy
            .client
            .post("/predict", body.clone())
            .user(&format!("u{n}"))
            .send()
            .await;
        assert_eq!(reply.status, 200);
    }
    // 21 KiB a mirror: one with the worker and two queued fit in 64 KiB; seven do not.
    assert_eq!(shadow_results(&proxy, "blackhole").await[3], 7.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_waiting_in_a_shadow_queue_hold_their_own_bytes_not_their_connections_buffers() {
    let primary = Backend::start("primary").await;
    let blackhole = Backend::blackhole("blackhole").await;
    // One mirror in flight that never ends; the rest wait in the queue for the whole test.
    let budget = "timeout = \"60s\"\nmax_queue = 4096\nmax_concurrency = 1";
    let (_dir, mut child, client, admin) =
        spawn_process(&primary, &shadow("blackhole", &blackhole, budget));
    client.get("/warm-up").user("warm-up").send().await;
    let before = rss_bytes(child.id());
    let requests = 4000;
    let mut tasks = Vec::new();
    for task in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..requests / 8 {
                let reply = client
                    .get(&format!("/predict?n={n}"))
                    .user(&format!("u{task}-{n}"))
                    .send()
                    .await;
                assert_eq!(reply.status, 200);
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    let metrics = admin.get("/metrics").send().await.text();
    let dropped = sample(
        &metrics,
        "abproxy_shadow_requests_total",
        &[("shadow", "blackhole"), ("result", "dropped")],
    );
    assert_eq!(dropped, 0.0, "every mirror is still queued or in flight");
    // A queued mirror that kept a slice of its connection's 8 KiB read buffer would pin
    // that whole buffer: 4000 of them, 31 MiB.
    let growth = rss_bytes(child.id()).saturating_sub(before);
    assert!(
        growth < 12 << 20,
        "4000 queued mirrors of bodiless requests took {} MiB",
        growth >> 20
    );
    child.kill().expect("stop proxy");
    let _ = child.wait();
}
