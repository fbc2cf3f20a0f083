//! The listener's edge: what a hostile or broken client can send, and what
//! of it may reach the provider. Slow heads, oversized heads and CONNECT are
//! in `errors.rs`; this file has the rest: header count, request smuggling,
//! ambiguous paths, CR/LF injection, idle connections. Stalled bodies,
//! connection caps and HTTP/2 streams are in `stalls.rs`.

use crate::support;

use std::time::Duration;

use support::client::raw_exchange;
use support::h2_client::{H2Frame, H2Read, RawH2, h2_frame, h2_get};
use support::provider::RawUpstream;
use support::wire::read_message;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OK: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

/// Sends `raw`, reads until the gateway closes (bounded): everything it said.
async fn exchange_until_closed(addr: std::net::SocketAddr, raw: &[u8]) -> (String, bool) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .is_ok();
    (String::from_utf8_lossy(&buf).into_owned(), closed)
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

#[tokio::test]
async fn too_many_headers_are_refused_and_nothing_is_sent() {
    let upstream = RawUpstream::start(OK).await;
    let mut c = config(&format!("http://{}", upstream.addr));
    c.server.max_headers = 20;
    let gw = spawn_gateway(c).await;

    let few: String = (0..10).map(|i| format!("x-h{i}: v\r\n")).collect();
    let answer = raw_exchange(
        gw.addr,
        format!("GET /open/product/get HTTP/1.1\r\nHost: x\r\n{few}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");

    let many: String = (0..40).map(|i| format!("x-h{i}: v\r\n")).collect();
    let answer = raw_exchange(
        gw.addr,
        format!("GET /open/product/get HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert_eq!(upstream.requests().len(), 1, "only the first call was sent");
    gw.stop().await;
}

/// Each of these makes two parsers disagree about where a message ends; the
/// gateway answers 400 and forwards nothing.
#[tokio::test]
async fn ambiguous_message_framing_is_refused() {
    let upstream = RawUpstream::start(OK).await;
    let gw = spawn_gateway(config(&format!("http://{}", upstream.addr))).await;
    let cases: [(&str, &[u8]); 6] = [
        (
            "two different Content-Length",
            b"POST /open/order HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
        ),
        (
            "a Content-Length list that disagrees",
            b"POST /open/order HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 40\r\n\r\nabcd",
        ),
        (
            "a Content-Length that is not a number",
            b"POST /open/order HTTP/1.1\r\nHost: x\r\nContent-Length: +4\r\n\r\nabcd",
        ),
        (
            "Transfer-Encoding not ending in chunked",
            b"POST /open/order HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            b"POST /open/order HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "whitespace before the colon",
            b"POST /open/order HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\nabcd",
        ),
    ];
    for (what, raw) in cases {
        let (answer, closed) = exchange_until_closed(gw.addr, raw).await;
        assert_eq!(status_of(&answer), 400, "{what}: {answer}");
        assert!(closed, "{what}: connection left open");
    }
    let obs_fold =
        b"POST /open/order HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n";
    let (answer, _) = exchange_until_closed(gw.addr, obs_fold).await;
    assert_eq!(status_of(&answer), 400, "obs-fold: {answer}");
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    gw.stop().await;
}

/// Content-Length and chunked together: the message is read by
/// Transfer-Encoding alone (RFC 9112 §6.3), Content-Length is dropped, and
/// the connection is closed after the answer, so a request hidden behind
/// the chunked body is never read, let alone forwarded.
#[tokio::test]
async fn a_request_smuggled_behind_content_length_and_chunked_never_reaches_the_provider() {
    let upstream = RawUpstream::start(OK).await;
    let gw = spawn_gateway(config(&format!("http://{}", upstream.addr))).await;
    let raw = b"POST /open/product/get HTTP/1.1\r\nHost: x\r\nContent-Length: 48\r\n\
                Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
                POST /open/order HTTP/1.1\r\nHost: x\r\n\r\n";
    let (answer, closed) = exchange_until_closed(gw.addr, raw).await;
    assert!(closed, "connection left open after a CL+TE message");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    let sent = upstream.requests();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(
        sent[0].starts_with("POST /open/product/get "),
        "{}",
        sent[0]
    );
    assert!(!sent[0].contains("/open/order"), "{}", sent[0]);
    let head = sent[0].to_ascii_lowercase();
    assert!(
        !(head.contains("content-length: 48") && head.contains("transfer-encoding")),
        "forwarded with conflicting framing: {head}"
    );
    gw.stop().await;
}

/// Spellings of "somewhere under /open/product/" that Tomcat, Spring, IIS,
/// nginx or a CGI stack could resolve to another endpoint. The gateway
/// classifies by what it sees; none of these may be treated as a read.
const AMBIGUOUS_TARGETS: [&str; 12] = [
    "/open/product/../order",
    "/open/product/..;/order",
    "/open/product/x;a=b/../../order",
    "/open/product/x\\..\\..\\order",
    "/open/product/%2e%2e/order",
    "/open/product/%2E./order",
    "/open/product/..%2forder",
    "/open/product/..%5Corder",
    "/open/product/%252e%252e/order",
    "/open/product//..//order",
    "/open/product/get/",
    "/open/product/x%00/../../order",
];

fn product_prefix_is_read(c: &mut pandagate::config::Config) {
    c.routes = vec![pandagate::config::RouteConfig {
        prefix: Some("/open/product/".into()),
        class: Some(pandagate::config::Class::Read),
        ..Default::default()
    }];
}

/// By default an ambiguous path gets 400 `ambiguous_path` in the envelope
/// and nothing is sent, whatever the method and however it is spelled.
#[tokio::test]
async fn ambiguous_paths_are_refused_and_nothing_is_sent() {
    let upstream = RawUpstream::start(OK).await;
    let mut c = config(&format!("http://{}", upstream.addr));
    product_prefix_is_read(&mut c);
    let gw = spawn_gateway(c).await;
    for target in AMBIGUOUS_TARGETS {
        for method in ["GET", "POST"] {
            let (answer, _) = exchange_until_closed(
                gw.addr,
                format!("{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
            assert_eq!(status_of(&answer), 400, "{method} {target}: {answer}");
            assert!(answer.contains(r#""error":"ambiguous_path""#), "{answer}");
            assert!(answer.contains(r#""source":"pandagate""#), "{answer}");
        }
    }
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    let log = gw.access_log_of(2 * AMBIGUOUS_TARGETS.len()).await;
    assert_eq!(log.len(), 2 * AMBIGUOUS_TARGETS.len());
    for line in &log {
        assert_eq!(line["error"], "ambiguous_path", "{line}");
        assert_eq!(line["attempts"], 0, "{line}");
    }
    gw.stop().await;
}

/// With `ambiguous_paths = "forward"`, such a path goes out once, as
/// `unknown`: a provider that drops the connection does not get it again.
#[tokio::test]
async fn a_forwarded_ambiguous_path_is_never_repeated() {
    let dropping = RawUpstream::start(b"").await;
    let mut c = config(&format!("http://{}", dropping.addr));
    product_prefix_is_read(&mut c);
    c.server.ambiguous_paths = pandagate::config::AmbiguousPaths::Forward;
    c.circuit_breaker.enabled = false;
    let gw = spawn_gateway(c).await;
    // The plain read is repeated: the provider sees it three times.
    let answer = raw_exchange(
        gw.addr,
        b"POST /open/product/x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 502, "{answer}");
    assert_eq!(dropping.requests().len(), 3, "the control call is a read");
    for target in AMBIGUOUS_TARGETS {
        let before = dropping.requests().len();
        let answer = raw_exchange(
            gw.addr,
            format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status_of(&answer), 502, "{target}: {answer}");
        assert_eq!(
            dropping.requests().len(),
            before + 1,
            "{target} was repeated"
        );
    }
    gw.stop().await;
}

/// With `ambiguous_paths = "forward"`, dot segments and encoded separators
/// reach the provider exactly as sent (the provider decides what they
/// mean), are never resolved by the gateway, and never count as a
/// repeatable read.
#[tokio::test]
async fn forwarded_traversal_paths_pass_as_data_and_are_never_reads() {
    let upstream = RawUpstream::start(OK).await;
    let mut c = config(&format!("http://{}", upstream.addr));
    product_prefix_is_read(&mut c);
    c.server.ambiguous_paths = pandagate::config::AmbiguousPaths::Forward;
    let gw = spawn_gateway(c).await;
    let targets = [
        "/open/product/../order",
        "/open/product/%2e%2e/order",
        "/open/product/..%2forder",
        "/open/product/.%2E/..%5corder?x=../y",
    ];
    for target in targets {
        let answer = raw_exchange(
            gw.addr,
            format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status_of(&answer), 200, "{target}: {answer}");
    }
    let sent = upstream.requests();
    for (target, request) in targets.iter().zip(&sent) {
        let line = request.lines().next().unwrap();
        assert_eq!(line, format!("POST {target} HTTP/1.1"));
    }
    let log = gw.access_log_of(targets.len()).await;
    for line in &log {
        assert_eq!(line["class"], "unknown", "{line}");
    }
    gw.stop().await;
}

/// Percent-encoded CR/LF stays encoded in the target (when ambiguous paths
/// are forwarded at all); raw CR/LF in a target or a header value is
/// refused; nothing becomes a header upstream.
#[tokio::test]
async fn crlf_reaches_the_provider_only_as_data() {
    let upstream = RawUpstream::start(OK).await;
    let mut c = config(&format!("http://{}", upstream.addr));
    c.server.ambiguous_paths = pandagate::config::AmbiguousPaths::Forward;
    let gw = spawn_gateway(c).await;
    let encoded = "/open/product/get%0d%0aX-Injected:%20yes?q=%0D%0AX-Injected:%20yes";
    let answer = raw_exchange(
        gw.addr,
        format!("GET {encoded} HTTP/1.1\r\nHost: x\r\nX-Note: a%0d%0aX-Injected: yes\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");

    let refused: [&[u8]; 3] = [
        b"GET /open/product/get\rX-Injected: yes HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /open/product/get HTTP/1.1\r\nHost: x\r\nX-Note: a\rX-Injected: yes\r\n\r\n",
        b"GET /open/product/get HTTP/1.1\r\nHost: x\r\nX-Note: a\0b\r\n\r\n",
    ];
    for raw in refused {
        let (answer, _) = exchange_until_closed(gw.addr, raw).await;
        assert_eq!(
            status_of(&answer),
            400,
            "{:?}: {answer}",
            String::from_utf8_lossy(raw)
        );
    }

    let sent = upstream.requests();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let head = &sent[0];
    assert_eq!(
        head.lines().next().unwrap(),
        format!("GET {encoded} HTTP/1.1")
    );
    let names: Vec<String> = head
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| l.split(':').next().unwrap().to_ascii_lowercase())
        .collect();
    assert!(!names.iter().any(|n| n == "x-injected"), "{head}");
    assert!(
        head.contains("x-note: a%0d%0aX-Injected: yes\r\n"),
        "{head}"
    );
    gw.stop().await;
}

/// A head trickled a byte at a time is cut off when the header read timeout
/// runs out, however steadily the bytes come.
#[tokio::test]
async fn a_trickled_head_is_cut_off_at_the_header_read_timeout() {
    let upstream = RawUpstream::start(OK).await;
    let mut c = config(&format!("http://{}", upstream.addr));
    c.server.header_read_timeout_ms = 300;
    let gw = spawn_gateway(c).await;

    let mut trickle = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let started = std::time::Instant::now();
    let head =
        b"GET /open/product/get HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut cut_after = None;
    for &byte in head.iter() {
        if trickle.write_all(&[byte]).await.is_err() {
            cut_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut probe = [0u8; 512];
        // An answer or the close: either way it was cut off.
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(1), trickle.read(&mut probe)).await
        {
            cut_after = Some(started.elapsed());
            break;
        }
    }
    let cut_after = cut_after.expect("the trickled head was never cut off");
    assert!(cut_after >= Duration::from_millis(250), "{cut_after:?}");
    assert!(cut_after < Duration::from_secs(3), "{cut_after:?}");
    assert!(upstream.requests().is_empty());
    gw.stop().await;
}

/// A head that begins on a kept-alive connection, after a call, gets the
/// whole header read timeout from its first byte, and no more.
#[tokio::test]
async fn a_head_begun_after_a_call_is_cut_at_its_own_deadline() {
    let upstream = RawUpstream::start(OK).await;
    let mut c = config(&format!("http://{}", upstream.addr));
    c.server.header_read_timeout_ms = 1_000;
    let gw = spawn_gateway(c).await;

    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /open/product/get HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = read_message(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    stream
        .write_all(b"GET /open/product/get HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let begun = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the unfinished head was never cut off");
    let after = begun.elapsed();
    assert!(after >= Duration::from_millis(900), "cut early: {after:?}");
    assert!(after < Duration::from_millis(1_600), "cut late: {after:?}");
    assert_eq!(
        upstream.requests().len(),
        1,
        "only the whole request went on"
    );
    gw.stop().await;
}

/// Calls in a row on one connection, for longer than the header read
/// timeout: the head deadline applies to each head, not to the connection.
#[tokio::test]
async fn a_busy_connection_outlives_the_header_read_timeout() {
    let upstream = RawUpstream::start(OK).await;
    let mut c = config(&format!("http://{}", upstream.addr));
    c.server.header_read_timeout_ms = 300;
    let gw = spawn_gateway(c).await;

    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let started = std::time::Instant::now();
    for i in 0..12 {
        let req = http::Request::get(format!("http://{}/open/product/get", gw.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let answer = sender.send_request(req).await;
        let answer =
            answer.unwrap_or_else(|e| panic!("call {i} after {:?}: {e}", started.elapsed()));
        assert_eq!(answer.status(), 200, "call {i}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(1_200));
    gw.stop().await;
}

/// HTTP/2 has no head to time: a connection that opened with the preface
/// and then sits quiet for longer than the header read timeout (but less
/// than the idle timeout) still serves.
#[tokio::test]
async fn http2_connections_have_no_head_deadline() {
    let upstream = RawUpstream::start(OK).await;
    let mut c = config(&format!("http://{}", upstream.addr));
    c.server.header_read_timeout_ms = 300;
    c.server.idle_timeout_ms = 10_000;
    let gw = spawn_gateway(c).await;

    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for pause in [900, 900] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let req = http::Request::get(format!("http://{}/open/product/get", gw.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let answer = sender.send_request(req).await.expect("still open");
        assert_eq!(answer.status(), 200);
    }
    gw.stop().await;
}

/// `server.idle_timeout_ms` closes a connection that never sends a byte and
/// a keep-alive connection left unused, but never one with a call in
/// progress, however long the provider takes.
#[tokio::test]
async fn idle_connections_are_closed_and_busy_ones_are_not() {
    let upstream = upstream_answering(
        wiremock::ResponseTemplate::new(200)
            .set_body_string("{}")
            .set_delay(Duration::from_millis(1_200)),
    )
    .await;
    let mut c = config(&upstream.uri());
    c.server.idle_timeout_ms = 400;
    let gw = spawn_gateway(c).await;

    let closed_after = |mut stream: tokio::net::TcpStream| async move {
        let started = std::time::Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "still open after 5 s");
        (
            started.elapsed(),
            String::from_utf8_lossy(&buf).into_owned(),
        )
    };

    let silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (after, said) = closed_after(silent).await;
    assert!(after >= Duration::from_millis(350), "{after:?}");
    assert!(said.is_empty(), "{said}");

    // One slow call (1.2 s, three idle timeouts), then nothing.
    let mut busy = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    busy.write_all(b"GET /open/product/get HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (after, said) = closed_after(busy).await;
    assert!(
        said.starts_with("HTTP/1.1 200"),
        "the slow call was cut: {said:?}"
    );
    assert!(said.ends_with("{}"), "{said:?}");
    assert!(
        after >= Duration::from_millis(1_500),
        "closed {after:?} after the call began"
    );
    gw.stop().await;
}

/// No tunnel by `Upgrade` either: the headers asking for one are hop-by-hop
/// and dropped, so the provider sees a plain request and the caller a plain
/// answer, never a 101.
#[tokio::test]
async fn upgrade_requests_are_not_tunnelled() {
    let upstream = RawUpstream::start(OK).await;
    let gw = spawn_gateway(config(&format!("http://{}", upstream.addr))).await;
    let answer = raw_exchange(
        gw.addr,
        b"GET /open/product/get HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    let sent = upstream.requests();
    assert_eq!(sent.len(), 1);
    let head = sent[0].to_ascii_lowercase();
    assert!(!head.contains("upgrade"), "{head}");
    gw.stop().await;
}

/// HTTP/2 frame types and flags these tests use.
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// The control frames a client may send on a connection with no stream,
/// in turn: none of them is a call.
fn control_frame(i: u32) -> Vec<u8> {
    match i % 4 {
        0 => h2_frame(PING, 0, 0, &u64::from(i).to_be_bytes()),
        1 => h2_frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()),
        2 => h2_frame(PRIORITY, 0, 101, &[0, 0, 0, 0, 15]),
        _ => h2_frame(SETTINGS, 0, 0, &[]),
    }
}

/// Reads what the gateway sent in the last `within` and answers its
/// SETTINGS; says whether the connection is still open.
async fn h2_take(h2: &mut RawH2, within: Duration, frames: &mut Vec<H2Frame>) -> bool {
    loop {
        match h2.next(within).await {
            H2Read::Closed => return false,
            H2Read::Quiet => return true,
            H2Read::Frame(f) => {
                if f.kind == SETTINGS && f.flags & ACK == 0 {
                    h2.send(&h2_frame(SETTINGS, ACK, 0, &[])).await;
                }
                frames.push(f);
            }
        }
    }
}

/// Sends a control frame every 100 ms until the gateway closes the
/// connection (or `limit` passes); returns when it closed, after `since`.
async fn ping_until_closed(
    h2: &mut RawH2,
    since: std::time::Instant,
    limit: Duration,
    frames: &mut Vec<H2Frame>,
) -> Option<Duration> {
    let mut i = 0;
    while since.elapsed() < limit {
        if !h2.send(&control_frame(i)).await
            || !h2_take(h2, Duration::from_millis(100), frames).await
        {
            return Some(since.elapsed());
        }
        i += 1;
    }
    None
}

/// An HTTP/2 connection with no stream open is closed `idle_timeout_ms`
/// after its last stream (or its preface), however many PING, SETTINGS,
/// WINDOW_UPDATE or PRIORITY frames it keeps sending: control frames are
/// not calls.
#[tokio::test]
async fn an_http2_connection_sending_only_control_frames_is_closed_when_idle() {
    let upstream = RawUpstream::start(OK).await;
    let mut c = config(&format!("http://{}", upstream.addr));
    c.server.idle_timeout_ms = 400;
    let gw = spawn_gateway(c).await;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let mut h2 = RawH2::connect(gw.addr, &[]).await;
        let mut frames = Vec::new();
        let closed = ping_until_closed(&mut h2, started, Duration::from_secs(3), &mut frames).await;
        let closed = closed.expect("still open 3 s later, kept by control frames");
        assert!(closed >= Duration::from_millis(350), "{closed:?}");
        assert!(closed < Duration::from_millis(1_500), "{closed:?}");
        assert!(
            frames.iter().any(|f| f.kind == PING && f.flags & ACK != 0),
            "the pings were answered: {frames:?}"
        );
    }
    assert!(upstream.requests().is_empty());
    gw.stop().await;
}

/// A call slower than the idle timeout keeps its HTTP/2 connection open
/// to its answer; once the answer is sent, the connection is idle, PINGs
/// or not.
#[tokio::test]
async fn an_http2_connection_with_a_call_in_progress_is_not_closed() {
    let upstream = upstream_answering(
        wiremock::ResponseTemplate::new(200)
            .set_body_string("{}")
            .set_delay(Duration::from_millis(1_200)),
    )
    .await;
    let mut c = config(&upstream.uri());
    c.server.idle_timeout_ms = 400;
    let gw = spawn_gateway(c).await;
    let started = std::time::Instant::now();
    let mut h2 = RawH2::connect(gw.addr, &[]).await;
    let get = h2_frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &h2_get("/open/product/get"),
    );
    assert!(h2.send(&get).await);
    let mut frames = Vec::new();
    let mut i = 0;
    let answered = loop {
        let open = h2.send(&control_frame(i)).await
            && h2_take(&mut h2, Duration::from_millis(100), &mut frames).await;
        if frames
            .iter()
            .any(|f| f.stream == 1 && f.flags & END_STREAM != 0)
        {
            break std::time::Instant::now();
        }
        assert!(
            open,
            "closed after {:?} with the call in progress",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(5), "no answer");
        i += 1;
    };
    assert!(answered - started >= Duration::from_millis(1_100));
    let head = frames.iter().find(|f| f.stream == 1 && f.kind == HEADERS);
    // :status 200 is entry 8 of HPACK's static table.
    assert_eq!(
        head.map(|f| f.payload.first()),
        Some(Some(&0x88)),
        "{frames:?}"
    );

    let closed = ping_until_closed(&mut h2, answered, Duration::from_secs(3), &mut frames).await;
    let closed = closed.expect("still open 3 s after the answer, kept by control frames");
    // Counted from when the answer's end was seen, up to 100 ms late.
    assert!(closed >= Duration::from_millis(250), "{closed:?}");
    assert!(closed < Duration::from_millis(1_500), "{closed:?}");
    gw.stop().await;
}

/// An answer read slowly over HTTP/2 (a 16 KiB window opened every 150 ms,
/// 2.4 s for 256 KiB) is sent to its end: each piece of it written is
/// activity, so the 400 ms idle timeout never cuts it.
#[tokio::test]
async fn a_slowly_read_http2_answer_is_not_cut_by_the_idle_timeout() {
    const LEN: usize = 256 * 1024;
    const WINDOW: u32 = 16 * 1024;
    let upstream =
        upstream_answering(wiremock::ResponseTemplate::new(200).set_body_bytes(vec![b'x'; LEN]))
            .await;
    let mut c = config(&upstream.uri());
    c.server.idle_timeout_ms = 400;
    let gw = spawn_gateway(c).await;
    // SETTINGS_INITIAL_WINDOW_SIZE: the gateway may send 16 KiB per stream
    // until told more.
    let mut h2 = RawH2::connect(gw.addr, &[(0x4, WINDOW)]).await;
    let get = h2_frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &h2_get("/open/product/get"),
    );
    assert!(h2.send(&get).await);
    let started = std::time::Instant::now();
    let mut frames = Vec::new();
    let received = loop {
        let open = h2_take(&mut h2, Duration::from_millis(150), &mut frames).await;
        let data: Vec<&H2Frame> = frames
            .iter()
            .filter(|f| f.kind == DATA && f.stream == 1)
            .collect();
        let received = data.iter().map(|f| f.payload.len()).sum::<usize>();
        if data.iter().any(|f| f.flags & END_STREAM != 0) {
            break received;
        }
        assert!(
            open,
            "closed after {:?} with {received} of {LEN} bytes read",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{received}");
        for stream in [0, 1] {
            h2.send(&h2_frame(WINDOW_UPDATE, 0, stream, &WINDOW.to_be_bytes()))
                .await;
        }
    };
    assert_eq!(received, LEN);
    assert!(
        started.elapsed() >= Duration::from_millis(1_500),
        "read too fast to test anything: {:?}",
        started.elapsed()
    );
    gw.stop().await;
}
