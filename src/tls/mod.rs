//! TLS termination on the client listener: certificates chosen by SNI, optional client
//! certificates, and certificate files re-read when they change.
//!
//! The `ServerConfig` is built once and keeps its session cache; certificates are swapped
//! under it through [`certificates::Resolver`], so a rotation touches no open connection and
//! a handshake under way finishes with the certificate it started with. Only a change of the
//! client CA (or of whether a client certificate is required) builds a new `ServerConfig`.

mod certificates;
mod expiry;
mod handshake;
mod watch;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

pub use certificates::{check_client_ca, check_pair, is_server_name, CertificateStatus, TlsError};
pub use handshake::HandshakeFailure;

use crate::config;
use crate::metrics::{Metrics, TlsMetrics};
use certificates::{ClientVerification, Files, Loaded, Resolver};

/// What `listen` negotiates: h2 first, as clients that speak both prefer it.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The TLS side of the client listener: the live certificates, the acceptor handshakes use,
/// and what `/status` says about them.
pub struct Terminator {
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    server_config: ArcSwap<ServerConfig>,
    state: Mutex<State>,
    metrics: TlsMetrics,
}

/// What is serving, and what went wrong last.
struct State {
    settings: config::Tls,
    /// Of every file's path and bytes: an event that changed nothing is not a reload.
    digest: String,
    /// `required` and the CA file's digest, when client certificates are asked for.
    client_auth: Option<(bool, String)>,
    /// The digest of the files last rejected, so the same bad bytes are counted once.
    rejected: Option<String>,
    status: TlsStatus,
}

/// What `/status` shows under `"tls"`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TlsStatus {
    pub certificates: Vec<CertificateStatus>,
    /// `"required"`, `"optional"`, or `null` when no client certificate is asked for.
    pub client_auth: Option<&'static str>,
    /// When the certificates serving now were loaded (RFC 3339).
    pub loaded_at: String,
    pub last_reload_error: Option<TlsReloadFailure>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TlsReloadFailure {
    pub error: String,
    pub at: String,
}

/// What one reload attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reloaded {
    Applied,
    Unchanged,
}

impl Terminator {
    /// Loads the certificates `settings` names.
    pub fn new(settings: &config::Tls, metrics: &Metrics) -> Result<Terminator, TlsError> {
        // Explicit rather than the process default, which nothing installs.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let files = Files::read(settings)?;
        let Loaded {
            set,
            client_auth,
            certificates,
            digest,
        } = files.parse()?;
        let resolver = Arc::new(Resolver::new(set));
        let server_config = server_config(&provider, &resolver, client_auth.as_ref())?;
        Ok(Terminator {
            provider,
            resolver,
            server_config: ArcSwap::from_pointee(server_config),
            state: Mutex::new(State {
                settings: settings.clone(),
                digest,
                client_auth: client_auth_key(client_auth.as_ref()),
                rejected: None,
                status: TlsStatus {
                    certificates,
                    client_auth: client_auth_mode(client_auth.as_ref()),
                    loaded_at: now(),
                    last_reload_error: None,
                },
            }),
            metrics: metrics.tls(),
        })
    }

    /// The acceptor for one new connection, with the certificates in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server_config.load_full())
    }

    /// Counts a handshake that did not finish.
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        self.metrics.handshake_failed(reason);
    }

    pub fn status(&self) -> TlsStatus {
        self.state().status.clone()
    }

    /// Appends `abproxy_tls_certificate_expiry_timestamp_seconds`, one series a certificate
    /// serving now (`server_name` empty for the default one), read at scrape time so that a
    /// certificate a reload dropped leaves no series behind to alert on.
    pub fn render_expiry(&self, out: &mut String) {
        let state = self.state();
        let series = state.status.certificates.iter().filter_map(|certificate| {
            let not_after = humantime::parse_rfc3339(certificate.not_after.as_deref()?).ok()?;
            let seconds = not_after
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs();
            let server_name = certificate.server_name.as_deref().unwrap_or("");
            Some((
                [
                    ("server_name", server_name),
                    ("cert", certificate.cert.as_str()),
                ],
                seconds as f64,
            ))
        });
        crate::metrics::render_gauges(
            out,
            "abproxy_tls_certificate_expiry_timestamp_seconds",
            "When each TLS certificate the listener serves expires (its notAfter), in seconds since the epoch; server_name is empty for the default certificate.",
            series,
        );
    }

    /// The settings the serving certificates were loaded from.
    pub fn settings(&self) -> config::Tls {
        self.state().settings.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the files `settings` names and swaps them in if they changed and are valid.
    /// A failure is returned, not yet reported: the caller may retry a half-written file.
    fn try_reload(&self, settings: &config::Tls) -> Result<Reloaded, (TlsError, Option<String>)> {
        let files = Files::read(settings).map_err(|err| (err, None))?;
        {
            let mut state = self.state();
            if files.digest == state.digest {
                // What is serving (perhaps with another handshake_timeout, which the listener
                // reads from the live config): an earlier failure no longer applies.
                state.settings = settings.clone();
                state.status.last_reload_error = None;
                state.rejected = None;
                return Ok(Reloaded::Unchanged);
            }
            if state.rejected.as_deref() == Some(files.digest.as_str()) {
                return Ok(Reloaded::Unchanged);
            }
        }
        let digest = files.digest.clone();
        let loaded = files.parse().map_err(|err| (err, Some(digest.clone())))?;
        let client_auth = client_auth_key(loaded.client_auth.as_ref());
        let mut state = self.state();
        if client_auth != state.client_auth {
            let rebuilt =
                server_config(&self.provider, &self.resolver, loaded.client_auth.as_ref())
                    .map_err(|err| (err, Some(digest.clone())))?;
            self.server_config.store(Arc::new(rebuilt));
        }
        self.resolver.swap(loaded.set);
        state.settings = settings.clone();
        state.digest = loaded.digest;
        state.client_auth = client_auth;
        state.rejected = None;
        state.status = TlsStatus {
            certificates: loaded.certificates,
            client_auth: client_auth_mode(loaded.client_auth.as_ref()),
            loaded_at: now(),
            last_reload_error: None,
        };
        self.metrics.reloads_ok.increment(1);
        let fingerprints: Vec<&str> = state
            .status
            .certificates
            .iter()
            .map(|cert| &cert.sha256[..16])
            .collect();
        tracing::info!(certificates = ?fingerprints, "TLS certificates reloaded");
        Ok(Reloaded::Applied)
    }

    /// Reports a reload that failed for good: the certificates serving stay.
    fn reject(&self, (error, digest): (TlsError, Option<String>)) {
        tracing::error!(%error, "TLS certificates rejected; still serving the previous ones");
        self.metrics.reloads_error.increment(1);
        let mut state = self.state();
        state.rejected = digest;
        state.status.last_reload_error = Some(TlsReloadFailure {
            error: error.to_string(),
            at: now(),
        });
    }
}

fn server_config(
    provider: &Arc<CryptoProvider>,
    resolver: &Arc<Resolver>,
    client_auth: Option<&ClientVerification>,
) -> Result<ServerConfig, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|err| TlsError::Setup(err.to_string()))?;
    let builder = match client_auth {
        None => builder.with_no_client_auth(),
        Some(client_auth) => {
            let mut verifier = WebPkiClientVerifier::builder_with_provider(
                client_auth.roots.clone(),
                provider.clone(),
            );
            if !client_auth.required {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|err| TlsError::Setup(err.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = ALPN.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(config)
}

fn client_auth_key(client_auth: Option<&ClientVerification>) -> Option<(bool, String)> {
    client_auth.map(|auth| (auth.required, auth.digest.clone()))
}

fn client_auth_mode(client_auth: Option<&ClientVerification>) -> Option<&'static str> {
    client_auth.map(|auth| {
        if auth.required {
            "required"
        } else {
            "optional"
        }
    })
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}
