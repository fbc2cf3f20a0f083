//! `[[routes]]`: per-path overrides of the endpoint catalogue, and the
//! classes a path can have.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::rate_limit::{Rate, RateError};

/// Whether a call may be repeated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Read,
    Write,
    Unknown,
}

impl Class {
    /// Only reads are ever sent twice once a byte may have reached the provider.
    pub fn repeatable(self) -> bool {
        self == Class::Read
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
            Class::Unknown => "unknown",
        }
    }
}

/// The v1 spelling of a path, borrowing when it already is one.
pub fn v1_form(path: &str) -> (&'static str, &str) {
    if let Some(rest) = path.strip_prefix("/v2/taobao/") {
        ("/open/", rest)
    } else if let Some(rest) = path.strip_prefix("/v2/alibaba/") {
        ("/alibaba/", rest)
    } else {
        ("", path)
    }
}

/// A `[[routes]]` entry: overrides for one path or a family of paths.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The exact path (no query) this entry applies to...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// ...or every path that starts with this. The longest match wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// `read`, `write` or `unknown` (treated as write), replacing the catalogue's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    /// Replaces `retry.max_attempts` for these paths.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Replaces the per-attempt timeout for these paths, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt_timeout_ms: Option<u64>,
    /// A bucket of its own for these paths, per AccessKey, in requests per
    /// second; calls pass it and then the key's `[rate_limit]` bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_second: Option<f64>,
    /// Burst of that bucket; default one second's worth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_burst: Option<u32>,
    /// Keep good answers of these paths' `read` calls this long, in
    /// milliseconds; unset: nothing is cached. Never for writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_ttl_ms: Option<u64>,
    /// How long past its TTL an entry may still answer when the provider
    /// cannot (5xx, timeout, no connection, circuit open, over the quota),
    /// in milliseconds; default 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_stale_ms: Option<u64>,
    /// Sort the query's parameters before keying, when their order does not
    /// matter to the provider.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cache_sort_query: bool,
}

impl RouteConfig {
    /// The entry's `path` or `prefix`.
    pub fn pattern(&self) -> &str {
        self.path
            .as_deref()
            .or(self.prefix.as_deref())
            .unwrap_or("")
    }

    /// Checks one entry; `key` names it in errors.
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        match (&self.path, &self.prefix) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(ConfigError::new(key, "set exactly one of path and prefix"));
            }
            _ => {}
        }
        if !self.pattern().starts_with('/') {
            return Err(ConfigError::new(key, "path and prefix must start with /"));
        }
        if self.max_attempts == Some(0) {
            return Err(ConfigError::new(
                format!("{key}.max_attempts"),
                "must be greater than 0",
            ));
        }
        if self.attempt_timeout_ms == Some(0) {
            return Err(ConfigError::new(
                format!("{key}.attempt_timeout_ms"),
                "must be greater than 0",
            ));
        }
        if self.rate_limit_burst.is_some() && self.rate_limit_per_second.is_none() {
            return Err(ConfigError::new(
                format!("{key}.rate_limit_burst"),
                "needs rate_limit_per_second",
            ));
        }
        self.rate().transpose().map_err(|e| {
            e.named(
                &format!("{key}.rate_limit_per_second"),
                &format!("{key}.rate_limit_burst"),
            )
        })?;
        if self.cache_ttl_ms == Some(0) {
            return Err(ConfigError::new(
                format!("{key}.cache_ttl_ms"),
                "must be greater than 0",
            ));
        }
        if self.cache_ttl_ms.is_none() && (self.cache_stale_ms.is_some() || self.cache_sort_query) {
            return Err(ConfigError::new(
                format!("{key}.cache_ttl_ms"),
                "cache_stale_ms and cache_sort_query need cache_ttl_ms",
            ));
        }
        if self.cache_ttl_ms.is_some() && matches!(self.class, Some(Class::Write | Class::Unknown))
        {
            return Err(ConfigError::new(
                format!("{key}.cache_ttl_ms"),
                "only read routes are cached: sending a write once and answering it twice \
                 from a cache would hide a second order",
            ));
        }
        Ok(())
    }

    /// The entry's own bucket, if it sets one.
    pub fn rate(&self) -> Option<Result<Rate, RateError>> {
        self.rate_limit_per_second
            .map(|r| Rate::new(r, self.rate_limit_burst))
    }
}

/// Refuses two entries for the same paths: the same pattern, or the v1
/// and v2 spellings of one (which would give one endpoint two buckets).
pub fn check_overlaps(routes: &[RouteConfig]) -> Result<(), ConfigError> {
    let canonical = |r: &RouteConfig| {
        let (prefix, rest) = v1_form(r.pattern());
        (r.path.is_some(), format!("{prefix}{rest}"))
    };
    for (i, r) in routes.iter().enumerate() {
        let mine = canonical(r);
        if let Some(j) = routes[..i].iter().position(|q| canonical(q) == mine) {
            return Err(ConfigError::new(
                format!("routes[{i}]"),
                format_args!(
                    "covers the same paths as routes[{j}] (the v1 and v2 spellings of a \
                     path are one endpoint)"
                ),
            ));
        }
    }
    Ok(())
}

/// Every entry valid, and no two for the same paths.
pub fn validate_all(routes: &[RouteConfig]) -> Result<(), ConfigError> {
    for (i, route) in routes.iter().enumerate() {
        route.validate(&format!("routes[{i}]"))?;
    }
    check_overlaps(routes)
}
