//! The configuration: one typed tree read from TOML, overridden by the
//! environment, then checked by [`Config::validate`].
//!
//! Every field has a default, so no file is needed at all:
//! `PANDAPON_ACCESS_KEY=... PANDAPON_ACCESS_SECRET=... pandagate` serves.
//! `config/pandagate.toml` is the commented reference with units.
//!
//! Secrets are never read from the TOML: a profile names the environment
//! variable or the file that holds its secret. Any invalid setting becomes a
//! [`ConfigError`] whose one-line message starts with the key it is about.
//!
//! URLs may carry credentials (`redis://:password@host`): whatever prints
//! the config ([`Config::to_toml`], `Debug`, [`ConfigError`]) shows them
//! through [`crate::redact`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http::Uri;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::auth::{Client, ClientConfig};
use crate::breaker::BreakerConfig;
use crate::callbacks::CallbacksConfig;
use crate::limiter::{BackendKind, RateLimitConfig, RedisUrl};
use crate::retry::RetryConfig;
use crate::routes::RouteConfig;
use crate::secret::Secret;
use crate::signer::{Recipe, TimestampUnit};

/// Name of the profile built from the `PANDAPON_*` environment variables.
pub const ENV_PROFILE: &str = "default";

/// Reads an environment variable; injected so that tests need not touch the
/// process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Longest duration any `*_ms` key may hold: 365 days. Longer is a typo,
/// not a setting, and the bound keeps every `Instant + Duration` and every
/// sum of milliseconds far from overflowing.
pub const MAX_DURATION_MS: u64 = 365 * 24 * 3600 * 1000;

/// `*_ms` keys with a tighter bound than [`MAX_DURATION_MS`], and why.
const DURATION_BOUNDS: [(&str, u64, &str); 1] = [(
    "retry.budget_window_ms",
    3_600_000,
    "(1 hour): the budget keeps a counter per second of the window",
)];

/// Checks one `*_ms` value against [`MAX_DURATION_MS`].
pub fn check_duration_ms(key: &str, ms: u64) -> Result<(), ConfigError> {
    if ms > MAX_DURATION_MS {
        return Err(ConfigError::new(
            key,
            format_args!("must be at most {MAX_DURATION_MS} (365 days), not {ms}"),
        ));
    }
    Ok(())
}

/// The effective config. `Debug` shows it as TOML with URLs redacted.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Profile used when the caller sends no `x-pandagate-profile` header.
    pub default_profile: String,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub signing: SigningConfig,
    pub log: LogConfig,
    pub retry: RetryConfig,
    pub circuit_breaker: BreakerConfig,
    /// The provider's quota; absent: no per-key limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// Per-path overrides of the endpoint catalogue and retry settings.
    pub routes: Vec<RouteConfig>,
    /// Credential profiles; `PANDAPON_*` variables fill the one named `default`.
    pub profiles: Vec<ProfileConfig>,
    /// Callers of a shared gateway, each with a bearer token; none: no
    /// caller authentication.
    pub clients: Vec<ClientConfig>,
    /// Serve without `[[clients]]` on a non-loopback listener.
    pub allow_unauthenticated: bool,
    /// The provider's pushed messages; absent: no callback receiver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callbacks: Option<CallbacksConfig>,
}

/// The listener that internal services call.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (env `PANDAGATE_LISTEN`). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Admin endpoints: health, readiness, metrics, quit (env `PANDAGATE_ADMIN_LISTEN`).
    pub admin_listen: SocketAddr,
    /// Time a client has to send the complete request head, in milliseconds.
    pub header_read_timeout_ms: u64,
    /// Time a client has to send the complete request body, from the end of
    /// its head, in milliseconds; a body not in by then gets 408 and nothing
    /// of the call is forwarded or stored. Also on the callback listener.
    pub body_read_timeout_ms: u64,
    /// A connection with no call in progress and no byte read or written
    /// for this long is closed (a client that connects and never sends
    /// anything included), in milliseconds.
    pub idle_timeout_ms: u64,
    /// Largest request head (request line and headers), in bytes; at least 8192.
    pub max_header_bytes: usize,
    /// Most request headers accepted in one request.
    pub max_headers: usize,
    /// Most open connections per listener (traffic, callbacks and admin
    /// each have their own); one over the cap is accepted and closed at once.
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams (calls) on one connection.
    pub http2_max_concurrent_streams: u32,
    /// A path a server could resolve to another one (see the README's route
    /// section): `refuse` (400, nothing sent) or `forward` (sent byte for
    /// byte, classified `unknown`, matching no `[[routes]]` entry).
    pub ambiguous_paths: AmbiguousPaths,
    /// Largest request body, in bytes; larger bodies get 413.
    pub max_request_body_bytes: u64,
    /// Bodies up to this many bytes are read whole before anything is sent
    /// upstream, so an over-limit body is refused before a byte is forwarded
    /// and the body can be re-sent. Larger bodies stream.
    pub buffer_body_bytes: u64,
    /// On SIGTERM/SIGINT, how long calls in flight may take to finish, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// How often secret files are re-read for rotation, in milliseconds.
    pub secret_poll_ms: u64,
    /// Threads serving calls (env `PANDAGATE_WORKER_THREADS`): 0 = one per
    /// CPU the process may use (a cgroup CPU quota counts); 1 = a
    /// single-threaded runtime, like nginx's `worker_processes 1`. Read at
    /// start; a reload does not change it.
    pub worker_threads: usize,
}

/// What happens to a call whose path is ambiguous.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmbiguousPaths {
    #[default]
    Refuse,
    Forward,
}

/// The provider. `Debug` shows the URL redacted.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL (env `PANDAGATE_UPSTREAM`): `https://` in production, `http://`
    /// for local sandboxes. A path here is prefixed to every forwarded path.
    pub url: String,
    /// Time to establish a TCP (and TLS) connection, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Time from sending a request to receiving the response head, in
    /// milliseconds: the one attempt of a call that cannot be repeated, and
    /// the upper bound for attempts of one that can (see `retry`).
    pub request_timeout_ms: u64,
    /// How long an idle pooled connection is kept, in milliseconds.
    pub pool_idle_timeout_ms: u64,
    /// Most idle connections kept to the provider.
    pub pool_max_idle: usize,
}

/// How requests are signed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// `concat` (default), `sorted_concat`, `query_secret` or `query_key`.
    pub recipe: Recipe,
    /// Unit of the `timestamp` header: `ms` (default) or `s`.
    pub timestamp_unit: TimestampUnit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` or `text` (env `PANDAGATE_LOG_FORMAT`); unset: `text` on a
    /// terminal, `json` otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<LogFormat>,
    /// How many bytes at the start of each response are read for `requestId`,
    /// `code` and `msg`; the body streams on regardless.
    pub inspect_bytes: usize,
    /// Lines that may wait for a log's reader, in lines: the access log
    /// (stdout) and diagnostics (stderr) each have a queue this long; when
    /// a reader is this far behind, new lines are dropped and counted. Read
    /// at start, not on SIGHUP.
    pub queue_lines: usize,
}

/// One AccessKey with its secret and user-id policy.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// Name callers use in `x-pandagate-profile` and that the access log shows.
    pub name: String,
    /// The provider's AccessKey (an identifier, not a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_key: Option<String>,
    /// Environment variable holding the Access secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// File holding the Access secret (trailing whitespace ignored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// `user-id` sent when the caller sends none (or when no list allows its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// If set, a caller may send any of these as `user-id`; others get 403.
    /// If unset, a caller's `user-id` is replaced by `user_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_user_ids: Option<Vec<String>>,
    /// May a caller pick this profile with `x-pandagate-profile`?
    pub selectable: bool,
    /// Present only to give a clear error: secrets never live in the TOML.
    #[serde(skip_serializing)]
    pub secret: Option<IgnoredAny>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::redact::debug("Config", self, f)
    }
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::redact::debug("UpstreamConfig", self, f)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            default_profile: ENV_PROFILE.to_owned(),
            server: ServerConfig::default(),
            upstream: UpstreamConfig::default(),
            signing: SigningConfig::default(),
            log: LogConfig::default(),
            retry: RetryConfig::default(),
            circuit_breaker: BreakerConfig::default(),
            rate_limit: None,
            routes: Vec::new(),
            profiles: Vec::new(),
            clients: Vec::new(),
            allow_unauthenticated: false,
            callbacks: None,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 75_000,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            http2_max_concurrent_streams: 100,
            ambiguous_paths: AmbiguousPaths::Refuse,
            max_request_body_bytes: 8 * 1024 * 1024,
            buffer_body_bytes: 1024 * 1024,
            shutdown_grace_ms: 20_000,
            secret_poll_ms: 1_000,
            worker_threads: 0,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "https://api.pandapon.com".to_owned(),
            connect_timeout_ms: 3_000,
            request_timeout_ms: 30_000,
            pool_idle_timeout_ms: 60_000,
            pool_max_idle: 256,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: None,
            inspect_bytes: 64 * 1024,
            queue_lines: 16 * 1024,
        }
    }
}

/// An invalid setting: which key, and what is wrong with it. Displays as one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    /// The message is made one line, and any URL in it redacted (a serde
    /// error may quote the value it refused).
    pub fn new(key: impl Into<String>, message: impl fmt::Display) -> Self {
        let message = message.to_string();
        let message = crate::redact::urls_in(&message).replace('\n', " ");
        Self {
            key: key.into(),
            message: message.trim().to_owned(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config: {}: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A validated config with every profile's secret loaded.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub profiles: Vec<crate::profiles::Profile>,
    pub clients: Vec<Client>,
    /// The Redis URL of `[rate_limit]` with `backend = "redis"`, read from
    /// its source (`redis_url`, `redis_url_env` or `redis_url_file`).
    pub redis_url: Option<RedisUrl>,
}

/// Reads `path` (if any), applies the environment, validates, loads secrets.
pub fn load(path: Option<&Path>, env: Env<'_>) -> Result<Loaded, ConfigError> {
    let mut config = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "--config",
                    format_args!("cannot read {}: {e}", path.display()),
                )
            })?;
            Config::from_toml(&text)?
        }
        None => Config::default(),
    };
    config.apply_env(env)?;
    resolve(config, env)
}

/// Validates a config built in code and loads its profiles' secrets.
pub fn resolve(config: Config, env: Env<'_>) -> Result<Loaded, ConfigError> {
    config.validate()?;
    let profiles = config
        .profiles
        .iter()
        .enumerate()
        .map(|(i, p)| crate::profiles::Profile::load(p, &format!("profiles[{i}]"), env))
        .collect::<Result<Vec<_>, _>>()?;
    let clients = config
        .clients
        .iter()
        .enumerate()
        .map(|(i, c)| Client::load(c, &format!("clients[{i}]"), env))
        .collect::<Result<Vec<_>, _>>()?;
    let redis_url = match &config.rate_limit {
        Some(r) if r.backend == BackendKind::Redis => Some(r.resolve_redis_url(env)?),
        _ => None,
    };
    Ok(Loaded {
        config,
        profiles,
        clients,
        redis_url,
    })
}

impl Config {
    /// Parses TOML; unknown keys and wrong types are errors naming their key.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let line_of = |span: Option<std::ops::Range<usize>>| {
            span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
        };
        let de = toml::Deserializer::parse(text).map_err(|e| {
            let at = line_of(e.span()).map_or(String::new(), |l| format!(" (line {l})"));
            ConfigError::new("toml", format_args!("{}{at}", e.message()))
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let at = line_of(e.inner().span()).map_or(String::new(), |l| format!(" (line {l})"));
            ConfigError::new(key, format_args!("{}{at}", e.inner().message()))
        })
    }

    /// Applies `PANDAGATE_*` and `PANDAPON_*` variables; they win over the file.
    pub fn apply_env(&mut self, env: Env<'_>) -> Result<(), ConfigError> {
        if let Some(v) = env("PANDAGATE_LISTEN") {
            self.server.listen = v.parse().map_err(|_| {
                ConfigError::new(
                    "PANDAGATE_LISTEN",
                    format_args!("not an address:port: {v:?}"),
                )
            })?;
        }
        if let Some(v) = env("PANDAGATE_ADMIN_LISTEN") {
            self.server.admin_listen = v.parse().map_err(|_| {
                ConfigError::new(
                    "PANDAGATE_ADMIN_LISTEN",
                    format_args!("not an address:port: {v:?}"),
                )
            })?;
        }
        if let Some(v) = env("PANDAGATE_WORKER_THREADS") {
            self.server.worker_threads = v.parse().map_err(|_| {
                ConfigError::new(
                    "PANDAGATE_WORKER_THREADS",
                    format_args!("not a whole number: {v:?}"),
                )
            })?;
        }
        if let Some(v) = env("PANDAGATE_UPSTREAM") {
            self.upstream.url = v;
        }
        if let Some(v) = env("PANDAGATE_LOG_FORMAT") {
            self.log.format = Some(match v.as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                _ => {
                    return Err(ConfigError::new(
                        "PANDAGATE_LOG_FORMAT",
                        format_args!("must be \"json\" or \"text\", not {v:?}"),
                    ));
                }
            });
        }

        let key = env("PANDAPON_ACCESS_KEY");
        let secret = env("PANDAPON_ACCESS_SECRET");
        let secret_file = env("PANDAPON_ACCESS_SECRET_FILE");
        let user_id = env("PANDAPON_USER_ID");
        if secret.is_some() && secret_file.is_some() {
            return Err(ConfigError::new(
                "PANDAPON_ACCESS_SECRET_FILE",
                "set either PANDAPON_ACCESS_SECRET or PANDAPON_ACCESS_SECRET_FILE, not both",
            ));
        }
        if key.is_none() && secret.is_none() && secret_file.is_none() && user_id.is_none() {
            return Ok(());
        }
        let profile = match self.profiles.iter().position(|p| p.name == ENV_PROFILE) {
            Some(i) => &mut self.profiles[i],
            None => {
                self.profiles.push(ProfileConfig {
                    name: ENV_PROFILE.to_owned(),
                    ..ProfileConfig::default()
                });
                self.profiles.last_mut().expect("just pushed")
            }
        };
        if key.is_some() {
            profile.access_key = key;
        }
        if secret.is_some() {
            profile.secret_env = Some("PANDAPON_ACCESS_SECRET".to_owned());
            profile.secret_file = None;
        }
        if let Some(file) = secret_file {
            profile.secret_file = Some(PathBuf::from(file));
            profile.secret_env = None;
        }
        if user_id.is_some() {
            profile.user_id = user_id;
        }
        Ok(())
    }

    /// Checks everything that can be checked without reading secrets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let u = &self.upstream;
        let positive = [
            ("server.header_read_timeout_ms", s.header_read_timeout_ms),
            ("server.body_read_timeout_ms", s.body_read_timeout_ms),
            ("server.idle_timeout_ms", s.idle_timeout_ms),
            ("server.max_header_bytes", s.max_header_bytes as u64),
            ("server.max_headers", s.max_headers as u64),
            ("server.max_connections", s.max_connections as u64),
            (
                "server.http2_max_concurrent_streams",
                u64::from(s.http2_max_concurrent_streams),
            ),
            ("server.max_request_body_bytes", s.max_request_body_bytes),
            ("server.buffer_body_bytes", s.buffer_body_bytes),
            ("server.shutdown_grace_ms", s.shutdown_grace_ms),
            ("server.secret_poll_ms", s.secret_poll_ms),
            ("upstream.connect_timeout_ms", u.connect_timeout_ms),
            ("upstream.request_timeout_ms", u.request_timeout_ms),
            ("upstream.pool_idle_timeout_ms", u.pool_idle_timeout_ms),
            ("log.inspect_bytes", self.log.inspect_bytes as u64),
            ("log.queue_lines", self.log.queue_lines as u64),
            ("retry.max_attempts", u64::from(self.retry.max_attempts)),
            ("retry.deadline_ms", self.retry.deadline_ms),
            (
                "retry.read_attempt_timeout_ms",
                self.retry.read_attempt_timeout_ms,
            ),
            ("retry.budget_window_ms", self.retry.budget_window_ms),
            (
                "circuit_breaker.failure_threshold",
                u64::from(self.circuit_breaker.failure_threshold),
            ),
            ("circuit_breaker.open_ms", self.circuit_breaker.open_ms),
            (
                "circuit_breaker.half_open_probes",
                u64::from(self.circuit_breaker.half_open_probes),
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        // Upper bounds for what is allocated or spawned per value: past
        // them a setting would exhaust memory or threads, not serve better.
        let at_most = [
            (
                "server.max_header_bytes",
                s.max_header_bytes as u64,
                1 << 20,
            ),
            ("server.max_headers", s.max_headers as u64, 1_000),
            (
                "server.max_connections",
                s.max_connections as u64,
                1_000_000,
            ),
            (
                "server.http2_max_concurrent_streams",
                u64::from(s.http2_max_concurrent_streams),
                10_000,
            ),
            ("server.worker_threads", s.worker_threads as u64, 1_024),
            ("log.queue_lines", self.log.queue_lines as u64, 1_000_000),
            ("log.inspect_bytes", self.log.inspect_bytes as u64, 16 << 20),
        ];
        for (key, value, max) in at_most {
            if value > max {
                return Err(ConfigError::new(key, format_args!("must be at most {max}")));
            }
        }
        if s.max_header_bytes < 8192 {
            return Err(ConfigError::new(
                "server.max_header_bytes",
                "must be at least 8192",
            ));
        }
        if s.buffer_body_bytes > s.max_request_body_bytes {
            return Err(ConfigError::new(
                "server.buffer_body_bytes",
                "must not exceed server.max_request_body_bytes",
            ));
        }
        let base = upstream_base(&u.url).map_err(|m| ConfigError::new("upstream.url", m))?;
        if base.authority().is_some_and(|a| a.as_str().contains('@')) {
            // The authority becomes `Host` (and HTTP/2's `:authority`):
            // credentials in it would be sent to the provider in the clear.
            return Err(ConfigError::new(
                "upstream.url",
                format_args!(
                    "must not carry credentials (user:password@): calls are authenticated \
                     by their signature; {}",
                    crate::redact::url(&u.url)
                ),
            ));
        }
        if self.retry.backoff_cap_ms < self.retry.backoff_base_ms {
            return Err(ConfigError::new(
                "retry.backoff_cap_ms",
                "must be at least retry.backoff_base_ms",
            ));
        }
        if self.retry.budget_window_ms < 1000 {
            return Err(ConfigError::new(
                "retry.budget_window_ms",
                "must be at least 1000",
            ));
        }
        self.check_durations()?;
        if let Some(rate_limit) = &self.rate_limit {
            rate_limit.validate()?;
        }
        for (i, route) in self.routes.iter().enumerate() {
            route.validate(&format!("routes[{i}]"))?;
        }
        crate::routes::check_overlaps(&self.routes)?;

        if self.profiles.is_empty() {
            return Err(ConfigError::new(
                "profiles",
                "no credential profile: set PANDAPON_ACCESS_KEY and PANDAPON_ACCESS_SECRET \
                 (or PANDAPON_ACCESS_SECRET_FILE), or add a [[profiles]] entry",
            ));
        }
        for (i, p) in self.profiles.iter().enumerate() {
            if p.name.is_empty() {
                return Err(ConfigError::new(
                    format!("profiles[{i}].name"),
                    "must not be empty",
                ));
            }
            if self.profiles[..i].iter().any(|q| q.name == p.name) {
                return Err(ConfigError::new(
                    format!("profiles[{i}].name"),
                    format_args!("duplicate profile name {:?}", p.name),
                ));
            }
        }
        for (i, c) in self.clients.iter().enumerate() {
            if self.clients[..i].iter().any(|d| d.name == c.name) {
                return Err(ConfigError::new(
                    format!("clients[{i}].name"),
                    format_args!("duplicate client name {:?}", c.name),
                ));
            }
            if let Some(unknown) = c
                .profiles
                .iter()
                .find(|p| !self.profiles.iter().any(|q| &q.name == *p))
            {
                return Err(ConfigError::new(
                    format!("clients[{i}].profiles"),
                    format_args!("no profile named {unknown:?}"),
                ));
            }
        }
        if let Some(callbacks) = &self.callbacks {
            let names: Vec<String> = self.profiles.iter().map(|p| p.name.clone()).collect();
            callbacks.validate(&names)?;
        }
        if self.clients.is_empty() && !self.allow_unauthenticated && !s.listen.ip().is_loopback() {
            return Err(ConfigError::new(
                "server.listen",
                format_args!(
                    "{} is reachable from other hosts but no [[clients]] are configured: \
                     add [[clients]] with bearer tokens, listen on loopback, or set \
                     allow_unauthenticated = true",
                    s.listen
                ),
            ));
        }
        if !self.profiles.iter().any(|p| p.name == self.default_profile) {
            return Err(ConfigError::new(
                "default_profile",
                format_args!("no profile named {:?}", self.default_profile),
            ));
        }
        Ok(())
    }

    /// Every `*_ms` key, in any section (those added later included), is
    /// at most [`MAX_DURATION_MS`] or its tighter bound in `DURATION_BOUNDS`.
    fn check_durations(&self) -> Result<(), ConfigError> {
        fn walk(v: &toml::Value, key: &str) -> Result<(), ConfigError> {
            match v {
                toml::Value::Table(table) => {
                    for (name, v) in table {
                        let key = if key.is_empty() {
                            name.clone()
                        } else {
                            format!("{key}.{name}")
                        };
                        if let (true, toml::Value::Integer(ms)) = (name.ends_with("_ms"), v) {
                            let ms = u64::try_from(*ms).unwrap_or(0);
                            check_duration_ms(&key, ms)?;
                            if let Some((_, max, why)) =
                                DURATION_BOUNDS.iter().find(|(k, _, _)| *k == key)
                                && ms > *max
                            {
                                return Err(ConfigError::new(
                                    key,
                                    format_args!("must be at most {max} {why}"),
                                ));
                            }
                        }
                        walk(v, &key)?;
                    }
                }
                toml::Value::Array(items) => {
                    for (i, v) in items.iter().enumerate() {
                        walk(v, &format!("{key}[{i}]"))?;
                    }
                }
                _ => {}
            }
            Ok(())
        }
        // A u64 beyond i64 (only a config built in code can hold one) does
        // not serialise: it is out of every bound anyway.
        let value = toml::Value::try_from(self).map_err(|e| ConfigError::new("config", e))?;
        walk(&value, "")
    }

    /// The effective config as TOML, for `pandagate check`: URLs are shown
    /// with their credentials redacted ([`crate::redact`]), and profiles only
    /// name where their secret comes from.
    pub fn to_toml(&self) -> String {
        let rendered = toml::Value::try_from(self).and_then(|mut v| {
            crate::redact::value(&mut v);
            toml::to_string_pretty(&v)
        });
        rendered.unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// The config as TOML exactly, credentials in URLs included: for round
    /// trips through [`Config::from_toml`], never for display.
    pub fn to_toml_unredacted(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Splits and checks an upstream base URL: `http(s)://authority[/path]`.
/// Errors quote the URL with its credentials redacted.
pub fn upstream_base(url: &str) -> Result<Uri, String> {
    let shown = crate::redact::url(url);
    let uri: Uri = url.parse().map_err(|e| {
        format!(
            "not a URL: {shown:?} ({})",
            crate::redact::scrub(&format!("{e}"), url)
        )
    })?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("must start with http:// or https://: {shown:?}")),
    }
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        return Err(format!("has no host: {shown:?}"));
    }
    if uri.query().is_some() {
        return Err(format!("must not have a query string: {shown:?}"));
    }
    Ok(uri)
}

/// Reads a secret file: its content less trailing whitespace, not empty.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value = text.trim_end();
    if value.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret::new(value))
}

/// Reads a profile's secret from its environment variable or file.
pub fn load_secret(p: &ProfileConfig, key: &str, env: Env<'_>) -> Result<Secret, ConfigError> {
    let value = match (&p.secret_env, &p.secret_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                format!("{key}.secret_file"),
                "set either secret_env or secret_file, not both",
            ));
        }
        (Some(var), None) => env(var).ok_or_else(|| {
            ConfigError::new(
                format!("{key}.secret_env"),
                format_args!("environment variable {var} is not set"),
            )
        })?,
        (None, Some(file)) => {
            return read_secret_file(file)
                .map_err(|m| ConfigError::new(format!("{key}.secret_file"), m));
        }
        (None, None) => {
            return Err(ConfigError::new(
                format!("{key}.secret_env"),
                "missing secret: set secret_env or secret_file (for the default profile: \
                 PANDAPON_ACCESS_SECRET or PANDAPON_ACCESS_SECRET_FILE)",
            ));
        }
    };
    let value = value.trim_end();
    if value.is_empty() {
        return Err(ConfigError::new(
            format!("{key}.secret"),
            "the secret is empty",
        ));
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const CREDS: &[(&str, &str)] = &[
        ("PANDAPON_ACCESS_KEY", "ak-1"),
        ("PANDAPON_ACCESS_SECRET", "s3cr3t-value"),
    ];

    #[test]
    fn environment_alone_is_a_complete_config() {
        let loaded = load(None, &env_of(CREDS)).unwrap();
        assert_eq!(loaded.config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(loaded.config.upstream.url, "https://api.pandapon.com");
        assert_eq!(loaded.profiles.len(), 1);
        assert_eq!(&*loaded.profiles[0].name, "default");
        assert_eq!(loaded.profiles[0].secret.current().expose(), "s3cr3t-value");
    }

    #[test]
    fn environment_wins_over_the_file() {
        let mut c = Config::from_toml(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[profiles]]\nname = \"default\"\naccess_key = \"from-file\"\nsecret_env = \"OTHER\"\n",
        )
        .unwrap();
        let mut pairs = CREDS.to_vec();
        pairs.push(("PANDAGATE_LISTEN", "127.0.0.1:2"));
        c.apply_env(&env_of(&pairs)).unwrap();
        assert_eq!(c.server.listen.port(), 2);
        assert_eq!(c.profiles[0].access_key.as_deref(), Some("ak-1"));
        assert_eq!(
            c.profiles[0].secret_env.as_deref(),
            Some("PANDAPON_ACCESS_SECRET")
        );
    }

    fn err(toml: &str) -> ConfigError {
        let mut c = match Config::from_toml(toml) {
            Ok(c) => c,
            Err(e) => return e,
        };
        c.apply_env(&env_of(CREDS)).unwrap();
        c.validate().unwrap_err()
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err("[server]\nlisten_adress = \"127.0.0.1:1\"\n");
        assert!(e.to_string().contains("listen_adress"), "{e}");
        assert!(e.key.starts_with("server"), "{e}");
    }

    #[test]
    fn negative_and_zero_limits_are_named() {
        let e = err("[server]\nmax_request_body_bytes = -1\n");
        assert_eq!(e.key, "server.max_request_body_bytes", "{e}");
        let e = err("[upstream]\nrequest_timeout_ms = 0\n");
        assert_eq!(e.key, "upstream.request_timeout_ms", "{e}");
        assert!(e.message.contains("greater than 0"));
    }

    #[test]
    fn callbacks_retain_ms_defaults_to_seven_days_and_zero_is_named() {
        let c = Config::from_toml("[callbacks]\n").unwrap();
        assert_eq!(c.callbacks.unwrap().retain_ms, 604_800_000);
        let c = Config::from_toml("[callbacks]\nretain_ms = 5000\n").unwrap();
        assert_eq!(c.callbacks.unwrap().retain_ms, 5000);
        let e = err("[callbacks]\nretain_ms = 0\n");
        assert_eq!(e.key, "callbacks.retain_ms", "{e}");
    }

    #[test]
    fn malformed_url_is_named() {
        for url in ["not a url", "ftp://x", "https://", "https://h/?q=1"] {
            let e = err(&format!("[upstream]\nurl = \"{url}\"\n"));
            assert_eq!(e.key, "upstream.url", "{url}: {e}");
        }
    }

    #[test]
    fn missing_secret_is_named() {
        let e = load(None, &env_of(&[("PANDAPON_ACCESS_KEY", "ak")])).unwrap_err();
        assert_eq!(e.key, "profiles[0].secret_env", "{e}");
        let e = load(
            None,
            &env_of(&[
                ("PANDAPON_ACCESS_KEY", "ak"),
                ("PANDAPON_ACCESS_SECRET", "  "),
            ]),
        )
        .unwrap_err();
        assert!(e.message.contains("empty"), "{e}");
    }

    #[test]
    fn secret_in_toml_is_refused_without_echoing_it() {
        let mut c = Config::from_toml(
            "[[profiles]]\nname = \"p\"\naccess_key = \"k\"\nsecret = \"do-not-echo\"\n",
        )
        .unwrap();
        c.default_profile = "p".into();
        c.validate().unwrap();
        let e = crate::profiles::Profile::load(&c.profiles[0], "profiles[0]", &env_of(&[]))
            .unwrap_err();
        assert_eq!(e.key, "profiles[0].secret");
        assert!(!e.to_string().contains("do-not-echo"));
    }

    #[test]
    fn errors_are_one_line() {
        let e = err("[server\nlisten = 1");
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    const URL_PASSWORDS: [&str; 2] = ["redis-pw-2", "sub-pw-3"];

    /// A config with a password in each URL-valued key that may hold one
    /// (`upstream.url` may not: see the test below).
    fn with_url_passwords() -> Loaded {
        let toml = "[rate_limit]\nrequests_per_second = 5\nbackend = \"redis\"\n\
                    redis_url = \"redis://:redis-pw-2@127.0.0.1:6379\"\n\
                    [callbacks]\n[[callbacks.subscribers]]\nurl = \"http://svc:sub-pw-3@svc.internal/e\"\n";
        let mut c = Config::from_toml(toml).unwrap();
        c.apply_env(&env_of(CREDS)).unwrap();
        resolve(c, &env_of(CREDS)).unwrap()
    }

    #[test]
    fn printing_the_config_never_shows_a_url_password() {
        let loaded = with_url_passwords();
        let shown = [
            loaded.config.to_toml(),
            format!("{loaded:?}"),
            format!("{:?}", loaded.config),
            format!("{:?}", loaded.config.rate_limit),
            format!("{:?}", loaded.config.callbacks),
            format!("{:?}", loaded.redis_url),
            format!(
                "{:?}",
                loaded
                    .config
                    .rate_limit
                    .as_ref()
                    .unwrap()
                    .redis_url_source()
            ),
        ];
        for text in &shown {
            for pw in URL_PASSWORDS {
                assert!(!text.contains(pw), "{pw} in {text}");
            }
            assert!(text.contains("<redacted>"), "{text}");
        }
        assert!(shown[0].contains("url = \"http://svc:<redacted>@svc.internal/e\""));
        // The exact serialisation keeps them, for round trips.
        let exact = loaded.config.to_toml_unredacted();
        assert!(URL_PASSWORDS.iter().all(|pw| exact.contains(pw)), "{exact}");
    }

    #[test]
    fn credentials_in_the_upstream_url_are_refused_and_never_shown() {
        let upstream = UpstreamConfig {
            url: "https://gw:up-pw-1@api.example.test".into(),
            ..UpstreamConfig::default()
        };
        assert!(!format!("{upstream:?}").contains("up-pw-1"));
        let e = err("[upstream]\nurl = \"https://gw:up-pw-1@api.example.test\"\n");
        assert_eq!(e.key, "upstream.url", "{e}");
        assert!(e.message.contains("must not carry credentials"), "{e}");
        assert!(!e.to_string().contains("up-pw-1"), "{e}");
    }

    #[test]
    fn config_errors_never_quote_a_url_password() {
        for (toml, key) in [
            // Rejected by the Redis client, each for its own reason.
            (
                "redis_url = \"redis://:pw-a@0.0.0.0:6379\"",
                "rate_limit.redis_url",
            ),
            (
                "redis_url = \"redis://:pw-b@h/notadb\"",
                "rate_limit.redis_url",
            ),
            (
                "redis_url = \"redis://:pw-c@h:1/?protocol=pw-c\"",
                "rate_limit.redis_url",
            ),
            ("redis_url = \"redis://:pw-d@\"", "rate_limit.redis_url"),
            ("redis_url = \"redis://:p?w-e@h\"", "rate_limit.redis_url"),
            ("redis_url = \"rediss://:pw-f@h\"", "rate_limit.redis_url"),
            // A URL where no URL belongs: serde quotes the value it refused.
            ("redis_url = [\"redis://:pw-g@h\"]", "rate_limit.redis_url"),
            ("fail_mode = \"redis://:pw-h@h\"", "rate_limit.fail_mode"),
        ] {
            let text =
                format!("[rate_limit]\nrequests_per_second = 1\nbackend = \"redis\"\n{toml}\n");
            let e = err(&text);
            assert_eq!(e.key, key, "{toml}: {e}");
            let pw = toml.split(":").nth(2).unwrap().split('@').next().unwrap();
            assert!(!e.to_string().contains(pw), "{pw} in {e}");
            assert!(!e.to_string().contains("w-"), "{e}");
        }
        for url in [
            "https://u:pw-i@h/?q=1",
            "ftp://u:pw-j@h",
            "https://u:pw-k@",
            "https://u:pw-l@h h",
        ] {
            let e = err(&format!("[upstream]\nurl = \"{url}\"\n"));
            assert_eq!(e.key, "upstream.url", "{url}: {e}");
            assert!(!e.to_string().contains("pw-"), "{e}");
        }
    }

    fn redis_config(source: &str) -> Config {
        let mut c = Config::from_toml(&format!(
            "[rate_limit]\nrequests_per_second = 5\nbackend = \"redis\"\n{source}\n"
        ))
        .unwrap();
        c.apply_env(&env_of(CREDS)).unwrap();
        c
    }

    #[test]
    fn the_redis_url_comes_from_one_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("redis-url");
        std::fs::write(&file, "redis://:from-file@127.0.0.1:7001\n").unwrap();
        let mut pairs = CREDS.to_vec();
        pairs.push(("REDIS_URL", " redis://app:from-env@127.0.0.1:7002 "));
        let env = env_of(&pairs);
        let file_line = format!("redis_url_file = {:?}", file.display().to_string());
        for (source, url) in [
            ("", "redis://127.0.0.1:6379"),
            (
                "redis_url = \"redis://:inline@127.0.0.1:7000\"",
                "redis://:inline@127.0.0.1:7000",
            ),
            (
                "redis_url_env = \"REDIS_URL\"",
                "redis://app:from-env@127.0.0.1:7002",
            ),
            (&file_line, "redis://:from-file@127.0.0.1:7001"),
        ] {
            let loaded = resolve(redis_config(source), &env).unwrap();
            assert_eq!(loaded.redis_url.as_ref().unwrap().expose(), url, "{source}");
            let shown = format!("{}{loaded:?}", loaded.config.to_toml());
            for pw in ["from-env", "from-file", "inline"] {
                assert!(!shown.contains(pw), "{pw} in {shown}");
            }
        }
        // A local backend reads no URL.
        let mut c = redis_config("redis_url_env = \"UNSET\"");
        c.rate_limit.as_mut().unwrap().backend = BackendKind::Local;
        assert!(resolve(c, &env).unwrap().redis_url.is_none());
        // A reload reads it the same way.
        let path = dir.path().join("pandagate.toml");
        std::fs::write(
            &path,
            "[rate_limit]\nrequests_per_second = 5\nbackend = \"redis\"\nredis_url_env = \"REDIS_URL\"\n",
        )
        .unwrap();
        let loaded = load(Some(&path), &env).unwrap();
        assert_eq!(
            loaded.redis_url.unwrap().expose(),
            "redis://app:from-env@127.0.0.1:7002"
        );

        for (source, key, says) in [
            (
                "redis_url = \"redis://h\"\nredis_url_env = \"REDIS_URL\"",
                "rate_limit.redis_url",
                "at most one",
            ),
            (
                "redis_url_env = \"REDIS_URL\"\nredis_url_file = \"/x\"",
                "rate_limit.redis_url",
                "at most one",
            ),
            (
                "redis_url_env = \"UNSET\"",
                "rate_limit.redis_url_env",
                "UNSET is not set",
            ),
            (
                "redis_url_file = \"/nonexistent/x\"",
                "rate_limit.redis_url_file",
                "cannot read",
            ),
        ] {
            let e = resolve(redis_config(source), &env).unwrap_err();
            assert_eq!(e.key, key, "{source}: {e}");
            assert!(e.message.contains(says), "{source}: {e}");
        }
        // A bad URL from the environment or a file: the key, never the URL.
        std::fs::write(&file, "redis://:secret-in-file@0.0.0.0:1").unwrap();
        let mut pairs = CREDS.to_vec();
        pairs.push(("REDIS_URL", "redis://:secret-in-env@h/x"));
        for (source, key) in [
            ("redis_url_env = \"REDIS_URL\"", "rate_limit.redis_url_env"),
            (file_line.as_str(), "rate_limit.redis_url_file"),
        ] {
            let e = resolve(redis_config(source), &env_of(&pairs)).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(!e.message.contains("secret-in"), "{e}");
        }
    }

    #[test]
    fn every_duration_is_bounded_wherever_it_is() {
        let max = MAX_DURATION_MS;
        for (toml, key) in [
            (
                "[server]\nidle_timeout_ms = 31536000001",
                "server.idle_timeout_ms",
            ),
            (
                "[upstream]\nrequest_timeout_ms = 9223372036854775807",
                "upstream.request_timeout_ms",
            ),
            ("[retry]\ndeadline_ms = 31536000001", "retry.deadline_ms"),
            (
                "[retry]\nbudget_window_ms = 3600001",
                "retry.budget_window_ms",
            ),
            (
                "[circuit_breaker]\nopen_ms = 31536000001",
                "circuit_breaker.open_ms",
            ),
            (
                "[rate_limit]\nrequests_per_second = 1\nmax_wait_ms = 31536000001",
                "rate_limit.max_wait_ms",
            ),
            (
                "[[routes]]\npath = \"/a\"\n[[routes]]\npath = \"/b\"\nattempt_timeout_ms = 31536000001",
                "routes[1].attempt_timeout_ms",
            ),
            (
                "[callbacks]\nmax_age_ms = 31536000001",
                "callbacks.max_age_ms",
            ),
        ] {
            let e = err(toml);
            assert_eq!(e.key, key, "{toml}: {e}");
        }
        // At the bound: valid.
        let mut c = Config::from_toml(&format!(
            "[server]\nidle_timeout_ms = {max}\n[circuit_breaker]\nopen_ms = {max}\n\
             [retry]\nbudget_window_ms = 3600000\n"
        ))
        .unwrap();
        c.apply_env(&env_of(CREDS)).unwrap();
        c.validate().unwrap();
        // A u64 beyond what TOML holds, set in code.
        c.upstream.connect_timeout_ms = u64::MAX;
        assert!(c.validate().is_err());
    }

    #[test]
    fn effective_config_renders_without_secret() {
        let loaded = load(None, &env_of(CREDS)).unwrap();
        let text = loaded.config.to_toml();
        assert!(text.contains("PANDAPON_ACCESS_SECRET"));
        assert!(!text.contains("s3cr3t-value"));
        assert!(!format!("{loaded:?}").contains("s3cr3t-value"));
    }
}
