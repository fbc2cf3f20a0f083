//! Idempotency keys: a call sent again with the same key is answered from
//! the first call's outcome and reaches the provider at most once.

use crate::support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use pandagate::config::{Config, IdempotencyBackend, IdempotencyConfig, RateLimitConfig};
use pandagate::exporter::Exporter;
use support::client::Answer;
use support::gateway::{TestGateway, USER_ID};
use support::redis_server::RedisServer;
use support::wire::{head_field, read_request};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const ORDER: &str = "/alibaba/order/create";
const READ: &str = "/open/product/get";

/// What the provider stand-in does with one request.
#[derive(Clone, Debug)]
enum Act {
    /// Answers at once.
    Answer(u16, String),
    /// Reads the request, then closes the connection without a word.
    Drop,
    /// Answers after a while.
    Late(Duration, u16, String),
}

fn ok(order: &str) -> Act {
    Act::Answer(
        200,
        serde_json::json!({"requestId": format!("prov-{order}"), "code": 200, "msg": "success", "data": {"orderId": order}})
            .to_string(),
    )
}

/// The provider's 200 for `order`, after `ms` milliseconds.
fn late(ms: u64, order: &str) -> Act {
    Act::Late(
        Duration::from_millis(ms),
        200,
        format!(r#"{{"code":200,"data":{{"orderId":"{order}"}}}}"#),
    )
}

/// A provider that counts what it receives and acts as scripted: the
/// queued acts first, then `then` for every further request.
struct Provider {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<(String, String)>>>,
    acts: Arc<Mutex<VecDeque<Act>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Provider {
    async fn start(acts: Vec<Act>, then: Act) -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let acts = Arc::new(Mutex::new(VecDeque::from(acts)));
        let (seen, queue) = (received.clone(), acts.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (seen, queue, then) = (seen.clone(), queue.clone(), then.clone());
                tokio::spawn(async move {
                    while let Some((head, body)) = read_request(&mut stream).await {
                        let body = String::from_utf8_lossy(&body).into_owned();
                        seen.lock().unwrap().push((head, body));
                        let act = queue.lock().unwrap().pop_front().unwrap_or(then.clone());
                        let (status, body) = match act {
                            Act::Drop => return,
                            Act::Answer(s, b) => (s, b),
                            Act::Late(wait, s, b) => {
                                tokio::time::sleep(wait).await;
                                (s, b)
                            }
                        };
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nx-provider: yes\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Provider {
            addr,
            received,
            acts,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received whose body mentions `needle`.
    fn count(&self, needle: &str) -> usize {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, body)| body.contains(needle))
            .count()
    }

    fn heads(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|(h, _)| h.clone())
            .collect()
    }

    fn script(&self, acts: Vec<Act>) {
        self.acts.lock().unwrap().extend(acts);
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn keyed_config(upstream: &str, store: IdempotencyConfig) -> Config {
    let mut c = config(upstream);
    c.retry.backoff_base_ms = 1;
    c.retry.backoff_cap_ms = 1;
    c.idempotency = Some(store);
    c
}

fn local_store(dir: &std::path::Path) -> IdempotencyConfig {
    IdempotencyConfig {
        path: dir.to_owned(),
        ..IdempotencyConfig::default()
    }
}

fn redis_store(url: String) -> IdempotencyConfig {
    IdempotencyConfig {
        backend: IdempotencyBackend::Redis,
        redis_url: Some(url),
        ..IdempotencyConfig::default()
    }
}

fn order_body(order: &str) -> String {
    format!(r#"{{"outOrderId":"{order}","quantity":1}}"#)
}

fn keyed(url: &str, key: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

async fn create(gw: &TestGateway, key: &str, order: &str) -> Answer {
    send(keyed(&gw.url(ORDER), key, &order_body(order))).await
}

fn replayed(a: &Answer) -> bool {
    a.headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

#[tokio::test]
async fn a_retried_order_is_sent_once_and_replayed_as_it_was() {
    let provider = Provider::start(vec![], ok("o-1")).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(keyed_config(&provider.url(), local_store(dir.path()))).await;

    let first = create(&gw, "order-o-1", "o-1").await;
    assert_eq!(first.status, 200);
    assert!(!replayed(&first));
    for _ in 0..3 {
        let again = create(&gw, "order-o-1", "o-1").await;
        assert_eq!(again.status, 200);
        assert!(replayed(&again), "{:?}", again.headers);
        assert_eq!(again.body, first.body);
        assert_eq!(again.headers["x-provider"], "yes");
        assert_eq!(again.headers["content-type"], "application/json");
    }
    assert_eq!(provider.count("o-1"), 1);
    // The provider never sees the key.
    assert!(
        provider
            .heads()
            .iter()
            .all(|h| !h.to_ascii_lowercase().contains("idempotency-key")),
        "{:?}",
        provider.heads()
    );

    let log = gw.access_log_of(4).await;
    assert_eq!(log[0]["idempotency"], "new");
    assert_eq!(log[0]["attempts"], 1);
    assert_eq!(log[0]["upstream_status"], 200);
    for line in &log[1..] {
        assert_eq!(line["idempotency"], "replayed");
        assert_eq!(line["attempts"], 0);
        assert!(line["upstream_status"].is_null());
        assert_eq!(
            line["request_id"], "prov-o-1",
            "the replayed envelope is logged"
        );
    }
    let shown = log[0]["idempotency_key"].as_str().unwrap();
    assert_eq!(shown.len(), 12);
    let text = serde_json::to_string(&log).unwrap();
    assert!(
        !text.contains("order-o-1"),
        "the key is never logged: {text}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_same_key_for_another_call_is_refused_422_and_nothing_is_sent() {
    let provider = Provider::start(vec![], ok("o-2")).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(keyed_config(&provider.url(), local_store(dir.path()))).await;
    assert_eq!(create(&gw, "k-2", "o-2").await.status, 200);

    let other_body = create(&gw, "k-2", "o-2b").await;
    let v = other_body.assert_gateway_envelope(422);
    assert_eq!(v["error"], "idempotency_key_reused");
    let other_path = send(keyed(
        &gw.url("/alibaba/order/create?x=1"),
        "k-2",
        &order_body("o-2"),
    ))
    .await;
    assert_eq!(
        other_path.assert_gateway_envelope(422)["error"],
        "idempotency_key_reused"
    );
    assert_eq!(provider.count("o-2"), 1);
    let log = gw.access_log_of(3).await;
    assert_eq!(log[1]["idempotency"], "mismatch");
    assert_eq!(log[1]["attempts"], 0);
    gw.stop().await;
}

#[tokio::test]
async fn a_key_in_progress_is_answered_409_until_its_answer_is_kept() {
    let provider = Provider::start(vec![late(800, "o-3")], ok("o-3")).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(keyed_config(&provider.url(), local_store(dir.path()))).await;

    let url = gw.url(ORDER);
    let first = tokio::spawn(send(keyed(&url, "k-3", &order_body("o-3"))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = create(&gw, "k-3", "o-3").await;
    let v = during.assert_gateway_envelope(409);
    assert_eq!(v["error"], "idempotency_in_progress");
    assert_eq!(during.headers["retry-after"], "1");

    let first = first.await.unwrap();
    assert_eq!(first.status, 200);
    let after = create(&gw, "k-3", "o-3").await;
    assert!(replayed(&after));
    assert_eq!(after.body, first.body);
    assert_eq!(provider.count("o-3"), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_caller_that_gives_up_still_gets_the_answer_on_its_retry() {
    let provider = Provider::start(vec![late(700, "o-4")], ok("o-4")).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(keyed_config(&provider.url(), local_store(dir.path()))).await;

    // The caller's own timeout is shorter than the provider's answer.
    let gave_up = tokio::time::timeout(Duration::from_millis(200), create(&gw, "k-4", "o-4")).await;
    assert!(gave_up.is_err(), "the caller timed out");
    let mut answer = None;
    for _ in 0..40 {
        let a = create(&gw, "k-4", "o-4").await;
        if a.status != 409 {
            answer = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = answer.expect("the first call's answer is kept within 4 s");
    assert_eq!(answer.status, 200);
    assert!(replayed(&answer));
    assert!(String::from_utf8_lossy(&answer.body).contains("o-4"));
    assert_eq!(provider.count("o-4"), 1);
    // The call whose caller left is logged with what the provider said.
    let mut left = None;
    for _ in 0..100 {
        left = gw
            .access_log()
            .into_iter()
            .find(|l| l["idempotency"] == "new");
        if left.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = left.expect("the first call is logged within 2 s");
    assert_eq!(left["error"], "response_incomplete", "{left}");
    assert_eq!(left["code"], 200, "{left}");
    assert_eq!(left["upstream_status"], 200, "{left}");
    gw.stop().await;
}

#[tokio::test]
async fn an_outcome_the_gateway_cannot_know_is_kept_and_never_sent_twice() {
    // Dropped after the request was read: 502, kept.
    let provider = Provider::start(vec![Act::Drop], ok("x")).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = keyed_config(&provider.url(), local_store(dir.path()));
    c.upstream.request_timeout_ms = 300;
    c.retry.deadline_ms = 2_000;
    let gw = spawn_gateway(c).await;
    let first = create(&gw, "k-5", "o-5").await;
    let v = first.assert_gateway_envelope(502);
    let again = create(&gw, "k-5", "o-5").await;
    assert!(replayed(&again));
    assert_eq!(again.json(), v, "the same envelope, request id included");

    // No answer within the attempt's time: 504, kept.
    provider.script(vec![Act::Late(
        Duration::from_millis(900),
        200,
        "{}".into(),
    )]);
    let first = create(&gw, "k-6", "o-6").await;
    let v = first.assert_gateway_envelope(504);
    let again = create(&gw, "k-6", "o-6").await;
    assert!(replayed(&again));
    assert_eq!(again.status, 504);
    assert_eq!(again.json(), v);

    assert_eq!(provider.count("o-5"), 1);
    assert_eq!(provider.count("o-6"), 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_call_that_sent_nothing_releases_its_key() {
    // Refused connections: nothing reached the provider, the key is free.
    let dead = dead_address();
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(keyed_config(
        &format!("http://{dead}"),
        local_store(dir.path()),
    ))
    .await;
    for _ in 0..2 {
        create(&gw, "k-7", "o-7").await.assert_gateway_envelope(502);
    }
    let log = gw.access_log_of(2).await;
    for line in &log {
        assert_eq!(line["idempotency"], "released");
        assert!(line["attempts"].as_u64().unwrap() >= 1);
    }
    gw.stop().await;

    // Over the quota: 429, the key is free once a slot is.
    let provider = Provider::start(vec![], ok("o-8")).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = keyed_config(&provider.url(), local_store(dir.path()));
    c.rate_limit = Some(RateLimitConfig::new(1.0, Some(1)));
    let gw = spawn_gateway(c).await;
    assert_eq!(get(&gw.url(READ)).await.status, 200); // spends the slot
    create(&gw, "k-8", "o-8").await.assert_gateway_envelope(429);
    assert_eq!(provider.count("o-8"), 0);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let later = create(&gw, "k-8", "o-8").await;
    assert_eq!(later.status, 200);
    assert!(!replayed(&later));
    assert_eq!(provider.count("o-8"), 1);
    // With the quota spent again, a replay still answers: it needs no slot.
    assert_eq!(get(&gw.url(READ)).await.status, 429);
    let replay = create(&gw, "k-8", "o-8").await;
    assert_eq!(replay.status, 200);
    assert!(replayed(&replay));
    let log = gw.access_log_of(5).await;
    assert_eq!(log[1]["idempotency"], "released");
    assert_eq!(log[2]["idempotency"], "new");
    assert_eq!(log[4]["idempotency"], "replayed");
    gw.stop().await;
}

#[tokio::test]
async fn keys_are_scoped_by_account() {
    let provider = Provider::start(vec![], ok("o-9")).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(keyed_config(&provider.url(), local_store(dir.path()))).await;
    assert_eq!(create(&gw, "k-9", "o-9").await.status, 200);
    let mut req = keyed(&gw.url(ORDER), "k-9", &order_body("o-9"));
    req.headers_mut()
        .insert("x-pandagate-profile", "ops".parse().unwrap());
    let other = send(req).await;
    assert_eq!(other.status, 200);
    assert!(!replayed(&other));
    assert_eq!(provider.count("o-9"), 2);
    gw.stop().await;
}

/// One profile, several sub-accounts: a key is each `user-id`'s own.
#[tokio::test]
async fn keys_are_scoped_by_the_user_id_sent() {
    let provider = Provider::start(vec![], ok("o-u")).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(keyed_config(&provider.url(), local_store(dir.path()))).await;
    let as_user = |user: &str| {
        let mut req = keyed(&gw.url(ORDER), "k-u", &order_body("o-u"));
        req.headers_mut()
            .insert("x-pandagate-profile", "ops".parse().unwrap());
        req.headers_mut().insert("user-id", user.parse().unwrap());
        req
    };
    let first = send(as_user("11")).await;
    assert!(!replayed(&first));
    let other_user = send(as_user("22")).await;
    assert_eq!(other_user.status, 200);
    assert!(!replayed(&other_user), "22's order is its own");
    assert_eq!(provider.count("o-u"), 2);
    assert!(replayed(&send(as_user("11")).await));
    assert!(replayed(&send(as_user("22")).await));
    assert_eq!(provider.count("o-u"), 2);
    let users: Vec<String> = provider
        .heads()
        .iter()
        .filter_map(|h| head_field(h, "user-id").map(str::to_owned))
        .collect();
    assert_eq!(users, ["11", "22"]);
    gw.stop().await;
}

/// Two deployments on one Redis, their profiles named alike but signing
/// with different AccessKeys (or one deployment before and after a reload
/// that changed its AccessKey): neither sees the other's keys or answers.
#[tokio::test]
async fn deployments_sharing_redis_never_see_each_others_keys_or_answers() {
    let redis = RedisServer::start();
    let provider = Provider::start(vec![], ok("o-t")).await;
    let team = |access_key: &str| {
        let mut c = keyed_config(&provider.url(), redis_store(redis.url()));
        c.profiles[0].access_key = Some(access_key.into());
        c.routes = vec![pandagate::config::RouteConfig {
            path: Some(READ.into()),
            cache_ttl_ms: Some(60_000),
            ..Default::default()
        }];
        c.cache.backend = pandagate::config::CacheBackend::Redis;
        c.cache.redis_url = Some(redis.url());
        c
    };
    let a = spawn_gateway(team("ak-team-a")).await;
    let b = spawn_gateway(team("ak-team-b")).await;

    assert!(!replayed(&create(&a, "k-t", "o-t").await));
    let on_b = create(&b, "k-t", "o-t").await;
    assert_eq!(on_b.status, 200);
    assert!(!replayed(&on_b), "b's order is b's, sent");
    assert_eq!(provider.count("o-t"), 2);
    assert!(replayed(&create(&a, "k-t", "o-t").await));
    assert!(replayed(&create(&b, "k-t", "o-t").await));

    // The read cache: a's answer, in Redis, is not b's.
    let cache = |a: &Answer| a.headers.get("x-pandagate-cache").cloned();
    assert_eq!(cache(&get(&a.url(READ)).await).unwrap(), "miss");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..100 {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*:cache:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cache(&get(&b.url(READ)).await).unwrap(), "miss");
    assert_eq!(cache(&get(&a.url(READ)).await).unwrap(), "hit");
    // Nothing in Redis names an AccessKey.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    for key in &keys {
        let value: Vec<u8> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        for secret in ["ak-team-a", "ak-team-b"] {
            assert!(!key.contains(secret), "{key}");
            assert!(
                !String::from_utf8_lossy(&value).contains(secret),
                "{key} holds {secret}"
            );
        }
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn reads_ignore_keys_and_writes_may_require_one() {
    let provider = Provider::start(vec![], ok("r")).await;
    let dir = tempfile::tempdir().unwrap();
    let mut store = local_store(dir.path());
    store.require_key = true;
    let gw = spawn_gateway(keyed_config(&provider.url(), store)).await;

    for _ in 0..2 {
        let req = Request::get(gw.url(READ))
            .header("idempotency-key", "read-key")
            .body(Full::default())
            .unwrap();
        assert_eq!(send(req).await.status, 200);
    }
    assert_eq!(
        provider.received.lock().unwrap().len(),
        2,
        "both reads sent"
    );

    let unkeyed = send(
        Request::post(gw.url(ORDER))
            .body(Full::new(Bytes::from(order_body("o-10"))))
            .unwrap(),
    )
    .await;
    assert_eq!(
        unkeyed.assert_gateway_envelope(400)["error"],
        "idempotency_key_required"
    );
    assert_eq!(provider.count("o-10"), 0);
    // An unknown path is treated as a write: a key is needed too.
    let unknown = send(
        Request::post(gw.url("/open/something/new"))
            .body(Full::new(Bytes::from(order_body("o-11"))))
            .unwrap(),
    )
    .await;
    assert_eq!(
        unknown.assert_gateway_envelope(400)["error"],
        "idempotency_key_required"
    );
    assert_eq!(provider.count("o-11"), 0);

    let log = gw.access_log_of(4).await;
    assert_eq!(log[0]["idempotency"], "ignored");
    assert_eq!(log[3]["class"], "unknown");
    assert!(
        provider
            .heads()
            .iter()
            .all(|h| !h.to_ascii_lowercase().contains("idempotency-key"))
    );
    gw.stop().await;
}

#[tokio::test]
async fn malformed_keys_and_unbufferable_bodies_are_refused_before_anything_is_sent() {
    let provider = Provider::start(vec![], ok("x")).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = keyed_config(&provider.url(), local_store(dir.path()));
    c.server.buffer_body_bytes = 1024;
    let gw = spawn_gateway(c).await;

    let long = "k".repeat(256);
    for bad in [
        "has space",
        "\"unclosed",
        "\"bad\\escape\"",
        "\"\"",
        long.as_str(),
    ] {
        let a = create(&gw, bad, "o-11").await;
        assert_eq!(
            a.assert_gateway_envelope(400)["error"],
            "bad_idempotency_key",
            "{bad:?}"
        );
    }
    let twice = send(
        Request::post(gw.url(ORDER))
            .header("idempotency-key", "a")
            .header("idempotency-key", "b")
            .body(Full::new(Bytes::from(order_body("o-11"))))
            .unwrap(),
    )
    .await;
    assert_eq!(
        twice.assert_gateway_envelope(400)["error"],
        "bad_idempotency_key"
    );

    let big = format!(r#"{{"outOrderId":"o-12","pad":"{}"}}"#, "x".repeat(2_000));
    let a = send(keyed(&gw.url(ORDER), "k-12", &big)).await;
    let v = a.assert_gateway_envelope(413);
    assert_eq!(v["error"], "idempotency_body_too_large");
    assert!(
        v["msg"].as_str().unwrap().contains("buffer_body_bytes"),
        "{v}"
    );
    assert_eq!(provider.received.lock().unwrap().len(), 0);

    // A quoted key is the same key unquoted.
    assert_eq!(create(&gw, "k-13", "o-13").await.status, 200);
    let quoted = create(&gw, "\"k-13\"", "o-13").await;
    assert!(replayed(&quoted));
    assert_eq!(provider.count("o-13"), 1);
    gw.stop().await;
}

#[tokio::test]
async fn an_answer_too_long_to_keep_reaches_its_caller_and_replays_as_a_refusal() {
    let long = format!(r#"{{"code":200,"data":"{}"}}"#, "y".repeat(5_000));
    let provider = Provider::start(vec![], Act::Answer(200, long.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let mut store = local_store(dir.path());
    store.max_response_bytes = 1_000;
    let gw = spawn_gateway(keyed_config(&provider.url(), store)).await;
    let first = create(&gw, "k-14", "o-14").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body, long.as_bytes());
    let again = create(&gw, "k-14", "o-14").await;
    let v = again.assert_gateway_envelope(502);
    assert_eq!(v["error"], "idempotency_answer_not_kept");
    assert!(v["msg"].as_str().unwrap().contains("200"), "{v}");
    assert_eq!(provider.count("o-14"), 1);
    gw.stop().await;
}

#[tokio::test]
async fn without_the_section_the_header_passes_through() {
    let provider = Provider::start(vec![], ok("o-15")).await;
    let gw = spawn_gateway(config(&provider.url())).await;
    for _ in 0..2 {
        assert_eq!(create(&gw, "k-15", "o-15").await.status, 200);
    }
    assert_eq!(provider.count("o-15"), 2);
    assert!(
        provider
            .heads()
            .iter()
            .all(|h| h.to_ascii_lowercase().contains("idempotency-key: k-15"))
    );
    gw.stop().await;
}

#[tokio::test]
async fn replicas_sharing_redis_share_keys() {
    let redis = RedisServer::start();
    let provider = Provider::start(vec![late(600, "o-16")], ok("o-x")).await;
    let a = spawn_gateway(keyed_config(&provider.url(), redis_store(redis.url()))).await;
    let b = spawn_gateway(keyed_config(&provider.url(), redis_store(redis.url()))).await;

    let url = a.url(ORDER);
    let first = tokio::spawn(send(keyed(&url, "k-16", &order_body("o-16"))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = create(&b, "k-16", "o-16").await;
    assert_eq!(
        during.assert_gateway_envelope(409)["error"],
        "idempotency_in_progress"
    );
    let first = first.await.unwrap();
    assert_eq!(first.status, 200);
    let on_b = create(&b, "k-16", "o-16").await;
    assert!(replayed(&on_b));
    assert_eq!(on_b.body, first.body);
    let mismatch = create(&b, "k-16", "o-16-other").await;
    mismatch.assert_gateway_envelope(422);
    assert_eq!(provider.count("o-16"), 1);

    // The metric counts what became of each key.
    let gateway = b.gateway.clone();
    let text = Exporter::new(Arc::new(move || gateway.clone())).render();
    for line in [
        r#"pandagate_idempotency_total{result="in_progress"} 1"#,
        r#"pandagate_idempotency_total{result="replayed"} 1"#,
        r#"pandagate_idempotency_total{result="mismatch"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_unreachable_redis_fails_keyed_calls_closed() {
    let provider = Provider::start(vec![], ok("o-17")).await;
    let dead = dead_address();
    let gw = spawn_gateway(keyed_config(
        &provider.url(),
        redis_store(format!("redis://{dead}")),
    ))
    .await;
    let a = create(&gw, "k-17", "o-17").await;
    assert_eq!(
        a.assert_gateway_envelope(503)["error"],
        "idempotency_store_unavailable"
    );
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(provider.count("o-17"), 0);
    // Calls without a key do not need the store.
    let unkeyed = send(
        Request::post(gw.url(ORDER))
            .body(Full::new(Bytes::from(order_body("o-17"))))
            .unwrap(),
    )
    .await;
    assert_eq!(unkeyed.status, 200);
    let log = gw.access_log_of(2).await;
    assert_eq!(log[0]["idempotency"], "unavailable");
    gw.stop().await;
}

/// Redis stalls past `redis_timeout_ms` while the key is reserved: the
/// caller is refused (nothing sent), and the reservation that landed late
/// is taken back, so the caller's retry goes through.
#[tokio::test]
async fn a_reservation_the_store_confirmed_too_late_does_not_hold_the_key() {
    let redis = RedisServer::start();
    let provider = Provider::start(vec![], ok("o-st")).await;
    let gw = spawn_gateway(keyed_config(&provider.url(), redis_store(redis.url()))).await;
    assert!(!replayed(&create(&gw, "k-warm", "o-warm").await));

    redis.freeze();
    let frozen = tokio::time::Instant::now();
    let stalled = create(&gw, "k-st", "o-st").await;
    assert_eq!(
        stalled.assert_gateway_envelope(503)["error"],
        "idempotency_store_unavailable"
    );
    tokio::time::sleep_until(frozen + Duration::from_millis(600)).await;
    redis.thaw();
    // The caller retries after its Retry-After.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let retried = create(&gw, "k-st", "o-st").await;
    assert_eq!(retried.status, 200, "{:?}", retried.json());
    assert!(!replayed(&retried));
    assert_eq!(provider.count("o-st"), 1, "sent once, by the retry");
    assert!(replayed(&create(&gw, "k-st", "o-st").await));
    gw.stop().await;
}

/// A provider whose connections hang (its accept queue is full, so SYNs
/// are dropped): every attempt fails to connect after the connect timeout.
async fn hanging_provider() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => held.push(stream),
            _ => break,
        }
    }
    (listener, held, format!("http://{addr}"))
}

/// Redis stalls while a call that sent nothing gives its key back: the
/// release is made once Redis answers, so a retry is not refused 409.
#[tokio::test]
async fn a_release_the_store_was_too_slow_to_take_is_made_when_it_answers() {
    let redis = RedisServer::start();
    let (_listener, _held, url) = hanging_provider().await;
    let mut c = keyed_config(&url, redis_store(redis.url()));
    c.upstream.connect_timeout_ms = 400;
    let gw = spawn_gateway(c).await;
    let call = tokio::spawn(send(keyed(&gw.url(ORDER), "k-rel", &order_body("o-rel"))));
    // Reserved by now; the attempt hangs connecting. Redis stalls over the
    // release.
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.freeze();
    let first = call.await.unwrap();
    assert_eq!(
        first.assert_gateway_envelope(502)["error"],
        "upstream_connect"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.thaw();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = create(&gw, "k-rel", "o-rel").await;
    assert_eq!(
        again.assert_gateway_envelope(502)["error"],
        "upstream_connect",
        "the key was free: the call was tried again, not refused 409"
    );
    let log = gw.access_log_of(2).await;
    assert_eq!(log[0]["idempotency"], "released");
    assert_eq!(log[1]["idempotency"], "released");
    gw.stop().await;
}

#[tokio::test]
async fn a_reservation_whose_owner_died_reads_as_an_unknown_outcome_after_its_lease() {
    use pandagate::idempotency::{Begun, Idempotency, Key, Owner, fingerprint};
    let redis = RedisServer::start();
    let provider = Provider::start(vec![], ok("o-18")).await;
    let mut store = redis_store(redis.url());
    store.lease_margin_ms = 300;
    let mut c = keyed_config(&provider.url(), store.clone());
    c.retry.deadline_ms = 200;
    c.upstream.request_timeout_ms = 200;
    let gw = spawn_gateway(c).await;

    // Another replica reserves the key and dies without a word.
    let url = support::tls::with_default_trust(
        pandagate::config::RedisUrl::parse(&redis.url(), "test").unwrap(),
    );
    let other = Idempotency::open(&store, Some(&url)).unwrap();
    let body = order_body("o-18");
    let fp = fingerprint(&http::Method::POST, ORDER, body.as_bytes());
    let account = pandagate::profiles::account_of(ACCESS_KEY.as_bytes());
    let owner = Owner {
        account: &account,
        user_id: Some(USER_ID.as_bytes()),
        client: None,
    };
    let key = Key::new(owner, b"k-18");
    let Begun::Reserved(reservation) = other.begin(&key, fp, Duration::from_millis(200)).await
    else {
        panic!("reserved");
    };
    drop(reservation);

    let during = create(&gw, "k-18", "o-18").await;
    assert_eq!(
        during.assert_gateway_envelope(409)["error"],
        "idempotency_in_progress"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..2 {
        let after = create(&gw, "k-18", "o-18").await;
        let v = after.assert_gateway_envelope(502);
        assert_eq!(v["error"], "idempotency_outcome_unknown");
        assert!(v["msg"].as_str().unwrap().contains("new key"), "{v}");
    }
    assert_eq!(provider.count("o-18"), 0, "never sent by this replica");
    let log = gw.access_log_of(3).await;
    assert_eq!(log[2]["idempotency"], "unknown_outcome");
    gw.stop().await;
}

/// The real binary killed mid-call: its reservation is on disk, so the
/// replica that restarts on the same store never sends the call again.
#[tokio::test]
async fn a_gateway_killed_mid_call_leaves_a_reservation_that_outlives_it() {
    let provider = Provider::start(
        vec![Act::Late(Duration::from_secs(20), 200, "{}".into())],
        ok("o-19"),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pandagate.toml");
    std::fs::write(
        &config,
        format!(
            "[retry]\ndeadline_ms = 1000\n[idempotency]\npath = {:?}\nlease_margin_ms = 3000\n",
            dir.path().join("keys")
        ),
    )
    .unwrap();
    let upstream = provider.url();
    let env = [
        ("PANDAPON_ACCESS_KEY", ACCESS_KEY),
        ("PANDAPON_ACCESS_SECRET", SECRET),
        ("PANDAGATE_UPSTREAM", upstream.as_str()),
    ];
    let args = ["--config", config.to_str().unwrap()];

    let mut first = launch(&args, &env).await;
    let url = format!("http://{}{ORDER}", first.gateway);
    let call = tokio::spawn(send(keyed(&url, "k-19", &order_body("o-19"))));
    for _ in 0..100 {
        if provider.count("o-19") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(provider.count("o-19"), 1, "the call reached the provider");
    first.signal("-KILL");
    let _ = tokio::time::timeout(Duration::from_secs(5), first.child.wait()).await;
    call.abort();

    let second = launch(&args, &env).await;
    let url = format!("http://{}{ORDER}", second.gateway);
    let mut seen = Vec::new();
    for _ in 0..100 {
        let a = send(keyed(&url, "k-19", &order_body("o-19"))).await;
        let error = a.json()["error"].as_str().unwrap_or_default().to_owned();
        seen.push((a.status.as_u16(), error.clone()));
        if error == "idempotency_outcome_unknown" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        seen[0],
        (409, "idempotency_in_progress".to_owned()),
        "{seen:?}"
    );
    assert_eq!(
        seen.last().unwrap(),
        &(502, "idempotency_outcome_unknown".to_owned()),
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|(s, _)| *s == 409 || *s == 502),
        "nothing else answered: {seen:?}"
    );
    assert_eq!(provider.count("o-19"), 1, "never sent a second time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_many_calls_racing_with_one_key_exactly_one_is_sent() {
    let provider = Provider::start(vec![late(500, "o-20")], ok("o-20")).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(keyed_config(&provider.url(), local_store(dir.path()))).await;
    let url = gw.url(ORDER);
    let racing: Vec<_> = (0..10)
        .map(|_| tokio::spawn(send(keyed(&url, "k-20", &order_body("o-20")))))
        .collect();
    let mut statuses = Vec::new();
    for call in racing {
        statuses.push(call.await.unwrap().status.as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(provider.count("o-20"), 1, "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        9,
        "{statuses:?}"
    );
    gw.stop().await;
}

/// A restart (SIGTERM) while a keyed call whose caller left is still
/// running: the drain waits for it, so its answer is kept, not lost.
#[tokio::test]
async fn a_drain_waits_for_keyed_calls_whose_callers_left() {
    let provider = Provider::start(vec![late(1_500, "o-21")], ok("o-21")).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pandagate.toml");
    std::fs::write(
        &config,
        format!("[idempotency]\npath = {:?}\n", dir.path().join("keys")),
    )
    .unwrap();
    let upstream = provider.url();
    let env = [
        ("PANDAPON_ACCESS_KEY", ACCESS_KEY),
        ("PANDAPON_ACCESS_SECRET", SECRET),
        ("PANDAGATE_UPSTREAM", upstream.as_str()),
    ];
    let args = ["--config", config.to_str().unwrap()];
    let mut first = launch(&args, &env).await;
    let url = format!("http://{}{ORDER}", first.gateway);
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        send(keyed(&url, "k-21", &order_body("o-21"))),
    )
    .await;
    assert!(gave_up.is_err(), "the caller left before the answer");
    first.signal("-TERM");
    let exited = tokio::time::timeout(Duration::from_secs(15), first.child.wait()).await;
    assert!(exited.is_ok(), "exits within the grace period");

    let second = launch(&args, &env).await;
    let url = format!("http://{}{ORDER}", second.gateway);
    let again = send(keyed(&url, "k-21", &order_body("o-21"))).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert!(replayed(&again));
    assert_eq!(provider.count("o-21"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_keys_over_rediss_and_one_not_trusting_its_certificate_fails_closed() {
    const PASSWORD: &str = "rediss-idempotency-pw";
    let ca = tls::TestCa::new();
    let redis = redis_server::redis_tls(&ca, &ca.server("redis"), Some(PASSWORD));
    let provider = Provider::start(vec![], ok("o-tls")).await;
    let config = |ca_file: &std::path::Path| {
        let mut store = redis_store(redis_server::rediss_url(&redis, Some(PASSWORD)));
        store.redis_timeout_ms = 2_000;
        let mut c = keyed_config(&provider.url(), store);
        c.tls.ca_file = Some(ca_file.to_owned());
        c
    };
    let a = spawn_gateway(config(&ca.ca_file)).await;
    let b = spawn_gateway(config(&ca.ca_file)).await;
    let first = create(&a, "k-tls", "o-tls").await;
    assert_eq!(first.status, 200);
    let on_b = create(&b, "k-tls", "o-tls").await;
    assert!(replayed(&on_b), "{:?}", on_b.headers);
    assert_eq!(on_b.body, first.body);
    assert_eq!(provider.count("o-tls"), 1);

    // A replica trusting another CA: the store cannot be reached, so keyed
    // calls are refused and nothing is sent.
    let other = tls::TestCa::named("a CA the gateway does not trust");
    let c = spawn_gateway(config(&other.ca_file)).await;
    let refused = create(&c, "k-tls-2", "o-tls-2").await;
    assert_eq!(
        refused.assert_gateway_envelope(503)["error"],
        "idempotency_store_unavailable"
    );
    assert_eq!(provider.count("o-tls-2"), 0);
    a.stop().await;
    b.stop().await;
    c.stop().await;
}
