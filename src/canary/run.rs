//! One canary run: where the ramp stands, what the operator or the checks decided, and why.
//! Pure state transitions, plus the state file that makes a rollback survive a restart.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::judge::{Analysis, Verdict};
use super::stats::Proportions;
use crate::config::Canary;

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Judged every interval; ramps while healthy.
    Running,
    /// Held at its weight by an operator; nothing is judged.
    Paused,
    /// At its last step (or promoted by an operator); nothing more is judged. Making the
    /// canary the model for everyone is the user's config edit.
    Promoted,
    /// At weight 0: its users are served by the baseline.
    RolledBack,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Running,
        Phase::Paused,
        Phase::Promoted,
        Phase::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Promoted => "promoted",
            Phase::RolledBack => "rolled_back",
        }
    }
}

/// The run's state, as written to the state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Identifies the canary this run is about (its upstream and `[canary]` section): a run
    /// found in the state file under another fingerprint is over.
    pub fingerprint: String,
    pub phase: Phase,
    /// Index into the ramp's steps.
    pub step: usize,
    /// Passing analyses at this step so far.
    pub passed: u32,
    pub consecutive_failures: u32,
    pub reason: Option<String>,
    /// RFC 3339.
    pub started: String,
    /// Requests and failures of both arms since the step began, for the sequential test.
    pub totals: Totals,
    /// Fleet source: where the current step's intervals begin (ms since the Unix epoch), the
    /// start of the range the sequential test's counts are read over. Kept in the state file
    /// so that a restarted replica reads the same counts as the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_since: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub canary_requests: u64,
    pub canary_failures: u64,
    pub baseline_requests: u64,
    pub baseline_failures: u64,
}

impl Totals {
    pub fn proportions(&self) -> Proportions {
        Proportions {
            canary_failures: self.canary_failures,
            canary_total: self.canary_requests,
            baseline_failures: self.baseline_failures,
            baseline_total: self.baseline_requests,
        }
    }
}

/// A change of the run worth telling a deployer about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Started,
    Ramped,
    Promoted,
    RolledBack,
    Paused,
    Resumed,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Started => "started",
            Event::Ramped => "ramped",
            Event::Promoted => "promoted",
            Event::RolledBack => "rolled_back",
            Event::Paused => "paused",
            Event::Resumed => "resumed",
        }
    }
}

/// What an operator asks of the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Rollback,
    Promote,
    Pause,
    Resume,
}

impl std::str::FromStr for Command {
    type Err = ();

    fn from_str(text: &str) -> Result<Command, ()> {
        match text {
            "rollback" => Ok(Command::Rollback),
            "promote" => Ok(Command::Promote),
            "pause" => Ok(Command::Pause),
            "resume" => Ok(Command::Resume),
            _ => Err(()),
        }
    }
}

impl Run {
    pub fn new(fingerprint: String) -> Run {
        Run {
            fingerprint,
            phase: Phase::Running,
            step: 0,
            passed: 0,
            consecutive_failures: 0,
            reason: None,
            started: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            totals: Totals::default(),
            step_since: None,
        }
    }

    /// The canary's weight in this state; `file_weight` is what the config file gives it.
    pub fn weight(&self, config: &Canary, file_weight: f64) -> f64 {
        match (self.phase, config.steps.as_slice()) {
            (Phase::RolledBack, _) => 0.0,
            (_, []) => file_weight,
            (_, steps) => steps[self.step.min(steps.len() - 1)],
        }
    }

    /// A run that stands for a rolled-back canary, for when the state file cannot say what
    /// the last run decided: better to keep users off a canary that may have been rolled back.
    pub fn failed_closed(fingerprint: String, why: String) -> Run {
        Run {
            phase: Phase::RolledBack,
            reason: Some(format!(
                "rolled back to be safe: {why}; promote it or start a new run (edit the canary) to serve it again"
            )),
            ..Run::new(fingerprint)
        }
    }

    /// Takes one interval's analysis. Inconclusive intervals change nothing: they neither
    /// advance the ramp nor extend or break a run of failures.
    pub fn take(&mut self, analysis: &Analysis, config: &Canary) -> Option<Event> {
        if self.phase != Phase::Running {
            return None;
        }
        match analysis.verdict {
            Verdict::Inconclusive => None,
            Verdict::Fail => {
                self.consecutive_failures += 1;
                self.passed = 0;
                let failures = self.consecutive_failures;
                if failures < config.failures_to_rollback {
                    return None;
                }
                self.phase = Phase::RolledBack;
                self.reason = Some(format!(
                    "rolled back: {}, {} consecutive failure",
                    analysis.summary,
                    ordinal(failures)
                ));
                Some(Event::RolledBack)
            }
            Verdict::Pass => {
                self.consecutive_failures = 0;
                self.passed += 1;
                if config.steps.is_empty() || self.passed < config.analyses_per_step {
                    return None;
                }
                self.passed = 0;
                if self.step + 1 < config.steps.len() {
                    self.step += 1;
                    // A new share: the sequential test starts again (see `judge`).
                    self.totals = Totals::default();
                    self.step_since = None;
                    self.reason = Some(format!(
                        "ramped to {} % after {} passing analyses",
                        config.steps[self.step], config.analyses_per_step
                    ));
                    Some(Event::Ramped)
                } else {
                    self.phase = Phase::Promoted;
                    self.reason = Some(format!(
                        "promoted: passed {} analyses at the last step, {} %",
                        config.analyses_per_step, config.steps[self.step]
                    ));
                    Some(Event::Promoted)
                }
            }
        }
    }

    /// Carries out an operator's command, or says why it cannot be done.
    pub fn command(&mut self, command: Command, config: &Canary) -> Result<Event, String> {
        let by = "by an operator";
        match (command, self.phase) {
            (Command::Rollback, Phase::RolledBack) => Err("the canary is already rolled back".into()),
            (Command::Rollback, _) => {
                self.phase = Phase::RolledBack;
                self.reason = Some(format!("rolled back {by}"));
                Ok(Event::RolledBack)
            }
            (Command::Promote, Phase::Promoted) => Err("the canary is already promoted".into()),
            (Command::Promote, _) => {
                self.phase = Phase::Promoted;
                self.step = config.steps.len().saturating_sub(1);
                self.reason = Some(format!("promoted {by}"));
                Ok(Event::Promoted)
            }
            (Command::Pause, Phase::Running) => {
                self.phase = Phase::Paused;
                self.reason = Some(format!("paused {by}"));
                Ok(Event::Paused)
            }
            (Command::Pause, phase) => Err(format!("only a running canary can be paused; it is {}", phase.as_str())),
            (Command::Resume, Phase::Paused) => {
                self.phase = Phase::Running;
                self.reason = Some(format!("resumed {by}"));
                Ok(Event::Resumed)
            }
            (Command::Resume, phase) => Err(format!(
                "only a paused canary can be resumed; it is {} (edit the canary's upstream or [canary] section to start a new run)",
                phase.as_str()
            )),
        }
    }

    /// The run saved in `path`: `Ok(None)` when there is none yet, `Err` when one is there
    /// but cannot be read.
    pub fn load(path: &Path) -> Result<Option<Run>, String> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(format!(
                    "cannot read the state file {}: {err}",
                    path.display()
                ))
            }
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|err| format!("the state file {} is not valid: {err}", path.display()))
    }

    /// Writes the run to `path` whole or not at all: a temporary file beside it, renamed over it.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut temporary = PathBuf::from(path);
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(".tmp");
        temporary.set_file_name(name);
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    }
}

fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::judge::Counts;

    fn canary(steps: &[f64]) -> Canary {
        let text = format!(
            "[[variant]]\nname = \"control\"\nupstream = \"http://127.0.0.1:1\"\nweight = 50\n\
             [[variant]]\nname = \"treatment\"\nupstream = \"http://127.0.0.1:2\"\nweight = 50\n\
             [canary]\nvariant = \"treatment\"\nbaseline = \"control\"\nfailures_to_rollback = 3\n\
             analyses_per_step = 2\n{}",
            if steps.is_empty() {
                String::new()
            } else {
                format!("steps = {steps:?}\n")
            }
        );
        crate::config::Config::parse(&text, Path::new("test.toml"))
            .expect("valid config")
            .canary
            .expect("a canary")
    }

    fn analysis(verdict: Verdict) -> Analysis {
        Analysis {
            verdict,
            summary: "error rate 4.1 % > ceiling 2 %".into(),
            canary: Counts {
                requests: 1,
                failures: 0,
            },
            baseline: Counts {
                requests: 1,
                failures: 0,
            },
            checks: Vec::new(),
        }
    }

    #[test]
    fn three_consecutive_failures_roll_back_and_say_why() {
        let config = canary(&[]);
        let mut run = Run::new("f".into());
        assert_eq!(run.take(&analysis(Verdict::Fail), &config), None);
        assert_eq!(run.take(&analysis(Verdict::Fail), &config), None);
        assert_eq!(
            run.take(&analysis(Verdict::Fail), &config),
            Some(Event::RolledBack)
        );
        assert_eq!(run.weight(&config, 50.0), 0.0);
        assert_eq!(
            run.reason.as_deref(),
            Some("rolled back: error rate 4.1 % > ceiling 2 %, 3rd consecutive failure")
        );
    }

    #[test]
    fn a_pass_breaks_a_run_of_failures_and_an_inconclusive_interval_does_not() {
        let config = canary(&[]);
        let mut run = Run::new("f".into());
        run.take(&analysis(Verdict::Fail), &config);
        run.take(&analysis(Verdict::Fail), &config);
        run.take(&analysis(Verdict::Pass), &config);
        run.take(&analysis(Verdict::Fail), &config);
        run.take(&analysis(Verdict::Inconclusive), &config);
        run.take(&analysis(Verdict::Fail), &config);
        assert_eq!(run.phase, Phase::Running);
        assert_eq!(
            run.take(&analysis(Verdict::Fail), &config),
            Some(Event::RolledBack)
        );
    }

    #[test]
    fn a_healthy_canary_ramps_through_every_step_then_is_promoted() {
        let config = canary(&[1.0, 5.0, 25.0]);
        let mut run = Run::new("f".into());
        let mut weights = vec![run.weight(&config, 50.0)];
        let mut events = Vec::new();
        for _ in 0..6 {
            events.extend(run.take(&analysis(Verdict::Pass), &config));
            weights.push(run.weight(&config, 50.0));
        }
        assert_eq!(weights, [1.0, 1.0, 5.0, 5.0, 25.0, 25.0, 25.0]);
        assert_eq!(events, [Event::Ramped, Event::Ramped, Event::Promoted]);
        assert_eq!(
            run.take(&analysis(Verdict::Fail), &config),
            None,
            "promoted: no longer judged"
        );
    }

    #[test]
    fn inconclusive_intervals_never_advance_the_ramp() {
        let config = canary(&[1.0, 5.0]);
        let mut run = Run::new("f".into());
        for _ in 0..100 {
            assert_eq!(run.take(&analysis(Verdict::Inconclusive), &config), None);
        }
        assert_eq!((run.step, run.passed, run.phase), (0, 0, Phase::Running));
    }

    #[test]
    fn operators_pause_resume_promote_and_roll_back() {
        let config = canary(&[1.0, 5.0]);
        let mut run = Run::new("f".into());
        assert_eq!(run.command(Command::Pause, &config), Ok(Event::Paused));
        assert_eq!(
            run.take(&analysis(Verdict::Fail), &config),
            None,
            "paused: not judged"
        );
        assert!(run.command(Command::Pause, &config).is_err());
        assert_eq!(run.command(Command::Resume, &config), Ok(Event::Resumed));
        assert_eq!(run.command(Command::Promote, &config), Ok(Event::Promoted));
        assert_eq!(run.weight(&config, 50.0), 5.0);
        assert_eq!(
            run.command(Command::Rollback, &config),
            Ok(Event::RolledBack)
        );
        assert!(run.command(Command::Resume, &config).is_err());
        assert_eq!(run.weight(&config, 50.0), 0.0);
    }

    #[test]
    fn the_state_file_round_trips_and_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("canary-state.json");
        assert_eq!(Run::load(&path), Ok(None));
        let mut run = Run::new("abc".into());
        run.phase = Phase::RolledBack;
        run.save(&path).expect("saved");
        assert_eq!(Run::load(&path), Ok(Some(run)));
        std::fs::write(&path, "{ not json").expect("written");
        assert!(Run::load(&path).is_err());
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no temporary left"
        );
    }

    #[test]
    fn ordinals_read_as_english() {
        let words: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22].map(ordinal).to_vec();
        assert_eq!(
            words,
            ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd"]
        );
    }
}
