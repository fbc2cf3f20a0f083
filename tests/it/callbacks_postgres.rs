//! Pushed messages on PostgreSQL: any replica receives, every replica
//! delivers, and nothing acknowledged is lost to a killed replica or a
//! restarted database. Against a real PostgreSQL server started here.

use crate::support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pandagate::callbacks::postgres::{PgStore, SCHEMA_VERSION, TAKEOVER_GRACE, probe};
use pandagate::callbacks::store::{Delivery, Message};
use pandagate::config::{CallbackBackend, CallbacksConfig, PostgresUrl};
use pandagate::tls::WithTrust;
use support::postgres_server::{self, PostgresServer};
use support::tls;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

const SECRET: &str = "sk-callbacks-postgres";

fn store_config() -> CallbacksConfig {
    CallbacksConfig {
        backend: CallbackBackend::Postgres,
        postgres_pool_size: 4,
        ..CallbacksConfig::default()
    }
}

fn url(pg: &PostgresServer) -> WithTrust<PostgresUrl> {
    tls::with_default_trust(PostgresUrl::parse(&pg.url(), "test").unwrap())
}

fn message(at: u64) -> Message {
    Message {
        received_at_ms: at,
        message_type: "ORDER_CANCEL".into(),
        message_body: r#"{"orderId":"1"}"#.into(),
        message_platform: 0.into(),
        timestamp: "1715669977082".into(),
    }
}

fn delivery(id: &str, subscriber: &str, at: u64) -> Delivery {
    Delivery {
        message_id: id.into(),
        subscriber: subscriber.into(),
        attempts: 0,
        first_at_ms: at,
        next_at_ms: at,
        last_error: None,
    }
}

/// Every pending (or dead) delivery, for these small sets: one page.
async fn listed(s: &PgStore, dead: bool) -> Vec<Delivery> {
    let page = s.page(dead, None, 1000).await.unwrap();
    assert_eq!(page.next, None, "one page holds them all");
    page.deliveries
}

#[tokio::test]
async fn replicas_starting_together_migrate_once_and_share_the_schema() {
    let pg = PostgresServer::start();
    let (c, u) = (store_config(), url(&pg));
    assert_eq!(
        probe(&c, &u).await.unwrap(),
        0,
        "no schema before the first start"
    );
    let opened = futures_join(PgStore::open(&c, &u), PgStore::open(&c, &u)).await;
    let (a, b) = (opened.0.unwrap(), opened.1.unwrap());
    assert_eq!(a.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(b.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(probe(&c, &u).await.unwrap(), SCHEMA_VERSION);
    // Opening again changes nothing.
    let again = PgStore::open(&c, &u).await.unwrap();
    assert_eq!(again.schema_version().await.unwrap(), SCHEMA_VERSION);
}

async fn futures_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

#[tokio::test]
async fn a_claim_is_one_replicas_until_its_lease_passes() {
    let pg = PostgresServer::start();
    let (c, u) = (store_config(), url(&pg));
    let a = PgStore::open(&c, &u).await.unwrap();
    let b = PgStore::open(&c, &u).await.unwrap();
    let d = delivery("m1", "http://s/1", 1_000);
    assert!(
        a.insert("m1", &message(1_000), std::slice::from_ref(&d))
            .await
            .unwrap()
    );
    assert!(
        !b.insert("m1", &message(1_000), &[d]).await.unwrap(),
        "stored once"
    );

    let lease = Duration::from_millis(300);
    let now = pandagate::idempotency::now_ms();
    let on_a = a.claim(now, 10, lease).await.unwrap();
    assert_eq!(on_a.deliveries.len(), 1);
    let on_b = b.claim(now, 10, lease).await.unwrap();
    assert!(on_b.deliveries.is_empty(), "held by a");
    // b's clock an hour ahead: the lease is the database's, still a's.
    let skewed = b.claim(now + 3_600_000, 10, lease).await.unwrap();
    assert!(
        skewed.deliveries.is_empty(),
        "held by a, whatever b's clock says"
    );
    let next = on_b.next_at_ms.expect("when a's lease passes");
    assert!(next >= now + 300 && next <= now + 400, "{next} vs {now}");

    // a is gone; its lease passes; b takes the delivery.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let now = pandagate::idempotency::now_ms();
    let on_b = b.claim(now, 10, lease).await.unwrap();
    assert_eq!(on_b.deliveries.len(), 1);
    // a comes back with its old claim: nothing it says is recorded.
    a.delivered(&on_a.deliveries[0]).await.unwrap();
    assert_eq!(listed(&b, false).await.len(), 1);
    b.delivered(&on_b.deliveries[0]).await.unwrap();
    assert!(listed(&b, false).await.is_empty());
}

#[tokio::test]
async fn failures_reschedule_then_bury_and_replay_and_prune_keep_their_rules() {
    let pg = PostgresServer::start();
    let (c, u) = (store_config(), url(&pg));
    let s = PgStore::open(&c, &u).await.unwrap();
    let subs = ["http://s/1", "http://s/2"];
    let ds: Vec<_> = subs.iter().map(|x| delivery("m2", x, 10)).collect();
    s.insert("m2", &message(10), &ds).await.unwrap();
    s.insert("m3", &message(20), &[]).await.unwrap();

    let lease = Duration::from_secs(30);
    let mut claimed = s.claim(100, 10, lease).await.unwrap().deliveries;
    assert_eq!(claimed.len(), 2);
    let mut first = claimed.remove(0);
    first.attempts = 1;
    first.next_at_ms = 5_000;
    first.last_error = Some("HTTP 500".into());
    s.reschedule(&first).await.unwrap();
    let mut second = claimed.remove(0);
    second.attempts = 3;
    second.last_error = Some("timed out".into());
    s.bury(&second).await.unwrap();

    let pending = listed(&s, false).await;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].attempts, 1);
    assert_eq!(pending[0].next_at_ms, 5_000);
    assert_eq!(pending[0].last_error.as_deref(), Some("HTTP 500"));
    let dead = listed(&s, true).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_error.as_deref(), Some("timed out"));
    // Not due before its time; due after.
    assert!(
        s.claim(4_999, 10, lease)
            .await
            .unwrap()
            .deliveries
            .is_empty()
    );
    assert_eq!(s.claim(5_000, 10, lease).await.unwrap().deliveries.len(), 1);

    // Only messages with no delivery left are pruned, oldest first.
    let pruned = s.prune(1_000_000, 10).await.unwrap();
    assert_eq!(pruned.removed, 1, "m3 only");
    assert!(s.message("m3").await.unwrap().is_none());
    assert!(s.message("m2").await.unwrap().is_some());

    assert_eq!(s.replay(Some(&dead[0].key()), 7_000).await.unwrap(), 1);
    assert!(listed(&s, true).await.is_empty());
    assert_eq!(s.replay(None, 7_000).await.unwrap(), 0);
}

/// A subscriber that records each POST's delivery id and when it came and
/// was answered; it answers 200 after `delay`.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, Instant, Instant)>>>);

impl Seen {
    fn ids(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (id, _, _) in self.0.lock().unwrap().iter() {
            *counts.entry(id.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Ids whose POST had arrived by `at` and not been answered.
    fn in_flight_at(&self, at: Instant) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, came, answered)| *came <= at && *answered >= at)
            .map(|(id, _, _)| id.clone())
            .collect()
    }
}

async fn subscriber(delay: Duration) -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                while let Some((head, _)) = support::wire::read_request(&mut stream).await {
                    let came = Instant::now();
                    tokio::time::sleep(delay).await;
                    let id = support::wire::head_field(&head, "x-pandagate-delivery-id")
                        .unwrap_or_default()
                        .to_owned();
                    let answered = Instant::now();
                    record.0.lock().unwrap().push((id, came, answered));
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if stream.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}/events"), seen)
}

fn gateway_config(dir: &std::path::Path, pg: &PostgresServer, subscriber: &str) -> String {
    gateway_config_timing(dir, pg, subscriber, 1000)
}

fn gateway_config_timing(
    dir: &std::path::Path,
    pg: &PostgresServer,
    subscriber: &str,
    delivery_timeout_ms: u64,
) -> String {
    let path = dir.join("pandagate.toml");
    std::fs::write(
        &path,
        format!(
            "[callbacks]\nbackend = \"postgres\"\npostgres_url_env = \"PG_URL\"\n\
             delivery_timeout_ms = {delivery_timeout_ms}\nbackoff_base_ms = 50\nbackoff_cap_ms = 200\n\
             [[callbacks.subscribers]]\nurl = \"{subscriber}\"\n"
        ),
    )
    .unwrap();
    let _ = pg;
    path.to_str().unwrap().to_owned()
}

async fn replica(config: &str, pg: &PostgresServer) -> support::binary::Running {
    replica_of(config, &pg.url()).await
}

async fn replica_of(config: &str, url: &str) -> support::binary::Running {
    support::launch(
        &["--config", config],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", SECRET),
            ("PANDAGATE_UPSTREAM", "http://127.0.0.1:9"),
            ("PG_URL", url),
        ],
    )
    .await
}

/// Waits (bounded) until `n` distinct delivery ids were answered.
async fn delivered(seen: &Seen, n: usize, within: Duration) -> HashMap<String, usize> {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if seen.ids().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen.ids()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_receives_and_each_message_is_stored_once_and_delivered() {
    let pg = PostgresServer::start();
    let (sub, seen) = subscriber(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), &pg, &sub);
    let a = replica(&config, &pg).await;
    let b = replica(&config, &pg).await;
    for i in 0..20 {
        let on = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            support::push_signed(&on.gateway, SECRET, &format!("P{i}")).await,
            200
        );
    }
    // The provider pushing the same message again, to the other replica.
    assert_eq!(support::push_signed(&b.gateway, SECRET, "P0").await, 200);
    let ids = delivered(&seen, 20, Duration::from_secs(20)).await;
    assert_eq!(ids.len(), 20, "every message delivered: {ids:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids = seen.ids();
    assert_eq!(ids.len(), 20, "stored once each");
    assert!(ids.values().all(|n| *n == 1), "each posted once: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_delivery_loses_nothing() {
    let pg = PostgresServer::start();
    // Each delivery takes the subscriber 1.5 s: the kill finds some in flight.
    let (sub, seen) = subscriber(Duration::from_millis(1_500)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config_timing(dir.path(), &pg, &sub, 3_000);
    let mut a = replica(&config, &pg).await;
    let b = replica(&config, &pg).await;
    for i in 0..30 {
        let on = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            support::push_signed(&on.gateway, SECRET, &format!("K{i}")).await,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.signal("-KILL");
    let killed = Instant::now();
    let _ = a.child.wait().await;
    let before_kill = seen.ids().len();
    assert!(
        before_kill < 30,
        "deliveries were still under way at the kill"
    );

    // The survivor takes the dead one's deliveries once their lease
    // (delivery_timeout_ms + 5 s) passes: nothing is left pending.
    let mut pending = serde_json::Value::Null;
    for _ in 0..600 {
        pending = admin_json(&b.admin, "/callbacks").await;
        if pending == none_listed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending, none_listed(), "all delivered within 60 s");
    let ids = seen.ids();
    assert_eq!(
        ids.len(),
        30,
        "every acknowledged message delivered: {ids:?}"
    );
    let in_flight = seen.in_flight_at(killed);
    let mut again = 0;
    for (id, n) in &ids {
        assert!(
            *n == 1 || (*n == 2 && in_flight.contains(id)),
            "{id} posted {n} times; in flight at the kill: {in_flight:?}"
        );
        again += usize::from(*n == 2);
    }
    assert!(
        again >= 1,
        "the killed replica's deliveries were taken over and posted again"
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_refuses_pushes_meanwhile_and_loses_none_acknowledged() {
    let mut pg = PostgresServer::start();
    let (sub, seen) = subscriber(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), &pg, &sub);
    let gw = replica(&config, &pg).await;
    let mut acknowledged = 0;
    for i in 0..5 {
        assert_eq!(
            support::push_signed(&gw.gateway, SECRET, &format!("R{i}")).await,
            200
        );
        acknowledged += 1;
    }
    pg.stop();
    for i in 5..8 {
        let at = Instant::now();
        let status = support::push_signed(&gw.gateway, SECRET, &format!("R{i}")).await;
        assert_eq!(status, 503, "not acknowledged while the database is down");
        assert!(
            at.elapsed() < Duration::from_millis(1_000),
            "{:?}",
            at.elapsed()
        );
    }
    pg.resume();
    // The pool reconnects; pushes are stored again.
    let mut again = 0;
    for i in 8..40 {
        if support::push_signed(&gw.gateway, SECRET, &format!("R{i}")).await == 200 {
            acknowledged += 1;
            again += 1;
        }
        if again == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(again, 5, "pushes acknowledged again after the restart");
    let ids = delivered(&seen, acknowledged, Duration::from_secs(30)).await;
    assert_eq!(
        ids.len(),
        acknowledged,
        "none acknowledged is lost: {ids:?}"
    );
}

#[tokio::test]
async fn check_says_whether_the_database_answers_and_its_schema_is_current() {
    let pg = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), &pg, "http://127.0.0.1:9/e");
    let check = |url: String| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pandagate"))
            .args(["check", "--config", &config])
            .env_clear()
            .env("PANDAPON_ACCESS_KEY", "ak")
            .env("PANDAPON_ACCESS_SECRET", SECRET)
            .env("PG_URL", url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(!text.contains("pw-check-9"), "{text}");
        text
    };
    let with_password = format!(
        "postgres://pandagate:pw-check-9@127.0.0.1:{}/postgres",
        pg.port
    );
    let before = check(with_password.clone());
    assert!(
        before.contains("schema version 0; it is migrated to"),
        "{before}"
    );
    PgStore::open(&store_config(), &url(&pg)).await.unwrap();
    let after = check(with_password);
    assert!(
        after.contains(&format!("schema version {SCHEMA_VERSION} (current)")),
        "{after}"
    );
    let dead = support::dead_address();
    let away = check(format!("postgres://pandagate:pw-check-9@{dead}/postgres"));
    assert!(away.contains("PostgreSQL unreachable"), "{away}");
}

/// A listing's answer when nothing is listed.
fn none_listed() -> serde_json::Value {
    serde_json::json!({ "deliveries": [], "next": null })
}

/// `GET` on one replica's admin listener; the JSON answer.
async fn admin_json(admin: &str, target: &str) -> serde_json::Value {
    let answer = support::get(&format!("http://{admin}{target}")).await;
    serde_json::from_slice(&answer.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_and_replay_dead_letters_from_any_replica() {
    let pg = PostgresServer::start();
    let refusing = support::dead_address();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pandagate.toml");
    std::fs::write(
        &path,
        format!(
            "[callbacks]\nbackend = \"postgres\"\npostgres_url_env = \"PG_URL\"\n\
             max_age_ms = 100\nbackoff_base_ms = 20\nbackoff_cap_ms = 50\n\
             [[callbacks.subscribers]]\nurl = \"http://{refusing}/events\"\n"
        ),
    )
    .unwrap();
    let config = path.to_str().unwrap().to_owned();
    let a = replica(&config, &pg).await;
    let b = replica(&config, &pg).await;
    assert_eq!(support::push_signed(&a.gateway, SECRET, "D1").await, 200);

    let mut dead = serde_json::Value::Null;
    for _ in 0..250 {
        dead = admin_json(&b.admin, "/callbacks?dead=1").await;
        if dead["deliveries"].as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dead = dead["deliveries"].as_array().expect("a JSON list").clone();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0]["attempts"].as_u64().unwrap() >= 1);
    assert_eq!(
        dead[0]["last_error"].as_str().map(|e| !e.is_empty()),
        Some(true)
    );
    assert_eq!(admin_json(&a.admin, "/callbacks").await, none_listed());

    // Replayed through the other replica: pending again, then dead again.
    let id = dead[0]["delivery_id"].as_str().unwrap();
    let req = http::Request::post(format!("http://{}/callbacks/replay?id={id}", a.control))
        .body(http_body_util::Full::default())
        .unwrap();
    let answer = support::send(req).await;
    assert!(
        String::from_utf8_lossy(&answer.body).contains(r#""replayed":1"#),
        "{:?}",
        answer.body
    );
    let metrics = support::get(&format!("http://{}/metrics", a.admin)).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("pandagate_callbacks_claim_lag_seconds_count"),
        "{text}"
    );
    // Every series has a help text ending in one period.
    for help in text.lines().filter(|l| l.starts_with("# HELP ")) {
        assert!(help.ends_with('.') && !help.ends_with(".."), "{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_while_the_database_is_down_serves_and_takes_pushes_once_it_is_up() {
    let mut pg = PostgresServer::start();
    pg.stop();
    let (sub, seen) = subscriber(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), &pg, &sub);
    let gw = replica(&config, &pg).await;
    // The gateway is up (it also proxies calls); pushes are not taken yet.
    let health = support::get(&format!("http://{}/healthz", gw.admin)).await;
    assert_eq!(health.status, 200);
    assert_eq!(support::push_signed(&gw.gateway, SECRET, "U0").await, 503);
    pg.resume();
    let mut taken = false;
    for _ in 0..100 {
        if support::push_signed(&gw.gateway, SECRET, "U1").await == 200 {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(taken, "pushes taken within 10 s of the database coming up");
    let ids = delivered(&seen, 1, Duration::from_secs(10)).await;
    assert_eq!(ids.len(), 1, "{ids:?}");
}

/// A subscriber that, at the first POST it gets, stops the database, then
/// answers 200 (the gateway has its acknowledgement while the database is
/// down) and starts the database again `down` later; it records every POST
/// like [`subscriber`]. Also gives when the database was started again.
async fn subscriber_stopping_the_database(
    pg: Arc<Mutex<PostgresServer>>,
    down: Duration,
) -> (String, Seen, Arc<Mutex<Option<Instant>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let back = Arc::new(Mutex::new(None));
    let (record, resumed) = (seen.clone(), back.clone());
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (record, resumed, first, pg) =
                (record.clone(), resumed.clone(), first.clone(), pg.clone());
            tokio::spawn(async move {
                while let Some((head, _)) = support::wire::read_request(&mut stream).await {
                    let came = Instant::now();
                    if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        let stopping = pg.clone();
                        tokio::task::spawn_blocking(move || stopping.lock().unwrap().stop())
                            .await
                            .unwrap();
                        let (starting, resumed) = (pg.clone(), resumed.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(down).await;
                            tokio::task::spawn_blocking(move || starting.lock().unwrap().resume())
                                .await
                                .unwrap();
                            *resumed.lock().unwrap() = Some(Instant::now());
                        });
                    }
                    let id = support::wire::head_field(&head, "x-pandagate-delivery-id")
                        .unwrap_or_default()
                        .to_owned();
                    record.0.lock().unwrap().push((id, came, Instant::now()));
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if stream.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}/events"), seen, back)
}

/// The value of counter `name` in one replica's `/metrics`.
async fn counter(admin: &str, name: &str) -> u64 {
    let metrics = support::get(&format!("http://{admin}/metrics")).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

/// Rows left in the deliveries table, read straight from the database.
async fn rows_left(url: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let n = client
        .query_one("SELECT count(*) FROM pandagate_callback_deliveries", &[])
        .await
        .unwrap()
        .get(0);
    driver.abort();
    n
}

/// Two replicas; the one delivering gets its subscriber's 200 while the
/// database is down for `down`. Watched until well past the delivery's
/// lease and the database's return: the subscriber gets that delivery
/// once, and the database ends with it recorded as delivered.
async fn acknowledged_while_the_database_is_down(down: Duration) {
    let pg = Arc::new(Mutex::new(PostgresServer::start()));
    let (sub, seen, back) = subscriber_stopping_the_database(pg.clone(), down).await;
    let dir = tempfile::tempdir().unwrap();
    // A lease of delivery_timeout_ms + 5 s = 7 s.
    let lease = Duration::from_secs(7);
    let config = gateway_config_timing(dir.path(), &pg.lock().unwrap(), &sub, 2_000);
    let pg_url = pg.lock().unwrap().url();
    let a = replica_of(&config, &pg_url).await;
    let b = replica_of(&config, &pg_url).await;
    assert_eq!(support::push_signed(&a.gateway, SECRET, "B1").await, 200);
    let ids = delivered(&seen, 1, Duration::from_secs(10)).await;
    assert_eq!(ids.len(), 1, "posted once the push was stored");
    let answered = seen.0.lock().unwrap()[0].2;

    // Past the lease's end and the database's return, by the takeover
    // grace after that, plus the loops' longest sleep (5 s) and a second.
    let until = Instant::now() + Duration::from_secs(40);
    while back.lock().unwrap().is_none() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed = back.lock().unwrap().expect("the database started again");
    let watch_until =
        (answered + lease).max(resumed + Duration::from_secs(5)) + Duration::from_secs(6);
    tokio::time::sleep_until(watch_until).await;

    let ids = seen.ids();
    assert_eq!(
        ids.values().copied().collect::<Vec<_>>(),
        [1],
        "the acknowledged delivery was posted once: {ids:?}"
    );
    assert_eq!(rows_left(&pg_url).await, 0, "recorded as delivered");
    let counted = counter(&a.admin, "pandagate_callbacks_delivered_total").await
        + counter(&b.admin, "pandagate_callbacks_delivered_total").await;
    assert_eq!(counted, 1, "counted once");
    drop((a, b));
    pg.lock().unwrap().stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_delivery_is_posted_once_when_the_database_blips_before_it_is_recorded() {
    acknowledged_while_the_database_is_down(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_delivery_is_posted_once_when_the_database_is_down_past_its_lease() {
    acknowledged_while_the_database_is_down(Duration::from_secs(10)).await;
}

/// `op` once the store answers again after a restart (its pooled
/// connections were broken), within 10 s.
async fn once_back<
    T,
    F: std::future::Future<Output = Result<T, pandagate::callbacks::postgres::PgError>>,
>(
    mut op: impl FnMut() -> F,
) -> T {
    for _ in 0..100 {
        if let Ok(v) = op().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the store did not answer within 10 s");
}

#[tokio::test]
async fn an_outcome_lands_while_the_row_is_this_replicas_claim_whatever_the_lease() {
    let pg = PostgresServer::start();
    let (c, u) = (store_config(), url(&pg));
    let a = PgStore::open(&c, &u).await.unwrap();
    let b = PgStore::open(&c, &u).await.unwrap();
    let now = pandagate::idempotency::now_ms();
    let d = delivery("m1", "http://s/1", now);
    a.insert("m1", &message(now), std::slice::from_ref(&d))
        .await
        .unwrap();
    let lease = Duration::from_millis(200);
    let first = a.claim(now, 10, lease).await.unwrap().deliveries;
    assert_eq!(first.len(), 1);
    // The lease passes; a claims its own row again: still a's, so the
    // outcome of the first attempt, written now, applies.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let again = a
        .claim(pandagate::idempotency::now_ms(), 10, lease)
        .await
        .unwrap();
    assert_eq!(again.deliveries.len(), 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        a.delivered(&first[0]).await.unwrap(),
        "applied past the lease"
    );
    assert!(listed(&b, false).await.is_empty());
    assert!(
        !a.delivered(&first[0]).await.unwrap(),
        "nothing left to apply"
    );
}

#[tokio::test]
async fn after_a_database_restart_a_claim_from_before_is_not_taken_over_for_the_grace() {
    let mut pg = PostgresServer::start();
    let (c, u) = (store_config(), url(&pg));
    let a = PgStore::open(&c, &u).await.unwrap();
    let b = PgStore::open(&c, &u).await.unwrap();
    let now = pandagate::idempotency::now_ms();
    let ds = [
        delivery("m1", "http://s/1", now),
        delivery("m1", "http://s/2", now),
    ];
    a.insert("m1", &message(now), &ds).await.unwrap();
    let held = a.claim(now, 10, Duration::from_millis(200)).await.unwrap();
    assert_eq!(held.deliveries.len(), 2);
    pg.stop();
    pg.resume();
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Both leases have passed; neither is b's to take yet, and b is told
    // to look again when the grace ends, not sooner.
    let at = pandagate::idempotency::now_ms();
    let on_b = once_back(|| b.claim(at, 10, Duration::from_secs(30))).await;
    assert!(on_b.deliveries.is_empty(), "held for a: {on_b:?}");
    let next = on_b.next_at_ms.expect("when the grace ends");
    assert!(next >= at + 3_000 && next <= at + 6_000, "{next} vs {at}");
    // a records one outcome in the meantime; the other a never records.
    assert!(once_back(|| a.delivered(&held.deliveries[0])).await);
    tokio::time::sleep_until(restarted + TAKEOVER_GRACE + Duration::from_millis(200)).await;
    let on_b = b
        .claim(
            pandagate::idempotency::now_ms(),
            10,
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(on_b.deliveries.len(), 1, "taken over once the grace passed");
    assert_eq!(on_b.deliveries[0].key(), held.deliveries[1].key());
    assert!(!a.reschedule(&held.deliveries[1]).await.unwrap(), "b's now");
}

/// A connection of the test's own, without the store's statement timeout.
async fn sql(pg: &PostgresServer) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// `GET` on an admin listener: the status and the body.
async fn admin_get(admin: &str, target: &str) -> (u16, String) {
    let answer = support::get(&format!("http://{admin}{target}")).await;
    (
        answer.status.as_u16(),
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

/// `POST /callbacks/replay?QUERY` on the control listener: the status and
/// the body.
async fn replay(control: &str, query: &str) -> (u16, String) {
    let req = http::Request::post(format!("http://{control}/callbacks/replay?{query}"))
        .body(http_body_util::Full::default())
        .unwrap();
    let answer = support::send(req).await;
    (
        answer.status.as_u16(),
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

/// Pages through `GET /callbacks` (`dead=1` or not) `limit` at a time,
/// checking each page's size; the delivery ids in the order given. `between`
/// runs after the first page.
async fn page_through(
    admin: &str,
    dead: bool,
    limit: usize,
    between: impl AsyncFnOnce(),
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    let mut between = Some(between);
    for _ in 0..100 {
        let mut target = format!("/callbacks?limit={limit}&dead={}", u8::from(dead));
        if let Some(a) = &after {
            target.push_str(&format!("&after={a}"));
        }
        let (status, body) = admin_get(admin, &target).await;
        assert_eq!(status, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        let shown = page["deliveries"].as_array().unwrap();
        assert!(shown.len() <= limit, "{body}");
        ids.extend(
            shown
                .iter()
                .map(|d| d["delivery_id"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(shown.len(), limit, "a page before the last is full");
                after = Some(next.to_owned());
            }
            None => return ids,
        }
        if let Some(f) = between.take() {
            f().await;
        }
    }
    panic!("more than 100 pages");
}

fn delivery_id_of(message_id: &str, subscriber: &str) -> String {
    pandagate::callbacks::store::delivery_id(&format!("{message_id}|{subscriber}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_come_in_pages_holding_every_delivery_once_in_a_stable_order() {
    let pg = PostgresServer::start();
    let s = PgStore::open(&store_config(), &url(&pg)).await.unwrap();
    // 8 messages of 3 deliveries each, a message's three received at the
    // same millisecond (the delivery id orders them), none due for an hour.
    let later = pandagate::idempotency::now_ms() + 3_600_000;
    let mut rows = Vec::new();
    for m in 0..8u64 {
        let id = format!("m{m}");
        let at = 1_000 + (7 - m) * 10;
        let ds: Vec<_> = (0..3)
            .map(|k| Delivery {
                next_at_ms: later,
                ..delivery(&id, &format!("http://127.0.0.1:9/s{k}"), at)
            })
            .collect();
        rows.extend(
            ds.iter()
                .map(|d| (d.first_at_ms, d.id(), d.subscriber.clone())),
        );
        s.insert(&id, &message(at), &ds).await.unwrap();
    }
    // Those of subscriber s1 are dead letters.
    let db = sql(&pg).await;
    db.execute(
        "UPDATE pandagate_callback_deliveries SET dead = true WHERE subscriber LIKE '%/s1'",
        &[],
    )
    .await
    .unwrap();
    rows.sort();
    let order = |dead: bool| -> Vec<String> {
        rows.iter()
            .filter(|(_, _, sub)| sub.ends_with("/s1") == dead)
            .map(|(_, id, _)| id.clone())
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), &pg, "http://127.0.0.1:9/e");
    let gw = replica(&config, &pg).await;

    // Between the first page and the rest, every pending delivery is tried
    // again (attempts, next_at_ms change) and a new push arrives: the rest
    // still shows each delivery of the first listing once, then the new one.
    let pushed_at = pandagate::idempotency::now_ms();
    let new = Delivery {
        next_at_ms: later,
        ..delivery("m9", "http://127.0.0.1:9/s0", pushed_at)
    };
    let pending = page_through(&gw.admin, false, 4, async || {
        db.execute(
            "UPDATE pandagate_callback_deliveries SET attempts = attempts + 1, \
             next_at_ms = next_at_ms - 1000 * attempts, last_error = 'HTTP 503' WHERE NOT dead",
            &[],
        )
        .await
        .unwrap();
        s.insert("m9", &message(pushed_at), std::slice::from_ref(&new))
            .await
            .unwrap();
    })
    .await;
    let mut want = order(false);
    want.push(new.id());
    assert_eq!(pending, want, "each once, oldest first, then the new one");
    assert_eq!(
        page_through(&gw.admin, true, 3, async || {}).await,
        order(true)
    );
    assert_eq!(
        page_through(&gw.admin, true, 1000, async || {}).await,
        order(true),
        "one page"
    );

    // Without a limit, up to 100: all 17 here. Bad values are refused,
    // saying why.
    let (status, body) = admin_get(&gw.admin, "/callbacks").await;
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["deliveries"].as_array().unwrap().len(), 17);
    assert_eq!(page["next"], serde_json::Value::Null);
    for bad in ["0", "1001", "-1", "ten", "", "1e3", "100000000000000000000"] {
        let (status, body) = admin_get(&gw.admin, &format!("/callbacks?limit={bad}")).await;
        assert_eq!(status, 400, "limit={bad}: {body}");
        assert!(
            body.contains("limit must be a whole number from 1 to 1000"),
            "{body}"
        );
    }
    for bad in ["x", "12-zz", "-", "1-ABCDEF", &delivery_id_of("m", "s")] {
        let (status, body) = admin_get(&gw.admin, &format!("/callbacks?after={bad}")).await;
        assert_eq!(status, 400, "after={bad}: {body}");
        assert!(body.contains("after: not a cursor"), "{body}");
    }
}

#[tokio::test]
async fn a_version_1_database_is_migrated_and_its_dead_letters_are_found_by_delivery_id() {
    let pg = PostgresServer::start();
    let db = sql(&pg).await;
    db.batch_execute(&format!(
        "CREATE TABLE pandagate_callback_schema (version integer NOT NULL); \
         INSERT INTO pandagate_callback_schema VALUES (1); {}",
        pandagate::callbacks::postgres::MIGRATIONS[0]
    ))
    .await
    .unwrap();
    // Rows as a version-1 binary wrote them, to subscribers whose URLs
    // need care when hashed.
    let subscribers = [
        "http://127.0.0.1:9/plain",
        "http://hooks.internal/ordres/é?x=1&y=a+b",
        "http://u:p@hooks.internal/a|b/%7C",
        "http://[::1]:9/日本",
    ];
    db.execute(
        "INSERT INTO pandagate_callback_messages VALUES ('m1', 1, '{}')",
        &[],
    )
    .await
    .unwrap();
    for sub in subscribers {
        db.execute(
            "INSERT INTO pandagate_callback_deliveries \
             (message_id, subscriber, dead, first_at_ms, next_at_ms, last_error) \
             VALUES ('m1', $1, true, 5, 5, 'HTTP 500')",
            &[&sub],
        )
        .await
        .unwrap();
    }
    let s = PgStore::open(&store_config(), &url(&pg)).await.unwrap();
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 2);
    for sub in subscribers {
        let in_sql: String = db
            .query_one("SELECT pandagate_delivery_id('m1', $1)", &[&sub])
            .await
            .unwrap()
            .get(0);
        assert_eq!(in_sql, delivery_id_of("m1", sub), "{sub}");
    }
    assert_eq!(listed(&s, true).await.len(), 4);
    assert_eq!(
        s.replay_one(&delivery_id_of("m1", subscribers[3]), 7_000)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.replay_one(&format!("m1|{}", subscribers[2]), 7_000)
            .await
            .unwrap(),
        1,
        "by key, the URL's own | included"
    );
    assert_eq!(
        s.replay_one("0123456789abcdef0123456789abcdef", 7_000)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        s.replay_one(&delivery_id_of("m1", subscribers[3]), 7_000)
            .await
            .unwrap(),
        0,
        "no longer dead"
    );
    let pending = listed(&s, false).await;
    assert_eq!(pending.len(), 2);
    assert!(
        pending
            .iter()
            .all(|d| d.first_at_ms == 7_000 && d.next_at_ms == 7_000)
    );
}

#[tokio::test]
async fn replaying_every_dead_letter_goes_in_batches_and_takes_each_once() {
    let pg = PostgresServer::start();
    let s = PgStore::open(&store_config(), &url(&pg)).await.unwrap();
    let db = sql(&pg).await;
    db.batch_execute(
        "INSERT INTO pandagate_callback_messages VALUES ('m1', 1, '{}'); \
         INSERT INTO pandagate_callback_deliveries \
           (message_id, subscriber, dead, first_at_ms, next_at_ms) \
         SELECT 'm1', 'http://127.0.0.1:9/' || i, i <= 1234, i, i \
         FROM generate_series(1, 1300) i",
    )
    .await
    .unwrap();
    assert_eq!(s.replay(None, 1_000_000).await.unwrap(), 1234);
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE dead), \
               count(*) FILTER (WHERE first_at_ms = 1000000) FROM pandagate_callback_deliveries",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (0, 1234));
    assert_eq!(s.replay(None, 2_000_000).await.unwrap(), 0);
}

/// How long `GET`/`POST` on the admin listener took, with its answer.
async fn timed<F: std::future::Future<Output = (u16, String)>>(f: F) -> (Duration, u16, String) {
    let at = Instant::now();
    let (status, body) = f.await;
    (at.elapsed(), status, body)
}

/// The delivery ids of a listing's answer.
fn ids_in(body: &str) -> (Vec<String>, Option<String>) {
    let page: serde_json::Value = serde_json::from_str(body).unwrap();
    let ids = page["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["delivery_id"].as_str().unwrap().to_owned())
        .collect();
    (ids, page["next"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_million_deliveries_pages_and_replay_by_id_stay_within_a_100_ms_statement_timeout() {
    let pg = PostgresServer::start();
    PgStore::open(&store_config(), &url(&pg)).await.unwrap();
    // One message, 1 M deliveries: i odd pending (not due for a day), i even
    // dead; first_at_ms in ties of three.
    const MESSAGE: &str = "6d1c0f5b7a3e9d2c4b8a1f0e6d5c4b3a2918f7e6d5c4b3a291807f6e5d4c3b2a";
    const BASE: u64 = 1_700_000_000_000;
    let db = sql(&pg).await;
    let later = pandagate::idempotency::now_ms() + 86_400_000;
    let loaded = Instant::now();
    db.batch_execute(&format!(
        "INSERT INTO pandagate_callback_messages VALUES ('{MESSAGE}', {now}, '{{}}'); \
         INSERT INTO pandagate_callback_deliveries \
           (message_id, subscriber, dead, attempts, first_at_ms, next_at_ms, last_error) \
         SELECT '{MESSAGE}', 'http://127.0.0.1:9/hooks/' || i, i % 2 = 0, 3, {BASE} + i / 3, \
           {later}, 'HTTP 503' FROM generate_series(1, 1000000) i; \
         ANALYZE pandagate_callback_deliveries;",
        now = pandagate::idempotency::now_ms(),
    ))
    .await
    .unwrap();
    eprintln!("1 M deliveries loaded in {:?}", loaded.elapsed());
    let sub = |i: u64| format!("http://127.0.0.1:9/hooks/{i}");
    // The first 200 in listing order, computed here: the smallest i, by
    // (first_at_ms, delivery id).
    let first = |dead: bool| -> Vec<String> {
        let mut rows: Vec<(u64, String)> = (1..=1000u64)
            .filter(|i| (i % 2 == 0) == dead)
            .map(|i| (i / 3, delivery_id_of(MESSAGE, &sub(i))))
            .collect();
        rows.sort();
        rows.into_iter().take(200).map(|(_, id)| id).collect()
    };

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pandagate.toml");
    std::fs::write(
        &path,
        "[callbacks]\nbackend = \"postgres\"\npostgres_url_env = \"PG_URL\"\n\
         postgres_statement_timeout_ms = 100\n\
         [[callbacks.subscribers]]\nurl = \"http://127.0.0.1:9/hooks/0\"\n",
    )
    .unwrap();
    let gw = replica(path.to_str().unwrap(), &pg).await;
    let mut took = Vec::new();
    for dead in [false, true] {
        let want = first(dead);
        let flag = u8::from(dead);
        let (t, status, body) =
            timed(admin_get(&gw.admin, &format!("/callbacks?dead={flag}"))).await;
        assert_eq!(status, 200, "first page, dead={dead}: {body}");
        let (ids, next) = ids_in(&body);
        assert_eq!(ids, want[..100], "first page, dead={dead}");
        took.push((format!("first page, dead={dead}"), t));
        let target = format!("/callbacks?dead={flag}&limit=100&after={}", next.unwrap());
        let (t, status, body) = timed(admin_get(&gw.admin, &target)).await;
        assert_eq!(status, 200, "second page, dead={dead}: {body}");
        assert_eq!(ids_in(&body).0, want[100..], "second page, dead={dead}");
        took.push((format!("page after a cursor, dead={dead}"), t));
    }
    // Replay one dead letter deep in the table by delivery id, another by key.
    let by_id = delivery_id_of(MESSAGE, &sub(777_778));
    let (t, status, body) = timed(replay(&gw.control, &format!("id={by_id}"))).await;
    assert_eq!((status, body.trim()), (200, r#"{"replayed":1}"#));
    took.push(("replay by delivery id".into(), t));
    let key: String =
        form_urlencoded::byte_serialize(format!("{MESSAGE}|{}", sub(500_000)).as_bytes()).collect();
    let (t, status, body) = timed(replay(&gw.control, &format!("id={key}"))).await;
    assert_eq!((status, body.trim()), (200, r#"{"replayed":1}"#));
    took.push(("replay by key".into(), t));
    let (_, status, body) = timed(replay(&gw.control, &format!("id={by_id}"))).await;
    assert_eq!(
        (status, body.trim()),
        (200, r#"{"replayed":0}"#),
        "no longer dead"
    );
    let revived: i64 = db
        .query_one(
            "SELECT count(*) FROM pandagate_callback_deliveries WHERE NOT dead AND subscriber IN ($1, $2)",
            &[&sub(777_778), &sub(500_000)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(revived, 2);
    for (what, t) in &took {
        eprintln!("{what}: {t:?}");
        assert!(*t < Duration::from_secs(1), "{what}: {t:?}");
    }
}

/// `url` with its `sslmode` (and the rest of its query) in `params`,
/// trusting `ca_file` (if any) besides the bundled roots.
fn tls_url(pg: &PostgresServer, params: &str, ca_file: Option<&Path>) -> WithTrust<PostgresUrl> {
    let url = format!(
        "postgres://pandagate:pw-tls-3@127.0.0.1:{}/postgres{params}",
        pg.port
    );
    WithTrust::new(
        PostgresUrl::parse(&url, "test").unwrap(),
        tls::trust(ca_file),
    )
}

/// What `pandagate check` would say: the schema version, or the error.
async fn probed(pg: &PostgresServer, params: &str, ca_file: Option<&Path>) -> Result<i32, String> {
    let result = probe(&store_config(), &tls_url(pg, params, ca_file)).await;
    result.map_err(|e| {
        let text = e.to_string();
        assert!(!text.contains("pw-tls-3"), "{text}");
        text
    })
}

#[tokio::test]
async fn each_sslmode_connects_as_libpq_would_to_a_server_with_tls_only() {
    let ca = support::tls::TestCa::new();
    let pg = postgres_server::postgres_tls(&ca.server("pg"), true);
    let ca_file = Some(ca.ca_file.as_path());
    // A plaintext client is refused by this server: each success is TLS.
    for params in [
        "?sslmode=verify-full",
        "?sslmode=verify-ca",
        "?sslmode=require",
        "?sslmode=prefer",
        "",
    ] {
        assert_eq!(probed(&pg, params, ca_file).await, Ok(0), "{params}");
    }
    // `require` without a CA file encrypts without checking, as libpq.
    assert_eq!(probed(&pg, "?sslmode=require", None).await, Ok(0));
    assert!(probed(&pg, "?sslmode=disable", ca_file).await.is_err());
    // A certificate of a CA not trusted: the verifying modes refuse it,
    // and say it was TLS.
    for params in ["?sslmode=verify-full", "?sslmode=verify-ca"] {
        let e = probed(&pg, params, None).await.unwrap_err();
        assert!(e.contains("TLS"), "{params}: {e}");
        assert!(e.contains("certificate"), "{params}: {e}");
    }
    let other = support::tls::TestCa::named("a CA the gateway does not trust");
    let e = probed(&pg, "?sslmode=require", Some(&other.ca_file))
        .await
        .unwrap_err();
    assert!(
        e.contains("TLS"),
        "require with a CA file checks the chain: {e}"
    );
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_name_that_verify_ca_takes() {
    let ca = support::tls::TestCa::new();
    let pg = postgres_server::postgres_tls(&ca.server_for("pg", &["db.elsewhere.test"]), true);
    let ca_file = Some(ca.ca_file.as_path());
    let e = probed(&pg, "?sslmode=verify-full", ca_file)
        .await
        .unwrap_err();
    assert!(e.contains("TLS") && e.contains("not valid for"), "{e}");
    assert_eq!(probed(&pg, "?sslmode=verify-ca", ca_file).await, Ok(0));
    assert_eq!(probed(&pg, "?sslmode=require", ca_file).await, Ok(0));
}

#[tokio::test]
async fn a_server_without_tls_is_reached_as_before_unless_tls_is_required() {
    let pg = PostgresServer::start();
    for params in ["", "?sslmode=disable", "?sslmode=prefer"] {
        assert_eq!(probed(&pg, params, None).await, Ok(0), "{params}");
    }
    for params in ["?sslmode=require", "?sslmode=verify-full"] {
        let e = probed(&pg, params, None).await.unwrap_err();
        assert!(e.contains("does not support TLS"), "{params}: {e}");
    }
}

/// The binary with its push store behind TLS (`verify-full`, the test CA in
/// `tls.ca_file`): pushes are stored and delivered, and every connection
/// it holds, the `LISTEN` one included, is encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_stored_and_delivered_over_verify_full_tls() {
    let ca = support::tls::TestCa::new();
    let pg = postgres_server::postgres_tls(&ca.server("pg"), true);
    let (sub, seen) = subscriber(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), &pg, &sub);
    let text = std::fs::read_to_string(&config).unwrap();
    let ca_line = format!(
        "[tls]\nca_file = {:?}\n\n",
        ca.ca_file.display().to_string()
    );
    std::fs::write(&config, format!("{ca_line}{text}")).unwrap();
    let url = tls_url(&pg, "?sslmode=verify-full", None);
    let a = replica_of(&config, url.expose()).await;
    for i in 0..5 {
        assert_eq!(
            support::push_signed(&a.gateway, SECRET, &format!("T{i}")).await,
            200
        );
    }
    let ids = delivered(&seen, 5, Duration::from_secs(20)).await;
    assert_eq!(ids.len(), 5, "every message delivered: {ids:?}");

    // Seen from the server: the gateway's connections, all over TLS.
    let check = tls_url(&pg, "?sslmode=verify-full", Some(&ca.ca_file));
    let (client, connection) = check
        .client_config()
        .connect(pandagate::postgres::connector(&check))
        .await
        .unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl), \
                    count(*) FILTER (WHERE a.query LIKE 'LISTEN%' AND s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = 'pandagate'",
            &[],
        )
        .await
        .unwrap();
    let (all, encrypted, listening): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(all >= 2, "the pool and the LISTEN connection: {all}");
    assert_eq!(encrypted, all);
    assert_eq!(listening, 1, "the LISTEN connection, over TLS");
}
