//! A config with its secrets read: the profiles and clients it names,
//! ready to serve. Reading secrets needs the environment and the files the
//! config points at, so it happens here, once the config is valid.

use std::path::Path;

use std::sync::Arc;

use crate::base::secret::Secret;
use crate::config::RedisUrlKeys as _;
use crate::config::{
    CacheBackend, CallbackBackend, Config, ConfigError, Env, IdempotencyBackend, PostgresUrl,
    RateLimitBackend, RedisUrl, TracesEndpoint,
};
use crate::net::caller_tls::CallerTls;
use crate::net::egress::Egress;
use crate::net::tls::{Trust, WithTrust};
use crate::policy::auth::Client;
use crate::policy::profiles::Profile;

/// A validated config with every profile's secret loaded.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub profiles: Vec<Profile>,
    pub clients: Vec<Client>,
    /// The Redis URL of `[rate_limit]` with `backend = "redis"`, read from
    /// its source (`redis_url`, `redis_url_env` or `redis_url_file`). Each
    /// store URL and the traces endpoint carry [`Loaded::tls`], so that
    /// their TLS connections trust it and nothing else.
    pub redis_url: Option<WithTrust<RedisUrl>>,
    /// The Redis URL of `[idempotency]` with `store = "redis"`, read from
    /// its source.
    pub idempotency_redis_url: Option<WithTrust<RedisUrl>>,
    /// The PostgreSQL URL of `[callbacks]` with `backend = "postgres"`.
    pub callbacks_postgres_url: Option<WithTrust<PostgresUrl>>,
    /// Where spans go; `None`: no traces.
    pub traces_endpoint: Option<WithTrust<TracesEndpoint>>,
    /// The Redis URL of `[cache]` with `backend = "redis"`.
    pub cache_redis_url: Option<WithTrust<RedisUrl>>,
    /// The token the control listener requires, if one is configured.
    pub control_token: Option<Secret>,
    /// Whom every outgoing TLS connection trusts (`[tls]`).
    pub tls: Trust,
    /// The traffic and callback listeners' TLS, with `server.tls_cert_file`.
    pub caller_tls: Option<Arc<CallerTls>>,
    /// The way to the provider: `upstream.proxy` or the environment's
    /// proxy, or none.
    pub egress: Egress,
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
    crate::policy::routes::check_entries(&config.routes)?;
    let profiles = config
        .profiles
        .iter()
        .enumerate()
        .map(|(i, p)| Profile::load(p, &format!("profiles[{i}]"), env))
        .collect::<Result<Vec<_>, _>>()?;
    let clients = config
        .clients
        .iter()
        .enumerate()
        .map(|(i, c)| Client::load(c, &format!("clients[{i}]"), i + 1, env))
        .collect::<Result<Vec<_>, _>>()?;
    let redis_url = match &config.rate_limit {
        Some(r) if r.backend == RateLimitBackend::Redis => Some(r.resolve_redis_url(env)?),
        _ => None,
    };
    let idempotency_redis_url = match &config.idempotency {
        Some(i) if i.backend == IdempotencyBackend::Redis => Some(i.resolve_redis_url(env)?),
        _ => None,
    };
    let callbacks_postgres_url = match &config.callbacks {
        Some(c) if c.backend == CallbackBackend::Postgres => Some(c.resolve_postgres_url(env)?),
        _ => None,
    };
    let traces_endpoint = config.telemetry.endpoint(env)?;
    let cache_redis_url = match config.cache.backend {
        CacheBackend::Redis => Some(config.cache.resolve_redis_url(env)?),
        CacheBackend::Local => None,
    };
    let control_token = match config.server.control_token()? {
        Some(source) => Some(source.read(env, "server.control_token")?),
        None => None,
    };
    let tls = Trust::load(&config.tls)?;
    let caller_tls = CallerTls::load(&config.server)?.map(Arc::new);
    let trusting = |target| WithTrust::new(target, tls.clone());
    let egress = Egress::resolve(&config.upstream, env)?;
    Ok(Loaded {
        redis_url: redis_url.map(trusting),
        idempotency_redis_url: idempotency_redis_url.map(trusting),
        callbacks_postgres_url: callbacks_postgres_url.map(|u| WithTrust::new(u, tls.clone())),
        traces_endpoint: traces_endpoint.map(|e| WithTrust::new(e, tls.clone())),
        cache_redis_url: cache_redis_url.map(trusting),
        tls,
        caller_tls,
        egress,
        control_token,
        config,
        profiles,
        clients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{CREDS, env_of};

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
        let e = crate::policy::profiles::Profile::load(&c.profiles[0], "profiles[0]", &env_of(&[]))
            .unwrap_err();
        assert_eq!(e.key, "profiles[0].secret");
        assert!(!e.to_string().contains("do-not-echo"));
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
        c.rate_limit.as_mut().unwrap().backend = RateLimitBackend::Local;
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
    fn effective_config_renders_without_secret() {
        let loaded = load(None, &env_of(CREDS)).unwrap();
        let text = loaded.config.to_toml();
        assert!(text.contains("PANDAPON_ACCESS_SECRET"));
        assert!(!text.contains("s3cr3t-value"));
        assert!(!format!("{loaded:?}").contains("s3cr3t-value"));
    }
}
