//! Who gets which variant: the split, each user-ID source, `on_missing` and the override.

mod support;

use std::collections::HashMap;

use support::{spec_bucket, variants, Backend, Proxy};

async fn control_and_treatment(assignment: &str) -> (Proxy, Backend, Backend) {
    let control = Backend::start("control").await;
    let treatment = Backend::start("treatment").await;
    let config = format!(
        "{assignment}\n{}",
        variants(&[("control", &control, 80.0), ("treatment", &treatment, 20.0)])
    );
    (Proxy::start(&config).await, control, treatment)
}

fn expected_variant(user: &str) -> &'static str {
    if spec_bucket("", user, 100) < 80 {
        "control"
    } else {
        "treatment"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_users_are_split_by_the_spec_rule_and_served_by_their_variant() {
    let (proxy, _control, _treatment) = control_and_treatment("").await;
    let users: Vec<String> = (0..10_000).map(|n| format!("user-{n}")).collect();
    let mut tasks = Vec::new();
    for chunk in users.chunks(625) {
        let (client, chunk) = (proxy.client.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut served = HashMap::<&'static str, usize>::new();
            for user in &chunk {
                let reply = client.get("/predict").user(user).send().await;
                assert_eq!(reply.status, 200);
                let variant = reply.variant().expect("variant header");
                assert_eq!(
                    reply.model(),
                    variant,
                    "{user} answered by another backend than named"
                );
                assert_eq!(
                    variant,
                    expected_variant(user),
                    "{user} assigned against the spec rule"
                );
                *served.entry(expected_variant(user)).or_default() += 1;
            }
            served
        }));
    }
    let mut treatment = 0;
    for task in tasks {
        treatment += task
            .await
            .expect("client task")
            .get("treatment")
            .copied()
            .unwrap_or(0);
    }
    // 20 % of 10,000 has a standard deviation of 40: allow five.
    assert!(
        (1800..=2200).contains(&treatment),
        "treatment got {treatment} of 10000"
    );
}

#[tokio::test]
async fn a_salted_10000_bucket_split_follows_the_spec_rule() {
    let control = Backend::start("control").await;
    let canary = Backend::start("canary").await;
    let config = format!(
        "[assignment]\nsalt = \"exp-7\"\nbuckets = 10000\n{}",
        variants(&[("control", &control, 99.5), ("canary", &canary, 0.5)])
    );
    let proxy = Proxy::start(&config).await;
    for n in 0..400 {
        let user = format!("u{n}");
        let expected = if spec_bucket("exp-7", &user, 10_000) < 9950 {
            "control"
        } else {
            "canary"
        };
        assert_eq!(
            proxy.client.get("/").user(&user).send().await.variant(),
            Some(expected)
        );
    }
}

#[tokio::test]
async fn each_source_kind_finds_the_user_id() {
    let (proxy, _control, _treatment) =
        control_and_treatment("[assignment]\nsources = [\"header:x-user-id\", \"cookie:uid\", \"query:uid\", \"json:/user/id\"]").await;
    let client = &proxy.client;
    for user in ["alice", "user-2", "bob", "user-5"] {
        let expected = Some(expected_variant(user));
        let reply = client.get("/").user(user).send().await;
        assert_eq!(
            (reply.status.as_u16(), reply.variant()),
            (200, expected),
            "header"
        );
        assert_eq!(
            client
                .get("/")
                .header("cookie", &format!("a=1; uid=\"{user}\""))
                .send()
                .await
                .variant(),
            expected,
            "cookie"
        );
        assert_eq!(
            client
                .get(&format!("/p?x=1&uid={user}"))
                .send()
                .await
                .variant(),
            expected,
            "query"
        );
        let body = format!(r#"{{"user":{{"id":"{user}"}},"features":[1,2,3]}}"#);
        assert_eq!(
            client.post("/", body).send().await.variant(),
            expected,
            "json"
        );
    }
}

#[tokio::test]
async fn the_first_source_present_wins() {
    let (proxy, _control, _treatment) =
        control_and_treatment("[assignment]\nsources = [\"header:x-user-id\", \"query:uid\"]")
            .await;
    // alice is control, user-2 is treatment: the header decides.
    let reply = proxy.client.get("/?uid=user-2").user("alice").send().await;
    assert_eq!(reply.variant(), Some("control"));
}

#[tokio::test]
async fn a_malformed_json_body_falls_through_to_the_next_source() {
    let (proxy, control, _treatment) =
        control_and_treatment("[assignment]\nsources = [\"json:/user_id\", \"header:x-user-id\"]")
            .await;
    let reply = proxy
        .client
        .post("/predict", "{not json")
        .user("user-2")
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.variant(), Some("treatment"));
    let reply = proxy
        .client
        .post("/predict", "{not json")
        .user("alice")
        .send()
        .await;
    assert_eq!(reply.variant(), Some("control"));
    assert_eq!(
        control.received()[0].body,
        "{not json",
        "the buffered body is forwarded intact"
    );
}

#[tokio::test]
async fn a_json_body_over_max_body_is_refused_with_413() {
    let (proxy, control, treatment) = control_and_treatment(
        "[limits]\nmax_body = 1024\n[assignment]\nsources = [\"json:/user_id\"]",
    )
    .await;
    let body = format!(r#"{{"user_id":"alice","pad":"{}"}}"#, "x".repeat(2000));
    let reply = proxy.client.post("/predict", body).send().await;
    assert_eq!(reply.status, 413);
    assert!(reply.error().contains("1024"));
    assert_eq!(control.count() + treatment.count(), 0);
    assert_eq!(proxy.requests("none", "413").await, 1.0);
}

#[tokio::test]
async fn missing_user_ids_get_a_random_variant_by_default() {
    let (proxy, _control, _treatment) = control_and_treatment("").await;
    let mut seen = HashMap::<String, usize>::new();
    for _ in 0..200 {
        let reply = proxy.client.get("/").send().await;
        *seen
            .entry(reply.variant().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    // P(no treatment in 200 draws at 20 %) is about 4e-20.
    assert!(seen.get("control").copied().unwrap_or(0) > 100, "{seen:?}");
    assert!(seen.get("treatment").copied().unwrap_or(0) > 0, "{seen:?}");
}

#[tokio::test]
async fn missing_user_ids_go_to_the_first_variant_with_on_missing_first() {
    let (proxy, _control, _treatment) =
        control_and_treatment("[assignment]\non_missing = \"first\"").await;
    for _ in 0..50 {
        assert_eq!(
            proxy.client.get("/").send().await.variant(),
            Some("control")
        );
    }
}

#[tokio::test]
async fn missing_user_ids_are_rejected_with_on_missing_reject() {
    let (proxy, control, treatment) =
        control_and_treatment("[assignment]\non_missing = \"reject\"").await;
    let reply = proxy.client.get("/").send().await;
    assert_eq!(reply.status, 400);
    assert!(reply.error().contains("header:x-user-id"));
    assert_eq!(control.count() + treatment.count(), 0);
    assert_eq!(proxy.requests("none", "400").await, 1.0);
}

#[tokio::test]
async fn the_override_header_forces_a_variant_and_rejects_unknown_names() {
    let (proxy, _control, _treatment) =
        control_and_treatment("[assignment]\noverride_header = \"x-force-variant\"").await;
    let forced = proxy
        .client
        .get("/")
        .user("alice")
        .header("x-force-variant", "treatment")
        .send()
        .await;
    assert_eq!(forced.variant(), Some("treatment"));
    assert_eq!(forced.model(), "treatment", "{}", forced.text());
    let unknown = proxy
        .client
        .get("/")
        .user("alice")
        .header("x-force-variant", "nope")
        .send()
        .await;
    assert_eq!(unknown.status, 400);
}

#[tokio::test]
async fn the_override_header_is_ignored_unless_configured() {
    let (proxy, _control, _treatment) = control_and_treatment("").await;
    let reply = proxy
        .client
        .get("/")
        .user("alice")
        .header("x-force-variant", "treatment")
        .send()
        .await;
    assert_eq!(reply.variant(), Some("control"));
}

#[tokio::test]
async fn a_user_id_in_a_header_spares_a_large_body_from_the_json_source() {
    let (proxy, control, _treatment) = control_and_treatment(
        "[limits]\nmax_body = 1024\n[assignment]\nsources = [\"header:x-user-id\", \"json:/user_id\"]",
    )
    .await;
    let body = format!(r#"{{"user_id":"user-2","pad":"{}"}}"#, "x".repeat(4096));
    let reply = proxy
        .client
        .post("/predict", body.clone())
        .user("alice")
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.variant(), Some("control"), "the header decided");
    assert_eq!(
        control.received()[0].body,
        body,
        "the body streamed through whole"
    );
}
