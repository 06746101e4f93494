//! Accepts client connections and serves each with HTTP/1.1 or h2c until shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Peer, Proxy};

/// Serves `listener` until `shutdown` fires, then closes it so new connections are refused,
/// and gives open connections up to the configured grace period to finish their requests.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let connections = GracefulShutdown::new();
    // Owns every connection task, so that those still open when the grace period ends are
    // closed rather than left running; finished ones are reaped as the loop goes.
    let mut tasks = JoinSet::new();
    loop {
        let (stream, client) = tokio::select! {
            Some(_) = tasks.join_next() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let (proxy, peer) = (proxy.clone(), Peer::new(client));
        let service = service_fn(move |request| {
            let (proxy, peer) = (proxy.clone(), peer.clone());
            async move { Ok::<_, Infallible>(proxy.handle(request, &peer).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = connections.watch(connection);
        tasks.spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%client, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);

    let grace = proxy.shutdown_grace();
    let open = connections.count();
    tracing::info!(open_connections = open, grace = %humantime::format_duration(grace), "draining");
    if tokio::time::timeout(grace, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period ended with requests still in flight; closing them");
    }
    tasks.shutdown().await;
}
