//! The read cache: a cached route's good answers are kept for their TTL,
//! identical calls at the same moment ask the provider once, and a stale
//! answer covers a provider that cannot answer.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::Full;
use pandagate::config::{Class, Config, RouteConfig};
use support::client::Answer;
use support::gateway::TestGateway;
use support::provider::upstream_failing_first;
use support::redis_server::RedisServer;
use support::*;
use wiremock::ResponseTemplate;

const ITEM: &str = "/open/product/get?itemId=7";

fn cached(upstream: &str, ttl_ms: u64, stale_ms: u64) -> Config {
    let mut c = config(upstream);
    c.retry.backoff_base_ms = 1;
    c.retry.backoff_cap_ms = 1;
    c.routes = vec![RouteConfig {
        prefix: Some("/open/product/".into()),
        cache_ttl_ms: Some(ttl_ms),
        cache_stale_ms: Some(stale_ms),
        ..RouteConfig::default()
    }];
    c
}

fn good(id: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(provider_body(id, 200, "ok"), "application/json")
}

async fn sent(upstream: &wiremock::MockServer) -> usize {
    upstream.received_requests().await.unwrap().len()
}

fn cache_header(a: &Answer) -> Option<String> {
    a.headers
        .get("x-pandagate-cache")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_good_answer_is_kept_for_its_ttl_and_replayed_as_it_was() {
    let upstream = upstream_answering(good("prov-1")).await;
    let gw = spawn_gateway(cached(&upstream.uri(), 30_000, 0)).await;
    let first = get(&gw.url(ITEM)).await;
    assert_eq!(first.status, 200);
    assert_eq!(cache_header(&first).as_deref(), Some("miss"));
    let again = get(&gw.url(ITEM)).await;
    assert_eq!(cache_header(&again).as_deref(), Some("hit"));
    assert_eq!(again.body, first.body);
    assert_eq!(again.headers["age"], "0");
    assert_eq!(again.headers["content-type"], "application/json");
    assert_eq!(sent(&upstream).await, 1, "the quota spent once");
    let log = gw.access_log_of(2).await;
    assert_eq!(log[0]["cache"], "miss");
    assert_eq!(log[1]["cache"], "hit");
    assert_eq!(log[1]["attempts"], 0);
    assert_eq!(log[1]["request_id"], "prov-1");

    let gateway = gw.gateway.clone();
    let text = pandagate::exporter::Exporter::new(Arc::new(move || gateway.clone())).render();
    for line in [
        r#"pandagate_cache_requests_total{result="miss"} 1"#,
        r#"pandagate_cache_requests_total{result="hit"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(!text.contains("pandagate_cache_bytes 0\n"), "{text}");
    gw.stop().await;
}

#[tokio::test]
async fn no_caller_can_shape_the_answer_another_caller_gets() {
    let upstream = upstream_answering(good("prov-2")).await;
    let gw = spawn_gateway(cached(&upstream.uri(), 30_000, 0)).await;
    // An attacker's call: headers the provider could answer differently to.
    let req = Request::get(gw.url(ITEM))
        .header("accept-language", "xx-EVIL")
        .header("cookie", "sid=attacker")
        .header("x-forwarded-host", "evil.example")
        .header("content-type", "text/evil")
        .body(Full::default())
        .unwrap();
    assert_eq!(cache_header(&send(req).await).as_deref(), Some("miss"));
    let seen = upstream.received_requests().await.unwrap();
    let headers = &seen[0].headers;
    assert_eq!(headers["accept-language"], "xx-EVIL", "keyed, so forwarded");
    assert_eq!(headers["content-type"], "text/evil");
    for name in ["cookie", "x-forwarded-host"] {
        assert!(headers.get(name).is_none(), "{name} is not forwarded");
    }
    // Another caller never gets that answer...
    assert_eq!(
        cache_header(&get(&gw.url(ITEM)).await).as_deref(),
        Some("miss")
    );
    assert_eq!(sent(&upstream).await, 2);
    // ...and a header that is not forwarded cannot have shaped it.
    for (name, value) in [("cookie", "sid=other"), ("x-forwarded-host", "x")] {
        let req = Request::get(gw.url(ITEM))
            .header(name, value)
            .body(Full::default())
            .unwrap();
        assert_eq!(cache_header(&send(req).await).as_deref(), Some("hit"));
    }
    for (name, value) in [
        ("accept-language", "fr"),
        ("accept", "text/html"),
        ("content-encoding", "gzip"),
    ] {
        let req = Request::get(gw.url(ITEM))
            .header(name, value)
            .body(Full::default())
            .unwrap();
        assert_eq!(
            cache_header(&send(req).await).as_deref(),
            Some("miss"),
            "{name}"
        );
    }
    // Another query, profile or user-id: another entry.
    assert_eq!(
        cache_header(&get(&gw.url("/open/product/get?itemId=8")).await).as_deref(),
        Some("miss")
    );
    for (profile, user) in [("ops", "11"), ("ops", "22")] {
        let req = Request::get(gw.url(ITEM))
            .header("x-pandagate-profile", profile)
            .header("user-id", user)
            .body(Full::default())
            .unwrap();
        assert_eq!(cache_header(&send(req).await).as_deref(), Some("miss"));
    }
    assert_eq!(sent(&upstream).await, 8);
    gw.stop().await;
}

#[tokio::test]
async fn answers_meant_for_one_caller_are_never_kept() {
    for (name, value) in [
        ("set-cookie", "sid=abc; HttpOnly"),
        ("cache-control", "private, max-age=60"),
        ("cache-control", "no-store"),
        ("vary", "*"),
        ("vary", "timestamp"),
    ] {
        let upstream = upstream_answering(good("prov-own").insert_header(name, value)).await;
        let gw = spawn_gateway(cached(&upstream.uri(), 30_000, 30_000)).await;
        for _ in 0..2 {
            let a = get(&gw.url(ITEM)).await;
            assert_eq!(a.status, 200);
            assert_eq!(cache_header(&a).as_deref(), Some("miss"), "{name}: {value}");
        }
        assert_eq!(sent(&upstream).await, 2, "{name}: {value}");
        gw.stop().await;
    }
    // Varying on a header in the key is fine.
    let upstream =
        upstream_answering(good("prov-vary").insert_header("vary", "Accept-Language")).await;
    let gw = spawn_gateway(cached(&upstream.uri(), 30_000, 0)).await;
    get(&gw.url(ITEM)).await;
    assert_eq!(
        cache_header(&get(&gw.url(ITEM)).await).as_deref(),
        Some("hit")
    );
    gw.stop().await;
}

#[tokio::test]
async fn only_good_answers_are_kept_and_callers_may_refresh_or_bypass() {
    let upstream = upstream_failing_first(
        1,
        ResponseTemplate::new(200)
            .set_body_raw(provider_body("busy", 500, "busy"), "application/json"),
        good("prov-3"),
    )
    .await;
    let gw = spawn_gateway(cached(&upstream.uri(), 30_000, 0)).await;
    // A 200 whose envelope code is not 200 is not kept.
    assert_eq!(get(&gw.url(ITEM)).await.json()["code"], 500);
    assert_eq!(
        cache_header(&get(&gw.url(ITEM)).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        cache_header(&get(&gw.url(ITEM)).await).as_deref(),
        Some("hit")
    );
    assert_eq!(sent(&upstream).await, 2);

    let with = |value: &'static str| {
        Request::get(gw.url(ITEM))
            .header("cache-control", value)
            .body(Full::default())
            .unwrap()
    };
    let refreshed = send(with("no-cache")).await;
    assert_eq!(cache_header(&refreshed).as_deref(), Some("miss"));
    let bypassed = send(with("no-store")).await;
    assert_eq!(cache_header(&bypassed), None);
    assert_eq!(sent(&upstream).await, 4);
    let log = gw.access_log_of(5).await;
    assert_eq!(log[4]["cache"], "bypass");
    gw.stop().await;
}

#[tokio::test]
async fn identical_calls_at_the_same_moment_ask_the_provider_once() {
    let upstream = upstream_answering(good("prov-4").set_delay(Duration::from_millis(300))).await;
    let gw = spawn_gateway(cached(&upstream.uri(), 30_000, 0)).await;
    let url = gw.url(ITEM);
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    let mut seen = Vec::new();
    for call in calls {
        let a = call.await.unwrap();
        assert_eq!(a.status, 200);
        seen.push(cache_header(&a).unwrap());
    }
    seen.sort();
    assert_eq!(sent(&upstream).await, 1, "{seen:?}");
    assert_eq!(seen.iter().filter(|s| *s == "miss").count(), 1, "{seen:?}");
    assert_eq!(
        seen.iter().filter(|s| *s == "coalesced").count(),
        9,
        "{seen:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn when_the_asking_callers_leave_the_answer_still_comes_and_is_kept() {
    let upstream =
        upstream_answering(good("prov-left").set_delay(Duration::from_millis(600))).await;
    let gw = spawn_gateway(cached(&upstream.uri(), 30_000, 0)).await;
    let url = gw.url(ITEM);
    // The first caller gives up long before the provider answers.
    let gave_up = tokio::time::timeout(Duration::from_millis(100), get(&url)).await;
    assert!(gave_up.is_err(), "the first caller left");
    // Others asking meanwhile wait for that call's answer, not their own.
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for call in calls {
        let a = call.await.unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(cache_header(&a).as_deref(), Some("coalesced"));
    }
    assert_eq!(
        cache_header(&get(&url).await).as_deref(),
        Some("hit"),
        "the answer was kept"
    );
    assert_eq!(sent(&upstream).await, 1, "the quota spent once");
    gw.stop().await;
}

#[tokio::test]
async fn a_stale_answer_covers_a_provider_that_cannot_answer() {
    let upstream = upstream_failing_first(1, good("prov-5"), ResponseTemplate::new(503)).await;
    let gw = spawn_gateway(cached(&upstream.uri(), 100, 60_000)).await;
    let first = get(&gw.url(ITEM)).await;
    assert_eq!(first.status, 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stale = get(&gw.url(ITEM)).await;
    assert_eq!(stale.status, 200);
    assert_eq!(cache_header(&stale).as_deref(), Some("stale"));
    assert_eq!(stale.body, first.body);
    assert!(sent(&upstream).await >= 2, "the provider was asked first");
    let log = gw.access_log_of(2).await;
    assert_eq!(log[1]["cache"], "stale");
    gw.stop().await;

    // Past the stale window too: the failure is the answer.
    let upstream = upstream_failing_first(1, good("prov-6"), ResponseTemplate::new(503)).await;
    let gw = spawn_gateway(cached(&upstream.uri(), 50, 50)).await;
    assert_eq!(get(&gw.url(ITEM)).await.status, 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(get(&gw.url(ITEM)).await.status, 503);
    gw.stop().await;
}

#[tokio::test]
async fn writes_are_never_cached_and_purges_drop_entries() {
    let upstream = upstream_answering(good("prov-7")).await;
    let mut c = cached(&upstream.uri(), 30_000, 0);
    // A prefix that also covers a catalogued write.
    c.routes.push(RouteConfig {
        prefix: Some("/open/order/".into()),
        cache_ttl_ms: Some(30_000),
        ..RouteConfig::default()
    });
    let gw = spawn_gateway(c).await;
    for _ in 0..2 {
        let a = get(&gw.url("/open/order/refund/cancel/R1")).await;
        assert_eq!(cache_header(&a), None);
    }
    assert_eq!(sent(&upstream).await, 2);

    assert_eq!(get(&gw.url(ITEM)).await.status, 200);
    assert_eq!(gw.gateway.cache().purge("/open/product/"), 1);
    assert_eq!(
        cache_header(&get(&gw.url(ITEM)).await).as_deref(),
        Some("miss")
    );
    gw.stop().await;

    // A write route may not set a TTL at all.
    let mut c = config(&upstream.uri());
    c.routes = vec![RouteConfig {
        path: Some("/alibaba/order/create".into()),
        class: Some(Class::Write),
        cache_ttl_ms: Some(1_000),
        ..RouteConfig::default()
    }];
    let e = c.validate().unwrap_err();
    assert!(e.key.ends_with("cache_ttl_ms"), "{e}");
}

/// A prefix entry of reads that also covers order creates, as an operator
/// might write it: the creates stay writes in every spelling — never
/// answered from the cache, never retried, their keys honoured.
#[tokio::test]
async fn a_prefix_entry_of_reads_never_makes_an_order_create_a_cached_retried_read() {
    let upstream = upstream_answering(good("prov-order")).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&upstream.uri());
    c.retry.backoff_base_ms = 1;
    c.retry.backoff_cap_ms = 1;
    c.routes = vec![RouteConfig {
        prefix: Some("/alibaba/order/".into()),
        class: Some(Class::Read),
        cache_ttl_ms: Some(30_000),
        cache_stale_ms: Some(30_000),
        max_attempts: Some(3),
        ..RouteConfig::default()
    }];
    c.idempotency = Some(pandagate::config::IdempotencyConfig {
        path: dir.path().to_owned(),
        ..Default::default()
    });
    let gw = spawn_gateway(c).await;
    let post = |gw: &TestGateway, path: &str, key: Option<&str>| {
        let mut req = Request::post(gw.url(path)).header("content-type", "application/json");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.body(Full::new(bytes::Bytes::from_static(br#"{"offerId":1}"#)))
            .unwrap()
    };
    let mut expected = 0;
    for path in [
        "/alibaba/order/create",
        "/v2/alibaba/order/create",
        "/alibaba/order/create.json",
        "/alibaba/order/CREATE",
    ] {
        for _ in 0..2 {
            let a = send(post(&gw, path, None)).await;
            assert_eq!(a.status, 200, "{path}");
            assert_eq!(cache_header(&a), None, "{path}: never a cache answer");
            expected += 1;
        }
        assert_eq!(sent(&upstream).await, expected, "{path}: each sent");
    }
    let log = gw.access_log_of(8).await;
    assert!(log.iter().all(|l| l["class"] == "write"), "{log:?}");

    // The key is honoured: the second call is the first one's answer.
    let first = send(post(&gw, "/alibaba/order/create", Some("order-77"))).await;
    let again = send(post(&gw, "/alibaba/order/create", Some("order-77"))).await;
    assert_eq!(first.status, 200);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(sent(&upstream).await, expected + 1);
    gw.stop().await;

    // A 503 on a create is the answer: never sent a second time.
    let failing = upstream_answering(ResponseTemplate::new(503)).await;
    let mut c = config(&failing.uri());
    c.retry.backoff_base_ms = 1;
    c.retry.backoff_cap_ms = 1;
    c.routes = vec![RouteConfig {
        prefix: Some("/alibaba/".into()),
        class: Some(Class::Read),
        max_attempts: Some(3),
        ..RouteConfig::default()
    }];
    let gw = spawn_gateway(c).await;
    assert_eq!(
        send(post(&gw, "/alibaba/order/create", None)).await.status,
        503
    );
    assert_eq!(sent(&failing).await, 1);
    assert_eq!(get(&gw.url("/alibaba/order/detail")).await.status, 503);
    assert_eq!(sent(&failing).await, 4, "the read is retried");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_purge_entries_by_prefix_on_the_control_listener() {
    let upstream = upstream_answering(good("prov-8")).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pandagate.toml");
    std::fs::write(
        &config,
        "[[routes]]\nprefix = \"/open/product/\"\ncache_ttl_ms = 30000\n",
    )
    .unwrap();
    let uri = upstream.uri();
    let gw = launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", ACCESS_KEY),
            ("PANDAPON_ACCESS_SECRET", SECRET),
            ("PANDAGATE_UPSTREAM", uri.as_str()),
        ],
    )
    .await;
    let url = format!("http://{}{ITEM}", gw.gateway);
    assert_eq!(cache_header(&get(&url).await).as_deref(), Some("miss"));
    assert_eq!(cache_header(&get(&url).await).as_deref(), Some("hit"));
    let purge = |query: &str| {
        Request::post(format!("http://{}/cache/purge{query}", gw.control))
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(purge("")).await.status, 400);
    let other = send(purge("?prefix=/open/order/")).await;
    assert_eq!(other.json()["purged"], 0);
    let purged = send(purge("?prefix=/open/product/")).await;
    assert_eq!(purged.status, 200);
    let said = purged.json();
    assert_eq!(said["purged"], 1);
    assert_eq!(said["memory"], 1);
    assert_eq!(said["redis"], serde_json::Value::Null, "no Redis backend");
    assert_eq!(said["complete"], true);
    assert_eq!(cache_header(&get(&url).await).as_deref(), Some("miss"));
    assert_eq!(sent(&upstream).await, 2);
}

fn shared(upstream: &str, redis: &str) -> Config {
    let mut c = cached(upstream, 30_000, 0);
    c.cache.backend = pandagate::config::CacheBackend::Redis;
    c.cache.redis_url = Some(redis.to_owned());
    c
}

#[tokio::test]
async fn replicas_sharing_redis_share_answers_and_purges() {
    let redis = RedisServer::start();
    let upstream = upstream_answering(good("prov-9")).await;
    let a = spawn_gateway(shared(&upstream.uri(), &redis.url())).await;
    let b = spawn_gateway(shared(&upstream.uri(), &redis.url())).await;
    assert_eq!(
        cache_header(&get(&a.url(ITEM)).await).as_deref(),
        Some("miss")
    );
    // The write to Redis is in the background: wait (bounded) until Redis
    // holds it, then b's first call must find it there.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..100 {
        let n: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        if n >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let on_b = get(&b.url(ITEM)).await;
    assert_eq!(
        cache_header(&on_b).as_deref(),
        Some("hit"),
        "from a's entry in Redis"
    );
    assert_eq!(on_b.json()["requestId"], "prov-9");
    assert_eq!(
        sent(&upstream).await,
        1,
        "the quota spent once for both replicas"
    );

    // A purge on one replica reaches Redis: the other finds nothing there.
    let purged = a.gateway.cache().purge_everywhere("/open/product/").await;
    assert!(purged.complete(), "{purged:?}");
    assert_eq!(purged.shared.map(|s| s.removed), Some(1), "{purged:?}");
    b.gateway.cache().purge("/open/product/");
    assert_eq!(
        cache_header(&get(&b.url(ITEM)).await).as_deref(),
        Some("miss")
    );
    a.stop().await;
    b.stop().await;
}

/// Redis holding many other keys: the purge looks at all of them, and one
/// that runs out of time says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_reaches_every_entry_in_redis_or_says_it_did_not() {
    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Filling takes 50 000 SETs per EVAL: past the client's default 500 ms
    // answer timeout on a loaded machine, though Redis is only busy.
    conn.set_response_timeout(Duration::from_secs(30));
    const OTHERS: u64 = 1_200_000;
    const BATCH: u64 = 50_000;
    let mut filled = 0;
    for from in (0..OTHERS).step_by(BATCH as usize) {
        filled = redis::cmd("EVAL")
            .arg(
                "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do \
                 redis.call('SET', 'other:' .. i, 'x') end return redis.call('DBSIZE')",
            )
            .arg(0)
            .arg(from)
            .arg(from + BATCH - 1)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(filled, OTHERS);
    let upstream = upstream_answering(good("prov-p")).await;
    let gw = spawn_gateway(shared(&upstream.uri(), &redis.url())).await;
    for id in 0..20 {
        let url = gw.url(&format!("/open/product/get?itemId={id}"));
        assert_eq!(cache_header(&get(&url).await).as_deref(), Some("miss"));
    }
    let mut size = 0;
    for _ in 0..200 {
        size = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        if size == OTHERS + 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(size, OTHERS + 20, "the entries reached Redis");

    // Out of time: not complete, and it says so.
    let mut hurried = shared(&upstream.uri(), &redis.url());
    hurried.cache.purge_timeout_ms = 1;
    let hurried = spawn_gateway(hurried).await;
    let partial = hurried
        .gateway
        .cache()
        .purge_everywhere("/open/product/")
        .await;
    assert!(!partial.complete(), "{partial:?}");
    hurried.stop().await;

    let purged = gw.gateway.cache().purge_everywhere("/open/product/").await;
    assert!(purged.complete(), "{purged:?}");
    let removed = purged.shared.unwrap().removed + partial.shared.unwrap().removed;
    assert_eq!(removed, 20, "{purged:?} {partial:?}");
    let left: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert_eq!(left, OTHERS, "every entry is gone, nothing else");
    assert_eq!(purged.here, 20);
    gw.stop().await;
}

#[tokio::test]
async fn an_unreachable_redis_is_a_miss_never_an_error() {
    let upstream = upstream_answering(good("prov-10")).await;
    let dead = dead_address();
    let gw = spawn_gateway(shared(&upstream.uri(), &format!("redis://{dead}"))).await;
    assert_eq!(
        cache_header(&get(&gw.url(ITEM)).await).as_deref(),
        Some("miss")
    );
    // Memory still answers.
    assert_eq!(
        cache_header(&get(&gw.url(ITEM)).await).as_deref(),
        Some("hit")
    );
    assert_eq!(sent(&upstream).await, 1);
    gw.stop().await;
}

#[tokio::test]
async fn an_expired_entry_here_gives_way_to_a_fresher_one_in_redis() {
    let redis = RedisServer::start();
    let upstream = upstream_answering(good("prov-11")).await;
    let config = |ttl| {
        let mut c = shared(&upstream.uri(), &redis.url());
        c.routes[0].cache_ttl_ms = Some(ttl);
        c.routes[0].cache_stale_ms = Some(60_000);
        c
    };
    let a = spawn_gateway(config(1_000)).await;
    let b = spawn_gateway(config(1_000)).await;
    assert_eq!(
        cache_header(&get(&a.url(ITEM)).await).as_deref(),
        Some("miss")
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // Expired everywhere: b asks and puts a fresh answer in Redis (in the
    // background: a moment later it is there).
    assert_eq!(
        cache_header(&get(&b.url(ITEM)).await).as_deref(),
        Some("miss")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let on_a = cache_header(&get(&a.url(ITEM)).await);
    assert_eq!(
        on_a.as_deref(),
        Some("hit"),
        "a found b's fresher answer in Redis"
    );
    assert_eq!(sent(&upstream).await, 2);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_gateways_own_refusal_on_a_cached_route_says_miss() {
    let dead = dead_address();
    let gw = spawn_gateway(cached(&format!("http://{dead}"), 30_000, 0)).await;
    let a = get(&gw.url(ITEM)).await;
    a.assert_gateway_envelope(502);
    assert_eq!(cache_header(&a).as_deref(), Some("miss"));
    gw.stop().await;
}

#[tokio::test]
async fn over_the_quota_or_without_a_provider_a_stale_answer_still_answers() {
    // Over the quota: the limiter refuses the call; the stale entry answers.
    let upstream = upstream_answering(good("prov-12")).await;
    let mut c = cached(&upstream.uri(), 50, 60_000);
    c.rate_limit = Some(pandagate::config::RateLimitConfig::new(0.2, Some(1)));
    let gw = spawn_gateway(c).await;
    assert_eq!(
        cache_header(&get(&gw.url(ITEM)).await).as_deref(),
        Some("miss")
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let limited = get(&gw.url(ITEM)).await;
    assert_eq!(limited.status, 200);
    assert_eq!(cache_header(&limited).as_deref(), Some("stale"));
    assert_eq!(sent(&upstream).await, 1, "no slot, no provider call");
    gw.stop().await;

    // A failing provider opens the circuit: later calls are refused
    // before any attempt, and the stale entry answers them too.
    let upstream = upstream_failing_first(1, good("prov-13"), ResponseTemplate::new(503)).await;
    let mut c = cached(&upstream.uri(), 50, 60_000);
    c.circuit_breaker.failure_threshold = 1;
    let gw = spawn_gateway(c).await;
    assert_eq!(
        cache_header(&get(&gw.url(ITEM)).await).as_deref(),
        Some("miss")
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let a = get(&gw.url(ITEM)).await;
        assert_eq!(a.status, 200);
        assert_eq!(cache_header(&a).as_deref(), Some("stale"));
    }
    assert_eq!(
        gw.gateway.breaker().state(),
        pandagate::breaker::State::Open,
        "the later stale answers covered an open circuit"
    );
    let calls = sent(&upstream).await;
    assert!(
        calls < 4,
        "an open circuit sends nothing: {calls} provider calls"
    );
    gw.stop().await;
}

/// `shared` on the TLS-only Redis at `url`, trusting `ca_file` besides the
/// bundled roots.
fn shared_over_rediss(upstream: &str, url: &str, ca_file: &std::path::Path) -> Config {
    let mut c = shared(upstream, url);
    c.cache.redis_timeout_ms = 2_000;
    c.tls.ca_file = Some(ca_file.to_owned());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_answers_over_rediss_and_one_not_trusting_its_certificate_misses() {
    let ca = tls::TestCa::new();
    let redis = redis_server::redis_tls(&ca, &ca.server("redis"), None);
    let url = redis_server::rediss_url(&redis, None);
    let upstream = upstream_answering(good("prov-tls")).await;
    let a = spawn_gateway(shared_over_rediss(&upstream.uri(), &url, &ca.ca_file)).await;
    let b = spawn_gateway(shared_over_rediss(&upstream.uri(), &url, &ca.ca_file)).await;
    assert_eq!(
        cache_header(&get(&a.url(ITEM)).await).as_deref(),
        Some("miss")
    );
    // The write to Redis is in the background: wait (bounded) for it.
    let mut conn = redis_server::redis_manager(&url, &ca.ca_file);
    for _ in 0..100 {
        let n: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        if n >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let on_b = get(&b.url(ITEM)).await;
    assert_eq!(cache_header(&on_b).as_deref(), Some("hit"), "from Redis");
    assert_eq!(on_b.json()["requestId"], "prov-tls");
    assert_eq!(sent(&upstream).await, 1);

    // A replica trusting another CA refuses the certificate: a miss, the
    // provider asked again, never an error.
    let other = tls::TestCa::named("a CA the gateway does not trust");
    let c = spawn_gateway(shared_over_rediss(&upstream.uri(), &url, &other.ca_file)).await;
    let on_c = get(&c.url(ITEM)).await;
    assert_eq!(on_c.status, 200);
    assert_eq!(cache_header(&on_c).as_deref(), Some("miss"));
    assert_eq!(sent(&upstream).await, 2);
    a.stop().await;
    b.stop().await;
    c.stop().await;
}
