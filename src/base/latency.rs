//! A latency histogram of atomic counters, for series many threads record
//! into at once: `prometheus_client`'s own histogram locks on every
//! observation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Latency buckets: 100 µs to ~52 s, doubling, then +Inf.
const LATENCY_BUCKETS: usize = 20;
const LATENCY_FIRST_NANOS: u64 = 100_000;

/// A latency histogram of atomic counters: observing takes no lock, so
/// threads recording at once never wait for one another.
#[derive(Clone, Debug, Default)]
pub struct Latency(Arc<LatencyCounts>);

#[derive(Debug, Default)]
struct LatencyCounts {
    /// Per bucket, not cumulative; the last is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
    sum_nanos: AtomicU64,
}

impl Latency {
    pub fn observe(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.0.buckets[latency_bucket(nanos)].fetch_add(1, Ordering::Relaxed);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// The first bucket whose upper bound (100 µs × 2^i) is at least `nanos`.
fn latency_bucket(nanos: u64) -> usize {
    let units = nanos.div_ceil(LATENCY_FIRST_NANOS);
    let bucket = if units <= 1 {
        0
    } else {
        (u64::BITS - (units - 1).leading_zeros()) as usize
    };
    bucket.min(LATENCY_BUCKETS)
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = exponential_buckets(
            LATENCY_FIRST_NANOS as f64 / 1e9,
            2.0,
            LATENCY_BUCKETS as u16,
        )
        .chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.0.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' sum, so the two always agree.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::prometheus_text::encode;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn buckets_are_the_first_upper_bound_at_or_above() {
        let us = |n: u64| latency_bucket(n * 1_000);
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(us(100), 0);
        assert_eq!(latency_bucket(100_001), 1);
        assert_eq!(us(200), 1);
        assert_eq!(us(201), 2);
        assert_eq!(us(400), 2);
        assert_eq!(us(401), 3);
        // 100 µs × 2^19 = 52.4288 s is the last finite bound.
        assert_eq!(latency_bucket(52_428_800_000), 19);
        assert_eq!(latency_bucket(52_428_800_001), 20);
        assert_eq!(latency_bucket(u64::MAX), 20);
    }

    /// The atomic histogram exports what `prometheus_client`'s own does for
    /// the same observations, bucket for bucket.
    #[test]
    fn latency_exports_like_the_library_histogram() {
        let ours = Latency::default();
        let theirs = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        for micros in [
            0, 50, 100, 101, 150, 250, 999, 1_000, 12_345, 3_000_000, 99_000_000,
        ] {
            let took = Duration::from_micros(micros);
            ours.observe(took);
            theirs.observe(took.as_secs_f64());
        }
        let mut a = Registry::default();
        a.register("latency", "help", ours);
        let mut b = Registry::default();
        b.register("latency", "help", theirs);
        let (a, b) = (text(&a), text(&b));
        let lines = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with("latency_sum"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(lines(&a), lines(&b), "{a}\n{b}");
        assert!(a.contains("latency_count 11"), "{a}");
        let sum = |t: &str| -> f64 {
            let line = t.lines().find(|l| l.starts_with("latency_sum")).unwrap();
            line.split(' ').nth(1).unwrap().parse().unwrap()
        };
        assert!((sum(&a) - sum(&b)).abs() < 1e-9, "{a}\n{b}");
    }
}
