//! Changes picked up without a restart.
//!
//! * Secret files are re-read every `server.secret_poll_ms`: a changed secret
//!   is used from the next attempt on, so calls in flight are not failed.
//!   Polling (rather than inotify) follows Kubernetes' atomic symlink swap of
//!   a mounted Secret without special cases: each read resolves the link.
//! * `SIGHUP` reloads the whole config: a valid one replaces the running
//!   gateway atomically (calls in flight finish on the old one); an invalid
//!   one is logged and the old one keeps serving. Listener addresses are
//!   bound once: changing them needs a restart. Retry budget, breaker and
//!   limiter state start afresh with the new config. The push receiver's
//!   store and settings stay as started, but it verifies each push with the
//!   running config's secret ([`profile_secret`]). So do the idempotency
//!   store, the trace exporter and the read cache (its entries and
//!   `[cache]` settings; the routes' TTLs follow the new config), and the
//!   body budget (the bodies it holds; its size follows the new config).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::base::secret::Secret;
use crate::config::{self, Env, SecretFileError};
use crate::gateway::Gateway;
use crate::observe::metrics::Metrics;

/// The gateway serving now; replaced whole on reload.
pub type Current = Arc<ArcSwap<Gateway>>;

/// Re-reads every profile's secret file each `interval`, forever.
pub async fn watch_secret_files(current: Current, metrics: Arc<Metrics>, interval: Duration) {
    // Profiles whose file is currently unusable: logged and counted once
    // per failure, not once per poll.
    let mut failing: HashSet<Arc<str>> = HashSet::new();
    loop {
        tokio::time::sleep(interval).await;
        let gateway = current.load_full();
        for profile in gateway.profiles().iter() {
            let Some(path) = profile.secret_source.file() else {
                continue;
            };
            match read(path.to_owned()).await {
                Ok(secret) => {
                    failing.remove(&profile.name);
                    if profile.secret.replace(secret) {
                        metrics.secret_reloaded(true);
                        tracing::info!(profile = %profile.name, "secret reloaded from its file");
                    }
                }
                Err(e) => {
                    if failing.insert(profile.name.clone()) {
                        metrics.secret_reloaded(false);
                        tracing::warn!(
                            profile = %profile.name,
                            error = %e,
                            "secret file unusable; keeping the current secret"
                        );
                    }
                }
            }
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

/// Loads the config again and, if it is valid, makes it the running one.
/// `receiver_profile`: the profile the running push receiver verifies
/// with; a config without it is rejected, since the receiver cannot be
/// restarted by a reload.
pub fn reload(
    path: Option<&std::path::Path>,
    env: Env<'_>,
    current: &Current,
    receiver_profile: Option<&str>,
) {
    let loaded = match crate::policy::loaded::load(path, env) {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::warn!(error = %e, "config reload rejected; the running config stays");
            return;
        }
    };
    if let Some(name) = receiver_profile
        && !loaded.profiles.iter().any(|p| &*p.name == name)
    {
        tracing::warn!(
            profile = name,
            "config reload rejected: the push receiver's profile is missing; the running config stays"
        );
        return;
    }
    let running = current.load();
    let old = running.server_config();
    let new = &loaded.config.server;
    if new.listen != old.listen
        || new.admin_listen != old.admin_listen
        || new.control_listen != old.control_listen
    {
        tracing::warn!("listener addresses changed: they take effect after a restart");
    }
    if (
        &new.tls_cert_file,
        &new.tls_key_file,
        &new.tls_client_ca_file,
    ) != (
        &old.tls_cert_file,
        &old.tls_key_file,
        &old.tls_client_ca_file,
    ) {
        tracing::warn!(
            "TLS file names changed: they take effect after a restart (the files named at start are re-read when they change)"
        );
    }
    let lasting = running.lasting();
    if loaded.config.idempotency.is_some() != lasting.idempotency.is_some() {
        tracing::warn!("[idempotency] added or removed: that takes effect after a restart");
    }
    // The stores, the exporter, the cache and the body budget stay as
    // opened at start; the new config brings everything else.
    match Gateway::new(&loaded, lasting.clone()) {
        Ok(gateway) => {
            current.store(Arc::new(gateway));
            lasting.metrics.config_reloaded();
            tracing::info!(profiles = loaded.profiles.len(), "config reloaded");
        }
        Err(e) => tracing::warn!(error = %e, "config reload rejected; the running config stays"),
    }
}
