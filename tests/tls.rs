//! TLS termination on `listen`: HTTP/1.1 and h2 by ALPN, SNI, TLS versions, client
//! certificates, certificate rotation under load, and handshakes that fail.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use support::proxy::eventually;
use support::tls::{tls_section, Issued, Pki, SecretVolume, TlsClient};
use support::{promtool_check, variants, Backend, Client, Edit, Proxy};

/// Control and treatment at 50 % each, so users land on both.
async fn split() -> (Backend, Backend, String) {
    let control = Backend::start("control").await;
    let treatment = Backend::start("treatment").await;
    let config = variants(&[("control", &control, 50.0), ("treatment", &treatment, 50.0)]);
    (control, treatment, config)
}

/// A proxy terminating TLS with `issued` as its default certificate.
async fn tls_proxy(pki: &Pki, issued: &Issued, more_tls: &str, config: &str) -> Proxy {
    let (cert, key) = pki.write_pair("server", issued);
    Proxy::start_with_server(&tls_section(&cert, &key, more_tls), config).await
}

async fn handshake_failures(proxy: &Proxy, reason: &str) -> f64 {
    proxy
        .metric(
            "abproxy_tls_handshake_failures_total",
            &[("reason", reason)],
        )
        .await
}

async fn certificate_reloads(proxy: &Proxy, result: &str) -> f64 {
    proxy
        .metric(
            "abproxy_tls_certificate_reloads_total",
            &[("result", result)],
        )
        .await
}

#[tokio::test]
async fn http1_and_h2_over_tls_reach_the_split_and_are_forwarded_as_https() {
    let (control, treatment, config) = split().await;
    let pki = Pki::new();
    let proxy = tls_proxy(&pki, &pki.server(&["localhost"]), "", &config).await;

    let mut http1 = TlsClient::new(&pki)
        .connect(proxy.addr, "localhost")
        .await
        .expect("handshake")
        .session()
        .await
        .expect("HTTP/1.1 session");
    assert!(!http1.is_h2(), "no ALPN offered: HTTP/1.1");
    let h2_tls = TlsClient::new(&pki)
        .offering_h2()
        .connect(proxy.addr, "localhost")
        .await
        .expect("handshake");
    assert_eq!(h2_tls.alpn().as_deref(), Some(&b"h2"[..]));
    let mut h2 = h2_tls.session().await.expect("h2 session");
    assert!(h2.is_h2());

    let mut seen = std::collections::HashSet::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        for session in [&mut http1, &mut h2] {
            let reply = session.get("/predict", user).await.expect("answered");
            assert_eq!(reply.status, 200);
            let variant = reply.variant().expect("x-variant").to_owned();
            assert_eq!(
                reply.model(),
                variant,
                "the variant named is the one that answered"
            );
            seen.insert(variant);
        }
    }
    assert_eq!(seen.len(), 2, "both variants served: {seen:?}");
    let forwarded: Vec<_> = [control.received(), treatment.received()]
        .concat()
        .iter()
        .map(|received| received.headers["x-forwarded-proto"].clone())
        .collect();
    assert!(
        forwarded.iter().all(|proto| proto == "https"),
        "{forwarded:?}"
    );
}

#[tokio::test]
async fn listen_plain_serves_plain_http_beside_tls() {
    let (control, treatment, config) = split().await;
    let pki = Pki::new();
    let (cert, key) = pki.write_pair("server", &pki.server(&["localhost"]));
    let server_keys = format!(
        "listen_plain = \"127.0.0.1:0\"\n{}",
        tls_section(&cert, &key, "")
    );
    let proxy = Proxy::start_with_server(&server_keys, &config).await;
    let plain = Client::new(proxy.plain_addr.expect("listen_plain is bound"));
    let reply = plain.get("/").user("user-1").send().await;
    assert_eq!(reply.status, 200);
    let backend = match reply.variant() {
        Some("control") => &control,
        _ => &treatment,
    };
    let (reply, _) = TlsClient::new(&pki)
        .get_once(proxy.addr, "localhost", "user-1")
        .await
        .expect("TLS still on listen");
    assert_eq!(reply.status, 200);
    // One user, one variant: the plain request then the TLS one, each saying how it came.
    let forwarded: Vec<_> = backend
        .received()
        .iter()
        .map(|received| received.headers["x-forwarded-proto"].clone())
        .collect();
    assert_eq!(forwarded, ["http", "https"]);
    let status = proxy.status().await;
    assert_eq!(
        status["listen_plain"],
        proxy.plain_addr.map(|a| a.to_string()).unwrap_or_default()
    );
}

#[tokio::test]
async fn sni_chooses_the_certificate_and_other_names_get_the_default() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let default = pki.server(&["*.abproxy.test", "localhost"]);
    let (a, b) = (pki.server(&["a.test"]), pki.server(&["b.test"]));
    let (a_cert, a_key) = pki.write_pair("a", &a);
    let (b_cert, b_key) = pki.write_pair("b", &b);
    let sni = format!(
        "[[server.tls.sni]]\nname = \"a.test\"\ncert = {a_cert:?}\nkey = {a_key:?}\n\
         [[server.tls.sni]]\nname = \"B.test\"\ncert = {b_cert:?}\nkey = {b_key:?}\n"
    );
    let proxy = tls_proxy(&pki, &default, &sni, &config).await;
    let client = TlsClient::new(&pki);
    for (name, expected) in [
        ("a.test", &a),
        ("b.test", &b),
        ("other.abproxy.test", &default),
        ("localhost", &default),
    ] {
        let (reply, presented) = client
            .get_once(proxy.addr, name, "alice")
            .await
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(reply.status, 200);
        assert!(presented == expected.der, "{name} got another certificate");
    }
    let status = proxy.status().await;
    let names: Vec<_> = status["tls"]["certificates"]
        .as_array()
        .expect("certificates listed")
        .iter()
        .map(|cert| cert["server_name"].clone())
        .collect();
    assert_eq!(
        names,
        [serde_json::Value::Null, "a.test".into(), "b.test".into()]
    );
    assert!(status["tls"]["certificates"][0]["not_after"].is_string());
}

#[tokio::test]
async fn curl_speaks_http1_and_h2_to_the_tls_port() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let proxy = tls_proxy(&pki, &pki.server(&["localhost"]), "", &config).await;
    let ca = pki.write("ca.pem", &pki.ca_pem());
    let port = proxy.addr.port();
    for (flag, status_line) in [("--http1.1", "HTTP/1.1 200"), ("--http2", "HTTP/2 200")] {
        let output = tokio::process::Command::new("curl")
            .args(["-sS", "-i", "--max-time", "10", flag, "--cacert"])
            .arg(&ca)
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args(["-H", "x-user-id: alice"])
            .arg(format!("https://localhost:{port}/predict"))
            .output()
            .await
            .expect("curl runs (bash .ci/run installs it)");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{flag}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.starts_with(status_line), "{flag}: {stdout}");
        assert!(stdout.contains("x-variant: "), "{flag}: {stdout}");
    }
}

/// A TLS 1.1 ClientHello, as a client that knows nothing newer sends it: no
/// supported_versions extension, legacy_version 3.2, two CBC suites.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend([7u8; 32]); // random
    body.push(0); // no session ID
    body.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // cipher suites
    body.extend([0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00];
    handshake.extend((body.len() as u16).to_be_bytes());
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// Reads until the server closes (or `limit` passes): what it sent, and when it closed.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (received, Some(started.elapsed())),
            Ok(Ok(read)) => received.extend_from_slice(&buf[..read]),
            Err(_) => return (received, None),
        }
    }
}

#[tokio::test]
async fn tls12_is_served_and_older_versions_are_refused() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let proxy = tls_proxy(&pki, &pki.server(&["localhost"]), "", &config).await;
    let tls12 = TlsClient::new(&pki).tls12_only();
    let (reply, _) = tls12
        .get_once(proxy.addr, "localhost", "alice")
        .await
        .expect("TLS 1.2 served");
    assert_eq!(reply.status, 200);

    let mut old = TcpStream::connect(proxy.addr).await.expect("connect");
    old.write_all(&tls11_client_hello()).await.expect("hello");
    let (answer, closed) = read_until_closed(&mut old, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "the connection is closed");
    // An alert record (content type 21) of level fatal.
    assert_eq!(answer.first(), Some(&21), "{answer:?}");
    assert_eq!(answer.get(5), Some(&2), "{answer:?}");
    eventually(Duration::from_secs(5), || async {
        handshake_failures(&proxy, "protocol_version").await == 1.0
    })
    .await;

    // OpenSSL's own TLS 1.1 (allowed client-side by security level 0).
    let output = tokio::process::Command::new("openssl")
        .args(["s_client", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
        .args(["-connect", &proxy.addr.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("openssl runs (bash .ci/run installs it)");
    assert!(!output.status.success(), "TLS 1.1 was accepted");
    eventually(Duration::from_secs(5), || async {
        handshake_failures(&proxy, "protocol_version").await == 2.0
    })
    .await;
}

#[tokio::test]
async fn client_certificates_are_required_when_a_client_ca_is_set() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let ca = pki.write("clients-ca.pem", &pki.ca_pem());
    let more = format!("client_ca = {ca:?}\n");
    let proxy = tls_proxy(&pki, &pki.server(&["localhost"]), &more, &config).await;

    let anonymous = TlsClient::new(&pki);
    let refused = anonymous.get_once(proxy.addr, "localhost", "alice").await;
    assert!(refused.is_err(), "served without a client certificate");
    eventually(Duration::from_secs(5), || async {
        handshake_failures(&proxy, "no_certificate").await == 1.0
    })
    .await;

    let stranger = Pki::new();
    let foreign = TlsClient::new(&pki).with_certificate(&stranger.client("mallory"));
    let refused = foreign.get_once(proxy.addr, "localhost", "alice").await;
    assert!(
        refused.is_err(),
        "served with a certificate from another CA"
    );
    eventually(Duration::from_secs(5), || async {
        handshake_failures(&proxy, "bad_certificate").await == 1.0
    })
    .await;

    let trusted = TlsClient::new(&pki).with_certificate(&pki.client("model-client"));
    let (reply, _) = trusted
        .get_once(proxy.addr, "localhost", "alice")
        .await
        .expect("a client signed by the CA is served");
    assert_eq!(reply.status, 200);
    assert_eq!(proxy.status().await["tls"]["client_auth"], "required");
}

#[tokio::test]
async fn optional_client_certificates_serve_anonymous_clients_too() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let ca = pki.write("clients-ca.pem", &pki.ca_pem());
    let more = format!("client_ca = {ca:?}\nclient_auth = \"optional\"\n");
    let proxy = tls_proxy(&pki, &pki.server(&["localhost"]), &more, &config).await;
    for client in [
        TlsClient::new(&pki),
        TlsClient::new(&pki).with_certificate(&pki.client("model-client")),
    ] {
        let (reply, _) = client
            .get_once(proxy.addr, "localhost", "alice")
            .await
            .expect("served");
        assert_eq!(reply.status, 200);
    }
}

/// Requests that go on while certificates rotate: each of one loop on a new connection (a
/// new handshake), and those of another on one keep-alive connection.
struct Load {
    stop: Arc<AtomicBool>,
    fresh: JoinHandle<(usize, Vec<String>)>,
    kept: JoinHandle<(usize, Vec<String>)>,
}

impl Load {
    async fn start(client: TlsClient, addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut session = client
            .connect(addr, "localhost")
            .await
            .expect("handshake")
            .session()
            .await
            .expect("session");
        let fresh = tokio::spawn({
            let stop = stop.clone();
            async move {
                let (mut done, mut failures) = (0, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    match client.get_once(addr, "localhost", "alice").await {
                        Ok((reply, _)) if reply.status == 200 => done += 1,
                        Ok((reply, _)) => failures.push(format!("status {}", reply.status)),
                        Err(err) => failures.push(err),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (done, failures)
            }
        });
        let kept = tokio::spawn({
            let stop = stop.clone();
            async move {
                let (mut done, mut failures) = (0, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    match session.get("/", "bob").await {
                        Ok(reply) if reply.status == 200 => done += 1,
                        Ok(reply) => failures.push(format!("status {}", reply.status)),
                        Err(err) => failures.push(err),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (done, failures)
            }
        });
        Load { stop, fresh, kept }
    }

    /// Stops both loops and asserts that every request of both was answered.
    async fn assert_no_failures(self) {
        self.stop.store(true, Ordering::SeqCst);
        for (what, task) in [("new connections", self.fresh), ("keep-alive", self.kept)] {
            let (done, failures) = task.await.expect("load task");
            assert!(failures.is_empty(), "{what}: {failures:?}");
            assert!(done > 0, "{what}: no request went through");
        }
    }
}

/// Waits until new handshakes present `expected`.
async fn wait_for_certificate(client: &TlsClient, addr: SocketAddr, expected: &Issued) {
    eventually(Duration::from_secs(10), || async {
        client
            .get_once(addr, "localhost", "alice")
            .await
            .is_ok_and(|(_, presented)| presented == expected.der)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_by_secret_symlink_swap_without_failing_a_request() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let first = pki.server(&["localhost"]);
    let volume = SecretVolume::new(&first);
    let proxy =
        Proxy::start_with_server(&tls_section(&volume.cert(), &volume.key(), ""), &config).await;
    let client = TlsClient::new(&pki);
    wait_for_certificate(&client, proxy.addr, &first).await;

    let load = Load::start(client.clone(), proxy.addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = pki.server(&["localhost"]);
    volume.swap(&second.cert_pem, &second.key_pem);
    wait_for_certificate(&client, proxy.addr, &second).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    load.assert_no_failures().await;

    assert_eq!(certificate_reloads(&proxy, "ok").await, 1.0);
    assert_eq!(certificate_reloads(&proxy, "error").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_by_in_place_write_without_failing_a_request() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let first = pki.server(&["localhost"]);
    let proxy = tls_proxy(&pki, &first, "", &config).await;
    let client = TlsClient::new(&pki);

    let load = Load::start(client.clone(), proxy.addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = pki.server(&["localhost"]);
    pki.write_pair("server", &second);
    wait_for_certificate(&client, proxy.addr, &second).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    load.assert_no_failures().await;

    assert_eq!(certificate_reloads(&proxy, "ok").await, 1.0);
    assert_eq!(certificate_reloads(&proxy, "error").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_pair_keeps_the_serving_certificate_and_is_reported() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let first = pki.server(&["localhost"]);
    let volume = SecretVolume::new(&first);
    let proxy =
        Proxy::start_with_server(&tls_section(&volume.cert(), &volume.key(), ""), &config).await;
    let client = TlsClient::new(&pki);
    let load = Load::start(client.clone(), proxy.addr).await;

    // A new certificate with the key of another.
    let (second, third) = (pki.server(&["localhost"]), pki.server(&["localhost"]));
    volume.swap(&second.cert_pem, &third.key_pem);
    eventually(Duration::from_secs(10), || async {
        certificate_reloads(&proxy, "error").await == 1.0
    })
    .await;
    let status = proxy.status().await;
    let error = status["tls"]["last_reload_error"]["error"].to_string();
    assert!(error.contains("does not belong"), "{error}");
    assert!(error.contains("tls.key"), "names the file: {error}");

    // Garbage.
    volume.swap("not a certificate", "not a key");
    eventually(Duration::from_secs(10), || async {
        certificate_reloads(&proxy, "error").await == 2.0
    })
    .await;
    let error = proxy.status().await["tls"]["last_reload_error"]["error"].to_string();
    assert!(error.contains("no PEM certificate"), "{error}");
    let (_, presented) = client
        .get_once(proxy.addr, "localhost", "alice")
        .await
        .expect("still served");
    assert!(presented == first.der, "the old certificate keeps serving");

    // A good pair again: served, and the error is cleared.
    volume.swap(&second.cert_pem, &second.key_pem);
    wait_for_certificate(&client, proxy.addr, &second).await;
    load.assert_no_failures().await;
    assert!(proxy.status().await["tls"]["last_reload_error"].is_null());
    assert_eq!(certificate_reloads(&proxy, "ok").await, 1.0);
}

#[tokio::test]
async fn a_config_reload_naming_other_certificate_files_loads_them() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let first = pki.server(&["localhost"]);
    let proxy = tls_proxy(&pki, &first, "", &config).await;
    let second = pki.server(&["localhost"]);
    let (cert, key) = pki.write_pair("renewed", &second);
    proxy.edit_config(
        &format!("{}{config}", tls_section(&cert, &key, "")),
        Edit::Rename,
    );
    proxy.wait_for_generation(2).await;
    wait_for_certificate(&TlsClient::new(&pki), proxy.addr, &second).await;
    let status = proxy.status().await;
    assert_eq!(
        status["tls"]["certificates"][0]["cert"],
        cert.display().to_string()
    );
    assert_eq!(status["restart_required"], serde_json::json!([]));
}

#[tokio::test]
async fn the_expiry_metric_follows_the_certificates_served_and_drops_one_a_reload_removed() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    // Dates after this year, so the certificates are valid whenever the test runs.
    let year: i32 = humantime::format_rfc3339(std::time::SystemTime::now()).to_string()[..4]
        .parse()
        .expect("a year");
    let default = pki.server_until(&["localhost"], (year + 2, 7, 31));
    let a = pki.server_until(&["a.test"], (year + 1, 1, 15));
    let (default_expiry, a_expiry) = (
        format!("{}-07-31T00:00:00Z", year + 2),
        format!("{}-01-15T00:00:00Z", year + 1),
    );
    let (a_cert, a_key) = pki.write_pair("a", &a);
    let sni =
        format!("[[server.tls.sni]]\nname = \"a.test\"\ncert = {a_cert:?}\nkey = {a_key:?}\n");
    let proxy = tls_proxy(&pki, &default, &sni, &config).await;
    let seconds = |rfc3339: &str| {
        let at = humantime::parse_rfc3339(rfc3339).expect("a date");
        at.duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as f64
    };
    let expiry = "abproxy_tls_certificate_expiry_timestamp_seconds";

    let metrics = proxy.metrics().await;
    assert_eq!(
        support::proxy::sample(&metrics, expiry, &[("server_name", "")]),
        seconds(&default_expiry),
        "{metrics}"
    );
    assert_eq!(
        support::proxy::sample(&metrics, expiry, &[("server_name", "a.test")]),
        seconds(&a_expiry)
    );
    let a_path = a_cert.display().to_string();
    assert_eq!(
        support::proxy::sample(&metrics, expiry, &[("cert", &a_path)]),
        seconds(&a_expiry)
    );
    promtool_check(&metrics);

    // The SNI certificate is dropped from the config: its series goes with it.
    let (cert, key) = pki.write_pair("server", &default);
    proxy.edit_config(
        &format!("{}{config}", tls_section(&cert, &key, "")),
        Edit::Rename,
    );
    proxy.wait_for_generation(2).await;
    eventually(Duration::from_secs(5), || async {
        let metrics = proxy.metrics().await;
        support::proxy::sample(&metrics, expiry, &[("server_name", "a.test")]) == 0.0
            && support::proxy::sample(&metrics, expiry, &[("server_name", "")])
                == seconds(&default_expiry)
    })
    .await;
}

#[tokio::test]
async fn turning_tls_off_by_reload_takes_a_restart_and_tls_keeps_serving() {
    let (control, treatment, config) = split().await;
    let pki = Pki::new();
    let proxy = tls_proxy(&pki, &pki.server(&["localhost"]), "", &config).await;
    let shifted = variants(&[("control", &control, 10.0), ("treatment", &treatment, 90.0)]);
    proxy.edit_config(&shifted, Edit::Rename);
    proxy.wait_for_generation(2).await;
    let status = proxy.status().await;
    assert!(
        status["restart_required"]
            .to_string()
            .contains("server.tls on -> off"),
        "{status}"
    );
    assert!(status["tls"]["certificates"].is_array());
    let (reply, _) = TlsClient::new(&pki)
        .get_once(proxy.addr, "localhost", "alice")
        .await
        .expect("TLS still served");
    assert_eq!(reply.status, 200);
    assert_eq!(proxy.weight("treatment").await, 90.0, "the rest applied");
}

#[tokio::test]
async fn bytes_that_are_not_a_tls_handshake_are_closed_within_the_timeout_and_counted() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let timeout = "handshake_timeout = \"300ms\"\n";
    let proxy = tls_proxy(&pki, &pki.server(&["localhost"]), timeout, &config).await;
    let limit = Duration::from_secs(3);

    let mut garbage = TcpStream::connect(proxy.addr).await.expect("connect");
    garbage
        .write_all(b"\x00\x01\x02\x03 this is not TLS \xff\xfe\r\n\r\n")
        .await
        .expect("write");
    let (_, closed) = read_until_closed(&mut garbage, limit).await;
    assert!(closed.is_some(), "garbage: left open");

    let mut plain = TcpStream::connect(proxy.addr).await.expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nx-user-id: alice\r\n\r\n")
        .await
        .expect("write");
    let (answer, closed) = read_until_closed(&mut plain, limit).await;
    assert!(closed.is_some(), "plain HTTP: left open");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400 ") && answer.contains("HTTPS"),
        "plain HTTP is told it reached the TLS port: {answer}"
    );
    assert!(
        !answer.contains("x-variant"),
        "plain HTTP reached no variant: {answer}"
    );

    let mut silent = TcpStream::connect(proxy.addr).await.expect("connect");
    let (_, closed) = read_until_closed(&mut silent, limit).await;
    let closed = closed.expect("silent: left open");
    assert!(
        closed >= Duration::from_millis(250),
        "closed after {closed:?}"
    );

    let mut hang_up = TcpStream::connect(proxy.addr).await.expect("connect");
    hang_up
        .write_all(&tls11_client_hello()[..20])
        .await
        .expect("write");
    hang_up.shutdown().await.expect("half-close");
    let (_, closed) = read_until_closed(&mut hang_up, limit).await;
    assert!(closed.is_some(), "half a hello: left open");

    eventually(Duration::from_secs(5), || async {
        handshake_failures(&proxy, "not_tls").await == 2.0
            && handshake_failures(&proxy, "timeout").await == 1.0
            && handshake_failures(&proxy, "closed").await == 1.0
    })
    .await;
    let metrics = proxy.metrics().await;
    assert_eq!(
        support::proxy::sample(&metrics, "abproxy_requests_total", &[]),
        0.0,
        "a failed handshake is no request"
    );
    promtool_check(&metrics);
    let (reply, _) = TlsClient::new(&pki)
        .get_once(proxy.addr, "localhost", "alice")
        .await
        .expect("still serving");
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn a_plain_http_client_keeping_the_tls_port_open_does_not_hold_up_shutdown() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let timeout = "handshake_timeout = \"20s\"\n";
    let proxy = tls_proxy(&pki, &pki.server(&["localhost"]), timeout, &config).await;
    let mut plain = TcpStream::connect(proxy.addr).await.expect("connect");
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("write");
    // The 400 arrives and abproxy ends its side; the client keeps its own open.
    let mut answer = [0; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut answer))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    assert!(answer[..read].starts_with(b"HTTP/1.1 400 "));
    eventually(Duration::from_secs(5), || async {
        handshake_failures(&proxy, "not_tls").await == 1.0
    })
    .await;
    let stopping = Instant::now();
    proxy.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} on the plain-HTTP client",
        stopping.elapsed()
    );
    drop(plain);
}

#[tokio::test]
async fn curl_sent_to_the_tls_port_over_plain_http_reads_a_400_that_says_so() {
    let (_control, _treatment, config) = split().await;
    let pki = Pki::new();
    let proxy = tls_proxy(&pki, &pki.server(&["localhost"]), "", &config).await;
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .args(["-H", "x-user-id: alice", "--data", "{\"x\":1}"])
        .arg(format!("http://{}/predict", proxy.addr))
        .output()
        .await
        .expect("curl runs (bash .ci/run installs it)");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "curl failed: {output:?}");
    assert!(printed.ends_with("\n400"), "{printed}");
    assert!(printed.contains("plain HTTP"), "{printed}");
    eventually(Duration::from_secs(5), || async {
        handshake_failures(&proxy, "not_tls").await == 1.0
    })
    .await;
}

#[tokio::test]
async fn an_h2_client_that_sends_no_request_is_closed_at_the_header_timeout() {
    use tokio::io::AsyncReadExt;
    let (control, _treatment, config) = split().await;
    let pki = Pki::new();
    let config = format!("[limits]\nclient_header_timeout = \"300ms\"\n\n{config}");
    let proxy = tls_proxy(&pki, &pki.server(&["localhost"]), "", &config).await;
    let mut tls = TlsClient::new(&pki)
        .offering_h2()
        .connect(proxy.addr, "localhost")
        .await
        .expect("handshake");
    assert_eq!(tls.alpn().as_deref(), Some(&b"h2"[..]));
    // No preface, no request: closed once the header timeout has passed.
    let started = std::time::Instant::now();
    let mut buf = [0; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while tls.stream.read(&mut buf).await.is_ok_and(|read| read > 0) {}
    })
    .await;
    assert!(closed.is_ok(), "still open after 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(control.count(), 0);
}
