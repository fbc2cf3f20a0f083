//! The per-call Prometheus series: recorded once, when a call's access-log
//! line is written, from the same record. `crate::process::exporter` adds the state
//! of the other components at scrape time and renders them all.
//!
//! Every serving thread records into the same series, so nothing here
//! takes a lock per call: the latency histograms are atomic counters (not
//! `prometheus_client`'s histogram, which locks on every observation), the
//! series of each route class are looked up once and kept, and the call
//! counters (labelled with the provider's `code`, known only per call) are
//! kept by each thread in a small cache of its own.

use crate::base::families::{self, Described, DescriptorEncoder, Kind};
pub use crate::base::latency::Latency;
use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::config::Class;
use crate::observe::access_log::AccessRecord;
use crate::pandapon::envelope::EnvelopeFields;
use crate::policy::retry::RetryReason;
use crate::state::cache::CacheResult;
use crate::state::idempotency::Logged;

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
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Counters and histograms the request path updates.
#[derive(Debug)]
pub struct Metrics {
    /// Tells this set of series from another in the threads' caches.
    id: u64,
    calls: Family<CallLabels, Counter>,
    duration: Family<ClassLabels, Latency>,
    upstream_duration: Family<ClassLabels, Latency>,
    attempts: Family<ClassLabels, Counter>,
    /// The series of each class (and of calls with none), once looked up.
    by_class: [OnceLock<ClassSeries>; 4],
    retries: Family<ReasonLabels, Counter>,
    /// Calls with an `Idempotency-Key`, by what became of the key.
    idempotency: Family<ResultLabels, Counter>,
    /// Calls on cached routes, by what the cache did.
    cache: Family<ResultLabels, Counter>,
    in_flight: AtomicI64,
    secret_reloads: AtomicU64,
    secret_reload_failures: AtomicU64,
    /// Config reloads applied, and refused.
    config_reloads: [AtomicU64; 2],
    /// The gateway's own errors, by kind: how many, and the last one.
    errors: Mutex<Vec<ErrorSeen>>,
}

/// Calls that ended in one kind of gateway error, and the last of them.
#[derive(Clone, Debug)]
pub struct ErrorSeen {
    pub kind: &'static str,
    pub count: u64,
    pub last: SystemTime,
    /// What the last one's caller was told.
    pub message: String,
}

/// `pandagate_calls_total`, whose label values are known only as calls
/// end: exported through a collector so that its family is there, with no
/// series, before the first call (a registered family is left out while
/// it is empty).
#[derive(Debug)]
struct CallsCollector(Family<CallLabels, Counter>);

impl Collector for CallsCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let family = e.encode_descriptor(
            "calls",
            "Calls answered, by route class, HTTP status and provider code.",
            None,
            MetricType::Counter,
        )?;
        self.0.encode(family)
    }
}

/// One class's series, shared with the families that export them.
#[derive(Debug)]
struct ClassSeries {
    duration: Latency,
    upstream_duration: Latency,
    attempts: Counter,
}

/// Call counters this thread has used, by (metrics id, class, status, code).
struct CachedCall {
    metrics: u64,
    class: &'static str,
    status: u16,
    code: Box<str>,
    counter: Counter,
}

/// Beyond this many label sets a thread looks counters up in the family.
const CACHED_CALLS: usize = 64;

thread_local! {
    static CALLS: RefCell<Vec<CachedCall>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl Default for Metrics {
    /// Every series whose labels are known in advance exists from the
    /// start, at 0: each class's latencies and attempts, each idempotency
    /// outcome, each cache result, each retry reason but the open-ended
    /// ones (statuses and codes), so dashboards and alerts see them before
    /// the first event.
    fn default() -> Self {
        let metrics = Metrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            calls: Family::default(),
            duration: Family::default(),
            upstream_duration: Family::default(),
            attempts: Family::default(),
            by_class: Default::default(),
            retries: Family::default(),
            idempotency: Family::default(),
            cache: Family::default(),
            in_flight: AtomicI64::new(0),
            secret_reloads: AtomicU64::new(0),
            secret_reload_failures: AtomicU64::new(0),
            config_reloads: Default::default(),
            errors: Mutex::new(Vec::new()),
        };
        for class in [
            None,
            Some(Class::Read),
            Some(Class::Write),
            Some(Class::Unknown),
        ] {
            metrics.class(class);
        }
        for logged in Logged::ALL {
            let _ = metrics.idempotency.get_or_create(&ResultLabels {
                result: logged.as_str(),
            });
        }
        for result in CacheResult::ALL {
            let _ = metrics.cache.get_or_create(&ResultLabels {
                result: result.as_str(),
            });
        }
        for reason in [
            RetryReason::Connect,
            RetryReason::Reset,
            RetryReason::Timeout,
        ] {
            let _ = metrics.retries.get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            });
        }
        metrics
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
        self.count_call(r.class, r.status, found.code.as_ref());
        self.class(r.class).duration.observe(r.started.elapsed());
        for reason in &r.retry_reasons {
            self.retries
                .get_or_create(&ReasonLabels {
                    reason: reason.to_string(),
                })
                .inc();
        }
        if let Some(result) = r.cache {
            self.cache.get_or_create(&ResultLabels { result }).inc();
        }
        if let Some(logged) = r.idempotency {
            self.idempotency
                .get_or_create(&ResultLabels {
                    result: logged.as_str(),
                })
                .inc();
        }
        if let Some(kind) = r.error {
            self.error_seen(kind, r.gateway_msg.as_deref().unwrap_or(""));
        }
    }

    /// A call ended in the gateway's error `kind` (a lock, on errors only).
    fn error_seen(&self, kind: &'static str, message: &str) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        match errors.iter_mut().find(|e| e.kind == kind) {
            Some(seen) => {
                seen.count += 1;
                seen.last = now;
                message.clone_into(&mut seen.message);
            }
            None => errors.push(ErrorSeen {
                kind,
                count: 1,
                last: now,
                message: message.to_owned(),
            }),
        }
    }

    /// Each kind of gateway error seen since start, with its last one.
    pub fn errors_seen(&self) -> Vec<ErrorSeen> {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One upstream attempt took `took` to its response head (or failure).
    pub fn attempt(&self, class: Class, took: Duration) {
        let series = self.class(Some(class));
        series.attempts.inc();
        series.upstream_duration.observe(took);
    }

    /// The series of `class` (`none`: calls refused before routing).
    fn class(&self, class: Option<Class>) -> &ClassSeries {
        let slot = match class {
            None => 0,
            Some(Class::Read) => 1,
            Some(Class::Write) => 2,
            Some(Class::Unknown) => 3,
        };
        self.by_class[slot].get_or_init(|| {
            let labels = ClassLabels {
                class: class.map_or("none", Class::as_str),
            };
            ClassSeries {
                duration: self.duration.get_or_create(&labels).clone(),
                upstream_duration: self.upstream_duration.get_or_create(&labels).clone(),
                attempts: self.attempts.get_or_create(&labels).clone(),
            }
        })
    }

    /// `pandagate_calls_total{class, status, code}` + 1, through this
    /// thread's cache of counters: no lock, no allocation once seen.
    fn count_call(&self, class: Option<Class>, status: u16, code: Option<&serde_json::Value>) {
        let class = class.map_or("none", Class::as_str);
        let mut number = [0u8; 40];
        let code: std::borrow::Cow<'_, str> = match code {
            None => "none".into(),
            Some(serde_json::Value::String(s)) => s.as_str().into(),
            Some(serde_json::Value::Number(n)) => {
                let mut w = &mut number[..];
                match std::io::Write::write_fmt(&mut w, format_args!("{n}")) {
                    Ok(()) => {
                        let len = 40 - w.len();
                        std::str::from_utf8(&number[..len])
                            .expect("a number is ASCII")
                            .into()
                    }
                    Err(_) => n.to_string().into(),
                }
            }
            Some(other) => other.to_string().into(),
        };
        CALLS.with_borrow_mut(|cache| {
            let hit = cache.iter().find(|c| {
                c.metrics == self.id && c.status == status && c.class == class && *c.code == *code
            });
            if let Some(hit) = hit {
                hit.counter.inc();
                return;
            }
            let counter = self
                .calls
                .get_or_create(&CallLabels {
                    class,
                    status,
                    code: code.to_string(),
                })
                .clone();
            counter.inc();
            if cache.first().is_some_and(|c| c.metrics != self.id) {
                cache.clear();
            }
            if cache.len() < CACHED_CALLS {
                cache.push(CachedCall {
                    metrics: self.id,
                    class,
                    status,
                    code: code.into(),
                    counter,
                });
            }
        });
    }

    pub fn secret_reloaded(&self, ok: bool) {
        if ok {
            self.secret_reloads.fetch_add(1, Ordering::Relaxed);
        } else {
            self.secret_reload_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A config reload ended: `applied` or `refused`.
    pub fn config_reloaded(&self, result: &str) {
        let slot = usize::from(result != "applied");
        self.config_reloads[slot].fetch_add(1, Ordering::Relaxed);
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

    /// Config reloads (applied, refused).
    pub fn config_reloads(&self) -> (u64, u64) {
        (
            self.config_reloads[0].load(Ordering::Relaxed),
            self.config_reloads[1].load(Ordering::Relaxed),
        )
    }

    /// The process-level series kept here beside the per-call ones: calls
    /// in flight and reloads (read at scrape time, not registered).
    pub fn describe_state(&self, e: &mut DescriptorEncoder) -> Described {
        families::gauge(
            e,
            "calls_in_flight",
            "Calls being answered.",
            self.in_flight(),
        )?;
        let (reloads, failures) = self.secret_reloads();
        families::counter(
            e,
            "secret_reloads",
            "Secrets reloaded from their files.",
            reloads,
        )?;
        families::counter(
            e,
            "secret_reload_failures",
            "Secret files that changed but could not be used.",
            failures,
        )?;
        let (applied, refused) = self.config_reloads();
        families::by_result(
            e,
            "config_reloads",
            "Config reloads (SIGHUP, POST /reload, a changed file), by result: applied, or refused and the running config kept.",
            Kind::Counter,
            [("applied", applied), ("refused", refused)],
        )
    }

    /// Adds the per-call series to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(CallsCollector(self.calls.clone())));
        registry.register(
            "request_duration_seconds",
            "Time from a call's arrival to the end of its response",
            self.duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time from sending an upstream attempt to its response head",
            self.upstream_duration.clone(),
        );
        registry.register(
            "upstream_attempts",
            "Upstream attempts, first attempts and retries",
            self.attempts.clone(),
        );
        registry.register("retries", "Retries, by reason", self.retries.clone());
        registry.register(
            "idempotency",
            "Calls with an Idempotency-Key, by what became of the key",
            self.idempotency.clone(),
        );
        registry.register(
            "cache_requests",
            "Calls on cached routes, by what the read cache did",
            self.cache.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::prometheus_text::encode;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn calls_are_counted_by_label_set_and_by_metrics_instance() {
        let (one, two) = (Metrics::default(), Metrics::default());
        let code = |v: serde_json::Value| Some(v);
        for _ in 0..3 {
            one.count_call(Some(Class::Read), 200, code(200.into()).as_ref());
            two.count_call(Some(Class::Read), 200, code(200.into()).as_ref());
            one.count_call(Some(Class::Write), 200, code("E1".into()).as_ref());
        }
        one.count_call(None, 401, None);
        let render = |m: &Metrics| {
            let mut r = Registry::default();
            m.register(&mut r);
            text(&r)
        };
        let (a, b) = (render(&one), render(&two));
        assert!(
            a.contains(r#"calls_total{class="read",status="200",code="200"} 3"#),
            "{a}"
        );
        assert!(
            a.contains(r#"calls_total{class="write",status="200",code="E1"} 3"#),
            "{a}"
        );
        assert!(
            a.contains(r#"calls_total{class="none",status="401",code="none"} 1"#),
            "{a}"
        );
        assert!(
            b.contains(r#"calls_total{class="read",status="200",code="200"} 3"#),
            "{b}"
        );
        assert!(!b.contains("E1"), "{b}");
    }

    #[test]
    fn recording_from_many_threads_loses_nothing() {
        let m = std::sync::Arc::new(Metrics::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        m.attempt(Class::Read, Duration::from_micros(150));
                        m.count_call(Some(Class::Read), 200, None);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut r = Registry::default();
        m.register(&mut r);
        let t = text(&r);
        assert!(
            t.contains(r#"upstream_attempts_total{class="read"} 4000"#),
            "{t}"
        );
        assert!(
            t.contains(r#"upstream_duration_seconds_count{class="read"} 4000"#),
            "{t}"
        );
        assert!(
            t.contains(r#"calls_total{class="read",status="200",code="none"} 4000"#),
            "{t}"
        );
    }
}
