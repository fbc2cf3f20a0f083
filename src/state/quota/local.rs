//! Local buckets: each quota key's quota, shared by weight among its
//! clients ([`Fair`]), and its route buckets, decided together under one
//! lock per key. A client's calls wait in line; the first asks again when a
//! slot it may take should be free.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::RateLimited;
use super::fair::{self, Fair, Step};
use crate::config::{MIN_PER_SECOND, Rate};

/// A client's part of a quota, as configured.
#[derive(Clone, Debug, PartialEq)]
pub struct QuotaClient {
    /// As the access log and the metrics name it.
    pub name: std::sync::Arc<str>,
    /// Its weight (`quota_share`).
    pub share: f64,
    /// Its cap (`quota_max_per_second`).
    pub max_per_second: Option<f64>,
}

impl QuotaClient {
    /// The calls of no client, alone: a quota without `[[clients]]`.
    pub fn alone() -> Vec<QuotaClient> {
        vec![QuotaClient {
            name: crate::config::DEFAULT_CLIENT.into(),
            share: 1.0,
            max_per_second: None,
        }]
    }

    /// The interval of its cap, in µs, with the cap scaled by `scale`.
    pub(super) fn cap_interval(&self, scale: f64) -> Option<u64> {
        self.max_per_second
            .map(|m| micros(Duration::from_secs_f64(1.0 / (m * scale))))
    }
}

/// Microseconds on the limiter's clock; it starts past the asking window,
/// so that no time is 0 ("never").
#[derive(Clone, Copy, Debug)]
pub(super) struct Clock(Instant);

impl Clock {
    const ORIGIN: u64 = fair::ASKING_US + 1;

    pub(super) fn new() -> Clock {
        Clock(Instant::now())
    }

    fn now(self) -> u64 {
        Self::ORIGIN + self.0.elapsed().as_micros() as u64
    }

    fn instant(self, t: u64) -> Instant {
        self.0 + Duration::from_micros(t.saturating_sub(Self::ORIGIN))
    }
}

/// A GCRA schedule: free when `tat - tolerance` has come.
#[derive(Debug)]
pub(super) struct Schedule {
    pub(super) interval: u64,
    pub(super) tolerance: u64,
    tat: u64,
    per_second: f64,
}

impl Schedule {
    /// `rate`'s schedule, its interval and tolerance in µs.
    pub(super) fn new(rate: Rate) -> Schedule {
        let interval = micros(rate.interval());
        Schedule {
            interval,
            tolerance: fair::tolerance(interval, rate.burst()),
            tat: 0,
            per_second: rate.per_second(),
        }
    }
}

pub(super) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

#[derive(Debug)]
struct KeyState {
    quota: Option<Fair>,
    routes: Vec<Schedule>,
}

/// A refusal to go now: ask again at `until`; `limit` is the rate of the
/// bucket that said so.
struct Later {
    until: u64,
    limit: f64,
}

impl KeyState {
    /// The quota and the route bucket together: both have a slot for
    /// `client` now (both are taken), or the call asks again later.
    fn decide(
        &mut self,
        route: Option<usize>,
        client: usize,
        now: u64,
        rate: f64,
    ) -> Result<(), Later> {
        if let Some(r) = route {
            let s = &self.routes[r];
            let free_at = s.tat.saturating_sub(s.tolerance);
            if free_at > now {
                return Err(Later {
                    until: free_at,
                    limit: s.per_second,
                });
            }
        }
        if let Some(quota) = &mut self.quota
            && let Step::WaitUntil(until) = quota.decide(client, now)
        {
            return Err(Later { until, limit: rate });
        }
        if let Some(r) = route {
            let s = &mut self.routes[r];
            s.tat = s.tat.max(now) + s.interval;
        }
        Ok(())
    }
}

/// One client's line of calls waiting for a slot of one key.
#[derive(Debug)]
struct Line {
    /// One permit: the first call of the line holds it while it waits.
    turnstile: Semaphore,
    waiting: AtomicUsize,
}

#[derive(Debug)]
struct KeyBuckets {
    state: Mutex<KeyState>,
    /// Per client.
    lines: Vec<Line>,
    /// The quota's rate, or the fastest route's when there is no quota: a
    /// client's line is as long as this rate could serve in time, and its
    /// newcomers first ask one interval of it later.
    rate: f64,
    pace: u64,
}

/// The buckets of every quota key and route, built once from config.
#[derive(Debug)]
pub(super) struct LocalBuckets {
    /// Indexed by quota key (one per distinct AccessKey).
    keys: Vec<KeyBuckets>,
    clock: Clock,
}

impl LocalBuckets {
    /// Every rate (the quota's, the routes', the clients' caps) scaled by
    /// `share`: the part of the fleet's this process keeps on its own.
    pub(super) fn new(
        keys: usize,
        key_rate: Option<Rate>,
        route_rates: &[Rate],
        clients: &[QuotaClient],
        share: f64,
    ) -> LocalBuckets {
        let key_rate = key_rate.map(|r| r.scaled(share));
        let route_rates: Vec<Rate> = route_rates.iter().map(|r| r.scaled(share)).collect();
        let rate = key_rate.map(Rate::per_second).unwrap_or_else(|| {
            route_rates
                .iter()
                .map(|r| r.per_second())
                .fold(0.0, f64::max)
        });
        let key = || KeyBuckets {
            state: Mutex::new(KeyState {
                quota: key_rate.map(|r| {
                    Fair::new(
                        micros(r.interval()),
                        r.burst(),
                        clients
                            .iter()
                            .map(|c| fair::Client::new(c.share, c.cap_interval(share)))
                            .collect(),
                    )
                }),
                routes: route_rates.iter().map(|r| Schedule::new(*r)).collect(),
            }),
            lines: clients
                .iter()
                .map(|_| Line {
                    turnstile: Semaphore::new(1),
                    waiting: AtomicUsize::new(0),
                })
                .collect(),
            rate,
            pace: micros(Duration::from_secs_f64(1.0 / rate.max(MIN_PER_SECOND))),
        };
        LocalBuckets {
            keys: (0..keys).map(|_| key()).collect(),
            clock: Clock::new(),
        }
    }

    fn decide(&self, key: &KeyBuckets, route: Option<usize>, client: usize) -> Result<(), Later> {
        let now = self.clock.now();
        let mut state = key.state.lock().expect("quota lock");
        if state.quota.is_none() && route.is_none() {
            return Ok(());
        }
        state.decide(route, client, now, key.rate)
    }

    /// Takes a slot of quota key `key` (and of its route bucket `route`)
    /// for `client`, waiting in the client's line until `deadline` at most.
    pub(super) async fn acquire(
        &self,
        key: usize,
        route: Option<usize>,
        client: usize,
        deadline: Option<Instant>,
    ) -> Result<(), RateLimited> {
        let buckets = &self.keys[key];
        let line = &buckets.lines[client];
        let refused = |later: &Later| RateLimited {
            retry_after: self
                .clock
                .instant(later.until)
                .saturating_duration_since(Instant::now()),
            limit: later.limit,
        };
        // Nobody of this client waiting: try now. With a line, newcomers
        // join it, so that a client's calls keep their order.
        let first = if line.waiting.load(Ordering::Acquire) == 0 {
            match self.decide(buckets, route, client) {
                Ok(()) => return Ok(()),
                Err(later) => later,
            }
        } else {
            Later {
                until: self.clock.now() + buckets.pace,
                limit: buckets.rate,
            }
        };
        let Some(deadline) = deadline else {
            return Err(refused(&first));
        };
        // Who of the line could be served before the deadline? Anyone
        // beyond that is refused now rather than after waiting in vain.
        let budget = deadline.saturating_duration_since(Instant::now());
        let servable = ((budget.as_secs_f64() * buckets.rate).floor() as usize).saturating_add(1);
        let _place = Place::take(&line.waiting, servable).ok_or_else(|| refused(&first))?;
        let _turn = tokio::time::timeout_at(deadline, line.turnstile.acquire())
            .await
            .map_err(|_| refused(&first))?
            .expect("the turnstile is never closed");
        loop {
            match self.decide(buckets, route, client) {
                Ok(()) => return Ok(()),
                Err(later) if self.clock.instant(later.until) > deadline => {
                    return Err(refused(&later));
                }
                Err(later) => tokio::time::sleep_until(self.clock.instant(later.until)).await,
            }
        }
    }
}

/// A place in a line, given back when dropped (also when the caller went
/// away while waiting).
pub(super) struct Place<'a>(&'a AtomicUsize);

impl<'a> Place<'a> {
    pub(super) fn take(waiting: &'a AtomicUsize, bound: usize) -> Option<Place<'a>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateError;
    use crate::state::quota::tests::{BURST, PER_SECOND, SHARE, burst_in_bounds, rate_in_bounds};

    /// `Rate::new` and `scaled` over extreme values: out of bounds is an
    /// error about the right one of the two; in bounds builds local buckets
    /// at every fallback share, whose schedules fit in u64 microseconds and
    /// whose first slot is taken without a panic.
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
                    let interval = micros(scaled.interval());
                    assert!(
                        interval.checked_mul(u64::from(scaled.burst())).is_some(),
                        "{r} {b:?} {share}: {interval} µs x {}",
                        scaled.burst()
                    );
                    let buckets =
                        LocalBuckets::new(1, Some(rate), &[rate], &QuotaClient::alone(), share);
                    assert!(
                        buckets.acquire(0, Some(0), 0, None).await.is_ok(),
                        "the burst's first slot"
                    );
                    let soon = Instant::now() + Duration::from_millis(1);
                    let _ = buckets.acquire(0, Some(0), 0, Some(soon)).await;
                }
            }
        }
    }
}
