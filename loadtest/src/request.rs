//! What one request looks like: method, path, and where the user ID travels.
//!
//! The three ID sources mirror abproxy's own (`header:`, `cookie:`, `json:`), so a run can check
//! the proxy reads the ID from the place a real client puts it.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, COOKIE, HOST};
use http::{Method, Request};
use http_body_util::Full;

use crate::population::UserId;

/// Where the user ID is carried in each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSource {
    /// `NAME: user-n`
    Header(HeaderName),
    /// `Cookie: NAME=user-n`
    Cookie(String),
    /// A JSON POST body `{"FIELD":"user-n","features":[...]}`.
    Json(String),
}

impl IdSource {
    /// Whether requests carry a body even when `--body-size` is 0.
    pub fn needs_body(&self) -> bool {
        matches!(self, IdSource::Json(_))
    }
}

/// An `--id-source` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdSourceError {
    #[error("expected header:NAME, cookie:NAME or json:FIELD, got {0:?}")]
    Syntax(String),
    #[error("{0:?} is not a valid header name")]
    HeaderName(String),
    #[error("{0:?} is not a valid cookie name (token characters only)")]
    CookieName(String),
}

impl FromStr for IdSource {
    type Err = IdSourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || IdSourceError::Syntax(s.to_owned());
        let (kind, name) = s.split_once(':').ok_or_else(syntax)?;
        if name.is_empty() {
            return Err(syntax());
        }
        match kind {
            "header" => HeaderName::from_str(name)
                .map(IdSource::Header)
                .map_err(|_| IdSourceError::HeaderName(name.to_owned())),
            "cookie" => {
                // A cookie name is an HTTP token; anything else would corrupt the Cookie header.
                if name.bytes().all(is_token_byte) {
                    Ok(IdSource::Cookie(name.to_owned()))
                } else {
                    Err(IdSourceError::CookieName(name.to_owned()))
                }
            }
            // abproxy's config takes a JSON pointer; accept that spelling for a top-level field.
            "json" => {
                let field = name.strip_prefix('/').unwrap_or(name);
                if field.is_empty() || field.contains('/') {
                    Err(syntax())
                } else {
                    Ok(IdSource::Json(field.to_owned()))
                }
            }
            _ => Err(syntax()),
        }
    }
}

impl fmt::Display for IdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdSource::Header(name) => write!(f, "header:{name}"),
            IdSource::Cookie(name) => write!(f, "cookie:{name}"),
            IdSource::Json(field) => write!(f, "json:{field}"),
        }
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Everything about a request except the user, prepared once so each request only formats its
/// user ID and copies shared bytes.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    method: Method,
    path_and_query: String,
    host: HeaderValue,
    id_source: IdSource,
    body_size: usize,
    /// `"FIELD":` for a `json:` source, escaped once here rather than per request.
    json_key: Option<String>,
    /// `0,0,0,...` long enough for any body; slicing it avoids rebuilding padding per request.
    padding: Bytes,
    /// The user's `--header`s, which replace any of the same name set here.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// `Connection: close` on every request (`--new-connections`), so the server closes its
    /// side as soon as it has answered instead of waiting for another request.
    close: bool,
}

impl RequestTemplate {
    pub fn new(
        method: Method,
        path_and_query: String,
        host: HeaderValue,
        id_source: IdSource,
        body_size: usize,
    ) -> Self {
        let padding = Bytes::from("0,".repeat(body_size / 2 + 1));
        let json_key = match &id_source {
            IdSource::Json(field) => Some(format!("{}:", serde_json::Value::from(field.as_str()))),
            _ => None,
        };
        RequestTemplate {
            method,
            path_and_query,
            host,
            id_source,
            body_size,
            json_key,
            padding,
            headers: Vec::new(),
            close: false,
        }
    }

    pub fn with_connection_close(mut self, close: bool) -> Self {
        self.close = close;
        self
    }

    pub fn with_headers(mut self, headers: Vec<(HeaderName, HeaderValue)>) -> Self {
        self.headers = headers;
        self
    }

    /// The request for `user`. Bodies are `{"FIELD":"user-n","features":[0,0,...]}` (the ID field
    /// only with a `json:` source), padded to exactly `--body-size` bytes when that is larger
    /// than the bare object.
    ///
    /// Fails only if the template itself was malformed, which the option parsers rule out; the
    /// driver still counts such a failure as an `other` error instead of panicking.
    pub fn build(&self, user: UserId) -> Result<Request<Full<Bytes>>, http::Error> {
        let user_id = user.to_string();
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(self.path_and_query.as_str())
            // hyper's connection-level client sends exactly the headers it is given: no Host.
            .header(HOST, self.host.clone());
        if self.close {
            builder = builder.header(CONNECTION, "close");
        }
        match &self.id_source {
            IdSource::Header(name) => builder = builder.header(name, user_id.as_str()),
            IdSource::Cookie(name) => builder = builder.header(COOKIE, format!("{name}={user_id}")),
            IdSource::Json(_) => {}
        }
        let body = if self.id_source.needs_body() || self.body_size > 0 {
            builder = builder.header(CONTENT_TYPE, "application/json");
            self.body(&user_id)
        } else {
            Bytes::new()
        };
        let mut request = builder.body(Full::new(body))?;
        let headers = request.headers_mut();
        for (name, _) in &self.headers {
            // A `Cookie` of the user's joins the ID cookie rather than replacing it.
            if name != COOKIE {
                headers.remove(name);
            }
        }
        for (name, value) in &self.headers {
            headers.append(name, value.clone());
        }
        Ok(request)
    }

    fn body(&self, user_id: &str) -> Bytes {
        let mut body = Vec::with_capacity(self.body_size.max(64));
        body.push(b'{');
        if let Some(key) = &self.json_key {
            body.extend_from_slice(key.as_bytes());
            body.push(b'"');
            body.extend_from_slice(user_id.as_bytes());
            body.extend_from_slice(b"\",");
        }
        body.extend_from_slice(b"\"features\":[");
        const CLOSE: &[u8] = b"]}";
        let fill = self.body_size.saturating_sub(body.len() + CLOSE.len());
        if fill > 0 {
            // Odd fill: "0,0,...,0". Even fill: "1" + "0,...,0" = "10,0,...,0". Both valid JSON.
            if fill % 2 == 0 {
                body.push(b'1');
            }
            let zeros = if fill % 2 == 0 { fill - 1 } else { fill };
            body.extend_from_slice(&self.padding[..zeros]);
        }
        body.extend_from_slice(CLOSE);
        body.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn template(source: &str, body_size: usize) -> RequestTemplate {
        RequestTemplate::new(
            Method::POST,
            "/predict?x=1".to_owned(),
            HeaderValue::from_static("127.0.0.1:8080"),
            source.parse().expect("valid id source"),
            body_size,
        )
    }

    async fn body_of(request: Request<Full<Bytes>>) -> Vec<u8> {
        request
            .into_body()
            .collect()
            .await
            .expect("full body")
            .to_bytes()
            .to_vec()
    }

    #[test]
    fn extra_headers_are_sent_and_replace_loadtests_own() {
        let template = template("header:x-user-id", 0).with_headers(vec![
            (
                HeaderName::from_static("authorization"),
                HeaderValue::from_static("Bearer t"),
            ),
            (
                HeaderName::from_static("host"),
                HeaderValue::from_static("model.example"),
            ),
            (
                HeaderName::from_static("x-tag"),
                HeaderValue::from_static("a"),
            ),
            (
                HeaderName::from_static("x-tag"),
                HeaderValue::from_static("b"),
            ),
        ]);
        let request = template.build(UserId(7)).expect("request");
        let headers = request.headers();
        assert_eq!(headers["authorization"], "Bearer t");
        assert_eq!(
            headers.get_all(HOST).iter().collect::<Vec<_>>(),
            ["model.example"]
        );
        assert_eq!(
            headers.get_all("x-tag").iter().collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(headers["x-user-id"], "user-7");
    }

    #[test]
    fn connection_close_is_sent_only_when_asked_for() {
        let request = template("header:x-user-id", 0)
            .build(UserId(1))
            .expect("request");
        assert!(request.headers().get(CONNECTION).is_none());
        let request = template("header:x-user-id", 0)
            .with_connection_close(true)
            .build(UserId(1))
            .expect("request");
        assert_eq!(request.headers()[CONNECTION], "close");
    }

    #[test]
    fn an_extra_cookie_goes_beside_the_id_cookie() {
        let template = template("cookie:uid", 0)
            .with_headers(vec![(COOKIE, HeaderValue::from_static("session=s1"))]);
        let request = template.build(UserId(3)).expect("request");
        let cookies: Vec<_> = request.headers().get_all(COOKIE).iter().collect();
        assert_eq!(cookies, ["uid=user-3", "session=s1"]);
    }

    #[test]
    fn parses_the_three_sources_and_rejects_the_rest() {
        assert_eq!(
            "header:x-user-id".parse(),
            Ok(IdSource::Header(HeaderName::from_static("x-user-id")))
        );
        assert_eq!("cookie:uid".parse(), Ok(IdSource::Cookie("uid".into())));
        assert_eq!("json:user_id".parse(), Ok(IdSource::Json("user_id".into())));
        assert_eq!(
            "json:/user_id".parse(),
            Ok(IdSource::Json("user_id".into()))
        );
        for bad in ["", "header", "header:", "query:x", "json:/a/b", "json:/"] {
            assert!(bad.parse::<IdSource>().is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            "header:bad name".parse::<IdSource>(),
            Err(IdSourceError::HeaderName(_))
        ));
        assert!(matches!(
            "cookie:a=b".parse::<IdSource>(),
            Err(IdSourceError::CookieName(_))
        ));
    }

    #[tokio::test]
    async fn header_source_sets_the_header_and_host() {
        let request = template("header:x-user-id", 0)
            .build(UserId(7))
            .expect("request");
        assert_eq!(request.uri(), "/predict?x=1");
        assert_eq!(request.headers()["x-user-id"], "user-7");
        assert_eq!(request.headers()[HOST], "127.0.0.1:8080");
        assert!(body_of(request).await.is_empty());
    }

    #[test]
    fn cookie_source_sets_the_cookie() {
        let request = template("cookie:uid", 0).build(UserId(3)).expect("request");
        assert_eq!(request.headers()[COOKIE], "uid=user-3");
    }

    #[tokio::test]
    async fn json_source_puts_the_id_in_a_valid_body_of_the_requested_size() {
        for size in [0, 10, 60, 61, 62, 1000, 1001] {
            let request = template("json:user_id", size)
                .build(UserId(12345))
                .expect("request");
            assert_eq!(request.headers()[CONTENT_TYPE], "application/json");
            let body = body_of(request).await;
            let value: serde_json::Value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("size {size}: {e}: {}", String::from_utf8_lossy(&body)));
            assert_eq!(value["user_id"], "user-12345");
            assert!(value["features"].is_array());
            if size >= 40 {
                assert_eq!(body.len(), size, "size {size}");
            }
        }
    }

    #[tokio::test]
    async fn body_size_pads_header_source_requests_too() {
        let body = body_of(
            template("header:x-user-id", 100)
                .build(UserId(1))
                .expect("request"),
        )
        .await;
        assert_eq!(body.len(), 100);
        let value: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert!(value.get("user_id").is_none());
    }
}
