//! Traces: a caller's trace continues through the gateway's call span and
//! one client span per upstream attempt, exported over OTLP/HTTP to a
//! receiver in this test, with no secret in any attribute.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Request;
use http_body_util::Full;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use support::gateway::TestGateway;
use support::provider::upstream_failing_first;
use support::wire::read_request;
use support::*;
use tokio::io::AsyncWriteExt;
use wiremock::ResponseTemplate;

/// An OTLP/HTTP receiver on a free loopback port: keeps every span.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

impl Receiver {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = self.0.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let spans = spans.clone();
                tokio::spawn(async move {
                    while let Some((_, body)) = read_request(&mut stream).await {
                        let request = ExportTraceServiceRequest::decode(body.as_slice())
                            .expect("an OTLP/HTTP protobuf export");
                        for resource in request.resource_spans {
                            for scope in resource.scope_spans {
                                spans.lock().unwrap().extend(scope.spans);
                            }
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    /// The same receiver behind TLS with `acceptor`'s certificate; a client
    /// that does not trust it gets nothing.
    async fn start_tls(&self, acceptor: tokio_rustls::TlsAcceptor) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = self.0.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (spans, acceptor) = (spans.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    while let Some((_, body)) = read_request(&mut stream).await {
                        let request = ExportTraceServiceRequest::decode(body.as_slice())
                            .expect("an OTLP/HTTP protobuf export");
                        for resource in request.resource_spans {
                            for scope in resource.scope_spans {
                                spans.lock().unwrap().extend(scope.spans);
                            }
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        format!("https://{addr}")
    }

    fn received(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Waits (bounded) for `n` spans.
    async fn spans(&self, n: usize) -> Vec<Span> {
        for _ in 0..200 {
            if self.0.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.0.lock().unwrap().clone()
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text(span: &Span, key: &str) -> Option<String> {
    match attr(span, key)? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// A gateway exporting its spans to a receiver of this test, every 50 ms.
async fn traced(upstream: &str) -> (Receiver, TestGateway) {
    let receiver = Receiver::default();
    let mut c = config(upstream);
    c.telemetry.otlp_endpoint = Some(receiver.start().await);
    c.telemetry.export_interval_ms = 50;
    (receiver, spawn_gateway(c).await)
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_retried_read_continues_the_callers_trace_with_a_span_per_attempt() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let upstream = upstream_failing_first(
        1,
        ResponseTemplate::new(503),
        ResponseTemplate::new(200)
            .set_body_raw(provider_body("prov-1", 200, "ok"), "application/json"),
    )
    .await;
    let mut c = config(&upstream.uri());
    c.retry.backoff_base_ms = 1;
    c.retry.backoff_cap_ms = 1;
    c.telemetry.otlp_endpoint = Some(endpoint);
    c.telemetry.export_interval_ms = 50;
    let gw = spawn_gateway(c).await;

    let req = Request::get(gw.url("/open/product/get?itemId=1&token=query-secret-7"))
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .header("tracestate", "vendor=abc")
        .body(Full::default())
        .unwrap();
    let answer = send(req).await;
    assert_eq!(answer.status, 200);

    let spans = receiver.spans(3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let server: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(server.len(), 1);
    let server = server[0];
    assert_eq!(hex::encode(&server.trace_id), TRACE);
    assert_eq!(hex::encode(&server.parent_span_id), PARENT);
    assert_eq!(text(server, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(
        text(server, "url.path").as_deref(),
        Some("/open/product/get")
    );
    assert_eq!(
        text(server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(text(server, "pandagate.class").as_deref(), Some("read"));
    assert_eq!(
        text(server, "pandagate.profile").as_deref(),
        Some("default")
    );
    assert_eq!(
        text(server, "pandapon.request_id").as_deref(),
        Some("prov-1")
    );
    assert_eq!(text(server, "pandapon.code").as_deref(), Some("200"));

    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    attempts.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(attempts.len(), 2, "one span per attempt");
    for a in &attempts {
        assert_eq!(a.trace_id, server.trace_id);
        assert_eq!(a.parent_span_id, server.span_id, "a child of the call");
        assert_eq!(text(a, "url.path").as_deref(), Some("/open/product/get"));
        assert!(text(a, "server.address").is_some());
    }
    assert_eq!(
        text(attempts[0], "http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(text(attempts[0], "error.type").as_deref(), Some("503"));
    assert_eq!(text(attempts[0], "pandagate.retry_reason"), None);
    assert_eq!(
        text(attempts[1], "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        text(attempts[1], "pandagate.retry_reason").as_deref(),
        Some("503")
    );
    assert_eq!(
        text(attempts[1], "http.request.resend_count").as_deref(),
        Some("1")
    );

    // The traceparent sent upstream is each attempt's own.
    let received = upstream.received_requests().await.unwrap();
    assert_eq!(received.len(), 2);
    for (request, span) in received.iter().zip(&attempts) {
        let sent = request.headers["traceparent"].to_str().unwrap();
        assert_eq!(
            sent,
            format!("00-{TRACE}-{}-01", hex::encode(&span.span_id)),
        );
        assert_eq!(request.headers["tracestate"], "vendor=abc");
    }

    // Nothing secret, and no query string, in any attribute.
    let signed: Vec<String> = received
        .iter()
        .flat_map(|r| {
            ["signature", "nonce-str"]
                .iter()
                .map(|h| r.headers[*h].to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    for span in &spans {
        for a in &span.attributes {
            let value = format!("{:?}", a.value);
            for secret in [SECRET, "query-secret-7", "itemId"]
                .iter()
                .map(|s| s.to_string())
                .chain(signed.iter().cloned())
            {
                assert!(!value.contains(&secret), "{} = {value}", a.key);
            }
        }
    }

    // The access-log line leads to the trace.
    let log = gw.access_log_of(1).await;
    assert_eq!(log[0]["trace_id"], TRACE);
    assert_eq!(log[0]["span_id"], hex::encode(&server.span_id));
    gw.stop().await;
}

#[tokio::test]
async fn without_a_traceparent_the_gateway_starts_a_trace_and_without_an_endpoint_none() {
    let upstream = upstream_answering(ResponseTemplate::new(200)).await;
    let (receiver, gw) = traced(&upstream.uri()).await;
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    let spans = receiver.spans(2).await;
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .expect("a server span");
    assert!(server.parent_span_id.is_empty(), "a root");
    assert_eq!(server.trace_id.len(), 16);
    gw.stop().await;

    // No endpoint: no span, no trace ids in the log, the caller's
    // traceparent passed through untouched.
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let req = Request::get(gw.url("/open/product/get"))
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(req).await.status, 200);
    let log = gw.access_log_of(1).await;
    assert!(log[0]["trace_id"].is_null());
    let received = upstream.received_requests().await.unwrap();
    assert_eq!(
        received.last().unwrap().headers["traceparent"],
        format!("00-{TRACE}-{PARENT}-01").as_str()
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_oversized_tracestate_is_not_kept_in_spans() {
    let upstream = upstream_answering(ResponseTemplate::new(200)).await;
    let (receiver, gw) = traced(&upstream.uri()).await;
    let long = format!("vendor={}", "x".repeat(600));
    let many = (0..40)
        .map(|i| format!("v{i}=a"))
        .collect::<Vec<_>>()
        .join(",");
    for (i, state) in [long.as_str(), many.as_str(), "vendor=ok"]
        .iter()
        .enumerate()
    {
        let req = Request::get(gw.url(&format!("/open/product/get?n={i}")))
            .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
            .header("tracestate", *state)
            .body(Full::default())
            .unwrap();
        assert_eq!(send(req).await.status, 200);
    }
    let spans = receiver.spans(6).await;
    let states: Vec<&str> = spans.iter().map(|s| s.trace_state.as_str()).collect();
    assert_eq!(spans.len(), 6, "{states:?}");
    assert!(
        states
            .iter()
            .all(|s| s.len() <= 512 && s.split(',').count() <= 32),
        "{states:?}"
    );
    assert_eq!(states.iter().filter(|s| **s == "vendor=ok").count(), 2);
    assert_eq!(states.iter().filter(|s| s.is_empty()).count(), 4);
    gw.stop().await;
}

#[tokio::test]
async fn a_full_export_queue_drops_spans_and_counts_them_without_slowing_calls() {
    // A receiver that takes the connection and never answers: the
    // exporter thread waits on it while calls go on.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let upstream = upstream_answering(ResponseTemplate::new(200)).await;
    let mut c = config(&upstream.uri());
    c.telemetry.otlp_endpoint = Some(endpoint);
    c.telemetry.export_interval_ms = 20;
    c.telemetry.export_timeout_ms = 30_000;
    c.telemetry.queue_spans = 2;
    let gw = spawn_gateway(c).await;
    let started = std::time::Instant::now();
    for _ in 0..40 {
        assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let dropped = gw.gateway.traces().expect("tracing on").dropped();
    assert!(dropped >= 40, "most spans of 40 calls dropped: {dropped}");
    let gateway = gw.gateway.clone();
    let text = pandagate::exporter::Exporter::new(Arc::new(move || gateway.clone())).render();
    let line = format!("pandagate_trace_spans_dropped_total {dropped}");
    assert!(text.contains(&line), "missing {line} in\n{text}");
    held.abort();
    gw.stop().await;
}

#[tokio::test]
async fn new_traces_follow_the_sample_ratio_and_callers_decisions_are_kept() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let upstream = upstream_answering(ResponseTemplate::new(200)).await;
    let mut c = config(&upstream.uri());
    c.telemetry.otlp_endpoint = Some(endpoint);
    c.telemetry.export_interval_ms = 50;
    c.telemetry.sample_ratio = 0.0;
    let gw = spawn_gateway(c).await;
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    }
    // A caller's sampled trace is kept, whatever the ratio.
    let req = Request::get(gw.url("/open/product/get"))
        .header("traceparent", format!("00-{TRACE}-{PARENT}-01"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(req).await.status, 200);
    receiver.spans(2).await;
    // Time for spans that should not exist to arrive anyway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spans = receiver.0.lock().unwrap().clone();
    assert_eq!(spans.len(), 2, "only the caller's sampled call: {spans:#?}");
    assert!(spans.iter().all(|s| hex::encode(&s.trace_id) == TRACE));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_receiver_traces_each_receive_its_store_and_each_delivery() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let subscriber = upstream_answering(ResponseTemplate::new(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pandagate.toml");
    std::fs::write(
        &config,
        format!(
            "[telemetry]\notlp_endpoint = \"{endpoint}\"\nexport_interval_ms = 50\n\
             [callbacks]\nstore = {:?}\n[[callbacks.subscribers]]\nurl = \"{}/events\"\n",
            dir.path().join("store"),
            subscriber.uri()
        ),
    )
    .unwrap();
    let key = "sk-traces-push";
    let gw = launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", key),
            ("PANDAGATE_UPSTREAM", "http://127.0.0.1:9"),
        ],
    )
    .await;
    assert_eq!(push_signed(&gw.gateway, key, "T1").await, 200);
    let spans = receiver.spans(3).await;
    let named = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {spans:#?}"))
    };
    let receive = named("callback receive");
    assert_eq!(receive.kind, SpanKind::Server as i32);
    assert_eq!(
        text(receive, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        text(receive, "pandagate.callback_result").as_deref(),
        Some("stored")
    );
    assert_eq!(
        text(receive, "pandapon.message_type").as_deref(),
        Some("ORDER_CANCEL")
    );
    let store = named("callback store");
    assert_eq!(store.parent_span_id, receive.span_id);
    assert_eq!(store.trace_id, receive.trace_id);
    let delivery = named("callback delivery");
    assert_eq!(delivery.kind, SpanKind::Client as i32);
    let sent = subscriber.received_requests().await.unwrap();
    assert_eq!(
        text(delivery, "pandagate.delivery_id").as_deref(),
        sent[0].headers["x-pandagate-delivery-id"].to_str().ok()
    );
    for span in &spans {
        for a in &span.attributes {
            assert!(!format!("{:?}", a.value).contains(key), "{}", a.key);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_receiver_trusted_through_the_ca_file_and_no_other() {
    let ca = tls::TestCa::new();
    let receiver = Receiver::default();
    let endpoint = receiver
        .start_tls(collector::acceptor(&ca.server("collector")))
        .await;
    let upstream = upstream_answering(
        ResponseTemplate::new(200)
            .set_body_raw(provider_body("prov-tls", 200, "ok"), "application/json"),
    )
    .await;
    let traced_with = |ca_file: &std::path::Path| {
        let mut c = config(&upstream.uri());
        c.telemetry.otlp_endpoint = Some(endpoint.clone());
        c.telemetry.export_interval_ms = 50;
        c.telemetry.export_timeout_ms = 1_000;
        c.tls.ca_file = Some(ca_file.to_owned());
        c
    };
    let gw = spawn_gateway(traced_with(&ca.ca_file)).await;
    assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    let spans = receiver.spans(2).await;
    assert_eq!(
        spans.len(),
        2,
        "the call's span and its attempt's: {spans:#?}"
    );
    assert_eq!(gw.gateway.traces().expect("tracing on").dropped(), 0);
    gw.stop().await;

    // Trusting another CA: the collector's certificate is refused, the
    // spans are dropped and counted, and calls are answered as ever.
    let other = tls::TestCa::named("a CA the gateway does not trust");
    let gw = spawn_gateway(traced_with(&other.ca_file)).await;
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    }
    let traces = gw.gateway.traces().expect("tracing on");
    for _ in 0..200 {
        if traces.dropped() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(traces.dropped(), 6, "two spans per call, none sent");
    assert_eq!(receiver.received(), 2, "nothing more arrived");
    gw.stop().await;
}
