//! A config file in a temp directory, rewritten the ways real deployments rewrite it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// How a change reaches the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// Write a temp file beside it and rename it over the old one (most editors, `kubectl cp`).
    Rename,
    /// Truncate and write in place, in two pieces.
    InPlace,
    /// Kubernetes ConfigMap: a new timestamped directory, then `..data` swapped to it.
    ConfigMapSwap,
}

pub struct ConfigFile {
    dir: tempfile::TempDir,
    /// The path abproxy is given.
    pub path: PathBuf,
    config_map: bool,
    revision: AtomicUsize,
}

const NAME: &str = "abproxy.toml";

impl ConfigFile {
    /// A plain file.
    pub fn plain(text: &str) -> ConfigFile {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(NAME);
        fs::write(&path, text).expect("write config");
        ConfigFile {
            dir,
            path,
            config_map: false,
            revision: AtomicUsize::new(0),
        }
    }

    /// The layout a ConfigMap volume has: `abproxy.toml -> ..data/abproxy.toml`,
    /// `..data -> ..<revision>`.
    pub fn config_map(text: &str) -> ConfigFile {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(NAME);
        let file = ConfigFile {
            dir,
            path,
            config_map: true,
            revision: AtomicUsize::new(0),
        };
        file.swap_data(text);
        symlink(Path::new("..data").join(NAME), &file.path);
        file
    }

    pub fn write(&self, text: &str, edit: Edit) {
        match edit {
            Edit::Rename => {
                let target = fs::canonicalize(&self.path).expect("config resolves");
                let temp = target.with_extension("toml.tmp");
                fs::write(&temp, text).expect("write temp");
                fs::rename(&temp, &target).expect("rename over config");
            }
            Edit::InPlace => {
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&self.path)
                    .expect("open config");
                let (first, second) = text.split_at(text.len() / 2);
                file.write_all(first.as_bytes()).expect("write");
                file.flush().expect("flush");
                file.write_all(second.as_bytes()).expect("write");
            }
            Edit::ConfigMapSwap => {
                assert!(self.config_map, "ConfigMap swaps need the ConfigMap layout");
                self.swap_data(text);
            }
        }
    }

    fn swap_data(&self, text: &str) {
        let revision = self.revision.fetch_add(1, Ordering::SeqCst);
        let name = format!("..2026_11_25_00_00_{revision:02}.000000001");
        let data_dir = self.dir.path().join(&name);
        fs::create_dir(&data_dir).expect("revision dir");
        fs::write(data_dir.join(NAME), text).expect("write revision");
        let temp_link = self.dir.path().join("..data_tmp");
        symlink(Path::new(&name), &temp_link);
        let data = self.dir.path().join("..data");
        let previous = fs::read_link(&data).ok();
        fs::rename(&temp_link, &data).expect("swap ..data");
        if let Some(previous) = previous {
            fs::remove_dir_all(self.dir.path().join(previous)).expect("remove old revision");
        }
    }
}

fn symlink(target: impl AsRef<Path>, link: &Path) {
    std::os::unix::fs::symlink(target, link).expect("symlink");
}
