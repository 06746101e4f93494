//! Real servers for integration tests: model backends, an in-process abproxy, and a client.
//!
//! Everything binds 127.0.0.1:0, and readiness is the bound socket itself: no fixed ports,
//! no sleeps.
// Each test binary uses its own subset of the harness.
#![allow(dead_code, unused_imports)]

pub mod backend;
pub mod browser;
pub mod client;
pub mod config_file;
pub mod grpc;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod stream;
pub mod tls;

pub use backend::{Backend, Model, Received};
pub use client::{Client, Reply};
pub use config_file::{ConfigFile, Edit};
pub use grpc::{GrpcBackend, GrpcClient};
pub use prometheus::Prometheus;
pub use proxy::Proxy;

use sha2::{Digest, Sha256};

/// The spec's rule, written independently of abproxy's own code: the 256-bit digest as
/// eight 32-bit limbs, each weighted by 2^(32·k) mod n.
pub fn spec_bucket(salt: &str, user_id: &str, buckets: u32) -> u32 {
    let digest = Sha256::digest(format!("{salt}{user_id}").as_bytes());
    let n = u128::from(buckets);
    let mut weight = 1u128;
    let mut total = 0u128;
    for limb in digest.chunks(4).rev() {
        let value = u128::from(u32::from_be_bytes([limb[0], limb[1], limb[2], limb[3]]));
        total = (total + value % n * weight) % n;
        weight = weight * (1u128 << 32) % n;
    }
    total as u32
}

/// `[[variant]]` tables for `(name, backend, weight)` triples.
pub fn variants(arms: &[(&str, &Backend, f64)]) -> String {
    arms.iter()
        .map(|(name, backend, weight)| {
            format!(
                "[[variant]]\nname = \"{name}\"\nupstream = \"{}\"\nweight = {weight}\n\n",
                backend.url()
            )
        })
        .collect()
}

/// Fails the test unless `promtool check metrics` accepts `text`.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let output = promtool.wait_with_output().expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool rejected /metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
