//! Clock reads for what needs no finer time than a scheduler tick: deadlines of seconds,
//! idle timestamps, the second an answer's `Date` names.
//!
//! Linux keeps coarse clocks, the time at the last tick (1–10 ms ago), that the vDSO reads
//! without the TSC: 6.7 ns a read here against 19 for `Instant::now()`. A request reads them
//! for its header deadline, its connection's return to the pool and its `Date`; the latencies
//! the metrics record keep the fine clock.

use std::time::{Duration, Instant};

/// `Instant::now()`, up to a tick behind.
pub fn coarse_now() -> Instant {
    imp::coarse_now()
}

/// The seconds since the Unix epoch, up to a tick behind.
pub fn coarse_unix_seconds() -> u64 {
    imp::coarse_unix_seconds()
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use super::*;
    use rustix::time::{clock_gettime, ClockId, Timespec};
    use std::sync::OnceLock;

    /// An `Instant` and the monotonic clock's reading at that moment: `Instant` is that clock
    /// on Linux, but opaque, so coarse readings are placed as offsets from it.
    struct Anchor {
        instant: Instant,
        monotonic: Duration,
    }

    fn since_boot(time: Timespec) -> Duration {
        let seconds = u64::try_from(time.tv_sec).unwrap_or(0);
        let nanos = u32::try_from(time.tv_nsec).unwrap_or(0);
        Duration::new(seconds, nanos)
    }

    pub fn coarse_now() -> Instant {
        static ANCHOR: OnceLock<Anchor> = OnceLock::new();
        let anchor = ANCHOR.get_or_init(|| Anchor {
            instant: Instant::now(),
            monotonic: since_boot(clock_gettime(ClockId::Monotonic)),
        });
        let coarse = since_boot(clock_gettime(ClockId::MonotonicCoarse));
        match coarse.checked_sub(anchor.monotonic) {
            Some(later) => anchor.instant + later,
            // Read within a tick of the anchor: the coarse clock has not reached it yet.
            None => anchor.instant,
        }
    }

    pub fn coarse_unix_seconds() -> u64 {
        u64::try_from(clock_gettime(ClockId::RealtimeCoarse).tv_sec).unwrap_or(0)
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn coarse_now() -> Instant {
        Instant::now()
    }

    pub fn coarse_unix_seconds() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    /// More than any kernel's tick (HZ is 100 at the least).
    const TICK: Duration = Duration::from_millis(20);

    #[test]
    fn the_coarse_instant_is_now_within_a_tick() {
        for _ in 0..1000 {
            let before = Instant::now();
            let coarse = coarse_now();
            let after = Instant::now();
            assert!(coarse <= after, "{coarse:?} is after {after:?}");
            assert!(
                before.saturating_duration_since(coarse) <= TICK,
                "{coarse:?} is more than a tick before {before:?}"
            );
        }
    }

    #[test]
    fn the_coarse_wall_clock_names_this_second_or_the_one_before() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let coarse = coarse_unix_seconds();
        assert!(
            coarse + 1 >= before && coarse <= before + 1,
            "{coarse} against {before}"
        );
    }
}
