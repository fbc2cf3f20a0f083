//! Credentials inside URLs, kept out of everything pandagate prints about
//! its config: `pandagate check`, `Debug` of the config, config errors and
//! log lines.
//!
//! A URL may carry a password in its userinfo (`redis://:pw@host:6379`) or
//! in a query parameter (`redis+unix:///run/redis.sock?pass=pw`). [`url`]
//! replaces those parts with `<redacted>`; [`value`] does it to every string
//! of a serialised config, so a URL-valued key added later is covered
//! without being listed anywhere.
//!
//! The parsing here is deliberately loose: a string that only looks like a
//! URL is redacted as if it were one, and where the userinfo's end is
//! ambiguous (an `@` after a `/`, `?` or `#`) everything up to the last `@`
//! is redacted. Showing too little is the safe way to be wrong.

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;

/// What a credential is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Query parameter names (lower-cased substrings) whose values are credentials.
const SENSITIVE: [&str; 10] = [
    "pass",
    "pwd",
    "secret",
    "token",
    "key",
    "auth",
    "sig",
    "credential",
    "session",
    "cookie",
];

/// The parts of a URL-shaped string, by byte offsets.
struct Parts<'a> {
    text: &'a str,
    /// Start of the userinfo (just after `://`) and of the `@` ending it.
    userinfo: Option<(usize, usize)>,
    /// Offsets of each sensitive query value (start, end).
    values: Vec<(usize, usize)>,
}

fn parts(text: &str) -> Option<Parts<'_>> {
    let sep = text.find("://")?;
    let scheme = &text[..sep];
    let mut chars = scheme.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return None;
    }
    let start = sep + 3;
    let userinfo = text[start..].rfind('@').map(|at| (start, start + at));
    let after = userinfo.map_or(start, |(_, at)| at + 1);
    let mut values = Vec::new();
    if let Some(q) = text[after..].find('?') {
        let query_start = after + q + 1;
        let query_end = text[query_start..]
            .find('#')
            .map_or(text.len(), |h| query_start + h);
        let mut pos = query_start;
        for pair in text[query_start..query_end].split(['&', ';']) {
            if let Some(eq) = pair.find('=') {
                let name = percent_decode(&pair[..eq]).to_ascii_lowercase();
                let value_len = pair.len() - eq - 1;
                if value_len > 0 && SENSITIVE.iter().any(|s| name.contains(s)) {
                    values.push((pos + eq + 1, pos + pair.len()));
                }
            }
            pos += pair.len() + 1;
        }
    }
    Some(Parts {
        text,
        userinfo,
        values,
    })
}

impl Parts<'_> {
    /// The secret part of the userinfo: after the first `:` (the username
    /// is kept), or all of it when it has no `:` (a token used as a
    /// username) or holds a `/`, `?` or `#` (its end is ambiguous).
    fn secret_userinfo(&self) -> Option<(usize, usize)> {
        let (start, at) = self.userinfo?;
        let info = &self.text[start..at];
        if info.is_empty() {
            return None;
        }
        if info.contains(['/', '?', '#']) {
            return Some((start, at));
        }
        match info.find(':') {
            Some(colon) => Some((start + colon + 1, at)),
            None => Some((start, at)),
        }
    }

    /// Every credential span, in order.
    fn spans(&self) -> Vec<(usize, usize)> {
        self.secret_userinfo()
            .into_iter()
            .chain(self.values.iter().copied())
            .collect()
    }
}

/// `text` with the credentials of the URL it is replaced by `<redacted>`:
/// the password of its userinfo (all of the userinfo when it has no `:`)
/// and the values of query parameters named like a credential (`pass`,
/// `password`, `token`, `secret`, `key`, ...). Anything that is not
/// `scheme://...` comes back unchanged.
pub fn url(text: &str) -> Cow<'_, str> {
    let Some(parts) = parts(text) else {
        return Cow::Borrowed(text);
    };
    let spans = parts.spans();
    if spans.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (start, end) in spans {
        // A value inside an ambiguous userinfo is already covered.
        if start < last {
            continue;
        }
        out.push_str(&text[last..start]);
        out.push_str(REDACTED);
        last = end;
    }
    out.push_str(&text[last..]);
    Cow::Owned(out)
}

/// The credentials [`url`] hides in `text`, as written and percent-decoded.
pub fn credentials(text: &str) -> Vec<String> {
    let Some(parts) = parts(text) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for (start, end) in parts.spans() {
        let raw = &text[start..end];
        for candidate in [raw.to_owned(), percent_decode(raw)] {
            if !candidate.is_empty() && !found.contains(&candidate) {
                found.push(candidate);
            }
        }
    }
    found
}

/// `message` with `url` (and each of its credentials, wherever it appears)
/// redacted: for error texts of libraries that may quote what they parsed.
pub fn scrub(message: &str, url: &str) -> String {
    let mut out = message.replace(url, &self::url(url));
    // Longest first, so that a credential containing another is removed whole.
    let mut secrets = credentials(url);
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets {
        out = out.replace(&secret, REDACTED);
    }
    out
}

/// Every URL-looking word of a free text, redacted: the safety net for
/// messages that quote a config value.
pub fn urls_in(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let is_delimiter = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(sep) = rest.find("://") {
        let start = rest[..sep]
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let end = rest[sep..]
            .find(is_delimiter)
            .map_or(rest.len(), |e| sep + e);
        out.push_str(&rest[..start]);
        out.push_str(&url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Redacts every string in a serialised config, at any depth.
pub fn value(v: &mut toml::Value) {
    match v {
        toml::Value::String(s) => {
            if let Cow::Owned(redacted) = url(s) {
                *s = redacted;
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(value),
        toml::Value::Table(table) => table.iter_mut().for_each(|(_, v)| value(v)),
        _ => {}
    }
}

/// `Debug` for a config section: its serialised form with every URL
/// redacted (`Name { key = value, ... }`).
pub fn debug<T: Serialize>(name: &str, section: &T, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match toml::Value::try_from(section) {
        Ok(mut v) => {
            value(&mut v);
            write!(f, "{name} {v}")
        }
        Err(_) => write!(f, "{name} {{ <not shown> }}"),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_passwords_are_redacted_and_usernames_kept() {
        for (given, shown) in [
            (
                "redis://:hunter2@redis:6379",
                "redis://:<redacted>@redis:6379",
            ),
            (
                "redis://app:hunter2@redis:6379/0",
                "redis://app:<redacted>@redis:6379/0",
            ),
            (
                "rediss://default:p%40ss%3Aw0rd@r.example:6380",
                "rediss://default:<redacted>@r.example:6380",
            ),
            // Unencoded `@`, `:` and `/` in a password: everything up to the last `@`.
            ("redis://:p@ss@h:1", "redis://:<redacted>@h:1"),
            ("redis://u:a:b@h", "redis://u:<redacted>@h"),
            ("redis://:pa/ss@h", "redis://<redacted>@h"),
            ("redis://:pa?ss@h", "redis://<redacted>@h"),
            ("redis://:pa#ss@h", "redis://<redacted>@h"),
            // A token as the username.
            (
                "https://ghp_token@api.example.test/x",
                "https://<redacted>@api.example.test/x",
            ),
            ("http://user:@h/", "http://user:<redacted>@h/"),
        ] {
            assert_eq!(url(given), shown, "{given}");
        }
    }

    #[test]
    fn sensitive_query_values_are_redacted() {
        assert_eq!(
            url("redis+unix:///run/redis.sock?db=1&pass=hunter2&user=app"),
            "redis+unix:///run/redis.sock?db=1&pass=<redacted>&user=app"
        );
        assert_eq!(
            url("https://h/p?Access_Token=abc;API-KEY=def#frag"),
            "https://h/p?Access_Token=<redacted>;API-KEY=<redacted>#frag"
        );
        assert_eq!(
            url("https://h/p?x=1&password="),
            "https://h/p?x=1&password="
        );
    }

    #[test]
    fn anything_else_is_left_alone() {
        for text in [
            "redis://127.0.0.1:6379",
            "https://api.pandapon.com/base",
            "/var/lib/pandagate",
            "not a url",
            "user:pass@host",
            "127.0.0.1:8080",
            "://x:y@z",
            "",
        ] {
            assert!(matches!(url(text), Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn credentials_and_scrub_cover_encoded_forms() {
        let u = "redis://app:p%40ss@h:1?token=t0k";
        assert_eq!(credentials(u), ["p%40ss", "p@ss", "t0k"]);
        let message = format!("cannot use {u}: auth p@ss refused, token t0k");
        let scrubbed = scrub(&message, u);
        assert!(
            !scrubbed.contains("p@ss") && !scrubbed.contains("t0k"),
            "{scrubbed}"
        );
        assert!(
            scrubbed.contains("redis://app:<redacted>@h:1"),
            "{scrubbed}"
        );
    }

    #[test]
    fn urls_inside_a_message_are_redacted() {
        assert_eq!(
            urls_in("unknown variant `redis://:pw@h:1`, expected `local`"),
            "unknown variant `redis://:<redacted>@h:1`, expected `local`"
        );
        assert_eq!(
            urls_in("a \"https://u:pw@h/x\" and http://t@h2"),
            "a \"https://u:<redacted>@h/x\" and http://<redacted>@h2"
        );
        assert_eq!(urls_in("no url here"), "no url here");
    }

    #[test]
    fn every_string_of_a_value_is_redacted() {
        let mut v: toml::Value = toml::from_str(
            "a = \"redis://:pw1@h\"\n[t]\nlist = [\"https://u:pw2@h\", \"plain\"]\n[[arr]]\nurl = \"http://x:pw3@h\"\n",
        )
        .unwrap();
        value(&mut v);
        let text = v.to_string();
        for pw in ["pw1", "pw2", "pw3"] {
            assert!(!text.contains(pw), "{text}");
        }
        assert!(text.contains("plain"));
    }
}
