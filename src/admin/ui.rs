//! The live admin page (`/`, `/ui`): a read-only view of the running proxy for people
//! watching a canary or a weight change, on a laptop or a phone.
//!
//! The page is static files compiled into the binary (no CDN, no JS build step) that poll the
//! admin port every second: `/status`, `/canary`, and `/ui/snapshot`, which reports the
//! cumulative per-variant and per-shadow counters. Rates, error ratios and p99 over a window
//! are differences of successive snapshots, computed in the page, so the request path does
//! no extra work for the page and the admin port keeps no history.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::Response;
use http_body_util::Full;
use serde::Serialize;

use crate::metrics::Answer;

const PAGE: &str = include_str!("ui/page.html");
const SCRIPT: &str = include_str!("ui/page.js");
const STYLE: &str = include_str!("ui/page.css");
const ICON: &str = include_str!("ui/icon.svg");

/// The page may load only its own files and talk only to the admin port: a variant name or a
/// reload error shown on it can never pull in or run anything else.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                      connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's static files by admin path; `None` for other paths.
pub(super) fn asset(path: &str) -> Option<Response<Full<Bytes>>> {
    let (body, content_type) = match path {
        "/" | "/ui" | "/ui/" => (PAGE, "text/html; charset=utf-8"),
        "/ui/page.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/ui/page.css" => (STYLE, "text/css; charset=utf-8"),
        "/ui/icon.svg" | "/favicon.ico" => (ICON, "image/svg+xml"),
        _ => return None,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidated each load, so a page left open picks up an upgraded binary's files.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Some(response)
}

/// What `/ui/snapshot` answers: the counters the page turns into rates, read from the
/// Prometheus text the registry renders (the same work as one scrape).
#[derive(Debug, Default, PartialEq, Serialize)]
pub(super) struct Snapshot {
    /// Milliseconds since the Unix epoch when the counters were read: the page divides by
    /// the server's clock, not by when its polls happened to arrive.
    pub at_ms: u64,
    /// Every variant with a series, including `none` and variants a reload removed.
    pub variants: BTreeMap<String, VariantCounters>,
    pub shadows: BTreeMap<String, ShadowCounters>,
    /// `abproxy_config_reloads_total` by result.
    pub reloads: BTreeMap<String, u64>,
    pub in_flight: u64,
}

#[derive(Debug, Default, PartialEq, Serialize)]
pub(super) struct VariantCounters {
    pub requests: u64,
    /// Answers the README counts as failures: 5xx (abproxy's own 502/504 included) and 499.
    pub failures: u64,
    pub latency: Latency,
}

/// A cumulative histogram of `abproxy_request_duration_seconds`.
#[derive(Debug, Default, PartialEq, Serialize)]
pub(super) struct Latency {
    /// Upper bounds in seconds, ascending, without `+Inf` (JSON has no infinity).
    pub bounds: Vec<f64>,
    /// Requests at or under each bound, then the total (the `+Inf` bucket):
    /// one more entry than `bounds`.
    pub cumulative: Vec<u64>,
}

#[derive(Debug, Default, PartialEq, Serialize)]
pub(super) struct ShadowCounters {
    /// `abproxy_shadow_requests_total` by result (ok, error, timeout, dropped).
    pub results: BTreeMap<String, u64>,
    /// `abproxy_shadow_comparisons_total` by outcome (match, mismatch, unparsable).
    pub comparisons: BTreeMap<String, u64>,
}

impl Snapshot {
    /// Reads the counters the page needs from a `/metrics` render; lines it does not know
    /// are skipped, so new metrics never break the page.
    pub(super) fn from_prometheus(text: &str, at: SystemTime) -> Snapshot {
        let mut snapshot = Snapshot {
            at_ms: at.duration_since(UNIX_EPOCH).map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            }),
            ..Snapshot::default()
        };
        // (variant, bound) → count; `None` is `+Inf`.
        let mut buckets: BTreeMap<String, Vec<(Option<f64>, u64)>> = BTreeMap::new();
        for sample in text.lines().filter_map(Sample::parse) {
            let count = sample.count();
            match sample.name {
                "abproxy_requests_total" => {
                    let (Some(variant), Some(code)) =
                        (sample.label("variant"), sample.label("code"))
                    else {
                        continue;
                    };
                    let counters = snapshot.variants.entry(variant.to_owned()).or_default();
                    counters.requests += count;
                    if is_failure(code, sample.label("grpc_code")) {
                        counters.failures += count;
                    }
                }
                "abproxy_request_duration_seconds_bucket" => {
                    let (Some(variant), Some(le)) = (sample.label("variant"), sample.label("le"))
                    else {
                        continue;
                    };
                    let bound = match le {
                        "+Inf" => None,
                        finite => match finite.parse::<f64>() {
                            Ok(bound) if bound.is_finite() => Some(bound),
                            _ => continue,
                        },
                    };
                    buckets
                        .entry(variant.to_owned())
                        .or_default()
                        .push((bound, count));
                }
                "abproxy_shadow_requests_total" => {
                    if let (Some(shadow), Some(result)) =
                        (sample.label("shadow"), sample.label("result"))
                    {
                        let counters = snapshot.shadows.entry(shadow.to_owned()).or_default();
                        *counters.results.entry(result.to_owned()).or_default() += count;
                    }
                }
                "abproxy_shadow_comparisons_total" => {
                    if let (Some(shadow), Some(outcome)) =
                        (sample.label("shadow"), sample.label("outcome"))
                    {
                        let counters = snapshot.shadows.entry(shadow.to_owned()).or_default();
                        *counters.comparisons.entry(outcome.to_owned()).or_default() += count;
                    }
                }
                "abproxy_config_reloads_total" => {
                    if let Some(result) = sample.label("result") {
                        *snapshot.reloads.entry(result.to_owned()).or_default() += count;
                    }
                }
                "abproxy_requests_in_flight" => snapshot.in_flight = count,
                _ => {}
            }
        }
        for (variant, mut buckets) in buckets {
            // `None` (+Inf) sorts first in Option's order; it belongs last.
            buckets.sort_by(|(a, _), (b, _)| {
                a.unwrap_or(f64::INFINITY)
                    .total_cmp(&b.unwrap_or(f64::INFINITY))
            });
            let total = buckets
                .iter()
                .find(|(bound, _)| bound.is_none())
                .map_or(0, |&(_, count)| count);
            let latency = Latency {
                bounds: buckets.iter().filter_map(|(bound, _)| *bound).collect(),
                cumulative: buckets
                    .iter()
                    .filter(|(bound, _)| bound.is_some())
                    .map(|&(_, count)| count)
                    .chain([total])
                    .collect(),
            };
            snapshot.variants.entry(variant).or_default().latency = latency;
        }
        snapshot
    }
}

/// 5xx, 499 (the client gave up waiting) and gRPC server failures: the failures of the
/// canary guard's error rate.
fn is_failure(code: &str, grpc_code: Option<&str>) -> bool {
    let Some(status) = code
        .parse::<u16>()
        .ok()
        .and_then(|code| http::StatusCode::from_u16(code).ok())
    else {
        return false;
    };
    let answer = match grpc_code.and_then(crate::grpc::Code::named) {
        Some(grpc) => Answer::grpc(status, grpc),
        None => Answer::http(status),
    };
    answer.is_failure()
}

/// One line of Prometheus text: `name{label="value",…} value [timestamp]`.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

impl<'a> Sample<'a> {
    fn parse(line: &'a str) -> Option<Sample<'a>> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or(line.len());
        let name = &line[..name_end];
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inside) = rest.strip_prefix('{') {
            let (parsed, after) = parse_labels(inside)?;
            labels = parsed;
            rest = after;
        }
        let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
        Some(Sample {
            name,
            labels,
            value,
        })
    }

    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, value)| value.as_str())
    }

    /// The value as a count; counters are whole and never negative.
    fn count(&self) -> u64 {
        if self.value.is_finite() && self.value > 0.0 {
            // Saturates above u64::MAX, which no counter reaches.
            self.value.round() as u64
        } else {
            0
        }
    }
}

/// Parses `key="value",…}` (the text after `{`), undoing the format's `\\`, `\"` and `\n`
/// escapes; returns the labels and the text after `}`.
fn parse_labels(mut text: &str) -> Option<(Vec<(&str, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after_key) = text.split_once('=')?;
        let mut chars = after_key.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (index, '"') => break index,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim(), value));
        text = &after_key[1 + end + 1..];
    }
}

/// `/ui/snapshot` as JSON; never cached, since each answer is a new reading.
pub(super) fn snapshot_response(metrics_text: &str) -> Response<Full<Bytes>> {
    let snapshot = Snapshot::from_prometheus(metrics_text, SystemTime::now());
    let body = serde_json::to_vec(&snapshot).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TEXT: &str = r#"# HELP abproxy_requests_total Requests answered
# TYPE abproxy_requests_total counter
abproxy_requests_total{variant="control",code="200"} 90
abproxy_requests_total{variant="control",code="503"} 4
abproxy_requests_total{variant="control",code="499"} 1
abproxy_requests_total{variant="control",code="404"} 5
abproxy_requests_total{variant="control",code="200",grpc_code="Unavailable"} 2
abproxy_requests_total{variant="control",code="200",grpc_code="InvalidArgument"} 3
abproxy_requests_total{variant="none",code="400"} 2

abproxy_request_duration_seconds_bucket{variant="control",le="0.1"} 80
abproxy_request_duration_seconds_bucket{variant="control",le="+Inf"} 100
abproxy_request_duration_seconds_bucket{variant="control",le="0.01"} 30
abproxy_request_duration_seconds_sum{variant="control"} 3.5
abproxy_request_duration_seconds_count{variant="control"} 100
abproxy_shadow_requests_total{shadow="candidate",result="ok"} 7
abproxy_shadow_comparisons_total{shadow="candidate",outcome="match"} 6
abproxy_shadow_comparisons_total{shadow="candidate",outcome="mismatch"} 1
abproxy_config_reloads_total{result="error"} 1
abproxy_requests_in_flight 3
"#;

    #[test]
    fn counts_requests_failures_and_latency_per_variant() {
        let at = UNIX_EPOCH + Duration::from_millis(1_234);
        let snapshot = Snapshot::from_prometheus(TEXT, at);
        assert_eq!(snapshot.at_ms, 1_234);
        let control = &snapshot.variants["control"];
        assert_eq!(control.requests, 105);
        assert_eq!(
            control.failures, 7,
            "503, 499 and Unavailable fail; 404 and InvalidArgument do not"
        );
        assert_eq!(
            control.latency,
            Latency {
                bounds: vec![0.01, 0.1],
                cumulative: vec![30, 80, 100],
            }
        );
        assert_eq!(snapshot.variants["none"].requests, 2);
        let candidate = &snapshot.shadows["candidate"];
        assert_eq!(candidate.results["ok"], 7);
        assert_eq!(candidate.comparisons["match"], 6);
        assert_eq!(candidate.comparisons["mismatch"], 1);
        assert_eq!(snapshot.reloads["error"], 1);
        assert_eq!(snapshot.in_flight, 3);
    }

    #[test]
    fn label_values_are_unescaped() {
        let sample = Sample::parse(r#"m{a="x\"y\\z\n",b="}, ="} 2 1700000000"#).expect("parses");
        assert_eq!(sample.name, "m");
        assert_eq!(sample.label("a"), Some("x\"y\\z\n"));
        assert_eq!(sample.label("b"), Some("}, ="));
        assert_eq!(sample.value, 2.0);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        for line in [
            "",
            "# TYPE x counter",
            "m{a=\"unterminated} 1",
            "m{a=1} 1",
            "m{a=\"x\"}",
            "m nope",
        ] {
            assert_eq!(Sample::parse(line), None, "{line:?}");
        }
        let snapshot =
            Snapshot::from_prometheus("abproxy_requests_total{code=\"200\"} 5\n", UNIX_EPOCH);
        assert!(
            snapshot.variants.is_empty(),
            "a sample without its variant is not counted"
        );
    }
}
