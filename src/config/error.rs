//! Config errors, the environment as the config reads it, and the bounds
//! every section checks its values against.

use std::fmt;

/// Reads an environment variable; injected so that tests need not touch the
/// process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Longest duration any `*_ms` key may hold: 365 days. Longer is a typo,
/// not a setting, and the bound keeps every `Instant + Duration` and every
/// sum of milliseconds far from overflowing.
pub const MAX_DURATION_MS: u64 = 365 * 24 * 3600 * 1000;

/// Checks one `*_ms` value against [`MAX_DURATION_MS`].
pub fn check_duration_ms(key: &str, ms: u64) -> Result<(), ConfigError> {
    if ms > MAX_DURATION_MS {
        return Err(ConfigError::new(
            key,
            format_args!("must be at most {MAX_DURATION_MS} (365 days), not {ms}"),
        ));
    }
    Ok(())
}

/// An invalid setting: which key, and what is wrong with it. Displays as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    /// The message is made one line, and any URL in it redacted (a serde
    /// error may quote the value it refused).
    pub fn new(key: impl Into<String>, message: impl fmt::Display) -> Self {
        let message = message.to_string();
        let message = crate::base::redact::urls_in(&message).replace('\n', " ");
        Self {
            key: key.into(),
            message: message.trim().to_owned(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config: {}: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// `value` must not be 0.
pub(crate) fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::new(key, "must be greater than 0"));
    }
    Ok(())
}

/// `value` must not exceed `max`: past it a setting would exhaust memory or
/// threads, not serve better.
pub(crate) fn at_most(key: &str, value: u64, max: u64) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::new(key, format_args!("must be at most {max}")));
    }
    Ok(())
}
