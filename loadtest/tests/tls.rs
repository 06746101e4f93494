//! Runs the load generator against an in-process TLS server (rustls, a certificate made by
//! rcgen) on 127.0.0.1 and checks what it reports against what the server saw: connections
//! accepted, handshakes completed, and what they negotiated.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use loadtest::{Budget, Mode, Options, Target, TlsVersion};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// What the server saw.
#[derive(Default)]
struct Seen {
    /// TCP connections accepted.
    accepted: AtomicU64,
    /// TLS handshakes completed.
    handshakes: AtomicU64,
    /// TLS handshakes that failed.
    failed_handshakes: AtomicU64,
    requests: AtomicU64,
}

/// A certificate for `localhost` and 127.0.0.1, its key, and the certificate's PEM in a file
/// for `--ca` (rcgen's certificate is not a CA, and rustls takes it as its own trust anchor).
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// `issuer` names the certificate (its subject, and so its issuer): rustls finds a trust anchor
/// by that name, so two identities must differ in it to be strangers to each other.
fn identity(issuer: &str) -> Identity {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, issuer);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("certificate");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, cert.pem()).expect("write the CA file");
    Identity {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key"),
        ca_file,
        _dir: dir,
    }
}

/// Starts an HTTPS server with `identity` on an ephemeral port, offering h2 and http/1.1 by
/// ALPN and TLS session resumption (tickets and a session cache: rustls's defaults), so a
/// client that never resumes shows it is the client's choice. It serves until the test's
/// runtime shuts down.
async fn start_server(identity: &Identity) -> (SocketAddr, Arc<Seen>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .expect("server certificate");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::ring::Ticketer::new().expect("ticketer");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound address");
    let seen = Arc::new(Seen::default());
    let server_seen = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            server_seen.accepted.fetch_add(1, Ordering::Relaxed);
            let seen = server_seen.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    seen.failed_handshakes.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                seen.handshakes.fetch_add(1, Ordering::Relaxed);
                let service = service_fn(move |request| answer(request, seen.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

async fn answer(
    _request: Request<Incoming>,
    seen: Arc<Seen>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    seen.requests.fetch_add(1, Ordering::Relaxed);
    Ok(Response::builder()
        .header("x-variant", "control")
        .body(Full::new(Bytes::from_static(b"{\"prediction\":0.5}")))
        .expect("static response"))
}

fn options(addr: SocketAddr, ca: &std::path::Path, requests: u64) -> Options {
    let url = format!("https://localhost:{}/predict", addr.port());
    let mut options = Options::new(Target::parse(&url).expect("URL"));
    options.tls.ca = Some(ca.to_path_buf());
    options.mode = Mode::Max;
    options.connections = 4;
    options.budget = Budget {
        requests: Some(requests),
        // A safety net: the runs below need well under a second.
        duration: Some(Duration::from_secs(20)),
    };
    options.timeout = Duration::from_secs(5);
    options.seed = 7;
    options
}

#[tokio::test]
async fn a_keep_alive_https_run_counts_its_answers_on_n_connections() {
    let identity = identity("loadtest test server");
    let (addr, seen) = start_server(&identity).await;
    let report = loadtest::run(options(addr, &identity.ca_file, 200))
        .await
        .expect("run");

    assert_eq!((report.requests, report.answers), (200, 200));
    assert_eq!(report.errors_total, 0, "{:?}", report.errors);
    assert_eq!(seen.requests.load(Ordering::Relaxed), 200);
    assert_eq!(seen.accepted.load(Ordering::Relaxed), 4, "one socket each");
    assert_eq!(report.connections_opened, 4);
    let tls = report.tls.as_ref().expect("an https run reports TLS");
    assert_eq!(tls.handshakes, 4);
    assert!(!tls.resumption);
    assert_eq!(tls.negotiated.len(), 1, "{:?}", tls.negotiated);
    let negotiated = &tls.negotiated[0].negotiated;
    assert_eq!(negotiated.version, "TLSv1.3");
    // The server offers h2 first; the client asked for HTTP/1.1 only.
    assert_eq!(negotiated.alpn.as_deref(), Some("http/1.1"));
    assert_eq!(negotiated.handshake, "full");
    assert!(report.to_string().contains("TLSv1.3"), "{report}");
    let json = serde_json::to_value(&report).expect("serializable");
    assert_eq!(json["tls"]["negotiated"][0]["version"], "TLSv1.3");
    assert_eq!(json["tls"]["negotiated"][0]["count"], 4);
}

#[tokio::test]
async fn new_connections_open_one_connection_and_one_full_handshake_per_request() {
    let identity = identity("loadtest test server");
    let (addr, seen) = start_server(&identity).await;
    let mut options = options(addr, &identity.ca_file, 60);
    options.new_connections = true;
    let report = loadtest::run(options).await.expect("run");

    assert_eq!((report.requests, report.answers), (60, 60));
    assert_eq!(report.errors_total, 0, "{:?}", report.errors);
    assert_eq!(seen.accepted.load(Ordering::Relaxed), 60);
    assert_eq!(seen.handshakes.load(Ordering::Relaxed), 60);
    assert_eq!(seen.requests.load(Ordering::Relaxed), 60);
    assert!(report.new_connections);
    assert_eq!(report.connections_opened, 60);
    let tls = report.tls.expect("an https run reports TLS");
    assert_eq!(tls.handshakes, 60);
    // The server hands out session tickets, but the client never offers one back.
    assert!(
        tls.negotiated
            .iter()
            .all(|n| n.negotiated.handshake == "full"),
        "{:?}",
        tls.negotiated
    );
}

#[tokio::test]
async fn with_resumption_offered_new_connections_resume_sessions() {
    let identity = identity("loadtest test server");
    let (addr, _seen) = start_server(&identity).await;
    let mut options = options(addr, &identity.ca_file, 40);
    options.new_connections = true;
    options.connections = 1;
    options.tls.resumption = true;
    let report = loadtest::run(options).await.expect("run");

    assert_eq!(report.answers, 40);
    let tls = report.tls.expect("an https run reports TLS");
    assert!(tls.resumption);
    let resumed: u64 = tls
        .negotiated
        .iter()
        .filter(|n| n.negotiated.handshake == "resumed")
        .map(|n| n.count)
        .sum();
    // The first connection has no ticket yet; the later ones have one from a predecessor.
    assert!(resumed >= 30, "{:?}", tls.negotiated);
}

#[tokio::test]
async fn the_offer_decides_version_and_cipher_suite() {
    let identity = identity("loadtest test server");
    let (addr, _seen) = start_server(&identity).await;

    let mut options = options(addr, &identity.ca_file, 20);
    options.tls.cipher_suites = vec![rustls::CipherSuite::TLS13_AES_128_GCM_SHA256];
    options.tls.groups = vec![rustls::NamedGroup::secp256r1];
    let report = loadtest::run(options).await.expect("run");
    let negotiated = &report.tls.expect("TLS").negotiated[0].negotiated;
    assert_eq!(
        (
            negotiated.version.as_str(),
            negotiated.cipher_suite.as_str(),
            negotiated.key_exchange.as_deref()
        ),
        ("TLSv1.3", "TLS_AES_128_GCM_SHA256", Some("secp256r1"))
    );

    let mut options = self::options(addr, &identity.ca_file, 20);
    options.tls.versions = vec![TlsVersion::Tls12];
    let report = loadtest::run(options).await.expect("run");
    assert_eq!(report.errors_total, 0, "{:?}", report.errors);
    let negotiated = &report.tls.expect("TLS").negotiated[0].negotiated;
    assert_eq!(negotiated.version, "TLSv1.2");
    // rcgen's key is ECDSA P-256.
    assert!(
        negotiated.cipher_suite.starts_with("TLS_ECDHE_ECDSA_WITH_"),
        "{negotiated:?}"
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_counted_as_tls_errors_with_the_reason() {
    let identity = identity("loadtest test server");
    let stranger = self::identity("a stranger");
    let (addr, seen) = start_server(&identity).await;
    let mut options = options(addr, &stranger.ca_file, 12);
    options.connections = 2;
    let report = loadtest::run(options)
        .await
        .expect("the run itself completes");

    assert_eq!(report.requests, 12);
    assert_eq!(report.answers, 0);
    assert_eq!(report.errors.tls, 12, "{:?}", report.errors);
    assert_eq!(report.errors.connect, 0);
    assert_eq!(report.errors_total, 12);
    assert_eq!(report.connections_opened, 0);
    assert_eq!(seen.requests.load(Ordering::Relaxed), 0);
    let tls = report.tls.as_ref().expect("TLS");
    assert_eq!(tls.handshakes, 0);
    let reason = tls.first_error.as_deref().expect("a reason");
    assert!(reason.contains("UnknownIssuer"), "{reason}");
    let table = report.to_string();
    assert!(table.contains("tls 12"), "{table}");
    assert!(table.contains("first failed handshake"), "{table}");
}

#[tokio::test]
async fn a_name_the_certificate_does_not_carry_is_refused() {
    let identity = identity("loadtest test server");
    let (addr, _seen) = start_server(&identity).await;
    let mut options = options(addr, &identity.ca_file, 4);
    options.connections = 1;
    options.tls.server_name = Some("other.test".to_owned());
    let report = loadtest::run(options).await.expect("run");
    assert_eq!(report.errors.tls, 4, "{:?}", report.errors);
    let reason = report.tls.and_then(|tls| tls.first_error).expect("reason");
    assert!(reason.contains("not valid for name"), "{reason}");
}

#[tokio::test]
async fn an_unreadable_ca_file_stops_the_run_before_it_starts() {
    let identity = identity("loadtest test server");
    let (addr, _seen) = start_server(&identity).await;
    let options = options(addr, std::path::Path::new("/nonexistent/ca.pem"), 4);
    let error = loadtest::run(options).await.expect_err("no CA");
    assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
}
