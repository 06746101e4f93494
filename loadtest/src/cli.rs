//! The command line: turns arguments into [`Options`] and [`Checks`], prints the report, and
//! picks the exit code scripts rely on.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use http::{HeaderName, HeaderValue, Method};
use serde::Serialize;

use crate::options::{Budget, Mode, Options, OptionsError, Target};
use crate::population::{Distribution, Population};
use crate::report::{Checks, ExpectedSplit, Report};
use crate::request::IdSource;
use crate::tls::{self, TlsOptions, TlsVersion};

/// Largest `--body-size`: every connection keeps a padding buffer of this size, and abproxy's
/// own body limit is far below it (1 MiB by default).
const MAX_BODY_SIZE: usize = 64 * 1024 * 1024;

const AFTER_HELP: &str = "\
Examples (the first four against `abproxy demo` on 127.0.0.1:8080):
  loadtest --duration 10s --connections 32 --expect control=80,treatment=20
  loadtest --mode rate --rate 2000 --duration 30s --users 100000 --distribution zipf
  loadtest --id-source json:user_id --body-size 4KiB --path /predict --requests 10000
  loadtest --requests 5000 --json --fail-on-stickiness --max-error-rate 0.1%
  loadtest --url http://gateway.internal:8080 -H 'authorization: Bearer TOKEN' --duration 30s
  loadtest --url https://127.0.0.1:8443/predict --ca ca.pem --tls-ciphers TLS_AES_128_GCM_SHA256
  loadtest --url https://127.0.0.1:8443/predict --ca ca.pem --new-connections --connections 4

Exit status: 0 run completed and every check passed; 1 a --fail-on-stickiness or
--max-error-rate check failed; 2 invalid arguments; 3 the run could not start
(e.g. the host does not resolve, or --ca cannot be read). Request failures alone never change the exit status
unless a check asks for it.";

/// Load generator for abproxy: measures throughput and latency, and checks that the traffic
/// split matches the configured weights and that every user sticks to one variant.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadtest", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// abproxy client listener to load, http:// or https:// (port 80 or 443 by default); its
    /// path is used unless --path is given.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:8080",
        help_heading = "Target"
    )]
    pub url: String,

    /// Request path and query, e.g. /predict?model=v2.
    #[arg(long, value_name = "PATH", help_heading = "Target")]
    pub path: Option<String>,

    /// HTTP method [default: POST when requests have a body, else GET].
    #[arg(long, value_name = "METHOD", value_parser = parse_method, help_heading = "Target")]
    pub method: Option<Method>,

    /// A header for every request, e.g. -H 'authorization: Bearer ...'; repeatable. It
    /// replaces a header of the same name loadtest would send (a Cookie is added beside the
    /// ID cookie).
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE", value_parser = parse_header, help_heading = "Target")]
    pub headers: Vec<(HeaderName, HeaderValue)>,

    /// max: each connection sends as fast as answers come back (capacity).
    /// rate: requests due at fixed intervals, latency timed from the due time, so stalls are
    /// not hidden (coordinated omission) [default: rate if --rate is given, else max].
    #[arg(long, value_enum, help_heading = "Load")]
    pub mode: Option<ModeArg>,

    /// Requests per second for --mode rate.
    #[arg(long, value_name = "PER_SECOND", help_heading = "Load")]
    pub rate: Option<f64>,

    /// Keep-alive connections, exactly this many sockets. In rate mode they must cover
    /// rate x latency, or requests queue (and that queueing counts as latency).
    /// With --new-connections: connections (handshakes) in flight.
    #[arg(long, value_name = "N", default_value_t = 16, help_heading = "Load")]
    pub connections: usize,

    /// Each request on a fresh connection: connect, TLS handshake (https), the request with
    /// `Connection: close`, close. Requests per second are then new connections per second,
    /// full TLS handshakes unless --tls-resume; latency includes connect and handshake.
    #[arg(long, help_heading = "Load")]
    pub new_connections: bool,

    /// Pads request bodies to this size (bytes, or KiB/MiB); a body makes the default method POST.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size, help_heading = "Load")]
    pub body_size: usize,

    /// Per-request timeout, connect included (e.g. 500ms, 5s).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration, help_heading = "Load")]
    pub timeout: Duration,

    /// Number of distinct user IDs, named user-1 .. user-N.
    #[arg(long, value_name = "N", default_value_t = 1000, help_heading = "Users")]
    pub users: u64,

    /// How often each user appears: uniform, or zipf (user-1 heaviest, long tail).
    #[arg(long, value_enum, default_value_t = DistributionArg::Uniform, help_heading = "Users")]
    pub distribution: DistributionArg,

    /// Zipf exponent s: user of rank k is drawn with probability proportional to 1/k^s.
    #[arg(long, value_name = "S", default_value_t = 1.1, help_heading = "Users")]
    pub zipf_s: f64,

    /// Where the user ID goes: header:NAME, cookie:NAME, or json:FIELD (a JSON POST body
    /// {"FIELD":"user-n","features":[...]}).
    #[arg(
        long,
        value_name = "SOURCE",
        default_value = "header:x-user-id",
        help_heading = "Users"
    )]
    pub id_source: IdSource,

    /// Seed for the user sequence, to repeat a run's population [default: random].
    #[arg(long, value_name = "N", help_heading = "Users")]
    pub seed: Option<u64>,

    /// Measured run length (e.g. 30s, 2m) [default: 10s if --requests is not given either].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, help_heading = "Run length")]
    pub duration: Option<Duration>,

    /// Stop after this many requests (with --duration, whichever comes first).
    #[arg(long, value_name = "N", help_heading = "Run length")]
    pub requests: Option<u64>,

    /// Unmeasured traffic before the run, on the same connections.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, help_heading = "Run length")]
    pub warmup: Option<Duration>,

    /// PEM certificates to trust for https:// instead of the system's roots (a test CA).
    #[arg(long, value_name = "FILE", help_heading = "TLS (https:// URLs)")]
    pub ca: Option<PathBuf>,

    /// Name to send as SNI and verify the certificate against [default: the URL's host].
    #[arg(long, value_name = "NAME", help_heading = "TLS (https:// URLs)")]
    pub server_name: Option<String>,

    /// TLS versions to offer, comma-separated: 1.2, 1.3 [default: both].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_tls_version, help_heading = "TLS (https:// URLs)")]
    pub tls_version: Vec<TlsVersion>,

    /// Cipher suites to offer, comma-separated, in order, by IANA name (TLS_AES_128_GCM_SHA256)
    /// [default: rustls's, which puts TLS_AES_256_GCM_SHA384 first]. A server that follows the
    /// client's order picks the first it has: offer one suite to compare two servers.
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_cipher_suite, help_heading = "TLS (https:// URLs)")]
    pub tls_ciphers: Vec<rustls::CipherSuite>,

    /// Key exchange groups to offer, comma-separated: X25519, secp256r1 (P-256), secp384r1
    /// [default: all three, X25519 first].
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_group, help_heading = "TLS (https:// URLs)")]
    pub tls_groups: Vec<rustls::NamedGroup>,

    /// Offer to resume TLS sessions on new connections [default: off, every new connection
    /// is a full handshake].
    #[arg(long, help_heading = "TLS (https:// URLs)")]
    pub tls_resume: bool,

    /// Response header that names the variant (abproxy's server.variant_header).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "x-variant",
        help_heading = "Report"
    )]
    pub variant_header: HeaderName,

    /// Configured split to compare against, e.g. control=80,treatment=20.
    #[arg(long, value_name = "NAME=WEIGHT,...", help_heading = "Report")]
    pub expect: Option<ExpectedSplit>,

    /// Print one JSON object instead of the table.
    #[arg(long, help_heading = "Report")]
    pub json: bool,

    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, short, help_heading = "Report")]
    pub quiet: bool,

    /// Exit 1 if any user was answered by more than one variant.
    #[arg(long, help_heading = "Checks")]
    pub fail_on_stickiness: bool,

    /// Exit 1 if the share of failed requests exceeds this (a fraction like 0.01, or 1%).
    #[arg(long, value_name = "RATE", value_parser = parse_error_rate, help_heading = "Checks")]
    pub max_error_rate: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Max,
    Rate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DistributionArg {
    Uniform,
    Zipf,
}

impl Cli {
    /// The run and the checks this command line asks for.
    pub fn into_run(self) -> Result<(Options, Checks), OptionsError> {
        let mut target = Target::parse(&self.url)?;
        if let Some(path) = &self.path {
            target = target.with_path(path)?;
        }
        let mode = match (self.mode, self.rate) {
            (Some(ModeArg::Max), Some(_)) => return Err(OptionsError::RateWithoutRateMode),
            (Some(ModeArg::Rate), None) => return Err(OptionsError::RateModeWithoutRate),
            (Some(ModeArg::Max), None) | (None, None) => Mode::Max,
            (Some(ModeArg::Rate) | None, Some(rate)) => Mode::rate(rate)?,
        };
        let distribution = match self.distribution {
            DistributionArg::Uniform => Distribution::Uniform,
            DistributionArg::Zipf => Distribution::Zipf { s: self.zipf_s },
        };
        let options = Options {
            method: self.method,
            headers: self.headers,
            mode,
            connections: self.connections,
            new_connections: self.new_connections,
            tls: TlsOptions {
                ca: self.ca,
                server_name: self.server_name,
                versions: self.tls_version,
                cipher_suites: self.tls_ciphers,
                groups: self.tls_groups,
                resumption: self.tls_resume,
            },
            population: Population::new(self.users, distribution)?,
            id_source: self.id_source,
            body_size: self.body_size,
            budget: Budget {
                duration: self.duration,
                requests: self.requests,
            },
            warmup: self.warmup,
            timeout: self.timeout,
            variant_header: self.variant_header,
            expected: self.expect.unwrap_or_default(),
            seed: self.seed.unwrap_or_else(|| fastrand::u64(..)),
            progress: !self.quiet,
            ..Options::new(target)
        };
        options.validate()?;
        let checks = Checks {
            fail_on_stickiness: self.fail_on_stickiness,
            max_error_rate: self.max_error_rate,
        };
        Ok((options, checks))
    }
}

/// `--json` output: the report plus the verdict of the checks, as one object.
#[derive(Serialize)]
struct JsonOutput<'a> {
    #[serde(flatten)]
    report: &'a Report,
    failed_checks: &'a [String],
}

/// Runs the command line to completion and returns the documented exit status.
pub async fn execute(cli: Cli) -> ExitCode {
    let json = cli.json;
    let (options, checks) = match cli.into_run() {
        Ok(run) => run,
        Err(error) => {
            eprintln!("loadtest: {error}");
            return ExitCode::from(2);
        }
    };
    let report = match crate::run(options).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("loadtest: {error}");
            return ExitCode::from(3);
        }
    };
    let failures = checks.failures(&report);
    if json {
        let output = JsonOutput {
            report: &report,
            failed_checks: &failures,
        };
        match serde_json::to_string_pretty(&output) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("loadtest: cannot encode the report: {error}");
                return ExitCode::from(3);
            }
        }
    } else {
        print!("{report}");
        for failure in &failures {
            println!("check failed: {failure}");
        }
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `NAME: VALUE`, as curl's `-H` spells it. Headers that frame the message or manage the
/// connection are loadtest's to set: a wrong length or a `Connection: close` would break the
/// request stream or the fixed set of keep-alive connections.
fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    const RESERVED: [&str; 7] = [
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ];
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not a header (NAME: VALUE)"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("{:?} is not a header name", name.trim()))?;
    if RESERVED.contains(&name.as_str()) {
        return Err(format!("{name} is set by loadtest itself"));
    }
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| format!("the value of {name} is not a valid header value"))?;
    Ok((name, value))
}

fn parse_tls_version(s: &str) -> Result<TlsVersion, String> {
    TlsVersion::parse(s).map_err(|e| e.to_string())
}

fn parse_cipher_suite(s: &str) -> Result<rustls::CipherSuite, String> {
    tls::parse_cipher_suite(s).map_err(|e| e.to_string())
}

fn parse_group(s: &str) -> Result<rustls::NamedGroup, String> {
    tls::parse_group(s).map_err(|e| e.to_string())
}

fn parse_method(s: &str) -> Result<Method, String> {
    Method::from_bytes(s.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("{s:?} is not an HTTP method"))
}

/// Bytes as an integer or with a KiB/MiB (also KB/MB, decimal) suffix, like abproxy's config.
fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1024,
        "mib" => 1024 * 1024,
        "kb" => 1000,
        "mb" => 1_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use bytes, KiB or MiB)"
            ))
        }
    };
    let number: usize = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512, 4KiB, 1MiB)"))?;
    number
        .checked_mul(multiplier)
        .filter(|&size| size <= MAX_BODY_SIZE)
        .ok_or_else(|| format!("{s:?} is above the {} MiB limit", MAX_BODY_SIZE >> 20))
}

/// A fraction in 0..=1, or a percentage with `%`.
fn parse_error_rate(s: &str) -> Result<f64, String> {
    let invalid = || format!("{s:?} is not an error rate (e.g. 0.01 or 1%)");
    let s = s.trim();
    let rate = match s.strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().map_err(|_| invalid())? / 100.0,
        None => s.parse::<f64>().map_err(|_| invalid())?,
    };
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(invalid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<(Options, Checks), String> {
        let cli = Cli::try_parse_from(std::iter::once("loadtest").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.into_run().map_err(|e| e.to_string())
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_a_bounded_max_run_against_localhost() {
        let (options, checks) = parse(&[]).expect("defaults are valid");
        assert_eq!(options.target.to_string(), "http://127.0.0.1:8080/");
        assert_eq!(options.mode, Mode::Max);
        assert_eq!(options.connections, 16);
        assert_eq!(options.population.users(), 1000);
        assert_eq!(
            options.budget.bounded(),
            Budget::duration(Duration::from_secs(10))
        );
        assert_eq!(options.variant_header, "x-variant");
        assert!(options.progress);
        assert_eq!(checks, Checks::default());
    }

    #[test]
    fn a_full_command_line_maps_onto_options() {
        let (options, checks) = parse(&[
            "--url=http://localhost:9000/x",
            "--path=/predict",
            "--rate=250",
            "--connections=4",
            "--users=50",
            "--distribution=zipf",
            "--zipf-s=1.3",
            "--id-source=json:user_id",
            "--body-size=2KiB",
            "--duration=3s",
            "--requests=100",
            "--warmup=500ms",
            "--variant-header=x-model",
            "--expect=control=90,treatment=10",
            "--seed=9",
            "--quiet",
            "--fail-on-stickiness",
            "--max-error-rate=2%",
        ])
        .expect("valid command line");
        assert_eq!(options.target.to_string(), "http://localhost:9000/predict");
        assert_eq!(options.mode, Mode::Rate { per_second: 250.0 });
        assert_eq!(options.connections, 4);
        assert_eq!(
            options.population.distribution(),
            Distribution::Zipf { s: 1.3 }
        );
        assert_eq!(options.id_source, IdSource::Json("user_id".into()));
        assert_eq!(options.body_size, 2048);
        assert_eq!(options.effective_method(), Method::POST);
        assert_eq!(options.budget.duration, Some(Duration::from_secs(3)));
        assert_eq!(options.budget.requests, Some(100));
        assert_eq!(options.warmup, Some(Duration::from_millis(500)));
        assert_eq!(options.variant_header, "x-model");
        assert_eq!(options.expected.percent("treatment"), Some(10.0));
        assert_eq!(options.seed, 9);
        assert!(!options.progress);
        assert!(checks.fail_on_stickiness);
        assert_eq!(checks.max_error_rate, Some(0.02));
    }

    #[test]
    fn headers_are_taken_as_curl_takes_them() {
        let (options, _) = parse(&["-H", "Authorization: Bearer abc:def", "--header=x-model:v2"])
            .expect("valid headers");
        assert_eq!(
            options.headers,
            vec![
                (
                    HeaderName::from_static("authorization"),
                    HeaderValue::from_static("Bearer abc:def")
                ),
                (
                    HeaderName::from_static("x-model"),
                    HeaderValue::from_static("v2")
                ),
            ]
        );
        assert!(parse(&["-H", "no colon"]).is_err());
        assert!(parse(&["-H", "bad name: x"]).is_err());
        assert!(parse(&["-H", "Content-Length: 3"]).is_err());
        assert!(parse(&["-H", "connection: close"]).is_err());
        // The default ID source is the x-user-id header: -H must not hide it.
        let hidden = parse(&["-H", "x-user-id: fixed"]).expect_err("hides the user ID");
        assert!(hidden.contains("x-user-id"), "{hidden}");
        assert!(parse(&["--id-source=cookie:uid", "-H", "x-user-id: fixed"]).is_ok());
    }

    #[test]
    fn tls_options_map_onto_options() {
        let (options, _) = parse(&[
            "--url=https://localhost:8443/predict",
            "--ca=/tmp/ca.pem",
            "--server-name=abproxy.test",
            "--tls-version=1.3",
            "--tls-ciphers=TLS_AES_128_GCM_SHA256,TLS_CHACHA20_POLY1305_SHA256",
            "--tls-groups=X25519",
            "--new-connections",
        ])
        .expect("valid command line");
        assert!(options.target.is_https());
        assert!(options.new_connections);
        assert_eq!(
            options.tls,
            TlsOptions {
                ca: Some(PathBuf::from("/tmp/ca.pem")),
                server_name: Some("abproxy.test".to_owned()),
                versions: vec![TlsVersion::Tls13],
                cipher_suites: vec![
                    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                    rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                ],
                groups: vec![rustls::NamedGroup::X25519],
                resumption: false,
            }
        );
        let (options, _) = parse(&["--url=https://h", "--tls-resume"]).expect("valid");
        assert!(options.tls.resumption);
        // --new-connections is plain HTTP's too: a connection rate without TLS.
        assert!(parse(&["--new-connections"]).is_ok());
    }

    #[test]
    fn mode_and_rate_must_agree() {
        assert!(parse(&["--mode=rate"]).is_err());
        assert!(parse(&["--mode=max", "--rate=10"]).is_err());
        assert!(parse(&["--rate=0"]).is_err());
        assert_eq!(
            parse(&["--mode=rate", "--rate=10"]).map(|(o, _)| o.mode),
            Ok(Mode::Rate { per_second: 10.0 })
        );
    }

    #[test]
    fn bad_values_are_rejected_with_a_reason() {
        for args in [
            &["--url=ftp://127.0.0.1:8443"][..],
            &["--ca=ca.pem"],
            &["--url=https://x", "--tls-version=1.1"],
            &["--url=https://x", "--tls-ciphers=TLS_RSA_WITH_RC4_128_MD5"],
            &["--url=https://x", "--tls-groups=ffdhe2048"],
            &["--id-source=query:uid"],
            &["--users=0"],
            &["--connections=0"],
            &["--duration=soon"],
            &["--expect=control"],
            &["--body-size=1GiB"],
            &["--max-error-rate=2"],
            &["--distribution=zipf", "--zipf-s=0"],
        ] {
            assert!(parse(args).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn sizes_and_rates_parse_like_the_proxy_config() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1 MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2kb"), Ok(2000));
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_error_rate("0.5"), Ok(0.5));
        assert_eq!(parse_error_rate("1%"), Ok(0.01));
        assert!(parse_error_rate("-1").is_err());
    }
}
