//! `[upstream]`: the provider, and how it is reached.

use std::fmt;

use http::Uri;
use serde::{Deserialize, Serialize};

use super::error::{ConfigError, positive};

/// The provider. `Debug` shows the URL redacted.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL (env `PANDAGATE_UPSTREAM`): `https://` in production, `http://`
    /// for local sandboxes. A path here is prefixed to every forwarded path.
    pub url: String,
    /// Time to establish a TCP (and TLS) connection, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Time from sending a request to receiving the response head, in
    /// milliseconds: the one attempt of a call that cannot be repeated, and
    /// the upper bound for attempts of one that can (see `retry`).
    pub request_timeout_ms: u64,
    /// How long an idle pooled connection is kept, in milliseconds.
    pub pool_idle_timeout_ms: u64,
    /// Most idle connections kept to the provider, by each serving thread
    /// (see `server.worker_threads`).
    pub pool_max_idle: usize,
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::redact::debug("UpstreamConfig", self, f)
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "https://api.pandapon.com".to_owned(),
            connect_timeout_ms: 3_000,
            request_timeout_ms: 30_000,
            pool_idle_timeout_ms: 60_000,
            pool_max_idle: 256,
        }
    }
}

impl UpstreamConfig {
    /// Timeouts positive; the URL an `http(s)` base without credentials.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("upstream.connect_timeout_ms", self.connect_timeout_ms),
            ("upstream.request_timeout_ms", self.request_timeout_ms),
            ("upstream.pool_idle_timeout_ms", self.pool_idle_timeout_ms),
        ] {
            positive(key, value)?;
        }
        let base = upstream_base(&self.url).map_err(|m| ConfigError::new("upstream.url", m))?;
        if base.authority().is_some_and(|a| a.as_str().contains('@')) {
            // The authority becomes `Host` (and HTTP/2's `:authority`):
            // credentials in it would be sent to the provider in the clear.
            return Err(ConfigError::new(
                "upstream.url",
                format_args!(
                    "must not carry credentials (user:password@): calls are authenticated \
                     by their signature; {}",
                    crate::redact::url(&self.url)
                ),
            ));
        }
        Ok(())
    }
}

/// A base URL that cannot be one. Shows the URL with its credentials
/// redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseUrlError {
    #[error("not a URL: {shown:?} ({reason})")]
    NotAUrl { shown: String, reason: String },
    #[error("must start with http:// or https://: {0:?}")]
    Scheme(String),
    #[error("has no host: {0:?}")]
    NoHost(String),
    #[error("must not have a query string: {0:?}")]
    Query(String),
}

/// Splits and checks an upstream base URL: `http(s)://authority[/path]`.
pub fn upstream_base(url: &str) -> Result<Uri, BaseUrlError> {
    let shown = crate::redact::url(url).into_owned();
    let uri: Uri = url.parse().map_err(|e| BaseUrlError::NotAUrl {
        reason: crate::redact::scrub(&format!("{e}"), url),
        shown: shown.clone(),
    })?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(BaseUrlError::Scheme(shown)),
    }
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        return Err(BaseUrlError::NoHost(shown));
    }
    if uri.query().is_some() {
        return Err(BaseUrlError::Query(shown));
    }
    Ok(uri)
}
