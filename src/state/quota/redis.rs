//! The shared backend: each time an attempt asks for a slot is one atomic
//! decision in Redis (the quota shared by weight among the clients of
//! every replica, and the route bucket), with `fail_mode` deciding while
//! Redis is away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::RateLimited;
use super::fair;
use super::local::{LocalBuckets, Place, QuotaClient, Schedule};
use crate::base::redact;
use crate::config::{ConfigError, FailMode, Rate, RateLimitConfig, RedisUrl};
use crate::net::tls::WithTrust;
use crate::state;

/// The decision over a call's quota and route bucket; its arguments and
/// answer are described atop the script.
const FAIR_LUA: &str = include_str!("fair.lua");

/// How long after the next free slot an entitled waiter is expected back
/// (a round trip to Redis and a timer's slack).
const COME_BACK_US: u64 = 5_000;

#[derive(Debug)]
pub(super) struct RedisBackend {
    /// For scrubbing error texts before they are logged.
    url: RedisUrl,
    conn: state::redis::Conn,
    script: redis::Script,
    timeout: Duration,
    pub(super) fail_mode: FailMode,
    fallback: LocalBuckets,
    pub(super) healthy: AtomicBool,
    /// Milliseconds since `start` before which Redis is not tried again.
    next_probe: AtomicU64,
    start: Instant,
    /// The quota's rate and schedule, and per quota key the Redis keys of
    /// its schedule and of its clients' hash.
    key_rate: Option<Rate>,
    key_schedule: Option<Schedule>,
    key_buckets: Vec<(String, String)>,
    /// Redis key, rate and schedule of each route bucket, per quota key.
    route_buckets: Vec<Vec<(String, Rate, Schedule)>>,
    /// Per client: its name, share and cap's interval (µs, 0: none).
    clients: Vec<(String, f64, u64)>,
    /// Per client: its line of waiting calls on this replica (one asks
    /// Redis at a time), and how many wait in it.
    lines: Vec<tokio::sync::Semaphore>,
    waiting: Vec<std::sync::atomic::AtomicUsize>,
}

impl RedisBackend {
    pub(super) fn new(
        c: &RateLimitConfig,
        url: &WithTrust<RedisUrl>,
        keys: &[Arc<str>],
        routes: &[(String, Rate)],
        key_rate: Option<Rate>,
        route_rates: &[Rate],
        clients: &[QuotaClient],
    ) -> Result<RedisBackend, ConfigError> {
        let timeout = Duration::from_millis(c.redis_timeout_ms);
        let conn = state::redis::connect(url, "rate_limit.redis_url", timeout)?;
        // `{key}` is a hash tag: a key's buckets share a Redis Cluster slot,
        // as one script call must.
        let name = |k: &str, suffix: &str| format!("{}:{{{k}}}:{suffix}", c.redis_key_prefix);
        Ok(RedisBackend {
            url: (**url).clone(),
            conn,
            script: redis::Script::new(FAIR_LUA),
            timeout,
            fail_mode: c.fail_mode,
            fallback: LocalBuckets::new(
                keys.len(),
                key_rate,
                route_rates,
                clients,
                c.fallback_share,
            ),
            healthy: AtomicBool::new(true),
            next_probe: AtomicU64::new(0),
            start: Instant::now(),
            key_rate,
            key_schedule: key_rate.map(Schedule::new),
            key_buckets: keys
                .iter()
                .map(|k| (name(k, "key"), name(k, "clients")))
                .collect(),
            route_buckets: keys
                .iter()
                .map(|k| {
                    routes
                        .iter()
                        .map(|(pattern, r)| {
                            (name(k, &format!("route:{pattern}")), *r, Schedule::new(*r))
                        })
                        .collect()
                })
                .collect(),
            clients: clients
                .iter()
                .map(|c| {
                    (
                        c.name.to_string(),
                        c.share,
                        c.cap_interval(1.0).unwrap_or(0),
                    )
                })
                .collect(),
            lines: clients
                .iter()
                .map(|_| tokio::sync::Semaphore::new(1))
                .collect(),
            waiting: clients
                .iter()
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect(),
        })
    }

    /// A slot for `client` on quota key `key` and route bucket `route`: one
    /// script call each time this replica's first waiting call of the
    /// client asks, until a slot is taken or the next would come after
    /// `deadline`.
    pub(super) async fn acquire(
        &self,
        key: usize,
        route: Option<usize>,
        client: usize,
        deadline: Option<Instant>,
    ) -> Result<(), RateLimited> {
        let route_index = route;
        let route = route.map(|r| &self.route_buckets[key][r]);
        let Some(quota) = self.key_rate.or(route.map(|(_, r, _)| *r)) else {
            return Ok(());
        };
        let refused = || RateLimited {
            retry_after: quota.interval(),
            limit: quota.per_second(),
        };
        // As in this process's lines: no longer than the quota could serve
        // before the deadline.
        let mut _place = None;
        let _turn = match deadline {
            None => None,
            Some(deadline) => {
                let budget = deadline.saturating_duration_since(Instant::now());
                let servable = ((budget.as_secs_f64() * quota.per_second()).floor() as usize)
                    .saturating_add(1);
                _place = Some(Place::take(&self.waiting[client], servable).ok_or_else(refused)?);
                Some(
                    tokio::time::timeout_at(deadline, self.lines[client].acquire())
                        .await
                        .map_err(|_| refused())?
                        .expect("a line is never closed"),
                )
            }
        };
        loop {
            if !self.should_try() {
                return self.fall_back(key, route_index, client, deadline).await;
            }
            let wait = match self.ask(key, route, client).await {
                Ok(None) => return Ok(()),
                Ok(Some(wait)) => wait,
                Err(why) => {
                    self.mark_unhealthy(&why);
                    return self.fall_back(key, route_index, client, deadline).await;
                }
            };
            let at = Instant::now() + wait;
            if deadline.is_none_or(|d| at > d) {
                // The bucket that holds the call back: its route's when that
                // is the slower.
                let limit = route
                    .map(|(_, r, _)| r.per_second())
                    .into_iter()
                    .chain(self.key_rate.map(Rate::per_second))
                    .fold(f64::INFINITY, f64::min);
                return Err(RateLimited {
                    retry_after: wait,
                    limit,
                });
            }
            tokio::time::sleep_until(at).await;
        }
    }

    /// One decision: `None` when a slot was taken, else how long to wait
    /// before asking again; `Err` when Redis did not decide.
    async fn ask(
        &self,
        key: usize,
        route: Option<&(String, Rate, Schedule)>,
        client: usize,
    ) -> Result<Option<Duration>, String> {
        let (quota_key, clients_key) = &self.key_buckets[key];
        let (name, share, cap) = &self.clients[client];
        // No quota: a schedule that never binds, so the route alone decides.
        let (interval, tolerance) = self
            .key_schedule
            .as_ref()
            .map_or((1, 0), |s| (s.interval, s.tolerance));
        let mut call = self.script.prepare_invoke();
        call.key(quota_key.as_str())
            .key(clients_key.as_str())
            .arg(interval)
            .arg(tolerance)
            .arg(name.as_str())
            .arg(*share)
            .arg(*cap)
            .arg(fair::ASKING_US)
            .arg(COME_BACK_US);
        if let Some((route_key, _, schedule)) = route {
            call.key(route_key.as_str())
                .arg(schedule.interval)
                .arg(schedule.tolerance);
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, call.invoke_async::<(u8, i64)>(&mut conn)).await {
            Ok(Ok((granted, wait_us))) => {
                self.mark_healthy();
                Ok((granted != 1).then(|| Duration::from_micros(wait_us.max(1) as u64)))
            }
            Ok(Err(e)) => Err(state::redis::describe(&e, &self.url)),
            Err(_) => Err("no answer within redis_timeout_ms".into()),
        }
    }

    /// Healthy: always. Away: one call per second probes Redis again.
    fn should_try(&self) -> bool {
        if self.healthy.load(Ordering::Acquire) {
            return true;
        }
        let now = self.start.elapsed().as_millis() as u64;
        let due = self.next_probe.load(Ordering::Acquire);
        now >= due
            && self
                .next_probe
                .compare_exchange(due, now + 1000, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    fn mark_healthy(&self) {
        if !self.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!("redis rate-limit backend answers again: shared quota restored");
        }
    }

    fn mark_unhealthy(&self, why: &str) {
        let now = self.start.elapsed().as_millis() as u64;
        self.next_probe.store(now + 1000, Ordering::Release);
        if self.healthy.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                reason = redact::scrub(why, self.url.expose()),
                fail_mode = ?self.fail_mode,
                "redis rate-limit backend unavailable: falling back"
            );
        }
    }

    async fn fall_back(
        &self,
        key: usize,
        route: Option<usize>,
        client: usize,
        deadline: Option<Instant>,
    ) -> Result<(), RateLimited> {
        match self.fail_mode {
            FailMode::Open => Ok(()),
            FailMode::Closed => Err(RateLimited {
                retry_after: Duration::from_secs(1),
                limit: self.key_rate.map_or(0.0, Rate::per_second),
            }),
            FailMode::Local => self.fallback.acquire(key, route, client, deadline).await,
        }
    }
}
