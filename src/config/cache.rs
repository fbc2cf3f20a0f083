//! `[cache]`: where cached read answers are kept (see `[[routes]]`
//! `cache_ttl_ms`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::rate_limit::RedisUrlKeys;

/// Where the read cache's entries live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheBackend {
    /// This process's memory only.
    #[default]
    Local,
    /// Also Redis, so replicas share each other's answers.
    Redis,
}

/// `[cache]`. Used only when a route sets `cache_ttl_ms`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Most bytes of answers kept in this process (least recently and
    /// least often used go first).
    pub max_bytes: u64,
    /// Largest answer kept, in bytes; a larger one is passed on, not kept.
    pub max_entry_bytes: usize,
    /// Longest a call waits for an identical call already asking the
    /// provider, in milliseconds; then it asks itself.
    pub coalesce_wait_ms: u64,
    /// `local` (this process) or `redis` (memory, then Redis: replicas share
    /// answers).
    pub backend: CacheBackend,
    /// Redis for `backend = "redis"`, like `[rate_limit]`'s: `redis_url`,
    /// `redis_url_env` or `redis_url_file`; none: redis://127.0.0.1:6379.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
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
    /// Longest a call waits for Redis, in milliseconds; past it, a miss.
    pub redis_timeout_ms: u64,
    /// Prefix of the Redis keys.
    pub redis_key_prefix: String,
    /// The caller headers a cached route sends to the provider, each also
    /// part of the cache key (lower-case names). No other caller header
    /// reaches the provider on a cached route, so no caller can shape an
    /// answer another caller gets; W3C trace context (`traceparent`,
    /// `tracestate`) passes too, outside the key.
    pub forward_headers: Vec<String>,
    /// Longest a purge may take to find and delete its keys in Redis, in
    /// milliseconds; a purge not done by then says so.
    pub purge_timeout_ms: u64,
}

/// What a cached route forwards and keys by default: the headers a JSON
/// API's answer may depend on.
pub const DEFAULT_FORWARD_HEADERS: [&str; 4] = [
    "accept",
    "accept-language",
    "content-type",
    "content-encoding",
];

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            max_entry_bytes: 256 * 1024,
            coalesce_wait_ms: 5_000,
            backend: CacheBackend::Local,
            redis_url: None,
            redis_url_env: None,
            redis_url_file: None,
            redis_mode: super::RedisMode::Standalone,
            redis_urls: Vec::new(),
            redis_sentinel_master: None,
            redis_sentinel_auth: None,
            redis_timeout_ms: 50,
            redis_key_prefix: "pandagate".into(),
            forward_headers: DEFAULT_FORWARD_HEADERS.map(str::to_owned).to_vec(),
            purge_timeout_ms: 10_000,
        }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("cache.max_bytes", self.max_bytes),
            ("cache.max_entry_bytes", self.max_entry_bytes as u64),
            ("cache.coalesce_wait_ms", self.coalesce_wait_ms),
            ("cache.redis_timeout_ms", self.redis_timeout_ms),
            ("cache.purge_timeout_ms", self.purge_timeout_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        if self.max_entry_bytes as u64 > self.max_bytes {
            return Err(ConfigError::new(
                "cache.max_entry_bytes",
                "must be at most cache.max_bytes",
            ));
        }
        for (i, name) in self.forward_headers.iter().enumerate() {
            let key = format!("cache.forward_headers[{i}]");
            let Ok(header) = http::HeaderName::from_bytes(name.as_bytes()) else {
                return Err(ConfigError::new(key, "not a header name"));
            };
            if header.as_str() != name {
                return Err(ConfigError::new(key, "write header names in lower case"));
            }
            if crate::pandapon::headers::never_forwarded(&header) {
                return Err(ConfigError::new(
                    key,
                    format_args!(
                        "{name} is the gateway's own or a connection's header: never forwarded"
                    ),
                ));
            }
        }
        self.check_redis_url()
    }
}

impl RedisUrlKeys for CacheConfig {
    const KEY: &'static str = "cache.redis_url";

    fn redis_url_keys(&self) -> (Option<&str>, Option<&str>, Option<&std::path::Path>) {
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
        self.backend == CacheBackend::Redis
    }
}
