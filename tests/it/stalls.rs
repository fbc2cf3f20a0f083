//! Stalled, slow and greedy callers against the real binary: no state of a
//! connection spins a core, a body that does not arrive in time gets 408
//! and nothing is forwarded or stored, each listener holds at most
//! `server.max_connections`, and the admin listener answers throughout.

use crate::support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use support::binary::{Running, launch_with_callback_listener};
use support::h2_client::{h2_frame, h2_get};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wiremock::ResponseTemplate;

/// Starts the binary with `server_extra` in `[server]` and a callback
/// listener; returns it with the callback listener's address.
async fn launch_with_callbacks(
    dir: &Path,
    upstream: &str,
    server_extra: &str,
) -> (Running, SocketAddr) {
    let env = [
        ("PANDAPON_ACCESS_KEY", "ak-stall"),
        ("PANDAPON_ACCESS_SECRET", "sk-stall"),
    ];
    launch_with_callback_listener(dir, upstream, server_extra, &env).await
}

/// An `Authorization` line shaped like a push's signature (hex of an
/// HMAC-SHA256) but signing nothing: the receiver must read the body to
/// find that out. A push without one is refused before its body is read.
const SIGNED: &str =
    "Authorization: 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\r\n";

/// User plus system CPU time of `pid`, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Sends `head` and `body_part`, then nothing more; returns the stream.
async fn park(addr: SocketAddr, head: &str, body_part: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body_part).await.unwrap();
    s
}

/// Everything the peer sends until it closes (at most `within`); `None` if
/// it is still open then.
async fn until_closed(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(within, s.read_to_end(&mut buf)).await;
    match read {
        Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
        Err(_) => None,
    }
}

async fn metrics(admin: &str) -> String {
    String::from_utf8(get(&format!("http://{admin}/metrics")).await.body.to_vec()).unwrap()
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Parked in every way a connection can go quiet, past the idle timeout,
/// the process uses (almost) no CPU: nothing re-arms a timer that has
/// already fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stalled_connection_spins_a_core() {
    let slow = upstream_answering(
        ResponseTemplate::new(200)
            .set_body_string("{}")
            .set_delay(Duration::from_secs(6)),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, callbacks) = launch_with_callbacks(
        dir.path(),
        &slow.uri(),
        "idle_timeout_ms = 300\nbody_read_timeout_ms = 60000",
    )
    .await;
    let traffic: SocketAddr = gw.gateway.parse().unwrap();
    let pid = gw.child.id().unwrap();

    let mut parked = vec![
        // A body that stops after 10 of 1 MiB bytes, on both listeners.
        park(
            traffic,
            "POST /open/order HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n",
            b"0123456789",
        )
        .await,
        park(
            callbacks,
            &format!(
                "POST /callbacks/pandapon HTTP/1.1\r\nHost: x\r\n{SIGNED}Content-Length: 1000000\r\n\r\n"
            ),
            b"0123456789",
        )
        .await,
        // A chunked body that stops mid-chunk.
        park(
            traffic,
            "POST /open/order HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"400\r\nabc",
        )
        .await,
        // A call waiting on a provider slower than the idle timeout.
        park(
            traffic,
            "GET /open/product/get HTTP/1.1\r\nHost: x\r\n\r\n",
            b"",
        )
        .await,
    ];
    // Past the idle timeout for all of them, then measure.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = cpu_ticks(pid);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_ticks(pid) - before;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        used <= 30,
        "{used} ticks of CPU in {elapsed:.1} s with parked connections (a spinning core is ~{})",
        (elapsed * 100.0) as u64
    );
    // The waiting call was not cut: it gets its answer.
    let mut waiting = parked.remove(3);
    let answer = until_closed(&mut waiting, Duration::from_secs(1)).await;
    assert!(
        answer.is_none(),
        "a call waiting on the provider was cut: {answer:?}"
    );
    drop(parked);
}

/// A caller that stops reading a large answer is cut off once no byte has
/// moved for the idle timeout, and nothing spins meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_reading_is_cut_off_without_spinning() {
    let big =
        upstream_answering(ResponseTemplate::new(200).set_body_bytes(vec![b'x'; 16 * 1024 * 1024]))
            .await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = launch_with_callbacks(dir.path(), &big.uri(), "idle_timeout_ms = 500").await;
    let traffic: SocketAddr = gw.gateway.parse().unwrap();
    let pid = gw.child.id().unwrap();
    let mut s = park(
        traffic,
        "GET /open/product/get HTTP/1.1\r\nHost: x\r\n\r\n",
        b"",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    assert!(used <= 30, "{used} ticks in 2 s with a stalled reader");
    // What was sent before the stall, then the close: far less than 16 MiB.
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the stalled reader's connection stayed open"
    );
    assert!(
        total < 16 * 1024 * 1024,
        "the whole answer was sent ({total} bytes)"
    );
}

/// Bodies that do not arrive within `server.body_read_timeout_ms` get 408
/// in the envelope and are neither forwarded nor stored, on both listeners
/// and whether the body is buffered or streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_get_408_and_nothing_is_forwarded_or_stored() {
    let upstream = upstream_answering(ResponseTemplate::new(200).set_body_string("{}")).await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, callbacks) = launch_with_callbacks(
        dir.path(),
        &upstream.uri(),
        "body_read_timeout_ms = 800\nbuffer_body_bytes = 1024",
    )
    .await;
    let traffic: SocketAddr = gw.gateway.parse().unwrap();
    let started = Instant::now();
    let mut cases = vec![
        (
            "buffered body, stalled",
            park(
                traffic,
                "POST /open/order HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n",
                b"{\"a\":",
            )
            .await,
        ),
        (
            "streamed body, stalled past buffer_body_bytes",
            park(
                traffic,
                "POST /open/order HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
                &[b'x'; 50_000],
            )
            .await,
        ),
        (
            "push body, stalled",
            park(
                callbacks,
                &format!(
                    "POST /callbacks/pandapon HTTP/1.1\r\nHost: x\r\n{SIGNED}Content-Length: 100000\r\n\r\n"
                ),
                &[b'x'; 10_000],
            )
            .await,
        ),
    ];
    // A body that trickles in steadily but too slowly is held to the same
    // deadline.
    let mut trickle = park(
        traffic,
        "POST /open/order HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
        b"",
    )
    .await;
    let trickled = tokio::spawn(async move {
        for _ in 0..100 {
            if trickle.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut probe = [0u8; 1024];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(1), trickle.read(&mut probe)).await
            {
                return String::from_utf8_lossy(&probe[..n]).into_owned();
            }
        }
        String::new()
    });
    for (what, s) in &mut cases {
        let answer = until_closed(s, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{what}: still open 5 s later"));
        assert!(answer.starts_with("HTTP/1.1 408"), "{what}: {answer}");
        assert!(
            answer.contains(r#""error":"body_timeout""#),
            "{what}: {answer}"
        );
    }
    let trickled = trickled.await.unwrap();
    assert!(
        trickled.starts_with("HTTP/1.1 408"),
        "trickle: {trickled:?}"
    );
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(700), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(
        upstream.received_requests().await.unwrap().is_empty(),
        "a request reached the provider"
    );
    let text = metrics(&gw.admin).await;
    assert_eq!(metric(&text, "pandagate_callbacks_stored_total"), Some(0.0));
    assert_eq!(
        metric(&text, "pandagate_callbacks_rejected_total"),
        Some(1.0)
    );
}

/// A listener holds at most `max_connections`: one more is closed at once
/// and counted; the cap frees up as connections leave; the admin listener
/// answers health checks while the others are full of slow uploads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_and_admin_keeps_answering() {
    let upstream = upstream_answering(ResponseTemplate::new(200).set_body_string("{}")).await;
    let dir = tempfile::tempdir().unwrap();
    let (gw, callbacks) = launch_with_callbacks(
        dir.path(),
        &upstream.uri(),
        "max_connections = 8\nbody_read_timeout_ms = 1500",
    )
    .await;
    let traffic: SocketAddr = gw.gateway.parse().unwrap();
    let upload = |path: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: x\r\n{SIGNED}Content-Length: 1000000\r\n\r\n")
    };
    let mut uploads = Vec::new();
    for _ in 0..8 {
        uploads.push(park(callbacks, &upload("/callbacks/pandapon"), &[b'x'; 100_000]).await);
        uploads.push(park(traffic, &upload("/open/order"), &[b'x'; 100_000]).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    for listener in [callbacks, traffic] {
        let mut extra = TcpStream::connect(listener).await.unwrap();
        let said = until_closed(&mut extra, Duration::from_secs(1)).await;
        assert_eq!(
            said.as_deref(),
            Some(""),
            "{listener}: over the cap, closed at once"
        );
    }
    for path in ["/healthz", "/readyz"] {
        let asked = Instant::now();
        let answer = get(&format!("http://{}{path}", gw.admin)).await;
        assert_eq!(answer.status, 200, "{path}");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{path}: {:?}",
            asked.elapsed()
        );
    }
    let text = metrics(&gw.admin).await;
    for listener in ["callbacks", "gateway"] {
        let open = format!("pandagate_connections_open{{listener=\"{listener}\"}}");
        let rejected = format!("pandagate_connections_rejected_total{{listener=\"{listener}\"}}");
        assert_eq!(metric(&text, &open), Some(8.0), "{listener}\n{text}");
        assert_eq!(metric(&text, &rejected), Some(1.0), "{listener}\n{text}");
    }

    // The body timeout frees them all; then the cap admits new callers.
    for s in &mut uploads {
        let said = until_closed(s, Duration::from_secs(5)).await;
        assert!(said.is_some(), "an upload outlived the body timeout");
    }
    let status = push_signed(&callbacks.to_string(), "sk-stall", "C1").await;
    assert_eq!(status, 200, "a push once the cap freed up");
    let answer = get(&format!("http://{}/open/product/get", gw.gateway)).await;
    assert_eq!(answer.status, 200);
}

/// A client that ignores the gateway's SETTINGS and opens more streams
/// than `server.http2_max_concurrent_streams` at once: the extra streams
/// are refused (RST_STREAM REFUSED_STREAM) and never reach the provider.
#[tokio::test]
async fn http2_streams_beyond_the_limit_are_refused() {
    let upstream = upstream_answering(
        ResponseTemplate::new(200)
            .set_body_string("{}")
            .set_delay(Duration::from_millis(1500)),
    )
    .await;
    let mut c = config(&upstream.uri());
    c.server.http2_max_concurrent_streams = 4;
    let gw = spawn_gateway(c).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&h2_frame(0x4, 0, 0, &[])).await.unwrap();

    // Frames from the gateway: (type, flags, stream, payload).
    let mut buf = Vec::new();
    let mut frames: Vec<(u8, u8, u32, Vec<u8>)> = Vec::new();
    let mut acked = false;
    let mut sent = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            frames.push((buf[3], buf[4], stream, buf[9..9 + len].to_vec()));
            buf.drain(..9 + len);
        }
        if !acked && frames.iter().any(|f| f.0 == 0x4 && f.1 & 1 == 0) {
            // The server's SETTINGS, acknowledged: its limits now apply.
            s.write_all(&h2_frame(0x4, 1, 0, &[])).await.unwrap();
            acked = true;
        }
        if acked && !sent {
            let mut burst = Vec::new();
            for i in 0..10u32 {
                burst.extend(h2_frame(0x1, 0x5, 2 * i + 1, &h2_get("/open/product/get")));
            }
            s.write_all(&burst).await.unwrap();
            sent = true;
        }
        let answered = frames.iter().filter(|f| f.0 == 0x1).count();
        let refused = frames
            .iter()
            .filter(|f| f.0 == 0x3 && f.3 == 7u32.to_be_bytes())
            .count();
        if sent && answered + refused >= 10 {
            break;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    let settings = frames
        .iter()
        .find(|f| f.0 == 0x4 && f.1 & 1 == 0)
        .expect("the gateway sent its SETTINGS");
    let advertised = settings.3.chunks(6).find_map(|p| {
        (u16::from_be_bytes([p[0], p[1]]) == 0x3)
            .then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
    });
    assert_eq!(advertised, Some(4), "SETTINGS_MAX_CONCURRENT_STREAMS");
    let refused: Vec<u32> = frames
        .iter()
        .filter(|f| f.0 == 0x3 && f.3 == 7u32.to_be_bytes())
        .map(|f| f.2)
        .collect();
    let answered: Vec<u32> = frames.iter().filter(|f| f.0 == 0x1).map(|f| f.2).collect();
    assert_eq!(
        refused.len(),
        6,
        "refused {refused:?}, answered {answered:?}"
    );
    assert_eq!(
        answered.len(),
        4,
        "refused {refused:?}, answered {answered:?}"
    );
    assert_eq!(upstream.received_requests().await.unwrap().len(), 4);
    drop(s);
    gw.stop().await;
}
