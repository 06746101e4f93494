//! One interval's judgement of the canary against its baseline: pure functions of the
//! interval's samples and the run's cumulative counts, so they are tested on generated data.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::stats::{self, Proportions};
use super::window::{latency_quantile, ArmSample};
use crate::config::Canary;

/// Baseline quantile bins of the PSI, the customary ten.
const PSI_BINS: usize = 10;

/// What one check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    /// Too little data to judge.
    Inconclusive,
    /// Not judged: a sample-ratio mismatch makes every comparison of the arms meaningless.
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Inconclusive => "inconclusive",
            Outcome::Skipped => "skipped",
        }
    }
}

/// One check's result, with the figures it was decided on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub outcome: Outcome,
    /// In words, with the figures: "error rate 4.1 % > ceiling 2 %".
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
}

/// The interval's verdict: failed if any check failed, inconclusive if any configured check
/// lacked data (no data is never a pass), passed otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub requests: u64,
    pub failures: u64,
}

/// One interval, judged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Analysis {
    pub verdict: Verdict,
    /// The failing (or missing) figures in one line, for logs, `/status` and webhooks.
    pub summary: String,
    pub canary: Counts,
    pub baseline: Counts,
    pub checks: Vec<Check>,
}

/// The two arms' samples of one interval.
pub struct Interval<'a> {
    pub canary: &'a ArmSample,
    pub baseline: &'a ArmSample,
    /// The canary's configured share of the units that reached either arm.
    pub canary_share: f64,
}

/// Judges one interval. `cumulative` holds the run's counts, this interval's included: the
/// error-rate comparison is a sequential test over the whole run.
pub fn analyse(config: &Canary, interval: &Interval<'_>, cumulative: Proportions) -> Analysis {
    let (canary, baseline) = (interval.canary, interval.baseline);
    let counts = |arm: &ArmSample| Counts {
        requests: arm.requests,
        failures: arm.failures,
    };
    let mut analysis = Analysis {
        verdict: Verdict::Inconclusive,
        summary: String::new(),
        canary: counts(canary),
        baseline: counts(baseline),
        checks: Vec::new(),
    };
    if canary.requests < config.min_requests || baseline.requests < config.min_requests {
        analysis.checks.push(Check {
            check: "traffic",
            outcome: Outcome::Inconclusive,
            detail: format!(
                "too little traffic: {} {} and {} {} requests, {} each needed",
                config.variant,
                canary.requests,
                config.baseline,
                baseline.requests,
                config.min_requests
            ),
            p_value: None,
            value: None,
        });
        return analysis.conclude();
    }
    let checks = &config.checks;
    if let Some(alarm) = checks.srm_p_value {
        let check = sample_ratio(interval, alarm);
        let mismatch = check.outcome == Outcome::Fail;
        analysis.checks.push(check);
        if mismatch {
            // Every other comparison assumes the split works; say so rather than judge.
            for name in configured_checks(config) {
                analysis.checks.push(Check {
                    check: name,
                    outcome: Outcome::Skipped,
                    detail: "not judged: the split itself is broken".into(),
                    p_value: None,
                    value: None,
                });
            }
            return analysis.conclude();
        }
    }
    let rate = |arm: &ArmSample| arm.failures as f64 / arm.requests as f64;
    if let Some(ceiling) = checks.max_error_rate {
        let observed = rate(canary);
        analysis.checks.push(Check {
            check: "error_rate",
            outcome: pass_if(observed <= ceiling),
            detail: format!(
                "error rate {} {} ceiling {}",
                percent(observed),
                if observed <= ceiling { "<=" } else { ">" },
                percent(ceiling)
            ),
            p_value: None,
            value: Some(observed),
        });
    }
    if let Some(margin) = checks.max_error_rate_increase {
        let test = stats::error_rate_increase(cumulative, margin, stats::default_tau(margin));
        let worse = test.p_value <= 1.0 - checks.confidence;
        let rate_of = |failures: u64, total: u64| failures as f64 / total.max(1) as f64;
        analysis.checks.push(Check {
            check: "error_rate_increase",
            outcome: pass_if(!worse),
            detail: format!(
                "error rate {} vs {} {} over the run, p = {} (worse by more than {} when p <= {})",
                percent(rate_of(cumulative.canary_failures, cumulative.canary_total)),
                config.baseline,
                percent(rate_of(
                    cumulative.baseline_failures,
                    cumulative.baseline_total
                )),
                p_text(test.p_value),
                percent(margin),
                p_text(1.0 - checks.confidence),
            ),
            p_value: Some(test.p_value),
            value: Some(test.difference),
        });
    }
    let p99 = |arm: &ArmSample| latency_quantile(&arm.latency, 0.99);
    if let Some(ceiling) = checks.max_p99 {
        analysis.checks.push(match p99(canary) {
            Some(observed) => Check {
                check: "p99",
                outcome: pass_if(observed <= ceiling),
                detail: format!(
                    "p99 {} {} ceiling {}",
                    millis(observed),
                    if observed <= ceiling { "<=" } else { ">" },
                    millis(ceiling)
                ),
                p_value: None,
                value: Some(observed.as_secs_f64()),
            },
            None => inconclusive("p99", "no latencies"),
        });
    }
    if let Some(limit) = checks.max_p99_ratio {
        analysis.checks.push(match (p99(canary), p99(baseline)) {
            (Some(ours), Some(theirs)) => {
                let ratio = ours.as_secs_f64() / theirs.max(checks.p99_floor).as_secs_f64();
                Check {
                    check: "p99_ratio",
                    outcome: pass_if(ratio <= limit),
                    detail: format!(
                        "p99 {} vs {} {} ({ratio:.2}× {} {limit}×)",
                        millis(ours),
                        config.baseline,
                        millis(theirs),
                        if ratio <= limit { "<=" } else { ">" },
                    ),
                    p_value: None,
                    value: Some(ratio),
                }
            }
            _ => inconclusive("p99_ratio", "no latencies"),
        });
    }
    if let Some(limit) = checks.max_prediction_psi {
        analysis.checks.push(drift(config, canary, baseline, limit));
    }
    analysis.conclude()
}

impl Analysis {
    fn conclude(mut self) -> Analysis {
        let any = |outcome| self.checks.iter().any(|check| check.outcome == outcome);
        self.verdict = if any(Outcome::Fail) {
            Verdict::Fail
        } else if any(Outcome::Inconclusive) {
            Verdict::Inconclusive
        } else {
            Verdict::Pass
        };
        let wanted = match self.verdict {
            Verdict::Fail => Outcome::Fail,
            Verdict::Inconclusive => Outcome::Inconclusive,
            Verdict::Pass => Outcome::Pass,
        };
        let mut summary = String::new();
        for check in self.checks.iter().filter(|check| check.outcome == wanted) {
            if !summary.is_empty() {
                summary.push_str("; ");
            }
            summary.push_str(&check.detail);
        }
        if summary.is_empty() {
            summary.push_str("no checks configured");
        }
        self.summary = summary;
        self
    }
}

/// The units (users) of the two arms against the configured split: a two-arm chi-square
/// test, done as the equivalent z-test so the user-count sketch's own error can be added in.
fn sample_ratio(interval: &Interval<'_>, alarm: f64) -> Check {
    let (canary, baseline) = (interval.canary.units, interval.baseline.units);
    let p = stats::sample_ratio_mismatch(canary, baseline, interval.canary_share);
    let total = canary.value + baseline.value;
    let observed = if total > 0.0 {
        canary.value / total
    } else {
        0.0
    };
    Check {
        check: "srm",
        outcome: pass_if(p >= alarm),
        detail: format!(
            "{}sample ratio: canary has {} of users, {} configured (p = {})",
            if p >= alarm {
                ""
            } else {
                "sample-ratio mismatch: "
            },
            percent(observed),
            percent(interval.canary_share),
            p_text(p),
        ),
        p_value: Some(p),
        value: Some(observed),
    }
}

/// Drift of the canary's predictions from the baseline's. PSI alone is biased upwards on
/// small samples (by about bins/n), so a numeric PSI over the line fails only when the
/// two-sample Kolmogorov–Smirnov test also finds the distributions different.
fn drift(config: &Canary, canary: &ArmSample, baseline: &ArmSample, limit: f64) -> Check {
    let needed = config.checks.min_predictions as usize;
    let alpha = 1.0 - config.checks.confidence;
    let numeric = (canary.predictions.len(), baseline.predictions.len());
    if numeric.0 >= needed && numeric.1 >= needed {
        let psi = stats::psi(&baseline.predictions, &canary.predictions, PSI_BINS).unwrap_or(0.0);
        let ks = stats::kolmogorov_smirnov(&baseline.predictions, &canary.predictions);
        let p = ks.map_or(1.0, |ks| ks.p_value);
        let drifted = psi > limit && p <= alpha;
        return Check {
            check: "prediction_psi",
            outcome: pass_if(!drifted),
            detail: format!(
                "prediction PSI {psi:.3} {} {limit} (KS p = {})",
                if psi > limit { ">" } else { "<=" },
                p_text(p)
            ),
            p_value: Some(p),
            value: Some(psi),
        };
    }
    let classes = (
        canary.classes.iter().sum::<u64>(),
        baseline.classes.iter().sum::<u64>(),
    );
    if classes.0 >= needed as u64 && classes.1 >= needed as u64 {
        let psi = stats::psi_counts(&baseline.classes, &canary.classes).unwrap_or(0.0);
        return Check {
            check: "prediction_psi",
            outcome: pass_if(psi <= limit),
            detail: format!(
                "class PSI {psi:.3} {} {limit}",
                if psi > limit { ">" } else { "<=" }
            ),
            p_value: None,
            value: Some(psi),
        };
    }
    inconclusive(
        "prediction_psi",
        &format!(
            "too few predictions: {} and {}, {needed} each needed",
            numeric.0.max(classes.0 as usize),
            numeric.1.max(classes.1 as usize)
        ),
    )
}

fn configured_checks(config: &Canary) -> Vec<&'static str> {
    let checks = &config.checks;
    [
        (checks.max_error_rate.is_some(), "error_rate"),
        (
            checks.max_error_rate_increase.is_some(),
            "error_rate_increase",
        ),
        (checks.max_p99.is_some(), "p99"),
        (checks.max_p99_ratio.is_some(), "p99_ratio"),
        (checks.max_prediction_psi.is_some(), "prediction_psi"),
    ]
    .into_iter()
    .filter_map(|(configured, name)| configured.then_some(name))
    .collect()
}

fn inconclusive(check: &'static str, why: &str) -> Check {
    Check {
        check,
        outcome: Outcome::Inconclusive,
        detail: format!("{check}: {why}"),
        p_value: None,
        value: None,
    }
}

fn pass_if(passed: bool) -> Outcome {
    if passed {
        Outcome::Pass
    } else {
        Outcome::Fail
    }
}

/// `0.0412` → `"4.1 %"`; small rates keep two significant digits.
pub fn percent(rate: f64) -> String {
    let value = rate * 100.0;
    let mut text = String::new();
    let _ = if value != 0.0 && value.abs() < 1.0 {
        write!(text, "{value:.2} %")
    } else {
        write!(text, "{value:.1} %")
    };
    text
}

fn p_text(p: f64) -> String {
    if p < 0.0001 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}

fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}
