//! The access log: exactly one line per proxied call, written when its
//! response has finished.
//!
//! Lines are formatted on the request's own thread and handed to one writer
//! thread over a bounded queue ([`crate::observe::log_queue`]), so no request waits
//! on a lock around stdout, nor on stdout's reader: when the reader falls
//! behind by more than `log.queue_lines` lines, further lines are dropped
//! and counted (`pandagate_access_log_dropped_total`), with one warning on
//! stderr when dropping starts. The writer batches whatever is queued into
//! one write, at most 20 ms after the call finished.
//!
//! JSON line fields: `ts`, `event` (`"access"`), `request_id` and `code` and
//! `msg` (from the provider's envelope, or null), `status`, `upstream_status`,
//! `method`, `path` (never the query string), `profile`, `client`, `class`, `attempts`,
//! `retry_reasons`, `retry_skipped`, `latency_ms`, `x_request_id`, `error`
//! (the gateway's error kind, or null), `idempotency` (what became of the
//! caller's `Idempotency-Key`, or null) and `idempotency_key` (the first 12
//! hex digits of the key's SHA-256, never the key), `trace_id` and
//! `span_id` (the call's span, when traces are exported, else null) and
//! `cache` (what the read cache did, on a cached route, else null).

use crate::base::families::{self, Described, DescriptorEncoder};
use std::io::Write;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method};
use serde::Serialize;
use serde_json::Value;

use crate::config::Class;
use crate::config::{LogConfig, LogFormat};
use crate::observe::log_queue::{LogQueue, Stream};
use crate::observe::traces::CallTrace;
use crate::pandapon::envelope::EnvelopeFields;
use crate::policy::retry::{RetryReason, Skipped};
use crate::state::idempotency::Logged;

/// What the gateway knows about one call, filled in as it goes.
#[derive(Debug)]
pub struct AccessRecord {
    pub started: Instant,
    pub method: Method,
    pub path: String,
    pub x_request_id: HeaderValue,
    pub profile: Option<Arc<str>>,
    /// The authenticated caller, when `[[clients]]` are configured.
    pub client: Option<Arc<str>>,
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub attempts: u32,
    /// The endpoint class (`read`, `write`, `unknown`), once known.
    pub class: Option<Class>,
    /// Why each retry was made, e.g. `["503", "timeout"]`.
    pub retry_reasons: Vec<RetryReason>,
    /// Why a retry the outcome called for was not made (`not_repeatable`,
    /// `budget`, `body_not_replayable`, ...).
    pub retry_skipped: Option<Skipped>,
    /// The gateway's error kind when it answered itself, or why the response
    /// did not complete.
    pub error: Option<&'static str>,
    /// The gateway's message when it answered itself.
    pub gateway_msg: Option<String>,
    /// What became of the caller's `Idempotency-Key`.
    pub idempotency: Option<Logged>,
    /// The key's SHA-256 prefix, as logged.
    pub idempotency_key: Option<[u8; 12]>,
    /// The call's span, when traces are exported; ended with this line.
    pub trace: Option<CallTrace>,
    /// What the read cache did (`hit`, `miss`, `coalesced`, `stale`,
    /// `bypass`), on a cached route.
    pub cache: Option<&'static str>,
}

impl AccessRecord {
    /// A call just received: nothing known yet but its request line.
    pub fn start(method: Method, path: &str, x_request_id: &HeaderValue) -> AccessRecord {
        AccessRecord {
            started: Instant::now(),
            method,
            path: path.to_owned(),
            x_request_id: x_request_id.clone(),
            profile: None,
            client: None,
            status: 0,
            upstream_status: None,
            attempts: 0,
            class: None,
            retry_reasons: Vec::new(),
            retry_skipped: None,
            error: None,
            gateway_msg: None,
            idempotency: None,
            idempotency_key: None,
            trace: None,
            cache: None,
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    ts: &'a str,
    event: &'static str,
    request_id: Option<&'a str>,
    code: Option<&'a Value>,
    msg: Option<&'a str>,
    status: u16,
    upstream_status: Option<u16>,
    method: &'a str,
    path: &'a str,
    profile: Option<&'a str>,
    client: Option<&'a str>,
    class: Option<&'static str>,
    attempts: u32,
    retry_reasons: &'a [RetryReason],
    retry_skipped: Option<&'static str>,
    latency_ms: f64,
    x_request_id: &'a str,
    error: Option<&'a str>,
    idempotency: Option<&'static str>,
    idempotency_key: Option<&'a str>,
    trace_id: Option<&'a str>,
    span_id: Option<&'a str>,
    cache: Option<&'static str>,
}

/// Handle to the access log; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    queue: LogQueue,
    format: LogFormat,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .field("queue", &self.queue)
            .finish()
    }
}

const STREAM: Stream = Stream {
    name: "access log",
    output: "stdout",
    warn_when_dropping: true,
};

impl AccessLog {
    /// Starts the writer thread with the default queue (`log.queue_lines`).
    /// It ends, after writing everything queued, when the last `AccessLog`
    /// handle is dropped.
    pub fn spawn(format: LogFormat, out: Box<dyn Write + Send>) -> (AccessLog, JoinHandle<()>) {
        Self::spawn_with_queue(format, out, LogConfig::default().queue_lines)
    }

    /// Starts the writer thread; up to `queue_lines` lines may wait for it,
    /// further ones are dropped.
    pub fn spawn_with_queue(
        format: LogFormat,
        out: Box<dyn Write + Send>,
        queue_lines: usize,
    ) -> (AccessLog, JoinHandle<()>) {
        let (queue, handle) = LogQueue::spawn(STREAM, queue_lines, out);
        (AccessLog { queue, format }, handle)
    }

    /// Formats and queues one line; never waits (a full queue drops it).
    /// On a thread that batches, the line is formatted straight into the
    /// thread's batch.
    pub fn emit(&self, record: &AccessRecord, found: &EnvelopeFields) {
        let now = SystemTime::now();
        self.queue
            .push_with(|out| format_into(out, self.format, record, found, now));
    }

    /// Lines this thread emits go into a batch of its own, handed over by
    /// size or by a ticker (see [`LogQueue::batch_on_this_thread`]).
    pub fn batch_on_this_thread(&self) {
        self.queue.batch_on_this_thread();
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped()
    }

    pub fn describe(&self, e: &mut DescriptorEncoder) -> Described {
        families::counter(
            e,
            "access_log_dropped",
            "Access-log lines dropped because stdout's reader was behind by log.queue_lines.",
            self.dropped(),
        )
    }

    /// Waits until every line queued so far has been written, however long
    /// stdout's reader takes (see [`LogQueue::flush`]).
    pub fn flush(&self) {
        self.queue.flush();
    }

    /// Like [`flush`](Self::flush), for at most `within`; true if everything
    /// was written.
    pub fn flush_within(&self, within: Duration) -> bool {
        self.queue.flush_within(within)
    }
}

/// One access-log line, newline included, as the writer will write it.
pub fn format_line(
    format: LogFormat,
    r: &AccessRecord,
    found: &EnvelopeFields,
    now: SystemTime,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(320);
    format_into(&mut out, format, r, found, now);
    out
}

/// Appends one access-log line, newline included, to `out`.
fn format_into(
    out: &mut Vec<u8>,
    format: LogFormat,
    r: &AccessRecord,
    found: &EnvelopeFields,
    now: SystemTime,
) {
    let ts_buf = timestamp(now);
    let ids = r.trace.as_ref().map(CallTrace::ids);
    let ts = std::str::from_utf8(&ts_buf).expect("RFC 3339 is ASCII");
    let line = Line {
        ts,
        event: "access",
        request_id: found.request_id.as_deref(),
        code: found.code.as_ref(),
        msg: found.msg.as_deref().or(r.gateway_msg.as_deref()),
        status: r.status,
        upstream_status: r.upstream_status,
        method: r.method.as_str(),
        path: &r.path,
        profile: r.profile.as_deref(),
        client: r.client.as_deref(),
        class: r.class.map(Class::as_str),
        attempts: r.attempts,
        retry_reasons: &r.retry_reasons,
        retry_skipped: r.retry_skipped.map(Skipped::as_str),
        latency_ms: (r.started.elapsed().as_micros() as f64) / 1000.0,
        x_request_id: r.x_request_id.to_str().unwrap_or("-"),
        error: r.error,
        idempotency: r.idempotency.map(Logged::as_str),
        idempotency_key: r
            .idempotency_key
            .as_ref()
            .map(|k| std::str::from_utf8(k).unwrap_or("-")),
        trace_id: ids.as_ref().map(|(t, _)| t.as_str()),
        span_id: ids.as_ref().map(|(_, s)| s.as_str()),
        cache: r.cache,
    };
    match format {
        LogFormat::Json => json_line(out, &line),
        LogFormat::Text => text_line(out, &line),
    }
    out.push(b'\n');
}

/// `now` as "2026-11-25T19:56:54.539Z". The part up to the second is
/// formatted once per second by each thread; only the milliseconds change
/// from one line to the next.
fn timestamp(now: SystemTime) -> [u8; 24] {
    use std::cell::Cell;
    thread_local! {
        static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
    }
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (second, millis) = (since.as_secs(), since.subsec_millis());
    let mut prefix = SECOND.get();
    if prefix.0 != second {
        let mut full = [0u8; 24];
        let mut w = &mut full[..];
        let _ = write!(
            w,
            "{}",
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_secs(second))
        );
        prefix = (second, full[..20].try_into().expect("20 bytes"));
        SECOND.set(prefix);
    }
    let mut ts = [0u8; 24];
    ts[..20].copy_from_slice(&prefix.1);
    ts[20] = b'0' + (millis / 100) as u8;
    ts[21] = b'0' + (millis / 10 % 10) as u8;
    ts[22] = b'0' + (millis % 10) as u8;
    ts[23] = b'Z';
    ts
}

/// The JSON line, written field by field: the same bytes `serde_json` makes
/// of [`Line`], without its generic machinery on every call.
fn json_line(out: &mut Vec<u8>, l: &Line<'_>) {
    fn key(out: &mut Vec<u8>, first: bool, name: &str) {
        out.extend_from_slice(if first { b"{\"" } else { b",\"" });
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
    }
    fn string(out: &mut Vec<u8>, s: &str) {
        // Most values need no escaping: copied between quotes.
        if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        } else {
            serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
        }
    }
    fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
        match s {
            Some(s) => string(out, s),
            None => out.extend_from_slice(b"null"),
        }
    }
    fn number(out: &mut Vec<u8>, n: impl itoa::Integer) {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    fn opt_number(out: &mut Vec<u8>, n: Option<impl itoa::Integer>) {
        match n {
            Some(n) => number(out, n),
            None => out.extend_from_slice(b"null"),
        }
    }
    key(out, true, "ts");
    string(out, l.ts);
    key(out, false, "event");
    string(out, l.event);
    key(out, false, "request_id");
    opt_string(out, l.request_id);
    key(out, false, "code");
    match l.code {
        Some(code) => serde_json::to_writer(&mut *out, code).expect("writing to a Vec cannot fail"),
        None => out.extend_from_slice(b"null"),
    }
    key(out, false, "msg");
    opt_string(out, l.msg);
    key(out, false, "status");
    number(out, l.status);
    key(out, false, "upstream_status");
    opt_number(out, l.upstream_status);
    key(out, false, "method");
    string(out, l.method);
    key(out, false, "path");
    string(out, l.path);
    key(out, false, "profile");
    opt_string(out, l.profile);
    key(out, false, "client");
    opt_string(out, l.client);
    key(out, false, "class");
    opt_string(out, l.class);
    key(out, false, "attempts");
    number(out, l.attempts);
    key(out, false, "retry_reasons");
    if l.retry_reasons.is_empty() {
        out.extend_from_slice(b"[]");
    } else {
        serde_json::to_writer(&mut *out, l.retry_reasons).expect("writing to a Vec cannot fail");
    }
    key(out, false, "retry_skipped");
    opt_string(out, l.retry_skipped);
    key(out, false, "latency_ms");
    serde_json::to_writer(&mut *out, &l.latency_ms).expect("writing to a Vec cannot fail");
    key(out, false, "x_request_id");
    string(out, l.x_request_id);
    key(out, false, "error");
    opt_string(out, l.error);
    key(out, false, "idempotency");
    opt_string(out, l.idempotency);
    key(out, false, "idempotency_key");
    opt_string(out, l.idempotency_key);
    key(out, false, "trace_id");
    opt_string(out, l.trace_id);
    key(out, false, "span_id");
    opt_string(out, l.span_id);
    key(out, false, "cache");
    opt_string(out, l.cache);
    out.push(b'}');
}

/// `ts access status=.. key=value ...`; strings that need it are JSON-quoted.
fn text_line(out: &mut Vec<u8>, l: &Line<'_>) {
    let _ = write!(
        out,
        "{} access status={} upstream_status={} method={} path={} profile={} class={} attempts={} latency_ms={:.3} request_id={} code={} x_request_id={}",
        l.ts,
        l.status,
        opt(l.upstream_status),
        l.method,
        quoted(l.path),
        l.profile.map_or("-".into(), quoted),
        l.class.unwrap_or("-"),
        l.attempts,
        l.latency_ms,
        l.request_id.map_or("-".into(), quoted),
        l.code.map_or("-".into(), Value::to_string),
        quoted(l.x_request_id),
    );
    if let Some(msg) = l.msg {
        let _ = write!(out, " msg={}", quoted(msg));
    }
    if !l.retry_reasons.is_empty() {
        let reasons: Vec<String> = l.retry_reasons.iter().map(ToString::to_string).collect();
        let _ = write!(out, " retry_reasons={}", reasons.join(","));
    }
    if let Some(skipped) = l.retry_skipped {
        let _ = write!(out, " retry_skipped={skipped}");
    }
    if let Some(error) = l.error {
        let _ = write!(out, " error={error}");
    }
    if let Some(idempotency) = l.idempotency {
        let _ = write!(out, " idempotency={idempotency}");
    }
    if let Some(key) = l.idempotency_key {
        let _ = write!(out, " idempotency_key={}", quoted(key));
    }
    if let Some(cache) = l.cache {
        let _ = write!(out, " cache={cache}");
    }
    if let (Some(trace), Some(span)) = (l.trace_id, l.span_id) {
        let _ = write!(out, " trace_id={trace} span_id={span}");
    }
}

fn opt(v: Option<u16>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn quoted(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        s.to_owned()
    } else {
        Value::from(s).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::log_queue::testing::Buf;

    fn record() -> AccessRecord {
        AccessRecord {
            started: Instant::now(),
            method: Method::POST,
            path: "/alibaba/order/create".into(),
            x_request_id: HeaderValue::from_static("req-1"),
            profile: Some("default".into()),
            client: None,
            status: 200,
            upstream_status: Some(200),
            attempts: 1,
            class: Some(Class::Write),
            retry_reasons: Vec::new(),
            retry_skipped: None,
            error: None,
            gateway_msg: None,
            idempotency: None,
            idempotency_key: None,
            trace: None,
            cache: None,
        }
    }

    #[test]
    fn json_line_has_every_field_and_nulls() {
        let buf = Buf::default();
        let (log, _h) = AccessLog::spawn(LogFormat::Json, Box::new(buf.clone()));
        let found = EnvelopeFields {
            request_id: Some("rid".into()),
            code: Some(Value::from(200)),
            msg: None,
        };
        log.emit(&record(), &found);
        log.flush();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1);
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["event"], "access");
        assert_eq!(v["request_id"], "rid");
        assert_eq!(v["code"], 200);
        assert!(v["msg"].is_null());
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream_status"], 200);
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/alibaba/order/create");
        assert_eq!(v["profile"], "default");
        assert_eq!(v["attempts"], 1);
        assert_eq!(v["class"], "write");
        assert_eq!(v["retry_reasons"], serde_json::json!([]));
        assert!(v["retry_skipped"].is_null());
        assert!(v["latency_ms"].as_f64().unwrap() >= 0.0);
        assert_eq!(v["x_request_id"], "req-1");
        assert!(v["error"].is_null());
        assert!(v["idempotency"].is_null());
        assert!(v["idempotency_key"].is_null());
        assert!(v["trace_id"].is_null());
        assert!(v["span_id"].is_null());
        assert!(v["cache"].is_null());
    }

    /// The hand-written JSON line is byte for byte what `serde_json` makes
    /// of the same fields, whatever the strings hold.
    #[test]
    fn json_line_is_serde_json_of_the_line() {
        let strings = [
            "",
            "plain",
            "with \"quotes\" and \\ backslash",
            "tab\there\nnewline\r\u{1}\u{1f}",
            "系统 繁忙 ✓",
            "del\u{7f}",
            "</script>",
            "C:\\dir\\file",
        ];
        let codes = [
            None,
            Some(Value::from(200)),
            Some(Value::from(-1.5)),
            Some(Value::from("E\"1")),
            Some(serde_json::json!({"a": [1, "b"]})),
        ];
        for (i, text) in strings.iter().enumerate() {
            for (j, code) in codes.iter().enumerate() {
                let opt = |k: usize| k.is_multiple_of(2).then_some(*text);
                let line = Line {
                    ts: "2026-11-25T19:56:54.539Z",
                    event: "access",
                    request_id: opt(i + j),
                    code: code.as_ref(),
                    msg: opt(i + j + 1),
                    status: 200 + j as u16,
                    upstream_status: j.is_multiple_of(2).then_some(503),
                    method: "POST",
                    path: text,
                    profile: opt(j),
                    client: opt(j + 1),
                    class: Some("read"),
                    attempts: j as u32,
                    retry_reasons: if j.is_multiple_of(2) {
                        &[]
                    } else {
                        &[RetryReason::Status(503), RetryReason::Timeout]
                    },
                    retry_skipped: opt(i).map(|_| "budget"),
                    latency_ms: (i * 1_000 + j) as f64 / 1000.0,
                    x_request_id: text,
                    error: opt(i + 1).map(|_| "upstream_timeout"),
                    idempotency: opt(j).map(|_| "replayed"),
                    idempotency_key: opt(i + j),
                    trace_id: opt(i),
                    span_id: opt(j),
                    cache: opt(i + j).map(|_| "hit"),
                };
                let mut ours = Vec::new();
                json_line(&mut ours, &line);
                let theirs = serde_json::to_vec(&line).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&ours),
                    String::from_utf8_lossy(&theirs)
                );
            }
        }
    }

    #[test]
    fn timestamps_are_rfc3339_millis_across_seconds() {
        let base = std::time::UNIX_EPOCH + Duration::from_millis(1_764_000_000_000);
        for ms in [0, 1, 999, 1_000, 1_001, 59_999, 60_000, 86_399_999] {
            let t = base + Duration::from_millis(ms);
            let ours = timestamp(t);
            assert_eq!(
                std::str::from_utf8(&ours).unwrap(),
                humantime::format_rfc3339_millis(t).to_string(),
                "{ms}"
            );
        }
    }

    #[test]
    fn text_line_quotes_what_needs_it() {
        let buf = Buf::default();
        let (log, _h) = AccessLog::spawn(LogFormat::Text, Box::new(buf.clone()));
        let found = EnvelopeFields {
            request_id: None,
            code: Some(Value::from("BUSY")),
            msg: Some("系统 繁忙".into()),
        };
        log.emit(&record(), &found);
        log.flush();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains(" access status=200 upstream_status=200 method=POST path=/alibaba/order/create profile=default class=write attempts=1 "), "{text}");
        assert!(text.contains("request_id=- code=\"BUSY\""), "{text}");
        assert!(text.contains("msg=\"系统 繁忙\""), "{text}");
    }

    /// stdout with a reader that never reads: the first write announces
    /// itself and never returns.
    struct NeverRead(Option<std::sync::mpsc::SyncSender<()>>);
    impl Write for NeverRead {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            if let Some(entered) = self.0.take() {
                let _ = entered.send(());
            }
            loop {
                std::thread::park();
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn emit_never_waits_for_a_stuck_stdout_and_counts_what_it_drops() {
        use std::sync::mpsc;
        let (entered, stuck) = mpsc::sync_channel(1);
        let out = Box::new(NeverRead(Some(entered)));
        let (log, _h) = AccessLog::spawn_with_queue(LogFormat::Json, out, 8);
        let found = EnvelopeFields::default();
        log.emit(&record(), &found);
        stuck
            .recv_timeout(Duration::from_secs(5))
            .expect("the writer reaches stdout");

        // On another thread, so that a blocking emit fails the test instead
        // of hanging it.
        let (done, took) = mpsc::channel();
        let emitter = log.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            for _ in 0..1000 {
                emitter.emit(&record(), &found);
            }
            let _ = done.send(start.elapsed());
        });
        let took = took
            .recv_timeout(Duration::from_secs(5))
            .expect("1000 lines emitted within 5 s although stdout is stuck");
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert_eq!(log.dropped(), 1000 - 8, "8 queued, the rest dropped");
        assert!(!log.flush_within(Duration::from_millis(50)));
    }
}
