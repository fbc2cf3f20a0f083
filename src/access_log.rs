//! The access log: exactly one line per proxied call, written when its
//! response has finished.
//!
//! Lines are formatted on the request's own thread and handed to one writer
//! thread over a bounded channel, so no request waits on a lock around stdout
//! and a slow log reader slows the gateway down (back-pressure) rather than
//! losing lines. The writer batches whatever is queued into one write, at
//! most 20 ms after the call finished.
//!
//! JSON line fields: `ts`, `event` (`"access"`), `request_id` and `code` and
//! `msg` (from the provider's envelope, or null), `status`, `upstream_status`,
//! `method`, `path` (never the query string), `profile`, `client`, `class`, `attempts`,
//! `retry_reasons`, `retry_skipped`, `latency_ms`, `x_request_id`, `error`
//! (the gateway's error kind, or null).

use std::io::Write;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method};
use serde::Serialize;
use serde_json::Value;

use crate::config::{LogConfig, LogFormat};
use crate::envelope::EnvelopeFields;
use crate::routes::Class;

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
    pub retry_reasons: Vec<String>,
    /// Why a retry the outcome called for was not made (`not_repeatable`,
    /// `budget`, `body_not_replayable`, ...).
    pub retry_skipped: Option<&'static str>,
    /// The gateway's error kind when it answered itself, or why the response
    /// did not complete.
    pub error: Option<&'static str>,
    /// The gateway's message when it answered itself.
    pub gateway_msg: Option<String>,
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
    retry_reasons: &'a [String],
    retry_skipped: Option<&'static str>,
    latency_ms: f64,
    x_request_id: &'a str,
    error: Option<&'a str>,
}

enum Msg {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

/// Handle to the access log; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
    format: LogFormat,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish()
    }
}

impl AccessLog {
    /// Starts the writer thread with the default queue (`log.queue_lines`).
    /// It ends, after writing everything queued, when the last `AccessLog`
    /// handle is dropped.
    pub fn spawn(format: LogFormat, out: Box<dyn Write + Send>) -> (AccessLog, JoinHandle<()>) {
        Self::spawn_with_queue(format, out, LogConfig::default().queue_lines)
    }

    /// Starts the writer thread; `queue_lines` lines may wait for it before
    /// callers feel back-pressure.
    pub fn spawn_with_queue(
        format: LogFormat,
        out: Box<dyn Write + Send>,
        queue_lines: usize,
    ) -> (AccessLog, JoinHandle<()>) {
        let (tx, rx) = mpsc::sync_channel(queue_lines);
        let handle = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, out))
            .expect("spawn access-log thread");
        (AccessLog { tx, format }, handle)
    }

    /// Formats and queues one line.
    pub fn emit(&self, record: &AccessRecord, found: &EnvelopeFields) {
        let line = format_line(self.format, record, found, SystemTime::now());
        // The writer only goes away at process exit; a line lost then is moot.
        let _ = self.tx.send(Msg::Line(line));
    }

    /// Waits until every line queued so far has been written.
    pub fn flush(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

/// One access-log line, newline included, as the writer will write it.
pub fn format_line(
    format: LogFormat,
    r: &AccessRecord,
    found: &EnvelopeFields,
    now: SystemTime,
) -> Vec<u8> {
    // "2026-11-25T19:56:54.539Z": 24 bytes, formatted on the stack.
    let mut ts_buf = [0u8; 32];
    let ts_len = {
        let mut w = &mut ts_buf[..];
        let _ = write!(w, "{}", humantime::format_rfc3339_millis(now));
        32 - w.len()
    };
    let ts = std::str::from_utf8(&ts_buf[..ts_len]).expect("RFC 3339 is ASCII");
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
        retry_skipped: r.retry_skipped,
        latency_ms: (r.started.elapsed().as_micros() as f64) / 1000.0,
        x_request_id: r.x_request_id.to_str().unwrap_or("-"),
        error: r.error,
    };
    let mut out = Vec::with_capacity(320);
    match format {
        LogFormat::Json => {
            serde_json::to_writer(&mut out, &line).expect("serialising to a Vec cannot fail");
        }
        LogFormat::Text => text_line(&mut out, &line),
    }
    out.push(b'\n');
    out
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
        let _ = write!(out, " retry_reasons={}", l.retry_reasons.join(","));
    }
    if let Some(skipped) = l.retry_skipped {
        let _ = write!(out, " retry_skipped={skipped}");
    }
    if let Some(error) = l.error {
        let _ = write!(out, " error={error}");
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

/// The writer polls instead of blocking on the channel, so that sending a
/// line never has to wake a sleeping thread (a futex call and, on a busy
/// 2-core box, a context switch per request). A line reaches the output at
/// most `MAX_IDLE` after its call finished.
fn write_loop(rx: Receiver<Msg>, mut out: Box<dyn Write + Send>) {
    const MIN_IDLE: Duration = Duration::from_millis(1);
    const MAX_IDLE: Duration = Duration::from_millis(20);
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut waiting = Vec::new();
    let mut idle = MIN_IDLE;
    loop {
        let mut open = true;
        let mut received = false;
        loop {
            match rx.try_recv() {
                Ok(Msg::Line(line)) => {
                    batch.extend_from_slice(&line);
                    received = true;
                    if batch.len() >= 256 * 1024 {
                        write_batch(&mut out, &mut batch);
                    }
                }
                Ok(Msg::Flush(done)) => waiting.push(done),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        write_batch(&mut out, &mut batch);
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
        if !open {
            return;
        }
        idle = if received {
            MIN_IDLE
        } else {
            (idle * 2).min(MAX_IDLE)
        };
        std::thread::sleep(idle);
    }
}

fn write_batch(out: &mut Box<dyn Write + Send>, batch: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    // A failing stdout cannot be reported anywhere better; keep serving.
    let _ = out.write_all(batch).and_then(|_| out.flush());
    batch.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

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
}
