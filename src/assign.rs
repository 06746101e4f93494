//! Who gets which variant: user-ID extraction and deterministic bucketing.
//!
//! Pure functions over request parts; no I/O, so the rule that users depend on is unit-tested
//! in isolation and shared by the proxy, `abproxy assign` and `abproxy check`.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use http::header::{HeaderName, COOKIE};
use sha2::{Digest, Sha256};

use crate::head::RequestHead;
use crate::json_pointer::JsonPointer;

/// `int.from_bytes(SHA-256(salt ‖ user_id), "big") mod buckets`, reducing all 256 bits.
///
/// Horner's rule 32 bits a step keeps every intermediate below `buckets × 2³²` (< 2⁶⁴), so no
/// big integers are needed and the result equals Python's `int(sha256(...).hexdigest(), 16) % n`.
pub fn bucket(salt: &str, user_id: &str, buckets: u32) -> u32 {
    hash(salt, user_id, buckets).0
}

/// The bucket, and 64 bits of the same digest that tell users apart (the canary guard
/// counts distinct users by them) at no extra hashing.
pub fn hash(salt: &str, user_id: &str, buckets: u32) -> (u32, u64) {
    let digest = Sha256::new()
        .chain_update(salt.as_bytes())
        .chain_update(user_id.as_bytes())
        .finalize();
    // Horner's rule over the big-endian digest, 32 bits a step: the remainder stays below
    // `buckets` (a u32), so `acc << 32 | word` fits a u64, with 8 divisions instead of 32.
    let modulus = u64::from(buckets);
    let reduced = digest.chunks_exact(4).fold(0u64, |acc, word| {
        let word = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        ((acc << 32) | u64::from(word)) % modulus
    });
    let mut fingerprint = [0; 8];
    fingerprint.copy_from_slice(&digest[..8]);
    // The remainder is below `buckets`, which is a u32.
    (reduced as u32, u64::from_be_bytes(fingerprint))
}

/// Where a user ID is read from; sources are tried in configured order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserIdSource {
    Header(HeaderName),
    Cookie(String),
    Query(String),
    /// An RFC 6901 pointer into a JSON request body.
    Json(JsonPointer),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SourceError {
    #[error(
        "user ID source {0:?} must look like header:NAME, cookie:NAME, query:NAME or json:/pointer"
    )]
    Syntax(String),
    #[error("{0:?} is not a valid HTTP header name")]
    HeaderName(String),
    #[error("JSON pointer {0:?} must be empty or start with '/'")]
    Pointer(String),
}

impl FromStr for UserIdSource {
    type Err = SourceError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let (kind, arg) = spec
            .split_once(':')
            .ok_or_else(|| SourceError::Syntax(spec.to_owned()))?;
        if arg.is_empty() && kind != "json" {
            return Err(SourceError::Syntax(spec.to_owned()));
        }
        match kind {
            "header" => HeaderName::from_bytes(arg.as_bytes())
                .map(UserIdSource::Header)
                .map_err(|_| SourceError::HeaderName(arg.to_owned())),
            "cookie" => Ok(UserIdSource::Cookie(arg.to_owned())),
            "query" => Ok(UserIdSource::Query(arg.to_owned())),
            "json" => JsonPointer::new(arg)
                .map(UserIdSource::Json)
                .ok_or_else(|| SourceError::Pointer(arg.to_owned())),
            _ => Err(SourceError::Syntax(spec.to_owned())),
        }
    }
}

impl fmt::Display for UserIdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserIdSource::Header(name) => write!(f, "header:{name}"),
            UserIdSource::Cookie(name) => write!(f, "cookie:{name}"),
            UserIdSource::Query(name) => write!(f, "query:{name}"),
            UserIdSource::Json(pointer) => write!(f, "json:{pointer}"),
        }
    }
}

impl UserIdSource {
    /// Reads this source from a request; `body` is the buffered body when one was read.
    ///
    /// Absent, empty and unreadable values (a malformed JSON body, a non-UTF-8 header) all
    /// yield `None` so that the next source gets its turn rather than the request failing.
    pub fn extract<'a>(
        &self,
        head: impl Into<RequestHead<'a>>,
        body: Option<&[u8]>,
    ) -> Option<Cow<'a, str>> {
        let head = head.into();
        let found = match self {
            UserIdSource::Header(name) => head
                .get(name)
                .and_then(|value| std::str::from_utf8(value).ok())
                .map(|value| Cow::Borrowed(value.trim())),
            UserIdSource::Cookie(name) => head
                .get_all(&COOKIE)
                .filter_map(|value| std::str::from_utf8(value).ok())
                .find_map(|header| cookie_value(header, name))
                .map(Cow::Borrowed),
            UserIdSource::Query(name) => head
                .uri()
                .query()
                .and_then(|query| query_value(query, name)),
            UserIdSource::Json(pointer) => body
                .and_then(|body| json_value(body, pointer))
                .map(Cow::Owned),
        };
        found.filter(|id| !id.is_empty())
    }

    pub fn needs_body(&self) -> bool {
        matches!(self, UserIdSource::Json(_))
    }
}

/// The value of cookie `name` in one `Cookie` header, without surrounding double quotes (RFC 6265).
fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        if key.trim() != name {
            return None;
        }
        let value = value.trim();
        Some(
            value
                .strip_prefix('"')
                .and_then(|inner| inner.strip_suffix('"'))
                .unwrap_or(value),
        )
    })
}

/// The percent-decoded value of query parameter `name` (`+` decodes to a space, as in forms).
fn query_value<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    form_urlencoded::parse(query.as_bytes()).find_map(|(key, value)| (key == name).then_some(value))
}

/// A string or number at `pointer` in a JSON body; numbers keep their JSON spelling.
fn json_value(body: &[u8], pointer: &JsonPointer) -> Option<String> {
    match pointer.value_in(body)? {
        serde_json::Value::String(text) => Some(text),
        serde_json::Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// What to do with a request that carries no user ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    /// A uniformly random bucket per request.
    Random,
    /// The first variant in the file.
    First,
    /// Answer 400.
    Reject,
}

impl FromStr for OnMissing {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "random" => Ok(OnMissing::Random),
            "first" => Ok(OnMissing::First),
            "reject" => Ok(OnMissing::Reject),
            other => Err(format!(
                "on_missing must be \"random\", \"first\" or \"reject\", not {other:?}"
            )),
        }
    }
}

impl fmt::Display for OnMissing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnMissing::Random => "random",
            OnMissing::First => "first",
            OnMissing::Reject => "reject",
        })
    }
}

/// Consecutive bucket ranges, one per variant in file order.
///
/// Stored as exclusive range ends: variant `i` owns `ends[i-1]..ends[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    ends: Box<[u32]>,
}

impl Split {
    /// Builds the split from each variant's bucket count, in order.
    pub fn from_counts(counts: impl IntoIterator<Item = u32>) -> Self {
        let ends = counts
            .into_iter()
            .scan(0u32, |end, count| {
                *end += count;
                Some(*end)
            })
            .collect();
        Split { ends }
    }

    /// The index of the variant owning `bucket`.
    pub fn variant_of(&self, bucket: u32) -> usize {
        // Few variants: a linear scan beats a binary search here and keeps the code plain.
        self.ends
            .iter()
            .position(|&end| bucket < end)
            .unwrap_or(self.ends.len().saturating_sub(1))
    }

    /// The half-open bucket range of variant `index`.
    pub fn range(&self, index: usize) -> std::ops::Range<u32> {
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        start..self.ends[index]
    }

    pub fn buckets(&self) -> u32 {
        self.ends.last().copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = http::Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).expect("valid test request").into_parts().0
    }

    fn source(spec: &str) -> UserIdSource {
        spec.parse().expect("valid source")
    }

    // Vectors computed with Python: int(hashlib.sha256((salt + uid).encode()).hexdigest(), 16) % n
    #[test]
    fn buckets_match_python_hashlib_with_defaults() {
        for (uid, expected) in [
            ("alice", 20),
            ("bob", 25),
            ("user-1", 79),
            ("user-2", 95),
            ("12345", 41),
            ("", 49),
        ] {
            assert_eq!(bucket("", uid, 100), expected, "user {uid:?}");
        }
    }

    #[test]
    fn buckets_match_python_hashlib_salted_with_10000_buckets() {
        for (uid, expected) in [("alice", 4418), ("bob", 3662), ("user-1", 4100)] {
            assert_eq!(bucket("exp-42", uid, 10_000), expected, "user {uid:?}");
        }
    }

    #[test]
    fn buckets_match_python_hashlib_up_to_the_largest_bucket_count() {
        // The reduction runs 32 bits a step, so counts near 2^32 are where it could overflow.
        for (salt, uid, buckets, expected) in [
            ("", "alice", u32::MAX, 49_340_120),
            ("exp-42", "user-1", 4_294_967_291, 1_832_818_115),
            ("", "bob", 1 << 31, 516_263_145),
            ("s", "", 3, 1),
        ] {
            assert_eq!(
                bucket(salt, uid, buckets),
                expected,
                "{salt:?} {uid:?} {buckets}"
            );
        }
    }

    #[test]
    fn default_split_is_the_python_router_rule() {
        // The widely copied router: int(sha256(uid).hexdigest(), 16) % 100 < 80 → control.
        let split = Split::from_counts([80, 20]);
        for (uid, python_bucket) in [("alice", 20), ("user-1", 79), ("user-2", 95), ("carol", 49)] {
            let python_variant = usize::from(python_bucket >= 80);
            assert_eq!(bucket("", uid, 100), python_bucket);
            assert_eq!(
                split.variant_of(bucket("", uid, 100)),
                python_variant,
                "{uid}"
            );
        }
    }

    #[test]
    fn raising_the_last_weight_never_moves_its_users_out() {
        let ramp = [5, 10, 25, 50, 100];
        for step in ramp.windows(2) {
            let before = Split::from_counts([100 - step[0], step[0]]);
            let after = Split::from_counts([100 - step[1], step[1]]);
            for n in 0..5_000 {
                let b = bucket("", &format!("user-{n}"), 100);
                if before.variant_of(b) == 1 {
                    assert_eq!(
                        after.variant_of(b),
                        1,
                        "user-{n} left treatment at {step:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn variants_own_consecutive_ranges_in_file_order() {
        let split = Split::from_counts([50, 0, 30, 20]);
        assert_eq!(split.range(0), 0..50);
        assert_eq!(split.range(1), 50..50);
        assert_eq!(split.range(2), 50..80);
        assert_eq!(split.range(3), 80..100);
        assert_eq!(split.variant_of(49), 0);
        assert_eq!(split.variant_of(50), 2);
        assert_eq!(split.variant_of(99), 3);
    }

    #[test]
    fn header_source_reads_the_named_header() {
        let parts = request("/", &[("x-user-id", "alice")]);
        assert_eq!(
            source("header:x-user-id").extract(&parts, None).as_deref(),
            Some("alice")
        );
        assert_eq!(source("header:x-other").extract(&parts, None), None);
    }

    #[test]
    fn cookie_source_finds_the_cookie_and_strips_quotes() {
        let parts = request("/", &[("cookie", "theme=dark; user_id=\"bob\"; x=1")]);
        assert_eq!(
            source("cookie:user_id").extract(&parts, None).as_deref(),
            Some("bob")
        );
        let unquoted = request("/", &[("cookie", "a=1"), ("cookie", "user_id=carol")]);
        assert_eq!(
            source("cookie:user_id").extract(&unquoted, None).as_deref(),
            Some("carol")
        );
    }

    #[test]
    fn query_source_percent_decodes() {
        let parts = request("/predict?x=1&uid=j%C3%BCrgen%40example.com&y=+", &[]);
        assert_eq!(
            source("query:uid").extract(&parts, None).as_deref(),
            Some("jürgen@example.com")
        );
        let plus = request("/predict?uid=a+b", &[]);
        assert_eq!(
            source("query:uid").extract(&plus, None).as_deref(),
            Some("a b")
        );
    }

    #[test]
    fn json_source_reads_strings_and_numbers_and_skips_malformed_bodies() {
        let parts = request("/", &[]);
        let json = source("json:/user/id");
        assert_eq!(
            json.extract(&parts, Some(br#"{"user":{"id":"dana"}}"#))
                .as_deref(),
            Some("dana")
        );
        assert_eq!(
            json.extract(&parts, Some(br#"{"user":{"id":42}}"#))
                .as_deref(),
            Some("42")
        );
        assert_eq!(json.extract(&parts, Some(b"{not json")), None);
        assert_eq!(json.extract(&parts, Some(br#"{"user":{"id":[1]}}"#)), None);
        assert_eq!(json.extract(&parts, None), None);
    }

    #[test]
    fn utf8_user_ids_in_headers_and_cookies_are_read() {
        let mut parts = request("/", &[]);
        let id = http::HeaderValue::from_bytes("jürgen".as_bytes()).expect("value");
        parts.headers.insert("x-user-id", id);
        let cookie = http::HeaderValue::from_bytes("uid=jürgen".as_bytes()).expect("value");
        parts.headers.insert("cookie", cookie);
        assert_eq!(
            source("header:x-user-id").extract(&parts, None).as_deref(),
            Some("jürgen")
        );
        assert_eq!(
            source("cookie:uid").extract(&parts, None).as_deref(),
            Some("jürgen")
        );
    }

    #[test]
    fn empty_values_count_as_missing() {
        let parts = request("/?uid=", &[("x-user-id", "")]);
        assert_eq!(source("header:x-user-id").extract(&parts, None), None);
        assert_eq!(source("query:uid").extract(&parts, None), None);
    }

    #[test]
    fn source_specs_are_validated() {
        assert_eq!(
            source("json:/a/b"),
            UserIdSource::Json(JsonPointer::new("/a/b").expect("valid"))
        );
        assert!(matches!(
            "json:a".parse::<UserIdSource>(),
            Err(SourceError::Pointer(_))
        ));
        assert!(matches!(
            "header:bad name".parse::<UserIdSource>(),
            Err(SourceError::HeaderName(_))
        ));
        assert!(matches!(
            "body:x".parse::<UserIdSource>(),
            Err(SourceError::Syntax(_))
        ));
        assert!(matches!(
            "header:".parse::<UserIdSource>(),
            Err(SourceError::Syntax(_))
        ));
    }
}
