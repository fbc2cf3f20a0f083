//! The Prometheus series count what happened.

use crate::support;

use pandagate::config::RateLimitConfig;
use pandagate::exporter::Exporter;
use support::provider::upstream_failing_first;
use support::*;
use wiremock::ResponseTemplate;

#[tokio::test]
async fn series_count_calls_attempts_retries_and_limits() {
    let upstream = upstream_failing_first(
        1,
        ResponseTemplate::new(503),
        ResponseTemplate::new(200).set_body_raw(provider_body("r", 200, "ok"), "application/json"),
    )
    .await;
    let mut c = config(&upstream.uri());
    c.retry.backoff_base_ms = 1;
    c.retry.backoff_cap_ms = 1;
    c.rate_limit = Some(RateLimitConfig {
        redis_url: Some("redis://127.0.0.1:1".into()),
        redis_key_prefix: "m".into(),
        ..RateLimitConfig::new(1.0, Some(3))
    });
    let gw = spawn_gateway(c).await;
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 200); // 503, then 200
    assert_eq!(get(&gw.url("/alibaba/order/create")).await.status, 200);
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 429); // quota of 3 spent
    gw.access_log_of(3).await;

    let gateway = gw.gateway.clone();
    let text = Exporter::new(std::sync::Arc::new(move || gateway.clone())).render();
    let has = |line: &str| assert!(text.contains(line), "missing {line:?} in:\n{text}");
    has(r#"pandagate_calls_total{class="read",status="200",code="200"} 1"#);
    has(r#"pandagate_calls_total{class="write",status="200",code="200"} 1"#);
    has(r#"pandagate_calls_total{class="read",status="429",code="none"} 1"#);
    has(r#"pandagate_upstream_attempts_total{class="read"} 2"#);
    has(r#"pandagate_upstream_attempts_total{class="write"} 1"#);
    has(r#"pandagate_retries_total{reason="503"} 1"#);
    has("pandagate_rate_limit_rejections_total 1");
    has("pandagate_retries_budget_refused_total 0");
    has("pandagate_calls_in_flight 0");
    has("pandagate_circuit_state 0");
    has("pandagate_rate_limit_fallback 0");
    has("pandagate_secret_reloads_total 0");
    has(r#"pandagate_request_duration_seconds_count{class="read"} 2"#);
    has(r#"pandagate_upstream_duration_seconds_count{class="read"} 2"#);
    // Every series has a help text, ending in one period (the library adds it).
    let helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP ")).collect();
    assert!(helps.len() >= 10, "{text}");
    for help in helps {
        assert!(help.ends_with('.') && !help.ends_with(".."), "{help}");
    }
    gw.stop().await;
}
