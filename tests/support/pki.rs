//! Certificates made for a test: a private CA, server certificates for chosen names, client
//! certificates, written as PEM files in a temp directory; and a model server behind TLS.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A private certificate authority and the files it signed.
pub struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate, for a `ca = ...` key.
    pub ca: PathBuf,
    issued: Mutex<usize>,
}

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut params = CertificateParams::new(Vec::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.pem()).expect("CA written");
        Pki {
            dir,
            issuer: Issuer::new(params, key),
            ca,
            issued: Mutex::new(0),
        }
    }

    /// A certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Identity {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let params = CertificateParams::new(names).expect("params");
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let serial = {
            let mut issued = self.issued.lock().expect("lock");
            *issued += 1;
            *issued
        };
        let identity = Identity {
            cert: self.dir.path().join(format!("cert-{serial}.pem")),
            key: self.dir.path().join(format!("key-{serial}.pem")),
        };
        std::fs::write(&identity.cert, cert.pem()).expect("certificate written");
        std::fs::write(&identity.key, key.serialize_pem()).expect("key written");
        identity
    }
}

/// What a TLS model server saw of its clients.
#[derive(Debug, Default, Clone)]
pub struct Handshakes {
    pub full: usize,
    pub resumed: usize,
    /// Clients that presented a certificate.
    pub with_client_certificate: usize,
    /// Connections on which ALPN chose HTTP/2.
    pub h2: usize,
}

/// A model server behind TLS that answers `{"model": NAME, "prediction": 0.5}`: over
/// HTTP/1.1 one request a connection, so that each request is a handshake; over HTTP/2 (which
/// it offers by ALPN beside HTTP/1.1) as many as the client sends.
pub struct TlsModel {
    pub port: u16,
    pub handshakes: Arc<Mutex<Handshakes>>,
    stop: CancellationToken,
}

impl TlsModel {
    /// Serves with `identity`; with `client_ca`, clients must present a certificate it signed.
    pub async fn start(name: &str, identity: &Identity, client_ca: Option<&PathBuf>) -> TlsModel {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
                    roots.add(cert.expect("CA certificate")).expect("root");
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&identity.cert)
            .expect("certificate file")
            .map(|cert| cert.expect("certificate"))
            .collect();
        let key = PrivateKeyDer::from_pem_file(&identity.key).expect("key");
        let mut config = builder.with_single_cert(chain, key).expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let handshakes = Arc::new(Mutex::new(Handshakes::default()));
        let stop = CancellationToken::new();
        let model = TlsModel {
            port,
            handshakes: handshakes.clone(),
            stop: stop.clone(),
        };
        let name = name.to_owned();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                    () = stop.cancelled() => return,
                };
                let (acceptor, handshakes, name) =
                    (acceptor.clone(), handshakes.clone(), name.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    {
                        let connection = stream.get_ref().1;
                        let mut seen = handshakes.lock().expect("lock");
                        match connection.handshake_kind() {
                            Some(rustls::HandshakeKind::Resumed) => seen.resumed += 1,
                            _ => seen.full += 1,
                        }
                        if connection.peer_certificates().is_some() {
                            seen.with_client_certificate += 1;
                        }
                        if connection.alpn_protocol() == Some(b"h2") {
                            seen.h2 += 1;
                        }
                    }
                    let service = service_fn(move |_request: Request<Incoming>| {
                        let body =
                            serde_json::json!({ "model": name, "prediction": 0.5 }).to_string();
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .expect("response"),
                            )
                        }
                    });
                    let mut builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    builder.http1().keep_alive(false);
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        model
    }

    pub fn handshakes(&self) -> Handshakes {
        self.handshakes.lock().expect("lock").clone()
    }
}

impl Drop for TlsModel {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
