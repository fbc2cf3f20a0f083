//! The real binary at `RUST_LOG=trace`, through every feature that touches a
//! secret or a caller token — signing, secret rotation, retries, the
//! limiter, caller authentication (right and wrong tokens), pushed messages
//! (signed and forged), admin endpoints, a config reload — and then a search
//! of everything it wrote (diagnostics, access log, admin answers, client
//! answers) for those values, raw and in the encodings a log might use.

use crate::support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use wiremock::matchers::{any, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "sk-leak-probe-7f3a9c";
const ROTATED: &str = "sk-leak-probe-rotated-41d2e8";
const TOKEN: &str = "tok-leak-probe-c0ffee";
const WRONG_TOKEN: &str = "tok-leak-probe-wrong-b4d";

fn write_config(dir: &Path, upstream: &str, subscriber: &str, requests_per_second: u32) {
    std::fs::write(
        dir.join("pandagate.toml"),
        format!(
            r#"
[server]
secret_poll_ms = 50

[upstream]
url = "{upstream}"

[retry]
backoff_base_ms = 5
backoff_cap_ms = 20

[rate_limit]
requests_per_second = {requests_per_second}
burst = 3

[[profiles]]
name = "default"
access_key = "ak-leak-probe"
secret_file = "{secret}"
user_id = "2100007341207"

[[clients]]
name = "svc"
token_env = "CALLER_TOKEN"
profiles = ["default"]

[callbacks]
store = "{store}"
backoff_base_ms = 20
backoff_cap_ms = 50

[[callbacks.subscribers]]
url = "{subscriber}"
"#,
            secret = dir.join("secret").display(),
            store = dir.join("store").display(),
        ),
    )
    .unwrap();
}

/// Waits (bounded) for `needle` in the file at `path`; returns its text.
async fn wait_in_file(path: &Path, needle: &str) -> String {
    for _ in 0..400 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{needle:?} never appeared in {}", path.display());
}

fn addr_of(diagnostics: &str, message: &str) -> String {
    diagnostics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == message)
        .and_then(|v| v["addr"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no {message:?} line"))
}

async fn call(gateway: &str, target: &str, token: Option<&str>) -> (u16, String) {
    let mut req = Request::get(format!("http://{gateway}{target}"));
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let answer = support::send(req.body(Full::new(Bytes::new())).unwrap()).await;
    (
        answer.status.as_u16(),
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

/// The forms a value could take on its way into a log line.
fn disguises(value: &str) -> Vec<String> {
    let mut forms = vec![
        value.to_owned(),
        hex::encode(value),
        format!("{:?}", value.as_bytes()),
        value.bytes().map(|b| format!("{b}, ")).collect::<String>(),
    ];
    // Base64, by hand (no dependency for one test).
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = value.as_bytes();
    let mut s = String::new();
    for chunk in b.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &x| (acc << 8) | u32::from(x)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            s.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    forms.push(s);
    forms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_reaches_any_output_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();

    let upstream = MockServer::start().await;
    // Reads fail once with 503 and are retried; everything else answers 200.
    Mock::given(path("/open/product/get"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&upstream)
        .await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(200).set_body_string(support::provider_body(
                "rid-leak-probe",
                200,
                "ok",
            )),
        )
        .mount(&upstream)
        .await;
    let subscriber = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&subscriber)
        .await;
    write_config(dir.path(), &upstream.uri(), &subscriber.uri(), 20);

    let stdout = dir.path().join("stdout");
    let stderr = dir.path().join("stderr");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pandagate"))
        .args([
            "--config",
            dir.path().join("pandagate.toml").to_str().unwrap(),
            "run",
        ])
        .env_clear()
        .env("PANDAGATE_LISTEN", "127.0.0.1:0")
        .env("PANDAGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PANDAGATE_CONTROL_LISTEN", "127.0.0.1:0")
        .env("PANDAGATE_LOG_FORMAT", "json")
        .env("RUST_LOG", "trace")
        .env("CALLER_TOKEN", TOKEN)
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let diagnostics = wait_in_file(&stderr, "admin listening").await;
    let diagnostics = if diagnostics.contains("gateway listening") {
        diagnostics
    } else {
        wait_in_file(&stderr, "gateway listening").await
    };
    let gw = addr_of(&diagnostics, "gateway listening");
    let admin = addr_of(&diagnostics, "admin listening");

    // Signing and a retried read.
    let (status, _) = call(&gw, "/open/product/get?itemId=1", Some(TOKEN)).await;
    assert_eq!(status, 200);
    // Caller authentication: a wrong token and none.
    assert_eq!(
        call(&gw, "/open/product/get", Some(WRONG_TOKEN)).await.0,
        401
    );
    assert_eq!(call(&gw, "/open/product/get", None).await.0, 401);
    // The limiter: a burst beyond 3 is refused.
    let mut limited = 0;
    for _ in 0..10 {
        if call(&gw, "/alibaba/order/detail?id=1", Some(TOKEN)).await.0 == 429 {
            limited += 1;
        }
    }
    assert!(limited > 0, "the limiter never refused");
    // Pushed messages: one signed, one forged.
    assert_eq!(support::push_signed(&gw, SECRET, "L1").await, 200);
    assert_eq!(support::push_signed(&gw, "not-the-secret", "L2").await, 401);
    // Secret rotation, then a config reload; then everything once more.
    std::fs::write(dir.path().join("secret"), ROTATED).unwrap();
    wait_in_file(&stderr, "secret reloaded from its file").await;
    write_config(dir.path(), &upstream.uri(), &subscriber.uri(), 25);
    support::os::signal(child.id().unwrap(), "-HUP");
    wait_in_file(&stderr, "config reloaded").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(call(&gw, "/open/order", Some(TOKEN)).await.0, 200);
    assert_eq!(support::push_signed(&gw, ROTATED, "L3").await, 200);
    // Admin endpoints.
    let mut admin_answers = String::new();
    for target in ["/metrics", "/readyz", "/callbacks", "/callbacks?dead=true"] {
        admin_answers.push_str(&call(&admin, target, None).await.1);
    }
    // Deliveries done, then a clean stop so every buffered line is written.
    for _ in 0..200 {
        if subscriber.received_requests().await.unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    support::os::signal(child.id().unwrap(), "-TERM");
    let exited = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    assert!(exited.is_ok(), "stopped within 20 s");

    let out = std::fs::read_to_string(&stdout).unwrap();
    let err = std::fs::read_to_string(&stderr).unwrap();
    // It did log at trace level, and it did all of the above.
    let trace_lines = err
        .lines()
        .filter(|l| l.contains(r#""level":"TRACE""#))
        .count();
    assert!(trace_lines > 10, "only {trace_lines} trace lines");
    assert!(
        out.contains(r#""retry_reasons":["503"]"#),
        "no retried call in {out}"
    );
    assert!(out.contains(r#""status":429"#) && out.contains(r#""status":401"#));
    assert!(err.contains("callback rejected"));
    assert_eq!(subscriber.received_requests().await.unwrap().len(), 2);
    // The provider did get the secret's signature, so it was in use.
    let sent = upstream.received_requests().await.unwrap();
    assert!(sent.iter().all(|r| r.headers.contains_key("signature")));

    for (what, text) in [
        ("diagnostics", &err),
        ("access log", &out),
        ("admin", &admin_answers),
    ] {
        for value in [SECRET, ROTATED, TOKEN, WRONG_TOKEN] {
            for form in disguises(value) {
                assert!(
                    !text.contains(&form),
                    "{what} contains {form:?} (from {value:?})"
                );
            }
        }
    }
    println!(
        "searched {} diagnostic lines ({trace_lines} at trace), {} access-log lines, {} bytes of admin answers",
        err.lines().count(),
        out.lines().count(),
        admin_answers.len()
    );
}
