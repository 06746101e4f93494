//! Fuzzing on stable Rust: property tests that feed abproxy's hand-written parsers arbitrary
//! and mutated input, each checked against an independent answer or an invariant.
//!
//! - `json_pointer`: the one-pass pointer reader against `serde_json::Value::pointer` on the
//!   parsed document: the same value or the same refusal, for any body and any pointer.
//! - `config`: `Config::parse` on mutated example configs and on arbitrary text never
//!   panics, and every error names the file, and its line and column when it has a place.
//! - `user_id`: the header, cookie and query sources never panic or yield an empty ID on
//!   arbitrary requests, and find what a well-formed request carries; `bucket` against the
//!   spec's rule written independently.
//! - `pem`: damaged PEM files (an https upstream's CA and client key, the listener's
//!   certificate and key) load or fail naming the file, or its line in the config.
//!
//! Case counts are fixed and modest, so that this file takes seconds of `cargo test` in a
//! debug build. For a longer hunt, set `ABPROXY_FUZZ_CASES` to the number of cases for every
//! property:
//!
//! ```text
//! ABPROXY_FUZZ_CASES=200000 cargo test --release --test fuzz
//! ```
//!
//! Each run draws new cases. A failing case is shrunk to a small one and its seed appended to
//! `proptest-regressions/fuzz.txt`, which is committed: every later run replays those seeds
//! before drawing new cases. A bug found this way also gets a named regular test with the
//! minimal input, beside the code it fixed.

mod support;

use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};

/// `default_cases` cases, or `ABPROXY_FUZZ_CASES`; failures are kept where they are replayed.
fn fuzz_config(default_cases: u32) -> ProptestConfig {
    let cases = match std::env::var("ABPROXY_FUZZ_CASES") {
        Ok(text) => text
            .parse()
            .expect("ABPROXY_FUZZ_CASES must be a number of cases"),
        Err(_) => default_cases,
    };
    ProptestConfig {
        cases,
        // The test's working directory is the package root.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/fuzz.txt",
        ))),
        ..ProptestConfig::default()
    }
}

/// Bytes shown as text (lossily) in a failing case, instead of a list of numbers.
#[derive(Clone)]
struct Shown(Vec<u8>);

impl std::fmt::Debug for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

mod json_pointer {
    use abproxy::json_pointer::JsonPointer;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;
    use serde_json::Value;

    use super::Shown;

    /// What the reader must answer: `Value::pointer` on the fully parsed document.
    fn reference(body: &[u8], pointer: &str) -> Option<Value> {
        serde_json::from_slice::<Value>(body)
            .ok()?
            .pointer(pointer)
            .cloned()
    }

    /// The one-pass reader; a pointer it refuses (not empty, no leading `/`) names nothing,
    /// as `Value::pointer` answers for it.
    fn reader(body: &[u8], pointer: &str) -> Option<Value> {
        JsonPointer::new(pointer)?.value_in(body)
    }

    /// A JSON document as written, with every choice of spelling kept so the text can also be
    /// malformed in ways a byte flip rarely finds (lone surrogates, numbers out of range).
    #[derive(Debug, Clone)]
    enum Json {
        Null,
        True,
        False,
        Number(String),
        String(Text),
        Array(Vec<Json>),
        Object(Vec<(Text, Json)>),
    }

    /// A string as a pointer names it and as the body spells it.
    #[derive(Debug, Clone)]
    struct Text {
        decoded: String,
        written: String,
    }

    /// `c` inside a JSON string, spelled one of the ways `how` picks.
    fn spell(c: char, how: u8) -> String {
        let short = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            '\u{8}' => Some("\\b"),
            '\u{c}' => Some("\\f"),
            '/' if how == 3 => Some("\\/"),
            _ => None,
        };
        let must_escape = c == '"' || c == '\\' || c < ' ';
        let utf16 = |upper: bool| {
            let mut units = [0; 2];
            c.encode_utf16(&mut units)
                .iter()
                .map(|unit| match upper {
                    true => format!("\\u{unit:04X}"),
                    false => format!("\\u{unit:04x}"),
                })
                .collect()
        };
        match (how, short) {
            (0 | 3, Some(short)) => short.to_owned(),
            (0 | 1, _) if !must_escape => c.to_string(),
            (2, _) => utf16(false),
            _ => utf16(true),
        }
    }

    /// Spellings that make a string malformed.
    const MALFORMED: &[&str] = &[
        "\\ud800",
        "\\udc00",
        "\\ud800\\u0041",
        "\\ud800\\ud800",
        "\\x",
        "\\u12",
        "\\U0041",
        "\u{7}",
        "\u{0}",
        "\n",
    ];

    fn text_from(decoded: impl Strategy<Value = String>) -> impl Strategy<Value = Text> {
        (
            decoded,
            vec(0u8..4, 1..6),
            prop::option::weighted(0.03, select(MALFORMED)),
        )
            .prop_map(|(decoded, hows, malformed)| {
                let mut written: String = decoded
                    .chars()
                    .zip(hows.iter().cycle())
                    .map(|(c, &how)| spell(c, how))
                    .collect();
                written.extend(malformed);
                Text { decoded, written }
            })
    }

    /// Few distinct keys, so objects repeat them, and the characters pointers escape.
    fn key() -> impl Strategy<Value = Text> {
        text_from(prop_oneof![
            4 => select(vec![
                "a", "b", "", "id", "a/b", "m~n", "~1", "0", "01", "-", " ", "ü", "😀",
            ])
            .prop_map(str::to_owned),
            1 => any::<String>(),
        ])
    }

    fn string() -> impl Strategy<Value = Text> {
        text_from(prop_oneof![
            "[ab~/\"\\\\\n\t\u{1}é😀]{0,6}",
            any::<String>(),
        ])
    }

    fn finite() -> impl Strategy<Value = f64> {
        use prop::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
        POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => finite().prop_map(|x| format!("{x:e}")),
            1 => finite().prop_map(|x| format!("{x:?}")),
            2 => select(vec![
                "0", "-0", "-0.0", "0e0", "0E-0", "1e400", "-1e400", "1e-400", "1E+2", "0e99999",
                "1e308", "1.7976931348623157e308", "1.7976931348623159e308", "4.9e-324",
                "2.4e-324", "18446744073709551615", "18446744073709551616",
                "-9223372036854775808", "-9223372036854775809",
                "123456789012345678901234567890", "1e99999999999999999999999",
                "1e-99999999999999999999999",
            ])
            .prop_map(str::to_owned),
            3 => (
                prop::option::of(Just("-")),
                "0|[1-9][0-9]{0,25}",
                prop::option::of("\\.[0-9]{1,20}"),
                prop::option::of(prop_oneof![
                    9 => "[eE][+-]?[0-9]{1,3}",
                    1 => "[eE][+-]?[0-9]{4,25}",
                ]),
            )
                .prop_map(|(sign, int, fraction, exponent)| {
                    format!(
                        "{}{int}{}{}",
                        sign.unwrap_or_default(),
                        fraction.unwrap_or_default(),
                        exponent.unwrap_or_default()
                    )
                }),
            // Malformed.
            1 => select(vec![
                "01", "-", "+1", ".5", "1.", "1e", "1e+", "NaN", "Infinity", "-Infinity", "0x10",
                "1_000", "--1", "- 1", "00",
            ])
            .prop_map(str::to_owned),
        ]
    }

    fn json() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            Just(Json::True),
            Just(Json::False),
            number().prop_map(Json::Number),
            string().prop_map(Json::String),
        ];
        leaf.prop_recursive(6, 64, 5, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..5).prop_map(Json::Array),
                vec((key(), inner), 0..5).prop_map(Json::Object),
            ]
        })
    }

    /// The document inside `levels` of arrays (`false`) and `{"a": …}` objects (`true`):
    /// around serde_json's recursion limit of 128 as often as not.
    fn nested(json: Json, levels: &[bool]) -> Json {
        levels.iter().rev().fold(json, |inner, &object| {
            if object {
                let key = Text {
                    decoded: "a".into(),
                    written: "a".into(),
                };
                Json::Object(vec![(key, inner)])
            } else {
                Json::Array(vec![inner])
            }
        })
    }

    fn levels() -> impl Strategy<Value = Vec<bool>> {
        prop_oneof![
            6 => Just(Vec::new()),
            1 => vec(any::<bool>(), 0..200),
            2 => vec(any::<bool>(), 120..135),
        ]
    }

    /// Whitespace between tokens, JSON's own mostly; a form feed or no-break space is not.
    fn whitespace() -> impl Strategy<Value = Vec<&'static str>> {
        let json = select(vec!["", "", "", " ", "\n", "\t", "\r\n", "  "]);
        let not_json = select(vec!["\u{c}", "\u{a0}", "\u{feff}", "\u{0}"]);
        prop_oneof![
            9 => vec(json.clone(), 1..8),
            1 => vec(prop_oneof![json, not_json], 1..8),
        ]
    }

    fn render(json: &Json, spaces: &[&str], next: &mut usize, out: &mut String) {
        let space = |next: &mut usize, out: &mut String| {
            out.push_str(spaces[*next % spaces.len()]);
            *next += 1;
        };
        match json {
            Json::Null => out.push_str("null"),
            Json::True => out.push_str("true"),
            Json::False => out.push_str("false"),
            Json::Number(number) => out.push_str(number),
            Json::String(text) => {
                out.push('"');
                out.push_str(&text.written);
                out.push('"');
            }
            Json::Array(items) => {
                out.push('[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    space(next, out);
                    render(item, spaces, next, out);
                    space(next, out);
                }
                out.push(']');
            }
            Json::Object(members) => {
                out.push('{');
                for (index, (key, value)) in members.iter().enumerate() {
                    if index > 0 {
                        out.push(',');
                    }
                    space(next, out);
                    out.push('"');
                    out.push_str(&key.written);
                    out.push('"');
                    space(next, out);
                    out.push(':');
                    space(next, out);
                    render(value, spaces, next, out);
                    space(next, out);
                }
                out.push('}');
            }
        }
    }

    /// A path that exists in the document: `depth` steps, each choosing by the next of `choices`.
    fn path_in(mut json: &Json, choices: &[usize], depth: usize) -> Vec<String> {
        let mut tokens = Vec::new();
        for &choice in choices.iter().cycle().take(depth) {
            match json {
                Json::Array(items) if !items.is_empty() => {
                    let index = choice % items.len();
                    tokens.push(index.to_string());
                    json = &items[index];
                }
                Json::Object(members) if !members.is_empty() => {
                    let (key, value) = &members[choice % members.len()];
                    tokens.push(key.decoded.clone());
                    json = value;
                }
                _ => break,
            }
        }
        tokens
    }

    /// Tokens that are near misses of a real path, or nothing like one.
    fn odd_token() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => select(vec![
                "", "-", "0", "00", "01", "1", "+1", "-1", " 1", "1 ", "1e0", "0x1",
                "18446744073709551615", "18446744073709551616", "99999999999999999999999",
                "~", "/", "a", "a/b", "m~n", "~0", "~1", "~01", " ", "id",
            ])
            .prop_map(str::to_owned),
            1 => any::<String>(),
        ]
    }

    #[derive(Debug, Clone)]
    enum Tweak {
        None,
        Append(String),
        ReplaceLast(String),
        /// A leading zero on an index, or a character off the end of a key.
        Mangle,
        DropFirst,
    }

    fn tweak() -> impl Strategy<Value = Tweak> {
        prop_oneof![
            4 => Just(Tweak::None),
            1 => odd_token().prop_map(Tweak::Append),
            1 => odd_token().prop_map(Tweak::ReplaceLast),
            1 => Just(Tweak::Mangle),
            1 => Just(Tweak::DropFirst),
        ]
    }

    fn pointer_text(mut tokens: Vec<String>, tweak: Tweak) -> String {
        match tweak {
            Tweak::None => {}
            Tweak::Append(token) => tokens.push(token),
            Tweak::ReplaceLast(token) => {
                tokens.pop();
                tokens.push(token);
            }
            Tweak::Mangle => match tokens.last_mut() {
                Some(last) if last.bytes().all(|b| b.is_ascii_digit()) => last.insert(0, '0'),
                Some(last) => {
                    last.pop();
                }
                None => tokens.push("0".into()),
            },
            Tweak::DropFirst => {
                if !tokens.is_empty() {
                    tokens.remove(0);
                }
            }
        }
        tokens
            .iter()
            .map(|token| format!("/{}", token.replace('~', "~0").replace('/', "~1")))
            .collect()
    }

    /// Byte edits after rendering: what breaks structure (a cut, a lost comma, a stray byte).
    #[derive(Debug, Clone)]
    enum Edit {
        Truncate(usize),
        Delete(usize),
        Insert(usize, u8),
        Replace(usize, u8),
    }

    fn edits() -> impl Strategy<Value = Vec<Edit>> {
        let byte = prop_oneof![select(b"{}[]:,\"\\ 0-.e+tfn/u".to_vec()), any::<u8>()];
        let edit = prop_oneof![
            any::<usize>().prop_map(Edit::Truncate),
            any::<usize>().prop_map(Edit::Delete),
            (any::<usize>(), byte.clone()).prop_map(|(at, b)| Edit::Insert(at, b)),
            (any::<usize>(), byte).prop_map(|(at, b)| Edit::Replace(at, b)),
        ];
        prop_oneof![8 => Just(Vec::new()), 1 => vec(edit, 1..3)]
    }

    fn apply(body: &mut Vec<u8>, edits: &[Edit]) {
        for edit in edits {
            let len = body.len();
            match *edit {
                Edit::Truncate(at) => body.truncate(at % (len + 1)),
                Edit::Delete(at) if len > 0 => {
                    body.remove(at % len);
                }
                Edit::Insert(at, byte) => body.insert(at % (len + 1), byte),
                Edit::Replace(at, byte) if len > 0 => body[at % len] = byte,
                Edit::Delete(_) | Edit::Replace(..) => {}
            }
        }
    }

    /// How far into the document the pointer goes.
    #[derive(Debug, Clone)]
    enum Depth {
        Steps(usize),
        /// Through the nesting `levels` adds, and this many steps beyond.
        ThroughNesting(usize),
    }

    /// A body and a pointer, mostly one naming something in it.
    fn case() -> impl Strategy<Value = (Shown, String)> {
        let document = (
            json(),
            levels(),
            whitespace(),
            prop_oneof![9 => Just(""), 1 => select(vec![" ", "\u{feff}", "x"])],
            prop_oneof![
                9 => Just(""),
                1 => select(vec!["\n", " x", ",", "]", "}", "{}", "1", "\"", "\0"]),
            ],
            edits(),
        );
        let pointer = (
            vec(any::<usize>(), 1..6),
            prop_oneof![
                4 => (0usize..8).prop_map(Depth::Steps),
                1 => (0usize..210).prop_map(Depth::Steps),
                2 => (0usize..4).prop_map(Depth::ThroughNesting),
            ],
            tweak(),
            prop::option::weighted(0.1, "[/~a-b0-1]{0,8}"),
        );
        (document, pointer).prop_map(
            |((json, levels, spaces, lead, trail, edits), (choices, depth, tweak, raw))| {
                let depth = match depth {
                    Depth::Steps(steps) => steps,
                    Depth::ThroughNesting(more) => levels.len() + more,
                };
                let json = nested(json, &levels);
                let mut text = lead.to_owned();
                let mut next = 0;
                text.push_str(spaces[0]);
                render(&json, &spaces, &mut next, &mut text);
                text.push_str(spaces[spaces.len() - 1]);
                text.push_str(trail);
                let mut body = text.into_bytes();
                apply(&mut body, &edits);
                let pointer =
                    raw.unwrap_or_else(|| pointer_text(path_in(&json, &choices, depth), tweak));
                (Shown(body), pointer)
            },
        )
    }

    proptest! {
        #![proptest_config(super::fuzz_config(3_000))]

        #[test]
        fn the_reader_answers_what_serde_json_answers_for_generated_documents(
            (body, pointer) in case()
        ) {
            prop_assert_eq!(reader(&body.0, &pointer), reference(&body.0, &pointer));
        }

        #[test]
        fn the_reader_answers_what_serde_json_answers_for_arbitrary_bytes(
            body in prop_oneof![
                vec(any::<u8>(), 0..48),
                vec(select(b"{}[]:,\"\\ 0123456789.eE+-truefalsnu/a".to_vec()), 0..48),
            ],
            pointer in prop_oneof![
                select(vec!["", "/", "/0", "/a", "/0/0", "//", "/-", "/01", "a", "~"])
                    .prop_map(str::to_owned),
                "[/~a0-1]{0,6}",
            ],
        ) {
            prop_assert_eq!(reader(&body, &pointer), reference(&body, &pointer));
        }
    }
}

mod config {
    use std::path::Path;

    use abproxy::config::{Config, ConfigError, ConfigFile};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    const EXAMPLES: [&str; 4] = [
        include_str!("../config/demo.toml"),
        include_str!("../config/canary.toml"),
        include_str!("../config/shadow.toml"),
        include_str!("../config/grpc.toml"),
    ];

    /// Errors about the file as a whole, which have no line to point at.
    const FILE_WIDE: &[&str] = &["at least one [[variant]] is required"];

    /// `Config::parse` returned (a panic fails the case by itself) and its error is placed.
    fn check(text: &str) -> Result<(), TestCaseError> {
        match Config::parse(text, Path::new("fuzz.toml")) {
            Ok(_) => Ok(()),
            Err(err) => placed(&err, text),
        }
    }

    /// The error names the file, and a line and column within `text` unless it is file-wide.
    fn placed(err: &ConfigError, text: &str) -> Result<(), TestCaseError> {
        let shown = err.to_string();
        let ConfigError::Invalid { location, message } = err else {
            return Err(TestCaseError::fail(format!("parse read a file: {shown}")));
        };
        prop_assert_eq!(&location.path, Path::new("fuzz.toml"));
        prop_assert!(!message.trim().is_empty(), "no message: {shown:?}");
        match location.line_column {
            Some((line, column)) => {
                let prefix = format!("fuzz.toml:{line}:{column}: ");
                prop_assert!(shown.starts_with(&prefix), "{shown:?} for {prefix:?}");
                // A file ending in a newline has an empty last line, where EOF errors point.
                let lines: Vec<&str> = text.split('\n').collect();
                prop_assert!((1..=lines.len()).contains(&line), "line of {shown:?}");
                let columns = lines[line - 1].len() + 1;
                prop_assert!((1..=columns).contains(&column), "column of {shown:?}");
            }
            None => {
                prop_assert!(shown.starts_with("fuzz.toml: "), "{shown:?}");
                prop_assert!(
                    FILE_WIDE.contains(&message.as_str()),
                    "an error with no line: {shown:?}"
                );
            }
        }
        Ok(())
    }

    /// TOML scalars, lists and tables at and past the validators' limits, and near misses.
    #[rustfmt::skip]
    const VALUES: &[&str] = &[
        "0", "-1", "1", "100", "150", "10000", "10001", "65536", "65537", "99999999999999999999",
        "-9223372036854775808", "9223372036854775807", "0x10", "1_000", "+5", "nan", "+nan",
        "-nan", "inf", "-inf", "1e400", "-0.0", "0.1", "33.333333", "1e-7", "50.5",
        "100.0000001", "true", "false", "1979-05-27T07:32:00Z", "07:32:00", "[]", "[1, 5, 10]",
        "[5, 1]", "[0.5, nan]", "[1, \"a\"]", "{}", "{ a = 1 }", "[\"/a\", \"b\"]", "[\"\"]",
        "\"\"", "'lit'", "\"\"\"multi\nline\"\"\"", "\"unterminated", "", "=", "[[x]]",
    ];

    /// What a mutation writes after `key =`: TOML of every type, extremes, and near misses.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|x| format!("{x:?}")),
            select(VALUES).prop_map(str::to_owned),
            string_content().prop_map(|text| format!("{text:?}")),
            string_content().prop_map(|text| format!("\"{text}\"")),
            "[^\n]{0,16}",
        ]
    }

    /// Strings the validators parse: durations, sizes, sources, URLs, addresses, names.
    fn string_content() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => select(vec![
                "0s", "0ms", "1ns", "250ms", "18446744073709551615s", "18446744073709551616s",
                "999999999999999999999years", "584942417355years", "5 years", "1e3s", "-1s",
                "1MiB", "0", "0B", "18446744073709551615GiB", "17179869184GiB",
                "99999999999999999999", "1.5MiB", " 1 KiB ", "header:", "header:bad name",
                "header:x-user-id", "cookie:", "cookie:a=b", "json:", "json:a", "json:/a/~2",
                "query:x", "body:x", ":", "http://", "http://a@b", "https://x", "http://x?q",
                "http://[::1]:80", "http://x:99999", "http://x/a/", "127.0.0.1:99999", "[::]:0",
                "none", "random", "first", "reject", "local", "prometheus", "x-variant",
                "content-length", "Host", "/prediction", "", "é", "\u{0}", "stable", "canary",
                "control", "treatment", "production", "candidate",
            ])
            .prop_map(str::to_owned),
            1 => "[a-z0-9:/._ -]{0,12}",
            1 => any::<String>(),
        ]
    }

    fn line() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            3 => select(vec![
                "listen", "admin", "variant_header", "preserve_host", "admin_token_file", "tls",
                "max_body", "request_timeout", "connect_timeout", "max_upstream_connections",
                "shutdown_grace", "sources", "salt", "buckets", "on_missing", "override_header",
                "name", "upstream", "weight", "percent", "timeout", "max_queue",
                "max_queue_bytes", "max_concurrency", "compare", "tolerance", "log",
                "log_user_id", "log_body_bytes", "log_max_size", "log_keep", "prediction",
                "prediction_buckets", "prediction_max_bytes", "prediction_classes", "variant",
                "baseline", "interval", "min_requests", "failures_to_rollback", "steps",
                "analyses_per_step", "state_file", "webhook", "source", "prometheus_url",
                "max_error_rate", "max_error_rate_increase", "confidence", "max_p99",
                "max_p99_ratio", "p99_floor", "max_prediction_psi", "min_predictions",
                "srm_p_value", "client_body_timeout", "client_header_timeout", "listen_plain",
                "handshake_timeout", "client_ca", "client_auth", "sni", "cert", "key", "ca",
                "server_name", "client_cert", "client_key", "bogus", "Weight", "a.b",
                "\"quoted key\"", "checks.confidence",
            ])
            .prop_map(str::to_owned),
            1 => "[a-z_.]{1,10}",
        ];
        prop_oneof![
            4 => (key, value()).prop_map(|(key, value)| format!("{key} = {value}")),
            2 => select(vec![
                "[server]", "[server.tls]", "[limits]", "[assignment]", "[metrics]",
                "[[variant]]", "[[shadow]]", "[canary]", "[canary.checks]", "[[canary]]",
                "[variant]", "[bogus]", "[server", "[]", "[[]]", "",
            ])
            .prop_map(str::to_owned),
            1 => "[^\n]{0,30}",
        ]
    }

    /// Numbers around weights, bucket counts and the counts' limit.
    #[rustfmt::skip]
    const NUMBERS: &[&str] = &[
        "0", "-1", "1", "5", "20", "50", "80", "100", "150", "1000", "10000", "10001", "65536",
        "65537", "0.1", "0.01", "0.5", "33.3", "99.99", "100.0000001", "-0.0", "1e-7", "nan",
        "-inf", "inf",
    ];

    /// A replacement for a value of each TOML type the examples use.
    #[derive(Debug, Clone)]
    struct Typed {
        string: String,
        number: String,
        list: String,
    }

    fn typed() -> impl Strategy<Value = Typed> {
        let number = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|x| toml::Value::Float(x).to_string()),
            select(NUMBERS).prop_map(str::to_owned),
        ];
        let list = prop_oneof![
            vec(number.clone(), 0..6).prop_map(|items| format!("[{}]", items.join(", "))),
            vec(string_content(), 0..4).prop_map(|items| {
                toml::Value::Array(items.into_iter().map(toml::Value::String).collect()).to_string()
            }),
        ];
        (
            string_content().prop_map(|text| toml::Value::String(text).to_string()),
            number,
            list,
        )
            .prop_map(|(string, number, list)| Typed {
                string,
                number,
                list,
            })
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Delete(usize),
        Duplicate(usize),
        Swap(usize, usize),
        /// Replaces what follows the line's first `=`.
        SetValue(usize, String),
        /// Replaces a value with one of the same TOML type, which reaches the validator.
        SetTyped(usize, Typed),
        Insert(usize, String),
        /// Appends `times` copies of an array-of-tables entry (`[[variant]]`, `[[shadow]]`),
        /// their names made distinct when `rename`: many variants or shadows.
        Repeat {
            table: usize,
            times: usize,
            rename: bool,
        },
        /// Cuts the text at a byte (the nearest character boundary below it).
        Truncate(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let at = any::<usize>;
        prop_oneof![
            1 => at().prop_map(Edit::Delete),
            1 => at().prop_map(Edit::Duplicate),
            1 => (at(), at()).prop_map(|(a, b)| Edit::Swap(a, b)),
            2 => (at(), value()).prop_map(|(at, value)| Edit::SetValue(at, value)),
            10 => (at(), typed()).prop_map(|(at, typed)| Edit::SetTyped(at, typed)),
            2 => (at(), line()).prop_map(|(at, line)| Edit::Insert(at, line)),
            1 => (at(), 1usize..70, any::<bool>())
                .prop_map(|(table, times, rename)| Edit::Repeat { table, times, rename }),
            1 => at().prop_map(Edit::Truncate),
        ]
    }

    fn mutate(example: &str, edits: &[Edit]) -> String {
        let mut lines: Vec<String> = example.split('\n').map(str::to_owned).collect();
        for edit in edits {
            let len = lines.len().max(1);
            match edit {
                Edit::Delete(at) if !lines.is_empty() => {
                    lines.remove(at % len);
                }
                Edit::Duplicate(at) if !lines.is_empty() => {
                    let line = lines[at % len].clone();
                    lines.insert(at % len, line);
                }
                Edit::Swap(a, b) if !lines.is_empty() => lines.swap(a % len, b % len),
                Edit::SetValue(at, value) if !lines.is_empty() => {
                    let line = &mut lines[at % len];
                    if let Some(equals) = line.find('=') {
                        line.truncate(equals + 1);
                        line.push(' ');
                        line.push_str(value);
                    }
                }
                Edit::SetTyped(at, typed) if !lines.is_empty() => {
                    let line = &mut lines[at % len];
                    if let Some(equals) = line.find('=') {
                        let value = match line[equals + 1..].trim_start().chars().next() {
                            Some('"' | '\'') => &typed.string,
                            Some('[') => &typed.list,
                            _ => &typed.number,
                        };
                        line.truncate(equals + 1);
                        line.push(' ');
                        line.push_str(value);
                    }
                }
                Edit::Insert(at, line) => lines.insert(at % (lines.len() + 1), line.clone()),
                Edit::Repeat {
                    table,
                    times,
                    rename,
                } => {
                    let starts: Vec<usize> = (0..lines.len())
                        .filter(|&i| lines[i].trim_start().starts_with("[["))
                        .collect();
                    let Some(&start) = starts.get(table % starts.len().max(1)) else {
                        continue;
                    };
                    let end = (start + 1..lines.len())
                        .find(|&i| lines[i].trim_start().starts_with('['))
                        .unwrap_or(lines.len());
                    let block = lines[start..end].to_vec();
                    for copy in 0..*times {
                        lines.extend(block.iter().map(|line| match line.split_once('=') {
                            Some((key, value)) if *rename && key.trim() == "name" => {
                                format!("{key}= \"{}-{copy}\"", value.trim().trim_matches('"'))
                            }
                            _ => line.clone(),
                        }));
                    }
                }
                Edit::Truncate(at) => {
                    let mut text = lines.join("\n");
                    let mut cut = at % (text.len() + 1);
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                    lines = text.split('\n').map(str::to_owned).collect();
                }
                Edit::Delete(_)
                | Edit::Duplicate(_)
                | Edit::Swap(..)
                | Edit::SetValue(..)
                | Edit::SetTyped(..) => {}
            }
        }
        lines.join("\n")
    }

    /// A config file's bytes, of which a few may not be UTF-8.
    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        let edit = (any::<usize>(), prop_oneof![0x80u8..=0xff, any::<u8>()]);
        prop_oneof![
            (select(EXAMPLES.to_vec()), vec(edit, 0..3)).prop_map(|(example, edits)| {
                let mut bytes = example.as_bytes().to_vec();
                for (at, byte) in edits {
                    let len = bytes.len();
                    bytes[at % len] = byte;
                }
                bytes
            }),
            vec(any::<u8>(), 0..64),
        ]
    }

    proptest! {
        #![proptest_config(super::fuzz_config(1_500))]

        #[test]
        fn config_files_of_any_bytes_load_or_fail_with_file_line_and_column(bytes in bytes()) {
            let file = ConfigFile { bytes: bytes.clone(), sha256: String::new() };
            if let Err(err) = file.parse(Path::new("fuzz.toml")) {
                placed(&err, &String::from_utf8_lossy(&bytes))?;
            }
        }

        #[test]
        fn mutated_examples_load_or_fail_with_file_line_and_column(
            example in select(EXAMPLES.to_vec()),
            edits in vec(edit(), 1..5),
        ) {
            check(&mutate(example, &edits))?;
        }

        #[test]
        fn arbitrary_text_loads_or_fails_with_file_line_and_column(
            text in prop_oneof![
                any::<String>(),
                vec(line(), 0..8).prop_map(|lines| lines.join("\n")),
                "[\\[\\]a-z_=\" .,0-9{}\n\r\t#'\\\\]{0,60}",
            ]
        ) {
            check(&text)?;
        }
    }

    #[test]
    fn the_examples_load() {
        for example in EXAMPLES {
            Config::parse(example, Path::new("fuzz.toml")).expect("an example config loads");
        }
    }
}

mod user_id {
    use abproxy::assign::{bucket, UserIdSource};
    use http::header::{HeaderName, COOKIE};
    use http::request::Parts;
    use http::{HeaderValue, Request, Uri};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    use crate::support::spec_bucket;

    fn source(spec: &str) -> UserIdSource {
        spec.parse().expect("a valid source")
    }

    fn parts(uri: &str, headers: &[(HeaderName, HeaderValue)]) -> Parts {
        let mut parts = Request::new(()).into_parts().0;
        parts.uri = uri.parse::<Uri>().expect("a valid request URI");
        for (name, value) in headers {
            parts.headers.append(name.clone(), value.clone());
        }
        parts
    }

    fn header_name() -> impl Strategy<Value = HeaderName> {
        prop_oneof![
            3 => Just(COOKIE),
            2 => Just(HeaderName::from_static("x-user-id")),
            1 => Just(HeaderName::from_static("x-other")),
        ]
    }

    /// Cookie and query names as configured: the usual ones and odd ones.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => select(vec!["uid", "user_id", "a", "a b", "=", "%41", "ü", " uid", "\"uid\""])
                .prop_map(str::to_owned),
            1 => "[^\u{0}]{1,6}",
        ]
    }

    /// Bytes around `name`: `key=value` pairs whose keys are often the name, with the
    /// separators cookies and queries give meaning to, percent escapes good and bad, quotes,
    /// Unicode white space and any byte at all.
    fn noise(name: &str) -> impl Strategy<Value = Vec<u8>> {
        let encoded = form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>();
        let junk = vec(
            prop_oneof![
                4 => select(vec![
                    "=", ";", " ", "\t", "\"", "&", "+", "%", "%2", "%zz", "%41", "%2B", "%26",
                    "%3D", "%20", "%ff", "%C3%BC", "%c3", "%00", "\u{a0}", "\u{3000}", "\u{85}",
                    "é", "x", "1",
                ])
                .prop_map(|piece| piece.as_bytes().to_vec()),
                1 => vec(any::<u8>(), 1..3),
            ],
            0..4,
        )
        .prop_map(|pieces| pieces.concat());
        let key = prop_oneof![
            3 => Just(name.as_bytes().to_vec()),
            1 => Just(encoded.into_bytes()),
            1 => Just(format!(" {name} ").into_bytes()),
            1 => junk.clone(),
        ];
        let pair = (
            key,
            select(vec!["=", "=", "=", "", "=\"", "=="]),
            junk,
            select(vec!["; ", ";", "&", "", " ; ", "\"; "]),
        )
            .prop_map(|(key, equals, value, separator)| {
                [&key[..], equals.as_bytes(), &value, separator.as_bytes()].concat()
            });
        vec(pair, 0..5).prop_map(|pairs| pairs.concat())
    }

    /// `bytes` as a header value: the bytes a value may not hold (controls but tab, and DEL)
    /// become `?`.
    fn header_value(bytes: Vec<u8>) -> HeaderValue {
        let bytes: Vec<u8> = bytes
            .into_iter()
            .map(|b| match b {
                b'\t' | 0x20..=0x7e | 0x80..=0xff => b,
                _ => b'?',
            })
            .collect();
        HeaderValue::from_bytes(&bytes).expect("only bytes a value may hold")
    }

    /// `bytes` as a query string: what a URI may not hold percent-encoded, `%` itself not.
    fn query_text(bytes: Vec<u8>) -> String {
        bytes
            .into_iter()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => char::from(b).to_string(),
                b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*'
                | b'+' | b',' | b';' | b'=' | b':' | b'@' | b'/' | b'?' | b'%' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    /// A source name and a request whose headers and query are noise around it.
    fn request() -> impl Strategy<Value = (String, Vec<(HeaderName, HeaderValue)>, Option<String>)>
    {
        name().prop_flat_map(|name| {
            let header = (header_name(), noise(&name).prop_map(header_value));
            let query = prop::option::of(noise(&name).prop_map(query_text));
            (Just(name), vec(header, 0..5), query)
        })
    }

    /// `application/x-www-form-urlencoded` decoding as the URL standard writes it, for the
    /// query source to be checked against.
    fn form_decode(bytes: &[u8]) -> String {
        let mut out = Vec::new();
        let mut index = 0;
        while index < bytes.len() {
            let hex = |at: usize| {
                bytes
                    .get(at)
                    .and_then(|&b| char::from(b).to_digit(16))
                    .map(|digit| digit as u8)
            };
            match bytes[index] {
                b'+' => out.push(b' '),
                b'%' => {
                    if let (Some(high), Some(low)) = (hex(index + 1), hex(index + 2)) {
                        out.push(high * 16 + low);
                        index += 3;
                        continue;
                    }
                    out.push(b'%');
                }
                byte => out.push(byte),
            }
            index += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn query_model(query: &str, name: &str) -> Option<String> {
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(key, _)| form_decode(key.as_bytes()) == name)
            .map(|(_, value)| form_decode(value.as_bytes()))
            .filter(|value| !value.is_empty())
    }

    /// The first cookie named `name` in the request's UTF-8 `Cookie` headers, its value
    /// trimmed and unquoted: what the cookie source is documented to read.
    fn cookie_model(parts: &Parts, name: &str) -> Option<String> {
        let mut pairs = Vec::new();
        for value in parts.headers.get_all(COOKIE) {
            let Ok(text) = std::str::from_utf8(value.as_bytes()) else {
                continue;
            };
            for pair in text.split(';') {
                if let Some(equals) = pair.find('=') {
                    pairs.push((pair[..equals].trim(), pair[equals + 1..].trim()));
                }
            }
        }
        let (_, value) = pairs.into_iter().find(|(key, _)| *key == name)?;
        let quoted = value.len() >= 2 && value.starts_with('"') && value.ends_with('"');
        let value = if quoted {
            &value[1..value.len() - 1]
        } else {
            value
        };
        (!value.is_empty()).then(|| value.to_owned())
    }

    /// Query parameter names, spaces, non-ASCII and the separators among them.
    const NAMES: &[&str] = &["uid", "user_id", "a b", "ü", "="];

    /// A cookie as RFC 6265 lets a server set it: a token name and cookie-octets, maybe quoted.
    fn cookie() -> impl Strategy<Value = (String, String, bool)> {
        (
            prop_oneof![
                3 => select(vec!["uid", "user_id", "UID", "uid2", "theme"]).prop_map(str::to_owned),
                1 => "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,6}",
            ],
            "[\\x21\\x23-\\x2B\\x2D-\\x3A\\x3C-\\x5B\\x5D-\\x7E]{0,8}",
            any::<bool>(),
        )
    }

    proptest! {
        #![proptest_config(super::fuzz_config(2_000))]

        #[test]
        fn arbitrary_requests_never_yield_an_empty_id_or_panic(
            (name, headers, query) in request(),
        ) {
            let uri = query.as_ref().map_or("/p".to_owned(), |query| format!("/p?{query}"));
            let parts = parts(&uri, &headers);
            let header = source("header:x-user-id").extract(&parts, None);
            let expected = parts
                .headers
                .get("x-user-id")
                .and_then(|value| std::str::from_utf8(value.as_bytes()).ok())
                .map(str::trim)
                .filter(|id| !id.is_empty());
            prop_assert_eq!(header.as_deref(), expected);

            let cookie = source(&format!("cookie:{name}")).extract(&parts, None);
            let model = cookie_model(&parts, &name);
            prop_assert_eq!(cookie.as_deref(), model.as_deref());

            let query_id = source(&format!("query:{name}")).extract(&parts, None);
            let model = parts.uri.query().and_then(|query| query_model(query, &name));
            prop_assert_eq!(query_id.as_deref(), model.as_deref());
        }

        #[test]
        fn a_well_formed_cookie_header_yields_the_first_cookie_of_the_name(
            headers in vec(vec(cookie(), 0..5), 1..3),
            tight in any::<bool>(),
            wanted in select(vec!["uid", "user_id", "UID"]),
        ) {
            let separator = if tight { ";" } else { "; " };
            let values: Vec<(HeaderName, HeaderValue)> = headers
                .iter()
                .map(|pairs| {
                    let text = pairs
                        .iter()
                        .map(|(name, value, quoted)| match quoted {
                            true => format!("{name}=\"{value}\""),
                            false => format!("{name}={value}"),
                        })
                        .collect::<Vec<_>>()
                        .join(separator);
                    (COOKIE, HeaderValue::from_str(&text).expect("cookie octets"))
                })
                .collect();
            let parts = parts("/", &values);
            let expected = headers
                .iter()
                .flatten()
                .find(|(name, _, _)| name == wanted)
                .map(|(_, value, _)| value.as_str())
                .filter(|value| !value.is_empty());
            let found = source(&format!("cookie:{wanted}")).extract(&parts, None);
            prop_assert_eq!(found.as_deref(), expected);
        }

        #[test]
        fn a_form_encoded_query_yields_the_first_value_of_the_name(
            pairs in vec(
                (
                    prop_oneof![
                        3 => select(NAMES).prop_map(str::to_owned),
                        1 => any::<String>(),
                    ],
                    any::<String>(),
                ),
                0..5,
            ),
            wanted in select(NAMES),
        ) {
            let query = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&pairs)
                .finish();
            let parts = parts(&format!("/p?{query}"), &[]);
            let expected = pairs
                .iter()
                .find(|(name, _)| name == wanted)
                .map(|(_, value)| value.as_str())
                .filter(|value| !value.is_empty());
            let found = source(&format!("query:{wanted}")).extract(&parts, None);
            prop_assert_eq!(found.as_deref(), expected);
        }

        #[test]
        fn buckets_follow_the_spec_rule(
            salt in any::<String>(),
            id in any::<String>(),
            buckets in prop_oneof![
                3 => (1u32..=100).prop_map(|hundreds| hundreds * 100),
                1 => 1u32..,
            ],
        ) {
            prop_assert_eq!(bucket(&salt, &id, buckets), spec_bucket(&salt, &id, buckets));
        }
    }
}

mod pem {
    use std::sync::OnceLock;

    use abproxy::upstream::{ClientTls, TlsSettings};
    use proptest::prelude::*;

    use super::{fuzz_config, Shown};

    /// A real CA certificate and a real key, made once, for mutations to start from.
    fn real() -> &'static (Vec<u8>, Vec<u8>) {
        static REAL: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
        REAL.get_or_init(|| {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params =
                rcgen::CertificateParams::new(vec!["model.test".into()]).expect("params");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).expect("certificate");
            (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
        })
    }

    /// PEM text damaged the ways files get damaged: bytes changed, cut short, doubled, or
    /// wrapped in other text.
    fn damaged(original: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..600),
            (0..original.len(), any::<u8>()).prop_map(move |(at, byte)| {
                let mut bytes = original.to_vec();
                bytes[at] = byte;
                bytes
            }),
            (0..original.len()).prop_map(move |at| original[..at].to_vec()),
            Just([original, original].concat()),
            ".{0,40}".prop_map(move |text| [text.as_bytes(), original, text.as_bytes()].concat()),
        ]
    }

    /// Loads `ca` (and optionally a client key) as an https upstream would.
    fn load(dir: &std::path::Path, ca: &[u8], key: Option<&[u8]>) -> Result<(), String> {
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca).expect("written");
        let mut settings = TlsSettings {
            ca: Some(ca_path.clone()),
            ..TlsSettings::default()
        };
        if let Some(key) = key {
            let (cert, key_path) = (dir.join("client.pem"), dir.join("client.key"));
            std::fs::write(&cert, &real().0).expect("written");
            std::fs::write(&key_path, key).expect("written");
            settings.client_cert = Some(cert);
            settings.client_key = Some(key_path);
        }
        ClientTls::load(&settings, "model.test", false)
            .map(|_| ())
            .map_err(|err| err.to_string())
    }

    proptest! {
        #![proptest_config(fuzz_config(300))]

        #[test]
        fn damaged_certificates_load_or_fail_naming_the_file(ca in damaged(&real().0).prop_map(Shown)) {
            let dir = tempfile::tempdir().expect("temp dir");
            if let Err(err) = load(dir.path(), &ca.0, None) {
                prop_assert!(err.contains("ca.pem"), "{err}");
            }
        }

        #[test]
        fn damaged_listener_certificates_load_or_fail_at_their_config_line(
            cert in damaged(&real().0).prop_map(Shown),
            key in damaged(&real().1).prop_map(Shown),
        ) {
            let dir = tempfile::tempdir().expect("temp dir");
            let (cert_path, key_path) = (dir.path().join("server.pem"), dir.path().join("server.key"));
            std::fs::write(&cert_path, &cert.0).expect("written");
            std::fs::write(&key_path, &key.0).expect("written");
            let text = format!(
                "[server.tls]\ncert = {:?}\nkey = {:?}\n\n[[variant]]\nname = \"a\"\nupstream = \"http://127.0.0.1:1\"\nweight = 100\n",
                cert_path.display().to_string(),
                key_path.display().to_string()
            );
            if let Err(err) = abproxy::config::Config::parse(&text, std::path::Path::new("fuzz.toml")) {
                let err = err.to_string();
                prop_assert!(
                    err.starts_with("fuzz.toml:2:") || err.starts_with("fuzz.toml:3:"),
                    "{err}"
                );
            }
        }

        #[test]
        fn damaged_keys_load_or_fail_naming_the_file(key in damaged(&real().1).prop_map(Shown)) {
            let dir = tempfile::tempdir().expect("temp dir");
            if let Err(err) = load(dir.path(), &real().0, Some(&key.0)) {
                prop_assert!(err.contains("client.key"), "{err}");
            }
        }
    }

    #[test]
    fn the_real_files_load() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(load(dir.path(), &real().0, None), Ok(()));
        assert_eq!(load(dir.path(), &real().0, Some(&real().1)), Ok(()));
    }
}
