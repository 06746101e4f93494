//! Load generator for abproxy.
//!
//! Besides throughput and latency, it checks the two promises abproxy makes about assignment:
//! the traffic split follows the configured weights, and a user always lands on the same
//! variant. [`run`] is the whole library in one call, so tests drive it without spawning the
//! binary:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use loadtest::{Budget, Mode, Options, Target};
//!
//! let mut options = Options::new(Target::parse("http://127.0.0.1:8080")?);
//! options.mode = Mode::rate(500.0)?;
//! options.budget = Budget::requests(1000);
//! options.expected = "control=80,treatment=20".parse()?;
//! let report = loadtest::run(options).await?;
//! assert_eq!(report.stickiness.violations, 0);
//! # Ok(())
//! # }
//! ```
//!
//! An `https://` target is measured through its TLS termination (rustls, [`TlsOptions`]);
//! [`Options::new_connections`] opens a connection per request, so the rate is one of full
//! handshakes.

pub mod cli;
mod driver;
pub mod options;
pub mod population;
mod progress;
pub mod report;
pub mod request;
mod stats;
pub mod tls;

pub use driver::{run, RunError};
pub use options::{Budget, Mode, Options, OptionsError, Target};
pub use population::{Distribution, Population, UserId};
pub use report::{Checks, ExpectedSplit, Report};
pub use request::IdSource;
pub use stats::ErrorCounts;
pub use tls::{TlsOptions, TlsVersion};

use std::future::Future;
use std::process::ExitCode;

/// Runs `work` on one thread (tokio's current-thread runtime, as abproxy runs on one CPU), for
/// the benchmark's own servers: `loadtest-backend` and `relay-floor`. A failure is printed
/// after `program`'s name.
pub fn run_on_one_thread<E: std::fmt::Display>(
    program: &str,
    work: impl Future<Output = Result<(), E>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{program}: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: {error}");
            ExitCode::FAILURE
        }
    }
}
