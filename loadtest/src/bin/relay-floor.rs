//! The floor under a tokio HTTP/1.1 proxy, for benchmarks against nginx (BENCHMARKS.md).
//!
//! It does only what any keep-alive HTTP/1.1 proxy must, on the runtime abproxy picks on one
//! CPU (tokio's current-thread runtime with its I/O and time drivers): for each client
//! connection one upstream connection, opened at its first request, and for each request,
//! read its head (and `Content-Length` body), write it upstream unchanged, read the answer
//! the same way and write it back. No routing, no header rewrite, no metrics, no timers, no
//! pool. What abproxy costs above this relay is its own code; what this relay costs above
//! nginx is the runtime's and the language's. It knows `Content-Length` framing only (what
//! the benchmark's load generator and backends send): a chunked message, or a body over
//! 64 MiB, ends the connection, and a `HEAD` is not told apart.
//!
//! ```sh
//! relay-floor --listen 127.0.0.1:9200 --upstream 127.0.0.1:9101
//! ```

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Relays HTTP/1.1 requests unchanged to one upstream, one upstream connection per client's.
#[derive(Debug, Parser)]
#[command(name = "relay-floor", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9200")]
    listen: SocketAddr,
    /// The upstream every request goes to.
    #[arg(long, default_value = "127.0.0.1:9101")]
    upstream: SocketAddr,
}

fn main() -> ExitCode {
    let args = Args::parse();
    loadtest::run_on_one_thread("relay-floor", serve(args))
}

async fn serve(args: Args) -> io::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|error| io::Error::new(error.kind(), format!("{}: {error}", args.listen)))?;
    loop {
        let (client, _) = listener.accept().await?;
        tokio::spawn(async move {
            // A connection that fails (either side closing, a malformed message) just ends.
            let _ = relay(client, args.upstream).await;
        });
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut request = Vec::with_capacity(1024);
    let mut answer = Vec::with_capacity(1024);
    // Opened at the first request, as a proxy's pool would: a client that sends none costs none.
    let mut upstream_connection = None;
    loop {
        let Some(length) = read_message(&mut client, &mut request, Kind::Request).await? else {
            return Ok(());
        };
        let upstream = match &mut upstream_connection {
            Some(upstream) => upstream,
            None => {
                let opened = TcpStream::connect(upstream).await?;
                opened.set_nodelay(true)?;
                upstream_connection.insert(opened)
            }
        };
        upstream.write_all(&request[..length]).await?;
        request.drain(..length);
        let Some(length) = read_message(upstream, &mut answer, Kind::Response).await? else {
            return Ok(());
        };
        client.write_all(&answer[..length]).await?;
        answer.drain(..length);
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Request,
    Response,
}

/// Reads into `buffer` until it holds one whole message; its length, or `None` at a clean
/// end of the stream between messages.
async fn read_message(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    kind: Kind,
) -> io::Result<Option<usize>> {
    loop {
        if let Some(length) = message_length(buffer, kind)? {
            if buffer.len() >= length {
                return Ok(Some(length));
            }
        }
        if buffer.capacity() == buffer.len() {
            buffer.reserve(buffer.len().max(1024));
        }
        if stream.read_buf(buffer).await? == 0 {
            return if buffer.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

/// The longest body relayed: the benchmark's are a few dozen bytes.
const MAX_BODY: usize = 64 << 20;

/// The length of the message at the start of `buffer`, head and `Content-Length` body, once
/// its head is complete.
fn message_length(buffer: &[u8], kind: Kind) -> io::Result<Option<usize>> {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let parsed = match kind {
        Kind::Request => httparse::Request::new(&mut fields).parse(buffer),
        Kind::Response => httparse::Response::new(&mut fields).parse(buffer),
    };
    let head = match parsed {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(io::Error::new(io::ErrorKind::InvalidData, error)),
    };
    let invalid = |why: &'static str| io::Error::new(io::ErrorKind::InvalidData, why);
    // One pass over the parsed fields (the filled front of the array).
    let mut body = None;
    for field in fields.iter().take_while(|field| !field.name.is_empty()) {
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid("Transfer-Encoding is not relayed"));
        }
        if body.is_none() && field.name.eq_ignore_ascii_case("content-length") {
            let length = std::str::from_utf8(field.value)
                .ok()
                .and_then(|value| value.trim().parse::<usize>().ok())
                .filter(|&length| length <= MAX_BODY)
                .ok_or_else(|| invalid("Content-Length unreadable or over 64 MiB"))?;
            body = Some(length);
        }
    }
    let body = body.unwrap_or(0);
    Ok(Some(head + body))
}
