//! The binary as operators run it: config validation and exit codes, `check`,
//! `sign --explain`, `demo`, and serving from the environment alone.

mod support;

use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use wiremock::ResponseTemplate;

const BIN: &str = env!("CARGO_BIN_EXE_pandagate");
const SECRET: &str = "cli-secret-value-never-in-output";

fn pandagate(args: &[&str], env: &[(&str, &str)]) -> std::process::Command {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn output(args: &[&str], env: &[(&str, &str)]) -> Output {
    pandagate(args, env).output().expect("binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

type Env<'a> = &'a [(&'a str, &'a str)];

const CREDS: Env<'static> = &[
    ("PANDAPON_ACCESS_KEY", "ak-cli"),
    ("PANDAPON_ACCESS_SECRET", SECRET),
];

#[test]
fn invalid_config_exits_64_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, Env); 7] = [
        (
            "[server]\nlisten_adress = \"127.0.0.1:1\"\n",
            "listen_adress",
            CREDS,
        ),
        ("[upstream]\nurl = \"not a url\"\n", "upstream.url", CREDS),
        (
            "[upstream]\nurl = \"ftp://api.pandapon.com\"\n",
            "upstream.url",
            CREDS,
        ),
        (
            "",
            "profiles[0].secret_env",
            &[("PANDAPON_ACCESS_KEY", "ak")],
        ),
        (
            "[server]\nmax_request_body_bytes = 0\n",
            "server.max_request_body_bytes",
            CREDS,
        ),
        (
            "[upstream]\nconnect_timeout_ms = -5\n",
            "upstream.connect_timeout_ms",
            CREDS,
        ),
        ("[log]\nqueue_lines = 0\n", "log.queue_lines", CREDS),
    ];
    for (i, (toml, key, env)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = output(&["check", "--config", path.to_str().unwrap()], env);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{toml}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "{key} named in: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn serving_with_an_invalid_config_also_exits_64() {
    let out = output(&["run"], &[("PANDAPON_ACCESS_KEY", "ak")]);
    assert_eq!(out.status.code(), Some(64));
    let out = output(&[], &[("PANDAGATE_LISTEN", "nowhere"), CREDS[0], CREDS[1]]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("PANDAGATE_LISTEN"));
    let out = output(
        &[],
        &[("PANDAGATE_WORKER_THREADS", "two"), CREDS[0], CREDS[1]],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("PANDAGATE_WORKER_THREADS"));
}

/// Names of the threads of process `pid` that run tokio's workers.
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.starts_with("tokio-rt-worker"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_sets_the_runtime_and_one_thread_still_serves() {
    let upstream = support::upstream_answering(ResponseTemplate::new(200).set_body_raw(
        support::provider_body("rid-threads", 200, "ok"),
        "application/json",
    ))
    .await;
    let uri = upstream.uri();
    for (threads, expected) in [("1", 0), ("3", 3)] {
        let env = [
            CREDS[0],
            CREDS[1],
            ("PANDAGATE_UPSTREAM", uri.as_str()),
            ("PANDAGATE_WORKER_THREADS", threads),
        ];
        let running = support::launch(&[], &env).await;
        let ok = support::get(&format!("http://{}/open/product/get", running.gateway)).await;
        assert_eq!(ok.status, 200, "served with worker_threads = {threads}");
        let pid = running.child.id().expect("running");
        // 1: the current-thread runtime, no worker threads at all.
        assert_eq!(worker_threads(pid), expected, "worker_threads = {threads}");
    }
}

#[test]
fn check_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pandagate.toml");
    std::fs::write(&path, "[upstream]\nrequest_timeout_ms = 1234\n").unwrap();
    let env = [
        CREDS[0],
        CREDS[1],
        ("PANDAGATE_UPSTREAM", "http://127.0.0.1:9"),
    ];
    let out = output(&["check", "--config", path.to_str().unwrap()], &env);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("request_timeout_ms = 1234"), "{stdout}");
    assert!(
        stdout.contains("url = \"http://127.0.0.1:9\""),
        "env wins: {stdout}"
    );
    assert!(stdout.contains("access_key = \"ak-cli\""), "{stdout}");
    assert!(
        stdout.contains("secret_env = \"PANDAPON_ACCESS_SECRET\""),
        "{stdout}"
    );
    assert!(!stdout.contains(SECRET));
    assert!(!text(&out.stderr).contains(SECRET));
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pandagate.toml");
    let env = [
        ("PANDAPON_ACCESS_SECRET", SECRET),
        ("PANDAPON_OPS_SECRET", "ops"),
    ];
    let out = output(&["check", "--config", example], &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("name = \"ops\""), "{stdout}");
    // Without the second profile's secret the example is rejected, naming it.
    let out = output(&["check", "--config", example], &env[..1]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("profiles[1].secret_env"));
}

#[test]
fn sign_explain_shows_the_hashed_string_and_signature_without_the_secret() {
    // Known answer computed outside this code base (Python hashlib).
    let env = [
        ("PANDAPON_ACCESS_KEY", "AK_TEST_0001"),
        ("PANDAPON_ACCESS_SECRET", "SECRET_TEST_0001"),
    ];
    let args = [
        "sign",
        "--explain",
        "--timestamp",
        "1715669977082",
        "--nonce",
        "abcdefghijklmnopqrstuvwxyz012345",
    ];
    let out = output(&args, &env);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains("AK_TEST_00011715669977082abcdefghijklmnopqrstuvwxyz012345<secret>"),
        "{stdout}"
    );
    assert!(
        stdout.contains("signature:      377FF2A66780B485EC0559F43395D0F2"),
        "{stdout}"
    );
    assert!(!stdout.contains("SECRET_TEST_0001"));
}

#[test]
fn demo_runs_green() {
    let out = output(&["demo"], &[("PANDAGATE_LOG_FORMAT", "json")]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3, "{stdout}");
    for e in &events {
        assert_eq!(e["code"], 200, "{e}");
        assert_eq!(e["status"], 200);
        assert_eq!(e["request_id"].as_str().map(str::len), Some(32));
    }
    let paths: Vec<&str> = events.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "/open/product/get",
            "/alibaba/product/keywords/query",
            "/alibaba/order/create"
        ]
    );
    assert!(stdout.contains("demo: 3 of 3 calls succeeded"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_from_the_environment_alone_and_never_logs_the_secret() {
    let upstream = support::upstream_answering(ResponseTemplate::new(200).set_body_raw(
        support::provider_body("rid-cli", 200, "ok"),
        "application/json",
    ))
    .await;
    let mut child = Command::new(BIN)
        .env_clear()
        .env("PANDAPON_ACCESS_KEY", "ak-cli")
        .env("PANDAPON_ACCESS_SECRET", SECRET)
        .env("PANDAPON_USER_ID", "42")
        .env("PANDAGATE_LISTEN", "127.0.0.1:0")
        .env("PANDAGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PANDAGATE_UPSTREAM", upstream.uri())
        .env("PANDAGATE_LOG_FORMAT", "json")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen_stderr = String::new();
    let addr = wait_for_listening(&mut stderr, "gateway listening", &mut seen_stderr).await;

    let ok = support::get(&format!("http://{addr}/open/product/get")).await;
    assert_eq!(ok.status, 200);
    let r = &upstream.received_requests().await.unwrap()[0];
    assert_eq!(r.headers["user-id"], "42");
    let ts = r.headers["timestamp"].to_str().unwrap();
    let nonce = r.headers["nonce-str"].to_str().unwrap();
    assert_eq!(
        r.headers["signature"],
        support::expected_signature("ak-cli", ts, nonce, SECRET).as_str()
    );
    let req = http::Request::get(format!("http://{addr}/x"))
        .header("x-pandagate-profile", "nope")
        .body(http_body_util::Full::default())
        .unwrap();
    assert_eq!(support::send(req).await.status, 403);

    // SIGTERM: drain and exit 0.
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within 20 s of SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));

    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .await
        .unwrap();
    while let Some(line) = stderr.next_line().await.unwrap() {
        seen_stderr.push_str(&line);
        seen_stderr.push('\n');
    }
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{stdout}");
    assert_eq!(events[0]["request_id"], "rid-cli");
    assert_eq!(events[1]["status"], 403);
    assert!(
        seen_stderr.contains("TRACE") || seen_stderr.contains("DEBUG"),
        "trace logging was on"
    );
    assert!(!stdout.contains(SECRET), "secret in stdout");
    assert!(!seen_stderr.contains(SECRET), "secret in stderr");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_command_checks_signatures() {
    let mut child = Command::new(BIN)
        .args([
            "sandbox",
            "--listen",
            "127.0.0.1:0",
            "--access-key",
            support::ACCESS_KEY,
        ])
        .env_clear()
        .env("PANDAPON_ACCESS_SECRET", support::SECRET)
        .env("PANDAGATE_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = wait_for_listening(&mut stderr, "sandbox listening", &mut String::new()).await;

    // Unsigned: a business error naming the missing header.
    let unsigned = support::get(&format!("http://{addr}/open/product/get"))
        .await
        .json();
    assert_eq!(unsigned["code"], 401);
    assert!(unsigned["msg"].as_str().unwrap().contains("missing header"));

    // Through a gateway holding the same credentials: accepted.
    let gw = support::spawn_gateway(support::config(&format!("http://{addr}"))).await;
    let signed = support::get(&gw.url("/open/product/get?itemId=1"))
        .await
        .json();
    assert_eq!(signed["code"], 200, "{signed}");
    assert_eq!(signed["msg"], "成功");
    gw.stop().await;
    child.kill().await.unwrap();
}

/// Reads JSON diagnostic lines until `message`, returning its `addr`;
/// everything read is appended to `seen`.
async fn wait_for_listening(
    stderr: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    message: &str,
    seen: &mut String,
) -> String {
    let wait = async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["message"] == message {
                return v["addr"].as_str().unwrap().to_owned();
            }
        }
        panic!("exited before {message:?}: {seen}");
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("listening within 20 s")
}
