//! The file as written: serde types that mirror the TOML, with spans kept for error messages.
//!
//! Nothing here is validated beyond TOML types; `super::validate` turns it into a `Config`.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub assignment: Assignment,
    #[serde(default, rename = "variant")]
    pub variants: Vec<Spanned<Variant>>,
    #[serde(default, rename = "shadow")]
    pub shadows: Vec<Spanned<Shadow>>,
    #[serde(default)]
    pub metrics: Metrics,
    pub canary: Option<Spanned<Canary>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Server {
    pub listen: Option<Spanned<String>>,
    pub admin: Option<Spanned<String>>,
    pub variant_header: Option<Spanned<String>>,
    pub preserve_host: Option<bool>,
    pub admin_token_file: Option<Spanned<String>>,
    pub tls: Option<Spanned<Tls>>,
    pub listen_plain: Option<Spanned<String>>,
}

/// `[server.tls]`. `cert` and `key` are optional here only so that a missing one gets a
/// message of ours, pointing at the table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Tls {
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub handshake_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub sni: Vec<Spanned<Sni>>,
}

/// `[[server.tls.sni]]`: a certificate for clients that ask for `name`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Sni {
    pub name: Spanned<String>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Limits {
    pub client_header_timeout: Option<Spanned<String>>,
    pub max_body: Option<Spanned<Size>>,
    pub request_timeout: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub max_upstream_connections: Option<Spanned<i64>>,
    pub h2_connections: Option<Spanned<i64>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub client_body_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Assignment {
    pub sources: Option<Vec<Spanned<String>>>,
    pub salt: Option<String>,
    pub buckets: Option<Spanned<i64>>,
    pub on_missing: Option<Spanned<String>>,
    pub override_header: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Variant {
    pub name: Spanned<String>,
    pub upstream: Spanned<String>,
    pub weight: Spanned<f64>,
    pub protocol: Option<Spanned<String>>,
    pub fallback: Option<Spanned<String>>,
    pub ca: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
    pub client_cert: Option<Spanned<String>>,
    pub client_key: Option<Spanned<String>>,
}

/// How to reach an upstream, as written beside `upstream` on a variant or shadow.
pub(super) struct UpstreamKeys<'a> {
    pub protocol: &'a Option<Spanned<String>>,
    pub ca: &'a Option<Spanned<String>>,
    pub server_name: &'a Option<Spanned<String>>,
    pub client_cert: &'a Option<Spanned<String>>,
    pub client_key: &'a Option<Spanned<String>>,
}

impl Variant {
    pub fn upstream_keys(&self) -> UpstreamKeys<'_> {
        UpstreamKeys {
            protocol: &self.protocol,
            ca: &self.ca,
            server_name: &self.server_name,
            client_cert: &self.client_cert,
            client_key: &self.client_key,
        }
    }
}

impl Shadow {
    pub fn upstream_keys(&self) -> UpstreamKeys<'_> {
        UpstreamKeys {
            protocol: &self.protocol,
            ca: &self.ca,
            server_name: &self.server_name,
            client_cert: &self.client_cert,
            client_key: &self.client_key,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Shadow {
    pub name: Spanned<String>,
    pub upstream: Spanned<String>,
    pub protocol: Option<Spanned<String>>,
    pub ca: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
    pub client_cert: Option<Spanned<String>>,
    pub client_key: Option<Spanned<String>>,
    pub percent: Option<Spanned<f64>>,
    pub timeout: Option<Spanned<String>>,
    pub max_queue: Option<Spanned<i64>>,
    pub max_queue_bytes: Option<Spanned<Size>>,
    pub max_concurrency: Option<Spanned<i64>>,
    pub compare: Option<Spanned<String>>,
    pub tolerance: Option<Spanned<f64>>,
    pub log: Option<String>,
    pub log_user_id: Option<bool>,
    pub log_body_bytes: Option<Spanned<Size>>,
    pub log_max_size: Option<Spanned<Size>>,
    pub log_keep: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Metrics {
    pub prediction: Option<Spanned<Pointers>>,
    pub prediction_buckets: Option<Spanned<Vec<f64>>>,
    pub prediction_max_bytes: Option<Spanned<Size>>,
    pub prediction_classes: Option<Spanned<i64>>,
}

/// One JSON pointer or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Pointers {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Canary {
    pub variant: Spanned<String>,
    pub baseline: Spanned<String>,
    pub interval: Option<Spanned<String>>,
    pub min_requests: Option<Spanned<i64>>,
    pub failures_to_rollback: Option<Spanned<i64>>,
    pub steps: Option<Spanned<Vec<f64>>>,
    pub analyses_per_step: Option<Spanned<i64>>,
    pub state_file: Option<String>,
    pub webhook: Option<Spanned<String>>,
    pub source: Option<Spanned<String>>,
    pub prometheus_url: Option<Spanned<String>>,
    pub prometheus_token_file: Option<Spanned<String>>,
    pub prometheus_timeout: Option<Spanned<String>>,
    pub prometheus_query_offset: Option<Spanned<String>>,
    pub prometheus_selector: Option<Spanned<String>>,
    #[serde(default)]
    pub checks: Checks,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Checks {
    pub max_error_rate: Option<Spanned<f64>>,
    pub max_error_rate_increase: Option<Spanned<f64>>,
    pub confidence: Option<Spanned<f64>>,
    pub max_p99: Option<Spanned<String>>,
    pub max_p99_ratio: Option<Spanned<f64>>,
    pub p99_floor: Option<Spanned<String>>,
    pub max_prediction_psi: Option<Spanned<f64>>,
    pub min_predictions: Option<Spanned<i64>>,
    pub srm_p_value: Option<Spanned<f64>>,
}

/// A byte size: an integer count of bytes or a string such as `"1MiB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Size {
    Bytes(i64),
    Text(String),
}
