//! Certificates made for one test (a CA, and server and client certificates it signs), the
//! files and Secret volumes they are written to, and a TLS client that tells which
//! certificate the proxy presented.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::client::Reply;

/// A test CA that signs server and client certificates.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    /// Where `write` puts files.
    pub dir: tempfile::TempDir,
}

/// One issued certificate and its key.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(DnType::CommonName, "abproxy test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        Pki {
            ca: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A server certificate for `names`.
    pub fn server(&self, names: &[&str]) -> Issued {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate naming `name`.
    pub fn client(&self, name: &str) -> Issued {
        self.issue(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A server certificate for `names` that expires at the start of `year`-`month`-`day`
    /// (UTC).
    pub fn server_until(&self, names: &[&str], (year, month, day): (i32, u8, u8)) -> Issued {
        self.issue_until(
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            Some((year, month, day)),
        )
    }

    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        self.issue_until(names, usage, None)
    }

    fn issue_until(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        until: Option<(i32, u8, u8)>,
    ) -> Issued {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![usage];
        if let Some((year, month, day)) = until {
            params.not_after = rcgen::date_time_ymd(year, month, day);
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("signed");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca.der().clone())
            .expect("CA is a trust anchor");
        roots
    }

    /// Writes `text` to `name` in this PKI's directory.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, text).expect("write PEM");
        path
    }

    /// Writes `issued` as `STEM.crt` and `STEM.key`.
    pub fn write_pair(&self, stem: &str, issued: &Issued) -> (PathBuf, PathBuf) {
        (
            self.write(&format!("{stem}.crt"), &issued.cert_pem),
            self.write(&format!("{stem}.key"), &issued.key_pem),
        )
    }
}

/// `[server.tls]` keys for a default certificate (and more lines after them).
pub fn tls_section(cert: &Path, key: &Path, more: &str) -> String {
    format!(
        "[server.tls]\ncert = {:?}\nkey = {:?}\n{more}\n",
        cert.display().to_string(),
        key.display().to_string()
    )
}

/// A Kubernetes Secret volume as cert-manager leaves it: `tls.crt -> ..data/tls.crt`,
/// `tls.key -> ..data/tls.key`, and `..data -> ..<revision>`, swapped whole on rotation.
pub struct SecretVolume {
    pub dir: tempfile::TempDir,
    revision: AtomicUsize,
}

impl SecretVolume {
    pub fn new(issued: &Issued) -> SecretVolume {
        let volume = SecretVolume {
            dir: tempfile::tempdir().expect("tempdir"),
            revision: AtomicUsize::new(0),
        };
        volume.swap(&issued.cert_pem, &issued.key_pem);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(
                Path::new("..data").join(name),
                volume.dir.path().join(name),
            )
            .expect("symlink");
        }
        volume
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }

    /// A new revision directory, then `..data` renamed over to it, then the old one removed.
    pub fn swap(&self, cert_pem: &str, key_pem: &str) {
        let revision = self.revision.fetch_add(1, Ordering::SeqCst);
        let name = format!("..2026_11_25_00_00_{revision:02}.000000001");
        let data_dir = self.dir.path().join(&name);
        fs::create_dir(&data_dir).expect("revision dir");
        fs::write(data_dir.join("tls.crt"), cert_pem).expect("write cert");
        fs::write(data_dir.join("tls.key"), key_pem).expect("write key");
        let temp_link = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(Path::new(&name), &temp_link).expect("symlink");
        let data = self.dir.path().join("..data");
        let previous = fs::read_link(&data).ok();
        fs::rename(&temp_link, &data).expect("swap ..data");
        if let Some(previous) = previous {
            fs::remove_dir_all(self.dir.path().join(previous)).expect("remove old revision");
        }
    }
}

/// A TLS client trusting the test CA.
#[derive(Clone)]
pub struct TlsClient {
    roots: Arc<RootCertStore>,
    alpn: Vec<Vec<u8>>,
    identity: Option<Issued>,
    tls12_only: bool,
}

impl TlsClient {
    pub fn new(pki: &Pki) -> TlsClient {
        TlsClient {
            roots: Arc::new(pki.roots()),
            alpn: Vec::new(),
            identity: None,
            tls12_only: false,
        }
    }

    /// Offers `h2` and `http/1.1` in ALPN, as browsers and curl do.
    pub fn offering_h2(mut self) -> TlsClient {
        self.alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        self
    }

    pub fn with_certificate(mut self, issued: &Issued) -> TlsClient {
        self.identity = Some(issued.clone());
        self
    }

    pub fn tls12_only(mut self) -> TlsClient {
        self.tls12_only = true;
        self
    }

    fn config(&self) -> ClientConfig {
        let versions: &[&rustls::SupportedProtocolVersion] = if self.tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .expect("versions")
                .with_root_certificates(self.roots.clone());
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some(issued) => {
                let key =
                    PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("client key");
                builder
                    .with_client_auth_cert(vec![issued.der.clone()], key)
                    .expect("client certificate")
            }
        };
        config.alpn_protocols = self.alpn.clone();
        config
    }

    /// Connects and completes a handshake asking for `server_name`.
    pub async fn connect(&self, addr: SocketAddr, server_name: &str) -> std::io::Result<Tls> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|err| std::io::Error::other(err.to_string()))?;
        let stream = TlsConnector::from(Arc::new(self.config()))
            .connect(name, tcp)
            .await?;
        Ok(Tls { stream })
    }

    /// One request on a new connection: the answer and the certificate presented.
    pub async fn get_once(
        &self,
        addr: SocketAddr,
        server_name: &str,
        user: &str,
    ) -> Result<(Reply, CertificateDer<'static>), String> {
        let tls = self
            .connect(addr, server_name)
            .await
            .map_err(|err| format!("handshake: {err}"))?;
        let certificate = tls.peer_certificate();
        let mut session = tls.session().await?;
        let reply = session.get("/", user).await?;
        Ok((reply, certificate))
    }
}

/// A finished client handshake.
pub struct Tls {
    pub stream: TlsStream<TcpStream>,
}

impl Tls {
    /// The leaf certificate the proxy presented.
    pub fn peer_certificate(&self) -> CertificateDer<'static> {
        self.stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .expect("the server presented a certificate")
            .clone()
            .into_owned()
    }

    /// The protocol ALPN settled on.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
    }

    /// An HTTP session on this connection: h2 if ALPN chose it, else HTTP/1.1.
    pub async fn session(self) -> Result<Session, String> {
        let h2 = self.alpn().as_deref() == Some(b"h2");
        let io = TokioIo::new(self.stream);
        let sender = if h2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|err| format!("h2 handshake: {err}"))?;
            tokio::spawn(connection);
            Sender::Http2(sender)
        } else {
            let (sender, connection) = http1::handshake(io)
                .await
                .map_err(|err| format!("http1 handshake: {err}"))?;
            tokio::spawn(connection);
            Sender::Http1(sender)
        };
        Ok(Session { sender })
    }
}

enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

/// Requests on one TLS connection, kept alive between them.
pub struct Session {
    sender: Sender,
}

impl Session {
    /// Whether this session speaks h2 (else HTTP/1.1).
    pub fn is_h2(&self) -> bool {
        matches!(self.sender, Sender::Http2(_))
    }

    pub async fn get(&mut self, path: &str, user: &str) -> Result<Reply, String> {
        let request = |uri: String| {
            Request::builder()
                .uri(uri)
                .header("x-user-id", user)
                .body(Full::new(Bytes::new()))
                .map_err(|err| err.to_string())
        };
        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                let mut request = request(path.to_owned())?;
                request
                    .headers_mut()
                    .insert("host", http::HeaderValue::from_static("abproxy.test"));
                sender.ready().await.map_err(|err| err.to_string())?;
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                let request = request(format!("https://abproxy.test{path}"))?;
                sender.ready().await.map_err(|err| err.to_string())?;
                sender.send_request(request).await
            }
        }
        .map_err(|err| format!("request: {err}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|err| err.to_string())?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}
