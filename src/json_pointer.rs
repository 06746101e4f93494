//! The value at an RFC 6901 pointer in a JSON document, found in one pass that builds only
//! that value.
//!
//! Model requests and answers are often large arrays of numbers; parsing a whole body into a
//! `serde_json::Value` to read one field cost about ten times the body's size in memory and
//! most of the time. Everything off the pointer's path is parsed, checked and dropped as it
//! goes (`Skip`), so the answer is the same as `Value::pointer` on the parsed document: `None`
//! for a malformed body (numbers out of range, lone surrogates and nesting past serde_json's
//! limit included), and the last of duplicate keys wins.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// A pointer split into its reference tokens once, at config load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPointer {
    text: String,
    tokens: Box<[String]>,
}

impl JsonPointer {
    /// `None` unless `text` is empty (the whole document) or starts with `/`.
    pub fn new(text: &str) -> Option<JsonPointer> {
        let tokens = match text.strip_prefix('/') {
            Some(path) => path
                .split('/')
                .map(|token| token.replace("~1", "/").replace("~0", "~"))
                .collect(),
            None if text.is_empty() => Box::default(),
            None => return None,
        };
        Some(JsonPointer {
            text: text.to_owned(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The value this pointer names in `body`; `None` if it names nothing or the body is not
    /// one well-formed JSON document.
    pub fn value_in(&self, body: &[u8]) -> Option<Value> {
        let mut document = serde_json::Deserializer::from_slice(body);
        let found = At(&self.tokens).deserialize(&mut document).ok()?;
        document.end().ok()?;
        found
    }
}

impl fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Shown as written, in `/status` and the shadow log.
impl serde::Serialize for JsonPointer {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

/// The rest of the path, applied to the value being parsed.
struct At<'p>(&'p [String]);

impl<'de> DeserializeSeed<'de> for At<'_> {
    type Value = Option<Value>;

    fn deserialize<D: Deserializer<'de>>(self, value: D) -> Result<Option<Value>, D::Error> {
        match self.0.split_first() {
            None => serde::Deserialize::deserialize(value).map(Some),
            Some((token, rest)) => value.deserialize_any(Step { token, rest }),
        }
    }
}

/// One token of the path: a key into an object or an index into an array.
struct Step<'p> {
    token: &'p str,
    rest: &'p [String],
}

impl<'de> Visitor<'de> for Step<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut object: A) -> Result<Option<Value>, A::Error> {
        let mut found = None;
        while let Some(is_token) = object.next_key_seed(KeyIs(self.token))? {
            if is_token {
                found = object.next_value_seed(At(self.rest))?;
            } else {
                object.next_value_seed(Skip)?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut array: A) -> Result<Option<Value>, A::Error> {
        let wanted = array_index(self.token);
        let mut found = None;
        for index in 0.. {
            let more = if Some(index) == wanted {
                array
                    .next_element_seed(At(self.rest))?
                    .map(|value| found = value)
                    .is_some()
            } else {
                array.next_element_seed(Skip)?.is_some()
            };
            if !more {
                break;
            }
        }
        Ok(found)
    }

    // A scalar has nothing inside it for the path to name.
    fn visit_bool<E>(self, _: bool) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Option<Value>, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Option<Value>, E> {
        Ok(None)
    }
}

/// A value off the path, parsed with every check `Value` gets and kept nowhere.
///
/// serde's `IgnoredAny` would be cheaper, but serde_json skips it without checking numbers,
/// string escapes or nesting depth: a body `Value` rejects would yield a user ID.
#[derive(Clone, Copy)]
struct Skip;

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, value: D) -> Result<(), D::Error> {
        value.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut object: A) -> Result<(), A::Error> {
        while object.next_key_seed(Skip)?.is_some() {
            object.next_value_seed(Skip)?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut array: A) -> Result<(), A::Error> {
        while array.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// An array index as RFC 6901 spells it: digits, no leading zero (serde_json's rule too).
fn array_index(token: &str) -> Option<usize> {
    let digits = token.bytes().all(|byte| byte.is_ascii_digit());
    if !digits || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

/// Whether an object key equals the token, compared without copying the key.
struct KeyIs<'p>(&'p str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, key: D) -> Result<bool, D::Error> {
        key.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `Value::pointer` finds in the fully parsed document: the behaviour to keep.
    fn reference(body: &str, pointer: &str) -> Option<Value> {
        serde_json::from_str::<Value>(body)
            .ok()?
            .pointer(pointer)
            .cloned()
    }

    #[test]
    fn finds_what_value_pointer_finds() {
        let bodies = [
            r#"{"user":{"id":"dana"},"inputs":[[1,2],[3,4]]}"#,
            r#"{"user":{"id":42}}"#,
            r#"{"user":{"id":4.5e3}}"#,
            r#"{"user":{"id":[1,{"x":"y"}]}}"#,
            r#"{"user":5,"user":{"id":"last wins"}}"#,
            r#"{"user":{"id":"first"},"user":{"name":"no id"}}"#,
            r#"{"a/b":{"m~n":"escaped"},"":{"":"empty keys"}}"#,
            r#"[{"id":"zero"},{"id":"one"}]"#,
            r#"{"user":{"id":"x"}} trailing"#,
            r#"{"user":{"id":"x"},"rest":[1,2,"#,
            r#"{"user":{"id":"\u00fcml\"aut"}}"#,
            r#""just a string""#,
            "{not json",
            "",
            // Malformed off the path: `Value` rejects the whole body.
            r#"{"x":1e400,"user":{"id":"u"}}"#,
            r#"{"x":"\ud800","user":{"id":"u"}}"#,
            r#"{"x":-1e400,"user":{"id":"u"}}"#,
            r#"{"x":tru,"user":{"id":"u"}}"#,
        ];
        let pointers = [
            "",
            "/user",
            "/user/id",
            "/user/id/1/x",
            "/user/name",
            "/inputs/1/0",
            "/a~1b/m~0n",
            "//",
            "/0/id",
            "/1/id",
            "/01/id",
            "/2/id",
            "/-",
            "/user/id/0",
        ];
        for body in bodies {
            for text in pointers {
                let pointer = JsonPointer::new(text).expect("valid pointer");
                assert_eq!(
                    pointer.value_in(body.as_bytes()),
                    reference(body, text),
                    "{text:?} in {body}"
                );
            }
        }
    }

    #[test]
    fn bodies_value_rejects_off_the_path_yield_nothing() {
        let pointer = JsonPointer::new("/user_id").expect("valid");
        let deep = format!(
            r#"{{"x":{}{},"user_id":"u"}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let mut bad_utf8 = br#"{"x":"a"#.to_vec();
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        bad_utf8.extend_from_slice(br#"","user_id":"u"}"#);
        for body in [deep.as_bytes(), &bad_utf8] {
            assert!(serde_json::from_slice::<Value>(body).is_err());
            assert_eq!(pointer.value_in(body), None);
        }
        // The same shape, well formed, is read.
        let fine = format!(
            r#"{{"x":{}{},"user_id":"u"}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert_eq!(pointer.value_in(fine.as_bytes()), Some(Value::from("u")));
    }

    #[test]
    fn pointers_must_be_empty_or_start_with_a_slash() {
        assert!(JsonPointer::new("user/id").is_none());
        assert_eq!(JsonPointer::new("/a~1b").expect("valid").tokens[0], "a/b");
        assert_eq!(
            JsonPointer::new("/user/id").expect("valid").as_str(),
            "/user/id"
        );
    }

    #[test]
    fn a_field_after_a_large_array_is_found() {
        let mut body = String::from(r#"{"features":["#);
        body.push_str(&vec!["0.25"; 100_000].join(","));
        body.push_str(r#"],"user_id":"u-7"}"#);
        let pointer = JsonPointer::new("/user_id").expect("valid");
        assert_eq!(pointer.value_in(body.as_bytes()), Some(Value::from("u-7")));
    }
}
