//! Re-reads the certificate files when they change, and when a config reload names others.
//!
//! As for the config file, directories are watched, not files: cert-manager and Kubernetes
//! Secret volumes swap a `..data` symlink, and tools replace files by rename, neither of
//! which a watch on the old inode sees. When a path is a symlink, the directory it resolves
//! into is watched too, so in-place writes to the target are seen; the watches follow the
//! links after every change.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Reloaded, Terminator};
use crate::config;
use crate::reload::{debounce, DEBOUNCE, SETTLE};

impl Terminator {
    /// Watches the certificate, key and CA files until `shutdown`, and the live config
    /// through `settings` each time `config_changes` ticks.
    ///
    /// The watches are in place when this returns, so no change made after it is missed.
    pub fn watch(
        self: Arc<Self>,
        settings: impl Fn() -> Option<config::Tls> + Send + 'static,
        mut config_changes: tokio::sync::watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) -> Result<impl std::future::Future<Output = ()>, notify::Error> {
        let changed = Arc::new(Notify::new());
        let mut watch = FileWatch::start(changed.clone())?;
        watch.follow(&paths(&self.settings()))?;
        // A rotation between loading the certificates and these watches would go unseen
        // until the next one: look once now (unchanged files are a digest compare).
        changed.notify_one();
        Ok(async move {
            loop {
                // The files the live config names: after a config reload whose certificates
                // failed to load, fixing those files is what should be seen.
                let wanted = tokio::select! {
                    () = changed.notified() => {
                        debounce(&changed, DEBOUNCE).await;
                        let wanted = settings().unwrap_or_else(|| self.settings());
                        self.reload_settled(&changed, &wanted).await;
                        wanted
                    }
                    Ok(()) = config_changes.changed() => {
                        let wanted = settings().unwrap_or_else(|| self.settings());
                        if wanted != self.settings() {
                            self.reload_settled(&changed, &wanted).await;
                        }
                        wanted
                    }
                    () = shutdown.cancelled() => return,
                };
                if let Err(err) = watch.follow(&paths(&wanted)) {
                    tracing::warn!(error = %err, "cannot watch a TLS certificate directory");
                }
            }
        })
    }

    /// Reloads, reporting a failure only once no further change arrives within `SETTLE`:
    /// a certificate written before its key, or a file caught half-written, is retried
    /// rather than counted.
    async fn reload_settled(self: &Arc<Self>, changed: &Notify, settings: &config::Tls) {
        loop {
            let (this, wanted) = (self.clone(), settings.clone());
            let attempt = tokio::task::spawn_blocking(move || this.try_reload(&wanted)).await;
            let failure = match attempt {
                Ok(Ok(Reloaded::Applied | Reloaded::Unchanged)) => return,
                Ok(Err(failure)) => failure,
                Err(join) => (
                    super::TlsError::Setup(format!("certificate reload failed: {join}")),
                    None,
                ),
            };
            if tokio::time::timeout(SETTLE, changed.notified())
                .await
                .is_err()
            {
                self.reject(failure);
                return;
            }
            debounce(changed, DEBOUNCE).await;
        }
    }
}

/// Every file one `[server.tls]` names.
fn paths(settings: &config::Tls) -> Vec<PathBuf> {
    let mut paths = vec![settings.default.cert.clone(), settings.default.key.clone()];
    for sni in &settings.sni {
        paths.extend([sni.files.cert.clone(), sni.files.key.clone()]);
    }
    paths.extend(settings.client_auth.iter().map(|auth| auth.ca.clone()));
    paths
}

/// The inotify (or platform) watches behind `Terminator::watch`.
struct FileWatch {
    watcher: notify::RecommendedWatcher,
    directories: HashSet<PathBuf>,
    /// The files, as configured and as their symlinks resolve, whose events matter.
    files: Arc<Mutex<HashSet<PathBuf>>>,
}

impl FileWatch {
    fn start(changed: Arc<Notify>) -> Result<FileWatch, notify::Error> {
        let files: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
        let relevant = files.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, EventKind::Access(_)) {
                return;
            }
            let files = relevant.lock().unwrap_or_else(PoisonError::into_inner);
            // The files themselves, and Kubernetes' `..data` machinery; not a shadow log or
            // anything else that shares their directory.
            let matters = event.paths.iter().any(|path| {
                files.contains(path)
                    || path
                        .file_name()
                        .is_some_and(|name| name.to_string_lossy().starts_with(".."))
            });
            if matters {
                changed.notify_one();
            }
        })?;
        Ok(FileWatch {
            watcher,
            directories: HashSet::new(),
            files,
        })
    }

    /// Points the watches at the directories of `paths` and of what they resolve to now.
    fn follow(&mut self, paths: &[PathBuf]) -> Result<(), notify::Error> {
        let mut files = HashSet::new();
        for path in paths {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            if let Ok(target) = std::fs::canonicalize(&path) {
                files.insert(target);
            }
            files.insert(path);
        }
        let directories: HashSet<PathBuf> = files
            .iter()
            .filter_map(|file| file.parent().map(Path::to_path_buf))
            .collect();
        for gone in self.directories.difference(&directories) {
            // Kubernetes deletes an old revision's directory, and its watch with it.
            let _ = self.watcher.unwatch(gone);
        }
        self.directories.retain(|dir| directories.contains(dir));
        *self.files.lock().unwrap_or_else(PoisonError::into_inner) = files;
        let mut result = Ok(());
        for dir in directories {
            if self.directories.contains(&dir) {
                continue;
            }
            // A directory that cannot be watched now is tried again at the next change.
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.directories.insert(dir);
                }
                Err(err) => result = Err(err),
            }
        }
        result
    }
}
