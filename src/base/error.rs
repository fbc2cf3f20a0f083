//! The gateway's own failures and the one place they become HTTP answers.
//!
//! Every answer the gateway writes by itself uses the provider's envelope, so
//! callers parse one format whoever answered:
//!
//! ```json
//! {"requestId":"<gateway id>","code":502,"msg":"upstream unreachable","data":null,"source":"pandagate","error":"upstream_connect"}
//! ```
//!
//! `code` equals the HTTP status; `source` tells a gateway answer from a
//! provider answer; `error` is the stable kind, the access log's `error`. Messages never carry secrets, tokens or header values.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Why the gateway answered a call itself.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("CONNECT is not supported: this gateway is not a tunnel")]
    Connect,
    #[error("method {0} is not forwarded; allowed: {ALLOWED_METHODS}")]
    MethodNotAllowed(http::Method),
    #[error(
        "path is ambiguous: each segment must be letters, digits, '-', '.', '_' or '~', \
         not empty and not '.' or '..' (server.ambiguous_paths)"
    )]
    AmbiguousPath,
    #[error("request target must be a path on the configured upstream")]
    ForeignTarget,
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    #[error("x-pandagate-profile names no profile this caller may select")]
    ProfileNotSelectable,
    #[error("user-id is not allowed for this profile")]
    UserIdNotAllowed,
    #[error("request header {0} is not valid")]
    BadHeader(&'static str),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("request body could not be read")]
    BodyRead,
    #[error("request body not received within {0} ms")]
    BodyTimeout(u64),
    /// The bodies being read hold all the memory set aside for them
    /// (`crate::base::body_budget`).
    #[error(
        "the gateway is reading as many request bodies as server.max_buffered_body_bytes \
         allows; retry later"
    )]
    Overloaded,
    #[error("upstream unreachable")]
    UpstreamConnect,
    /// The TLS handshake with the provider failed: nothing was sent.
    #[error("TLS with {host} failed: {reason}; nothing was sent")]
    UpstreamTls { host: String, reason: TlsReason },
    /// The egress proxy did not open a tunnel to the provider: nothing was
    /// sent. `detail` is the tunnel's own account, which holds no header.
    #[error(
        "the egress proxy {proxy} did not open a way to the provider: {detail}; nothing was sent"
    )]
    UpstreamProxy { proxy: String, detail: String },
    #[error("upstream did not answer within {0} ms")]
    UpstreamTimeout(u64),
    #[error("upstream connection failed")]
    UpstreamFailed,
    #[error("upstream circuit open after repeated failures; retry later")]
    CircuitOpen { retry_after: std::time::Duration },
    #[error("rate limit of {limit} requests per second reached; retry later")]
    RateLimited {
        /// When a slot will be free.
        retry_after: std::time::Duration,
        /// The rate of the bucket that refused, in requests per second.
        limit: f64,
    },
    #[error(
        "Idempotency-Key must be one header of 1 to 255 visible ASCII characters, \
         bare or as a quoted string"
    )]
    BadIdempotencyKey,
    #[error("write calls must carry an Idempotency-Key (idempotency.require_key)")]
    IdempotencyKeyRequired,
    #[error(
        "a call with an Idempotency-Key is fingerprinted whole: its body must be at most \
         {limit} bytes (server.buffer_body_bytes)"
    )]
    KeyedBodyTooLarge { limit: u64 },
    #[error("the call first made with this Idempotency-Key is still in progress; retry later")]
    IdempotencyInProgress,
    #[error(
        "this Idempotency-Key was used for another call (method, path, query or body); \
         a new call needs a new key"
    )]
    IdempotencyKeyReused,
    #[error(
        "the gateway handling the call first made with this Idempotency-Key was lost before \
         it finished: whether the provider acted on it is unknown. Check the order list, \
         then use a new key"
    )]
    IdempotencyOutcomeUnknown,
    #[error(
        "the call first made with this Idempotency-Key was answered {status}; that answer \
         was longer than idempotency.max_response_bytes and was not kept. Check the order \
         list; do not send the call again under a new key unless it is missing"
    )]
    IdempotencyAnswerNotKept { status: u16 },
    #[error("the idempotency store cannot be reached; nothing was sent")]
    IdempotencyUnavailable,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Connect
            | Self::ForeignTarget
            | Self::AmbiguousPath
            | Self::BadHeader(_)
            | Self::BodyRead
            | Self::BadIdempotencyKey
            | Self::IdempotencyKeyRequired => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::ProfileNotSelectable | Self::UserIdNotAllowed => StatusCode::FORBIDDEN,
            Self::BodyTooLarge { .. } | Self::KeyedBodyTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::IdempotencyInProgress => StatusCode::CONFLICT,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::IdempotencyOutcomeUnknown | Self::IdempotencyAnswerNotKept { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::IdempotencyUnavailable | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UpstreamConnect
            | Self::UpstreamTls { .. }
            | Self::UpstreamProxy { .. }
            | Self::UpstreamFailed => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::CircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// A short stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect => "connect_method",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::AmbiguousPath => "ambiguous_path",
            Self::ForeignTarget => "foreign_target",
            Self::Unauthenticated => "unauthenticated",
            Self::ProfileNotSelectable => "profile_not_selectable",
            Self::UserIdNotAllowed => "user_id_not_allowed",
            Self::BadHeader(_) => "bad_header",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BodyRead => "body_read",
            Self::BodyTimeout(_) => "body_timeout",
            Self::Overloaded => "overloaded",
            Self::UpstreamConnect => "upstream_connect",
            Self::UpstreamTls { .. } => "upstream_tls",
            Self::UpstreamProxy { .. } => "upstream_proxy",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamFailed => "upstream_failed",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::RateLimited { .. } => "rate_limited",
            Self::BadIdempotencyKey => "bad_idempotency_key",
            Self::IdempotencyKeyRequired => "idempotency_key_required",
            Self::KeyedBodyTooLarge { .. } => "idempotency_body_too_large",
            Self::IdempotencyInProgress => "idempotency_in_progress",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyOutcomeUnknown => "idempotency_outcome_unknown",
            Self::IdempotencyAnswerNotKept { .. } => "idempotency_answer_not_kept",
            Self::IdempotencyUnavailable => "idempotency_store_unavailable",
        }
    }

    /// The answer the caller gets: status and envelope body.
    pub fn to_response(&self, request_id: &str) -> Response<Bytes> {
        let mut response =
            envelope_response(self.status(), request_id, self.kind(), &self.to_string());
        let headers = response.headers_mut();
        match self {
            Self::MethodNotAllowed(_) => {
                headers.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
            }
            Self::IdempotencyInProgress | Self::IdempotencyUnavailable | Self::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::CircuitOpen { retry_after } => {
                headers.insert(header::RETRY_AFTER, whole_seconds(*retry_after));
            }
            Self::RateLimited { retry_after, limit } => {
                let reset = whole_seconds(*retry_after);
                headers.insert(header::RETRY_AFTER, reset.clone());
                headers.insert(RATELIMIT_LIMIT, HeaderValue::from(limit.ceil() as u64));
                headers.insert(RATELIMIT_REMAINING, HeaderValue::from_static("0"));
                headers.insert(RATELIMIT_RESET, reset);
            }
            _ => {}
        }
        response
    }
}

/// Why a TLS handshake with a peer (the provider, a subscriber) failed, as
/// far as the gateway can tell; `crate::net::tls` reads it off the TLS library's
/// error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsReason {
    /// The certificate chains to no root the gateway trusts.
    UnknownIssuer,
    /// The certificate does not name the host the gateway asked for.
    WrongName,
    Expired,
    NotYetValid,
    Revoked,
    /// Another fault of the certificate (signature, encoding, purpose...).
    BadCertificate,
    /// The peer presented no certificate.
    NoCertificate,
    /// The peer ended the handshake with an alert.
    Refused,
    /// What came back was not TLS (a plain HTTP port, say).
    NotTls,
    /// Anything else the TLS library refused.
    Other,
}

impl TlsReason {
    /// A short stable name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownIssuer => "unknown_ca",
            Self::WrongName => "wrong_name",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Revoked => "revoked",
            Self::BadCertificate => "bad_certificate",
            Self::NoCertificate => "no_certificate",
            Self::Refused => "handshake_refused",
            Self::NotTls => "not_tls",
            Self::Other => "handshake_failed",
        }
    }
}

impl std::fmt::Display for TlsReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::UnknownIssuer => {
                "its certificate is issued by a CA the gateway does not trust \
                 (tls.roots, tls.ca_file)"
            }
            Self::WrongName => "its certificate is not valid for that host name",
            Self::Expired => "its certificate has expired",
            Self::NotYetValid => "its certificate is not valid yet",
            Self::Revoked => "its certificate is revoked",
            Self::BadCertificate => "its certificate is not acceptable",
            Self::NoCertificate => "it presented no certificate",
            Self::Refused => "it refused the handshake",
            Self::NotTls => "it did not answer in TLS",
            Self::Other => "the handshake failed",
        })
    }
}

const RATELIMIT_LIMIT: header::HeaderName = header::HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: header::HeaderName =
    header::HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: header::HeaderName = header::HeaderName::from_static("ratelimit-reset");

/// Whole seconds, rounded up, and never 0 (which invites a hot loop).
fn whole_seconds(d: std::time::Duration) -> HeaderValue {
    let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    HeaderValue::from(secs.max(1))
}

/// The methods forwarded upstream. The provider's API uses GET and POST;
/// the other standard methods pass through for it to answer. `TRACE`,
/// `TRACK` (which echo a request, freshly signed headers included, back to
/// whoever sent it), `CONNECT` and extension methods never do.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// A gateway-made envelope response with the given status, error kind and
/// message.
pub fn envelope_response(
    status: StatusCode,
    request_id: &str,
    error: &str,
    msg: &str,
) -> Response<Bytes> {
    let body = serde_json::json!({
        "requestId": request_id,
        "code": status.as_u16(),
        "msg": msg,
        "data": null,
        "source": "pandagate",
        "error": error,
    });
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_carries_status_as_code_and_names_the_source() {
        let r = GatewayError::BodyTooLarge { limit: 10 }.to_response("abc");
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["requestId"], "abc");
        assert_eq!(v["code"], 413);
        assert_eq!(v["msg"], "request body exceeds the limit of 10 bytes");
        assert!(v["data"].is_null());
        assert_eq!(v["source"], "pandagate");
        assert_eq!(v["error"], "body_too_large");
    }

    #[test]
    fn circuit_open_says_when_to_come_back() {
        let r = GatewayError::CircuitOpen {
            retry_after: std::time::Duration::from_millis(1500),
        }
        .to_response("id");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }

    #[test]
    fn overloaded_says_when_to_come_back() {
        let r = GatewayError::Overloaded.to_response("id");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["error"], "overloaded");
    }

    #[test]
    fn rate_limited_carries_retry_after_and_ratelimit_headers() {
        let r = GatewayError::RateLimited {
            retry_after: std::time::Duration::from_millis(2100),
            limit: 50.0,
        }
        .to_response("id");
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert_eq!(r.headers()["ratelimit-limit"], "50");
        assert_eq!(r.headers()["ratelimit-remaining"], "0");
        assert_eq!(r.headers()["ratelimit-reset"], "3");
    }

    #[test]
    fn each_error_has_its_status() {
        use GatewayError::*;
        let cases = [
            (Connect, 400),
            (MethodNotAllowed(http::Method::TRACE), 405),
            (AmbiguousPath, 400),
            (ForeignTarget, 400),
            (BadHeader("x-request-id"), 400),
            (BodyRead, 400),
            (Unauthenticated, 401),
            (ProfileNotSelectable, 403),
            (UserIdNotAllowed, 403),
            (BodyTooLarge { limit: 1 }, 413),
            (BodyTimeout(1), 408),
            (UpstreamConnect, 502),
            (
                UpstreamTls {
                    host: "h".into(),
                    reason: TlsReason::UnknownIssuer,
                },
                502,
            ),
            (
                UpstreamProxy {
                    proxy: "p:1".into(),
                    detail: "d".into(),
                },
                502,
            ),
            (UpstreamFailed, 502),
            (UpstreamTimeout(5), 504),
            (BadIdempotencyKey, 400),
            (IdempotencyKeyRequired, 400),
            (KeyedBodyTooLarge { limit: 1 }, 413),
            (IdempotencyInProgress, 409),
            (IdempotencyKeyReused, 422),
            (IdempotencyOutcomeUnknown, 502),
            (IdempotencyAnswerNotKept { status: 200 }, 502),
            (IdempotencyUnavailable, 503),
            (Overloaded, 503),
            (
                CircuitOpen {
                    retry_after: std::time::Duration::from_millis(1500),
                },
                503,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
        }
    }
}
