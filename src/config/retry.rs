//! `[retry]`: how calls are repeated, and the retry budget.

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, positive};

/// `[retry]`: how calls are repeated.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Most attempts for one call, the first included.
    pub max_attempts: u32,
    /// Time for one call, all attempts and waits together, in milliseconds.
    pub deadline_ms: u64,
    /// Time for one attempt of a call that may be repeated, in milliseconds,
    /// so that a hung attempt leaves time for another. Calls that cannot be
    /// repeated get `upstream.request_timeout_ms` for their one attempt.
    pub read_attempt_timeout_ms: u64,
    /// First backoff ceiling, in milliseconds; doubles per retry (full jitter).
    pub backoff_base_ms: u64,
    /// Largest backoff ceiling, in milliseconds.
    pub backoff_cap_ms: u64,
    /// Retries may add at most this share (percent) of first attempts...
    pub budget_percent: u32,
    /// ...plus this many retries per second, so a quiet gateway can retry.
    pub budget_min_per_sec: u32,
    /// The sliding window over which the budget is counted, in milliseconds.
    pub budget_window_ms: u64,
    /// Provider `code` values (numbers or strings) that mean "try again", for
    /// reads answered with HTTP 2xx. Empty until the provider's codes are known.
    pub transient_codes: Vec<CodeValue>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            deadline_ms: 30_000,
            read_attempt_timeout_ms: 10_000,
            backoff_base_ms: 25,
            backoff_cap_ms: 1_000,
            budget_percent: 20,
            budget_min_per_sec: 5,
            budget_window_ms: 10_000,
            transient_codes: Vec::new(),
        }
    }
}

/// A provider `code` as written in config: `5001` or `"SYSTEM_BUSY"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CodeValue {
    Int(i64),
    Str(String),
}

impl RetryConfig {
    /// Is `code` (from a response envelope) listed as transient?
    pub fn is_transient(&self, code: &serde_json::Value) -> bool {
        self.transient_codes.iter().any(|c| match (c, code) {
            (CodeValue::Int(i), serde_json::Value::Number(n)) => n.as_i64() == Some(*i),
            (CodeValue::Str(s), serde_json::Value::String(v)) => s == v,
            (CodeValue::Int(i), serde_json::Value::String(v)) => v.parse() == Ok(*i),
            _ => false,
        })
    }
}

impl RetryConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("retry.max_attempts", u64::from(self.max_attempts))?;
        positive("retry.deadline_ms", self.deadline_ms)?;
        positive(
            "retry.read_attempt_timeout_ms",
            self.read_attempt_timeout_ms,
        )?;
        positive("retry.budget_window_ms", self.budget_window_ms)?;
        if self.backoff_cap_ms < self.backoff_base_ms {
            return Err(ConfigError::new(
                "retry.backoff_cap_ms",
                "must be at least retry.backoff_base_ms",
            ));
        }
        if self.budget_window_ms < 1000 {
            return Err(ConfigError::new(
                "retry.budget_window_ms",
                "must be at least 1000",
            ));
        }
        Ok(())
    }
}
