//! The real binary with a log that nobody reads: once the pipe (64 KiB on
//! Linux) and the queue (`log.queue_lines`) are full, lines are dropped and
//! counted, and calls are still answered in bounded time.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::binary::Running;
use tokio::io::{BufReader, Lines};
use tokio::process::ChildStderr;
use tokio::sync::mpsc::UnboundedReceiver;
use wiremock::ResponseTemplate;

/// Big enough that the writer, polling every 1 to 20 ms, never falls this
/// far behind sequential calls while its output is still being taken;
/// small enough to fill in a few hundred calls.
const QUEUE_LINES: usize = 256;

/// The most calls to make while waiting for the first line dropped: far more
/// than a pipe and the queue can hold.
const MAX_CALLS: usize = 5_000;

/// How long any one call may take.
const CALL_BOUND: Duration = Duration::from_secs(5);

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("pandagate.toml");
    std::fs::write(
        &path,
        format!("[log]\nqueue_lines = {QUEUE_LINES}\n{extra}"),
    )
    .unwrap();
    path
}

/// `name`'s value on the admin listener's `/metrics`; 0 if absent (the
/// loop that waits for it to grow then fails on its bound).
async fn metric(admin: &str, name: &str) -> u64 {
    let answer = tokio::time::timeout(CALL_BOUND, support::get(&format!("http://{admin}/metrics")))
        .await
        .expect("/metrics answered in time");
    String::from_utf8_lossy(&answer.body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// Makes `n` more calls one after the other, each within `CALL_BOUND`,
/// counting them in `made`; returns the slowest one's time.
async fn answered_in_time(
    made: &mut usize,
    n: usize,
    call: impl AsyncFn() -> u16,
    expected: u16,
) -> Duration {
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let start = Instant::now();
        let status = tokio::time::timeout(CALL_BOUND, call())
            .await
            .unwrap_or_else(|_| panic!("call {made} not answered within {CALL_BOUND:?}"));
        assert_eq!(status, expected);
        slowest = slowest.max(start.elapsed());
        *made += 1;
    }
    slowest
}

/// From now on, reads every diagnostic line, until stderr closes.
fn keep_reading(mut stderr: Lines<BufReader<ChildStderr>>) -> UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Collects lines from `rx` into `seen` until one's message satisfies
/// `until`, or for at most 10 s; stderr closing ends it too.
async fn read_until(
    rx: &mut UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    until: impl Fn(&str) -> bool,
) {
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = rx.recv().await {
            let done = message(&line).is_some_and(|m| until(&m));
            seen.push(line);
            if done {
                return;
            }
        }
    })
    .await;
}

fn message(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v["message"].as_str().map(str::to_owned)
}

/// Sends SIGTERM and expects exit status 0 within 20 s.
async fn terminate(child: &mut tokio::process::Child) {
    support::os::signal(child.id().unwrap(), "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within 20 s of SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_never_wait_for_an_access_log_nobody_reads() {
    let upstream = support::upstream_answering(ResponseTemplate::new(200).set_body_raw(
        support::provider_body("rid-unread", 200, "ok"),
        "application/json",
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let Running {
        mut child,
        stderr,
        gateway,
        admin,
        ..
    } = support::binary::launch_stdout_unread(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", "sk-unread-logs"),
            ("PANDAGATE_UPSTREAM", &upstream.uri()),
        ],
    )
    .await;
    // stderr is read: the warning goes there.
    let mut diagnostics = keep_reading(stderr);

    let url = format!("http://{gateway}/open/product/get");
    let call = async || support::get(&url).await.status.as_u16();
    let (mut calls, mut slowest, mut dropped) = (0, Duration::ZERO, 0);
    while dropped == 0 {
        assert!(
            calls < MAX_CALLS,
            "no access-log line dropped after {calls} calls"
        );
        slowest = slowest.max(answered_in_time(&mut calls, 50, call, 200).await);
        dropped = metric(&admin, "pandagate_access_log_dropped_total").await;
    }
    let calls_until_dropping = calls;
    // From now on every line is dropped, and calls go on being answered.
    slowest = slowest.max(answered_in_time(&mut calls, 100, call, 200).await);
    let deadline = Instant::now() + CALL_BOUND;
    let mut now_dropped = dropped;
    while now_dropped < dropped + 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        now_dropped = metric(&admin, "pandagate_access_log_dropped_total").await;
    }
    assert!(
        now_dropped >= dropped + 100,
        "{now_dropped} < {dropped} + 100"
    );
    eprintln!(
        "{calls_until_dropping} calls until a line was dropped, {calls} in all; slowest {slowest:?}"
    );

    // SIGTERM: it exits although stdout still takes nothing.
    terminate(&mut child).await;
    let mut lines = Vec::new();
    read_until(&mut diagnostics, &mut lines, |_| false).await;
    let messages: Vec<String> = lines.iter().filter_map(|l| message(l)).collect();
    let warnings = messages
        .iter()
        .filter(|m| m.starts_with("access log queue full: dropping lines"))
        .count();
    assert_eq!(warnings, 1, "one warning when dropping starts: {lines:#?}");
    assert!(
        messages.iter().any(|m| m == "exiting"),
        "the last diagnostic is written: {lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_never_wait_for_diagnostics_nobody_reads() {
    const SECRET: &str = "sk-unread-diagnostics";
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[callbacks]\nstore = \"{}\"\n[[callbacks.subscribers]]\nurl = \"http://{}/events\"\n",
            dir.path().join("store").display(),
            support::dead_address(),
        ),
    );
    let Running {
        mut child,
        stderr,
        gateway,
        admin,
        ..
    } = support::launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", SECRET),
            ("PANDAGATE_UPSTREAM", "http://127.0.0.1:9"),
        ],
    )
    .await;
    // stderr was read up to "listening" and now is not: each forged push
    // below logs a "callback rejected" warning.
    let forged = async || support::push_signed(&gateway, "not-the-secret", "F1").await;
    let (mut calls, mut slowest, mut dropped) = (0, Duration::ZERO, 0);
    while dropped == 0 {
        assert!(
            calls < MAX_CALLS,
            "no diagnostic dropped after {calls} pushes"
        );
        slowest = slowest.max(answered_in_time(&mut calls, 50, forged, 401).await);
        dropped = metric(&admin, "pandagate_diagnostics_dropped_total").await;
    }
    let calls_until_dropping = calls;
    slowest = slowest.max(answered_in_time(&mut calls, 100, forged, 401).await);
    let now_dropped = metric(&admin, "pandagate_diagnostics_dropped_total").await;
    assert!(
        now_dropped >= dropped + 100,
        "{now_dropped} < {dropped} + 100"
    );
    eprintln!(
        "{calls_until_dropping} pushes until a diagnostic was dropped, {calls} in all; slowest {slowest:?}"
    );

    // Read again, stderr gets the queued lines and then how many were lost.
    let mut diagnostics = keep_reading(stderr);
    let mut lines = Vec::new();
    let report = |m: &str| m.starts_with("diagnostics: ") && m.contains(" lines were dropped");
    read_until(&mut diagnostics, &mut lines, report).await;
    let reported: Vec<u64> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(report))
        .filter_map(|v| v["dropped"].as_u64())
        .collect();
    assert_eq!(
        reported,
        [now_dropped],
        "one report with the count: {lines:#?}"
    );
    let rejected = lines
        .iter()
        .filter(|l| message(l).as_deref() == Some("callback rejected"))
        .count();
    assert!(rejected > 0, "lines queued before the drops are written");

    terminate(&mut child).await;
    read_until(&mut diagnostics, &mut lines, |_| false).await;
    assert!(
        lines
            .iter()
            .any(|l| message(l).as_deref() == Some("exiting")),
        "the last diagnostic is written: {lines:#?}"
    );
}
