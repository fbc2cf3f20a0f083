//! Fuzz entry points: one function per edge, each turning arbitrary bytes
//! into an input, running the gateway's own code on it and panicking when a
//! property breaks. `fuzz/fuzz_targets/*.rs` (cargo-fuzz, libFuzzer) call
//! them; `tests/it/fuzz_regressions.rs` replays the saved inputs under
//! `fuzz/regressions/` and the seed corpus on stable Rust in every test run.
//!
//! The properties, besides "does not panic":
//!
//! * [`request_edge`]: whatever the caller sends, the upstream request names
//!   the upstream's host, carries the caller's path and query byte for byte
//!   behind the base path, and none of the caller's credential, hop-by-hop or
//!   `x-pandagate-*` headers; every other header it carries is one the caller
//!   sent, unchanged (data stays data), and none is another spelling of a
//!   gateway header (`user_id`). A path a server could resolve elsewhere
//!   is refused, and never a `read`. Neither the upstream request nor the
//!   logged `x-request-id` shares memory with the caller's head (hyper's
//!   read buffer, which the call would otherwise keep to its end).
//! * [`envelope_prefix`]: on a complete JSON object the prefix reader agrees
//!   with serde_json; on any prefix of it, it reports nothing it would not
//!   report on the whole.
//! * [`config_text`]: parsing never panics; a valid config serialises to
//!   TOML that parses back to the same config, still valid; what `check`
//!   shows of it parses too, with no credential left in any URL.
//! * [`callback`]: a push is accepted only with the body's own HMAC; a
//!   correctly signed body is never refused for its signature.

use std::sync::OnceLock;

use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use sha2::Sha256;

use crate::base::secret::Secret;
use crate::callbacks::{PushRejected, verify_push};
use crate::config::Class;
use crate::config::{self, Config, LogFormat, ProfileConfig};
use crate::gateway::{Gateway, Lasting, caller_request_id};
use crate::observe::access_log::{AccessLog, AccessRecord};
use crate::pandapon::envelope;
use crate::pandapon::headers::{CREDENTIAL_HEADERS, USER_ID, X_REQUEST_ID};
use crate::policy::routes::is_ambiguous;

const UPSTREAM: &str = "https://api.example.test/base";
const USER: &str = "2100007341207";
const ALLOWED: [&str; 2] = ["11", "22"];
const CLIENT_TOKEN: &str = "fuzz-caller-token";

/// Hop-by-hop names the gateway must never pass on.
const HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Two gateways: open (no `[[clients]]`) and refusing ambiguous paths, and
/// one that wants a bearer token and forwards ambiguous paths.
fn gateways() -> &'static [Gateway; 2] {
    static GATEWAYS: OnceLock<[Gateway; 2]> = OnceLock::new();
    GATEWAYS.get_or_init(|| {
        let env = |name: &str| match name {
            "FUZZ_SECRET" => Some("fuzz-secret".to_owned()),
            "FUZZ_TOKEN" => Some(CLIENT_TOKEN.to_owned()),
            _ => None,
        };
        let (log, _writer) = AccessLog::spawn(LogFormat::Json, Box::new(std::io::sink()));
        let build = |with_clients: bool| {
            let mut c = Config::default();
            c.upstream.url = UPSTREAM.into();
            c.profiles = vec![
                ProfileConfig {
                    name: "default".into(),
                    access_key: Some("ak-fuzz".into()),
                    secret_env: Some("FUZZ_SECRET".into()),
                    user_id: Some(USER.into()),
                    ..ProfileConfig::default()
                },
                ProfileConfig {
                    name: "ops".into(),
                    access_key: Some("ak-ops".into()),
                    secret_env: Some("FUZZ_SECRET".into()),
                    user_id: Some(ALLOWED[0].into()),
                    allowed_user_ids: Some(ALLOWED.map(String::from).to_vec()),
                    selectable: true,
                    ..ProfileConfig::default()
                },
            ];
            if with_clients {
                c.server.ambiguous_paths = config::AmbiguousPaths::Forward;
                c.clients = vec![crate::config::ClientConfig {
                    name: "svc".into(),
                    token_env: Some("FUZZ_TOKEN".into()),
                    profiles: vec!["default".into(), "ops".into()],
                    ..Default::default()
                }];
            }
            let loaded = crate::policy::loaded::resolve(c, &env).expect("the fuzz config is valid");
            let lasting = Lasting::open(&loaded, log.clone()).expect("the fuzz gateway opens");
            Gateway::new(&loaded, lasting).expect("the fuzz gateway builds")
        };
        [build(false), build(true)]
    })
}

/// Splits fuzz bytes into a request head: byte 0 picks the gateway and the
/// HTTP version, then `METHOD TARGET` and `name: value` lines (`\n`).
/// Lines that `http` refuses are dropped, as hyper would refuse them. As
/// hyper does, the target and the values are slices of one buffer, which
/// comes back with the request.
fn request_from(data: &[u8]) -> Option<(usize, Request<()>, Bytes)> {
    let (&flags, rest) = data.split_first()?;
    let head = Bytes::copy_from_slice(rest);
    let mut lines = rest.split(|&b| b == b'\n');
    let start = lines.next()?;
    let space = start.iter().position(|&b| b == b' ')?;
    let method = Method::from_bytes(&start[..space]).ok()?;
    let target = Uri::from_maybe_shared(slice_of(&head, rest, &start[space + 1..])).ok()?;
    let version = if flags & 2 == 0 {
        Version::HTTP_11
    } else {
        Version::HTTP_2
    };
    let mut req = Request::builder()
        .method(method)
        .uri(target)
        .version(version)
        .body(())
        .ok()?;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = slice_of(&head, rest, line[colon + 1..].trim_ascii());
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_maybe_shared(value),
        ) else {
            continue;
        };
        req.headers_mut().append(name, value);
    }
    Some((usize::from(flags & 1), req, head))
}

/// The part of `head` (a copy of `rest`) where `part` (a slice of `rest`) is.
fn slice_of(head: &Bytes, rest: &[u8], part: &[u8]) -> Bytes {
    let start = part.as_ptr() as usize - rest.as_ptr() as usize;
    head.slice(start..start + part.len())
}

/// Whether `part` lies in `head`'s memory.
fn within(head: &Bytes, part: &[u8]) -> bool {
    let range = head.as_ptr_range();
    !part.is_empty() && range.contains(&part.as_ptr())
}

/// The inbound request edge: target checks, credential and hop-by-hop
/// stripping, profile and user-id choice, route classification.
pub fn request_edge(data: &[u8]) {
    let Some((which, req, head)) = request_from(data) else {
        return;
    };
    let gateway = &gateways()[which];
    let (parts, ()) = req.into_parts();
    let inbound = parts.clone();
    let x_request_id = caller_request_id(&parts.headers)
        .unwrap_or_else(|| HeaderValue::from_static("fuzz-request-id"));
    assert!(
        !within(&head, x_request_id.as_bytes()),
        "the kept x-request-id is a slice of the caller's head"
    );
    let mut record = AccessRecord::start(parts.method.clone(), parts.uri.path(), &x_request_id);
    let Ok(prepared) = gateway.prepare(parts, &x_request_id, &mut record) else {
        return;
    };

    assert_ne!(prepared.method, Method::CONNECT, "CONNECT forwarded");
    assert_eq!(prepared.method, inbound.method);
    let uri = &prepared.uri;
    assert_eq!(uri.host(), Some("api.example.test"), "{uri}");
    let inbound_pq = inbound.uri.path_and_query().map_or("/", |pq| pq.as_str());
    assert_eq!(
        uri.path_and_query().map(|pq| pq.as_str()),
        Some(format!("/base{inbound_pq}").as_str()),
        "target not passed byte for byte"
    );

    // What the call keeps for its whole life holds no part of the buffer
    // the caller's head was read into.
    if let Some(pq) = uri.path_and_query() {
        assert!(
            !within(&head, pq.as_str().as_bytes()),
            "the target is a slice of the caller's head"
        );
    }
    for (name, value) in &prepared.headers {
        assert!(
            !within(&head, value.as_bytes()),
            "{name} is a slice of the caller's head"
        );
    }

    let out = &prepared.headers;
    assert_eq!(out[header::HOST], "api.example.test");
    assert_eq!(out[X_REQUEST_ID], x_request_id);
    let user_ids: Vec<_> = out.get_all(USER_ID).iter().collect();
    assert_eq!(user_ids.len(), 1, "one user-id, always");
    assert!(
        user_ids[0] == USER || ALLOWED.iter().any(|a| user_ids[0] == a),
        "user-id {:?} is not one the profile allows",
        user_ids[0]
    );
    for name in CREDENTIAL_HEADERS.iter().filter(|n| **n != USER_ID) {
        assert!(!out.contains_key(name), "caller's {name} passed on");
    }
    assert!(
        !out.contains_key(header::AUTHORIZATION),
        "caller token passed on"
    );
    let connection_named: Vec<String> = inbound
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in out {
        let n = name.as_str();
        assert!(
            !n.starts_with("x-pandagate-"),
            "control header {n} passed on"
        );
        assert!(!HOP.contains(&n), "hop-by-hop {n} passed on");
        assert!(
            !crate::pandapon::headers::reads_as_owned(name),
            "{n}, another spelling of a gateway header, passed on"
        );
        // The gateway's own headers, whatever the caller's Connection named.
        if name == header::HOST || name == X_REQUEST_ID || name == USER_ID {
            continue;
        }
        assert!(
            !connection_named.iter().any(|c| c == n),
            "{n}, named by Connection, passed on"
        );
        assert!(
            inbound.headers.get_all(name).iter().any(|v| v == value),
            "{n}: a value the caller did not send"
        );
    }

    if is_ambiguous(inbound.uri.path()) {
        assert_eq!(which, 1, "an ambiguous path was not refused: {inbound_pq}");
        assert_eq!(prepared.route.class, Class::Unknown, "{inbound_pq}");
        assert_eq!(prepared.route.bucket, None, "{inbound_pq}");
    }
}

/// Reading `requestId`/`code`/`msg` from an arbitrary response prefix.
pub fn envelope_prefix(data: &[u8]) {
    let whole = envelope::inspect(data);
    // Differential: where serde_json reads the object (and finds no field
    // twice), the prefix reader must find the same values.
    #[derive(serde::Deserialize)]
    struct Strict {
        #[serde(rename = "requestId")]
        request_id: Option<serde_json::Value>,
        code: Option<serde_json::Value>,
        msg: Option<serde_json::Value>,
    }
    // (A struct also deserialises from an array, positionally: objects only.)
    let is_object = serde_json::from_slice::<serde_json::Value>(data).is_ok_and(|v| v.is_object());
    if let Some(strict) = is_object
        .then(|| serde_json::from_slice::<Strict>(data).ok())
        .flatten()
    {
        let as_string = |v: Option<serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) => Some(s),
            _ => None,
        };
        assert_eq!(whole.request_id, as_string(strict.request_id));
        assert_eq!(whole.msg, as_string(strict.msg));
        let code = strict.code.filter(|c| c.is_number() || c.is_string());
        assert_eq!(whole.code, code);
    }
    // Any prefix reports a subset of what the whole reports.
    for cut in [data.len() / 3, data.len() / 2, data.len().saturating_sub(1)] {
        let part = envelope::inspect(&data[..cut]);
        for (got, full) in [
            (&part.request_id, &whole.request_id),
            (&part.msg, &whole.msg),
        ] {
            assert!(
                got.is_none() || got == full,
                "prefix {cut} read {got:?}, whole {full:?}"
            );
        }
        assert!(
            part.code.is_none() || part.code == whole.code,
            "prefix {cut} read code {:?}, whole {:?}",
            part.code,
            whole.code
        );
    }
}

/// Config parsing and validation.
pub fn config_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml(text) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    let written = config.to_toml_unredacted();
    let again = Config::from_toml(&written)
        .unwrap_or_else(|e| panic!("a valid config's TOML does not parse: {e}\n{written}"));
    again
        .validate()
        .unwrap_or_else(|e| panic!("a valid config's TOML does not validate: {e}\n{written}"));
    assert_eq!(
        again.to_toml_unredacted(),
        written,
        "TOML round trip changed the config"
    );
    // What `check` shows: the same keys, only credentials in URLs replaced,
    // and nothing left to redact.
    let shown = config.to_toml();
    let shown_config = Config::from_toml(&shown)
        .unwrap_or_else(|e| panic!("the redacted TOML does not parse: {e}\n{shown}"));
    assert_eq!(shown_config.to_toml(), shown, "redaction is not stable");
    let left = credentials_in(&shown);
    assert!(left.is_empty(), "{left:?} shown in:\n{shown}");
}

/// The credentials (other than `<redacted>`) of every URL-shaped string
/// value in `toml`.
fn credentials_in(toml: &str) -> Vec<String> {
    fn walk(v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::String(s) => out.extend(crate::base::redact::credentials(s)),
            toml::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            toml::Value::Table(t) => t.iter().for_each(|(_, v)| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Ok(v) = toml::from_str::<toml::Value>(toml) {
        walk(&v, &mut out);
    }
    out.retain(|c| c != crate::base::redact::REDACTED);
    out
}

/// Verifying a pushed message. Byte 0 is the length of the `Authorization`
/// value that follows; the rest is the body.
pub fn callback(data: &[u8]) {
    let secret = Secret::new("fuzz-callback-secret");
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (auth, body) = rest.split_at(usize::from(n).min(rest.len()));
    let mac = |key: &str| {
        let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key.as_bytes())
            .expect("HMAC takes keys of any length");
        m.update(body);
        m.finalize().into_bytes()
    };
    let right = mac(secret.expose());

    // The fuzzed Authorization: accepted only when it is the body's HMAC.
    if let Ok(value) = HeaderValue::from_bytes(auth) {
        let verdict = verify_push(&secret, Some(&value), body);
        if verdict.as_ref().err() != Some(&PushRejected::BadSignature) {
            let presented = value.to_str().ok().and_then(|v| hex::decode(v.trim()).ok());
            assert_eq!(
                presented.as_deref(),
                Some(&right[..]),
                "accepted a signature that is not the body's"
            );
        }
    }
    // No Authorization, or another key's signature: refused.
    assert_eq!(
        verify_push(&secret, None, body).err(),
        Some(PushRejected::BadSignature)
    );
    let forged = HeaderValue::from_str(&hex::encode(mac("another-secret"))).expect("hex");
    assert_eq!(
        verify_push(&secret, Some(&forged), body).err(),
        Some(PushRejected::BadSignature)
    );
    // The right signature, in either case: never refused for it.
    for signed in [hex::encode(right), hex::encode_upper(right)] {
        let value = HeaderValue::from_str(&signed).expect("hex");
        assert_ne!(
            verify_push(&secret, Some(&value), body).err(),
            Some(PushRejected::BadSignature)
        );
    }
}
