//! `[callbacks]`: receiving the provider's pushed messages and delivering
//! them to subscribers.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Env};
use super::secrets::SecretSource;
use crate::base::redact;

/// Where pushed messages are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackBackend {
    /// A redb file under `store`, held by one process.
    #[default]
    Local,
    /// PostgreSQL, shared by every replica.
    Postgres,
}

/// `[callbacks]`. `Debug` shows subscriber URLs redacted.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbacksConfig {
    /// Path on the main listener (and on `listen`, if set) that takes pushes.
    pub path: String,
    /// An optional listener of its own, e.g. for exposure through an ingress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `local` (a file under `store`, one receiving process) or `postgres`
    /// (shared by every replica).
    pub backend: CallbackBackend,
    /// Directory of the message store (`backend = "local"`).
    pub store: PathBuf,
    /// PostgreSQL for `backend = "postgres"`: the URL itself
    /// (`postgres://user:password@host:5432/db`), or (exactly one of the
    /// three) `postgres_url_env` or `postgres_url_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_url: Option<String>,
    /// Environment variable holding the PostgreSQL URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_url_env: Option<String>,
    /// File holding the PostgreSQL URL (trailing whitespace ignored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_url_file: Option<PathBuf>,
    /// Connections each replica keeps to PostgreSQL, at most.
    pub postgres_pool_size: usize,
    /// Longest one statement (a commit included) may take, in
    /// milliseconds; a push whose commit takes longer is answered 503.
    pub postgres_statement_timeout_ms: u64,
    /// Profile whose Access secret verifies the pushes.
    pub profile: String,
    /// Largest push body, in bytes.
    pub max_body_bytes: usize,
    /// How long a delivery is retried before it becomes a dead letter, in milliseconds.
    pub max_age_ms: u64,
    /// First retry delay, doubling per attempt up to the cap, in milliseconds.
    pub backoff_base_ms: u64,
    pub backoff_cap_ms: u64,
    /// Time a subscriber has to answer one delivery, in milliseconds.
    pub delivery_timeout_ms: u64,
    /// How long a message is kept once all its deliveries are done, in
    /// milliseconds from its receipt; within it, the same body pushed again
    /// is a duplicate. Messages with pending or dead deliveries are kept.
    pub retain_ms: u64,
    pub subscribers: Vec<SubscriberConfig>,
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        Self {
            path: "/callbacks/pandapon".into(),
            listen: None,
            backend: CallbackBackend::Local,
            store: PathBuf::from("/var/lib/pandagate"),
            postgres_url: None,
            postgres_url_env: None,
            postgres_url_file: None,
            postgres_pool_size: 8,
            postgres_statement_timeout_ms: 500,
            profile: super::profiles::ENV_PROFILE.into(),
            max_body_bytes: 1024 * 1024,
            max_age_ms: 24 * 3600 * 1000,
            backoff_base_ms: 1_000,
            backoff_cap_ms: 300_000,
            delivery_timeout_ms: 10_000,
            retain_ms: 7 * 24 * 3600 * 1000,
            subscribers: Vec::new(),
        }
    }
}

/// A `[[callbacks.subscribers]]` entry. `Debug` shows the URL redacted.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberConfig {
    /// Where messages are POSTed (http:// or https://).
    pub url: String,
    /// Only these `messageType`s; absent: every type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_types: Option<Vec<String>>,
    /// Only these platforms (0 Taobao, 1 1688); absent: both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platforms: Option<Vec<u8>>,
}

impl std::fmt::Debug for CallbacksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::base::redact::debug("CallbacksConfig", self, f)
    }
}

impl std::fmt::Debug for SubscriberConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::base::redact::debug("SubscriberConfig", self, f)
    }
}

impl CallbacksConfig {
    /// The PostgreSQL URL read from its source, for `backend = "postgres"`;
    /// errors name the source's key, never the URL's password.
    pub fn resolve_postgres_url(&self, env: Env<'_>) -> Result<PostgresUrl, ConfigError> {
        const KEY: &str = "callbacks.postgres_url";
        let source = match (
            &self.postgres_url,
            &self.postgres_url_env,
            &self.postgres_url_file,
        ) {
            (Some(url), None, None) => return PostgresUrl::parse(url, KEY),
            (None, Some(var), None) => SecretSource::Env(var.clone()),
            (None, None, Some(path)) => SecretSource::File(path.clone()),
            _ => {
                return Err(ConfigError::new(
                    KEY,
                    "set exactly one of postgres_url, postgres_url_env and postgres_url_file",
                ));
            }
        };
        let url = source.read(env, KEY)?;
        PostgresUrl::parse(url.expose().trim(), &source.key(KEY))
    }

    pub fn validate(&self, profiles: &[String]) -> Result<(), ConfigError> {
        if !self.path.starts_with('/') {
            return Err(ConfigError::new("callbacks.path", "must start with /"));
        }
        if !profiles.contains(&self.profile) {
            return Err(ConfigError::new(
                "callbacks.profile",
                format_args!("no profile named {:?}", self.profile),
            ));
        }
        for (key, v) in [
            ("callbacks.max_body_bytes", self.max_body_bytes as u64),
            ("callbacks.max_age_ms", self.max_age_ms),
            ("callbacks.backoff_base_ms", self.backoff_base_ms),
            ("callbacks.backoff_cap_ms", self.backoff_cap_ms),
            ("callbacks.delivery_timeout_ms", self.delivery_timeout_ms),
            ("callbacks.retain_ms", self.retain_ms),
            (
                "callbacks.postgres_pool_size",
                self.postgres_pool_size as u64,
            ),
            (
                "callbacks.postgres_statement_timeout_ms",
                self.postgres_statement_timeout_ms,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        if self.postgres_pool_size > 1000 {
            return Err(ConfigError::new(
                "callbacks.postgres_pool_size",
                "must be at most 1000",
            ));
        }
        let sources = [
            self.postgres_url.is_some(),
            self.postgres_url_env.is_some(),
            self.postgres_url_file.is_some(),
        ];
        match (self.backend, sources.iter().filter(|s| **s).count()) {
            (_, 2..) => {
                return Err(ConfigError::new(
                    "callbacks.postgres_url",
                    "set at most one of postgres_url, postgres_url_env and postgres_url_file",
                ));
            }
            (CallbackBackend::Postgres, 0) => {
                return Err(ConfigError::new(
                    "callbacks.postgres_url",
                    "backend = \"postgres\" needs postgres_url, postgres_url_env or \
                     postgres_url_file",
                ));
            }
            _ => {}
        }
        if let Some(url) = &self.postgres_url {
            PostgresUrl::parse(url, "callbacks.postgres_url")?;
        }
        for (i, s) in self.subscribers.iter().enumerate() {
            super::upstream::upstream_base(&s.url)
                .map_err(|m| ConfigError::new(format!("callbacks.subscribers[{i}].url"), m))?;
        }
        Ok(())
    }
}

/// A PostgreSQL URL (`postgres://` or `postgresql://`). It may hold a
/// password, so `Debug` shows it redacted; [`PostgresUrl::expose`] is the
/// only way to it.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    url: crate::base::secret::Secret,
    ssl_mode: SslMode,
}

/// The URL's `sslmode`, with libpq's meanings. tokio-postgres reads only
/// `disable`, `prefer` and `require`; the two `verify-*` modes are read
/// here and taken off the URL before it sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext, always.
    Disable,
    /// TLS when the server offers it, plaintext when it does not; the
    /// certificate is not checked (it protects against listening, not
    /// against an active attacker). The default, as in libpq, so a URL
    /// that says nothing works with a server with or without TLS.
    #[default]
    Prefer,
    /// TLS or no connection. The chain is checked against `[tls]` when
    /// `tls.ca_file` is set (as libpq does when it has a root file),
    /// otherwise not at all.
    Require,
    /// TLS, and a chain to a root of `[tls]`; any host name.
    VerifyCa,
    /// TLS, a chain to a root of `[tls]`, and a certificate for the host
    /// connected to.
    VerifyFull,
}

impl SslMode {
    const NAMES: [(&'static str, SslMode); 5] = [
        ("disable", SslMode::Disable),
        ("prefer", SslMode::Prefer),
        ("require", SslMode::Require),
        ("verify-ca", SslMode::VerifyCa),
        ("verify-full", SslMode::VerifyFull),
    ];

    /// What tokio-postgres is told: whether TLS is tried, and required.
    fn negotiated(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }
}

/// libpq's TLS file options: the roots are `[tls]`'s, and client
/// certificates are not supported.
const LIBPQ_FILE_OPTIONS: [&str; 4] = ["sslrootcert", "sslcert", "sslkey", "sslcrl"];

impl PostgresUrl {
    /// Checks `url` the way the client will read it. The error names `key`
    /// and quotes neither the URL nor its password.
    pub fn parse(url: &str, key: &str) -> Result<PostgresUrl, ConfigError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::new(
                key,
                "must be a postgres:// or postgresql:// URL",
            ));
        }
        let (_, ssl_mode) = split_ssl_mode(url).map_err(|m| ConfigError::new(key, m))?;
        let parsed = PostgresUrl {
            url: crate::base::secret::Secret::new(url),
            ssl_mode,
        };
        match parsed.without_ssl_mode().parse::<tokio_postgres::Config>() {
            Ok(_) => Ok(parsed),
            Err(e) => Err(ConfigError::new(
                key,
                format_args!(
                    "not a usable PostgreSQL URL ({})",
                    redact::scrub(&e.to_string(), url)
                ),
            )),
        }
    }

    pub fn expose(&self) -> &str {
        self.url.expose()
    }

    /// The URL's `sslmode` (absent: [`SslMode::Prefer`]).
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// The connection settings the URL names, its `sslmode` as
    /// tokio-postgres understands it.
    pub fn client_config(&self) -> tokio_postgres::Config {
        let mut c: tokio_postgres::Config = self
            .without_ssl_mode()
            .parse()
            .expect("checked by PostgresUrl::parse");
        c.ssl_mode(self.ssl_mode.negotiated());
        c
    }

    fn without_ssl_mode(&self) -> String {
        split_ssl_mode(self.url.expose())
            .expect("checked by PostgresUrl::parse")
            .0
    }
}

/// The URL without its `sslmode` parameters, and the mode the last one
/// names. The query is found as tokio-postgres finds it: after the
/// credentials (up to the first `@`), at the first `?`.
fn split_ssl_mode(url: &str) -> Result<(String, SslMode), String> {
    let after_credentials = url.find('@').map_or(0, |at| at + 1);
    let Some(q) = url[after_credentials..]
        .find('?')
        .map(|q| after_credentials + q)
    else {
        return Ok((url.to_owned(), SslMode::default()));
    };
    let mut mode = SslMode::default();
    let mut kept = Vec::new();
    for param in url[q + 1..].split('&') {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        let name = percent_decoded(name);
        if name == "sslmode" {
            let value = percent_decoded(value);
            mode = SslMode::NAMES
                .iter()
                .find(|(n, _)| *n == value)
                .map(|(_, m)| *m)
                .ok_or_else(|| {
                    "sslmode must be disable, prefer, require, verify-ca or verify-full".to_owned()
                })?;
        } else if LIBPQ_FILE_OPTIONS.contains(&name.as_str()) {
            return Err(format!(
                "{name} is not read: TLS connections trust the roots of [tls] (tls.ca_file for a \
                 CA of your own), and client certificates are not supported"
            ));
        } else {
            kept.push(param);
        }
    }
    let mut out = url[..q].to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    Ok((out, mode))
}

fn percent_decoded(text: &str) -> String {
    form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresUrl({})", redact::url(self.url.expose()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::config::Config;
    use crate::config::testing::env_of;

    fn callbacks(toml: &str) -> CallbacksConfig {
        Config::from_toml(&format!("[callbacks]\n{toml}\n"))
            .unwrap()
            .callbacks
            .unwrap()
    }

    #[test]
    fn the_postgres_backend_needs_one_url_source() {
        let names = ["default".to_owned()];
        for (toml, key) in [
            ("backend = \"postgres\"", "callbacks.postgres_url"),
            (
                "backend = \"postgres\"\npostgres_url = \"postgres://h/db\"\npostgres_url_env = \"X\"",
                "callbacks.postgres_url",
            ),
            (
                "backend = \"postgres\"\npostgres_url = \"mysql://u:pw-5@h/db\"",
                "callbacks.postgres_url",
            ),
            (
                "backend = \"postgres\"\npostgres_url = \"postgres://h/db\"\npostgres_pool_size = 0",
                "callbacks.postgres_pool_size",
            ),
        ] {
            let e = callbacks(toml).validate(&names).unwrap_err();
            assert_eq!(e.key, key, "{toml}: {e}");
            assert!(!e.to_string().contains("pw-5"), "{e}");
        }
        let c = callbacks("backend = \"postgres\"\npostgres_url_env = \"PG\"");
        c.validate(&names).unwrap();
        let url = c
            .resolve_postgres_url(&env_of(&[("PG", "postgres://u:pw-6@127.0.0.1:1/db")]))
            .unwrap();
        assert_eq!(url.expose(), "postgres://u:pw-6@127.0.0.1:1/db");
        assert!(!format!("{url:?} {c:?}").contains("pw-6"));
        let e = c.resolve_postgres_url(&env_of(&[])).unwrap_err();
        assert_eq!(e.key, "callbacks.postgres_url_env", "{e}");
    }

    #[test]
    fn sslmode_is_read_with_libpqs_five_values_and_taken_off_the_url() {
        use tokio_postgres::config::SslMode as Pg;
        let base = "postgres://u:pw-7@db.internal:5432/app";
        for (query, mode, negotiated) in [
            ("", SslMode::Prefer, Pg::Prefer),
            ("?sslmode=disable", SslMode::Disable, Pg::Disable),
            ("?sslmode=prefer", SslMode::Prefer, Pg::Prefer),
            ("?sslmode=require", SslMode::Require, Pg::Require),
            ("?sslmode=verify-ca", SslMode::VerifyCa, Pg::Require),
            (
                "?application_name=x&sslmode=verify-full&connect_timeout=3",
                SslMode::VerifyFull,
                Pg::Require,
            ),
            // The last one counts, as with tokio-postgres.
            (
                "?sslmode=disable&sslmode=verify-full",
                SslMode::VerifyFull,
                Pg::Require,
            ),
        ] {
            let url = PostgresUrl::parse(&format!("{base}{query}"), "k").unwrap();
            assert_eq!(url.ssl_mode(), mode, "{query}");
            let c = url.client_config();
            assert_eq!(c.get_ssl_mode(), negotiated, "{query}");
            assert_eq!(c.get_password(), Some(&b"pw-7"[..]));
            assert_eq!(c.get_dbname(), Some("app"));
            if query.contains("connect_timeout") {
                assert_eq!(c.get_application_name(), Some("x"));
                assert_eq!(c.get_connect_timeout(), Some(&Duration::from_secs(3)));
            }
        }
        // A `?` in the password is the password's, not a query.
        let url = PostgresUrl::parse("postgres://u:p?w-8@h/db?sslmode=require", "k").unwrap();
        assert_eq!(url.ssl_mode(), SslMode::Require);
        assert_eq!(url.client_config().get_password(), Some(&b"p?w-8"[..]));

        for (query, says) in [
            ("?sslmode=allow", "sslmode must be"),
            ("?sslmode=VERIFY-FULL", "sslmode must be"),
            ("?sslmode=verify-full&sslrootcert=/ca.pem", "tls.ca_file"),
            ("?sslcert=/c.pem", "client certificates"),
        ] {
            let e = PostgresUrl::parse(&format!("{base}{query}"), "k").unwrap_err();
            assert_eq!(e.key, "k");
            assert!(e.message.contains(says), "{query}: {e}");
            assert!(!e.to_string().contains("pw-7"), "{e}");
        }
    }
}
