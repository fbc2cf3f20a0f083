//! The shared message store: PostgreSQL, used by every replica at once.
//!
//! * A push is one transaction: the message (id = SHA-256 of the raw body,
//!   so a repeated push is stored once) and one delivery row per matching
//!   subscriber, then `NOTIFY`; the receiver answers 200 only after the
//!   commit.
//! * Each replica's delivery loop claims due deliveries with
//!   `FOR UPDATE SKIP LOCKED`, setting a lease (`locked_until_ms`) and the
//!   replica's claim token (random, one per process): two replicas never
//!   hold the same delivery, and a replica killed mid-delivery loses only
//!   its lease. Its updates (delivered, rescheduled, dead) apply while the
//!   row is still its claim, whatever the lease says: an outcome that could
//!   not be written before the lease ran out still lands if no other replica
//!   took the row meanwhile.
//! * After the server (re)starts, a claim made before the start is not
//!   taken over for [`TAKEOVER_GRACE`]: its holder, which could not record
//!   its outcome while the database was down, gets to record it first.
//! * Operators' listings page through an index in a fixed order, and a dead
//!   letter is found by its key (the primary key) or its delivery id (an
//!   index on `pandagate_delivery_id(message_id, subscriber)`): no
//!   statement reads every row.
//! * The schema is created and migrated by [`PgStore::open`], under a
//!   transaction-scoped advisory lock, so replicas starting together apply
//!   each migration once.
//! * New work wakes the loops through `LISTEN pandagate_callbacks`, on a
//!   connection of its own that reconnects when lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use super::store::{Cursor, Delivery, Due, Message, Outcome, Page, Pruned};
use crate::config::{CallbacksConfig, PostgresUrl};
use crate::net::tls::WithTrust;
use crate::state::postgres::{causes, connector, describe};

/// The schema version this binary writes; [`MIGRATIONS`]`[i]` makes version
/// `i + 1`.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Each schema version's SQL, applied in order, each once (public so
/// tests can build an older schema). A released version is never edited:
/// a change is the next version.
pub const MIGRATIONS: [&str; 2] = [
    r"
CREATE TABLE pandagate_callback_messages (
    id text PRIMARY KEY,
    received_at_ms bigint NOT NULL,
    message text NOT NULL
);
CREATE INDEX pandagate_callback_messages_received
    ON pandagate_callback_messages (received_at_ms);
CREATE TABLE pandagate_callback_deliveries (
    message_id text NOT NULL REFERENCES pandagate_callback_messages (id),
    subscriber text NOT NULL,
    dead boolean NOT NULL DEFAULT false,
    attempts integer NOT NULL DEFAULT 0,
    first_at_ms bigint NOT NULL,
    next_at_ms bigint NOT NULL,
    last_error text,
    locked_until_ms bigint NOT NULL DEFAULT 0,
    claim bigint,
    PRIMARY KEY (message_id, subscriber)
);
CREATE INDEX pandagate_callback_deliveries_due
    ON pandagate_callback_deliveries (next_at_ms) WHERE NOT dead;
",
    // Version 2: listings in pages, replay by delivery id and the next lease
    // to pass, each found through an index; and when a claim was made. On a
    // table of 1 M deliveries the indexes take seconds to build, during
    // which writes wait. `claimed_at_ms` is 0 for claims made by a binary
    // older than this version.
    r"
CREATE FUNCTION pandagate_delivery_id(message_id text, subscriber text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT substr(encode(sha256(convert_to(message_id || '|' || subscriber, 'UTF8')), 'hex'), 1, 32) $$;
ALTER TABLE pandagate_callback_deliveries ADD COLUMN claimed_at_ms bigint NOT NULL DEFAULT 0;
CREATE INDEX pandagate_callback_deliveries_listed
    ON pandagate_callback_deliveries (dead, first_at_ms, pandagate_delivery_id(message_id, subscriber));
CREATE INDEX pandagate_callback_deliveries_dead_id
    ON pandagate_callback_deliveries (pandagate_delivery_id(message_id, subscriber)) WHERE dead;
CREATE INDEX pandagate_callback_deliveries_claimed
    ON pandagate_callback_deliveries (locked_until_ms) WHERE locked_until_ms > 0;
",
];

/// How long after the server starts a claim made before the start stays
/// its holder's, expired lease or not: time for the holder to record an
/// outcome it could not write while the database was down (its tries come
/// every half second at most), before another replica posts the delivery
/// again. Shorter than any lease, so claims made since the start are never
/// held back.
pub const TAKEOVER_GRACE: Duration = Duration::from_secs(5);

/// Most dead letters put back in line per transaction by a replay of all:
/// each batch stays far within the statement timeout, however many there are.
const REPLAY_BATCH: i64 = 500;

/// Longest a migration may take (its statements run without the statement
/// timeout: building an index on a large table takes seconds).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// Serialises migrations of replicas starting at once.
const MIGRATION_LOCK: i64 = 0x7061_6e64_6167_6174; // "pandagat"
const CHANNEL: &str = "pandagate_callbacks";

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("postgres: {0}")]
    Db(String),
    #[error("postgres: no answer within {0} ms")]
    Timeout(u64),
    #[error("postgres: the schema is version {found}, newer than this binary's {SCHEMA_VERSION}")]
    SchemaTooNew { found: i32 },
    #[error("postgres: a stored message cannot be read")]
    Corrupt,
    #[error("postgres: not reached since start; the schema is not known to be current yet")]
    NotReady,
}

pub struct PgStore {
    url: PostgresUrl,
    pool: Pool,
    /// Longest one operation may take, connecting included.
    timeout: Duration,
    /// Woken by `NOTIFY` (another replica, or this one, stored new work).
    changed: Arc<Notify>,
    /// The schema was found current (or made so): the store may be used.
    ready: AtomicBool,
    /// This replica's claim token: the `claim` of every row it claims.
    token: i64,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The connection settings: the URL's (TLS as its `sslmode` says), a
/// statement timeout on every statement (commits included), and a connect
/// timeout.
fn pg_config(url: &PostgresUrl, statement_timeout_ms: u64) -> tokio_postgres::Config {
    let mut c = url.client_config();
    c.options(format!("-c statement_timeout={statement_timeout_ms}"));
    c.connect_timeout(Duration::from_millis(statement_timeout_ms.max(1_000)));
    c.application_name("pandagate");
    c
}

impl PgStore {
    /// Connects, and creates or migrates the schema. A database that cannot
    /// be reached does not stop the gateway from starting (it also proxies
    /// calls): pushes are answered 503 (the provider pushes again) until a
    /// retry, every second, finds it and makes the schema current. A schema
    /// newer than this binary's is an error.
    ///
    /// Every connection, the pool's and the `LISTEN` one, uses TLS as the
    /// URL's `sslmode` says, trusting `url.trust()`.
    pub async fn open(
        config: &CallbacksConfig,
        url: &WithTrust<PostgresUrl>,
    ) -> Result<Arc<PgStore>, PgError> {
        let statement_ms = config.postgres_statement_timeout_ms;
        let manager = Manager::from_config(
            pg_config(url, statement_ms),
            connector(url),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let timeout = Duration::from_millis(statement_ms.saturating_mul(2).max(1_000));
        let pool = Pool::builder(manager)
            .max_size(config.postgres_pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| PgError::Db(causes(&e)))?;
        let store = Arc::new(PgStore {
            url: (**url).clone(),
            pool,
            timeout,
            changed: Arc::new(Notify::new()),
            ready: AtomicBool::new(false),
            token: rand::random(),
        });
        match store.migrate().await {
            Ok(()) => store.ready.store(true, Ordering::Release),
            Err(e @ PgError::SchemaTooNew { .. }) => return Err(e),
            Err(e) => {
                tracing::error!(error = %e, "callback store: PostgreSQL unavailable at start; pushes are answered 503 until it answers");
                tokio::spawn(store.clone().migrate_when_reachable());
            }
        }
        tokio::spawn(listen(
            pg_config(url, statement_ms),
            connector(url),
            store.changed.clone(),
            (**url).clone(),
        ));
        Ok(store)
    }

    fn db(&self, e: impl std::error::Error + 'static) -> PgError {
        PgError::Db(describe(&e, &self.url))
    }

    /// Tries the migrations every second until they succeed.
    async fn migrate_when_reachable(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match self.migrate().await {
                Ok(()) => {
                    self.ready.store(true, Ordering::Release);
                    self.changed.notify_one();
                    tracing::info!("callback store: PostgreSQL reached; pushes are taken");
                    return;
                }
                Err(e @ PgError::SchemaTooNew { .. }) => {
                    tracing::error!(error = %e, "callback store: pushes are refused until this binary is upgraded");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "callback store: PostgreSQL still unavailable")
                }
            }
        }
    }

    /// Runs `op` on a pooled connection within the store's timeout, once
    /// the schema is known to be current.
    async fn with<T>(
        &self,
        op: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, PgError> {
        if !self.ready.load(Ordering::Acquire) {
            return Err(PgError::NotReady);
        }
        self.run(op).await
    }

    /// Runs `op` on a pooled connection within the store's timeout.
    async fn run<T>(
        &self,
        op: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, PgError> {
        self.run_within(self.timeout, op).await
    }

    /// Runs `op` on a pooled connection within `timeout`.
    async fn run_within<T>(
        &self,
        timeout: Duration,
        op: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, PgError> {
        let run = async {
            let mut conn = self.pool.get().await.map_err(|e| self.db(e))?;
            op(&mut conn).await.map_err(|e| self.db(e))
        };
        tokio::time::timeout(timeout, run)
            .await
            .unwrap_or(Err(PgError::Timeout(timeout.as_millis() as u64)))
    }

    /// Applies the migrations this database lacks, once, whoever starts
    /// first.
    async fn migrate(&self) -> Result<(), PgError> {
        let found = self
            .run_within(MIGRATION_TIMEOUT, async |conn| {
                let tx = conn.transaction().await?;
                tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                    .await?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS pandagate_callback_schema (version integer NOT NULL);",
                )
                .await?;
                let row = tx
                    .query_opt("SELECT version FROM pandagate_callback_schema", &[])
                    .await?;
                let found: i32 = row.map_or(0, |r| r.get(0));
                if found >= SCHEMA_VERSION {
                    tx.commit().await?;
                    return Ok(found);
                }
                for migration in &MIGRATIONS[found.max(0) as usize..] {
                    tx.batch_execute(migration).await?;
                }
                tx.execute("DELETE FROM pandagate_callback_schema", &[])
                    .await?;
                tx.execute(
                    "INSERT INTO pandagate_callback_schema (version) VALUES ($1)",
                    &[&SCHEMA_VERSION],
                )
                .await?;
                tx.commit().await?;
                Ok(found)
            })
            .await?;
        if found > SCHEMA_VERSION {
            return Err(PgError::SchemaTooNew { found });
        }
        if found < SCHEMA_VERSION {
            tracing::info!(
                from = found,
                to = SCHEMA_VERSION,
                "callback store: PostgreSQL schema migrated"
            );
        }
        Ok(())
    }

    /// Completes when another replica (or this one) stored new work.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Stores a message and its deliveries in one transaction. `false`: the
    /// message is already stored; nothing changes.
    pub async fn insert(
        &self,
        id: &str,
        message: &Message,
        deliveries: &[Delivery],
    ) -> Result<bool, PgError> {
        let text = serde_json::to_string(message).expect("a message serialises");
        let received = message.received_at_ms as i64;
        self.with(async |conn| {
            let tx = conn.transaction().await?;
            let fresh = tx
                .execute(
                    "INSERT INTO pandagate_callback_messages (id, received_at_ms, message) \
                     VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                    &[&id, &received, &text],
                )
                .await?;
            if fresh == 0 {
                return Ok(false);
            }
            for d in deliveries {
                tx.execute(
                    "INSERT INTO pandagate_callback_deliveries \
                     (message_id, subscriber, first_at_ms, next_at_ms) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT DO NOTHING",
                    &[
                        &d.message_id,
                        &d.subscriber,
                        &(d.first_at_ms as i64),
                        &(d.next_at_ms as i64),
                    ],
                )
                .await?;
            }
            tx.batch_execute(&format!("NOTIFY {CHANNEL}")).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    pub async fn message(&self, id: &str) -> Result<Option<Message>, PgError> {
        let row = self
            .with(async |conn| {
                conn.query_opt(
                    "SELECT message FROM pandagate_callback_messages WHERE id = $1",
                    &[&id],
                )
                .await
            })
            .await?;
        row.map(|r| serde_json::from_str(r.get::<_, &str>(0)).map_err(|_| PgError::Corrupt))
            .transpose()
    }

    /// A page of the pending (or, with `dead`, dead) deliveries in listing
    /// order (see [`Cursor`]), after `after`: one index range scan of
    /// `limit + 1` rows, however many there are.
    pub async fn page(
        &self,
        dead: bool,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page, PgError> {
        let (at, id) = after.map_or((-1, ""), |c| {
            (
                i64::try_from(c.first_at_ms).unwrap_or(i64::MAX),
                c.delivery_id.as_str(),
            )
        });
        let fetch = limit as i64 + 1;
        let rows = self
            .with(async |conn| {
                conn.query(
                    "SELECT message_id, subscriber, attempts, first_at_ms, next_at_ms, last_error, \
                       pandagate_delivery_id(message_id, subscriber) \
                     FROM pandagate_callback_deliveries \
                     WHERE dead = $1 \
                       AND (first_at_ms, pandagate_delivery_id(message_id, subscriber)) > ($2, $3) \
                     ORDER BY first_at_ms, pandagate_delivery_id(message_id, subscriber) LIMIT $4",
                    &[&dead, &at, &id, &fetch],
                )
                .await
            })
            .await?;
        let rows = rows
            .iter()
            .map(|r| {
                let d = delivery(r);
                let cursor = Cursor {
                    first_at_ms: d.first_at_ms,
                    delivery_id: r.get(6),
                };
                (cursor, d)
            })
            .collect();
        Ok(Page::cut(rows, limit))
    }

    /// Claims up to `limit` deliveries due at `now_ms` that no replica
    /// holds, each for `lease` (the claimer's alone until then), and says
    /// when the next one not claimed falls due (or a lease passes). Leases
    /// are measured on the database's clock, so replicas whose clocks
    /// disagree still never hold a delivery at once. A claim made before
    /// the server started is taken over only [`TAKEOVER_GRACE`] after the
    /// start.
    pub async fn claim(&self, now_ms: u64, limit: usize, lease: Duration) -> Result<Due, PgError> {
        let now = now_ms as i64;
        let lease = lease.as_millis() as i64;
        let limit = limit as i64;
        let grace = TAKEOVER_GRACE.as_millis() as i64;
        let (rows, next) = self
            .with(async |conn| {
                let rows = conn
                    .query(
                        "WITH clock AS ( \
                           SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms, \
                             (extract(epoch FROM pg_postmaster_start_time()) * 1000)::bigint \
                               AS started_ms), \
                         due AS ( \
                           SELECT message_id, subscriber FROM pandagate_callback_deliveries \
                           WHERE NOT dead AND next_at_ms <= $1 \
                             AND locked_until_ms <= (SELECT ms FROM clock) \
                             AND (locked_until_ms = 0 \
                               OR claimed_at_ms >= (SELECT started_ms FROM clock) \
                               OR (SELECT ms >= started_ms + $5 FROM clock)) \
                           ORDER BY next_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED) \
                         UPDATE pandagate_callback_deliveries d \
                         SET locked_until_ms = (SELECT ms FROM clock) + $3, claim = $4, \
                           claimed_at_ms = (SELECT ms FROM clock) FROM due \
                         WHERE d.message_id = due.message_id AND d.subscriber = due.subscriber \
                         RETURNING d.message_id, d.subscriber, d.attempts, d.first_at_ms, \
                           d.next_at_ms, d.last_error",
                        &[&now, &limit, &lease, &self.token, &grace],
                    )
                    .await?;
                // The earliest of: the first unclaimed delivery to fall due
                // (the front of the due index), and the first claim to be
                // up for taking over (the few claimed rows, by their index).
                let next = conn
                    .query_one(
                        "WITH started AS ( \
                           SELECT (extract(epoch FROM pg_postmaster_start_time()) * 1000)::bigint \
                             AS ms) \
                         SELECT least( \
                           (SELECT next_at_ms FROM pandagate_callback_deliveries \
                            WHERE NOT dead AND locked_until_ms = 0 ORDER BY next_at_ms LIMIT 1), \
                           (SELECT min(CASE WHEN claimed_at_ms >= (SELECT ms FROM started) \
                                  THEN locked_until_ms \
                                  ELSE greatest(locked_until_ms, (SELECT ms FROM started) + $1) END) \
                            FROM pandagate_callback_deliveries \
                            WHERE locked_until_ms > 0 AND NOT dead))",
                        &[&grace],
                    )
                    .await?;
                Ok((rows, next.get::<_, Option<i64>>(0)))
            })
            .await?;
        let mut deliveries: Vec<Delivery> = rows.iter().map(delivery).collect();
        deliveries.sort_by_key(|d| d.next_at_ms);
        Ok(Due {
            deliveries,
            next_at_ms: next.map(|n| n.max(0) as u64),
        })
    }

    /// Runs `sql` (which names the delivery as `$1`, `$2` and this
    /// replica's claim token as `$3`), applying only while the row is still
    /// this replica's claim. `false`: it is not (another replica took it
    /// after its lease passed, or an earlier try already applied); nothing
    /// changed.
    async fn settle(
        &self,
        sql: &str,
        d: &Delivery,
        more: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<bool, PgError> {
        let mut args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&d.message_id, &d.subscriber, &self.token];
        args.extend_from_slice(more);
        let changed = self
            .with(async |conn| conn.execute(sql, &args).await)
            .await?;
        Ok(changed > 0)
    }

    /// Records what an attempt decided; see [`PgStore::settle`].
    pub async fn record(&self, outcome: &Outcome) -> Result<bool, PgError> {
        match outcome {
            Outcome::Delivered(d) => self.delivered(d).await,
            Outcome::Rescheduled(d) => self.reschedule(d).await,
            Outcome::Buried(d) => self.bury(d).await,
        }
    }

    /// The subscriber acknowledged: the delivery is done.
    pub async fn delivered(&self, d: &Delivery) -> Result<bool, PgError> {
        self.settle(
            "DELETE FROM pandagate_callback_deliveries WHERE message_id = $1 AND subscriber = $2 \
             AND claim = $3",
            d,
            &[],
        )
        .await
    }

    /// Another attempt failed (`dead`: too old to keep trying, a dead
    /// letter; otherwise pending again at `d.next_at_ms`).
    async fn failed(&self, d: &Delivery, dead: bool) -> Result<bool, PgError> {
        let (attempts, next) = (d.attempts as i32, d.next_at_ms as i64);
        self.settle(
            "UPDATE pandagate_callback_deliveries SET attempts = $4, next_at_ms = $5, \
             last_error = $6, dead = $7, locked_until_ms = 0, claim = NULL \
             WHERE message_id = $1 AND subscriber = $2 AND claim = $3 AND NOT dead",
            d,
            &[&attempts, &next, &d.last_error, &dead],
        )
        .await
    }

    pub async fn reschedule(&self, d: &Delivery) -> Result<bool, PgError> {
        self.failed(d, false).await
    }

    pub async fn bury(&self, d: &Delivery) -> Result<bool, PgError> {
        self.failed(d, true).await
    }

    /// Dead deliveries (all, or the one with `key`) back to pending, due
    /// now, with a fresh age. Returns how many.
    pub async fn replay(&self, key: Option<&str>, now_ms: u64) -> Result<usize, PgError> {
        match key {
            Some(key) => self.replay_one(key, now_ms).await,
            None => self.replay_all(now_ms).await,
        }
    }

    /// The dead letter whose key (`message_id|subscriber`: the primary key)
    /// or delivery id (its index) is `id`, back to pending, due now, with a
    /// fresh age. Returns how many (0 or 1).
    pub async fn replay_one(&self, id: &str, now_ms: u64) -> Result<usize, PgError> {
        const SET: &str = "UPDATE pandagate_callback_deliveries SET dead = false, \
            first_at_ms = $1, next_at_ms = $1, locked_until_ms = 0, claim = NULL WHERE dead AND ";
        let now = now_ms as i64;
        let moved = self
            .with(async |conn| {
                let tx = conn.transaction().await?;
                let moved = match id.split_once('|') {
                    Some((message_id, subscriber)) => {
                        let sql = format!("{SET}message_id = $2 AND subscriber = $3");
                        tx.execute(&sql, &[&now, &message_id, &subscriber]).await?
                    }
                    None => {
                        let sql =
                            format!("{SET}pandagate_delivery_id(message_id, subscriber) = $2");
                        tx.execute(&sql, &[&now, &id]).await?
                    }
                };
                if moved > 0 {
                    tx.batch_execute(&format!("NOTIFY {CHANNEL}")).await?;
                }
                tx.commit().await?;
                Ok(moved)
            })
            .await?;
        Ok(moved as usize)
    }

    /// Every dead letter that died before `now_ms` back to pending, in
    /// batches of [`REPLAY_BATCH`], oldest first, each its own transaction
    /// (so none nears the statement timeout, and other replicas start on a
    /// batch while the next is moved). Replayed deliveries get `now_ms` as
    /// their age, so one that dies again meanwhile is not taken twice; rows
    /// another transaction holds are left (the pass ends at the first short
    /// batch). Returns how many.
    async fn replay_all(&self, now_ms: u64) -> Result<usize, PgError> {
        let now = now_ms as i64;
        let mut total = 0;
        loop {
            let moved = self
                .with(async |conn| {
                    let tx = conn.transaction().await?;
                    let moved = tx
                        .execute(
                            "UPDATE pandagate_callback_deliveries d SET dead = false, \
                               first_at_ms = $1, next_at_ms = $1, locked_until_ms = 0, claim = NULL \
                             FROM (SELECT message_id, subscriber FROM pandagate_callback_deliveries \
                               WHERE dead AND first_at_ms < $1 ORDER BY first_at_ms LIMIT $2 \
                               FOR UPDATE SKIP LOCKED) b \
                             WHERE d.message_id = b.message_id AND d.subscriber = b.subscriber",
                            &[&now, &REPLAY_BATCH],
                        )
                        .await?;
                    if moved > 0 {
                        tx.batch_execute(&format!("NOTIFY {CHANNEL}")).await?;
                    }
                    tx.commit().await?;
                    Ok(moved)
                })
                .await?;
            total += moved as usize;
            if (moved as i64) < REPLAY_BATCH {
                return Ok(total);
            }
        }
    }

    /// Removes up to `limit` messages received before `before_ms` whose
    /// deliveries are all done (none pending, none dead). `resume` is set
    /// when more may be left.
    pub async fn prune(&self, before_ms: u64, limit: usize) -> Result<Pruned, PgError> {
        let (before, limit_i) = (before_ms as i64, limit as i64);
        let removed = self
            .with(async |conn| {
                conn.execute(
                    "DELETE FROM pandagate_callback_messages WHERE id IN ( \
                       SELECT m.id FROM pandagate_callback_messages m \
                       WHERE m.received_at_ms < $1 AND NOT EXISTS ( \
                         SELECT 1 FROM pandagate_callback_deliveries d WHERE d.message_id = m.id) \
                       ORDER BY m.received_at_ms LIMIT $2)",
                    &[&before, &limit_i],
                )
                .await
            })
            .await? as usize;
        Ok(Pruned {
            removed,
            resume: (removed == limit).then(|| (before_ms, String::new())),
        })
    }

    /// The schema version the database has (0: none yet).
    pub async fn schema_version(&self) -> Result<i32, PgError> {
        schema_version_of(&self.pool).await
    }
}

async fn schema_version_of(pool: &Pool) -> Result<i32, PgError> {
    let conn = pool.get().await.map_err(|e| PgError::Db(causes(&e)))?;
    let exists = conn
        .query_one(
            "SELECT to_regclass('pandagate_callback_schema') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| PgError::Db(causes(&e)))?;
    if !exists.get::<_, bool>(0) {
        return Ok(0);
    }
    let row = conn
        .query_opt("SELECT version FROM pandagate_callback_schema", &[])
        .await
        .map_err(|e| PgError::Db(causes(&e)))?;
    Ok(row.map_or(0, |r| r.get(0)))
}

/// Connects once, without migrating, and reads the schema version: for
/// `pandagate check`. Errors never show the URL's password.
pub async fn probe(config: &CallbacksConfig, url: &WithTrust<PostgresUrl>) -> Result<i32, PgError> {
    let (client, connection) = pg_config(url, config.postgres_statement_timeout_ms)
        .connect(connector(url))
        .await
        .map_err(|e| PgError::Db(describe(&e, url)))?;
    let driver = tokio::spawn(connection);
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('pandagate_callback_schema') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| PgError::Db(causes(&e)))?
        .get(0);
    let version = if exists {
        client
            .query_opt("SELECT version FROM pandagate_callback_schema", &[])
            .await
            .map_err(|e| PgError::Db(causes(&e)))?
            .map_or(0, |r| r.get(0))
    } else {
        0
    };
    drop(client);
    driver.abort();
    Ok(version)
}

fn delivery(r: &tokio_postgres::Row) -> Delivery {
    Delivery {
        message_id: r.get(0),
        subscriber: r.get(1),
        attempts: r.get::<_, i32>(2).max(0) as u32,
        first_at_ms: r.get::<_, i64>(3).max(0) as u64,
        next_at_ms: r.get::<_, i64>(4).max(0) as u64,
        last_error: r.get(5),
    }
}

/// Wakes `changed` on every `NOTIFY`, forever; a lost connection is made
/// again after a second (the delivery loop also looks every few seconds,
/// so nothing waits on a lost notification for long).
async fn listen(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    changed: Arc<Notify>,
    url: PostgresUrl,
) {
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                // The LISTEN goes out while the connection is read below.
                let subscriber = tokio::spawn(async move {
                    if client
                        .batch_execute(&format!("LISTEN {CHANNEL}"))
                        .await
                        .is_ok()
                    {
                        std::future::pending::<()>().await;
                    }
                });
                // Work stored while no one listened is looked for now.
                changed.notify_one();
                loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(_))) => changed.notify_one(),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(error = %describe(&e, &url), "callback store: LISTEN connection lost");
                            break;
                        }
                        None => break,
                    }
                }
                subscriber.abort();
            }
            Err(e) => {
                tracing::debug!(error = %describe(&e, &url), "callback store: LISTEN connection failed");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
