//! One quota shared by weight among the services that call through the
//! gateway: `[[clients]] quota_share` on a shared gateway, `[rate_limit]
//! client` and `share` for sidecars sharing a key through Redis.

use crate::support;

use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::Request;
use pandagate::config::{ClientConfig, Config, RateLimitBackend, RateLimitConfig};
use support::gateway::TestGateway;
use support::redis_server::RedisServer;
use support::*;
use wiremock::ResponseTemplate;

fn envelope() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(provider_body("rid", 200, "ok"), "application/json")
}

fn quota(upstream: &str, per_second: f64, max_wait_ms: u64) -> Config {
    let mut c = config(upstream);
    c.circuit_breaker.enabled = false;
    c.rate_limit = Some(RateLimitConfig {
        max_wait_ms,
        redis_key_prefix: format!("shares-{}", pandagate::ids::request_id()),
        ..RateLimitConfig::new(per_second, Some(1))
    });
    c
}

/// A `[[clients]]` entry known by a token in a file of its own.
fn client(name: &str, share: f64) -> ClientConfig {
    let path = std::env::temp_dir().join(format!(
        "pandagate-share-{}-{name}",
        pandagate::ids::request_id()
    ));
    std::fs::write(&path, format!("token-of-{name}\n")).unwrap();
    ClientConfig {
        name: name.into(),
        token_file: Some(path),
        profiles: vec!["default".into()],
        quota_share: Some(share),
        ..ClientConfig::default()
    }
}

/// One call to `url` as `name`; its status and how long it took.
async fn call_as(url: &str, name: &str) -> (u16, Duration) {
    let started = Instant::now();
    let req = Request::get(url)
        .header("authorization", format!("Bearer token-of-{name}"))
        .body(Full::default())
        .unwrap();
    let answer = send(req).await;
    (answer.status.as_u16(), started.elapsed())
}

/// `workers` callers as `name`, each calling again at once, until `until`;
/// how many got 200.
fn flood(
    gw: &TestGateway,
    name: &'static str,
    workers: usize,
    until: Instant,
) -> Vec<tokio::task::JoinHandle<usize>> {
    (0..workers)
        .map(|_| {
            let url = gw.url("/open/product/get");
            tokio::spawn(async move {
                let mut ok = 0;
                while Instant::now() < until {
                    if call_as(&url, name).await.0 == 200 {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect()
}

fn granted(gw: &TestGateway, name: &str) -> u64 {
    gw.gateway
        .limiter()
        .per_client()
        .find(|(n, _, _)| *n == name)
        .map(|(_, granted, _)| granted)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_client_keeps_its_calls_while_a_batch_client_floods() {
    let upstream = upstream_answering(envelope()).await;
    let mut c = quota(&upstream.uri(), 20.0, 1_500);
    c.clients = vec![client("checkout", 3.0), client("batch", 1.0)];
    let gw = spawn_gateway(c).await;
    let run = Duration::from_secs(3);
    let started = Instant::now();
    let until = started + run;
    let batch = flood(&gw, "batch", 24, until);
    // Checkout: 13.3 calls a second, each on its own schedule: within its
    // share (15/s), and more than half the quota, which is what it would
    // get if the two clients' lines only raced for slots.
    let mut checkout = Vec::new();
    for i in 0..40u32 {
        let url = gw.url("/open/product/get");
        checkout.push(tokio::spawn(async move {
            tokio::time::sleep_until((started + Duration::from_millis(75) * i).into()).await;
            call_as(&url, "checkout").await
        }));
    }
    let mut answers = Vec::new();
    for t in checkout {
        answers.push(t.await.unwrap());
    }
    let mut batch_ok = 0;
    for t in batch {
        batch_ok += t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = answers.iter().filter(|(status, _)| *status == 200).count();
    assert!(ok >= 38, "checkout got {ok} of 40 answered: {answers:?}");
    let mut waits: Vec<Duration> = answers.iter().map(|(_, d)| *d).collect();
    waits.sort_unstable();
    let p95 = waits[waits.len() * 95 / 100];
    assert!(p95 < Duration::from_millis(400), "checkout p95 {p95:?}");
    let received = upstream.received_requests().await.unwrap().len();
    assert_eq!(
        received,
        ok + batch_ok,
        "every 200 is a call the provider saw"
    );
    assert!(
        received as f64 <= 20.0 * elapsed + 1.0,
        "{received} calls in {elapsed:.2} s"
    );
    // What checkout leaves goes to the batch: the quota is used.
    assert!(
        received as f64 >= 0.85 * 20.0 * run.as_secs_f64(),
        "{received} calls in {elapsed:.2} s: the quota was left unused"
    );
    assert_eq!(granted(&gw, "checkout"), ok as u64);
    let gateway = gw.gateway.clone();
    let text =
        pandagate::exporter::Exporter::new(std::sync::Arc::new(move || gateway.clone())).render();
    let line = format!("pandagate_quota_granted_total{{client=\"checkout\"}} {ok}");
    assert!(text.contains(&line), "{line} not in:\n{text}");
    let line = format!("pandagate_quota_granted_total{{client=\"batch\"}} {batch_ok}");
    assert!(text.contains(&line), "{line} not in:\n{text}");
    assert!(
        text.contains(r#"pandagate_quota_refused_total{client="default"} 0"#),
        "{text}"
    );
    let waited = format!("pandagate_quota_wait_seconds_count{{client=\"checkout\"}} {ok}");
    assert!(text.contains(&waited), "{waited} not in:\n{text}");
    let log = gw.access_log_of(received).await;
    assert!(log.iter().any(|line| line["client"] == "checkout"));
    assert!(log.iter().any(|line| line["client"] == "batch"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_of_two_services_share_a_key_through_redis_by_weight() {
    let redis = RedisServer::start();
    let upstream = upstream_answering(envelope()).await;
    let mut c = quota(&upstream.uri(), 40.0, 1_000);
    let limit = c.rate_limit.as_mut().unwrap();
    limit.backend = RateLimitBackend::Redis;
    limit.redis_url = Some(redis.url());
    limit.redis_timeout_ms = 2_000;
    let sidecar = |name: &str, share: f64| {
        let mut c = c.clone();
        let limit = c.rate_limit.as_mut().unwrap();
        limit.client = Some(name.into());
        limit.share = Some(share);
        c
    };
    let orders = spawn_gateway(sidecar("orders", 3.0)).await;
    let reports = spawn_gateway(sidecar("reports", 1.0)).await;
    let started = Instant::now();
    let until = started + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for gw in [&orders, &reports] {
        tasks.extend((0..8).map(|_| {
            let url = gw.url("/open/product/get");
            tokio::spawn(async move {
                let mut ok = 0;
                while Instant::now() < until {
                    if get(&url).await.status == 200 {
                        ok += 1;
                    }
                }
                ok
            })
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (o, r) = (granted(&orders, "orders"), granted(&reports, "reports"));
    let ratio = o as f64 / r as f64;
    assert!((2.4..=3.6).contains(&ratio), "orders {o}, reports {r}");
    let received = upstream.received_requests().await.unwrap().len() as u64;
    assert_eq!(received, o + r);
    // Each sidecar's log names its service.
    let line = &orders.access_log_of(1).await[0];
    assert_eq!(line["client"], "orders", "{line}");
    let ceiling = (40.0 * elapsed + 1.0).ceil() as u64;
    assert!(
        received <= ceiling,
        "{received} calls in {elapsed:.2} s, ceiling {ceiling}"
    );
    orders.stop().await;
    reports.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_fallback_keeps_the_shares_while_redis_is_away() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let upstream = upstream_answering(envelope()).await;
    let mut c = quota(&upstream.uri(), 40.0, 1_000);
    let limit = c.rate_limit.as_mut().unwrap();
    limit.backend = RateLimitBackend::Redis;
    limit.redis_url = Some(format!("redis://127.0.0.1:{port}"));
    limit.fail_mode = pandagate::config::FailMode::Local;
    limit.fallback_share = 1.0;
    c.clients = vec![client("orders", 3.0), client("reports", 1.0)];
    let gw = spawn_gateway(c).await;
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = flood(&gw, "orders", 8, until);
    tasks.extend(flood(&gw, "reports", 8, until));
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        matches!(
            gw.gateway.limiter().backend_state(),
            pandagate::quota::BackendState::Fallback(_)
        ),
        "Redis is away: the local fallback decides"
    );
    let (o, r) = (granted(&gw, "orders"), granted(&gw, "reports"));
    let ratio = o as f64 / r as f64;
    assert!((2.4..=3.6).contains(&ratio), "orders {o}, reports {r}");
    gw.stop().await;
}
