//! A keep-alive HTTP client for talking to the proxy and its admin port.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::Proxy;

#[derive(Clone)]
pub struct Client {
    base: String,
    inner: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            base: format!("http://{addr}"),
            inner: hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn get(&self, path: &str) -> Call {
        self.call(Method::GET, path)
    }

    pub fn post(&self, path: &str, body: impl Into<Bytes>) -> Call {
        let mut call = self.call(Method::POST, path);
        call.body = body.into();
        call
    }

    fn call(&self, method: Method, path: &str) -> Call {
        Call {
            client: self.clone(),
            request: Request::builder()
                .method(method)
                .uri(format!("{}{path}", self.base)),
            body: Bytes::new(),
        }
    }
}

pub struct Call {
    client: Client,
    request: http::request::Builder,
    body: Bytes,
}

impl Call {
    pub fn header(mut self, name: &str, value: &str) -> Call {
        self.request = self.request.header(name, value);
        self
    }

    pub fn user(self, id: &str) -> Call {
        self.header("x-user-id", id)
    }

    /// Sends the request; connection-level failures are errors, HTTP statuses are not.
    pub async fn try_send(self) -> Result<Reply, String> {
        let request = self
            .request
            .body(Full::new(self.body))
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .inner
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub async fn send(self) -> Reply {
        self.try_send().await.expect("request reaches the proxy")
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The variant the proxy says answered.
    pub fn variant(&self) -> Option<&str> {
        self.headers.get("x-variant").and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not JSON ({err}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error` message of one of abproxy's own JSON error answers.
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }

    /// The model that produced the answer, as the backend wrote it.
    pub fn model(&self) -> String {
        self.json()["model"].as_str().unwrap_or_default().to_owned()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An h2c (prior knowledge) connection to the proxy, as gRPC clients open.
pub async fn h2c_client<B>(proxy: &Proxy) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(connection);
    sender
}
