//! Holding the provider's quota: locally, and across replicas through Redis.

use crate::support;

use std::time::{Duration, Instant};

use pandagate::config::Config;
use pandagate::config::{FailMode, RateLimitBackend, RateLimitConfig, RouteConfig};
use pandagate::quota::BackendState;
use support::gateway::hammer;
use support::provider::upstream_failing_first;
use support::redis_server::RedisServer;
use support::*;
use wiremock::ResponseTemplate;

fn envelope() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(provider_body("rid", 200, "ok"), "application/json")
}

fn limited(upstream: &str, per_second: f64, burst: u32, max_wait_ms: u64) -> Config {
    let mut c = config(upstream);
    c.circuit_breaker.enabled = false;
    c.rate_limit = Some(RateLimitConfig {
        max_wait_ms,
        redis_key_prefix: format!("test-{}", pandagate::ids::request_id()),
        ..RateLimitConfig::new(per_second, Some(burst))
    });
    c
}

fn with_redis(mut c: Config, redis: &RedisServer) -> Config {
    let r = c.rate_limit.as_mut().unwrap();
    r.backend = RateLimitBackend::Redis;
    r.redis_url = Some(redis.url());
    c
}

#[tokio::test]
async fn rejects_with_429_and_retry_after_over_the_limit() {
    let upstream = upstream_answering(envelope()).await;
    let gw = spawn_gateway(limited(&upstream.uri(), 1.0, 2, 0)).await;
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    let refused = get(&gw.url("/open/product/get")).await;
    let v = refused.assert_gateway_envelope(429);
    assert!(v["msg"].as_str().unwrap().contains("rate limit"));
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.headers["ratelimit-limit"], "1");
    assert_eq!(refused.headers["ratelimit-remaining"], "0");
    assert_eq!(refused.headers["ratelimit-reset"], "1");
    assert_eq!(upstream.received_requests().await.unwrap().len(), 2);
    let log = gw.access_log_of(3).await;
    assert_eq!(log[2]["error"], "rate_limited");
    gw.stop().await;
}

#[tokio::test]
async fn waits_for_a_slot_when_callers_prefer_to_wait() {
    let upstream = upstream_answering(envelope()).await;
    let gw = spawn_gateway(limited(&upstream.uri(), 10.0, 1, 1_000)).await;
    let started = Instant::now();
    for _ in 0..4 {
        assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(280),
        "{:?}",
        started.elapsed()
    );
    assert!(gw.gateway.limiter().waited() >= 3);
    gw.stop().await;
}

#[tokio::test]
async fn retries_draw_from_the_same_quota() {
    let upstream = upstream_failing_first(1, ResponseTemplate::new(503), envelope()).await;
    let mut c = limited(&upstream.uri(), 1.0, 1, 0);
    c.retry.backoff_base_ms = 1;
    c.retry.backoff_cap_ms = 1;
    let gw = spawn_gateway(c).await;
    let answer = get(&gw.url("/open/product/get")).await;
    answer.assert_gateway_envelope(429);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 1);
    let e = &gw.access_log_of(1).await[0];
    assert_eq!(
        e["attempts"], 1,
        "the retry found no slot, so never went out"
    );
    // retry_reasons lists retries made; this one was called for, not made.
    assert_eq!(e["retry_reasons"], serde_json::json!([]));
    assert_eq!(e["retry_skipped"], "rate_limited");
    gw.stop().await;
}

#[tokio::test]
async fn a_route_bucket_limits_its_paths_on_top_of_the_key() {
    let upstream = upstream_answering(envelope()).await;
    let mut c = limited(&upstream.uri(), 100.0, 100, 0);
    c.routes = vec![RouteConfig {
        path: Some("/alibaba/order/create".into()),
        rate_limit_per_second: Some(1.0),
        ..RouteConfig::default()
    }];
    let gw = spawn_gateway(c).await;
    let order = || {
        send(
            http::Request::post(gw.url("/alibaba/order/create"))
                .body(http_body_util::Full::default())
                .unwrap(),
        )
    };
    assert_eq!(order().await.status, 200);
    order().await.assert_gateway_envelope(429);
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    gw.stop().await;
}

/// A route's bucket holds for both spellings of its path: the v2 twin does
/// not get a bucket of its own, and neither does the v1 twin of a v2 entry.
#[tokio::test]
async fn the_other_spelling_of_a_path_shares_its_route_bucket() {
    let upstream = upstream_answering(envelope()).await;
    let mut c = limited(&upstream.uri(), 100.0, 100, 0);
    c.routes = vec![
        RouteConfig {
            path: Some("/alibaba/order/create".into()),
            rate_limit_per_second: Some(1.0),
            ..RouteConfig::default()
        },
        RouteConfig {
            prefix: Some("/v2/taobao/order/refund/".into()),
            rate_limit_per_second: Some(1.0),
            ..RouteConfig::default()
        },
    ];
    let gw = spawn_gateway(c).await;
    let post = |path: &str| {
        send(
            http::Request::post(gw.url(path))
                .body(http_body_util::Full::default())
                .unwrap(),
        )
    };
    assert_eq!(post("/alibaba/order/create").await.status, 200);
    post("/v2/alibaba/order/create")
        .await
        .assert_gateway_envelope(429);
    assert_eq!(post("/open/order/refund/submit/message").await.status, 200);
    post("/v2/taobao/order/refund/submit/message")
        .await
        .assert_gateway_envelope(429);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_redis_stay_under_quota_plus_burst() {
    let redis = RedisServer::start();
    let upstream = upstream_answering(envelope()).await;
    let mut c = with_redis(limited(&upstream.uri(), 20.0, 5, 0), &redis);
    // This test is about sharing, not timeouts: on a loaded CI box a 50 ms
    // Redis answer can be late, and the local fallback would then count too.
    c.rate_limit.as_mut().unwrap().redis_timeout_ms = 2_000;
    let a = spawn_gateway(c.clone()).await;
    let b = spawn_gateway(c).await;
    let run = Duration::from_secs(2);
    let started = Instant::now();
    let ok = hammer(&[&a, &b], 4, run, "/open/product/get").await;
    let elapsed = started.elapsed().as_secs_f64();
    let received = upstream.received_requests().await.unwrap().len();
    assert_eq!(ok, received, "every 200 is a call the provider saw");
    let ceiling = (20.0 * elapsed + 5.0).ceil() as usize;
    assert!(
        received <= ceiling,
        "{received} calls in {elapsed:.2} s, ceiling {ceiling}"
    );
    assert!(
        received >= 30,
        "the limiter let the quota through: {received}"
    );
    assert_eq!(a.gateway.limiter().backend_state(), BackendState::Redis);
    assert!(a.gateway.limiter().rejected() + b.gateway.limiter().rejected() > 0);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_never_holds_a_call_past_the_timeout_and_recovery_is_picked_up() {
    let redis = RedisServer::start();
    let upstream = upstream_answering(envelope()).await;
    let c = with_redis(limited(&upstream.uri(), 1000.0, 1000, 0), &redis);
    let gw = spawn_gateway(c).await;
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    assert_eq!(gw.gateway.limiter().backend_state(), BackendState::Redis);

    redis.freeze();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
        slowest = slowest.max(started.elapsed());
    }
    // 50 ms Redis timeout plus the call itself; generous for a busy CI box.
    assert!(
        slowest < Duration::from_millis(400),
        "slowest call {slowest:?}"
    );
    assert_eq!(
        gw.gateway.limiter().backend_state(),
        BackendState::Fallback(FailMode::Local)
    );

    redis.thaw();
    let mut recovered = false;
    for _ in 0..60 {
        get(&gw.url("/open/product/get")).await;
        if gw.gateway.limiter().backend_state() == BackendState::Redis {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "back on Redis within 3 s of it answering again");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_fail_mode_refuses_while_redis_is_away() {
    let redis = RedisServer::start();
    let upstream = upstream_answering(envelope()).await;
    let mut c = with_redis(limited(&upstream.uri(), 1000.0, 1000, 0), &redis);
    c.rate_limit.as_mut().unwrap().fail_mode = FailMode::Closed;
    let gw = spawn_gateway(c).await;
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    drop(redis);
    get(&gw.url("/open/product/get"))
        .await
        .assert_gateway_envelope(429);
    assert_eq!(
        gw.gateway.limiter().backend_state(),
        BackendState::Fallback(FailMode::Closed)
    );
    gw.stop().await;
}

/// `Limiter::new` with a live Redis over the bounds of every key: a config
/// error naming a key, or a limiter whose calls Redis decides (no fallback:
/// the Lua script's arithmetic holds at the extremes) without a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_redis_decides_at_every_bound() {
    use pandagate::config::{
        MAX_BURST, MAX_DURATION_MS, MAX_PER_SECOND, MIN_FALLBACK_SHARE, MIN_PER_SECOND, Rate,
        RedisUrl,
    };
    use pandagate::quota::{Limiter, QuotaClient};
    let redis = RedisServer::start();
    let url = tls::with_default_trust(RedisUrl::parse(&redis.url(), "test").unwrap());
    let routes = [
        (
            "/slow".to_owned(),
            Rate::new(MIN_PER_SECOND, Some(MAX_BURST)).unwrap(),
        ),
        (
            "/fast".to_owned(),
            Rate::new(MAX_PER_SECOND, Some(1)).unwrap(),
        ),
    ];
    let mut cases: Vec<(RateLimitConfig, Option<&str>)> = Vec::new();
    for (per_second, burst) in [
        (MIN_PER_SECOND, Some(1)),
        (MIN_PER_SECOND, Some(MAX_BURST)),
        (MAX_PER_SECOND, Some(1)),
        (MAX_PER_SECOND, None),
    ] {
        for max_wait_ms in [0, MAX_DURATION_MS] {
            cases.push((
                RateLimitConfig {
                    max_wait_ms,
                    fallback_share: MIN_FALLBACK_SHARE,
                    redis_timeout_ms: 2_000,
                    ..RateLimitConfig::new(per_second, burst)
                },
                None,
            ));
        }
    }
    for (c, key) in [
        (
            RateLimitConfig::new(1e-20, None),
            "rate_limit.requests_per_second",
        ),
        (
            RateLimitConfig::new(f64::NAN, None),
            "rate_limit.requests_per_second",
        ),
        (
            RateLimitConfig::new(1e7, None),
            "rate_limit.requests_per_second",
        ),
        (
            RateLimitConfig::new(1.0, Some(MAX_BURST + 1)),
            "rate_limit.burst",
        ),
        (
            RateLimitConfig {
                fallback_share: 1e-9,
                ..RateLimitConfig::new(1.0, None)
            },
            "rate_limit.fallback_share",
        ),
        (
            RateLimitConfig {
                max_wait_ms: u64::MAX,
                ..RateLimitConfig::new(1.0, None)
            },
            "rate_limit.max_wait_ms",
        ),
    ] {
        cases.push((c, Some(key)));
    }
    for (mut c, refused) in cases {
        c.backend = RateLimitBackend::Redis;
        c.redis_key_prefix = format!("bounds-{}", pandagate::ids::request_id());
        let clients = QuotaClient::alone();
        let built = Limiter::new(Some(&c), Some(&url), &["ak".into()], &routes, &clients);
        match (built, refused) {
            (Err(e), Some(key)) => assert_eq!(e.key, key, "{c:?}: {e}"),
            (Err(e), None) => panic!("{c:?} refused: {e}"),
            (Ok(_), Some(key)) => panic!("{c:?} built with {key} out of bounds"),
            (Ok(limiter), None) => {
                assert!(limiter.acquire(0, None, 0).await.is_ok(), "{c:?}");
                for route in [Some(0), Some(1), None] {
                    // A granted wait may be long: the answer, not the wait, is the point.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(100),
                        limiter.acquire(0, route, 0),
                    )
                    .await;
                }
                assert_eq!(limiter.backend_state(), BackendState::Redis, "{c:?}");
            }
        }
    }
}

/// `[rate_limit]` on the TLS-only Redis of `redis`, trusting `ca_file`
/// besides the bundled roots; Redis decides within 2 s or `fail_mode` does.
fn over_rediss(mut c: Config, url: &str, ca_file: &std::path::Path, fail_mode: FailMode) -> Config {
    let r = c.rate_limit.as_mut().unwrap();
    r.backend = RateLimitBackend::Redis;
    r.redis_url = Some(url.to_owned());
    r.redis_timeout_ms = 2_000;
    r.fail_mode = fail_mode;
    c.tls.ca_file = Some(ca_file.to_owned());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_quota_over_rediss_trusting_the_ca_file() {
    let ca = tls::TestCa::new();
    let redis = redis_server::redis_tls(&ca, &ca.server("redis"), None);
    let upstream = upstream_answering(envelope()).await;
    // One call per 1000 s: the second, on the other replica, is refused
    // by Redis (a long Retry-After), not by the closed fail mode (1 s).
    let c = over_rediss(
        limited(&upstream.uri(), 0.001, 1, 0),
        &redis_server::rediss_url(&redis, None),
        &ca.ca_file,
        FailMode::Closed,
    );
    let a = spawn_gateway(c.clone()).await;
    let b = spawn_gateway(c).await;
    assert_eq!(get(&a.url("/open/product/get")).await.status, 200);
    let second = get(&b.url("/open/product/get")).await;
    second.assert_gateway_envelope(429);
    let retry_after: u64 = second.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        retry_after > 900,
        "Redis decided: Retry-After {retry_after}"
    );
    assert_eq!(b.gateway.limiter().backend_state(), BackendState::Redis);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_certificate_of_a_ca_not_trusted_is_refused_and_the_fail_mode_decides() {
    let ca = tls::TestCa::new();
    let other = tls::TestCa::named("a CA the gateway does not trust");
    let redis = redis_server::redis_tls(&ca, &ca.server("redis"), None);
    let upstream = upstream_answering(envelope()).await;
    let url = redis_server::rediss_url(&redis, None);
    for (fail_mode, status, state) in [
        (
            FailMode::Local,
            200,
            BackendState::Fallback(FailMode::Local),
        ),
        (
            FailMode::Closed,
            429,
            BackendState::Fallback(FailMode::Closed),
        ),
    ] {
        let c = over_rediss(
            limited(&upstream.uri(), 1000.0, 1000, 0),
            &url,
            &other.ca_file,
            fail_mode,
        );
        let gw = spawn_gateway(c).await;
        let answer = get(&gw.url("/open/product/get")).await;
        assert_eq!(answer.status, status, "{fail_mode:?}: {:?}", answer.body);
        assert_eq!(gw.gateway.limiter().backend_state(), state);
        gw.stop().await;
    }
}

/// The binary, with its rate limit and idempotency store on a Redis whose
/// certificate it does not trust: calls go on under the fail mode, keyed
/// calls are refused, and the log says TLS failed, never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_redis_certificate_is_logged_as_tls_never_with_the_password() {
    const PASSWORD: &str = "rediss-pw-never-logged-5";
    let ca = tls::TestCa::new();
    let other = tls::TestCa::named("a CA the gateway does not trust");
    let redis = redis_server::redis_tls(&ca, &ca.server("redis"), Some(PASSWORD));
    let upstream = upstream_answering(envelope()).await;
    let url = redis_server::rediss_url(&redis, Some(PASSWORD));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pandagate.toml");
    std::fs::write(
        &path,
        format!(
            "[tls]\nca_file = {:?}\n\n\
             [rate_limit]\nrequests_per_second = 1000\nbackend = \"redis\"\n\
             redis_url = {url:?}\nredis_timeout_ms = 2000\n\n\
             [idempotency]\nstore = \"redis\"\nredis_url = {url:?}\nredis_timeout_ms = 2000\n",
            other.ca_file.display().to_string()
        ),
    )
    .unwrap();
    let env = [
        ("PANDAPON_ACCESS_KEY", ACCESS_KEY),
        ("PANDAPON_ACCESS_SECRET", SECRET),
        ("PANDAGATE_UPSTREAM", &upstream.uri()),
    ];
    let mut running = launch(&["run", "--config", path.to_str().unwrap()], &env).await;
    let read = get(&format!("http://{}/open/product/get", running.gateway)).await;
    assert_eq!(
        read.status, 200,
        "the local fallback decides: {:?}",
        read.body
    );
    let keyed = send(
        http::Request::post(format!("http://{}/alibaba/order/create", running.gateway))
            .header("idempotency-key", "k-untrusted")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(
        keyed.assert_gateway_envelope(503)["error"],
        "idempotency_store_unavailable"
    );
    running.signal("-TERM");
    let _ = tokio::time::timeout(Duration::from_secs(20), running.child.wait()).await;
    let mut logs = String::new();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(5), running.stderr.next_line()).await
    {
        logs.push_str(&line);
        logs.push('\n');
    }
    assert!(
        !logs.contains(PASSWORD),
        "the password in the logs:\n{logs}"
    );
    for says in [
        "redis rate-limit backend unavailable",
        "idempotency store unavailable",
    ] {
        let line = logs
            .lines()
            .find(|l| l.contains(says))
            .unwrap_or_else(|| panic!("no {says:?} in\n{logs}"));
        assert!(
            line.contains("TLS handshake with Redis failed"),
            "{says}: the reason names TLS: {line}"
        );
    }
}
