//! `/metrics`: the per-call series of [`crate::observe::metrics`], and the state
//! other components keep in plain atomics (the retry budget, the limiter,
//! the breaker, the listeners, the body budget, the push receiver), read
//! at scrape time.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::base::body_budget::Reader;
use crate::callbacks::Callbacks;
use crate::gateway::Gateway;
use crate::net::connections::Connections;
use crate::policy::breaker::State;
use crate::state::quota::BackendState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

/// Where the collector finds the gateway serving now (it changes on reload).
pub type GatewaySource = Arc<dyn Fn() -> Arc<Gateway> + Send + Sync>;

/// Reads component state at scrape time.
struct StateCollector {
    gateway: GatewaySource,
    process: Process,
}

/// The parts of the process `/metrics` reports besides the gateway.
#[derive(Clone, Default)]
pub struct Process {
    pub callbacks: Option<Arc<Callbacks>>,
    /// The listeners' connection counts.
    pub listeners: Vec<Arc<Connections>>,
    /// Diagnostic events dropped so far (read at scrape time).
    pub diagnostics_dropped: Option<fn() -> u64>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One series per listener, from `value`.
fn per_listener(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    listeners: &[Arc<Connections>],
    kind: MetricType,
    value: impl Fn(&Connections) -> u64,
) -> std::fmt::Result {
    let mut family = e.encode_descriptor(name, help, None, kind)?;
    for c in listeners {
        let labels = ListenerLabels {
            listener: c.listener,
        };
        let series = family.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value(c)).encode(series)?,
            _ => ConstGauge::new(value(c) as i64).encode(series)?,
        }
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        self.encode_listeners(&mut e)?;
        self.encode_bodies(&mut e)?;
        self.encode_gateway(&mut e)?;
        self.encode_logs(&mut e)?;
        self.encode_callbacks(&mut e)
    }
}

impl StateCollector {
    fn encode_listeners(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        if !self.process.listeners.is_empty() {
            per_listener(
                e,
                "connections_open",
                "Open connections, per listener.",
                &self.process.listeners,
                MetricType::Gauge,
                |c| c.open() as u64,
            )?;
            per_listener(
                e,
                "connections_rejected",
                "Connections closed at once because the listener had max_connections open.",
                &self.process.listeners,
                MetricType::Counter,
                Connections::rejected,
            )?;
        }
        Ok(())
    }

    /// The body budget: bytes held, and bodies refused by reader
    /// (`listener="gateway"` for calls, `"callbacks"` for pushes on either
    /// listener).
    fn encode_bodies(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let bodies = (self.gateway)().lasting().bodies.clone();
        gauge(
            e,
            "body_budget_held_bytes",
            "Bytes of request bodies being read or kept for replays, against server.max_buffered_body_bytes.",
            i64::try_from(bodies.used()).unwrap_or(i64::MAX),
        )?;
        let mut family = e.encode_descriptor(
            "body_budget_rejected",
            "Request bodies refused (503 overloaded) because they would pass the body budget or a share of it, by reader: gateway (calls) or callbacks (pushes).",
            None,
            MetricType::Counter,
        )?;
        for reader in [Reader::Call, Reader::Push] {
            let labels = ListenerLabels {
                listener: reader.label(),
            };
            ConstCounter::new(bodies.refused(reader)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// The gateway serving now: its retry budget, limiter, breaker, calls
    /// in flight, reloads.
    fn encode_gateway(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let g = (self.gateway)();
        let m = &g.lasting().metrics;
        counter(
            e,
            "retries_budget_refused",
            "Retries not made because the retry budget was spent.",
            g.budget().refused(),
        )?;
        counter(
            e,
            "rate_limit_waits",
            "Attempts that waited for a rate-limit slot.",
            g.limiter().waited(),
        )?;
        counter(
            e,
            "rate_limit_rejections",
            "Attempts refused by the rate limiter (429).",
            g.limiter().rejected(),
        )?;
        let fallback = matches!(g.limiter().backend_state(), BackendState::Fallback(_));
        gauge(
            e,
            "rate_limit_fallback",
            "1 while the shared (Redis) rate limiter is away and fail_mode decides.",
            i64::from(fallback),
        )?;
        let state = match g.breaker().state() {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        };
        gauge(
            e,
            "circuit_state",
            "Circuit breaker: 0 closed, 1 open, 2 half-open.",
            state,
        )?;
        gauge(e, "calls_in_flight", "Calls being answered.", m.in_flight())?;
        gauge(
            e,
            "cache_bytes",
            "Bytes of answers the read cache holds.",
            i64::try_from(g.cache().bytes()).unwrap_or(i64::MAX),
        )?;
        if let Some(traces) = g.traces() {
            counter(
                e,
                "trace_spans_dropped",
                "Spans dropped: the export queue (telemetry.queue_spans) was full, or their export failed.",
                traces.dropped(),
            )?;
        }
        counter(
            e,
            "secret_reloads",
            "Secrets reloaded from their files.",
            m.secret_reloads().0,
        )?;
        counter(
            e,
            "secret_reload_failures",
            "Secret files that changed but could not be used.",
            m.secret_reloads().1,
        )?;
        counter(
            e,
            "config_reloads",
            "Configs reloaded on SIGHUP.",
            m.config_reloads(),
        )?;
        Ok(())
    }

    fn encode_logs(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let g = (self.gateway)();
        counter(
            e,
            "access_log_dropped",
            "Access-log lines dropped because stdout's reader was behind by log.queue_lines.",
            g.lasting().access_log.dropped(),
        )?;
        counter(
            e,
            "diagnostics_dropped",
            "Diagnostic log events dropped because stderr's reader was behind by log.queue_lines.",
            self.process.diagnostics_dropped.map_or(0, |read| read()),
        )
    }

    fn encode_callbacks(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        if let Some(cb) = &self.process.callbacks {
            let c = &cb.counts;
            for (name, help, v) in [
                ("callbacks_received", "Pushes received.", &c.received),
                (
                    "callbacks_rejected",
                    "Pushes refused (signature, size, format).",
                    &c.rejected,
                ),
                (
                    "callbacks_stored",
                    "Pushes stored and acknowledged.",
                    &c.stored,
                ),
                (
                    "callbacks_duplicates",
                    "Pushes acknowledged that were already stored.",
                    &c.duplicates,
                ),
                (
                    "callbacks_delivered",
                    "Deliveries a subscriber acknowledged.",
                    &c.delivered,
                ),
                (
                    "callbacks_retried",
                    "Delivery attempts that failed and will be retried.",
                    &c.retried,
                ),
                (
                    "callbacks_dead_lettered",
                    "Deliveries given up after max_age_ms.",
                    &c.dead_lettered,
                ),
            ] {
                counter(e, name, help, v.load(Ordering::Relaxed))?;
            }
        }
        Ok(())
    }
}

/// The registry for one gateway.
#[derive(Debug)]
pub struct Exporter {
    registry: Registry,
}

impl Exporter {
    pub fn new(gateway: GatewaySource) -> Exporter {
        Self::with_process(gateway, Process::default())
    }

    /// Also exports the series of the rest of the `process`.
    pub fn with_process(gateway: GatewaySource, process: Process) -> Exporter {
        let mut registry = Registry::with_prefix("pandagate");
        let current = gateway();
        current.lasting().metrics.register(&mut registry);
        if let Some(cb) = &process.callbacks {
            registry.register(
                "callbacks_delivery_lag_seconds",
                "Time from a push's acknowledgement to its delivery",
                cb.counts.lag.clone(),
            );
            registry.register(
                "callbacks_claim_lag_seconds",
                "Time from a delivery falling due to its being taken up by a delivery loop",
                cb.counts.claim_lag.clone(),
            );
        }
        // `register` ends each help text with a period; the collector's
        // descriptors are written as they are, so they carry their own.
        registry.register_collector(Box::new(StateCollector { gateway, process }));
        Exporter { registry }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# encoding failed");
        }
        out
    }
}
