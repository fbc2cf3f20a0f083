//! The one Redis setup, shared by the rate limiter, the idempotency store
//! and the read cache: a lazy connection manager (nothing is dialled until
//! the first command) whose connects and answers are bounded by the
//! caller's timeout, with one retry of a failed connect.
//!
//! `redis://` is plaintext. `rediss://` is TLS through the redis crate's
//! rustls support, handed the certificates of `[tls]` as its only roots:
//! the crate's own defaults (the platform store, or Mozilla's roots) are
//! never consulted. A handshake that fails is named as TLS in error texts,
//! which never show the URL's password.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use rustls::pki_types::CertificateDer;

use crate::base::redact;
use crate::config::{ConfigError, RedisUrl};
use crate::net::tls::WithTrust;

/// A lazy connection manager for `url`: each connect and each answer
/// within `timeout`. Needs a tokio runtime. Errors name `key` (the
/// section's URL key), never the URL's password.
pub fn connect(
    url: &WithTrust<RedisUrl>,
    key: &str,
    timeout: Duration,
) -> Result<ConnectionManager, ConfigError> {
    let fail = |e: redis::RedisError| ConfigError::new(key, describe(&e, url));
    // The redis crate builds its rustls config with the process-wide
    // provider: make it `ring`, the gateway's, whatever else the dependency
    // tree may compile in. Already installed (by an earlier call): fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    ConnectionManager::new_lazy_with_config(client(url).map_err(fail)?, config).map_err(fail)
}

/// The client `url` names; over TLS, trusting exactly `url.trust()`.
fn client(url: &WithTrust<RedisUrl>) -> redis::RedisResult<redis::Client> {
    let plain = redis::Client::open(url.expose())?;
    if !matches!(
        plain.get_connection_info().addr(),
        redis::ConnectionAddr::TcpTls { .. }
    ) {
        return Ok(plain);
    }
    redis::Client::build_with_tls(
        url.expose(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem(url.trust().certificates())),
        },
    )
}

/// `certificates` as one PEM text, the form the redis crate takes roots in.
fn pem(certificates: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for cert in certificates {
        out.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let encoded = base64::engine::general_purpose::STANDARD.encode(cert);
        for line in encoded.as_bytes().chunks(64) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        out.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    out
}

/// `e` as a log or error text: the URL's password scrubbed, and a failed
/// TLS handshake (an untrusted certificate, a name that does not match, a
/// server that does not speak TLS) said to be one.
pub fn describe(e: &redis::RedisError, url: &RedisUrl) -> String {
    let text = redact::scrub(&e.to_string(), url.expose());
    if is_tls_failure(e) {
        format!("TLS handshake with Redis failed: {text}")
    } else {
        text
    }
}

/// Whether a rustls error is among `e`'s causes. The redis crate keeps an
/// I/O error's cause behind an `Arc`, and `io::Error::source` skips the
/// error it wraps, so both are opened by hand.
fn is_tls_failure(e: &redis::RedisError) -> bool {
    let mut next = e.source();
    while let Some(cause) = next {
        let cause = match cause.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
            Some(inner) => &**inner as &(dyn std::error::Error + 'static),
            None => cause,
        };
        if cause.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        next = cause.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsConfig;
    use crate::net::tls::Trust;

    #[test]
    fn the_roots_handed_to_redis_are_the_trusts_one_for_one() {
        let trust = Trust::load(&TlsConfig::default()).unwrap();
        let text = pem(trust.certificates());
        let back: Vec<CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(&text)
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(back.as_slice(), trust.certificates());
    }

    #[test]
    fn a_url_is_plain_or_tls_by_its_scheme() {
        let trust = Trust::load(&TlsConfig::default()).unwrap();
        for (url, tls) in [
            ("redis://:pw@127.0.0.1:1", false),
            ("rediss://:pw@localhost:1", true),
        ] {
            let url = WithTrust::new(RedisUrl::parse(url, "k").unwrap(), trust.clone());
            let client = client(&url).unwrap();
            let is_tls = matches!(
                client.get_connection_info().addr(),
                redis::ConnectionAddr::TcpTls {
                    tls_params: Some(_),
                    ..
                }
            );
            assert_eq!(is_tls, tls, "{url:?}");
        }
    }

    #[test]
    fn an_error_text_never_shows_the_password() {
        let url = RedisUrl::parse("rediss://:pw-in-url-4@localhost:1", "k").unwrap();
        let e = redis::RedisError::from((
            redis::ErrorKind::Io,
            "failed",
            "rediss://:pw-in-url-4@localhost:1 refused".to_owned(),
        ));
        let text = describe(&e, &url);
        assert!(!text.contains("pw-in-url-4"), "{text}");
        assert!(!text.contains("TLS"), "not a handshake: {text}");
        let tls = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        let text = describe(&tls, &url);
        assert!(text.starts_with("TLS handshake"), "{text}");
    }
}
