//! What the gateway tells its operators: one access-log line per call, the
//! per-call metrics recorded with it, traces, and the diagnostics log, all
//! written off the serving threads through bounded queues.

pub mod access_log;
pub mod call_log;
pub mod diagnostics;
pub mod log_queue;
pub mod metrics;
pub mod traces;
