//! The command line: `run`, `check`, `assign`, `demo`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::assign::{bucket, Split};
use crate::config::Config;
use crate::demo::{self, DEMO_CONFIG};
use crate::server::Server;

#[derive(Debug, Parser)]
#[command(
    name = "abproxy",
    version,
    about = "A/B, canary and shadow traffic-splitting reverse proxy for model serving",
    long_about = "abproxy sits in front of model servers and sends each user to the variant that \
owns their bucket: SHA-256(salt + user ID) mod buckets, so a user always sees the same variant. \
It mirrors traffic to shadow backends, reloads its TOML config when the file changes, and \
exports per-variant Prometheus metrics on an admin port.\n\n\
Start with `abproxy demo`, then `abproxy check --config FILE` before every deploy."
)]
pub struct Cli {
    /// Log format: `human` for terminals, `json` for log pipelines. Filter with RUST_LOG.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve traffic; reload FILE when it changes (or on SIGHUP); drain and exit on SIGTERM.
    Run {
        /// The TOML config file.
        #[arg(short, long, env = "ABPROXY_CONFIG")]
        config: PathBuf,
        /// Worker threads (default: one per CPU). 1 runs everything on one thread.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Validate FILE and print its bucket table; exit 1 with file:line: reason if it is invalid.
    Check {
        #[arg(short, long, env = "ABPROXY_CONFIG")]
        config: PathBuf,
    },
    /// Print the variant each user ID gets under FILE: USER_ID<TAB>VARIANT<TAB>BUCKET.
    Assign {
        #[arg(short, long, env = "ABPROXY_CONFIG")]
        config: PathBuf,
        /// The user IDs to look up.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Start mock model servers and the proxy on config/demo.toml, ready to curl.
    Demo {
        /// Use this config instead of config/demo.toml (or the built-in copy of it).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

/// Runs the command line; the return value is the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Assign { config, ids } => assign(&config, &ids),
        Command::Run { config, threads } => {
            runtime(threads).and_then(|rt| rt.block_on(run(&config)))
        }
        Command::Demo { config } => runtime(None).and_then(|rt| rt.block_on(demo(config))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), String>;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime(threads: Option<usize>) -> Result<tokio::runtime::Runtime, String> {
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(0) => return Err("--threads must be at least 1".into()),
        Some(n) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the async runtime: {err}"))
}

fn check(path: &Path) -> CliResult {
    let loaded = Config::load(path).map_err(|err| err.to_string())?;
    let config = &loaded.config;
    let assignment = &config.assignment;
    println!("{}: ok (sha256 {})", path.display(), &loaded.sha256[..12]);
    println!(
        "listen {}  admin {}",
        config.server.listen, config.server.admin
    );
    let sources: Vec<String> = assignment.sources.iter().map(ToString::to_string).collect();
    println!(
        "user ID from {}; {} buckets; salt {:?}; when missing: {}",
        sources.join(", "),
        assignment.buckets,
        assignment.salt,
        assignment.on_missing
    );
    println!();
    let width = config
        .variants
        .iter()
        .map(|v| v.name.len())
        .max()
        .unwrap_or(0)
        .max(7);
    println!(
        "{:width$}  {:>7}  {:>11}  UPSTREAM",
        "VARIANT", "WEIGHT", "BUCKETS"
    );
    let split = Split::from_counts(config.variants.iter().map(|variant| variant.buckets));
    for (index, variant) in config.variants.iter().enumerate() {
        let range = split.range(index);
        let range = if range.is_empty() {
            "-".to_owned()
        } else {
            format!("{}-{}", range.start, range.end - 1)
        };
        println!(
            "{:width$}  {:>6}%  {:>11}  {}",
            variant.name, variant.weight, range, variant.upstream
        );
    }
    for shadow in &config.shadows {
        println!(
            "shadow {} <- {}% of users -> {}{}",
            shadow.name,
            shadow.percent,
            shadow.upstream,
            shadow
                .compare
                .as_ref()
                .map(|p| format!(" (compare {p})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn assign(path: &Path, ids: &[String]) -> CliResult {
    let config = Config::load(path).map_err(|err| err.to_string())?.config;
    let split = Split::from_counts(config.variants.iter().map(|v| v.buckets));
    for id in ids {
        let bucket = bucket(&config.assignment.salt, id, config.assignment.buckets);
        let variant = &config.variants[split.variant_of(bucket)];
        println!("{id}\t{}\t{bucket}", variant.name);
    }
    Ok(())
}

async fn run(path: &Path) -> CliResult {
    let server = Server::bind(path).await.map_err(|err| err.to_string())?;
    server
        .run(shutdown_on_signal())
        .await
        .map_err(|err| err.to_string())
}

async fn demo(config: Option<PathBuf>) -> CliResult {
    let path = match config {
        Some(path) => path,
        None if Path::new("config/demo.toml").exists() => PathBuf::from("config/demo.toml"),
        None => {
            let path =
                std::env::temp_dir().join(format!("abproxy-demo-{}.toml", std::process::id()));
            std::fs::write(&path, DEMO_CONFIG)
                .map_err(|err| format!("{}: {err}", path.display()))?;
            path
        }
    };
    let loaded = Config::load(&path).map_err(|err| err.to_string())?;
    let shutdown = shutdown_on_signal();
    let upstreams = loaded
        .config
        .variants
        .iter()
        .map(|v| &v.upstream)
        .chain(loaded.config.shadows.iter().map(|s| &s.upstream));
    let mut seen = Vec::new();
    for (upstream, model) in upstreams.zip(demo::demo_models()) {
        if seen.contains(upstream) {
            continue;
        }
        seen.push(upstream.clone());
        let addr = upstream.authority.as_str();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|err| format!("cannot start mock model {} on {addr}: {err}", model.name))?;
        tracing::info!(model = %model.name, %addr, "mock model listening");
        tokio::spawn(model.serve(listener, shutdown.clone()));
    }
    let server = Server::bind(&path).await.map_err(|err| err.to_string())?;
    println!(
        "{}",
        demo::instructions(server.proxy_addr(), server.admin_addr(), &path)
    );
    server.run(shutdown).await.map_err(|err| err.to_string())
}

/// A token cancelled by the first SIGTERM or SIGINT; a second one exits at once.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_termination().await;
        tracing::info!("shutdown signal received; draining (signal again to exit now)");
        cancel.cancel();
        wait_for_termination().await;
        tracing::warn!("second signal: exiting without draining");
        std::process::exit(1);
    });
    token
}

#[cfg(unix)]
async fn wait_for_termination() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_termination() {
    let _ = tokio::signal::ctrl_c().await;
}
