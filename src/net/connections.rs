//! Open connections of one listener, against its cap.
//!
//! The accept loop asks for a [`Slot`] for every connection it accepts; over
//! `server.max_connections` it gets none, and the connection is closed at
//! once and counted. The counts are read by `/metrics` as
//! `pandagate_connections_open{listener}` and
//! `pandagate_connections_rejected_total{listener}`.

use crate::base::families::{self, Described, DescriptorEncoder};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// One listener's connection counts; shared by its accept loop, its
/// connection tasks and the metrics exporter.
#[derive(Debug)]
pub struct Connections {
    /// The listener's name in metrics: `gateway`, `callbacks`, `admin`.
    pub listener: &'static str,
    max: usize,
    open: AtomicUsize,
    rejected: AtomicU64,
}

impl Connections {
    pub fn new(listener: &'static str, max: usize) -> Arc<Connections> {
        Arc::new(Connections {
            listener,
            max,
            open: AtomicUsize::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    /// A slot for one more connection, or `None` (counted) at the cap.
    pub fn admit(self: &Arc<Self>) -> Option<Slot> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Some(Slot(self.clone())),
            Err(_) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// `connections_open` and `connections_rejected`, a series per listener.
pub fn describe(listeners: &[Arc<Connections>], e: &mut DescriptorEncoder) -> Described {
    if listeners.is_empty() {
        return Ok(());
    }
    families::per_listener(
        e,
        "connections_open",
        "Open connections, per listener.",
        families::Kind::Gauge,
        listeners.iter().map(|c| (c.listener, c.open() as u64)),
    )?;
    families::per_listener(
        e,
        "connections_rejected",
        "Connections closed at once because the listener had max_connections open.",
        families::Kind::Counter,
        listeners.iter().map(|c| (c.listener, c.rejected())),
    )
}

/// One open connection; its place is given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_over_the_cap_and_frees_places_when_connections_leave() {
        let c = Connections::new("test", 2);
        let a = c.admit().expect("first");
        let b = c.admit().expect("second");
        assert!(c.admit().is_none(), "third is over the cap");
        assert_eq!((c.open(), c.rejected()), (2, 1));
        drop(a);
        let again = c.admit().expect("a place was given back");
        assert_eq!((c.open(), c.rejected()), (2, 1));
        drop((b, again));
        assert_eq!(c.open(), 0);
    }
}
