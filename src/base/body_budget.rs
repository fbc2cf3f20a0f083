//! How much memory request bodies may hold while they are read, for the
//! whole process.
//!
//! Every request body the gateway reads whole (a call's body up to
//! `server.buffer_body_bytes`, a push's body) holds its bytes against one
//! [`BodyBudget`] of `server.max_buffered_body_bytes` for as long as they
//! are in memory: taken as they arrive (at once for a declared
//! `Content-Length`), given back when its [`Held`] guard is dropped. A
//! body that would pass the budget is refused (503 `overloaded`) and none
//! of it is kept.
//!
//! Two shares keep one source from taking all of it:
//!
//! * the bodies of one connection hold at most a quarter of the budget
//!   ([`ConnectionBodies`]): one connection with a hundred HTTP/2 streams
//!   leaves three quarters to the others (Envoy bounds each connection's
//!   buffers the same way, `per_connection_buffer_limit_bytes`);
//! * pushes hold at most a quarter together: a push is read before its
//!   signature can be checked, so anyone who reaches the push path can send
//!   one, and a flood of them must leave the rest to callers who
//!   authenticated.
//!
//! A connection also reads one push body at a time: a second push arriving
//! on an HTTP/2 connection while one is read is refused at once, before a
//! byte of its body is read (the provider pushes one message per request
//! and retries).
//!
//! Refusals are counted by reader: [`Reader::Call`] (exported with
//! `listener="gateway"`) and [`Reader::Push`] (`listener="callbacks"`,
//! whichever listener the push came on).
//!
//! ```
//! use pandagate::body_budget::{BodyBudget, Reader};
//!
//! let budget = BodyBudget::new(4096);
//! let mut body = budget.hold(Reader::Call, None);
//! body.grow_to(1000).unwrap();
//! assert_eq!(budget.used(), 1000);
//! // A connection-less body may take up to the whole budget, no more.
//! let mut other = budget.hold(Reader::Call, None);
//! assert!(other.grow_to(4000).is_err());
//! drop(body);
//! assert_eq!(budget.used(), 0);
//! assert_eq!(budget.refused(Reader::Call), 1);
//! ```

use crate::base::families::{self, Described, DescriptorEncoder};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The part of the budget one connection's bodies, and all pushes
/// together, may hold: one over `SHARE_DIVISOR`.
pub const SHARE_DIVISOR: u64 = 4;

/// A body that would pass the budget (or its share of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request bodies being read hold all of server.max_buffered_body_bytes")]
pub struct Overloaded;

/// Whose body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// A call to be forwarded.
    Call,
    /// A pushed message, from either listener.
    Push,
}

impl Reader {
    /// The `listener` label of its refusals.
    pub fn label(self) -> &'static str {
        match self {
            Reader::Call => "gateway",
            Reader::Push => "callbacks",
        }
    }
}

/// The process's budget; one for all serving threads and every config.
#[derive(Debug)]
pub struct BodyBudget {
    limit: AtomicU64,
    used: AtomicU64,
    /// Of `used`, what pushes hold.
    pushes: AtomicU64,
    refused_calls: AtomicU64,
    refused_pushes: AtomicU64,
}

impl BodyBudget {
    pub fn new(limit: u64) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
            refused_calls: AtomicU64::new(0),
            refused_pushes: AtomicU64::new(0),
        })
    }

    /// A new limit (a reloaded config). Bodies already held keep their
    /// bytes; new ones are measured against the new limit.
    pub fn resize(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bodies refused so far.
    pub fn refused(&self, reader: Reader) -> u64 {
        match reader {
            Reader::Call => self.refused_calls.load(Ordering::Relaxed),
            Reader::Push => self.refused_pushes.load(Ordering::Relaxed),
        }
    }

    /// Bytes held, and bodies refused by reader (`listener="gateway"` for
    /// calls, `"callbacks"` for pushes on either listener).
    pub fn describe(&self, e: &mut DescriptorEncoder) -> Described {
        families::bytes_gauge(
            e,
            "body_budget_held_bytes",
            "Bytes of request bodies being read or kept for replays, against server.max_buffered_body_bytes.",
            self.used(),
        )?;
        families::per_listener(
            e,
            "body_budget_rejected",
            "Request bodies refused (503 overloaded) because they would pass the body budget or a share of it, by reader: gateway (calls) or callbacks (pushes).",
            families::Kind::Counter,
            [Reader::Call, Reader::Push].map(|r| (r.label(), self.refused(r))),
        )
    }

    /// A hold of 0 bytes for one body of `reader`, arrived on `connection`
    /// (`None`: not served by `crate::net::server`, no connection share).
    pub fn hold(
        self: &Arc<Self>,
        reader: Reader,
        connection: Option<Arc<ConnectionBodies>>,
    ) -> Held {
        Held {
            budget: self.clone(),
            connection,
            reader,
            bytes: 0,
        }
    }

    /// Counts a refusal made outside a hold (a second push on a connection).
    pub fn count_refusal(&self, reader: Reader) {
        match reader {
            Reader::Call => &self.refused_calls,
            Reader::Push => &self.refused_pushes,
        }
        .fetch_add(1, Ordering::Relaxed);
    }
}

/// Adds `n` to `counter` if the sum stays within `limit`.
fn take(counter: &AtomicU64, n: u64, limit: u64) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            held.checked_add(n).filter(|&total| total <= limit)
        })
        .is_ok()
}

fn give(counter: &AtomicU64, n: u64) {
    counter.fetch_sub(n, Ordering::AcqRel);
}

/// What the bodies of one connection hold; made by the accept loop for
/// each connection and handed to its requests as an extension.
#[derive(Debug, Default)]
pub struct ConnectionBodies {
    held: AtomicU64,
    pushing: AtomicBool,
}

impl ConnectionBodies {
    pub fn new() -> Arc<ConnectionBodies> {
        Arc::default()
    }

    /// Bytes this connection's bodies hold now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// The connection's turn to read a push body, or `None` while another
    /// push on it is being read.
    pub fn push_turn(self: &Arc<Self>) -> Option<PushTurn> {
        (!self.pushing.swap(true, Ordering::AcqRel)).then(|| PushTurn(self.clone()))
    }
}

/// One push being read on a connection; the next may come once dropped.
#[derive(Debug)]
pub struct PushTurn(Arc<ConnectionBodies>);

impl Drop for PushTurn {
    fn drop(&mut self) {
        self.0.pushing.store(false, Ordering::Release);
    }
}

/// One body's bytes held against the budget (and its shares); given back
/// when dropped.
#[must_use = "the bytes are given back when the hold is dropped"]
#[derive(Debug)]
pub struct Held {
    budget: Arc<BodyBudget>,
    connection: Option<Arc<ConnectionBodies>>,
    reader: Reader,
    bytes: u64,
}

impl Held {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Holds `total` bytes in all (no change when it holds that many
    /// already); refused, and counted, when the budget or a share would be
    /// passed, and then it holds what it held before.
    pub fn grow_to(&mut self, total: u64) -> Result<(), Overloaded> {
        let Some(more) = total.checked_sub(self.bytes).filter(|&n| n > 0) else {
            return Ok(());
        };
        let limit = self.budget.limit();
        let share = limit / SHARE_DIVISOR;
        let budget = &*self.budget;
        if !take(&budget.used, more, limit) {
            return self.refuse();
        }
        if self.reader == Reader::Push && !take(&budget.pushes, more, share) {
            give(&budget.used, more);
            return self.refuse();
        }
        if let Some(connection) = &self.connection
            && !take(&connection.held, more, share)
        {
            give(&budget.used, more);
            if self.reader == Reader::Push {
                give(&budget.pushes, more);
            }
            return self.refuse();
        }
        self.bytes = total;
        Ok(())
    }

    fn refuse(&self) -> Result<(), Overloaded> {
        self.budget.count_refusal(self.reader);
        Err(Overloaded)
    }

    /// Moves what is held into a new hold, leaving this one empty.
    pub fn take(&mut self) -> Held {
        Held {
            budget: self.budget.clone(),
            connection: self.connection.clone(),
            reader: self.reader,
            bytes: std::mem::take(&mut self.bytes),
        }
    }

    /// Gives back everything held (the bytes were freed).
    pub fn release(&mut self) {
        let n = std::mem::take(&mut self.bytes);
        if n == 0 {
            return;
        }
        give(&self.budget.used, n);
        if self.reader == Reader::Push {
            give(&self.budget.pushes, n);
        }
        if let Some(connection) = &self.connection {
            give(&connection.held, n);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_taken_as_a_body_grows_and_given_back_when_dropped() {
        let budget = BodyBudget::new(1000);
        let mut a = budget.hold(Reader::Call, None);
        a.grow_to(300).unwrap();
        a.grow_to(600).unwrap();
        a.grow_to(500).unwrap();
        assert_eq!((a.bytes(), budget.used()), (600, 600));
        let mut b = budget.hold(Reader::Call, None);
        assert_eq!(b.grow_to(401), Err(Overloaded));
        assert_eq!((b.bytes(), budget.used()), (0, 600));
        b.grow_to(400).unwrap();
        drop(a);
        assert_eq!(budget.used(), 400);
        let mut moved = b.take();
        assert_eq!((b.bytes(), moved.bytes(), budget.used()), (0, 400, 400));
        moved.release();
        assert_eq!(budget.used(), 0);
        drop((b, moved));
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.refused(Reader::Call), 1);
        assert_eq!(budget.refused(Reader::Push), 0);
    }

    #[test]
    fn one_connection_holds_at_most_a_quarter() {
        let budget = BodyBudget::new(4000);
        let (one, two) = (ConnectionBodies::new(), ConnectionBodies::new());
        let mut holds = Vec::new();
        for _ in 0..10 {
            let mut h = budget.hold(Reader::Call, Some(one.clone()));
            if h.grow_to(300).is_ok() {
                holds.push(h);
            }
        }
        assert_eq!((holds.len(), one.held(), budget.used()), (3, 900, 900));
        let mut other = budget.hold(Reader::Call, Some(two.clone()));
        other.grow_to(1000).unwrap();
        assert_eq!(budget.used(), 1900);
        assert_eq!(budget.refused(Reader::Call), 7);
        drop(holds);
        drop(other);
        assert_eq!((one.held(), two.held(), budget.used()), (0, 0, 0));
    }

    #[test]
    fn pushes_hold_at_most_a_quarter_together() {
        let budget = BodyBudget::new(4000);
        let mut pushes = Vec::new();
        for _ in 0..5 {
            let mut h = budget.hold(Reader::Push, Some(ConnectionBodies::new()));
            if h.grow_to(400).is_ok() {
                pushes.push(h);
            }
        }
        assert_eq!((pushes.len(), budget.used()), (2, 800));
        assert_eq!(budget.refused(Reader::Push), 3);
        // Calls still have the rest.
        let mut call = budget.hold(Reader::Call, None);
        call.grow_to(3200).unwrap();
        drop(pushes);
        let mut push = budget.hold(Reader::Push, None);
        push.grow_to(800).unwrap();
        assert_eq!(budget.used(), 4000);
    }

    #[test]
    fn a_refusal_by_a_share_gives_back_what_the_budget_took() {
        let budget = BodyBudget::new(4000);
        let conn = ConnectionBodies::new();
        let mut a = budget.hold(Reader::Push, Some(conn.clone()));
        assert!(a.grow_to(1001).is_err());
        assert_eq!((budget.used(), conn.held()), (0, 0));
        let mut b = budget.hold(Reader::Call, Some(conn.clone()));
        b.grow_to(1000).unwrap();
        let mut c = budget.hold(Reader::Push, Some(conn.clone()));
        assert!(c.grow_to(1).is_err(), "the connection's share is full");
        assert_eq!((budget.used(), conn.held()), (1000, 1000));
    }

    #[test]
    fn a_smaller_limit_applies_to_new_bytes_only() {
        let budget = BodyBudget::new(1000);
        let mut a = budget.hold(Reader::Call, None);
        a.grow_to(800).unwrap();
        budget.resize(500);
        let mut b = budget.hold(Reader::Call, None);
        assert!(b.grow_to(1).is_err());
        drop(a);
        b.grow_to(500).unwrap();
        assert_eq!(budget.limit(), 500);
    }

    #[test]
    fn a_connection_reads_one_push_at_a_time() {
        let conn = ConnectionBodies::new();
        let turn = conn.push_turn().expect("the first push");
        assert!(conn.push_turn().is_none());
        drop(turn);
        assert!(conn.push_turn().is_some());
    }
}
