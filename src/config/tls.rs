//! `[tls]`: whom the gateway trusts on every TLS connection it opens — to
//! the provider, subscribers, Redis, PostgreSQL and the OTLP collector.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;

/// Where the trusted root certificates come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Roots {
    /// The public roots compiled into the binary (Mozilla's, via
    /// `webpki-root-certs`): the same on every machine.
    #[default]
    Bundled,
    /// The platform's store (on Linux, the distribution's CA bundle), which
    /// holds whatever an image or a cluster added to it.
    System,
}

/// `[tls]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// `bundled` (default) or `system`.
    pub roots: Roots,
    /// A PEM file of CA certificates trusted besides the roots: a corporate
    /// TLS-inspecting proxy's, a staging provider's, a test CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl TlsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(path) = &self.ca_file
            && path.as_os_str().is_empty()
        {
            return Err(ConfigError::new("tls.ca_file", "must not be empty"));
        }
        Ok(())
    }
}
