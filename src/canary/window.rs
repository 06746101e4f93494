//! What the guard learns about one arm during one interval, recorded by the request path
//! without a lock and taken whole by the guard at the end of the interval.
//!
//! Every recording is a few relaxed atomic operations on memory of fixed size (about 75 KiB
//! an arm, whatever the traffic). A sample that lands while the guard takes the window is
//! counted in this interval or the next, never lost and never twice.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::stats::{linear_counting, Estimate};
use crate::metrics::Answer;
use crate::route::Unit;

/// Latencies below this many microseconds get a bucket each.
const EXACT_MICROS: u64 = 64;
/// Buckets per power of two above that: a p99 read from them is within 1/32 (3 %).
const SUB_BUCKETS: u64 = 32;
const OCTAVES: u64 = 30;
pub(crate) const LATENCY_BUCKETS: usize = (EXACT_MICROS + OCTAVES * SUB_BUCKETS) as usize;
/// Predictions kept per arm per interval, as a uniform sample of all that were seen.
const RESERVOIR: usize = 4096;
/// Bits of the distinct-user sketch: below ~100,000 users an interval its counting error is
/// smaller than the split's own binomial noise (and the SRM test adds it in anyway).
const SKETCH_BITS: usize = 1 << 18;
/// Class labels told apart in the drift check; later labels share the last slot.
pub const CLASS_SLOTS: usize = 65;

/// One arm's interval, being recorded.
pub struct ArmWindow {
    requests: AtomicU64,
    failures: AtomicU64,
    latency: Box<[AtomicU64]>,
    predictions_seen: AtomicU64,
    predictions: Box<[AtomicU64]>,
    classes: Box<[AtomicU64]>,
    users: Box<[AtomicU64]>,
    /// Requests without a user ID, each assigned by its own random draw: each is a unit.
    anonymous: AtomicU64,
}

/// One arm's interval, taken.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmSample {
    pub requests: u64,
    /// Answers that count against the arm: 5xx (upstream errors included) and 499.
    pub failures: u64,
    /// Counts per latency bucket.
    pub latency: Vec<u64>,
    /// A uniform sample of the interval's numeric predictions (at most `RESERVOIR`).
    pub predictions: Vec<f64>,
    /// How many numeric predictions the interval had in all.
    pub predictions_seen: u64,
    pub classes: Vec<u64>,
    /// Distinct randomised units (users, plus anonymous requests) that reached the arm.
    pub units: Estimate,
}

impl Default for ArmWindow {
    fn default() -> Self {
        let zeros = |n| (0..n).map(|_| AtomicU64::new(0)).collect();
        ArmWindow {
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency: zeros(LATENCY_BUCKETS),
            predictions_seen: AtomicU64::new(0),
            predictions: zeros(RESERVOIR),
            classes: zeros(CLASS_SLOTS),
            users: zeros(SKETCH_BITS / 64),
            anonymous: AtomicU64::new(0),
        }
    }
}

impl ArmWindow {
    /// Counts one answered request (or one the client gave up on, as 499).
    pub fn record(&self, answer: Answer, elapsed: Duration, unit: Unit) {
        self.requests.fetch_add(1, Relaxed);
        if answer.is_failure() {
            self.failures.fetch_add(1, Relaxed);
        }
        self.latency[latency_bucket(elapsed)].fetch_add(1, Relaxed);
        match unit {
            Unit::User(hash) => {
                let bit = (hash % SKETCH_BITS as u64) as usize;
                self.users[bit / 64].fetch_or(1 << (bit % 64), Relaxed);
            }
            Unit::Anonymous => {
                self.anonymous.fetch_add(1, Relaxed);
            }
            Unit::Fixed => {}
        }
    }

    /// Keeps a numeric prediction in the interval's reservoir (Vitter's algorithm R).
    pub fn record_prediction(&self, value: f64) {
        let seen = self.predictions_seen.fetch_add(1, Relaxed);
        let slot = if seen < RESERVOIR as u64 {
            Some(seen as usize)
        } else {
            let pick = fastrand::u64(0..=seen);
            (pick < RESERVOIR as u64).then_some(pick as usize)
        };
        if let Some(slot) = slot {
            self.predictions[slot].store(value.to_bits(), Relaxed);
        }
    }

    pub fn record_class(&self, index: usize) {
        self.classes[index.min(CLASS_SLOTS - 1)].fetch_add(1, Relaxed);
    }

    /// Takes what was recorded since the last call and starts the next interval.
    pub fn take(&self) -> ArmSample {
        let take_all = |cells: &[AtomicU64]| cells.iter().map(|c| c.swap(0, Relaxed)).collect();
        let seen = self.predictions_seen.swap(0, Relaxed);
        let kept = seen.min(RESERVOIR as u64) as usize;
        let predictions = self.predictions[..kept]
            .iter()
            .map(|cell| f64::from_bits(cell.load(Relaxed)))
            .collect();
        let users: Vec<u64> = take_all(&self.users);
        let zero_bits: u64 = users.iter().map(|word| u64::from(word.count_zeros())).sum();
        let mut units = linear_counting(zero_bits, SKETCH_BITS as u64);
        units.value += self.anonymous.swap(0, Relaxed) as f64;
        // Failures first: a request is counted before its failure, so this order never
        // shows more failures than requests.
        let failures = self.failures.swap(0, Relaxed);
        ArmSample {
            requests: self.requests.swap(0, Relaxed),
            failures,
            latency: take_all(&self.latency),
            predictions,
            predictions_seen: seen,
            classes: take_all(&self.classes),
            units,
        }
    }
}

pub(crate) fn latency_bucket(elapsed: Duration) -> usize {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    if micros < EXACT_MICROS {
        return micros as usize;
    }
    let octave = u64::from(63 - micros.leading_zeros()) - EXACT_MICROS.trailing_zeros() as u64;
    if octave >= OCTAVES {
        return LATENCY_BUCKETS - 1;
    }
    let shift = octave + EXACT_MICROS.trailing_zeros() as u64 - SUB_BUCKETS.trailing_zeros() as u64;
    let sub = (micros >> shift) & (SUB_BUCKETS - 1);
    (EXACT_MICROS + octave * SUB_BUCKETS + sub) as usize
}

/// The middle of a latency bucket, in microseconds.
fn bucket_middle(index: usize) -> f64 {
    let index = index as u64;
    if index < EXACT_MICROS {
        return index as f64 + 0.5;
    }
    let octave = (index - EXACT_MICROS) / SUB_BUCKETS;
    let sub = (index - EXACT_MICROS) % SUB_BUCKETS;
    let shift = octave + EXACT_MICROS.trailing_zeros() as u64 - SUB_BUCKETS.trailing_zeros() as u64;
    let low = (SUB_BUCKETS + sub) << shift;
    low as f64 + (1u64 << shift) as f64 / 2.0
}

/// The `q` quantile of the latencies counted in `buckets`, or `None` when there are none.
pub fn latency_quantile(buckets: &[u64], q: f64) -> Option<Duration> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The smallest latency with at least q of the samples at or below it.
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    let index = buckets.iter().position(|&count| {
        seen += count;
        seen >= rank
    })?;
    Some(Duration::from_nanos((bucket_middle(index) * 1000.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn latency_buckets_keep_a_p99_within_three_percent() {
        for micros in [
            1u64, 63, 64, 65, 100, 999, 12_345, 40_000, 1_000_000, 30_000_000,
        ] {
            let index = latency_bucket(Duration::from_micros(micros));
            let middle = bucket_middle(index);
            let error = (middle - micros as f64).abs();
            // Below 64 µs a bucket is one microsecond wide; above, 1/32 of its value.
            let allowed = (micros as f64 / 32.0).max(0.5);
            assert!(error <= allowed, "{micros} µs read back as {middle}");
        }
        let ordered: Vec<usize> = (0..100_000u64)
            .step_by(7)
            .map(|m| latency_bucket(Duration::from_micros(m)))
            .collect();
        assert!(ordered.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(
            latency_bucket(Duration::from_secs(1_000_000)),
            LATENCY_BUCKETS - 1
        );
    }

    #[test]
    fn p99_of_a_window_is_the_ninety_ninth_percentile() {
        let window = ArmWindow::default();
        for i in 0..1000u64 {
            let elapsed = Duration::from_millis(if i < 990 { 2 } else { 40 });
            window.record(Answer::http(StatusCode::OK), elapsed, Unit::Fixed);
        }
        let sample = window.take();
        let p99 = latency_quantile(&sample.latency, 0.99).expect("samples");
        assert!((p99.as_secs_f64() - 0.002).abs() < 0.0001, "{p99:?}");
        let p999 = latency_quantile(&sample.latency, 0.999).expect("samples");
        assert!((p999.as_secs_f64() - 0.040).abs() < 0.001, "{p999:?}");
        assert_eq!(latency_quantile(&window.take().latency, 0.99), None);
    }

    #[test]
    fn failures_are_server_errors_and_abandoned_requests() {
        let window = ArmWindow::default();
        for code in [200, 404, 429, 499, 500, 502, 504] {
            let status = StatusCode::from_u16(code).expect("status");
            window.record(Answer::http(status), Duration::ZERO, Unit::Fixed);
        }
        let sample = window.take();
        assert_eq!((sample.requests, sample.failures), (7, 4));
        assert_eq!(window.take().requests, 0);
    }

    #[test]
    fn grpc_calls_fail_on_server_failure_codes_only() {
        let window = ArmWindow::default();
        for (code, index) in [(200, 0), (200, 3), (200, 5), (200, 13), (200, 14), (200, 4)] {
            let status = StatusCode::from_u16(code).expect("status");
            let answer = Answer::grpc(status, crate::grpc::Code::from_index(index));
            window.record(answer, Duration::ZERO, Unit::Fixed);
        }
        let sample = window.take();
        assert_eq!((sample.requests, sample.failures), (6, 3));
    }

    #[test]
    fn units_count_each_user_once_and_each_anonymous_request() {
        let window = ArmWindow::default();
        for user in 0..2000u64 {
            let hash = user.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for _ in 0..5 {
                window.record(
                    Answer::http(StatusCode::OK),
                    Duration::ZERO,
                    Unit::User(hash),
                );
            }
        }
        for _ in 0..100 {
            window.record(
                Answer::http(StatusCode::OK),
                Duration::ZERO,
                Unit::Anonymous,
            );
        }
        let units = window.take().units;
        assert!(
            (units.value - 2100.0).abs() < 4.0 * units.variance.sqrt() + 1.0,
            "{units:?}"
        );
    }

    #[test]
    fn the_reservoir_is_a_uniform_sample_of_every_prediction() {
        let window = ArmWindow::default();
        let n = 40_000;
        for i in 0..n {
            window.record_prediction(f64::from(i) / f64::from(n));
        }
        let predictions = window.take().predictions;
        assert_eq!(predictions.len(), RESERVOIR);
        let mean = predictions.iter().sum::<f64>() / predictions.len() as f64;
        // A uniform sample of U(0,1) has a mean within 4 standard errors of 0.5.
        assert!((mean - 0.5).abs() < 4.0 * (1.0 / 12.0 / RESERVOIR as f64).sqrt());
        let late = predictions.iter().filter(|&&p| p > 0.5).count();
        assert!(
            late > RESERVOIR / 3,
            "later predictions are kept too: {late}"
        );
    }
}
