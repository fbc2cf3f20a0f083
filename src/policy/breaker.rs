//! The circuit breaker: stop calling a provider that is down, and find out
//! when it is back with a few probe calls.
//!
//! Closed → (`failure_threshold` consecutive connect failures, 5xx or
//! timeouts) → Open: every call gets an immediate 503 with `Retry-After` for
//! `open_ms` → Half-open: up to `half_open_probes` calls go through; the
//! first success closes the circuit, a failure opens it again. Transitions
//! are logged. State is a handful of atomics shared by all connections.

use crate::base::families::{self, Described, DescriptorEncoder};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::config::BreakerConfig;
use tokio::time::Instant;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Circuit state, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

/// Permission to make one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Normal,
    /// A half-open probe: its result decides the circuit.
    Probe,
}

/// One admitted attempt; see [`Breaker::admit`].
#[must_use = "an admission records its attempt's result"]
#[derive(Debug)]
pub struct Admission<'a> {
    breaker: &'a Breaker,
    permit: Permit,
    recorded: bool,
}

impl Admission<'_> {
    pub fn permit(&self) -> Permit {
        self.permit
    }

    /// Records how the attempt went (see [`Breaker::record`]).
    pub fn record(mut self, healthy: Option<bool>, now: Instant) {
        self.recorded = true;
        self.breaker.record(self.permit, healthy, now);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.record(self.permit, None, Instant::now());
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    start: Instant,
    state: AtomicU8,
    failures: AtomicU32,
    /// Milliseconds since `start` at which the circuit last opened.
    opened_at: AtomicU64,
    probes: AtomicU32,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            config,
            start: Instant::now(),
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            probes: AtomicU32::new(0),
        }
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            OPEN => State::Open,
            HALF_OPEN => State::HalfOpen,
            _ => State::Closed,
        }
    }

    pub fn describe(&self, e: &mut DescriptorEncoder) -> Described {
        let state = match self.state() {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        };
        families::gauge(
            e,
            "circuit_state",
            "Circuit breaker: 0 closed, 1 open, 2 half-open.",
            state,
        )
    }

    fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_millis() as u64
    }

    /// May an attempt go out now? `Err` carries how long until it may.
    /// The admission records the attempt's result when told, and "no
    /// verdict" when dropped untold (the caller left mid-attempt), so a
    /// half-open probe slot is never lost.
    pub fn admit(&self, now: Instant) -> Result<Admission<'_>, Duration> {
        self.permit(now).map(|permit| Admission {
            breaker: self,
            permit,
            recorded: false,
        })
    }

    fn permit(&self, now: Instant) -> Result<Permit, Duration> {
        if !self.config.enabled {
            return Ok(Permit::Normal);
        }
        loop {
            match self.state.load(Ordering::Acquire) {
                CLOSED => return Ok(Permit::Normal),
                OPEN => {
                    let until = self
                        .opened_at
                        .load(Ordering::Acquire)
                        .saturating_add(self.config.open_ms);
                    let now_ms = self.millis(now);
                    if now_ms < until {
                        return Err(Duration::from_millis(until - now_ms));
                    }
                    if self
                        .state
                        .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        self.probes.store(0, Ordering::Release);
                        tracing::info!("circuit half-open: probing the provider");
                    }
                }
                _ => {
                    if self.probes.fetch_add(1, Ordering::AcqRel) < self.config.half_open_probes {
                        return Ok(Permit::Probe);
                    }
                    self.probes.fetch_sub(1, Ordering::AcqRel);
                    return Err(Duration::from_secs(1));
                }
            }
        }
    }

    /// Records how an admitted attempt went: `Some(true)` healthy,
    /// `Some(false)` a failure, `None` neither (e.g. 429).
    pub fn record(&self, permit: Permit, healthy: Option<bool>, now: Instant) {
        if !self.config.enabled {
            return;
        }
        match (permit, healthy) {
            (Permit::Probe, Some(true)) => {
                self.failures.store(0, Ordering::Release);
                if self
                    .state
                    .compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    tracing::info!("circuit closed: the provider answered a probe");
                }
            }
            (Permit::Probe, Some(false)) => {
                self.opened_at.store(self.millis(now), Ordering::Release);
                if self
                    .state
                    .compare_exchange(HALF_OPEN, OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    tracing::warn!(
                        open_ms = self.config.open_ms,
                        "circuit open again: a probe failed"
                    );
                }
            }
            (Permit::Probe, None) => {
                self.probes.fetch_sub(1, Ordering::AcqRel);
            }
            (Permit::Normal, Some(true)) => {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Release);
                }
            }
            (Permit::Normal, Some(false)) => {
                let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                if n >= self.config.failure_threshold {
                    self.opened_at.store(self.millis(now), Ordering::Release);
                    if self
                        .state
                        .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        tracing::warn!(
                            failures = n,
                            open_ms = self.config.open_ms,
                            "circuit open: the provider keeps failing"
                        );
                    }
                }
            }
            (Permit::Normal, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            enabled: true,
            failure_threshold: 3,
            open_ms: 1_000,
            half_open_probes: 1,
        })
    }

    /// A breaker opened by three failures, its open period just over.
    async fn opened_and_cooled_down() -> Breaker {
        let b = breaker();
        for _ in 0..3 {
            b.record(Permit::Normal, Some(false), Instant::now());
        }
        tokio::time::advance(Duration::from_millis(1_000)).await;
        b
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_fails_fast() {
        let b = breaker();
        for _ in 0..2 {
            let p = b.admit(Instant::now()).unwrap();
            p.record(Some(false), Instant::now());
        }
        assert_eq!(b.state(), State::Closed);
        b.record(Permit::Normal, Some(false), Instant::now());
        assert_eq!(b.state(), State::Open);
        assert_eq!(
            b.admit(Instant::now()).err(),
            Some(Duration::from_millis(1_000))
        );
        tokio::time::advance(Duration::from_millis(400)).await;
        assert_eq!(
            b.admit(Instant::now()).err(),
            Some(Duration::from_millis(600))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let b = breaker();
        b.record(Permit::Normal, Some(false), Instant::now());
        b.record(Permit::Normal, Some(false), Instant::now());
        b.record(Permit::Normal, Some(true), Instant::now());
        b.record(Permit::Normal, Some(false), Instant::now());
        b.record(Permit::Normal, None, Instant::now());
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn probes_after_the_cool_down_then_closes_or_reopens() {
        let b = opened_and_cooled_down().await;
        let probe = b.admit(Instant::now()).unwrap();
        assert_eq!(probe.permit(), Permit::Probe);
        assert_eq!(b.state(), State::HalfOpen);
        assert!(b.admit(Instant::now()).is_err(), "one probe at a time");
        probe.record(Some(false), Instant::now());
        assert_eq!(b.state(), State::Open);

        tokio::time::advance(Duration::from_millis(1_000)).await;
        let probe = b.admit(Instant::now()).unwrap();
        probe.record(Some(true), Instant::now());
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(Instant::now()).unwrap().permit(), Permit::Normal);
    }

    /// Found by bench/soak.py's author: a caller that left during the probe
    /// used to leave the circuit half-open, refusing every call, for good.
    #[tokio::test(start_paused = true)]
    async fn a_probe_abandoned_mid_attempt_frees_its_slot() {
        let b = opened_and_cooled_down().await;
        let probe = b.admit(Instant::now()).unwrap();
        assert_eq!(probe.permit(), Permit::Probe);
        drop(probe);
        assert_eq!(b.state(), State::HalfOpen);
        let next = b.admit(Instant::now()).expect("the next call probes");
        assert_eq!(next.permit(), Permit::Probe);
        next.record(Some(true), Instant::now());
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_breaker_never_opens() {
        let b = Breaker::new(BreakerConfig {
            enabled: false,
            ..BreakerConfig::default()
        });
        for _ in 0..100 {
            b.record(Permit::Normal, Some(false), Instant::now());
        }
        assert_eq!(b.admit(Instant::now()).unwrap().permit(), Permit::Normal);
    }
}
