//! The operator listeners (admin: reads; control: changes) and the
//! graceful drain, on the real binary.

use crate::support;

use std::time::{Duration, Instant};

use support::binary::Running;
use tokio::process::Child;
use wiremock::ResponseTemplate;

/// Starts the binary against `upstream` and waits for both listeners.
async fn start(upstream: &str) -> Running {
    support::launch(
        &[],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", "sk-shutdown-test"),
            ("PANDAGATE_UPSTREAM", upstream),
        ],
    )
    .await
}

async fn exit_code(child: &mut Child, within: Duration) -> Option<i32> {
    tokio::time::timeout(within, child.wait())
        .await
        .expect("process exits in time")
        .unwrap()
        .code()
}

async fn slow_upstream(delay: Duration) -> wiremock::MockServer {
    support::upstream_answering(
        ResponseTemplate::new(200)
            .set_body_raw(support::provider_body("rid", 200, "ok"), "application/json")
            .set_delay(delay),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_calls_in_flight_refuses_new_ones_and_exits_0() {
    let upstream = slow_upstream(Duration::from_millis(1500)).await;
    let mut gw = start(&upstream.uri()).await;
    assert_eq!(
        support::get(&format!("http://{}/healthz", gw.admin))
            .await
            .status,
        200
    );
    assert_eq!(
        support::get(&format!("http://{}/readyz", gw.admin))
            .await
            .status,
        200
    );

    let url = format!("http://{}/open/product/get", gw.gateway);
    let in_flight = tokio::spawn(async move { support::get(&url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert_eq!(
        support::get(&format!("http://{}/readyz", gw.admin))
            .await
            .status,
        503,
        "readiness drops at once"
    );
    assert!(
        tokio::net::TcpStream::connect(&gw.gateway).await.is_err(),
        "no new connections"
    );
    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, 200, "the call in flight completed");
    assert_eq!(
        exit_code(&mut gw.child, Duration::from_secs(10)).await,
        Some(0)
    );
}

fn post(url: String, bearer: Option<&str>) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = http::Request::post(url);
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.body(http_body_util::Full::default()).unwrap()
}

/// What changes state is not on the listener opened to the monitoring
/// namespace: the admin listener only reads, whatever method or spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_only_reads() {
    let upstream = slow_upstream(Duration::ZERO).await;
    let mut gw = start(&upstream.uri()).await;
    for path in [
        "/quitquitquit",
        "/quitquitquit?now=1",
        "/cache/purge?prefix=/",
        "/callbacks/replay?all-dead=1",
    ] {
        for method in ["POST", "PUT", "GET", "DELETE"] {
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://{}{path}", gw.admin))
                .body(http_body_util::Full::default())
                .unwrap();
            let answer = support::send(req).await;
            assert_eq!(answer.status, 404, "{method} {path}");
            assert!(
                String::from_utf8_lossy(&answer.body).contains("control listener"),
                "{method} {path}"
            );
        }
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let url = format!("http://{}{path}", gw.admin);
        assert_eq!(support::get(&url).await.status, 200, "{path}");
        assert_eq!(support::send(post(url, None)).await.status, 405, "{path}");
    }
    // Still serving: nothing drained it.
    assert_eq!(
        support::get(&format!("http://{}/open/product/get", gw.gateway))
            .await
            .status,
        200
    );
    let metrics = support::get(&format!("http://{}/metrics", gw.admin)).await;
    assert!(
        String::from_utf8_lossy(&metrics.body)
            .contains(r#"pandagate_connections_open{listener="control"}"#),
        "the control listener's connections are counted"
    );
    gw.signal("-TERM");
    assert_eq!(
        exit_code(&mut gw.child, Duration::from_secs(10)).await,
        Some(0)
    );
}

/// With a token the control listener may leave loopback; every call must
/// bear it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_listener_wants_its_token() {
    let upstream = slow_upstream(Duration::ZERO).await;
    let token = "control-token-never-log-me";
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pandagate.toml");
    std::fs::write(
        &config,
        "[server]\ncontrol_token_env = \"MY_CONTROL_TOKEN\"\n",
    )
    .unwrap();
    let mut gw = support::launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", "sk-shutdown-test"),
            ("PANDAGATE_UPSTREAM", &upstream.uri()),
            ("PANDAGATE_CONTROL_LISTEN", "0.0.0.0:0"),
            ("MY_CONTROL_TOKEN", token),
        ],
    )
    .await;
    let port = gw.control.rsplit(':').next().unwrap().to_owned();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    for bearer in [
        None,
        Some("wrong"),
        Some("control-token-never-log-m"),
        Some(""),
    ] {
        let answer = support::send(post(url("/cache/purge?prefix=/"), bearer)).await;
        assert_eq!(answer.status, 401, "{bearer:?}");
        assert_eq!(answer.headers["www-authenticate"], "Bearer");
        let quit = support::send(post(url("/quitquitquit"), bearer)).await;
        assert_eq!(quit.status, 401, "{bearer:?}");
    }
    assert_eq!(
        support::get(&format!("http://{}/readyz", gw.admin))
            .await
            .status,
        200,
        "not drained"
    );
    let purged = support::send(post(url("/cache/purge?prefix=/"), Some(token))).await;
    assert_eq!(purged.status, 200);
    let quit = support::send(post(url("/quitquitquit"), Some(token))).await;
    assert_eq!(quit.status, 200);
    assert_eq!(
        exit_code(&mut gw.child, Duration::from_secs(10)).await,
        Some(0)
    );
    let mut said = String::new();
    while let Ok(Some(line)) = gw.stderr.next_line().await {
        said.push_str(&line);
    }
    assert!(!said.contains(token), "the token is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_drains_and_exits_0() {
    let upstream = slow_upstream(Duration::ZERO).await;
    let mut gw = start(&upstream.uri()).await;
    let quit = support::send(
        http::Request::post(format!("http://{}/quitquitquit", gw.control))
            .body(http_body_util::Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(quit.status, 200);
    assert_eq!(
        exit_code(&mut gw.child, Duration::from_secs(10)).await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let upstream = slow_upstream(Duration::from_secs(10)).await;
    let mut gw = start(&upstream.uri()).await;
    let url = format!("http://{}/open/product/get", gw.gateway);
    let _in_flight = tokio::spawn(async move { support::get(&url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    gw.signal("-INT");
    assert_eq!(
        exit_code(&mut gw.child, Duration::from_secs(5)).await,
        Some(1)
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "did not wait for the slow call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_prometheus_text() {
    let upstream = slow_upstream(Duration::ZERO).await;
    let mut gw = start(&upstream.uri()).await;
    for _ in 0..3 {
        support::get(&format!("http://{}/open/product/get", gw.gateway)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let metrics = support::get(&format!("http://{}/metrics", gw.admin)).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains(r#"pandagate_calls_total{class="read",status="200",code="200"} 3"#),
        "{text}"
    );
    assert!(
        text.contains("# TYPE pandagate_request_duration_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("pandagate_circuit_state 0"), "{text}");
    gw.signal("-TERM");
    assert_eq!(
        exit_code(&mut gw.child, Duration::from_secs(10)).await,
        Some(0)
    );
}
