//! Reads `requestId`, `code` and `msg` from the start of a provider response.
//!
//! Only a prefix of the body is seen (the body streams on to the caller), so
//! the reader must cope with JSON cut anywhere: it records each wanted field as
//! soon as it has been read and stops at the first error or once all three are
//! known. Keys other than these three are skipped without allocating.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// The envelope fields found, each `None` when absent, not a string (for
/// `requestId`/`msg`) or beyond the inspected prefix.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EnvelopeFields {
    pub request_id: Option<String>,
    /// A number or a string, as the provider sent it.
    pub code: Option<Value>,
    pub msg: Option<String>,
}

/// Inspects a body prefix.
pub fn inspect(prefix: &[u8]) -> EnvelopeFields {
    let mut found = EnvelopeFields::default();
    let mut code_was_last = false;
    let mut de = serde_json::Deserializer::from_slice(prefix);
    // An error only means the prefix ended or is not an envelope: what was
    // read before it is kept in `found`.
    let ended_early = Reader(&mut found, &mut code_was_last)
        .deserialize(&mut de)
        .is_err_and(|e| e.is_eof());
    // A number is the one JSON value that can be cut and still parse ("20"
    // of "200"): when the prefix ends inside a numeric `code`, the code may
    // be incomplete, so it is not reported. "Inside" means the prefix ran
    // out (EOF) after the code's value and before the next key began, on a
    // number character. A syntax error elsewhere, or a cut inside a later
    // key, says nothing about the code (found by fuzzing,
    // `fuzz/regressions/envelope_prefix/`).
    let ends_on_a_number_char = prefix
        .last()
        .is_some_and(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    if ended_early
        && code_was_last
        && ends_on_a_number_char
        && found.code.as_ref().is_some_and(Value::is_number)
    {
        found.code = None;
    }
    found
}

struct Reader<'a>(&'a mut EnvelopeFields, &'a mut bool);

impl<'de> DeserializeSeed<'de> for Reader<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Reader<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let found = self.0;
        let code_was_last = self.1;
        // The first occurrence of a key counts; a repeated one is skipped, so
        // a longer prefix never changes what a shorter one read.
        let mut seen = [false; 3];
        while let Some(key) = map.next_key_seed(KeySeed(code_was_last))? {
            let first = match key {
                Key::Other => false,
                known => !std::mem::replace(&mut seen[known as usize], true),
            };
            // Only the value that is reported can be the one cut.
            *code_was_last = first && matches!(key, Key::Code);
            match key {
                Key::RequestId if first => found.request_id = string(map.next_value()?),
                Key::Msg if first => found.msg = string(map.next_value()?),
                Key::Code if first => {
                    let v: Value = map.next_value()?;
                    found.code = (v.is_number() || v.is_string()).then_some(v);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            if seen.iter().all(|s| *s) {
                break;
            }
        }
        Ok(())
    }
}

fn string(v: Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// Reads a key; that a key begins at all means the value before it ended
/// (serde_json calls the seed only after the `,` and the opening quote).
struct KeySeed<'a>(&'a mut bool);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        *self.0 = false;
        Key::deserialize(d)
    }
}

#[derive(Clone, Copy)]
enum Key {
    RequestId = 0,
    Code = 1,
    Msg = 2,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "requestId" => Key::RequestId,
                    "code" => Key::Code,
                    "msg" => Key::Msg,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FULL: &str = r#"{"requestId": "4cfda0b725184ab8a1e3ee3b9051ec35", "code": 200,
        "developId": "1014533973088404335", "msg": "成功", "data": {"a": [1, 2, {"b": "c"}]}}"#;

    #[test]
    fn reads_the_documented_example() {
        let f = inspect(FULL.as_bytes());
        assert_eq!(
            f.request_id.as_deref(),
            Some("4cfda0b725184ab8a1e3ee3b9051ec35")
        );
        assert_eq!(f.code, Some(json!(200)));
        assert_eq!(f.msg.as_deref(), Some("成功"));
    }

    #[test]
    fn keeps_what_came_before_a_cut_anywhere() {
        for cut in 0..FULL.len() {
            let f = inspect(&FULL.as_bytes()[..cut]);
            // Fields appear in order requestId, code, msg; a cut never invents values.
            if let Some(id) = &f.request_id {
                assert_eq!(id, "4cfda0b725184ab8a1e3ee3b9051ec35");
            }
            if f.code.is_some() {
                assert_eq!(f.code, Some(json!(200)));
                assert!(f.request_id.is_some());
            }
            if f.msg.is_some() {
                assert!(f.code.is_some());
            }
        }
    }

    #[test]
    fn fields_after_a_huge_data_value_are_beyond_a_short_prefix() {
        let body = format!(
            r#"{{"code":500,"data":"{}","requestId":"late","msg":"late"}}"#,
            "x".repeat(1000)
        );
        let f = inspect(&body.as_bytes()[..200]);
        assert_eq!(f.code, Some(json!(500)));
        assert_eq!(f.request_id, None);
        let f = inspect(body.as_bytes());
        assert_eq!(f.request_id.as_deref(), Some("late"));
    }

    #[test]
    fn string_codes_escapes_and_non_json() {
        let f = inspect(br#"{"code":"SYSTEM_BUSY","msg":"a\"b\u00e9","requestId":null}"#);
        assert_eq!(f.code, Some(json!("SYSTEM_BUSY")));
        assert_eq!(f.msg.as_deref(), Some("a\"b\u{e9}"));
        assert_eq!(f.request_id, None);
        assert_eq!(
            inspect(b"<html>502 Bad Gateway</html>"),
            EnvelopeFields::default()
        );
        assert_eq!(inspect(b"[1,2]"), EnvelopeFields::default());
        assert_eq!(inspect(b""), EnvelopeFields::default());
    }

    #[test]
    fn the_first_of_repeated_keys_counts() {
        let f = inspect(br#"{"code":"A1","code":200,"msg":null,"msg":"late","requestId":"r"}"#);
        assert_eq!(f.code, Some(json!("A1")));
        assert_eq!(f.msg, None);
        assert_eq!(f.request_id.as_deref(), Some("r"));
    }

    #[test]
    fn a_syntax_error_after_the_code_keeps_it_whatever_the_last_byte() {
        let f = inspect(br#"{"code":1:1e3"msg":null}e"#);
        assert_eq!(f.code, Some(json!(1)));
        let f = inspect(br#"{"code":1:"#);
        assert_eq!(f.code, Some(json!(1)));
        // Ran out right after the digits: may be cut, not reported.
        assert_eq!(inspect(br#"{"code":20"#).code, None);
        assert_eq!(inspect(br#"{"code": 2e"#).code, None);
        // Ran out in a later key that ends in a digit or a colon and a
        // digit: the code was whole.
        assert_eq!(inspect(br#"{"code":1e3,"Y1"#).code, Some(json!(1000.0)));
        assert_eq!(
            inspect(b"{\n\n\"code\":1e3,\n\"cod:1").code,
            Some(json!(1000.0))
        );
    }
}
