//! A validated description of one run: the library's input.
//!
//! `cli` builds it from the command line; tests and other tools build it directly with
//! [`Options::new`] and adjust the public fields.

use std::time::Duration;

use http::header::HeaderValue;
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{HeaderName, Method};

use crate::population::{Population, PopulationError};
use crate::report::ExpectedSplit;
use crate::request::IdSource;
use crate::tls::TlsOptions;

/// Run length when neither a duration nor a request count is given: every run stops by itself.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Options that cannot describe a run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptionsError {
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("invalid path {0:?}: expected an origin-form path such as /predict?x=1")]
    Path(String),
    #[error("the rate must be a finite number of requests per second > 0, got {0}")]
    Rate(f64),
    #[error("--rate only applies to --mode rate")]
    RateWithoutRateMode,
    #[error("--mode rate needs --rate REQUESTS_PER_SECOND")]
    RateModeWithoutRate,
    #[error("at least one connection is needed")]
    NoConnections,
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("{0}")]
    Population(#[from] PopulationError),
    #[error("-H {0} would replace the user ID that --id-source puts there")]
    HeaderHidesUserId(HeaderName),
    #[error("TLS options (--ca, --server-name, --tls-*) need an https:// URL")]
    TlsWithoutHttps,
    #[error("unknown TLS version {0:?}: expected 1.2 or 1.3")]
    TlsVersion(String),
    #[error("unknown or unsupported cipher suite {name:?}; rustls (ring) offers {known}")]
    TlsCipherSuite { name: String, known: String },
    #[error("unknown or unsupported key exchange group {name:?}; rustls (ring) offers {known}")]
    TlsGroup { name: String, known: String },
}

/// The abproxy listener under test: plain HTTP, or HTTPS to measure its TLS termination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    https: bool,
    host: String,
    port: u16,
    authority: HeaderValue,
    path_and_query: PathAndQuery,
}

impl Target {
    /// Parses `http://HOST[:PORT][/PATH[?QUERY]]` or `https://…`; the port defaults to 80 or
    /// 443, the path to `/`.
    pub fn parse(url: &str) -> Result<Self, OptionsError> {
        let invalid = |reason: &str| OptionsError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        let https = match uri.scheme() {
            Some(scheme) if *scheme == Scheme::HTTP => false,
            Some(scheme) if *scheme == Scheme::HTTPS => true,
            Some(_) => return Err(invalid("only http:// and https:// are supported")),
            None => return Err(invalid("expected http://HOST:PORT or https://HOST:PORT")),
        };
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("credentials in the URL are not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        Ok(Target {
            https,
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
            authority: HeaderValue::from_str(authority.as_str())
                .map_err(|_| invalid("host is not a valid Host header"))?,
            path_and_query: uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        })
    }

    /// Replaces the URL's path (and query) with `path`, as `--path` does.
    pub fn with_path(mut self, path: &str) -> Result<Self, OptionsError> {
        if !path.starts_with('/') {
            return Err(OptionsError::Path(path.to_owned()));
        }
        self.path_and_query = path
            .parse()
            .map_err(|_| OptionsError::Path(path.to_owned()))?;
        Ok(self)
    }

    /// Whether requests go over TLS.
    pub fn is_https(&self) -> bool {
        self.https
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `Host` header value: the URL's authority as written.
    pub fn authority(&self) -> &HeaderValue {
        &self.authority
    }

    pub fn path_and_query(&self) -> &str {
        self.path_and_query.as_str()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let authority = self.authority.to_str().unwrap_or(&self.host);
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{authority}{}", self.path_and_query)
    }
}

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Each connection sends its next request as soon as the previous answer is read: measures
    /// capacity, but a stall also stops the sending, so latency percentiles hide it.
    Max,
    /// Requests are due at fixed intervals whatever the answers do (open model); latency counts
    /// from the due time, so a stall shows up in every request queued behind it.
    Rate { per_second: f64 },
}

impl Mode {
    pub fn rate(per_second: f64) -> Result<Self, OptionsError> {
        if per_second.is_finite() && per_second > 0.0 {
            Ok(Mode::Rate { per_second })
        } else {
            Err(OptionsError::Rate(per_second))
        }
    }
}

/// When a run stops: whichever limit comes first. Neither means [`DEFAULT_DURATION`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
}

impl Budget {
    pub fn duration(duration: Duration) -> Self {
        Budget {
            duration: Some(duration),
            requests: None,
        }
    }

    pub fn requests(requests: u64) -> Self {
        Budget {
            duration: None,
            requests: Some(requests),
        }
    }

    /// The budget actually applied, with the default duration filled in.
    pub fn bounded(self) -> Self {
        match self {
            Budget {
                duration: None,
                requests: None,
            } => Budget::duration(DEFAULT_DURATION),
            other => other,
        }
    }
}

/// One run, fully described. Build with [`Options::new`], then set fields.
#[derive(Debug, Clone)]
pub struct Options {
    pub target: Target,
    /// `None`: POST when requests carry a body (JSON ID source or `body_size` > 0), else GET.
    pub method: Option<Method>,
    pub mode: Mode,
    /// Sent with every request, replacing any header of the same name loadtest would send.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Exactly this many TCP connections, each kept alive and used by one request at a time.
    /// With `new_connections`, this many requests in flight, each on a connection of its own.
    pub connections: usize,
    /// Every request on a fresh connection (connect, TLS handshake for https, one request with
    /// `Connection: close`, close), so the request rate is a connection (handshake) rate.
    pub new_connections: bool,
    /// How to speak TLS to an `https://` target; must stay at its defaults for `http://`.
    pub tls: TlsOptions,
    pub population: Population,
    pub id_source: IdSource,
    /// Pads request bodies to this many bytes; 0 sends no body unless the ID source needs one.
    pub body_size: usize,
    pub budget: Budget,
    /// Traffic sent before measuring, on the same connections, to fill the proxy's pools.
    pub warmup: Option<Duration>,
    /// Per request, connect included. In rate mode it runs from the due time, so it also
    /// bounds how long a request may wait for a free connection: past it, the request is
    /// counted as a timeout without being sent.
    pub timeout: Duration,
    /// Response header naming the variant that answered (abproxy's `server.variant_header`).
    pub variant_header: HeaderName,
    pub expected: ExpectedSplit,
    /// Seeds the user sequence of each connection, for reproducible populations.
    pub seed: u64,
    /// Live progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

impl Options {
    /// Defaults: max mode on 16 connections, 1000 uniform users sent as `x-user-id`, 10 s.
    pub fn new(target: Target) -> Self {
        Options {
            target,
            method: None,
            mode: Mode::Max,
            headers: Vec::new(),
            connections: 16,
            new_connections: false,
            tls: TlsOptions::default(),
            population: Population::default(),
            id_source: IdSource::Header(HeaderName::from_static("x-user-id")),
            body_size: 0,
            budget: Budget::default(),
            warmup: None,
            timeout: Duration::from_secs(5),
            variant_header: HeaderName::from_static("x-variant"),
            expected: ExpectedSplit::default(),
            seed: fastrand::u64(..),
            progress: false,
        }
    }

    pub fn effective_method(&self) -> Method {
        match &self.method {
            Some(method) => method.clone(),
            None if self.id_source.needs_body() || self.body_size > 0 => Method::POST,
            None => Method::GET,
        }
    }

    /// Rejects settings that would make a run meaningless or unbounded.
    pub fn validate(&self) -> Result<(), OptionsError> {
        if self.connections == 0 {
            return Err(OptionsError::NoConnections);
        }
        if let Mode::Rate { per_second } = self.mode {
            Mode::rate(per_second)?;
        }
        if self.timeout.is_zero() {
            return Err(OptionsError::Zero("the timeout"));
        }
        if self.budget.duration.is_some_and(|d| d.is_zero()) {
            return Err(OptionsError::Zero("the duration"));
        }
        if self.budget.requests == Some(0) {
            return Err(OptionsError::Zero("the request count"));
        }
        if !self.target.is_https() && !self.tls.is_default() {
            return Err(OptionsError::TlsWithoutHttps);
        }
        if let IdSource::Header(id_header) = &self.id_source {
            if self.headers.iter().any(|(name, _)| name == id_header) {
                return Err(OptionsError::HeaderHidesUserId(id_header.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_defaults_port_80_and_path_slash() {
        let target = Target::parse("http://example.test").expect("valid URL");
        assert_eq!(target.host(), "example.test");
        assert_eq!(target.port(), 80);
        assert_eq!(target.path_and_query(), "/");
        assert_eq!(target.to_string(), "http://example.test/");
    }

    #[test]
    fn target_keeps_port_path_and_query_and_path_overrides_them() {
        let target = Target::parse("http://127.0.0.1:8080/predict?v=2").expect("valid URL");
        assert_eq!((target.host(), target.port()), ("127.0.0.1", 8080));
        assert_eq!(target.authority(), "127.0.0.1:8080");
        assert_eq!(target.path_and_query(), "/predict?v=2");
        let target = target.with_path("/other").expect("valid path");
        assert_eq!(target.to_string(), "http://127.0.0.1:8080/other");
        assert!(target.clone().with_path("relative").is_err());
    }

    #[test]
    fn target_accepts_ipv6_literals() {
        let target = Target::parse("http://[::1]:9000").expect("valid URL");
        assert_eq!((target.host(), target.port()), ("::1", 9000));
        assert_eq!(target.authority(), "[::1]:9000");
    }

    #[test]
    fn https_targets_default_to_port_443() {
        let target = Target::parse("https://localhost/predict").expect("valid URL");
        assert!(target.is_https());
        assert_eq!((target.host(), target.port()), ("localhost", 443));
        assert_eq!(target.to_string(), "https://localhost/predict");
        let target = Target::parse("https://127.0.0.1:8443").expect("valid URL");
        assert_eq!(target.port(), 8443);
        assert!(!Target::parse("http://x").expect("valid URL").is_https());
    }

    #[test]
    fn tls_options_need_an_https_target() {
        let mut options = Options::new(Target::parse("http://127.0.0.1:1").expect("valid URL"));
        options.tls.resumption = true;
        assert_eq!(options.validate(), Err(OptionsError::TlsWithoutHttps));
        options.target = Target::parse("https://127.0.0.1:1").expect("valid URL");
        assert_eq!(options.validate(), Ok(()));
    }

    #[test]
    fn target_rejects_other_schemes_and_missing_hosts() {
        for url in [
            "ftp://x:1",
            "127.0.0.1:8080",
            "/path",
            "http://user:pw@x:1",
            "not a url",
        ] {
            assert!(Target::parse(url).is_err(), "{url} accepted");
        }
    }

    #[test]
    fn budget_defaults_to_ten_seconds_only_when_unbounded() {
        assert_eq!(
            Budget::default().bounded(),
            Budget::duration(DEFAULT_DURATION)
        );
        assert_eq!(Budget::requests(5).bounded(), Budget::requests(5));
    }

    #[test]
    fn method_follows_the_body() {
        let mut options = Options::new(Target::parse("http://127.0.0.1:1").expect("valid URL"));
        assert_eq!(options.effective_method(), Method::GET);
        options.body_size = 10;
        assert_eq!(options.effective_method(), Method::POST);
        options.body_size = 0;
        options.id_source = IdSource::Json("user_id".into());
        assert_eq!(options.effective_method(), Method::POST);
        options.method = Some(Method::PUT);
        assert_eq!(options.effective_method(), Method::PUT);
    }

    #[test]
    fn validate_rejects_degenerate_runs() {
        let base = Options::new(Target::parse("http://127.0.0.1:1").expect("valid URL"));
        assert_eq!(base.validate(), Ok(()));
        let mut options = base.clone();
        options.connections = 0;
        assert_eq!(options.validate(), Err(OptionsError::NoConnections));
        let mut options = base.clone();
        options.mode = Mode::Rate { per_second: 0.0 };
        assert_eq!(options.validate(), Err(OptionsError::Rate(0.0)));
        let mut options = base;
        options.budget = Budget::requests(0);
        assert!(options.validate().is_err());
    }
}
