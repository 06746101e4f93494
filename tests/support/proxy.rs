//! An abproxy running in-process on ephemeral ports, with its config in a temp directory.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use abproxy::server::Server;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::Client;
use super::config_file::{ConfigFile, Edit};

pub struct Proxy {
    pub addr: SocketAddr,
    /// `listen_plain`, when the config has TLS and one.
    pub plain_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub config: ConfigFile,
    pub client: Client,
    pub admin: Client,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// Prepended to every test config: ephemeral ports on loopback.
const SERVER: &str = "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n";

impl Proxy {
    /// Starts abproxy on `config` (everything but `[server]`, which the harness supplies).
    pub async fn start(config: &str) -> Proxy {
        Self::start_with_server("", config).await
    }

    /// Like `start`, with extra `[server]` keys.
    /// One variant, `control`, with all the traffic, on the upstream at `url`.
    pub async fn in_front_of(url: &str) -> Proxy {
        Proxy::start(&format!(
            "[[variant]]\nname = \"control\"\nupstream = \"{url}\"\nweight = 100\n"
        ))
        .await
    }

    pub async fn start_with_server(server_keys: &str, config: &str) -> Proxy {
        Self::start_on(ConfigFile::plain(&format!(
            "{SERVER}{server_keys}\n{config}"
        )))
        .await
    }

    /// Starts abproxy on a prepared config file (which must listen on port 0).
    pub async fn start_on(config: ConfigFile) -> Proxy {
        let server = Server::bind(&config.path)
            .await
            .unwrap_or_else(|err| panic!("proxy starts: {err}"));
        let (addr, admin_addr) = (server.proxy_addr(), server.admin_addr());
        let plain_addr = server.plain_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                server.run(stop).await.expect("proxy runs");
            }
        });
        let proxy = Proxy {
            addr,
            plain_addr,
            admin_addr,
            config,
            client: Client::new(addr),
            admin: Client::new(admin_addr),
            stop,
            task: Some(task),
        };
        // Ready means listening and watching the config: edits from here on are seen.
        eventually(Duration::from_secs(10), || async {
            proxy
                .admin
                .get("/readyz")
                .try_send()
                .await
                .is_ok_and(|reply| reply.status == 200)
        })
        .await;
        proxy
    }

    /// Rewrites the config (keeping the harness's `[server]` section) by `edit`.
    pub fn edit_config(&self, config: &str, edit: Edit) {
        self.config.write(&with_server(config), edit);
    }

    pub async fn metrics(&self) -> String {
        self.admin.get("/metrics").send().await.text()
    }

    /// The value of one sample, e.g. `metric("abproxy_requests_total", &[("variant", "control"), ("code", "200")])`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sample(&self.metrics().await, name, labels)
    }

    /// `abproxy_requests_total` for one variant and status code.
    pub async fn requests(&self, variant: &str, code: &str) -> f64 {
        self.metric(
            "abproxy_requests_total",
            &[("variant", variant), ("code", code)],
        )
        .await
    }

    /// `abproxy_upstream_errors_total` for one variant and kind of failure.
    pub async fn upstream_errors(&self, variant: &str, kind: &str) -> f64 {
        self.metric(
            "abproxy_upstream_errors_total",
            &[("variant", variant), ("kind", kind)],
        )
        .await
    }

    /// `abproxy_variant_weight_percent` for one variant.
    pub async fn weight(&self, variant: &str) -> f64 {
        self.metric("abproxy_variant_weight_percent", &[("variant", variant)])
            .await
    }

    pub async fn status(&self) -> serde_json::Value {
        self.admin.get("/status").send().await.json()
    }

    /// Polls `/metrics` until `abproxy_requests_total` for `variant` and `code` reaches `count`.
    pub async fn wait_for_requests(&self, variant: &str, code: &str, count: f64) {
        eventually(Duration::from_secs(5), || async {
            self.requests(variant, code).await == count
        })
        .await;
    }

    /// Polls `/status` until the generation reaches `generation`.
    pub async fn wait_for_generation(&self, generation: u64) {
        eventually(Duration::from_secs(10), || async {
            self.status().await["generation"].as_u64() >= Some(generation)
        })
        .await;
    }

    /// Stops the proxy and waits for it to drain.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("proxy task");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `config` with the harness's `[server]` section: ephemeral loopback ports.
pub fn with_server(config: &str) -> String {
    format!("{SERVER}\n{config}")
}

/// Finds a sample's value in Prometheus text; 0 when absent (a counter never incremented).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, value)| value.parse::<f64>().expect("numeric sample"))
        .sum()
}

/// Polls `condition` until it holds, failing the test after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
