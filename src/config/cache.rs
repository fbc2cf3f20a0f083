//! `[cache]`: where cached read answers are kept (see `[[routes]]`
//! `cache_ttl_ms`).

use serde::{Deserialize, Serialize};

use super::error::ConfigError;

/// `[cache]`. Used only when a route sets `cache_ttl_ms`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Most bytes of answers kept in this process (least recently and
    /// least often used go first).
    pub max_bytes: u64,
    /// Largest answer kept, in bytes; a larger one is passed on, not kept.
    pub max_entry_bytes: usize,
    /// Longest a call waits for an identical call already asking the
    /// provider, in milliseconds; then it asks itself.
    pub coalesce_wait_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            max_entry_bytes: 256 * 1024,
            coalesce_wait_ms: 5_000,
        }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("cache.max_bytes", self.max_bytes),
            ("cache.max_entry_bytes", self.max_entry_bytes as u64),
            ("cache.coalesce_wait_ms", self.coalesce_wait_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        if self.max_entry_bytes as u64 > self.max_bytes {
            return Err(ConfigError::new(
                "cache.max_entry_bytes",
                "must be at most cache.max_bytes",
            ));
        }
        Ok(())
    }
}
