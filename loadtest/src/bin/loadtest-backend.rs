//! A fast stand-in for a model server, for benchmarks such as `loadtest/compare.sh`.
//!
//! Listens on `--listen` (plain HTTP/1.1 with keep-alive, or h2c with prior knowledge, told
//! apart by the connection's first bytes) and answers every request, whatever its method or
//! path, with `200` and `{"model":"NAME","prediction":0.5}` after reading and discarding the
//! request body. One thread (a `current_thread` runtime) so it costs little next to the proxy
//! under test; on h2c each stream is a task of its own on that thread.
//!
//! ```sh
//! loadtest-backend --listen 127.0.0.1:9101 --name control
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Answers every HTTP request with a small fixed JSON prediction.
#[derive(Debug, Parser)]
#[command(name = "loadtest-backend", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9101")]
    listen: SocketAddr,
    /// Model name put in every answer's `model` field.
    #[arg(long, default_value = "control")]
    name: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    loadtest::run_on_one_thread("loadtest-backend", serve(args))
}

async fn serve(args: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|error| std::io::Error::new(error.kind(), format!("{}: {error}", args.listen)))?;
    let answer =
        Bytes::from(serde_json::json!({ "model": args.name, "prediction": 0.5 }).to_string());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning or dying.
                eprintln!("loadtest-backend: accept: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(request, answer.clone()));
            // A client that goes away mid-request is not the backend's problem. hyper's h2
            // defaults stand (200 concurrent streams per connection, 1 MiB windows).
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    request: Request<Incoming>,
    answer: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut body = request.into_body();
    while let Some(Ok(_)) = body.frame().await {}
    let mut response = Response::new(Full::new(answer));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
