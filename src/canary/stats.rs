//! Pure statistics for the canary guard: an always-valid test of the error-rate increase,
//! sample-ratio mismatch on sketched unit counts, and drift measures (PSI, Kolmogorov–Smirnov).
//!
//! Every function is total on finite input: too little data yields "no evidence"
//! (p-value 1, likelihood ratio 1) or `None`, never a panic. Callers filter non-finite samples.

use std::f64::consts::{LN_2, PI, SQRT_2};

/// Standard normal CDF Φ(x), accurate in the tails (|x| up to ~8): erfc(−x/√2)/2 keeps a lower
/// tail's relative accuracy instead of computing 1 minus a number close to 1.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / SQRT_2)
}

/// erfc with relative error below 1.2e-7 everywhere: the Chebyshev fit `erfcc` of Press,
/// Teukolsky, Vetterling, Flannery, "Numerical Recipes in C", 2nd ed., 1992, §6.2.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let upper_tail = erfc_scaled(z) * (-z * z).exp();
    if x >= 0.0 {
        upper_tail
    } else {
        2.0 - upper_tail
    }
}

/// e^{z²}·erfc(z) for z ≥ 0 from the same fit, so tails that would underflow can be logged;
/// clamped to its true bound 1 (the fit overshoots by 3e-8 at 0), which keeps Φ(0) = ½.
fn erfc_scaled(z: f64) -> f64 {
    const COEFFICIENTS: [f64; 10] = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let t = 1.0 / (1.0 + 0.5 * z);
    let exponent = COEFFICIENTS.iter().rev().fold(0.0, |acc, c| acc * t + c);
    (t * exponent.exp()).min(1.0)
}

/// Failures out of totals for the two arms, cumulative since the canary's run began.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Proportions {
    pub canary_failures: u64,
    pub canary_total: u64,
    pub baseline_failures: u64,
    pub baseline_total: u64,
}

/// Result of the always-valid one-sided test "canary failure rate − baseline rate > margin".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sequential {
    /// Observed canary rate minus baseline rate (the margin not subtracted).
    pub difference: f64,
    /// Mixture likelihood ratio Λ; capped at `f64::MAX` so it always serializes.
    pub likelihood_ratio: f64,
    /// min(1, 1/Λ): reject at the first look where it is ≤ α.
    pub p_value: f64,
}

/// What a look without traffic in both arms says: nothing.
const NO_EVIDENCE: Sequential = Sequential {
    difference: 0.0,
    likelihood_ratio: 1.0,
    p_value: 1.0,
};

/// One arm's observed failure rate and the variance of that rate.
struct Arm {
    rate: f64,
    variance: f64,
}

/// The variance uses p̃ = (x + ½)/(n + 1): a plug-in variance of 0 for an arm without failures
/// would make the other arm's first failure look infinitely significant.
fn arm(failures: u64, total: u64) -> Option<Arm> {
    if total == 0 {
        return None;
    }
    let n = total as f64;
    let failures = failures.min(total) as f64;
    let smoothed = (failures + 0.5) / (n + 1.0);
    Some(Arm {
        rate: failures / n,
        variance: smoothed * (1.0 - smoothed) / n,
    })
}

/// Mixture SPRT (Johari, Pekelis, Walsh, "Peeking at A/B Tests", KDD 2017; "Always Valid
/// Inference", Operations Research 2022) on θ̂ = p̂_c − p̂_b ~ N(θ, v), the normal approximation.
///
/// The mixing prior is half-normal (scale τ) on θ − θ0 > 0, all its mass on "canary worse":
/// Λ = 2·sqrt(v/(v+τ²))·e^{w²/2}·Φ(w), w = (θ̂−θ0)·τ/sqrt(v(v+τ²)). Each component has mean ≤ 1
/// for every θ ≤ θ0, so by Ville's inequality P(ever Λ ≥ 1/α | H0) ≤ α at any stopping time; when
/// θ̂ ≤ θ0, Λ ≤ sqrt(v/(v+τ²)) < 1. Up to twice the evidence of the two-sided mixture truncated
/// at θ̂ > θ0. No traffic or a non-finite margin: Λ = 1; a τ ≤ 0 or non-finite: [`default_tau`].
pub fn error_rate_increase(counts: Proportions, margin: f64, tau: f64) -> Sequential {
    let canary = arm(counts.canary_failures, counts.canary_total);
    let baseline = arm(counts.baseline_failures, counts.baseline_total);
    let (Some(canary), Some(baseline), true) = (canary, baseline, margin.is_finite()) else {
        return NO_EVIDENCE;
    };
    let tau = if tau.is_finite() && tau > 0.0 {
        tau
    } else {
        default_tau(margin)
    };
    let difference = canary.rate - baseline.rate;
    let ln_ratio = ln_one_sided_mixture(
        difference - margin,
        canary.variance + baseline.variance,
        tau * tau,
    );
    Sequential {
        difference,
        likelihood_ratio: ln_ratio.exp().min(f64::MAX),
        p_value: (-ln_ratio).exp().min(1.0),
    }
}

/// ln Λ of the half-normal mixture, in logs so a decisive excess cannot overflow.
fn ln_one_sided_mixture(excess: f64, variance: f64, tau_squared: f64) -> f64 {
    let prior_to_noise = tau_squared / variance;
    let w = excess / variance.sqrt() * (prior_to_noise / (1.0 + prior_to_noise)).sqrt();
    // ln(Φ(w)·e^{w²/2}); for w < 0 through the scaled erfc, since Φ(w) alone may underflow.
    let ln_tail = if w >= 0.0 {
        0.5 * w * w + normal_cdf(w).ln()
    } else {
        (0.5 * erfc_scaled(-w / SQRT_2)).ln()
    };
    LN_2 - 0.5 * prior_to_noise.ln_1p() + ln_tail
}

/// τ = max(margin, 0.01): Λ at a look is largest when τ² = (θ̂−θ0)² − v, so τ is the excess over
/// the margin caught fastest (Johari, Pekelis, Walsh 2022 on choosing τ); we tune it to an excess
/// as large as the tolerance itself, and at least one percentage point, a plain incident.
pub fn default_tau(margin: f64) -> f64 {
    margin.max(0.01)
}

/// A distinct-count estimate with its variance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub variance: f64,
}

/// Linear counting (Whang, Vander-Zanden, Taylor, "A Linear-Time Probabilistic Counting
/// Algorithm for Database Applications", ACM TODS 1990): n̂ = m·ln(m/zeros), Var ≈ m(e^t − t − 1),
/// t = n̂/m. A saturated bitmap only bounds the count (m·ln m), so its variance is infinite.
pub fn linear_counting(zero_bits: u64, total_bits: u64) -> Estimate {
    let bits = total_bits as f64;
    let zeros = zero_bits.min(total_bits);
    let (value, variance) = if total_bits == 0 {
        (0.0, f64::INFINITY)
    } else if zeros == 0 {
        (bits * bits.ln(), f64::INFINITY)
    } else {
        let load = (bits / zeros as f64).ln();
        (bits * load, bits * (load.exp_m1() - load))
    };
    Estimate { value, variance }
}

/// Sample-ratio mismatch (Fabijan et al., "Diagnosing Sample Ratio Mismatch in Online Controlled
/// Experiments", KDD 2019): two-sided p-value that the canary holds `expected_share` of the units.
///
/// The two-arm chi-square test as a z-test, with the sketches' noise added to the binomial
/// variance: z = (c − Np)/sqrt(Np(1−p) + (1−p)²var_c + p²var_b), N = c + b. A saturated sketch
/// says nothing about the split: p = 1.
pub fn sample_ratio_mismatch(canary: Estimate, baseline: Estimate, expected_share: f64) -> f64 {
    if canary.variance.is_infinite() || baseline.variance.is_infinite() {
        return 1.0;
    }
    let share = expected_share.clamp(0.0, 1.0);
    let units = canary.value + baseline.value;
    let deviation = canary.value - units * share;
    let variance = units * share * (1.0 - share)
        + (1.0 - share).powi(2) * canary.variance
        + share * share * baseline.variance;
    if variance > 0.0 {
        erfc((deviation / variance.sqrt()).abs() / SQRT_2)
    } else if deviation == 0.0 {
        1.0
    } else {
        0.0
    }
}

/// Shares below this count as this, so ln stays finite: one observation in 10 000 is finer than the
/// guard's samples resolve, and it caps an empty bin's term at share·ln(share/1e-4) (0.69 at 0.1).
const SHARE_FLOOR: f64 = 1e-4;

/// Population stability index Σ (a − e)·ln(a/e) (Yurdakul, "Statistical Properties of Population
/// Stability Index", 2018) over bins at the baseline's quantiles, each ~1/`bins` of the baseline.
///
/// Equal edges merge, so a baseline of a few repeated values (classifications) gets one bin per
/// value. NaNs are ignored; `None` when either sample has nothing else.
pub fn psi(baseline: &[f64], canary: &[f64], bins: usize) -> Option<f64> {
    let baseline = sorted(baseline);
    let canary = sorted(canary);
    if baseline.is_empty() || canary.is_empty() {
        return None;
    }
    let edges = quantile_edges(&baseline, bins);
    psi_counts(&bin_counts(&baseline, &edges), &bin_counts(&canary, &edges))
}

/// The sample without NaNs, in ascending order.
fn sorted(sample: &[f64]) -> Vec<f64> {
    let mut sorted: Vec<f64> = sample.iter().copied().filter(|x| !x.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// Interior cut points at the i/bins lower quantiles of a sorted, non-empty sample, deduplicated.
fn quantile_edges(sorted: &[f64], bins: usize) -> Vec<f64> {
    let n = sorted.len();
    let bins = bins.clamp(1, n);
    let mut edges: Vec<f64> = (1..bins)
        .map(|i| sorted[(i * n).div_ceil(bins) - 1])
        .collect();
    edges.dedup();
    edges
}

/// Counts per bin (−∞, e₁], (e₁, e₂], …, (e_k, ∞).
fn bin_counts(sample: &[f64], edges: &[f64]) -> Vec<u64> {
    let mut counts = vec![0; edges.len() + 1];
    for &x in sample {
        counts[edges.partition_point(|&edge| edge < x)] += 1;
    }
    counts
}

/// PSI of two categorical distributions given as counts per class in the same order; a class
/// missing from the shorter slice counts zero. `None` when either side has no observations.
pub fn psi_counts(baseline: &[u64], canary: &[u64]) -> Option<f64> {
    let expected = shares(baseline)?;
    let actual = shares(canary)?;
    let share =
        |shares: &[f64], class: usize| shares.get(class).copied().unwrap_or(0.0).max(SHARE_FLOOR);
    let classes = expected.len().max(actual.len());
    let index = (0..classes)
        .map(|class| {
            let (a, e) = (share(&actual, class), share(&expected, class));
            (a - e) * (a / e).ln()
        })
        .sum();
    Some(index)
}

fn shares(counts: &[u64]) -> Option<Vec<f64>> {
    let total: f64 = counts.iter().map(|&c| c as f64).sum();
    (total > 0.0).then(|| counts.iter().map(|&c| c as f64 / total).collect())
}

/// Expected counts below this are pooled: the chi-square approximation needs about five per
/// cell (Cochran 1954), and rare classes would otherwise dominate the statistic.
const MIN_EXPECTED: f64 = 5.0;

/// Chi-square test of homogeneity (Pearson 1900) of two class distributions given as counts in
/// the same class order: the p-value that both come from one distribution. Classes whose
/// expected count is under five in either arm are pooled into one. `None` when either arm is
/// empty or fewer than two classes remain.
pub fn homogeneity(baseline: &[u64], canary: &[u64]) -> Option<f64> {
    let classes = baseline.len().max(canary.len());
    let count = |counts: &[u64], class: usize| counts.get(class).copied().unwrap_or(0) as f64;
    let (n_b, n_c) = (
        baseline.iter().sum::<u64>() as f64,
        canary.iter().sum::<u64>() as f64,
    );
    if n_b == 0.0 || n_c == 0.0 {
        return None;
    }
    let smaller = n_b.min(n_c) / (n_b + n_c);
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let mut pooled = (0.0, 0.0);
    for class in 0..classes {
        let (b, c) = (count(baseline, class), count(canary, class));
        if (b + c) * smaller < MIN_EXPECTED {
            pooled = (pooled.0 + b, pooled.1 + c);
        } else {
            cells.push((b, c));
        }
    }
    if pooled.0 + pooled.1 > 0.0 {
        cells.push(pooled);
    }
    if cells.len() < 2 {
        return None;
    }
    let total = n_b + n_c;
    let statistic: f64 = cells
        .iter()
        .map(|&(b, c)| {
            let (e_b, e_c) = ((b + c) * n_b / total, (b + c) * n_c / total);
            (b - e_b).powi(2) / e_b + (c - e_c).powi(2) / e_c
        })
        .sum();
    Some(chi_square_survival(statistic, (cells.len() - 1) as f64))
}

/// P(X ≥ x) for X ~ χ²(df): the regularized upper incomplete gamma Q(df/2, x/2), by its series
/// below a + 1 and Lentz's continued fraction above (Numerical Recipes §6.2).
pub fn chi_square_survival(x: f64, df: f64) -> f64 {
    let (a, x) = (df / 2.0, x / 2.0);
    if x <= 0.0 {
        return 1.0;
    }
    let log_prefix = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let (mut term, mut sum, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..500 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        (1.0 - sum * log_prefix.exp()).clamp(0.0, 1.0)
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..500 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            d = if d.abs() < tiny { tiny } else { d };
            c = b + an / c;
            c = if c.abs() < tiny { tiny } else { c };
            d = 1.0 / d;
            let step = d * c;
            h *= step;
            if (step - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (log_prefix.exp() * h).clamp(0.0, 1.0)
    }
}

/// ln Γ(z) for z > 0 (Lanczos, g = 7, n = 9; relative error ~1e-15).
fn ln_gamma(z: f64) -> f64 {
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if z < 0.5 {
        // Reflection: Γ(z)Γ(1−z) = π / sin(πz).
        let pi = std::f64::consts::PI;
        return (pi / (pi * z).sin()).ln() - ln_gamma(1.0 - z);
    }
    let z = z - 1.0;
    let t = z + 7.5;
    let series = COEFFICIENTS[1..]
        .iter()
        .enumerate()
        .fold(COEFFICIENTS[0], |sum, (i, c)| {
            sum + c / (z + i as f64 + 1.0)
        });
    0.5 * (2.0 * std::f64::consts::PI).ln() + (z + 0.5) * t.ln() - t + series.ln()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KolmogorovSmirnov {
    pub statistic: f64,
    pub p_value: f64,
}

/// Two-sample Kolmogorov–Smirnov: unlike PSI, no bins and a p-value. D = sup |F_a − F_b|, p from
/// the asymptotic distribution at λ = (√ne + 0.12 + 0.11/√ne)·D, ne = nm/(n+m): Stephens, "Use of
/// the Kolmogorov–Smirnov, Cramér–von Mises and related statistics without extensive tables",
/// JRSS B 1970, two-sample form per Press et al., "Numerical Recipes in C", 1992, §14.3.
/// NaNs are ignored; `None` when either sample has nothing else.
pub fn kolmogorov_smirnov(a: &[f64], b: &[f64]) -> Option<KolmogorovSmirnov> {
    let (a, b) = (sorted(a), sorted(b));
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let statistic = largest_cdf_gap(&a, &b);
    let (n, m) = (a.len() as f64, b.len() as f64);
    let root_ne = (n * m / (n + m)).sqrt();
    let lambda = (root_ne + 0.12 + 0.11 / root_ne) * statistic;
    Some(KolmogorovSmirnov {
        statistic,
        p_value: kolmogorov_survival(lambda),
    })
}

/// sup |F_a − F_b| over two sorted samples, stepping past every copy of a value in both samples
/// before comparing, so ties never open a gap that the empirical CDFs do not have.
fn largest_cdf_gap(a: &[f64], b: &[f64]) -> f64 {
    let (mut i, mut j, mut gap) = (0, 0, 0.0_f64);
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        gap = gap.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    gap
}

/// Q(λ) = P(K > λ) = 2 Σ_{k≥1} (−1)^{k−1} e^{−2k²λ²}; below λ = 1.18, where that converges
/// slowly, its theta-transformed twin 1 − (√(2π)/λ) Σ_{k≥1} e^{−(2k−1)²π²/(8λ²)}. Four terms of
/// either reach 1e-16 in its range.
fn kolmogorov_survival(lambda: f64) -> f64 {
    if lambda.is_nan() || lambda <= 0.0 {
        return 1.0;
    }
    let survival = if lambda < 1.18 {
        let sum: f64 = (1..=4)
            .map(|k| {
                let odd = f64::from(2 * k - 1);
                (-odd * odd * PI * PI / (8.0 * lambda * lambda)).exp()
            })
            .sum();
        1.0 - (2.0 * PI).sqrt() / lambda * sum
    } else {
        let sum: f64 = (1..=4)
            .map(|k| (-1.0_f64).powi(k - 1) * (-2.0 * f64::from(k * k) * lambda * lambda).exp())
            .sum();
        2.0 * sum
    };
    survival.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastrand::Rng;

    const ALPHA: f64 = 0.01;
    const MARGIN: f64 = 0.005;

    /// Three standard errors of an observed rate over `runs` independent runs.
    fn slack(rate: f64, runs: usize) -> f64 {
        3.0 * (rate * (1.0 - rate) / runs as f64).sqrt()
    }

    fn share_below(p_values: &[f64], level: f64) -> f64 {
        p_values.iter().filter(|&&p| p < level).count() as f64 / p_values.len() as f64
    }

    /// Binomial(n, p) by inversion, in chunks of 200 trials so (1−p)^chunk never underflows.
    fn binomial(rng: &mut Rng, n: u64, p: f64) -> u64 {
        if p > 0.5 {
            return n - binomial(rng, n, 1.0 - p);
        }
        let (mut successes, mut left) = (0, n);
        while left > 0 {
            let chunk = left.min(200);
            let u = rng.f64();
            let (mut k, mut pmf) = (0, (1.0 - p).powi(chunk as i32));
            let mut cdf = pmf;
            while u > cdf && k < chunk {
                pmf *= (chunk - k) as f64 / (k + 1) as f64 * p / (1.0 - p);
                k += 1;
                cdf += pmf;
            }
            successes += k;
            left -= chunk;
        }
        successes
    }

    /// Distinct units hashed into a bitmap of `bits` bits (bit = hash mod bits), then counted.
    fn sketch(rng: &mut Rng, units: u64, bits: u64) -> Estimate {
        let mut bitmap = vec![0_u64; bits.div_ceil(64) as usize];
        for _ in 0..units {
            let bit = rng.u64(..) % bits;
            bitmap[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        let ones: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        linear_counting(bits - ones, bits)
    }

    fn proportions(canary: (u64, u64), baseline: (u64, u64)) -> Proportions {
        Proportions {
            canary_failures: canary.0,
            canary_total: canary.1,
            baseline_failures: baseline.0,
            baseline_total: baseline.1,
        }
    }

    fn uniform(rng: &mut Rng, n: usize, shift: f64) -> Vec<f64> {
        (0..n).map(|_| rng.f64() + shift).collect()
    }

    #[test]
    fn normal_cdf_matches_reference_values() {
        // 0.5·erfc(−x/√2) from Python's math module.
        for (x, expected) in [
            (1.96, 0.975_002_104_851_779_5),
            (-3.09, 0.001_000_782_476_614_011),
            (-6.0, 9.865_876_450_377_012e-10),
            (-8.0, 6.220_960_574_271_819e-16),
        ] {
            let relative = (normal_cdf(x) - expected).abs() / expected;
            assert!(relative < 1e-6, "Φ({x}) = {} not {expected}", normal_cdf(x));
            assert!((normal_cdf(x) + normal_cdf(-x) - 1.0).abs() < 1e-15);
        }
        assert_eq!(normal_cdf(0.0), 0.5);
    }

    /// The first look (1-based) at which the sequential test, and a naive fixed-horizon one-sided
    /// z-test at the same α, reject in one simulated run.
    #[derive(Default)]
    struct Run {
        sequential: Option<usize>,
        naive: Option<usize>,
    }

    /// A run of `looks` looks, each adding 200 requests per arm to the cumulative counts.
    fn simulate(rng: &mut Rng, baseline_rate: f64, canary_rate: f64, looks: usize) -> Run {
        const Z_ALPHA: f64 = 2.326_347_874_040_840_8; // Φ⁻¹(1 − 0.01)
        let (mut canary_failures, mut baseline_failures, mut run) = (0, 0, Run::default());
        for look in 1..=looks {
            canary_failures += binomial(rng, 200, canary_rate);
            baseline_failures += binomial(rng, 200, baseline_rate);
            let total = 200 * look as u64;
            let counts = proportions((canary_failures, total), (baseline_failures, total));
            let test = error_rate_increase(counts, MARGIN, default_tau(MARGIN));
            assert!(
                test.difference > MARGIN || test.likelihood_ratio <= 1.0,
                "{test:?}"
            );
            if test.p_value <= ALPHA {
                run.sequential.get_or_insert(look);
            }
            let variance = [(canary_failures, total), (baseline_failures, total)]
                .map(|(x, n)| arm(x, n).map_or(f64::INFINITY, |arm| arm.variance));
            if (test.difference - MARGIN) / (variance[0] + variance[1]).sqrt() > Z_ALPHA {
                run.naive.get_or_insert(look);
            }
        }
        run
    }

    /// 2000 runs × 40 looks at the boundary of H0: canary rate = baseline rate + margin.
    fn runs_at_null_boundary() -> Vec<Run> {
        let mut rng = Rng::with_seed(0x5EC0_0001);
        (0..2000)
            .map(|_| simulate(&mut rng, 0.01, 0.01 + MARGIN, 40))
            .collect()
    }

    #[test]
    fn error_rate_increase_keeps_alpha_under_repeated_looks() {
        let runs = runs_at_null_boundary();
        let rate = runs.iter().filter(|r| r.sequential.is_some()).count() as f64 / 2000.0;
        println!("mSPRT false rollbacks, 2000 runs x 40 looks: {rate:.4} (alpha {ALPHA})");
        assert!(rate <= ALPHA + slack(ALPHA, 2000), "rate {rate}");
    }

    #[test]
    fn naive_z_test_checked_every_look_exceeds_alpha() {
        let runs = runs_at_null_boundary();
        let rate = runs.iter().filter(|r| r.naive.is_some()).count() as f64 / 2000.0;
        println!("naive z-test false rollbacks, same runs: {rate:.4} (alpha {ALPHA})");
        assert!(rate > 3.0 * ALPHA, "rate {rate}");
    }

    #[test]
    fn error_rate_increase_catches_a_broken_canary_within_five_looks() {
        let mut rng = Rng::with_seed(0x5EC0_0002);
        let looks: Vec<usize> = (0..500)
            .filter_map(|_| simulate(&mut rng, 0.005, 0.05, 5).sequential)
            .collect();
        let caught = looks.len() as f64 / 500.0;
        let mean_look = looks.iter().sum::<usize>() as f64 / looks.len() as f64;
        println!("power within 5 looks of 200/arm: {caught:.3}, mean look {mean_look:.2}");
        assert!(caught >= 0.95, "caught {caught}");
    }

    #[test]
    fn error_rate_increase_never_rejects_a_better_canary() {
        let mut rng = Rng::with_seed(0x5EC0_0003);
        for _ in 0..500 {
            assert_eq!(simulate(&mut rng, 0.05, 0.005, 40).sequential, None);
        }
    }

    #[test]
    fn error_rate_increase_is_neutral_without_traffic_and_total_on_extremes() {
        let counts = |cf, ct, bf, bt| proportions((cf, ct), (bf, bt));
        for (c, margin) in [
            (counts(0, 0, 0, 0), 0.01),
            (counts(5, 9, 0, 0), 0.0),
            (counts(5, 9, 1, 9), f64::NAN),
        ] {
            assert_eq!(error_rate_increase(c, margin, 0.01), NO_EVIDENCE);
        }
        let max = u64::MAX;
        for (c, tau) in [
            (counts(0, 1, 0, 1), 0.01),
            (counts(1, 1, 0, 1), 0.0),
            (counts(9, 3, 0, 1), f64::INFINITY),
            (counts(max, max, 0, max), 1e-300),
            (counts(0, max, max, max), 1e300),
        ] {
            let test = error_rate_increase(c, MARGIN, tau);
            assert!(test.likelihood_ratio.is_finite() && test.likelihood_ratio >= 0.0);
            assert!((0.0..=1.0).contains(&test.p_value), "{c:?} {test:?}");
        }
        assert_eq!(
            error_rate_increase(counts(max, max, 0, max), MARGIN, 0.01).p_value,
            0.0
        );
    }

    #[test]
    fn linear_counting_is_unbiased_within_its_variance() {
        const BITS: u64 = 1 << 16;
        for n in [100, 1000, 10_000, 50_000] {
            let mut rng = Rng::with_seed(n);
            let estimates: Vec<Estimate> = (0..200).map(|_| sketch(&mut rng, n, BITS)).collect();
            for e in &estimates {
                // One extra unit: each hash collision loses a whole unit, which matters at n = 100.
                assert!(
                    (e.value - n as f64).abs() <= 4.0 * e.variance.sqrt() + 1.0,
                    "{n}: {e:?}"
                );
            }
            let mean = estimates.iter().map(|e| e.value).sum::<f64>() / 200.0;
            let spread: f64 = estimates
                .iter()
                .map(|e| (e.value - mean).powi(2))
                .sum::<f64>()
                / 199.0;
            let load = n as f64 / BITS as f64;
            let formula = BITS as f64 * (load.exp_m1() - load);
            println!(
                "linear counting n={n}: mean {mean:.1}, var {spread:.1}, formula {formula:.1}"
            );
            assert!(spread < 2.0 * formula && spread > formula / 2.0, "n {n}");
        }
    }

    #[test]
    fn linear_counting_reports_saturation_and_empty_bitmaps() {
        let saturated = linear_counting(0, 1024);
        assert_eq!(saturated.value, 1024.0 * 1024_f64.ln());
        assert!(saturated.variance.is_infinite());
        let empty = linear_counting(1024, 1024);
        assert_eq!((empty.value, empty.variance), (0.0, 0.0));
        assert_eq!(linear_counting(2000, 1024).value, 0.0);
        assert!(linear_counting(0, 0).variance.is_infinite());
    }

    fn exact(count: u64) -> Estimate {
        Estimate {
            value: count as f64,
            variance: 0.0,
        }
    }

    #[test]
    fn sample_ratio_mismatch_holds_its_level_on_exact_counts() {
        let mut rng = Rng::with_seed(0x5EC0_0004);
        let p_values: Vec<f64> = (0..5000)
            .map(|_| {
                let canary = binomial(&mut rng, 5000, 0.2);
                sample_ratio_mismatch(exact(canary), exact(5000 - canary), 0.2)
            })
            .collect();
        let (strict, loose) = (share_below(&p_values, 0.001), share_below(&p_values, 0.05));
        println!("SRM null, exact counts: p<0.001 {strict:.4}, p<0.05 {loose:.4}");
        assert!(strict <= 0.001 + slack(0.001, 5000));
        assert!((loose - 0.05).abs() <= slack(0.05, 5000));
    }

    #[test]
    fn sample_ratio_mismatch_flags_a_canary_getting_half_its_share() {
        let mut rng = Rng::with_seed(0x5EC0_0005);
        for _ in 0..100 {
            let canary = binomial(&mut rng, 2000, 0.1);
            let p = sample_ratio_mismatch(exact(canary), exact(2000 - canary), 0.2);
            assert!(p < 1e-6, "p {p}");
        }
        assert_eq!(sample_ratio_mismatch(exact(0), exact(0), 0.2), 1.0);
        assert_eq!(sample_ratio_mismatch(exact(3), exact(10), 0.0), 0.0);
        assert_eq!(
            sample_ratio_mismatch(linear_counting(0, 64), exact(10), 0.5),
            1.0
        );
    }

    /// Null rates of p < 0.01 over 500 runs of 30 000 units split 20/80, each arm's units sketched
    /// into its own bitmap: with the sketch variance, and with it dropped.
    fn sketched_srm_null_rates(bits: u64, seed: u64) -> (f64, f64) {
        let mut rng = Rng::with_seed(seed);
        let point = |e: Estimate| Estimate { variance: 0.0, ..e };
        let (mut with_noise, mut without_noise) = (vec![], vec![]);
        for _ in 0..500 {
            let canary_units = binomial(&mut rng, 30_000, 0.2);
            let canary = sketch(&mut rng, canary_units, bits);
            let baseline = sketch(&mut rng, 30_000 - canary_units, bits);
            with_noise.push(sample_ratio_mismatch(canary, baseline, 0.2));
            without_noise.push(sample_ratio_mismatch(point(canary), point(baseline), 0.2));
        }
        let rate = |p_values: &[f64]| share_below(p_values, 0.01);
        (rate(&with_noise), rate(&without_noise))
    }

    #[test]
    fn sample_ratio_mismatch_absorbs_sketch_noise() {
        // 2^16 bits: the sketches add ~8 % to the binomial variance, so dropping it costs little.
        let (with_noise, without) = sketched_srm_null_rates(1 << 16, 0x5EC0_0006);
        println!("SRM null, 2^16-bit sketches: p<0.01 {with_noise:.4}, without var {without:.4}");
        assert!(with_noise <= 0.01 + slack(0.01, 500));
        // 2^13 bits: the sketches more than double it; without the term the test cries wolf.
        let (with_noise, without) = sketched_srm_null_rates(1 << 13, 0x5EC0_000A);
        println!("SRM null, 2^13-bit sketches: p<0.01 {with_noise:.4}, without var {without:.4}");
        assert!(with_noise <= 0.01 + slack(0.01, 500));
        assert!(without > 3.0 * 0.01);
    }

    #[test]
    fn psi_is_zero_for_identical_samples_and_large_for_a_shift() {
        let mut rng = Rng::with_seed(0x5EC0_0007);
        let baseline = uniform(&mut rng, 1000, 0.0);
        assert_eq!(psi(&baseline, &baseline, 10), Some(0.0));
        let shifted = psi(&baseline, &uniform(&mut rng, 1000, 0.3), 10).expect("samples");
        println!("PSI of U(0,1) vs U(0.3,1.3): {shifted:.3}");
        assert!(shifted > 0.25);
    }

    #[test]
    fn psi_of_same_distribution_stays_small() {
        let mut rng = Rng::with_seed(0x5EC0_0008);
        let mut same = || {
            psi(
                &uniform(&mut rng, 2000, 0.0),
                &uniform(&mut rng, 2000, 0.0),
                10,
            )
        };
        let mut values: Vec<f64> = (0..500).map(|_| same().expect("samples")).collect();
        values.sort_by(f64::total_cmp);
        let small = share_below(&values, 0.05);
        println!(
            "PSI null, 2000 vs 2000: 99th percentile {:.4}, < 0.05 in {small:.3}",
            values[494]
        );
        assert!(small >= 0.99);
    }

    #[test]
    fn psi_merges_bins_of_repeated_values() {
        let labels = |zeros, ones| [vec![0.0; zeros], vec![1.0; ones]].concat();
        let shifted = psi(&labels(700, 300), &labels(600, 400), 10).expect("samples");
        let by_class = psi_counts(&[700, 300], &[600, 400]).expect("counts");
        assert!(
            shifted > 0.0 && (shifted - by_class).abs() < 1e-12,
            "{shifted} {by_class}"
        );
        assert_eq!(psi(&labels(1000, 0), &labels(1000, 0), 10), Some(0.0));
        let new_class = psi(&labels(1000, 0), &labels(0, 1000), 10).expect("samples");
        assert!(new_class.is_finite() && new_class > 0.25);
        assert_eq!(psi(&labels(5, 5), &labels(4, 6), 0), Some(0.0));
        assert_eq!(psi(&[], &[1.0], 10), None);
        assert_eq!(psi(&[1.0], &[], 10), None);
        assert_eq!(psi(&[f64::NAN], &[1.0], 10), None);
    }

    #[test]
    fn psi_counts_compares_class_mixes() {
        assert_eq!(psi_counts(&[10, 20, 70], &[10, 20, 70]), Some(0.0));
        assert_eq!(psi_counts(&[10, 20, 70], &[20, 40, 140]), Some(0.0));
        let shifted = psi_counts(&[10, 20, 70], &[30, 20, 50]).expect("counts");
        assert!(shifted > 0.1, "{shifted}");
        let missing = psi_counts(&[50, 50, 0], &[50, 45, 5]).expect("counts");
        assert!(missing.is_finite() && missing > 0.0);
        assert_eq!(psi_counts(&[50, 50], &[50, 45, 5]), Some(missing));
        assert_eq!(psi_counts(&[0, 0], &[1, 2]), None);
        assert_eq!(psi_counts(&[1, 2], &[]), None);
    }

    #[test]
    fn kolmogorov_smirnov_hand_computed_statistics_and_ties() {
        let d = |a: &[f64], b: &[f64]| kolmogorov_smirnov(a, b).expect("samples").statistic;
        // F_a − F_b at 3 is 3/4 − 1/5, at 4 it is 1 − 2/5.
        assert!((d(&[1.0, 2.0, 3.0, 4.0], &[3.0, 4.0, 5.0, 6.0, 7.0]) - 0.6).abs() < 1e-12);
        // At the tie 1: F_a = 2/3, F_b = 1/3; stepping one copy at a time would claim 2/3.
        assert!((d(&[1.0, 1.0, 2.0], &[1.0, 2.0, 2.0]) - 1.0 / 3.0).abs() < 1e-12);
        let same = kolmogorov_smirnov(&[2.0, 1.0, 1.0], &[1.0, 2.0, 1.0]).expect("samples");
        assert_eq!((same.statistic, same.p_value), (0.0, 1.0));
        assert_eq!(kolmogorov_smirnov(&[], &[1.0]), None);
    }

    #[test]
    fn kolmogorov_survival_matches_tables_across_its_two_series() {
        // P(K > λ): the 5 % and 1 % critical values, and the series summed to 200 terms.
        for (lambda, q) in [
            (1.3581, 0.05),
            (1.6276, 0.01),
            (0.5, 0.963_945_24),
            (1.0, 0.269_999_67),
        ] {
            assert!((kolmogorov_survival(lambda) - q).abs() < 1e-4, "λ {lambda}");
        }
        assert!((kolmogorov_survival(1.18 - 1e-12) - kolmogorov_survival(1.18)).abs() < 1e-12);
        assert_eq!(kolmogorov_survival(0.0), 1.0);
    }

    #[test]
    fn kolmogorov_smirnov_holds_its_level_and_detects_a_shift() {
        let mut rng = Rng::with_seed(0x5EC0_0009);
        let mut p_value = |shift| {
            let (a, b) = (uniform(&mut rng, 200, 0.0), uniform(&mut rng, 200, shift));
            kolmogorov_smirnov(&a, &b).expect("samples").p_value
        };
        let null: Vec<f64> = (0..2000).map(|_| p_value(0.0)).collect();
        let (strict, loose) = (share_below(&null, 0.01), share_below(&null, 0.05));
        println!("KS null, 200 vs 200: p<0.01 {strict:.4}, p<0.05 {loose:.4}");
        assert!(strict <= 0.01 + slack(0.01, 2000));
        assert!(loose <= 0.05 + slack(0.05, 2000));
        // D is 0.3 + noise, so now and then a run lands just above 1e-6 at n = 200.
        let shifted: Vec<f64> = (0..200).map(|_| p_value(0.3)).collect();
        let detected = share_below(&shifted, 1e-6);
        println!("KS, 200 vs 200 shifted by 0.3: p<1e-6 in {detected:.3} of runs");
        assert!(detected >= 0.9);
    }

    #[test]
    fn chi_square_survival_matches_tables() {
        // Critical values: P(χ²(1) ≥ 3.841) = 0.05, P(χ²(5) ≥ 15.086) = 0.01, P(χ²(10) ≥ 29.588) = 0.001.
        for (x, df, p) in [
            (3.841, 1.0, 0.05),
            (15.086, 5.0, 0.01),
            (29.588, 10.0, 0.001),
            (2.0, 2.0, (-1.0f64).exp()),
        ] {
            let got = chi_square_survival(x, df);
            assert!((got - p).abs() / p < 2e-3, "χ²({df}) ≥ {x}: {got}, not {p}");
        }
        assert_eq!(chi_square_survival(0.0, 3.0), 1.0);
    }

    #[test]
    fn homogeneity_holds_its_level_and_finds_a_changed_class_mix() {
        let mut rng = fastrand::Rng::with_seed(21);
        let draw = |rng: &mut fastrand::Rng, shares: &[f64], n: usize| {
            let mut counts = vec![0u64; shares.len()];
            for _ in 0..n {
                let mut u = rng.f64();
                let class = shares
                    .iter()
                    .position(|&share| {
                        u -= share;
                        u < 0.0
                    })
                    .unwrap_or(shares.len() - 1);
                counts[class] += 1;
            }
            counts
        };
        // Ten equally likely classes, 100 answers an arm: PSI alone is over 0.1 most of the time.
        let even = [0.1; 10];
        let runs = 2000;
        let rejected = (0..runs)
            .filter(|_| {
                let (b, c) = (draw(&mut rng, &even, 100), draw(&mut rng, &even, 100));
                homogeneity(&b, &c).is_some_and(|p| p <= 0.01)
            })
            .count();
        let rate = rejected as f64 / runs as f64;
        assert!(
            rate <= 0.01 + 3.0 * (0.01f64 * 0.99 / runs as f64).sqrt(),
            "null rate {rate}"
        );
        let shifted = [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05];
        let found = (0..200)
            .filter(|_| {
                let (b, c) = (draw(&mut rng, &even, 500), draw(&mut rng, &shifted, 500));
                homogeneity(&b, &c).is_some_and(|p| p <= 0.01)
            })
            .count();
        assert!(found >= 190, "found {found} of 200");
        assert_eq!(homogeneity(&[10, 0], &[]), None);
        assert_eq!(
            homogeneity(&[1, 1, 1], &[1, 1, 1]),
            None,
            "all pooled: nothing to test"
        );
    }
}
