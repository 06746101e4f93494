//! The simulated users: who sends each request.
//!
//! abproxy assigns variants per user ID, so a realistic load needs many users with a realistic
//! skew: a few heavy users and a long tail (Zipf), or everyone alike (uniform).

use std::fmt;
use std::sync::Arc;

/// Upper bound on `--users`: the run keeps 4 bytes per user for the stickiness check and, for
/// Zipf, 8 more for the CDF, so this caps those tables at about 120 MB.
pub const MAX_USERS: u32 = 10_000_000;

/// How often each user shows up in the traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Distribution {
    /// Every user equally likely.
    Uniform,
    /// User of rank `k` (1-based) is picked with probability proportional to `1 / k^s`.
    Zipf { s: f64 },
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Distribution::Uniform => f.write_str("uniform"),
            Distribution::Zipf { s } => write!(f, "zipf(s={s})"),
        }
    }
}

/// A population definition that cannot be sampled from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PopulationError {
    #[error("the number of users must be between 1 and {MAX_USERS}, got {0}")]
    UserCount(u64),
    #[error("the Zipf exponent must be a finite number > 0, got {0}")]
    ZipfExponent(f64),
}

/// A user, identified by its rank: `UserId(1)` is `user-1`, the heaviest user under Zipf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserId(pub u32);

impl UserId {
    /// Zero-based position, for tables indexed by user.
    pub fn index(self) -> usize {
        // u32 always fits in usize on the 32/64-bit targets tokio supports.
        (self.0 as usize).saturating_sub(1)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user-{}", self.0)
    }
}

/// `users` user IDs (`user-1` .. `user-N`) and the law that picks one per request.
///
/// Cheap to clone: the Zipf CDF is shared, since every connection samples from the same table.
#[derive(Debug, Clone)]
pub struct Population {
    users: u32,
    distribution: Distribution,
    sampler: Sampler,
}

#[derive(Debug, Clone)]
enum Sampler {
    Uniform,
    /// `cdf[i]` = P(rank <= i + 1); the last entry is exactly 1.0 so a sample always lands.
    Zipf(Arc<[f64]>),
}

impl Default for Population {
    /// 1000 uniform users: enough that every variant of a typical split gets some.
    fn default() -> Self {
        Population {
            users: 1000,
            distribution: Distribution::Uniform,
            sampler: Sampler::Uniform,
        }
    }
}

impl Population {
    pub fn new(users: u64, distribution: Distribution) -> Result<Self, PopulationError> {
        let users = u32::try_from(users)
            .ok()
            .filter(|n| (1..=MAX_USERS).contains(n))
            .ok_or(PopulationError::UserCount(users))?;
        let sampler = match distribution {
            Distribution::Uniform => Sampler::Uniform,
            Distribution::Zipf { s } => {
                if !(s.is_finite() && s > 0.0) {
                    return Err(PopulationError::ZipfExponent(s));
                }
                Sampler::Zipf(zipf_cdf(users, s))
            }
        };
        Ok(Population {
            users,
            distribution,
            sampler,
        })
    }

    pub fn users(&self) -> u32 {
        self.users
    }

    pub fn distribution(&self) -> Distribution {
        self.distribution
    }

    /// Draws one user. Zipf uses inverse-CDF sampling: one uniform draw and a binary search,
    /// O(log N), with no rejection loop whose cost would vary between requests.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> UserId {
        match &self.sampler {
            Sampler::Uniform => UserId(rng.u32(1..=self.users)),
            Sampler::Zipf(cdf) => {
                let u = rng.f64();
                let index = cdf.partition_point(|&c| c <= u).min(cdf.len() - 1);
                // index < users <= MAX_USERS, so it fits in u32.
                UserId(u32::try_from(index + 1).unwrap_or(self.users))
            }
        }
    }
}

fn zipf_cdf(users: u32, s: f64) -> Arc<[f64]> {
    let mut cdf: Vec<f64> = (1..=users)
        .scan(0.0_f64, |sum, k| {
            *sum += f64::from(k).powf(-s);
            Some(*sum)
        })
        .collect();
    let total = cdf.last().copied().unwrap_or(1.0);
    for c in &mut cdf {
        *c /= total;
    }
    // Rounding can leave the last entry a hair under 1.0; a draw above it would fall off the end.
    if let Some(last) = cdf.last_mut() {
        *last = 1.0;
    }
    cdf.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(population: &Population, draws: usize, seed: u64) -> Vec<u64> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut counts = vec![0_u64; population.users() as usize];
        for _ in 0..draws {
            let user = population.sample(&mut rng);
            assert!(
                (1..=population.users()).contains(&user.0),
                "{user} out of range"
            );
            counts[user.index()] += 1;
        }
        counts
    }

    #[test]
    fn user_ids_are_one_based_and_named_user_n() {
        assert_eq!(UserId(1).to_string(), "user-1");
        assert_eq!(UserId(1).index(), 0);
        assert_eq!(UserId(42).to_string(), "user-42");
    }

    #[test]
    fn zipf_rank_one_is_the_most_frequent_and_frequency_falls_with_rank() {
        let population =
            Population::new(1000, Distribution::Zipf { s: 1.1 }).expect("valid population");
        let counts = histogram(&population, 200_000, 7);
        let max = counts.iter().copied().max().expect("valid population");
        assert_eq!(counts[0], max, "user-1 must be the most frequent");
        // P(1) / P(2) = 2^1.1 ≈ 2.14.
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!((1.9..2.4).contains(&ratio), "rank 1 vs 2 ratio {ratio}");
        assert!(counts[1] > counts[9], "rank 2 vs 10");
        assert!(counts[9] > counts[99], "rank 10 vs 100");
        // P(rank 1) = 1 / H(1000, 1.1) ≈ 0.179; the tolerance is about 10 standard deviations.
        let harmonic: f64 = (1..=1000).map(|k| f64::from(k).powf(-1.1)).sum();
        let share = counts[0] as f64 / 200_000.0;
        assert!(
            (share - 1.0 / harmonic).abs() < 0.009,
            "rank-1 share {share}"
        );
    }

    #[test]
    fn zipf_reaches_the_tail() {
        let population =
            Population::new(50, Distribution::Zipf { s: 1.1 }).expect("valid population");
        let counts = histogram(&population, 100_000, 3);
        assert!(
            counts.iter().all(|&c| c > 0),
            "every rank drawn: {counts:?}"
        );
    }

    #[test]
    fn single_user_population_always_draws_that_user() {
        for distribution in [Distribution::Uniform, Distribution::Zipf { s: 2.0 }] {
            let population = Population::new(1, distribution).expect("valid population");
            assert_eq!(histogram(&population, 100, 1), vec![100]);
        }
    }

    #[test]
    fn uniform_covers_every_user_evenly() {
        let population = Population::new(10, Distribution::Uniform).expect("valid population");
        let counts = histogram(&population, 100_000, 11);
        for (rank, &count) in counts.iter().enumerate() {
            assert!(
                (9_000..11_000).contains(&count),
                "user-{} drawn {count}",
                rank + 1
            );
        }
    }

    #[test]
    fn sampling_is_reproducible_from_a_seed() {
        let population =
            Population::new(500, Distribution::Zipf { s: 1.1 }).expect("valid population");
        assert_eq!(
            histogram(&population, 1000, 5),
            histogram(&population, 1000, 5)
        );
    }

    #[test]
    fn rejects_empty_or_oversized_populations_and_bad_exponents() {
        assert_eq!(
            Population::new(0, Distribution::Uniform).expect_err("invalid population"),
            PopulationError::UserCount(0)
        );
        let too_many = u64::from(MAX_USERS) + 1;
        assert_eq!(
            Population::new(too_many, Distribution::Uniform).expect_err("invalid population"),
            PopulationError::UserCount(too_many)
        );
        for s in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(
                Population::new(10, Distribution::Zipf { s }).is_err(),
                "s = {s}"
            );
        }
    }
}
