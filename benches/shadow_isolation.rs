//! The primary path's latency with no shadow, a healthy one, a slow one and a blackholed one,
//! side by side: a shadow must cost the client nothing measurable.
//!
//! `cargo bench --bench shadow_isolation`; figures in BENCHMARKS.md.

use std::net::SocketAddr;
use std::time::Duration;

use abproxy::demo::MockModel;
use abproxy::server::Server;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

async fn model(latency: Duration, stop: &CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind model");
    let addr = listener.local_addr().expect("addr");
    let mut model = MockModel::new("model", "v1", 0.0);
    model.latency = latency;
    tokio::spawn(model.serve(listener, stop.clone()));
    addr
}

/// Accepts connections and never answers.
async fn blackhole(stop: &CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind blackhole");
    let addr = listener.local_addr().expect("addr");
    let stop = stop.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            tokio::select! {
                Ok((stream, _)) = listener.accept() => held.push(stream),
                () = stop.cancelled() => return,
            }
        }
    });
    addr
}

async fn proxy(
    name: &str,
    primary: SocketAddr,
    shadow: Option<SocketAddr>,
    dir: &std::path::Path,
    stop: &CancellationToken,
) -> SocketAddr {
    let shadow = shadow
        .map(|addr| {
            format!(
                "[[shadow]]\nname = \"candidate\"\nupstream = \"http://{addr}\"\ntimeout = \"1s\"\n\
                 max_queue = 256\nmax_concurrency = 16\ncompare = \"/prediction\"\n"
            )
        })
        .unwrap_or_default();
    let path = dir.join(format!("{name}.toml"));
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
         [[variant]]\nname = \"control\"\nupstream = \"http://{primary}\"\nweight = 100\n{shadow}"
    );
    std::fs::write(&path, config).expect("write config");
    let server = Server::bind(&path).await.expect("bind proxy");
    let addr = server.proxy_addr();
    tokio::spawn(server.run(stop.clone()));
    addr
}

fn primary_latency_with_shadows(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = CancellationToken::new();
    let proxies = runtime.block_on(async {
        let primary = model(Duration::ZERO, &stop).await;
        let healthy = model(Duration::ZERO, &stop).await;
        let slow = model(Duration::from_millis(200), &stop).await;
        let blackholed = blackhole(&stop).await;
        let mut proxies = Vec::new();
        for (name, shadow) in [
            ("primary_no_shadow", None),
            ("primary_healthy_shadow", Some(healthy)),
            ("primary_slow_shadow_200ms", Some(slow)),
            ("primary_blackholed_shadow", Some(blackholed)),
        ] {
            proxies.push((name, proxy(name, primary, shadow, dir.path(), &stop).await));
        }
        proxies
    });
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut group = c.benchmark_group("shadow_isolation");
    for (name, addr) in proxies {
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                let client = client.clone();
                async move {
                    let request = http::Request::post(format!("http://{addr}/predict"))
                        .header("x-user-id", "user-42")
                        .body(Full::new(Bytes::from_static(br#"{"features":[1,2,3]}"#)))
                        .expect("request");
                    let response = client.request(request).await.expect("response");
                    assert_eq!(response.status(), 200);
                    response
                        .into_body()
                        .collect()
                        .await
                        .expect("body")
                        .to_bytes()
                        .len()
                }
            })
        });
    }
    group.finish();
    stop.cancel();
}

criterion_group!(benches, primary_latency_with_shadows);
criterion_main!(benches);
