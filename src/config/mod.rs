//! The config file: schema, validation with `file:line:column` errors, and loading.
//!
//! A `Config` is only ever built by `Config::parse`, so holding one means every rule of the
//! spec (weights, buckets, names, URLs, sources, sizes) has been checked.

mod error;
mod raw;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use sha2::{Digest, Sha256};

pub use error::{ConfigError, Location};

use crate::assign::{OnMissing, UserIdSource};
use crate::json_pointer::JsonPointer;
use crate::upstream::ClientTls;

/// One validated config file.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub limits: Limits,
    pub assignment: Assignment,
    /// In file order, which is bucket order.
    pub variants: Vec<Variant>,
    pub shadows: Vec<Shadow>,
    pub metrics: Metrics,
    pub canary: Option<Canary>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Response header naming the variant that answered.
    pub variant_header: HeaderName,
    /// Forward the client's `Host` header; when false, upstreams see their own authority.
    pub preserve_host: bool,
    /// Bearer token for state-changing admin calls, read from this file at each call so a
    /// rotated secret needs no restart; without it, those calls are taken from loopback only.
    pub admin_token_file: Option<PathBuf>,
    /// With `tls`: a second client address serving plain HTTP (and h2c), as `listen` would
    /// without TLS.
    pub listen_plain: Option<SocketAddr>,
    /// `[server.tls]`: `listen` terminates TLS.
    pub tls: Option<Tls>,
}

/// `[server.tls]`: the certificates `listen` presents, and what it asks of clients. Paths are
/// relative to the working directory; the files were readable and matched when validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// Presented when the client names no server, or one no `sni` entry has.
    pub default: CertificateFiles,
    pub sni: Vec<SniCertificate>,
    pub client_auth: Option<ClientAuth>,
    /// Time from accepting a connection to a finished handshake.
    pub handshake_timeout: Duration,
}

/// A certificate chain and its private key, each a PEM file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[[server.tls.sni]]`: the certificate for clients asking for `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCertificate {
    /// Lower case; `*.example.com` stands for any one label in front of `example.com`.
    pub name: String,
    pub files: CertificateFiles,
}

/// Client certificates (mTLS), verified against the CA certificates in `ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    pub ca: PathBuf,
    /// `client_auth = "required"`: a client without a certificate is refused; "optional": it
    /// is served, and one with a certificate must present a valid one.
    pub required: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Time allowed for a client to send a request's head (and the h2c preface), and by
    /// default for a TLS handshake.
    pub client_header_timeout: Duration,
    /// Largest request body abproxy will buffer (for a `json:` source or a shadow).
    pub max_body: u64,
    /// Time allowed for an upstream's response head, for any pause in its body, and for any
    /// pause of a client in reading its answer.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Requests in flight to one upstream at once, and so its connections; more wait their
    /// turn within `request_timeout`, so a burst of clients cannot open a connection each.
    pub max_upstream_connections: usize,
    /// HTTP/2 connections per `h2`/`h2c` upstream; its requests are multiplexed over them.
    pub h2_connections: usize,
    /// How long in-flight requests may run on after SIGTERM.
    pub shutdown_grace: Duration,
    /// How long a client may pause while sending its request body before it gets a 408.
    pub client_body_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub sources: Vec<UserIdSource>,
    pub salt: String,
    pub buckets: u32,
    pub on_missing: OnMissing,
    pub override_header: Option<HeaderName>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub name: String,
    pub upstream: Upstream,
    /// Percent of buckets, as written.
    pub weight: f64,
    /// `weight × buckets / 100`, checked to be whole.
    pub buckets: u32,
    /// The variant that serves this one's requests when they cannot be sent to its upstream.
    pub fallback: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Shadow {
    pub name: String,
    pub upstream: Upstream,
    /// Share of users mirrored, chosen by the user's hash salted with the shadow's name.
    pub percent: f64,
    pub timeout: Duration,
    pub max_queue: usize,
    /// Bytes of request and primary bodies the queue may hold: the bound on a shadow's
    /// memory, whatever the bodies' sizes.
    pub max_queue_bytes: u64,
    pub max_concurrency: usize,
    pub compare: Option<JsonPointer>,
    pub tolerance: f64,
    pub log: Option<PathBuf>,
    pub log_user_id: bool,
    pub log_body_bytes: usize,
    pub log_max_size: u64,
    pub log_keep: usize,
}

/// For scores in [0, 1], the usual output of a classifier's probability or a ranking model.
pub const DEFAULT_PREDICTION_BUCKETS: &[f64] =
    &[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0];

/// `[metrics]`: what abproxy reads out of the models' answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Tried in order on each successful answer; the first that names a value is the
    /// prediction. Empty: answers are not inspected.
    pub prediction: Vec<JsonPointer>,
    /// Upper bounds of the `abproxy_prediction` histogram.
    pub prediction_buckets: Vec<f64>,
    /// Bytes of an answer held for reading its prediction; longer answers are not read.
    pub prediction_max_bytes: usize,
    /// Distinct class labels with a series of their own; later ones count as `other`.
    pub prediction_classes: usize,
}

/// `[canary]`: the guard that judges the canary against its baseline, ramps and rolls back.
#[derive(Debug, Clone, PartialEq)]
pub struct Canary {
    pub variant: String,
    pub baseline: String,
    pub interval: Duration,
    /// Requests per arm per interval below which nothing is judged.
    pub min_requests: u64,
    pub failures_to_rollback: u32,
    /// Canary weights in percent, in order; empty: the file's weight, watched but not ramped.
    pub steps: Vec<f64>,
    pub analyses_per_step: u32,
    pub state_file: Option<PathBuf>,
    pub webhook: Option<http::Uri>,
    /// Where the two arms' figures come from.
    pub source: CanarySource,
    pub checks: Checks,
}

/// `[canary] source`: what the guard judges.
#[derive(Debug, Clone, PartialEq)]
pub enum CanarySource {
    /// What this replica's own request path recorded.
    Local,
    /// The whole fleet's metrics, read from a Prometheus server, so that every replica
    /// judges the same figures and reaches the same decision.
    Prometheus(PrometheusSource),
}

/// `source = "prometheus"` and its `prometheus_*` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrometheusSource {
    /// The server's base URL: `http://host:port` and an optional path prefix, without a
    /// trailing slash; `/api/v1/query` is appended.
    pub url: String,
    /// Bearer token for the queries, re-read at each query so a rotated secret needs no
    /// restart.
    pub token_file: Option<PathBuf>,
    /// Bound on each query, connection included.
    pub timeout: Duration,
    /// How long after an interval ends it is queried, so that the scrapes from before its
    /// end have landed in Prometheus and every replica reads the same samples.
    pub query_offset: Duration,
    /// Extra label matchers picking the fleet's series, normalized to
    /// `name="value",name=~"regex"`; empty: every series of the variants' names.
    pub selector: String,
}

/// `[canary.checks]`; a check left out is not made.
#[derive(Debug, Clone, PartialEq)]
pub struct Checks {
    pub max_error_rate: Option<f64>,
    pub max_error_rate_increase: Option<f64>,
    /// 1 − the false-rollback rate the statistical checks allow.
    pub confidence: f64,
    pub max_p99: Option<Duration>,
    pub max_p99_ratio: Option<f64>,
    /// A baseline p99 below this is read as this in the ratio, so that two fast arms a
    /// millisecond apart are not a "2×" regression.
    pub p99_floor: Duration,
    pub max_prediction_psi: Option<f64>,
    /// Predictions per arm per interval below which drift is not judged.
    pub min_predictions: u64,
    /// Sample-ratio mismatch alarm level; `None` turns the check off.
    pub srm_p_value: Option<f64>,
}

/// An upstream base URL: `http://host:port` or `https://host:port` with an optional path
/// prefix, and for `https://` the TLS client that reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Prepended to the client's path; empty or without a trailing slash.
    pub path_prefix: String,
    pub tls: Option<ClientTls>,
    pub protocol: Protocol,
    /// HTTP/2 connections the upstream's requests are multiplexed over (0 for HTTP/1.1).
    pub h2_connections: usize,
}

/// The HTTP version abproxy speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1, one request in flight per connection.
    Http1,
    /// HTTP/2 over TLS, negotiated by ALPN.
    H2,
    /// HTTP/2 over plain TCP with prior knowledge.
    H2c,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
            Protocol::H2c => "h2c",
        }
    }

    pub fn is_http2(self) -> bool {
        self != Protocol::Http1
    }
}

impl Upstream {
    /// The port to connect to: the URL's, or its scheme's.
    pub fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 })
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme, self.authority, self.path_prefix
        )
    }
}

/// A config together with the identity of the bytes it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// Hex SHA-256 of the file, shown in `/status` so operators can tell which file is live.
    pub sha256: String,
}

impl Config {
    /// Parses and validates `text`, naming `path` in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file: raw::File = toml::from_str(text).map_err(|err| {
            let location = match err.span() {
                Some(span) => Location::at(path, text, span.start),
                None => Location::file(path),
            };
            ConfigError::invalid(location, err.message().trim_end())
        })?;
        validate::Validator { path, text }.config(file)
    }

    /// Reads, hashes, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        ConfigFile::read(path)?.parse(path)
    }

    pub fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|variant| variant.name == name)
    }

    /// Gives the canary `percent` of the buckets, taking them from or giving them back to
    /// its baseline, its neighbour in bucket order: no other variant's users move, and users
    /// in the canary stay there while it grows. Validation guarantees the two are adjacent
    /// and that `percent` is a whole number of buckets within their combined weight.
    pub fn set_canary_weight(&mut self, percent: f64) {
        let Some(canary) = &self.canary else { return };
        let position = |name: &str| self.variants.iter().position(|v| v.name == name);
        let (Some(c), Some(b)) = (position(&canary.variant), position(&canary.baseline)) else {
            return;
        };
        let buckets = self.assignment.buckets;
        let pool = self.variants[c].buckets + self.variants[b].buckets;
        let wanted = percent_to_buckets(percent, buckets).min(pool);
        self.variants[c].buckets = wanted;
        self.variants[b].buckets = pool - wanted;
        for index in [c, b] {
            let variant = &mut self.variants[index];
            variant.weight = f64::from(variant.buckets) * 100.0 / f64::from(buckets);
        }
    }
}

/// The number of buckets `percent` stands for (validated to be whole).
pub(crate) fn percent_to_buckets(percent: f64, buckets: u32) -> u32 {
    (percent * f64::from(buckets) / 100.0).round() as u32
}

/// A config file's bytes, read but not yet parsed, so a reload can skip unchanged files and
/// name the revision it rejected.
#[derive(Debug)]
pub struct ConfigFile {
    pub bytes: Vec<u8>,
    pub sha256: String,
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let sha256 = hex(&Sha256::digest(&bytes));
        Ok(ConfigFile { bytes, sha256 })
    }

    pub fn parse(self, path: &Path) -> Result<Loaded, ConfigError> {
        let text = std::str::from_utf8(&self.bytes).map_err(|err| {
            // Placed at the first byte that is not UTF-8, like every error with a place.
            let valid = String::from_utf8_lossy(&self.bytes[..err.valid_up_to()]);
            let location = Location::at(path, &valid, valid.len());
            ConfigError::invalid(location, "config is not valid UTF-8")
        })?;
        let config = Config::parse(text, path)?;
        Ok(Loaded {
            config,
            sha256: self.sha256,
        })
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by tests/fuzz.rs (`config_files_of_any_bytes_load_or_fail_with_file_line_and_column`):
    /// this error alone named the file but no line.
    #[test]
    fn a_config_that_is_not_utf8_points_at_the_first_bad_byte() {
        let file = ConfigFile {
            bytes: b"[server]\nlisten = \"\xff\"\n".to_vec(),
            sha256: String::new(),
        };
        let err = file.parse(Path::new("test.toml")).expect_err("not UTF-8");
        assert_eq!(err.to_string(), "test.toml:2:11: config is not valid UTF-8");
    }
}
