//! One running abproxy: both listeners, the live config and the background tasks, wired
//! together with an explicit shutdown order.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, Health};
use crate::canary::Guard;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::proxy::{self, Proxy};
use crate::reload::Reloader;
use crate::shadow::Background;
use crate::tls::{Terminator, TlsError};

/// Histogram samples are folded into buckets this often; until then each one is held in
/// memory (16 bytes), so at 50,000 requests a second every second costs 0.8 MB more.
const METRICS_UPKEEP: Duration = Duration::from_secs(1);
/// How long shutdown waits for mirrors in flight and shadow logs to flush.
const SHADOW_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch the config file: {0}")]
    Watch(#[from] notify::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot watch the TLS certificate files: {0}")]
    TlsWatch(#[source] notify::Error),
}

/// A proxy whose config is loaded and whose listeners are bound, ready to `run`.
pub struct Server {
    proxy_listener: TcpListener,
    /// `listen_plain`: plain HTTP beside a TLS `listen`.
    plain_listener: Option<TcpListener>,
    admin_listener: TcpListener,
    /// `[server.tls]`: the certificates `listen` presents.
    tls: Option<Arc<Terminator>>,
    reloader: Arc<Reloader>,
    metrics: Metrics,
    health: Arc<Health>,
    /// Shadow workers and log writers, stopped after client traffic has drained.
    shadows: Background,
    guard: Arc<Guard>,
    /// Stops the canary guard and its webhook with the other background tasks.
    background: CancellationToken,
}

impl Server {
    /// Loads the config at `path` (and its certificates) and binds its `listen`,
    /// `listen_plain` and `admin` addresses.
    pub async fn bind(path: &Path) -> Result<Server, StartError> {
        let loaded = Config::load(path)?;
        let metrics = Metrics::with_prediction_buckets(&loaded.config.metrics.prediction_buckets);
        let shadows = Background::default();
        let background = CancellationToken::new();
        let guard = Arc::new(Guard::new(&metrics, background.clone()));
        let reloader = Arc::new(Reloader::new(
            path,
            loaded,
            &metrics,
            &shadows,
            guard.clone(),
        ));
        let server = reloader.current().load().config.server.clone();
        let tls = server
            .tls
            .as_ref()
            .map(|settings| Terminator::new(settings, &metrics).map(Arc::new))
            .transpose()?;
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let proxy_listener = bind("client traffic", server.listen).await?;
        let plain_listener = match server.listen_plain {
            Some(addr) => Some(bind("plain HTTP beside TLS", addr).await?),
            None => None,
        };
        let admin_listener = bind("the admin port", server.admin).await?;
        Ok(Server {
            proxy_listener,
            plain_listener,
            admin_listener,
            tls,
            reloader,
            metrics,
            health: Arc::new(Health::default()),
            shadows,
            guard,
            background,
        })
    }

    /// The bound client address (useful when the config asked for port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_listener
            .local_addr()
            .unwrap_or_else(|_| self.reloader.current().load().config.server.listen)
    }

    /// The bound `listen_plain` address, when TLS is on and one is configured.
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        let listener = self.plain_listener.as_ref()?;
        listener
            .local_addr()
            .ok()
            .or(self.reloader.current().load().config.server.listen_plain)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .unwrap_or_else(|_| self.reloader.current().load().config.server.admin)
    }

    /// Serves until `shutdown` fires, then drains: `/readyz` turns 503, the client listener
    /// closes, in-flight requests get the grace period, and background tasks stop last.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let (listen, admin_addr) = (self.proxy_addr(), self.admin_addr());
        let listen_plain = self.plain_addr();
        let background = self.background.clone();
        let tasks = TaskTracker::new();

        let watcher = self.reloader.clone().watch(background.clone())?;
        let admin = Arc::new(Admin {
            reloader: self.reloader.clone(),
            listen,
            listen_plain,
            admin: admin_addr,
            tls: self.tls.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            guard: self.guard.clone(),
        });
        tasks.spawn(admin.serve(self.admin_listener, background.clone()));
        tasks.spawn(self.guard.clone().run(self.reloader.clone()));
        tasks.spawn(upkeep(self.metrics.clone(), background.clone()));
        tasks.spawn(watcher);
        if let Some(tls) = &self.tls {
            let reloader = self.reloader.clone();
            let settings = move || reloader.current().load().config.server.tls.clone();
            let watch = tls
                .clone()
                .watch(settings, self.reloader.subscribe(), background.clone())
                .map_err(StartError::TlsWatch)?;
            tasks.spawn(watch);
        }

        let proxy = Arc::new(Proxy::new(self.reloader.current().clone(), &self.metrics));
        let draining = CancellationToken::new();
        {
            let (shutdown, draining, health) =
                (shutdown.clone(), draining.clone(), self.health.clone());
            tasks.spawn(async move {
                shutdown.cancelled().await;
                health.set_draining();
                draining.cancel();
            });
        }
        self.health.set_ready();
        let runtime = tokio::runtime::Handle::current();
        tracing::info!(
            %listen,
            runtime = match runtime.runtime_flavor() {
                tokio::runtime::RuntimeFlavor::CurrentThread => "current-thread",
                _ => "multi-thread",
            },
            workers = runtime.metrics().num_workers(),
            listen_plain = listen_plain.map(tracing::field::display),
            tls = self.tls.is_some(),
            admin = %admin_addr,
            config = %self.reloader.path().display(),
            "abproxy ready"
        );
        let client_traffic = async {
            match self.tls {
                Some(tls) => {
                    proxy::serve_tls(self.proxy_listener, tls, proxy.clone(), draining.clone())
                        .await
                }
                None => proxy::serve(self.proxy_listener, proxy.clone(), draining.clone()).await,
            }
        };
        let plain_traffic = async {
            if let Some(listener) = self.plain_listener {
                proxy::serve(listener, proxy.clone(), draining.clone()).await;
            }
        };
        tokio::join!(client_traffic, plain_traffic);

        // Mirrors in flight finish (each within its shadow timeout); logs flush.
        self.shadows.shutdown(SHADOW_DRAIN).await;
        background.cancel();
        tasks.close();
        tasks.wait().await;
        tracing::info!("shut down");
        Ok(())
    }
}

async fn upkeep(metrics: Metrics, stop: CancellationToken) {
    let mut tick = tokio::time::interval(METRICS_UPKEEP);
    loop {
        tokio::select! {
            _ = tick.tick() => metrics.run_upkeep(),
            () = stop.cancelled() => return,
        }
    }
}
