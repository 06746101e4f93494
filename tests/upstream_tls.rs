//! `https://` upstreams: a private CA, the name verified, a client certificate presented, TLS
//! sessions resumed, and a certificate refused counted as its own kind of failure.

mod support;

use std::time::Duration;

use support::pki::{Pki, TlsModel};
use support::proxy::eventually;
use support::{Backend, Proxy};

/// One `https://` variant; `keys` go beside its `upstream`.
fn https_variant(url: &str, keys: &str) -> String {
    format!("[[variant]]\nname = \"control\"\nupstream = \"{url}\"\nweight = 100\n{keys}\n")
}

fn path(path: &std::path::Path) -> String {
    format!("{:?}", path.display().to_string())
}

#[tokio::test]
async fn an_https_upstream_with_a_private_ca_answers_and_resumes_its_sessions() {
    let pki = Pki::new();
    let model = TlsModel::start("control", &pki.issue(&["localhost"]), None).await;
    let proxy = Proxy::start(&https_variant(
        &format!("https://localhost:{}", model.port),
        &format!("ca = {}", path(&pki.ca)),
    ))
    .await;

    for user in ["alice", "bob", "carol"] {
        let reply = proxy.client.get("/predict").user(user).send().await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.model(), "control");
    }
    // The model closes each connection after one answer: three handshakes, the later ones
    // resumed from the session the first left.
    let seen = model.handshakes();
    assert_eq!((seen.full, seen.resumed), (1, 2), "{seen:?}");
}

#[tokio::test]
async fn server_name_names_the_certificate_when_the_url_has_an_address() {
    let pki = Pki::new();
    let model = TlsModel::start("control", &pki.issue(&["model.internal"]), None).await;
    let url = format!("https://127.0.0.1:{}", model.port);
    let proxy = Proxy::start(&https_variant(
        &url,
        &format!("ca = {}\nserver_name = \"model.internal\"", path(&pki.ca)),
    ))
    .await;
    let reply = proxy.client.get("/predict").user("alice").send().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test]
async fn an_upstream_certificate_from_another_ca_is_a_tls_failure_and_a_502() {
    let (trusted, other) = (Pki::new(), Pki::new());
    let model = TlsModel::start("control", &other.issue(&["localhost"]), None).await;
    let proxy = Proxy::start(&https_variant(
        &format!("https://localhost:{}", model.port),
        &format!("ca = {}", path(&trusted.ca)),
    ))
    .await;
    let reply = proxy.client.get("/predict").user("alice").send().await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["kind"], "tls");
    assert!(reply.error().contains("certificate"), "{}", reply.error());
    assert_eq!(proxy.upstream_errors("control", "tls").await, 1.0);
    assert_eq!(proxy.upstream_errors("control", "connect").await, 0.0);
}

#[tokio::test]
async fn a_client_certificate_is_presented_to_an_upstream_that_requires_one() {
    let pki = Pki::new();
    let model = TlsModel::start("control", &pki.issue(&["localhost"]), Some(&pki.ca)).await;
    let url = format!("https://localhost:{}", model.port);
    let client = pki.issue(&["abproxy.internal"]);
    let proxy = Proxy::start(&https_variant(
        &url,
        &format!(
            "ca = {}\nclient_cert = {}\nclient_key = {}",
            path(&pki.ca),
            path(&client.cert),
            path(&client.key)
        ),
    ))
    .await;
    let reply = proxy.client.get("/predict").user("alice").send().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(model.handshakes().with_client_certificate, 1);

    // Without one, the upstream refuses the handshake: a TLS failure of the variant.
    let refused = Proxy::start(&https_variant(&url, &format!("ca = {}", path(&pki.ca)))).await;
    let reply = refused.client.get("/predict").user("alice").send().await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(refused.upstream_errors("control", "tls").await, 1.0);
}

#[tokio::test]
async fn shadows_reach_https_upstreams_too() {
    let pki = Pki::new();
    let control = Backend::start("control").await;
    let candidate = TlsModel::start("candidate", &pki.issue(&["localhost"]), None).await;
    let proxy = Proxy::start(&format!(
        "{}[[shadow]]\nname = \"candidate\"\nupstream = \"https://localhost:{}\"\nca = {}\n",
        support::variants(&[("control", &control, 100.0)]),
        candidate.port,
        path(&pki.ca)
    ))
    .await;
    proxy.client.get("/predict").user("alice").send().await;
    eventually(Duration::from_secs(5), || async {
        proxy
            .metric(
                "abproxy_shadow_requests_total",
                &[("shadow", "candidate"), ("result", "ok")],
            )
            .await
            == 1.0
    })
    .await;
}

#[tokio::test]
async fn an_h2_upstream_is_reached_over_http2_negotiated_by_alpn() {
    let pki = Pki::new();
    let model = TlsModel::start("model", &pki.issue(&["localhost"]), None).await;
    let proxy = Proxy::start(&https_variant(
        &format!("https://localhost:{}", model.port),
        &format!("protocol = \"h2\"\nca = {}", path(&pki.ca)),
    ))
    .await;
    for user in 0..20 {
        let reply = proxy
            .client
            .get("/")
            .user(&format!("user-{user}"))
            .send()
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.model(), "model");
    }
    let handshakes = model.handshakes();
    assert!(
        handshakes.full >= 1 && handshakes.full <= 2,
        "{handshakes:?}"
    );
    assert_eq!(
        handshakes.h2,
        handshakes.full + handshakes.resumed,
        "{handshakes:?}"
    );
}
