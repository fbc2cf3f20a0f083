//! The callback receiver in the real binary: a hard kill after the
//! acknowledgement loses nothing, and operators can list and replay.

use crate::support;

use std::path::Path;
use std::time::Duration;

use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "sk-callbacks-process";

fn config(dir: &Path, subscriber: &str, max_age_ms: u64) -> std::path::PathBuf {
    let path = dir.join("pandagate.toml");
    std::fs::write(
        &path,
        format!(
            "[callbacks]\nstore = \"{}\"\nmax_age_ms = {max_age_ms}\nbackoff_base_ms = 20\nbackoff_cap_ms = 50\n\
             [[callbacks.subscribers]]\nurl = \"{subscriber}\"\n",
            dir.join("store").display()
        ),
    )
    .unwrap();
    path
}

async fn launch(config: &Path) -> support::binary::Running {
    support::launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", SECRET),
            ("PANDAGATE_UPSTREAM", "http://127.0.0.1:9"),
        ],
    )
    .await
}

async fn push(gw: &support::binary::Running, order: &str) -> u16 {
    support::push_signed(&gw.gateway, SECRET, order).await
}

async fn wait_for(server: &MockServer, n: usize) -> usize {
    for _ in 0..500 {
        let got = server.received_requests().await.unwrap().len();
        if got >= n {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.received_requests().await.unwrap().len()
}

fn cli(args: &[&str], gw: &support::binary::Running) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pandagate"))
        .args(args)
        .args(["--admin", &gw.admin, "--control", &gw.control])
        .env_clear()
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_right_after_acknowledging_the_message_is_delivered_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let subscriber_addr = support::dead_address();
    let config = config(
        dir.path(),
        &format!("http://{subscriber_addr}/events"),
        3_600_000,
    );
    let mut gw = launch(&config).await;
    assert_eq!(push(&gw, "K1").await, 200);
    gw.signal("-KILL");
    let _ = gw.child.wait().await;

    let listener = std::net::TcpListener::bind(subscriber_addr).unwrap();
    let subscriber = MockServer::builder().listener(listener).start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .mount(&subscriber)
        .await;
    let _gw = launch(&config).await;
    assert_eq!(
        wait_for(&subscriber, 1).await,
        1,
        "delivered after the restart"
    );
    let got = subscriber.received_requests().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["messageBody"]["orderId"], "K1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_and_replay_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let subscriber = support::upstream_answering(ResponseTemplate::new(500)).await;
    let config = config(dir.path(), &subscriber.uri(), 100);
    let gw = launch(&config).await;
    assert_eq!(push(&gw, "D9").await, 200);

    let mut listed = String::new();
    for _ in 0..200 {
        let (ok, out) = cli(&["callbacks", "list", "--dead"], &gw);
        assert!(ok);
        if out.contains("delivery_id") {
            listed = out;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let page: serde_json::Value = serde_json::from_str(&listed).expect("a JSON page");
    let dead = page["deliveries"].as_array().expect("a JSON list");
    assert_eq!(dead.len(), 1, "{listed}");
    assert_eq!(page["next"], serde_json::Value::Null, "{listed}");
    assert!(dead[0]["attempts"].as_u64().unwrap() >= 1);
    let (_, pending) = cli(&["callbacks", "list"], &gw);
    assert_eq!(pending.trim(), r#"{"deliveries":[],"next":null}"#);
    let (ok, refused) = cli(&["callbacks", "list", "--dead", "--limit", "0"], &gw);
    assert!(!ok && refused.contains("limit must be"), "{refused}");

    subscriber.reset().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(200))
        .mount(&subscriber)
        .await;
    let id = dead[0]["delivery_id"].as_str().unwrap();
    let (ok, out) = cli(&["callbacks", "replay", id], &gw);
    assert!(ok, "{out}");
    assert!(out.contains(r#""replayed":1"#), "{out}");
    assert!(
        wait_for(&subscriber, 1).await >= 1,
        "replayed and delivered"
    );

    let metrics = support::get(&format!("http://{}/metrics", gw.admin)).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("pandagate_callbacks_stored_total 1"),
        "{text}"
    );
    assert!(
        text.contains("pandagate_callbacks_dead_lettered_total 1"),
        "{text}"
    );
}

/// Waits until the one delivery is a dead letter; its key.
async fn dead_key(gw: &support::binary::Running) -> String {
    for _ in 0..250 {
        let answer = support::get(&format!("http://{}/callbacks?dead=1", gw.admin)).await;
        let page: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        let dead = page["deliveries"].as_array().unwrap();
        if let Some(d) = dead.first() {
            return d["key"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no dead letter within 5 s");
}

async fn replay_by_id(gw: &support::binary::Running, encoded_id: &str) -> String {
    let req = http::Request::post(format!(
        "http://{}/callbacks/replay?id={encoded_id}",
        gw.control
    ))
    .body(http_body_util::Full::default())
    .unwrap();
    let answer = support::send(req).await;
    String::from_utf8_lossy(&answer.body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_takes_a_percent_encoded_delivery_key() {
    let dir = tempfile::tempdir().unwrap();
    let subscriber = support::upstream_answering(ResponseTemplate::new(500)).await;
    // A `+` in the URL, so in the key: sent as `%2B`, never as a space.
    let url = format!("{}/hooks/a+b", subscriber.uri());
    let config = config(dir.path(), &url, 100);
    let gw = launch(&config).await;
    assert_eq!(push(&gw, "E1").await, 200);
    let key = dead_key(&gw).await;
    assert!(key.ends_with("/hooks/a+b"), "{key}");

    let encoded: String = form_urlencoded::byte_serialize(key.as_bytes()).collect();
    assert!(
        encoded.contains("%7C") && encoded.contains("%2B"),
        "{encoded}"
    );
    let lower = encoded.replace("%7C", "%7c").replace("%2B", "%2b");
    for id in [encoded, lower] {
        let out = replay_by_id(&gw, &id).await;
        assert!(out.contains(r#""replayed":1"#), "{id}: {out}");
        assert_eq!(dead_key(&gw).await, key, "dead again after max_age_ms");
    }
    // The CLI encodes the key it is given.
    let (ok, out) = cli(&["callbacks", "replay", &key], &gw);
    assert!(ok, "{out}");
    assert!(out.contains(r#""replayed":1"#), "{out}");
}
