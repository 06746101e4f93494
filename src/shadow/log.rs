//! The shadow log: one JSON line per mirrored request, written off the request path.
//!
//! Shadow workers hand lines to a bounded queue and never wait on disk: when the writer
//! falls behind, lines are dropped and counted. The writer rotates by size and flushes
//! whenever it runs dry and on shutdown.

use std::path::{Path, PathBuf};

use metrics::Counter;
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use super::Background;

/// Lines waiting for the writer, at most.
const QUEUE: usize = 8192;

pub struct ShadowLog {
    path: PathBuf,
    max_size: u64,
    keep: usize,
    lines: mpsc::Sender<Vec<u8>>,
    dropped: Counter,
}

impl ShadowLog {
    /// Opens (appending to) `path` and starts its writer.
    pub fn open(
        path: &Path,
        max_size: u64,
        keep: usize,
        dropped: Counter,
        background: &Background,
    ) -> ShadowLog {
        let (lines, queue) = mpsc::channel(QUEUE);
        let writer = Writer {
            path: path.to_path_buf(),
            max_size,
            keep,
            file: None,
            size: 0,
        };
        background
            .writers
            .spawn(writer.run(queue, background.stop_writers.clone()));
        ShadowLog {
            path: path.to_path_buf(),
            max_size,
            keep,
            lines,
            dropped,
        }
    }

    /// Whether this log can be kept across a reload for a shadow with these settings.
    pub fn is_for(&self, path: &Path, max_size: u64, keep: usize) -> bool {
        self.path == path && self.max_size == max_size && self.keep == keep
    }

    /// Queues one line (without its newline); drops it when the writer is behind.
    pub fn write(&self, line: Vec<u8>) {
        if self.lines.try_send(line).is_err() {
            self.dropped.increment(1);
        }
    }
}

struct Writer {
    path: PathBuf,
    max_size: u64,
    keep: usize,
    file: Option<BufWriter<File>>,
    size: u64,
}

impl Writer {
    async fn run(
        mut self,
        mut queue: mpsc::Receiver<Vec<u8>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let line = tokio::select! {
                line = queue.recv() => line,
                () = stop.cancelled() => None,
            };
            let Some(line) = line else { break };
            self.write(&line).await;
            if queue.is_empty() {
                self.flush().await;
            }
        }
        // Shutdown or the last shadow using this log is gone: write what is queued, then flush.
        while let Ok(line) = queue.try_recv() {
            self.write(&line).await;
        }
        self.flush().await;
    }

    async fn write(&mut self, line: &[u8]) {
        if let Err(err) = self.try_write(line).await {
            tracing::warn!(log = %self.path.display(), error = %err, "cannot write shadow log line");
            self.file = None;
        }
    }

    async fn try_write(&mut self, line: &[u8]) -> std::io::Result<()> {
        let incoming = line.len() as u64 + 1;
        if self.size > 0 && self.size + incoming > self.max_size {
            self.rotate().await?;
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .await?;
                self.size = file.metadata().await?.len();
                self.file.insert(BufWriter::new(file))
            }
        };
        file.write_all(line).await?;
        file.write_all(b"\n").await?;
        self.size += incoming;
        Ok(())
    }

    /// `log` → `log.1` → … → `log.<keep>`, the oldest falling off the end.
    async fn rotate(&mut self) -> std::io::Result<()> {
        self.flush().await;
        self.file = None;
        for index in (1..self.keep).rev() {
            let from = numbered(&self.path, index);
            if tokio::fs::try_exists(&from).await.unwrap_or(false) {
                tokio::fs::rename(&from, numbered(&self.path, index + 1)).await?;
            }
        }
        tokio::fs::rename(&self.path, numbered(&self.path, 1)).await?;
        self.size = 0;
        Ok(())
    }

    async fn flush(&mut self) {
        if let Some(file) = &mut self.file {
            if let Err(err) = file.flush().await {
                tracing::warn!(log = %self.path.display(), error = %err, "cannot flush shadow log");
            }
        }
    }
}

fn numbered(path: &Path, index: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_flushed_and_rotated_at_the_size_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shadow.jsonl");
        let background = Background::default();
        let log = ShadowLog::open(&path, 1000, 2, Counter::noop(), &background);
        for n in 0..50 {
            log.write(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(80)).into_bytes());
        }
        background.shutdown(std::time::Duration::from_secs(5)).await;

        let current = std::fs::read_to_string(&path).expect("current log");
        let first = std::fs::read_to_string(numbered(&path, 1)).expect("rotated log");
        assert!(std::fs::metadata(numbered(&path, 2)).is_ok());
        assert!(
            std::fs::metadata(numbered(&path, 3)).is_err(),
            "only `keep` rotated files"
        );
        for file in [&current, &first] {
            assert!(file.len() <= 1000);
            for line in file.lines() {
                serde_json::from_str::<serde_json::Value>(line).expect("every line is JSON");
            }
        }
        assert!(current
            .lines()
            .last()
            .is_some_and(|line| line.starts_with("{\"n\":49,")));
    }
}
