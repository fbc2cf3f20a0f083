//! Local buckets: GCRA state from `governor` on tokio time, each with a
//! fair, bounded queue of callers waiting for a slot.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::RateLimited;
use crate::config::Rate;

/// `governor`'s clock on tokio time, so paused-time tests drive it.
#[derive(Clone, Debug)]
struct TokioClock(Instant);

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

type Gcra = governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// A local bucket: GCRA state plus a fair queue of waiters.
#[derive(Debug)]
struct LocalBucket {
    rate: Rate,
    gcra: Gcra,
    clock: TokioClock,
    /// One permit: the head of the queue holds it while it waits for a slot.
    turnstile: Semaphore,
    waiting: AtomicUsize,
}

impl LocalBucket {
    fn new(rate: Rate) -> LocalBucket {
        let clock = TokioClock(Instant::now());
        let quota = governor::Quota::with_period(rate.interval())
            .expect("an interval is at least 1 ns")
            .allow_burst(NonZeroU32::new(rate.burst().max(1)).expect("at least 1"));
        LocalBucket {
            rate,
            gcra: governor::RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
            turnstile: Semaphore::new(1),
            waiting: AtomicUsize::new(0),
        }
    }

    fn refused(&self, retry_after: Duration) -> RateLimited {
        RateLimited {
            retry_after,
            limit: self.rate.per_second(),
        }
    }

    /// The wait for the next slot, or `None` if one is free now (and taken).
    fn try_take(&self) -> Option<Duration> {
        match self.gcra.check() {
            Ok(()) => None,
            Err(not_until) => Some(
                not_until
                    .earliest_possible()
                    .duration_since(self.clock.now())
                    .into(),
            ),
        }
    }

    /// Takes a slot, waiting in line until `deadline` at most.
    async fn acquire(&self, deadline: Option<Instant>) -> Result<(), RateLimited> {
        // Nobody queued: try the fast path. With a queue, newcomers line up
        // behind it so that the order stays first come, first served.
        let wait = if self.waiting.load(Ordering::Acquire) == 0 {
            match self.try_take() {
                None => return Ok(()),
                Some(wait) => wait,
            }
        } else {
            self.rate.interval()
        };
        let Some(deadline) = deadline else {
            return Err(self.refused(wait));
        };
        // Who could be served before the deadline? Anyone beyond that
        // is refused now rather than after waiting in vain.
        let budget = deadline.saturating_duration_since(Instant::now());
        let servable =
            ((budget.as_secs_f64() * self.rate.per_second()).floor() as usize).saturating_add(1);
        let _place = Place::take(&self.waiting, servable).ok_or_else(|| self.refused(wait))?;
        let _turn = tokio::time::timeout_at(deadline, self.turnstile.acquire())
            .await
            .map_err(|_| self.refused(self.rate.interval()))?
            .expect("the turnstile is never closed");
        loop {
            match self.try_take() {
                None => return Ok(()),
                Some(wait)
                    if Instant::now()
                        .checked_add(wait)
                        .is_none_or(|t| t > deadline) =>
                {
                    return Err(self.refused(wait));
                }
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

/// A place in a bucket's queue, given back when dropped (also when the
/// caller went away while waiting).
struct Place<'a>(&'a AtomicUsize);

impl<'a> Place<'a> {
    fn take(waiting: &'a AtomicUsize, bound: usize) -> Option<Place<'a>> {
        if waiting.fetch_add(1, Ordering::AcqRel) >= bound {
            waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Place(waiting))
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The buckets of every quota key and route, built once from config.
#[derive(Debug)]
pub(super) struct LocalBuckets {
    /// Indexed by quota key (one per distinct AccessKey).
    keys: Vec<Option<Arc<LocalBucket>>>,
    /// Indexed by quota key, then by route bucket.
    routes: Vec<Vec<Arc<LocalBucket>>>,
}

impl LocalBuckets {
    pub(super) fn new(
        keys: usize,
        key_rate: Option<Rate>,
        route_rates: &[Rate],
        share: f64,
    ) -> LocalBuckets {
        LocalBuckets {
            keys: (0..keys)
                .map(|_| key_rate.map(|r| Arc::new(LocalBucket::new(r.scaled(share)))))
                .collect(),
            routes: (0..keys)
                .map(|_| {
                    route_rates
                        .iter()
                        .map(|r| Arc::new(LocalBucket::new(r.scaled(share))))
                        .collect()
                })
                .collect(),
        }
    }

    pub(super) async fn acquire(
        &self,
        key: usize,
        route: Option<usize>,
        deadline: Option<Instant>,
    ) -> Result<(), RateLimited> {
        if let Some(r) = route {
            self.routes[key][r].acquire(deadline).await?;
        }
        if let Some(bucket) = &self.keys[key] {
            bucket.acquire(deadline).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateError;
    use crate::state::quota::tests::{BURST, PER_SECOND, SHARE, burst_in_bounds, rate_in_bounds};

    /// `Rate::new` and `scaled` over extreme values: out of bounds is an
    /// error about the right one of the two; in bounds builds a local bucket
    /// at every fallback share, whose intervals fit governor's u64
    /// nanoseconds and whose first slot is taken without a panic.
    #[tokio::test(start_paused = true)]
    async fn rates_over_extreme_values_fail_cleanly_or_work() {
        for r in PER_SECOND {
            for b in BURST {
                let rate = match Rate::new(r, b) {
                    Err(RateError::PerSecond(m)) => {
                        assert!(!rate_in_bounds(r), "{r} {b:?}: {m}");
                        continue;
                    }
                    Err(RateError::Burst(m)) => {
                        assert!(rate_in_bounds(r) && !burst_in_bounds(b), "{r} {b:?}: {m}");
                        continue;
                    }
                    Ok(rate) => rate,
                };
                assert!(
                    rate_in_bounds(r) && burst_in_bounds(b),
                    "{r} {b:?} accepted"
                );
                for share in SHARE {
                    let scaled = rate.scaled(share);
                    assert!(scaled.per_second() > 0.0 && scaled.burst() >= 1);
                    let nanos = scaled.interval_nanos();
                    assert!(
                        nanos.checked_mul(u64::from(scaled.burst())).is_some(),
                        "{r} {b:?} {share}: {nanos} ns x {}",
                        scaled.burst()
                    );
                    let bucket = LocalBucket::new(scaled);
                    assert!(bucket.acquire(None).await.is_ok(), "the burst's first slot");
                    let soon = Instant::now() + Duration::from_millis(1);
                    let _ = bucket.acquire(Some(soon)).await;
                }
            }
        }
    }
}
