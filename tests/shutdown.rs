//! Admin endpoints and the graceful drain, on the real binary.

mod support;

use std::time::{Duration, Instant};

use support::Running;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_drains_and_exits_0() {
    let upstream = slow_upstream(Duration::ZERO).await;
    let mut gw = start(&upstream.uri()).await;
    let quit = support::send(
        http::Request::post(format!("http://{}/quitquitquit", gw.admin))
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
