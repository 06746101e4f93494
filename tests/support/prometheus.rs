//! A real Prometheus server (Debian's `prometheus` package) on loopback, scraping the test's
//! abproxy replicas every second: what the fleet-wide canary guard reads.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::client::Client;
use super::proxy::eventually;

/// A Prometheus child process with its config and storage in a temp directory; killed when
/// dropped, whether the test passed or failed.
pub struct Prometheus {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// A free loopback address for a Prometheus started later: the replicas name it in their
    /// config before it runs, and Prometheus names their admin ports in its own.
    pub fn reserve_addr() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    }

    /// Starts Prometheus on `addr`, scraping `targets` (admin ports) every second as job
    /// `abproxy`, and waits until it has scraped every one of them.
    pub async fn start(addr: SocketAddr, targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: abproxy\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("config written");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus runs (Debian package `prometheus`; .ci/run installs it)");
        let mut prometheus = Prometheus {
            addr,
            child: Some(child),
            dir,
        };
        let client = Client::new(addr);
        let expected = targets.len() as f64;
        eventually(Duration::from_secs(30), || {
            let exited = prometheus
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "prometheus exited ({status}):\n{}",
                    log_of(prometheus.dir.path())
                );
            }
            let client = client.clone();
            async move {
                query_with(&client, "sum(up{job=\"abproxy\"})")
                    .await
                    .and_then(|result| scalar(&result))
                    == Some(expected)
            }
        })
        .await;
        prometheus
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the server, as a crash or a network partition would look to the replicas.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What Prometheus logged, for a failing test's message.
    pub fn log(&self) -> String {
        log_of(self.dir.path())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
}

/// The result of an instant query, or `None` if Prometheus does not answer it.
async fn query_with(client: &Client, promql: &str) -> Option<serde_json::Value> {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", promql)
        .finish();
    let reply = client
        .get(&format!("/api/v1/query?{query}"))
        .try_send()
        .await
        .ok()?;
    let body: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
    (body["status"] == "success").then(|| body["data"]["result"].clone())
}

/// The value of a one-sample vector.
fn scalar(result: &serde_json::Value) -> Option<f64> {
    result[0]["value"][1].as_str()?.parse().ok()
}
