//! `[callbacks]`: receiving the provider's pushed messages and delivering
//! them to subscribers.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;

/// `[callbacks]`. `Debug` shows subscriber URLs redacted.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbacksConfig {
    /// Path on the main listener (and on `listen`, if set) that takes pushes.
    pub path: String,
    /// An optional listener of its own, e.g. for exposure through an ingress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Directory of the message store.
    pub store: PathBuf,
    /// Profile whose Access secret verifies the pushes.
    pub profile: String,
    /// Largest push body, in bytes.
    pub max_body_bytes: usize,
    /// How long a delivery is retried before it becomes a dead letter, in milliseconds.
    pub max_age_ms: u64,
    /// First retry delay, doubling per attempt up to the cap, in milliseconds.
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// Time a subscriber has to answer one delivery, in milliseconds.
    pub delivery_timeout_ms: u64,
    /// How long a message is kept once all its deliveries are done, in
    /// milliseconds from its receipt; within it, the same body pushed again
    /// is a duplicate. Messages with pending or dead deliveries are kept.
    pub retain_ms: u64,
    pub subscribers: Vec<SubscriberConfig>,
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        Self {
            path: "/callbacks/pandapon".into(),
            listen: None,
            store: PathBuf::from("/var/lib/pandagate"),
            profile: super::profiles::ENV_PROFILE.into(),
            max_body_bytes: 1024 * 1024,
            max_age_ms: 24 * 3600 * 1000,
            backoff_base_ms: 1_000,
            backoff_cap_ms: 300_000,
            delivery_timeout_ms: 10_000,
            retain_ms: 7 * 24 * 3600 * 1000,
            subscribers: Vec::new(),
        }
    }
}

/// A `[[callbacks.subscribers]]` entry. `Debug` shows the URL redacted.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberConfig {
    /// Where messages are POSTed (http:// or https://).
    pub url: String,
    /// Only these `messageType`s; absent: every type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_types: Option<Vec<String>>,
    /// Only these platforms (0 Taobao, 1 1688); absent: both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platforms: Option<Vec<u8>>,
}

impl std::fmt::Debug for CallbacksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::redact::debug("CallbacksConfig", self, f)
    }
}

impl std::fmt::Debug for SubscriberConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::redact::debug("SubscriberConfig", self, f)
    }
}

impl CallbacksConfig {
    pub fn validate(&self, profiles: &[String]) -> Result<(), ConfigError> {
        if !self.path.starts_with('/') {
            return Err(ConfigError::new("callbacks.path", "must start with /"));
        }
        if !profiles.contains(&self.profile) {
            return Err(ConfigError::new(
                "callbacks.profile",
                format_args!("no profile named {:?}", self.profile),
            ));
        }
        for (key, v) in [
            ("callbacks.max_body_bytes", self.max_body_bytes as u64),
            ("callbacks.max_age_ms", self.max_age_ms),
            ("callbacks.backoff_base_ms", self.backoff_base_ms),
            ("callbacks.backoff_cap_ms", self.backoff_cap_ms),
            ("callbacks.delivery_timeout_ms", self.delivery_timeout_ms),
            ("callbacks.retain_ms", self.retain_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        for (i, s) in self.subscribers.iter().enumerate() {
            super::upstream::upstream_base(&s.url)
                .map_err(|m| ConfigError::new(format!("callbacks.subscribers[{i}].url"), m))?;
        }
        Ok(())
    }
}
