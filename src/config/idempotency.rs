//! `[idempotency]`: callers' `Idempotency-Key`s on write and unknown calls,
//! and the store that remembers them.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::rate_limit::RedisUrlKeys;
use crate::base::redact;

/// Largest `max_response_bytes`.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Where keys are remembered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdempotencyBackend {
    /// A file under `path`, held by this process; survives restarts.
    #[default]
    Local,
    /// Redis, shared by every replica.
    Redis,
}

/// `[idempotency]`. Absent: the feature is off and the header passes
/// through untouched. `Debug` shows URLs redacted.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// `local` (a file under `path`) or `redis` (shared by every replica).
    /// `store`, its name before the other sections' `backend`, is read too.
    #[serde(alias = "store")]
    pub backend: IdempotencyBackend,
    /// Directory of the local store (`backend = "local"`); created if missing.
    pub path: PathBuf,
    /// Redis for `backend = "redis"`: the URL itself, or (at most one of the
    /// three) `redis_url_env` or `redis_url_file`; none: redis://127.0.0.1:6379.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Environment variable holding the Redis URL (which may hold a password).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url_env: Option<String>,
    /// File holding the Redis URL (trailing whitespace ignored).
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
    /// Replicas each key's write must reach (Redis `WAIT`) before its call
    /// goes on: a key written only to a master that then fails over would
    /// be lost, and its call sent again. Fewer in time: the store counts as
    /// unavailable (503, nothing sent). Default: 1 with `redis_mode =
    /// "sentinel"`, else 0 (set it when a Cluster has replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_wait_replicas: Option<u32>,
    /// Longest a call waits for one Redis operation, in milliseconds; past
    /// it the keyed call is refused (503), nothing sent.
    pub redis_timeout_ms: u64,
    /// Prefix of the Redis keys.
    pub redis_key_prefix: String,
    /// How long a key is remembered after its first use, in milliseconds.
    pub ttl_ms: u64,
    /// Largest answer kept for replays, in bytes (status and headers
    /// aside). A larger one reaches its caller whole but is not kept.
    pub max_response_bytes: usize,
    /// Make a key mandatory on `write` calls (400 without one).
    pub require_key: bool,
    /// Added to the call's `retry.deadline_ms` to make the lease of a
    /// reservation, in milliseconds: a reservation older than that lost its
    /// owner (crash, kill), and its outcome is unknown.
    pub lease_margin_ms: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            backend: IdempotencyBackend::Local,
            path: PathBuf::from("/var/lib/pandagate/idempotency"),
            redis_url: None,
            redis_url_env: None,
            redis_url_file: None,
            redis_mode: super::RedisMode::Standalone,
            redis_urls: Vec::new(),
            redis_sentinel_master: None,
            redis_sentinel_auth: None,
            redis_wait_replicas: None,
            redis_timeout_ms: 250,
            redis_key_prefix: "pandagate".into(),
            ttl_ms: 24 * 3600 * 1000,
            max_response_bytes: 1024 * 1024,
            require_key: false,
            lease_margin_ms: 5_000,
        }
    }
}

impl fmt::Debug for IdempotencyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        redact::debug("IdempotencyConfig", self, f)
    }
}

impl IdempotencyConfig {
    /// Checks every key without reading the environment or any file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("idempotency.ttl_ms", self.ttl_ms),
            ("idempotency.redis_timeout_ms", self.redis_timeout_ms),
            (
                "idempotency.max_response_bytes",
                self.max_response_bytes as u64,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        if self.redis_wait_replicas.is_some_and(|n| n > 16) {
            return Err(ConfigError::new(
                "idempotency.redis_wait_replicas",
                "must be at most 16",
            ));
        }
        if self.max_response_bytes > MAX_RESPONSE_BYTES {
            return Err(ConfigError::new(
                "idempotency.max_response_bytes",
                format_args!(
                    "must be at most {MAX_RESPONSE_BYTES} (64 MiB): a kept answer is held in \
                     memory while the call ends, and stored whole"
                ),
            ));
        }
        if self.backend == IdempotencyBackend::Local && self.path.as_os_str().is_empty() {
            return Err(ConfigError::new("idempotency.path", "must not be empty"));
        }
        if self.redis_key_prefix.is_empty() {
            return Err(ConfigError::new(
                "idempotency.redis_key_prefix",
                "must not be empty",
            ));
        }
        self.check_redis_url()
    }
}

impl IdempotencyConfig {
    /// Replicas each write must reach: `redis_wait_replicas`, or its default.
    pub fn wait_replicas(&self) -> u32 {
        self.redis_wait_replicas
            .unwrap_or(u32::from(self.redis_mode == super::RedisMode::Sentinel))
    }
}

impl RedisUrlKeys for IdempotencyConfig {
    const KEY: &'static str = "idempotency.redis_url";

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
        self.backend == IdempotencyBackend::Redis
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn section_absent_means_off_and_present_means_defaults() {
        assert!(Config::from_toml("").unwrap().idempotency.is_none());
        let c = Config::from_toml("[idempotency]\n").unwrap();
        let i = c.idempotency.unwrap();
        assert_eq!(i.backend, IdempotencyBackend::Local);
        assert_eq!(i.ttl_ms, 86_400_000);
        assert_eq!(i.max_response_bytes, 1_048_576);
        assert!(!i.require_key);
    }

    #[test]
    fn bad_values_are_named() {
        for (toml, key) in [
            ("ttl_ms = 0", "idempotency.ttl_ms"),
            ("max_response_bytes = 0", "idempotency.max_response_bytes"),
            ("redis_timeout_ms = 0", "idempotency.redis_timeout_ms"),
            (
                "max_response_bytes = 67108865",
                "idempotency.max_response_bytes",
            ),
            (
                "backend = \"redis\"\nredis_url = \"redis://a\"\nredis_url_env = \"X\"",
                "idempotency.redis_url",
            ),
            (
                "store = \"redis\"\nredis_url = \"nope://:pw-9@h\"",
                "idempotency.redis_url",
            ),
        ] {
            let c = Config::from_toml(&format!("[idempotency]\n{toml}\n")).unwrap();
            let e = c.idempotency.unwrap().validate().unwrap_err();
            assert_eq!(e.key, key, "{toml}: {e}");
            assert!(!e.to_string().contains("pw-9"), "{e}");
        }
        let e = Config::from_toml("[idempotency]\nbackend = \"memcached\"\n").unwrap_err();
        assert_eq!(e.key, "idempotency.backend", "{e}");
    }

    #[test]
    fn store_is_read_as_backend_and_both_at_once_are_refused() {
        for (toml, backend) in [
            ("backend = \"redis\"", IdempotencyBackend::Redis),
            ("store = \"redis\"", IdempotencyBackend::Redis),
            ("store = \"local\"", IdempotencyBackend::Local),
        ] {
            let c = Config::from_toml(&format!("[idempotency]\n{toml}\n")).unwrap();
            assert_eq!(c.idempotency.unwrap().backend, backend, "{toml}");
        }
        let both = "[idempotency]\nbackend = \"redis\"\nstore = \"local\"\n";
        let e = Config::from_toml(both).unwrap_err();
        assert!(e.to_string().contains("backend"), "{e}");
    }

    #[test]
    fn redis_url_from_the_environment_is_read_and_never_shown() {
        let c =
            Config::from_toml("[idempotency]\nstore = \"redis\"\nredis_url_env = \"IDEM_REDIS\"\n")
                .unwrap();
        let i = c.idempotency.unwrap();
        let env = crate::config::testing::env_of(&[("IDEM_REDIS", "redis://:pw-7@127.0.0.1:1")]);
        let url = i.resolve_redis_url(&env).unwrap();
        assert_eq!(url.expose(), "redis://:pw-7@127.0.0.1:1");
        assert!(!format!("{url:?} {i:?}").contains("pw-7"));
        let e = i.resolve_redis_url(&|_: &str| None).unwrap_err();
        assert_eq!(e.key, "idempotency.redis_url_env", "{e}");
    }
}
