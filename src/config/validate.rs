//! Turns the raw file into a `Config`, checking every rule and pointing at the offending line.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::Uri;
use toml::Spanned;

use super::raw::{self, Size};
use super::{
    percent_to_buckets, Assignment, Canary, CanarySource, CertificateFiles, Checks, ClientAuth,
    Config, ConfigError, Limits, Location, Metrics, PrometheusSource, Protocol, Server, Shadow,
    SniCertificate, Tls, Upstream, Variant, DEFAULT_PREDICTION_BUCKETS,
};
use crate::assign::{OnMissing, UserIdSource};
use crate::json_pointer::JsonPointer;
use crate::upstream::{ClientTls, TlsError, TlsSettings};

const MIB: u64 = 1024 * 1024;
/// The request path tracks the shadows of a request in a 64-bit set.
const MAX_SHADOWS: usize = 64;
const MAX_COUNT: usize = 65_536;
/// Any timeout or interval; `now + duration` must stay within what a clock can represent.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

pub(super) struct Validator<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

type Result<T> = std::result::Result<T, ConfigError>;

impl Validator<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::invalid(Location::at(self.path, self.text, span.start), message)
    }

    pub fn config(&self, file: raw::File) -> Result<Config> {
        let limits = self.limits(file.limits)?;
        let assignment = self.assignment(file.assignment)?;
        let variants = self.variants(file.variants, assignment.buckets, &limits)?;
        // Pointing at the first shadow too many, like every error that has a place in the file.
        if let Some(extra) = file.shadows.get(MAX_SHADOWS) {
            return Err(self.error(
                extra.span(),
                format!("at most {MAX_SHADOWS} [[shadow]] entries are supported"),
            ));
        }
        let mut names = HashSet::new();
        let shadows = file
            .shadows
            .into_iter()
            .map(|shadow| {
                self.unique(&mut names, &shadow.get_ref().name, "shadow")?;
                self.shadow(shadow, &limits)
            })
            .collect::<Result<Vec<_>>>()?;
        let metrics = self.metrics(file.metrics)?;
        let canary = file
            .canary
            .map(|canary| self.canary(canary, &variants, assignment.buckets, &metrics))
            .transpose()?;
        Ok(Config {
            server: self.server(file.server, &limits)?,
            metrics,
            limits,
            assignment,
            variants,
            shadows,
            canary,
        })
    }

    fn server(&self, server: raw::Server, limits: &Limits) -> Result<Server> {
        let tls = server.tls.map(|tls| self.tls(tls, limits)).transpose()?;
        let listen_plain = match server.listen_plain {
            Some(addr) if tls.is_none() => {
                return Err(self.error(
                    addr.span(),
                    "listen_plain serves plain HTTP beside TLS; without [server.tls], listen serves plain HTTP already",
                ))
            }
            Some(addr) => Some(self.socket_addr(Some(addr), SocketAddr::from(([0, 0, 0, 0], 0)))?),
            None => None,
        };
        Ok(Server {
            listen_plain,
            tls,
            listen: self.socket_addr(server.listen, SocketAddr::from(([0, 0, 0, 0], 8080)))?,
            admin: self.socket_addr(server.admin, SocketAddr::from(([127, 0, 0, 1], 9090)))?,
            variant_header: self.variant_header(server.variant_header)?,
            preserve_host: server.preserve_host.unwrap_or(true),
            admin_token_file: server
                .admin_token_file
                .map(|path| self.token_file(&path))
                .transpose()?,
        })
    }

    /// `[server.tls]`: every file must be readable now, and each key must match its
    /// certificate, so that `check` catches what would otherwise fail at the first handshake.
    fn tls(&self, tls: Spanned<raw::Tls>, limits: &Limits) -> Result<Tls> {
        let table = tls.span();
        let tls = tls.into_inner();
        let default =
            self.certificate_files(tls.cert.as_ref(), tls.key.as_ref(), table, "[server.tls]")?;
        let mut names = HashSet::new();
        let sni = tls
            .sni
            .iter()
            .map(|entry| {
                let entry_span = entry.span();
                let entry = entry.get_ref();
                let name = entry.name.get_ref().to_ascii_lowercase();
                if !crate::tls::is_server_name(&name) {
                    return Err(self.error(
                        entry.name.span(),
                        format!(
                            "{:?} is not a DNS name such as \"api.example.com\" or \"*.example.com\"",
                            entry.name.get_ref()
                        ),
                    ));
                }
                if !names.insert(name.clone()) {
                    return Err(self.error(
                        entry.name.span(),
                        format!("server name {name:?} is listed twice in [[server.tls.sni]]"),
                    ));
                }
                let files = self.certificate_files(
                    entry.cert.as_ref(),
                    entry.key.as_ref(),
                    entry_span,
                    "[[server.tls.sni]]",
                )?;
                Ok(SniCertificate { name, files })
            })
            .collect::<Result<Vec<_>>>()?;
        let required = match &tls.client_auth {
            None => true,
            Some(mode) => match mode.get_ref().as_str() {
                "required" => true,
                "optional" => false,
                other => {
                    return Err(self.error(
                        mode.span(),
                        format!("client_auth must be \"required\" or \"optional\", not {other:?}"),
                    ))
                }
            },
        };
        let client_auth = match (&tls.client_ca, &tls.client_auth) {
            (Some(ca), _) => {
                let path = PathBuf::from(ca.get_ref());
                crate::tls::check_client_ca(&path)
                    .map_err(|err| self.error(ca.span(), err.to_string()))?;
                Some(ClientAuth { ca: path, required })
            }
            (None, Some(mode)) => {
                return Err(self.error(
                    mode.span(),
                    "client_auth needs client_ca, the CA certificates that client certificates are verified against",
                ))
            }
            (None, None) => None,
        };
        Ok(Tls {
            default,
            sni,
            client_auth,
            handshake_timeout: self
                .duration(tls.handshake_timeout, limits.client_header_timeout)?,
        })
    }

    /// A `cert` and `key` pair that loads and matches, errors pointing at the file at fault.
    fn certificate_files(
        &self,
        cert: Option<&Spanned<String>>,
        key: Option<&Spanned<String>>,
        table: Range<usize>,
        what: &str,
    ) -> Result<CertificateFiles> {
        let (Some(cert), Some(key)) = (cert, key) else {
            let missing = if cert.is_none() { "cert" } else { "key" };
            return Err(self.error(
                table,
                format!("{what} needs both cert (a PEM certificate chain) and key (its PEM private key); {missing} is missing"),
            ));
        };
        let files = CertificateFiles {
            cert: PathBuf::from(cert.get_ref()),
            key: PathBuf::from(key.get_ref()),
        };
        crate::tls::check_pair(&files).map_err(|err| {
            let span = if err.path() == files.cert.as_path() {
                cert.span()
            } else {
                key.span()
            };
            self.error(span, err.to_string())
        })?;
        Ok(files)
    }

    /// The token file must hold a token now, so that a typo is caught at `check`, not when an
    /// operator needs to roll back.
    fn token_file(&self, path: &Spanned<String>) -> Result<PathBuf> {
        self.secret_file(path, "admin_token_file")
    }

    /// A file that must hold a secret (a bearer token) now; `key` names it in the error.
    fn secret_file(&self, path: &Spanned<String>, key: &str) -> Result<PathBuf> {
        match std::fs::read_to_string(path.get_ref()) {
            Ok(token) if !token.trim().is_empty() => Ok(PathBuf::from(path.get_ref())),
            Ok(_) => Err(self.error(path.span(), format!("{key} {:?} is empty", path.get_ref()))),
            Err(err) => Err(self.error(
                path.span(),
                format!("cannot read {key} {:?}: {err}", path.get_ref()),
            )),
        }
    }

    fn metrics(&self, metrics: raw::Metrics) -> Result<Metrics> {
        let prediction = match metrics.prediction {
            None => Vec::new(),
            Some(spanned) => {
                let span = spanned.span();
                let texts = match spanned.into_inner() {
                    raw::Pointers::One(text) => vec![text],
                    raw::Pointers::Many(texts) => texts,
                };
                texts
                    .iter()
                    .map(|text| {
                        JsonPointer::new(text).filter(|_| !text.is_empty()).ok_or_else(|| {
                            self.error(
                                span.clone(),
                                format!("prediction must be a JSON pointer such as \"/prediction\", not {text:?}"),
                            )
                        })
                    })
                    .collect::<Result<_>>()?
            }
        };
        let prediction_buckets = match metrics.prediction_buckets {
            None => DEFAULT_PREDICTION_BUCKETS.to_vec(),
            Some(buckets) => {
                let list = buckets.get_ref();
                let ascending = list.windows(2).all(|pair| pair[0] < pair[1]);
                if list.is_empty() || !ascending || list.iter().any(|b| !b.is_finite()) {
                    return Err(self.error(
                        buckets.span(),
                        "prediction_buckets must be a non-empty list of finite numbers in ascending order",
                    ));
                }
                list.clone()
            }
        };
        Ok(Metrics {
            prediction,
            prediction_buckets,
            prediction_max_bytes: self.size(metrics.prediction_max_bytes, 64 * 1024)? as usize,
            prediction_classes: self.count(metrics.prediction_classes, 20, "prediction_classes")?,
        })
    }

    fn canary(
        &self,
        canary: Spanned<raw::Canary>,
        variants: &[Variant],
        buckets: u32,
        metrics: &Metrics,
    ) -> Result<Canary> {
        let section = canary.span();
        let canary = canary.into_inner();
        if let Some(psi) = &canary.checks.max_prediction_psi {
            if metrics.prediction.is_empty() {
                return Err(self.error(
                    psi.span(),
                    "max_prediction_psi needs [metrics] prediction: the pointer to the prediction in each answer",
                ));
            }
        }
        let position = |name: &Spanned<String>| {
            variants
                .iter()
                .position(|variant| &variant.name == name.get_ref())
                .ok_or_else(|| {
                    self.error(
                        name.span(),
                        format!(
                            "[canary] names {:?}, which is not a [[variant]]",
                            name.get_ref()
                        ),
                    )
                })
        };
        let (c, b) = (position(&canary.variant)?, position(&canary.baseline)?);
        if c == b {
            return Err(self.error(
                canary.baseline.span(),
                "the canary's baseline must be another variant",
            ));
        }
        // The canary grows by taking buckets from the baseline's edge: only neighbours in
        // bucket order can trade buckets without moving anyone else's users.
        if c.abs_diff(b) != 1 {
            return Err(self.error(
                canary.variant.span(),
                format!(
                    "the canary {:?} and its baseline {:?} must be next to each other in the file: \
                     a ramp or rollback trades buckets between them, and with another variant \
                     between them its users would move",
                    canary.variant.get_ref(),
                    canary.baseline.get_ref()
                ),
            ));
        }
        let pool = variants[c].weight + variants[b].weight;
        let steps = match &canary.steps {
            None => Vec::new(),
            Some(steps) => self.steps(steps, pool, buckets)?,
        };
        let interval = self.duration(canary.interval.clone(), Duration::from_secs(60))?;
        let source = self.source(&canary, interval)?;
        let webhook = canary
            .webhook
            .map(|url| {
                let uri: http::Uri = url.get_ref().parse().map_err(|_| {
                    self.error(
                        url.span(),
                        format!("webhook {:?} is not a valid URL", url.get_ref()),
                    )
                })?;
                if uri.scheme() != Some(&http::uri::Scheme::HTTP) || uri.authority().is_none() {
                    return Err(self.error(
                        url.span(),
                        format!("webhook {:?} must be an http:// URL", url.get_ref()),
                    ));
                }
                Ok(uri)
            })
            .transpose()?;
        let min_requests = self.count(canary.min_requests, 100, "min_requests")? as u64;
        if let (CanarySource::Prometheus(_), Some(srm)) = (&source, &canary.checks.srm_p_value) {
            if *srm.get_ref() != 0.0 {
                return Err(self.error(
                    srm.span(),
                    "source = \"prometheus\" cannot judge the sample ratio: the fleet's metrics \
                     count requests, not users, and a request-level test would roll back healthy \
                     canaries whenever users send unequal numbers of requests; leave srm_p_value \
                     out or set it to 0",
                ));
            }
        }
        let mut checks = self.checks(canary.checks, min_requests)?;
        if let CanarySource::Prometheus(_) = source {
            checks.srm_p_value = None;
        }
        let judges_something = checks.srm_p_value.is_some()
            || checks.max_error_rate.is_some()
            || checks.max_error_rate_increase.is_some()
            || checks.max_p99.is_some()
            || checks.max_p99_ratio.is_some()
            || checks.max_prediction_psi.is_some();
        if !judges_something {
            return Err(self.error(
                section,
                "[canary] judges nothing: set at least one check in [canary.checks] (e.g. max_error_rate)",
            ));
        }
        Ok(Canary {
            variant: canary.variant.into_inner(),
            baseline: canary.baseline.into_inner(),
            interval,
            min_requests,
            failures_to_rollback: self.count(
                canary.failures_to_rollback,
                3,
                "failures_to_rollback",
            )? as u32,
            steps,
            analyses_per_step: self.count(canary.analyses_per_step, 5, "analyses_per_step")? as u32,
            state_file: canary.state_file.map(PathBuf::from),
            webhook,
            source,
            checks,
        })
    }

    /// `source` and the `prometheus_*` keys, which make sense only together.
    fn source(&self, canary: &raw::Canary, interval: Duration) -> Result<CanarySource> {
        let prometheus = match &canary.source {
            None => false,
            Some(source) => match source.get_ref().as_str() {
                "local" => false,
                "prometheus" => true,
                other => {
                    return Err(self.error(
                        source.span(),
                        format!("source must be \"local\" or \"prometheus\", not {other:?}"),
                    ))
                }
            },
        };
        if !prometheus {
            let keys = [
                ("prometheus_url", &canary.prometheus_url),
                ("prometheus_token_file", &canary.prometheus_token_file),
                ("prometheus_timeout", &canary.prometheus_timeout),
                ("prometheus_query_offset", &canary.prometheus_query_offset),
                ("prometheus_selector", &canary.prometheus_selector),
            ];
            if let Some((key, value)) = keys.iter().find_map(|(k, v)| v.as_ref().map(|v| (k, v))) {
                return Err(
                    self.error(value.span(), format!("{key} needs source = \"prometheus\""))
                );
            }
            return Ok(CanarySource::Local);
        }
        let Some(url) = &canary.prometheus_url else {
            let span = canary
                .source
                .as_ref()
                .map(Spanned::span)
                .unwrap_or_default();
            return Err(self.error(
                span,
                "source = \"prometheus\" needs prometheus_url, the Prometheus server that scrapes \
                 every replica (e.g. \"http://prometheus:9090\")",
            ));
        };
        let base = url.get_ref().trim_end_matches('/');
        let parsed: Option<Uri> = format!("{base}/api/v1/query").parse().ok();
        let plain_http = parsed.as_ref().is_some_and(|uri| {
            uri.scheme() == Some(&http::uri::Scheme::HTTP)
                && uri.authority().is_some_and(|a| !a.host().is_empty())
                && uri.query().is_none()
        });
        if !plain_http {
            return Err(self.error(
                url.span(),
                format!(
                    "prometheus_url {:?} must be an http:// URL such as \"http://prometheus:9090\" \
                     (a path prefix is allowed, a query is not; abproxy's own calls are plain HTTP)",
                    url.get_ref()
                ),
            ));
        }
        // Two scrapes at least must fall in an interval for `increase()` to see a change.
        if interval < Duration::from_secs(1) {
            let span = canary
                .interval
                .as_ref()
                .map(Spanned::span)
                .unwrap_or_default();
            return Err(self.error(
                span,
                "with source = \"prometheus\" the interval must be at least 1s, and should be \
                 at least four scrape intervals",
            ));
        }
        let token_file = canary
            .prometheus_token_file
            .as_ref()
            .map(|path| self.secret_file(path, "prometheus_token_file"))
            .transpose()?;
        let selector = match &canary.prometheus_selector {
            None => String::new(),
            Some(text) => crate::canary::prometheus::selector(text.get_ref())
                .map_err(|why| self.error(text.span(), format!("prometheus_selector: {why}")))?,
        };
        Ok(CanarySource::Prometheus(PrometheusSource {
            url: base.to_owned(),
            token_file,
            timeout: self.duration(canary.prometheus_timeout.clone(), Duration::from_secs(5))?,
            query_offset: self.duration(
                canary.prometheus_query_offset.clone(),
                Duration::from_secs(5),
            )?,
            selector,
        }))
    }

    /// Ramp steps: increasing, whole buckets, and within what the canary and its baseline
    /// hold together.
    fn steps(&self, steps: &Spanned<Vec<f64>>, pool: f64, buckets: u32) -> Result<Vec<f64>> {
        let list = steps.get_ref();
        let invalid = |message: String| Err(self.error(steps.span(), message));
        if list.is_empty() {
            return invalid("steps must list at least one weight".into());
        }
        if !list.windows(2).all(|pair| pair[0] < pair[1]) {
            return invalid(
                "steps must increase: a ramp that shrinks would move users out of the canary"
                    .into(),
            );
        }
        for &step in list {
            if !(step > 0.0 && step <= pool) {
                return invalid(format!(
                    "step {step} is outside 0 < step <= {pool} (the canary's and baseline's weights together)"
                ));
            }
            let exact = step * f64::from(buckets) / 100.0;
            if (exact - f64::from(percent_to_buckets(step, buckets))).abs() > 1e-6 {
                return invalid(format!(
                    "step {step} is not a whole number of buckets ({exact} of {buckets}); raise [assignment] buckets"
                ));
            }
        }
        Ok(list.clone())
    }

    fn checks(&self, checks: raw::Checks, min_requests: u64) -> Result<Checks> {
        let rate =
            |value: Option<Spanned<f64>>, what: &str, range: std::ops::RangeInclusive<f64>| {
                value
                    .map(|value| {
                        let number = *value.get_ref();
                        if range.contains(&number) {
                            Ok(number)
                        } else {
                            Err(self.error(
                                value.span(),
                                format!(
                                    "{what} must be from {} to {}, not {number}",
                                    range.start(),
                                    range.end()
                                ),
                            ))
                        }
                    })
                    .transpose()
            };
        let optional_duration = |text: Option<Spanned<String>>| {
            text.map(|text| self.duration(Some(text), Duration::ZERO))
                .transpose()
        };
        Ok(Checks {
            max_error_rate: rate(checks.max_error_rate, "max_error_rate", 0.0..=1.0)?,
            max_error_rate_increase: rate(
                checks.max_error_rate_increase,
                "max_error_rate_increase",
                0.0..=1.0,
            )?,
            confidence: rate(checks.confidence, "confidence", 0.5..=0.999_999)?.unwrap_or(0.99),
            max_p99: optional_duration(checks.max_p99)?,
            max_p99_ratio: rate(checks.max_p99_ratio, "max_p99_ratio", 1.0..=1000.0)?,
            p99_floor: self.duration(checks.p99_floor, Duration::from_millis(5))?,
            max_prediction_psi: rate(checks.max_prediction_psi, "max_prediction_psi", 0.0..=10.0)?,
            min_predictions: self.count(
                checks.min_predictions,
                min_requests as usize,
                "min_predictions",
            )? as u64,
            srm_p_value: match rate(checks.srm_p_value, "srm_p_value", 0.0..=0.5)? {
                None => Some(0.001),
                Some(0.0) => None,
                Some(p) => Some(p),
            },
        })
    }

    fn limits(&self, limits: raw::Limits) -> Result<Limits> {
        Ok(Limits {
            client_header_timeout: self
                .duration(limits.client_header_timeout, Duration::from_secs(30))?,
            max_body: self.size(limits.max_body, MIB)?,
            request_timeout: self.duration(limits.request_timeout, Duration::from_secs(30))?,
            connect_timeout: self.duration(limits.connect_timeout, Duration::from_secs(1))?,
            // 64: each upstream connection holds ~35 KiB while open; with 1,000 clients at
            // once, 256 cost 8 MiB more peak RSS than 64 for no throughput (BENCHMARKS.md,
            // issue 15). A batching model server wanting more in flight raises it.
            max_upstream_connections: self.count(
                limits.max_upstream_connections,
                64,
                "max_upstream_connections",
            )?,
            h2_connections: match limits.h2_connections {
                Some(count) if !(1..=64).contains(count.get_ref()) => {
                    return Err(self.error(
                        count.span(),
                        format!(
                            "h2_connections must be from 1 to 64, not {}",
                            count.get_ref()
                        ),
                    ))
                }
                Some(count) => *count.get_ref() as usize,
                None => 2,
            },
            shutdown_grace: self.duration(limits.shutdown_grace, Duration::from_secs(30))?,
            client_body_timeout: self
                .duration(limits.client_body_timeout, Duration::from_secs(30))?,
        })
    }

    fn assignment(&self, assignment: raw::Assignment) -> Result<Assignment> {
        let sources = match assignment.sources {
            None => vec![UserIdSource::Header(HeaderName::from_static("x-user-id"))],
            Some(specs) => specs
                .into_iter()
                .map(|spec| {
                    spec.get_ref()
                        .parse()
                        .map_err(|err| self.error(spec.span(), format!("{err}")))
                })
                .collect::<Result<_>>()?,
        };
        let buckets = match assignment.buckets {
            None => 100,
            Some(buckets) => {
                let value = *buckets.get_ref();
                if !(100..=10_000).contains(&value) || value % 100 != 0 {
                    return Err(self.error(
                        buckets.span(),
                        format!("buckets must be a multiple of 100 from 100 to 10000, not {value}"),
                    ));
                }
                value as u32
            }
        };
        let on_missing = match assignment.on_missing {
            None => OnMissing::Random,
            Some(text) => text
                .get_ref()
                .parse()
                .map_err(|err: String| self.error(text.span(), err))?,
        };
        Ok(Assignment {
            sources,
            salt: assignment.salt.unwrap_or_default(),
            buckets,
            on_missing,
            override_header: self.header_name(assignment.override_header)?,
        })
    }

    fn variants(
        &self,
        variants: Vec<Spanned<raw::Variant>>,
        buckets: u32,
        limits: &Limits,
    ) -> Result<Vec<Variant>> {
        let Some(first) = variants.first() else {
            return Err(ConfigError::invalid(
                Location::file(self.path),
                "at least one [[variant]] is required",
            ));
        };
        let first_span = first.span();
        let mut total = 0u64;
        let mut validated = Vec::with_capacity(variants.len());
        let mut names = HashSet::new();
        let fallbacks: Vec<Option<Spanned<String>>> = variants
            .iter()
            .map(|variant| variant.get_ref().fallback.clone())
            .collect();
        for variant in variants {
            let variant = variant.into_inner();
            self.unique(&mut names, &variant.name, "variant")?;
            let name = self.name(&variant.name, "variant")?;
            let weight = *variant.weight.get_ref();
            if !(0.0..=100.0).contains(&weight) {
                return Err(self.error(
                    variant.weight.span(),
                    format!("weight of variant {name:?} must be between 0 and 100, not {weight}"),
                ));
            }
            let exact = weight * f64::from(buckets) / 100.0;
            if (exact - exact.round()).abs() > 1e-6 {
                return Err(self.error(
                    variant.weight.span(),
                    format!(
                        "weight {weight} of variant {name:?} is not a whole number of buckets \
                         ({exact} of {buckets}); raise [assignment] buckets for finer weights"
                    ),
                ));
            }
            total += exact.round() as u64;
            validated.push(Variant {
                upstream: self.upstream(&variant.upstream, variant.upstream_keys(), limits)?,
                weight,
                buckets: exact.round() as u32,
                fallback: None,
                name,
            });
        }
        for (index, fallback) in fallbacks.into_iter().enumerate() {
            let Some(fallback) = fallback else { continue };
            let target = fallback.get_ref();
            let own = &validated[index].name;
            if target == own {
                return Err(self.error(
                    fallback.span(),
                    format!("variant {own:?} cannot fall back to itself"),
                ));
            }
            if !validated.iter().any(|variant| &variant.name == target) {
                return Err(self.error(
                    fallback.span(),
                    format!("fallback {target:?} of variant {own:?} names no [[variant]]"),
                ));
            }
            validated[index].fallback = Some(target.clone());
        }
        if total != u64::from(buckets) {
            let sum: f64 = validated.iter().map(|v| v.weight).sum();
            return Err(self.error(
                first_span,
                format!("variant weights must sum to 100, they sum to {sum}"),
            ));
        }
        Ok(validated)
    }

    fn shadow(&self, shadow: Spanned<raw::Shadow>, limits: &Limits) -> Result<Shadow> {
        let shadow = shadow.into_inner();
        let name = self.name(&shadow.name, "shadow")?;
        let upstream = self.upstream(&shadow.upstream, shadow.upstream_keys(), limits)?;
        let percent = match shadow.percent {
            None => 100.0,
            Some(percent) if (0.0..=100.0).contains(percent.get_ref()) => *percent.get_ref(),
            Some(percent) => {
                return Err(self.error(percent.span(), "percent must be between 0 and 100"))
            }
        };
        let compare = match shadow.compare {
            Some(pointer) => Some(JsonPointer::new(pointer.get_ref()).ok_or_else(|| {
                self.error(
                    pointer.span(),
                    format!(
                        "compare must be a JSON pointer starting with '/', not {:?}",
                        pointer.get_ref()
                    ),
                )
            })?),
            None => None,
        };
        let tolerance = match shadow.tolerance {
            None => 0.0,
            Some(tolerance) if *tolerance.get_ref() >= 0.0 => *tolerance.get_ref(),
            Some(tolerance) => {
                return Err(self.error(tolerance.span(), "tolerance must not be negative"))
            }
        };
        Ok(Shadow {
            upstream,
            percent,
            timeout: self.duration(shadow.timeout, limits.request_timeout)?,
            max_queue: self.count(shadow.max_queue, 1024, "max_queue")?,
            max_queue_bytes: self.size(shadow.max_queue_bytes, 64 * MIB)?,
            max_concurrency: self.count(shadow.max_concurrency, 32, "max_concurrency")?,
            compare,
            tolerance,
            log: shadow.log.map(Into::into),
            log_user_id: shadow.log_user_id.unwrap_or(true),
            log_body_bytes: self.size(shadow.log_body_bytes, 4096)? as usize,
            log_max_size: self.size(shadow.log_max_size, 100 * MIB)?,
            log_keep: self.count(shadow.log_keep, 5, "log_keep")?,
            name,
        })
    }

    fn name(&self, name: &Spanned<String>, what: &str) -> Result<String> {
        let text = name.get_ref();
        let valid = !text.is_empty()
            && text.len() <= 64
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            return Err(self.error(
                name.span(),
                format!("{what} name {text:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"),
            ));
        }
        if text == "none" {
            return Err(self.error(
                name.span(),
                "\"none\" is reserved: metrics use it for requests refused before assignment",
            ));
        }
        Ok(text.clone())
    }

    /// Fails at the second use of a name.
    fn unique(&self, seen: &mut HashSet<String>, name: &Spanned<String>, what: &str) -> Result<()> {
        if seen.insert(name.get_ref().clone()) {
            Ok(())
        } else {
            Err(self.error(
                name.span(),
                format!("{what} name {:?} is used twice", name.get_ref()),
            ))
        }
    }

    fn upstream(
        &self,
        url: &Spanned<String>,
        keys: raw::UpstreamKeys<'_>,
        limits: &Limits,
    ) -> Result<Upstream> {
        let tls = &keys;
        let invalid =
            |why: &str| self.error(url.span(), format!("upstream {:?} {why}", url.get_ref()));
        let uri: Uri = url
            .get_ref()
            .parse()
            .map_err(|_| invalid("is not a valid URL"))?;
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(invalid(
                "must be an absolute URL such as http://127.0.0.1:9101",
            ));
        };
        let https = scheme == &http::uri::Scheme::HTTPS;
        if !https && scheme != &http::uri::Scheme::HTTP {
            return Err(invalid("must use http:// or https://"));
        }
        if uri.query().is_some() {
            return Err(invalid("must not have a query string"));
        }
        if authority.as_str().contains('@') {
            return Err(invalid("must not carry credentials"));
        }
        let protocol = match keys.protocol {
            None => Protocol::Http1,
            Some(text) => {
                let protocol = match text.get_ref().as_str() {
                    "http1" => Protocol::Http1,
                    "h2" if https => Protocol::H2,
                    "h2c" if !https => Protocol::H2c,
                    "h2" => {
                        return Err(self.error(
                            text.span(),
                            "protocol \"h2\" is HTTP/2 over TLS and needs an https:// upstream; \
                             use \"h2c\" for HTTP/2 over plain TCP",
                        ))
                    }
                    "h2c" => {
                        return Err(self.error(
                            text.span(),
                            "protocol \"h2c\" is HTTP/2 over plain TCP; an https:// upstream \
                             takes \"h2\"",
                        ))
                    }
                    other => {
                        return Err(self.error(
                            text.span(),
                            format!("protocol must be \"http1\", \"h2\" or \"h2c\", not {other:?}"),
                        ))
                    }
                };
                protocol
            }
        };
        let tls = if https {
            Some(self.client_tls(tls, authority.host(), url, protocol)?)
        } else {
            let keys = [tls.ca, tls.server_name, tls.client_cert, tls.client_key];
            if let Some(key) = keys.into_iter().flatten().next() {
                return Err(self.error(
                    key.span(),
                    "ca, server_name, client_cert and client_key apply to https:// upstreams only",
                ));
            }
            None
        };
        Ok(Upstream {
            scheme: scheme.clone(),
            authority: authority.clone(),
            path_prefix: uri.path().trim_end_matches('/').to_owned(),
            tls,
            protocol,
            h2_connections: if protocol == Protocol::Http1 {
                0
            } else {
                limits.h2_connections
            },
        })
    }

    /// Loads an https upstream's TLS files now, so that `check` catches a bad one and the
    /// request path never meets one.
    fn client_tls(
        &self,
        tls: &raw::UpstreamKeys<'_>,
        host: &str,
        url: &Spanned<String>,
        protocol: Protocol,
    ) -> Result<ClientTls> {
        let path = |key: &Option<Spanned<String>>| key.as_ref().map(|k| PathBuf::from(k.get_ref()));
        let settings = TlsSettings {
            ca: path(tls.ca),
            server_name: tls.server_name.as_ref().map(|name| name.get_ref().clone()),
            client_cert: path(tls.client_cert),
            client_key: path(tls.client_key),
        };
        // IPv6 literals keep their brackets in the URL, not in a certificate's names.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ClientTls::load(&settings, host, protocol == Protocol::H2).map_err(|err| {
            let blamed = match &err {
                TlsError::ServerName(_) => tls.server_name,
                TlsError::Read { path, .. }
                | TlsError::NoCertificate(path)
                | TlsError::NoKey(path)
                | TlsError::Invalid { path, .. } => [tls.ca, tls.client_cert, tls.client_key]
                    .into_iter()
                    .find(|key| key.as_ref().is_some_and(|k| Path::new(k.get_ref()) == path))
                    .unwrap_or(tls.client_key),
                TlsError::HalfIdentity => {
                    if tls.client_cert.is_some() {
                        tls.client_cert
                    } else {
                        tls.client_key
                    }
                }
                TlsError::NoSystemRoots => &None,
            };
            // Without a key of its own to blame, the error is the upstream's.
            let span = blamed.as_ref().map_or(url.span(), Spanned::span);
            self.error(span, err.to_string())
        })
    }

    fn socket_addr(
        &self,
        addr: Option<Spanned<String>>,
        default: SocketAddr,
    ) -> Result<SocketAddr> {
        let Some(addr) = addr else { return Ok(default) };
        addr.get_ref().parse().map_err(|_| {
            self.error(
                addr.span(),
                format!(
                    "{:?} is not an IP:port address such as 127.0.0.1:8080",
                    addr.get_ref()
                ),
            )
        })
    }

    /// The response header naming the variant; one that HTTP itself gives meaning to would
    /// corrupt every response.
    fn variant_header(&self, name: Option<Spanned<String>>) -> Result<HeaderName> {
        let span = name.as_ref().map(Spanned::span);
        let header = self
            .header_name(name)?
            .unwrap_or(HeaderName::from_static("x-variant"));
        let reserved = [
            http::header::CONTENT_LENGTH,
            http::header::CONTENT_TYPE,
            http::header::CONTENT_ENCODING,
            http::header::TRANSFER_ENCODING,
            http::header::CONNECTION,
            http::header::HOST,
            http::header::DATE,
            http::header::SET_COOKIE,
            http::header::UPGRADE,
            http::header::TRAILER,
        ];
        match span {
            Some(span) if reserved.contains(&header) => Err(self.error(
                span,
                format!("variant_header {header:?} is a standard HTTP header; pick a name of your own such as \"x-variant\""),
            )),
            _ => Ok(header),
        }
    }

    fn header_name(&self, name: Option<Spanned<String>>) -> Result<Option<HeaderName>> {
        name.map(|name| {
            HeaderName::from_bytes(name.get_ref().as_bytes()).map_err(|_| {
                self.error(
                    name.span(),
                    format!("{:?} is not a valid HTTP header name", name.get_ref()),
                )
            })
        })
        .transpose()
    }

    fn duration(&self, text: Option<Spanned<String>>, default: Duration) -> Result<Duration> {
        let Some(text) = text else { return Ok(default) };
        match humantime::parse_duration(text.get_ref()) {
            Ok(duration) if duration > MAX_DURATION => Err(self.error(
                text.span(),
                "durations are limited to 365 days: timers set further out would overflow the clock",
            )),
            Ok(duration) if !duration.is_zero() => Ok(duration),
            Ok(_) => Err(self.error(text.span(), "duration must be greater than zero")),
            Err(err) => Err(self.error(
                text.span(),
                format!(
                    "{:?} is not a duration such as \"250ms\" or \"30s\": {err}",
                    text.get_ref()
                ),
            )),
        }
    }

    fn size(&self, size: Option<Spanned<Size>>, default: u64) -> Result<u64> {
        let Some(size) = size else { return Ok(default) };
        let bytes = match size.get_ref() {
            Size::Bytes(bytes) => u64::try_from(*bytes).ok(),
            Size::Text(text) => parse_size(text),
        };
        bytes.filter(|&bytes| bytes > 0).ok_or_else(|| {
            self.error(
                size.span(),
                "size must be a positive number of bytes or a string such as \"512KiB\" or \"1MiB\"",
            )
        })
    }

    /// A positive count up to `MAX_COUNT`: queues, task pools and semaphores are sized by
    /// these, so a typo of a few extra digits must not become a huge allocation or a panic.
    fn count(&self, count: Option<Spanned<i64>>, default: usize, what: &str) -> Result<usize> {
        let Some(count) = count else {
            return Ok(default);
        };
        usize::try_from(*count.get_ref())
            .ok()
            .filter(|count| (1..=MAX_COUNT).contains(count))
            .ok_or_else(|| {
                self.error(
                    count.span(),
                    format!("{what} must be an integer from 1 to {MAX_COUNT}"),
                )
            })
    }
}

/// `"1MiB"`, `"512 KiB"`, `"100KB"`, `"2048"` → bytes.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::parse_size;
    use crate::config::Config;

    /// Found by tests/fuzz.rs (`mutated_examples_load_or_fail_with_file_line_and_column`):
    /// this error alone named the file but no line.
    #[test]
    fn too_many_shadows_point_at_the_first_shadow_too_many() {
        let mut text = String::from(
            "[[variant]]\nname = \"control\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n",
        );
        for n in 0..65 {
            text.push_str(&format!(
                "[[shadow]]\nname = \"s{n}\"\nupstream = \"http://127.0.0.1:2\"\n"
            ));
        }
        let err = Config::parse(&text, Path::new("test.toml")).expect_err("65 shadows");
        // Four lines of variant, then three lines a shadow: the 65th starts on line 197.
        assert_eq!(
            err.to_string(),
            "test.toml:197:1: at most 64 [[shadow]] entries are supported"
        );
        text.truncate(text.rfind("[[shadow]]").expect("a shadow"));
        Config::parse(&text, Path::new("test.toml")).expect("64 shadows are fine");
    }

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("512 KiB"), Some(512 << 10));
        assert_eq!(parse_size("100KB"), Some(100_000));
        assert_eq!(parse_size("2048"), Some(2048));
        assert_eq!(parse_size("1.5MiB"), None);
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("1 parsec"), None);
    }
}
