//! `[rate_limit]`: the provider's quota per AccessKey, where it is kept
//! (this process or Redis), and the bounds within which a rate is one.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{self, ConfigError, Env};
use super::secrets::SecretSource;
use crate::base::redact;

/// Slowest rate a bucket may have: one request every 1000 seconds.
pub const MIN_PER_SECOND: f64 = 0.001;
/// Fastest rate a bucket may have: one request per microsecond, the
/// resolution of the Redis backend's clock.
pub const MAX_PER_SECOND: f64 = 1_000_000.0;
/// Largest burst a bucket may have.
pub const MAX_BURST: u32 = 1_000_000;
/// Smallest `fallback_share`: one replica in a thousand.
pub const MIN_FALLBACK_SHARE: f64 = 0.001;
/// Largest `quota_share` / `share`; the smallest is above 0.
pub const MAX_SHARE: f64 = 1000.0;
/// The name of the calls of no known client.
pub const DEFAULT_CLIENT: &str = "default";

/// The Redis URL used when `[rate_limit]` names none.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// `[rate_limit]`. Absent: no per-key limit. `Debug` shows URLs redacted.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The provider's quota for one AccessKey, in requests per second
    /// (`MIN_PER_SECOND..=MAX_PER_SECOND`).
    pub requests_per_second: f64,
    /// Requests that may go at once after a quiet spell (`1..=MAX_BURST`);
    /// default: one second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// 0: over the limit means 429 at once. Otherwise a call may wait this
    /// many milliseconds for a slot.
    #[serde(default)]
    pub max_wait_ms: u64,
    /// `local` (this process) or `redis` (shared by every replica).
    #[serde(default)]
    pub backend: RateLimitBackend,
    /// Redis for `backend = "redis"`: the URL itself, or (at most one of
    /// the three) `redis_url_env` or `redis_url_file`; none:
    /// [`DEFAULT_REDIS_URL`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Environment variable holding the Redis URL (which may hold a password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url_env: Option<String>,
    /// File holding the Redis URL (trailing whitespace ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_url_file: Option<PathBuf>,
    /// `standalone` (one server: `redis_url`), `cluster` (Redis Cluster:
    /// `redis_urls` are seed nodes) or `sentinel` (the master of
    /// `redis_sentinel_master`, asked of the sentinels in `redis_urls`).
    #[serde(default)]
    pub redis_mode: super::RedisMode,
    /// With `redis_mode` cluster or sentinel: the nodes or sentinels; their
    /// password may be given in `redis_url_env` or `redis_url_file` instead,
    /// as the same list (separated by commas or whitespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redis_urls: Vec<String>,
    /// With `redis_mode = "sentinel"`: the name the sentinels know the master by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_sentinel_master: Option<String>,
    /// With `redis_mode = "sentinel"`: whether the sentinels take the
    /// password (and username) of the URLs too; `false`: they are asked
    /// without, and only the master takes it. Default: `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_sentinel_auth: Option<bool>,
    /// Longest a call waits for a Redis decision, in milliseconds.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// When Redis cannot decide: `local` (a local limiter at `fallback_share`
    /// of the quota), `open` (no limit) or `closed` (429).
    #[serde(default)]
    pub fail_mode: FailMode,
    /// Share of the quota this replica allows on its own while Redis is
    /// away; set it to 1 / the number of replicas.
    #[serde(default = "default_fallback_share")]
    pub fallback_share: f64,
    /// Prefix of the Redis keys.
    #[serde(default = "default_key_prefix")]
    pub redis_key_prefix: String,
    /// Who the calls of no `[[clients]]` entry are, for the quota's shares:
    /// in a sidecar, the service it serves, so that the sidecars of every
    /// service sharing a key through Redis share it by the same rule.
    /// Default: `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// That client's weight (default 1, above 0 up to [`MAX_SHARE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<f64>,
}

fn default_redis_timeout_ms() -> u64 {
    50
}
fn default_fallback_share() -> f64 {
    0.5
}
fn default_key_prefix() -> String {
    "pandagate".into()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitBackend {
    #[default]
    Local,
    Redis,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    #[default]
    Local,
    Open,
    Closed,
}

impl fmt::Debug for RateLimitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        redact::debug("RateLimitConfig", self, f)
    }
}

/// Where the Redis URL comes from. `Debug` and `Display` show an inline
/// URL redacted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RedisUrlSource<'a> {
    /// `redis_url`, written in the config.
    Inline(&'a str),
    /// `redis_url_env`: this environment variable.
    Env(&'a str),
    /// `redis_url_file`: this file.
    File(&'a Path),
    /// None of the three: [`DEFAULT_REDIS_URL`].
    Default,
}

impl fmt::Display for RedisUrlSource<'_> {
    /// Where the URL comes from, never the URL itself (`Inline` shows it redacted).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisUrlSource::Inline(url) => write!(f, "{}", redact::url(url)),
            RedisUrlSource::Env(var) => write!(f, "from environment variable {var}"),
            RedisUrlSource::File(path) => write!(f, "from file {}", path.display()),
            RedisUrlSource::Default => write!(f, "{DEFAULT_REDIS_URL} (the default)"),
        }
    }
}

impl fmt::Debug for RedisUrlSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrlSource({self})")
    }
}

impl RateLimitConfig {
    /// A config with these two values and every other key at its default.
    pub fn new(requests_per_second: f64, burst: Option<u32>) -> RateLimitConfig {
        RateLimitConfig {
            requests_per_second,
            burst,
            max_wait_ms: 0,
            backend: RateLimitBackend::Local,
            redis_url: None,
            redis_url_env: None,
            redis_url_file: None,
            redis_mode: super::RedisMode::Standalone,
            redis_urls: Vec::new(),
            redis_sentinel_master: None,
            redis_sentinel_auth: None,
            redis_timeout_ms: default_redis_timeout_ms(),
            fail_mode: FailMode::Local,
            fallback_share: default_fallback_share(),
            redis_key_prefix: default_key_prefix(),
            client: None,
            share: None,
        }
    }

    /// Checks every key without reading the environment or any file: the
    /// bounds in which the limiter's arithmetic holds, and one source at
    /// most for the Redis URL.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Rate::new(self.requests_per_second, self.burst)
            .map_err(|e| e.named("rate_limit.requests_per_second", "rate_limit.burst"))?;
        if !(MIN_FALLBACK_SHARE..=1.0).contains(&self.fallback_share) {
            return Err(ConfigError::new(
                "rate_limit.fallback_share",
                format_args!("must be between {MIN_FALLBACK_SHARE} and 1"),
            ));
        }
        if self.redis_timeout_ms == 0 {
            return Err(ConfigError::new(
                "rate_limit.redis_timeout_ms",
                "must be greater than 0",
            ));
        }
        if let Some(share) = self.share {
            check_share("rate_limit.share", share)?;
        }
        if let Some(name) = &self.client {
            check_client_name("rate_limit.client", name)?;
        }
        for (key, ms) in [
            ("rate_limit.max_wait_ms", self.max_wait_ms),
            ("rate_limit.redis_timeout_ms", self.redis_timeout_ms),
        ] {
            error::check_duration_ms(key, ms)?;
        }
        self.check_redis_url()
    }
}

/// A weight in the quota: above 0, at most [`MAX_SHARE`].
pub fn check_share(key: &str, share: f64) -> Result<(), ConfigError> {
    if share > 0.0 && share <= MAX_SHARE {
        return Ok(());
    }
    Err(ConfigError::new(
        key,
        format_args!("must be above 0 and at most {MAX_SHARE}, not {share}"),
    ))
}

/// A client's name as the quota keeps it (a Redis hash field, a metric
/// label): 1 to 64 visible ASCII characters.
pub fn check_client_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(());
    }
    Err(ConfigError::new(
        key,
        "must be 1 to 64 visible ASCII characters, without spaces",
    ))
}

/// A section with `redis_url`, `redis_url_env` and `redis_url_file`
/// (`[rate_limit]`, `[idempotency]`, `[cache]`): where its URL comes from,
/// how it is checked and how it is read are the same for every one.
pub trait RedisUrlKeys {
    /// The section's URL key, e.g. `"cache.redis_url"`.
    const KEY: &'static str;

    /// `redis_url`, `redis_url_env`, `redis_url_file`.
    fn redis_url_keys(&self) -> (Option<&str>, Option<&str>, Option<&Path>);

    /// `redis_mode`, `redis_urls`, `redis_sentinel_master`.
    fn redis_topology(&self) -> (RedisMode, &[String], Option<&str>);

    /// `redis_sentinel_auth`.
    fn redis_sentinel_auth(&self) -> Option<bool>;

    /// Whether the section's settings use Redis at all.
    fn uses_redis(&self) -> bool;

    /// Where the Redis URL comes from; more than one source is an error.
    fn redis_url_source(&self) -> Result<RedisUrlSource<'_>, ConfigError> {
        let (url, var, file) = self.redis_url_keys();
        RedisUrlSource::of(url, var, file, Self::KEY)
    }

    /// Reads and checks the Redis URL from its source (`env` for
    /// `redis_url_env`); errors name the source's key, never the URL's
    /// password.
    fn resolve_redis_url(&self, env: Env<'_>) -> Result<RedisUrl, ConfigError> {
        let source = self.redis_url_source()?;
        let (mode, urls, master) = self.redis_topology();
        let urls_key = format!("{}s", Self::KEY);
        check_topology(mode, urls, master, source, Self::KEY)?;
        check_sentinel_auth(mode, self.redis_sentinel_auth(), Self::KEY)?;
        let resolved = match mode {
            RedisMode::Standalone => source.resolve(Self::KEY, env),
            _ if !urls.is_empty() => RedisUrl::servers(mode, urls, master, &urls_key),
            _ => {
                let listed = source.read_text(Self::KEY, env)?;
                let list: Vec<String> = listed
                    .expose()
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect();
                RedisUrl::servers(mode, &list, master, &source.key_of(Self::KEY))
            }
        };
        Ok(resolved?.with_sentinel_auth(self.redis_sentinel_auth().unwrap_or(true)))
    }

    /// At most one source, a topology that fits the mode, and inline URLs
    /// the client can read when the section uses Redis; reads neither the
    /// environment nor files.
    fn check_redis_url(&self) -> Result<(), ConfigError> {
        let source = self.redis_url_source()?;
        let (mode, urls, master) = self.redis_topology();
        check_topology(mode, urls, master, source, Self::KEY)?;
        check_sentinel_auth(mode, self.redis_sentinel_auth(), Self::KEY)?;
        if !self.uses_redis() {
            return Ok(());
        }
        if let RedisUrlSource::Inline(url) = source {
            RedisUrl::parse(url, Self::KEY)?;
        }
        if !urls.is_empty() {
            RedisUrl::servers(mode, urls, master, &format!("{}s", Self::KEY))?;
        }
        Ok(())
    }
}

impl RedisUrlKeys for RateLimitConfig {
    const KEY: &'static str = "rate_limit.redis_url";

    fn redis_url_keys(&self) -> (Option<&str>, Option<&str>, Option<&Path>) {
        (
            self.redis_url.as_deref(),
            self.redis_url_env.as_deref(),
            self.redis_url_file.as_deref(),
        )
    }

    fn redis_topology(&self) -> (super::RedisMode, &[String], Option<&str>) {
        (
            self.redis_mode,
            &self.redis_urls,
            self.redis_sentinel_master.as_deref(),
        )
    }

    fn redis_sentinel_auth(&self) -> Option<bool> {
        self.redis_sentinel_auth
    }

    fn uses_redis(&self) -> bool {
        self.backend == RateLimitBackend::Redis
    }
}

/// How a section finds its Redis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server, at `redis_url`.
    #[default]
    Standalone,
    /// Redis Cluster: `redis_urls` are seed nodes; commands follow MOVED
    /// and ASK to the node that owns each key.
    Cluster,
    /// The master the sentinels in `redis_urls` name for
    /// `redis_sentinel_master`, asked again after a failover.
    Sentinel,
}

/// The topology keys agree with the mode: `redis_urls` only with cluster
/// or sentinel, and then instead of an inline `redis_url`;
/// `redis_sentinel_master` exactly with sentinel. `url_key` is the
/// section's `redis_url` key; errors name the key at fault.
fn check_topology(
    mode: RedisMode,
    urls: &[String],
    master: Option<&str>,
    source: RedisUrlSource<'_>,
    url_key: &str,
) -> Result<(), ConfigError> {
    let section = url_key.trim_end_matches("redis_url");
    let urls_key = format!("{url_key}s");
    match mode {
        RedisMode::Standalone if !urls.is_empty() => Err(ConfigError::new(
            urls_key,
            "only with redis_mode = \"cluster\" or \"sentinel\"; one server is redis_url",
        )),
        RedisMode::Standalone | RedisMode::Cluster if master.is_some() => Err(ConfigError::new(
            format!("{section}redis_sentinel_master"),
            "only with redis_mode = \"sentinel\"",
        )),
        RedisMode::Standalone => Ok(()),
        _ => {
            if mode == RedisMode::Sentinel && master.is_none_or(str::is_empty) {
                return Err(ConfigError::new(
                    format!("{section}redis_sentinel_master"),
                    "name the master the sentinels watch",
                ));
            }
            match (urls.is_empty(), source) {
                (_, RedisUrlSource::Inline(_)) => Err(ConfigError::new(
                    url_key,
                    "with redis_mode cluster or sentinel, list the servers in redis_urls",
                )),
                (true, RedisUrlSource::Default) => Err(ConfigError::new(
                    urls_key,
                    "list the cluster's seed nodes or the sentinels (or name them in redis_url_env or redis_url_file)",
                )),
                (false, RedisUrlSource::Env(_) | RedisUrlSource::File(_)) => Err(ConfigError::new(
                    urls_key,
                    "set redis_urls or redis_url_env / redis_url_file, not both",
                )),
                _ => Ok(()),
            }
        }
    }
}

/// `redis_sentinel_auth` only with `redis_mode = "sentinel"`.
fn check_sentinel_auth(
    mode: RedisMode,
    auth: Option<bool>,
    url_key: &str,
) -> Result<(), ConfigError> {
    if auth.is_some() && mode != RedisMode::Sentinel {
        return Err(ConfigError::new(
            format!(
                "{}redis_sentinel_auth",
                url_key.trim_end_matches("redis_url")
            ),
            "only with redis_mode = \"sentinel\"",
        ));
    }
    Ok(())
}

impl<'a> RedisUrlSource<'a> {
    /// The key of the variable or file the URLs are read from.
    fn key_of(self, key: &str) -> String {
        match self {
            RedisUrlSource::Env(var) => SecretSource::Env(var.to_owned()).key(key),
            RedisUrlSource::File(path) => SecretSource::File(path.to_owned()).key(key),
            _ => key.to_owned(),
        }
    }

    /// The text of `redis_url_env` or `redis_url_file`: a URL, or a list.
    fn read_text(
        self,
        key: &str,
        env: Env<'_>,
    ) -> Result<crate::base::secret::Secret, ConfigError> {
        match self {
            RedisUrlSource::Env(var) => SecretSource::Env(var.to_owned()).read(env, key),
            RedisUrlSource::File(path) => SecretSource::File(path.to_owned()).read(env, key),
            _ => Err(ConfigError::new(key, "no variable or file given")),
        }
    }

    /// The one source among `url`, `var` (`*_env`) and `file` (`*_file`)
    /// that is set, for the section whose URL key is `key`; more than one
    /// is an error.
    pub fn of(
        url: Option<&'a str>,
        var: Option<&'a str>,
        file: Option<&'a Path>,
        key: &str,
    ) -> Result<RedisUrlSource<'a>, ConfigError> {
        match (url, var, file) {
            (None, None, None) => Ok(RedisUrlSource::Default),
            (Some(url), None, None) => Ok(RedisUrlSource::Inline(url)),
            (None, Some(var), None) => Ok(RedisUrlSource::Env(var)),
            (None, None, Some(path)) => Ok(RedisUrlSource::File(path)),
            _ => Err(ConfigError::new(
                key,
                "set at most one of redis_url, redis_url_env and redis_url_file",
            )),
        }
    }

    /// Reads and checks the URL (`env` for an environment variable); errors
    /// name `key` or the source's key, never the URL's password.
    pub fn resolve(self, key: &str, env: Env<'_>) -> Result<RedisUrl, ConfigError> {
        match self {
            RedisUrlSource::Default => RedisUrl::parse(DEFAULT_REDIS_URL, key),
            RedisUrlSource::Inline(url) => RedisUrl::parse(url, key),
            RedisUrlSource::Env(_) | RedisUrlSource::File(_) => {
                let url = self.read_text(key, env)?;
                RedisUrl::parse(url.expose().trim(), &self.key_of(key))
            }
        }
    }
}

/// A Redis URL the backend connects with. It may hold a password, so
/// `Debug` shows it redacted; [`RedisUrl::expose`] is the only way to it.
///
/// With `redis_mode` cluster or sentinel it holds every node or sentinel
/// given; [`RedisUrl::expose`] is the first.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    urls: Vec<crate::base::secret::Secret>,
    mode: RedisMode,
    sentinel_master: Option<String>,
    /// Whether the sentinels take the URLs' credentials too.
    sentinel_auth: bool,
}

impl RedisUrl {
    /// Checks `url` the way the Redis client will read it. The error names
    /// `key` and quotes neither the URL nor its password.
    ///
    /// `rediss://` connects over TLS, trusting `[tls]`; its `#insecure`
    /// fragment, which would turn certificate checks off, is refused: a
    /// server with a certificate of its own CA is trusted through
    /// `tls.ca_file` instead.
    pub fn parse(url: &str, key: &str) -> Result<RedisUrl, ConfigError> {
        match redis::Client::open(url) {
            Ok(client) => match client.get_connection_info().addr() {
                redis::ConnectionAddr::TcpTls { insecure: true, .. } => Err(ConfigError::new(
                    key,
                    "a rediss:// URL ending in #insecure would accept any certificate; \
                     drop #insecure and trust the server's CA with tls.ca_file",
                )),
                _ => Ok(RedisUrl {
                    urls: vec![crate::base::secret::Secret::new(url)],
                    mode: RedisMode::Standalone,
                    sentinel_master: None,
                    sentinel_auth: true,
                }),
            },
            Err(e) => Err(ConfigError::new(
                key,
                format_args!(
                    "not a usable Redis URL ({})",
                    redact::scrub(&e.to_string(), url)
                ),
            )),
        }
    }

    /// Every URL of `urls` checked as [`RedisUrl::parse`] does, all of one
    /// scheme (plain or TLS), for `mode` cluster or sentinel.
    pub fn servers(
        mode: RedisMode,
        urls: &[String],
        sentinel_master: Option<&str>,
        key: &str,
    ) -> Result<RedisUrl, ConfigError> {
        let mut all = Vec::with_capacity(urls.len());
        for (i, url) in urls.iter().enumerate() {
            let one = RedisUrl::parse(url, &format!("{key}[{i}]"))?;
            all.extend(one.urls);
        }
        let tls = |u: &crate::base::secret::Secret| u.expose().starts_with("rediss://");
        if all.is_empty() {
            return Err(ConfigError::new(key, "list at least one server"));
        }
        if all.iter().any(|u| tls(u) != tls(&all[0])) {
            return Err(ConfigError::new(
                key,
                "all redis:// or all rediss://: one topology speaks TLS or does not",
            ));
        }
        Ok(RedisUrl {
            urls: all,
            mode,
            sentinel_master: sentinel_master.map(str::to_owned),
            sentinel_auth: true,
        })
    }

    /// The same, the sentinels taking the URLs' credentials or not.
    pub fn with_sentinel_auth(mut self, auth: bool) -> RedisUrl {
        self.sentinel_auth = auth;
        self
    }

    /// Whether the sentinels are asked with the URLs' credentials.
    pub fn sentinel_auth(&self) -> bool {
        self.sentinel_auth
    }

    /// The (first) URL.
    pub fn expose(&self) -> &str {
        self.urls[0].expose()
    }

    /// Every URL given: one, the cluster's seed nodes, or the sentinels.
    pub fn all(&self) -> impl Iterator<Item = &str> {
        self.urls.iter().map(|u| u.expose())
    }

    pub fn mode(&self) -> RedisMode {
        self.mode
    }

    /// The master's name, with `redis_mode = "sentinel"`.
    pub fn sentinel_master(&self) -> Option<&str> {
        self.sentinel_master.as_deref()
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.all().map(|u| redact::url(u).into_owned()).collect();
        match self.mode {
            RedisMode::Standalone => write!(f, "RedisUrl({})", urls.join(", ")),
            mode => write!(f, "RedisUrl({mode:?}: {})", urls.join(", ")),
        }
    }
}

/// One bucket's rule: a rate and a burst within the bounds above, so that
/// no interval, burst tolerance or deadline computed from it overflows.
/// Only [`Rate::new`] makes one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    per_second: f64,
    burst: u32,
}

/// A rate or burst out of bounds: which of the two, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateError {
    PerSecond(String),
    Burst(String),
}

impl RateError {
    /// The error as a config error naming the key it is about.
    pub fn named(self, per_second_key: &str, burst_key: &str) -> ConfigError {
        match self {
            RateError::PerSecond(m) => ConfigError::new(per_second_key, m),
            RateError::Burst(m) => ConfigError::new(burst_key, m),
        }
    }
}

impl Rate {
    /// `per_second` within `MIN_PER_SECOND..=MAX_PER_SECOND`; `burst`
    /// within `1..=MAX_BURST`, by default one second's worth (at least 1).
    pub fn new(per_second: f64, burst: Option<u32>) -> Result<Rate, RateError> {
        if !(MIN_PER_SECOND..=MAX_PER_SECOND).contains(&per_second) {
            return Err(RateError::PerSecond(format!(
                "must be between {MIN_PER_SECOND} and {MAX_PER_SECOND} requests per second, \
                 not {per_second:?}"
            )));
        }
        let burst = match burst {
            Some(b) if !(1..=MAX_BURST).contains(&b) => {
                return Err(RateError::Burst(format!(
                    "must be between 1 and {MAX_BURST}, not {b}"
                )));
            }
            Some(b) => b,
            None => (per_second.ceil() as u32).clamp(1, MAX_BURST),
        };
        Ok(Rate { per_second, burst })
    }

    /// Requests per second.
    pub fn per_second(self) -> f64 {
        self.per_second
    }

    /// Requests that may go at once.
    pub fn burst(self) -> u32 {
        self.burst
    }

    /// Time between two slots, in whole nanoseconds: at least 1, and small
    /// enough that it times the burst, plus any instant of the next 292
    /// years, fits in u64 nanoseconds.
    pub(crate) fn interval_nanos(self) -> u64 {
        let ceiling = (u64::MAX / 2) / u64::from(self.burst.max(1));
        // A NaN or infinite quotient cannot come from `new`; it would cast to 0 or u64::MAX.
        ((1e9 / self.per_second).round() as u64).clamp(1, ceiling)
    }

    /// Time between two slots.
    pub fn interval(self) -> Duration {
        Duration::from_nanos(self.interval_nanos())
    }

    /// This rate and burst times `share` (a `fallback_share`, clamped to
    /// `MIN_FALLBACK_SHARE..=1`); the burst stays at least 1.
    pub(crate) fn scaled(self, share: f64) -> Rate {
        let share = if share.is_nan() {
            1.0
        } else {
            share.clamp(MIN_FALLBACK_SHARE, 1.0)
        };
        Rate {
            per_second: self.per_second * share,
            burst: ((f64::from(self.burst) * share).floor() as u32).max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rediss_is_accepted_and_its_insecure_fragment_refused() {
        for url in [
            "redis://127.0.0.1:6379",
            "rediss://:pw-1@redis.internal:6380/2",
            "rediss://redis.internal",
        ] {
            RedisUrl::parse(url, "k").unwrap();
        }
        for url in [
            "rediss://:pw-2@redis.internal:6380/#insecure",
            "rediss://:pw-2@redis.internal/0#insecure",
        ] {
            let e = RedisUrl::parse(url, "k").unwrap_err();
            assert_eq!(e.key, "k");
            assert!(e.message.contains("tls.ca_file"), "{e}");
            assert!(!e.to_string().contains("pw-2"), "{e}");
        }
    }
}
