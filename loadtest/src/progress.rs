//! The live progress bar on stderr.
//!
//! stderr, so `--json > out.json` and the table on stdout stay clean; indicatif hides the bar
//! by itself when stderr is not a terminal (CI logs, pipes).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::options::Budget;
use crate::stats::Shared;

/// Redraws often enough to look live, rarely enough to cost nothing next to the traffic.
const REFRESH: Duration = Duration::from_millis(200);

/// A bar that follows the run's live counters until dropped (also on an early error return,
/// so a failed run never leaves a bar drawn over the error message).
pub struct Progress {
    bar: ProgressBar,
    updater: JoinHandle<()>,
}

impl Progress {
    /// The bar measures whichever limit ends the run: elapsed time when a duration is set
    /// (a request count may still end it earlier), else requests done.
    /// `label` names the phase (warmup or measured run) in front of the bar.
    pub fn start(label: &'static str, budget: Budget, shared: Arc<Shared>) -> Self {
        let (length, template, by_time) = match budget.duration {
            Some(duration) => (
                u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                "{prefix:>6} [{elapsed_precise}] {wide_bar} {msg}",
                true,
            ),
            None => (
                budget.requests.unwrap_or(0),
                "{prefix:>6} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
                false,
            ),
        };
        let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(label);
        let started = Instant::now();
        let updater = tokio::spawn({
            let bar = bar.clone();
            async move {
                let mut ticks = tokio::time::interval(REFRESH);
                loop {
                    ticks.tick().await;
                    let done = shared.live.done.load(Ordering::Relaxed);
                    let errors = shared.live.errors.load(Ordering::Relaxed);
                    let elapsed = started.elapsed();
                    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
                    bar.set_position(if by_time {
                        u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
                    } else {
                        done
                    });
                    bar.set_message(format!("{done} req  {errors} err  {rate:.0} req/s"));
                }
            }
        });
        Progress { bar, updater }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.updater.abort();
        self.bar.finish_and_clear();
    }
}
