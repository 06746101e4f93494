use std::process::ExitCode;

use clap::Parser;
use loadtest::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    cli::execute(Cli::parse()).await
}
