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

/// One validated config file.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    pub limits: Limits,
    pub assignment: Assignment,
    /// In file order, which is bucket order.
    pub variants: Vec<Variant>,
    pub shadows: Vec<Shadow>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Response header naming the variant that answered.
    pub variant_header: HeaderName,
    /// Forward the client's `Host` header; when false, upstreams see their own authority.
    pub preserve_host: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest request body abproxy will buffer (for a `json:` source or a shadow).
    pub max_body: u64,
    /// Time allowed for an upstream's response head, for any pause in its body, and for any
    /// pause of a client in reading its answer.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Requests in flight to one upstream at once, and so its connections; more wait their
    /// turn within `request_timeout`, so a burst of clients cannot open a connection each.
    pub max_upstream_connections: usize,
    /// How long in-flight requests may run on after SIGTERM.
    pub shutdown_grace: Duration,
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

/// An upstream base URL: `http://host:port` with an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Prepended to the client's path; empty or without a trailing slash.
    pub path_prefix: String,
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
        let text = std::str::from_utf8(&self.bytes)
            .map_err(|_| ConfigError::invalid(Location::file(path), "config is not valid UTF-8"))?;
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
