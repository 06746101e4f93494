//! The series every request touches, kept on plain atomics and rendered here.
//!
//! The exporter buffers each histogram sample, with a timestamp of its own, until a scrape
//! drains it: a clock read and an epoch-pinned push a sample, and each of its counters and
//! gauges bumps a generation beside its value. On the request path that came to 4 % of
//! abproxy's user time at full load. Here a count is one relaxed add, a latency two, and a
//! scrape reads the totals as they stand.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use metrics::{Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn};

use super::{LATENCY_BUCKETS, STREAM_BUCKETS};

/// The families kept here, with the names, help and buckets of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Family {
    Requests,
    InFlight,
    RequestDuration,
    ResponseDuration,
}

impl Family {
    const ALL: [Family; 4] = [
        Family::Requests,
        Family::InFlight,
        Family::RequestDuration,
        Family::ResponseDuration,
    ];

    fn name(self) -> &'static str {
        match self {
            Family::Requests => "abproxy_requests_total",
            Family::InFlight => "abproxy_requests_in_flight",
            Family::RequestDuration => "abproxy_request_duration_seconds",
            Family::ResponseDuration => "abproxy_response_duration_seconds",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Family::Requests => "Requests answered, by variant and HTTP status returned to the client (499: the client hung up first), and gRPC code for gRPC calls.",
            Family::InFlight => "Client requests being served now.",
            Family::RequestDuration => {
                "Time from request received to response head sent (time to first byte)."
            }
            Family::ResponseDuration => {
                "Time from request received to the last byte of the response body sent."
            }
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Family::Requests => "counter",
            Family::InFlight => "gauge",
            Family::RequestDuration | Family::ResponseDuration => "histogram",
        }
    }

    /// A new series of this family, at zero.
    fn series(self) -> Series {
        match self {
            Family::Requests => Series::Count(Arc::default()),
            Family::InFlight => Series::Level(Arc::default()),
            Family::RequestDuration => Series::Buckets(Arc::new(Buckets::new(LATENCY_BUCKETS))),
            Family::ResponseDuration => Series::Buckets(Arc::new(Buckets::new(STREAM_BUCKETS))),
        }
    }
}

type Labels = Vec<(&'static str, String)>;

#[derive(Clone)]
enum Series {
    Count(Arc<Count>),
    Level(Arc<Level>),
    Buckets(Arc<Buckets>),
}

/// One registry's direct series, by family and label set: registering a series that exists
/// returns its handle again, so counts run on across config generations.
#[derive(Default)]
pub(super) struct Direct(Mutex<BTreeMap<(Family, Labels), Series>>);

impl Direct {
    /// The counter of `family` (`Requests`) with `labels`.
    pub fn counter(&self, family: Family, labels: &[(&'static str, &str)]) -> Counter {
        match self.series(family, labels) {
            Series::Count(count) => Counter::from_arc(count),
            _ => Counter::noop(),
        }
    }

    /// The gauge of `family` (`InFlight`) with `labels`.
    pub fn gauge(&self, family: Family, labels: &[(&'static str, &str)]) -> Gauge {
        match self.series(family, labels) {
            Series::Level(level) => Gauge::from_arc(level),
            _ => Gauge::noop(),
        }
    }

    /// The histogram of `family` (a duration) with `labels`, in the family's buckets.
    pub fn histogram(&self, family: Family, labels: &[(&'static str, &str)]) -> Histogram {
        match self.series(family, labels) {
            Series::Buckets(buckets) => Histogram::from_arc(buckets),
            _ => Histogram::noop(),
        }
    }

    fn series(&self, family: Family, labels: &[(&'static str, &str)]) -> Series {
        let mut series = self.lock();
        let entry = series.entry((family, owned(labels)));
        entry.or_insert_with(|| family.series()).clone()
    }

    /// Appends the Prometheus text of every family that has a series.
    pub fn render(&self, out: &mut String) {
        let series = self.lock();
        for family in Family::ALL {
            let mut members = series
                .range((family, Labels::new())..)
                .take_while(|((of, _), _)| *of == family)
                .peekable();
            if members.peek().is_none() {
                continue;
            }
            let name = family.name();
            let _ = writeln!(out, "# HELP {name} {}", family.help());
            let _ = writeln!(out, "# TYPE {name} {}", family.kind());
            for ((_, labels), series) in members {
                match series {
                    Series::Count(count) => {
                        line(out, name, "", labels, None, count.0.load(Relaxed));
                    }
                    Series::Level(level) => line(out, name, "", labels, None, level.get()),
                    Series::Buckets(buckets) => buckets.render(out, name, labels),
                }
            }
            out.push('\n');
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Family, Labels), Series>> {
        // Nothing panics while holding the lock, and the map is valid whatever happened.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Appends a gauge family whose series are read at scrape time, so that a series whose
/// subject is gone (a certificate no longer served) goes with it: `# HELP`, `# TYPE` and a
/// line a series. Nothing when there are none.
pub fn render_gauges<'a, L: AsRef<[(&'static str, &'a str)]>>(
    out: &mut String,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, f64)>,
) {
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (labels, value) in series {
        line(out, name, "", &owned(labels.as_ref()), None, value);
    }
    out.push('\n');
}

fn owned(labels: &[(&'static str, &str)]) -> Labels {
    labels
        .iter()
        .map(|&(name, value)| (name, value.to_owned()))
        .collect()
}

/// `name{labels,le="…"} value`, label values escaped as the text format asks.
fn line(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &Labels,
    le: Option<&dyn std::fmt::Display>,
    value: impl std::fmt::Display,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        for (at, (label, value)) in labels.iter().enumerate() {
            if at > 0 {
                out.push(',');
            }
            out.push_str(label);
            out.push_str("=\"");
            for c in value.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        if let Some(le) = le {
            if !labels.is_empty() {
                out.push(',');
            }
            let _ = write!(out, "le=\"{le}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A counter.
#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Relaxed);
    }
}

/// A gauge: an `f64`, kept as its bits.
#[derive(Default)]
struct Level(AtomicU64);

impl Level {
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Relaxed))
    }
}

impl GaugeFn for Level {
    fn increment(&self, value: f64) {
        add(&self.0, value);
    }

    fn decrement(&self, value: f64) {
        add(&self.0, -value);
    }

    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Relaxed);
    }
}

/// Adds to an `f64` kept as its bits: one compare-exchange, uncontended.
fn add(bits: &AtomicU64, value: f64) {
    let _ = bits.fetch_update(Relaxed, Relaxed, |now| {
        Some((f64::from_bits(now) + value).to_bits())
    });
}

/// A latency histogram of fixed buckets: a count per bucket (the last one `+Inf`) and the
/// sum, kept in whole microseconds so that adding to it is one atomic add. (In nanoseconds,
/// 10,000 endless streams would run it past `u64` in three weeks; in microseconds, decades.)
struct Buckets {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    micros: AtomicU64,
}

impl Buckets {
    fn new(bounds: &'static [f64]) -> Buckets {
        Buckets {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            micros: AtomicU64::new(0),
        }
    }

    /// The cumulative `_bucket` lines, then `_sum` and `_count`.
    fn render(&self, out: &mut String, name: &str, labels: &Labels) {
        let mut total = 0;
        for (at, count) in self.counts.iter().enumerate() {
            total += count.load(Relaxed);
            match self.bounds.get(at) {
                Some(bound) => line(out, name, "_bucket", labels, Some(bound), total),
                None => line(out, name, "_bucket", labels, Some(&"+Inf"), total),
            }
        }
        let sum = self.micros.load(Relaxed) as f64 / 1e6;
        line(out, name, "_sum", labels, None, sum);
        line(out, name, "_count", labels, None, total);
    }
}

impl HistogramFn for Buckets {
    fn record(&self, seconds: f64) {
        // `le`: the first bucket whose bound the value does not pass. Searched from the
        // smallest, where most answers fall.
        let at = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        if let Some(count) = self.counts.get(at) {
            count.fetch_add(1, Relaxed);
        }
        // The cast saturates: a negative or NaN value adds nothing.
        self.micros
            .fetch_add((seconds * 1e6).round() as u64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.001, 0.01, 0.1];

    #[test]
    fn a_histogram_counts_each_value_in_the_first_bucket_it_does_not_pass() {
        let direct = Direct::default();
        // Three buckets rather than the family's fifteen, to read the text whole.
        let labels = vec![("variant", "a".to_owned())];
        let series = Series::Buckets(Arc::new(Buckets::new(BOUNDS)));
        direct
            .lock()
            .insert((Family::RequestDuration, labels), series);
        let histogram = direct.histogram(Family::RequestDuration, &[("variant", "a")]);
        for value in [0.0005, 0.001, 0.002, 0.5] {
            histogram.record(value);
        }
        let mut text = String::new();
        direct.render(&mut text);
        assert_eq!(
            text,
            "# HELP abproxy_request_duration_seconds Time from request received to response head sent (time to first byte).\n\
             # TYPE abproxy_request_duration_seconds histogram\n\
             abproxy_request_duration_seconds_bucket{variant=\"a\",le=\"0.001\"} 2\n\
             abproxy_request_duration_seconds_bucket{variant=\"a\",le=\"0.01\"} 3\n\
             abproxy_request_duration_seconds_bucket{variant=\"a\",le=\"0.1\"} 3\n\
             abproxy_request_duration_seconds_bucket{variant=\"a\",le=\"+Inf\"} 4\n\
             abproxy_request_duration_seconds_sum{variant=\"a\"} 0.5035\n\
             abproxy_request_duration_seconds_count{variant=\"a\"} 4\n\n"
        );
    }

    #[test]
    fn registering_a_series_again_returns_the_same_one() {
        let direct = Direct::default();
        let labels = [("variant", "a"), ("code", "200")];
        direct.counter(Family::Requests, &labels).increment(2);
        direct.counter(Family::Requests, &labels).increment(3);
        let _unused = direct.counter(Family::Requests, &[("variant", "b"), ("code", "500")]);
        let mut text = String::new();
        direct.render(&mut text);
        assert!(text.contains("abproxy_requests_total{variant=\"a\",code=\"200\"} 5\n"));
        assert!(text.contains("abproxy_requests_total{variant=\"b\",code=\"500\"} 0\n"));
        assert_eq!(
            text.matches("# TYPE abproxy_requests_total counter")
                .count(),
            1
        );
    }

    #[test]
    fn a_gauge_goes_up_and_down_and_families_without_series_are_left_out() {
        let direct = Direct::default();
        let gauge = direct.gauge(Family::InFlight, &[]);
        gauge.increment(1.0);
        gauge.increment(1.0);
        gauge.decrement(1.0);
        let mut text = String::new();
        direct.render(&mut text);
        assert_eq!(
            text,
            "# HELP abproxy_requests_in_flight Client requests being served now.\n\
             # TYPE abproxy_requests_in_flight gauge\n\
             abproxy_requests_in_flight 1\n\n"
        );
    }

    #[test]
    fn scrape_time_gauges_render_with_their_help_and_none_renders_nothing() {
        let mut text = String::new();
        render_gauges::<[_; 0]>(&mut text, "abproxy_x_seconds", "A test.", []);
        assert_eq!(text, "");
        let labels = [("server_name", "a.example"), ("cert", "/c\"")];
        render_gauges(&mut text, "abproxy_x_seconds", "A test.", [(labels, 1.5)]);
        assert_eq!(
            text,
            "# HELP abproxy_x_seconds A test.\n# TYPE abproxy_x_seconds gauge\n\
             abproxy_x_seconds{server_name=\"a.example\",cert=\"/c\\\"\"} 1.5\n\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let direct = Direct::default();
        direct
            .counter(Family::Requests, &[("variant", "a\"b\\c\nd")])
            .increment(1);
        let mut text = String::new();
        direct.render(&mut text);
        assert!(text.contains(r#"abproxy_requests_total{variant="a\"b\\c\nd"} 1"#));
    }
}
