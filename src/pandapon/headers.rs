//! Header names the gateway reads, writes or removes, and hop-by-hop handling.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const ACCESS_KEY: HeaderName = HeaderName::from_static("access-key");
pub const TIMESTAMP: HeaderName = HeaderName::from_static("timestamp");
pub const NONCE_STR: HeaderName = HeaderName::from_static("nonce-str");
pub const USER_ID: HeaderName = HeaderName::from_static("user-id");
pub const SIGNATURE: HeaderName = HeaderName::from_static("signature");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_PANDAGATE_PROFILE: HeaderName = HeaderName::from_static("x-pandagate-profile");

/// The provider's system headers. Whatever a caller sent in them is removed
/// before the gateway writes its own: a caller never chooses the key or the
/// signature.
pub const CREDENTIAL_HEADERS: [HeaderName; 5] =
    [ACCESS_KEY, TIMESTAMP, NONCE_STR, USER_ID, SIGNATURE];

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus `expect`, which the gateway answers itself.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including any that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in connection_named(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Removes the headers the gateway owns on the way upstream: the provider's
/// system headers, the caller's `Authorization` and every `x-pandagate-*`
/// control header, and any other spelling of those and of the hop-by-hop
/// headers ([`reads_as_owned`]). The serving path does this in one pass with
/// the hop-by-hop removal; the tests state the rule with this function.
#[cfg(test)]
fn strip_gateway_owned(headers: &mut HeaderMap) {
    let owned: Vec<HeaderName> = headers
        .keys()
        .filter(|k| gateway_owned(k))
        .cloned()
        .collect();
    for name in owned {
        headers.remove(name);
    }
}

/// Whether only the gateway may send `name` upstream: the provider's system
/// headers, the caller's `Authorization` and every `x-pandagate-*` header.
fn gateway_owned(name: &HeaderName) -> bool {
    CREDENTIAL_HEADERS.contains(name)
        || name == header::EXPECT
        // The caller's credentials for the gateway, never the provider's business.
        || name == header::AUTHORIZATION
        || reads_as_owned(name)
}

/// Whether a caller's `name` is never sent upstream, whatever the route:
/// a hop-by-hop header or one the gateway owns.
pub fn never_forwarded(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || gateway_owned(name)
}

/// W3C trace context: passed on where other caller headers are not, as it
/// says nothing about what is asked.
pub const TRACE_CONTEXT: [HeaderName; 2] = [
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
];

/// Keeps only the `allowed` headers, trace context and the body's length
/// (the body is the call's own): what a cached route sends upstream.
pub fn keep_only(headers: &mut HeaderMap, allowed: &[HeaderName]) {
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            !(allowed.contains(name)
                || TRACE_CONTEXT.contains(name)
                || *name == header::CONTENT_LENGTH)
        })
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
}

/// The headers a `Connection` header names: hop-by-hop too.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect()
}

/// A copy of `value` in its own allocation. hyper parses a request's head
/// into slices of the connection's read buffer, so a value kept for the
/// whole call (sent on every attempt, logged at its end) would keep that
/// buffer too, while hyper has already taken a fresh one for the next read.
pub fn detached(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).expect("a header value's bytes");
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// The caller's headers as they may go upstream: [`strip_hop_by_hop`] and
/// [`strip_gateway_owned`] in one pass over the caller's headers (a request
/// carries a few), where those remove each listed name by lookup. The
/// values are [`detached`] from the caller's read buffer.
pub fn for_upstream(caller: HeaderMap) -> HeaderMap {
    let named = connection_named(&caller);
    let dropped = |name: &HeaderName| {
        HOP_BY_HOP.contains(name) || named.contains(name) || gateway_owned(name)
    };
    // Room for the headers the gateway adds.
    let mut out = HeaderMap::with_capacity(caller.len() + 8);
    let mut current: Option<(HeaderName, bool)> = None;
    // A name comes with its first value only; `None` repeats the last one.
    for (name, value) in caller {
        if let Some(name) = name {
            let keep = !dropped(&name);
            current = Some((name, keep));
        }
        if let Some((name, true)) = &current {
            out.append(name.clone(), detached(&value));
        }
    }
    out
}

/// Names (with `-` as the separator) that only the gateway may send
/// upstream, besides every `x-pandagate-*`.
const OWNED: [&str; 11] = [
    "access-key",
    "timestamp",
    "nonce-str",
    "user-id",
    "signature",
    "x-request-id",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "transfer-encoding",
];

/// Whether a caller's header reads as one the gateway owns. CGI, PHP, WSGI
/// and Rack turn `user_id` and `user-id` into the same variable, and other
/// stacks fold other punctuation, so names are compared with every run of
/// characters other than letters and digits read as one `-`, and none at
/// either end: `user_id`, `USER.ID`, `user__id`, `_user-id` and
/// `x_pandagate_profile` are all owned names. Header names are already
/// lower-case (`http` normalises them).
pub fn reads_as_owned(name: &HeaderName) -> bool {
    let n = name.as_str();
    if n.starts_with("x-pandagate-") {
        return true;
    }
    // A name already in canonical form is removed, or overwritten, by name
    // when it is an owned one; only other spellings need folding.
    let canonical = n
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--");
    if canonical {
        return false;
    }
    let folded = n
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    folded.starts_with("x-pandagate-") || OWNED.contains(&folded.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn strips_listed_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn strips_credentials_and_control_headers() {
        let mut h = HeaderMap::new();
        for name in CREDENTIAL_HEADERS {
            h.insert(name, HeaderValue::from_static("forged"));
        }
        h.insert(X_PANDAGATE_PROFILE, HeaderValue::from_static("ops"));
        h.insert("x-pandagate-anything", HeaderValue::from_static("1"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer caller-token"),
        );
        h.insert("content-type", HeaderValue::from_static("application/json"));
        strip_gateway_owned(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("content-type"));
    }

    /// One pass gives what the two strips give, value for value, over maps
    /// mixing every kind of header.
    #[test]
    fn for_upstream_is_both_strips() {
        let names = [
            "connection",
            "keep-alive",
            "x-secret-hop",
            "transfer-encoding",
            "upgrade",
            "te",
            "trailer",
            "proxy-authorization",
            "access-key",
            "user-id",
            "user_id",
            "signature_",
            "x-pandagate-profile",
            "x_pandagate_thing",
            "authorization",
            "expect",
            "x-request-id",
            "x_request_id",
            "content-type",
            "accept",
            "x-keep",
            "user-identity",
        ];
        let values = ["keep-alive, x-secret-hop", "close", "1", "a, b"];
        // 300 maps, each a different mix (with repeated names).
        let mut seed = 7u64;
        for _ in 0..300 {
            let mut h = HeaderMap::new();
            for _ in 0..(seed % 9) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let name = names[(seed >> 33) as usize % names.len()];
                let value = values[(seed >> 17) as usize % values.len()];
                h.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_static(value),
                );
            }
            seed = seed.wrapping_add(0x9e37);
            let mut two = h.clone();
            strip_hop_by_hop(&mut two);
            strip_gateway_owned(&mut two);
            let one = for_upstream(h.clone());
            // Removing by name reorders the others; the values of a name
            // keep their order either way.
            let pairs = |m: &HeaderMap| -> Vec<(String, String)> {
                let mut p: Vec<_> = m
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                    .collect();
                p.sort_by(|a, b| a.0.cmp(&b.0));
                p
            };
            assert_eq!(pairs(&one), pairs(&two), "from {h:?}");
        }
    }

    #[test]
    fn other_spellings_of_owned_headers_are_stripped() {
        let twins = [
            "user_id",
            "USER_ID",
            "user.id",
            "user~id",
            "access_key",
            "Access_Key",
            "nonce_str",
            "x_request_id",
            "x_pandagate_profile",
            "X-PANDAGATE_profile",
            "x.pandagate.anything",
            "transfer_encoding",
            "keep_alive",
            "proxy_authorization",
            "proxy_connection",
            "user__id",
            "_user_id",
            "user-id-",
            "-user-id",
            "user--id",
            "signature_",
            "x__pandagate__profile",
        ];
        let mut h = HeaderMap::new();
        for name in twins {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("forged"),
            );
        }
        let kept = [
            "user_ids",
            "xuser-id",
            "user-identity",
            "content_type",
            "x_custom",
            "timestamp_ms",
        ];
        for name in kept {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("data"),
            );
        }
        strip_gateway_owned(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        let mut want = kept.to_vec();
        want.sort_unstable();
        assert_eq!(left, want, "only headers of their own kept");
    }
}
