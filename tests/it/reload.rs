//! Secret rotation and SIGHUP, on the real binary.

use crate::support;

use std::path::Path;
use std::time::{Duration, Instant};

use wiremock::ResponseTemplate;

fn ok() -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_raw(support::provider_body("r", 200, "ok"), "application/json")
}

/// Writes `value` the way the kubelet updates a mounted Secret: a new
/// timestamped directory, then an atomic rename of the `..data` link.
fn kubelet_write(dir: &Path, version: &str, value: &str) {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir(&versioned).unwrap();
    std::fs::write(versioned.join("secret"), value).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join("secret").exists() {
        std::os::unix::fs::symlink("..data/secret", dir.join("secret")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_swapped_the_kubernetes_way_is_used_without_failing_a_call() {
    let upstream = support::upstream_answering(ok()).await;
    let dir = tempfile::tempdir().unwrap();
    kubelet_write(dir.path(), "v1", "secret-one\n");
    let config = dir.path().join("pandagate.toml");
    std::fs::write(&config, "[server]\nsecret_poll_ms = 100\n").unwrap();
    let secret_path = dir.path().join("secret");
    let gw = support::launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak-rot"),
            ("PANDAPON_ACCESS_SECRET_FILE", secret_path.to_str().unwrap()),
            ("PANDAGATE_UPSTREAM", &upstream.uri()),
        ],
    )
    .await;

    let url = format!("http://{}/open/product/get", gw.gateway);
    let caller = tokio::spawn(async move {
        let until = Instant::now() + Duration::from_millis(1500);
        let (mut calls, mut failed) = (0, 0);
        while Instant::now() < until {
            calls += 1;
            if support::get(&url).await.status != 200 {
                failed += 1;
            }
        }
        (calls, failed)
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    kubelet_write(dir.path(), "v2", "secret-two\n");
    let (calls, failed) = caller.await.unwrap();
    assert_eq!(
        failed, 0,
        "no call failed because of the swap ({calls} calls)"
    );

    let received = upstream.received_requests().await.unwrap();
    let secret_of = |r: &wiremock::Request| {
        let h = |n: &str| r.headers[n].to_str().unwrap().to_owned();
        let (ts, nonce, sig) = (h("timestamp"), h("nonce-str"), h("signature"));
        ["secret-one", "secret-two"]
            .into_iter()
            .find(|s| support::provider::expected_signature("ak-rot", &ts, &nonce, s) == sig)
            .expect("every call is signed with the old or the new secret")
    };
    let used: Vec<&str> = received.iter().map(secret_of).collect();
    assert_eq!(used.first(), Some(&"secret-one"));
    assert_eq!(
        used.last(),
        Some(&"secret-two"),
        "the provider sees the new secret"
    );
    let switch = used.iter().position(|s| *s == "secret-two").unwrap();
    assert!(
        used[switch..].iter().all(|s| *s == "secret-two"),
        "no flip-flopping"
    );

    let metrics = support::get(&format!("http://{}/metrics", gw.admin)).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(text.contains("pandagate_secret_reloads_total 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_config_and_keeps_serving_on_a_broken_one() {
    let first = support::upstream_answering(ok()).await;
    let second = support::upstream_answering(ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pandagate.toml");
    let upstream_toml = |url: &str| format!("[upstream]\nurl = \"{url}\"\n");
    std::fs::write(&config, upstream_toml(&first.uri())).unwrap();
    let mut gw = support::launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", "sk-hup"),
        ],
    )
    .await;
    let url = format!("http://{}/open/product/get", gw.gateway);
    let call = || support::get(&url);
    assert_eq!(call().await.status, 200);

    std::fs::write(&config, "[upstream\nurl = broken").unwrap();
    gw.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(call().await.status, 200, "the old config keeps serving");
    assert_eq!(first.received_requests().await.unwrap().len(), 2);

    std::fs::write(&config, upstream_toml(&second.uri())).unwrap();
    gw.signal("-HUP");
    let mut moved = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(call().await.status, 200);
        if !second.received_requests().await.unwrap().is_empty() {
            moved = true;
            break;
        }
    }
    assert!(moved, "the valid config took effect");
    gw.signal("-TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), gw.child.wait()).await;
    assert_eq!(status.unwrap().unwrap().code(), Some(0));
}

/// Reads diagnostics until one has `message` (bounded), skipping others;
/// returns that line.
async fn wait_for_line(gw: &mut support::binary::Running, message: &str) -> String {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left, gw.stderr.next_line())
            .await
            .unwrap_or_else(|_| panic!("no diagnostic {message:?} within 10 s"))
            .unwrap()
            .unwrap_or_else(|| panic!("stderr closed before {message:?}"));
        if line.contains(message) {
            return line;
        }
    }
}

/// Reads diagnostics until one has `message` (bounded), skipping others.
async fn wait_for_message(gw: &mut support::binary::Running, message: &str) {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = gw.stderr.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["message"] == message {
                return;
            }
        }
        panic!("exited before logging {message:?}");
    })
    .await;
    assert!(found.is_ok(), "no {message:?} within 10 s");
}

/// The push receiver verifies with the running config's secret: after a
/// SIGHUP and a rotation of the secret file, the rotated-out secret no
/// longer signs a push, and the new one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reload_pushes_are_verified_with_the_rotated_secret() {
    let dir = tempfile::tempdir().unwrap();
    kubelet_write(dir.path(), "v1", "push-secret-one\n");
    let config = dir.path().join("pandagate.toml");
    let secret_path = dir.path().join("secret");
    let text = format!(
        "[server]\nsecret_poll_ms = 50\n\n[[profiles]]\nname = \"default\"\n\
         access_key = \"ak-rot\"\nsecret_file = \"{}\"\n\n[callbacks]\nstore = \"{}\"\n",
        secret_path.display(),
        dir.path().join("store").display()
    );
    std::fs::write(&config, &text).unwrap();
    let mut gw = support::launch(&["--config", config.to_str().unwrap()], &[]).await;
    let gateway = gw.gateway.clone();
    let push = |key: &'static str, order: &'static str| {
        let gateway = gateway.clone();
        async move { support::push_signed(&gateway, key, order).await }
    };
    assert_eq!(push("push-secret-one", "A1").await, 200);

    gw.signal("-HUP");
    wait_for_message(&mut gw, "config reloaded").await;
    assert_eq!(
        push("push-secret-one", "A2").await,
        200,
        "same secret after the reload"
    );

    kubelet_write(dir.path(), "v2", "push-secret-two\n");
    wait_for_message(&mut gw, "secret reloaded from its file").await;
    assert_eq!(
        push("push-secret-one", "A3").await,
        401,
        "the rotated-out secret still signs pushes"
    );
    assert_eq!(
        push("push-secret-two", "A4").await,
        200,
        "the new secret is refused"
    );

    // A config that drops the receiver's profile is not taken: the
    // receiver could not verify anything with it.
    let renamed = format!(
        "default_profile = \"other\"\n[server]\nsecret_poll_ms = 50\n\n[[profiles]]\n\
         name = \"other\"\naccess_key = \"ak-rot\"\nsecret_file = \"{}\"\n\n\
         [callbacks]\nprofile = \"other\"\nstore = \"{}\"\n",
        secret_path.display(),
        dir.path().join("store").display()
    );
    std::fs::write(&config, renamed).unwrap();
    gw.signal("-HUP");
    let refused = wait_for_line(&mut gw, "config reload refused; the running config stays").await;
    assert!(refused.contains("callbacks.profile"), "{refused}");
    assert_eq!(
        push("push-secret-two", "A5").await,
        200,
        "the running config stays"
    );
}

/// The body budget is the process's: a reload keeps it, with the bytes its
/// bodies hold, and sizes it to the new config.
#[tokio::test]
async fn a_reload_keeps_the_body_budget_and_resizes_it() {
    use pandagate::body_budget::Reader;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pandagate.toml");
    let env = |name: &str| match name {
        "PANDAPON_ACCESS_KEY" => Some("ak-budget".to_owned()),
        "PANDAPON_ACCESS_SECRET" => Some("sk-budget".to_owned()),
        _ => None,
    };
    std::fs::write(&path, "[server]\nmax_buffered_body_bytes = 8388608\n").unwrap();
    let loaded = pandagate::loaded::load(Some(&path), &env).unwrap();
    let (log, _writer) = pandagate::access_log::AccessLog::spawn(
        pandagate::config::LogFormat::Json,
        Box::new(std::io::sink()),
    );
    let lasting = pandagate::gateway::Lasting::open(&loaded, log).unwrap();
    let metrics = lasting.metrics.clone();
    let gateway = pandagate::gateway::Gateway::new(&loaded, lasting).unwrap();
    let budget = gateway.lasting().bodies.clone();
    let mut held = budget.hold(Reader::Call, None);
    held.grow_to(1000).unwrap();
    let current = Arc::new(arc_swap::ArcSwap::from_pointee(gateway));

    std::fs::write(&path, "[server]\nmax_buffered_body_bytes = 16777216\n").unwrap();
    let reloader =
        pandagate::reload::Reloader::new(Some(path), env, current.clone(), None, &loaded.config);
    let outcome = reloader.reload("test");
    assert_eq!(outcome.result(), "applied", "{outcome:?}");
    assert_eq!(metrics.config_reloads(), (1, 0), "the reload was applied");
    assert!(Arc::ptr_eq(&current.load().lasting().bodies, &budget));
    assert_eq!((budget.limit(), budget.used()), (16_777_216, 1000));
    drop(held);
    assert_eq!(budget.used(), 0);
}

/// Writes the config the way the kubelet updates a mounted ConfigMap:
/// `kubelet_write`'s swap of the `..data` link, under the name `config`.
fn kubelet_config(dir: &Path, version: &str, toml: &str) -> std::path::PathBuf {
    kubelet_write(dir, version, toml);
    dir.join("secret")
}

async fn post(url: &str) -> support::client::Answer {
    support::send(
        http::Request::post(url)
            .body(http_body_util::Full::default())
            .unwrap(),
    )
    .await
}

async fn metrics_text(gw: &support::binary::Running) -> String {
    let m = support::get(&format!("http://{}/metrics", gw.admin)).await;
    String::from_utf8_lossy(&m.body).into_owned()
}

/// Calls `call` until `done` says so, at most 5 s.
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within 5 s: {what}");
}

/// The config file is watched: a ConfigMap swapped by the kubelet is
/// applied without a signal; a broken one, and one that changes what is
/// fixed at start, are refused with the key named, the old config serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_file_is_applied_and_a_bad_one_refused_whole() {
    let first = support::upstream_answering(ok()).await;
    let second = support::upstream_answering(ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = |url: &str, extra: &str| {
        format!("[server]\nconfig_poll_ms = 50\n{extra}\n[upstream]\nurl = \"{url}\"\n")
    };
    let config = kubelet_config(dir.path(), "1", &toml(&first.uri(), ""));
    let mut gw = support::launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", "sk-watch"),
        ],
    )
    .await;
    let url = format!("http://{}/open/product/get", gw.gateway);
    assert_eq!(support::get(&url).await.status, 200);

    // Not TOML: refused, counted, the first upstream still serving.
    kubelet_config(dir.path(), "2", "[upstream\nurl = broken");
    wait_for_message(&mut gw, "config reload refused; the running config stays").await;
    // A change of a key fixed at start, with a valid upstream change
    // beside it: refused whole, naming the key.
    kubelet_config(
        dir.path(),
        "3",
        &toml(&second.uri(), "worker_threads = 7\n"),
    );
    let refused = wait_for_line(&mut gw, "config reload refused; the running config stays").await;
    assert!(refused.contains("server.worker_threads"), "{refused}");
    for _ in 0..3 {
        assert_eq!(support::get(&url).await.status, 200);
    }
    assert!(second.received_requests().await.unwrap().is_empty());
    assert_eq!(first.received_requests().await.unwrap().len(), 4);

    // A valid change: applied, with no signal.
    kubelet_config(dir.path(), "4", &toml(&second.uri(), ""));
    eventually("the new upstream serves", async || {
        assert_eq!(support::get(&url).await.status, 200);
        !second.received_requests().await.unwrap().is_empty()
    })
    .await;
    let m = metrics_text(&gw).await;
    assert!(
        m.contains("pandagate_config_reloads_total{result=\"applied\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("pandagate_config_reloads_total{result=\"refused\"} 2"),
        "{m}"
    );
}

/// `POST /reload` on the control listener: the outcome in the answer,
/// refused with the key at fault, applied when valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_answers_what_became_of_the_config() {
    let first = support::upstream_answering(ok()).await;
    let second = support::upstream_answering(ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pandagate.toml");
    // A long poll: only POST /reload reloads here.
    let toml = |url: &str, extra: &str| {
        format!("[server]\nconfig_poll_ms = 3600000\n{extra}\n[upstream]\nurl = \"{url}\"\n")
    };
    std::fs::write(&config, toml(&first.uri(), "")).unwrap();
    let gw = support::launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", "sk-post"),
        ],
    )
    .await;
    let reload = format!("http://{}/reload", gw.control);
    let url = format!("http://{}/open/product/get", gw.gateway);

    std::fs::write(&config, toml(&second.uri(), "max_connections = 5\n")).unwrap();
    let refused = post(&reload).await;
    assert_eq!(refused.status, 422);
    let body: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(body["result"], "refused");
    assert_eq!(body["key"], "server.max_connections");
    assert_eq!(support::get(&url).await.status, 200);
    assert!(second.received_requests().await.unwrap().is_empty());

    std::fs::write(&config, toml(&second.uri(), "")).unwrap();
    let applied = post(&reload).await;
    assert_eq!(applied.status, 200, "{:?}", applied.body);
    let body: serde_json::Value = serde_json::from_slice(&applied.body).unwrap();
    assert_eq!(body["result"], "applied");
    assert_eq!(support::get(&url).await.status, 200);
    assert_eq!(second.received_requests().await.unwrap().len(), 1);
    assert_eq!(
        support::get(&reload).await.status,
        405,
        "a reload changes state: POST only"
    );
}

/// A client's token file is re-read like a secret: the rotated token is
/// accepted and the old one refused, with no signal and no failed call
/// in between for the token the file holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_token_file_takes_over_from_the_old_token() {
    let upstream = support::upstream_answering(ok()).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    kubelet_write(&tokens, "1", "token-one");
    let config = dir.path().join("pandagate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nsecret_poll_ms = 50\n[upstream]\nurl = \"{}\"\n\n\
             [[clients]]\nname = \"orders\"\ntoken_file = \"{}\"\nprofiles = [\"default\"]\n",
            upstream.uri(),
            tokens.join("secret").display()
        ),
    )
    .unwrap();
    let gw = support::launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", "sk-tokens"),
        ],
    )
    .await;
    let url = format!("http://{}/open/product/get", gw.gateway);
    let call = |token: &'static str| {
        let url = url.clone();
        async move {
            support::send(
                http::Request::get(url)
                    .header("authorization", format!("Bearer {token}"))
                    .body(http_body_util::Full::default())
                    .unwrap(),
            )
            .await
            .status
        }
    };
    assert_eq!(call("token-one").await, 200);
    assert_eq!(call("token-two").await, 401);

    kubelet_write(&tokens, "2", "token-two");
    eventually("the rotated token is accepted", async || {
        call("token-two").await == 200
    })
    .await;
    assert_eq!(call("token-one").await, 401, "the old token no longer");
    let m = metrics_text(&gw).await;
    assert!(m.contains("pandagate_secret_reloads_total 1"), "{m}");
}
