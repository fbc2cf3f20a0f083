//! `/metrics`: the per-call series of [`crate::observe::metrics`], and the
//! state other components keep in plain atomics (the listeners, the body
//! budget, the retry budget, the limiter, the breaker, the logs, the push
//! receiver), read at scrape time. Each component names and describes its
//! own families; this module only puts them in one registry.

use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::base::build;
use crate::callbacks::Callbacks;
use crate::gateway::Gateway;
use crate::net::connections::{self, Connections};
use crate::observe::diagnostics;

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

impl Collector for StateCollector {
    /// Each part describes its own series; the order is the exposition's.
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let gateway = (self.gateway)();
        describe_build(&mut e)?;
        connections::describe(&self.process.listeners, &mut e)?;
        gateway.lasting().bodies.describe(&mut e)?;
        gateway.describe(&mut e)?;
        gateway.lasting().access_log.describe(&mut e)?;
        diagnostics::describe(self.process.diagnostics_dropped, &mut e)?;
        if let Some(cb) = &self.process.callbacks {
            cb.counts.describe(&mut e)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

/// `pandagate_build_info{version, commit} 1`.
fn describe_build(e: &mut DescriptorEncoder) -> std::fmt::Result {
    let family = e.encode_descriptor(
        "build_info",
        "The binary's version and the commit it was built from; always 1.",
        None,
        MetricType::Gauge,
    );
    ConstGauge::new(1i64).encode(family?.encode_family(&BuildLabels {
        version: build::VERSION_NUMBER,
        commit: build::COMMIT,
    })?)
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
            cb.counts.register(&mut registry);
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
