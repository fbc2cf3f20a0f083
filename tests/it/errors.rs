//! The gateway's own answers: one envelope format, the right status, and
//! nothing forwarded when the gateway refuses.

use crate::support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::client::{chunked_upload_1200, raw_exchange};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::{MockServer, ResponseTemplate};

async fn ok_upstream() -> MockServer {
    upstream_answering(ResponseTemplate::new(200).set_body_string("{}")).await
}

#[tokio::test]
async fn body_over_the_limit_by_content_length_gets_413_and_nothing_is_sent() {
    let upstream = ok_upstream().await;
    let mut c = config(&upstream.uri());
    c.server.max_request_body_bytes = 1024;
    c.server.buffer_body_bytes = 512;
    let gw = spawn_gateway(c).await;
    let req = Request::post(gw.url("/alibaba/product/image/query"))
        .body(Full::new(Bytes::from(vec![b'x'; 2048])))
        .unwrap();
    let v = send(req).await.assert_gateway_envelope(413);
    assert_eq!(v["msg"], "request body exceeds the limit of 1024 bytes");
    assert!(upstream.received_requests().await.unwrap().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn chunked_body_over_the_limit_gets_413_before_anything_is_sent() {
    let upstream = ok_upstream().await;
    let mut c = config(&upstream.uri());
    c.server.max_request_body_bytes = 1024;
    c.server.buffer_body_bytes = 1024;
    let gw = spawn_gateway(c).await;
    let raw = chunked_upload_1200("/alibaba/product/image/query");
    let answer = raw_exchange(gw.addr, raw.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""code":413"#), "{answer}");
    assert!(upstream.received_requests().await.unwrap().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn streamed_body_over_the_limit_is_cut_off_with_413() {
    // An upstream that never answers: it only records what reaches it, so
    // the only way the caller gets an answer is the gateway's own.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut seen)).await;
        String::from_utf8_lossy(&seen).into_owned()
    });
    let mut c = config(&format!("http://{upstream_addr}"));
    c.server.max_request_body_bytes = 1024;
    c.server.buffer_body_bytes = 256;
    let gw = spawn_gateway(c).await;
    let raw = chunked_upload_1200("/alibaba/product/image/query");
    let answer = raw_exchange(gw.addr, raw.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let seen = upstream.await.unwrap();
    // The provider saw at most the start of the upload, never its end: the
    // gateway dropped the connection, so no complete request was forwarded.
    assert!(
        seen.is_empty() || seen.starts_with("POST /alibaba/"),
        "{seen}"
    );
    assert!(
        !seen.ends_with("0\r\n\r\n"),
        "complete request forwarded: {seen}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_gets_502() {
    let gw = spawn_gateway(config(&format!("http://{}", dead_address()))).await;
    let v = get(&gw.url("/open/product/get"))
        .await
        .assert_gateway_envelope(502);
    assert_eq!(v["msg"], "upstream unreachable");
    let log = gw.access_log_of(1).await;
    assert_eq!(log[0]["error"], "upstream_connect");
    assert_eq!(log[0]["status"], 502);
    assert!(log[0]["upstream_status"].is_null());
    gw.stop().await;
}

#[tokio::test]
async fn slow_upstream_gets_504() {
    let upstream =
        upstream_answering(ResponseTemplate::new(200).set_delay(Duration::from_secs(3))).await;
    let mut c = config(&upstream.uri());
    c.upstream.request_timeout_ms = 200;
    let gw = spawn_gateway(c).await;
    let v = get(&gw.url("/open/product/get"))
        .await
        .assert_gateway_envelope(504);
    assert_eq!(v["msg"], "upstream did not answer within 200 ms");
    gw.stop().await;
}

#[tokio::test]
async fn forbidden_profile_gets_403_envelope() {
    let upstream = ok_upstream().await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let req = Request::get(gw.url("/x"))
        .header("x-pandagate-profile", "hidden")
        .body(Full::default())
        .unwrap();
    let v = send(req).await.assert_gateway_envelope(403);
    assert_eq!(
        v["msg"],
        "x-pandagate-profile names no profile this caller may select"
    );
    gw.stop().await;
}

#[tokio::test]
async fn connect_gets_400_envelope() {
    let upstream = ok_upstream().await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let answer = raw_exchange(
        gw.addr,
        b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n",
    )
    .await;
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["code"], 400);
    assert_eq!(v["source"], "pandagate");
    gw.stop().await;
}

#[tokio::test]
async fn slow_request_head_is_cut_off() {
    let upstream = ok_upstream().await;
    let mut c = config(&upstream.uri());
    c.server.header_read_timeout_ms = 300;
    let gw = spawn_gateway(c).await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /open/product/get HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "connection still open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(upstream.received_requests().await.unwrap().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn oversized_request_head_is_refused() {
    let upstream = ok_upstream().await;
    let mut c = config(&upstream.uri());
    c.server.max_header_bytes = 8192;
    let gw = spawn_gateway(c).await;
    let raw = format!(
        "GET /x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let answer = raw_exchange(gw.addr, raw.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(upstream.received_requests().await.unwrap().is_empty());
    gw.stop().await;
}
