//! One access-log event per call, with the provider's requestId and code.

use crate::support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;
use wiremock::matchers::path;
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test]
async fn logs_one_event_with_every_field_when_the_response_ends() {
    let upstream = upstream_answering(ResponseTemplate::new(200).set_body_raw(
        provider_body("4cfda0b725184ab8a1e3ee3b9051ec35", 200, "成功"),
        "application/json",
    ))
    .await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let req = Request::post(gw.url("/alibaba/order/create?buyer=alice&phone=13800000000"))
        .header("x-request-id", "trace-abc")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let answer = send(req).await;
    assert_eq!(answer.status, 200);

    let log = gw.access_log_of(1).await;
    assert_eq!(log.len(), 1);
    let e = &log[0];
    assert_eq!(e["event"], "access");
    assert_eq!(e["request_id"], "4cfda0b725184ab8a1e3ee3b9051ec35");
    assert_eq!(e["code"], 200);
    assert_eq!(e["msg"], "成功");
    assert_eq!(e["status"], 200);
    assert_eq!(e["upstream_status"], 200);
    assert_eq!(e["method"], "POST");
    assert_eq!(e["path"], "/alibaba/order/create", "no query string");
    assert!(
        !e.to_string().contains("13800000000"),
        "query data never logged"
    );
    assert_eq!(e["profile"], "default");
    assert_eq!(e["attempts"], 1);
    let latency = e["latency_ms"].as_f64().unwrap();
    assert!((0.0..20_000.0).contains(&latency), "{latency}");
    assert_eq!(e["x_request_id"], "trace-abc");
    assert!(e["error"].is_null());
    assert!(e["ts"].as_str().unwrap().ends_with('Z'));
    gw.stop().await;
}

#[tokio::test]
async fn logs_business_errors_with_their_code() {
    let upstream = upstream_answering(ResponseTemplate::new(200).set_body_raw(
        provider_body("rid-busy", 5001, "系统繁忙"),
        "application/json",
    ))
    .await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    get(&gw.url("/open/product/get")).await;
    let e = &gw.access_log_of(1).await[0];
    assert_eq!(e["status"], 200);
    assert_eq!(e["code"], 5001);
    assert_eq!(e["msg"], "系统繁忙");
    assert_eq!(e["request_id"], "rid-busy");
    gw.stop().await;
}

#[tokio::test]
async fn logs_nulls_for_a_body_that_is_not_an_envelope() {
    let upstream =
        upstream_answering(ResponseTemplate::new(503).set_body_string("<html>busy</html>")).await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let answer = get(&gw.url("/open/product/get")).await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.body, "<html>busy</html>");
    let e = &gw.access_log_of(1).await[0];
    assert!(e["request_id"].is_null());
    assert!(e["code"].is_null());
    assert!(e["msg"].is_null());
    assert_eq!(e["status"], 503);
    assert_eq!(e["upstream_status"], 503);
    gw.stop().await;
}

#[tokio::test]
async fn large_responses_stream_whole_and_only_their_prefix_is_read() {
    let upstream = MockServer::start().await;
    let filler = "x".repeat(3 * 1024 * 1024);
    let early = format!(r#"{{"requestId":"rid-big","code":200,"data":"{filler}","msg":"late"}}"#);
    let late = format!(r#"{{"code":200,"data":"{filler}","requestId":"rid-late"}}"#);
    Mock::given(path("/early"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(early.clone(), "application/json"))
        .mount(&upstream)
        .await;
    Mock::given(path("/late"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(late.clone(), "application/json"))
        .mount(&upstream)
        .await;
    let gw = spawn_gateway(config(&upstream.uri())).await;

    let answer = get(&gw.url("/early")).await;
    assert_eq!(answer.body.len(), early.len());
    assert_eq!(answer.body, early.as_bytes());
    let answer = get(&gw.url("/late")).await;
    assert_eq!(answer.body, late.as_bytes());

    let log = gw.access_log_of(2).await;
    assert_eq!(log[0]["request_id"], "rid-big");
    assert_eq!(log[0]["code"], 200);
    assert!(log[0]["msg"].is_null(), "msg lies beyond the 64 KiB prefix");
    assert_eq!(log[1]["code"], 200);
    assert!(
        log[1]["request_id"].is_null(),
        "requestId lies beyond the prefix"
    );
    gw.stop().await;
}

#[tokio::test]
async fn gateway_answers_are_logged_with_their_error_kind() {
    let gw = spawn_gateway(config(&format!("http://{}", dead_address()))).await;
    let answer = get(&gw.url("/alibaba/order/create")).await;
    assert_eq!(answer.status, 502);
    let e = &gw.access_log_of(1).await[0];
    assert!(e["request_id"].is_null(), "no provider requestId");
    assert!(e["code"].is_null(), "no provider code");
    assert_eq!(e["msg"], "upstream unreachable");
    assert_eq!(e["status"], 502);
    assert!(e["upstream_status"].is_null());
    assert_eq!(e["error"], "upstream_connect");
    // Nothing reached the provider, so even an order create was tried again.
    assert_eq!(e["class"], "write");
    assert_eq!(e["attempts"], 3);
    assert_eq!(
        e["retry_reasons"],
        serde_json::json!(["connect", "connect"])
    );
    assert_eq!(e["retry_skipped"], "max_attempts");
    assert_eq!(
        e["x_request_id"],
        answer.headers["x-request-id"].to_str().unwrap()
    );
    gw.stop().await;
}

#[tokio::test]
async fn exactly_one_event_per_call() {
    let upstream = upstream_answering(
        ResponseTemplate::new(200).set_body_raw(provider_body("r", 200, "ok"), "application/json"),
    )
    .await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let target = if i % 2 == 0 {
            "/open/product/get"
        } else {
            "/empty"
        };
        let answer = get(&gw.url(target)).await;
        ids.push(answer.headers["x-request-id"].to_str().unwrap().to_owned());
    }
    // HEAD and 204-style empty bodies end without a data frame.
    let head = Request::head(gw.url("/open/product/get"))
        .body(Full::default())
        .unwrap();
    ids.push(
        send(head).await.headers["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned(),
    );
    let log = gw.access_log_of(21).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let log_after = gw.access_log();
    assert_eq!(log.len(), 21);
    assert_eq!(log_after.len(), 21, "no late duplicates");
    let mut logged: Vec<String> = log
        .iter()
        .map(|e| e["x_request_id"].as_str().unwrap().to_owned())
        .collect();
    logged.sort();
    ids.sort();
    assert_eq!(logged, ids);
    assert!(log.iter().all(|e| e["error"].is_null()), "{log:?}");
    gw.stop().await;
}
