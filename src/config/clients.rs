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
    /// ...or its SHA-256, 64 hex characters (the token itself nowhere on disk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// Profiles this client may use; the first is its default unless the
    /// gateway's default profile is listed.
    pub profiles: Vec<String>,
}

/// How a client's token is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// Read from a variable or a file, and hashed.
    Secret(SecretSource),
    /// Its SHA-256, 64 hex characters: the token itself nowhere on disk.
    Sha256(String),
}

impl ClientConfig {
    /// Where the token comes from: exactly one of `token_env`, `token_file`
    /// and `token_sha256`; `key` names the entry in errors.
    pub fn token_source(&self, key: &str) -> Result<TokenSource, ConfigError> {
        let sources = usize::from(self.token_env.is_some())
            + usize::from(self.token_file.is_some())
            + usize::from(self.token_sha256.is_some());
        if sources != 1 {
            return Err(ConfigError::new(
                format!("{key}.token_env"),
                "set exactly one of token_env, token_file and token_sha256",
            ));
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

/// Names unique; every listed profile exists.
pub fn validate_all(
    clients: &[ClientConfig],
    profiles: &[ProfileConfig],
) -> Result<(), ConfigError> {
    for (i, c) in clients.iter().enumerate() {
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
