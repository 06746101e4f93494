//! Live config: the current generation, and the watcher that replaces it when the file changes.
//!
//! A reload reads, validates and builds a whole new `Generation` off the request path, then
//! swaps it in with one atomic store. Requests hold the generation they started with, so a
//! swap never mixes two configs and never drops a request.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::canary::Guard;
use crate::config::{Config, ConfigError, ConfigFile, Loaded};
use crate::metrics::{Metrics, ProcessMetrics};
use crate::route::Generation;
use crate::shadow::Background;

/// Quiet time after the last file event before the file is read: editors and ConfigMap
/// swaps produce bursts of events for one logical change.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(100);
/// A file that fails to parse right after an event may be half-written; a follow-up event
/// within this window retries it before the failure is reported.
pub(crate) const SETTLE: Duration = Duration::from_millis(300);

/// Owns the live generation and every change made to it.
pub struct Reloader {
    path: PathBuf,
    current: Arc<ArcSwap<Generation>>,
    metrics: Metrics,
    background: Background,
    guard: Arc<Guard>,
    process: ProcessMetrics,
    status: Mutex<ReloadStatus>,
    /// Reloads from the watcher and SIGHUP run one at a time.
    serial: tokio::sync::Mutex<()>,
    /// Ticks when a reload of the file is applied, for what follows the file beside the
    /// request path (the listener's certificates).
    applied: tokio::sync::watch::Sender<u64>,
}

/// What `/status` reports about reloads.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub last_error: Option<ReloadFailure>,
    /// Changed settings that only take effect after a restart (listen addresses).
    pub restart_required: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadFailure {
    pub error: String,
    /// SHA-256 of the rejected file, so operators can tell which revision failed.
    pub sha256: Option<String>,
    #[serde(with = "rfc3339")]
    pub at: SystemTime,
}

/// What one reload attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied { generation: u64 },
    Unchanged,
    Rejected,
}

impl Reloader {
    /// Serves `loaded`, read from `path`, as generation 1.
    pub fn new(
        path: &Path,
        mut loaded: Loaded,
        metrics: &Metrics,
        background: &Background,
        guard: Arc<Guard>,
    ) -> Reloader {
        guard.adopt(&mut loaded.config);
        let generation = Generation::build(1, loaded, None, metrics, background, &guard);
        let process = metrics.process();
        process.generation.set(1.0);
        Reloader {
            path: path.to_path_buf(),
            current: Arc::new(ArcSwap::from_pointee(generation)),
            metrics: metrics.clone(),
            background: background.clone(),
            guard,
            process,
            status: Mutex::new(ReloadStatus::default()),
            serial: tokio::sync::Mutex::new(()),
            applied: tokio::sync::watch::Sender::new(1),
        }
    }

    /// Ticks with the generation number each time a changed file is applied.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Builds the next generation from the serving config with the canary guard's current
    /// weight: how a ramp, a rollback or an operator's command takes effect.
    pub async fn rebuild(&self) -> u64 {
        let _serial = self.serial.lock().await;
        let old = self.current.load_full();
        let mut config = old.config.clone();
        self.guard.apply(&mut config);
        let loaded = Loaded {
            config,
            sha256: old.sha256.clone(),
        };
        let number = old.number + 1;
        let generation = Generation::build(
            number,
            loaded,
            Some(&old),
            &self.metrics,
            &self.background,
            &self.guard,
        );
        tracing::info!(generation = number, weights = %weights(&generation), "canary weight applied");
        self.current.store(Arc::new(generation));
        self.process.generation.set(number as f64);
        number
    }

    /// The cell the request path loads from.
    pub fn current(&self) -> &Arc<ArcSwap<Generation>> {
        &self.current
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the file and swaps in a new generation if it changed and is valid.
    pub async fn reload(&self) -> Outcome {
        let _serial = self.serial.lock().await;
        match self.try_reload().await {
            Ok(outcome) => outcome,
            Err(rejected) => self.reject(rejected),
        }
    }

    /// Like `reload`, for a file that may still be being written: a failure is reported
    /// only once no further change arrives within `SETTLE`, so a half-written file is
    /// retried rather than counted.
    async fn reload_settled(&self, changed: &Notify) -> Outcome {
        let _serial = self.serial.lock().await;
        loop {
            match self.try_reload().await {
                Ok(outcome) => return outcome,
                Err(rejected) => {
                    if tokio::time::timeout(SETTLE, changed.notified())
                        .await
                        .is_err()
                    {
                        return self.reject(rejected);
                    }
                    debounce(changed, DEBOUNCE).await;
                }
            }
        }
    }

    fn reject(&self, (error, sha256): (ConfigError, Option<String>)) -> Outcome {
        tracing::error!(%error, "config rejected; still serving the last good config");
        self.process.reloads_error.increment(1);
        self.with_status(|status| {
            status.last_error = Some(ReloadFailure {
                error: error.to_string(),
                sha256,
                at: SystemTime::now(),
            });
        });
        Outcome::Rejected
    }

    async fn try_reload(&self) -> Result<Outcome, (ConfigError, Option<String>)> {
        let path = self.path.clone();
        let file = tokio::task::spawn_blocking(move || ConfigFile::read(&path))
            .await
            .unwrap_or_else(|join| Err(join_error(&self.path, join)))
            .map_err(|err| (err, None))?;
        let old = self.current.load_full();
        if file.sha256 == old.sha256 {
            // Back to the file that is serving: an earlier rejection no longer applies.
            self.with_status(|status| status.last_error = None);
            return Ok(Outcome::Unchanged);
        }
        let already_rejected = self.status().last_error.and_then(|failure| failure.sha256);
        if already_rejected.as_deref() == Some(file.sha256.as_str()) {
            // The same bad bytes again (a touch, an event from a sibling file): counted once.
            return Ok(Outcome::Unchanged);
        }
        let sha256 = file.sha256.clone();
        let loaded = file.parse(&self.path).map_err(|err| (err, Some(sha256)))?;
        let restart_required = restart_only_changes(&old.config, &loaded.config);
        for setting in &restart_required {
            tracing::warn!(%setting, "changed in the file but only takes effect after a restart");
        }
        let mut next = loaded;
        // Listeners stay bound where they are; keep the running values so /status is truthful.
        next.config.server.listen = old.config.server.listen;
        next.config.server.admin = old.config.server.admin;
        next.config.server.listen_plain = old.config.server.listen_plain;
        if next.config.server.tls.is_some() != old.config.server.tls.is_some() {
            // Whether `listen` speaks TLS is fixed when it is bound; new certificate paths
            // are not, and are loaded by the listener's certificate watcher.
            next.config.server.tls = old.config.server.tls.clone();
        }
        self.guard.adopt(&mut next.config);
        let number = old.number + 1;
        let generation = Generation::build(
            number,
            next,
            Some(&old),
            &self.metrics,
            &self.background,
            &self.guard,
        );
        tracing::info!(
            generation = number,
            old = %weights(&old), new = %weights(&generation),
            "config reloaded"
        );
        self.current.store(Arc::new(generation));
        self.process.reloads_ok.increment(1);
        self.process.generation.set(number as f64);
        self.applied.send_replace(number);
        self.with_status(|status| {
            status.last_error = None;
            status.restart_required = restart_required;
        });
        Ok(Outcome::Applied { generation: number })
    }

    fn with_status(&self, change: impl FnOnce(&mut ReloadStatus)) {
        change(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Watches the config's directory (and SIGHUP) until `shutdown`, reloading on change.
    ///
    /// The directory, not the file: editors replace the file by rename and Kubernetes swaps a
    /// `..data` symlink, and a watch on the old inode would see neither. When the file is a
    /// symlink, the directory it resolves to is watched as well, so in-place edits of the
    /// target are seen; that second watch follows the link after every change.
    ///
    /// The watches are in place when this returns, so no edit made after it is missed; the
    /// returned future serves them until `shutdown`.
    pub fn watch(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<impl std::future::Future<Output = ()>, notify::Error> {
        let changed = Arc::new(Notify::new());
        let mut watch = FileWatch::start(&self.path, changed.clone())?;
        let mut hangup = hangup_signal();
        Ok(async move {
            loop {
                tokio::select! {
                    () = changed.notified() => {
                        debounce(&changed, DEBOUNCE).await;
                        self.reload_settled(&changed).await;
                    }
                    Some(()) = recv_signal(&mut hangup) => {
                        tracing::info!("SIGHUP: re-reading config");
                        self.reload().await;
                    }
                    () = shutdown.cancelled() => return,
                }
                watch.follow_symlink(&self.path);
            }
        })
    }
}

/// The inotify (or platform) watches behind `Reloader::watch`.
struct FileWatch {
    watcher: notify::RecommendedWatcher,
    /// The directory the config symlink currently resolves into, when that is elsewhere.
    target_dir: Option<PathBuf>,
    config_dir: PathBuf,
}

impl FileWatch {
    fn start(path: &Path, changed: Arc<Notify>) -> Result<FileWatch, notify::Error> {
        let config_dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = path.file_name().map(ToOwned::to_owned);
        let watched_dir = config_dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if matches!(event.kind, EventKind::Access(_)) {
                    return;
                }
                let relevant = event.paths.iter().any(|path| {
                    let name = path.file_name();
                    // In the config's own directory only the file and Kubernetes' `..data`
                    // machinery matter; in a symlink's target directory, everything does.
                    path.parent() != Some(watched_dir.as_path())
                        || name == file_name.as_deref()
                        || name.is_some_and(|name| name.to_string_lossy().starts_with(".."))
                });
                if relevant {
                    changed.notify_one();
                }
            })?;
        watcher.watch(&config_dir, RecursiveMode::NonRecursive)?;
        tracing::info!(directory = %config_dir.display(), "watching config for changes");
        let mut watch = FileWatch {
            watcher,
            target_dir: None,
            config_dir,
        };
        watch.follow_symlink(path);
        Ok(watch)
    }

    /// Moves the second watch to wherever the config symlink now points.
    fn follow_symlink(&mut self, path: &Path) {
        let target_dir = std::fs::canonicalize(path)
            .ok()
            .and_then(|target| target.parent().map(Path::to_path_buf))
            .filter(|dir| std::fs::canonicalize(&self.config_dir).ok().as_ref() != Some(dir));
        if target_dir == self.target_dir {
            return;
        }
        if let Some(old) = self.target_dir.take() {
            let _ = self.watcher.unwatch(&old);
        }
        if let Some(dir) = target_dir {
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => self.target_dir = Some(dir),
                Err(err) => {
                    tracing::warn!(directory = %dir.display(), error = %err, "cannot watch symlink target")
                }
            }
        }
    }
}

/// Waits until `quiet` passes with no new notification.
pub(crate) async fn debounce(changed: &Notify, quiet: Duration) {
    while tokio::time::timeout(quiet, changed.notified())
        .await
        .is_ok()
    {}
}

fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    if old.server.listen != new.server.listen {
        changes.push(format!(
            "server.listen {} -> {}",
            old.server.listen, new.server.listen
        ));
    }
    if old.server.listen_plain != new.server.listen_plain {
        let shown = |addr: Option<std::net::SocketAddr>| {
            addr.map_or_else(|| "none".to_owned(), |addr| addr.to_string())
        };
        changes.push(format!(
            "server.listen_plain {} -> {}",
            shown(old.server.listen_plain),
            shown(new.server.listen_plain)
        ));
    }
    if old.server.tls.is_some() != new.server.tls.is_some() {
        let state = |tls: &Option<_>| if tls.is_some() { "on" } else { "off" };
        changes.push(format!(
            "server.tls {} -> {}",
            state(&old.server.tls),
            state(&new.server.tls)
        ));
    }
    if old.metrics.prediction_buckets != new.metrics.prediction_buckets {
        changes.push("metrics.prediction_buckets".to_owned());
    }
    if old.server.admin != new.server.admin {
        changes.push(format!(
            "server.admin {} -> {}",
            old.server.admin, new.server.admin
        ));
    }
    changes
}

fn weights(generation: &Generation) -> String {
    let parts: Vec<String> = generation
        .config
        .variants
        .iter()
        .map(|variant| format!("{}={}", variant.name, variant.weight))
        .collect();
    parts.join(",")
}

fn join_error(path: &Path, join: tokio::task::JoinError) -> ConfigError {
    ConfigError::Read {
        path: path.to_path_buf(),
        source: std::io::Error::other(join),
    }
}

#[cfg(unix)]
fn hangup_signal() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

#[cfg(unix)]
async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Option<()> {
    None
}

#[cfg(not(unix))]
async fn recv_signal(_: &mut Option<()>) -> Option<()> {
    std::future::pending().await
}

mod rfc3339 {
    pub fn serialize<S: serde::Serializer>(
        at: &std::time::SystemTime,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_seconds(*at))
    }
}
