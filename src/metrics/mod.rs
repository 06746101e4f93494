//! Prometheus metrics with the names and labels of the spec, as prebuilt handles.
//!
//! Handles are registered once (per variant, per shadow, per process) and then only
//! incremented, so the request path never formats a label or looks one up. The series every
//! request touches are kept by abproxy itself (`direct`); the exporter keeps the rest.

mod direct;

pub use direct::render_gauges;

use std::sync::{Arc, OnceLock};

use crate::canary::window::ArmWindow;
use crate::grpc;
use crate::prediction::{ClassTable, Unread};
use crate::route;
use crate::tls::HandshakeFailure;
use crate::upstream::UpstreamErrorKind;
use std::time::Duration;

use http::StatusCode;
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use direct::{Direct, Family};

static METADATA: Metadata<'static> = Metadata::new("abproxy", Level::INFO, Some(module_path!()));

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Streamed answers run for minutes; the head's buckets would end at 30 s.
const STREAM_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0,
];
const ABS_DIFF_BUCKETS: &[f64] = &[
    1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0, 100.0,
];

/// One process's metric registry; cheap to clone, rendered by the admin port.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    direct: Arc<Direct>,
    classes: Arc<ClassTable>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry of its own rather than the global recorder, so that several proxies can
    /// live in one process (tests, benches) without sharing counters.
    pub fn new() -> Metrics {
        Self::with_prediction_buckets(crate::config::DEFAULT_PREDICTION_BUCKETS)
    }

    /// A registry whose `abproxy_prediction` histogram has these bucket bounds; the exporter
    /// fixes them when it is built, so they change only with a restart.
    pub fn with_prediction_buckets(prediction_buckets: &[f64]) -> Metrics {
        let builder = PrometheusBuilder::new();
        let builder = [
            ("abproxy_shadow_duration_seconds", LATENCY_BUCKETS),
            ("abproxy_shadow_abs_diff", ABS_DIFF_BUCKETS),
            ("abproxy_prediction", prediction_buckets),
        ]
        .into_iter()
        .fold(builder, |builder, (name, buckets)| {
            builder
                .set_buckets_for_metric(Matcher::Full(name.into()), buckets)
                .unwrap_or_else(|_| unreachable!("bucket lists are not empty"))
        });
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let metrics = Metrics {
            recorder: Arc::new(recorder),
            handle,
            direct: Arc::default(),
            classes: Arc::default(),
        };
        metrics.describe();
        metrics
    }

    fn describe(&self) {
        let counters = [
            ("abproxy_upstream_errors_total", "Failed upstream exchanges, by variant and kind (connect, timeout, reset, protocol, tls)."),
            ("abproxy_fallbacks_total", "Requests a variant could not send to its upstream, served by its fallback variant instead."),
            ("abproxy_abandoned_answers_total", "Answers whose client hung up after their head, mid-body (counted as 499 in abproxy_requests_total too, but not as the variant's failure)."),
            ("abproxy_shadow_requests_total", "Mirrored requests, by shadow and result (ok, error, timeout, dropped)."),
            ("abproxy_shadow_comparisons_total", "Comparisons of primary and shadow answers, by outcome."),
            ("abproxy_config_reloads_total", "Config reload attempts, by result."),
            ("abproxy_shadow_log_dropped_total", "Shadow log lines dropped because the writer fell behind."),
            ("abproxy_prediction_class_total", "Successful answers by the class label at the prediction pointer (later labels count as other)."),
            ("abproxy_prediction_unread_total", "Successful answers whose prediction was not read, by reason (over_cap, not_json, no_prediction)."),
            ("abproxy_canary_checks_total", "Canary guard checks, by check and outcome (pass, fail, inconclusive, skipped)."),
            ("abproxy_canary_rollbacks_total", "Canary rollbacks, by the guard or an operator."),
            ("abproxy_tls_handshake_failures_total", "TLS handshakes on the client listener that did not finish, by reason (timeout, not_tls, closed, no_certificate, bad_certificate, protocol_version, no_shared_cipher, handshake)."),
            ("abproxy_tls_certificate_reloads_total", "Re-reads of changed TLS certificate files, by result (error: the previous certificates kept serving)."),
        ];
        for (name, help) in counters {
            self.recorder
                .describe_counter(name.into(), None, help.into());
        }
        let gauges = [
            (
                "abproxy_variant_weight_percent",
                "Configured weight of each variant, in percent.",
            ),
            (
                "abproxy_config_generation",
                "Number of the config generation serving requests.",
            ),
            (
                "abproxy_canary_weight_percent",
                "Weight the canary guard gives the canary now, in percent.",
            ),
            (
                "abproxy_canary_state",
                "The canary guard's state: 1 for the current one (running, paused, promoted, rolled_back).",
            ),
        ];
        for (name, help) in gauges {
            self.recorder.describe_gauge(name.into(), None, help.into());
        }
        let histograms = [
            (
                "abproxy_shadow_duration_seconds",
                Some(Unit::Seconds),
                "Latency of mirrored requests.",
            ),
            (
                "abproxy_shadow_abs_diff",
                None,
                "Absolute difference between primary and shadow numeric answers.",
            ),
            (
                "abproxy_prediction",
                None,
                "Numeric predictions read from successful answers.",
            ),
        ];
        for (name, unit, help) in histograms {
            self.recorder
                .describe_histogram(name.into(), unit, help.into());
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        self.direct.render(&mut text);
        text
    }

    /// Drains histogram samples into their buckets; run periodically so memory stays flat.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&key(name, labels), &METADATA)
    }

    /// A variant's time to the response head or to its end.
    fn latency(&self, family: Family, variant: &str) -> Histogram {
        self.direct.histogram(family, &[("variant", variant)])
    }

    /// The handles of one configured variant; `window` is the canary guard's, for the canary
    /// and its baseline.
    pub fn variant(
        &self,
        name: &str,
        fallback: Option<&str>,
        window: Option<Arc<ArmWindow>>,
    ) -> VariantMetrics {
        let error = |kind: &str| {
            self.counter(
                "abproxy_upstream_errors_total",
                &[("variant", name), ("kind", kind)],
            )
        };
        VariantMetrics {
            name: name.into(),
            registry: self.clone(),
            requests: (0..STATUS_CODES).map(|_| OnceLock::new()).collect(),
            grpc_requests: (0..grpc::Code::COUNT).map(|_| OnceLock::new()).collect(),
            duration: self.latency(Family::RequestDuration, name),
            complete: self.latency(Family::ResponseDuration, name),
            upstream_errors: UpstreamErrorKind::ALL.map(|kind| error(kind.as_str())),
            left_mid_answer: self.counter("abproxy_abandoned_answers_total", &[("variant", name)]),
            fallbacks: match fallback {
                Some(fallback) => self.counter(
                    "abproxy_fallbacks_total",
                    &[("variant", name), ("fallback", fallback)],
                ),
                None => Counter::noop(),
            },
            weight: self.gauge("abproxy_variant_weight_percent", &[("variant", name)]),
            window,
        }
    }

    /// Handles for requests refused before assignment (`variant="none"`): they have no
    /// upstream and no weight, so only requests and durations are recorded.
    pub fn unassigned(&self) -> VariantMetrics {
        VariantMetrics {
            name: "none".into(),
            registry: self.clone(),
            requests: (0..STATUS_CODES).map(|_| OnceLock::new()).collect(),
            grpc_requests: (0..grpc::Code::COUNT).map(|_| OnceLock::new()).collect(),
            duration: self.latency(Family::RequestDuration, "none"),
            complete: self.latency(Family::ResponseDuration, "none"),
            upstream_errors: UpstreamErrorKind::ALL.map(|_| Counter::noop()),
            fallbacks: Counter::noop(),
            left_mid_answer: Counter::noop(),
            weight: Gauge::noop(),
            window: None,
        }
    }

    pub(crate) fn classes(&self) -> Arc<ClassTable> {
        self.classes.clone()
    }

    pub(crate) fn prediction_histogram(&self, variant: &str) -> Histogram {
        self.histogram("abproxy_prediction", &[("variant", variant)])
    }

    pub(crate) fn prediction_class(&self, variant: &str, class: &str) -> Counter {
        self.counter(
            "abproxy_prediction_class_total",
            &[("variant", variant), ("class", class)],
        )
    }

    pub(crate) fn prediction_unread(&self, variant: &str, reason: Unread) -> Counter {
        self.counter(
            "abproxy_prediction_unread_total",
            &[("variant", variant), ("reason", reason.as_str())],
        )
    }

    /// The canary guard's handles for the canary `variant`.
    pub fn canary(&self, variant: &str) -> CanaryMetrics {
        CanaryMetrics {
            registry: self.clone(),
            variant: variant.into(),
            weight: self.gauge("abproxy_canary_weight_percent", &[("variant", variant)]),
            rollbacks: self.counter("abproxy_canary_rollbacks_total", &[("variant", variant)]),
        }
    }

    pub fn process(&self) -> ProcessMetrics {
        ProcessMetrics {
            in_flight: self.direct.gauge(Family::InFlight, &[]),
            generation: self.gauge("abproxy_config_generation", &[]),
            reloads_ok: self.counter("abproxy_config_reloads_total", &[("result", "ok")]),
            reloads_error: self.counter("abproxy_config_reloads_total", &[("result", "error")]),
        }
    }

    /// The TLS listener's handles; every reason is registered up front, so each series
    /// exists (at 0) from the start.
    pub fn tls(&self) -> TlsMetrics {
        TlsMetrics {
            handshake_failures: HandshakeFailure::ALL.map(|reason| {
                self.counter(
                    "abproxy_tls_handshake_failures_total",
                    &[("reason", reason.as_str())],
                )
            }),
            reloads_ok: self.counter("abproxy_tls_certificate_reloads_total", &[("result", "ok")]),
            reloads_error: self.counter(
                "abproxy_tls_certificate_reloads_total",
                &[("result", "error")],
            ),
        }
    }

    pub fn shadow(&self, name: &str) -> ShadowMetrics {
        let request = |result| {
            self.counter(
                "abproxy_shadow_requests_total",
                &[("shadow", name), ("result", result)],
            )
        };
        let comparison = |outcome| {
            self.counter(
                "abproxy_shadow_comparisons_total",
                &[("shadow", name), ("outcome", outcome)],
            )
        };
        ShadowMetrics {
            ok: request("ok"),
            error: request("error"),
            timeout: request("timeout"),
            dropped: request("dropped"),
            duration: self.histogram("abproxy_shadow_duration_seconds", &[("shadow", name)]),
            matched: comparison("match"),
            mismatched: comparison("mismatch"),
            unparsable: comparison("unparsable"),
            abs_diff: self.histogram("abproxy_shadow_abs_diff", &[("shadow", name)]),
            log_dropped: self.counter("abproxy_shadow_log_dropped_total", &[("shadow", name)]),
        }
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|&(key, value)| Label::new(key, value.to_owned()))
        .collect();
    Key::from_parts(name, labels)
}

/// Status codes 100..=599 get a slot each.
const STATUS_CODES: usize = 500;

/// nginx's "client closed request": no standard code exists for an answer nobody waited for.
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(code) => code,
    Err(_) => unreachable!(),
};

/// How a request ended, as the metrics judge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status returned to the client (499: it hung up first).
    pub status: StatusCode,
    /// The `grpc-status` a gRPC call ended with.
    pub grpc: Option<grpc::Code>,
    /// The client hung up after the answer's head, mid-body (a 499 too).
    pub left_mid_answer: bool,
}

impl Answer {
    pub fn http(status: StatusCode) -> Answer {
        Answer {
            status,
            grpc: None,
            left_mid_answer: false,
        }
    }

    pub fn grpc(status: StatusCode, code: grpc::Code) -> Answer {
        Answer {
            status,
            grpc: Some(code),
            left_mid_answer: false,
        }
    }

    /// A client that stopped reading a streamed answer: a user who stopped a generation, or
    /// closed an endless event stream. Counted as 499, but the variant did not fail it.
    pub fn left_mid_answer() -> Answer {
        Answer {
            left_mid_answer: true,
            ..Answer::http(CLIENT_CLOSED_REQUEST)
        }
    }

    /// What counts as the variant failing a request: the server errors it answered, the
    /// upstream errors abproxy answered for it (502, 504), clients giving up on it before its
    /// answer began (499), and gRPC calls that ended with a server-side failure code.
    pub fn is_failure(&self) -> bool {
        !self.left_mid_answer
            && (self.status.is_server_error()
                || self.status == CLIENT_CLOSED_REQUEST
                || self.grpc.is_some_and(grpc::Code::is_server_failure))
    }
}

/// Per-variant handles, built once per config generation.
pub struct VariantMetrics {
    name: Arc<str>,
    registry: Metrics,
    /// `abproxy_requests_total` by status, registered on first use so that /metrics lists only
    /// the codes actually returned; after that a slot read is one atomic load.
    requests: Box<[OnceLock<Counter>]>,
    /// `abproxy_requests_total{code="200", grpc_code}` by gRPC code, likewise.
    grpc_requests: Box<[OnceLock<Counter>]>,
    /// Time to the response head (to the first token of a streamed answer).
    duration: Histogram,
    /// Time to the last byte of the response body.
    complete: Histogram,
    upstream_errors: [Counter; 5],
    fallbacks: Counter,
    left_mid_answer: Counter,
    weight: Gauge,
    window: Option<Arc<ArmWindow>>,
}

impl VariantMetrics {
    /// Records the time to the response head, when the head goes to the client.
    pub fn head(&self, elapsed: Duration) {
        self.duration.record(elapsed.as_secs_f64());
    }

    /// Counts one request once it has ended: answered in full, cut short, or left by its
    /// client (499). `elapsed` runs to the end of the response body.
    pub fn record(&self, answer: Answer, elapsed: Duration, unit: route::Unit) {
        // Forced and unrandomised requests are not the split's: a caller with the override
        // header must not be able to aim failures at the canary.
        if let (Some(window), false) = (&self.window, unit == route::Unit::Fixed) {
            window.record(answer, elapsed, unit);
        }
        self.complete.record(elapsed.as_secs_f64());
        if answer.left_mid_answer {
            self.left_mid_answer.increment(1);
        }
        let status = answer.status;
        match answer.grpc {
            Some(code) if status == StatusCode::OK => {
                self.grpc_requests[code.index()].get_or_init(|| {
                    self.registry.direct.counter(
                        Family::Requests,
                        &[
                            ("variant", &self.name),
                            ("code", status.as_str()),
                            ("grpc_code", code.name()),
                        ],
                    )
                })
            }
            _ => {
                let slot = usize::from(status.as_u16())
                    .saturating_sub(100)
                    .min(STATUS_CODES - 1);
                self.requests[slot].get_or_init(|| {
                    self.registry.direct.counter(
                        Family::Requests,
                        &[("variant", &self.name), ("code", status.as_str())],
                    )
                })
            }
        }
        .increment(1);
    }

    /// A request this variant could not send was served by its fallback: for the canary
    /// guard, a failure of this variant all the same (its answer counts under the fallback).
    pub fn fell_back(&self, elapsed: Duration, unit: route::Unit) {
        self.fallbacks.increment(1);
        if let (Some(window), false) = (&self.window, unit == route::Unit::Fixed) {
            window.record(Answer::http(StatusCode::BAD_GATEWAY), elapsed, unit);
        }
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].increment(1);
    }

    pub fn set_weight(&self, percent: f64) {
        self.weight.set(percent);
    }
}

/// The canary guard's handles; the guard is not on the request path, so check outcomes are
/// registered as they occur.
pub struct CanaryMetrics {
    registry: Metrics,
    variant: String,
    pub weight: Gauge,
    pub rollbacks: Counter,
}

impl CanaryMetrics {
    pub fn check(&self, check: &str, outcome: &str) {
        self.registry
            .counter(
                "abproxy_canary_checks_total",
                &[
                    ("variant", &self.variant),
                    ("check", check),
                    ("outcome", outcome),
                ],
            )
            .increment(1);
    }

    /// Sets `abproxy_canary_state` to 1 for `current` (None: no canary) and 0 for the others.
    pub fn state(&self, states: &[&str], current: Option<&str>) {
        for state in states {
            self.registry
                .gauge(
                    "abproxy_canary_state",
                    &[("variant", &self.variant), ("state", state)],
                )
                .set(if Some(*state) == current { 1.0 } else { 0.0 });
        }
    }
}

/// Process-wide handles that outlive config generations.
pub struct ProcessMetrics {
    pub in_flight: Gauge,
    pub generation: Gauge,
    pub reloads_ok: Counter,
    pub reloads_error: Counter,
}

/// Per-shadow handles, built once per config generation.
pub struct ShadowMetrics {
    pub ok: Counter,
    pub error: Counter,
    pub timeout: Counter,
    pub dropped: Counter,
    pub duration: Histogram,
    pub matched: Counter,
    pub mismatched: Counter,
    pub unparsable: Counter,
    pub abs_diff: Histogram,
    pub log_dropped: Counter,
}

/// The TLS listener's handles.
pub struct TlsMetrics {
    handshake_failures: [Counter; HandshakeFailure::ALL.len()],
    pub reloads_ok: Counter,
    pub reloads_error: Counter,
}

impl TlsMetrics {
    pub fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures[reason as usize].increment(1);
    }
}
