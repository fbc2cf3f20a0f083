//! `[[clients]]`: the callers of a shared gateway and their tokens.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::profiles::ProfileConfig;
use super::secrets::SecretSource;

/// A `[[clients]]` entry.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Shown in the access log as `client`.
    pub name: String,
    /// Environment variable holding the token...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// ...or a file holding it (trailing whitespace ignored)...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// ...or its SHA-256, 64 hex characters (the token itself nowhere on disk)...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// ...or, instead of a token, a subject alternative name of the client
    /// certificate the caller presents (`spiffe://…` or another URI, or a
    /// DNS name); needs `server.tls_client_ca_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_san: Option<String>,
    /// Profiles this client may use; the first is its default unless the
    /// gateway's default profile is listed.
    pub profiles: Vec<String>,
    /// Its weight in the quota of each AccessKey it uses (default 1): when
    /// the clients asking want more than the quota, each gets at least
    /// `quota × share / Σ shares of the clients asking`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_share: Option<f64>,
    /// At most this many attempts per second of each AccessKey's quota,
    /// whatever is free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_max_per_second: Option<f64>,
}

/// How a client proves who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// A bearer token read from a variable or a file, and hashed.
    Secret(SecretSource),
    /// A bearer token's SHA-256, 64 hex characters: the token itself
    /// nowhere on disk.
    Sha256(String),
    /// A name in its TLS client certificate.
    CertSan(String),
}

impl ClientConfig {
    /// How the client proves who it is: exactly one of `token_env`,
    /// `token_file`, `token_sha256` and `cert_san`; `key` names the entry
    /// in errors.
    pub fn token_source(&self, key: &str) -> Result<TokenSource, ConfigError> {
        let sources = usize::from(self.token_env.is_some())
            + usize::from(self.token_file.is_some())
            + usize::from(self.token_sha256.is_some())
            + usize::from(self.cert_san.is_some());
        if sources != 1 {
            return Err(ConfigError::new(
                format!("{key}.token_env"),
                "set exactly one of token_env, token_file, token_sha256 and cert_san",
            ));
        }
        if let Some(san) = &self.cert_san {
            if san.is_empty() || san.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::new(
                    format!("{key}.cert_san"),
                    "must be a URI (spiffe://…) or a DNS name, without spaces",
                ));
            }
            return Ok(TokenSource::CertSan(san.clone()));
        }
        let prefix = format!("{key}.token");
        Ok(
            match SecretSource::from_keys(
                self.token_env.as_deref(),
                self.token_file.as_deref(),
                &prefix,
            )? {
                Some(source) => TokenSource::Secret(source),
                None => TokenSource::Sha256(self.token_sha256.clone().unwrap_or_default()),
            },
        )
    }
}

/// Names unique; every listed profile exists; a client known by its
/// certificate needs the CA that signs such certificates.
pub fn validate_all(
    clients: &[ClientConfig],
    profiles: &[ProfileConfig],
    client_ca: bool,
) -> Result<(), ConfigError> {
    for (i, c) in clients.iter().enumerate() {
        if c.cert_san.is_some() && !client_ca {
            return Err(ConfigError::new(
                format!("clients[{i}].cert_san"),
                "a client known by its certificate needs server.tls_client_ca_file",
            ));
        }
        if let Some(share) = c.quota_share {
            super::rate_limit::check_share(&format!("clients[{i}].quota_share"), share)?;
        }
        if let Some(cap) = c.quota_max_per_second {
            super::rate_limit::Rate::new(cap, None).map_err(|e| {
                e.named(
                    &format!("clients[{i}].quota_max_per_second"),
                    &format!("clients[{i}].quota_max_per_second"),
                )
            })?;
        }
        if clients[..i].iter().any(|d| d.name == c.name) {
            return Err(ConfigError::new(
                format!("clients[{i}].name"),
                format_args!("duplicate client name {:?}", c.name),
            ));
        }
        if let Some(unknown) = c
            .profiles
            .iter()
            .find(|p| !profiles.iter().any(|q| &q.name == *p))
        {
            return Err(ConfigError::new(
                format!("clients[{i}].profiles"),
                format_args!("no profile named {unknown:?}"),
            ));
        }
    }
    Ok(())
}
