//! What a run records while it runs.
//!
//! Each connection owns a [`Recorder`] (no locking on the hot path); the only shared state is
//! the per-user variant table for stickiness, the variant name table, and the live counters the
//! progress bar reads. [`crate::report`] turns the merged result into the final numbers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use http::HeaderValue;
use serde::Serialize;

use crate::population::UserId;
use crate::tls::Negotiated;

/// Latencies above this are recorded as this (one hour, in microseconds); nothing in a bounded
/// run gets near it, and the bound keeps the histogram at a fixed, small size.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Distinct variant names kept apart; further names share [`OVERFLOW_VARIANT`]. A misconfigured
/// `--variant-header` (say, a request ID) would otherwise grow the tables with every response.
const MAX_VARIANTS: usize = 256;
pub const OVERFLOW_VARIANT: &str = "(other)";

/// Why a request did not get a successful answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// TCP connect or HTTP handshake failed or timed out.
    Connect,
    /// The TLS handshake failed (certificate refused, alert, nothing in common, the server
    /// hung up) or did not finish within `--timeout`.
    Tls,
    /// No complete answer within `--timeout` (or a rate-mode request that waited that long for
    /// a free connection).
    Timeout,
    Status4xx,
    Status5xx,
    /// The connection broke mid-exchange: reset, closed early, truncated answer.
    Io,
    /// Anything else, e.g. an answer hyper could not parse.
    Other,
}

impl ErrorKind {
    /// Classifies a hyper error by what a user would look for: a dropped or reset connection
    /// is `io`, a malformed answer is `other`.
    pub fn of_hyper(error: &hyper::Error) -> Self {
        if error.is_timeout() {
            return ErrorKind::Timeout;
        }
        if error.is_closed()
            || error.is_incomplete_message()
            || error.is_canceled()
            || error.is_body_write_aborted()
            || has_io_source(error)
        {
            return ErrorKind::Io;
        }
        ErrorKind::Other
    }
}

fn has_io_source(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = error.source();
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Failed requests by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    pub connect: u64,
    pub tls: u64,
    pub timeout: u64,
    pub status_4xx: u64,
    pub status_5xx: u64,
    pub io: u64,
    pub other: u64,
}

impl ErrorCounts {
    pub fn total(&self) -> u64 {
        self.connect
            + self.tls
            + self.timeout
            + self.status_4xx
            + self.status_5xx
            + self.io
            + self.other
    }

    /// Failures that produced no HTTP answer (so no latency sample).
    pub fn without_answer(&self) -> u64 {
        self.connect + self.tls + self.timeout + self.io + self.other
    }

    fn add(&mut self, kind: ErrorKind) {
        let counter = match kind {
            ErrorKind::Connect => &mut self.connect,
            ErrorKind::Tls => &mut self.tls,
            ErrorKind::Timeout => &mut self.timeout,
            ErrorKind::Status4xx => &mut self.status_4xx,
            ErrorKind::Status5xx => &mut self.status_5xx,
            ErrorKind::Io => &mut self.io,
            ErrorKind::Other => &mut self.other,
        };
        *counter += 1;
    }

    fn merge(&mut self, other: &ErrorCounts) {
        self.connect += other.connect;
        self.tls += other.tls;
        self.timeout += other.timeout;
        self.status_4xx += other.status_4xx;
        self.status_5xx += other.status_5xx;
        self.io += other.io;
        self.other += other.other;
    }
}

/// Index into [`VariantNames`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VariantId(u32);

impl VariantId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Variant names seen in responses, numbered in order of first appearance.
#[derive(Debug, Default)]
pub struct VariantNames {
    names: Mutex<Vec<String>>,
}

impl VariantNames {
    pub fn id(&self, name: &str) -> VariantId {
        // A panic elsewhere cannot leave the Vec half-updated, so a poisoned lock is still sound.
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        let position = names.iter().position(|n| n == name).or_else(|| {
            if names.len() < MAX_VARIANTS {
                names.push(name.to_owned());
                Some(names.len() - 1)
            } else {
                None
            }
        });
        let index = match position {
            Some(index) => index,
            None => match names.iter().position(|n| n == OVERFLOW_VARIANT) {
                Some(index) => index,
                None => {
                    // The overflow name is allowed one slot past the cap.
                    names.push(OVERFLOW_VARIANT.to_owned());
                    names.len() - 1
                }
            },
        };
        // index <= MAX_VARIANTS, far below u32::MAX.
        VariantId(u32::try_from(index).unwrap_or(u32::MAX))
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.names
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A user answered by two different variants: the first answer's and a later one's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub user: UserId,
    pub first: VariantId,
    pub then: VariantId,
}

/// Which variant first answered each user, and whether another one answered later.
///
/// One `AtomicU32` per user, shared by all connections, because the same user's requests go
/// out on different connections: 0 = not answered yet, else `variant + 1`, with the top bit
/// set once a second variant answered.
#[derive(Debug)]
pub struct Stickiness {
    first: Box<[AtomicU32]>,
    examples: Mutex<Vec<Violation>>,
}

const VIOLATED: u32 = 1 << 31;
/// Violations kept verbatim for the report; the count covers all of them.
const MAX_EXAMPLES: usize = 10;

impl Stickiness {
    pub fn new(users: u32) -> Self {
        Stickiness {
            first: (0..users).map(|_| AtomicU32::new(0)).collect(),
            examples: Mutex::new(Vec::new()),
        }
    }

    pub fn observe(&self, user: UserId, variant: VariantId) {
        let Some(slot) = self.first.get(user.index()) else {
            return;
        };
        let tag = variant.0 + 1;
        // The common case, a user answered by its variant again, only reads.
        let current = slot.load(Ordering::Relaxed);
        if current & !VIOLATED == tag {
            return;
        }
        let first = match slot.compare_exchange(0, tag, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return,
            Err(first) if first & !VIOLATED == tag => return,
            Err(first) => first,
        };
        if slot.fetch_or(VIOLATED, Ordering::Relaxed) & VIOLATED == 0 {
            let mut examples = self.examples.lock().unwrap_or_else(PoisonError::into_inner);
            if examples.len() < MAX_EXAMPLES {
                examples.push(Violation {
                    user,
                    first: VariantId((first & !VIOLATED) - 1),
                    then: variant,
                });
            }
        }
    }

    /// Per variant index: users whose first answer came from it; plus the violation count.
    pub fn summary(&self) -> StickinessSummary {
        let mut users_by_variant: Vec<u64> = Vec::new();
        let mut violations = 0;
        for slot in self.first.iter() {
            let value = slot.load(Ordering::Relaxed);
            if value == 0 {
                continue;
            }
            if value & VIOLATED != 0 {
                violations += 1;
            }
            let index = ((value & !VIOLATED) - 1) as usize;
            if users_by_variant.len() <= index {
                users_by_variant.resize(index + 1, 0);
            }
            users_by_variant[index] += 1;
        }
        let examples = self
            .examples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        StickinessSummary {
            users_by_variant,
            violations,
            examples,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StickinessSummary {
    /// Indexed by variant id: users first answered by that variant.
    pub users_by_variant: Vec<u64>,
    /// Users answered by more than one variant.
    pub violations: u64,
    pub examples: Vec<Violation>,
}

impl StickinessSummary {
    pub fn users_seen(&self) -> u64 {
        self.users_by_variant.iter().sum()
    }
}

/// Counters the progress bar polls while the run is going.
#[derive(Debug, Default)]
pub struct Live {
    pub done: AtomicU64,
    pub errors: AtomicU64,
}

/// State shared by all connections of one measured phase.
#[derive(Debug)]
pub struct Shared {
    pub variants: VariantNames,
    pub stickiness: Stickiness,
    pub live: Live,
}

impl Shared {
    pub fn new(users: u32) -> Self {
        Shared {
            variants: VariantNames::default(),
            stickiness: Stickiness::new(users),
            live: Live::default(),
        }
    }
}

/// One connection's measurements; merged into one at the end of the run.
#[derive(Debug, Clone)]
pub struct Recorder {
    shared: Arc<Shared>,
    pub latency_us: Histogram<u64>,
    pub errors: ErrorCounts,
    pub statuses: BTreeMap<u16, u64>,
    /// Indexed by variant id: answers carrying that variant.
    pub variant_answers: Vec<u64>,
    pub missing_variant: u64,
    pub requests: u64,
    pub answers: u64,
    /// Connections opened (connected, and for https through the TLS handshake).
    pub connections_opened: u64,
    /// What the TLS handshakes settled on, with how many did each; a handful of entries at
    /// most (one, against one server).
    pub handshakes: Vec<(Negotiated, u64)>,
    /// The first failed TLS handshake's reason, for the report: a count alone does not say
    /// whether the certificate or the cipher was refused.
    pub first_tls_error: Option<String>,
    /// Last header values seen and their ids, so the shared name table is locked only for a
    /// variant this connection has not met yet.
    seen: Vec<(HeaderValue, VariantId)>,
}

impl Recorder {
    pub fn new(shared: Arc<Shared>) -> Self {
        Recorder {
            shared,
            latency_us: latency_histogram(),
            errors: ErrorCounts::default(),
            statuses: BTreeMap::new(),
            variant_answers: Vec::new(),
            missing_variant: 0,
            requests: 0,
            answers: 0,
            connections_opened: 0,
            handshakes: Vec::new(),
            first_tls_error: None,
            seen: Vec::new(),
        }
    }

    /// An HTTP answer, whatever its status: it has a latency, and a variant if the proxy
    /// routed it.
    pub fn answer(
        &mut self,
        user: UserId,
        status: u16,
        latency: Duration,
        variant: Option<&HeaderValue>,
    ) {
        self.requests += 1;
        self.answers += 1;
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us
            .saturating_record(micros.clamp(1, MAX_LATENCY_US));
        *self.statuses.entry(status).or_default() += 1;
        let failed = match status {
            400..=499 => Some(ErrorKind::Status4xx),
            500..=599 => Some(ErrorKind::Status5xx),
            _ => None,
        };
        if let Some(kind) = failed {
            self.errors.add(kind);
            self.shared.live.errors.fetch_add(1, Ordering::Relaxed);
        }
        match variant {
            Some(value) => {
                let id = self.variant_id(value);
                let index = id.0 as usize;
                if self.variant_answers.len() <= index {
                    self.variant_answers.resize(index + 1, 0);
                }
                self.variant_answers[index] += 1;
                self.shared.stickiness.observe(user, id);
            }
            None => self.missing_variant += 1,
        }
        self.shared.live.done.fetch_add(1, Ordering::Relaxed);
    }

    /// A request that got no HTTP answer.
    pub fn failure(&mut self, kind: ErrorKind) {
        self.requests += 1;
        self.errors.add(kind);
        self.shared.live.errors.fetch_add(1, Ordering::Relaxed);
        self.shared.live.done.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection opened, with its TLS handshake's outcome for https.
    pub fn opened(&mut self, negotiated: Option<Negotiated>) {
        self.connections_opened += 1;
        if let Some(negotiated) = negotiated {
            add_handshakes(&mut self.handshakes, negotiated, 1);
        }
    }

    /// A TLS handshake that failed, counted with the request it was for by [`Self::failure`].
    pub fn tls_failed(&mut self, reason: String) {
        self.first_tls_error.get_or_insert(reason);
    }

    fn variant_id(&mut self, value: &HeaderValue) -> VariantId {
        if let Some((_, id)) = self.seen.iter().find(|(seen, _)| seen == value) {
            return *id;
        }
        let name = String::from_utf8_lossy(value.as_bytes());
        let id = self.shared.variants.id(name.trim());
        if self.seen.len() < MAX_VARIANTS {
            self.seen.push((value.clone(), id));
        }
        id
    }

    pub fn merge(&mut self, other: &Recorder) {
        // Both histograms share the same bounds, so adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
        self.errors.merge(&other.errors);
        for (status, count) in &other.statuses {
            *self.statuses.entry(*status).or_default() += count;
        }
        if self.variant_answers.len() < other.variant_answers.len() {
            self.variant_answers.resize(other.variant_answers.len(), 0);
        }
        for (mine, theirs) in self.variant_answers.iter_mut().zip(&other.variant_answers) {
            *mine += theirs;
        }
        self.missing_variant += other.missing_variant;
        self.requests += other.requests;
        self.answers += other.answers;
        self.connections_opened += other.connections_opened;
        for (negotiated, count) in &other.handshakes {
            add_handshakes(&mut self.handshakes, negotiated.clone(), *count);
        }
        if self.first_tls_error.is_none() {
            self.first_tls_error.clone_from(&other.first_tls_error);
        }
    }
}

fn add_handshakes(handshakes: &mut Vec<(Negotiated, u64)>, negotiated: Negotiated, count: u64) {
    match handshakes.iter_mut().find(|(seen, _)| *seen == negotiated) {
        Some((_, total)) => *total += count,
        None => handshakes.push((negotiated, count)),
    }
}

fn latency_histogram() -> Histogram<u64> {
    // Three significant digits: 0.1 % resolution at any latency, microsecond unit.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .expect("constant histogram bounds are valid: 1 <= low, 2 * low <= high, sigfig <= 5")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(names: &VariantNames, name: &str) -> VariantId {
        names.id(name)
    }

    #[test]
    fn a_user_answered_by_one_variant_is_not_a_violation() {
        let names = VariantNames::default();
        let stickiness = Stickiness::new(3);
        let control = variant(&names, "control");
        let treatment = variant(&names, "treatment");
        for _ in 0..5 {
            stickiness.observe(UserId(1), control);
            stickiness.observe(UserId(2), treatment);
        }
        let summary = stickiness.summary();
        assert_eq!(summary.violations, 0);
        assert_eq!(summary.users_by_variant, vec![1, 1]);
        assert_eq!(summary.users_seen(), 2);
        assert!(summary.examples.is_empty());
    }

    #[test]
    fn a_user_answered_by_two_variants_counts_once_and_keeps_its_first_variant() {
        let names = VariantNames::default();
        let stickiness = Stickiness::new(2);
        let control = variant(&names, "control");
        let treatment = variant(&names, "treatment");
        stickiness.observe(UserId(2), control);
        stickiness.observe(UserId(2), treatment);
        stickiness.observe(UserId(2), control);
        stickiness.observe(UserId(2), treatment);
        let summary = stickiness.summary();
        assert_eq!(summary.violations, 1);
        assert_eq!(summary.users_by_variant, vec![1]);
        assert_eq!(
            summary.examples,
            vec![Violation {
                user: UserId(2),
                first: control,
                then: treatment
            }]
        );
    }

    #[test]
    fn variant_names_are_numbered_in_order_and_capped() {
        let names = VariantNames::default();
        assert_eq!(names.id("a"), names.id("a"));
        assert_ne!(names.id("a"), names.id("b"));
        for i in 0..1000 {
            names.id(&format!("request-{i}"));
        }
        let snapshot = names.snapshot();
        assert_eq!(snapshot.len(), MAX_VARIANTS + 1);
        assert_eq!(snapshot[..2], ["a".to_owned(), "b".to_owned()]);
        assert_eq!(snapshot.last().map(String::as_str), Some(OVERFLOW_VARIANT));
    }

    #[test]
    fn recorder_counts_statuses_as_answers_and_errors() {
        let shared = Arc::new(Shared::new(10));
        let mut recorder = Recorder::new(shared.clone());
        let control = HeaderValue::from_static("control");
        let ms = Duration::from_millis(1);
        recorder.answer(UserId(1), 200, ms, Some(&control));
        recorder.answer(UserId(1), 503, ms, Some(&control));
        recorder.answer(UserId(2), 404, ms, None);
        recorder.failure(ErrorKind::Connect);
        assert_eq!((recorder.requests, recorder.answers), (4, 3));
        assert_eq!(recorder.errors.status_5xx, 1);
        assert_eq!(recorder.errors.status_4xx, 1);
        assert_eq!(recorder.errors.connect, 1);
        assert_eq!(recorder.errors.total(), 3);
        assert_eq!(recorder.errors.without_answer(), 1);
        assert_eq!(recorder.variant_answers, vec![2]);
        assert_eq!(recorder.missing_variant, 1);
        assert_eq!(recorder.latency_us.len(), 3);
        assert_eq!(shared.live.done.load(Ordering::Relaxed), 4);
        assert_eq!(shared.live.errors.load(Ordering::Relaxed), 3);

        let mut total = Recorder::new(shared);
        total.merge(&recorder);
        total.merge(&recorder);
        assert_eq!((total.requests, total.answers), (8, 6));
        assert_eq!(total.statuses[&200], 2);
        assert_eq!(total.variant_answers, vec![4]);
        assert_eq!(total.latency_us.len(), 6);
    }
}
