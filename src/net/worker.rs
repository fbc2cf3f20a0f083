//! Which serving thread the current code runs on.
//!
//! The process serves calls on `server.worker_threads` threads, each with
//! its own single-threaded runtime and listeners (see [`crate::process::app`]).
//! Whatever a worker keeps for itself, such as its upstream connection
//! pool, is found through [`index`]; code running anywhere else (the main
//! thread, a test's runtime) is worker 0.

use std::cell::Cell;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The serving thread this code runs on; 0 outside the workers.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Marks the current thread as worker `index`; called once, as a worker
/// thread starts.
pub fn enter(index: usize) {
    INDEX.with(|i| i.set(index));
}

/// How many serving threads `configured` asks for: 0 means one per CPU the
/// process may use (the standard library counts affinity masks and cgroup
/// CPU quotas).
pub fn count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_per_thread() {
        assert_eq!(index(), 0);
        std::thread::spawn(|| {
            enter(3);
            assert_eq!(index(), 3);
        })
        .join()
        .unwrap();
        assert_eq!(index(), 0, "another thread's index does not leak");
    }

    #[test]
    fn zero_means_the_cpus_the_process_may_use() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(count(0), cpus);
        assert_eq!(count(1), 1);
        assert_eq!(count(5), 5);
    }
}
