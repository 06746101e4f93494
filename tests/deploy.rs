//! The deployment kit under deploy/: the Prometheus rules pass `promtool check` and their own
//! `promtool test rules` cases; every metric, label and recording rule that the rules, the
//! Grafana dashboard and the Flagger/Argo templates name is one a real abproxy exports (or
//! the rules define); and the Kubernetes manifests agree with the abproxy config they carry.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use abproxy::config::Config;
use serde::Deserialize;
use serde_json::Value;
use support::proxy::{eventually, sample};
use support::{variants, Backend, Proxy};

fn deploy_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(sub)
}

/// The files directly in `dir` whose names end in one of `extensions`, sorted.
fn files(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            path.is_file()
                && path
                    .extension()
                    .and_then(|ext| ext.to_str())
                    .is_some_and(|ext| extensions.contains(&ext))
        })
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no {extensions:?} in {}", dir.display());
    found
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// Every YAML document in `path` (empty ones skipped), as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            let value = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|err| panic!("{}: not YAML: {err}", path.display()));
            serde_json::to_value(value)
                .unwrap_or_else(|err| panic!("{}: not JSON-like: {err}", path.display()))
        })
        .filter(|value| !value.is_null())
        .collect()
}

// ---------------------------------------------------------------------------------------
// promtool

/// Runs a command for at most `limit`, its output going to files (so it never blocks on a
/// full pipe); returns whether it succeeded and what it printed.
fn run_bounded(command: &mut Command, limit: Duration) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let err = dir.path().join("err");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{command:?} starts ({e}); promtool is Debian's `prometheus` package, which .ci/run installs")
        });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let printed = format!(
        "{}{}",
        std::fs::read_to_string(out).unwrap_or_default(),
        std::fs::read_to_string(err).unwrap_or_default()
    );
    (status.success(), printed)
}

fn promtool(args: &[&str], files: &[PathBuf]) {
    let mut command = Command::new("promtool");
    command.args(args).args(files);
    let (ok, printed) = run_bounded(&mut command, Duration::from_secs(60));
    assert!(ok, "promtool {} failed:\n{printed}", args.join(" "));
}

fn rule_files() -> Vec<PathBuf> {
    files(&deploy_dir("prometheus"), &["yml", "yaml"])
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let rules = rule_files();
    promtool(&["check", "rules"], &rules);
    let tests = files(&deploy_dir("prometheus/tests"), &["yml", "yaml"]);
    promtool(&["test", "rules"], &tests);
    // Every alert has a case where it fires and one where it stays silent.
    let tests_text: String = tests.iter().map(|path| read(path)).collect();
    for alert in alert_names() {
        let cases: Vec<&str> = tests_text
            .split("alertname: ")
            .skip(1)
            .filter(|case| case.starts_with(&format!("{alert}\n")))
            .collect();
        let fires = cases.iter().any(|case| case.contains("exp_labels"));
        let silent = cases.iter().any(|case| {
            case.trim_start_matches(&alert)
                .trim()
                .starts_with("exp_alerts: []")
        });
        assert!(
            fires && silent,
            "{alert} needs a promtool case where it fires and one where it stays silent"
        );
    }
}

fn alert_names() -> Vec<String> {
    rule_groups()
        .iter()
        .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|rule| rule["alert"].as_str().map(str::to_owned))
        .collect()
}

/// The groups of every rule file, in file order.
fn rule_groups() -> Vec<Value> {
    rule_files()
        .iter()
        .flat_map(|path| {
            let documents = yaml_documents(path);
            assert_eq!(documents.len(), 1, "{}: one document", path.display());
            documents[0]["groups"]
                .as_array()
                .cloned()
                .unwrap_or_else(|| panic!("{}: no groups", path.display()))
        })
        .collect()
}

/// Checks PromQL syntax with Prometheus's own parser: each expression becomes a recording
/// rule in a scratch file for `promtool check rules`.
fn promtool_parses(expressions: &[(String, String)]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules: Vec<Value> = expressions
        .iter()
        .enumerate()
        .map(
            |(n, (_, expr))| serde_json::json!({"record": format!("check:expr:{n}"), "expr": expr}),
        )
        .collect();
    let file = dir.path().join("expressions.yml");
    let text = serde_json::json!({"groups": [{"name": "expressions", "rules": rules}]});
    std::fs::write(&file, text.to_string()).expect("write rules");
    let mut command = Command::new("promtool");
    command.args(["check", "rules"]).arg(&file);
    let (ok, printed) = run_bounded(&mut command, Duration::from_secs(60));
    let listing: String = expressions
        .iter()
        .enumerate()
        .map(|(n, (place, expr))| format!("check:expr:{n} ({place}): {expr}\n"))
        .collect();
    assert!(
        ok,
        "promtool cannot parse an expression:\n{printed}\n{listing}"
    );
}

// ---------------------------------------------------------------------------------------
// What abproxy exports

/// Series names and their label names, and the values seen for each label, from
/// Prometheus text.
#[derive(Debug, Default)]
struct Exported {
    series: BTreeMap<String, BTreeSet<String>>,
    values: BTreeMap<String, BTreeSet<String>>,
}

impl Exported {
    fn parse(text: &str) -> Exported {
        let mut exported = Exported::default();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            let labels = exported.series.entry(name.to_owned()).or_default();
            if line[name_end..].starts_with('{') {
                for (label, value) in label_pairs(&line[name_end + 1..]) {
                    labels.insert(label.clone());
                    exported.values.entry(label).or_default().insert(value);
                }
            }
        }
        exported
    }

    fn label_names(&self) -> BTreeSet<&str> {
        self.series
            .values()
            .flat_map(|labels| labels.iter().map(String::as_str))
            .collect()
    }

    /// Metric names without the histogram suffixes, as the README's table lists them.
    fn base_names(&self) -> BTreeSet<&str> {
        self.series
            .keys()
            .map(|name| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|base| self.series.contains_key(&format!("{base}_bucket")))
                    .unwrap_or(name)
            })
            .collect()
    }
}

/// `key="value",key="value"}` → pairs, with `\"` and `\\` unescaped.
fn label_pairs(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = text;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches([',', ' ']).to_owned();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = eq + 2 + i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        pairs.push((key, value));
        rest = &rest[end..];
        if rest.starts_with('}') {
            break;
        }
    }
    pairs
}

/// Labels Prometheus itself attaches to every scraped series: the target's `job` and
/// `instance`, and with Kubernetes service discovery (the PodMonitors in deploy/kubernetes)
/// `namespace` and `pod`. The rules aggregate by `job`; the templates select by `namespace`.
const TARGET_LABELS: &[&str] = &["job", "instance", "namespace", "pod"];

/// Labels whose values abproxy fixes: an equality matcher on one of these must name a value
/// abproxy exports (`state="rolled_back"`, `outcome="match"`, `result="error"`...).
const ENUM_LABELS: &[&str] = &["state", "outcome", "result", "kind", "reason", "check"];

/// A scrape of a real abproxy with two variants under a canary guard, a shadow with
/// `compare`, and `[metrics] prediction`, after some traffic: numeric predictions from
/// control, class labels from treatment.
async fn scrape_a_running_abproxy() -> Exported {
    let control = Backend::start("control").await;
    let treatment =
        Backend::raw("treatment", "{\"prediction\": \"cat\"}", "application/json").await;
    let candidate = Backend::predicting("candidate", 0.7).await;
    let config = format!(
        "[metrics]\nprediction = \"/prediction\"\n\n{}\
         [[shadow]]\nname = \"candidate\"\nupstream = \"{}\"\ncompare = \"/prediction\"\n\n\
         [canary]\nvariant = \"treatment\"\nbaseline = \"control\"\ninterval = \"100ms\"\n\
         [canary.checks]\nmax_error_rate = 0.01\n",
        variants(&[("control", &control, 50.0), ("treatment", &treatment, 50.0)]),
        candidate.url()
    );
    let proxy = Proxy::start(&config).await;
    for n in 0..40 {
        proxy
            .client
            .get("/predict")
            .user(&format!("user-{n}"))
            .send()
            .await;
    }
    // A gRPC call (answered without a `grpc-status`: counted `Unknown`): a `grpc_code` series.
    proxy
        .client
        .post("/predict", "")
        .user("grpc-user")
        .header("content-type", "application/grpc")
        .send()
        .await;
    // Refused before assignment: a `variant="none"` series.
    proxy
        .client
        .get("/predict")
        .header("x-user-id", "")
        .send()
        .await;
    let ready = |text: &str| {
        sample(text, "abproxy_canary_checks_total", &[]) >= 1.0
            && sample(text, "abproxy_shadow_comparisons_total", &[]) >= 1.0
            && sample(text, "abproxy_prediction_class_total", &[]) >= 1.0
            && sample(text, "abproxy_prediction_count", &[]) >= 1.0
    };
    eventually(Duration::from_secs(10), || async {
        ready(&proxy.metrics().await)
    })
    .await;
    let text = proxy.metrics().await;
    proxy.stop().await;
    // The TLS listener's series come from an abproxy that terminates TLS.
    let pki = support::tls::Pki::new();
    let (cert, key) = pki.write_pair("server", &pki.server(&["localhost"]));
    let tls = Proxy::start_with_server(
        &support::tls::tls_section(&cert, &key, ""),
        &variants(&[("control", &control, 100.0)]),
    )
    .await;
    let tls_text = tls.metrics().await;
    tls.stop().await;
    Exported::parse(&format!("{text}\n{tls_text}"))
}

// ---------------------------------------------------------------------------------------
// Names in PromQL

/// What one expression names: selectors (a metric or recording rule with the labels of its
/// own matchers), labels in `by`/`on`/... clauses, and `label="value"` equalities.
#[derive(Debug, Default)]
struct Names {
    selectors: Vec<(String, Vec<String>)>,
    labels: Vec<String>,
    equalities: Vec<(String, String)>,
}

/// PromQL's functions and aggregations that the kit may use.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "count_values",
    "delta",
    "deriv",
    "exp",
    "floor",
    "group",
    "histogram_quantile",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "predict_linear",
    "quantile",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sort",
    "sort_desc",
    "sqrt",
    "stddev",
    "stdvar",
    "sum",
    "sum_over_time",
    "time",
    "timestamp",
    "topk",
    "vector",
];
const CLAUSES: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset", "inf", "nan"];

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Matchers(Vec<(String, String, String)>),
    Open,
    Close,
    Other,
}

fn tokens(expr: &str) -> Result<Vec<Token>, String> {
    // Go templates of Flagger (`{{ namespace }}`) and Argo (`{{args.variant}}`) stand for
    // values: drop them.
    let mut text = String::new();
    let mut rest = expr;
    while let Some(start) = rest.find("{{") {
        text.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .ok_or_else(|| format!("unclosed template in {expr:?}"))?;
        rest = &rest[start + end + 2..];
    }
    text.push_str(rest);

    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i)?;
            out.push(Token::Other);
        } else if c == '[' {
            // a range or subquery: durations, Grafana's $__rate_interval
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            let mut matchers = Vec::new();
            i += 1;
            loop {
                while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
                    i += 1;
                }
                if i >= chars.len() {
                    return Err(format!("unclosed matchers in {expr:?}"));
                }
                if chars[i] == '}' {
                    i += 1;
                    break;
                }
                let start = i;
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
                let label: String = chars[start..i].iter().collect();
                while i < chars.len() && chars[i].is_whitespace() {
                    i += 1;
                }
                let op_start = i;
                while i < chars.len() && "=!~".contains(chars[i]) {
                    i += 1;
                }
                let op: String = chars[op_start..i].iter().collect();
                while i < chars.len() && chars[i].is_whitespace() {
                    i += 1;
                }
                if label.is_empty() || op.is_empty() || i >= chars.len() || chars[i] != '"' {
                    return Err(format!("unreadable matcher in {expr:?}"));
                }
                let end = skip_string(&chars, i)?;
                let value: String = chars[i + 1..end - 1].iter().collect();
                i = end;
                matchers.push((label, op, value));
            }
            out.push(Token::Matchers(matchers));
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                let exponent = chars[i] == 'e' || chars[i] == 'E';
                i += 1;
                if exponent && i < chars.len() && (chars[i] == '-' || chars[i] == '+') {
                    i += 1;
                }
            }
            out.push(Token::Other);
        } else if c == '$' {
            // a Grafana variable outside a string
            i += 1;
            while i < chars.len() && (ident_char(chars[i]) || chars[i] == '{' || chars[i] == '}') {
                i += 1;
            }
            out.push(Token::Other);
        } else if ident_start(c) {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c == '(' {
            out.push(Token::Open);
            i += 1;
        } else if c == ')' {
            out.push(Token::Close);
            i += 1;
        } else if "+-*/%^=!<>,".contains(c) {
            out.push(Token::Other);
            i += 1;
        } else {
            return Err(format!("unexpected {c:?} in {expr:?}"));
        }
    }
    Ok(out)
}

/// The index just past the string literal that starts at `start`.
fn skip_string(chars: &[char], start: usize) -> Result<usize, String> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
        } else if chars[i] == quote {
            return Ok(i + 1);
        } else {
            i += 1;
        }
    }
    Err("unclosed string".into())
}

/// The names one PromQL expression uses; an identifier that is no function, keyword,
/// metric or recording rule is an error, so a misspelled function is caught too.
fn names_in(expr: &str) -> Result<Names, String> {
    let tokens = tokens(expr)?;
    let mut names = Names::default();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Ident(word) if CLAUSES.contains(&word.as_str()) => {
                if tokens.get(i + 1) == Some(&Token::Open) {
                    i += 2;
                    while i < tokens.len() && tokens[i] != Token::Close {
                        match &tokens[i] {
                            Token::Ident(label) => names.labels.push(label.clone()),
                            Token::Other => {}
                            other => {
                                return Err(format!("{other:?} in a {word} clause of {expr:?}"))
                            }
                        }
                        i += 1;
                    }
                }
            }
            Token::Ident(word) if KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) => {}
            // `sum by (variant) (...)`: an aggregation with its clause first
            Token::Ident(word)
                if FUNCTIONS.contains(&word.as_str())
                    && matches!(tokens.get(i + 1), Some(Token::Ident(next)) if next == "by" || next == "without") =>
                {}
            Token::Ident(word) if tokens.get(i + 1) == Some(&Token::Open) => {
                if !FUNCTIONS.contains(&word.as_str()) {
                    return Err(format!("unknown function {word} in {expr:?}"));
                }
            }
            Token::Ident(word) => {
                let mut labels = Vec::new();
                if let Some(Token::Matchers(matchers)) = tokens.get(i + 1) {
                    for (label, op, value) in matchers {
                        labels.push(label.clone());
                        if op == "=" {
                            names.equalities.push((label.clone(), value.clone()));
                        }
                    }
                    i += 1;
                }
                names.selectors.push((word.clone(), labels));
            }
            Token::Matchers(matchers) => {
                for (label, op, value) in matchers {
                    names.labels.push(label.clone());
                    if op == "=" {
                        names.equalities.push((label.clone(), value.clone()));
                    }
                }
            }
            Token::Open | Token::Close | Token::Other => {}
        }
        i += 1;
    }
    Ok(names)
}

/// `{{variant}}` in a Grafana legend, `{{ $labels.variant }}` in an alert annotation.
fn template_labels(text: &str) -> Vec<String> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(end) = rest[start..].find("}}") else {
            break;
        };
        let inner = rest[start + 2..start + end].trim();
        let inner = inner.split('|').next().unwrap_or_default().trim();
        if let Some(label) = inner.strip_prefix("$labels.") {
            labels.push(label.to_owned());
        } else if inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !inner.is_empty()
        {
            labels.push(inner.to_owned());
        }
        rest = &rest[start + end + 2..];
    }
    labels
}

/// Where names are used: PromQL expressions and label templates, each with its place.
#[derive(Debug, Default)]
struct Uses {
    expressions: Vec<(String, String)>,
    templates: Vec<(String, String)>,
    /// Grafana's `label_values(SELECTOR, LABEL)` variable queries.
    label_values: Vec<(String, String, String)>,
}

/// Checks every use against what abproxy exports and what the rules record; returns one
/// line per problem.
fn problems(uses: &Uses, exported: &Exported, recorded: &BTreeSet<String>) -> Vec<String> {
    let label_names = exported.label_names();
    let known_label = |label: &str| {
        label_names.contains(label) || TARGET_LABELS.contains(&label) || label == "__name__"
    };
    let mut problems = Vec::new();
    let check_expr = |place: &str, expr: &str, problems: &mut Vec<String>| {
        let names = match names_in(expr) {
            Ok(names) => names,
            Err(err) => {
                problems.push(format!("{place}: {err}"));
                return;
            }
        };
        for (name, labels) in &names.selectors {
            if name.contains(':') {
                if !recorded.contains(name) {
                    problems.push(format!(
                        "{place}: {name} is not a recording rule of deploy/prometheus"
                    ));
                }
                for label in labels.iter().filter(|label| !known_label(label)) {
                    problems.push(format!(
                        "{place}: label {label} of {name} is not one abproxy exports"
                    ));
                }
            } else if let Some(exported_labels) = exported.series.get(name) {
                for label in labels.iter().filter(|label| {
                    !exported_labels.contains(*label) && !TARGET_LABELS.contains(&label.as_str())
                }) {
                    problems.push(format!(
                        "{place}: {name} has no label {label} (it has {exported_labels:?})"
                    ));
                }
            } else {
                problems.push(format!("{place}: abproxy exports no metric {name}"));
            }
        }
        for label in names.labels.iter().filter(|label| !known_label(label)) {
            problems.push(format!("{place}: abproxy exports no label {label}"));
        }
        for (label, value) in &names.equalities {
            let fixed = ENUM_LABELS.contains(&label.as_str());
            if fixed
                && !exported
                    .values
                    .get(label)
                    .is_some_and(|values| values.contains(value))
            {
                problems.push(format!(
                    "{place}: abproxy never exports {label}=\"{value}\""
                ));
            }
        }
    };
    for (place, expr) in &uses.expressions {
        check_expr(place, expr, &mut problems);
    }
    for (place, selector, label) in &uses.label_values {
        check_expr(place, selector, &mut problems);
        if !known_label(label) {
            problems.push(format!("{place}: abproxy exports no label {label}"));
        }
    }
    for (place, text) in &uses.templates {
        for label in template_labels(text)
            .iter()
            .filter(|label| !known_label(label))
        {
            problems.push(format!(
                "{place}: template names label {label}, which abproxy does not export"
            ));
        }
    }
    problems
}

/// The recording rules' names, and every expression and annotation of the rule files.
fn rule_uses(uses: &mut Uses) -> BTreeSet<String> {
    let mut recorded = BTreeSet::new();
    for group in rule_groups() {
        let group_name = group["name"].as_str().unwrap_or_default().to_owned();
        for rule in group["rules"].as_array().cloned().unwrap_or_default() {
            let name = rule["record"]
                .as_str()
                .or(rule["alert"].as_str())
                .unwrap_or_default()
                .to_owned();
            if let Some(record) = rule["record"].as_str() {
                recorded.insert(record.to_owned());
            }
            let place = format!("deploy/prometheus group {group_name} rule {name}");
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            uses.expressions.push((place.clone(), expr.to_owned()));
            for field in ["annotations", "labels"] {
                if let Some(map) = rule[field].as_object() {
                    for (key, text) in map {
                        let text = text.as_str().unwrap_or_default().to_owned();
                        uses.templates
                            .push((format!("{place} {field}.{key}"), text));
                    }
                }
            }
        }
    }
    recorded
}

/// Every expression, legend and variable query of the Grafana dashboards.
fn dashboard_uses(uses: &mut Uses) {
    fn walk(value: &Value, place: &str, uses: &mut Uses) {
        match value {
            Value::Object(map) => {
                let place = match map.get("title").and_then(Value::as_str) {
                    Some(title) => format!("{place} \"{title}\""),
                    None => place.to_owned(),
                };
                for (key, child) in map {
                    match (key.as_str(), child) {
                        ("expr", Value::String(expr)) => {
                            uses.expressions.push((place.clone(), expr.clone()));
                        }
                        ("legendFormat" | "textFormat" | "titleFormat", Value::String(text)) => {
                            uses.templates.push((place.clone(), text.clone()));
                        }
                        _ => walk(child, &place, uses),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| walk(item, place, uses)),
            _ => {}
        }
    }
    for path in files(&deploy_dir("grafana"), &["json"]) {
        let dashboard: Value = serde_json::from_str(&read(&path))
            .unwrap_or_else(|err| panic!("{}: not JSON: {err}", path.display()));
        let place = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        walk(&dashboard["panels"], &place, uses);
        walk(&dashboard["annotations"], &place, uses);
        let variables = dashboard["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            variables
                .iter()
                .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
            "{place}: needs a Prometheus datasource variable"
        );
        for variable in variables.iter().filter(|v| v["type"] == "query") {
            let query = variable["query"]["query"]
                .as_str()
                .or(variable["query"].as_str())
                .unwrap_or_default();
            let place = format!("{place} variable {}", variable["name"]);
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| {
                    panic!("{place}: expected label_values(SELECTOR, LABEL), got {query}")
                });
            let (selector, label) = inner
                .rsplit_once(',')
                .unwrap_or_else(|| panic!("{place}: expected label_values(SELECTOR, LABEL)"));
            uses.label_values
                .push((place, selector.trim().to_owned(), label.trim().to_owned()));
        }
        // Every panel with queries reads from the datasource variable.
        for panel in dashboard["panels"].as_array().cloned().unwrap_or_default() {
            if panel["targets"].is_array() {
                assert_eq!(
                    panel["datasource"]["uid"], "${datasource}",
                    "{place}: panel {} must use the datasource variable",
                    panel["title"]
                );
            }
        }
    }
}

/// The queries of the Flagger MetricTemplates and Argo Rollouts AnalysisTemplates.
fn template_uses(uses: &mut Uses) -> (usize, usize) {
    let (mut flagger, mut argo) = (0, 0);
    for path in kubernetes_files() {
        for document in yaml_documents(&path) {
            let name = document["metadata"]["name"].as_str().unwrap_or_default();
            match document["kind"].as_str() {
                Some("MetricTemplate") => {
                    let query = document["spec"]["query"]
                        .as_str()
                        .expect("MetricTemplate query");
                    uses.expressions
                        .push((format!("MetricTemplate {name}"), query.to_owned()));
                    flagger += 1;
                }
                Some("AnalysisTemplate" | "ClusterAnalysisTemplate") => {
                    for metric in document["spec"]["metrics"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                    {
                        if let Some(query) = metric["provider"]["prometheus"]["query"].as_str() {
                            let place =
                                format!("AnalysisTemplate {name} metric {}", metric["name"]);
                            uses.expressions.push((place, query.to_owned()));
                            argo += 1;
                        }
                    }
                }
                _ => {}
            }
        }
    }
    (flagger, argo)
}

/// Placeholders of Grafana and the Go templates of Flagger and Argo, replaced by values so
/// that Prometheus's parser can read the expression.
fn with_placeholders_filled(expr: &str) -> String {
    let mut text = expr
        .replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$__interval", "1m");
    while let Some(start) = text.find("{{") {
        let Some(end) = text[start..].find("}}") else {
            break;
        };
        let inner = text[start + 2..start + end].trim().to_owned();
        let value = if inner == "interval" { "5m" } else { "x" };
        text.replace_range(start..start + end + 2, value);
    }
    text
}

#[tokio::test]
async fn the_rules_dashboard_and_templates_name_only_what_abproxy_exports() {
    let exported = scrape_a_running_abproxy().await;
    // The scrape itself has what the kit relies on.
    let bases = exported.base_names();
    for name in [
        "abproxy_requests_total",
        "abproxy_request_duration_seconds",
        "abproxy_variant_weight_percent",
        "abproxy_canary_weight_percent",
        "abproxy_canary_state",
        "abproxy_canary_rollbacks_total",
        "abproxy_canary_checks_total",
        "abproxy_shadow_comparisons_total",
        "abproxy_prediction",
        "abproxy_prediction_class_total",
        "abproxy_config_reloads_total",
        "abproxy_tls_certificate_expiry_timestamp_seconds",
    ] {
        assert!(
            bases.contains(name),
            "{name} missing from the scrape: {bases:?}"
        );
    }

    let mut uses = Uses::default();
    let recorded = rule_uses(&mut uses);
    let rules_end = uses.expressions.len();
    dashboard_uses(&mut uses);
    let (flagger, argo) = template_uses(&mut uses);
    assert!(
        flagger >= 1 && argo >= 1,
        "a Flagger MetricTemplate and an Argo AnalysisTemplate"
    );
    assert!(
        uses.expressions[rules_end..]
            .iter()
            .any(|(_, expr)| recorded.iter().any(|rule| expr.contains(rule.as_str()))),
        "the dashboard reads the recording rules"
    );

    let problems = problems(&uses, &exported, &recorded);
    assert!(
        problems.is_empty(),
        "names abproxy does not export:\n{}\n\nabproxy exports: {:?}",
        problems.join("\n"),
        exported.series.keys().collect::<Vec<_>>()
    );
    // The dashboard's and templates' expressions are valid PromQL (the rules' are checked by
    // promtool with the rules).
    let others: Vec<(String, String)> = uses.expressions[rules_end..]
        .iter()
        .map(|(place, expr)| (place.clone(), with_placeholders_filled(expr)))
        .collect();
    promtool_parses(&others);
}

#[test]
fn the_name_check_catches_made_up_names() {
    let exported = Exported::parse(
        "# TYPE abproxy_requests_total counter\n\
         abproxy_requests_total{variant=\"control\",code=\"200\"} 3\n\
         abproxy_canary_state{variant=\"treatment\",state=\"running\"} 1\n\
         abproxy_request_duration_seconds_bucket{variant=\"control\",le=\"0.1\"} 3\n\
         abproxy_request_duration_seconds_sum{variant=\"control\"} 0.01\n\
         abproxy_request_duration_seconds_count{variant=\"control\"} 3\n",
    );
    assert!(exported
        .base_names()
        .contains("abproxy_request_duration_seconds"));
    let recorded: BTreeSet<String> = ["variant:abproxy_requests:rate5m".to_owned()].into();
    let check = |expr: &str| {
        let uses = Uses {
            expressions: vec![("test".into(), expr.into())],
            ..Uses::default()
        };
        problems(&uses, &exported, &recorded)
    };
    // What abproxy exports passes.
    for good in [
        "sum by (job, variant) (rate(abproxy_requests_total{code=~\"5..|499\"}[5m]))",
        "histogram_quantile(0.99, sum by (variant, le) (rate(abproxy_request_duration_seconds_bucket[5m])))",
        "variant:abproxy_requests:rate5m{variant!=\"none\"} > 0.1",
        "max(abproxy_canary_state{namespace=\"{{ namespace }}\", state=\"running\"}) or vector(0)",
        "rate(abproxy_requests_total{variant=\"{{args.variant}}\"}[{{ interval }}])",
    ] {
        assert_eq!(check(good), Vec::<String>::new(), "{good}");
    }
    // Each made-up name is caught.
    for (bad, why) in [
        (
            "rate(abproxy_made_up_total[5m])",
            "no metric abproxy_made_up_total",
        ),
        (
            "abproxy_response_duration_seconds_bucket",
            "no metric abproxy_response_duration_seconds_bucket",
        ),
        (
            "sum(abproxy_requests_total{flavour=\"x\"})",
            "has no label flavour",
        ),
        ("abproxy_canary_state{code=\"200\"}", "has no label code"),
        (
            "sum by (flavour) (abproxy_requests_total)",
            "no label flavour",
        ),
        (
            "x / on (flavour) group_left abproxy_requests_total",
            "no label flavour",
        ),
        ("variant:abproxy_nope:rate5m", "not a recording rule"),
        (
            "abproxy_canary_state{state=\"exploded\"}",
            "never exports state=\"exploded\"",
        ),
        ("rat(abproxy_requests_total[5m])", "unknown function rat"),
    ] {
        let found = check(bad);
        assert!(
            found.iter().any(|problem| problem.contains(why)),
            "{bad}: expected a problem with {why:?}, got {found:?}"
        );
    }
    let uses = Uses {
        templates: vec![
            ("legend".into(), "{{variant}} {{flavour}}".into()),
            (
                "annotation".into(),
                "{{ $labels.variant }} {{ $labels.colour }} {{ $value | humanize }}".into(),
            ),
        ],
        label_values: vec![(
            "variable".into(),
            "abproxy_requests_total".into(),
            "shade".into(),
        )],
        ..Uses::default()
    };
    let found = problems(&uses, &exported, &recorded);
    for label in ["flavour", "colour", "shade"] {
        assert!(
            found.iter().any(|problem| problem.contains(label)),
            "{label} not caught: {found:?}"
        );
    }
    assert_eq!(found.len(), 3, "{found:?}");
}

// ---------------------------------------------------------------------------------------
// Kubernetes manifests

fn kubernetes_files() -> Vec<PathBuf> {
    files(&deploy_dir("kubernetes"), &["yaml", "yml"])
}

/// Kinds whose pod template runs containers.
const WORKLOADS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet", "Rollout"];

fn string_map(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .map(|map| {
            map.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// A selector's labels all on the pod.
fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A port given by number or by the name of one of `ports` (a container's).
fn port_number(port: &Value, ports: &[Value]) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(name) => ports
            .iter()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .and_then(|n| u16::try_from(n).ok()),
        _ => None,
    }
}

fn prestop_sleep(container: &Value) -> u64 {
    container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .unwrap_or(0)
}

fn config_path(container: &Value) -> Option<String> {
    let args: Vec<&str> = container["args"]
        .as_array()
        .into_iter()
        .chain(container["command"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    args.iter()
        .position(|arg| *arg == "--config" || *arg == "-c")
        .and_then(|at| args.get(at + 1).map(|path| (*path).to_owned()))
        .or_else(|| {
            args.iter()
                .find_map(|arg| arg.strip_prefix("--config=").map(str::to_owned))
        })
}

/// Checks one workload's abproxy container against the config in its ConfigMap; returns
/// how many abproxy containers it had.
fn check_workload(file: &str, workload: &Value, documents: &[Value], scratch: &Path) -> usize {
    let name = workload["metadata"]["name"].as_str().unwrap_or_default();
    let place = format!(
        "{file}: {} {name}",
        workload["kind"].as_str().unwrap_or_default()
    );
    let template = &workload["spec"]["template"];
    let pod_labels = string_map(&template["metadata"]["labels"]);
    let selector = string_map(&workload["spec"]["selector"]["matchLabels"]);
    assert!(
        selects(&selector, &pod_labels),
        "{place}: its selector must match its pod labels"
    );
    let pod = &template["spec"];
    let containers = pod["containers"].as_array().cloned().unwrap_or_default();
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    let mut found = 0;
    for container in containers.iter().filter(|c| {
        c["image"]
            .as_str()
            .is_some_and(|image| image.contains("abproxy"))
    }) {
        found += 1;
        let place = format!("{place} container {}", container["name"]);
        let args: Vec<&str> = container["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            args.contains(&"run"),
            "{place}: runs `abproxy run`, has args {args:?}"
        );
        let config = config_path(container).unwrap_or_else(|| panic!("{place}: no --config"));
        let config = Path::new(&config);

        // The ConfigMap is mounted as a directory holding the config file.
        let mounts = container["volumeMounts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mount = mounts
            .iter()
            .find(|m| {
                m["mountPath"]
                    .as_str()
                    .is_some_and(|dir| config.parent() == Some(Path::new(dir)))
            })
            .unwrap_or_else(|| {
                panic!(
                    "{place}: nothing is mounted at the directory of {}",
                    config.display()
                )
            });
        assert!(
            mount.get("subPath").is_none() && mount.get("subPathExpr").is_none(),
            "{place}: the config must be mounted as a directory, not with subPath: a subPath mount never sees ConfigMap updates"
        );
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{place}: no volume {}", mount["name"]));
        let map_name = volume["configMap"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{place}: the config volume must be a ConfigMap"));
        let file_name = config
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let key = volume["configMap"]["items"]
            .as_array()
            .and_then(|items| items.iter().find(|item| item["path"] == file_name))
            .and_then(|item| item["key"].as_str())
            .unwrap_or(file_name);
        let config_map = documents
            .iter()
            .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == map_name)
            .unwrap_or_else(|| panic!("{place}: ConfigMap {map_name} is not in {file}"));
        let text = config_map["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{place}: ConfigMap {map_name} has no key {key}"));

        // abproxy's own loader and `abproxy check` take it.
        let dir = scratch.join(format!("{file}-{name}-{found}"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let path = dir.join(file_name);
        std::fs::write(&path, text).expect("write config");
        let loaded = Config::load(&path)
            .unwrap_or_else(|err| panic!("{place}: the ConfigMap's config does not load: {err}"))
            .config;
        let output = Command::new(env!("CARGO_BIN_EXE_abproxy"))
            .args(["check", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .output()
            .expect("abproxy check runs");
        assert!(
            output.status.success(),
            "{place}: abproxy check refuses the ConfigMap's config: {}",
            String::from_utf8_lossy(&output.stderr)
        );

        // Ports: reachable on the pod's address, and declared.
        let server = &loaded.server;
        for (what, addr) in [("listen", server.listen), ("admin", server.admin)] {
            assert!(
                addr.ip().is_unspecified(),
                "{place}: [server] {what} = {addr} must listen on 0.0.0.0 to be reached on the pod's address"
            );
        }
        let ports = container["ports"].as_array().cloned().unwrap_or_default();
        let declared: BTreeSet<u16> = ports
            .iter()
            .filter_map(|p| p["containerPort"].as_u64())
            .filter_map(|p| u16::try_from(p).ok())
            .collect();
        let (listen, admin) = (server.listen.port(), server.admin.port());
        assert!(
            declared.contains(&listen) && declared.contains(&admin),
            "{place}: containerPorts {declared:?} must include listen {listen} and admin {admin}"
        );

        // Probes on the admin port.
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{place}: {probe} path");
            assert_eq!(
                port_number(&get["port"], &ports),
                Some(admin),
                "{place}: {probe} must probe the admin port {admin}"
            );
        }

        // Draining finishes before the kubelet kills.
        let grace = loaded.limits.shutdown_grace.as_secs_f64();
        let own_sleep = prestop_sleep(container);
        let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        assert!(
            termination as f64 > own_sleep as f64 + grace,
            "{place}: terminationGracePeriodSeconds {termination} must exceed the preStop sleep {own_sleep} s plus shutdown_grace {grace} s"
        );
        for other in containers.iter().filter(|c| c["name"] != container["name"]) {
            let sleep = prestop_sleep(other);
            assert!(
                sleep as f64 >= own_sleep as f64 + grace && termination > sleep,
                "{place}: container {} must keep serving while abproxy drains (preStop sleep {sleep} s, at least {} s) and stop within terminationGracePeriodSeconds {termination}",
                other["name"],
                own_sleep as f64 + grace
            );
        }

        // Files abproxy writes live on writable volumes.
        let writable: Vec<&str> = mounts
            .iter()
            .filter(|m| m["readOnly"] != true)
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        let written = loaded
            .canary
            .iter()
            .filter_map(|canary| canary.state_file.clone())
            .chain(
                loaded
                    .shadows
                    .iter()
                    .filter_map(|shadow| shadow.log.clone()),
            );
        for file in written {
            assert!(
                writable.iter().any(|dir| file.starts_with(dir)),
                "{place}: {} is written by abproxy and must be on a writable volume ({writable:?})",
                file.display()
            );
        }

        // A Service sends traffic to the listen port, a Pod/ServiceMonitor scrapes the admin
        // port.
        let services: Vec<&Value> = documents
            .iter()
            .filter(|d| {
                d["kind"] == "Service" && selects(&string_map(&d["spec"]["selector"]), &pod_labels)
            })
            .collect();
        assert!(!services.is_empty(), "{place}: no Service selects its pods");
        for service in &services {
            for port in service["spec"]["ports"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let target = port.get("targetPort").unwrap_or(&port["port"]);
                assert_eq!(
                    port_number(target, &ports),
                    Some(listen),
                    "{place}: Service {} port {} must reach the listen port {listen}",
                    service["metadata"]["name"],
                    port["name"]
                );
            }
        }
        let mut scraped = false;
        for monitor in documents.iter().filter(|d| d["kind"] == "PodMonitor") {
            if selects(
                &string_map(&monitor["spec"]["selector"]["matchLabels"]),
                &pod_labels,
            ) {
                for endpoint in monitor["spec"]["podMetricsEndpoints"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    assert_eq!(
                        port_number(&endpoint["port"], &ports),
                        Some(admin),
                        "{place}: PodMonitor port"
                    );
                    assert!(endpoint["path"].is_null() || endpoint["path"] == "/metrics");
                    scraped = true;
                }
            }
        }
        for monitor in documents.iter().filter(|d| d["kind"] == "ServiceMonitor") {
            for service in services.iter().filter(|s| {
                selects(
                    &string_map(&monitor["spec"]["selector"]["matchLabels"]),
                    &string_map(&s["metadata"]["labels"]),
                )
            }) {
                for endpoint in monitor["spec"]["endpoints"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    let service_port = service["spec"]["ports"]
                        .as_array()
                        .and_then(|ports| ports.iter().find(|p| p["name"] == endpoint["port"]))
                        .unwrap_or_else(|| {
                            panic!("{place}: ServiceMonitor port {}", endpoint["port"])
                        });
                    let target = service_port
                        .get("targetPort")
                        .unwrap_or(&service_port["port"]);
                    assert_eq!(
                        port_number(target, &ports),
                        Some(admin),
                        "{place}: ServiceMonitor port"
                    );
                    scraped = true;
                }
            }
        }
        assert!(
            scraped,
            "{place}: no PodMonitor or ServiceMonitor scrapes the admin port"
        );
    }
    found
}

#[test]
fn the_kubernetes_manifests_agree_with_the_abproxy_config_they_carry() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut kinds = BTreeSet::new();
    let mut abproxy_containers = 0;
    for path in kubernetes_files() {
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let documents = yaml_documents(&path);
        assert!(!documents.is_empty(), "{file}: no documents");
        for document in &documents {
            for field in ["apiVersion", "kind"] {
                assert!(
                    document[field].as_str().is_some_and(|v| !v.is_empty()),
                    "{file}: a document without {field}: {document}"
                );
            }
            let kind = document["kind"].as_str().unwrap_or_default();
            let name = document["metadata"]["name"].as_str().unwrap_or_default();
            assert!(
                !name.is_empty()
                    && name.len() <= 63
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !name.starts_with('-')
                    && !name.ends_with('-'),
                "{file}: {kind} needs a metadata.name that is a DNS label, has {name:?}"
            );
            kinds.insert(kind.to_owned());
            if WORKLOADS.contains(&kind) {
                abproxy_containers += check_workload(&file, document, &documents, scratch.path());
            }
            if kind == "PrometheusRule" {
                let by_name = |groups: Vec<Value>| -> BTreeMap<String, Value> {
                    groups
                        .into_iter()
                        .map(|group| (group["name"].as_str().unwrap_or_default().to_owned(), group))
                        .collect()
                };
                let held = by_name(
                    document["spec"]["groups"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                );
                let files = by_name(rule_groups());
                let differing: Vec<&String> = held
                    .keys()
                    .chain(files.keys())
                    .filter(|name| held.get(*name) != files.get(*name))
                    .collect();
                assert!(
                    differing.is_empty(),
                    "{file}: groups {differing:?} differ from deploy/prometheus's rules: run `sh deploy/kubernetes/prometheus-rule.sh > deploy/kubernetes/prometheus-rule.yaml`"
                );
            }
        }
    }
    assert!(abproxy_containers >= 2, "a sidecar and an ingress example");
    for kind in [
        "ConfigMap",
        "Deployment",
        "Service",
        "PodMonitor",
        "MetricTemplate",
        "AnalysisTemplate",
        "PrometheusRule",
    ] {
        assert!(
            kinds.contains(kind),
            "no {kind} in deploy/kubernetes (has {kinds:?})"
        );
    }
    // The sidecar example: abproxy and the model in one pod.
    let sidecar = yaml_documents(&deploy_dir("kubernetes").join("sidecar.yaml"));
    assert!(sidecar.iter().any(|d| {
        d["kind"] == "Deployment"
            && d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .is_some_and(|c| c.len() >= 2)
    }));
    let ingress = yaml_documents(&deploy_dir("kubernetes").join("ingress.yaml"));
    assert!(ingress
        .iter()
        .any(|d| d["kind"] == "Deployment" && d["spec"]["replicas"].as_u64() >= Some(2)));
}
