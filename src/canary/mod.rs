//! The canary guard: every interval it judges the canary against its baseline from what the
//! request path recorded, ramps the canary while it is healthy, and rolls it back when it is
//! not, by changing the weights of the live config generation.
//!
//! The request path only adds to per-arm windows (`window`); everything else happens here,
//! on the guard's own task, once an interval. With `source = "prometheus"` the guard reads the
//! whole fleet's figures from Prometheus instead (`prometheus`), so that every replica judges
//! the same data. The guard's decision is an overlay on the file's weights, applied whenever a
//! generation is built, so it survives config reloads, and it is written to `state_file`, so
//! it survives restarts.

pub mod judge;
pub mod prometheus;
pub mod run;
pub mod stats;
pub mod webhook;
pub mod window;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::{self, CanarySource, Config, PrometheusSource};
use crate::metrics::{CanaryMetrics, Metrics};
use crate::reload::Reloader;
use judge::{Analysis, Arm, Interval};
use run::{Command, Event, Phase, Run};
use webhook::Webhook;
use window::ArmWindow;

/// Analyses kept for `/canary`.
const HISTORY: usize = 20;
/// How often the guard looks for a `[canary]` section added by a reload.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// The guard's state, shared by its task, the reloader and the admin port.
pub struct Guard {
    metrics: Metrics,
    /// One window per variant name, kept across generations so a reload loses no samples.
    windows: Mutex<HashMap<String, Arc<ArmWindow>>>,
    live: Mutex<Option<Live>>,
    stop: CancellationToken,
}

/// A configured canary and its run.
struct Live {
    config: config::Canary,
    run: Run,
    /// The canary's weight in the config file, before the guard's overlay.
    file_weight: f64,
    history: VecDeque<Record>,
    metrics: CanaryMetrics,
    webhook: Option<(http::Uri, Webhook)>,
    /// Fleet source: the earliest interval start (ms since the epoch) the guard judges. The
    /// fleet's figures from before a change of the weights mix two splits.
    judge_from: u64,
    /// Fleet source: why the last evaluation read nothing, for `/canary`.
    source_error: Option<String>,
}

/// One analysis as `/canary` lists it.
#[derive(Debug, Clone, serde::Serialize)]
struct Record {
    at: String,
    /// Fleet source: the end of the interval judged, the `time` of its queries; the same on
    /// every replica for the same interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    judged_until: Option<String>,
    #[serde(flatten)]
    analysis: Analysis,
}

/// Why an operator's command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no [canary] section is configured")]
    NoCanary,
    #[error("{0}")]
    Refused(String),
}

impl Guard {
    pub fn new(metrics: &Metrics, stop: CancellationToken) -> Guard {
        Guard {
            metrics: metrics.clone(),
            windows: Mutex::default(),
            live: Mutex::default(),
            stop,
        }
    }

    /// The window the request path records `variant`'s answers in, when the guard judges it.
    /// With the fleet source nothing is recorded locally: the guard reads Prometheus.
    pub fn window(&self, config: &Config, variant: &str) -> Option<Arc<ArmWindow>> {
        let canary = config.canary.as_ref()?;
        if variant != canary.variant && variant != canary.baseline {
            return None;
        }
        if canary.source != CanarySource::Local {
            return None;
        }
        let mut windows = lock(&self.windows);
        Some(windows.entry(variant.to_owned()).or_default().clone())
    }

    /// Takes a config read from the file: continues the run it belongs to (from memory or
    /// the state file) or starts a new one, and gives the canary the run's weight.
    pub fn adopt(&self, config: &mut Config) {
        let mut live = lock(&self.live);
        let Some(canary) = config.canary.clone() else {
            if let Some(old) = live.take() {
                old.metrics.state(&states(), None);
                old.metrics.weight.set(0.0);
            }
            return;
        };
        let file_weight = config.variant(&canary.variant).map_or(0.0, |v| v.weight);
        let fingerprint = fingerprint(config, &canary);
        let continued = match live.take() {
            Some(old)
                if old.run.fingerprint == fingerprint && old.config.variant == canary.variant =>
            {
                Some(old)
            }
            Some(old) => {
                old.metrics.state(&states(), None);
                None
            }
            None => None,
        };
        let mut next = match continued {
            Some(mut old) => {
                old.config = canary;
                old.file_weight = file_weight;
                old
            }
            None => {
                let saved = canary.state_file.as_deref().map(Run::load).transpose();
                let resumed = match saved {
                    Ok(saved) => saved.flatten().filter(|run| run.fingerprint == fingerprint),
                    Err(why) => {
                        tracing::error!(error = %why, "canary state unknown; keeping users off the canary");
                        Some(Run::failed_closed(fingerprint.clone(), why))
                    }
                };
                let started = resumed.is_none();
                let mut run = resumed.unwrap_or_else(|| Run::new(fingerprint));
                // A state file edited by hand, or written for a longer ramp.
                run.step = run.step.min(canary.steps.len().saturating_sub(1));
                let mut fresh = Live {
                    metrics: self.metrics.canary(&canary.variant),
                    config: canary,
                    run,
                    file_weight,
                    history: VecDeque::new(),
                    webhook: None,
                    // The weights change now (the run's weight overlays the file's).
                    judge_from: now_ms(),
                    source_error: None,
                };
                self.connect_webhook(&mut fresh);
                if started {
                    // A new canary, or a new version of it: what the windows hold is about the old one.
                    for window in lock(&self.windows).values() {
                        window.take();
                    }
                    fresh.run.reason = Some("a new run started".into());
                    self.changed(&mut fresh, Event::Started);
                } else {
                    tracing::info!(variant = %fresh.config.variant, state = fresh.run.phase.as_str(), "canary run resumed from the state file");
                }
                fresh
            }
        };
        self.connect_webhook(&mut next);
        if let CanarySource::Prometheus(_) = &next.config.source {
            // The fleet's counts for the sequential test start at the first interval judged.
            if next.run.step_since.is_none() {
                next.run.step_since = Some(prometheus::boundary_at_or_after(
                    next.judge_from,
                    next.config.interval,
                ));
            }
        }
        let weight = next.run.weight(&next.config, next.file_weight);
        config.set_canary_weight(weight);
        next.metrics.weight.set(weight);
        next.metrics.state(&states(), Some(next.run.phase.as_str()));
        *live = Some(next);
    }

    /// The canary weight the run calls for, when the served config gives it another.
    fn weight_due(&self, config: &Config) -> Option<f64> {
        let live = lock(&self.live);
        let live = live.as_ref()?;
        let due = live.run.weight(&live.config, live.file_weight);
        let served = config.variant(&live.config.variant)?.weight;
        ((due - served).abs() > 1e-9).then_some(due)
    }

    /// Gives a copy of the live config the weight the run calls for now.
    pub fn apply(&self, config: &mut Config) {
        if let Some(live) = lock(&self.live).as_ref() {
            config.set_canary_weight(live.run.weight(&live.config, live.file_weight));
        }
    }

    /// Judges the canary every interval until shutdown.
    pub async fn run(self: Arc<Self>, reloader: Arc<Reloader>) {
        let mut fleet = FleetLoop::default();
        loop {
            let plan = lock(&self.live)
                .as_ref()
                .map(|live| (live.config.interval, live.config.source.clone()));
            if let Some((interval, CanarySource::Prometheus(source))) = plan {
                let next = prometheus::next_evaluation(
                    now_ms(),
                    interval,
                    source.query_offset,
                    fleet.last_at,
                );
                let wait = Duration::from_millis(next.wake_ms.saturating_sub(now_ms()));
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = self.stop.cancelled() => return,
                }
                fleet.last_at = Some(next.at_ms);
                self.judge_fleet(&reloader, next.at_ms, &mut fleet).await;
                continue;
            }
            let interval = plan.map_or(IDLE_POLL, |(interval, _)| interval);
            let before = weights(&reloader.current().load().config);
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = self.stop.cancelled() => return,
            }
            let generation = reloader.current().load_full();
            let Some(canary) = &generation.config.canary else {
                continue;
            };
            // A decision whose rebuild was cut short (an admin call whose client left) is
            // applied now: what is served always catches up with the run.
            if self.weight_due(&generation.config).is_some() {
                reloader.rebuild().await;
                continue;
            }
            let arm = |name: &str| self.window(&generation.config, name).map(|w| w.take());
            let (Some(ours), Some(theirs)) = (arm(&canary.variant), arm(&canary.baseline)) else {
                continue;
            };
            // An interval whose weights changed midway (a reload, an operator) mixes two
            // splits: its sample ratio means nothing, so it is not judged.
            let now = weights(&generation.config);
            let interval = now
                .filter(|_| now == before)
                .map(|(canary_weight, baseline_weight)| Interval {
                    canary: Arm::sampled(&ours),
                    baseline: Arm::sampled(&theirs),
                    canary_share: canary_weight / (canary_weight + baseline_weight),
                });
            let weight_changed = self.conclude(interval.as_ref());
            if weight_changed {
                reloader.rebuild().await;
            }
        }
    }

    /// Judges the fleet's interval ending at `at_ms` (fleet source): reads it from
    /// Prometheus without holding the lock, then moves the run on as the local source does.
    async fn judge_fleet(&self, reloader: &Reloader, at_ms: u64, fleet: &mut FleetLoop) {
        let generation = reloader.current().load_full();
        if generation.config.canary.is_none() {
            return;
        }
        if self.weight_due(&generation.config).is_some() {
            reloader.rebuild().await;
            return;
        }
        // Served weights the guard did not decide (a reload, an operator): the fleet's figures
        // from before now mix two splits.
        let served = weights(&generation.config);
        let changed_elsewhere = fleet.served.is_some() && fleet.served != served;
        fleet.served = served;
        let asked = {
            let mut guard = lock(&self.live);
            let Some(live) = guard.as_mut() else { return };
            if changed_elsewhere {
                live.judge_from = live.judge_from.max(now_ms());
            }
            let CanarySource::Prometheus(source) = &live.config.source else {
                return;
            };
            if live.run.phase != Phase::Running {
                return;
            }
            let start = at_ms.saturating_sub(millis(live.config.interval));
            let step_since = live.run.step_since.unwrap_or(start);
            if start < live.judge_from.max(step_since) {
                tracing::info!(variant = %live.config.variant, "canary interval not judged: the weights changed during it or after it began");
                return;
            }
            (
                live.config.clone(),
                source.clone(),
                step_since,
                live.run.fingerprint.clone(),
            )
        };
        let (config, source, step_since, fingerprint) = asked;
        let read = prometheus::read(&config, &source, at_ms, step_since).await;
        let canary_share = served.map_or(0.0, |(ours, theirs)| {
            if ours + theirs > 0.0 {
                ours / (ours + theirs)
            } else {
                0.0
            }
        });
        if self.conclude_fleet(read, at_ms, &fingerprint, &source, canary_share) {
            reloader.rebuild().await;
            fleet.served = weights(&reloader.current().load().config);
        }
    }

    /// Judges one local interval (`None`: the weights changed during it) and moves the run on.
    /// Returns whether the canary's weight changed.
    fn conclude(&self, interval: Option<&Interval<'_>>) -> bool {
        let mut guard = lock(&self.live);
        let Some(live) = guard.as_mut() else {
            return false;
        };
        if live.run.phase != Phase::Running {
            return false;
        }
        let Some(interval) = interval else {
            tracing::info!(variant = %live.config.variant, "canary interval not judged: the weights changed during it");
            return false;
        };
        let totals = &mut live.run.totals;
        totals.canary_requests += interval.canary.requests;
        totals.canary_failures += interval.canary.failures;
        totals.baseline_requests += interval.baseline.requests;
        totals.baseline_failures += interval.baseline.failures;
        let analysis = judge::analyse(&live.config, interval, totals.proportions());
        self.take(live, analysis, None)
    }

    /// Judges the fleet's interval ending at `at_ms` from what Prometheus answered, unless
    /// the run changed while the queries were out. Returns whether the canary's weight changed.
    fn conclude_fleet(
        &self,
        read: Result<prometheus::Fleet, prometheus::SourceError>,
        at_ms: u64,
        fingerprint: &str,
        source: &PrometheusSource,
        canary_share: f64,
    ) -> bool {
        let mut guard = lock(&self.live);
        let Some(live) = guard.as_mut() else {
            return false;
        };
        if live.run.phase != Phase::Running || live.run.fingerprint != fingerprint {
            return false;
        }
        let analysis = match read {
            Ok(fleet) => {
                live.source_error = None;
                if let Some(counts) = fleet.since_step {
                    live.run.totals = run::Totals {
                        canary_requests: counts.canary_total,
                        canary_failures: counts.canary_failures,
                        baseline_requests: counts.baseline_total,
                        baseline_failures: counts.baseline_failures,
                    };
                }
                let interval = Interval {
                    canary: fleet.canary,
                    baseline: fleet.baseline,
                    canary_share,
                };
                let analysis =
                    judge::analyse(&live.config, &interval, live.run.totals.proportions());
                judge::read_from(
                    analysis,
                    format!("fleet figures from Prometheus at {}", source.url),
                )
            }
            Err(err) => {
                let why = format!("no fleet figures from Prometheus at {}: {err}", source.url);
                tracing::warn!(variant = %live.config.variant, reason = %why, "canary interval inconclusive");
                live.source_error = Some(why.clone());
                judge::unread(why)
            }
        };
        self.take(live, analysis, Some((at_ms, source)))
    }

    /// Counts an analysis, moves the run on by it and keeps it for `/canary`. `fleet` holds
    /// the judged interval's end and the source, for the fleet source. Returns whether the
    /// canary's weight changed.
    fn take(
        &self,
        live: &mut Live,
        analysis: Analysis,
        fleet: Option<(u64, &PrometheusSource)>,
    ) -> bool {
        for check in &analysis.checks {
            live.metrics.check(check.check, check.outcome.as_str());
        }
        tracing::info!(
            variant = %live.config.variant,
            verdict = ?analysis.verdict,
            summary = %analysis.summary,
            "canary analysis"
        );
        let before = live.run.weight(&live.config, live.file_weight);
        let event = live.run.take(&analysis, &live.config);
        if let (Some(Event::Ramped), Some((at_ms, source))) = (event, fleet) {
            // Every replica took the same decision at the same interval: all judge again
            // from the same boundary, once all of them serve the new weight.
            let settled = prometheus::settled_after(at_ms, &live.config, source);
            live.run.step_since = Some(settled);
            live.judge_from = live.judge_from.max(settled);
        }
        if live.history.len() == HISTORY {
            live.history.pop_front();
        }
        live.history.push_back(Record {
            at: now_rfc3339(),
            judged_until: fleet.map(|(at_ms, _)| rfc3339_ms(at_ms)),
            analysis,
        });
        match event {
            Some(event) => self.changed(live, event),
            None => save(live),
        }
        before != live.run.weight(&live.config, live.file_weight)
    }

    /// Carries out an operator's command; the caller rebuilds the generation if the weight
    /// changed (the returned bool).
    pub fn command(&self, command: Command) -> Result<bool, CommandError> {
        let mut guard = lock(&self.live);
        let live = guard.as_mut().ok_or(CommandError::NoCanary)?;
        let before = live.run.weight(&live.config, live.file_weight);
        let event = live
            .run
            .command(command, &live.config)
            .map_err(CommandError::Refused)?;
        self.changed(live, event);
        Ok(before != live.run.weight(&live.config, live.file_weight))
    }

    /// Publishes a change of the run: metrics, log, state file, webhook.
    fn changed(&self, live: &mut Live, event: Event) {
        let weight = live.run.weight(&live.config, live.file_weight);
        let reason = live.run.reason.clone().unwrap_or_default();
        live.metrics.weight.set(weight);
        live.metrics.state(&states(), Some(live.run.phase.as_str()));
        if event == Event::RolledBack {
            live.metrics.rollbacks.increment(1);
            tracing::warn!(variant = %live.config.variant, baseline = %live.config.baseline, %reason, "canary rolled back");
        } else {
            tracing::info!(variant = %live.config.variant, event = event.as_str(), weight, %reason, "canary");
        }
        save(live);
        if let Some((_, webhook)) = &live.webhook {
            webhook.notify(json!({
                "event": event.as_str(),
                "variant": live.config.variant,
                "baseline": live.config.baseline,
                "state": live.run.phase.as_str(),
                "weight": weight,
                "reason": reason,
                "at": now_rfc3339(),
                "run_started": live.run.started,
            }));
        }
    }

    fn connect_webhook(&self, live: &mut Live) {
        let wanted = live.config.webhook.clone();
        let current = live.webhook.as_ref().map(|(url, _)| url.clone());
        if wanted != current {
            live.webhook = wanted.map(|url| (url.clone(), Webhook::start(url, self.stop.clone())));
        }
    }

    /// What `GET /canary` answers.
    pub fn status(&self) -> Value {
        let guard = lock(&self.live);
        let Some(live) = guard.as_ref() else {
            return json!({ "enabled": false });
        };
        let config = &live.config;
        let run = &live.run;
        let step = (!config.steps.is_empty()).then(|| {
            json!({
                "index": run.step + 1,
                "of": config.steps.len(),
                "weight": config.steps[run.step.min(config.steps.len() - 1)],
                "passed": run.passed,
                "needed": config.analyses_per_step,
            })
        });
        let history: Vec<&Record> = live.history.iter().rev().collect();
        let source = match &config.source {
            CanarySource::Local => json!({ "kind": "local" }),
            CanarySource::Prometheus(source) => json!({
                "kind": "prometheus",
                "url": source.url,
                "last_error": live.source_error,
            }),
        };
        json!({
            "enabled": true,
            "variant": config.variant,
            "baseline": config.baseline,
            "state": run.phase.as_str(),
            "reason": run.reason,
            "weight": run.weight(config, live.file_weight),
            "file_weight": live.file_weight,
            "step": step,
            "consecutive_failures": run.consecutive_failures,
            "failures_to_rollback": config.failures_to_rollback,
            "interval": humantime::format_duration(config.interval).to_string(),
            "run_started": run.started,
            "source": source,
            "totals": run.totals,
            "last_checks": history,
        })
    }

    /// One line for `/status`.
    pub fn summary(&self) -> Value {
        let guard = lock(&self.live);
        match guard.as_ref() {
            None => Value::Null,
            Some(live) => json!({
                "variant": live.config.variant,
                "state": live.run.phase.as_str(),
                "weight": live.run.weight(&live.config, live.file_weight),
                "reason": live.run.reason,
            }),
        }
    }
}

fn save(live: &Live) {
    let Some(path) = &live.config.state_file else {
        return;
    };
    if let Err(err) = live.run.save(path) {
        tracing::error!(path = %path.display(), error = %err, "cannot write the canary state file; a restart would forget this run");
    }
}

/// A run belongs to one canary: its upstream, which variants it compares, its ramp and what
/// it is judged on. Editing any of these starts a new run; editing weights, the interval, the
/// webhook or the state file does not, so a rolled-back canary stays rolled back.
fn fingerprint(config: &Config, canary: &config::Canary) -> String {
    let upstream = config
        .variant(&canary.variant)
        .map(|variant| variant.upstream.to_string())
        .unwrap_or_default();
    let checks = &canary.checks;
    // Spelled out rather than a `Debug` of the section, which may change between releases.
    let judged = serde_json::json!({
        "upstream": upstream,
        "variant": canary.variant,
        "baseline": canary.baseline,
        "steps": canary.steps,
        "analyses_per_step": canary.analyses_per_step,
        "failures_to_rollback": canary.failures_to_rollback,
        "min_requests": canary.min_requests,
        "max_error_rate": checks.max_error_rate,
        "max_error_rate_increase": checks.max_error_rate_increase,
        "confidence": checks.confidence,
        "max_p99_ms": checks.max_p99.map(|d| d.as_secs_f64() * 1000.0),
        "max_p99_ratio": checks.max_p99_ratio,
        "p99_floor_ms": checks.p99_floor.as_secs_f64() * 1000.0,
        "max_prediction_psi": checks.max_prediction_psi,
        "min_predictions": checks.min_predictions,
        "srm_p_value": checks.srm_p_value,
    });
    let digest = Sha256::digest(judged.to_string().as_bytes());
    config::hex(&digest[..8])
}

/// The canary's and baseline's weights in a config.
fn weights(config: &Config) -> Option<(f64, f64)> {
    let canary = config.canary.as_ref()?;
    Some((
        config.variant(&canary.variant)?.weight,
        config.variant(&canary.baseline)?.weight,
    ))
}

fn states() -> [&'static str; 4] {
    Phase::ALL.map(Phase::as_str)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn now_ms() -> u64 {
    prometheus::epoch_ms(SystemTime::now())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `1700000010000` → `2023-11-14T22:13:30.000Z`.
fn rfc3339_ms(ms: u64) -> String {
    let time = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

/// What the guard's loop remembers between fleet evaluations.
#[derive(Default)]
struct FleetLoop {
    /// The end of the last interval evaluated: none is evaluated twice.
    last_at: Option<u64>,
    /// The canary's and baseline's weights served at the last evaluation.
    served: Option<(f64, f64)>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
