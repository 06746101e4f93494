//! abproxy's own outbound HTTP calls, which are not proxied traffic: the canary webhook, and
//! `abproxy canary` talking to a running proxy's admin port.
//!
//! One request on a fresh connection per call. These calls are rare (a canary state change,
//! an operator's command), so a pool such as the upstreams' would only add state to get
//! wrong. Plain `http://` only, like upstreams: abproxy has no TLS client yet.

use std::error::Error as _;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The `user-agent` of every call, so a receiver's logs tell abproxy's calls apart.
const USER_AGENT_VALUE: &str = concat!("abproxy/", env!("CARGO_PKG_VERSION"));

/// The largest reply body read. The admin port's JSON and a webhook receiver's answer are
/// small; a receiver that streams without end must not grow abproxy's memory until the
/// timeout.
pub const MAX_REPLY_BYTES: usize = 1 << 20;

/// Why a call brought no reply. A reply with any status, 4xx and 5xx included, is not an
/// error here: what a status means is the caller's business.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The URL cannot be called: not `http://`, or no host.
    #[error("{0}")]
    InvalidUrl(String),
    /// The bearer token cannot go in a header: it has a line break or another control
    /// character (a token file with two lines?).
    #[error(
        "the bearer token has characters not allowed in an HTTP header (a line break inside it?)"
    )]
    InvalidToken,
    /// Nothing accepted the connection: wrong address, or the server is down.
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    /// Connecting, sending and reading the whole reply took longer than allowed.
    #[error("no complete answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The connection failed mid-exchange, or the answer was not valid HTTP/1.1. The message
    /// carries hyper's causes (its own is terse, "connection error"), so it is not also
    /// given as `source()`: reporters that walk sources would print them twice.
    #[error("the HTTP exchange failed: {}", with_causes(.0))]
    Http(hyper::Error),
    /// The reply's body was over [`MAX_REPLY_BYTES`].
    #[error("the answer's body is over {MAX_REPLY_BYTES} bytes")]
    ReplyTooLarge,
}

/// An answer, whatever its status.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

/// One request on a fresh connection, bounded by `timeout` (connect + whole exchange).
///
/// `body` is JSON (sent with `content-type: application/json`); `bearer` adds
/// `authorization: Bearer …`. The URL's path and query are the request target.
pub async fn call(
    method: Method,
    url: &Uri,
    body: Option<Bytes>,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<Reply, CallError> {
    let target = Target::of(url)?;
    let request = request(method, &target, body, bearer)?;
    tokio::time::timeout(timeout, exchange(&target, url, request))
        .await
        .unwrap_or(Err(CallError::Timeout(timeout)))
}

/// Where a URL points, checked before anything is sent.
struct Target {
    /// For the resolver: an IPv6 literal without its brackets.
    host: String,
    port: u16,
    /// The `Host` header: the authority without user info, the default port left out.
    host_header: HeaderValue,
    path_and_query: String,
}

impl Target {
    fn of(url: &Uri) -> Result<Target, CallError> {
        match url.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(CallError::InvalidUrl(format!(
                    "{url}: https is not supported; abproxy's own calls are plain http://"
                )))
            }
            Some(other) => {
                return Err(CallError::InvalidUrl(format!(
                    "{url}: scheme {other}:// is not supported; use http://HOST:PORT/PATH"
                )))
            }
            None => {
                return Err(CallError::InvalidUrl(format!(
                    "{url}: not an absolute URL; use http://HOST:PORT/PATH"
                )))
            }
        }
        let Some(authority) = url.authority() else {
            return Err(CallError::InvalidUrl(format!("{url}: no host")));
        };
        let host = authority.host();
        if host.is_empty() {
            return Err(CallError::InvalidUrl(format!("{url}: no host")));
        }
        let port = authority.port_u16().unwrap_or(80);
        let host_header = if port == 80 {
            host.to_owned()
        } else {
            format!("{host}:{port}")
        };
        let host_header = HeaderValue::from_str(&host_header)
            .map_err(|_| CallError::InvalidUrl(format!("{url}: the host is not a valid name")))?;
        Ok(Target {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            host_header,
            path_and_query: url
                .path_and_query()
                .map_or("/", |path| path.as_str())
                .to_owned(),
        })
    }
}

fn request(
    method: Method,
    target: &Target,
    body: Option<Bytes>,
    bearer: Option<&str>,
) -> Result<Request<Full<Bytes>>, CallError> {
    let mut builder = Request::builder()
        .method(method.clone())
        .uri(target.path_and_query.as_str())
        .header(HOST, target.host_header.clone())
        .header(USER_AGENT, USER_AGENT_VALUE);
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    } else if [Method::POST, Method::PUT, Method::PATCH].contains(&method) {
        // hyper sends no length for an empty body, and some servers answer a POST without
        // one with 411 Length Required.
        builder = builder.header(CONTENT_LENGTH, 0);
    }
    if let Some(token) = bearer {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| CallError::InvalidToken)?;
        value.set_sensitive(true);
        builder = builder.header(AUTHORIZATION, value);
    }
    builder
        .body(Full::new(body.unwrap_or_default()))
        // Every part was checked above; this would be a bug, reported rather than panicking.
        .map_err(|err| CallError::InvalidUrl(format!("cannot build the request: {err}")))
}

async fn exchange(
    target: &Target,
    url: &Uri,
    request: Request<Full<Bytes>>,
) -> Result<Reply, CallError> {
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| CallError::Connect {
            url: url.to_string(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(CallError::Http)?;
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(CallError::Http)?;
        let status = response.status();
        let body = read_body(response.into_body()).await?;
        Ok(Reply { status, body })
    };
    // The connection is driven here rather than in a spawned task, so that a timeout drops
    // it with the exchange and nothing outlives the call.
    tokio::pin!(exchange);
    tokio::select! {
        biased;
        reply = &mut exchange => return reply,
        // The connection ended first (closed or failed): the exchange learns how.
        _ = connection => {}
    }
    exchange.await
}

async fn read_body(mut body: Incoming) -> Result<Bytes, CallError> {
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(CallError::Http)?.into_data() {
            if read.len() + data.len() > MAX_REPLY_BYTES {
                return Err(CallError::ReplyTooLarge);
            }
            read.extend_from_slice(&data);
        }
    }
    Ok(read.freeze())
}

/// `err: cause: cause…`, as hyper's own message names only the kind of failure.
fn with_causes(err: &hyper::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use http::{HeaderMap, Response};
    use hyper::service::service_fn;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    type Seen = Arc<Mutex<Vec<(Method, String, HeaderMap, Bytes)>>>;

    /// A real HTTP/1.1 server on 127.0.0.1 that records each request and answers 201 with
    /// `{"ok":true}`.
    async fn recording_server() -> (SocketAddr, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Seen::default();
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    let record = record.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.expect("body").to_bytes();
                        record.lock().expect("lock").push((
                            parts.method,
                            parts.uri.to_string(),
                            parts.headers,
                            body,
                        ));
                        let mut response =
                            Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")));
                        *response.status_mut() = StatusCode::CREATED;
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, seen)
    }

    fn url(text: &str) -> Uri {
        text.parse().expect("url")
    }

    #[tokio::test]
    async fn a_post_carries_its_json_token_and_headers() {
        let (addr, seen) = recording_server().await;
        let reply = call(
            Method::POST,
            &url(&format!("http://{addr}/hooks/canary?team=ml")),
            Some(Bytes::from_static(b"{\"event\":\"promoted\"}")),
            Some("s3cret"),
            Duration::from_secs(5),
        )
        .await
        .expect("reply");
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.body, Bytes::from_static(b"{\"ok\":true}"));
        let seen = seen.lock().expect("lock");
        let (method, target, headers, body) = &seen[0];
        assert_eq!(method, Method::POST);
        assert_eq!(target, "/hooks/canary?team=ml");
        assert_eq!(headers[HOST], addr.to_string().as_str());
        assert_eq!(headers[CONTENT_TYPE], "application/json");
        assert_eq!(headers[AUTHORIZATION], "Bearer s3cret");
        assert_eq!(headers[USER_AGENT], USER_AGENT_VALUE);
        assert_eq!(body, &Bytes::from_static(b"{\"event\":\"promoted\"}"));
    }

    #[tokio::test]
    async fn a_get_without_body_has_no_content_type_nor_token() {
        let (addr, seen) = recording_server().await;
        call(
            Method::GET,
            &url(&format!("http://{addr}")),
            None,
            None,
            Duration::from_secs(5),
        )
        .await
        .expect("reply");
        let seen = seen.lock().expect("lock");
        let (method, target, headers, body) = &seen[0];
        assert_eq!((method, target.as_str()), (&Method::GET, "/"));
        assert!(headers.get(CONTENT_TYPE).is_none());
        assert!(headers.get(AUTHORIZATION).is_none());
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn an_empty_post_says_its_length() {
        let (addr, seen) = recording_server().await;
        call(
            Method::POST,
            &url(&format!("http://{addr}/canary/pause")),
            None,
            None,
            Duration::from_secs(5),
        )
        .await
        .expect("reply");
        let seen = seen.lock().expect("lock");
        let (_, _, headers, body) = &seen[0];
        assert_eq!(headers[CONTENT_LENGTH], "0");
        assert!(headers.get(CONTENT_TYPE).is_none());
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn https_and_relative_urls_are_refused_before_connecting() {
        for (text, words) in [
            ("https://127.0.0.1:1/x", "https is not supported"),
            ("/canary", "not an absolute URL"),
            ("ftp://127.0.0.1/x", "ftp://"),
        ] {
            let err = call(Method::GET, &url(text), None, None, Duration::from_secs(1))
                .await
                .expect_err("refused");
            assert!(matches!(err, CallError::InvalidUrl(_)), "{text}: {err:?}");
            assert!(err.to_string().contains(words), "{text}: {err}");
        }
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let err = call(
            Method::GET,
            &url(&format!("http://{closed}/canary")),
            None,
            None,
            Duration::from_secs(5),
        )
        .await
        .expect_err("nothing listens");
        assert!(matches!(err, CallError::Connect { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot connect to http://{closed}/canary: ")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accepts and holds the connection, never answering.
        let held = tokio::spawn(async move { listener.accept().await });
        let err = call(
            Method::GET,
            &url(&format!("http://{addr}/")),
            None,
            None,
            Duration::from_millis(200),
        )
        .await
        .expect_err("no answer");
        assert!(matches!(err, CallError::Timeout(_)), "{err:?}");
        assert_eq!(err.to_string(), "no complete answer within 200ms");
        held.abort();
    }

    #[tokio::test]
    async fn a_connection_cut_mid_answer_is_an_http_error_with_its_cause() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"cut")
                    .await;
            }
        });
        let err = call(
            Method::GET,
            &url(&format!("http://{addr}/")),
            None,
            None,
            Duration::from_secs(5),
        )
        .await
        .expect_err("cut short");
        assert!(matches!(err, CallError::Http(_)), "{err:?}");
        // hyper's own message, then why: a reset or an early end of file.
        let message = err.to_string();
        let cause = message
            .strip_prefix("the HTTP exchange failed: error reading a body from connection: ")
            .unwrap_or_default();
        assert!(!cause.is_empty(), "{message}");
    }

    #[tokio::test]
    async fn an_endless_answer_is_cut_at_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "x".repeat(64 << 10));
                while stream.write_all(chunk.as_bytes()).await.is_ok() {}
            }
        });
        let err = call(
            Method::GET,
            &url(&format!("http://{addr}/")),
            None,
            None,
            Duration::from_secs(5),
        )
        .await
        .expect_err("too large");
        assert!(matches!(err, CallError::ReplyTooLarge), "{err:?}");
    }

    #[test]
    fn the_host_header_leaves_out_the_default_port_and_keeps_ipv6_brackets() {
        let target = Target::of(&url("http://example.com/a")).expect("target");
        assert_eq!((target.host.as_str(), target.port), ("example.com", 80));
        assert_eq!(target.host_header, "example.com");
        let target = Target::of(&url("http://[::1]:9090")).expect("target");
        assert_eq!((target.host.as_str(), target.port), ("::1", 9090));
        assert_eq!(target.host_header, "[::1]:9090");
        assert_eq!(target.path_and_query, "/");
    }

    #[test]
    fn a_token_with_a_line_break_is_refused() {
        let target = Target::of(&url("http://127.0.0.1:9090/")).expect("target");
        let err = request(Method::POST, &target, None, Some("a\nb")).expect_err("refused");
        assert!(matches!(err, CallError::InvalidToken), "{err:?}");
    }
}
