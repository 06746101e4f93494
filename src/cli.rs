//! The command line: `run`, `check`, `assign`, `demo`, and `canary` for a running proxy.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use http::{Method, StatusCode, Uri};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::assign::{bucket, Split};
use crate::config::Config;
use crate::demo::{self, DEMO_CONFIG};
use crate::http_client::{self, CallError};
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
        /// Worker threads (default: one per CPU this process may use, counting its affinity
        /// mask and cgroup CPU quota; with one CPU, everything runs on one thread).
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
    /// Show a running proxy's canary, or steer it, through its admin port.
    Canary {
        #[arg(value_enum)]
        action: CanaryAction,
        /// The admin port: `[server] admin` of the proxy's config.
        #[arg(long, env = "ABPROXY_ADMIN", default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// A file holding the admin port's bearer token (surrounding whitespace is ignored).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CanaryAction {
    /// Print the canary's state and its latest analyses.
    Status,
    /// Send the canary's traffic back to the baseline now.
    Rollback,
    /// Promote the canary without waiting for the remaining analyses.
    Promote,
    /// Hold the canary at its current weight until `resume`.
    Pause,
    /// Resume a paused canary.
    Resume,
}

impl CanaryAction {
    fn as_str(self) -> &'static str {
        match self {
            CanaryAction::Status => "status",
            CanaryAction::Rollback => "rollback",
            CanaryAction::Promote => "promote",
            CanaryAction::Pause => "pause",
            CanaryAction::Resume => "resume",
        }
    }
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
        Command::Canary {
            action,
            admin,
            token_file,
        } => canary(action, &admin, token_file.as_deref()),
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
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let mut builder = match worker_threads(threads, cpus)? {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    builder
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the async runtime: {err}"))
}

/// Threads for the request runtime: `--threads`, else one per CPU the process may use
/// (`available_parallelism` counts the affinity mask and a cgroup quota). On one CPU that is
/// a current-thread runtime, which serves there with less CPU per request than a one-worker
/// multi-thread runtime: no work-stealing, no cross-thread wake-ups.
fn worker_threads(threads: Option<usize>, cpus: usize) -> Result<usize, String> {
    match threads {
        Some(0) => Err("--threads must be at least 1".into()),
        Some(n) => Ok(n),
        None => Ok(cpus.max(1)),
    }
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
    if let Some(tls) = &config.server.tls {
        let sni: Vec<&str> = tls.sni.iter().map(|sni| sni.name.as_str()).collect();
        let clients = match &tls.client_auth {
            Some(auth) if auth.required => format!("required ({})", auth.ca.display()),
            Some(auth) => format!("optional ({})", auth.ca.display()),
            None => "not asked for".to_owned(),
        };
        println!(
            "TLS on listen: certificate {}{}; client certificates {clients}{}",
            tls.default.cert.display(),
            if sni.is_empty() {
                String::new()
            } else {
                format!(", by SNI for {}", sni.join(", "))
            },
            config
                .server
                .listen_plain
                .map(|plain| format!("; plain HTTP on {plain}"))
                .unwrap_or_default(),
        );
    }
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
        let protocol = match variant.upstream.protocol {
            crate::config::Protocol::Http1 => String::new(),
            protocol => format!(" ({})", protocol.as_str()),
        };
        let fallback = variant
            .fallback
            .as_ref()
            .map(|fallback| format!("; unreachable: served by {fallback}"))
            .unwrap_or_default();
        println!(
            "{:width$}  {:>6}%  {:>11}  {}{protocol}{fallback}",
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
    if !config.metrics.prediction.is_empty() {
        let pointers: Vec<&str> = config
            .metrics
            .prediction
            .iter()
            .map(|p| p.as_str())
            .collect();
        println!(
            "predictions read at {} (answers up to {} bytes)",
            pointers.join(" or "),
            config.metrics.prediction_max_bytes
        );
    }
    if let Some(canary) = &config.canary {
        println!("{}", describe_canary(canary));
    }
    Ok(())
}

/// The guard's plan in words, so a reviewer of the config sees what it will do.
fn describe_canary(canary: &crate::config::Canary) -> String {
    let ramp = if canary.steps.is_empty() {
        "held at its weight".to_owned()
    } else {
        let steps: Vec<String> = canary.steps.iter().map(ToString::to_string).collect();
        format!(
            "ramped {} % after {} passing analyses a step",
            steps.join(" -> "),
            canary.analyses_per_step
        )
    };
    let checks = &canary.checks;
    let mut judged = Vec::new();
    if let Some(p) = checks.srm_p_value {
        judged.push(format!("sample ratio (p < {p})"));
    }
    if let Some(rate) = checks.max_error_rate {
        judged.push(format!("error rate <= {rate}"));
    }
    if let Some(margin) = checks.max_error_rate_increase {
        judged.push(format!(
            "error rate at most {margin} over {}'s ({} confidence, sequential)",
            canary.baseline, checks.confidence
        ));
    }
    if let Some(p99) = checks.max_p99 {
        judged.push(format!("p99 <= {}", humantime::format_duration(p99)));
    }
    if let Some(ratio) = checks.max_p99_ratio {
        judged.push(format!("p99 <= {ratio} x {}'s", canary.baseline));
    }
    if let Some(psi) = checks.max_prediction_psi {
        judged.push(format!("prediction PSI <= {psi}"));
    }
    let (whose, source) = match &canary.source {
        crate::config::CanarySource::Local => ("", String::new()),
        crate::config::CanarySource::Prometheus(source) => (
            " across the fleet",
            format!("\n{}", crate::canary::prometheus::plan(canary, source)),
        ),
    };
    format!(
        "canary {} against {}: judged every {} from {} requests an arm{whose}; {}; rolled back \
         after {} consecutive failures\n  checks: {}{source}",
        canary.variant,
        canary.baseline,
        humantime::format_duration(canary.interval),
        canary.min_requests,
        ramp,
        canary.failures_to_rollback,
        judged.join(", ")
    )
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

/// How long `abproxy canary` waits for the admin port, which answers from memory.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The analyses `abproxy canary status` lists, newest first.
const CHECKS_SHOWN: usize = 10;

fn canary(action: CanaryAction, admin: &str, token_file: Option<&Path>) -> CliResult {
    let token = token_file.map(read_token).transpose()?;
    let (method, path) = match action {
        CanaryAction::Status => (Method::GET, "/canary".to_owned()),
        order => (Method::POST, format!("/canary/{}", order.as_str())),
    };
    let url = admin_url(admin, &path)?;
    // One call: a current-thread runtime is all it needs.
    let reply = runtime(Some(1))?
        .block_on(http_client::call(
            method,
            &url,
            None,
            token.as_deref(),
            ADMIN_TIMEOUT,
        ))
        .map_err(|err| call_failed(admin, &err))?;
    if !reply.status.is_success() {
        return Err(refusal(reply.status, &reply.body, token.is_some()));
    }
    let answer: Option<Value> = serde_json::from_slice(&reply.body).ok();
    match (action, answer) {
        (CanaryAction::Status, Some(status)) => print!("{}", render_canary(&status)),
        (CanaryAction::Status, None) => {
            return Err(format!(
                "{url} answered {} with something that is not JSON: {}",
                reply.status,
                excerpt(&reply.body)
            ))
        }
        // The answer to an order is the canary's new status, when the admin port sends it.
        (order, Some(status)) if status.get("enabled").is_some() => {
            print!("{}: accepted\n\n{}", order.as_str(), render_canary(&status));
        }
        (order, _) => println!("{}: accepted", order.as_str()),
    }
    Ok(())
}

fn read_token(path: &Path) -> Result<String, String> {
    let token = std::fs::read_to_string(path)
        .map_err(|err| format!("cannot read the token file {}: {err}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("the token file {} is empty", path.display()));
    }
    Ok(token.to_owned())
}

/// `{admin}{path}`; an admin given as the config's bare `IP:port` is taken as `http://`.
fn admin_url(admin: &str, path: &str) -> Result<Uri, String> {
    let admin = admin.trim();
    let base = if admin.contains("://") {
        admin.to_owned()
    } else {
        format!("http://{admin}")
    };
    format!("{}{path}", base.trim_end_matches('/'))
        .parse()
        .map_err(|err| {
            format!(
                "--admin {admin:?} is not a URL ({err}); expected one like http://127.0.0.1:9090"
            )
        })
}

fn call_failed(admin: &str, err: &CallError) -> String {
    match err {
        CallError::Connect { source, .. } => format!(
            "cannot reach the admin port at {admin}: {source} (is abproxy running, and is this \
             its [server] admin address? Set it with --admin or ABPROXY_ADMIN)"
        ),
        CallError::Timeout(_) => format!("cannot reach the admin port at {admin}: {err}"),
        CallError::InvalidUrl(_) => format!("--admin: {err}"),
        _ => format!("admin port at {admin}: {err}"),
    }
}

/// What to tell the user when the admin port says no: its `{"error": …}` text.
fn refusal(status: StatusCode, body: &[u8], sent_token: bool) -> String {
    let error = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|answer| answer.get("error")?.as_str().map(printable))
        .unwrap_or_else(|| excerpt(body));
    let mut message = if error.is_empty() {
        format!("the admin port answered {status}")
    } else {
        format!("{error} ({status})")
    };
    if status == StatusCode::UNAUTHORIZED && !sent_token {
        message.push_str("; pass the admin token with --token-file FILE");
    }
    message
}

/// The start of a body that is not the JSON expected, to show as is.
fn excerpt(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body).chars().take(300).collect();
    printable(text.trim())
}

/// `text` with control characters (line breaks, terminal escapes) shown as spaces, so
/// whatever the server sends cannot break the table nor the terminal.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The admin port's canary JSON as a few labelled lines and a table of the latest analyses.
/// Missing or odd fields show as `-`: this must never fail on what another version sends.
fn render_canary(status: &Value) -> String {
    if status.get("enabled") == Some(&Value::Bool(false)) {
        return "no canary configured\n".to_owned();
    }
    let field = |pointer: &str| show(status.pointer(pointer));
    let step = match status.get("step") {
        Some(step @ Value::Object(_)) => format!(
            "{} of {} at {} %, {} of {} analyses passed",
            show(step.get("index")),
            show(step.get("of")),
            show(step.get("weight")),
            show(step.get("passed")),
            show(step.get("needed")),
        ),
        other => show(other),
    };
    let labelled = [
        (
            "canary",
            format!("{} (baseline {})", field("/variant"), field("/baseline")),
        ),
        ("state", field("/state")),
        (
            "weight",
            format!("{} % (file: {} %)", field("/weight"), field("/file_weight")),
        ),
        ("step", step),
        (
            "failures",
            format!(
                "{} of {} consecutive",
                field("/consecutive_failures"),
                field("/failures_to_rollback")
            ),
        ),
        ("reason", field("/reason")),
        ("interval", field("/interval")),
        ("started", field("/run_started")),
    ];
    let mut lines: Vec<String> = labelled
        .iter()
        .map(|(label, value)| format!("{label:<12}{value}"))
        .collect();
    lines.push(String::new());

    let mut analyses: Vec<&Value> = status
        .get("last_checks")
        .and_then(Value::as_array)
        .map(|checks| checks.iter().collect())
        .unwrap_or_default();
    // Newest first whatever order the server keeps them in; RFC 3339 UTC sorts as text.
    analyses.sort_by(|a, b| {
        let at = |analysis: &Value| {
            analysis
                .get("at")
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        at(b).cmp(&at(a))
    });
    let Some(newest) = analyses.first() else {
        lines.push("no analyses yet".to_owned());
        return lines.join("\n") + "\n";
    };
    let counts = |analysis: &Value, arm: &str| {
        let arm = analysis.get(arm);
        match (
            arm.and_then(|a| a.get("failures")),
            arm.and_then(|a| a.get("requests")),
        ) {
            (None, None) => "-".to_owned(),
            (failures, requests) => format!("{}/{}", show(failures), show(requests)),
        }
    };
    let rows: Vec<Vec<String>> = analyses
        .iter()
        .take(CHECKS_SHOWN)
        .map(|analysis| {
            vec![
                show(analysis.get("at")),
                show(analysis.get("verdict")),
                counts(analysis, "canary"),
                counts(analysis, "baseline"),
                show(analysis.get("summary")),
            ]
        })
        .collect();
    lines.extend(table(
        &["TIME", "VERDICT", "CANARY", "BASELINE", "SUMMARY"],
        &rows,
    ));

    // Why the latest verdict is what it is.
    let checks: Vec<Vec<String>> = newest
        .get("checks")
        .and_then(Value::as_array)
        .map(|checks| {
            checks
                .iter()
                .map(|check| {
                    vec![
                        show(check.get("check")),
                        show(check.get("outcome")),
                        show(check.get("detail")),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !checks.is_empty() {
        lines.push(String::new());
        lines.push(format!("latest analysis ({}):", show(newest.get("at"))));
        lines.extend(
            table(&[], &checks)
                .into_iter()
                .map(|line| format!("  {line}")),
        );
    }
    lines.join("\n") + "\n"
}

/// A JSON value as one short piece of text; `-` for missing, null and empty.
fn show(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) if text.trim().is_empty() => "-".to_owned(),
        Some(Value::String(text)) => printable(text),
        // 5.0 as `5`, 2.5 as `2.5`.
        Some(Value::Number(number)) => number
            .as_f64()
            .map_or_else(|| number.to_string(), |n| n.to_string()),
        Some(other) => printable(&other.to_string()),
    }
}

/// Left-aligned columns two spaces apart, the last one not padded; `header` may be empty.
fn table(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let columns = rows
        .iter()
        .map(Vec::len)
        .chain([header.len()])
        .max()
        .unwrap_or(0);
    let width = |column: usize| {
        rows.iter()
            .filter_map(|row| row.get(column))
            .map(|cell| cell.chars().count())
            .chain(header.get(column).map(|title| title.len()))
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..columns).map(width).collect();
    let line = |cells: Vec<&str>| {
        let mut line = String::new();
        for (column, cell) in cells.iter().enumerate() {
            if column > 0 {
                line.push_str("  ");
            }
            let pad = widths
                .get(column)
                .copied()
                .unwrap_or(0)
                .saturating_sub(cell.chars().count());
            line.push_str(cell);
            line.extend(std::iter::repeat(' ').take(pad));
        }
        line.trim_end().to_owned()
    };
    let header = (!header.is_empty()).then(|| line(header.to_vec()));
    header
        .into_iter()
        .chain(
            rows.iter()
                .map(|row| line(row.iter().map(String::as_str).collect())),
        )
        .collect()
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The admin port's answer in the middle of a ramp, one failed analysis in.
    fn running() -> Value {
        json!({
            "enabled": true, "variant": "treatment", "baseline": "control",
            "state": "running", "reason": "ramping: step 2 of 5 passed 3 of 5 analyses",
            "weight": 5.0, "file_weight": 20.0,
            "step": {"index": 2, "of": 5, "weight": 5.0, "passed": 3, "needed": 5},
            "consecutive_failures": 1, "failures_to_rollback": 3, "interval": "1m",
            "run_started": "2026-11-30T16:00:00Z",
            "last_checks": [
                {"at": "2026-11-30T16:02:00Z", "verdict": "pass", "summary": "error rate 0.8 % vs control 0.9 %",
                 "canary": {"requests": 395, "failures": 3}, "baseline": {"requests": 1580, "failures": 14},
                 "checks": [{"check": "error_rate", "outcome": "pass", "detail": "0.8 % ≤ ceiling 2 %"}]},
                {"at": "2026-11-30T16:03:00Z", "verdict": "fail", "summary": "error rate 4.1 % vs control 0.9 %, p = 0.0003",
                 "canary": {"requests": 410, "failures": 17}, "baseline": {"requests": 1600, "failures": 14},
                 "checks": [
                     {"check": "error_rate", "outcome": "fail", "detail": "4.1 % > ceiling 2 %"},
                     {"check": "p99", "outcome": "pass", "detail": "31 ms ≤ 50 ms"}
                 ]}
            ]
        })
    }

    #[test]
    fn a_running_canary_reads_as_labelled_lines_and_its_analyses_newest_first() {
        let expected = "\
canary      treatment (baseline control)
state       running
weight      5 % (file: 20 %)
step        2 of 5 at 5 %, 3 of 5 analyses passed
failures    1 of 3 consecutive
reason      ramping: step 2 of 5 passed 3 of 5 analyses
interval    1m
started     2026-11-30T16:00:00Z

TIME                  VERDICT  CANARY  BASELINE  SUMMARY
2026-11-30T16:03:00Z  fail     17/410  14/1600   error rate 4.1 % vs control 0.9 %, p = 0.0003
2026-11-30T16:02:00Z  pass     3/395   14/1580   error rate 0.8 % vs control 0.9 %

latest analysis (2026-11-30T16:03:00Z):
  error_rate  fail  4.1 % > ceiling 2 %
  p99         pass  31 ms ≤ 50 ms
";
        assert_eq!(render_canary(&running()), expected);
    }

    #[test]
    fn no_canary_section_says_so() {
        assert_eq!(
            render_canary(&json!({"enabled": false})),
            "no canary configured\n"
        );
    }

    #[test]
    fn a_canary_without_ramp_reason_or_analyses_shows_dashes() {
        let mut status = running();
        status["step"] = Value::Null;
        status["reason"] = Value::Null;
        status["last_checks"] = json!([]);
        let text = render_canary(&status);
        assert!(text.contains("\nstep        -\n"), "{text}");
        assert!(text.contains("\nreason      -\n"), "{text}");
        assert!(text.ends_with("\n\nno analyses yet\n"), "{text}");
    }

    #[test]
    fn at_most_ten_analyses_are_listed_newest_first() {
        let mut status = running();
        status["last_checks"] = (0..12)
            .map(
                |minute| json!({"at": format!("2026-11-30T16:{minute:02}:00Z"), "verdict": "pass"}),
            )
            .collect();
        let text = render_canary(&status);
        let times: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("2026-"))
            .filter_map(|line| line.split_whitespace().next())
            .collect();
        let expected: Vec<String> = (2..12)
            .rev()
            .map(|minute| format!("2026-11-30T16:{minute:02}:00Z"))
            .collect();
        assert_eq!(times, expected);
    }

    #[test]
    fn odd_json_never_panics_and_shows_dashes() {
        for odd in [
            json!(null),
            json!(42),
            json!("running"),
            json!([1, 2]),
            json!({}),
            json!({"enabled": "yes", "weight": "heavy", "step": {"index": [1]}, "reason": "",
                   "last_checks": [null, 7, {"at": 5, "canary": "x", "baseline": {"failures": 2},
                                             "checks": [null, {"check": {"deep": true}}]}]}),
            json!({"last_checks": {"not": "a list"}, "step": 3}),
        ] {
            let text = render_canary(&odd);
            assert!(
                text.starts_with("canary      - (baseline -)\n"),
                "{odd}: {text}"
            );
        }
        let text =
            render_canary(&json!({"last_checks": [{"at": "t", "baseline": {"failures": 2}}]}));
        assert!(text.contains("t     -        -       2/-"), "{text}");
    }

    #[test]
    fn server_text_cannot_break_the_table() {
        let mut status = running();
        status["reason"] = json!("line one\nline two\u{1b}[2J");
        let text = render_canary(&status);
        assert!(
            text.contains("reason      line one line two [2J\n"),
            "{text}"
        );
    }

    #[test]
    fn the_admin_url_takes_the_configs_bare_address_and_keeps_a_prefix() {
        let url = |admin| admin_url(admin, "/canary").map(|url| url.to_string());
        assert_eq!(
            url("127.0.0.1:9090"),
            Ok("http://127.0.0.1:9090/canary".into())
        );
        assert_eq!(
            url("http://127.0.0.1:9090/"),
            Ok("http://127.0.0.1:9090/canary".into())
        );
        assert_eq!(
            url("http://ops/abproxy/"),
            Ok("http://ops/abproxy/canary".into())
        );
        assert!(url("http://bad host").is_err());
    }

    #[test]
    fn a_refusal_shows_the_servers_error_text() {
        assert_eq!(
            refusal(
                StatusCode::CONFLICT,
                br#"{"error": "the canary is not paused"}"#,
                true
            ),
            "the canary is not paused (409 Conflict)"
        );
        assert_eq!(
            refusal(StatusCode::NOT_FOUND, b"not found: try /metrics\n", false),
            "not found: try /metrics (404 Not Found)"
        );
        assert_eq!(
            refusal(StatusCode::BAD_GATEWAY, b"", false),
            "the admin port answered 502 Bad Gateway"
        );
        let unauthorized = refusal(
            StatusCode::UNAUTHORIZED,
            br#"{"error": "token required"}"#,
            false,
        );
        assert!(
            unauthorized.ends_with("pass the admin token with --token-file FILE"),
            "{unauthorized}"
        );
    }

    #[test]
    fn a_token_file_is_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").expect("write");
        assert_eq!(read_token(&path), Ok("s3cret".into()));
        std::fs::write(&path, "\n").expect("write");
        assert!(read_token(&path).expect_err("empty").contains("is empty"));
        assert!(read_token(&dir.path().join("missing"))
            .expect_err("missing")
            .contains("cannot read the token file"));
    }

    #[test]
    fn one_cpu_gets_one_thread_and_more_get_one_each() {
        assert_eq!(worker_threads(None, 1), Ok(1));
        assert_eq!(worker_threads(None, 8), Ok(8));
    }

    #[test]
    fn threads_overrides_the_cpu_count() {
        assert_eq!(worker_threads(Some(1), 8), Ok(1));
        assert_eq!(worker_threads(Some(4), 1), Ok(4));
        assert!(worker_threads(Some(0), 4).is_err());
    }
}
