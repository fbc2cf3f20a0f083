//! The binary as operators run it: config validation and exit codes, `check`,
//! `sign --explain`, `demo`, and serving from the environment alone.

use crate::support;

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
fn invalid_config_exits_78_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, Env); 12] = [
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
        // An exact entry may not make a catalogued write a read, in any
        // spelling of it, nor cache it.
        (
            "[[routes]]\npath = \"/v2/alibaba/order/create\"\nclass = \"read\"\n",
            "routes[0]: path \"/v2/alibaba/order/create\" is the catalogued write /alibaba/order/create",
            CREDS,
        ),
        (
            "[[routes]]\nprefix = \"/open/\"\nclass = \"read\"\n[[routes]]\npath = \"/open/Order\"\nclass = \"unknown\"\n",
            "routes[1]: path \"/open/Order\" is the catalogued write /open/order",
            CREDS,
        ),
        // The endpoints that drain, purge and replay stay on loopback
        // unless they demand a token.
        (
            "[server]\ncontrol_listen = \"0.0.0.0:9902\"\n",
            "server.control_listen",
            CREDS,
        ),
        (
            "[server]\ncontrol_listen = \"10.1.2.3:9902\"\ncontrol_token_env = \"UNSET_TOKEN\"\n",
            "server.control_token_env",
            CREDS,
        ),
        (
            "[[routes]]\npath = \"/alibaba/order/cancel\"\ncache_ttl_ms = 1000\n",
            "routes[0]: path \"/alibaba/order/cancel\" is the catalogued write",
            CREDS,
        ),
    ];
    for (i, (toml, key, env)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = output(&["check", "--config", path.to_str().unwrap()], env);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{toml}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "{key} named in: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn serving_with_an_invalid_config_also_exits_78() {
    let out = output(&["run"], &[("PANDAPON_ACCESS_KEY", "ak")]);
    assert_eq!(out.status.code(), Some(78));
    let out = output(&[], &[("PANDAGATE_LISTEN", "nowhere"), CREDS[0], CREDS[1]]);
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("PANDAGATE_LISTEN"));
    let out = output(
        &[],
        &[("PANDAGATE_WORKER_THREADS", "two"), CREDS[0], CREDS[1]],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out.stderr).contains("PANDAGATE_WORKER_THREADS"));
}

/// Threads of process `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.starts_with(prefix))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_sets_the_serving_threads_and_each_one_serves() {
    let upstream = support::upstream_answering(ResponseTemplate::new(200).set_body_raw(
        support::provider_body("rid-threads", 200, "ok"),
        "application/json",
    ))
    .await;
    let uri = upstream.uri();
    let cpus = std::thread::available_parallelism().unwrap().get();
    for (threads, expected) in [("1", 1), ("3", 3), ("0", cpus)] {
        let env = [
            CREDS[0],
            CREDS[1],
            ("PANDAGATE_UPSTREAM", uri.as_str()),
            ("PANDAGATE_WORKER_THREADS", threads),
        ];
        let running = support::launch(&[], &env).await;
        // Each call on a new connection: the kernel spreads them over the
        // workers' listeners, and every one must be answered.
        for _ in 0..12 {
            let ok = support::get(&format!("http://{}/open/product/get", running.gateway)).await;
            assert_eq!(ok.status, 200, "served with worker_threads = {threads}");
        }
        let pid = running.child.id().expect("running");
        assert_eq!(
            threads_named(pid, "worker-"),
            expected,
            "worker_threads = {threads}"
        );
        assert_eq!(
            threads_named(pid, "tokio-rt-worker"),
            0,
            "no multi-threaded runtime: calls stay on their worker"
        );
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
    assert_eq!(out.status.code(), Some(78));
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
        .env("PANDAGATE_CONTROL_LISTEN", "127.0.0.1:0")
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
        support::provider::expected_signature("ak-cli", ts, nonce, SECRET).as_str()
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
    // One line per call. Each serving thread hands its lines over in
    // batches, so two calls served by two threads may be logged in either
    // order.
    assert_eq!(events.len(), 2, "{stdout}");
    let served = events
        .iter()
        .find(|e| e["status"] == 200)
        .expect("{stdout}");
    assert_eq!(served["request_id"], "rid-cli");
    assert!(events.iter().any(|e| e["status"] == 403), "{stdout}");
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

/// Writes `toml` to a file in `dir` and returns its path.
fn config_file(dir: &tempfile::TempDir, name: &str, toml: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, toml).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn check_and_run_refuse_alike_what_would_overflow_or_panic() {
    let dir = tempfile::tempdir().unwrap();
    let rate = |rest: &str| format!("[rate_limit]\n{rest}\n");
    let cases: [(String, &str); 21] = [
        (
            rate("requests_per_second = 1e-20"),
            "rate_limit.requests_per_second",
        ),
        (
            rate("requests_per_second = 5e-10\nburst = 10"),
            "rate_limit.requests_per_second",
        ),
        (
            rate("requests_per_second = 2e6"),
            "rate_limit.requests_per_second",
        ),
        (
            rate("requests_per_second = inf"),
            "rate_limit.requests_per_second",
        ),
        (
            rate("requests_per_second = 0.001\nburst = 4294967295"),
            "rate_limit.burst",
        ),
        (
            rate("requests_per_second = 1\nbackend = \"redis\"\nfallback_share = 1e-300"),
            "rate_limit.fallback_share",
        ),
        (
            rate("requests_per_second = 1\nmax_wait_ms = 9223372036854775807"),
            "rate_limit.max_wait_ms",
        ),
        (
            "[[routes]]\npath = \"/x\"\nrate_limit_per_second = 1e-20\n".into(),
            "routes[0].rate_limit_per_second",
        ),
        (
            "[[routes]]\npath = \"/x\"\nrate_limit_per_second = 0.001\nrate_limit_burst = 4294967295\n"
                .into(),
            "routes[0].rate_limit_burst",
        ),
        (
            "[retry]\nbudget_window_ms = 9223372036854775807\n".into(),
            "retry.budget_window_ms",
        ),
        (
            "[circuit_breaker]\nopen_ms = 9223372036854775807\n".into(),
            "circuit_breaker.open_ms",
        ),
        (
            "[upstream]\nrequest_timeout_ms = 31536000001\n".into(),
            "upstream.request_timeout_ms",
        ),
        (
            "[server]\nshutdown_grace_ms = 9223372036854775807\n".into(),
            "server.shutdown_grace_ms",
        ),
        (
            "[callbacks]\nstore = \"/nonexistent\"\nmax_age_ms = 9223372036854775807\n".into(),
            "callbacks.max_age_ms",
        ),
        (
            "[server]\nmax_headers = 18446744073709551615\n".into(),
            "server.max_headers",
        ),
        (
            "[server]\nmax_header_bytes = 4294967296\n".into(),
            "server.max_header_bytes",
        ),
        (
            "[server]\nmax_connections = 1000001\n".into(),
            "server.max_connections",
        ),
        (
            "[server]\nhttp2_max_concurrent_streams = 4294967295\n".into(),
            "server.http2_max_concurrent_streams",
        ),
        (
            "[server]\nworker_threads = 100000\n".into(),
            "server.worker_threads",
        ),
        (
            "[log]\nqueue_lines = 9223372036854775807\n".into(),
            "log.queue_lines",
        ),
        (
            "[server]\nbody_read_timeout_ms = 9223372036854775807\n".into(),
            "server.body_read_timeout_ms",
        ),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let path = config_file(&dir, &format!("case{i}.toml"), toml);
        let checked = output(&["check", "--config", &path], CREDS);
        let stderr = text(&checked.stderr);
        assert_eq!(checked.status.code(), Some(78), "check {toml}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.starts_with(&format!("pandagate: invalid config: {key}: ")),
            "{key} named in: {stderr}"
        );
        assert!(checked.stdout.is_empty());
        // `run` refuses it the same way, before binding anything.
        let env = [
            CREDS[0],
            CREDS[1],
            ("PANDAGATE_LISTEN", "127.0.0.1:0"),
            ("PANDAGATE_ADMIN_LISTEN", "127.0.0.1:0"),
            ("PANDAGATE_CONTROL_LISTEN", "127.0.0.1:0"),
        ];
        let ran = output(&["run", "--config", &path], &env);
        assert_eq!(
            ran.status.code(),
            Some(78),
            "run {toml}: {}",
            text(&ran.stderr)
        );
        assert_eq!(text(&ran.stderr), stderr, "run and check agree");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_at_every_bound_that_check_accepts_serves() {
    let upstream = support::upstream_answering(ResponseTemplate::new(200).set_body_raw(
        support::provider_body("rid-bounds", 200, "ok"),
        "application/json",
    ))
    .await;
    let redis = support::redis_server::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let year = 31_536_000_000u64;
    let toml = format!(
        "[server]\nheader_read_timeout_ms = {year}\nidle_timeout_ms = {year}\n\
         shutdown_grace_ms = {year}\nsecret_poll_ms = {year}\nbody_read_timeout_ms = {year}\n\
         max_header_bytes = 1048576\nmax_headers = 1000\nmax_connections = 1000000\n\
         http2_max_concurrent_streams = 10000\n\
         [log]\nqueue_lines = 1000000\ninspect_bytes = 16777216\n\
         [upstream]\nurl = \"{upstream}\"\nconnect_timeout_ms = {year}\n\
         request_timeout_ms = {year}\npool_idle_timeout_ms = {year}\n\
         [retry]\ndeadline_ms = {year}\nread_attempt_timeout_ms = {year}\n\
         backoff_base_ms = {year}\nbackoff_cap_ms = {year}\nbudget_window_ms = 3600000\n\
         [circuit_breaker]\nopen_ms = {year}\n\
         [rate_limit]\nrequests_per_second = 0.001\nburst = 1000000\nmax_wait_ms = {year}\n\
         backend = \"redis\"\nredis_url = \"{redis}\"\nredis_timeout_ms = {year}\n\
         fallback_share = 0.001\nredis_key_prefix = \"bounds-{id}\"\n\
         [[routes]]\nprefix = \"/open/\"\nattempt_timeout_ms = {year}\n\
         rate_limit_per_second = 1000000\nrate_limit_burst = 1\n\
         [[routes]]\nprefix = \"/alibaba/\"\nrate_limit_per_second = 0.001\n\
         rate_limit_burst = 1000000\n\
         [callbacks]\nstore = {store:?}\nmax_age_ms = {year}\nbackoff_base_ms = {year}\n\
         backoff_cap_ms = {year}\ndelivery_timeout_ms = {year}\n",
        upstream = upstream.uri(),
        redis = redis.url(),
        id = pandagate::ids::request_id(),
        store = dir.path().join("store").display().to_string(),
    );
    let path = config_file(&dir, "bounds.toml", &toml);
    let checked = output(&["check", "--config", &path], CREDS);
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked.stderr));

    let running = support::launch(&["run", "--config", &path], CREDS).await;
    for target in ["/open/product/get", "/alibaba/product/detail/get"] {
        let answer = support::get(&format!("http://{}{target}", running.gateway)).await;
        assert_eq!(answer.status, 200, "{target}: {:?}", answer.body);
    }
    // The route bucket at 10^6/s with a burst of 1: the next call in the
    // same microsecond may be refused, never fail otherwise.
    let again = support::get(&format!("http://{}/open/product/get", running.gateway)).await;
    assert!(
        matches!(again.status.as_u16(), 200 | 429),
        "{:?}",
        again.body
    );
    let health = support::get(&format!("http://{}/readyz", running.admin)).await;
    assert_eq!(health.status, 200, "{:?}", health.body);
}

const URL_PASSWORDS: [&str; 5] = [
    "redis-pw-in-toml",
    "upstream-pw-in-toml",
    "subscriber-pw-in-toml",
    "upstream-pw-in-env",
    "redis-pw-in-env",
];

#[test]
fn check_shows_no_password_of_any_url() {
    let dir = tempfile::tempdir().unwrap();
    let inline = config_file(
        &dir,
        "inline.toml",
        "[rate_limit]\nrequests_per_second = 5\nbackend = \"redis\"\n\
         redis_url = \"redis://:redis-pw-in-toml@redis.internal:6379/2\"\n\
         [callbacks]\nstore = \"/nonexistent\"\n\
         [[callbacks.subscribers]]\nurl = \"http://hook:subscriber-pw-in-toml@orders.internal/events\"\n\
         [[callbacks.subscribers]]\nurl = \"http://subscriber-pw-in-toml@audit.internal/events\"\n",
    );
    let out = output(&["check", "--config", &inline], CREDS);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for shown in [
        "redis_url = \"redis://:<redacted>@redis.internal:6379/2\"",
        "url = \"http://hook:<redacted>@orders.internal/events\"",
        "url = \"http://<redacted>@audit.internal/events\"",
        "# rate_limit: Redis URL redis://:<redacted>@redis.internal:6379/2",
    ] {
        assert!(stdout.contains(shown), "{shown:?} not in:\n{stdout}");
    }

    // The upstream from the environment, the Redis URL from an environment
    // variable: check says where it comes from, nothing of the URL.
    let from_env = config_file(
        &dir,
        "from-env.toml",
        "[rate_limit]\nrequests_per_second = 5\nbackend = \"redis\"\n\
         redis_url_env = \"PANDAGATE_TEST_REDIS_URL\"\n",
    );
    let env = [
        CREDS[0],
        CREDS[1],
        (
            "PANDAGATE_UPSTREAM",
            "https://gw:upstream-pw-in-env@api.example.test",
        ),
        (
            "PANDAGATE_TEST_REDIS_URL",
            "redis://app:redis-pw-in-env@redis.internal:6379",
        ),
    ];
    // Credentials in the upstream URL are refused, named redacted: they
    // would travel to the provider in `Host`.
    let out_upstream = output(&["check", "--config", &from_env], &env);
    assert_eq!(out_upstream.status.code(), Some(78));
    let refused = text(&out_upstream.stderr);
    assert!(
        refused.contains("upstream.url: must not carry credentials")
            && refused.contains("https://gw:<redacted>@api.example.test"),
        "{refused}"
    );
    let toml_upstream = config_file(
        &dir,
        "upstream.toml",
        "[upstream]\nurl = \"https://gw:upstream-pw-in-toml@api.example.test/base\"\n",
    );
    let out_toml = output(&["check", "--config", &toml_upstream], CREDS);
    assert_eq!(out_toml.status.code(), Some(78));
    let env = [env[0], env[1], env[3]];
    let out_env = output(&["check", "--config", &from_env], &env);
    let stdout_env = text(&out_env.stdout);
    assert_eq!(out_env.status.code(), Some(0), "{}", text(&out_env.stderr));
    assert!(
        stdout_env.contains("redis_url_env = \"PANDAGATE_TEST_REDIS_URL\""),
        "{stdout_env}"
    );
    assert!(
        stdout_env
            .contains("# rate_limit: Redis URL from environment variable PANDAGATE_TEST_REDIS_URL"),
        "{stdout_env}"
    );
    assert!(!stdout_env.contains("redis.internal"), "{stdout_env}");

    for out in [&out, &out_env, &out_upstream, &out_toml] {
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        for pw in URL_PASSWORDS {
            assert!(!all.contains(pw), "{pw} shown in:\n{all}");
        }
    }
}

/// Starts the gateway on `toml` and makes two calls at a quota of one call
/// per 1000 s; returns the second call's `Retry-After`: large when Redis
/// decided, 1 when Redis refused the gateway and `fail_mode = "closed"`
/// answered in its place.
async fn second_call_retry_after(toml: &str, env: &[(&str, &str)], upstream: &str) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let path = config_file(&dir, "redis.toml", toml);
    let mut env = env.to_vec();
    env.extend([CREDS[0], CREDS[1], ("PANDAGATE_UPSTREAM", upstream)]);
    let checked = output(&["check", "--config", &path], &env);
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked.stderr));
    let mut running = support::launch(&["run", "--config", &path], &env).await;
    let url = format!("http://{}/open/product/get", running.gateway);
    let first = support::get(&url).await;
    let second = support::get(&url).await;
    assert_eq!(second.status, 429, "{:?}", second.body);
    let retry_after: u64 = second.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    if retry_after > 1 {
        assert_eq!(first.status, 200, "{:?}", first.body);
    }
    running.signal("-TERM");
    let _ = tokio::time::timeout(Duration::from_secs(20), running.child.wait()).await;
    let mut logs = String::new();
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(5), running.stderr.next_line()).await
    {
        logs.push_str(&line);
    }
    for (_, value) in &env {
        if let Some(pw) = value.strip_prefix("redis://:") {
            let pw = pw.split('@').next().unwrap();
            assert!(!logs.contains(pw), "the Redis password in the logs: {logs}");
        }
    }
    retry_after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_url_from_env_or_file_is_the_one_connected_with() {
    let password = "s3cret-redis-requirepass";
    let redis = support::redis_server::RedisServer::start_with_password(password);
    let upstream = support::upstream_answering(ResponseTemplate::new(200).set_body_raw(
        support::provider_body("rid-redis", 200, "ok"),
        "application/json",
    ))
    .await;
    let good = format!("redis://:{password}@127.0.0.1:{}", redis.port);
    let wrong = format!("redis://:not-the-password@127.0.0.1:{}", redis.port);
    let section = |source: &str| {
        format!(
            "[rate_limit]\nrequests_per_second = 0.001\nburst = 1\nbackend = \"redis\"\n\
             fail_mode = \"closed\"\nredis_timeout_ms = 2000\n\
             redis_key_prefix = \"cli-{}\"\n{source}\n",
            pandagate::ids::request_id()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let url_file = dir.path().join("redis-url");

    // From the environment.
    let from_env = section("redis_url_env = \"PANDAGATE_TEST_REDIS_URL\"");
    let env = [("PANDAGATE_TEST_REDIS_URL", good.as_str())];
    let waited = second_call_retry_after(&from_env, &env, &upstream.uri()).await;
    assert!(waited > 900, "Redis decided: Retry-After {waited}");
    // From a file.
    std::fs::write(&url_file, format!("{good}\n")).unwrap();
    let from_file = section(&format!(
        "redis_url_file = {:?}",
        url_file.display().to_string()
    ));
    let waited = second_call_retry_after(&from_file, &[], &upstream.uri()).await;
    assert!(waited > 900, "Redis decided: Retry-After {waited}");
    // The keys are in this Redis, reached with the password.
    let client = redis::Client::open(good.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cli-*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        keys.len(),
        4,
        "a quota schedule and its clients per run: {keys:?}"
    );
    assert_eq!(
        keys.iter().filter(|k| k.ends_with(":key")).count(),
        2,
        "{keys:?}"
    );
    assert_eq!(
        keys.iter().filter(|k| k.ends_with(":clients")).count(),
        2,
        "{keys:?}"
    );

    // The wrong password: Redis refuses the gateway, the closed fail mode answers.
    let env = [("PANDAGATE_TEST_REDIS_URL", wrong.as_str())];
    let waited = second_call_retry_after(&from_env, &env, &upstream.uri()).await;
    assert_eq!(waited, 1, "refused by the fail mode, not by Redis");
}

/// sysexits: a command line that cannot be used is EX_USAGE (64), a
/// listener that cannot be bound EX_UNAVAILABLE (69); `--help` and
/// `--version` succeed, and `--version` names the commit.
#[test]
fn exit_statuses_follow_sysexits() {
    for args in [
        &["--no-such-flag"][..],
        &["no-such-command"],
        &["sandbox", "--listen", "not-an-address"],
        &["callbacks", "replay"],
    ] {
        let out = output(args, &[]);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "{args:?} says why");
    }
    let out = output(&["sign", "--profile", "nobody"], CREDS);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));

    let help = output(&["--help"], &[]);
    assert_eq!(help.status.code(), Some(0));
    let help = text(&help.stdout);
    for status in ["64", "69", "78"] {
        assert!(
            help.contains(status),
            "--help lists exit status {status}: {help}"
        );
    }
    let version = output(&["--version"], &[]);
    assert_eq!(version.status.code(), Some(0));
    let version = text(&version.stdout);
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")) && version.contains("(commit "),
        "{version}"
    );

    // The admin port already taken: the gateway cannot serve.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = output(
        &["run"],
        &[
            CREDS[0],
            CREDS[1],
            ("PANDAGATE_LISTEN", "127.0.0.1:0"),
            ("PANDAGATE_ADMIN_LISTEN", &addr),
            ("PANDAGATE_CONTROL_LISTEN", "127.0.0.1:0"),
        ],
    );
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&addr));
}

/// `check` says where each section's Redis is in every mode: a Cluster's
/// seed nodes, the sentinels and their master, read from a variable too,
/// with every password redacted.
#[test]
fn check_shows_each_redis_topology_with_passwords_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topologies.toml");
    std::fs::write(
        &path,
        "[rate_limit]\nrequests_per_second = 10\nbackend = \"redis\"\nredis_mode = \"cluster\"\n\
         redis_urls = [\"redis://:seed-pw-1@10.0.0.1:7000\", \"redis://:seed-pw-1@10.0.0.2:7000\"]\n\n\
         [idempotency]\nstore = \"redis\"\nredis_mode = \"sentinel\"\nredis_url_env = \"SENTINELS\"\n\
         redis_sentinel_master = \"orders-master\"\n",
    )
    .unwrap();
    let out = output(
        &["check", "--config", path.to_str().unwrap()],
        &[
            CREDS[0],
            CREDS[1],
            (
                "SENTINELS",
                "redis://:sent-pw-2@s1:26379, redis://:sent-pw-2@s2:26379",
            ),
        ],
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains(
            "# rate_limit: Redis Cluster, seed nodes redis://:<redacted>@10.0.0.1:7000, \
             redis://:<redacted>@10.0.0.2:7000"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "# idempotency: Redis master \"orders-master\" asked of the sentinels \
             redis://:<redacted>@s1:26379, redis://:<redacted>@s2:26379 \
             (from environment variable SENTINELS)"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("redis_mode = \"cluster\""), "{stdout}");
    for password in ["seed-pw-1", "sent-pw-2"] {
        assert!(!stdout.contains(password), "{password} shown: {stdout}");
        assert!(!text(&out.stderr).contains(password));
    }
}
