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
//! through [`crate::base::redact`].

mod breaker;
mod cache;
mod callbacks;
mod clients;
mod error;
mod idempotency;
mod log;
mod profiles;
mod rate_limit;
mod retry;
mod routes;
mod secrets;
mod server;
mod signing;
mod tls;
mod traces;
mod upstream;

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use breaker::BreakerConfig;
pub use cache::{CacheBackend, CacheConfig};
pub use callbacks::{CallbackBackend, CallbacksConfig, PostgresUrl, SslMode, SubscriberConfig};
pub use clients::{ClientConfig, TokenSource};
pub use error::{ConfigError, Env, MAX_DURATION_MS, check_duration_ms, process_env};
pub use idempotency::{IdempotencyBackend, IdempotencyConfig};
pub use log::{LogConfig, LogFormat};
pub use profiles::{ENV_PROFILE, ProfileConfig};
pub use rate_limit::{
    DEFAULT_CLIENT, DEFAULT_REDIS_URL, FailMode, MAX_BURST, MAX_PER_SECOND, MIN_FALLBACK_SHARE,
    MIN_PER_SECOND, Rate, RateError, RateLimitBackend, RateLimitConfig, RedisMode, RedisUrl,
    RedisUrlKeys, RedisUrlSource,
};
pub use retry::{CodeValue, RetryConfig};
pub use routes::{Class, RouteConfig, check_overlaps, v1_form};
pub use secrets::{SecretFileError, SecretSource, read_secret_file};
pub use server::{AmbiguousPaths, ServerConfig};
pub use signing::SigningConfig;
pub use tls::{Roots, TlsConfig};
pub use traces::{TelemetryConfig, TracesEndpoint};
pub use upstream::{BaseUrlError, PROXY_NONE, UpstreamConfig, proxy_url, upstream_base};

/// `*_ms` keys with a tighter bound than [`MAX_DURATION_MS`], and why.
const DURATION_BOUNDS: [(&str, u64, &str); 1] = [(
    "retry.budget_window_ms",
    3_600_000,
    "(1 hour): the budget keeps a counter per second of the window",
)];

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
    /// Traces over OTLP.
    pub telemetry: TelemetryConfig,
    /// Where cached read answers are kept.
    pub cache: CacheConfig,
    /// Callers' `Idempotency-Key`s; absent: the header passes through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<IdempotencyConfig>,
    /// Whom every outgoing TLS connection trusts.
    pub tls: TlsConfig,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::base::redact::debug("Config", self, f)
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
            telemetry: TelemetryConfig::default(),
            cache: CacheConfig::default(),
            idempotency: None,
            tls: TlsConfig::default(),
        }
    }
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
        if let Some(v) = env("PANDAGATE_CONTROL_LISTEN") {
            self.server.control_listen = v.parse().map_err(|_| {
                ConfigError::new(
                    "PANDAGATE_CONTROL_LISTEN",
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

    /// Checks everything that can be checked without reading secrets:
    /// each section by its own `validate`, then what spans sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.upstream.validate()?;
        self.log.validate()?;
        self.retry.validate()?;
        self.circuit_breaker.validate()?;
        self.telemetry.validate()?;
        self.cache.validate()?;
        self.tls.validate()?;
        self.check_durations()?;
        if let Some(rate_limit) = &self.rate_limit {
            rate_limit.validate()?;
        }
        if let Some(idempotency) = &self.idempotency {
            idempotency.validate()?;
            // A key must outlive the longest a call with it can take, or a
            // duplicate could find its reservation gone and be sent.
            let lease = self
                .retry
                .deadline_ms
                .saturating_add(idempotency.lease_margin_ms);
            if idempotency.ttl_ms <= lease {
                return Err(ConfigError::new(
                    "idempotency.ttl_ms",
                    format_args!(
                        "must be longer than retry.deadline_ms + idempotency.lease_margin_ms \
                         ({lease} ms): a key must outlive its call"
                    ),
                ));
            }
        }
        routes::validate_all(&self.routes)?;
        profiles::validate_all(&self.profiles)?;
        clients::validate_all(
            &self.clients,
            &self.profiles,
            self.server.tls_client_ca_file.is_some(),
        )?;
        let unknown = self.rate_limit.as_ref().and_then(|r| r.client.as_deref());
        let unknown = unknown.unwrap_or(rate_limit::DEFAULT_CLIENT);
        if let Some(i) = self.clients.iter().position(|c| c.name == unknown) {
            return Err(ConfigError::new(
                format!("clients[{i}].name"),
                format_args!(
                    "{unknown:?} names the calls of no client in the quota's shares \
                     (rate_limit.client): give the entry another name"
                ),
            ));
        }
        if let Some(callbacks) = &self.callbacks {
            let names: Vec<String> = self.profiles.iter().map(|p| p.name.clone()).collect();
            callbacks.validate(&names)?;
            // Pushes together may hold a quarter of the body budget: it
            // must fit one push.
            let share =
                self.server.max_buffered_body_bytes / crate::base::body_budget::SHARE_DIVISOR;
            if callbacks.max_body_bytes as u64 > share {
                return Err(ConfigError::new(
                    "callbacks.max_body_bytes",
                    format_args!(
                        "must be at most a quarter of server.max_buffered_body_bytes ({share})"
                    ),
                ));
            }
        }
        let listen = self.server.listen;
        if self.clients.is_empty() && !self.allow_unauthenticated && !listen.ip().is_loopback() {
            return Err(ConfigError::new(
                "server.listen",
                format_args!(
                    "{listen} is reachable from other hosts but no [[clients]] are configured: \
                     add [[clients]] with bearer tokens, listen on loopback, or set \
                     allow_unauthenticated = true"
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
    /// with their credentials redacted ([`crate::base::redact`]), and profiles only
    /// name where their secret comes from.
    pub fn to_toml(&self) -> String {
        let rendered = toml::Value::try_from(self).and_then(|mut v| {
            crate::base::redact::value(&mut v);
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

/// An environment made of pairs, for tests of what reads it.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::HashMap;

    pub fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// The `default` profile's key and secret.
    pub const CREDS: &[(&str, &str)] = &[
        ("PANDAPON_ACCESS_KEY", "ak-1"),
        ("PANDAPON_ACCESS_SECRET", "s3cr3t-value"),
    ];
}

#[cfg(test)]
mod tests {
    use super::testing::{CREDS, env_of};
    use super::*;

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

    /// Redis topologies, in each section that takes Redis: the keys fit the
    /// mode, every listed URL is read, and each refusal names its key.
    #[test]
    fn redis_topologies_out_of_bounds_are_named() {
        for (section, head) in [
            (
                "rate_limit",
                "[rate_limit]\nrequests_per_second = 10\nbackend = \"redis\"\n",
            ),
            ("idempotency", "[idempotency]\nstore = \"redis\"\n"),
            ("cache", "[cache]\nbackend = \"redis\"\n"),
        ] {
            let key = |k: &str| format!("{section}.{k}");
            for (extra, at) in [
                ("redis_urls = [\"redis://a:1\"]\n", key("redis_urls")),
                (
                    "redis_sentinel_master = \"m\"\n",
                    key("redis_sentinel_master"),
                ),
                ("redis_mode = \"cluster\"\n", key("redis_urls")),
                (
                    "redis_mode = \"cluster\"\nredis_url = \"redis://a:1\"\n",
                    key("redis_url"),
                ),
                (
                    "redis_mode = \"cluster\"\nredis_urls = [\"redis://a:1\"]\nredis_sentinel_master = \"m\"\n",
                    key("redis_sentinel_master"),
                ),
                (
                    "redis_mode = \"sentinel\"\nredis_urls = [\"redis://a:1\"]\n",
                    key("redis_sentinel_master"),
                ),
                (
                    "redis_mode = \"cluster\"\nredis_urls = [\"redis://a:1\", \"nope://b\"]\n",
                    format!("{section}.redis_urls[1]"),
                ),
                (
                    "redis_mode = \"cluster\"\nredis_urls = [\"redis://a:1\", \"rediss://b:2\"]\n",
                    key("redis_urls"),
                ),
                (
                    "redis_mode = \"cluster\"\nredis_urls = [\"redis://a:1\"]\nredis_url_env = \"R\"\n",
                    key("redis_urls"),
                ),
                ("redis_mode = \"ring\"\n", key("redis_mode")),
                ("redis_sentinel_auth = false\n", key("redis_sentinel_auth")),
                (
                    "redis_mode = \"cluster\"\nredis_urls = [\"redis://a:1\"]\nredis_sentinel_auth = true\n",
                    key("redis_sentinel_auth"),
                ),
            ] {
                let toml = format!("{head}{extra}");
                let e = err(&toml);
                assert!(
                    e.key == at || e.key.starts_with(&at),
                    "{toml}: {e} (expected {at})"
                );
            }
            let ok = format!(
                "{head}redis_mode = \"sentinel\"\nredis_urls = [\"redis://:pw@s1:26379\", \"redis://:pw@s2:26379\"]\nredis_sentinel_master = \"m\"\nredis_sentinel_auth = false\n"
            );
            let mut c = Config::from_toml(&ok).unwrap();
            c.apply_env(&env_of(CREDS)).unwrap();
            c.validate().unwrap();
        }
    }

    /// Quota shares: a weight above 0 up to the maximum, a cap that is a
    /// rate, a sidecar's name of visible characters, and no `[[clients]]`
    /// entry named as the calls of no client are; each refusal names its key.
    #[test]
    fn quota_shares_out_of_bounds_are_named() {
        let limit = "[rate_limit]\nrequests_per_second = 10\n";
        let client = |extra: &str| {
            format!(
                "{limit}[[clients]]\nname = \"svc\"\ntoken_sha256 = \"{}\"\nprofiles = [\"default\"]\n{extra}",
                "a".repeat(64)
            )
        };
        for (toml, key) in [
            (format!("{limit}share = 0\n"), "rate_limit.share"),
            (format!("{limit}share = -1\n"), "rate_limit.share"),
            (format!("{limit}share = 1000.5\n"), "rate_limit.share"),
            (format!("{limit}share = nan\n"), "rate_limit.share"),
            (format!("{limit}client = \"\"\n"), "rate_limit.client"),
            (
                format!("{limit}client = \"two words\"\n"),
                "rate_limit.client",
            ),
            (client("quota_share = 0\n"), "clients[0].quota_share"),
            (client("quota_share = inf\n"), "clients[0].quota_share"),
            (
                client("quota_max_per_second = 0\n"),
                "clients[0].quota_max_per_second",
            ),
            (
                client("quota_max_per_second = 1e9\n"),
                "clients[0].quota_max_per_second",
            ),
            (
                client("").replace("name = \"svc\"", "name = \"default\""),
                "clients[0].name",
            ),
            (
                client("").replace(
                    "requests_per_second = 10\n",
                    "requests_per_second = 10\nclient = \"svc\"\n",
                ),
                "clients[0].name",
            ),
        ] {
            let e = err(&toml);
            assert_eq!(e.key, key, "{toml}: {e}");
        }
        // In bounds, both kinds at once.
        let mut c = Config::from_toml(&format!(
            "{}quota_share = 1000\nquota_max_per_second = 0.5\n",
            client("").replace(
                "requests_per_second = 10\n",
                "requests_per_second = 10\nclient = \"orders\"\nshare = 0.001\n"
            )
        ))
        .unwrap();
        c.apply_env(&env_of(CREDS)).unwrap();
        c.validate().unwrap();
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

    /// A connection, and all pushes, may hold a quarter of the body
    /// budget: each must fit one body read whole.
    #[test]
    fn a_body_budget_too_small_for_one_body_per_share_is_named() {
        let e = err("[server]\nmax_buffered_body_bytes = 0\n");
        assert_eq!(e.key, "server.max_buffered_body_bytes", "{e}");
        let e = err("[server]\nbuffer_body_bytes = 1000\nmax_buffered_body_bytes = 3999\n");
        assert_eq!(e.key, "server.max_buffered_body_bytes", "{e}");
        assert!(
            e.message.contains("4 × server.buffer_body_bytes (4000)"),
            "{e}"
        );
        let e = err(
            "[server]\nbuffer_body_bytes = 1000\nmax_buffered_body_bytes = 4000\n\
             [callbacks]\nmax_body_bytes = 1001\n",
        );
        assert_eq!(e.key, "callbacks.max_body_bytes", "{e}");
        let mut ok = Config::from_toml(
            "[server]\nbuffer_body_bytes = 1000\nmax_buffered_body_bytes = 4000\n\
             [callbacks]\nmax_body_bytes = 1000\n",
        )
        .unwrap();
        ok.apply_env(&env_of(CREDS)).unwrap();
        ok.validate().unwrap();
    }

    #[test]
    fn malformed_url_is_named() {
        for url in ["not a url", "ftp://x", "https://", "https://h/?q=1"] {
            let e = err(&format!("[upstream]\nurl = \"{url}\"\n"));
            assert_eq!(e.key, "upstream.url", "{url}: {e}");
        }
    }

    #[test]
    fn errors_are_one_line() {
        let e = err("[server\nlisten = 1");
        assert!(!e.to_string().contains('\n'), "{e}");
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
    fn an_upstream_proxy_is_an_http_url_or_none() {
        for ok in [
            "none",
            "http://127.0.0.1:3128",
            "http://u:p@proxy.corp:8080/",
            "HTTP://p",
        ] {
            let mut c = Config::from_toml(&format!("[upstream]\nproxy = \"{ok}\"\n")).unwrap();
            c.apply_env(&env_of(CREDS)).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // Without a scheme it would be printed unredacted: refused.
        for bad in [
            "u:pw-1@proxy:3128",
            "https://u:pw-2@proxy:3128",
            "socks5h://u:pw-3@proxy:1080",
            "http://u:pw-4@proxy:3128/x",
            "",
        ] {
            let e = err(&format!("[upstream]\nproxy = \"{bad}\"\n"));
            assert_eq!(e.key, "upstream.proxy", "{bad}: {e}");
            assert!(!e.to_string().contains("pw-"), "{e}");
        }
        // Printed, its password is redacted.
        let c = Config::from_toml("[upstream]\nproxy = \"http://gw:pw-5@proxy:3128\"\n").unwrap();
        for shown in [format!("{c:?}"), format!("{:?}", c.upstream), c.to_toml()] {
            assert!(!shown.contains("pw-5"), "{shown}");
            assert!(shown.contains("http://gw:<redacted>@proxy:3128"), "{shown}");
        }
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
            // TLS without certificate checks is refused.
            (
                "redis_url = \"rediss://:pw-f@h/#insecure\"",
                "rate_limit.redis_url",
            ),
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

    #[test]
    fn an_idempotency_key_must_outlive_its_call() {
        let e = err("[retry]\ndeadline_ms = 30000\n[idempotency]\nttl_ms = 35000\n");
        assert_eq!(e.key, "idempotency.ttl_ms", "{e}");
        assert!(
            e.message.contains("35000") || e.message.contains("outlive"),
            "{e}"
        );
        let ok = "[retry]\ndeadline_ms = 30000\n[idempotency]\nttl_ms = 35001\n";
        let mut c = Config::from_toml(ok).unwrap();
        c.apply_env(&env_of(CREDS)).unwrap();
        c.validate().unwrap();
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
}
