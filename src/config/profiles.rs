//! `[[profiles]]`: AccessKeys, where their secrets come from, and their
//! `user-id` policies.

use std::path::PathBuf;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::secrets::SecretSource;

/// Name of the profile built from the `PANDAPON_*` environment variables.
pub const ENV_PROFILE: &str = "default";

/// One AccessKey with its secret and user-id policy.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// Name callers use in `x-pandagate-profile` and that the access log shows.
    pub name: String,
    /// The provider's AccessKey (an identifier, not a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key: Option<String>,
    /// Environment variable holding the Access secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// File holding the Access secret (trailing whitespace ignored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// `user-id` sent when the caller sends none (or when no list allows its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// If set, a caller may send any of these as `user-id`; others get 403.
    /// If unset, a caller's `user-id` is replaced by `user_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_user_ids: Option<Vec<String>>,
    /// May a caller pick this profile with `x-pandagate-profile`?
    pub selectable: bool,
    /// Present only to give a clear error: secrets never live in the TOML.
    #[serde(skip_serializing)]
    pub secret: Option<IgnoredAny>,
}

impl ProfileConfig {
    /// Where the Access secret comes from; `key` names the entry in errors.
    pub fn secret_source(&self, key: &str) -> Result<SecretSource, ConfigError> {
        let prefix = format!("{key}.secret");
        SecretSource::from_keys(
            self.secret_env.as_deref(),
            self.secret_file.as_deref(),
            &prefix,
        )?
        .ok_or_else(|| {
            ConfigError::new(
                format!("{key}.secret_env"),
                "missing secret: set secret_env or secret_file (for the default profile: \
                 PANDAPON_ACCESS_SECRET or PANDAPON_ACCESS_SECRET_FILE)",
            )
        })
    }
}

/// At least one profile, each named, no name twice.
pub fn validate_all(profiles: &[ProfileConfig]) -> Result<(), ConfigError> {
    if profiles.is_empty() {
        return Err(ConfigError::new(
            "profiles",
            "no credential profile: set PANDAPON_ACCESS_KEY and PANDAPON_ACCESS_SECRET \
             (or PANDAPON_ACCESS_SECRET_FILE), or add a [[profiles]] entry",
        ));
    }
    for (i, p) in profiles.iter().enumerate() {
        if p.name.is_empty() {
            return Err(ConfigError::new(
                format!("profiles[{i}].name"),
                "must not be empty",
            ));
        }
        if profiles[..i].iter().any(|q| q.name == p.name) {
            return Err(ConfigError::new(
                format!("profiles[{i}].name"),
                format_args!("duplicate profile name {:?}", p.name),
            ));
        }
    }
    Ok(())
}
