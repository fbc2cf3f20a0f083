//! Distributed traces: a server span per call, a client span per upstream
//! attempt, exported over OTLP/HTTP.
//!
//! * W3C Trace Context: the caller's `traceparent`/`tracestate` make the
//!   call's span their child; each attempt is a child of the call's span,
//!   and the `traceparent` sent upstream is the attempt's. Without an
//!   incoming `traceparent` the gateway starts a trace.
//! * Sampling is parent-based, new traces at `telemetry.sample_ratio`.
//! * Spans wait for export in a bounded queue (`telemetry.queue_spans`) on
//!   a thread of their own; when it is full, spans are dropped and counted,
//!   never waited for. The OTLP encoding and transport are
//!   `opentelemetry-otlp`'s; only the queue is ours, because the SDK's
//!   batch processor does not say how many spans it dropped.
//! * Attributes follow the HTTP semantic conventions (`url.path`, never the
//!   query) plus the gateway's own (`pandapon.*`, `pandagate.*`). No
//!   header value, secret, token, signature or nonce is ever recorded.
//! * With no endpoint there is no [`Traces`] at all: no span is made.
//! * An `https://` endpoint is reached over rustls trusting exactly `[tls]`
//!   (the HTTP client is built here and handed to the exporter). Spans of
//!   an export that fails — the collector away, its certificate not
//!   trusted — are dropped and counted with the queue's.

use crate::base::families::{self, Described, DescriptorEncoder};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Wake, Waker};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};

use crate::config::{ConfigError, TelemetryConfig, TracesEndpoint};
use crate::net::tls::{Trust, WithTrust};

/// Most spans sent in one export.
const BATCH: usize = 512;

/// The process's tracer; outlives config reloads.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    dropped: Arc<AtomicU64>,
}

impl Traces {
    /// Starts the exporter thread for `endpoint`, whose TLS (for an
    /// `https://` one) trusts `endpoint.trust()`.
    pub fn start(
        config: &TelemetryConfig,
        endpoint: &WithTrust<TracesEndpoint>,
    ) -> Result<Traces, ConfigError> {
        let timeout = Duration::from_millis(config.export_timeout_ms);
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(http_client(endpoint.trust(), timeout)?)
            .with_endpoint(endpoint.0.clone())
            .with_timeout(timeout)
            .build()
            .map_err(|e| ConfigError::new("telemetry.otlp_endpoint", e))?;
        let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "pandagate".into());
        let resource = Resource::builder().with_service_name(name).build();
        exporter.set_resource(&resource);
        let dropped = Arc::new(AtomicU64::new(0));
        let processor = QueueProcessor::start(
            exporter,
            config.queue_spans,
            Duration::from_millis(config.export_interval_ms),
            dropped.clone(),
        )
        .map_err(|e| {
            ConfigError::new("telemetry", format_args!("cannot start the exporter: {e}"))
        })?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("pandagate");
        Ok(Traces {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            dropped,
        })
    }

    /// Spans dropped: the export queue was full, or their export failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn describe(&self, e: &mut DescriptorEncoder) -> Described {
        families::counter(
            e,
            "trace_spans_dropped",
            "Spans dropped: the export queue (telemetry.queue_spans) was full, or their export failed.",
            self.dropped(),
        )
    }

    /// Exports what is queued and stops the exporter (at exit).
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }

    /// The span of one call received, child of the caller's `traceparent`.
    pub fn call(&self, headers: &HeaderMap, method: &http::Method, path: &str) -> CallTrace {
        let parent = self.propagator.extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder(method.as_str().to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.as_str().to_owned()),
                KeyValue::new("url.path", path.to_owned()),
            ])
            .start_with_context(&self.tracer, &parent);
        CallTrace {
            cx: parent.with_span(span),
            tracer: self.tracer.clone(),
            propagator: self.propagator.clone(),
        }
    }

    /// A span of the push receiver's work (`callback receive`, `callback
    /// delivery`), a root of its own.
    pub fn operation(
        &self,
        name: &'static str,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Operation {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start(&self.tracer);
        Operation {
            cx: Context::new().with_span(span),
        }
    }
}

/// One call's span, ended with its access-log line.
#[derive(Debug)]
pub struct CallTrace {
    cx: Context,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

/// What the call's span says when it ends.
#[derive(Debug, Default)]
pub struct CallEnd<'a> {
    pub status: u16,
    pub error: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub code: Option<String>,
    pub class: Option<&'static str>,
    pub profile: Option<&'a str>,
    pub retry_skipped: Option<&'static str>,
    pub idempotency: Option<&'static str>,
}

impl CallTrace {
    /// The trace id and this call's span id, in hex: the access log's.
    pub fn ids(&self) -> (String, String) {
        let span = self.cx.span();
        let c = span.span_context();
        (c.trace_id().to_string(), c.span_id().to_string())
    }

    /// Notes an attribute on the call's span.
    pub fn note(&self, attribute: KeyValue) {
        self.cx.span().set_attribute(attribute);
    }

    /// An upstream attempt's span, child of the call's.
    pub fn attempt(
        &self,
        number: u32,
        method: &http::Method,
        path: &str,
        server: &str,
    ) -> AttemptTrace {
        let mut attributes = vec![
            KeyValue::new("http.request.method", method.as_str().to_owned()),
            KeyValue::new("url.path", path.to_owned()),
            KeyValue::new("server.address", server.to_owned()),
        ];
        if number > 1 {
            attributes.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(number - 1),
            ));
        }
        let span = self
            .tracer
            .span_builder(method.as_str().to_owned())
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.cx);
        AttemptTrace {
            cx: self.cx.with_span(span),
            propagator: self.propagator.clone(),
        }
    }

    pub fn end(self, end: CallEnd<'_>) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(end.status),
        ));
        let optional = [
            ("error.type", end.error),
            ("pandapon.request_id", end.request_id),
            ("pandapon.code", end.code.as_deref()),
            ("pandagate.class", end.class),
            ("pandagate.profile", end.profile),
            ("pandagate.retry_skipped", end.retry_skipped),
            ("pandagate.idempotency", end.idempotency),
        ];
        for (key, value) in optional {
            if let Some(value) = value {
                span.set_attribute(KeyValue::new(key, value.to_owned()));
            }
        }
        if end.status >= 500 || end.error.is_some() {
            span.set_status(Status::error(
                end.error.unwrap_or("server error").to_owned(),
            ));
        }
        span.end();
    }
}

/// One upstream attempt's span.
#[derive(Debug)]
pub struct AttemptTrace {
    cx: Context,
    propagator: TraceContextPropagator,
}

impl AttemptTrace {
    /// Writes this attempt's `traceparent` (and the caller's `tracestate`).
    pub fn inject(&self, headers: &mut HeaderMap) {
        self.propagator
            .inject_context(&self.cx, &mut HeadersMut(headers));
    }

    pub fn note(&self, attribute: KeyValue) {
        self.cx.span().set_attribute(attribute);
    }

    /// Ends the span with the provider's status, or the failure's kind.
    pub fn end(self, status: Option<u16>, error: Option<&str>) {
        let span = self.cx.span();
        if let Some(status) = status {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        if let Some(error) = error {
            span.set_attribute(KeyValue::new("error.type", error.to_owned()));
            span.set_status(Status::error(error.to_owned()));
        } else if status.is_some_and(|s| s >= 500) {
            span.set_attribute(KeyValue::new(
                "error.type",
                status.unwrap_or(500).to_string(),
            ));
            span.set_status(Status::error("server error"));
        }
        span.end();
    }
}

/// A span of the push receiver's work.
#[derive(Debug)]
pub struct Operation {
    cx: Context,
}

impl Operation {
    /// A span inside this one (e.g. the store write of a receive).
    pub fn child(&self, tracer: &Traces, name: &'static str) -> Operation {
        let span = tracer
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .start_with_context(&tracer.tracer, &self.cx);
        Operation {
            cx: self.cx.with_span(span),
        }
    }

    pub fn note(&self, attribute: KeyValue) {
        self.cx.span().set_attribute(attribute);
    }

    pub fn end(self, error: Option<&str>) {
        let span = self.cx.span();
        if let Some(error) = error {
            span.set_attribute(KeyValue::new("error.type", error.to_owned()));
            span.set_status(Status::error(error.to_owned()));
        }
        span.end();
    }
}

struct Headers<'a>(&'a HeaderMap);

/// W3C Trace Context: a `tracestate` has at most 32 list members, and
/// 512 characters is what every vendor must carry. A longer one is dropped
/// whole (the trace itself goes on): it would be kept in every span and
/// sent on every attempt.
const MAX_TRACESTATE_LEN: usize = 512;
const MAX_TRACESTATE_MEMBERS: usize = 32;

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.0.get(key).and_then(|v| v.to_str().ok())?;
        if key.eq_ignore_ascii_case("tracestate")
            && (value.len() > MAX_TRACESTATE_LEN
                || value.split(',').count() > MAX_TRACESTATE_MEMBERS)
        {
            return None;
        }
        Some(value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The exporter's HTTP/1.1 client: rustls with `trust`'s config (no
/// second TLS stack, no other roots), each export within `timeout`. Built
/// on a thread of its own: a blocking client starts a runtime, which may
/// not happen inside the caller's.
fn http_client(trust: &Trust, timeout: Duration) -> Result<reqwest::blocking::Client, ConfigError> {
    let tls = trust.client_config();
    std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(timeout)
            .build()
    })
    .join()
    .map_err(|_| ConfigError::new("telemetry", "building the OTLP client panicked"))?
    .map_err(|e| {
        ConfigError::new(
            "telemetry",
            format_args!("cannot build the OTLP client: {e}"),
        )
    })
}

/// Ended spans wait here for the exporter thread; a full queue drops.
#[derive(Debug)]
struct QueueProcessor {
    queue: Mutex<Option<SyncSender<SpanData>>>,
    dropped: Arc<AtomicU64>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl QueueProcessor {
    fn start<E: SpanExporter + 'static>(
        exporter: E,
        capacity: usize,
        every: Duration,
        dropped: Arc<AtomicU64>,
    ) -> std::io::Result<QueueProcessor> {
        let (queue, spans) = sync_channel(capacity);
        let lost = dropped.clone();
        let thread = std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || export_loop(exporter, spans, every, &lost))?;
        Ok(QueueProcessor {
            queue: Mutex::new(Some(queue)),
            dropped,
            thread: Mutex::new(Some(thread)),
        })
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let queue = self.queue.lock().expect("not poisoned");
        let Some(queue) = queue.as_ref() else {
            return;
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = queue.try_send(span) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // Closing the queue ends the thread once it has sent what is queued.
        self.queue.lock().expect("not poisoned").take();
        if let Some(thread) = self.thread.lock().expect("not poisoned").take() {
            let _ = thread.join();
        }
        Ok(())
    }
}

/// Sends batches of up to `BATCH` spans, at least every `every`, until the
/// queue is closed and empty. The spans of a failed export are counted in
/// `lost`; the first failure after a success is logged as a warning.
fn export_loop<E: SpanExporter>(
    exporter: E,
    spans: Receiver<SpanData>,
    every: Duration,
    lost: &AtomicU64,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut failing = false;
    let mut next = Instant::now() + every;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        let closed = match spans.recv_timeout(wait) {
            Ok(span) => {
                batch.push(span);
                batch.extend(spans.try_iter().take(BATCH - batch.len()));
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if batch.len() >= BATCH || Instant::now() >= next || closed {
            if !batch.is_empty() {
                let n = batch.len() as u64;
                match block_on(exporter.export(std::mem::take(&mut batch))) {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("trace export works again");
                    }
                    Ok(()) => {}
                    Err(e) => {
                        lost.fetch_add(n, Ordering::Relaxed);
                        if !std::mem::replace(&mut failing, true) {
                            tracing::warn!(error = %e, "trace export failed; spans are dropped and counted until it works");
                        } else {
                            tracing::debug!(error = %e, "trace export failed; spans dropped");
                        }
                    }
                }
            }
            next = Instant::now() + every;
        }
        if closed {
            let _ = exporter.shutdown();
            return;
        }
    }
}

/// Runs `f` to completion on this thread. The OTLP/HTTP client is a
/// blocking one (its own runtime inside), so the export future is ready
/// when first polled; a dozen lines rather than another executor crate.
fn block_on<F: Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}
