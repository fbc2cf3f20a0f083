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
//! A serving thread may batch instead ([`LogQueue::batch_on_this_thread`]):
//! its lines are formatted into one buffer of its own and handed over whole,
//! when the buffer reaches [`BATCH_BYTES`] or when the thread's ticker
//! ([`LogQueue::hand_over_every`]) finds lines older than its interval, as
//! nginx's `access_log … buffer= flush=` does. A line then costs neither an
//! allocation nor a trip through the channel. The bound stays in lines:
//! lines queued, batched or not, never exceed the queue's capacity, and a
//! batch that would pass it is dropped and its lines counted.
//!
//! The access log (stdout) and the diagnostics (stderr, through
//! [`crate::observe::diagnostics`]) each have one. Written here rather than taken from
//! `tracing-appender`: the access log needs this queue anyway (batched
//! writes, `flush`), and `non_blocking` would add a second queue
//! implementation with no hook to report a dropping episode.

use std::cell::RefCell;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
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

/// A batching thread hands its buffer over once it holds this much.
pub const BATCH_BYTES: usize = 32 * 1024;

enum Msg {
    Line(Vec<u8>),
    /// Whole lines, and how many.
    Batch(Vec<u8>, usize),
    Flush(SyncSender<()>),
}

struct Shared {
    stream: Stream,
    capacity: usize,
    dropped: AtomicU64,
    /// Lines handed over and not yet taken by the writer, batched or not.
    queued: AtomicUsize,
    /// Set by the first line dropped, cleared by the writer once it finds
    /// the queue empty.
    dropping: AtomicBool,
}

/// Handle to one queue and its writer; cheap to clone.
#[derive(Clone)]
pub struct LogQueue {
    tx: Sender<Msg>,
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
        // The bound is `queued`'s, counted in lines; the channel itself
        // takes memory only for what waits in it (a bounded one would hold
        // a slot for every line of the capacity from the start).
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            stream,
            capacity,
            dropped: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
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
        self.send(Msg::Line(line), 1)
    }

    /// Formats one line with `write` (which appends it, newline included)
    /// into this thread's batch when this thread batches into this queue;
    /// otherwise into a line of its own, queued at once. False if it was
    /// dropped (a batch's lines are counted when the batch is handed over).
    pub fn push_with(&self, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        let write = PENDING.with(|pending| {
            let Ok(mut pending) = pending.try_borrow_mut() else {
                return Some(write);
            };
            match pending.as_mut() {
                Some(batch) if Arc::ptr_eq(&batch.queue.shared, &self.shared) => {
                    write(&mut batch.buf);
                    batch.lines += 1;
                    if batch.buf.len() >= BATCH_BYTES {
                        batch.hand_over();
                    }
                    None
                }
                _ => Some(write),
            }
        });
        match write {
            None => true,
            Some(write) => {
                let mut line = Vec::with_capacity(320);
                write(&mut line);
                self.push(line)
            }
        }
    }

    /// From now on, lines this thread formats with
    /// [`push_with`](Self::push_with) go into a batch of its own. The
    /// thread must hand it over: a ticker ([`hand_over_every`](Self::hand_over_every))
    /// while it serves, and [`hand_over_this_thread`](Self::hand_over_this_thread)
    /// when it stops.
    pub fn batch_on_this_thread(&self) {
        Self::hand_over_this_thread();
        PENDING.with(|pending| {
            *pending.borrow_mut() = Some(Batch {
                queue: self.clone(),
                buf: Vec::with_capacity(BATCH_BYTES),
                lines: 0,
            });
        });
    }

    /// Hands this thread's batch to the writer, if it holds any line.
    pub fn hand_over_this_thread() {
        PENDING.with(|pending| {
            if let Ok(mut pending) = pending.try_borrow_mut()
                && let Some(batch) = pending.as_mut()
            {
                batch.hand_over();
            }
        });
    }

    /// Hands this thread's batch over every `interval`, for as long as the
    /// task runs; spawned on a batching thread's own runtime.
    pub async fn hand_over_every(interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            Self::hand_over_this_thread();
        }
    }

    /// Queues `msg`, holding `lines` lines, unless that would pass the
    /// capacity; else drops and counts them.
    fn send(&self, msg: Msg, lines: usize) -> bool {
        let s = &self.shared;
        if s.queued.fetch_add(lines, Ordering::AcqRel) + lines > s.capacity {
            s.queued.fetch_sub(lines, Ordering::AcqRel);
            self.note_dropped(lines);
            return false;
        }
        match self.tx.send(msg) {
            Ok(()) => true,
            // Disconnected: the writer is gone, which only a panic in it
            // can cause; the lines are lost all the same.
            Err(_) => {
                s.queued.fetch_sub(lines, Ordering::AcqRel);
                self.note_dropped(lines);
                false
            }
        }
    }

    fn note_dropped(&self, lines: usize) {
        let s = &self.shared;
        s.dropped.fetch_add(lines as u64, Ordering::Relaxed);
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
        if self.tx.send(Msg::Flush(done)).is_err() {
            return false;
        }
        wait.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

/// A batching thread's lines not yet handed over.
struct Batch {
    queue: LogQueue,
    buf: Vec<u8>,
    lines: usize,
}

impl Batch {
    fn hand_over(&mut self) {
        if self.lines == 0 {
            return;
        }
        let buf = std::mem::replace(&mut self.buf, Vec::with_capacity(BATCH_BYTES));
        self.queue.send(Msg::Batch(buf, self.lines), self.lines);
        self.lines = 0;
    }
}

thread_local! {
    static PENDING: RefCell<Option<Batch>> = const { RefCell::new(None) };
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
                    shared.queued.fetch_sub(1, Ordering::AcqRel);
                    batch.extend_from_slice(&line);
                    received = true;
                    if batch.len() >= 256 * 1024 {
                        write_batch(&mut out, &mut batch);
                    }
                }
                Ok(Msg::Batch(lines, count)) => {
                    shared.queued.fetch_sub(count, Ordering::AcqRel);
                    if batch.is_empty() {
                        batch = lines;
                    } else {
                        batch.extend_from_slice(&lines);
                    }
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

    fn text(buf: &Buf) -> String {
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn a_batching_thread_hands_over_whole_lines_by_size_or_when_told() {
        let buf = Buf::default();
        let (q, _) = LogQueue::spawn(STREAM, 100_000, Box::new(buf.clone()));
        let (q2, buf2) = (q.clone(), buf.clone());
        std::thread::spawn(move || {
            q2.batch_on_this_thread();
            for i in 0..10 {
                assert!(
                    q2.push_with(|out| out.extend_from_slice(format!("line {i}\n").as_bytes()))
                );
            }
            q2.flush();
            assert_eq!(text(&buf2), "", "the lines wait in the thread's batch");
            LogQueue::hand_over_this_thread();
            q2.flush();
            let expected: String = (0..10).map(|i| format!("line {i}\n")).collect();
            assert_eq!(text(&buf2), expected);
            // A batch that reaches BATCH_BYTES goes without being told.
            let long = vec![b'x'; 1023];
            let lines = BATCH_BYTES / 1024;
            for _ in 0..lines {
                q2.push_with(|out| {
                    out.extend_from_slice(&long);
                    out.push(b'\n');
                });
            }
            q2.flush();
            assert_eq!(text(&buf2).len(), expected.len() + lines * 1024);
        })
        .join()
        .unwrap();
        assert_eq!(q.dropped(), 0);
    }

    #[test]
    fn a_batch_that_would_pass_the_capacity_is_dropped_and_its_lines_counted() {
        let (q, _release) = stuck(4);
        let q2 = q.clone();
        std::thread::spawn(move || {
            q2.batch_on_this_thread();
            for _ in 0..3 {
                q2.push_with(|out| out.extend_from_slice(b"kept\n"));
            }
            LogQueue::hand_over_this_thread();
            for _ in 0..2 {
                q2.push_with(|out| out.extend_from_slice(b"lost\n"));
            }
            LogQueue::hand_over_this_thread();
            // One single line still fits; the bound is in lines.
            assert!(q2.push(b"single\n".to_vec()));
            assert!(!q2.push(b"over\n".to_vec()));
        })
        .join()
        .unwrap();
        assert_eq!(q.dropped(), 3, "the batch of 2 and the line over the bound");
    }

    #[test]
    fn other_threads_and_other_queues_get_each_line_at_once() {
        let (a_buf, b_buf) = (Buf::default(), Buf::default());
        let (a, _) = LogQueue::spawn(STREAM, 1024, Box::new(a_buf.clone()));
        let (b, _) = LogQueue::spawn(STREAM, 1024, Box::new(b_buf.clone()));
        let (a2, b2) = (a.clone(), b.clone());
        std::thread::spawn(move || {
            a2.batch_on_this_thread();
            b2.push_with(|out| out.extend_from_slice(b"to b\n"));
            b2.flush();
        })
        .join()
        .unwrap();
        a.push_with(|out| out.extend_from_slice(b"to a, unbatched thread\n"));
        a.flush();
        assert_eq!(text(&b_buf), "to b\n");
        assert_eq!(text(&a_buf), "to a, unbatched thread\n");
    }

    #[test]
    fn the_ticker_hands_a_batch_over_within_its_interval() {
        let buf = Buf::default();
        let (q, _) = LogQueue::spawn(STREAM, 1024, Box::new(buf.clone()));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        q.batch_on_this_thread();
        runtime.block_on(async {
            let ticker = tokio::spawn(LogQueue::hand_over_every(Duration::from_millis(5)));
            q.push_with(|out| out.extend_from_slice(b"ticked\n"));
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                q.flush();
                if !text(&buf).is_empty() {
                    break;
                }
            }
            ticker.abort();
        });
        assert_eq!(text(&buf), "ticked\n");
        PENDING.with(|p| *p.borrow_mut() = None);
    }
}
