//! A bounded queue of log lines and the one thread that writes them out.
//!
//! Whoever logs formats a whole line first and hands it over without
//! waiting: when the output's reader falls behind, or stops reading and
//! leaves the writer blocked on a full pipe, the queue fills and further
//! lines are dropped and counted instead of stalling the caller. Each line
//! is queued whole and written whole by the one writer, so lines are never
//! torn or interleaved.
//!
//! When dropping starts, one warning goes to the diagnostics (except for
//! the diagnostics' own queue, which is the one that is full); when the
//! writer has emptied the queue again, one warning says how many lines were
//! lost. Dropping starts when the queue is full and ends only when the
//! writer has caught up, so a reader hovering at the limit cannot produce a
//! warning per line.
//!
//! The access log (stdout) and the diagnostics (stderr, through
//! [`crate::observe::diagnostics`]) each have one. Written here rather than taken from
//! `tracing-appender`: the access log needs this queue anyway (batched
//! writes, `flush`), and `non_blocking` would add a second queue
//! implementation with no hook to report a dropping episode.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What a queue carries and where to, for the messages about its drops.
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    /// E.g. `"access log"`; also names the writer thread.
    pub name: &'static str,
    /// E.g. `"stdout"`.
    pub output: &'static str,
    /// Warn through `tracing` when lines start being dropped. Off for the
    /// diagnostics' own queue, where that warning could only be dropped too.
    pub warn_when_dropping: bool,
}

enum Msg {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

struct Shared {
    stream: Stream,
    capacity: usize,
    dropped: AtomicU64,
    /// Set by the first line dropped, cleared by the writer once it finds
    /// the queue empty.
    dropping: AtomicBool,
}

/// Handle to one queue and its writer; cheap to clone.
#[derive(Clone)]
pub struct LogQueue {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogQueue")
            .field("stream", &self.shared.stream.name)
            .field("capacity", &self.shared.capacity)
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl LogQueue {
    /// Starts the writer thread; up to `capacity` lines may wait for it.
    /// It ends, after writing everything queued, when the last handle is
    /// dropped.
    pub fn spawn(
        stream: Stream,
        capacity: usize,
        out: Box<dyn Write + Send>,
    ) -> (LogQueue, JoinHandle<()>) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let shared = Arc::new(Shared {
            stream,
            capacity,
            dropped: AtomicU64::new(0),
            dropping: AtomicBool::new(false),
        });
        let handle = std::thread::Builder::new()
            .name(stream.name.replace(' ', "-"))
            .spawn({
                let shared = shared.clone();
                move || write_loop(rx, out, &shared)
            })
            .expect("spawn log writer thread");
        (LogQueue { tx, shared }, handle)
    }

    /// Queues one whole line (newline included) without waiting; false if
    /// it was dropped.
    pub fn push(&self, line: Vec<u8>) -> bool {
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => true,
            // Disconnected: the writer is gone, which only a panic in it
            // can cause; the line is lost all the same.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.note_dropped();
                false
            }
        }
    }

    fn note_dropped(&self) {
        let s = &self.shared;
        s.dropped.fetch_add(1, Ordering::Relaxed);
        let started =
            !s.dropping.load(Ordering::Relaxed) && !s.dropping.swap(true, Ordering::Relaxed);
        if started && s.stream.warn_when_dropping {
            tracing::warn!(
                queue_lines = s.capacity,
                "{} queue full: dropping lines until {} is read again",
                s.stream.name,
                s.stream.output,
            );
        }
    }

    /// Lines dropped since the start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line queued so far has been written, however long
    /// the reader takes: for tests and tools, not for exit paths (see
    /// [`flush_within`](Self::flush_within)).
    pub fn flush(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// Waits until every line queued so far has been written, or `within`
    /// has passed; true if they were.
    pub fn flush_within(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let (done, wait) = mpsc::sync_channel(1);
        let mut msg = Msg::Flush(done);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        wait.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

/// The writer polls instead of blocking on the channel, so that sending a
/// line never has to wake a sleeping thread (a futex call and, on a busy
/// 2-core box, a context switch per line). A line reaches the output at
/// most `MAX_IDLE` after it was queued, unless the output blocks.
fn write_loop(rx: Receiver<Msg>, mut out: Box<dyn Write + Send>, shared: &Shared) {
    const MIN_IDLE: Duration = Duration::from_millis(1);
    const MAX_IDLE: Duration = Duration::from_millis(20);
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut waiting = Vec::new();
    let mut idle = MIN_IDLE;
    let mut reported = 0;
    loop {
        let mut open = true;
        let mut received = false;
        loop {
            match rx.try_recv() {
                Ok(Msg::Line(line)) => {
                    batch.extend_from_slice(&line);
                    received = true;
                    if batch.len() >= 256 * 1024 {
                        write_batch(&mut out, &mut batch);
                    }
                }
                Ok(Msg::Flush(done)) => waiting.push(done),
                Err(TryRecvError::Empty) => {
                    // The report may have gone into this very queue: take
                    // it along, ahead of any flush waiting for this round.
                    if report_caught_up(shared, &mut reported) {
                        continue;
                    }
                    break;
                }
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        write_batch(&mut out, &mut batch);
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
        if !open {
            return;
        }
        idle = if received {
            MIN_IDLE
        } else {
            (idle * 2).min(MAX_IDLE)
        };
        std::thread::sleep(idle);
    }
}

/// The queue is empty: if lines were being dropped, that has ended; says
/// how many were lost since the last report (`reported` counts those
/// already told). True if it said so.
fn report_caught_up(shared: &Shared, reported: &mut u64) -> bool {
    if !shared.dropping.swap(false, Ordering::Relaxed) {
        return false;
    }
    let total = shared.dropped.load(Ordering::Relaxed);
    let lost = total - *reported;
    *reported = total;
    tracing::warn!(
        dropped = lost,
        "{}: {lost} lines were dropped while {} was not read; writing again",
        shared.stream.name,
        shared.stream.output,
    );
    true
}

fn write_batch(out: &mut Box<dyn Write + Send>, batch: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    // A failing output cannot be reported anywhere better; keep serving.
    let _ = out.write_all(batch).and_then(|_| out.flush());
    batch.clear();
}

/// An output that keeps what is written, for tests of what writes logs.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct Buf(pub Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Buf;
    use super::*;

    const STREAM: Stream = Stream {
        name: "test log",
        output: "the test",
        warn_when_dropping: true,
    };

    /// An output whose reader never reads: the first write announces itself
    /// on `entered` and then blocks until `release` is dropped.
    struct Stuck {
        entered: Option<SyncSender<()>>,
        release: Receiver<()>,
    }
    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            if let Some(entered) = self.entered.take() {
                let _ = entered.send(());
            }
            let _ = self.release.recv();
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn stuck(capacity: usize) -> (LogQueue, SyncSender<()>) {
        let (entered, is_stuck) = mpsc::sync_channel(1);
        let (release, released) = mpsc::sync_channel(1);
        let out = Stuck {
            entered: Some(entered),
            release: released,
        };
        let (q, _) = LogQueue::spawn(STREAM, capacity, Box::new(out));
        assert!(q.push(b"first\n".to_vec()));
        is_stuck
            .recv_timeout(Duration::from_secs(5))
            .expect("the writer reaches its output");
        (q, release)
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (q, _release) = stuck(4);
        let start = Instant::now();
        let accepted = (0..100)
            .filter(|i| q.push(format!("{i}\n").into_bytes()))
            .count();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(accepted, 4, "the queue holds 4 lines");
        assert_eq!(q.dropped(), 96);
        assert!(
            !q.flush_within(Duration::from_millis(50)),
            "nothing can be written"
        );
    }

    #[test]
    fn lines_arrive_whole_and_in_order_and_flush_waits_for_them() {
        let buf = Buf::default();
        let (q, _) = LogQueue::spawn(STREAM, 1024, Box::new(buf.clone()));
        for i in 0..500 {
            assert!(q.push(format!("line {i}\n").into_bytes()));
        }
        assert!(q.flush_within(Duration::from_secs(5)));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let expected: String = (0..500).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, expected);
        assert_eq!(q.dropped(), 0);
    }

    #[test]
    fn dropping_ends_when_the_writer_has_caught_up() {
        let (q, release) = stuck(2);
        for _ in 0..10 {
            q.push(b"x\n".to_vec());
        }
        assert!(q.shared.dropping.load(Ordering::Relaxed));
        drop(release);
        assert!(q.flush_within(Duration::from_secs(5)));
        assert!(
            !q.shared.dropping.load(Ordering::Relaxed),
            "a new episode may warn again"
        );
        assert_eq!(q.dropped(), 8);
    }
}
