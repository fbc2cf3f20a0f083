//! `[circuit_breaker]`: when to stop calling a provider that is down.

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, positive};

/// `[circuit_breaker]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// `false` turns the breaker off.
    pub enabled: bool,
    /// Consecutive failed attempts (connect failures, 5xx, timeouts) that
    /// open the circuit. High enough that a provider failing a third of its
    /// calls at random (0.3^20 ≈ 3.5e-11 per attempt) never trips it, low
    /// enough that a real outage does within a moment at any load.
    pub failure_threshold: u32,
    /// How long the circuit stays open before probing, in milliseconds.
    pub open_ms: u64,
    /// Calls let through at once while probing.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_threshold: 20,
            open_ms: 10_000,
            half_open_probes: 1,
        }
    }
}

impl BreakerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive(
            "circuit_breaker.failure_threshold",
            u64::from(self.failure_threshold),
        )?;
        positive("circuit_breaker.open_ms", self.open_ms)?;
        positive(
            "circuit_breaker.half_open_probes",
            u64::from(self.half_open_probes),
        )
    }
}
