//! `[log]`: the format of both logs, and how far behind their readers may fall.

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, at_most, positive};

/// `json` lines or `key=value` text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Text,
}

/// `[log]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` or `text` (env `PANDAGATE_LOG_FORMAT`); unset: `text` on a
    /// terminal, `json` otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<LogFormat>,
    /// How many bytes at the start of each response are read for `requestId`,
    /// `code` and `msg`; the body streams on regardless.
    pub inspect_bytes: usize,
    /// Lines that may wait for a log's reader, in lines: the access log
    /// (stdout) and diagnostics (stderr) each have a queue this long; when
    /// a reader is this far behind, new lines are dropped and counted. Read
    /// at start, not on SIGHUP.
    pub queue_lines: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: None,
            inspect_bytes: 64 * 1024,
            queue_lines: 16 * 1024,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("log.inspect_bytes", self.inspect_bytes as u64)?;
        positive("log.queue_lines", self.queue_lines as u64)?;
        at_most("log.queue_lines", self.queue_lines as u64, 1_000_000)?;
        at_most("log.inspect_bytes", self.inspect_bytes as u64, 16 << 20)
    }
}
