//! The result of a run: numbers a person reads in a table and a script reads as JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::options::{Mode, Options};
use crate::stats::{ErrorCounts, Recorder, StickinessSummary, VariantId};
use crate::tls::Negotiated;

/// The split the deployment is configured for, e.g. `control=80,treatment=20`.
///
/// Weights are normalised, so `4,1` and `80,20` mean the same; order is kept for display.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpectedSplit {
    weights: Vec<(String, f64)>,
}

/// An `--expect` value that is not a split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpectError {
    #[error("expected NAME=WEIGHT[,NAME=WEIGHT...], got {0:?}")]
    Syntax(String),
    #[error("weight of {name:?} must be a number >= 0, got {weight:?}")]
    Weight { name: String, weight: String },
    #[error("variant {0:?} is listed twice")]
    Duplicate(String),
    #[error("the weights sum to zero")]
    ZeroTotal,
}

impl FromStr for ExpectedSplit {
    type Err = ExpectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut weights: Vec<(String, f64)> = Vec::new();
        for part in s.split(',') {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| ExpectError::Syntax(s.to_owned()))?;
            let name = name.trim();
            if name.is_empty() {
                return Err(ExpectError::Syntax(s.to_owned()));
            }
            let value: f64 = weight
                .trim()
                .trim_end_matches('%')
                .parse()
                .ok()
                .filter(|w: &f64| w.is_finite() && *w >= 0.0)
                .ok_or_else(|| ExpectError::Weight {
                    name: name.to_owned(),
                    weight: weight.to_owned(),
                })?;
            if weights.iter().any(|(n, _)| n == name) {
                return Err(ExpectError::Duplicate(name.to_owned()));
            }
            weights.push((name.to_owned(), value));
        }
        if weights.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
            return Err(ExpectError::ZeroTotal);
        }
        Ok(ExpectedSplit { weights })
    }
}

impl ExpectedSplit {
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Expected share of `variant` in percent; `None` when no split was given at all.
    pub fn percent(&self, variant: &str) -> Option<f64> {
        if self.weights.is_empty() {
            return None;
        }
        let total: f64 = self.weights.iter().map(|(_, w)| w).sum();
        let weight = self
            .weights
            .iter()
            .find(|(name, _)| name == variant)
            .map_or(0.0, |(_, w)| *w);
        Some(100.0 * weight / total)
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.weights.iter().map(|(name, _)| name.as_str())
    }
}

/// Latency of answered requests, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// One variant's share of the traffic.
///
/// Both shares are reported because they answer different questions: abproxy assigns *users*
/// to buckets, so `users_pct` should track the configured weights, while `requests_pct` also
/// reflects how active the users behind each variant were (heavy Zipf users skew it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitRow {
    pub variant: String,
    /// Answers carrying this variant.
    pub requests: u64,
    pub requests_pct: f64,
    /// Users whose first answer came from this variant.
    pub users: u64,
    pub users_pct: f64,
    pub expected_pct: Option<f64>,
    /// `requests_pct - expected_pct`, in percentage points.
    pub requests_diff_pct: Option<f64>,
    /// `users_pct - expected_pct`, in percentage points.
    pub users_diff_pct: Option<f64>,
}

/// Rows for the expected variants (in the order given) followed by any unexpected ones.
///
/// `names[i]` is the variant whose answers and first-answered users are `answers[i]` and
/// `users[i]`; the slices may be shorter than `names` when the counts there are zero.
pub fn split_rows(
    names: &[String],
    answers: &[u64],
    users: &[u64],
    expected: &ExpectedSplit,
) -> Vec<SplitRow> {
    let total_answers: u64 = answers.iter().sum();
    let total_users: u64 = users.iter().sum();
    let at = |counts: &[u64], name: &str| {
        names
            .iter()
            .position(|n| n == name)
            .and_then(|i| counts.get(i).copied())
            .unwrap_or(0)
    };
    let mut order: Vec<&str> = expected.names().collect();
    for name in names {
        if !order.contains(&name.as_str()) {
            order.push(name);
        }
    }
    order
        .into_iter()
        .map(|name| {
            let requests = at(answers, name);
            let users = at(users, name);
            let requests_pct = percent(requests, total_answers);
            let users_pct = percent(users, total_users);
            let expected_pct = expected.percent(name);
            SplitRow {
                variant: name.to_owned(),
                requests,
                requests_pct,
                users,
                users_pct,
                expected_pct,
                requests_diff_pct: expected_pct.map(|e| requests_pct - e),
                users_diff_pct: expected_pct.map(|e| users_pct - e),
            }
        })
        .collect()
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// Users answered by more than one variant: abproxy promises a user keeps its variant for
/// a config generation, so any such user is a bug (or a reload in the middle of the run).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StickinessReport {
    pub users_seen: u64,
    pub violations: u64,
    /// The first few offenders, to reproduce with `abproxy assign`.
    pub examples: Vec<ViolationReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ViolationReport {
    pub user: String,
    pub first: String,
    pub then: String,
}

/// Handshakes that settled on the same parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NegotiatedCount {
    #[serde(flatten)]
    pub negotiated: Negotiated,
    pub count: u64,
}

/// The TLS side of a run against an `https://` target.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsReport {
    /// Whether the client offered to resume sessions (`--tls-resume`); without it every
    /// handshake is a full one.
    pub resumption: bool,
    /// Handshakes completed in the measured phase.
    pub handshakes: u64,
    /// What they settled on, most frequent first: normally one entry.
    pub negotiated: Vec<NegotiatedCount>,
    /// Why the first failed handshake failed, if one did (they count as `errors.tls`).
    pub first_error: Option<String>,
}

/// Everything measured in one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub target: String,
    pub mode: &'static str,
    /// Requests per second asked for in rate mode.
    pub rate: Option<f64>,
    pub connections: usize,
    /// A fresh connection per request (`--new-connections`): `throughput_rps` is then also
    /// the rate of connections (TLS handshakes) completed with their request.
    pub new_connections: bool,
    /// Connections opened in the measured phase (connected, and through the TLS handshake
    /// for https); keep-alive runs open `connections` of them, or more after failures.
    pub connections_opened: u64,
    /// `None` for an `http://` target.
    pub tls: Option<TlsReport>,
    pub users: u32,
    pub distribution: String,
    pub id_source: String,
    pub seed: u64,
    pub elapsed_seconds: f64,
    /// Requests sent or given up on (rate-mode requests that never found a connection).
    pub requests: u64,
    /// Requests that got an HTTP answer, any status.
    pub answers: u64,
    /// Answers per second over the measured phase.
    pub throughput_rps: f64,
    /// `None` when nothing was answered.
    pub latency_us: Option<Latency>,
    pub errors: ErrorCounts,
    pub errors_total: u64,
    /// `errors_total / requests`, between 0 and 1.
    pub error_rate: f64,
    pub status_codes: BTreeMap<u16, u64>,
    pub variant_header: String,
    /// Answers without the variant header: not routed by abproxy, or the wrong header name.
    pub missing_variant_header: u64,
    pub split: Vec<SplitRow>,
    pub stickiness: StickinessReport,
}

impl Report {
    /// Assembles the report from the merged measurements of the run.
    pub(crate) fn new(
        options: &Options,
        recorded: &Recorder,
        variant_names: &[String],
        stickiness: &StickinessSummary,
        elapsed: Duration,
    ) -> Self {
        let seconds = elapsed.as_secs_f64();
        let latency = &recorded.latency_us;
        let latency_us = (!latency.is_empty()).then(|| Latency {
            p50: latency.value_at_quantile(0.50),
            p90: latency.value_at_quantile(0.90),
            p99: latency.value_at_quantile(0.99),
            p999: latency.value_at_quantile(0.999),
            max: latency.max(),
            mean: latency.mean(),
        });
        let name = |id: &VariantId| {
            variant_names
                .get(id.index())
                .cloned()
                .unwrap_or_else(|| "?".to_owned())
        };
        let errors_total = recorded.errors.total();
        let (mode, rate) = match options.mode {
            Mode::Max => ("max", None),
            Mode::Rate { per_second } => ("rate", Some(per_second)),
        };
        Report {
            target: options.target.to_string(),
            mode,
            rate,
            connections: options.connections,
            new_connections: options.new_connections,
            connections_opened: recorded.connections_opened,
            tls: options.target.is_https().then(|| {
                let mut negotiated: Vec<NegotiatedCount> = recorded
                    .handshakes
                    .iter()
                    .map(|(negotiated, count)| NegotiatedCount {
                        negotiated: negotiated.clone(),
                        count: *count,
                    })
                    .collect();
                negotiated.sort_by_key(|n| std::cmp::Reverse(n.count));
                TlsReport {
                    resumption: options.tls.resumption,
                    handshakes: negotiated.iter().map(|n| n.count).sum(),
                    negotiated,
                    first_error: recorded.first_tls_error.clone(),
                }
            }),
            users: options.population.users(),
            distribution: options.population.distribution().to_string(),
            id_source: options.id_source.to_string(),
            seed: options.seed,
            elapsed_seconds: seconds,
            requests: recorded.requests,
            answers: recorded.answers,
            throughput_rps: if seconds > 0.0 {
                recorded.answers as f64 / seconds
            } else {
                0.0
            },
            latency_us,
            errors: recorded.errors,
            errors_total,
            error_rate: if recorded.requests == 0 {
                0.0
            } else {
                errors_total as f64 / recorded.requests as f64
            },
            status_codes: recorded.statuses.clone(),
            variant_header: options.variant_header.to_string(),
            missing_variant_header: recorded.missing_variant,
            split: split_rows(
                variant_names,
                &recorded.variant_answers,
                &stickiness.users_by_variant,
                &options.expected,
            ),
            stickiness: StickinessReport {
                users_seen: stickiness.users_seen(),
                violations: stickiness.violations,
                examples: stickiness
                    .examples
                    .iter()
                    .map(|v| ViolationReport {
                        user: v.user.to_string(),
                        first: name(&v.first),
                        then: name(&v.then),
                    })
                    .collect(),
            },
        }
    }
}

/// Pass/fail rules for scripted runs (CI, canary gates).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Checks {
    /// Fail when any user was answered by two variants.
    pub fail_on_stickiness: bool,
    /// Fail when `error_rate` exceeds this fraction (0..=1).
    pub max_error_rate: Option<f64>,
}

impl Checks {
    /// One line per failed check; empty when the run passes.
    pub fn failures(&self, report: &Report) -> Vec<String> {
        let mut failures = Vec::new();
        if self.fail_on_stickiness && report.stickiness.violations > 0 {
            failures.push(format!(
                "stickiness: {} user(s) answered by more than one variant",
                report.stickiness.violations
            ));
        }
        if let Some(max) = self.max_error_rate {
            if report.error_rate > max {
                failures.push(format!(
                    "error rate {:.3}% is above the allowed {:.3}%",
                    100.0 * report.error_rate,
                    100.0 * max
                ));
            }
        }
        failures
    }
}

/// The human-readable table printed at the end of a run.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pace = match self.rate {
            Some(rate) => format!("rate {rate} req/s"),
            None => "max throughput".to_owned(),
        };
        let connections = if self.new_connections {
            format!(
                "{} concurrent new connections (one request each)",
                self.connections
            )
        } else {
            format!("{} connections", self.connections)
        };
        writeln!(
            f,
            "{pace} on {connections} -> {} for {:.2}s",
            self.target, self.elapsed_seconds
        )?;
        writeln!(
            f,
            "{} users ({}) sent as {}, seed {}",
            self.users, self.distribution, self.id_source, self.seed
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "requests    {:>10}   answered {:>10}   throughput {:>10.1} req/s",
            self.requests, self.answers, self.throughput_rps
        )?;
        match &self.latency_us {
            Some(l) => writeln!(
                f,
                "latency     p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {}",
                micros(l.p50),
                micros(l.p90),
                micros(l.p99),
                micros(l.p999),
                micros(l.max),
                micros(l.mean.round() as u64)
            )?,
            None => writeln!(f, "latency     no answers")?,
        }
        if let Some(tls) = &self.tls {
            let resumption = if tls.resumption {
                "resumption offered"
            } else {
                "no resumption"
            };
            writeln!(
                f,
                "tls         {} handshakes ({resumption}), {:.1}/s",
                tls.handshakes,
                if self.elapsed_seconds > 0.0 {
                    tls.handshakes as f64 / self.elapsed_seconds
                } else {
                    0.0
                }
            )?;
            for NegotiatedCount { negotiated, count } in &tls.negotiated {
                writeln!(
                    f,
                    "            {} {} {} ALPN {} {}: {count}",
                    negotiated.version,
                    negotiated.cipher_suite,
                    negotiated.key_exchange.as_deref().unwrap_or("-"),
                    negotiated.alpn.as_deref().unwrap_or("-"),
                    negotiated.handshake,
                )?;
            }
            if let Some(error) = &tls.first_error {
                writeln!(f, "            first failed handshake: {error}")?;
            }
        } else if self.new_connections {
            writeln!(f, "connections {} opened", self.connections_opened)?;
        }
        let e = &self.errors;
        writeln!(
            f,
            "errors      {} ({:.2}%)   connect {}  tls {}  timeout {}  4xx {}  5xx {}  io/reset {}  other {}",
            self.errors_total,
            100.0 * self.error_rate,
            e.connect,
            e.tls,
            e.timeout,
            e.status_4xx,
            e.status_5xx,
            e.io,
            e.other
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<16} {:>10} {:>7} {:>8} {:>7} {:>9} {:>8} {:>8}",
            format!("{}:", self.variant_header),
            "requests",
            "req %",
            "users",
            "user %",
            "expected",
            "Δ req",
            "Δ users"
        )?;
        for row in &self.split {
            writeln!(
                f,
                "{:<16} {:>10} {:>6.2}% {:>8} {:>6.2}% {:>9} {:>8} {:>8}",
                row.variant,
                row.requests,
                row.requests_pct,
                row.users,
                row.users_pct,
                row.expected_pct
                    .map_or_else(|| "-".to_owned(), |p| format!("{p:.2}%")),
                points(row.requests_diff_pct),
                points(row.users_diff_pct)
            )?;
        }
        if self.missing_variant_header > 0 || self.split.is_empty() {
            writeln!(
                f,
                "{:<16} {:>10}",
                "(no header)", self.missing_variant_header
            )?;
        }
        writeln!(f)?;
        write!(
            f,
            "stickiness  {} of {} users answered by more than one variant",
            self.stickiness.violations, self.stickiness.users_seen
        )?;
        for v in &self.stickiness.examples {
            write!(f, "\n  {}: {} then {}", v.user, v.first, v.then)?;
        }
        writeln!(f)
    }
}

fn micros(us: u64) -> String {
    match us {
        0..=9_999 => format!("{us}µs"),
        10_000..=9_999_999 => format!("{:.2}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

fn points(diff: Option<f64>) -> String {
    diff.map_or_else(|| "-".to_owned(), |d| format!("{d:+.2}pp"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::HeaderValue;

    use super::*;
    use crate::options::Target;
    use crate::population::UserId;
    use crate::stats::Shared;

    fn expect(s: &str) -> ExpectedSplit {
        s.parse().expect("valid split")
    }

    #[test]
    fn expected_split_normalises_weights() {
        let split = expect("control=4, treatment=1");
        assert_eq!(split.percent("control"), Some(80.0));
        assert_eq!(split.percent("treatment"), Some(20.0));
        assert_eq!(split.percent("other"), Some(0.0));
        assert_eq!(ExpectedSplit::default().percent("control"), None);
        assert_eq!(expect("a=80%,b=20%").percent("a"), Some(80.0));
    }

    #[test]
    fn expected_split_rejects_malformed_lists() {
        for bad in ["", "control", "=5", "a=x", "a=-1", "a=0,b=0", "a=inf"] {
            assert!(bad.parse::<ExpectedSplit>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            "a=1,a=2".parse::<ExpectedSplit>(),
            Err(ExpectError::Duplicate("a".into()))
        );
    }

    #[test]
    fn split_rows_compare_observed_with_expected_in_expected_order() {
        let names = vec![
            "treatment".to_owned(),
            "control".to_owned(),
            "ghost".to_owned(),
        ];
        let rows = split_rows(
            &names,
            &[250, 700, 50],
            &[20, 78, 2],
            &expect("control=80,treatment=20,canary=0"),
        );
        let variants: Vec<&str> = rows.iter().map(|r| r.variant.as_str()).collect();
        assert_eq!(variants, ["control", "treatment", "canary", "ghost"]);
        let control = &rows[0];
        assert_eq!((control.requests, control.users), (700, 78));
        assert!((control.requests_pct - 70.0).abs() < 1e-9);
        assert!((control.users_pct - 78.0).abs() < 1e-9);
        assert_eq!(control.expected_pct, Some(80.0));
        assert!((control.requests_diff_pct.expect("expected") + 10.0).abs() < 1e-9);
        assert!((control.users_diff_pct.expect("expected") + 2.0).abs() < 1e-9);
        let canary = &rows[2];
        assert_eq!((canary.requests, canary.requests_pct), (0, 0.0));
        let ghost = &rows[3];
        assert_eq!(ghost.expected_pct, Some(0.0));
        assert!((ghost.requests_diff_pct.expect("expected") - 5.0).abs() < 1e-9);
    }

    #[test]
    fn split_rows_without_expectation_have_no_difference() {
        let rows = split_rows(&["a".to_owned()], &[3], &[1], &ExpectedSplit::default());
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].requests_pct, 100.0);
        assert_eq!(rows[0].expected_pct, None);
        assert_eq!(rows[0].requests_diff_pct, None);
    }

    /// Feeds the answers of a deterministic router through the recorders, as the driver does.
    fn report_for(answers: &[(u32, &'static str)], expected: &str) -> Report {
        let shared = Arc::new(Shared::new(10));
        let mut first = Recorder::new(shared.clone());
        let mut second = Recorder::new(shared.clone());
        for (i, (user, variant)) in answers.iter().enumerate() {
            let recorder = if i % 2 == 0 { &mut first } else { &mut second };
            let value = HeaderValue::from_static(variant);
            recorder.answer(
                UserId(*user),
                200,
                Duration::from_micros(100 + i as u64),
                Some(&value),
            );
        }
        first.merge(&second);
        let mut options = Options::new(Target::parse("http://127.0.0.1:1").expect("valid URL"));
        options.expected = expect(expected);
        Report::new(
            &options,
            &first,
            &shared.variants.snapshot(),
            &shared.stickiness.summary(),
            Duration::from_secs(2),
        )
    }

    #[test]
    fn report_computes_split_and_stickiness_from_recorded_answers() {
        let answers = [
            (1, "control"),
            (2, "treatment"),
            (1, "control"),
            (3, "control"),
            (1, "control"),
            (2, "treatment"),
        ];
        let report = report_for(&answers, "control=50,treatment=50");
        assert_eq!(
            (report.requests, report.answers, report.errors_total),
            (6, 6, 0)
        );
        assert!((report.throughput_rps - 3.0).abs() < 1e-9);
        assert_eq!(report.split[0].variant, "control");
        assert_eq!((report.split[0].requests, report.split[0].users), (4, 2));
        assert_eq!((report.split[1].requests, report.split[1].users), (2, 1));
        assert_eq!(report.stickiness.users_seen, 3);
        assert_eq!(report.stickiness.violations, 0);
        let latency = report.latency_us.expect("answers were recorded");
        assert_eq!(latency.max, 105);
        assert!(Checks {
            fail_on_stickiness: true,
            max_error_rate: Some(0.0)
        }
        .failures(&report)
        .is_empty());
    }

    #[test]
    fn report_flags_a_user_answered_by_two_variants() {
        let answers = [(1, "control"), (2, "control"), (1, "treatment")];
        let report = report_for(&answers, "control=80,treatment=20");
        assert_eq!(report.stickiness.violations, 1);
        assert_eq!(
            report.stickiness.examples,
            vec![ViolationReport {
                user: "user-1".into(),
                first: "control".into(),
                then: "treatment".into()
            }]
        );
        let checks = Checks {
            fail_on_stickiness: true,
            max_error_rate: None,
        };
        assert_eq!(checks.failures(&report).len(), 1);
        let table = report.to_string();
        assert!(
            table.contains("1 of 2 users answered by more than one variant"),
            "{table}"
        );
        assert!(table.contains("user-1: control then treatment"), "{table}");
    }

    #[test]
    fn error_rate_check_compares_against_the_threshold() {
        let mut report = report_for(&[(1, "control")], "control=100");
        report.error_rate = 0.02;
        let checks = |max| Checks {
            fail_on_stickiness: false,
            max_error_rate: Some(max),
        };
        assert_eq!(checks(0.05).failures(&report), Vec::<String>::new());
        assert_eq!(checks(0.01).failures(&report).len(), 1);
    }

    #[test]
    fn report_serializes_to_one_json_object() {
        let report = report_for(&[(1, "control")], "control=100");
        let json = serde_json::to_value(&report).expect("serializable");
        assert_eq!(json["answers"], 1);
        assert_eq!(json["split"][0]["variant"], "control");
        assert_eq!(json["stickiness"]["violations"], 0);
        assert_eq!(json["errors"]["status_5xx"], 0);
        assert_eq!(json["status_codes"]["200"], 1);
    }
}
