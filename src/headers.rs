//! Header names the gateway reads, writes or removes, and hop-by-hop handling.

use http::header::{self, HeaderMap, HeaderName};

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
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Removes the headers the gateway owns on the way upstream: the provider's
/// system headers, the caller's `Authorization` and every `x-pandagate-*`
/// control header.
pub fn strip_gateway_owned(headers: &mut HeaderMap) {
    for name in CREDENTIAL_HEADERS {
        headers.remove(name);
    }
    headers.remove(header::EXPECT);
    // The caller's credentials for the gateway, never the provider's business.
    headers.remove(header::AUTHORIZATION);
    if headers.keys().any(is_control_header) {
        let control: Vec<HeaderName> = headers
            .keys()
            .filter(|k| is_control_header(k))
            .cloned()
            .collect();
        for name in control {
            headers.remove(name);
        }
    }
}

fn is_control_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-pandagate-")
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
}
