//! What may be repeated, when, and how often: pure decisions, with the clock
//! and randomness passed in.
//!
//! Retry safety follows the rule proxies such as pingora write down: after a
//! connect failure nothing reached the provider, so any call may be sent
//! again; after that, only calls whose class is `read` may be. A write that
//! timed out or lost its connection may have bought something: the caller
//! gets the provider's answer, or the gateway's 502/504, never a second try.
//! A connection whose TLS handshake failed sent nothing either, but is not
//! tried again: the next handshake meets the same certificate and the same
//! trust.

use crate::base::families::{self, Described, DescriptorEncoder};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;

use crate::config::Class;

/// How one attempt ended, as far as retrying is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No connection: nothing reached the provider.
    ConnectFailed,
    /// No connection because its TLS handshake failed: nothing reached the
    /// provider, and another try would fail alike.
    TlsFailed,
    /// The connection failed after the request may have been sent.
    Dropped,
    /// No response head within the attempt's time.
    TimedOut,
    /// A response, with its `Retry-After` if it had one.
    Response {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// A 2xx response whose body `code` is in `transient_codes`.
    TransientCode(String),
    /// The gateway stopped the attempt itself (e.g. the upload passed the
    /// body limit): final, and says nothing about the provider.
    Refused,
}

impl Outcome {
    /// Why this outcome calls for a retry, if it does at all.
    fn retry_reason(&self) -> Option<RetryReason> {
        match self {
            Outcome::ConnectFailed => Some(RetryReason::Connect),
            Outcome::Dropped => Some(RetryReason::Reset),
            Outcome::TimedOut => Some(RetryReason::Timeout),
            Outcome::Response { status, .. } => {
                matches!(status, 429 | 502 | 503 | 504).then_some(RetryReason::Status(*status))
            }
            Outcome::TransientCode(code) => Some(RetryReason::TransientCode(code.clone())),
            Outcome::TlsFailed | Outcome::Refused => None,
        }
    }

    /// Whether the provider may have received the request: anything but a
    /// failed connection. A call with such an attempt behind it has an
    /// outcome that must not be forgotten (nor the call sent again).
    pub fn may_have_reached(&self) -> bool {
        !matches!(self, Outcome::ConnectFailed | Outcome::TlsFailed)
    }

    /// What this outcome says about the provider's health, for the circuit
    /// breaker: `Some(false)` a failure (no connection, a dropped one, a
    /// timeout, a 5xx), `Some(true)` a sign of health, `None` nothing either
    /// way (a 429, which is the quota, not an outage; a transient `code`,
    /// which is the provider answering; the gateway refusing an upload; a
    /// failed TLS handshake, which is a matter of certificates and trust,
    /// and whose cause an open circuit would hide behind `circuit_open`).
    pub fn health(&self) -> Option<bool> {
        match self {
            Outcome::ConnectFailed | Outcome::Dropped | Outcome::TimedOut => Some(false),
            Outcome::Response { status: 429, .. } => None,
            Outcome::Response { status, .. } => Some(*status < 500),
            Outcome::TransientCode(_) | Outcome::Refused | Outcome::TlsFailed => None,
        }
    }
}

/// Why a retry was made; shown in `retry_reasons` and as the `reason`
/// label of `pandagate_retries_total`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryReason {
    Connect,
    Reset,
    Timeout,
    /// A 429, 502, 503 or 504.
    Status(u16),
    /// A `code` listed in `retry.transient_codes`.
    TransientCode(String),
}

impl fmt::Display for RetryReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryReason::Connect => f.write_str("connect"),
            RetryReason::Reset => f.write_str("reset"),
            RetryReason::Timeout => f.write_str("timeout"),
            RetryReason::Status(status) => write!(f, "{status}"),
            RetryReason::TransientCode(code) => write!(f, "code:{code}"),
        }
    }
}

impl serde::Serialize for RetryReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Why a retry that the outcome called for was not made; shown as
/// `retry_skipped`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// A write or unknown path, and the request may have reached the provider.
    NotRepeatable,
    MaxAttempts,
    /// The body streamed: it cannot be sent again.
    BodyNotReplayable,
    /// The provider's `Retry-After` reaches past the call's deadline.
    RetryAfterBeyondDeadline,
    /// The backoff reaches past the call's deadline.
    Deadline,
    /// The circuit opened meanwhile.
    CircuitOpen,
    /// The quota refused the retry's slot.
    RateLimited,
    /// The retry budget is spent.
    Budget,
}

impl Skipped {
    pub fn as_str(self) -> &'static str {
        match self {
            Skipped::NotRepeatable => "not_repeatable",
            Skipped::MaxAttempts => "max_attempts",
            Skipped::BodyNotReplayable => "body_not_replayable",
            Skipped::RetryAfterBeyondDeadline => "retry_after_beyond_deadline",
            Skipped::Deadline => "deadline",
            Skipped::CircuitOpen => "circuit_open",
            Skipped::RateLimited => "rate_limited",
            Skipped::Budget => "budget",
        }
    }
}

/// What to do after an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Wait, then try again; `reason` goes to the access log.
    Retry { reason: RetryReason, wait: Duration },
    /// Return this attempt's answer. `skipped` says why a retry that the
    /// outcome called for was not made.
    Done { skipped: Option<Skipped> },
}

/// Everything besides the outcome that a decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub class: Class,
    /// 1 for the first attempt.
    pub number: u32,
    pub max_attempts: u32,
    /// Can the request body be sent again?
    pub replayable: bool,
    /// Time left before the call's deadline.
    pub remaining: Duration,
}

/// Decides whether to repeat an attempt. `backoff` is the jittered wait
/// this retry would take when the provider gave no `Retry-After`; the retry
/// budget is consulted by the caller only when this says `Retry`.
pub fn decide(outcome: &Outcome, a: Attempt, backoff: Duration) -> Decision {
    let Some(reason) = outcome.retry_reason() else {
        return Decision::Done { skipped: None };
    };
    let skip = |why| Decision::Done { skipped: Some(why) };
    if *outcome != Outcome::ConnectFailed && !a.class.repeatable() {
        return skip(Skipped::NotRepeatable);
    }
    if a.number >= a.max_attempts {
        return skip(Skipped::MaxAttempts);
    }
    if !a.replayable {
        return skip(Skipped::BodyNotReplayable);
    }
    let wait = match outcome {
        Outcome::Response {
            retry_after: Some(after),
            ..
        } => {
            if *after >= a.remaining {
                return skip(Skipped::RetryAfterBeyondDeadline);
            }
            *after
        }
        _ => backoff,
    };
    if wait >= a.remaining {
        return skip(Skipped::Deadline);
    }
    Decision::Retry { reason, wait }
}

/// Exponential backoff with full jitter: uniform in `[0, min(cap, base·2^(n-1))]`
/// before retry `n` (1 for the first retry).
pub fn backoff(retry: u32, base: Duration, cap: Duration, rng: &mut impl Rng) -> Duration {
    let factor = 1u32
        .checked_shl(retry.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let ceiling = base.saturating_mul(factor).min(cap);
    let nanos = ceiling.as_nanos() as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rng.random_range(0..=nanos))
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The process-wide retry budget: over a sliding window, retries may be at
/// most `percent` of first attempts plus `min_per_sec` per second.
///
/// Counts live in one-second buckets of atomics, so recording a call is a
/// few uncontended-in-practice atomic adds, never a lock.
/// Not tower's `TpsBudget`: each `deposit` (every call) locks a `Mutex` to rotate slots; its window caps at 60 s, ours at 1 h.
#[derive(Debug)]
pub struct Budget {
    start: Instant,
    percent: u64,
    min_per_sec: u64,
    buckets: Vec<Bucket>,
    /// Retries refused because the budget was spent, since start.
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct Bucket {
    /// The second (since `start`) these counts belong to, plus one (0: never used).
    second: AtomicU64,
    firsts: AtomicU64,
    retries: AtomicU64,
}

impl Budget {
    pub fn new(percent: u32, min_per_sec: u32, window: Duration) -> Budget {
        let seconds = window.as_secs().max(1) as usize;
        Budget {
            start: Instant::now(),
            percent: u64::from(percent),
            min_per_sec: u64::from(min_per_sec),
            buckets: (0..seconds).map(|_| Bucket::default()).collect(),
            refused: AtomicU64::new(0),
        }
    }

    fn bucket(&self, now: Instant) -> (&Bucket, u64) {
        let second = now.saturating_duration_since(self.start).as_secs() + 1;
        let bucket = &self.buckets[(second as usize) % self.buckets.len()];
        let seen = bucket.second.load(Ordering::Acquire);
        if seen != second
            && bucket
                .second
                .compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // First use of this bucket in a new second: forget the old counts.
            // A count racing with this reset may be lost; the budget is a
            // guard rail, not a ledger.
            bucket.firsts.store(0, Ordering::Release);
            bucket.retries.store(0, Ordering::Release);
        }
        (bucket, second)
    }

    /// Retries refused because the budget was spent, since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn describe(&self, e: &mut DescriptorEncoder) -> Described {
        families::counter(
            e,
            "retries_budget_refused",
            "Retries not made because the retry budget was spent.",
            self.refused(),
        )
    }

    /// Counts a first attempt.
    pub fn record_first(&self, now: Instant) {
        self.bucket(now).0.firsts.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if there is one left.
    pub fn try_retry(&self, now: Instant) -> bool {
        let (bucket, second) = self.bucket(now);
        let window = self.buckets.len() as u64;
        let (mut firsts, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            let s = b.second.load(Ordering::Acquire);
            if s != 0 && s + window > second {
                firsts += b.firsts.load(Ordering::Relaxed);
                retries += b.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = self.min_per_sec * window + firsts * self.percent / 100;
        if retries >= allowed {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        bucket.retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CodeValue, RetryConfig};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn attempt(class: Class, number: u32) -> Attempt {
        Attempt {
            class,
            number,
            max_attempts: 3,
            replayable: true,
            remaining: Duration::from_secs(30),
        }
    }

    fn status(s: u16) -> Outcome {
        Outcome::Response {
            status: s,
            retry_after: None,
        }
    }

    const B: Duration = Duration::from_millis(10);

    /// A retry's reason as logged, and its wait.
    fn retried(d: Decision) -> Option<(String, Duration)> {
        match d {
            Decision::Retry { reason, wait } => Some((reason.to_string(), wait)),
            Decision::Done { .. } => None,
        }
    }

    #[test]
    fn reads_retry_on_5xx_429_reset_timeout_and_transient_codes() {
        for (outcome, reason) in [
            (status(502), "502"),
            (status(503), "503"),
            (status(504), "504"),
            (status(429), "429"),
            (Outcome::Dropped, "reset"),
            (Outcome::TimedOut, "timeout"),
            (Outcome::ConnectFailed, "connect"),
            (Outcome::TransientCode("BUSY".into()), "code:BUSY"),
        ] {
            assert_eq!(
                retried(decide(&outcome, attempt(Class::Read, 1), B)),
                Some((reason.to_owned(), B)),
                "{outcome:?}"
            );
        }
    }

    #[test]
    fn other_answers_are_final() {
        for s in [200, 201, 302, 400, 401, 404, 500] {
            assert_eq!(
                decide(&status(s), attempt(Class::Read, 1), B),
                Decision::Done { skipped: None }
            );
        }
    }

    #[test]
    fn writes_and_unknowns_retry_only_when_nothing_was_sent() {
        for class in [Class::Write, Class::Unknown] {
            assert!(matches!(
                decide(&Outcome::ConnectFailed, attempt(class, 1), B),
                Decision::Retry { .. }
            ));
            for outcome in [
                status(503),
                status(429),
                Outcome::Dropped,
                Outcome::TimedOut,
            ] {
                assert_eq!(
                    decide(&outcome, attempt(class, 1), B),
                    Decision::Done {
                        skipped: Some(Skipped::NotRepeatable)
                    },
                    "{class:?} {outcome:?}"
                );
            }
        }
    }

    #[test]
    fn a_failed_tls_handshake_is_final_sent_nothing_and_leaves_the_breaker_alone() {
        for class in [Class::Read, Class::Write, Class::Unknown] {
            assert_eq!(
                decide(&Outcome::TlsFailed, attempt(class, 1), B),
                Decision::Done { skipped: None },
                "{class:?}"
            );
        }
        assert!(!Outcome::TlsFailed.may_have_reached());
        assert_eq!(Outcome::TlsFailed.health(), None);
    }

    #[test]
    fn attempts_bodies_and_deadline_bound_retries() {
        let mut a = attempt(Class::Read, 3);
        assert_eq!(
            decide(&status(503), a, B),
            Decision::Done {
                skipped: Some(Skipped::MaxAttempts)
            }
        );
        a = attempt(Class::Read, 1);
        a.replayable = false;
        assert_eq!(
            decide(&status(503), a, B),
            Decision::Done {
                skipped: Some(Skipped::BodyNotReplayable)
            }
        );
        a = attempt(Class::Read, 1);
        a.remaining = Duration::from_millis(5);
        assert_eq!(
            decide(&status(503), a, B),
            Decision::Done {
                skipped: Some(Skipped::Deadline)
            }
        );
    }

    #[test]
    fn retry_after_is_honoured_only_within_the_deadline() {
        let limited = |secs| Outcome::Response {
            status: 429,
            retry_after: Some(Duration::from_secs(secs)),
        };
        assert_eq!(
            retried(decide(&limited(1), attempt(Class::Read, 1), B)),
            Some(("429".to_owned(), Duration::from_secs(1)))
        );
        assert_eq!(
            decide(&limited(60), attempt(Class::Read, 1), B),
            Decision::Done {
                skipped: Some(Skipped::RetryAfterBeyondDeadline)
            }
        );
    }

    #[test]
    fn parses_both_retry_after_forms() {
        let now = httpdate::parse_http_date("Wed, 25 Nov 2026 20:00:00 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 25 Nov 2026 20:00:05 GMT", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_retry_after("Wed, 25 Nov 2026 19:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_is_jittered_below_a_doubling_capped_ceiling() {
        let mut rng = StdRng::seed_from_u64(7);
        let base = Duration::from_millis(10);
        let cap = Duration::from_millis(100);
        for retry in 1..=10u32 {
            let ceiling = (base * 2u32.pow(retry - 1)).min(cap);
            for _ in 0..200 {
                assert!(backoff(retry, base, cap, &mut rng) <= ceiling);
            }
        }
        let draws: Vec<Duration> = (0..50).map(|_| backoff(4, base, cap, &mut rng)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(40)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(40)));
        assert!(backoff(1000, base, cap, &mut rng) <= cap);
    }

    #[test]
    fn classifies_transient_codes_of_either_type() {
        let c = RetryConfig {
            transient_codes: vec![CodeValue::Int(5001), CodeValue::Str("BUSY".into())],
            ..RetryConfig::default()
        };
        assert!(c.is_transient(&serde_json::json!(5001)));
        assert!(c.is_transient(&serde_json::json!("5001")));
        assert!(c.is_transient(&serde_json::json!("BUSY")));
        assert!(!c.is_transient(&serde_json::json!(200)));
        assert!(!RetryConfig::default().is_transient(&serde_json::json!(5001)));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_a_floor_plus_a_share_of_first_attempts() {
        let budget = Budget::new(20, 1, Duration::from_secs(10));
        let now = Instant::now();
        // Quiet gateway: the floor (1/s over 10 s) allows 10 retries.
        let floor = (0..100).filter(|_| budget.try_retry(now)).count();
        assert_eq!(floor, 10);
        // 100 first attempts add 20 % more.
        for _ in 0..100 {
            budget.record_first(now);
        }
        let more = (0..100).filter(|_| budget.try_retry(now)).count();
        assert_eq!(more, 20);
        assert_eq!(budget.refused(), 90 + 80, "every refusal is counted");
    }

    #[tokio::test(start_paused = true)]
    async fn budget_window_slides() {
        let budget = Budget::new(0, 1, Duration::from_secs(2));
        let t0 = Instant::now();
        assert_eq!((0..10).filter(|_| budget.try_retry(t0)).count(), 2);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(!budget.try_retry(Instant::now()), "still inside the window");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            (0..10).filter(|_| budget.try_retry(Instant::now())).count(),
            2
        );
    }
}
