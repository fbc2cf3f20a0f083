//! The per-call Prometheus series: recorded once, when a call's access-log
//! line is written, from the same record. `crate::exporter` adds the state
//! of the other components at scrape time and renders them all.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::access_log::AccessRecord;
use crate::envelope::EnvelopeFields;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    class: &'static str,
    status: u16,
    /// The provider's body `code`, or `none`.
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Counters and histograms the request path updates.
#[derive(Debug)]
pub struct Metrics {
    calls: Family<CallLabels, Counter>,
    duration: Family<ClassLabels, Histogram, fn() -> Histogram>,
    upstream_duration: Family<ClassLabels, Histogram, fn() -> Histogram>,
    attempts: Family<ClassLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    in_flight: AtomicI64,
    secret_reloads: AtomicU64,
    secret_reload_failures: AtomicU64,
    config_reloads: AtomicU64,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            calls: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            upstream_duration: Family::new_with_constructor(latency_histogram),
            attempts: Family::default(),
            retries: Family::default(),
            in_flight: AtomicI64::new(0),
            secret_reloads: AtomicU64::new(0),
            secret_reload_failures: AtomicU64::new(0),
            config_reloads: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// A call was received.
    pub fn call_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A call finished: its access-log record and envelope fields.
    pub fn call_finished(&self, r: &AccessRecord, found: &EnvelopeFields) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let class = r.class.map_or("none", |c| c.as_str());
        let code = match &found.code {
            None => "none".to_owned(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        self.calls
            .get_or_create(&CallLabels {
                class,
                status: r.status,
                code,
            })
            .inc();
        self.duration
            .get_or_create(&ClassLabels { class })
            .observe(r.started.elapsed().as_secs_f64());
        for reason in &r.retry_reasons {
            self.retries
                .get_or_create(&ReasonLabels {
                    reason: reason.to_string(),
                })
                .inc();
        }
    }

    /// One upstream attempt took `seconds` to its response head (or failure).
    pub fn attempt(&self, class: crate::config::Class, seconds: f64) {
        let labels = ClassLabels {
            class: class.as_str(),
        };
        self.attempts.get_or_create(&labels).inc();
        self.upstream_duration
            .get_or_create(&labels)
            .observe(seconds);
    }

    pub fn secret_reloaded(&self, ok: bool) {
        if ok {
            self.secret_reloads.fetch_add(1, Ordering::Relaxed);
        } else {
            self.secret_reload_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn config_reloaded(&self) {
        self.config_reloads.fetch_add(1, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Secrets reloaded from their files, and files that changed but could
    /// not be used.
    pub fn secret_reloads(&self) -> (u64, u64) {
        (
            self.secret_reloads.load(Ordering::Relaxed),
            self.secret_reload_failures.load(Ordering::Relaxed),
        )
    }

    pub fn config_reloads(&self) -> u64 {
        self.config_reloads.load(Ordering::Relaxed)
    }

    /// Adds the per-call series to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "calls",
            "Calls answered, by route class, HTTP status and provider code.",
            self.calls.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a call's arrival to the end of its response.",
            self.duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time from sending an upstream attempt to its response head.",
            self.upstream_duration.clone(),
        );
        registry.register(
            "upstream_attempts",
            "Upstream attempts, first attempts and retries.",
            self.attempts.clone(),
        );
        registry.register("retries", "Retries, by reason.", self.retries.clone());
    }
}
