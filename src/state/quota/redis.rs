//! The shared backend: each attempt is one atomic GCRA decision in Redis,
//! with `fail_mode` deciding while Redis is away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::RateLimited;
use super::local::LocalBuckets;
use crate::base::redact;
use crate::config::{ConfigError, FailMode, Rate, RateLimitConfig, RedisUrl};
use crate::net::tls::WithTrust;
use crate::state;

/// The GCRA decision over a call's buckets; its arguments and answer are described atop the script.
const GCRA_LUA: &str = include_str!("gcra.lua");

#[derive(Debug)]
pub(super) struct RedisBackend {
    /// For scrubbing error texts before they are logged.
    url: RedisUrl,
    conn: redis::aio::ConnectionManager,
    script: redis::Script,
    timeout: Duration,
    pub(super) fail_mode: FailMode,
    fallback: LocalBuckets,
    pub(super) healthy: AtomicBool,
    /// Milliseconds since `start` before which Redis is not tried again.
    next_probe: AtomicU64,
    start: Instant,
    /// Redis key and rate of each key bucket, per quota key.
    key_buckets: Vec<Option<(String, Rate)>>,
    /// Redis key and rate of each route bucket, per quota key.
    route_buckets: Vec<Vec<(String, Rate)>>,
}

impl RedisBackend {
    pub(super) fn new(
        c: &RateLimitConfig,
        url: &WithTrust<RedisUrl>,
        keys: &[Arc<str>],
        routes: &[(String, Rate)],
        key_rate: Option<Rate>,
        route_rates: &[Rate],
    ) -> Result<RedisBackend, ConfigError> {
        let timeout = Duration::from_millis(c.redis_timeout_ms);
        let conn = state::redis::connect(url, "rate_limit.redis_url", timeout)?;
        // `{key}` is a hash tag: a key's buckets share a Redis Cluster slot,
        // as one script call must.
        let name = |k: &str, suffix: &str| format!("{}:{{{k}}}:{suffix}", c.redis_key_prefix);
        Ok(RedisBackend {
            url: (**url).clone(),
            conn,
            script: redis::Script::new(GCRA_LUA),
            timeout,
            fail_mode: c.fail_mode,
            fallback: LocalBuckets::new(keys.len(), key_rate, route_rates, c.fallback_share),
            healthy: AtomicBool::new(true),
            next_probe: AtomicU64::new(0),
            start: Instant::now(),
            key_buckets: keys
                .iter()
                .map(|k| key_rate.map(|r| (name(k, "key"), r)))
                .collect(),
            route_buckets: keys
                .iter()
                .map(|k| {
                    routes
                        .iter()
                        .map(|(pattern, r)| (name(k, &format!("route:{pattern}")), *r))
                        .collect()
                })
                .collect(),
        })
    }

    pub(super) async fn acquire(
        &self,
        key: usize,
        route: Option<usize>,
        max_wait: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Result<(), RateLimited> {
        let buckets: Vec<&(String, Rate)> = route
            .map(|r| &self.route_buckets[key][r])
            .into_iter()
            .chain(self.key_buckets[key].as_ref())
            .collect();
        if buckets.is_empty() {
            return Ok(());
        }
        if !self.should_try() {
            return self.fall_back(key, route, deadline).await;
        }
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let mut call = self.script.prepare_invoke();
        call.arg(micros(max_wait.unwrap_or_default()));
        for (name, rate) in &buckets {
            let interval = micros(rate.interval()).max(1);
            call.key(name.as_str())
                .arg(interval)
                .arg(interval.saturating_mul(u64::from(rate.burst().saturating_sub(1))));
        }
        let mut conn = self.conn.clone();
        let decided =
            tokio::time::timeout(self.timeout, call.invoke_async::<(u8, i64)>(&mut conn)).await;
        match decided {
            Ok(Ok((granted, wait_us))) => {
                self.mark_healthy();
                let wait = Duration::from_micros(wait_us.max(0) as u64);
                if granted == 1 {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    Ok(())
                } else {
                    let limit = buckets
                        .iter()
                        .map(|(_, r)| r.per_second())
                        .fold(f64::INFINITY, f64::min);
                    Err(RateLimited {
                        retry_after: wait,
                        limit,
                    })
                }
            }
            Ok(Err(e)) => {
                self.mark_unhealthy(&state::redis::describe(&e, &self.url));
                self.fall_back(key, route, deadline).await
            }
            Err(_) => {
                self.mark_unhealthy("no answer within redis_timeout_ms");
                self.fall_back(key, route, deadline).await
            }
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
        deadline: Option<Instant>,
    ) -> Result<(), RateLimited> {
        match self.fail_mode {
            FailMode::Open => Ok(()),
            FailMode::Closed => Err(RateLimited {
                retry_after: Duration::from_secs(1),
                limit: self.key_buckets[key]
                    .as_ref()
                    .map_or(0.0, |(_, r)| r.per_second()),
            }),
            FailMode::Local => self.fallback.acquire(key, route, deadline).await,
        }
    }
}
