//! Retries that never buy twice.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use pandagate::config::Config;
use support::client::Answer;
use support::gateway::TestGateway;
use support::provider::{expected_signature, upstream_failing_first};
use support::wire::{read_message, read_request};
use support::*;
use tokio::io::AsyncWriteExt;
use wiremock::matchers::{any, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Quick backoff so tests take milliseconds; no breaker unless a test wants one.
fn fast(upstream: &str) -> Config {
    let mut c = config(upstream);
    c.retry.backoff_base_ms = 1;
    c.retry.backoff_cap_ms = 5;
    c.circuit_breaker.enabled = false;
    c
}

fn envelope(code: i64) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(provider_body("rid", code, "m"), "application/json")
}

async fn post(gw: &TestGateway, target: &str, body: &'static str) -> Answer {
    send(
        Request::post(gw.url(target))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn retries_503_on_reads_then_succeeds_with_fresh_signatures() {
    let upstream = upstream_failing_first(2, ResponseTemplate::new(503), envelope(200)).await;
    let gw = spawn_gateway(fast(&upstream.uri())).await;

    let answer = post(
        &gw,
        "/alibaba/product/keywords/query",
        r#"{"keyword":"mug"}"#,
    )
    .await;
    assert_eq!(answer.status, 200);

    let received = upstream.received_requests().await.unwrap();
    assert_eq!(received.len(), 3);
    let mut nonces: Vec<_> = received
        .iter()
        .map(|r| r.headers["nonce-str"].clone())
        .collect();
    nonces.dedup();
    assert_eq!(nonces.len(), 3, "every attempt has its own nonce");
    for r in &received {
        assert_eq!(r.body, br#"{"keyword":"mug"}"#, "the body is re-sent whole");
        let ts = r.headers["timestamp"].to_str().unwrap();
        let nonce = r.headers["nonce-str"].to_str().unwrap();
        assert_eq!(
            r.headers["signature"].to_str().unwrap(),
            expected_signature(ACCESS_KEY, ts, nonce, SECRET)
        );
    }
    let e = &gw.access_log_of(1).await[0];
    assert_eq!(e["class"], "read");
    assert_eq!(e["attempts"], 3);
    assert_eq!(e["retry_reasons"], serde_json::json!(["503", "503"]));
    assert!(e["retry_skipped"].is_null());
    gw.stop().await;
}

#[tokio::test]
async fn never_repeats_order_create_answered_503() {
    let upstream = upstream_answering(ResponseTemplate::new(503)).await;
    let gw = spawn_gateway(fast(&upstream.uri())).await;
    for target in [
        "/alibaba/order/create",
        "/open/order",
        "/v2/alibaba/order/create",
    ] {
        assert_eq!(post(&gw, target, "{}").await.status, 503, "{target}");
    }
    assert_eq!(
        upstream.received_requests().await.unwrap().len(),
        3,
        "one each"
    );
    let log = gw.access_log_of(3).await;
    for e in &log {
        assert_eq!(e["class"], "write");
        assert_eq!(e["attempts"], 1);
        assert_eq!(e["retry_skipped"], "not_repeatable");
    }
    gw.stop().await;
}

#[tokio::test]
async fn state_changing_gets_and_unknown_posts_are_not_repeated() {
    let upstream = upstream_answering(ResponseTemplate::new(503)).await;
    let gw = spawn_gateway(fast(&upstream.uri())).await;
    assert_eq!(
        get(&gw.url("/open/order/refund/cancel/R-1")).await.status,
        503
    );
    assert_eq!(
        get(&gw.url("/alibaba/order/pay/url?orderId=1"))
            .await
            .status,
        503
    );
    assert_eq!(
        post(&gw, "/open/brand/new/endpoint", "{}").await.status,
        503
    );
    assert_eq!(upstream.received_requests().await.unwrap().len(), 3);
    let classes: Vec<_> = gw
        .access_log_of(3)
        .await
        .iter()
        .map(|e| e["class"].clone())
        .collect();
    assert_eq!(classes, ["write", "write", "unknown"]);
    gw.stop().await;
}

#[tokio::test]
async fn order_create_after_connection_refused_is_sent_exactly_once() {
    // The upstream's port refuses connections until a listener appears on it
    // a moment after the call started.
    let port = dead_address().port();
    let mut c = fast(&format!("http://127.0.0.1:{port}"));
    c.retry.max_attempts = 50;
    c.retry.backoff_base_ms = 20;
    c.retry.backoff_cap_ms = 20;
    c.retry.budget_min_per_sec = 100;
    let gw = spawn_gateway(c).await;
    let late = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let upstream = MockServer::builder().listener(listener).start().await;
        Mock::given(any())
            .respond_with(envelope(200))
            .mount(&upstream)
            .await;
        upstream
    });
    let answer = post(&gw, "/alibaba/order/create", r#"{"offerId":1}"#).await;
    let upstream = late.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(
        upstream.received_requests().await.unwrap().len(),
        1,
        "bought once"
    );
    let e = &gw.access_log_of(1).await[0];
    assert_eq!(e["class"], "write");
    assert!(e["attempts"].as_u64().unwrap() >= 2, "{e}");
    let reasons = e["retry_reasons"].as_array().unwrap();
    assert!(
        !reasons.is_empty() && reasons.iter().all(|r| r == "connect"),
        "{e}"
    );
    gw.stop().await;
}

/// An upstream that reads each request and closes without answering, for
/// the first `drops` requests, then answers 200.
async fn dropping_upstream(drops: usize) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                loop {
                    let request = read_message(&mut stream).await;
                    if request.is_empty() {
                        return;
                    }
                    if count.fetch_add(1, Ordering::SeqCst) < drops {
                        return; // close: the request was sent, no answer
                    }
                    let body = provider_body("rid-ok", 200, "ok");
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn never_repeats_pay_dropped_after_the_request_was_sent() {
    let (addr, seen) = dropping_upstream(usize::MAX).await;
    let gw = spawn_gateway(fast(&format!("http://{addr}"))).await;
    let answer = post(
        &gw,
        "/alibaba/order/batch/submit/to/pay",
        r#"{"orderIds":[1]}"#,
    )
    .await;
    answer.assert_gateway_envelope(502);
    assert_eq!(seen.load(Ordering::SeqCst), 1, "paid at most once");
    let e = &gw.access_log_of(1).await[0];
    assert_eq!(e["attempts"], 1);
    assert_eq!(e["retry_skipped"], "not_repeatable");
    gw.stop().await;
}

#[tokio::test]
async fn retries_reads_dropped_after_sending() {
    let (addr, seen) = dropping_upstream(1).await;
    let gw = spawn_gateway(fast(&format!("http://{addr}"))).await;
    let answer = get(&gw.url("/alibaba/order/detail?orderId=1")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    let e = &gw.access_log_of(1).await[0];
    assert_eq!(e["retry_reasons"], serde_json::json!(["reset"]));
    gw.stop().await;
}

#[tokio::test]
async fn retries_a_read_whose_attempt_timed_out() {
    let upstream = upstream_failing_first(
        1,
        envelope(200).set_delay(Duration::from_secs(5)),
        envelope(200),
    )
    .await;
    let mut c = fast(&upstream.uri());
    c.retry.read_attempt_timeout_ms = 200;
    let gw = spawn_gateway(c).await;
    let started = Instant::now();
    let answer = get(&gw.url("/open/product/get")).await;
    assert_eq!(answer.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "did not wait for the slow attempt"
    );
    let e = &gw.access_log_of(1).await[0];
    assert_eq!(e["retry_reasons"], serde_json::json!(["timeout"]));
    gw.stop().await;
}

#[tokio::test]
async fn honours_retry_after_on_429_for_reads() {
    let upstream = upstream_failing_first(
        1,
        ResponseTemplate::new(429).insert_header("retry-after", "1"),
        envelope(200),
    )
    .await;
    let gw = spawn_gateway(fast(&upstream.uri())).await;
    let started = Instant::now();
    let answer = get(&gw.url("/open/product/get")).await;
    assert_eq!(answer.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited as told"
    );
    assert_eq!(upstream.received_requests().await.unwrap().len(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn returns_429_at_once_when_retry_after_passes_the_deadline() {
    let upstream =
        upstream_answering(ResponseTemplate::new(429).insert_header("retry-after", "120")).await;
    let gw = spawn_gateway(fast(&upstream.uri())).await;
    let started = Instant::now();
    let answer = get(&gw.url("/open/product/get")).await;
    assert_eq!(answer.status, 429);
    assert_eq!(answer.headers["retry-after"], "120");
    assert!(started.elapsed() < Duration::from_secs(5));
    let e = &gw.access_log_of(1).await[0];
    assert_eq!(e["retry_skipped"], "retry_after_beyond_deadline");
    gw.stop().await;
}

#[tokio::test]
async fn retries_transient_business_codes_on_reads_only() {
    let upstream = MockServer::start().await;
    Mock::given(path("/open/product/get"))
        .respond_with(envelope(5001))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&upstream)
        .await;
    Mock::given(path("/open/product/get"))
        .respond_with(envelope(200))
        .mount(&upstream)
        .await;
    Mock::given(method("POST"))
        .respond_with(envelope(5001))
        .mount(&upstream)
        .await;
    let mut c = fast(&upstream.uri());
    c.retry.transient_codes = vec![pandagate::config::CodeValue::Int(5001)];
    let gw = spawn_gateway(c).await;
    let answer = get(&gw.url("/open/product/get")).await;
    assert_eq!(answer.json()["code"], 200);
    let answer = post(&gw, "/alibaba/order/create", "{}").await;
    assert_eq!(
        answer.json()["code"],
        5001,
        "a write's business error is returned as is"
    );
    let log = gw.access_log_of(2).await;
    assert_eq!(log[0]["retry_reasons"], serde_json::json!(["code:5001"]));
    assert_eq!(log[0]["code"], 200);
    assert_eq!(log[1]["attempts"], 1);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 3);
    gw.stop().await;
}

#[tokio::test]
async fn streamed_bodies_are_not_repeated_and_the_log_says_why() {
    let upstream = upstream_answering(ResponseTemplate::new(503)).await;
    let mut c = fast(&upstream.uri());
    c.server.buffer_body_bytes = 1024;
    let gw = spawn_gateway(c).await;
    let image = Bytes::from(vec![b'x'; 64 * 1024]);
    let answer = send(
        Request::post(gw.url("/alibaba/product/image/query"))
            .body(Full::new(image))
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 503);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 1);
    let e = &gw.access_log_of(1).await[0];
    assert_eq!(e["class"], "read");
    assert_eq!(e["retry_skipped"], "body_not_replayable");
    gw.stop().await;
}

#[tokio::test]
async fn total_outage_bounds_attempts_and_respects_the_budget() {
    let upstream = upstream_answering(ResponseTemplate::new(503)).await;
    let mut c = fast(&upstream.uri());
    c.retry.budget_percent = 20;
    c.retry.budget_min_per_sec = 1;
    c.retry.budget_window_ms = 10_000;
    let gw = spawn_gateway(c).await;
    let calls = 60;
    for _ in 0..calls {
        assert_eq!(get(&gw.url("/open/product/get")).await.status, 503);
    }
    let sent = upstream.received_requests().await.unwrap().len();
    // 60 first attempts; retries at most 1/s × 10 s + 20 % of 60.
    assert!(sent <= calls + 10 + 12, "{sent} attempts");
    assert!(sent > calls, "some retries were allowed");
    let log = gw.access_log_of(calls).await;
    assert!(log.iter().all(|e| e["attempts"].as_u64().unwrap() <= 3));
    assert!(
        log.iter().any(|e| e["retry_skipped"] == "budget"),
        "budget ran out"
    );
    gw.stop().await;
}

/// A provider answering 503 and a gateway whose circuit (3 failures, 300 ms
/// open) those answers have just opened.
async fn circuit_opened_by_three_503s() -> (MockServer, TestGateway) {
    let upstream = upstream_answering(ResponseTemplate::new(503)).await;
    let mut c = fast(&upstream.uri());
    c.retry.max_attempts = 1;
    c.circuit_breaker.enabled = true;
    c.circuit_breaker.failure_threshold = 3;
    c.circuit_breaker.open_ms = 300;
    let gw = spawn_gateway(c).await;
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/open/product/get")).await.status, 503);
    }
    (upstream, gw)
}

#[tokio::test]
async fn circuit_opens_fails_fast_and_closes_when_the_provider_recovers() {
    let (upstream, gw) = circuit_opened_by_three_503s().await;
    assert_eq!(upstream.received_requests().await.unwrap().len(), 3);

    // Open: answered by the gateway at once, the provider is left alone.
    let fast_fail = get(&gw.url("/open/product/get")).await;
    let v = fast_fail.assert_gateway_envelope(503);
    assert!(v["msg"].as_str().unwrap().contains("circuit open"));
    assert_eq!(fast_fail.headers["retry-after"], "1");
    assert_eq!(upstream.received_requests().await.unwrap().len(), 3);

    // The provider recovers; after the cool-down a probe closes the circuit.
    upstream.reset().await;
    Mock::given(any())
        .respond_with(envelope(200))
        .mount(&upstream)
        .await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 2);
    let log = gw.access_log_of(6).await;
    assert_eq!(log[3]["error"], "circuit_open");
    assert_eq!(log[3]["attempts"], 0);
    gw.stop().await;
}

/// A caller that leaves while its call is the half-open probe: the probe
/// slot comes back (the next call probes and closes the circuit) and the
/// abandoned call is still logged, as 499 `caller_gone`. Before the fix the
/// circuit stayed half-open, refusing every call until a reload.
#[tokio::test]
async fn a_caller_leaving_during_the_probe_does_not_wedge_the_circuit() {
    let (upstream, gw) = circuit_opened_by_three_503s().await;
    // Recovered, but slow: the probe takes 1 s and its caller gives up.
    upstream.reset().await;
    Mock::given(any())
        .respond_with(envelope(200).set_delay(Duration::from_millis(1_000)))
        .mount(&upstream)
        .await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        get(&gw.url("/open/product/get")),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the probe answered before the caller left"
    );
    // Give the gateway a moment to see the caller go.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let next = get(&gw.url("/open/product/get")).await;
    assert_eq!(next.status, 200, "circuit wedged: {:?}", next.json());
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);

    let log = gw.access_log_of(6).await;
    let gone: Vec<_> = log.iter().filter(|l| l["error"] == "caller_gone").collect();
    assert_eq!(gone.len(), 1, "{log:?}");
    assert_eq!(gone[0]["status"], 499);
    assert_eq!(gone[0]["path"], "/open/product/get");
    assert_eq!(
        log.len(),
        6,
        "one line per call, the abandoned one included"
    );
    gw.stop().await;
}

/// A provider that closes a kept-alive connection idle for `idle` when the
/// next request arrives on it — what a request meets when it is written just
/// as the provider's idle timeout closes the connection: read by nobody, no
/// answer. Counts the requests it answered.
async fn closing_when_idle(idle: Duration) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut last = Instant::now();
                while read_request(&mut stream).await.is_some() {
                    if last.elapsed() >= idle && count.load(Ordering::SeqCst) > 0 {
                        // Closed by the idle timeout before this request
                        // was read.
                        return;
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = provider_body("rid-idle", 200, "ok");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    last = Instant::now();
                }
            });
        }
    });
    (format!("http://{addr}"), answered)
}

/// A write after a pause near the provider's idle timeout: on a connection
/// the provider is closing it would be lost (and, rightly, not sent again),
/// so writes take no connection idle for longer than
/// `write_pool_idle_timeout_ms`; reads keep their long-lived pool.
#[tokio::test]
async fn a_write_after_a_pause_takes_a_connection_the_provider_still_keeps() {
    for (write_idle_ms, expected) in [(150, 200), (60_000, 502)] {
        let (url, answered) = closing_when_idle(Duration::from_millis(300)).await;
        let mut c = fast(&url);
        c.upstream.write_pool_idle_timeout_ms = write_idle_ms;
        let gw = spawn_gateway(c).await;
        let order = r#"{"outOrderId":"pause-1"}"#;
        assert_eq!(post(&gw, "/alibaba/order/create", order).await.status, 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let after = post(&gw, "/alibaba/order/create", r#"{"outOrderId":"pause-2"}"#).await;
        assert_eq!(
            after.status, expected,
            "write_pool_idle_timeout_ms = {write_idle_ms}"
        );
        // A read in the same spot is retried on a new connection either way.
        assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
        let sent = if expected == 200 { 4 } else { 3 };
        assert_eq!(answered.load(Ordering::SeqCst), sent);
        gw.stop().await;
    }
}
