//! `[telemetry]`: distributed traces exported over OTLP.

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Env};

/// `[telemetry]`. Without an endpoint (here, in `OTEL_EXPORTER_OTLP_ENDPOINT`
/// or in `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) no span is made at all.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP receiver (`http://collector:4318`, or
    /// `https://…`, whose certificate must chain to a root of `[tls]`);
    /// spans go to its `/v1/traces`. Unset: the standard `OTEL_*` variables.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0 to 1; a call that carries a
    /// `traceparent` follows its caller's decision.
    pub sample_ratio: f64,
    /// Spans that may wait for export; beyond, spans are dropped and
    /// counted (`pandagate_trace_spans_dropped_total`), never waited for.
    pub queue_spans: usize,
    /// Spans are sent at least this often, in milliseconds.
    pub export_interval_ms: u64,
    /// Longest one export may take, in milliseconds.
    pub export_timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
            queue_spans: 4096,
            export_interval_ms: 1_000,
            export_timeout_ms: 5_000,
        }
    }
}

/// Where spans go: `/v1/traces` of an OTLP/HTTP receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracesEndpoint(pub String);

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(ConfigError::new(
                "telemetry.sample_ratio",
                "must be between 0 and 1",
            ));
        }
        for (key, v) in [
            ("telemetry.queue_spans", self.queue_spans as u64),
            ("telemetry.export_interval_ms", self.export_interval_ms),
            ("telemetry.export_timeout_ms", self.export_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        if self.queue_spans > 1_000_000 {
            return Err(ConfigError::new(
                "telemetry.queue_spans",
                "must be at most 1000000",
            ));
        }
        if let Some(url) = &self.otlp_endpoint {
            check_url(url, "telemetry.otlp_endpoint")?;
        }
        Ok(())
    }

    /// The traces endpoint: `otlp_endpoint`, else
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is), else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (plus `/v1/traces`); `None`: tracing off.
    pub fn endpoint(&self, env: Env<'_>) -> Result<Option<TracesEndpoint>, ConfigError> {
        let base = |url: &str| format!("{}/v1/traces", url.trim_end_matches('/'));
        if let Some(url) = &self.otlp_endpoint {
            return Ok(Some(TracesEndpoint(base(url))));
        }
        if let Some(url) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").filter(|u| !u.is_empty()) {
            check_url(&url, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")?;
            return Ok(Some(TracesEndpoint(url)));
        }
        if let Some(url) = env("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|u| !u.is_empty()) {
            check_url(&url, "OTEL_EXPORTER_OTLP_ENDPOINT")?;
            return Ok(Some(TracesEndpoint(base(&url))));
        }
        Ok(None)
    }
}

fn check_url(url: &str, key: &str) -> Result<(), ConfigError> {
    let ok = url
        .parse::<http::Uri>()
        .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            "must be an http:// or https:// URL of an OTLP/HTTP receiver",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::env_of;

    #[test]
    fn the_endpoint_comes_from_the_file_then_the_standard_variables() {
        let mut c = TelemetryConfig::default();
        assert_eq!(c.endpoint(&env_of(&[])).unwrap(), None);
        let env = env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318/")]);
        assert_eq!(
            c.endpoint(&env).unwrap(),
            Some(TracesEndpoint("http://otel:4318/v1/traces".into()))
        );
        let env = env_of(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/custom"),
        ]);
        assert_eq!(
            c.endpoint(&env).unwrap(),
            Some(TracesEndpoint("http://t:1/custom".into()))
        );
        c.otlp_endpoint = Some("http://file:4318".into());
        assert_eq!(
            c.endpoint(&env).unwrap(),
            Some(TracesEndpoint("http://file:4318/v1/traces".into()))
        );
        let bad = env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "grpc-only")]);
        let e = TelemetryConfig::default().endpoint(&bad).unwrap_err();
        assert_eq!(e.key, "OTEL_EXPORTER_OTLP_ENDPOINT");
        let tls = env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://otel:4318")]);
        assert_eq!(
            TelemetryConfig::default().endpoint(&tls).unwrap(),
            Some(TracesEndpoint("https://otel:4318/v1/traces".into()))
        );
        for other in ["grpc://otel:4317", "ftp://otel"] {
            c.otlp_endpoint = Some(other.into());
            assert_eq!(c.validate().unwrap_err().key, "telemetry.otlp_endpoint");
        }
    }

    #[test]
    fn ratios_and_sizes_are_bounded() {
        for (c, key) in [
            (
                TelemetryConfig {
                    sample_ratio: 1.5,
                    ..Default::default()
                },
                "telemetry.sample_ratio",
            ),
            (
                TelemetryConfig {
                    queue_spans: 0,
                    ..Default::default()
                },
                "telemetry.queue_spans",
            ),
            (
                TelemetryConfig {
                    otlp_endpoint: Some("grpc://c:4317".into()),
                    ..Default::default()
                },
                "telemetry.otlp_endpoint",
            ),
        ] {
            assert_eq!(c.validate().unwrap_err().key, key);
        }
    }
}
