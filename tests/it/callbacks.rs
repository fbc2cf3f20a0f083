//! Pushed messages: verified, stored once, acknowledged, delivered.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http::Request;
use http_body_util::Full;
use pandagate::callbacks::Callbacks;
use pandagate::config::{CallbacksConfig, SubscriberConfig};
use support::client::Answer;
use support::*;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

fn push_body(order: &str) -> String {
    push_body_of("ORDER_PAY_SUCCESS", order)
}

fn push_body_of(message_type: &str, order: &str) -> String {
    serde_json::json!({
        "messageType": message_type,
        "messageBody": format!(r#"{{"orderId":"{order}","payAmount":"19.90"}}"#),
        "messagePlatform": 1,
        "timestamp": "1715669977082",
    })
    .to_string()
}

/// hex HMAC-SHA256 with the default profile's secret, written out here.
fn sign(body: &str, key: &str) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

struct Receiver {
    callbacks: Arc<Callbacks>,
    addr: std::net::SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    /// Stops serving and delivering, and releases the store.
    async fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        for _ in 0..200 {
            if Arc::strong_count(&self.callbacks) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("deliveries still hold the store");
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

fn callbacks_config(store: &std::path::Path, subscriber: &str, max_age_ms: u64) -> CallbacksConfig {
    CallbacksConfig {
        store: store.to_owned(),
        backoff_base_ms: 20,
        backoff_cap_ms: 50,
        max_age_ms,
        subscribers: vec![SubscriberConfig {
            url: subscriber.to_owned(),
            message_types: Some(vec!["ORDER_PAY_SUCCESS".into()]),
            platforms: None,
        }],
        ..CallbacksConfig::default()
    }
}

async fn receiver(store: &std::path::Path, subscriber: &str, max_age_ms: u64) -> Receiver {
    start(callbacks_config(store, subscriber, max_age_ms)).await
}

async fn start(cfg: CallbacksConfig) -> Receiver {
    start_trusting(cfg, &pandagate::config::TlsConfig::default()).await
}

/// A receiver whose deliveries to `https://` subscribers trust what `tls`
/// says.
async fn start_trusting(cfg: CallbacksConfig, tls: &pandagate::config::TlsConfig) -> Receiver {
    let gw = spawn_gateway(config("http://127.0.0.1:9")).await;
    // A receiver stopped just before may still hold the store for a moment
    // (a store call it started runs on a blocking thread): wait for it.
    let mut opened = Callbacks::new(cfg.clone(), gw.gateway.profiles());
    for _ in 0..200 {
        if opened.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        opened = Callbacks::new(cfg.clone(), gw.gateway.profiles());
    }
    let callbacks = opened.expect("the store opens within 2 s");
    gw.stop().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cb = callbacks.clone();
    let server = tokio::spawn(pandagate::server::serve(
        listener,
        move |req| {
            let cb = cb.clone();
            async move { cb.receive(req).await }
        },
        pandagate::server::ServerOptions::from(&pandagate::config::ServerConfig::default()),
        std::future::pending(),
    ));
    let trust = pandagate::tls::Trust::load(tls).unwrap();
    let deliveries = tokio::spawn(callbacks.clone().run_deliveries(trust));
    Receiver {
        callbacks,
        addr,
        tasks: vec![server, deliveries],
    }
}

async fn push(r: &Receiver, body: &str, authorization: Option<&str>) -> Answer {
    let mut req = Request::post(format!("http://{}/callbacks/pandapon", r.addr));
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    send(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await
}

async fn wait_for(server: &MockServer, n: usize) -> Vec<wiremock::Request> {
    for _ in 0..300 {
        let got = server.received_requests().await.unwrap();
        if got.len() >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.received_requests().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_push_is_acknowledged_stored_once_and_delivered_decoded() {
    let subscriber = upstream_answering(ResponseTemplate::new(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let r = receiver(dir.path(), &format!("{}/events", subscriber.uri()), 60_000).await;
    let body = push_body("A1");
    // Either hex case is accepted.
    assert_eq!(
        push(&r, &body, Some(&sign(&body, SECRET))).await.status,
        200
    );
    assert_eq!(
        push(&r, &body, Some(&sign(&body, SECRET).to_uppercase()))
            .await
            .status,
        200
    );

    let got = wait_for(&subscriber, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got_after = subscriber.received_requests().await.unwrap();
    assert_eq!(got_after.len(), 1, "the duplicate push was stored once");
    let delivered: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(delivered["messageType"], "ORDER_PAY_SUCCESS");
    assert_eq!(
        delivered["messageBody"]["orderId"], "A1",
        "messageBody decoded"
    );
    assert_eq!(delivered["messagePlatform"], 1);
    assert_eq!(delivered["timestamp"], "1715669977082");
    assert_eq!(got[0].headers["x-pandagate-delivery-id"].len(), 32);
    assert!(
        r.callbacks
            .local_store()
            .unwrap()
            .pending()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_or_missing_signatures_get_401_and_are_never_delivered() {
    let subscriber = upstream_answering(ResponseTemplate::new(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let r = receiver(dir.path(), &subscriber.uri(), 60_000).await;
    let body = push_body("F1");
    push(&r, &body, None).await.assert_gateway_envelope(401);
    push(&r, &body, Some(&sign(&body, "not-the-secret")))
        .await
        .assert_gateway_envelope(401);
    push(&r, &body, Some("zz-not-hex"))
        .await
        .assert_gateway_envelope(401);
    let tampered = push_body("F2");
    push(&r, &tampered, Some(&sign(&body, SECRET)))
        .await
        .assert_gateway_envelope(401);
    push(&r, "not json", Some(&sign("not json", SECRET)))
        .await
        .assert_gateway_envelope(400);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(subscriber.received_requests().await.unwrap().is_empty());
    assert!(
        r.callbacks
            .local_store()
            .unwrap()
            .pending()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_subscriber_gets_the_message_once_it_recovers_with_the_same_delivery_id() {
    let subscriber = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(3)
        .with_priority(1)
        .mount(&subscriber)
        .await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .mount(&subscriber)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let r = receiver(dir.path(), &subscriber.uri(), 60_000).await;
    let body = push_body("R1");
    assert_eq!(
        push(&r, &body, Some(&sign(&body, SECRET))).await.status,
        200
    );
    let got = wait_for(&subscriber, 4).await;
    assert_eq!(got.len(), 4);
    let ids: Vec<_> = got
        .iter()
        .map(|g| g.headers["x-pandagate-delivery-id"].clone())
        .collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "stable across redeliveries"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        subscriber.received_requests().await.unwrap().len(),
        4,
        "no delivery after the 200"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_pending_at_a_stop_are_made_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://{}", dead_address());
    let r = receiver(dir.path(), &down, 60_000).await;
    let body = push_body("S1");
    assert_eq!(
        push(&r, &body, Some(&sign(&body, SECRET))).await.status,
        200
    );
    assert_eq!(
        r.callbacks.local_store().unwrap().pending().unwrap().len(),
        1
    );
    r.stop().await; // stopped with the delivery pending
    // Same store, subscriber now up at the same address.
    let addr = down.trim_start_matches("http://").to_owned();
    let listener = std::net::TcpListener::bind(&addr).unwrap();
    let subscriber = MockServer::builder().listener(listener).start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .mount(&subscriber)
        .await;
    let _r = receiver(dir.path(), &down, 60_000).await;
    let got = wait_for(&subscriber, 1).await;
    assert_eq!(got.len(), 1, "delivered after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_deliveries_become_dead_letters_and_can_be_replayed() {
    let subscriber = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let r = receiver(dir.path(), &subscriber.uri(), 100).await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(500))
        .mount(&subscriber)
        .await;
    let body = push_body("D1");
    assert_eq!(
        push(&r, &body, Some(&sign(&body, SECRET))).await.status,
        200
    );
    let mut dead = Vec::new();
    for _ in 0..200 {
        dead = r.callbacks.local_store().unwrap().dead().unwrap();
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(dead.len(), 1, "dead-lettered after max_age_ms");
    assert!(
        r.callbacks
            .local_store()
            .unwrap()
            .pending()
            .unwrap()
            .is_empty()
    );

    subscriber.reset().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .mount(&subscriber)
        .await;
    assert_eq!(
        r.callbacks.local_store().unwrap().replay(None, 0).unwrap(),
        1
    );
    let got = wait_for(&subscriber, 1).await;
    assert_eq!(got.len(), 1, "replayed and delivered");
}

/// Fails every fifth request; counts the 200s each delivery id got.
struct Flaky {
    seen: std::sync::atomic::AtomicUsize,
    acked: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl wiremock::Respond for Flaky {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let delay = Duration::from_millis(5 + (n % 7) as u64 * 5);
        if n.is_multiple_of(5) {
            return ResponseTemplate::new(503).set_delay(delay);
        }
        let id = request.headers["x-pandagate-delivery-id"]
            .to_str()
            .unwrap()
            .to_owned();
        *self.acked.lock().unwrap().entry(id).or_default() += 1;
        ResponseTemplate::new(200).set_delay(delay)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_with_failures_no_delivery_is_made_again_after_its_200() {
    let flaky = Arc::new(Flaky {
        seen: Default::default(),
        acked: Default::default(),
    });
    struct Shared(Arc<Flaky>);
    impl wiremock::Respond for Shared {
        fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
            self.0.respond(request)
        }
    }
    let subscriber = MockServer::start().await;
    Mock::given(any())
        .respond_with(Shared(flaky.clone()))
        .mount(&subscriber)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let r = receiver(dir.path(), &subscriber.uri(), 60_000).await;
    const MESSAGES: usize = 150;
    for i in 0..MESSAGES {
        let body = push_body(&format!("L{i}"));
        assert_eq!(
            push(&r, &body, Some(&sign(&body, SECRET))).await.status,
            200
        );
    }
    for _ in 0..500 {
        if flaky.acked.lock().unwrap().len() == MESSAGES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give any stray resend time to show itself.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let acked = flaky.acked.lock().unwrap().clone();
    assert_eq!(acked.len(), MESSAGES, "every message delivered");
    let twice: Vec<_> = acked.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered again after a 200: {twice:?}");
    assert!(
        flaky.seen.load(std::sync::atomic::Ordering::SeqCst) > MESSAGES,
        "some deliveries were retried"
    );
    r.stop().await;
}

/// The store's id of a pushed body.
fn message_id(body: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes()))
}

/// Polls `done` every 20 ms for up to `limit`; true once it holds.
async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// Answers the first request with a 503 after a second, later ones with a
/// 200 at once; notes when each came.
struct Clocked(Arc<std::sync::Mutex<Vec<Instant>>>);

impl wiremock::Respond for Clocked {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let mut times = self.0.lock().unwrap();
        times.push(Instant::now());
        if times.len() == 1 {
            ResponseTemplate::new(503).set_delay(Duration::from_secs(1))
        } else {
            ResponseTemplate::new(200)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_loop_sleeps_while_an_attempt_runs_and_until_the_retry_is_due_then_retries_on_time()
 {
    let times: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let subscriber = MockServer::start().await;
    Mock::given(any())
        .respond_with(Clocked(times.clone()))
        .mount(&subscriber)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = callbacks_config(dir.path(), &subscriber.uri(), 60_000);
    cfg.backoff_base_ms = 3_000;
    cfg.backoff_cap_ms = 3_000;
    let r = start(cfg).await;
    let body = push_body("T1");
    assert_eq!(
        push(&r, &body, Some(&sign(&body, SECRET))).await.status,
        200
    );
    let key = pandagate::callbacks::store::key(&message_id(&body), &subscriber.uri());
    let store = r.callbacks.local_store().unwrap();
    // A delivery in flight is still due in the store until its attempt
    // ends: the loop waits for the attempt, it does not spin on the row.
    let sent = eventually(Duration::from_secs(5), || !times.lock().unwrap().is_empty()).await;
    assert!(sent, "the first attempt went out");
    let before = store.scans();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let scans = store.scans() - before;
    assert!(
        scans <= 2,
        "{scans} reads of the store in 0.7 s of one delivery in flight"
    );
    let rescheduled = eventually(Duration::from_secs(5), || {
        store
            .pending_one(&key)
            .unwrap()
            .is_some_and(|d| d.attempts == 1)
    })
    .await;
    assert!(rescheduled, "the first attempt failed and was rescheduled");

    // Nothing is due for 3 s and nothing else happens: the loop sleeps.
    let before = store.scans();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let scans = store.scans() - before;
    assert!(
        scans <= 2,
        "{scans} reads of the store in 1.5 s of nothing due"
    );

    // And wakes up for the retry on time: the first attempt's second, then
    // the 3 s backoff.
    let retried = eventually(Duration::from_secs(5), || times.lock().unwrap().len() >= 2).await;
    assert!(retried, "the rescheduled delivery went out");
    let times = times.lock().unwrap().clone();
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(3_900) && gap <= Duration::from_millis(4_800),
        "retried {gap:?} after the first attempt began, 4 s wanted"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_message_is_pruned_after_retain_ms_and_a_repeat_within_it_is_delivered_once() {
    let subscriber = upstream_answering(ResponseTemplate::new(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = callbacks_config(dir.path(), &subscriber.uri(), 60_000);
    cfg.retain_ms = 1_000;
    let r = start(cfg).await;
    // Pruning passes come every retain_ms here, the first at the start:
    // pushed half-way between two, the message meets one pass inside its
    // window and must outlive it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = push_body("P1");
    let id = message_id(&body);
    let pushed = Instant::now();
    assert_eq!(
        push(&r, &body, Some(&sign(&body, SECRET))).await.status,
        200
    );
    assert_eq!(wait_for(&subscriber, 1).await.len(), 1);
    // Within retain_ms: acknowledged, a duplicate, not delivered again.
    assert_eq!(
        push(&r, &body, Some(&sign(&body, SECRET))).await.status,
        200
    );
    let counts = &r.callbacks.counts;
    assert_eq!(counts.stored.load(Ordering::Relaxed), 1);
    assert_eq!(counts.duplicates.load(Ordering::Relaxed), 1);
    let store = r.callbacks.local_store().unwrap();
    assert!(store.message(&id).unwrap().is_some());

    let pruned = eventually(Duration::from_secs(6), || {
        store.message(&id).unwrap().is_none()
    })
    .await;
    assert!(pruned, "the delivered message is pruned");
    assert!(
        pushed.elapsed() >= Duration::from_millis(1_000),
        "not before retain_ms"
    );
    assert_eq!(subscriber.received_requests().await.unwrap().len(), 1);

    // Pruned, the same body is a new message: stored and delivered again.
    assert_eq!(
        push(&r, &body, Some(&sign(&body, SECRET))).await.status,
        200
    );
    assert_eq!(counts.stored.load(Ordering::Relaxed), 2);
    assert_eq!(wait_for(&subscriber, 2).await.len(), 2);
    r.stop().await;
}

/// `ok` gets ORDER_PAY_SUCCESS, `down` ORDER_CANCEL; messages are kept 300 ms.
fn two_subscribers(
    dir: &std::path::Path,
    ok: &str,
    down: &str,
    max_age_ms: u64,
) -> CallbacksConfig {
    let mut cfg = callbacks_config(dir, ok, max_age_ms);
    cfg.retain_ms = 300;
    cfg.subscribers.push(SubscriberConfig {
        url: down.to_owned(),
        message_types: Some(vec!["ORDER_CANCEL".into()]),
        platforms: None,
    });
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_a_dead_delivery_is_kept_past_retain_ms_and_can_be_replayed() {
    let ok = upstream_answering(ResponseTemplate::new(200)).await;
    let down = upstream_answering(ResponseTemplate::new(500)).await;
    let dir = tempfile::tempdir().unwrap();
    let r = start(two_subscribers(dir.path(), &ok.uri(), &down.uri(), 100)).await;
    let store = r.callbacks.local_store().unwrap();
    let kept = push_body_of("ORDER_CANCEL", "K1");
    assert_eq!(
        push(&r, &kept, Some(&sign(&kept, SECRET))).await.status,
        200
    );
    let dead = eventually(Duration::from_secs(5), || store.dead().unwrap().len() == 1).await;
    assert!(dead, "dead-lettered after max_age_ms");
    // A later, delivered message: once it is pruned, the dead letter's
    // message was past retain_ms too.
    pruned_while_kept(&r, "G1", &kept, "the dead letter's message is kept").await;

    down.reset().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .mount(&down)
        .await;
    assert_eq!(r.callbacks.replay(None).await.unwrap(), 1);
    assert_eq!(wait_for(&down, 1).await.len(), 1, "replayed and delivered");
    let pruned = eventually(Duration::from_secs(6), || {
        store.message(&message_id(&kept)).unwrap().is_none()
    })
    .await;
    assert!(pruned, "delivered at last, the message is pruned");
    r.stop().await;
}

/// Pushes a message for `order` that is delivered, waits (bounded) until
/// it is pruned, and checks that the message `kept` is still stored.
async fn pruned_while_kept(r: &Receiver, order: &str, kept: &str, why: &str) {
    let store = r.callbacks.local_store().unwrap();
    let gone = push_body(order);
    assert_eq!(push(r, &gone, Some(&sign(&gone, SECRET))).await.status, 200);
    let pruned = eventually(Duration::from_secs(6), || {
        store.message(&message_id(&gone)).unwrap().is_none()
    })
    .await;
    assert!(pruned, "the delivered message is pruned");
    assert!(store.message(&message_id(kept)).unwrap().is_some(), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_a_pending_delivery_is_kept_past_retain_ms() {
    let ok = upstream_answering(ResponseTemplate::new(200)).await;
    let down = upstream_answering(ResponseTemplate::new(500)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = two_subscribers(dir.path(), &ok.uri(), &down.uri(), 60_000);
    cfg.backoff_base_ms = 60_000;
    cfg.backoff_cap_ms = 60_000;
    let r = start(cfg).await;
    let store = r.callbacks.local_store().unwrap();
    let kept = push_body_of("ORDER_CANCEL", "K2");
    assert_eq!(
        push(&r, &kept, Some(&sign(&kept, SECRET))).await.status,
        200
    );
    let key = pandagate::callbacks::store::key(&message_id(&kept), &down.uri());
    let failed = eventually(Duration::from_secs(5), || {
        store
            .pending_one(&key)
            .unwrap()
            .is_some_and(|d| d.attempts == 1)
    })
    .await;
    assert!(failed, "first attempt failed, next one a minute away");
    pruned_while_kept(&r, "G2", &kept, "the pending delivery's message is kept").await;
    assert!(store.pending_one(&key).unwrap().is_some());
    r.stop().await;
}

/// An `https://` subscriber: a TLS stand-in with a certificate of the test
/// CA, which answers 200.
async fn tls_subscriber(ca: &support::tls::TestCa) -> support::provider_tls::TlsServer {
    support::provider_tls::TlsServer::start(&ca.server("subscriber"), 200, "{}".into()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_subscriber_trusted_through_ca_file_gets_its_delivery() {
    let ca = support::tls::TestCa::new();
    let subscriber = tls_subscriber(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = callbacks_config(dir.path(), &format!("{}/events", subscriber.url()), 60_000);
    let tls = pandagate::config::TlsConfig {
        ca_file: Some(ca.ca_file.clone()),
        ..Default::default()
    };
    let r = start_trusting(cfg, &tls).await;
    let body = push_body("TLS-1");
    assert_eq!(
        push(&r, &body, Some(&sign(&body, SECRET))).await.status,
        200
    );

    assert!(
        eventually(Duration::from_secs(5), || !subscriber.requests().is_empty()).await,
        "delivered over TLS within 5 s"
    );
    let got = subscriber.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].sni.as_deref(), Some("localhost"));
    assert_eq!(got[0].method, http::Method::POST);
    assert_eq!(got[0].uri.path(), "/events");
    assert_eq!(got[0].header("x-pandagate-delivery-id").len(), 32);
    let delivered: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(delivered["messageBody"]["orderId"], "TLS-1");
    assert!(
        eventually(Duration::from_secs(5), || {
            r.callbacks
                .local_store()
                .unwrap()
                .pending()
                .unwrap()
                .is_empty()
        })
        .await
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_subscriber_with_an_untrusted_certificate_gets_nothing_and_the_delivery_says_why()
{
    let ca = support::tls::TestCa::new();
    let subscriber = tls_subscriber(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = callbacks_config(dir.path(), &format!("{}/events", subscriber.url()), 60_000);
    // The bundled roots alone: the test CA is not among them.
    let r = start(cfg).await;
    let body = push_body("TLS-2");
    assert_eq!(
        push(&r, &body, Some(&sign(&body, SECRET))).await.status,
        200
    );

    let store = r.callbacks.local_store().unwrap();
    let tried = |min: u32| {
        let pending = store.pending().unwrap();
        pending.first().is_some_and(|d| d.attempts >= min)
    };
    assert!(
        eventually(Duration::from_secs(5), || tried(2)).await,
        "tried twice within 5 s"
    );
    let pending = store.pending().unwrap();
    let last_error = pending[0].last_error.clone().unwrap_or_default();
    assert!(
        last_error.contains(&format!("TLS with {} failed", subscriber.authority()))
            && last_error.contains("does not trust"),
        "{last_error}"
    );
    assert!(subscriber.requests().is_empty(), "nothing was posted");
    assert_eq!(subscriber.handshakes(), 0);
    r.stop().await;
}
