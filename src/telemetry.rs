//! Logs: the access log goes to stdout (see [`crate::access_log`]);
//! diagnostics (startup, warnings, debug detail) go to stderr through
//! `tracing`, filtered by `RUST_LOG` (default `info`), in the same format.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The configured format, or `text` on a terminal and `json` otherwise.
pub fn resolve_format(configured: Option<LogFormat>) -> LogFormat {
    configured.unwrap_or(if std::io::stdout().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    })
}

/// Installs the diagnostic logger. Safe to call more than once (later calls
/// are ignored).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}
