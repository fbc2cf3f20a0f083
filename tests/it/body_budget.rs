//! The body budget, on the real binary: however many bodies arrive at once
//! (slow HTTP/1 uploads, chunked ones without a length, a hundred HTTP/2
//! streams, pushes on either listener, calls), the bytes held while they
//! are read stay within `server.max_buffered_body_bytes`; a body past it
//! gets 503 `overloaded` with `Retry-After` and is neither forwarded nor
//! stored, and is counted in `pandagate_body_budget_rejected_total`.
//! A push that cannot verify is refused before its body is read, and the
//! callback listener speaks HTTP/1.1 only.
//!
//! The budget here is 8 MiB: a connection may hold 2 MiB of it, pushes
//! together 2 MiB, and a push or a call body is at most 1 MiB.

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use serde_json::Value;
use support::binary::{Running, launch_with_callback_listener};
use support::provider::RawUpstream;
use support::wire::head_field;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const BUDGET: usize = 8 * MIB;
/// Shaped like a push's signature (hex of an HMAC-SHA256), signing nothing:
/// only reading the body tells.
const FORGED: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// Longer than any test here runs: an admitted body stays held meanwhile.
const BODY_TIMEOUT_MS: u64 = 20_000;

/// The binary with an 8 MiB body budget and a callback listener; returns it
/// with the callback listener's address.
async fn launch_with_budget(dir: &Path, upstream: &str) -> (Running, SocketAddr) {
    let server =
        format!("max_buffered_body_bytes = {BUDGET}\nbody_read_timeout_ms = {BODY_TIMEOUT_MS}");
    let env = [
        ("PANDAPON_ACCESS_KEY", "ak-budget"),
        ("PANDAPON_ACCESS_SECRET", "sk-budget"),
    ];
    launch_with_callback_listener(dir, upstream, &server, &env).await
}

async fn metrics(admin: &str) -> String {
    String::from_utf8(get(&format!("http://{admin}/metrics")).await.body.to_vec()).unwrap()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} in\n{text}"))
}

fn rejected(text: &str, listener: &str) -> f64 {
    metric(
        text,
        &format!("pandagate_body_budget_rejected_total{{listener=\"{listener}\"}}"),
    )
}

/// `VmRSS` and `VmHWM` (peak) of `pid`, in kB.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ------------------------------------------------------------------ HTTP/1

/// A connection that sent `head` and `sent` bytes of its body, then nothing.
async fn upload(addr: SocketAddr, head: &str, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    // The gateway may answer (and stop reading) before all of it is in.
    let _ = s.write_all(&vec![b'x'; sent]).await;
    s
}

/// The first answer on `s` (head and `Content-Length` body) if one comes
/// within `within`.
async fn answer_within(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head_field(&head, "content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return;
                }
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(within, read).await;
    (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned())
}

/// A 503 `overloaded` envelope with `Retry-After`, over HTTP/1.
fn is_overloaded(answer: &str) -> bool {
    let head = answer.to_ascii_lowercase();
    answer.starts_with("HTTP/1.1 503")
        && head.contains("\r\nretry-after: 1\r\n")
        && answer.contains(r#""error":"overloaded""#)
        && answer.contains(r#""source":"pandagate""#)
}

/// Sorts the connections by what they were answered within `within`:
/// (overloaded, other answers, no answer yet).
async fn sort_answers(
    conns: &mut [TcpStream],
    within: Duration,
) -> (usize, Vec<String>, Vec<usize>) {
    let (mut overloaded, mut other, mut waiting) = (0, Vec::new(), Vec::new());
    for (i, s) in conns.iter_mut().enumerate() {
        match answer_within(s, within).await {
            Some(a) if is_overloaded(&a) => overloaded += 1,
            Some(a) => other.push(a),
            None => waiting.push(i),
        }
    }
    (overloaded, other, waiting)
}

// ------------------------------------------------------------------ HTTP/2

/// `len` bytes of request body, sent as fast as the server takes them,
/// and then nothing more: the body never ends.
struct Stalling {
    left: usize,
}

impl Body for Stalling {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Pending;
        }
        let n = self.left.min(16 * KIB);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'y'; n])))))
    }
}

/// A stream's answer: status, `Retry-After`, envelope.
type H2Answer = (u16, Option<String>, Value);

/// One h2c connection's streams; dropping it closes the connection.
struct Flood {
    answers: tokio::sync::mpsc::UnboundedReceiver<H2Answer>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// Opens an h2c connection to `addr` and starts `streams` POSTs to `path`,
/// each declaring `declared` bytes and sending `sent` of them.
async fn h2_flood(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    streams: usize,
    declared: usize,
    sent: usize,
) -> Flood {
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    let mut tasks = vec![tokio::spawn(async move {
        let _ = conn.await;
    })];
    let (tx, answers) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..streams {
        let mut req = Request::post(format!("http://{addr}{path}"))
            .header("content-length", declared.to_string());
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Stalling { left: sent }).unwrap();
        let mut sender = sender.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(resp) = sender.send_request(req).await else {
                return;
            };
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let _ = tx.send((status, retry_after, v));
        }));
    }
    Flood { answers, tasks }
}

/// The answers that come within `within`, at most `n`.
async fn h2_answers(flood: &mut Flood, n: usize, within: Duration) -> Vec<H2Answer> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, flood.answers.recv()).await {
            Ok(Some(answer)) => got.push(answer),
            _ => break,
        }
    }
    got
}

fn h2_overloaded(answer: &H2Answer) -> bool {
    let (status, retry_after, v) = answer;
    *status == 503
        && retry_after.as_deref() == Some("1")
        && v["error"] == "overloaded"
        && v["source"] == "pandagate"
}

// ------------------------------------------------------------------ tests

/// Forged pushes that look signed, slow to arrive: 24 over HTTP/1 on both
/// listeners with a length, 8 chunked without one, and 150 over three h2c
/// connections to the main listener. Pushes may hold 2 MiB together and
/// each connection reads one push at a time, so two 1 MiB pushes are held
/// and every other one is refused at once, with nothing stored; the
/// process's memory grows by far less than what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_past_the_budget_get_503_overloaded_and_memory_stays_bounded() {
    let upstream = RawUpstream::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, callbacks) =
        launch_with_budget(dir.path(), &format!("http://{}", upstream.addr)).await;
    let traffic: SocketAddr = gw.gateway.parse().unwrap();
    let pid = gw.child.id().unwrap();
    assert_eq!(push_signed(&gw.gateway, "sk-budget", "B0").await, 200);
    let (rss_before, _) = memory_kb(pid);

    // HTTP/1, a declared megabyte each, half of it sent.
    let head = format!(
        "POST /callbacks/pandapon HTTP/1.1\r\nHost: x\r\nAuthorization: {FORGED}\r\n\
         Content-Length: {MIB}\r\n\r\n"
    );
    let mut slow = Vec::new();
    for i in 0..24 {
        let listener = if i % 2 == 0 { callbacks } else { traffic };
        slow.push(upload(listener, &head, MIB / 2).await);
    }
    let (overloaded, other, waiting) = sort_answers(&mut slow, Duration::from_millis(500)).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(
        (overloaded, waiting.len()),
        (22, 2),
        "two 1 MiB pushes fill the pushes' 2 MiB; the rest are refused"
    );

    // Chunked, no length: refused as their bytes arrive, the share being full.
    let head = format!(
        "POST /callbacks/pandapon HTTP/1.1\r\nHost: x\r\nAuthorization: {FORGED}\r\n\
         Transfer-Encoding: chunked\r\n\r\n10000\r\n"
    );
    let mut chunked = Vec::new();
    for i in 0..8 {
        let listener = if i % 2 == 0 { callbacks } else { traffic };
        chunked.push(upload(listener, &head, 64 * KIB).await);
    }
    let (chunked_refused, other, waiting) =
        sort_answers(&mut chunked, Duration::from_secs(2)).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!((chunked_refused, waiting.len()), (8, 0));

    // h2c: three connections of 50 streams, each declaring a megabyte and
    // sending all but its last byte.
    let mut floods = Vec::new();
    for _ in 0..3 {
        let signed = [("authorization", FORGED)];
        floods.push(h2_flood(traffic, "/callbacks/pandapon", &signed, 50, MIB, MIB - 1).await);
    }
    let mut h2_refused = 0;
    for flood in &mut floods {
        let answers = h2_answers(flood, 50, Duration::from_secs(3)).await;
        assert_eq!(answers.len(), 50, "every stream refused at once");
        assert!(answers.iter().all(h2_overloaded), "{answers:?}");
        h2_refused += answers.len();
    }
    let (_, peak) = memory_kb(pid);
    let growth_kb = peak.saturating_sub(rss_before);
    eprintln!("pushes: VmRSS before {rss_before} kB, VmHWM after {peak} kB: grew {growth_kb} kB");

    let text = metrics(&gw.admin).await;
    assert_eq!(
        rejected(&text, "callbacks") as usize,
        overloaded + chunked_refused + h2_refused,
        "{text}"
    );
    assert_eq!(rejected(&text, "gateway"), 0.0);
    assert_eq!(
        metric(&text, "pandagate_body_budget_held_bytes") as usize,
        2 * MIB
    );
    assert_eq!(metric(&text, "pandagate_callbacks_stored_total"), 1.0);
    // What the budget allows (2 MiB of pushes), and per connection an h2
    // window (1 MiB) or an HTTP/1 read buffer, with room for the
    // allocator: far below the ~170 MiB sent or declared.
    assert!(
        growth_kb < 64 * 1024,
        "the gateway's memory grew by {growth_kb} kB"
    );
    assert!(upstream.requests().is_empty());
    drop((slow, chunked, floods));
}

/// Calls with bodies, from one h2c connection of 20 streams and from 12
/// slow HTTP/1 uploads: a connection holds at most 2 MiB, all of them at
/// most 8 MiB; the others get 503 `overloaded` and nothing is forwarded.
/// A call without a body is answered throughout, and once the held bodies
/// are gone the budget takes new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_budget_get_503_overloaded_and_nothing_is_forwarded() {
    let upstream = RawUpstream::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = launch_with_budget(dir.path(), &format!("http://{}", upstream.addr)).await;
    let traffic: SocketAddr = gw.gateway.parse().unwrap();

    // 20 streams of 512 KiB on one connection: 4 fit its 2 MiB share.
    let mut h2 = h2_flood(traffic, "/open/order", &[], 20, MIB / 2, 100 * KIB).await;
    let answers = h2_answers(&mut h2, 20, Duration::from_secs(3)).await;
    assert_eq!(answers.len(), 16, "{answers:?}");
    assert!(answers.iter().all(h2_overloaded), "{answers:?}");

    // 12 slow uploads of a megabyte: 6 fit the 6 MiB left.
    let head = format!("POST /open/order HTTP/1.1\r\nHost: x\r\nContent-Length: {MIB}\r\n\r\n");
    let mut slow = Vec::new();
    for _ in 0..12 {
        slow.push(upload(traffic, &head, 100 * KIB).await);
    }
    let (overloaded, other, waiting) = sort_answers(&mut slow, Duration::from_millis(500)).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!((overloaded, waiting.len()), (6, 6));

    // The budget is full: a chunked body is refused at its first bytes.
    let mut chunked = upload(
        traffic,
        "POST /open/order HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n",
        KIB,
    )
    .await;
    let answer = answer_within(&mut chunked, Duration::from_secs(2)).await;
    assert!(answer.as_deref().is_some_and(is_overloaded), "{answer:?}");

    // A call without a body holds nothing.
    let answer = get(&format!("http://{traffic}/open/product/get")).await;
    assert_eq!(answer.status, 200);

    let text = metrics(&gw.admin).await;
    assert_eq!(rejected(&text, "gateway"), (16 + 6 + 1) as f64, "{text}");
    assert_eq!(rejected(&text, "callbacks"), 0.0);
    assert_eq!(
        metric(&text, "pandagate_body_budget_held_bytes") as usize,
        BUDGET
    );
    let sent = upstream.requests();
    assert_eq!(sent.len(), 1, "only the bodiless call: {sent:?}");

    // The held bodies' callers leave: their bytes are given back.
    drop((h2, slow));
    let started = Instant::now();
    loop {
        let held = metric(
            &metrics(&gw.admin).await,
            "pandagate_body_budget_held_bytes",
        );
        if held == 0.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{held} bytes still held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let req = Request::post(format!("http://{traffic}/open/order"))
        .body(http_body_util::Full::new(Bytes::from(vec![b'z'; MIB])))
        .unwrap();
    assert_eq!(send(req).await.status, 200);
}

/// A push without a signature, or with one that cannot be an HMAC-SHA256,
/// is refused at once, before any of its body is read: the 401 comes
/// although none of the body was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_cannot_verify_is_refused_before_its_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, callbacks) = launch_with_budget(dir.path(), "http://127.0.0.1:9").await;
    let traffic: SocketAddr = gw.gateway.parse().unwrap();
    let short = &FORGED[..62];
    let cases = [
        ("no Authorization", String::new()),
        ("a bearer token", "Authorization: Bearer abc\r\n".to_owned()),
        ("too short", format!("Authorization: {short}\r\n")),
        ("not hex", format!("Authorization: {}zz\r\n", &FORGED[..62])),
    ];
    for listener in [callbacks, traffic] {
        for (what, auth) in &cases {
            let head = format!(
                "POST /callbacks/pandapon HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {MIB}\r\n\r\n"
            );
            let mut s = upload(listener, &head, 0).await;
            let answer = answer_within(&mut s, Duration::from_secs(2)).await;
            let answer = answer.unwrap_or_else(|| panic!("{what}: no answer without the body"));
            assert!(answer.starts_with("HTTP/1.1 401"), "{what}: {answer}");
            assert!(answer.contains(r#""error":"bad_signature""#), "{answer}");
        }
    }
    let text = metrics(&gw.admin).await;
    assert_eq!(metric(&text, "pandagate_callbacks_rejected_total"), 8.0);
    assert_eq!(metric(&text, "pandagate_body_budget_held_bytes"), 0.0);
}

/// The callback listener speaks HTTP/1.1 only: an h2c client gets no
/// HTTP/2 (no SETTINGS), so no stream of it is ever read; the main
/// listener still speaks both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_listener_speaks_http1_only() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, callbacks) = launch_with_budget(dir.path(), "http://127.0.0.1:9").await;
    let settings = |addr: SocketAddr| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .map_or(0, |r| r.unwrap_or(0));
        // A server's first HTTP/2 frame is its SETTINGS (type 4, stream 0).
        n >= 9 && buf[3] == 0x4 && buf[5..9] == [0, 0, 0, 0]
    };
    assert!(
        !settings(callbacks).await,
        "the callback listener spoke HTTP/2"
    );
    assert!(
        settings(gw.gateway.parse().unwrap()).await,
        "the main listener speaks h2c"
    );
    assert_eq!(
        push_signed(&callbacks.to_string(), "sk-budget", "H1").await,
        200
    );
}
