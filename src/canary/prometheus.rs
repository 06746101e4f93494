//! The fleet-wide source of the canary guard (`[canary] source = "prometheus"`): the two
//! arms' figures read from the whole fleet's metrics through a Prometheus server's HTTP API
//! (`GET /api/v1/query`), instead of from this replica's own windows.
//!
//! Every replica judges the same interval from the same samples. Intervals end on wall-clock
//! multiples of `interval` since the Unix epoch; each is queried `query_offset` after its end,
//! once the scrapes from before its end have landed; and every query is an instant query at
//! `time=` the interval's end, so it reads the same samples whichever replica sends it, and
//! whenever. The same figures through the same checks give the same verdicts, so replicas
//! that run the same config ramp and roll back at the same step.
//!
//! What cannot be read (Prometheus down, refusing, slow, or without the series) is an error
//! here, and an inconclusive interval for the guard: never a pass.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode, Uri};
use serde::Deserialize;

use super::judge::{Arm, Predictions};
use super::stats::Proportions;
use crate::config::{Canary, PrometheusSource};
use crate::grpc;
use crate::http_client::{self, CallError};
use crate::metrics::Answer;

/// The series the queries read, as `crate::metrics` exports them.
const REQUESTS: &str = "abproxy_requests_total";
const LATENCY_BUCKETS: &str = "abproxy_response_duration_seconds_bucket";
const FALLBACKS: &str = "abproxy_fallbacks_total";
const ABANDONED: &str = "abproxy_abandoned_answers_total";
/// Pseudo-codes of the answers query for the two series beside `abproxy_requests_total`.
const FALLBACK: &str = "fallback";
const LEFT: &str = "left_mid_answer";
const PREDICTION_BUCKETS: &str = "abproxy_prediction_bucket";
const PREDICTION_CLASSES: &str = "abproxy_prediction_class_total";

/// Labels the queries filter or group by: a selector on them would change what is counted.
const RESERVED_LABELS: [&str; 6] = ["__name__", "variant", "code", "grpc_code", "le", "class"];

/// Why an interval's fleet figures could not be read. Each makes the interval inconclusive.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read prometheus_token_file {}: {source}", path.display())]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("prometheus_token_file {} is empty", .0.display())]
    EmptyToken(PathBuf),
    /// The server's URL with a query does not parse; validation makes this a bug.
    #[error("cannot build the query URL: {0}")]
    Url(String),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no complete answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("{0}")]
    Call(CallError),
    /// Prometheus's own error answer (`"status": "error"`): a bad selector, a query timeout, an
    /// overloaded server.
    #[error("Prometheus answered {status}: {kind}: {message}")]
    Refused {
        status: u16,
        kind: String,
        message: String,
    },
    /// Not Prometheus's JSON: a proxy's error page, or the wrong URL.
    #[error("the answer ({status}) is not Prometheus API JSON: {excerpt}")]
    NotApi { status: u16, excerpt: String },
    #[error("expected an instant vector, got a {0}")]
    NotVector(String),
    #[error("a sample has the value {0:?}, not a number")]
    BadValue(String),
    /// An empty result: nothing scraped yet, scrapes failing, or a selector that matches no
    /// replica. No data is never a pass.
    #[error(
        "no {0} series in the interval (is Prometheus scraping the replicas, and does \
         prometheus_selector match them?)"
    )]
    NoSeries(&'static str),
}

impl From<CallError> for SourceError {
    fn from(err: CallError) -> SourceError {
        match err {
            // The URL with its PromQL is long; the guard's message names the server instead.
            CallError::Connect { source, .. } => SourceError::Connect(source),
            CallError::Timeout(limit) => SourceError::Timeout(limit),
            other => SourceError::Call(other),
        }
    }
}

/// One evaluation of the fleet: the end of the interval it judges (the `time=` of every
/// query), and the wall-clock time to send the queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evaluation {
    pub at_ms: u64,
    pub wake_ms: u64,
}

/// The next interval to judge after `now_ms`: the first wall-clock multiple of `interval`
/// whose query time (its end plus `offset`) is still ahead, and always a later one than
/// `last_at_ms`, so a clock stepped back never has an interval judged twice. Replicas that
/// call this anywhere within the same interval get the same answer.
pub fn next_evaluation(
    now_ms: u64,
    interval: Duration,
    offset: Duration,
    last_at_ms: Option<u64>,
) -> Evaluation {
    let interval_ms = millis(interval).max(1);
    let offset_ms = millis(offset);
    let mut at_ms = (now_ms.saturating_sub(offset_ms) / interval_ms + 1) * interval_ms;
    if let Some(last) = last_at_ms {
        at_ms = at_ms.max(boundary_at_or_after(last + 1, interval));
    }
    Evaluation {
        at_ms,
        wake_ms: at_ms + offset_ms,
    }
}

/// The first interval boundary at or after `ms`.
pub fn boundary_at_or_after(ms: u64, interval: Duration) -> u64 {
    let interval_ms = millis(interval).max(1);
    ms.div_ceil(interval_ms) * interval_ms
}

/// Where the first interval after a decision taken at `at_ms` starts: every replica has
/// applied the decision by `at_ms + query_offset + timeout` (each took it once its queries
/// answered), so the fleet's figures from that boundary on are of the new weights alone. All
/// replicas compute the same boundary.
pub fn settled_after(at_ms: u64, canary: &Canary, source: &PrometheusSource) -> u64 {
    boundary_at_or_after(
        at_ms + millis(source.query_offset) + millis(source.timeout),
        canary.interval,
    )
}

/// Milliseconds since the Unix epoch.
pub fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, millis)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A PromQL range: whole seconds when it is one, milliseconds otherwise.
fn range(ms: u64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Normalizes `prometheus_selector`: label matchers as PromQL writes them between braces
/// (`job="abproxy", namespace=~"prod|canary"`; the braces are optional), values in double
/// quotes. Returns them joined by commas, ready to follow the guard's own `variant` matcher.
/// Matchers on the labels the queries filter or group by are refused, since they would change
/// what is counted.
pub fn selector(text: &str) -> Result<String, String> {
    let mut rest = text.trim();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner
            .strip_suffix('}')
            .ok_or("an opening brace without its closing one")?;
    }
    let mut matchers = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let name_end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..name_end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("expected a label name at {rest:?}"));
        }
        if RESERVED_LABELS.contains(&name) {
            return Err(format!(
                "the label {name:?} is the guard's own (its queries filter or group by {}); \
                 select the fleet by other labels, such as job or namespace",
                RESERVED_LABELS[1..].join(", ")
            ));
        }
        rest = rest[name_end..].trim_start();
        let operator = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| rest.starts_with(op))
            .ok_or_else(|| format!("expected =, !=, =~ or !~ after {name:?}"))?;
        rest = rest[operator.len()..].trim_start();
        let Some(quoted) = rest.strip_prefix('"') else {
            return Err(format!(
                "the value of {name:?} must be in double quotes, as in {name}=\"value\""
            ));
        };
        let value_end = closing_quote(quoted)
            .ok_or_else(|| format!("the value of {name:?} has no closing double quote"))?;
        let value = &quoted[..value_end];
        if value.contains(['\n', '\r']) {
            return Err(format!("the value of {name:?} spans lines"));
        }
        matchers.push(format!("{name}{operator}\"{value}\""));
        rest = quoted[value_end + 1..].trim_start();
        match rest.strip_prefix(',') {
            Some(after) => rest = after,
            None if rest.is_empty() => break,
            None => return Err(format!("expected a comma at {rest:?}")),
        }
    }
    Ok(matchers.join(","))
}

/// The index of the quote that ends a double-quoted PromQL string, escapes skipped.
fn closing_quote(quoted: &str) -> Option<usize> {
    let mut escaped = false;
    for (index, c) in quoted.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(index),
            _ => {}
        }
    }
    None
}

/// A variant name as a literal inside a PromQL regex in a double-quoted string: names may
/// hold `.`, which the regex must not read as "any character".
fn regex_literal(name: &str) -> String {
    let mut text = String::with_capacity(name.len());
    for c in name.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            // One backslash for the regex, escaped once more for the PromQL string.
            text.push_str("\\\\");
        } else if c == '"' {
            text.push('\\');
        }
        text.push(c);
    }
    text
}

/// The PromQL the guard sends at each evaluation; a check left out sends no query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queries {
    /// Answers by variant and status over the interval: the traffic and error-rate checks.
    pub requests: String,
    /// The same since the current step began: the sequential error-rate test's counts.
    pub since_step: Option<String>,
    /// Each arm's p99 over the interval, interpolated in the exported latency buckets.
    pub p99: Option<String>,
    /// Numeric predictions per bucket of `abproxy_prediction` over the interval.
    pub predictions: Option<String>,
    /// Class labels per arm over the interval.
    pub classes: Option<String>,
}

impl Queries {
    /// The queries for `canary`, over `window` (the interval) and `since_step` (from the
    /// step's start to the interval's end), both PromQL ranges.
    pub fn new(canary: &Canary, selector: &str, window: &str, since_step: &str) -> Queries {
        let mut matchers = format!(
            "variant=~\"{}|{}\"",
            regex_literal(&canary.variant),
            regex_literal(&canary.baseline)
        );
        if !selector.is_empty() {
            matchers.push(',');
            matchers.push_str(selector);
        }
        let increase =
            |series: &str, range: &str| format!("increase({series}{{{matchers}}}[{range}])");
        let checks = &canary.checks;
        let latency = checks.max_p99.is_some() || checks.max_p99_ratio.is_some();
        let drift = checks.max_prediction_psi.is_some();
        // Answers by code, and beside them (as pseudo-codes) the requests a variant could
        // not send and that its fallback answered (its failures, counted under the fallback),
        // and the answers its clients left mid-body (499s that are not its failures).
        let answers = |range: &str| {
            format!(
                "sum by (variant, code, grpc_code) ({}) \
                 or label_replace(sum by (variant) ({}), \"code\", \"{FALLBACK}\", \"\", \"\") \
                 or label_replace(sum by (variant) ({}), \"code\", \"{LEFT}\", \"\", \"\")",
                increase(REQUESTS, range),
                increase(FALLBACKS, range),
                increase(ABANDONED, range),
            )
        };
        Queries {
            requests: answers(window),
            since_step: checks
                .max_error_rate_increase
                .is_some()
                .then(|| answers(since_step)),
            p99: latency.then(|| {
                format!(
                    "histogram_quantile(0.99, sum by (variant, le) ({}))",
                    increase(LATENCY_BUCKETS, window)
                )
            }),
            predictions: drift.then(|| {
                format!(
                    "sum by (variant, le) ({})",
                    increase(PREDICTION_BUCKETS, window)
                )
            }),
            classes: drift.then(|| {
                format!(
                    "sum by (variant, class) ({})",
                    increase(PREDICTION_CLASSES, window)
                )
            }),
        }
    }

    /// The queries for one evaluation at `at_ms`, the current step having begun at
    /// `step_since_ms`.
    fn at(canary: &Canary, source: &PrometheusSource, at_ms: u64, step_since_ms: u64) -> Queries {
        let window = millis(canary.interval);
        // At least the interval: a step that began at its start covers exactly it.
        let since_step = at_ms.saturating_sub(step_since_ms).max(window);
        Queries::new(canary, &source.selector, &range(window), &range(since_step))
    }

    /// Each query with what it is for, as `abproxy check` and the README list them.
    pub fn described(&self) -> Vec<(&'static str, &str)> {
        let mut list = vec![("traffic and error rate", self.requests.as_str())];
        let optional = [
            (
                "error-rate increase, since the step began",
                &self.since_step,
            ),
            ("p99", &self.p99),
            ("prediction drift, numbers", &self.predictions),
            ("prediction drift, classes", &self.classes),
        ];
        for (purpose, query) in optional {
            if let Some(query) = query {
                list.push((purpose, query.as_str()));
            }
        }
        list
    }
}

/// The plan `abproxy check` prints for a Prometheus source: where, when, and what it asks.
pub fn plan(canary: &Canary, source: &PrometheusSource) -> String {
    let queries = Queries::new(
        canary,
        &source.selector,
        &range(millis(canary.interval)),
        "<since the step began>",
    );
    let mut lines = vec![
        format!(
            "  source: the fleet's metrics in Prometheus at {}{}, queried {} after each interval \
             ends (intervals end on wall-clock multiples of {}), {} timeout each; no answer or \
             no series: the interval is inconclusive",
            source.url,
            source
                .token_file
                .as_ref()
                .map(|path| format!(" (bearer token from {})", path.display()))
                .unwrap_or_default(),
            humantime::format_duration(source.query_offset),
            humantime::format_duration(canary.interval),
            humantime::format_duration(source.timeout),
        ),
        "  sample ratio: not judged (the fleet's metrics count requests, not users)".to_owned(),
        "  queries, each at time = the interval's end:".to_owned(),
    ];
    for (purpose, query) in queries.described() {
        lines.push(format!("    {purpose}:\n      {query}"));
    }
    lines.join("\n")
}

/// The fleet's figures of one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    pub canary: Arm<'static>,
    pub baseline: Arm<'static>,
    /// Failures and requests since the step began, when the sequential test needs them.
    pub since_step: Option<Proportions>,
}

/// Reads the interval ending at `at_ms` (the current step having begun at `step_since_ms`)
/// from Prometheus. The queries go out together, each bounded by the source's timeout.
pub async fn read(
    canary: &Canary,
    source: &PrometheusSource,
    at_ms: u64,
    step_since_ms: u64,
) -> Result<Fleet, SourceError> {
    let token = bearer(source)?;
    let token = token.as_deref();
    let queries = Queries::at(canary, source, at_ms, step_since_ms);
    let ask = |query: Option<&String>| {
        let query = query.cloned();
        async move {
            match query {
                Some(query) => instant(source, &query, at_ms, token).await.map(Some),
                None => Ok(None),
            }
        }
    };
    let (requests, since_step, p99, predictions, classes) = tokio::try_join!(
        instant(source, &queries.requests, at_ms, token),
        ask(queries.since_step.as_ref()),
        ask(queries.p99.as_ref()),
        ask(queries.predictions.as_ref()),
        ask(queries.classes.as_ref()),
    )?;
    fleet(
        canary,
        &requests,
        since_step.as_deref(),
        p99.as_deref(),
        predictions.as_deref(),
        classes.as_deref(),
    )
}

/// The figures the checks read, from the queries' answers.
fn fleet(
    canary: &Canary,
    requests: &[Sample],
    since_step: Option<&[Sample]>,
    p99: Option<&[Sample]>,
    predictions: Option<&[Sample]>,
    classes: Option<&[Sample]>,
) -> Result<Fleet, SourceError> {
    if requests.is_empty() {
        return Err(SourceError::NoSeries(REQUESTS));
    }
    let names = [canary.variant.as_str(), canary.baseline.as_str()];
    let interval = counts(requests, names);
    let since_step = since_step
        .map(|samples| {
            if samples.is_empty() {
                return Err(SourceError::NoSeries(REQUESTS));
            }
            let [ours, theirs] = counts(samples, names);
            Ok(Proportions {
                canary_failures: ours.1,
                canary_total: ours.0,
                baseline_failures: theirs.1,
                baseline_total: theirs.0,
            })
        })
        .transpose()?;
    let latency = p99.map_or([None, None], |samples| quantiles(samples, names));
    let bins = predictions.map_or_else(|| [Vec::new(), Vec::new()], |s| bins(s, names));
    let classes = classes.map_or_else(|| [Vec::new(), Vec::new()], |s| class_counts(s, names));
    let [canary_bins, baseline_bins] = bins;
    let [canary_classes, baseline_classes] = classes;
    let arm = |(requests, failures): (u64, u64), p99, bins, classes| Arm {
        requests,
        failures,
        p99,
        // The fleet's metrics count requests, not users: no sample-ratio test.
        units: None,
        predictions: Predictions::Binned { bins, classes },
    };
    Ok(Fleet {
        canary: arm(interval[0], latency[0], canary_bins, canary_classes),
        baseline: arm(interval[1], latency[1], baseline_bins, baseline_classes),
        since_step,
    })
}

/// The bearer token, read at each evaluation so a rotated secret needs no restart.
fn bearer(source: &PrometheusSource) -> Result<Option<String>, SourceError> {
    let Some(path) = &source.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|err| SourceError::Token {
        path: path.clone(),
        source: err,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(SourceError::EmptyToken(path.clone()));
    }
    Ok(Some(token.to_owned()))
}

/// One instant query at `at_ms`.
async fn instant(
    source: &PrometheusSource,
    query: &str,
    at_ms: u64,
    token: Option<&str>,
) -> Result<Vec<Sample>, SourceError> {
    let time = format!("{}.{:03}", at_ms / 1000, at_ms % 1000);
    let parameters = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", query)
        .append_pair("time", &time)
        .finish();
    let url: Uri = format!("{}/api/v1/query?{parameters}", source.url)
        .parse()
        .map_err(|err: http::uri::InvalidUri| SourceError::Url(err.to_string()))?;
    let reply = http_client::call(Method::GET, &url, None, token, source.timeout).await?;
    parse_vector(reply.status, &reply.body)
}

/// One series of an instant vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// The envelope of every API answer.
#[derive(Deserialize)]
struct ApiReply {
    status: String,
    data: Option<ApiData>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct ApiData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

/// `{"metric": {...}, "value": [1700000000.0, "42"]}`.
#[derive(Deserialize)]
struct VectorSample {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

/// The samples of an instant-query answer (the API's JSON, `resultType` `vector`).
pub fn parse_vector(status: StatusCode, body: &[u8]) -> Result<Vec<Sample>, SourceError> {
    let not_api = || SourceError::NotApi {
        status: status.as_u16(),
        excerpt: excerpt(body),
    };
    let reply: ApiReply = serde_json::from_slice(body).map_err(|_| not_api())?;
    if reply.status != "success" {
        return Err(SourceError::Refused {
            status: status.as_u16(),
            kind: reply.error_type.unwrap_or_else(|| "error".into()),
            message: reply.error.unwrap_or_default(),
        });
    }
    let data = match reply.data {
        Some(data) if status.is_success() => data,
        _ => return Err(not_api()),
    };
    if data.result_type != "vector" {
        return Err(SourceError::NotVector(data.result_type));
    }
    let samples: Vec<VectorSample> = serde_json::from_value(data.result).map_err(|_| not_api())?;
    samples
        .into_iter()
        .map(|sample| {
            let value = number(&sample.value.1)
                .ok_or_else(|| SourceError::BadValue(sample.value.1.clone()))?;
            Ok(Sample {
                labels: sample.metric,
                value,
            })
        })
        .collect()
}

/// A sample value or bucket bound as Prometheus writes it: a decimal, `NaN`, `+Inf`, `-Inf`.
fn number(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// The first bytes of a body that is not the API's, for the error message.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(120)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `increase()` extrapolates to the range's edges, so counts come back fractional: rounded to
/// whole answers, never below zero.
fn whole(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        value.round() as u64
    } else {
        0
    }
}

/// (requests, failures) of each named arm from the answers query: failures are the answers
/// the local source counts as failures too (5xx, 499 before the answer began, a gRPC server
/// failure, a request that fell back).
fn counts(samples: &[Sample], names: [&str; 2]) -> [(u64, u64); 2] {
    names.map(|name| {
        let (mut requests, mut failures) = (0.0, 0.0);
        for sample in samples.iter().filter(|s| s.label("variant") == name) {
            let value = if sample.value.is_finite() {
                sample.value.max(0.0)
            } else {
                0.0
            };
            match sample.label("code") {
                FALLBACK => {
                    requests += value;
                    failures += value;
                    continue;
                }
                // Already among the 499s, counted as failures below: take them back out.
                LEFT => {
                    failures -= value;
                    continue;
                }
                _ => {}
            }
            requests += value;
            let failed = sample
                .label("code")
                .parse::<u16>()
                .ok()
                .and_then(|code| StatusCode::from_u16(code).ok())
                .is_some_and(|status| {
                    let answer = match grpc::Code::named(sample.label("grpc_code")) {
                        Some(code) => Answer::grpc(status, code),
                        None => Answer::http(status),
                    };
                    answer.is_failure()
                });
            if failed {
                failures += value;
            }
        }
        (whole(requests), whole(failures.max(0.0)))
    })
}

/// Each named arm's p99 from `histogram_quantile`: `None` where it is missing or not a finite
/// duration (NaN: the arm had no answers in the interval).
fn quantiles(samples: &[Sample], names: [&str; 2]) -> [Option<Duration>; 2] {
    names.map(|name| {
        samples
            .iter()
            .find(|sample| sample.label("variant") == name)
            .and_then(|sample| Duration::try_from_secs_f64(sample.value).ok())
    })
}

/// Answers per bin of the prediction histogram for each named arm, from `sum by (variant, le)`
/// of its cumulative buckets, over the union of both arms' bounds. `increase()` extrapolates
/// each bucket on its own, so the cumulative counts are made non-decreasing before they are
/// differenced, as `histogram_quantile` does.
fn bins(samples: &[Sample], names: [&str; 2]) -> [Vec<u64>; 2] {
    let bound = |sample: &Sample| number(sample.label("le"));
    let mut bounds: Vec<f64> = samples
        .iter()
        .filter(|s| names.contains(&s.label("variant")))
        .filter_map(bound)
        .filter(|le| !le.is_nan())
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    names.map(|name| {
        let mut cumulative: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.label("variant") == name)
            .filter_map(|s| bound(s).map(|le| (le, s.value)))
            .filter(|(le, _)| !le.is_nan())
            .collect();
        cumulative.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut counts = Vec::with_capacity(bounds.len());
        let (mut next, mut running, mut previous) = (0, 0u64, 0u64);
        for &le in &bounds {
            // A bound this arm lacks holds what the bound below it held.
            while next < cumulative.len() && cumulative[next].0 <= le {
                running = running.max(whole(cumulative[next].1));
                next += 1;
            }
            counts.push(running - previous);
            previous = running;
        }
        counts
    })
}

/// Answers per class label for each named arm, from `sum by (variant, class)`, in one order
/// (the labels sorted) for both.
fn class_counts(samples: &[Sample], names: [&str; 2]) -> [Vec<u64>; 2] {
    let labels: BTreeSet<&str> = samples
        .iter()
        .filter(|s| names.contains(&s.label("variant")))
        .map(|s| s.label("class"))
        .collect();
    names.map(|name| {
        labels
            .iter()
            .map(|label| {
                samples
                    .iter()
                    .filter(|s| s.label("variant") == name && s.label("class") == *label)
                    .map(|s| whole(s.value))
                    .sum()
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use serde_json::json;
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::{CanarySource, Config};

    fn canary(keys: &str, checks: &str) -> Canary {
        let text = format!(
            "[metrics]\nprediction = \"/prediction\"\n\
             [[variant]]\nname = \"control\"\nupstream = \"http://127.0.0.1:1\"\nweight = 50\n\
             [[variant]]\nname = \"model.v2\"\nupstream = \"http://127.0.0.1:2\"\nweight = 50\n\
             [canary]\nvariant = \"model.v2\"\nbaseline = \"control\"\ninterval = \"2s\"\n\
             source = \"prometheus\"\nprometheus_url = \"http://127.0.0.1:9090/\"\n{keys}\n\
             [canary.checks]\n{checks}\n"
        );
        Config::parse(&text, Path::new("fleet.toml"))
            .unwrap_or_else(|err| panic!("{err}"))
            .canary
            .expect("a canary")
    }

    fn source(canary: &Canary) -> PrometheusSource {
        match &canary.source {
            CanarySource::Prometheus(source) => source.clone(),
            CanarySource::Local => panic!("a prometheus source"),
        }
    }

    const ALL_CHECKS: &str = "max_error_rate = 0.05\nmax_error_rate_increase = 0.01\n\
                              max_p99_ratio = 1.5\nmax_prediction_psi = 0.1";

    #[test]
    fn queries_select_both_arms_and_the_fleet_over_the_interval() {
        let canary = canary("prometheus_selector = '{job=\"abproxy\"}'", ALL_CHECKS);
        let queries = Queries::at(
            &canary,
            &source(&canary),
            1_700_000_010_000,
            1_700_000_000_000,
        );
        let m = r#"{variant=~"model\\.v2|control",job="abproxy"}"#;
        let answers = |range: &str| {
            format!(
                "sum by (variant, code, grpc_code) (increase(abproxy_requests_total{m}[{range}])) \
                 or label_replace(sum by (variant) (increase(abproxy_fallbacks_total{m}[{range}])), \"code\", \"fallback\", \"\", \"\") \
                 or label_replace(sum by (variant) (increase(abproxy_abandoned_answers_total{m}[{range}])), \"code\", \"left_mid_answer\", \"\", \"\")"
            )
        };
        assert_eq!(queries.requests, answers("2s"));
        assert_eq!(queries.since_step.as_deref(), Some(answers("10s").as_str()));
        assert_eq!(
            queries.p99.as_deref(),
            Some(format!("histogram_quantile(0.99, sum by (variant, le) (increase(abproxy_response_duration_seconds_bucket{m}[2s])))").as_str())
        );
        assert_eq!(
            queries.predictions.as_deref(),
            Some(
                format!("sum by (variant, le) (increase(abproxy_prediction_bucket{m}[2s]))")
                    .as_str()
            )
        );
        assert_eq!(
            queries.classes.as_deref(),
            Some(
                format!(
                    "sum by (variant, class) (increase(abproxy_prediction_class_total{m}[2s]))"
                )
                .as_str()
            )
        );
    }

    #[test]
    fn only_the_configured_checks_are_queried() {
        let canary = canary("", "max_error_rate = 0.05");
        let queries = Queries::at(&canary, &source(&canary), 4_000, 2_000);
        assert!(
            queries.requests.starts_with(
                r#"sum by (variant, code, grpc_code) (increase(abproxy_requests_total{variant=~"model\\.v2|control"}[2s]))"#
            ),
            "{}",
            queries.requests
        );
        assert_eq!(
            (
                queries.since_step,
                queries.p99,
                queries.predictions,
                queries.classes
            ),
            (None, None, None, None)
        );
        // A step that began after the interval did (a clock stepped back) still reads one
        // interval, and fractions of seconds are written in milliseconds.
        let stepped = Queries::new(&canary, "", &range(2_500), &range(500));
        assert!(
            stepped
                .requests
                .starts_with(r#"sum by (variant, code, grpc_code) (increase(abproxy_requests_total{variant=~"model\\.v2|control"}[2500ms]))"#),
            "{}",
            stepped.requests
        );
    }

    #[test]
    fn selectors_are_normalized_and_checked() {
        let cases = [
            (r#"job="abproxy""#, r#"job="abproxy""#),
            (
                r#" { job = "abproxy" , namespace=~"prod|canary", } "#,
                r#"job="abproxy",namespace=~"prod|canary""#,
            ),
            (
                r#"pod!~"old-.*",app!="x\"y""#,
                r#"pod!~"old-.*",app!="x\"y""#,
            ),
            ("", ""),
        ];
        for (text, expected) in cases {
            assert_eq!(selector(text).as_deref(), Ok(expected), "{text}");
        }
        for (text, words) in [
            (r#"job='abproxy'"#, "double quotes"),
            (r#"job="abproxy"#, "no closing"),
            (r#"job"abproxy""#, "expected =, !=, =~ or !~"),
            (r#"9job="a""#, "label name"),
            (r#"job="a" namespace="b""#, "expected a comma"),
            (r#"{job="a""#, "closing one"),
            (r#"variant="treatment""#, "the guard's own"),
            (r#"le="0.5""#, "the guard's own"),
            ("job=\"a\nb\"", "spans lines"),
            ("é=\"a\"", "label name"),
        ] {
            let err = selector(text).expect_err(text);
            assert!(err.contains(words), "{text}: {err}");
        }
    }

    #[test]
    fn any_selector_text_is_normalized_or_refused_without_a_panic() {
        let alphabet: Vec<char> = "ab_9 {}=!~\"\\,é\n".chars().collect();
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..20_000 {
            let text: String = (0..rng.usize(0..16))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            if let Ok(normalized) = selector(&text) {
                // What it accepted, it accepts again unchanged.
                assert_eq!(
                    selector(&normalized).as_deref(),
                    Ok(normalized.as_str()),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn evaluations_land_on_wall_clock_multiples_of_the_interval() {
        let interval = Duration::from_secs(2);
        let offset = Duration::from_millis(1500);
        // Two replicas whose loops come round at different moments of the same interval
        // judge the same interval.
        let a = next_evaluation(1_000_010_100, interval, offset, None);
        let b = next_evaluation(1_000_011_400, interval, offset, None);
        assert_eq!(a, b);
        assert_eq!(
            a,
            Evaluation {
                at_ms: 1_000_010_000,
                wake_ms: 1_000_011_500
            }
        );
        // Once that one is queried, the next.
        assert_eq!(
            next_evaluation(1_000_011_600, interval, offset, Some(a.at_ms)).at_ms,
            1_000_012_000
        );
        // A clock stepped back never brings a judged interval round again.
        assert_eq!(
            next_evaluation(1_000_000_000, interval, offset, Some(a.at_ms)).at_ms,
            1_000_012_000
        );
        assert_eq!(boundary_at_or_after(4_000, interval), 4_000);
        assert_eq!(boundary_at_or_after(4_001, interval), 6_000);
        let canary = canary(
            "prometheus_timeout = \"1s\"\nprometheus_query_offset = \"1s\"",
            "max_error_rate = 0.05",
        );
        assert_eq!(settled_after(10_000, &canary, &source(&canary)), 12_000);
        assert_eq!(settled_after(10_500, &canary, &source(&canary)), 14_000);
    }

    fn vector(samples: serde_json::Value) -> Vec<u8> {
        json!({"status": "success", "data": {"resultType": "vector", "result": samples}})
            .to_string()
            .into_bytes()
    }

    fn sample(labels: serde_json::Value, value: &str) -> serde_json::Value {
        json!({"metric": labels, "value": [1_700_000_010.0, value]})
    }

    #[test]
    fn the_vector_format_parses_with_prometheus_special_values() {
        let body = vector(json!([
            sample(json!({"variant": "control", "code": "200"}), "812.6"),
            sample(json!({"variant": "control"}), "NaN"),
            sample(json!({}), "+Inf"),
            sample(json!({"variant": "x"}), "-Inf"),
        ]));
        let samples = parse_vector(StatusCode::OK, &body).expect("a vector");
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[0].label("code"), "200");
        assert_eq!(samples[0].value, 812.6);
        assert!(samples[1].value.is_nan());
        assert_eq!(samples[2].value, f64::INFINITY);
        assert_eq!(samples[3].value, f64::NEG_INFINITY);
        assert_eq!(
            parse_vector(StatusCode::OK, &vector(json!([]))).expect("empty"),
            []
        );
    }

    #[test]
    fn error_answers_and_other_shapes_are_errors() {
        let refused =
            json!({"status": "error", "errorType": "bad_data", "error": "parse error at char 3"});
        let err = parse_vector(StatusCode::BAD_REQUEST, refused.to_string().as_bytes())
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "Prometheus answered 400: bad_data: parse error at char 3"
        );
        let html = b"<html>\n<body>502 Bad   Gateway</body></html>";
        let err = parse_vector(StatusCode::BAD_GATEWAY, html).expect_err("a proxy's page");
        assert_eq!(
            err.to_string(),
            "the answer (502) is not Prometheus API JSON: <html> <body>502 Bad Gateway</body></html>"
        );
        let matrix = json!({"status": "success", "data": {"resultType": "matrix", "result": []}});
        assert!(matches!(
            parse_vector(StatusCode::OK, matrix.to_string().as_bytes()),
            Err(SourceError::NotVector(kind)) if kind == "matrix"
        ));
        let bad = vector(json!([sample(json!({}), "many")]));
        assert!(matches!(
            parse_vector(StatusCode::OK, &bad),
            Err(SourceError::BadValue(value)) if value == "many"
        ));
        let no_value = vector(json!([{"metric": {}}]));
        assert!(matches!(
            parse_vector(StatusCode::OK, &no_value),
            Err(SourceError::NotApi { .. })
        ));
    }

    fn samples(list: &[(&[(&str, &str)], f64)]) -> Vec<Sample> {
        list.iter()
            .map(|(labels, value)| Sample {
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                value: *value,
            })
            .collect()
    }

    #[test]
    fn failures_are_server_errors_and_abandoned_requests_as_locally() {
        let answers = samples(&[
            (&[("variant", "model.v2"), ("code", "200")], 180.4),
            (&[("variant", "model.v2"), ("code", "500")], 12.2),
            (&[("variant", "model.v2"), ("code", "499")], 3.0),
            (&[("variant", "model.v2"), ("code", "404")], 4.0),
            (&[("variant", "control"), ("code", "200")], 790.0),
            (&[("variant", "control"), ("code", "504")], 1.6),
            (&[("variant", "other"), ("code", "500")], 50.0),
            (&[("variant", "control"), ("code", "200")], f64::NAN),
        ]);
        assert_eq!(
            counts(&answers, ["model.v2", "control"]),
            [(200, 15), (792, 2)]
        );
    }

    #[test]
    fn prediction_bins_are_differenced_and_aligned_across_the_arms() {
        let buckets = samples(&[
            (&[("variant", "model.v2"), ("le", "0.5")], 10.4),
            (&[("variant", "model.v2"), ("le", "1")], 29.6),
            (&[("variant", "model.v2"), ("le", "+Inf")], 30.0),
            // Extrapolated apart: a bucket below its lower neighbour counts as that neighbour.
            (&[("variant", "control"), ("le", "0.5")], 20.0),
            (&[("variant", "control"), ("le", "0.9")], 19.0),
            (&[("variant", "control"), ("le", "1")], 40.0),
            (&[("variant", "control"), ("le", "+Inf")], 41.0),
        ]);
        let [ours, theirs] = bins(&buckets, ["model.v2", "control"]);
        assert_eq!(ours, [10, 0, 20, 0]);
        assert_eq!(theirs, [20, 0, 20, 1]);
        let [none, _] = bins(&buckets, ["absent", "control"]);
        assert_eq!(none, [0, 0, 0, 0]);
    }

    #[test]
    fn class_counts_line_up_by_label() {
        let classes = samples(&[
            (&[("variant", "model.v2"), ("class", "dog")], 30.0),
            (&[("variant", "model.v2"), ("class", "cat")], 70.2),
            (&[("variant", "control"), ("class", "cat")], 50.0),
            (&[("variant", "control"), ("class", "other")], 5.0),
            (&[("variant", "control"), ("class", "dog")], 45.0),
        ]);
        assert_eq!(
            class_counts(&classes, ["model.v2", "control"]),
            [vec![70, 30, 0], vec![50, 45, 5]]
        );
    }

    #[test]
    fn p99s_that_are_not_durations_are_missing() {
        let p99 = samples(&[
            (&[("variant", "model.v2")], 0.0421),
            (&[("variant", "control")], f64::NAN),
        ]);
        assert_eq!(
            quantiles(&p99, ["model.v2", "control"]),
            [Some(Duration::from_secs_f64(0.0421)), None]
        );
        let infinite = samples(&[(&[("variant", "model.v2")], f64::INFINITY)]);
        assert_eq!(quantiles(&infinite, ["model.v2", "control"]), [None, None]);
    }

    /// Each request's query parameters (one `key=value` a line) and `authorization` header.
    type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

    /// A stand-in for Prometheus's query API: answers each query by the first rule whose
    /// pattern it contains, and records the requests.
    struct FakePrometheus {
        addr: SocketAddr,
        seen: Seen,
    }

    impl FakePrometheus {
        async fn start(
            rules: Vec<(&'static str, StatusCode, Vec<u8>)>,
            delay: Duration,
        ) -> FakePrometheus {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let seen = Seen::default();
            let (record, rules) = (seen.clone(), Arc::new(rules));
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (record, rules) = (record.clone(), rules.clone());
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (record, rules) = (record.clone(), rules.clone());
                        async move {
                            let query: String = form_urlencoded::parse(
                                request.uri().query().unwrap_or_default().as_bytes(),
                            )
                            .map(|(k, v)| format!("{k}={v}\n"))
                            .collect();
                            let token = request
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            record.lock().expect("lock").push((query.clone(), token));
                            tokio::time::sleep(delay).await;
                            let (status, body) = rules
                                .iter()
                                .find(|(pattern, _, _)| query.contains(pattern))
                                .map_or((StatusCode::OK, vector(json!([]))), |(_, s, b)| {
                                    (*s, b.clone())
                                });
                            let mut response = Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = status;
                            Ok::<_, Infallible>(response)
                        }
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service),
                    );
                }
            });
            FakePrometheus { addr, seen }
        }
    }

    fn pointed_at(canary: &Canary, addr: SocketAddr) -> PrometheusSource {
        PrometheusSource {
            url: format!("http://{addr}"),
            ..source(canary)
        }
    }

    #[tokio::test]
    async fn an_evaluation_reads_every_figure_at_the_interval_end_with_the_token() {
        let requests = vector(json!([
            sample(json!({"variant": "model.v2", "code": "200"}), "95"),
            sample(json!({"variant": "model.v2", "code": "500"}), "5"),
            // Fell back to control: the canary's requests and failures.
            sample(json!({"variant": "model.v2", "code": "fallback"}), "10"),
            // Three gave up, two of them mid-answer: one failure.
            sample(json!({"variant": "model.v2", "code": "499"}), "3"),
            sample(
                json!({"variant": "model.v2", "code": "left_mid_answer"}),
                "2"
            ),
            sample(json!({"variant": "control", "code": "200"}), "400"),
        ]));
        let since_step = vector(json!([
            sample(json!({"variant": "model.v2", "code": "200"}), "950"),
            sample(json!({"variant": "model.v2", "code": "503"}), "50"),
            sample(json!({"variant": "control", "code": "200"}), "4000"),
        ]));
        let p99 = vector(json!([
            sample(json!({"variant": "model.v2"}), "0.04"),
            sample(json!({"variant": "control"}), "0.02"),
        ]));
        let predictions = vector(json!([
            sample(json!({"variant": "model.v2", "le": "0.5"}), "50"),
            sample(json!({"variant": "model.v2", "le": "+Inf"}), "100"),
            sample(json!({"variant": "control", "le": "0.5"}), "200"),
            sample(json!({"variant": "control", "le": "+Inf"}), "400"),
        ]));
        let prometheus = FakePrometheus::start(
            vec![
                ("histogram_quantile", StatusCode::OK, p99),
                ("abproxy_prediction_bucket", StatusCode::OK, predictions),
                (
                    "abproxy_prediction_class_total",
                    StatusCode::OK,
                    vector(json!([])),
                ),
                ("[2s])) or label_replace", StatusCode::OK, requests),
                ("abproxy_requests_total", StatusCode::OK, since_step),
            ],
            Duration::ZERO,
        )
        .await;
        let dir = tempfile::tempdir().expect("temp dir");
        let token = dir.path().join("token");
        std::fs::write(&token, "first\n").expect("token");
        let canary = canary(
            &format!("prometheus_token_file = {:?}", token.display().to_string()),
            ALL_CHECKS,
        );
        let source = pointed_at(&canary, prometheus.addr);
        let fleet = read(&canary, &source, 1_700_000_010_000, 1_700_000_000_000)
            .await
            .expect("figures");
        assert_eq!((fleet.canary.requests, fleet.canary.failures), (113, 16));
        assert_eq!((fleet.baseline.requests, fleet.baseline.failures), (400, 0));
        assert_eq!(
            fleet.since_step,
            Some(Proportions {
                canary_failures: 50,
                canary_total: 1000,
                baseline_failures: 0,
                baseline_total: 4000,
            })
        );
        assert_eq!(fleet.canary.p99, Some(Duration::from_millis(40)));
        assert_eq!(fleet.canary.units, None);
        assert_eq!(
            fleet.baseline.predictions,
            Predictions::Binned {
                bins: vec![200, 200],
                classes: vec![]
            }
        );
        {
            let seen = prometheus.seen.lock().expect("lock");
            assert_eq!(seen.len(), 5, "one query per configured check: {seen:?}");
            for (query, token) in seen.iter() {
                assert!(query.ends_with("time=1700000010.000\n"), "{query}");
                assert_eq!(token.as_deref(), Some("Bearer first"));
            }
        }
        // The token file is read at each evaluation: a rotated secret is used at once.
        std::fs::write(&token, "second").expect("token");
        read(&canary, &source, 1_700_000_012_000, 1_700_000_000_000)
            .await
            .expect("figures");
        let seen = prometheus.seen.lock().expect("lock");
        assert_eq!(
            seen.last().and_then(|(_, t)| t.as_deref()),
            Some("Bearer second")
        );
    }

    #[tokio::test]
    async fn no_series_an_error_answer_a_stall_or_no_server_are_errors() {
        let canary = canary("prometheus_timeout = \"300ms\"", "max_error_rate = 0.05");
        let empty = FakePrometheus::start(vec![], Duration::ZERO).await;
        let err = read(&canary, &pointed_at(&canary, empty.addr), 10_000, 8_000)
            .await
            .expect_err("empty");
        assert!(matches!(err, SourceError::NoSeries(REQUESTS)), "{err}");
        assert!(err.to_string().contains("prometheus_selector"), "{err}");

        let refusing = FakePrometheus::start(
            vec![(
                "query",
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "error", "errorType": "unavailable", "error": "too many queries"})
                    .to_string()
                    .into_bytes(),
            )],
            Duration::ZERO,
        )
        .await;
        let err = read(&canary, &pointed_at(&canary, refusing.addr), 10_000, 8_000)
            .await
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "Prometheus answered 503: unavailable: too many queries"
        );

        let stalling = FakePrometheus::start(vec![], Duration::from_secs(30)).await;
        let err = read(&canary, &pointed_at(&canary, stalling.addr), 10_000, 8_000)
            .await
            .expect_err("timeout");
        assert_eq!(err.to_string(), "no complete answer within 300ms");

        // Bound and never listened on, it refuses; held, no other test's server takes it.
        let closed = tokio::net::TcpSocket::new_v4().expect("socket");
        closed
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let down = closed.local_addr().expect("addr");
        let err = read(&canary, &pointed_at(&canary, down), 10_000, 8_000)
            .await
            .expect_err("down");
        assert!(matches!(err, SourceError::Connect(_)), "{err}");

        let missing = PrometheusSource {
            token_file: Some(PathBuf::from("/nonexistent/token")),
            ..pointed_at(&canary, empty.addr)
        };
        let err = read(&canary, &missing, 10_000, 8_000)
            .await
            .expect_err("no token");
        assert!(
            err.to_string()
                .starts_with("cannot read prometheus_token_file /nonexistent/token"),
            "{err}"
        );
    }

    #[test]
    fn the_plan_lists_where_when_and_every_query() {
        let canary = canary("prometheus_selector = 'job=\"abproxy\"'", ALL_CHECKS);
        let plan = plan(&canary, &source(&canary));
        assert!(
            plan.contains("Prometheus at http://127.0.0.1:9090, queried 5s after"),
            "{plan}"
        );
        assert!(plan.contains("wall-clock multiples of 2s"), "{plan}");
        assert!(plan.contains("sample ratio: not judged"), "{plan}");
        assert!(plan.contains("[<since the step began>]"), "{plan}");
        assert!(plan.contains("histogram_quantile(0.99"), "{plan}");
        assert_eq!(plan.matches("job=\"abproxy\"").count(), 9, "{plan}");
    }
}
