//! `abproxy run` as a child process, for what only a real process shows: signals, exit
//! codes, memory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::process::{Child, Command, Stdio};

/// An abproxy child process that is killed when the test ends, passed or failed.
pub struct Running(Child);

impl Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `abproxy run` and reads the bound addresses from its JSON log.
pub fn spawn_run(config: &str) -> (Running, SocketAddr, SocketAddr) {
    spawn(&["run", "--config", config])
}

/// Starts `abproxy ARGS…` and waits for it to log that it is ready.
pub fn spawn(args: &[&str]) -> (Running, SocketAddr, SocketAddr) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_abproxy"));
    command.args(["--log-format", "json"]).args(args);
    let (child, ready) = spawn_command(command);
    let addr = |key: &str| {
        ready["fields"][key]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("address in log")
    };
    (child, addr("listen"), addr("admin"))
}

/// Starts `command` (an abproxy with `--log-format json`, possibly behind a wrapper such as
/// `taskset`) and returns it with its "abproxy ready" log line.
pub fn spawn_command(mut command: Command) -> (Running, serde_json::Value) {
    let mut child = Running(
        command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("abproxy run starts"),
    );
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .map(|line| serde_json::from_str::<serde_json::Value>(&line).expect("JSON log line"))
        .find(|line| line["fields"]["message"] == "abproxy ready")
        .expect("abproxy logs that it is ready");
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, ready)
}

/// The resident memory of process `pid`, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// Sends `signal` (`TERM`, `HUP`, …) to the child, as an operator's `kill -SIGNAL` would.
pub fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} failed");
}
