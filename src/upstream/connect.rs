//! Opening a connection to an upstream.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{lookup_host, TcpStream};

/// Connects to the first address of `host:port` that answers within `timeout`, all told.
///
/// Each address gets an equal share of the time left, as hyper-util's connector gives them, so
/// one dead address (a pod gone from a headless Service's stale DNS answer) cannot use up the
/// whole timeout before the live ones are tried.
pub(super) async fn dial(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let addresses: Vec<SocketAddr> = tokio::time::timeout_at(deadline, lookup_host((host, port)))
        .await
        .map_err(|_| {
            format!(
                "resolving {host} took over {}",
                humantime::format_duration(timeout)
            )
        })?
        .map_err(|err| format!("cannot resolve {host}: {err}"))?
        .collect();
    connect_first(&addresses, deadline).await
}

async fn connect_first(
    addresses: &[SocketAddr],
    deadline: tokio::time::Instant,
) -> Result<TcpStream, String> {
    let mut failures = Vec::new();
    for (tried, address) in addresses.iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / u32::try_from(addresses.len() - tried).unwrap_or(u32::MAX);
        match tokio::time::timeout(share, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(err)) => failures.push(format!("{address}: {err}")),
            Err(_) => failures.push(format!(
                "{address}: no answer within {} ms",
                share.as_millis()
            )),
        }
    }
    if failures.is_empty() {
        return Err("the name resolved to no address".into());
    }
    Err(failures.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listening address that never completes a handshake: its accept queue is full.
    async fn blackhole() -> (tokio::net::TcpListener, Vec<TcpStream>, SocketAddr) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let address = listener.local_addr().expect("addr");
        let mut queued = Vec::new();
        for _ in 0..8 {
            let attempt = TcpStream::connect(address);
            match tokio::time::timeout(Duration::from_millis(200), attempt).await {
                Ok(stream) => queued.push(stream.expect("connect")),
                Err(_) => return (listener, queued, address),
            }
        }
        panic!("the accept queue never filled");
    }

    #[tokio::test]
    async fn a_dead_first_address_leaves_time_for_the_next() {
        let (_listener, _queued, dead) = blackhole().await;
        let live = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let live = live.local_addr().expect("addr");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let stream = connect_first(&[dead, live], deadline)
            .await
            .expect("connected");
        assert_eq!(stream.peer_addr().expect("peer"), live);
    }

    #[tokio::test]
    async fn when_every_address_fails_each_is_named() {
        let (_listener, _queued, dead) = blackhole().await;
        let refused = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(400);
        let err = connect_first(&[dead, refused], deadline)
            .await
            .expect_err("nothing answers");
        assert!(err.contains(&format!("{dead}: no answer within ")), "{err}");
        assert!(err.contains(&format!("{refused}: ")), "{err}");
    }
}
