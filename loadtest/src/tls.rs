//! TLS to an `https://` target: the client side of the proxy's TLS termination.
//!
//! rustls with the *ring* provider, as abproxy itself uses, so the load generator builds with a
//! C compiler alone. The client offers HTTP/1.1 by ALPN (the driver speaks nothing else), TLS
//! 1.3 and 1.2 unless told otherwise, and by default no session resumption: a new connection
//! is then always a full handshake, which is what `--new-connections` means to measure.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    CipherSuite, ClientConfig, ClientConnection, HandshakeKind, NamedGroup, ProtocolVersion,
    RootCertStore, SupportedProtocolVersion,
};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::options::OptionsError;

/// Sessions a client with resumption on remembers: one per server name is all a run needs.
const RESUMPTION_CACHE: usize = 64;

/// A TLS protocol version the client may offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    fn supported(self) -> &'static SupportedProtocolVersion {
        match self {
            TlsVersion::Tls12 => &rustls::version::TLS12,
            TlsVersion::Tls13 => &rustls::version::TLS13,
        }
    }

    /// `1.2`, `1.3`, also spelt `tls1.3` or `TLSv1.3` (OpenSSL's).
    pub fn parse(s: &str) -> Result<Self, OptionsError> {
        let lower = s.trim().to_ascii_lowercase();
        let number = lower
            .strip_prefix("tlsv")
            .or_else(|| lower.strip_prefix("tls"))
            .unwrap_or(&lower);
        match number {
            "1.2" => Ok(TlsVersion::Tls12),
            "1.3" => Ok(TlsVersion::Tls13),
            _ => Err(OptionsError::TlsVersion(s.to_owned())),
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::Tls12 => "TLSv1.2",
            TlsVersion::Tls13 => "TLSv1.3",
        })
    }
}

/// Parses a cipher suite the *ring* provider implements, by its IANA name (what OpenSSL and
/// h2load print: `TLS_AES_128_GCM_SHA256`) or by rustls's (`TLS13_AES_128_GCM_SHA256`),
/// in any case. A suite the provider lacks is refused here rather than silently never offered.
pub fn parse_cipher_suite(s: &str) -> Result<CipherSuite, OptionsError> {
    let wanted = s.trim().to_ascii_uppercase();
    rustls::crypto::ring::ALL_CIPHER_SUITES
        .iter()
        .map(|suite| suite.suite())
        .find(|suite| suite.as_str() == Some(&wanted) || iana_name(*suite) == wanted)
        .ok_or_else(|| OptionsError::TlsCipherSuite {
            name: s.to_owned(),
            known: rustls::crypto::ring::ALL_CIPHER_SUITES
                .iter()
                .map(|suite| iana_name(suite.suite()))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Parses a key exchange group the *ring* provider implements: `X25519`, `secp256r1` (also
/// `P-256`, `prime256v1`) or `secp384r1` (`P-384`), in any case.
pub fn parse_group(s: &str) -> Result<NamedGroup, OptionsError> {
    let lower = s.trim().to_ascii_lowercase();
    let canonical = match lower.as_str() {
        "p-256" | "p256" | "prime256v1" => "secp256r1",
        "p-384" | "p384" => "secp384r1",
        other => other,
    };
    rustls::crypto::ring::ALL_KX_GROUPS
        .iter()
        .map(|group| group.name())
        .find(|group| {
            group
                .as_str()
                .is_some_and(|name| name.eq_ignore_ascii_case(canonical))
        })
        .ok_or_else(|| OptionsError::TlsGroup {
            name: s.to_owned(),
            known: rustls::crypto::ring::ALL_KX_GROUPS
                .iter()
                .map(|group| group_name(group.name()))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The IANA name of a suite: TLS 1.3 suites are `TLS_…` there, rustls calls them `TLS13_…`.
fn iana_name(suite: CipherSuite) -> String {
    match suite.as_str() {
        Some(name) => match name.strip_prefix("TLS13_") {
            Some(rest) => format!("TLS_{rest}"),
            None => name.to_owned(),
        },
        None => format!("{suite:?}"),
    }
}

fn group_name(group: NamedGroup) -> String {
    group
        .as_str()
        .map_or_else(|| format!("{group:?}"), str::to_owned)
}

/// How the client speaks TLS to an `https://` target. The defaults offer what rustls offers
/// (TLS 1.3 and 1.2, its suites and groups in its order), trust the system's roots, and never
/// resume a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM certificates to trust instead of the system's roots (a test CA, or a self-signed
    /// certificate that is not itself a CA).
    pub ca: Option<PathBuf>,
    /// The name to send as SNI and verify the certificate against, instead of the URL's host.
    pub server_name: Option<String>,
    /// Versions offered; empty means TLS 1.3 and 1.2.
    pub versions: Vec<TlsVersion>,
    /// Cipher suites offered, in this order of preference; empty means rustls's defaults.
    /// A server that follows the client's order (rustls does) picks the first it supports, so
    /// comparing two servers fairly needs the same single suite offered to both.
    pub cipher_suites: Vec<CipherSuite>,
    /// Key exchange groups offered, the first with a key share; empty means rustls's defaults.
    pub groups: Vec<NamedGroup>,
    /// Resume sessions on new connections (TLS 1.3 tickets, TLS 1.2 IDs and tickets). Off by
    /// default: with it on, new connections after the first would be resumed handshakes, and
    /// a handshake rate would measure those instead of full ones.
    pub resumption: bool,
}

impl TlsOptions {
    /// Whether anything differs from the defaults (which an `http://` target ignores).
    pub fn is_default(&self) -> bool {
        *self == TlsOptions::default()
    }
}

/// TLS settings that cannot be used: a run that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: {reason}", path.display())]
    InvalidCertificate { path: PathBuf, reason: String },
    #[error(
        "no system root certificates were found (install the ca-certificates package, or pass --ca)"
    )]
    NoSystemRoots,
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("the TLS versions, cipher suites and groups asked for do not go together: {0}")]
    Config(rustls::Error),
}

/// A ready TLS client for the target: one config (and so one session cache, when resumption
/// is on) shared by every connection of the run.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Reads the files `options` names, for a target whose URL names `host`.
    pub fn new(options: &TlsOptions, host: &str) -> Result<Self, TlsSetupError> {
        let mut provider: CryptoProvider = rustls::crypto::ring::default_provider();
        if !options.cipher_suites.is_empty() {
            // In the order asked for, not the provider's.
            provider.cipher_suites = options
                .cipher_suites
                .iter()
                .filter_map(|wanted| {
                    rustls::crypto::ring::ALL_CIPHER_SUITES
                        .iter()
                        .find(|suite| suite.suite() == *wanted)
                        .copied()
                })
                .collect();
        }
        if !options.groups.is_empty() {
            provider.kx_groups = options
                .groups
                .iter()
                .filter_map(|wanted| {
                    rustls::crypto::ring::ALL_KX_GROUPS
                        .iter()
                        .find(|group| group.name() == *wanted)
                        .copied()
                })
                .collect();
        }
        let versions: Vec<&'static SupportedProtocolVersion> = if options.versions.is_empty() {
            vec![&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            options.versions.iter().map(|v| v.supported()).collect()
        };
        // Checked before the roots are read: a suite list that fits no version offered is an
        // error of the options, whatever the files hold.
        let builder = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&versions)
            .map_err(TlsSetupError::Config)?;
        let roots = match &options.ca {
            Some(path) => ca_roots(path)?,
            None => system_roots()?,
        };
        let mut config = builder.with_root_certificates(roots).with_no_client_auth();
        // The driver speaks HTTP/1.1 only; saying so keeps a server that prefers h2 from
        // picking it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = if options.resumption {
            Resumption::in_memory_sessions(RESUMPTION_CACHE)
        } else {
            Resumption::disabled()
        };
        let name = options.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|_| TlsSetupError::ServerName(name.to_owned()))?;
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The handshake on a connected socket.
    pub async fn connect(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.connector
            .connect(self.server_name.clone(), stream)
            .await
    }
}

fn ca_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsSetupError> {
    let pem = std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| TlsSetupError::InvalidCertificate {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|err| invalid(err.to_string()))?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate(path.to_path_buf()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|err| invalid(err.to_string()))?;
    }
    Ok(Arc::new(roots))
}

/// The system's trusted roots (rustls-native-certs, as abproxy's upstream TLS uses).
fn system_roots() -> Result<Arc<RootCertStore>, TlsSetupError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(TlsSetupError::NoSystemRoots);
    }
    Ok(Arc::new(roots))
}

/// What one handshake settled on, in the names OpenSSL, nginx and h2load print.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Negotiated {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    /// IANA name, e.g. `TLS_AES_128_GCM_SHA256`.
    pub cipher_suite: String,
    /// e.g. `X25519`, `secp256r1`.
    pub key_exchange: Option<String>,
    pub alpn: Option<String>,
    /// `full`, `full_hello_retry` (TLS 1.3, the server asked for another key share) or
    /// `resumed`.
    pub handshake: &'static str,
}

impl Negotiated {
    /// Read from a connection whose handshake is complete.
    pub fn of(connection: &ClientConnection) -> Self {
        let version = match connection.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            Some(other) => format!("{other:?}"),
            None => "?".to_owned(),
        };
        Negotiated {
            version,
            cipher_suite: connection
                .negotiated_cipher_suite()
                .map_or_else(|| "?".to_owned(), |suite| iana_name(suite.suite())),
            key_exchange: connection
                .negotiated_key_exchange_group()
                .map(|group| group_name(group.name())),
            alpn: connection
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            handshake: match connection.handshake_kind() {
                Some(HandshakeKind::Full) | None => "full",
                Some(HandshakeKind::FullWithHelloRetryRequest) => "full_hello_retry",
                Some(HandshakeKind::Resumed) => "resumed",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_in_the_usual_spellings() {
        for (s, v) in [
            ("1.3", TlsVersion::Tls13),
            ("TLSv1.3", TlsVersion::Tls13),
            ("tls1.2", TlsVersion::Tls12),
            (" 1.2 ", TlsVersion::Tls12),
        ] {
            assert_eq!(TlsVersion::parse(s), Ok(v), "{s}");
        }
        assert!(TlsVersion::parse("1.1").is_err());
        assert_eq!(TlsVersion::Tls13.to_string(), "TLSv1.3");
    }

    #[test]
    fn cipher_suites_parse_by_iana_or_rustls_name() {
        assert_eq!(
            parse_cipher_suite("TLS_AES_128_GCM_SHA256"),
            Ok(CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert_eq!(
            parse_cipher_suite("tls13_aes_256_gcm_sha384"),
            Ok(CipherSuite::TLS13_AES_256_GCM_SHA384)
        );
        assert_eq!(
            parse_cipher_suite("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
            Ok(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
        );
        let unknown = parse_cipher_suite("TLS_AES_128_CCM_SHA256")
            .expect_err("ring has no CCM")
            .to_string();
        assert!(unknown.contains("TLS_AES_128_GCM_SHA256"), "{unknown}");
    }

    #[test]
    fn groups_parse_with_openssl_aliases() {
        assert_eq!(parse_group("x25519"), Ok(NamedGroup::X25519));
        assert_eq!(parse_group("P-256"), Ok(NamedGroup::secp256r1));
        assert_eq!(parse_group("prime256v1"), Ok(NamedGroup::secp256r1));
        assert_eq!(parse_group("secp384r1"), Ok(NamedGroup::secp384r1));
        assert!(parse_group("X448").is_err());
    }

    #[test]
    fn a_missing_ca_file_or_one_without_certificates_is_a_setup_error() {
        let options = TlsOptions {
            ca: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..TlsOptions::default()
        };
        assert!(matches!(
            TlsClient::new(&options, "localhost"),
            Err(TlsSetupError::Read { .. })
        ));
    }

    #[test]
    fn suites_that_fit_no_version_offered_are_refused() {
        let options = TlsOptions {
            ca: Some(PathBuf::from("/nonexistent/ca.pem")),
            versions: vec![TlsVersion::Tls12],
            cipher_suites: vec![CipherSuite::TLS13_AES_128_GCM_SHA256],
            ..TlsOptions::default()
        };
        assert!(matches!(
            TlsClient::new(&options, "localhost"),
            Err(TlsSetupError::Config(_))
        ));
    }
}
