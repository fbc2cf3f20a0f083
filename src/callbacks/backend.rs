//! Where messages are kept, behind one set of async operations: the local
//! redb file (its calls run on blocking threads, a commit waits for the
//! disk) or the PostgreSQL database every replica shares.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::CallbackError;
use super::postgres::PgStore;
use super::store::{Cursor, Delivery, Due, Message, Outcome, Page, Pruned, Store, StoreError};
use crate::config::{CallbackBackend, CallbacksConfig, ConfigError, PostgresUrl};
use crate::net::tls::WithTrust;

#[derive(Debug)]
pub enum Backend {
    /// This process's file.
    Local(Arc<Store>),
    /// The shared database.
    Postgres(Arc<PgStore>),
}

/// A claimed delivery's lease beyond its attempt's own time: a replica
/// that holds a delivery longer than `delivery_timeout_ms` plus this has
/// died, and another may take it.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// Most dead letters the local store puts back in line per transaction.
const LOCAL_REPLAY_BATCH: usize = 1000;

impl Backend {
    /// Opens the store `config` names: the local file, or the database
    /// (connected, its schema created or migrated).
    pub async fn open(
        config: &CallbacksConfig,
        postgres_url: Option<&WithTrust<PostgresUrl>>,
    ) -> Result<Backend, ConfigError> {
        match config.backend {
            CallbackBackend::Local => Self::open_local(config),
            CallbackBackend::Postgres => {
                let url = postgres_url.ok_or_else(|| {
                    ConfigError::new("callbacks.postgres_url", "no PostgreSQL URL was read")
                })?;
                let store = PgStore::open(config, url)
                    .await
                    .map_err(|e| ConfigError::new("callbacks.postgres_url", format_args!("{e}")))?;
                Ok(Backend::Postgres(store))
            }
        }
    }

    /// Opens the local file named by `config.store`.
    pub fn open_local(config: &CallbacksConfig) -> Result<Backend, ConfigError> {
        let store = Store::open(&config.store).map_err(|e| {
            ConfigError::new(
                "callbacks.store",
                format_args!("cannot open {}: {e}", config.store.display()),
            )
        })?;
        Ok(Backend::Local(Arc::new(store)))
    }

    pub fn local(&self) -> Option<&Store> {
        match self {
            Backend::Local(store) => Some(store),
            Backend::Postgres(_) => None,
        }
    }

    /// Runs `f` on the local store on a blocking thread.
    async fn blocking<T, F>(store: &Arc<Store>, f: F) -> Result<T, CallbackError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = store.clone();
        Ok(tokio::task::spawn_blocking(move || f(&store)).await??)
    }

    pub async fn insert(
        &self,
        id: String,
        message: Message,
        deliveries: Vec<Delivery>,
    ) -> Result<bool, CallbackError> {
        match self {
            Backend::Local(s) => {
                Self::blocking(s, move |s| s.insert(&id, &message, &deliveries)).await
            }
            Backend::Postgres(p) => Ok(p.insert(&id, &message, &deliveries).await?),
        }
    }

    /// A page of the pending (or dead) deliveries, in listing order after
    /// `after`.
    pub async fn page(
        &self,
        dead: bool,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Page, CallbackError> {
        match self {
            Backend::Local(s) => {
                Self::blocking(s, move |s| s.page(dead, after.as_ref(), limit)).await
            }
            Backend::Postgres(p) => Ok(p.page(dead, after.as_ref(), limit).await?),
        }
    }

    /// Puts the dead letter whose key or delivery id is `id` back in line.
    pub async fn replay_one(&self, id: String, now_ms: u64) -> Result<usize, CallbackError> {
        match self {
            Backend::Local(s) => Self::blocking(s, move |s| s.replay_one(&id, now_ms)).await,
            Backend::Postgres(p) => Ok(p.replay_one(&id, now_ms).await?),
        }
    }

    /// Puts every dead letter back in line, in bounded batches.
    pub async fn replay_all(&self, now_ms: u64) -> Result<usize, CallbackError> {
        match self {
            Backend::Local(s) => {
                let mut from = None;
                let mut total = 0;
                loop {
                    let (moved, next) = Self::blocking(s, move |s| {
                        s.replay_batch(from.as_deref(), now_ms, LOCAL_REPLAY_BATCH, now_ms)
                    })
                    .await?;
                    total += moved;
                    match next {
                        Some(key) => from = Some(key),
                        None => return Ok(total),
                    }
                }
            }
            Backend::Postgres(p) => Ok(p.replay(None, now_ms).await?),
        }
    }

    /// Due deliveries to start now, and when the next one falls due. Local:
    /// those not in `skip` (in flight here); shared: claimed for this
    /// replica with a lease of `attempt` plus a margin.
    pub async fn due(
        &self,
        now_ms: u64,
        limit: usize,
        skip: HashSet<String>,
        attempt: Duration,
    ) -> Result<Due, CallbackError> {
        match self {
            Backend::Local(s) => Self::blocking(s, move |s| s.due(now_ms, limit, &skip)).await,
            Backend::Postgres(p) => Ok(p.claim(now_ms, limit, attempt + LEASE_MARGIN).await?),
        }
    }

    /// The delivery as it stands now, if it is still to be made. Local: read
    /// again (the list `due` gave is a snapshot). Shared: the claim is this
    /// replica's alone, so the claimed row is current.
    pub async fn current(&self, d: Delivery) -> Result<Option<Delivery>, CallbackError> {
        match self {
            Backend::Local(s) => {
                let key = d.key();
                Self::blocking(s, move |s| s.pending_one(&key)).await
            }
            Backend::Postgres(_) => Ok(Some(d)),
        }
    }

    pub async fn message(&self, id: String) -> Result<Option<Message>, CallbackError> {
        match self {
            Backend::Local(s) => Self::blocking(s, move |s| s.message(&id)).await,
            Backend::Postgres(p) => Ok(p.message(&id).await?),
        }
    }

    /// Records what an attempt decided. `false`: the shared store's row is
    /// no longer this replica's claim, and nothing changed (the local store
    /// always applies: a delivery no longer pending is left alone).
    pub async fn record(&self, outcome: Outcome) -> Result<bool, CallbackError> {
        match self {
            Backend::Local(s) => {
                Self::blocking(s, move |s| {
                    match &outcome {
                        Outcome::Delivered(d) => s.delivered(d)?,
                        Outcome::Rescheduled(d) => s.reschedule(d)?,
                        Outcome::Buried(d) => s.bury(d)?,
                    }
                    Ok(true)
                })
                .await
            }
            Backend::Postgres(p) => Ok(p.record(&outcome).await?),
        }
    }

    pub async fn prune(
        &self,
        before_ms: u64,
        from: Option<(u64, String)>,
        limit: usize,
    ) -> Result<Pruned, CallbackError> {
        match self {
            Backend::Local(s) => {
                Self::blocking(s, move |s| s.prune(before_ms, from.as_ref(), limit)).await
            }
            Backend::Postgres(p) => Ok(p.prune(before_ms, limit).await?),
        }
    }

    /// Completes when new work was stored (by this process, or for the
    /// shared store by any replica).
    pub async fn changed(&self) {
        match self {
            Backend::Local(s) => s.changed().await,
            Backend::Postgres(p) => p.changed().await,
        }
    }

    /// Whether `due` hands deliveries over under a lease: then the loop
    /// takes no more than it can start at once, so none waits for a slot
    /// while its lease runs out.
    pub fn leases(&self) -> bool {
        matches!(self, Backend::Postgres(_))
    }

    /// Longest the delivery loop sleeps without looking: the shared store's
    /// notifications can be lost with their connection.
    pub fn poll_every(&self) -> Option<Duration> {
        match self {
            Backend::Local(_) => None,
            Backend::Postgres(_) => Some(Duration::from_secs(5)),
        }
    }
}
