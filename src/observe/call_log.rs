//! One call's access-log line and metrics, written exactly once.
//!
//! A [`CallLog`] is made when a call arrives and owns the call's
//! [`AccessRecord`] from then on. Whatever happens, the line is written when
//! the guard is dropped, and only then:
//!
//! * the caller leaves before the answer (hyper drops the handler): the
//!   guard goes with the handler's future, and the call is logged as 499
//!   `caller_gone` (nginx's code for it);
//! * the answer is handed over ([`CallLog::answering`]): the guard rides on
//!   the response body as its [`BodyWatch`], reads the provider's envelope
//!   fields from the first `log.inspect_bytes`, and is dropped when the body
//!   ends (`error` stays the gateway's own, if it answered) or is dropped
//!   early (`response_incomplete`, `upstream_body`).
//!
//! The call's span, when traces are exported, ends with the line, carrying
//! the same status, error and provider fields.

use std::sync::Arc;

use bytes::Bytes;

use crate::net::body::{BodyEnd, BodyWatch};
use crate::observe::access_log::{AccessLog, AccessRecord};
use crate::observe::metrics::Metrics;
use crate::observe::traces::CallEnd;
use crate::pandapon::envelope::{self, EnvelopeFields};

/// Why a call ended without its answer reaching the caller whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The caller left before the answer was ready.
    CallerGone,
    /// The answer was cut before its end (caller gone, connection broken).
    ResponseIncomplete,
    /// The provider's body failed mid-way.
    UpstreamBody,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::CallerGone => "caller_gone",
            EndReason::ResponseIncomplete => "response_incomplete",
            EndReason::UpstreamBody => "upstream_body",
        }
    }
}

/// The guard of one call's log line; see the module doc.
pub struct CallLog {
    record: AccessRecord,
    log: AccessLog,
    metrics: Arc<Metrics>,
    /// Handed to the response body: the caller got an answer.
    answering: bool,
    /// How many bytes of the body to read for the envelope (0: none).
    inspect: usize,
    first: Option<Bytes>,
    more: Vec<u8>,
}

impl CallLog {
    /// A call arrived; counted in flight until its line is written.
    pub fn start(record: AccessRecord, log: AccessLog, metrics: Arc<Metrics>) -> CallLog {
        metrics.call_started();
        CallLog {
            record,
            log,
            metrics,
            answering: false,
            inspect: 0,
            first: None,
            more: Vec::new(),
        }
    }

    /// The record, to fill in as the call goes.
    pub fn record(&mut self) -> &mut AccessRecord {
        &mut self.record
    }

    /// The answer is ready: the guard moves onto its body, reading the
    /// envelope from its first `inspect` bytes (0 for gateway-made answers).
    pub fn answering(mut self, inspect: usize) -> Box<CallLog> {
        self.answering = true;
        self.inspect = inspect;
        Box::new(self)
    }

    fn envelope(&self) -> EnvelopeFields {
        match (&self.first, self.more.is_empty()) {
            (_, false) => envelope::inspect(&self.more),
            (Some(first), true) => envelope::inspect(first),
            (None, true) => EnvelopeFields::default(),
        }
    }
}

impl BodyWatch for CallLog {
    fn chunk(&mut self, chunk: &Bytes) {
        let seen = self.first.as_ref().map_or(0, Bytes::len) + self.more.len();
        if seen >= self.inspect || chunk.is_empty() {
            return;
        }
        let take = chunk.len().min(self.inspect - seen);
        match &self.first {
            // The common case, a body in one chunk, is inspected in place.
            None => self.first = Some(chunk.slice(..take)),
            Some(first) => {
                if self.more.is_empty() {
                    self.more.extend_from_slice(first);
                }
                self.more.extend_from_slice(&chunk[..take]);
            }
        }
    }

    fn end(&mut self, how: BodyEnd) {
        let reason = match how {
            BodyEnd::Complete => return,
            BodyEnd::UpstreamFailed => EndReason::UpstreamBody,
            BodyEnd::Incomplete => EndReason::ResponseIncomplete,
        };
        // The gateway's own error, when it answered itself, says more.
        if self.record.error.is_none() {
            self.record.error = Some(reason.as_str());
        }
    }
}

impl Drop for CallLog {
    fn drop(&mut self) {
        if !self.answering {
            self.record.status = 499;
            self.record.error = Some(EndReason::CallerGone.as_str());
        }
        let found = self.envelope();
        self.log.emit(&self.record, &found);
        self.metrics.call_finished(&self.record, &found);
        if let Some(trace) = self.record.trace.take() {
            let r = &self.record;
            trace.end(CallEnd {
                status: r.status,
                error: r.error,
                request_id: found.request_id.as_deref(),
                code: found.code.as_ref().map(|c| match c {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                }),
                class: r.class.map(crate::config::Class::as_str),
                profile: r.profile.as_deref(),
                retry_skipped: r.retry_skipped.map(crate::policy::retry::Skipped::as_str),
                idempotency: r.idempotency.map(crate::state::idempotency::Logged::as_str),
            });
        }
    }
}
