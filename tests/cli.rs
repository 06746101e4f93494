//! The `abproxy` binary: `check`, `assign`, `--help`, and a graceful SIGTERM.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use support::process::{signal, spawn_run};
use support::proxy::with_server;
use support::{spec_bucket, variants, Backend, Client};

fn abproxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_abproxy"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("abproxy runs")
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("abproxy.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

const VALID: &str = r#"
[assignment]
sources = ["header:x-user-id"]

[[variant]]
name = "control"
upstream = "http://127.0.0.1:9101"
weight = 80

[[variant]]
name = "treatment"
upstream = "http://127.0.0.1:9102"
weight = 20
"#;

#[test]
fn check_accepts_a_valid_config_and_prints_the_bucket_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), VALID);
    let output = abproxy(&["check", "--config", &path]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("control") && stdout.contains("0-79"),
        "{stdout}"
    );
    assert!(
        stdout.contains("treatment") && stdout.contains("80-99"),
        "{stdout}"
    );
}

#[test]
fn every_example_config_passes_check() {
    let examples: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
        .expect("config/ exists")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    assert!(!examples.is_empty());
    for example in examples {
        let output = abproxy(&["check", "--config", &example.display().to_string()]);
        assert!(
            output.status.success(),
            "{}: {}",
            example.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Control and treatment at 50 % each, on lines 1 to 8.
macro_rules! two_variants {
    () => {
        "[[variant]]\nname = \"control\"\nupstream = \"http://127.0.0.1:1\"\nweight = 50\n\
         [[variant]]\nname = \"treatment\"\nupstream = \"http://127.0.0.1:2\"\nweight = 50\n"
    };
}

/// Each class of broken config, the line it breaks, and words the error must contain.
const BROKEN: &[(&str, &str, usize, &str)] = &[
    ("bad TOML", "[assignment\n", 1, "expected"),
    ("unknown key", "[limits]\nmax_bodyy = \"1MiB\"\n", 2, "unknown field"),
    ("weights not summing to 100", "[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 60\n[[variant]]\nname = \"b\"\nupstream = \"http://127.0.0.1:2\"\nweight = 30\n", 1, "sum to 90"),
    ("weight not whole in buckets", "[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 99.5\n[[variant]]\nname = \"b\"\nupstream = \"http://127.0.0.1:2\"\nweight = 0.5\n", 4, "whole number of buckets"),
    ("duplicate names", "[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 50\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:2\"\nweight = 50\n", 6, "used twice"),
    ("invalid upstream", "[[variant]]\nname = \"a\"\nupstream = \"ftp://x\"\nweight = 100\n", 3, "http://"),
    ("TLS keys on a plain upstream", "[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\nca = \"ca.pem\"\n", 5, "https:// upstreams only"),
    ("missing upstream CA", "[[variant]]\nname = \"a\"\nupstream = \"https://127.0.0.1:1\"\nweight = 100\nca = \"/nonexistent/ca.pem\"\n", 5, "cannot read /nonexistent/ca.pem"),
    ("client certificate without its key", "[[variant]]\nname = \"a\"\nupstream = \"https://127.0.0.1:1\"\nweight = 100\nclient_cert = \"/nonexistent/c.pem\"\n", 5, "go together"),
    ("h2 over plain TCP", "[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\nprotocol = \"h2\"\n", 5, "use \"h2c\""),
    ("h2c over TLS", "[[variant]]\nname = \"a\"\nupstream = \"https://127.0.0.1:1\"\nweight = 100\nprotocol = \"h2c\"\n", 5, "takes \"h2\""),
    ("unknown protocol", "[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\nprotocol = \"spdy\"\n", 5, "\"http1\", \"h2\" or \"h2c\""),
    ("fallback to nothing", "[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\nfallback = \"b\"\n", 5, "names no [[variant]]"),
    ("fallback to itself", "[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\nfallback = \"a\"\n", 5, "fall back to itself"),
    ("no h2 connections", "[limits]\nh2_connections = 0\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 2, "from 1 to 64"),
    ("invalid source", "[assignment]\nsources = [\"body:x\"]\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 2, "header:NAME"),
    ("bad buckets", "[assignment]\nbuckets = 150\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 2, "multiple of 100"),
    ("bad duration", "[limits]\nrequest_timeout = \"soon\"\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 2, "duration"),
    ("bad size", "[limits]\nmax_body = \"1 parsec\"\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 2, "size"),
    ("bad on_missing", "[assignment]\non_missing = \"maybe\"\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 2, "on_missing"),
    ("bad listen address", "[server]\nlisten = \"localhost\"\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 2, "IP:port"),
    ("TLS without a key", "[server]\n[server.tls]\ncert = \"/nonexistent/cert.pem\"\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 2, "key is missing"),
    ("missing certificate file", "[server]\n[server.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 3, "cannot read /nonexistent/cert.pem"),
    ("typo in [server.tls]", "[server]\n[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_cafile = \"ca.pem\"\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 5, "unknown field"),
    ("listen_plain without TLS", "[server]\nlisten_plain = \"127.0.0.1:8081\"\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 2, "listen_plain"),
    ("zero header timeout", "[limits]\nclient_header_timeout = \"0s\"\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 2, "greater than zero"),
    ("reserved variant header", "[server]\nvariant_header = \"content-length\"\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n", 2, "standard HTTP header"),
    ("canary not a variant", concat!(two_variants!(), "[canary]\nvariant = \"treatmnt\"\nbaseline = \"control\"\n"), 10, "not a [[variant]]"),
    ("canary its own baseline", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"treatment\"\n"), 11, "another variant"),
    ("canary not next to its baseline", "[[variant]]\nname = \"control\"\nupstream = \"http://127.0.0.1:1\"\nweight = 50\n[[variant]]\nname = \"other\"\nupstream = \"http://127.0.0.1:3\"\nweight = 25\n[[variant]]\nname = \"treatment\"\nupstream = \"http://127.0.0.1:2\"\nweight = 25\n[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\n", 14, "next to each other"),
    ("ramp that shrinks", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\nsteps = [10, 5]\n"), 12, "must increase"),
    ("ramp beyond the pool", "[[variant]]\nname = \"other\"\nupstream = \"http://127.0.0.1:3\"\nweight = 60\n[[variant]]\nname = \"control\"\nupstream = \"http://127.0.0.1:1\"\nweight = 30\n[[variant]]\nname = \"treatment\"\nupstream = \"http://127.0.0.1:2\"\nweight = 10\n[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\nsteps = [10, 50]\n", 16, "outside 0 < step <= 40"),
    ("ramp step not whole in buckets", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\nsteps = [0.5, 5]\n"), 12, "whole number of buckets"),
    ("fleet source without its server", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\nsource = \"prometheus\"\n"), 12, "needs prometheus_url"),
    ("prometheus key on the local source", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\nprometheus_url = \"http://prometheus:9090\"\n"), 12, "needs source = \"prometheus\""),
    ("prometheus_url not plain http", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\nsource = \"prometheus\"\nprometheus_url = \"https://prometheus\"\n"), 13, "must be an http:// URL"),
    ("fleet selector on the guard's labels", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\nsource = \"prometheus\"\nprometheus_url = \"http://p:9090\"\nprometheus_selector = 'variant=\"x\"'\n"), 14, "the guard's own"),
    ("fleet source with a sample-ratio test", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\nsource = \"prometheus\"\nprometheus_url = \"http://p:9090\"\n[canary.checks]\nsrm_p_value = 0.001\nmax_error_rate = 0.01\n"), 15, "count requests, not users"),
    ("missing prometheus token file", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\nsource = \"prometheus\"\nprometheus_url = \"http://p:9090\"\nprometheus_token_file = \"/nonexistent/token\"\n"), 14, "cannot read prometheus_token_file"),
    ("error rate over 1", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\n[canary.checks]\nmax_error_rate = 5\n"), 13, "from 0 to 1"),
    ("typo in a check", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\n[canary.checks]\nmax_p99_ration = 1.5\n"), 13, "unknown field"),
    ("webhook not http", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\nwebhook = \"ftp://x\"\n"), 12, "http://"),
    ("prediction not a pointer", concat!("[metrics]\nprediction = \"prediction\"\n", two_variants!()), 2, "JSON pointer"),
    ("prediction buckets out of order", concat!("[metrics]\nprediction_buckets = [1, 0.5]\n", two_variants!()), 2, "ascending"),
    ("drift without a prediction pointer", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\n[canary.checks]\nmax_prediction_psi = 0.1\n"), 13, "needs [metrics] prediction"),
    ("a canary judged on nothing", concat!(two_variants!(), "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\n[canary.checks]\nsrm_p_value = 0\n"), 9, "judges nothing"),
    ("missing admin token file", concat!("[server]\nadmin_token_file = \"/nonexistent/token\"\n", two_variants!()), 2, "admin_token_file"),
    ("absurd queue size", "[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n[[shadow]]\nname = \"s\"\nupstream = \"http://127.0.0.1:2\"\nmax_queue = 9223372036854775807\n", 8, "from 1 to 65536"),
];

#[test]
fn check_rejects_each_class_of_broken_config_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (class, text, line, words) in BROKEN {
        let path = write_config(dir.path(), text);
        let output = abproxy(&["check", "--config", &path]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{class}: {stderr}");
        assert!(
            stderr.contains(&format!("{path}:{line}:")),
            "{class}: expected {path}:{line}: in {stderr}"
        );
        assert!(
            stderr.contains(words),
            "{class}: expected {words:?} in {stderr}"
        );
    }
}

#[test]
fn check_prints_the_fleet_sources_plan_and_its_queries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        dir.path(),
        concat!(
            two_variants!(),
            "[canary]\nvariant = \"treatment\"\nbaseline = \"control\"\ninterval = \"30s\"\n",
            "source = \"prometheus\"\nprometheus_url = \"http://prometheus:9090\"\n",
            "prometheus_selector = 'job=\"abproxy\"'\n",
            "[canary.checks]\nmax_error_rate = 0.01\nmax_p99_ratio = 1.5\n"
        ),
    );
    let output = abproxy(&["check", "--config", &path]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for words in [
        "from 100 requests an arm across the fleet",
        "Prometheus at http://prometheus:9090, queried 5s after each interval ends",
        "sample ratio: not judged",
        "sum by (variant, code, grpc_code) (increase(abproxy_requests_total{variant=~\"treatment|control\",job=\"abproxy\"}[30s]))",
        "histogram_quantile(0.99, sum by (variant, le) (increase(abproxy_response_duration_seconds_bucket{variant=~\"treatment|control\",job=\"abproxy\"}[30s])))",
    ] {
        assert!(stdout.contains(words), "{words:?} not in:\n{stdout}");
    }
}

/// Certificate files that exist but cannot serve: each error names the config line and the
/// file at fault.
#[test]
fn check_rejects_unusable_certificate_files_with_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let first = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let cert = write("server.crt", &first.cert.pem());
    let key = write("server.key", &first.signing_key.serialize_pem());
    let other_key = write("other.key", &other.signing_key.serialize_pem());
    let garbage = write("garbage.pem", "not PEM at all\n");
    let variant = "[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n";
    let cases = [
        ("key of another certificate", format!("cert = {cert:?}\nkey = {other_key:?}\n"), 4, "does not belong to the certificate"),
        ("no certificate in the file", format!("cert = {garbage:?}\nkey = {key:?}\n"), 3, "holds no PEM certificate"),
        ("no key in the file", format!("cert = {cert:?}\nkey = {garbage:?}\n"), 4, "holds no PEM private key"),
        ("client CA that is no certificate", format!("cert = {cert:?}\nkey = {key:?}\nclient_ca = {garbage:?}\n"), 5, "holds no PEM certificate"),
        ("sni entry without its key", format!("cert = {cert:?}\nkey = {key:?}\n[[server.tls.sni]]\nname = \"a.test\"\ncert = {cert:?}\n"), 5, "key is missing"),
        ("sni name that is no DNS name", format!("cert = {cert:?}\nkey = {key:?}\n[[server.tls.sni]]\nname = \"a b\"\ncert = {cert:?}\nkey = {key:?}\n"), 6, "not a DNS name"),
    ];
    for (class, tls, line, words) in cases {
        let path = write_config(
            dir.path(),
            &format!("[server]\n[server.tls]\n{tls}{variant}"),
        );
        let output = abproxy(&["check", "--config", &path]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{class}: {stderr}");
        assert!(
            stderr.contains(&format!("{path}:{line}:")),
            "{class}: expected {path}:{line}: in {stderr}"
        );
        assert!(
            stderr.contains(words),
            "{class}: expected {words:?} in {stderr}"
        );
    }
    let good = write_config(
        dir.path(),
        &format!("[server]\n[server.tls]\ncert = {cert:?}\nkey = {key:?}\n{variant}"),
    );
    let output = abproxy(&["check", "--config", &good]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_rejects_a_config_without_variants() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "[assignment]\nsalt = \"x\"\n");
    let output = abproxy(&["check", "--config", &path]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("at least one [[variant]]"));
}

#[test]
fn check_names_a_missing_file() {
    let output = abproxy(&["check", "--config", "/nonexistent/abproxy.toml"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/abproxy.toml"));
}

#[test]
fn assign_prints_the_spec_rule_for_each_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), VALID);
    let users: Vec<String> = (0..200).map(|n| format!("user-{n}")).collect();
    let mut args = vec!["assign", "--config", &path];
    args.extend(users.iter().map(String::as_str));
    let output = abproxy(&args);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), users.len());
    for (line, user) in lines.iter().zip(&users) {
        let bucket = spec_bucket("", user, 100);
        let variant = if bucket < 80 { "control" } else { "treatment" };
        assert_eq!(*line, format!("{user}\t{variant}\t{bucket}"));
    }
}

#[test]
fn help_explains_every_subcommand() {
    let output = abproxy(&["--help"]);
    let help = String::from_utf8_lossy(&output.stdout);
    for word in ["run", "check", "assign", "demo", "canary", "--log-format"] {
        assert!(help.contains(word), "--help lacks {word}: {help}");
    }
}

#[test]
fn canary_names_an_admin_port_where_nothing_listens() {
    let output = abproxy(&["canary", "status", "--admin", "http://127.0.0.1:1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach the admin port at http://127.0.0.1:1: "),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_zero() {
    let backend = Backend::slow("control", Duration::from_millis(1500)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "{}[limits]\nshutdown_grace = \"10s\"\n{}",
        with_server(""),
        variants(&[("control", &backend, 100.0)])
    );
    let path = write_config(dir.path(), &config);
    let (mut child, addr, admin) = spawn_run(&path);

    let in_flight = tokio::spawn(Client::new(addr).get("/slow").user("alice").try_send());
    support::proxy::eventually(Duration::from_secs(5), || async { backend.count() == 1 }).await;
    signal(&child, "TERM");

    support::proxy::eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    // The admin port stays up while the slow request drains.
    let readiness = Client::new(admin).get("/readyz").send().await;
    assert_eq!(readiness.status, 503, "draining proxies are not ready");
    let reply = in_flight
        .await
        .expect("task")
        .expect("the in-flight request completes");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.model(), "control");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_keep_alive_connections_without_waiting_out_the_grace_period() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let backend = Backend::start("control").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "{}[limits]\nshutdown_grace = \"60s\"\n{}",
        with_server(""),
        variants(&[("control", &backend, 100.0)])
    );
    let path = write_config(dir.path(), &config);
    let (mut child, addr, _admin) = spawn_run(&path);

    // One answered request, then the connection stays open and idle.
    let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    idle.write_all(b"GET / HTTP/1.1\r\nhost: abproxy\r\nx-user-id: alice\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\"model\"") {
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut chunk))
            .await
            .expect("an answer within 5 s")
            .expect("read");
        assert!(
            n > 0,
            "closed before answering: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&chunk[..n]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    signal(&child, "TERM");
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut chunk))
        .await
        .expect("the idle connection is closed well within the 60 s grace period");
    assert_eq!(closed.expect("read"), 0, "EOF, not another answer");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_the_config() {
    let control = Backend::start("control").await;
    let treatment = Backend::start("treatment").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = with_server("");
    let path = write_config(
        dir.path(),
        &format!(
            "{server}{}",
            variants(&[("control", &control, 100.0), ("treatment", &treatment, 0.0)])
        ),
    );
    let (mut child, addr, admin) = spawn_run(&path);
    assert_eq!(
        Client::new(addr)
            .get("/")
            .user("alice")
            .send()
            .await
            .variant(),
        Some("control")
    );

    std::fs::write(
        &path,
        format!(
            "{server}{}",
            variants(&[("control", &control, 0.0), ("treatment", &treatment, 100.0)])
        ),
    )
    .expect("rewrite config");
    signal(&child, "HUP");
    support::proxy::eventually(Duration::from_secs(10), || async {
        Client::new(admin).get("/status").send().await.json()["generation"] == 2
    })
    .await;
    assert_eq!(
        Client::new(addr)
            .get("/")
            .user("alice")
            .send()
            .await
            .variant(),
        Some("treatment")
    );
    child.kill().expect("kill child");
    let _ = child.wait();
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_two_variants_from_its_mock_models() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/demo.toml"))
        .expect("demo config");
    let config = demo
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0")
        .replace("127.0.0.1:9101", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:9102", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:9103", &format!("127.0.0.1:{}", free_port()))
        .replace(
            "demo-shadow.jsonl",
            &dir.path().join("shadow.jsonl").display().to_string(),
        );
    let path = write_config(dir.path(), &config);
    let (mut child, addr, _admin) = support::process::spawn(&["demo", "--config", &path]);
    let client = Client::new(addr);
    let alice = client.get("/predict").user("alice").send().await;
    let user_2 = client.get("/predict").user("user-2").send().await;
    assert_eq!(
        (alice.variant(), alice.model().as_str()),
        (Some("control"), "control")
    );
    assert_eq!(
        (user_2.variant(), user_2.model().as_str()),
        (Some("treatment"), "treatment")
    );
    child.kill().expect("stop demo");
    let _ = child.wait();
}

#[tokio::test]
async fn on_one_cpu_the_default_runtime_is_current_thread_and_threads_overrides_it() {
    let backend = Backend::start("control").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "{}{}",
        with_server(""),
        variants(&[("control", &backend, 100.0)])
    );
    let path = write_config(dir.path(), &config);
    let pinned = |extra: &[&str]| {
        let mut command = Command::new("taskset");
        command
            .args(["--cpu-list", "0", env!("CARGO_BIN_EXE_abproxy")])
            .args(["--log-format", "json", "run", "--config", &path])
            .args(extra);
        support::process::spawn_command(command)
    };
    let (_child, ready) = pinned(&[]);
    assert_eq!(ready["fields"]["runtime"], "current-thread", "{ready}");
    assert_eq!(ready["fields"]["workers"], 1, "{ready}");
    let (_child, ready) = pinned(&["--threads", "3"]);
    assert_eq!(ready["fields"]["runtime"], "multi-thread", "{ready}");
    assert_eq!(ready["fields"]["workers"], 3, "{ready}");
}
