//! Logs: the access log goes to stdout (see [`crate::observe::access_log`]);
//! diagnostics (startup, warnings, debug detail) go to stderr through
//! `tracing`, filtered by `RUST_LOG` (default `info`), in the same format.
//!
//! Diagnostics reach stderr the way the access log reaches stdout: each
//! event, formatted whole, goes through a bounded queue to one writer
//! thread ([`crate::observe::log_queue`]), so whoever logs never waits on stderr's
//! reader. When that reader is `log.queue_lines` lines behind, or stops
//! reading, further events are dropped and counted
//! (`pandagate_diagnostics_dropped_total`); once the writer has caught up it
//! logs how many were lost. Queued events are written at exit by
//! [`flush_within`]; messages printed on the way out with `eprintln!` come
//! after it.

use crate::base::families::{self, Described, DescriptorEncoder};
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::observe::log_queue::{LogQueue, Stream};

/// The diagnostics' queue, once [`init`] has run.
static DIAGNOSTICS: OnceLock<LogQueue> = OnceLock::new();

const STREAM: Stream = Stream {
    name: "diagnostics",
    output: "stderr",
    // Its own queue is the full one: the warning would be dropped too.
    warn_when_dropping: false,
};

/// The configured format, or `text` on a terminal and `json` otherwise.
pub fn resolve_format(configured: Option<LogFormat>) -> LogFormat {
    configured.unwrap_or(if std::io::stdout().is_terminal() {
        LogFormat::Text
    } else {
        LogFormat::Json
    })
}

/// Installs the diagnostic logger, with up to `queue_lines` events waiting
/// for stderr. Safe to call more than once (later calls are ignored).
pub fn init(format: LogFormat, queue_lines: usize) {
    let queue: &'static LogQueue = DIAGNOSTICS
        .get_or_init(|| LogQueue::spawn(STREAM, queue_lines, Box::new(std::io::stderr())).0);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || EventWriter {
            queue,
            line: Vec::new(),
        })
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Diagnostic events dropped because stderr's reader was behind.
pub fn dropped() -> u64 {
    DIAGNOSTICS.get().map_or(0, LogQueue::dropped)
}

/// `diagnostics_dropped`, from `dropped` (this process's [`dropped`], or
/// nothing where diagnostics are not queued).
pub fn describe(dropped: Option<fn() -> u64>, e: &mut DescriptorEncoder) -> Described {
    families::counter(
        e,
        "diagnostics_dropped",
        "Diagnostic log events dropped because stderr's reader was behind by log.queue_lines.",
        dropped.map_or(0, |read| read()),
    )
}

/// Writes the diagnostics queued so far, waiting at most `within` for
/// stderr's reader; true if they were written (or there is no queue).
pub fn flush_within(within: Duration) -> bool {
    DIAGNOSTICS.get().is_none_or(|q| q.flush_within(within))
}

/// One event: collects what the formatter writes and queues it whole when
/// the formatter lets go of it, however many writes it took.
struct EventWriter {
    queue: &'static LogQueue,
    line: Vec<u8>,
}

impl Write for EventWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.queue.push(std::mem::take(&mut self.line));
        }
    }
}
