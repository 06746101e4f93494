//! abproxy's own HTTP/1.1 server, over raw sockets: keep-alive, pipelining, framing, and the
//! requests it hands to hyper mid-connection (a body still on its way, `Expect`, HTTP/1.0,
//! an over-long or malformed head).

mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::backend::{answering, answering_and_keeping_heads, FIELDS_AS_SENT};
use support::{variants, Backend, Proxy};

/// A client connection that writes bytes as given and reads answers one by one.
struct Wire {
    stream: TcpStream,
    read: Vec<u8>,
}

/// An answer as it came over the wire.
struct Answer {
    /// The head as it came, start line to blank line.
    head: String,
    version: u8,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The lines of a chunked body's trailer section.
    trailers: Vec<String>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(field, _)| field.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

impl Wire {
    async fn to(proxy: &Proxy) -> Wire {
        let stream = TcpStream::connect(proxy.addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Wire {
            stream,
            read: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    async fn fill(&mut self) {
        let mut buf = [0; 8192];
        let read = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(
            read > 0,
            "the connection closed; so far: {:?}",
            String::from_utf8_lossy(&self.read)
        );
        self.read.extend_from_slice(&buf[..read]);
    }

    /// The next answer; `to_head` for one to a HEAD request (no body follows).
    async fn answer(&mut self, to_head: bool) -> Answer {
        let (length, mut answer) = loop {
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut fields);
            if let httparse::Status::Complete(length) = parsed.parse(&self.read).expect("an answer")
            {
                let headers = parsed
                    .headers
                    .iter()
                    .map(|field| {
                        let value = String::from_utf8_lossy(field.value).into_owned();
                        (field.name.to_ascii_lowercase(), value)
                    })
                    .collect();
                let answer = Answer {
                    head: String::from_utf8_lossy(&self.read[..length]).into_owned(),
                    version: parsed.version.expect("version"),
                    status: parsed.code.expect("status"),
                    headers,
                    body: Vec::new(),
                    trailers: Vec::new(),
                };
                break (length, answer);
            }
            self.fill().await;
        };
        self.read.drain(..length);
        let bodiless =
            to_head || answer.status == 204 || answer.status == 304 || answer.status < 200;
        if bodiless {
            return answer;
        }
        if answer.header("transfer-encoding") == Some("chunked") {
            (answer.body, answer.trailers) = self.chunked().await;
        } else if let Some(length) = answer.header("content-length") {
            let length: usize = length.parse().expect("a length");
            while self.read.len() < length {
                self.fill().await;
            }
            answer.body = self.read.drain(..length).collect();
        } else {
            while let Ok(read) = self.stream.read_buf(&mut self.read).await {
                if read == 0 {
                    break;
                }
            }
            answer.body = std::mem::take(&mut self.read);
        }
        answer
    }

    async fn chunked(&mut self) -> (Vec<u8>, Vec<String>) {
        let mut body = Vec::new();
        loop {
            let line = self.line().await;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .expect("a chunk size");
            if size == 0 {
                let mut trailers = Vec::new();
                loop {
                    let line = self.line().await;
                    if line.is_empty() {
                        return (body, trailers);
                    }
                    trailers.push(line);
                }
            }
            while self.read.len() < size + 2 {
                self.fill().await;
            }
            body.extend(self.read.drain(..size));
            self.read.drain(..2);
        }
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.read.windows(2).position(|pair| pair == b"\r\n") {
                let line = String::from_utf8_lossy(&self.read[..end]).into_owned();
                self.read.drain(..end + 2);
                return line;
            }
            self.fill().await;
        }
    }

    /// Whether the proxy closes the connection within 5 s.
    async fn closes(&mut self) -> bool {
        let mut buf = [0; 1024];
        tokio::time::timeout(Duration::from_secs(5), async {
            while self.stream.read(&mut buf).await.is_ok_and(|read| read > 0) {}
        })
        .await
        .is_ok()
    }
}

async fn one_variant(backend: &Backend, extra: &str) -> Proxy {
    Proxy::start(&format!(
        "{extra}\n{}",
        variants(&[("control", backend, 100.0)])
    ))
    .await
}

fn get(path: &str, user: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: proxy\r\nx-user-id: {user}\r\n\r\n")
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: proxy\r\nx-user-id: u\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut wire = Wire::to(&proxy).await;
    let three = [
        get("/one", "a"),
        post("/two", r#"{"x":2}"#),
        get("/three", "c"),
    ]
    .concat();
    wire.send(three.as_bytes()).await;
    for _ in 0..3 {
        let answer = wire.answer(false).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("x-variant"), Some("control"));
    }
    let paths: Vec<String> = backend
        .received()
        .iter()
        .map(|r| r.uri.to_string())
        .collect();
    assert_eq!(paths, ["/one", "/two", "/three"]);
    assert_eq!(backend.received()[1].body, r#"{"x":2}"#);
}

#[tokio::test]
async fn an_answer_carries_its_length_and_the_date() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut wire = Wire::to(&proxy).await;
    wire.send(get("/", "a").as_bytes()).await;
    let answer = wire.answer(false).await;
    assert_eq!(answer.version, 1);
    assert_eq!(
        answer.header("content-length"),
        Some(answer.body.len().to_string().as_str())
    );
    let date = answer.header("date").expect("a date");
    httpdate::parse_http_date(date).expect("an HTTP date");
}

#[tokio::test]
async fn a_head_request_gets_the_length_and_no_body() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut wire = Wire::to(&proxy).await;
    wire.send(get("/", "a").replace("GET", "HEAD").as_bytes())
        .await;
    let head = wire.answer(true).await;
    assert_eq!(head.status, 200);
    // The next answer parses where it should: nothing of a body came between.
    wire.send(get("/", "a").as_bytes()).await;
    let full = wire.answer(false).await;
    assert_eq!(full.status, 200);
    assert_eq!(head.header("content-length"), full.header("content-length"));
}

#[tokio::test]
async fn a_head_written_in_pieces_is_read_whole() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut wire = Wire::to(&proxy).await;
    let request = post("/predict", r#"{"instances":[1]}"#);
    for piece in request.as_bytes().chunks(7) {
        wire.send(piece).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(wire.answer(false).await.status, 200);
    assert_eq!(backend.received()[0].body, r#"{"instances":[1]}"#);
}

/// Requests of every shape hyper serves, on one connection after one served here; each
/// is answered, and the connection goes on serving after it.
#[tokio::test]
async fn requests_of_other_shapes_are_served_on_the_same_connection() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut wire = Wire::to(&proxy).await;
    wire.send(get("/first", "a").as_bytes()).await;
    assert_eq!(wire.answer(false).await.status, 200);

    // A chunked upload.
    wire.send(b"POST /chunked HTTP/1.1\r\nhost: proxy\r\nx-user-id: a\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n").await;
    assert_eq!(wire.answer(false).await.status, 200);
    // A body that comes after its head.
    wire.send(b"POST /later HTTP/1.1\r\nhost: proxy\r\nx-user-id: a\r\ncontent-length: 5\r\n\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    wire.send(b"later").await;
    assert_eq!(wire.answer(false).await.status, 200);
    // `Expect: 100-continue`: the interim answer, then the body, then the answer.
    wire.send(b"POST /expecting HTTP/1.1\r\nhost: proxy\r\nx-user-id: a\r\ncontent-length: 4\r\nexpect: 100-continue\r\n\r\n").await;
    assert_eq!(wire.answer(false).await.status, 100);
    wire.send(b"body").await;
    assert_eq!(wire.answer(false).await.status, 200);
    // A head longer than abproxy reads itself (64 KiB), which hyper still takes.
    let long = format!(
        "GET /long HTTP/1.1\r\nhost: proxy\r\nx-user-id: a\r\nx-padding: {}\r\n\r\n",
        "p".repeat(70_000)
    );
    wire.send(long.as_bytes()).await;
    assert_eq!(wire.answer(false).await.status, 200);
    wire.send(get("/last", "a").as_bytes()).await;
    assert_eq!(wire.answer(false).await.status, 200);

    let received: Vec<(String, String)> = backend
        .received()
        .iter()
        .map(|r| {
            (
                r.uri.to_string(),
                String::from_utf8_lossy(&r.body).into_owned(),
            )
        })
        .collect();
    let expected = [
        ("/first", ""),
        ("/chunked", "abcd"),
        ("/later", "later"),
        ("/expecting", "body"),
        ("/long", ""),
        ("/last", ""),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(path, body)| (path.to_string(), body.to_string()))
        .collect();
    assert_eq!(received, expected);
}

#[tokio::test]
async fn an_http_1_0_request_is_answered_in_kind_and_its_connection_closed() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut wire = Wire::to(&proxy).await;
    wire.send(b"GET / HTTP/1.0\r\nx-user-id: a\r\n\r\n").await;
    let answer = wire.answer(false).await;
    assert_eq!((answer.version, answer.status), (0, 200));
    assert!(wire.closes().await);
}

#[tokio::test]
async fn a_malformed_request_is_a_400_and_not_forwarded() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut wire = Wire::to(&proxy).await;
    wire.send(get("/", "a").as_bytes()).await;
    assert_eq!(wire.answer(false).await.status, 200);
    wire.send(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n").await;
    assert_eq!(wire.answer(false).await.status, 400);
    assert_eq!(backend.count(), 1);
}

#[tokio::test]
async fn a_client_asking_to_close_gets_its_answer_and_then_the_close() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut wire = Wire::to(&proxy).await;
    let request = get("/", "a").replace("\r\n\r\n", "\r\nconnection: close\r\n\r\n");
    wire.send(request.as_bytes()).await;
    let answer = wire.answer(false).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(wire.closes().await);
}

/// A keep-alive connection left idle after an answer closes once the header timeout passes.
#[tokio::test]
async fn an_idle_keep_alive_connection_closes_at_the_header_timeout() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "[limits]\nclient_header_timeout = \"300ms\"").await;
    let mut wire = Wire::to(&proxy).await;
    // Two requests apart by more than the first request's timeout: the timer follows.
    wire.send(get("/", "a").as_bytes()).await;
    assert_eq!(wire.answer(false).await.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    wire.send(get("/", "a").as_bytes()).await;
    assert_eq!(wire.answer(false).await.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    wire.send(get("/", "a").as_bytes()).await;
    assert_eq!(wire.answer(false).await.status, 200);
    let idle = std::time::Instant::now();
    assert!(wire.closes().await, "still open after 5 s idle");
    assert!(
        idle.elapsed() >= Duration::from_millis(250),
        "closed after {:?}",
        idle.elapsed()
    );
}

fn values<'a>(answer: &'a Answer, name: &str) -> Vec<&'a str> {
    answer
        .headers
        .iter()
        .filter(|(field, _)| field == name)
        .map(|(_, value)| value.as_str())
        .collect()
}

/// What must reach the client of an answer sent as `FIELDS_AS_SENT`, whichever server writes it.
fn assert_end_to_end_fields_only(answer: &Answer) {
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("x-model-version"), Some("v7"));
    assert_eq!(values(answer, "set-cookie"), ["a=1", "b=2"]);
    assert_eq!(values(answer, "date"), ["Tue, 01 Dec 2026 06:00:00 GMT"]);
    assert_eq!(values(answer, "content-length"), ["2"]);
    assert_eq!(values(answer, "x-variant"), ["control"]);
    for hop in ["keep-alive", "proxy-connection", "upgrade"] {
        assert_eq!(answer.header(hop), None, "{hop} reached the client");
    }
    assert_eq!(answer.body, b"{}");
}

/// The answers to two requests on one connection to abproxy in front of an upstream that
/// answers each with `reply`: the second on a kept-alive upstream connection.
async fn two_answers_of(reply: &'static [u8]) -> Vec<Answer> {
    let upstream = answering(reply).await;
    let proxy = Proxy::in_front_of(&upstream).await;
    let mut wire = Wire::to(&proxy).await;
    let mut answers = Vec::new();
    for _ in 0..2 {
        wire.send(get("/", "a").as_bytes()).await;
        answers.push(wire.answer(false).await);
    }
    answers
}

/// Most answers' fields go to the client as they came, without a header map between:
/// names in their own case, repeated fields in order, and the hop-by-hop ones dropped.
#[tokio::test]
async fn an_answers_fields_reach_the_client_as_they_came_less_the_hop_by_hop_ones() {
    for answer in two_answers_of(FIELDS_AS_SENT).await {
        assert_end_to_end_fields_only(&answer);
        assert!(
            answer.head.contains("\r\nX-Model-Version:"),
            "{}",
            answer.head
        );
        assert_eq!(answer.header("connection"), None);
    }
}

/// An upstream's answer: 200, a JSON body.
const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";

/// What an upstream answering `reply` reads when `requests` come one after another on one
/// client connection to abproxy in front of it (with `server`'s extra `[server]` keys): its
/// address (host and port), and the heads of the requests, as they came.
async fn heads_upstream_reads(
    reply: &'static [u8],
    server: &str,
    requests: &[&[u8]],
) -> (String, Vec<String>) {
    let (upstream, heads) = answering_and_keeping_heads(reply).await;
    let config =
        format!("[[variant]]\nname = \"control\"\nupstream = \"{upstream}\"\nweight = 100\n");
    let proxy = Proxy::start_with_server(server, &config).await;
    let mut wire = Wire::to(&proxy).await;
    for request in requests {
        wire.send(request).await;
        let answer = wire.answer(false).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("x-variant"), Some("control"));
    }
    let heads = heads.lock().expect("heads").clone();
    (upstream.trim_start_matches("http://").to_owned(), heads)
}

/// A request's fields reach the upstream as the client sent them (their case, order and
/// spacing, a repeated one on each of its lines), less the hop-by-hop ones, with the
/// forwarding fields after them.
#[tokio::test]
async fn a_requests_fields_reach_the_upstream_as_they_came_less_the_hop_by_hop_ones() {
    let request = b"GET /v1/m?q=1 HTTP/1.1\r\nHost: models.example\r\nX-User-Id: a\r\n\
        Accept:  */*\r\nX-Tag: 1\r\nTE: trailers\r\nKeep-Alive: timeout=5\r\n\
        Connection: keep-alive\r\nProxy-Connection: keep-alive\r\nX-Forwarded-Proto: https\r\n\
        X-Tag: 2\r\n\r\n";
    let (_, heads) = heads_upstream_reads(ANSWER, "", &[request]).await;
    assert_eq!(
        heads,
        [
            "GET /v1/m?q=1 HTTP/1.1\r\nHost: models.example\r\nX-User-Id: a\r\nAccept:  */*\r\n\
          X-Tag: 1\r\nX-Forwarded-Proto: https\r\nX-Tag: 2\r\nx-forwarded-for: 127.0.0.1\r\n\r\n"
        ]
    );
}

/// A body's length is the writer's to say: the client's `Content-Length` line is not passed
/// on beside it.
#[tokio::test]
async fn a_posts_length_reaches_the_upstream_once_in_the_writers_words() {
    let request = b"POST /p HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\nX-Tag: 1\r\n\r\n{}";
    let (_, heads) = heads_upstream_reads(ANSWER, "", &[request]).await;
    assert_eq!(
        heads,
        [
            "POST /p HTTP/1.1\r\nHost: m\r\nX-Tag: 1\r\nx-forwarded-for: 127.0.0.1\r\n\
          x-forwarded-proto: http\r\ncontent-length: 2\r\n\r\n"
        ]
    );
}

/// With `preserve_host = false` the request goes from its map: one `Host`, the upstream's.
#[tokio::test]
async fn a_request_whose_host_is_replaced_carries_one_host() {
    let request = b"GET / HTTP/1.1\r\nHost: m\r\nX-Tag: 1\r\n\r\n";
    let (upstream, heads) = heads_upstream_reads(ANSWER, "preserve_host = false", &[request]).await;
    assert_eq!(
        heads,
        [format!(
            "GET / HTTP/1.1\r\nhost: {upstream}\r\nx-tag: 1\r\nx-forwarded-for: 127.0.0.1\r\n\
             x-forwarded-proto: http\r\n\r\n"
        )]
    );
}

/// A gRPC call over HTTP/1.1 keeps `te: trailers` (hop-by-hop, but gRPC's end to end).
#[tokio::test]
async fn a_grpc_call_over_http1_keeps_te_trailers() {
    let reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/grpc\r\ngrpc-status: 0\r\n\
        Content-Length: 0\r\n\r\n";
    let request = b"POST /pkg.Model/Predict HTTP/1.1\r\nHost: m\r\n\
        Content-Type: application/grpc\r\nTE: trailers\r\nContent-Length: 5\r\n\r\n\0\0\0\0\0";
    let (_, heads) = heads_upstream_reads(reply, "", &[request]).await;
    assert_eq!(
        heads,
        [
            "POST /pkg.Model/Predict HTTP/1.1\r\nhost: m\r\ncontent-type: application/grpc\r\n\
          te: trailers\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\
          content-length: 5\r\n\r\n"
        ]
    );
}

/// A client's `X-Forwarded-For` lines go on as one, the client appended; a request without
/// `Host` gets one; and a request whose `Connection` names a field is sent from its map,
/// without that field.
#[tokio::test]
async fn forwarding_and_host_are_added_and_fields_connection_names_dropped() {
    let requests: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: m\r\nX-Forwarded-For: 10.0.0.1\r\nX-Tag: 1\r\n\
          x-forwarded-for: 10.0.0.2\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-Tag: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: m\r\nConnection: x-hop\r\nX-Hop: 1\r\n\
          X-Forwarded-For: 10.0.0.1\r\n\r\n",
    ];
    let (upstream, heads) = heads_upstream_reads(ANSWER, "", &requests).await;
    assert_eq!(
        heads,
        [
            "GET / HTTP/1.1\r\nHost: m\r\nX-Tag: 1\r\n\
             x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\nx-forwarded-proto: http\r\n\r\n"
                .to_owned(),
            format!(
                "GET / HTTP/1.1\r\nhost: {upstream}\r\nX-Tag: 1\r\nx-forwarded-for: 127.0.0.1\r\n\
                 x-forwarded-proto: http\r\n\r\n"
            ),
            "GET / HTTP/1.1\r\nhost: m\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\n\
             x-forwarded-proto: http\r\n\r\n"
                .to_owned(),
        ]
    );
}

/// An answer that must be edited (its `Connection` names a field to drop) is written from a
/// map: it still names the variant once, abproxy's word over the upstream's.
#[tokio::test]
async fn an_edited_answer_names_the_variant_once_and_drops_the_fields_connection_names() {
    let reply = b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nX-Variant: upstream\r\n\
        X-Model-Version: v7\r\nContent-Length: 2\r\n\r\n{}";
    for answer in two_answers_of(reply).await {
        assert_eq!(answer.status, 200);
        assert_eq!(values(&answer, "x-variant"), ["control"]);
        assert_eq!(answer.header("x-model-version"), Some("v7"));
        assert_eq!(answer.header("x-hop"), None);
        assert_eq!(answer.header("connection"), None);
        assert_eq!(answer.body, b"{}");
    }
}

/// hyper's server writes only a response's map: an answer it serves (here to HTTP/1.0)
/// carries the fields all the same.
#[tokio::test]
async fn an_answer_served_by_hyper_carries_the_fields_that_came_with_it() {
    let upstream = answering(FIELDS_AS_SENT).await;
    let proxy = Proxy::in_front_of(&upstream).await;
    let mut wire = Wire::to(&proxy).await;
    wire.send(b"GET / HTTP/1.0\r\nx-user-id: a\r\n\r\n").await;
    let answer = wire.answer(false).await;
    assert_eq!(answer.version, 0, "served by hyper");
    assert_end_to_end_fields_only(&answer);
}

/// An answer of unknown length is chunked; its declared trailers reach a client that said
/// it takes them (`TE: trailers`), and no other.
#[tokio::test]
async fn a_streamed_answer_is_chunked_with_its_trailers_for_clients_that_take_them() {
    let upstream = answering(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
          5\r\nhello\r\n0\r\nx-checksum: 42\r\n\r\n",
    )
    .await;
    let proxy = Proxy::in_front_of(&upstream).await;
    let mut wire = Wire::to(&proxy).await;
    let taking = get("/", "a").replace("\r\n\r\n", "\r\nte: trailers\r\n\r\n");
    wire.send(taking.as_bytes()).await;
    let answer = wire.answer(false).await;
    assert_eq!(answer.header("transfer-encoding"), Some("chunked"));
    assert_eq!(answer.body, b"hello");
    assert_eq!(answer.trailers, ["x-checksum: 42"]);

    wire.send(get("/", "a").as_bytes()).await;
    let answer = wire.answer(false).await;
    assert_eq!(answer.body, b"hello");
    assert!(answer.trailers.is_empty(), "{:?}", answer.trailers);
}

/// The last chunk and the end of a chunked answer often come in one read: the answer is
/// still framed in order.
#[tokio::test]
async fn a_chunked_answer_whose_end_comes_with_its_last_chunk_is_framed_in_order() {
    let reply =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    for answer in two_answers_of(reply).await {
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, b"hello world");
    }
}

/// A target httparse reads and `http` refuses is hyper's 400, and the request pipelined
/// behind it is answered after it.
#[tokio::test]
async fn a_target_that_does_not_parse_is_a_400_before_the_next_request_is_answered() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut wire = Wire::to(&proxy).await;
    let both = [
        "GET {} HTTP/1.1\r\nhost: proxy\r\n\r\n".to_string(),
        get("/next", "a"),
    ]
    .concat();
    wire.send(both.as_bytes()).await;
    assert_eq!(wire.answer(false).await.status, 400);
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn a_content_length_beyond_any_memory_is_refused_not_a_crash() {
    let backend = Backend::start("control").await;
    let proxy = one_variant(&backend, "").await;
    let mut wire = Wire::to(&proxy).await;
    wire.send(b"POST / HTTP/1.1\r\nhost: proxy\r\nx-user-id: a\r\ncontent-length: 18446744073709551615\r\n\r\n").await;
    let answer = wire.answer(false).await;
    assert!((400..500).contains(&answer.status), "{}", answer.status);
    // The proxy serves on.
    let mut wire = Wire::to(&proxy).await;
    wire.send(get("/", "a").as_bytes()).await;
    assert_eq!(wire.answer(false).await.status, 200);
}
