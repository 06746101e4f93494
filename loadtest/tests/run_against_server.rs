//! Runs the load generator against a tiny in-process router on 127.0.0.1 and checks that the
//! report says what the router did.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use loadtest::{Budget, IdSource, Mode, Options, Report, Target};
use tokio::net::TcpListener;

/// How the test router picks a variant.
#[derive(Clone, Copy)]
enum Routing {
    /// `user-n` gets control when n is even, treatment when odd: sticky, like abproxy.
    ByParity,
    /// Each user's requests alternate between the two variants: a broken router.
    Flipping,
    /// Like `ByParity`, but the very first request stalls for 300 ms.
    StallFirst,
}

/// What the router answered, to compare with the report.
#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    requests: AtomicU64,
    answers: Mutex<HashMap<&'static str, u64>>,
    users: Mutex<HashMap<&'static str, HashSet<String>>>,
    body_sizes: Mutex<HashSet<usize>>,
    per_user: Mutex<HashMap<String, u64>>,
    authorizations: Mutex<HashSet<String>>,
}

impl Seen {
    fn answers(&self, variant: &str) -> u64 {
        self.answers
            .lock()
            .expect("lock")
            .get(variant)
            .copied()
            .unwrap_or(0)
    }

    fn users(&self, variant: &str) -> u64 {
        self.users
            .lock()
            .expect("lock")
            .get(variant)
            .map_or(0, |users| users.len() as u64)
    }
}

/// Starts the router on an ephemeral port; it serves until the test's runtime shuts down.
async fn start_router(routing: Routing) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound address");
    let seen = Arc::new(Seen::default());
    let server_seen = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            server_seen.connections.fetch_add(1, Ordering::Relaxed);
            let seen = server_seen.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(request, routing, seen.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

async fn answer(
    request: Request<Incoming>,
    routing: Routing,
    seen: Arc<Seen>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(token) = request.headers().get("authorization") {
        let token = String::from_utf8_lossy(token.as_bytes()).into_owned();
        seen.authorizations.lock().expect("lock").insert(token);
    }
    let header = request
        .headers()
        .get("x-user-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let user = header.or_else(|| {
        seen.body_sizes.lock().expect("lock").insert(body.len());
        let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
        json.get("user_id")?.as_str().map(str::to_owned)
    });
    let Some(user) = user else {
        return Ok(Response::builder()
            .status(400)
            .body(Full::new(Bytes::from("no user id")))
            .expect("static response"));
    };
    let n: u64 = user.trim_start_matches("user-").parse().unwrap_or(0);
    let first = seen.requests.fetch_add(1, Ordering::Relaxed) == 0;
    let turn = match routing {
        Routing::ByParity => 0,
        Routing::StallFirst => {
            if first {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            0
        }
        Routing::Flipping => {
            let mut per_user = seen.per_user.lock().expect("lock");
            let count = per_user.entry(user.clone()).or_default();
            *count += 1;
            *count
        }
    };
    let variant = if (n + turn) % 2 == 0 {
        "control"
    } else {
        "treatment"
    };
    *seen
        .answers
        .lock()
        .expect("lock")
        .entry(variant)
        .or_default() += 1;
    seen.users
        .lock()
        .expect("lock")
        .entry(variant)
        .or_default()
        .insert(user);
    Ok(Response::builder()
        .header("x-variant", variant)
        .body(Full::new(Bytes::from_static(b"{\"prediction\":0.5}")))
        .expect("static response"))
}

fn options(addr: SocketAddr, mode: Mode, requests: u64) -> Options {
    let mut options = Options::new(Target::parse(&format!("http://{addr}/predict")).expect("URL"));
    options.mode = mode;
    options.connections = 8;
    options.budget = Budget {
        requests: Some(requests),
        // A safety net: the runs below need well under a second.
        duration: Some(Duration::from_secs(20)),
    };
    options.timeout = Duration::from_secs(5);
    options.expected = "control=50,treatment=50".parse().expect("split");
    options.seed = 42;
    options
}

fn assert_split_matches(report: &Report, seen: &Seen) {
    for variant in ["control", "treatment"] {
        let row = report
            .split
            .iter()
            .find(|row| row.variant == variant)
            .unwrap_or_else(|| panic!("no row for {variant}: {:?}", report.split));
        assert_eq!(row.requests, seen.answers(variant), "{variant} answers");
        assert_eq!(row.users, seen.users(variant), "{variant} users");
        assert_eq!(row.expected_pct, Some(50.0));
    }
    assert_eq!(report.split.len(), 2, "{:?}", report.split);
}

#[tokio::test]
async fn max_mode_reports_the_split_the_router_made_on_exactly_n_connections() {
    let (addr, seen) = start_router(Routing::ByParity).await;
    let report = loadtest::run(options(addr, Mode::Max, 500))
        .await
        .expect("run");

    assert_eq!((report.requests, report.answers), (500, 500));
    assert_eq!(report.errors_total, 0, "{:?}", report.errors);
    assert_eq!(report.missing_variant_header, 0);
    assert_split_matches(&report, &seen);
    assert_eq!(report.stickiness.violations, 0);
    assert_eq!(
        seen.connections.load(Ordering::Relaxed),
        8,
        "one socket per connection"
    );
    assert!(report
        .latency_us
        .is_some_and(|l| l.p50 <= l.p99 && l.p99 <= l.max));
}

#[tokio::test]
async fn new_connections_mode_opens_a_socket_per_request() {
    let (addr, seen) = start_router(Routing::ByParity).await;
    let mut options = options(addr, Mode::Max, 100);
    options.new_connections = true;
    let report = loadtest::run(options).await.expect("run");

    assert_eq!((report.answers, report.errors_total), (100, 0));
    assert_eq!(seen.connections.load(Ordering::Relaxed), 100);
    assert_eq!(report.connections_opened, 100);
    assert!(report.tls.is_none());
    assert_split_matches(&report, &seen);
}

#[tokio::test]
async fn every_request_carries_the_extra_headers() {
    let (addr, seen) = start_router(Routing::ByParity).await;
    let mut options = options(addr, Mode::Max, 100);
    options.headers = vec![(
        http::HeaderName::from_static("authorization"),
        http::HeaderValue::from_static("Bearer test-token"),
    )];
    let report = loadtest::run(options).await.expect("run");
    assert_eq!(report.answers, 100);
    let tokens = seen.authorizations.lock().expect("lock").clone();
    assert_eq!(tokens, HashSet::from(["Bearer test-token".to_owned()]));
}

#[tokio::test]
async fn rate_mode_with_a_json_body_reports_the_split_and_no_violations() {
    let (addr, seen) = start_router(Routing::ByParity).await;
    let mut options = options(addr, Mode::rate(2000.0).expect("rate"), 500);
    options.id_source = IdSource::Json("user_id".into());
    options.body_size = 1024;
    options.population =
        loadtest::Population::new(200, loadtest::Distribution::Zipf { s: 1.1 }).expect("users");
    let report = loadtest::run(options).await.expect("run");

    assert_eq!((report.requests, report.answers), (500, 500));
    assert_eq!(report.errors_total, 0, "{:?}", report.errors);
    assert_split_matches(&report, &seen);
    assert_eq!(report.stickiness.violations, 0);
    assert_eq!(
        *seen.body_sizes.lock().expect("lock"),
        HashSet::from([1024])
    );
    // 500 requests at 2000/s are scheduled over 250 ms.
    assert!(
        report.elapsed_seconds >= 0.24,
        "elapsed {}",
        report.elapsed_seconds
    );
}

#[tokio::test]
async fn rate_mode_times_requests_from_their_schedule_so_a_stall_is_not_hidden() {
    let (addr, _seen) = start_router(Routing::StallFirst).await;
    let mut options = options(addr, Mode::rate(1000.0).expect("rate"), 400);
    options.connections = 1;
    let report = loadtest::run(options).await.expect("run");

    assert_eq!((report.answers, report.errors_total), (400, 0));
    let latency = report.latency_us.expect("answers");
    // About 300 requests were due during the stall; timed from their due time they waited
    // up to 300 ms, so the median is far above the router's sub-millisecond answer time.
    // Timed from the actual send (coordinated omission), only one request would look slow.
    assert!(latency.p50 > 50_000, "{latency:?}");
    assert!(latency.max >= 290_000, "{latency:?}");
}

#[tokio::test]
async fn a_router_that_flips_users_between_variants_is_reported() {
    let (addr, _seen) = start_router(Routing::Flipping).await;
    let mut options = options(addr, Mode::Max, 500);
    options.population =
        loadtest::Population::new(10, loadtest::Distribution::Uniform).expect("users");
    let report = loadtest::run(options).await.expect("run");

    assert_eq!(report.errors_total, 0, "{:?}", report.errors);
    assert!(report.stickiness.violations > 0);
    // 500 requests over 10 users: every user is seen more than once, so every one flipped.
    assert_eq!(report.stickiness.violations, report.stickiness.users_seen);
    assert!(!report.stickiness.examples.is_empty());
    let checks = loadtest::Checks {
        fail_on_stickiness: true,
        max_error_rate: None,
    };
    assert_eq!(checks.failures(&report).len(), 1);
}

#[tokio::test]
async fn a_closed_port_is_reported_as_connect_errors_not_a_failed_run() {
    // Bind then drop, so the port is (almost certainly) closed.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("address");
    let mut options = options(addr, Mode::Max, 20);
    options.connections = 2;
    let report = loadtest::run(options).await.expect("run");
    assert_eq!(report.requests, 20);
    assert_eq!(report.errors.connect, 20);
    assert_eq!(report.answers, 0);
    assert!(report.latency_us.is_none());
}
