//! Large bodies (issue 7, point 5), on the real binary: a 50 MiB upload and a
//! 50 MiB download pass through without the gateway's memory growing by
//! their size, and a streamed upload over the cap gets a 413 envelope without
//! a complete body reaching the provider.
//!
//! The gateway runs as its own process so its peak resident set (`VmHWM` in
//! `/proc/<pid>/status`) can be read before and after. Bodies are generated
//! chunk by chunk on the fly and checked byte for byte as they arrive:
//! neither the test nor its fake provider ever holds a whole body.

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use support::binary::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The size issue 7 names.
const LARGE: u64 = 50 * MIB;
/// Chunk size of generated bodies.
const CHUNK: usize = 64 * 1024;
/// The reader of a large body (fake provider or client) stops for `STALL`
/// once it has read `STALL_AT` bytes, while the writer at the other end
/// keeps going: a gateway that read ahead without backpressure would pile
/// the rest of the body up in memory meanwhile.
const STALL_AT: u64 = 8 * MIB;
const STALL: Duration = Duration::from_millis(500);
/// How much the gateway's peak RSS may grow while a 50 MiB body passes.
///
/// What a streaming gateway holds per call is bounded by hyper's buffers: a
/// read buffer per connection (the caller side is capped at
/// `server.max_header_bytes`, 64 KiB; the provider side at hyper's default,
/// ~400 KiB) and a write queue of a few chunks per connection: about 1-2 MiB
/// in all (measured: 1-2.5 MiB), plus allocator slack (glibc arenas of the
/// worker threads that touch the body). 16 MiB leaves room for that noise
/// while staying far below the 50 MiB that buffering the body would add
/// (measured with `buffer_body_bytes` raised to 64 MiB, so the body is read
/// whole: +100 MiB, the chunks plus their joined copy).
const GROWTH_BOUND_KB: u64 = 16 * 1024;
/// Longest any one exchange in this file may take (debug builds included).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Generated bodies

/// One chunk of pseudo-random bytes (xorshift), the pattern every generated
/// chunk starts from.
fn base_block() -> Bytes {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = Vec::with_capacity(CHUNK);
    while block.len() < CHUNK {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        block.extend_from_slice(&state.to_le_bytes());
    }
    Bytes::from(block)
}

/// Chunk `index` of every generated body: the base block with the index in
/// its first 8 bytes, so a chunk lost, repeated or reordered is noticed.
fn chunk(base: &Bytes, index: u64) -> Bytes {
    let mut chunk = BytesMut::from(&base[..]);
    chunk[..8].copy_from_slice(&index.to_le_bytes());
    chunk.freeze()
}

/// `len` bytes (a multiple of `CHUNK`) of generated content, made on the fly.
struct Generated {
    base: Bytes,
    next: u64,
    left: u64,
    declare_length: bool,
}

impl Generated {
    fn new(len: u64, declare_length: bool) -> Generated {
        assert_eq!(len % CHUNK as u64, 0, "whole chunks");
        Generated {
            base: base_block(),
            next: 0,
            left: len,
            declare_length,
        }
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let data = chunk(&this.base, this.next);
        this.next += 1;
        this.left -= CHUNK as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.declare_length {
            SizeHint::with_exact(self.left)
        } else {
            // Unknown length: hyper sends it chunked, no Content-Length.
            SizeHint::new()
        }
    }
}

/// Checks a received body, piece by piece as it arrives (at whatever
/// boundaries), against the generated stream, byte for byte. (Cheaper than
/// a SHA-256 on each side, which unoptimised takes ~2 s per 50 MiB, and
/// exact rather than probable.)
struct Verifier {
    base: Bytes,
    /// Bytes checked so far.
    seen: u64,
    /// The chunk `seen` falls in, and its index.
    current: (u64, Bytes),
    /// Offset of the first byte that differs from the generated stream.
    first_mismatch: Option<u64>,
}

impl Verifier {
    fn new() -> Verifier {
        let base = base_block();
        let current = (0, chunk(&base, 0));
        Verifier {
            base,
            seen: 0,
            current,
            first_mismatch: None,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let index = self.seen / CHUNK as u64;
            if self.current.0 != index {
                self.current = (index, chunk(&self.base, index));
            }
            let offset = (self.seen % CHUNK as u64) as usize;
            let take = data.len().min(CHUNK - offset);
            let expected = &self.current.1[offset..offset + take];
            if self.first_mismatch.is_none() && data[..take] != *expected {
                let at = data.iter().zip(expected).position(|(a, b)| a != b);
                self.first_mismatch = Some(self.seen + at.unwrap_or(0) as u64);
            }
            self.seen += take as u64;
            data = &data[take..];
        }
    }
}

/// What was read of a body: its length, whether it is the generated stream
/// so far, and whether it ended cleanly (rather than with a broken
/// connection or an incomplete message).
#[derive(Clone, Debug, PartialEq)]
struct Drained {
    bytes: u64,
    first_mismatch: Option<u64>,
    complete: bool,
}

/// Reads `body` frame by frame, checking it against the generated stream
/// without keeping it. After `STALL_AT` bytes the reader stops for `STALL`,
/// as a slow consumer would.
async fn drain(mut body: Incoming) -> Drained {
    let mut verifier = Verifier::new();
    let mut stalled = false;
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    verifier.update(&data);
                    if !stalled && verifier.seen >= STALL_AT {
                        stalled = true;
                        tokio::time::sleep(STALL).await;
                    }
                }
            }
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    Drained {
        bytes: verifier.seen,
        first_mismatch: verifier.first_mismatch,
        complete,
    }
}

// ---------------------------------------------------------------------------
// The fake provider

/// What the fake provider saw of one request.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    content_length: Option<u64>,
    body: Drained,
}

/// A provider on a free loopback port. `POST` bodies are drained (checked,
/// never kept) and answered with an envelope saying what arrived;
/// `GET /...?bytes=N` is answered with N generated bytes.
struct Provider {
    addr: SocketAddr,
    /// Requests whose head arrived, counted before their body is read.
    started: Arc<AtomicUsize>,
    /// Request bodies read to their end (or to a broken connection).
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Provider {
    async fn start() -> Provider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (started.clone(), received.clone());
        let task = tokio::spawn(async move {
            // Connections live in the set, so stopping the accept loop
            // (dropping the set) stops them too.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (s, r) = (s.clone(), r.clone());
                let service = service_fn(move |req| {
                    let (s, r) = (s.clone(), r.clone());
                    async move { Ok::<_, Infallible>(answer(req, &s, &r).await) }
                });
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Provider {
            addr,
            started,
            received,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until `n` request bodies were drained.
    async fn received_of(&self, n: usize) -> Vec<Received> {
        for _ in 0..1000 {
            if self.received.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.received()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    started: &AtomicUsize,
    received: &Mutex<Vec<Received>>,
) -> Response<BoxBody<Bytes, Infallible>> {
    started.fetch_add(1, Ordering::SeqCst);
    let wanted: Option<u64> = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("bytes="))
        .and_then(|n| n.parse().ok());
    if let Some(len) = wanted {
        return Response::builder()
            .header("content-type", "application/octet-stream")
            .body(Generated::new(len, true).boxed())
            .unwrap();
    }
    let path = req.uri().path().to_owned();
    let content_length = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = drain(req.into_body()).await;
    let envelope = serde_json::json!({
        "requestId": "provider-large-body",
        "code": 200,
        "developId": "1",
        "msg": "ok",
        "data": {
            "bytes": body.bytes,
            "firstMismatch": body.first_mismatch,
            "complete": body.complete,
        },
    });
    received.lock().unwrap().push(Received {
        path,
        content_length,
        body,
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(envelope.to_string())).boxed())
        .unwrap()
}

// ---------------------------------------------------------------------------
// The gateway process

/// Starts the binary against `provider` with `server_toml` in its `[server]`
/// section. Generous timeouts: a debug build moving 50 MiB must not be cut
/// off by the upstream/attempt timeouts, which also run while the request
/// body is being sent.
async fn start_gateway(provider: &Provider, server_toml: &str) -> (Running, tempfile::TempPath) {
    let toml = format!(
        "[server]\n{server_toml}\n\
         [upstream]\nrequest_timeout_ms = 60000\n\
         [retry]\ndeadline_ms = 60000\nread_attempt_timeout_ms = 60000\n"
    );
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, toml.as_bytes()).unwrap();
    let path = file.into_temp_path();
    let gw = support::launch(
        &["--config", path.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak-large-bodies"),
            ("PANDAPON_ACCESS_SECRET", "sk-large-bodies"),
            ("PANDAGATE_UPSTREAM", &provider.url()),
        ],
    )
    .await;
    (gw, path)
}

/// SIGTERM, then wait (bounded) for the exit; killed if it does not come.
async fn stop(mut gw: Running) {
    gw.signal("-TERM");
    let exited = tokio::time::timeout(Duration::from_secs(10), gw.child.wait()).await;
    if !matches!(exited, Ok(Ok(status)) if status.success()) {
        let _ = gw.child.kill().await;
        panic!("gateway did not exit 0 within 10 s of SIGTERM: {exited:?}");
    }
}

/// `VmHWM` (peak resident set) and `VmRSS` of process `pid`, in kB.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Peak RSS now, against RSS at `before` (not `VmHWM`: a peak left over from
/// start-up would hide growth).
struct Growth {
    hwm_before: u64,
    rss_before: u64,
    hwm_after: u64,
}

impl Growth {
    fn kb(&self) -> u64 {
        self.hwm_after.saturating_sub(self.rss_before)
    }

    fn assert_bounded(&self, what: &str) {
        eprintln!(
            "{what}: VmHWM before {} kB, VmRSS before {} kB, VmHWM after {} kB: peak grew {} kB (bound {} kB)",
            self.hwm_before,
            self.rss_before,
            self.hwm_after,
            self.kb(),
            GROWTH_BOUND_KB
        );
        assert!(
            self.kb() < GROWTH_BOUND_KB,
            "{what}: the gateway's peak RSS grew by {} kB passing {} MiB (bound {} kB)",
            self.kb(),
            LARGE / MIB,
            GROWTH_BOUND_KB
        );
    }
}

// ---------------------------------------------------------------------------
// Client side

fn upload_client() -> Client<HttpConnector, Generated> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A small call through every piece the large one uses, so the baseline
/// includes the runtime, the connection pools and the first allocations.
async fn warm_up(gw: &Running) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    for target in [
        "/alibaba/product/image/query",
        "/open/product/get?bytes=65536",
    ] {
        let method = if target.contains('?') { "GET" } else { "POST" };
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{target}", gw.gateway))
            .body(Full::new(Bytes::from_static(b"{\"warm\":\"up\"}")))
            .unwrap();
        let resp = tokio::time::timeout(EXCHANGE_TIMEOUT, client.request(req))
            .await
            .expect("warm-up answered in time")
            .expect("warm-up call");
        assert_eq!(resp.status(), 200, "warm-up {target}");
        resp.into_body().collect().await.unwrap();
    }
}

async fn collect_json(body: Incoming) -> Value {
    let bytes = tokio::time::timeout(EXCHANGE_TIMEOUT, body.collect())
        .await
        .expect("body within the timeout")
        .expect("body reads")
        .to_bytes();
    serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("JSON body: {bytes:?}"))
}

// ---------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_50_mib_upload_streams_through_without_the_gateway_holding_it() {
    let provider = Provider::start().await;
    // The cap raised above the body; the buffering threshold left at its
    // default (1 MiB), so this body takes the streaming path.
    let (gw, _config) = start_gateway(&provider, "max_request_body_bytes = 67108864").await;
    let pid = gw.child.id().expect("running");
    warm_up(&gw).await;
    let (calls_before, bodies_before) = (provider.started(), provider.received().len());
    let (hwm_before, rss_before) = memory_kb(pid);

    // The image search takes an uploaded picture: a large body on a `read`
    // path, which the gateway would repeat if it could. Over the buffering
    // threshold the body is not replayable, so it is streamed and sent once.
    let req = Request::post(format!("http://{}/alibaba/product/image/query", gw.gateway))
        .header("content-type", "application/octet-stream")
        .body(Generated::new(LARGE, true))
        .unwrap();
    let started = Instant::now();
    let resp = tokio::time::timeout(EXCHANGE_TIMEOUT, upload_client().request(req))
        .await
        .expect("answered within the timeout")
        .expect("upload call");
    let status = resp.status();
    let v = collect_json(resp.into_body()).await;
    let elapsed = started.elapsed();
    let growth = Growth {
        hwm_before,
        rss_before,
        hwm_after: memory_kb(pid).0,
    };

    // The provider's own answer, saying it got every byte, in order.
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["requestId"], "provider-large-body", "{v}");
    assert_eq!(v["data"]["bytes"], LARGE, "{v}");
    assert_eq!(v["data"]["firstMismatch"], Value::Null, "{v}");
    assert_eq!(v["data"]["complete"], true, "{v}");
    let received = provider.received_of(bodies_before + 1).await;
    let upload = received.last().expect("the upload reached the provider");
    assert_eq!(upload.path, "/alibaba/product/image/query");
    assert_eq!(upload.content_length, Some(LARGE));
    let whole = Drained {
        bytes: LARGE,
        first_mismatch: None,
        complete: true,
    };
    assert_eq!(upload.body, whole);
    assert_eq!(
        provider.started(),
        calls_before + 1,
        "sent to the provider exactly once"
    );
    eprintln!("50 MiB upload took {elapsed:?}");
    growth.assert_bounded("50 MiB upload");
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_50_mib_download_streams_through_without_the_gateway_holding_it() {
    let provider = Provider::start().await;
    let (gw, _config) = start_gateway(&provider, "").await;
    let pid = gw.child.id().expect("running");
    warm_up(&gw).await;
    let (hwm_before, rss_before) = memory_kb(pid);

    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!(
        "http://{}/open/product/get?bytes={LARGE}",
        gw.gateway
    ))
    .body(Empty::new())
    .unwrap();
    let started = Instant::now();
    let resp = tokio::time::timeout(EXCHANGE_TIMEOUT, client.request(req))
        .await
        .expect("answered within the timeout")
        .expect("download call");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()),
        Some(LARGE.to_string().as_str())
    );
    // The client stalls part-way while the provider keeps writing (STALL).
    let got = tokio::time::timeout(EXCHANGE_TIMEOUT, drain(resp.into_body()))
        .await
        .expect("body within the timeout");
    let elapsed = started.elapsed();
    let growth = Growth {
        hwm_before,
        rss_before,
        hwm_after: memory_kb(pid).0,
    };

    let whole = Drained {
        bytes: LARGE,
        first_mismatch: None,
        complete: true,
    };
    assert_eq!(got, whole);
    eprintln!("50 MiB download took {elapsed:?}");
    growth.assert_bounded("50 MiB download");
    stop(gw).await;
}

/// Sends `len` generated bytes chunked (no Content-Length, so the gateway
/// has to count) over a raw connection, reading the answer while still
/// sending, as curl does. The gateway answers 413 and closes the connection
/// while the caller is still sending; a client that reads only once it has
/// sent everything (hyper's) gets a broken pipe instead of the answer.
/// Returns the answer and how many body bytes the gateway took before the
/// connection broke (all of them when it fit in the socket buffers).
async fn upload_chunked(gw: &Running, len: u64) -> (support::client::Answer, u64) {
    let mut stream = tokio::net::TcpStream::connect(&gw.gateway).await.unwrap();
    // Borrowed halves: nothing half-closes the connection behind our back
    // (the gateway would take a half-close for the caller leaving).
    let (mut rx, mut tx) = stream.split();
    let write = async {
        let head = "POST /alibaba/product/image/query HTTP/1.1\r\nHost: gateway\r\n\
                    Transfer-Encoding: chunked\r\n\r\n";
        let mut body = Generated::new(len, false);
        let mut written = 0u64;
        if tx.write_all(head.as_bytes()).await.is_err() {
            return written;
        }
        while let Some(Ok(frame)) = body.frame().await {
            let data = frame.into_data().expect("data frames only");
            let framed = [format!("{:x}\r\n", data.len()).as_bytes(), &data, b"\r\n"].concat();
            if tx.write_all(&framed).await.is_err() {
                return written;
            }
            written += data.len() as u64;
        }
        let _ = tx.write_all(b"0\r\n\r\n").await;
        written
    };
    // One response: its head, then a Content-Length body (or up to the
    // connection's end).
    let read = async {
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(usize::MAX);
                if raw.len() - (end + 4) >= len {
                    break;
                }
            }
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
        raw
    };
    let (written, raw) =
        tokio::time::timeout(EXCHANGE_TIMEOUT, async { tokio::join!(write, read) })
            .await
            .expect("upload and answer within the timeout");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("a response head: {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    let mut headers = http::HeaderMap::new();
    for line in head.lines().skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(
                http::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
                http::HeaderValue::from_str(value.trim()).unwrap(),
            );
        }
    }
    let answer = support::client::Answer {
        status: http::StatusCode::from_u16(status).unwrap(),
        headers,
        body: Bytes::copy_from_slice(&raw[end + 4..]),
    };
    (answer, written)
}

/// tests/errors.rs covers 413 for bodies of a few hundred bytes on the
/// in-process gateway; this is the same at MiB scale on the binary, with a
/// caller still sending when the gateway gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streamed_upload_over_the_cap_gets_413_and_the_provider_never_gets_all_of_it() {
    let provider = Provider::start().await;
    // 1 MiB cap, bodies over 256 KiB stream: the start of the body may reach
    // the provider before the gateway knows it is too large.
    let (gw, _config) = start_gateway(
        &provider,
        "max_request_body_bytes = 1048576\nbuffer_body_bytes = 262144",
    )
    .await;
    let cap = MIB;
    let (answer, written) = upload_chunked(&gw, 8 * MIB).await;
    eprintln!(
        "over the cap (streamed): the caller wrote {written} of {} bytes",
        8 * MIB
    );
    let v = answer.assert_gateway_envelope(413);
    assert_eq!(
        v["msg"],
        format!("request body exceeds the limit of {cap} bytes")
    );
    // The start of the body reached the provider (it streamed), but at
    // most the cap of it and not as a complete request: the gateway broke
    // the upstream connection instead of ending the body.
    let received = provider.received_of(1).await;
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(provider.started(), 1);
    let cut = &received[0].body;
    eprintln!("over the cap (streamed): the provider got {cut:?}");
    assert!(!cut.complete, "complete body forwarded: {cut:?}");
    assert!(cut.bytes <= cap, "more than the cap forwarded: {cut:?}");
    assert_eq!(cut.first_mismatch, None, "{cut:?}");
    stop(gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_buffered_upload_over_the_cap_gets_413_and_nothing_reaches_the_provider() {
    let provider = Provider::start().await;
    // 1 MiB cap, buffering threshold at its default (1 MiB): the whole
    // allowance is read before anything is sent, so nothing is.
    let (gw, _config) = start_gateway(&provider, "max_request_body_bytes = 1048576").await;
    let (answer, written) = upload_chunked(&gw, 3 * MIB).await;
    eprintln!(
        "over the cap (buffered): the caller wrote {written} of {} bytes",
        3 * MIB
    );
    let v = answer.assert_gateway_envelope(413);
    assert_eq!(
        v["msg"],
        format!("request body exceeds the limit of {MIB} bytes")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(provider.started(), 0, "{:?}", provider.received());
    stop(gw).await;
}
