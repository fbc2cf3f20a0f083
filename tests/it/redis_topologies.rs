//! Redis as teams run it: the shared quota, idempotency keys and the read
//! cache on a real 3-master Redis Cluster, and on a master found through a
//! sentinel, across a failover during traffic. Every server is a real
//! `redis-server` on loopback, started and stopped by the test.

use crate::support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use pandagate::config::{
    CacheBackend, Config, IdempotencyBackend, IdempotencyConfig, RateLimitBackend, RateLimitConfig,
    RedisMode, RouteConfig,
};
use pandagate::quota::BackendState;
use support::gateway::{TestGateway, hammer};
use support::redis_server::{RedisCluster, RedisSentinel};
use support::*;
use wiremock::ResponseTemplate;

const ORDER: &str = "/alibaba/order/create";
const ITEM: &str = "/open/product/get?itemId=7";

fn envelope() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(provider_body("rid", 200, "ok"), "application/json")
}

/// Quota, keys and cache, all on the Redis `mode` reaches through `urls`.
fn on_redis(upstream: &str, mode: RedisMode, urls: &[String], master: Option<&str>) -> Config {
    let mut c = config(upstream);
    c.circuit_breaker.enabled = false;
    c.retry.backoff_base_ms = 1;
    c.retry.backoff_cap_ms = 1;
    let prefix = format!("t-{}", pandagate::ids::request_id());
    c.rate_limit = Some(RateLimitConfig {
        backend: RateLimitBackend::Redis,
        redis_mode: mode,
        redis_urls: urls.to_vec(),
        redis_sentinel_master: master.map(str::to_owned),
        redis_timeout_ms: 2_000,
        // Callers wait for a slot rather than be refused: the keyed calls
        // after the flood are answered as the quota refills.
        max_wait_ms: 1_000,
        redis_key_prefix: prefix.clone(),
        ..RateLimitConfig::new(20.0, Some(5))
    });
    c.idempotency = Some(IdempotencyConfig {
        backend: IdempotencyBackend::Redis,
        redis_mode: mode,
        redis_urls: urls.to_vec(),
        redis_sentinel_master: master.map(str::to_owned),
        redis_key_prefix: prefix.clone(),
        ..IdempotencyConfig::default()
    });
    c.cache.backend = CacheBackend::Redis;
    c.cache.redis_mode = mode;
    c.cache.redis_urls = urls.to_vec();
    c.cache.redis_sentinel_master = master.map(str::to_owned);
    c.cache.redis_key_prefix = prefix;
    c.routes = vec![
        RouteConfig {
            prefix: Some("/open/product/".into()),
            cache_ttl_ms: Some(60_000),
            ..RouteConfig::default()
        },
        // A route bucket too: its key goes in the same script as the
        // quota's, so it must share their hash slot.
        RouteConfig {
            path: Some("/alibaba/order/list".into()),
            rate_limit_per_second: Some(18.0),
            rate_limit_burst: Some(5),
            ..RouteConfig::default()
        },
    ];
    c
}

fn keyed(gw: &TestGateway, key: &str) -> Request<Full<Bytes>> {
    Request::post(gw.url(ORDER))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"outOrderId":"{key}"}}"#
        ))))
        .unwrap()
}

/// A master, its replica and a sentinel; a provider; a config using the
/// master through the sentinel.
async fn behind_a_sentinel() -> (RedisSentinel, wiremock::MockServer, Config) {
    let redis = RedisSentinel::start();
    let upstream = upstream_answering(envelope()).await;
    let c = on_redis(
        &upstream.uri(),
        RedisMode::Sentinel,
        &[redis.sentinel_url()],
        Some(RedisSentinel::MASTER_NAME),
    );
    (redis, upstream, c)
}

/// Two replicas flooding for 2 s get no more than the quota (20/s, burst
/// 5) and most of it, decided by Redis, not by a local fallback.
async fn quota_shared_by(a: &TestGateway, b: &TestGateway) {
    let started = Instant::now();
    let ok = hammer(&[a, b], 3, Duration::from_secs(2), "/alibaba/order/list").await;
    let elapsed = started.elapsed().as_secs_f64();
    let ceiling = (20.0 * elapsed + 5.0).ceil() as usize;
    assert!(
        ok <= ceiling,
        "{ok} calls in {elapsed:.2} s, ceiling {ceiling}"
    );
    assert!(ok >= 30, "the quota was let through: {ok}");
    for gw in [a, b] {
        assert_eq!(
            gw.gateway.limiter().backend_state(),
            BackendState::Redis,
            "decided by Redis, not by a local fallback"
        );
    }
}

/// How many times the provider saw each idempotency key's order.
async fn orders_seen(upstream: &wiremock::MockServer) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for r in upstream.received_requests().await.unwrap() {
        if r.url.path() == ORDER {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            *seen
                .entry(body["outOrderId"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_master_cluster_holds_the_quota_the_keys_and_the_cache() {
    let cluster = RedisCluster::start(3);
    let upstream = upstream_answering(envelope()).await;
    let c = on_redis(&upstream.uri(), RedisMode::Cluster, &cluster.urls(), None);
    let a = spawn_gateway(c.clone()).await;
    let b = spawn_gateway(c).await;

    // The quota, shared through the cluster by two replicas.
    quota_shared_by(&a, &b).await;

    // Keys of many slots: each order sent once, replayed on the other replica.
    for n in 0..12 {
        let key = format!("order-{n}");
        let first = send(keyed(&a, &key)).await;
        assert_eq!(first.status, 200, "{key}");
        let again = send(keyed(&b, &key)).await;
        assert_eq!(again.status, 200);
        assert_eq!(
            again
                .headers
                .get("idempotent-replayed")
                .map(|v| v.to_str().unwrap()),
            Some("true"),
            "{key} replayed from the cluster"
        );
    }
    let seen = orders_seen(&upstream).await;
    assert_eq!(seen.len(), 12);
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");

    // The cache: b finds a's entry; purged on every master.
    assert_eq!(get(&a.url(ITEM)).await.status, 200);
    let mut found = false;
    for _ in 0..100 {
        let on_b = get(&b.url(ITEM)).await;
        if on_b
            .headers
            .get("x-pandagate-cache")
            .is_some_and(|v| v == "hit")
        {
            found = true;
            break;
        }
        b.gateway.cache().purge("/open/product/");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(found, "b answered from a's entry in the cluster");
    for n in 0..20 {
        assert_eq!(
            get(&a.url(&format!("/open/product/get?itemId=p{n}")))
                .await
                .status,
            200
        );
    }
    support::redis_server::wait_until("entries written", Duration::from_secs(5), || {
        cluster.keys_per_node().iter().filter(|n| **n > 0).count() == 3
    });
    let purged = a.gateway.cache().purge_everywhere("/open/product/").await;
    assert!(purged.complete(), "{purged:?}");
    assert!(
        purged.shared.map(|s| s.removed).unwrap_or(0) >= 20,
        "{purged:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_during_traffic_keeps_the_quota_and_sends_no_order_twice() {
    let (redis, upstream, c) = behind_a_sentinel().await;
    let gw = spawn_gateway(c).await;
    assert_eq!(redis.master_port(), redis.master.port);

    // Keyed orders and quota traffic, while the sentinel moves the master.
    let traffic = {
        let url = gw.url("/alibaba/order/list");
        tokio::spawn(async move {
            let started = Instant::now();
            let mut ok = 0;
            while started.elapsed() < Duration::from_secs(6) {
                if get(&url).await.status == 200 {
                    ok += 1;
                }
            }
            (ok, started.elapsed().as_secs_f64())
        })
    };
    let mut statuses = Vec::new();
    for n in 0..10 {
        statuses.push(
            send(keyed(&gw, &format!("before-{n}")))
                .await
                .status
                .as_u16(),
        );
    }
    let failing_over = tokio::task::spawn_blocking({
        let (sentinel, replica) = (redis.sentinel.port, redis.replica.port);
        move || support::redis_server::fail_over(sentinel, replica)
    });
    // Every key sent twice: once now, during the failover, once after it.
    for n in 0..30 {
        let key = format!("during-{n}");
        statuses.push(send(keyed(&gw, &key)).await.status.as_u16());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    failing_over.await.unwrap();
    // The old master now follows the new one: writes there are refused, so
    // a gateway that stayed on it could take no key.
    let old = redis.master.port.to_string();
    support::redis_server::wait_until(
        "the old master is a replica",
        Duration::from_secs(30),
        || support::redis_server::redis_cli(&["-p", &old, "role"]).starts_with("slave"),
    );
    assert_eq!(redis.master_port(), redis.replica.port);
    // After the switch, each key again: a replay, or (for a key refused
    // during the failover) a first send; never a second one.
    for n in 0..30 {
        let key = format!("during-{n}");
        statuses.push(send(keyed(&gw, &key)).await.status.as_u16());
    }
    // A new key is taken on the new master once its replica (the old
    // master) has caught up; before, a key that reached no replica is
    // refused (503) and taken back, so the caller's retry of it is not
    // refused as in progress.
    for n in 0..5 {
        let key = format!("after-{n}");
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let fresh = send(keyed(&gw, &key)).await.status.as_u16();
            if fresh == 200 {
                break;
            }
            assert_eq!(fresh, 503, "{key}: refused as unavailable, nothing sent");
            assert!(
                Instant::now() < until,
                "{key} not taken on the new master within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (ok, elapsed) = traffic.await.unwrap();
    // The limiter, in its fallback while the master moved, asks Redis again
    // and is decided by the new master.
    let until = Instant::now() + Duration::from_secs(10);
    while gw.gateway.limiter().backend_state() != BackendState::Redis {
        assert!(
            Instant::now() < until,
            "the quota is not decided on the new master within 10 s: {:?}",
            gw.gateway.limiter().backend_state()
        );
        let _ = get(&gw.url("/alibaba/order/list")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let seen = orders_seen(&upstream).await;
    assert!(
        seen.values().all(|n| *n == 1),
        "an order sent twice: {seen:?}"
    );
    let ceiling = (20.0 * elapsed + 5.0 + 10.0 + 60.0 + 5.0).ceil() as usize;
    let sent = upstream.received_requests().await.unwrap().len();
    assert!(
        sent <= ceiling,
        "{sent} calls in {elapsed:.2} s, ceiling {ceiling}"
    );
    assert!(ok > 0);
    assert!(
        statuses.iter().all(|s| [200, 409, 502, 503].contains(s)),
        "{statuses:?}"
    );
    gw.stop().await;
}

/// With a sentinel, a key's write must reach a replica before its order is
/// sent: with the replica frozen the key is refused (503) and nothing is
/// sent, and taken back, so the same key goes through once the replica
/// answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_reaches_no_replica_is_refused_and_nothing_is_sent() {
    let (redis, upstream, c) = behind_a_sentinel().await;
    assert_eq!(c.idempotency.as_ref().unwrap().wait_replicas(), 1);
    let gw = spawn_gateway(c).await;
    assert_eq!(send(keyed(&gw, "warm-up")).await.status, 200);

    redis.replica.freeze();
    let refused = send(keyed(&gw, "frozen-1")).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert_eq!(
        orders_seen(&upstream).await.get("frozen-1"),
        None,
        "nothing sent"
    );
    redis.replica.thaw();

    let again = send(keyed(&gw, "frozen-1")).await;
    assert_eq!(
        again.status, 200,
        "the key was taken back: {:?}",
        again.body
    );
    assert_eq!(orders_seen(&upstream).await.get("frozen-1"), Some(&1));
    gw.stop().await;
}

/// A cluster on TLS ports only (its bus too), with a password, reached over
/// `rediss://` trusting `tls.ca_file` as one server is: the quota decided
/// there, shared by two replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_is_reached_as_one_server_over_tls_is() {
    let ca = support::tls::TestCa::new();
    // Its nodes connect to each other over TLS as clients too.
    let cluster = RedisCluster::start_tls(3, &ca, &ca.peer("cluster"));
    assert!(cluster.urls().iter().all(|u| u.starts_with("rediss://")));
    let upstream = upstream_answering(envelope()).await;
    let mut c = on_redis(&upstream.uri(), RedisMode::Cluster, &cluster.urls(), None);
    c.tls.ca_file = Some(ca.ca_file.clone());
    c.idempotency = None;
    c.cache.backend = CacheBackend::Local;
    c.cache.redis_mode = RedisMode::Standalone;
    c.cache.redis_urls = Vec::new();
    let a = spawn_gateway(c.clone()).await;
    let b = spawn_gateway(c).await;
    quota_shared_by(&a, &b).await;
    a.stop().await;
    b.stop().await;
}

/// Sentinels that want no password, in front of a master that wants one
/// (a common chart default): with `redis_sentinel_auth = false` they are
/// asked without it and the master with it; with the default they refuse
/// the `AUTH`, and keys fail closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_without_a_password_are_asked_without_one_when_told() {
    let redis = RedisSentinel::start_open_sentinel();
    let upstream = upstream_answering(envelope()).await;
    let urls = [redis.sentinel_url()];
    let master = Some(RedisSentinel::MASTER_NAME);

    let same = spawn_gateway(on_redis(
        &upstream.uri(),
        RedisMode::Sentinel,
        &urls,
        master,
    ))
    .await;
    assert_eq!(
        send(keyed(&same, "open-0")).await.status,
        503,
        "the sentinel refuses the AUTH: the key fails closed"
    );
    assert_eq!(orders_seen(&upstream).await.get("open-0"), None);
    same.stop().await;

    let mut c = on_redis(&upstream.uri(), RedisMode::Sentinel, &urls, master);
    c.rate_limit.as_mut().unwrap().redis_sentinel_auth = Some(false);
    c.idempotency.as_mut().unwrap().redis_sentinel_auth = Some(false);
    c.cache.redis_sentinel_auth = Some(false);
    let told = spawn_gateway(c).await;
    assert_eq!(send(keyed(&told, "open-1")).await.status, 200);
    assert_eq!(orders_seen(&upstream).await.get("open-1"), Some(&1));
    assert_eq!(get(&told.url("/alibaba/order/list")).await.status, 200);
    assert_eq!(told.gateway.limiter().backend_state(), BackendState::Redis);
    told.stop().await;
}

/// In a Cluster with replicas, `redis_wait_replicas = 1` makes each key's
/// write wait for its master's replica (`WAIT` sent to the node that owns
/// the key): keys of many slots go through once each while the replicas
/// answer; with every replica frozen a new key is refused and nothing sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_with_replicas_a_key_waits_for_its_masters_replica() {
    let cluster = RedisCluster::start_with_replicas(3);
    let upstream = upstream_answering(envelope()).await;
    let mut c = on_redis(&upstream.uri(), RedisMode::Cluster, &cluster.urls(), None);
    c.idempotency.as_mut().unwrap().redis_wait_replicas = Some(1);
    let gw = spawn_gateway(c).await;
    for n in 0..12 {
        let key = format!("replicated-{n}");
        assert_eq!(send(keyed(&gw, &key)).await.status, 200, "{key}");
    }
    let seen = orders_seen(&upstream).await;
    assert_eq!(seen.len(), 12);
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");

    cluster.freeze_replicas();
    let refused = send(keyed(&gw, "unreplicated")).await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert_eq!(orders_seen(&upstream).await.get("unreplicated"), None);
    gw.stop().await;
}
