//! Criterion benches of the request path: bucketing, each user-ID source, the routing
//! decision, and whole requests through an in-process proxy to a local backend.
//!
//! `cargo bench --bench hot_path`; figures and context live in BENCHMARKS.md.

use std::hint::black_box;
use std::path::Path;

use abproxy::assign::{bucket, UserIdSource};
use abproxy::config::{Config, Loaded};
use abproxy::demo::MockModel;
use abproxy::metrics::Metrics;
use abproxy::route::Generation;
use abproxy::server::Server;
use abproxy::shadow::Background;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::request::Parts;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

const UUID: &str = "6f1c3a52-8d7e-4b9a-a0c4-3e2f1d5b7c90";

fn request(uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut builder = http::Request::builder().uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("request").into_parts().0
}

fn json_body(size: usize) -> Vec<u8> {
    let pad = size.saturating_sub(60);
    format!(
        r#"{{"features":[0.1,0.2],"pad":"{}","user_id":"{UUID}"}}"#,
        "x".repeat(pad)
    )
    .into_bytes()
}

fn bucketing(c: &mut Criterion) {
    let mut group = c.benchmark_group("bucket");
    for (name, id) in [
        ("bucket_header_36b", UUID.to_owned()),
        ("bucket_id_256b", "u".repeat(256)),
    ] {
        group.throughput(Throughput::Elements(1));
        group.bench_function(name, |b| {
            b.iter(|| bucket(black_box("salt"), black_box(&id), black_box(10_000)))
        });
    }
    group.finish();
}

fn sources(c: &mut Criterion) {
    let mut group = c.benchmark_group("source");
    let header = request(
        "/predict",
        &[("x-user-id", UUID), ("content-type", "application/json")],
    );
    let cookie = request(
        "/predict",
        &[(
            "cookie",
            &format!("theme=dark; session=abc; user_id={UUID}"),
        )],
    );
    let query = request(&format!("/predict?model=a&user_id={UUID}&x=1"), &[]);
    let cases: [(&str, &str, &Parts, Option<Vec<u8>>); 5] = [
        ("source_header_36b", "header:x-user-id", &header, None),
        ("source_cookie_36b", "cookie:user_id", &cookie, None),
        ("source_query_36b", "query:user_id", &query, None),
        (
            "source_json_200b",
            "json:/user_id",
            &header,
            Some(json_body(200)),
        ),
        (
            "source_json_10kib",
            "json:/user_id",
            &header,
            Some(json_body(10 * 1024)),
        ),
    ];
    for (name, spec, parts, body) in cases {
        let source: UserIdSource = spec.parse().expect("source");
        group.bench_function(name, |b| {
            b.iter(|| {
                source
                    .extract(black_box(parts), black_box(body.as_deref()))
                    .map(|id| id.len())
            })
        });
    }
    group.finish();
}

fn routing(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let config = Config::parse(
        "[assignment]\nsources = [\"header:x-user-id\", \"json:/user_id\"]\nbuckets = 10000\n\
         [[variant]]\nname = \"control\"\nupstream = \"http://127.0.0.1:1\"\nweight = 95\n\
         [[variant]]\nname = \"canary\"\nupstream = \"http://127.0.0.1:2\"\nweight = 5\n",
        Path::new("bench.toml"),
    )
    .expect("config");
    let loaded = Loaded {
        config,
        sha256: String::new(),
    };
    let metrics = Metrics::new();
    let guard = abproxy::canary::Guard::new(&metrics, Default::default());
    let generation = Generation::build(1, loaded, None, &metrics, &Background::default(), &guard);
    let by_header = request("/predict", &[("x-user-id", UUID)]);
    let by_json = request("/predict", &[]);
    let body = json_body(10 * 1024);
    c.bench_function("route_header_36b", |b| {
        b.iter(|| {
            generation
                .assign(black_box(&by_header), None)
                .map(|a| a.route)
        })
    });
    c.bench_function("route_json_10kib", |b| {
        b.iter(|| {
            generation
                .assign(black_box(&by_json), black_box(Some(&body)))
                .map(|a| a.route)
        })
    });
}

/// Whole requests over loopback: through abproxy, and straight to the backend for scale.
fn requests(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = CancellationToken::new();
    let (proxy, backend) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let backend = listener.local_addr().expect("addr");
        tokio::spawn(MockModel::new("control", "v1", 0.0).serve(listener, stop.clone()));
        let path = dir.path().join("bench.toml");
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [assignment]\nsources = [\"header:x-user-id\", \"json:/user_id\"]\n\
             [[variant]]\nname = \"control\"\nupstream = \"http://{backend}\"\nweight = 100\n"
        );
        std::fs::write(&path, config).expect("write config");
        let server = Server::bind(&path).await.expect("bind proxy");
        let proxy = server.proxy_addr();
        tokio::spawn(server.run(stop.clone()));
        (proxy, backend)
    });
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let send = |target: std::net::SocketAddr, body: Option<Bytes>| {
        let client = client.clone();
        async move {
            let builder =
                http::Request::post(format!("http://{target}/predict")).header("x-user-id", UUID);
            let request = builder
                .body(Full::new(body.unwrap_or_default()))
                .expect("request");
            let response = client.request(request).await.expect("response");
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
                .len()
        }
    };
    let mut group = c.benchmark_group("request");
    group.bench_function("request_direct_backend", |b| {
        b.to_async(&runtime).iter(|| send(backend, None))
    });
    group.bench_function("request_proxy_header", |b| {
        b.to_async(&runtime).iter(|| send(proxy, None))
    });
    let body = Bytes::from(json_body(200));
    group.bench_function("request_proxy_json_200b", |b| {
        b.to_async(&runtime)
            .iter(|| send(proxy, Some(body.clone())))
    });
    group.finish();
    stop.cancel();
}

criterion_group!(benches, bucketing, sources, routing, requests);
criterion_main!(benches);
