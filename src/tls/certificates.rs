//! Certificate and key files, read, checked and indexed by server name.
//!
//! Every file a `[server.tls]` names is read in one go into [`Files`], so that a reload can
//! tell from one digest whether anything changed, and then parsed into a [`CertificateSet`]
//! that the handshake reads through [`Resolver`].

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, RootCertStore};
use sha2::{Digest, Sha256};

use crate::config::{self, CertificateFiles};

/// A certificate, key or CA file that cannot be used; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no PEM private key", path.display())]
    NoKey { path: PathBuf },
    #[error("{}: the private key is not usable: {source}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: the certificate cannot be parsed: {source}", path.display())]
    Certificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: the key does not belong to the certificate in {}", path.display(), cert.display())]
    Mismatch { path: PathBuf, cert: PathBuf },
    #[error("{}: not a usable CA certificate: {source}", path.display())]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

impl TlsError {
    /// The file at fault, so a config error can point at the key that names it.
    pub fn path(&self) -> &Path {
        match self {
            TlsError::Read { path, .. }
            | TlsError::Pem { path, .. }
            | TlsError::NoCertificate { path }
            | TlsError::NoKey { path }
            | TlsError::Key { path, .. }
            | TlsError::Certificate { path, .. }
            | TlsError::Mismatch { path, .. }
            | TlsError::ClientCa { path, .. } => path,
            TlsError::Setup(_) => Path::new(""),
        }
    }
}

/// Checks that `files` load and that the key belongs to the certificate.
pub fn check_pair(files: &CertificateFiles) -> Result<(), TlsError> {
    Pair::read(None, files)?.parse().map(drop)
}

/// Checks that `path` holds at least one usable CA certificate.
pub fn check_client_ca(path: &Path) -> Result<(), TlsError> {
    ClientCa::read(path, true)?.roots().map(drop)
}

/// Whether `name` can be an `[[server.tls.sni]]` name: a DNS name, or `*.` and one.
pub fn is_server_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.contains('*') && DnsName::try_from(name).is_ok()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The bytes of every file one `[server.tls]` names.
pub(super) struct Files {
    pairs: Vec<Pair>,
    client_ca: Option<ClientCa>,
    /// SHA-256 over their paths and bytes: equal digests, same certificates from the same
    /// files.
    pub digest: String,
}

struct Pair {
    /// `None` for the default certificate.
    server_name: Option<String>,
    files: CertificateFiles,
    cert: Vec<u8>,
    key: Vec<u8>,
}

pub(super) struct ClientCa {
    path: PathBuf,
    required: bool,
    pem: Vec<u8>,
}

impl Files {
    pub fn read(settings: &config::Tls) -> Result<Files, TlsError> {
        let mut pairs = vec![Pair::read(None, &settings.default)?];
        for sni in &settings.sni {
            pairs.push(Pair::read(Some(sni.name.clone()), &sni.files)?);
        }
        let client_ca = settings
            .client_auth
            .as_ref()
            .map(|auth| ClientCa::read(&auth.ca, auth.required))
            .transpose()?;
        let mut digest = Sha256::new();
        let mut add = |bytes: &[u8]| {
            digest.update((bytes.len() as u64).to_be_bytes());
            digest.update(bytes);
        };
        for pair in &pairs {
            add(pair.server_name.as_deref().unwrap_or_default().as_bytes());
            for (path, bytes) in [(&pair.files.cert, &pair.cert), (&pair.files.key, &pair.key)] {
                add(path.as_os_str().as_encoded_bytes());
                add(bytes);
            }
        }
        if let Some(ca) = &client_ca {
            add(&[u8::from(ca.required)]);
            add(ca.path.as_os_str().as_encoded_bytes());
            add(&ca.pem);
        }
        Ok(Files {
            pairs,
            client_ca,
            digest: config::hex(&digest.finalize()),
        })
    }

    /// Parses and checks every pair, and the CA certificates.
    pub fn parse(self) -> Result<Loaded, TlsError> {
        let mut default = None;
        let mut by_name = HashMap::new();
        let mut certificates = Vec::with_capacity(self.pairs.len());
        for pair in &self.pairs {
            let key = Arc::new(pair.parse()?);
            certificates.push(CertificateStatus::of(pair, &key));
            match &pair.server_name {
                None => default = Some(key),
                Some(name) => {
                    by_name.insert(name.clone(), key);
                }
            }
        }
        let default = default.ok_or_else(|| TlsError::Setup("no default certificate".into()))?;
        let client_auth = self
            .client_ca
            .map(|ca| {
                Ok::<_, TlsError>(ClientVerification {
                    roots: ca.roots()?,
                    required: ca.required,
                    digest: config::hex(&Sha256::digest(&ca.pem)),
                })
            })
            .transpose()?;
        Ok(Loaded {
            set: CertificateSet { default, by_name },
            client_auth,
            certificates,
            digest: self.digest,
        })
    }
}

impl Pair {
    fn read(server_name: Option<String>, files: &CertificateFiles) -> Result<Pair, TlsError> {
        Ok(Pair {
            server_name,
            cert: read(&files.cert)?,
            key: read(&files.key)?,
            files: files.clone(),
        })
    }

    fn parse(&self) -> Result<CertifiedKey, TlsError> {
        let (cert_path, key_path) = (&self.files.cert, &self.files.key);
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                path: cert_path.clone(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert_path.clone(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|source| match source {
            pem::Error::NoItemsFound => TlsError::NoKey {
                path: key_path.clone(),
            },
            source => TlsError::Pem {
                path: key_path.clone(),
                source,
            },
        })?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|source| {
            TlsError::Key {
                path: key_path.clone(),
                source,
            }
        })?;
        let certified = CertifiedKey::new(chain, key);
        match certified.keys_match() {
            // A key type that cannot tell its public half is taken on trust, as rustls does.
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
                Ok(certified)
            }
            Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::Mismatch {
                path: key_path.clone(),
                cert: cert_path.clone(),
            }),
            Err(source) => Err(TlsError::Certificate {
                path: cert_path.clone(),
                source,
            }),
        }
    }
}

impl ClientCa {
    fn read(path: &Path, required: bool) -> Result<ClientCa, TlsError> {
        Ok(ClientCa {
            path: path.to_path_buf(),
            required,
            pem: read(path)?,
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.pem) {
            let cert = cert.map_err(|source| TlsError::Pem {
                path: self.path.clone(),
                source,
            })?;
            roots.add(cert).map_err(|source| TlsError::ClientCa {
                path: self.path.clone(),
                source,
            })?;
        }
        if roots.is_empty() {
            return Err(TlsError::NoCertificate {
                path: self.path.clone(),
            });
        }
        Ok(Arc::new(roots))
    }
}

/// What one reload produced, ready to be swapped in.
pub(super) struct Loaded {
    pub set: CertificateSet,
    pub client_auth: Option<ClientVerification>,
    pub certificates: Vec<CertificateStatus>,
    pub digest: String,
}

/// The CA certificates client certificates are verified against.
pub(super) struct ClientVerification {
    pub roots: Arc<RootCertStore>,
    pub required: bool,
    /// Of the CA file: the verifier is rebuilt only when this or `required` changes.
    pub digest: String,
}

/// The certificates of one load: a default and those chosen by server name.
#[derive(Debug)]
pub(super) struct CertificateSet {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl CertificateSet {
    /// The certificate for a client that asked for `server_name`: an exact entry, else a
    /// wildcard entry for its parent domain, else the default.
    fn choose(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name.map(str::to_ascii_lowercase) else {
            return &self.default;
        };
        self.by_name
            .get(&name)
            .or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.by_name.get(&format!("*.{parent}"))
            })
            .unwrap_or(&self.default)
    }
}

/// Chooses each handshake's certificate from the set loaded last. A reload swaps the set;
/// handshakes under way and connections already open keep what they were given.
pub(super) struct Resolver {
    current: ArcSwap<CertificateSet>,
}

impl Resolver {
    pub fn new(set: CertificateSet) -> Resolver {
        Resolver {
            current: ArcSwap::from_pointee(set),
        }
    }

    pub fn swap(&self, set: CertificateSet) {
        self.current.store(Arc::new(set));
    }
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .load()
                .choose(client_hello.server_name())
                .clone(),
        )
    }
}

/// One loaded certificate as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertificateStatus {
    /// The `[[server.tls.sni]]` name; `null` for the default certificate.
    pub server_name: Option<String>,
    pub cert: String,
    pub key: String,
    /// SHA-256 of the leaf certificate (DER), as `openssl x509 -fingerprint -sha256` shows it.
    pub sha256: String,
    /// When the leaf certificate expires (RFC 3339), if its DER could be read for it.
    pub not_after: Option<String>,
}

impl CertificateStatus {
    fn of(pair: &Pair, key: &CertifiedKey) -> CertificateStatus {
        let leaf = key.cert.first().map(|der| der.as_ref()).unwrap_or_default();
        CertificateStatus {
            server_name: pair.server_name.clone(),
            cert: pair.files.cert.display().to_string(),
            key: pair.files.key.display().to_string(),
            sha256: config::hex(&Sha256::digest(leaf)),
            not_after: super::expiry::not_after(leaf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> (CertificateSet, Vec<Arc<CertifiedKey>>) {
        let key = |name: &str| {
            let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("cert");
            let der = PrivateKeyDer::try_from(cert.signing_key.serialize_der()).expect("key");
            let signing = rustls::crypto::ring::sign::any_supported_type(&der).expect("key");
            Arc::new(CertifiedKey::new(vec![cert.cert.der().clone()], signing))
        };
        let keys: Vec<_> = names.iter().map(|name| key(name)).collect();
        let by_name = names
            .iter()
            .zip(&keys)
            .skip(1)
            .map(|(name, key)| ((*name).to_owned(), key.clone()))
            .collect();
        let set = CertificateSet {
            default: keys[0].clone(),
            by_name,
        };
        (set, keys)
    }

    #[test]
    fn server_names_choose_exact_then_wildcard_then_default() {
        let (set, keys) = set(&["default.test", "a.test", "*.b.test"]);
        let chosen = |name| set.choose(name).cert[0].clone();
        assert_eq!(chosen(Some("a.test")), keys[1].cert[0]);
        assert_eq!(chosen(Some("A.Test")), keys[1].cert[0]);
        assert_eq!(chosen(Some("x.b.test")), keys[2].cert[0]);
        assert_eq!(chosen(Some("y.x.b.test")), keys[0].cert[0]);
        assert_eq!(chosen(Some("b.test")), keys[0].cert[0]);
        assert_eq!(chosen(Some("other.test")), keys[0].cert[0]);
        assert_eq!(chosen(None), keys[0].cert[0]);
    }

    #[test]
    fn server_names_are_dns_names_or_one_leading_wildcard() {
        assert!(is_server_name("api.example.com"));
        assert!(is_server_name("*.example.com"));
        assert!(!is_server_name("*.*.example.com"));
        assert!(!is_server_name("api.*.com"));
        assert!(!is_server_name("not a name"));
        assert!(!is_server_name(""));
    }
}
