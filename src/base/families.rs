//! Prometheus families read at scrape time from a component's own
//! counters. Each component describes its series next to the atomics it
//! keeps (`fn describe(&self, e: &mut DescriptorEncoder)`), so its names and
//! help texts live with it; `/metrics` only calls each in turn.
//!
//! Help texts are written as they are: they carry their own period.

pub use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric};
pub use prometheus_client::metrics::MetricType as Kind;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// What describing a family returns: only the encoder's write can fail.
pub type Described = std::fmt::Result;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// A counter read now.
pub fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Described {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

/// A gauge read now.
pub fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Described {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A gauge of a byte count, saturating at `i64::MAX`.
pub fn bytes_gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Described {
    gauge(e, name, help, i64::try_from(v).unwrap_or(i64::MAX))
}

/// One series per `listener` label, a counter or a gauge.
pub fn per_listener(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: Kind,
    series: impl IntoIterator<Item = (&'static str, u64)>,
) -> Described {
    labelled(e, name, help, kind, series, |listener| ListenerLabels {
        listener,
    })
}

/// One series per `result` label, a counter or a gauge.
pub fn by_result(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: Kind,
    series: impl IntoIterator<Item = (&'static str, u64)>,
) -> Described {
    labelled(e, name, help, kind, series, |result| ResultLabels {
        result,
    })
}

fn labelled<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: Kind,
    series: impl IntoIterator<Item = (&'static str, u64)>,
    labels: impl Fn(&'static str) -> L,
) -> Described {
    let mut family = e.encode_descriptor(name, help, None, kind)?;
    for (label, value) in series {
        let labels = labels(label);
        let encoder = family.encode_family(&labels)?;
        match kind {
            Kind::Counter => ConstCounter::new(value).encode(encoder)?,
            _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(encoder)?,
        }
    }
    Ok(())
}
