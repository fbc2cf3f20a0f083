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
    /// Time to establish a connection, in milliseconds: TCP, the egress
    /// proxy's `CONNECT` and the TLS handshake together. Past it nothing
    /// was sent: a connect failure, which any call may retry.
    pub connect_timeout_ms: u64,
    /// Time from sending a request to receiving the response head, in
    /// milliseconds: the one attempt of a call that cannot be repeated, and
    /// the upper bound for attempts of one that can (see `retry`).
    pub request_timeout_ms: u64,
    /// How long an idle pooled connection is kept, in milliseconds.
    pub pool_idle_timeout_ms: u64,
    /// How long an idle connection may still carry a call that is never
    /// sent twice (a write or an unknown path), in milliseconds: such calls
    /// have a pool of their own. A provider that closes idle connections
    /// closes one now and then just as a call is written to it; a read
    /// caught so is retried, a write is not (it may have arrived), so writes
    /// take a connection that has been idle for less than this or a new one.
    pub write_pool_idle_timeout_ms: u64,
    /// Most idle connections kept to the provider, by each serving thread
    /// (see `server.worker_threads`).
    pub pool_max_idle: usize,
    /// The egress proxy to the provider: `http://[user:password@]host:port`,
    /// or `"none"` for none whatever the environment says. Unset: the
    /// environment's `https_proxy`/`HTTPS_PROXY` (`http_proxy`/`HTTP_PROXY`
    /// for an `http://` upstream), as curl reads them. `NO_PROXY` applies to
    /// either. Subscribers are never reached through it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::base::redact::debug("UpstreamConfig", self, f)
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "https://api.pandapon.com".to_owned(),
            connect_timeout_ms: 3_000,
            request_timeout_ms: 30_000,
            pool_idle_timeout_ms: 60_000,
            write_pool_idle_timeout_ms: 1_000,
            pool_max_idle: 256,
            proxy: None,
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
            (
                "upstream.write_pool_idle_timeout_ms",
                self.write_pool_idle_timeout_ms,
            ),
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
                    crate::base::redact::url(&self.url)
                ),
            ));
        }
        match self.proxy.as_deref() {
            None | Some(PROXY_NONE) => {}
            Some(url) if !url.contains("://") => {
                return Err(ConfigError::new(
                    "upstream.proxy",
                    "must be http://[user:password@]host:port, or \"none\"",
                ));
            }
            Some(url) => {
                proxy_url(url).map_err(|m| ConfigError::new("upstream.proxy", m))?;
            }
        }
        Ok(())
    }
}

/// `upstream.proxy` saying that no proxy is used, whatever the environment
/// says.
pub const PROXY_NONE: &str = "none";

/// An egress proxy's URL as curl reads one: `[http://][user:password@]host[:port]`,
/// the port 1080 when none is given. The gateway speaks plain HTTP to its
/// proxy (TLS to the provider runs inside the tunnel), so `https://` and
/// SOCKS proxies are refused. Returns the URL with its scheme and port
/// written out, credentials as given; errors show it redacted.
pub fn proxy_url(text: &str) -> Result<String, String> {
    let text = text.trim();
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => ("http".to_owned(), text),
    };
    let shown = crate::base::redact::url(&format!("{scheme}://{rest}")).into_owned();
    match scheme.as_str() {
        "http" => {}
        "https" => {
            return Err(format!(
                "{shown:?}: a proxy spoken to over TLS is not supported; use http:// (calls \
                 to the provider stay TLS inside the tunnel)"
            ));
        }
        _ => {
            return Err(format!(
                "{shown:?}: only http:// proxies are supported (HTTP CONNECT)"
            ));
        }
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(format!(
            "{shown:?}: must be http://[user:password@]host:port, without a path"
        ));
    }
    let (userinfo, host_port) = match authority.rsplit_once('@') {
        Some((userinfo, host_port)) => (Some(userinfo), host_port),
        None => (None, authority),
    };
    let parsed: http::uri::Authority = host_port
        .parse()
        .map_err(|_| format!("{shown:?}: not a host:port"))?;
    if parsed.host().is_empty() {
        return Err(format!("{shown:?}: has no host"));
    }
    let given_port = host_port.len() > parsed.host().len();
    let port = match parsed.port_u16() {
        Some(port) => port,
        None if given_port => return Err(format!("{shown:?}: the port is not a number")),
        None => 1080,
    };
    let userinfo = userinfo.map_or_else(String::new, |u| format!("{u}@"));
    Ok(format!("http://{userinfo}{}:{port}", parsed.host()))
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
    let shown = crate::base::redact::url(url).into_owned();
    let uri: Uri = url.parse().map_err(|e| BaseUrlError::NotAUrl {
        reason: crate::base::redact::scrub(&format!("{e}"), url),
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
