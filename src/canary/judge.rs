//! One interval's judgement of the canary against its baseline: pure functions of the
//! interval's samples and the run's cumulative counts, so they are tested on generated data.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::stats::{self, Estimate, Proportions};
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

/// The two arms' figures of one interval.
pub struct Interval<'a> {
    pub canary: Arm<'a>,
    pub baseline: Arm<'a>,
    /// The canary's configured share of the units that reached either arm.
    pub canary_share: f64,
}

/// What the checks read of one arm in one interval, whichever source measured it: this
/// replica's own window, or the fleet's metrics in Prometheus.
#[derive(Debug, Clone, PartialEq)]
pub struct Arm<'a> {
    pub requests: u64,
    /// Answers that count against the arm: 5xx (upstream errors included) and 499.
    pub failures: u64,
    /// `None`: no latencies were recorded.
    pub p99: Option<Duration>,
    /// Distinct randomised units that reached the arm; `None` when the source cannot count
    /// them, which leaves the sample-ratio check without data.
    pub units: Option<Estimate>,
    pub predictions: Predictions<'a>,
}

/// The arm's predictions, in the form its source keeps them.
#[derive(Debug, Clone, PartialEq)]
pub enum Predictions<'a> {
    /// A uniform sample of the numeric predictions and how many there were in all, and the
    /// answers per class slot: the local window's reservoir.
    Sampled {
        values: &'a [f64],
        seen: u64,
        classes: &'a [u64],
    },
    /// Answers per bin of the exported `abproxy_prediction` histogram and per class label,
    /// each in the same order in both arms: all a fleet's metrics hold.
    Binned { bins: Vec<u64>, classes: Vec<u64> },
}

impl<'a> Arm<'a> {
    /// The figures of a local window's interval.
    pub fn sampled(sample: &'a ArmSample) -> Arm<'a> {
        Arm {
            requests: sample.requests,
            failures: sample.failures,
            p99: latency_quantile(&sample.latency, 0.99),
            units: Some(sample.units),
            predictions: Predictions::Sampled {
                values: &sample.predictions,
                seen: sample.predictions_seen,
                classes: &sample.classes,
            },
        }
    }
}

/// Judges one interval. `cumulative` holds the run's counts, this interval's included: the
/// error-rate comparison is a sequential test over the whole run.
pub fn analyse(config: &Canary, interval: &Interval<'_>, cumulative: Proportions) -> Analysis {
    let (canary, baseline) = (&interval.canary, &interval.baseline);
    let counts = |arm: &Arm<'_>| Counts {
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
    let rate = |arm: &Arm<'_>| arm.failures as f64 / arm.requests as f64;
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
        let alpha = sequential_alpha(config);
        let worse = test.p_value <= alpha;
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
                p_text(alpha),
            ),
            p_value: Some(test.p_value),
            value: Some(test.difference),
        });
    }
    let p99 = |arm: &Arm<'_>| arm.p99;
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
                let floored = theirs < checks.p99_floor;
                let reference = theirs.max(checks.p99_floor);
                let ratio = ours.as_secs_f64() / reference.as_secs_f64();
                Check {
                    check: "p99_ratio",
                    outcome: pass_if(ratio <= limit),
                    detail: format!(
                        "p99 {} vs {} {}{} ({ratio:.2}× {} {limit}×)",
                        millis(ours),
                        config.baseline,
                        millis(theirs),
                        if floored {
                            format!(", read as the {} floor", millis(reference))
                        } else {
                            String::new()
                        },
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

/// An interval whose figures could not be read (the fleet's Prometheus down, refusing, slow,
/// or without the series): inconclusive, never a pass, with the reason for `/canary` and a
/// `check="source"` count.
pub fn unread(detail: String) -> Analysis {
    let none = Counts {
        requests: 0,
        failures: 0,
    };
    Analysis {
        verdict: Verdict::Inconclusive,
        summary: String::new(),
        canary: none,
        baseline: none,
        checks: vec![Check {
            check: "source",
            outcome: Outcome::Inconclusive,
            detail,
            p_value: None,
            value: None,
        }],
    }
    .conclude()
}

/// Records in a judged interval where its figures came from, as a passed `source` check: so
/// `abproxy_canary_checks_total{check="source"}` holds how often the source answered, beside
/// how often it did not. It changes neither the verdict nor the summary.
pub fn read_from(mut analysis: Analysis, detail: String) -> Analysis {
    analysis.checks.insert(
        0,
        Check {
            check: "source",
            outcome: Outcome::Pass,
            detail,
            p_value: None,
            value: None,
        },
    );
    analysis
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

/// The sequential test's level at each step. Its counts start again at each step of a ramp
/// (the canary's share changes, so a run-long rate would weigh the steps unequally); spending
/// `1 − confidence` evenly over the steps keeps the whole run's false-rollback rate under it.
fn sequential_alpha(config: &Canary) -> f64 {
    (1.0 - config.checks.confidence) / config.steps.len().max(1) as f64
}

/// The units (users) of the two arms against the configured split: a two-arm chi-square
/// test, done as the equivalent z-test so the user-count sketch's own error can be added in.
fn sample_ratio(interval: &Interval<'_>, alarm: f64) -> Check {
    let (Some(canary), Some(baseline)) = (interval.canary.units, interval.baseline.units) else {
        return inconclusive("srm", "no count of users from this source");
    };
    let saturated = canary.variance.is_infinite() || baseline.variance.is_infinite();
    if saturated || canary.value + baseline.value < 1.0 {
        return inconclusive(
            "srm",
            "no count of users (none seen, or more than the sketch holds)",
        );
    }
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
            "{}: canary has {} of users, {} configured (p = {})",
            if p >= alarm {
                "sample ratio"
            } else {
                "sample-ratio mismatch"
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
/// small samples (by about bins/n), so a PSI over the line fails only when a test on the same
/// data also finds the distributions different: two-sample Kolmogorov–Smirnov for sampled
/// numbers, chi-square homogeneity for binned numbers and for class labels.
fn drift(config: &Canary, canary: &Arm<'_>, baseline: &Arm<'_>, limit: f64) -> Check {
    let needed = config.checks.min_predictions;
    let alpha = 1.0 - config.checks.confidence;
    let (numeric, classes) = match (&canary.predictions, &baseline.predictions) {
        (
            Predictions::Sampled {
                values: ours,
                seen: our_count,
                classes: our_classes,
            },
            Predictions::Sampled {
                values: theirs,
                seen: their_count,
                classes: their_classes,
            },
        ) => {
            if *our_count >= needed && *their_count >= needed {
                let psi = stats::psi(theirs, ours, PSI_BINS).unwrap_or(0.0);
                let ks = stats::kolmogorov_smirnov(theirs, ours);
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
            ((*our_count, *their_count), (*our_classes, *their_classes))
        }
        (
            Predictions::Binned {
                bins: ours,
                classes: our_classes,
            },
            Predictions::Binned {
                bins: theirs,
                classes: their_classes,
            },
        ) => {
            let counts = (ours.iter().sum::<u64>(), theirs.iter().sum::<u64>());
            if counts.0 >= needed && counts.1 >= needed {
                return binned_drift("prediction", theirs, ours, limit, alpha);
            }
            (counts, (our_classes.as_slice(), their_classes.as_slice()))
        }
        _ => {
            return inconclusive(
                "prediction_psi",
                "the arms' predictions come from different sources",
            )
        }
    };
    let class_counts = (classes.0.iter().sum::<u64>(), classes.1.iter().sum::<u64>());
    if class_counts.0 >= needed && class_counts.1 >= needed {
        return binned_drift("class", classes.1, classes.0, limit, alpha);
    }
    inconclusive(
        "prediction_psi",
        &format!(
            "too few predictions: {} and {}, {needed} each needed",
            numeric.0.max(class_counts.0),
            numeric.1.max(class_counts.1)
        ),
    )
}

/// PSI over counts in shared bins (class labels, or a histogram's buckets), gated by a
/// chi-square test of homogeneity on the same counts.
fn binned_drift(what: &str, baseline: &[u64], canary: &[u64], limit: f64, alpha: f64) -> Check {
    let psi = stats::psi_counts(baseline, canary).unwrap_or(0.0);
    let p = stats::homogeneity(baseline, canary).unwrap_or(1.0);
    Check {
        check: "prediction_psi",
        outcome: pass_if(!(psi > limit && p <= alpha)),
        detail: format!(
            "{what} PSI {psi:.3} {} {limit} (chi-square p = {})",
            if psi > limit { ">" } else { "<=" },
            p_text(p)
        ),
        p_value: Some(p),
        value: Some(psi),
    }
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

/// The guard as a whole (these checks and `Run`'s consecutive-failure rule) on generated
/// intervals: how often it rolls back a healthy canary, and how fast it catches a bad one.
#[cfg(test)]
mod simulation {
    use super::*;
    use crate::canary::run::{Phase, Run};
    use crate::canary::stats::Estimate;
    use crate::canary::window::{latency_bucket, LATENCY_BUCKETS};
    use crate::config::Config;

    /// What one arm does: its error rate, its typical latency and a shift of its predictions.
    #[derive(Clone, Copy)]
    struct Behaviour {
        error_rate: f64,
        latency_ms: f64,
        shift: f64,
    }

    const PREDICTIONS_KEPT: u64 = 400;

    const HEALTHY: Behaviour = Behaviour {
        error_rate: 0.01,
        latency_ms: 20.0,
        shift: 0.0,
    };

    fn canary_config(keys: &str) -> Canary {
        let text = format!(
            "[metrics]\nprediction = \"/prediction\"\n\
             [[variant]]\nname = \"control\"\nupstream = \"http://127.0.0.1:1\"\nweight = 50\n\
             [[variant]]\nname = \"treatment\"\nupstream = \"http://127.0.0.1:2\"\nweight = 50\n\
             [canary]\nvariant = \"treatment\"\nbaseline = \"control\"\n{keys}"
        );
        Config::parse(&text, std::path::Path::new("simulated.toml"))
            .expect("valid config")
            .canary
            .expect("a canary")
    }

    /// Failures among `n` requests, by geometric skips: O(failures), not O(n).
    fn binomial(rng: &mut fastrand::Rng, n: u64, p: f64) -> u64 {
        if p <= 0.0 {
            return 0;
        }
        let (mut position, mut failures) = (0.0, 0);
        loop {
            position += ((1.0 - rng.f64()).ln() / (1.0 - p).ln()).floor() + 1.0;
            if position > n as f64 {
                return failures;
            }
            failures += 1;
        }
    }

    fn normal(rng: &mut fastrand::Rng) -> f64 {
        let (u, v) = (1.0 - rng.f64(), rng.f64());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// Log-normal latency factors, σ = 0.4 (a p99 about 2.5 × the median), drawn once: the
    /// simulations draw millions.
    fn latency_factors() -> &'static [f64] {
        static FACTORS: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
        FACTORS.get_or_init(|| {
            let mut rng = fastrand::Rng::with_seed(1);
            (0..4096).map(|_| (0.4 * normal(&mut rng)).exp()).collect()
        })
    }

    /// One arm's interval: `requests` from as many users, with `behaviour`.
    fn arm(rng: &mut fastrand::Rng, requests: u64, behaviour: Behaviour) -> ArmSample {
        let mut latency = vec![0; LATENCY_BUCKETS];
        // A sample of the predictions, as the window's reservoir keeps (smaller, to keep
        // the simulations quick).
        let mut predictions = Vec::with_capacity(requests.min(PREDICTIONS_KEPT) as usize);
        let factors = latency_factors();
        for _ in 0..requests {
            let millis = behaviour.latency_ms * factors[rng.usize(..factors.len())];
            latency[latency_bucket(Duration::from_micros((millis * 1000.0) as u64))] += 1;
            if predictions.len() < predictions.capacity() {
                predictions.push(rng.f64() + behaviour.shift);
            }
        }
        ArmSample {
            requests,
            failures: binomial(rng, requests, behaviour.error_rate),
            latency,
            predictions_seen: requests,
            predictions,
            classes: Vec::new(),
            units: Estimate {
                value: requests as f64,
                variance: 0.0,
            },
        }
    }

    /// How a simulated run ended.
    struct Ending {
        phase: Phase,
        /// Conclusive intervals until the run ended (or the limit).
        judged: usize,
    }

    /// One run of at most `limit` intervals of `total` requests each, split by the run's weight.
    fn simulate(
        rng: &mut fastrand::Rng,
        config: &Canary,
        canary: Behaviour,
        total: u64,
        limit: usize,
    ) -> Ending {
        let mut run = Run::new("simulated".into());
        let mut totals = Proportions::default();
        let mut judged = 0;
        for _ in 0..limit {
            if run.phase != Phase::Running {
                break;
            }
            let share = run.weight(config, 50.0) / 100.0;
            // Each request's user lands in the canary with the configured share.
            let canary_requests = (total as f64 * share
                + (total as f64 * share * (1.0 - share)).sqrt() * normal(rng))
            .round()
            .max(0.0) as u64;
            let ours = arm(rng, canary_requests, canary);
            let theirs = arm(rng, total - canary_requests.min(total), HEALTHY);
            totals.canary_failures += ours.failures;
            totals.canary_total += ours.requests;
            totals.baseline_failures += theirs.failures;
            totals.baseline_total += theirs.requests;
            let interval = Interval {
                canary: Arm::sampled(&ours),
                baseline: Arm::sampled(&theirs),
                canary_share: share,
            };
            let analysis = analyse(config, &interval, totals);
            if analysis.verdict != Verdict::Inconclusive {
                judged += 1;
            }
            run.take(&analysis, config);
        }
        Ending {
            phase: run.phase,
            judged,
        }
    }

    const ALL_CHECKS: &str =
        "min_requests = 20\nsteps = [1, 5, 10, 25, 50]\nanalyses_per_step = 5\n\
         [canary.checks]\nmax_error_rate = 0.05\nmax_error_rate_increase = 0.005\n\
         confidence = 0.99\nmax_p99_ratio = 1.5\nmax_prediction_psi = 0.1\nmin_predictions = 30\n";

    #[test]
    fn a_healthy_canary_is_rarely_rolled_back_and_ramps_to_the_end() {
        let config = canary_config(ALL_CHECKS);
        let mut rng = fastrand::Rng::with_seed(11);
        let runs = 200;
        let mut rolled_back = 0;
        let mut promoted = 0;
        for _ in 0..runs {
            match simulate(&mut rng, &config, HEALTHY, 3000, 60).phase {
                Phase::RolledBack => rolled_back += 1,
                Phase::Promoted => promoted += 1,
                _ => {}
            }
        }
        let alpha = 1.0 - config.checks.confidence;
        let rate = f64::from(rolled_back) / f64::from(runs);
        let margin = 3.0 * (alpha * (1.0 - alpha) / f64::from(runs)).sqrt();
        println!("healthy: {rolled_back} of {runs} rolled back, {promoted} promoted");
        assert!(rate <= alpha + margin, "false rollbacks: {rate}");
        assert!(
            promoted >= runs * 95 / 100,
            "promoted: {promoted} of {runs}"
        );
    }

    #[test]
    fn a_canary_failing_five_percent_is_rolled_back_at_its_third_judged_interval() {
        let config = canary_config(
            "min_requests = 100\n[canary.checks]\nmax_error_rate = 0.02\nmax_error_rate_increase = 0.005\n",
        );
        let failing = Behaviour {
            error_rate: 0.05,
            ..HEALTHY
        };
        let mut rng = fastrand::Rng::with_seed(12);
        let runs = 300;
        let caught = (0..runs)
            .map(|_| simulate(&mut rng, &config, failing, 600, 10))
            .filter(|ending| ending.phase == Phase::RolledBack && ending.judged == 3)
            .count();
        assert!(
            caught >= runs * 99 / 100,
            "caught at the 3rd interval: {caught} of {runs}"
        );
    }

    #[test]
    fn the_sequential_test_alone_catches_a_real_increase_within_ten_intervals() {
        let config =
            canary_config("min_requests = 100\n[canary.checks]\nmax_error_rate_increase = 0.005\n");
        let worse = Behaviour {
            error_rate: 0.03,
            ..HEALTHY
        };
        let mut rng = fastrand::Rng::with_seed(13);
        let runs = 200;
        let caught = (0..runs)
            .map(|_| simulate(&mut rng, &config, worse, 1000, 10))
            .filter(|ending| ending.phase == Phase::RolledBack)
            .count();
        assert!(
            caught >= runs * 9 / 10,
            "caught within 10 intervals: {caught} of {runs}"
        );
    }

    #[test]
    fn a_slow_or_drifting_canary_is_rolled_back() {
        let mut rng = fastrand::Rng::with_seed(14);
        let latency = canary_config("[canary.checks]\nmax_p99_ratio = 1.5\n");
        let slow = Behaviour {
            latency_ms: 60.0,
            ..HEALTHY
        };
        let drift = canary_config("[canary.checks]\nmax_prediction_psi = 0.1\n");
        let shifted = Behaviour {
            shift: 0.3,
            ..HEALTHY
        };
        for _ in 0..50 {
            assert_eq!(
                simulate(&mut rng, &latency, slow, 1000, 3).phase,
                Phase::RolledBack
            );
            assert_eq!(
                simulate(&mut rng, &drift, shifted, 1000, 3).phase,
                Phase::RolledBack
            );
        }
    }

    #[test]
    fn a_sample_ratio_mismatch_is_reported_and_nothing_else_is_judged() {
        let config = canary_config("[canary.checks]\nmax_error_rate = 0.01\n");
        let mut rng = fastrand::Rng::with_seed(15);
        // Half the canary's 50 % share: 250 of 1000 users.
        let ours = arm(
            &mut rng,
            250,
            Behaviour {
                error_rate: 0.5,
                ..HEALTHY
            },
        );
        let theirs = arm(&mut rng, 750, HEALTHY);
        let interval = Interval {
            canary: Arm::sampled(&ours),
            baseline: Arm::sampled(&theirs),
            canary_share: 0.5,
        };
        let analysis = analyse(&config, &interval, Proportions::default());
        assert_eq!(analysis.verdict, Verdict::Fail);
        let outcomes: Vec<(&str, Outcome)> = analysis
            .checks
            .iter()
            .map(|c| (c.check, c.outcome))
            .collect();
        assert_eq!(
            outcomes,
            [("srm", Outcome::Fail), ("error_rate", Outcome::Skipped)]
        );
        assert!(
            analysis.summary.starts_with(
                "sample-ratio mismatch: canary has 25.0 % of users, 50.0 % configured"
            ),
            "{}",
            analysis.summary
        );
    }

    #[test]
    fn too_little_traffic_is_inconclusive_whatever_the_figures() {
        let config = canary_config("min_requests = 100\n[canary.checks]\nmax_error_rate = 0.01\n");
        let mut rng = fastrand::Rng::with_seed(16);
        let ours = arm(
            &mut rng,
            99,
            Behaviour {
                error_rate: 1.0,
                ..HEALTHY
            },
        );
        let theirs = arm(&mut rng, 5000, HEALTHY);
        let interval = Interval {
            canary: Arm::sampled(&ours),
            baseline: Arm::sampled(&theirs),
            canary_share: 0.5,
        };
        let zero = Proportions::default();
        let analysis = analyse(&config, &interval, zero);
        assert_eq!(analysis.verdict, Verdict::Inconclusive);
        assert_eq!(
            analysis.summary,
            "too little traffic: treatment 99 and control 5000 requests, 100 each needed"
        );
    }

    /// Counts of `n` predictions, uniform on [shift, 1 + shift), per bucket of the exported
    /// `abproxy_prediction` histogram (the default bounds, then +Inf): what the fleet source
    /// reads from Prometheus.
    fn histogram(rng: &mut fastrand::Rng, n: usize, shift: f64) -> Vec<u64> {
        let bounds = crate::config::DEFAULT_PREDICTION_BUCKETS;
        let mut counts = vec![0; bounds.len() + 1];
        for _ in 0..n {
            let value = rng.f64() + shift;
            counts[bounds.partition_point(|&bound| bound < value)] += 1;
        }
        counts
    }

    /// An arm of 1000 answers, whose predictions fell in `bins`.
    fn binned(bins: Vec<u64>) -> Arm<'static> {
        Arm {
            requests: 1000,
            failures: 0,
            p99: None,
            units: None,
            predictions: Predictions::Binned {
                bins,
                classes: Vec::new(),
            },
        }
    }

    fn drift_outcome(config: &Canary, canary: Vec<u64>, baseline: Vec<u64>) -> (Outcome, f64) {
        let interval = Interval {
            canary: binned(canary),
            baseline: binned(baseline),
            canary_share: 0.2,
        };
        let zero = Proportions::default();
        let analysis = analyse(config, &interval, zero);
        let check = analysis
            .checks
            .iter()
            .find(|check| check.check == "prediction_psi")
            .expect("a drift check");
        (check.outcome, check.value.unwrap_or(0.0))
    }

    #[test]
    fn binned_drift_gated_by_chi_square_rarely_fails_the_same_model_and_catches_a_shift() {
        let config = canary_config(
            "[canary.checks]\nmax_prediction_psi = 0.1\nmin_predictions = 100\nsrm_p_value = 0\n",
        );
        let alpha = 1.0 - config.checks.confidence;
        let mut rng = fastrand::Rng::with_seed(17);
        let runs = 2000;
        let (mut failed, mut psi_over) = (0, 0);
        for _ in 0..runs {
            // A canary at 20 %: 100 answers against the baseline's 400, 13 bins.
            let (outcome, psi) = drift_outcome(
                &config,
                histogram(&mut rng, 100, 0.0),
                histogram(&mut rng, 400, 0.0),
            );
            failed += usize::from(outcome == Outcome::Fail);
            psi_over += usize::from(psi > 0.1);
        }
        let rate = failed as f64 / f64::from(runs);
        let margin = 3.0 * (alpha * (1.0 - alpha) / f64::from(runs)).sqrt();
        println!("binned drift, same model: PSI > 0.1 in {psi_over} of {runs}, failed {failed}");
        assert!(rate <= alpha + margin, "false drift rate {rate}");
        // Without the gate, PSI's small-sample bias alone would fail these often.
        assert!(
            psi_over > runs as usize / 10,
            "PSI over the line {psi_over} times"
        );
        let caught = (0..200)
            .filter(|_| {
                let (ours, theirs) = (histogram(&mut rng, 500, 0.3), histogram(&mut rng, 500, 0.0));
                drift_outcome(&config, ours, theirs).0 == Outcome::Fail
            })
            .count();
        assert!(caught >= 190, "a 0.3 shift caught {caught} of 200 times");
        // Below min_predictions an arm: inconclusive, whatever the bins say.
        let few = drift_outcome(
            &config,
            histogram(&mut rng, 99, 0.5),
            histogram(&mut rng, 400, 0.0),
        );
        assert_eq!(few.0, Outcome::Inconclusive);
    }

    #[test]
    fn a_source_that_counts_no_users_leaves_the_sample_ratio_inconclusive() {
        let config = canary_config("[canary.checks]\nmax_error_rate = 0.05\n");
        let interval = Interval {
            canary: binned(vec![200]),
            baseline: binned(vec![800]),
            canary_share: 0.2,
        };
        let zero = Proportions::default();
        let analysis = analyse(&config, &interval, zero);
        assert_eq!(analysis.verdict, Verdict::Inconclusive);
        assert_eq!(analysis.summary, "srm: no count of users from this source");
    }

    #[test]
    fn an_unread_interval_is_inconclusive_and_changes_nothing() {
        let config = canary_config(
            "steps = [10, 50]\nanalyses_per_step = 1\n[canary.checks]\nmax_error_rate = 0.05\n",
        );
        let analysis =
            unread("no fleet figures from Prometheus at http://p:9090: cannot connect".into());
        assert_eq!(analysis.verdict, Verdict::Inconclusive);
        assert_eq!(analysis.checks[0].check, "source");
        assert_eq!(analysis.checks[0].outcome, Outcome::Inconclusive);
        assert!(
            analysis.summary.ends_with("cannot connect"),
            "{}",
            analysis.summary
        );
        let mut run = Run::new("f".into());
        for _ in 0..10 {
            assert_eq!(run.take(&analysis, &config), None);
        }
        assert_eq!((run.phase, run.step, run.passed), (Phase::Running, 0, 0));
        // A read interval names its source without changing its verdict or summary.
        let judged = read_from(analysis.clone(), "fleet figures".into());
        assert_eq!(
            (judged.verdict, &judged.summary),
            (analysis.verdict, &analysis.summary)
        );
        assert_eq!(judged.checks[0].outcome, Outcome::Pass);
    }
}
