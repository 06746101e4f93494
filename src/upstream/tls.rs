//! TLS to upstreams (`https://`): whom to trust, which name to verify, which client
//! certificate to present. Built once when the config is loaded; every connection of the
//! upstream's pool shares it, and with it the session cache that resumes TLS sessions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The TLS settings of one `[[variant]]` or `[[shadow]]`, as the file gives them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificates to trust instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// The name to verify (and send as SNI) instead of the URL's host.
    pub server_name: Option<String>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// A ready TLS client for one upstream.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    /// The settings and a digest of the files' contents: a reload keeps the upstream's pool
    /// (and its warm connections) only when both are unchanged.
    identity: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.identity == other.identity
    }
}

impl Eq for ClientTls {}

impl std::hash::Hash for ClientTls {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.identity.hash(state);
    }
}

/// Why an upstream's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("{} holds no PEM private key", .0.display())]
    NoKey(PathBuf),
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{0:?} is not a valid server name for TLS")]
    ServerName(String),
    #[error("client_cert and client_key go together: set both or neither")]
    HalfIdentity,
    #[error(
        "no system root certificates were found (install the ca-certificates package, or set ca)"
    )]
    NoSystemRoots,
}

impl ClientTls {
    /// Loads the files `settings` names, for an upstream whose URL names `host`.
    /// `h2`: offer only HTTP/2 by ALPN; otherwise only HTTP/1.1.
    pub fn load(settings: &TlsSettings, host: &str, h2: bool) -> Result<ClientTls, TlsError> {
        if settings.client_cert.is_some() != settings.client_key.is_some() {
            return Err(TlsError::HalfIdentity);
        }
        let mut digest = Sha256::new();
        let roots = match &settings.ca {
            Some(path) => {
                let pem = read(path, &mut digest)?;
                let mut roots = RootCertStore::empty();
                for cert in certificates(path, &pem)? {
                    roots.add(cert).map_err(|err| TlsError::Invalid {
                        path: path.clone(),
                        reason: err.to_string(),
                    })?;
                }
                Arc::new(roots)
            }
            None => system_roots()?,
        };
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|err| TlsError::Invalid {
                    path: PathBuf::new(),
                    reason: err.to_string(),
                })?
                .with_root_certificates(roots);
        let mut config = match (&settings.client_cert, &settings.client_key) {
            (Some(cert_path), Some(key_path)) => {
                let chain = certificates(cert_path, &read(cert_path, &mut digest)?)?;
                let key_pem = read(key_path, &mut digest)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|_| TlsError::NoKey(key_path.clone()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|err| TlsError::Invalid {
                        path: key_path.clone(),
                        reason: format!("does not go with {}: {err}", cert_path.display()),
                    })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError::HalfIdentity),
        };
        // Saying which one lets a server that speaks both pick the one this pool speaks.
        config.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        let name = settings.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|_| TlsError::ServerName(name.to_owned()))?;
        digest.update(format!("{settings:?}|{name}|h2={h2}").as_bytes());
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            identity: crate::config::hex(&digest.finalize()),
        })
    }

    /// The TLS handshake on a connected stream.
    pub async fn connect(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.connector
            .connect(self.server_name.clone(), stream)
            .await
    }
}

fn read(path: &Path, digest: &mut Sha256) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    digest.update(&bytes);
    Ok(bytes)
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|err| TlsError::Invalid {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// The system's trusted roots, read once per process.
fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    let roots = ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "while reading the system's root certificates");
        }
        roots.add_parsable_certificates(found.certs);
        Arc::new(roots)
    });
    if roots.is_empty() {
        return Err(TlsError::NoSystemRoots);
    }
    Ok(roots.clone())
}

/// Whether an I/O error carries a TLS failure (a certificate refused, a protocol alert), which
/// the metrics report as its own kind.
pub fn is_tls_failure(io: &std::io::Error) -> bool {
    io.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
}
