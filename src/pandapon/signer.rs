//! The PandaPon request signature: pure functions from (credentials, clock,
//! nonce) to the five system headers.
//!
//! ```
//! use pandagate::signer::{Recipe, sign};
//! let sig = sign(Recipe::Concat, "AK_TEST_0001", "1715669977082",
//!                "abcdefghijklmnopqrstuvwxyz012345", "SECRET_TEST_0001");
//! assert_eq!(&sig, b"377FF2A66780B485EC0559F43395D0F2");
//! ```
//!
//! The provider's manual section with the exact rule could not be
//! retrieved, so the recipe is chosen in config. Each recipe is
//! written once, as a sequence of [`Part`]s: the same sequence is hashed for the
//! signature and printed (secret redacted) by `pandagate sign --explain`.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// Which string is hashed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recipe {
    /// `access-key + timestamp + nonce-str + secret` (the default).
    #[default]
    Concat,
    /// `access-key + nonce-str + timestamp + secret`: fields sorted by name.
    SortedConcat,
    /// `access-key=..&nonce-str=..&timestamp=..` followed by the bare secret.
    QuerySecret,
    /// `access-key=..&nonce-str=..&timestamp=..&key=<secret>`.
    QueryKey,
}

impl Recipe {
    pub const ALL: [Recipe; 4] = [
        Recipe::Concat,
        Recipe::SortedConcat,
        Recipe::QuerySecret,
        Recipe::QueryKey,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Recipe::Concat => "concat",
            Recipe::SortedConcat => "sorted_concat",
            Recipe::QuerySecret => "query_secret",
            Recipe::QueryKey => "query_key",
        }
    }
}

/// Unit of the `timestamp` header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampUnit {
    /// Milliseconds since the Unix epoch, as in the manual's example.
    #[default]
    Ms,
    /// Seconds since the Unix epoch, as some public client code sends.
    S,
}

impl TimestampUnit {
    /// The timestamp for `now` in this unit.
    pub fn stamp(self, now: SystemTime) -> u64 {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        match self {
            TimestampUnit::Ms => since.as_millis() as u64,
            TimestampUnit::S => since.as_secs(),
        }
    }
}

/// One piece of the string to sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part<'a> {
    Text(&'a str),
    Secret,
}

/// Calls `f` with each part of the string to sign, in order.
pub fn for_each_part<'a>(
    recipe: Recipe,
    access_key: &'a str,
    timestamp: &'a str,
    nonce: &'a str,
    mut f: impl FnMut(Part<'a>),
) {
    use Part::{Secret, Text};
    match recipe {
        Recipe::Concat => [Text(access_key), Text(timestamp), Text(nonce), Secret]
            .into_iter()
            .for_each(f),
        Recipe::SortedConcat => [Text(access_key), Text(nonce), Text(timestamp), Secret]
            .into_iter()
            .for_each(f),
        Recipe::QuerySecret | Recipe::QueryKey => {
            for part in [
                Text("access-key="),
                Text(access_key),
                Text("&nonce-str="),
                Text(nonce),
                Text("&timestamp="),
                Text(timestamp),
            ] {
                f(part);
            }
            if recipe == Recipe::QueryKey {
                f(Text("&key="));
            }
            f(Secret);
        }
    }
}

/// The signature: 32 upper-case hex characters of the MD5 of the recipe's string.
pub fn sign(
    recipe: Recipe,
    access_key: &str,
    timestamp: &str,
    nonce: &str,
    secret: &str,
) -> [u8; 32] {
    let mut md5 = Md5::new();
    for_each_part(recipe, access_key, timestamp, nonce, |part| match part {
        Part::Text(t) => md5.update(t.as_bytes()),
        Part::Secret => md5.update(secret.as_bytes()),
    });
    let mut out = [0u8; 32];
    hex::encode_to_slice(md5.finalize(), &mut out).expect("16 bytes encode to 32");
    out.make_ascii_uppercase();
    out
}

/// The string that is hashed, with the secret shown as `<secret>`.
pub fn explain(recipe: Recipe, access_key: &str, timestamp: &str, nonce: &str) -> String {
    let mut s = String::new();
    for_each_part(recipe, access_key, timestamp, nonce, |part| match part {
        Part::Text(t) => s.push_str(t),
        Part::Secret => {
            let _ = write!(s, "<secret>");
        }
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected digests were computed outside this code base, with Python's
    // hashlib: hashlib.md5(s.encode()).hexdigest().upper() over the strings the
    // recipes (see `Recipe`) describe.
    const AK: &str = "AK_TEST_0001";
    const SK: &str = "SECRET_TEST_0001";
    const TS_MS: &str = "1715669977082";
    const TS_S: &str = "1715669977";
    const NONCE: &str = "abcdefghijklmnopqrstuvwxyz012345";

    fn sig(recipe: Recipe, ts: &str) -> String {
        String::from_utf8(sign(recipe, AK, ts, NONCE, SK).to_vec()).unwrap()
    }

    #[test]
    fn concat_known_answer() {
        assert_eq!(
            sig(Recipe::Concat, TS_MS),
            "377FF2A66780B485EC0559F43395D0F2"
        );
    }

    #[test]
    fn concat_known_answer_with_seconds() {
        assert_eq!(
            sig(Recipe::Concat, TS_S),
            "9BEEA9933F8811126DE21281A012FC0A"
        );
    }

    #[test]
    fn sorted_concat_known_answer() {
        assert_eq!(
            sig(Recipe::SortedConcat, TS_MS),
            "0E4B8BFEEE8EF9754B805A86F8EFF0C3"
        );
    }

    #[test]
    fn query_secret_known_answer() {
        assert_eq!(
            sig(Recipe::QuerySecret, TS_MS),
            "5E6BECD90942920E8D03662CFB00CE72"
        );
    }

    #[test]
    fn query_key_known_answer() {
        assert_eq!(
            sig(Recipe::QueryKey, TS_MS),
            "01416A03A59DEA8F2D1EE7558050D3CD"
        );
    }

    #[test]
    fn explain_shows_the_hashed_string_without_the_secret() {
        assert_eq!(
            explain(Recipe::Concat, AK, TS_MS, NONCE),
            "AK_TEST_00011715669977082abcdefghijklmnopqrstuvwxyz012345<secret>"
        );
        assert_eq!(
            explain(Recipe::QueryKey, AK, TS_MS, NONCE),
            "access-key=AK_TEST_0001&nonce-str=abcdefghijklmnopqrstuvwxyz012345&timestamp=1715669977082&key=<secret>"
        );
        for recipe in Recipe::ALL {
            assert!(!explain(recipe, AK, TS_MS, NONCE).contains(SK));
        }
    }

    #[test]
    fn timestamp_units() {
        let t = UNIX_EPOCH + std::time::Duration::from_millis(1_715_669_977_082);
        assert_eq!(TimestampUnit::Ms.stamp(t), 1_715_669_977_082);
        assert_eq!(TimestampUnit::S.stamp(t), 1_715_669_977);
    }
}
