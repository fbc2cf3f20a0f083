//! Changes picked up without a restart.
//!
//! * Secret files are re-read every `server.secret_poll_ms`: a changed secret
//!   is used from the next attempt on, so calls in flight are not failed.
//!   Polling (rather than inotify) follows Kubernetes' atomic symlink swap of
//!   a mounted Secret without special cases: each read resolves the link.
//! * Clients' token files are re-read on the same schedule: a rotated
//!   token is accepted from the next call, and the old one no longer.
//! * The whole config is reloaded on `SIGHUP`, on `POST /reload` (control
//!   listener) and when the config file's bytes change (read every
//!   `server.config_poll_ms`). A reload is all or nothing: a valid config
//!   replaces the running gateway atomically (calls in flight finish on the
//!   old one); one that does not validate, or that changes a key the
//!   process took at start ([`FIXED_AT_START`]: listeners, stores, worker
//!   threads...), is refused with one log line naming the key, and the
//!   running config stays. `pandagate_config_reloads_total{result}` counts
//!   both. Retry budget, breaker and limiter state start afresh with a new
//!   config. The push receiver verifies each push with the running config's
//!   secret ([`profile_secret`]); the body budget keeps the bodies it holds
//!   and takes the new config's size.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::base::secret::Secret;
use crate::config::{self, SecretFileError};
use crate::gateway::Gateway;
use crate::observe::metrics::Metrics;

/// The gateway serving now; replaced whole on reload.
pub type Current = Arc<ArcSwap<Gateway>>;

/// Re-reads every profile's secret file, and every client's token file,
/// each `interval`, forever.
pub async fn watch_secret_files(current: Current, metrics: Arc<Metrics>, interval: Duration) {
    // Files currently unusable, by profile or client: logged and counted
    // once per failure, not once per poll.
    let mut failing: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(interval).await;
        let gateway = current.load_full();
        for profile in gateway.profiles().iter() {
            let Some(path) = profile.secret_source.file() else {
                continue;
            };
            let what = format!("profile {}", profile.name);
            if let Some(secret) = read_once(path, &what, &mut failing, &metrics).await
                && profile.secret.replace(secret)
            {
                metrics.secret_reloaded(true);
                tracing::info!(profile = %profile.name, "secret reloaded from its file");
            }
        }
        for client in gateway.clients().iter() {
            let Some(path) = client.token_file() else {
                continue;
            };
            let what = format!("client {}", client.name);
            if let Some(token) = read_once(path, &what, &mut failing, &metrics).await
                && client.rotate(&token)
            {
                metrics.secret_reloaded(true);
                tracing::info!(client = %client.name, "client token reloaded from its file");
            }
        }
    }
}

/// The secret in `path`, or `None` when it cannot be used: logged and
/// counted the first time, for `what` (a profile or a client).
async fn read_once(
    path: &std::path::Path,
    what: &str,
    failing: &mut HashSet<String>,
    metrics: &Metrics,
) -> Option<Secret> {
    match read(path.to_owned()).await {
        Ok(secret) => {
            failing.remove(what);
            Some(secret)
        }
        Err(e) => {
            if failing.insert(what.to_owned()) {
                metrics.secret_reloaded(false);
                tracing::warn!(
                    of = what,
                    error = %e,
                    "secret file unusable; keeping the current secret"
                );
            }
            None
        }
    }
}

async fn read(path: PathBuf) -> Result<Secret, SecretFileError> {
    let file = path.clone();
    tokio::task::spawn_blocking(move || config::read_secret_file(&file))
        .await
        .unwrap_or_else(|e| {
            Err(SecretFileError::Read {
                path,
                source: std::io::Error::other(e),
            })
        })
}

/// The current secret of the running config's profile `name`, looked up
/// at each call: it follows both secret-file rotation and reloads.
pub fn profile_secret(
    current: Current,
    name: &str,
) -> Arc<dyn Fn() -> Option<Arc<Secret>> + Send + Sync> {
    let name: Arc<str> = Arc::from(name);
    Arc::new(move || {
        current
            .load()
            .profiles()
            .get(&name)
            .map(|p| Arc::clone(&p.secret.current()))
    })
}

/// Keys the process took at start, and which a running process cannot
/// change: a new config that changes one is refused whole. Everything else
/// (profiles, clients, routes, retry, breaker, quota, the upstream and its
/// TLS trust, body limits, `log.inspect_bytes`) is applied.
pub const FIXED_AT_START: &[&str] = &[
    "server.listen",
    "server.admin_listen",
    "server.control_listen",
    "server.control_token_env",
    "server.control_token_file",
    "server.tls_cert_file",
    "server.tls_key_file",
    "server.tls_client_ca_file",
    "server.header_read_timeout_ms",
    "server.idle_timeout_ms",
    "server.max_header_bytes",
    "server.max_headers",
    "server.max_connections",
    "server.http2_max_concurrent_streams",
    "server.shutdown_grace_ms",
    "server.secret_poll_ms",
    "server.config_poll_ms",
    "server.worker_threads",
    "log.format",
    "log.queue_lines",
    "callbacks",
    "telemetry",
    "cache",
    "idempotency",
];

/// What became of a reload.
#[derive(Debug)]
pub enum Outcome {
    /// The new config serves the calls that arrive from now on.
    Applied { profiles: usize },
    /// The running config stays; the error names the key.
    Refused(crate::config::ConfigError),
}

impl Outcome {
    /// The `result` label of `pandagate_config_reloads_total`.
    pub fn result(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Refused(_) => "refused",
        }
    }
}

/// Reloads the config, all or nothing, for SIGHUP, `POST /reload` and a
/// changed config file alike, one at a time.
pub struct Reloader {
    path: Option<PathBuf>,
    env: fn(&str) -> Option<String>,
    current: Current,
    /// The profile the running push receiver verifies with, if any: a
    /// config without it is refused, since the receiver cannot be
    /// restarted by a reload.
    receiver_profile: Option<String>,
    /// The keys of [`FIXED_AT_START`] as the process started with them.
    started: Vec<(&'static str, serde_json::Value)>,
    one_at_a_time: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        env: fn(&str) -> Option<String>,
        current: Current,
        receiver_profile: Option<String>,
        started: &crate::config::Config,
    ) -> Reloader {
        Reloader {
            path,
            env,
            current,
            receiver_profile,
            started: fixed_keys(started),
            one_at_a_time: std::sync::Mutex::new(()),
        }
    }

    /// The config file, if the process was started with one.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// Loads the config again and, if it is valid and changes nothing
    /// fixed at start, makes it the running one. Logs one line and counts
    /// the outcome. `trigger` says what asked (for the log).
    pub fn reload(&self, trigger: &str) -> Outcome {
        let _one = self
            .one_at_a_time
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let running = self.current.load_full();
        let outcome = self.try_reload(&running);
        running.lasting().metrics.config_reloaded(outcome.result());
        match &outcome {
            Outcome::Applied { profiles } => {
                tracing::info!(trigger, profiles, "config reloaded")
            }
            Outcome::Refused(e) => tracing::warn!(
                trigger,
                key = %e.key,
                error = %e.message,
                "config reload refused; the running config stays"
            ),
        }
        outcome
    }

    fn try_reload(&self, running: &Gateway) -> Outcome {
        let loaded = match crate::policy::loaded::load(self.path.as_deref(), &self.env) {
            Ok(loaded) => loaded,
            Err(e) => return Outcome::Refused(e),
        };
        if let Some(name) = &self.receiver_profile
            && !loaded.profiles.iter().any(|p| &*p.name == name.as_str())
        {
            return Outcome::Refused(crate::config::ConfigError::new(
                "callbacks.profile",
                format!("the push receiver's profile {name:?} is missing"),
            ));
        }
        if let Some(key) = changed_key(&self.started, &fixed_keys(&loaded.config)) {
            return Outcome::Refused(crate::config::ConfigError::new(
                key,
                "cannot change while running; restart to apply it",
            ));
        }
        // The stores, the exporter, the cache and the body budget stay as
        // opened at start; the new config brings everything else.
        match Gateway::new(&loaded, running.lasting().clone()) {
            Ok(gateway) => {
                self.current.store(Arc::new(gateway));
                Outcome::Applied {
                    profiles: loaded.profiles.len(),
                }
            }
            Err(e) => Outcome::Refused(e),
        }
    }
}

/// Each key of [`FIXED_AT_START`] with its value in `config` (`null` when
/// absent).
fn fixed_keys(config: &crate::config::Config) -> Vec<(&'static str, serde_json::Value)> {
    let whole = serde_json::to_value(config).unwrap_or_default();
    FIXED_AT_START
        .iter()
        .map(|key| {
            let value = key
                .split('.')
                .try_fold(&whole, |v, part| v.get(part))
                .cloned()
                .unwrap_or_default();
            (*key, value)
        })
        .collect()
}

/// The first key whose value differs.
fn changed_key(
    started: &[(&'static str, serde_json::Value)],
    now: &[(&'static str, serde_json::Value)],
) -> Option<&'static str> {
    started
        .iter()
        .zip(now)
        .find(|((_, a), (_, b))| a != b)
        .map(|((key, _), _)| *key)
}

/// Reads the config file every `interval` and reloads it when its bytes
/// change (the kubelet's swap of a mounted ConfigMap's symlink included:
/// each read resolves the link). A changed file is tried once; a file that
/// cannot be read is logged once until it can be again.
pub async fn watch_config_file(reloader: Arc<Reloader>, interval: Duration) {
    let Some(path) = reloader.path().map(std::path::Path::to_path_buf) else {
        return;
    };
    let read = |path: PathBuf| async move {
        tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    };
    let mut last = read(path.clone()).await.ok();
    let mut unreadable = false;
    loop {
        tokio::time::sleep(interval).await;
        match read(path.clone()).await {
            Ok(bytes) => {
                unreadable = false;
                if last.as_ref() != Some(&bytes) {
                    last = Some(bytes);
                    let reloader = reloader.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || reloader.reload("config file changed"))
                            .await;
                }
            }
            Err(e) => {
                if !unreadable {
                    unreadable = true;
                    tracing::warn!(
                        path = %path.display(),
                        error = %e,
                        "config file unreadable; the running config stays"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixed_key_names_a_key_of_the_config() {
        // Every optional key and section set, so that each is serialized.
        let config: crate::config::Config = toml::from_str(
            "[server]\ncontrol_token_env = \"T\"\ncontrol_token_file = \"/t\"\n\
             tls_cert_file = \"/c\"\ntls_key_file = \"/k\"\ntls_client_ca_file = \"/ca\"\n\
             [log]\nformat = \"json\"\n[callbacks]\n[idempotency]\n",
        )
        .unwrap();
        let whole = serde_json::to_value(&config).unwrap();
        for key in FIXED_AT_START {
            let found = key.split('.').try_fold(&whole, |v, part| v.get(part));
            assert!(found.is_some(), "{key} is not a key of the config");
        }
    }

    #[test]
    fn a_change_is_found_under_the_first_fixed_key_it_touches() {
        let started = crate::config::Config::default();
        let mut now = started.clone();
        assert_eq!(changed_key(&fixed_keys(&started), &fixed_keys(&now)), None);
        now.server.body_read_timeout_ms += 1;
        now.log.inspect_bytes += 1;
        assert_eq!(
            changed_key(&fixed_keys(&started), &fixed_keys(&now)),
            None,
            "reloadable keys are not fixed"
        );
        now.server.worker_threads = 3;
        now.cache.max_bytes += 1;
        assert_eq!(
            changed_key(&fixed_keys(&started), &fixed_keys(&now)),
            Some("server.worker_threads")
        );
        let mut now = started.clone();
        now.cache.max_bytes += 1;
        assert_eq!(
            changed_key(&fixed_keys(&started), &fixed_keys(&now)),
            Some("cache")
        );
    }
}
