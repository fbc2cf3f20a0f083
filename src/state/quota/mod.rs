//! Quota enforcement: GCRA per AccessKey (and per route bucket), shared by
//! weight among the clients asking ([`fair`]), in this process or across
//! every replica through Redis.
//!
//! The provider counts every request it receives against the AccessKey, so
//! the limiter sits inside the retry loop: each attempt takes a slot. A call
//! takes a slot of its route bucket (if its `[[routes]]` entry sets one) and
//! of its key's quota together, or neither.
//!
//! Over the limit, a call either gets 429 at once (`max_wait_ms = 0`) or
//! waits in its client's line, first come first served within the client,
//! for a slot within `max_wait_ms`; the first of the line asks again when a
//! slot it may take should be free. A line is bounded by what could be
//! served in that time, so a call that would wait longer is refused at
//! once; a caller that goes away leaves the line (its future is dropped).
//!
//! With `backend = "redis"` each time a line's first call asks is one atomic
//! decision in Redis (a Lua script loaded once, called by its SHA), on
//! Redis's own clock (`TIME`), so replicas with skewed clocks still agree.
//! Nothing is reserved ahead. When Redis is unreachable or slower than
//! `redis_timeout_ms`, `fail_mode` decides, and Redis is tried again (one
//! call a second) until it answers.

mod fair;
mod local;
mod redis;

use crate::base::families::{self, Described, DescriptorEncoder};
use crate::base::latency::Latency;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use self::local::LocalBuckets;
pub use self::local::QuotaClient;
use self::redis::RedisBackend;
use crate::base::error::GatewayError;
use crate::config::RedisUrlKeys as _;
use crate::config::{
    ConfigError, FailMode, Rate, RateLimitBackend, RateLimitConfig, RedisUrl, RedisUrlSource,
    TlsConfig,
};
use crate::net::tls::{Trust, WithTrust};

impl From<RateLimited> for GatewayError {
    fn from(limited: RateLimited) -> GatewayError {
        GatewayError::RateLimited {
            retry_after: limited.retry_after,
            limit: limited.limit,
        }
    }
}

/// Over the limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rate limit of {limit} requests per second reached")]
pub struct RateLimited {
    /// When a slot will be free.
    pub retry_after: Duration,
    /// The rate of the bucket that refused, in requests per second.
    pub limit: f64,
}

/// Which backend is deciding, for logs, readiness and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Local,
    Redis,
    /// Redis is away; `fail_mode` decides.
    Fallback(FailMode),
}

/// The limiter shared by all connections.
#[derive(Debug)]
pub struct Limiter {
    max_wait: Option<Duration>,
    local: LocalBuckets,
    redis: Option<RedisBackend>,
    /// Calls that waited for a slot, and calls refused, since start.
    waited: AtomicU64,
    rejected: AtomicU64,
    /// Per client (by quota client index): what it was granted and refused.
    clients: Vec<ClientCounts>,
}

/// One client's figures, exported per `client` label.
#[derive(Debug)]
struct ClientCounts {
    name: Arc<str>,
    granted: AtomicU64,
    refused: AtomicU64,
    /// How long granted attempts waited for their slot.
    wait: Latency,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    client: String,
}

impl Limiter {
    /// `keys`: names of the distinct AccessKeys (their index is the quota
    /// key); `routes`: the route buckets' patterns and rates; `redis_url`:
    /// the URL `config::resolve` read for `backend = "redis"`, with the
    /// `[tls]` trust (`None`: the config's `redis_url`, or the default,
    /// trusting the default `[tls]`). The config is validated here
    /// too, so that no config, however it was made, builds a limiter that
    /// fails at its first use. Needs a tokio runtime for `backend = "redis"`.
    pub fn new(
        config: Option<&RateLimitConfig>,
        redis_url: Option<&WithTrust<RedisUrl>>,
        keys: &[Arc<str>],
        routes: &[(String, Rate)],
        clients: &[QuotaClient],
    ) -> Result<Limiter, ConfigError> {
        assert!(!clients.is_empty(), "the default client is always there");
        if let Some(c) = config {
            c.validate()?;
        }
        let key_rate = config
            .map(|c| Rate::new(c.requests_per_second, c.burst))
            .transpose()
            .map_err(|e| e.named("rate_limit.requests_per_second", "rate_limit.burst"))?;
        let route_rates: Vec<Rate> = routes.iter().map(|(_, r)| *r).collect();
        let redis = match config {
            Some(c) if c.backend == RateLimitBackend::Redis => {
                let url = match redis_url {
                    Some(url) => url.clone(),
                    None => match c.redis_url_source()? {
                        RedisUrlSource::Inline(_) | RedisUrlSource::Default => WithTrust::new(
                            c.resolve_redis_url(&|_| None)?,
                            Trust::load(&TlsConfig::default())?,
                        ),
                        RedisUrlSource::Env(_) => {
                            return Err(ConfigError::new(
                                "rate_limit.redis_url_env",
                                "not read: config::resolve reads it",
                            ));
                        }
                        RedisUrlSource::File(_) => {
                            return Err(ConfigError::new(
                                "rate_limit.redis_url_file",
                                "not read: config::resolve reads it",
                            ));
                        }
                    },
                };
                Some(RedisBackend::new(
                    c,
                    &url,
                    keys,
                    routes,
                    key_rate,
                    &route_rates,
                    clients,
                )?)
            }
            _ => None,
        };
        Ok(Limiter {
            max_wait: config
                .map(|c| c.max_wait_ms)
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
            local: LocalBuckets::new(keys.len(), key_rate, &route_rates, clients, 1.0),
            redis,
            waited: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            clients: clients
                .iter()
                .map(|c| ClientCounts {
                    name: c.name.clone(),
                    granted: AtomicU64::new(0),
                    refused: AtomicU64::new(0),
                    wait: Latency::default(),
                })
                .collect(),
        })
    }

    pub fn backend_state(&self) -> BackendState {
        match &self.redis {
            None => BackendState::Local,
            Some(r) if r.healthy.load(Ordering::Acquire) => BackendState::Redis,
            Some(r) => BackendState::Fallback(r.fail_mode),
        }
    }

    /// Calls that waited for a slot since start.
    pub fn waited(&self) -> u64 {
        self.waited.load(Ordering::Relaxed)
    }

    /// Calls refused since start.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Per client: its name, the slots it was granted and those it was
    /// refused since start.
    pub fn per_client(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.clients.iter().map(|c| {
            (
                &*c.name,
                c.granted.load(Ordering::Relaxed),
                c.refused.load(Ordering::Relaxed),
            )
        })
    }

    /// Waits, refusals, and whether the shared limiter is away.
    pub fn describe(&self, e: &mut DescriptorEncoder) -> Described {
        families::counter(
            e,
            "rate_limit_waits",
            "Attempts that waited for a rate-limit slot.",
            self.waited(),
        )?;
        families::counter(
            e,
            "rate_limit_rejections",
            "Attempts refused by the rate limiter (429).",
            self.rejected(),
        )?;
        let fallback = matches!(self.backend_state(), BackendState::Fallback(_));
        families::gauge(
            e,
            "rate_limit_fallback",
            "1 while the shared (Redis) rate limiter is away and fail_mode decides.",
            i64::from(fallback),
        )?;
        for (name, help, granted) in [
            (
                "quota_granted",
                "Quota slots granted (every attempt takes one), per client.",
                true,
            ),
            (
                "quota_refused",
                "Attempts refused a quota slot (429), per client.",
                false,
            ),
        ] {
            let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for c in &self.clients {
                let n = if granted { &c.granted } else { &c.refused };
                let labels = ClientLabels {
                    client: c.name.to_string(),
                };
                ConstCounter::new(n.load(Ordering::Relaxed))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = e.encode_descriptor(
            "quota_wait_seconds",
            "How long granted attempts waited for their quota slot, per client.",
            None,
            MetricType::Histogram,
        )?;
        for c in &self.clients {
            let labels = ClientLabels {
                client: c.name.to_string(),
            };
            c.wait.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// Takes a slot for one attempt of quota key `key` on route bucket
    /// `route`, for `client` (0: calls of no known client).
    pub async fn acquire(
        &self,
        key: usize,
        route: Option<usize>,
        client: usize,
    ) -> Result<(), RateLimited> {
        let started = Instant::now();
        let deadline = self.max_wait.map(|w| started + w);
        let result = match &self.redis {
            None => self.local.acquire(key, route, client, deadline).await,
            // Boxed: a round trip's state, kept out of every call's future.
            Some(redis) => Box::pin(redis.acquire(key, route, client, deadline)).await,
        };
        let counts = &self.clients[client];
        match &result {
            Err(_) => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                self.rejected.fetch_add(1, Ordering::Relaxed);
            }
            Ok(()) => {
                counts.granted.fetch_add(1, Ordering::Relaxed);
                let waited = started.elapsed();
                counts.wait.observe(waited);
                if waited > Duration::from_millis(1) {
                    self.waited.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MAX_BURST, MAX_PER_SECOND, MIN_FALLBACK_SHARE, MIN_PER_SECOND};

    fn rate(per_second: f64, burst: u32) -> Rate {
        Rate::new(per_second, Some(burst)).unwrap()
    }

    fn limiter(per_second: f64, burst: u32, max_wait_ms: u64) -> Limiter {
        let c = RateLimitConfig {
            max_wait_ms,
            redis_key_prefix: "t".into(),
            ..RateLimitConfig::new(per_second, Some(burst))
        };
        Limiter::new(
            Some(&c),
            None,
            &["ak".into()],
            &[("/route".into(), rate(1.0, 1))],
            &QuotaClient::alone(),
        )
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_steady_rate() {
        let l = limiter(10.0, 5, 0);
        for _ in 0..5 {
            assert!(l.acquire(0, None, 0).await.is_ok());
        }
        let refused = l.acquire(0, None, 0).await.unwrap_err();
        assert_eq!(refused.limit, 10.0);
        assert!(
            refused.retry_after <= Duration::from_millis(100),
            "{refused:?}"
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(l.acquire(0, None, 0).await.is_ok(), "one slot per 100 ms");
        assert!(l.acquire(0, None, 0).await.is_err());
        // Over 10 s at most 10/s go through.
        let mut passed = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            if l.acquire(0, None, 0).await.is_ok() {
                passed += 1;
            }
        }
        assert!((99..=101).contains(&passed), "{passed}");
        assert_eq!(l.rejected(), 2 + (1000 - passed));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_a_slot_in_arrival_order() {
        let l = Arc::new(limiter(10.0, 1, 1_000));
        assert!(l.acquire(0, None, 0).await.is_ok());
        let started = Instant::now();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (l, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                l.acquire(0, None, 0).await.unwrap();
                order.lock().unwrap().push((i, started.elapsed()));
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap();
        let ids: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4], "first come, first served");
        let last = order.last().unwrap().1;
        assert!(
            last >= Duration::from_millis(490) && last <= Duration::from_millis(510),
            "{last:?}"
        );
        assert_eq!(l.waited(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_at_once_what_could_not_be_served_in_time() {
        // 10/s and 250 ms of patience: the queue holds 3.
        let l = Arc::new(limiter(10.0, 1, 250));
        assert!(l.acquire(0, None, 0).await.is_ok());
        let mut waiting = Vec::new();
        for _ in 0..3 {
            let l = l.clone();
            waiting.push(tokio::spawn(async move { l.acquire(0, None, 0).await }));
            tokio::task::yield_now().await;
        }
        let before = Instant::now();
        let refused = l.acquire(0, None, 0).await;
        assert!(refused.is_err(), "queue is full");
        assert_eq!(before.elapsed(), Duration::ZERO, "refused without waiting");
        let results: Vec<_> = futures_join(waiting).await;
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
        assert_eq!(
            results.iter().filter(|r| r.is_err()).count(),
            1,
            "the third would pass 250 ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_gives_its_place_up() {
        let l = Arc::new(limiter(10.0, 1, 150));
        assert!(l.acquire(0, None, 0).await.is_ok());
        // 150 ms of patience at 10/s: the queue holds 2.
        let spawn = |l: &Arc<Limiter>| {
            let l = l.clone();
            tokio::spawn(async move { l.acquire(0, None, 0).await })
        };
        let leaver = spawn(&l);
        tokio::task::yield_now().await;
        let stayer = spawn(&l);
        tokio::task::yield_now().await;
        assert!(
            l.acquire(0, None, 0).await.is_err(),
            "queue full: refused at the door"
        );

        tokio::time::advance(Duration::from_millis(60)).await;
        leaver.abort();
        let _ = leaver.await;
        let newcomer = spawn(&l);
        assert!(stayer.await.unwrap().is_ok());
        assert!(
            newcomer.await.unwrap().is_ok(),
            "the place given up let the newcomer in, and it was served in time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_must_pass_its_route_and_its_key() {
        let l = limiter(100.0, 100, 0);
        assert!(l.acquire(0, Some(0), 0).await.is_ok());
        let refused = l.acquire(0, Some(0), 0).await.unwrap_err();
        assert_eq!(refused.limit, 1.0, "the route bucket refused");
        assert!(
            l.acquire(0, None, 0).await.is_ok(),
            "other routes still pass"
        );
    }

    #[test]
    fn rates_validate_and_default_burst_to_one_second() {
        assert_eq!(Rate::new(50.0, None).unwrap().burst(), 50);
        assert_eq!(Rate::new(0.5, None).unwrap().burst(), 1);
        assert_eq!(Rate::new(1e6, None).unwrap().burst(), MAX_BURST);
        assert!(Rate::new(0.0, None).is_err());
        assert!(Rate::new(-1.0, None).is_err());
        assert!(Rate::new(f64::NAN, None).is_err());
        assert_eq!(rate(10.0, 4).scaled(0.5), rate(5.0, 2));
    }

    pub(super) const PER_SECOND: [f64; 19] = [
        f64::NAN,
        f64::NEG_INFINITY,
        -1.0,
        -0.0,
        0.0,
        5e-324,
        1e-20,
        5e-10,
        0.000_999_9,
        MIN_PER_SECOND,
        0.5,
        1.0,
        333_333.0,
        MAX_PER_SECOND,
        1_000_000.000_1,
        1e9,
        1e300,
        f64::MAX,
        f64::INFINITY,
    ];
    pub(super) const BURST: [Option<u32>; 7] = [
        None,
        Some(0),
        Some(1),
        Some(2),
        Some(MAX_BURST),
        Some(MAX_BURST + 1),
        Some(u32::MAX),
    ];
    pub(super) const SHARE: [f64; 10] = [
        f64::NAN,
        f64::NEG_INFINITY,
        -1.0,
        0.0,
        1e-300,
        0.000_999,
        MIN_FALLBACK_SHARE,
        0.5,
        1.0,
        1.5,
    ];

    pub(super) fn rate_in_bounds(r: f64) -> bool {
        (MIN_PER_SECOND..=MAX_PER_SECOND).contains(&r)
    }

    pub(super) fn burst_in_bounds(b: Option<u32>) -> bool {
        b.is_none_or(|b| (1..=MAX_BURST).contains(&b))
    }

    fn dead_redis_url() -> WithTrust<RedisUrl> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        WithTrust::new(
            RedisUrl::parse(&format!("redis://:pw@127.0.0.1:{port}"), "t").unwrap(),
            Trust::load(&TlsConfig::default()).unwrap(),
        )
    }

    /// The keys of `c` out of bounds, by an oracle independent of `validate`.
    fn out_of_bounds(c: &RateLimitConfig) -> Vec<&'static str> {
        let mut bad = Vec::new();
        if !rate_in_bounds(c.requests_per_second) {
            bad.push("rate_limit.requests_per_second");
        }
        if !burst_in_bounds(c.burst) {
            bad.push("rate_limit.burst");
        }
        if !(MIN_FALLBACK_SHARE..=1.0).contains(&c.fallback_share) {
            bad.push("rate_limit.fallback_share");
        }
        if !(1..=crate::config::MAX_DURATION_MS).contains(&c.redis_timeout_ms) {
            bad.push("rate_limit.redis_timeout_ms");
        }
        if c.max_wait_ms > crate::config::MAX_DURATION_MS {
            bad.push("rate_limit.max_wait_ms");
        }
        bad
    }

    /// `Limiter::new` over extreme configs, with the local backend and with
    /// Redis (unreachable: each fail mode's path runs, the local fallback
    /// at `fallback_share`): either a config error naming a key that is out
    /// of bounds, or a limiter whose acquires answer without a panic.
    // Long on purpose: the table of configs reads best next to the loop that checks each one.
    #[tokio::test(start_paused = true)]
    async fn limiter_new_over_extreme_values_fails_cleanly_or_works() {
        let max_ms = crate::config::MAX_DURATION_MS;
        let mut configs = Vec::new();
        for r in PER_SECOND {
            for b in BURST {
                configs.push(RateLimitConfig::new(r, b));
            }
        }
        for backend in [RateLimitBackend::Local, RateLimitBackend::Redis] {
            for fail_mode in [FailMode::Local, FailMode::Open, FailMode::Closed] {
                for (r, b) in [
                    (MIN_PER_SECOND, Some(MAX_BURST)),
                    (MIN_PER_SECOND, Some(1)),
                    (MAX_PER_SECOND, None),
                    (MAX_PER_SECOND, Some(1)),
                ] {
                    for fallback_share in SHARE {
                        configs.push(RateLimitConfig {
                            backend,
                            fail_mode,
                            fallback_share,
                            ..RateLimitConfig::new(r, b)
                        });
                    }
                    for (max_wait_ms, redis_timeout_ms) in [
                        (max_ms, 1),
                        (max_ms + 1, 50),
                        (u64::MAX, 50),
                        (1, max_ms),
                        (0, max_ms + 1),
                        (0, u64::MAX),
                        (0, 0),
                    ] {
                        configs.push(RateLimitConfig {
                            backend,
                            fail_mode,
                            max_wait_ms,
                            redis_timeout_ms,
                            fallback_share: MIN_FALLBACK_SHARE,
                            ..RateLimitConfig::new(r, b)
                        });
                    }
                }
            }
        }
        let routes = [
            (
                "/slow".to_owned(),
                Rate::new(MIN_PER_SECOND, Some(MAX_BURST)).unwrap(),
            ),
            (
                "/fast".to_owned(),
                Rate::new(MAX_PER_SECOND, Some(1)).unwrap(),
            ),
        ];
        let redis = dead_redis_url();
        let (mut built, mut refused) = (0, 0);
        for c in &configs {
            let bad = out_of_bounds(c);
            let keys = ["ak".into(), "ak2".into()];
            match Limiter::new(Some(c), Some(&redis), &keys, &routes, &QuotaClient::alone()) {
                Err(e) => {
                    assert!(
                        bad.contains(&e.key.as_str()),
                        "{c:?}: {e} (out of bounds: {bad:?})"
                    );
                    refused += 1;
                }
                Ok(l) => {
                    assert!(bad.is_empty(), "{c:?} built with {bad:?} out of bounds");
                    let first = l.acquire(0, None, 0).await;
                    if c.backend == RateLimitBackend::Local {
                        assert!(first.is_ok(), "{c:?}: {first:?}");
                    }
                    for route in [None, Some(0), Some(1)] {
                        let _ = l.acquire(0, route, 0).await;
                        let _ = l.acquire(1, route, 0).await;
                    }
                    built += 1;
                }
            }
        }
        assert!(
            built > 50 && refused > 50,
            "{built} built, {refused} refused"
        );
    }

    async fn futures_join<T: Send + 'static>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }
}
