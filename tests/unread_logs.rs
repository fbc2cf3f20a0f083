//! The real binary with a log that nobody reads: once the pipe (64 KiB on
//! Linux) and the queue (`log.queue_lines`) are full, lines are dropped and
//! counted, and calls are still answered in bounded time.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::Running;
use tokio::io::{BufReader, Lines};
use tokio::process::ChildStderr;
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

/// Collects every diagnostic line until stderr closes.
fn read_all(mut stderr: Lines<BufReader<ChildStderr>>) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            lines.push(line);
        }
        lines
    })
}

fn messages(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["message"].as_str().map(str::to_owned))
        .collect()
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
    } = support::launch_stdout_unread(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", "ak"),
            ("PANDAPON_ACCESS_SECRET", "sk-unread-logs"),
            ("PANDAGATE_UPSTREAM", &upstream.uri()),
        ],
    )
    .await;
    // stderr is read: the warning goes there.
    let diagnostics = read_all(stderr);

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
    support::signal(child.id().unwrap(), "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within 20 s of SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let lines = tokio::time::timeout(Duration::from_secs(5), diagnostics)
        .await
        .expect("stderr closes at exit")
        .unwrap();
    let messages = messages(&lines);
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
