//! The durable message store (redb, one file, fsync on every commit).
//!
//! * `messages`: message id (SHA-256 of the raw push body) → the message;
//! * `pending`: delivery key (`message id|subscriber url`) → delivery state;
//! * `dead`: delivery key → the state it died in;
//! * `due`: (`next_at_ms`, delivery key) → (), one row per pending delivery,
//!   so the deliveries due next are read without reading all of `pending`;
//! * `received`: (`received_at_ms`, message id) → (), one row per message,
//!   so the oldest messages are found without reading all of `messages`.
//!
//! A push is acknowledged only after the transaction that stores it and its
//! deliveries has committed; a delivery leaves `pending` only when its
//! subscriber acknowledged it (or it died of old age). Every write keeps the
//! two index tables in step with their base tables in the same transaction.

use std::collections::HashSet;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

const MESSAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("messages");
const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending");
const DEAD: TableDefinition<&str, &[u8]> = TableDefinition::new("dead");
const DUE: TableDefinition<(u64, &str), ()> = TableDefinition::new("due");
const RECEIVED: TableDefinition<(u64, &str), ()> = TableDefinition::new("received");

/// A verified push, as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub received_at_ms: u64,
    #[serde(rename = "messageType")]
    pub message_type: String,
    /// The provider's `messageBody`: a JSON-encoded string.
    #[serde(rename = "messageBody")]
    pub message_body: String,
    #[serde(rename = "messagePlatform")]
    pub message_platform: serde_json::Value,
    pub timestamp: serde_json::Value,
}

/// Where one delivery stands.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Delivery {
    pub message_id: String,
    pub subscriber: String,
    pub attempts: u32,
    pub first_at_ms: u64,
    pub next_at_ms: u64,
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Delivery {
    pub fn key(&self) -> String {
        key(&self.message_id, &self.subscriber)
    }

    /// Its `x-pandagate-delivery-id`: stable per (message, subscriber),
    /// receivers deduplicate on it.
    pub fn id(&self) -> String {
        delivery_id(&self.key())
    }
}

pub fn key(message_id: &str, subscriber: &str) -> String {
    format!("{message_id}|{subscriber}")
}

/// The delivery id of the delivery with `key`: the first 16 bytes of its
/// SHA-256, hex. The shared store computes the same in SQL
/// (`pandagate_delivery_id`) to index it.
pub fn delivery_id(key: &str) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..16])
}

/// Where a listing goes on from: the last delivery of a page, in listing
/// order (oldest `first_at_ms` first, then delivery id). That order does not
/// change while a delivery stays pending (or dead): a retry moves
/// `next_at_ms`, never `first_at_ms`; only a replay does, and it moves the
/// delivery from the dead to the pending list. So paging through a list that
/// changes meanwhile shows every delivery that stays in it exactly once.
///
/// Written as `FIRST_AT_MS-DELIVERY_ID`; callers treat it as opaque.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub first_at_ms: u64,
    pub delivery_id: String,
}

impl Cursor {
    pub fn of(d: &Delivery) -> Cursor {
        Cursor {
            first_at_ms: d.first_at_ms,
            delivery_id: d.id(),
        }
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first_at_ms, self.delivery_id)
    }
}

/// A string that is not a cursor a listing gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a cursor from a listing's \"next\"")]
pub struct NotACursor;

impl std::str::FromStr for Cursor {
    type Err = NotACursor;

    fn from_str(s: &str) -> Result<Cursor, NotACursor> {
        let (at, id) = s.split_once('-').ok_or(NotACursor)?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        let hex =
            |t: &str| t.len() == 32 && t.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !digits(at) || !hex(id) {
            return Err(NotACursor);
        }
        Ok(Cursor {
            first_at_ms: at.parse().map_err(|_| NotACursor)?,
            delivery_id: id.to_owned(),
        })
    }
}

/// One page of a listing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Page {
    pub deliveries: Vec<Delivery>,
    /// Where the next page starts; `None`: this is the last.
    pub next: Option<Cursor>,
}

impl Page {
    /// The page of `limit` from `rows`, the first `limit + 1` deliveries
    /// after the cursor in listing order, each with its place in that
    /// order: one more than shown says whether another page follows.
    pub fn cut(mut rows: Vec<(Cursor, Delivery)>, limit: usize) -> Page {
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next = if more {
            rows.last().map(|(c, _)| c.clone())
        } else {
            None
        };
        Page {
            deliveries: rows.into_iter().map(|(_, d)| d).collect(),
            next,
        }
    }
}

/// What one delivery attempt decided, for the store to record.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The subscriber answered 2xx: the delivery is done.
    Delivered(Delivery),
    /// The attempt failed; the delivery is due again at its `next_at_ms`.
    Rescheduled(Delivery),
    /// The attempt failed and the delivery is too old to try again: a dead
    /// letter.
    Buried(Delivery),
}

impl Outcome {
    pub fn delivery(&self) -> &Delivery {
        match self {
            Outcome::Delivered(d) | Outcome::Rescheduled(d) | Outcome::Buried(d) => d,
        }
    }
}

/// What [`Store::due`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Due {
    /// Deliveries due now, earliest first.
    pub deliveries: Vec<Delivery>,
    /// When the first pending delivery not returned (and not skipped) falls
    /// due, in Unix milliseconds; at or before `now_ms` when more were due
    /// than the limit. `None`: nothing else is pending.
    pub next_at_ms: Option<u64>,
}

/// What one [`Store::prune`] call did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pruned {
    /// Messages removed.
    pub removed: usize,
    /// Where the next call should go on from, when this one stopped at its
    /// limit with older messages left to look at.
    pub resume: Option<(u64, String)>,
}

#[derive(Debug)]
pub struct Store {
    db: Database,
    /// Reads of the pending deliveries (`due` queries and full listings).
    scans: AtomicU64,
    /// Signalled when new work is written: a message stored, dead letters
    /// replayed. One waiter: the delivery loop.
    changed: Notify,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's folder could not be created.
    #[error("cannot create the store's folder: {0}")]
    CreateDir(#[source] std::io::Error),
    /// The database failed: opening, a transaction, a table, a commit.
    #[error("store database: {0}")]
    Db(#[from] redb::Error),
    /// A row is in the database but does not read back as what its table
    /// holds. The key's subscriber URL is shown redacted.
    #[error(
        "the store's {table} row {} cannot be read: {source}",
        shown_key(.key)
    )]
    Corrupt {
        table: String,
        key: String,
        source: serde_json::Error,
    },
}

/// redb's errors come in one type per operation; each is a [`redb::Error`].
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A row key as shown in errors: a message id, or a delivery key
/// (`message id|subscriber url`) with the URL's credentials redacted.
fn shown_key(key: &str) -> String {
    match key.split_once('|') {
        Some((id, url)) => format!("{:?}", format!("{id}|{}", crate::base::redact::url(url))),
        None => format!("{key:?}"),
    }
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data serialises")
}

/// Reads the row `key` of `table`.
fn from_json<T: for<'de> Deserialize<'de>>(
    table: &impl TableHandle,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        table: table.name().to_owned(),
        key: key.to_owned(),
        source,
    })
}

/// Whether `table` (`pending` or `dead`) holds a delivery of message `id`:
/// its keys are `id|subscriber`, and `}` sorts right after `|`.
fn has_deliveries(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<bool, StoreError> {
    let (from, to) = (format!("{id}|"), format!("{id}}}"));
    Ok(table.range(from.as_str()..to.as_str())?.next().is_some())
}

impl Store {
    /// Opens (or creates) `dir/callbacks.redb`. An index whose length differs
    /// from its base table's (a store written before the index existed) is
    /// rebuilt from the base table.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(StoreError::CreateDir)?;
        let db = Database::create(dir.join("callbacks.redb"))?;
        let txn = db.begin_write()?;
        {
            let messages = txn.open_table(MESSAGES)?;
            let pending = txn.open_table(PENDING)?;
            txn.open_table(DEAD)?;
            let mut due = txn.open_table(DUE)?;
            let mut received = txn.open_table(RECEIVED)?;
            if due.len()? != pending.len()? {
                due.retain(|_, _| false)?;
                for item in pending.iter()? {
                    let (k, v) = item?;
                    let d: Delivery = from_json(&PENDING, k.value(), v.value())?;
                    due.insert((d.next_at_ms, k.value()), ())?;
                }
                tracing::info!(deliveries = due.len()?, "callback store: due index rebuilt");
            }
            if received.len()? != messages.len()? {
                received.retain(|_, _| false)?;
                for item in messages.iter()? {
                    let (k, v) = item?;
                    let m: Message = from_json(&MESSAGES, k.value(), v.value())?;
                    received.insert((m.received_at_ms, k.value()), ())?;
                }
                tracing::info!(
                    messages = received.len()?,
                    "callback store: received index rebuilt"
                );
            }
        }
        txn.commit()?;
        Ok(Store {
            db,
            scans: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    /// How many times the pending deliveries were read: [`Store::due`]
    /// queries and [`Store::pending`] listings.
    pub fn scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }

    /// Completes when new work was written since the last completion (or
    /// since opening).
    pub fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }

    /// Stores a message and its deliveries, durably. `false`: this message
    /// is already stored (the provider pushed it again within the retention
    /// window; a pruned message is stored afresh); nothing changes.
    pub fn insert(
        &self,
        id: &str,
        message: &Message,
        deliveries: &[Delivery],
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut messages = txn.open_table(MESSAGES)?;
            if messages.get(id)?.is_some() {
                return Ok(false);
            }
            messages.insert(id, to_json(message).as_slice())?;
            txn.open_table(RECEIVED)?
                .insert((message.received_at_ms, id), ())?;
            let mut pending = txn.open_table(PENDING)?;
            let mut due = txn.open_table(DUE)?;
            for d in deliveries {
                let key = d.key();
                // The same subscriber listed twice: one delivery, one index row.
                if let Some(old) = pending.insert(key.as_str(), to_json(d).as_slice())? {
                    let old: Delivery = from_json(&PENDING, &key, old.value())?;
                    due.remove((old.next_at_ms, key.as_str()))?;
                }
                due.insert((d.next_at_ms, key.as_str()), ())?;
            }
        }
        txn.commit()?;
        self.changed.notify_one();
        Ok(true)
    }

    pub fn message(&self, id: &str) -> Result<Option<Message>, StoreError> {
        let txn = self.db.begin_read()?;
        let messages = txn.open_table(MESSAGES)?;
        messages
            .get(id)?
            .map(|v| from_json(&MESSAGES, id, v.value()))
            .transpose()
    }

    fn list(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<Delivery>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            out.push(from_json(&table, k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Every pending delivery (for operators; the delivery loop uses `due`).
    pub fn pending(&self) -> Result<Vec<Delivery>, StoreError> {
        self.scans.fetch_add(1, Ordering::Relaxed);
        self.list(PENDING)
    }

    pub fn dead(&self) -> Result<Vec<Delivery>, StoreError> {
        self.list(DEAD)
    }

    /// A page of the pending (or, with `dead`, dead) deliveries in listing
    /// order (see [`Cursor`]), after `after`. redb keeps no index in that
    /// order, so each page reads, decodes and hashes the whole list and
    /// picks the first `limit + 1` after the cursor: linear in the list's
    /// length per page (for the one receiving replica's backlog; the shared
    /// store answers from an index).
    pub fn page(
        &self,
        dead: bool,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let rows = if dead { self.dead()? } else { self.pending()? };
        let mut rows: Vec<(Cursor, Delivery)> = rows
            .into_iter()
            .map(|d| (Cursor::of(&d), d))
            .filter(|(c, _)| after.is_none_or(|a| c > a))
            .collect();
        if rows.len() > limit + 1 {
            rows.select_nth_unstable_by(limit, |a, b| a.0.cmp(&b.0));
            rows.truncate(limit + 1);
        }
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(Page::cut(rows, limit))
    }

    /// Up to `limit` pending deliveries due at `now_ms`, earliest first,
    /// leaving out the keys in `skip` (deliveries in flight), and when the
    /// next one falls due. Reads only the front of the `due` index.
    pub fn due(
        &self,
        now_ms: u64,
        limit: usize,
        skip: &HashSet<String>,
    ) -> Result<Due, StoreError> {
        self.scans.fetch_add(1, Ordering::Relaxed);
        let txn = self.db.begin_read()?;
        let index = txn.open_table(DUE)?;
        let pending = txn.open_table(PENDING)?;
        let mut found = Due::default();
        for item in index.iter()? {
            let (k, _) = item?;
            let (at, key) = k.value();
            if skip.contains(key) {
                continue;
            }
            // The index row must match the delivery; one that does not is
            // passed over rather than handed out again and again.
            let Some(row) = pending.get(key)? else {
                continue;
            };
            let d: Delivery = from_json(&PENDING, key, row.value())?;
            if d.next_at_ms != at {
                continue;
            }
            if at > now_ms || found.deliveries.len() == limit {
                found.next_at_ms = Some(at);
                break;
            }
            found.deliveries.push(d);
        }
        Ok(found)
    }

    /// The subscriber acknowledged: the delivery is done.
    pub fn delivered(&self, d: &Delivery) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let key = d.key();
            let mut pending = txn.open_table(PENDING)?;
            if let Some(old) = pending.remove(key.as_str())? {
                let old: Delivery = from_json(&PENDING, &key, old.value())?;
                txn.open_table(DUE)?
                    .remove((old.next_at_ms, key.as_str()))?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The delivery with `key` as it stands now, if it is still pending.
    pub fn pending_one(&self, key: &str) -> Result<Option<Delivery>, StoreError> {
        let txn = self.db.begin_read()?;
        let pending = txn.open_table(PENDING)?;
        pending
            .get(key)?
            .map(|v| from_json(&PENDING, key, v.value()))
            .transpose()
    }

    /// Another attempt failed: keep it pending with its new state. A delivery
    /// no longer pending (acknowledged meanwhile) is left alone, never revived.
    pub fn reschedule(&self, d: &Delivery) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut pending = txn.open_table(PENDING)?;
            let key = d.key();
            let Some(old) = pending.insert(key.as_str(), to_json(d).as_slice())? else {
                // Dropping the transaction undoes the insert.
                return Ok(());
            };
            let old: Delivery = from_json(&PENDING, &key, old.value())?;
            let mut due = txn.open_table(DUE)?;
            due.remove((old.next_at_ms, key.as_str()))?;
            due.insert((d.next_at_ms, key.as_str()), ())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Too old to keep trying: move it to the dead letters. A delivery no
    /// longer pending is left alone.
    pub fn bury(&self, d: &Delivery) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let key = d.key();
            let mut pending = txn.open_table(PENDING)?;
            let Some(old) = pending.remove(key.as_str())? else {
                return Ok(());
            };
            let old: Delivery = from_json(&PENDING, &key, old.value())?;
            txn.open_table(DUE)?
                .remove((old.next_at_ms, key.as_str()))?;
            txn.open_table(DEAD)?
                .insert(key.as_str(), to_json(d).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Moves dead deliveries (all, or the one with `key`) back to pending,
    /// due now, with a fresh age. Returns how many.
    pub fn replay(&self, key: Option<&str>, now_ms: u64) -> Result<usize, StoreError> {
        let keys: Vec<String> = match key {
            Some(k) => vec![k.to_owned()],
            None => {
                let txn = self.db.begin_read()?;
                let dead = txn.open_table(DEAD)?;
                dead.iter()?
                    .map(|item| item.map(|(k, _)| k.value().to_owned()))
                    .collect::<Result<_, _>>()?
            }
        };
        self.replay_keys(&keys, now_ms)
    }

    /// Moves the dead letters with `keys` (those still dead) back to
    /// pending, due at `now_ms`, in one transaction.
    fn replay_keys(&self, keys: &[String], now_ms: u64) -> Result<usize, StoreError> {
        let txn = self.db.begin_write()?;
        let mut moved = 0;
        {
            let mut dead = txn.open_table(DEAD)?;
            let mut pending = txn.open_table(PENDING)?;
            let mut due = txn.open_table(DUE)?;
            for k in keys {
                let Some(v) = dead.remove(k.as_str())? else {
                    continue;
                };
                let mut d: Delivery = from_json(&DEAD, k, v.value())?;
                drop(v);
                d.first_at_ms = now_ms;
                d.next_at_ms = now_ms;
                pending.insert(k.as_str(), to_json(&d).as_slice())?;
                due.insert((now_ms, k.as_str()), ())?;
                moved += 1;
            }
        }
        txn.commit()?;
        if moved > 0 {
            self.changed.notify_one();
        }
        Ok(moved)
    }

    /// Puts the dead letter whose key or delivery id is `id` back in line
    /// (see [`Store::replay`]). A delivery id is found by hashing the dead
    /// letters' keys until one matches: linear in their number, without
    /// reading their rows.
    pub fn replay_one(&self, id: &str, now_ms: u64) -> Result<usize, StoreError> {
        if id.contains('|') {
            return self.replay(Some(id), now_ms);
        }
        let key = {
            let txn = self.db.begin_read()?;
            let dead = txn.open_table(DEAD)?;
            let mut found = None;
            for item in dead.iter()? {
                let (k, _) = item?;
                if delivery_id(k.value()) == id {
                    found = Some(k.value().to_owned());
                    break;
                }
            }
            found
        };
        match key {
            Some(key) => self.replay(Some(&key), now_ms),
            None => Ok(0),
        }
    }

    /// Puts up to `limit` dead letters back in line, in one transaction, in
    /// key order after `from` (the last key of the previous batch). Returns
    /// how many moved and the key to go on from (`None`: the end was
    /// reached). Dead letters that died after `before_ms` (a delivery
    /// replayed by this pass and dead again) are left for the next replay.
    pub fn replay_batch(
        &self,
        from: Option<&str>,
        before_ms: u64,
        limit: usize,
        now_ms: u64,
    ) -> Result<(usize, Option<String>), StoreError> {
        let (picked, last, looked) = {
            let txn = self.db.begin_read()?;
            let dead = txn.open_table(DEAD)?;
            let rows = match from {
                Some(k) => dead.range::<&str>((Bound::Excluded(k), Bound::Unbounded))?,
                None => dead.iter()?,
            };
            let (mut picked, mut last, mut looked) = (Vec::new(), None, 0);
            for item in rows.take(limit) {
                let (k, v) = item?;
                let d: Delivery = from_json(&DEAD, k.value(), v.value())?;
                if d.first_at_ms < before_ms {
                    picked.push(k.value().to_owned());
                }
                last = Some(k.value().to_owned());
                looked += 1;
            }
            (picked, last, looked)
        };
        let moved = self.replay_keys(&picked, now_ms)?;
        Ok((moved, if looked == limit { last } else { None }))
    }

    /// Removes messages received before `before_ms` whose deliveries are all
    /// done (none pending, none dead: dead letters can still be replayed),
    /// with their index rows. Looks at no more than `limit` messages, oldest
    /// first, starting after `resume` (from the previous call) if given.
    pub fn prune(
        &self,
        before_ms: u64,
        resume: Option<&(u64, String)>,
        limit: usize,
    ) -> Result<Pruned, StoreError> {
        let txn = self.db.begin_write()?;
        let mut pruned = Pruned::default();
        {
            let mut received = txn.open_table(RECEIVED)?;
            let mut messages = txn.open_table(MESSAGES)?;
            let pending = txn.open_table(PENDING)?;
            let dead = txn.open_table(DEAD)?;
            let mut done = Vec::new();
            let mut last: Option<(u64, String)> = None;
            let rows = match resume {
                Some((at, id)) => {
                    received.range((Bound::Excluded((*at, id.as_str())), Bound::Unbounded))?
                }
                None => received.iter()?,
            };
            for (looked, item) in rows.enumerate() {
                let (k, _) = item?;
                let (at, id) = k.value();
                if at >= before_ms {
                    break;
                }
                if looked == limit {
                    pruned.resume = last;
                    break;
                }
                last = Some((at, id.to_owned()));
                if !has_deliveries(&pending, id)? && !has_deliveries(&dead, id)? {
                    done.push((at, id.to_owned()));
                }
            }
            for (at, id) in &done {
                received.remove((*at, id.as_str()))?;
                messages.remove(id.as_str())?;
            }
            pruned.removed = done.len();
        }
        if pruned.removed > 0 {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Message {
        Message {
            received_at_ms: 1,
            message_type: "ORDER_PAY_SUCCESS".into(),
            message_body: r#"{"orderId":"1"}"#.into(),
            message_platform: 1.into(),
            timestamp: "1715669977082".into(),
        }
    }

    fn delivery(sub: &str) -> Delivery {
        Delivery {
            message_id: "m1".into(),
            subscriber: sub.into(),
            attempts: 0,
            first_at_ms: 1,
            next_at_ms: 1,
            last_error: None,
        }
    }

    fn message_at(received_at_ms: u64) -> Message {
        Message {
            received_at_ms,
            ..message()
        }
    }

    fn delivery_of(id: &str, sub: &str, next_at_ms: u64) -> Delivery {
        Delivery {
            message_id: id.into(),
            subscriber: sub.into(),
            next_at_ms,
            ..delivery(sub)
        }
    }

    fn none() -> HashSet<String> {
        HashSet::new()
    }

    impl Store {
        fn index(&self, table: TableDefinition<(u64, &str), ()>) -> Vec<(u64, String)> {
            let txn = self.db.begin_read().unwrap();
            let t = txn.open_table(table).unwrap();
            t.iter()
                .unwrap()
                .map(|item| {
                    let (k, _) = item.unwrap();
                    let (at, key) = k.value();
                    (at, key.to_owned())
                })
                .collect()
        }
    }

    /// One `due` row per pending delivery, at its `next_at_ms`, and no other.
    fn assert_due_index_matches_pending(store: &Store) {
        let mut want: Vec<_> = store
            .pending()
            .unwrap()
            .iter()
            .map(|d| (d.next_at_ms, d.key()))
            .collect();
        want.sort();
        assert_eq!(store.index(DUE), want);
    }

    fn keys(due: &Due) -> Vec<String> {
        due.deliveries.iter().map(Delivery::key).collect()
    }

    #[test]
    fn the_due_index_follows_every_change_to_pending() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let [a, b, c] = [("a", 10), ("b", 20), ("c", 30)].map(|(s, at)| delivery_of("m1", s, at));
        store
            .insert("m1", &message(), &[a.clone(), b.clone(), c.clone()])
            .unwrap();
        assert_due_index_matches_pending(&store);
        assert!(
            !store
                .insert("m1", &message(), std::slice::from_ref(&a))
                .unwrap()
        );
        assert_due_index_matches_pending(&store);
        let due = store.due(15, 256, &none()).unwrap();
        assert_eq!((keys(&due), due.next_at_ms), (vec![a.key()], Some(20)));

        let mut later = a.clone();
        later.attempts = 1;
        later.next_at_ms = 40;
        store.reschedule(&later).unwrap();
        assert_due_index_matches_pending(&store);
        let due = store.due(15, 256, &none()).unwrap();
        assert_eq!((keys(&due), due.next_at_ms), (vec![], Some(20)));

        store.delivered(&b).unwrap();
        assert_due_index_matches_pending(&store);
        store.bury(&c).unwrap();
        assert_due_index_matches_pending(&store);
        assert_eq!(store.dead().unwrap(), vec![c.clone()]);

        // Late updates to a delivery no longer pending change nothing.
        store.reschedule(&b).unwrap();
        store.bury(&b).unwrap();
        store.delivered(&c).unwrap();
        assert_due_index_matches_pending(&store);
        assert_eq!(store.pending_one(&b.key()).unwrap(), None);
        assert_eq!(store.dead().unwrap(), vec![c.clone()]);

        assert_eq!(store.replay(Some(&b.key()), 50).unwrap(), 0);
        assert_eq!(store.replay(Some(&c.key()), 50).unwrap(), 1);
        assert_due_index_matches_pending(&store);
        let due = store.due(45, 256, &none()).unwrap();
        assert_eq!((keys(&due), due.next_at_ms), (vec![later.key()], Some(50)));
        store.delivered(&later).unwrap();
        store.delivered(&c).unwrap();
        assert_due_index_matches_pending(&store);
        assert!(store.index(DUE).is_empty());
        assert_eq!(store.due(u64::MAX, 256, &none()).unwrap(), Due::default());
    }

    #[test]
    fn due_leaves_out_deliveries_in_flight_and_stops_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ds =
            [("a", 10), ("b", 10), ("c", 20), ("d", 100)].map(|(s, at)| delivery_of("m1", s, at));
        store.insert("m1", &message(), &ds).unwrap();
        let [a, b, c, d] = ds.map(|d| d.key());

        let due = store.due(50, 256, &none()).unwrap();
        assert_eq!(
            (keys(&due), due.next_at_ms),
            (vec![a.clone(), b.clone(), c.clone()], Some(100))
        );
        let due = store.due(50, 2, &none()).unwrap();
        assert_eq!(
            (keys(&due), due.next_at_ms),
            (vec![a.clone(), b.clone()], Some(20)),
            "more due than the limit"
        );
        let skip = HashSet::from([a.clone()]);
        let due = store.due(50, 256, &skip).unwrap();
        assert_eq!(
            (keys(&due), due.next_at_ms),
            (vec![b.clone(), c.clone()], Some(100))
        );
        let skip = HashSet::from([d]);
        let due = store.due(150, 256, &skip).unwrap();
        assert_eq!(
            (keys(&due), due.next_at_ms),
            (vec![a, b, c], None),
            "nothing else pending"
        );
        let due = store.due(5, 256, &none()).unwrap();
        assert_eq!((keys(&due), due.next_at_ms), (vec![], Some(10)));
    }

    #[test]
    fn pruning_removes_only_old_messages_whose_deliveries_are_all_done() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = message_at(100);
        // m1: delivered; m2: pending; m3: dead; m4: no subscriber; m5: recent.
        for id in ["m1", "m2", "m3"] {
            store.insert(id, &old, &[delivery_of(id, "a", 1)]).unwrap();
        }
        store.insert("m4", &old, &[]).unwrap();
        store
            .insert("m5", &message_at(1_000), &[delivery_of("m5", "a", 1)])
            .unwrap();
        store.delivered(&delivery_of("m1", "a", 1)).unwrap();
        store.bury(&delivery_of("m3", "a", 1)).unwrap();
        store.delivered(&delivery_of("m5", "a", 1)).unwrap();
        // An id that has the others as a prefix must not shield them.
        store
            .insert("m10", &message_at(1_000), &[delivery_of("m10", "a", 1)])
            .unwrap();

        let pruned = store.prune(500, None, 1000).unwrap();
        assert_eq!(
            pruned,
            Pruned {
                removed: 2,
                resume: None
            }
        );
        for (id, kept) in [
            ("m1", false),
            ("m2", true),
            ("m3", true),
            ("m4", false),
            ("m5", true),
        ] {
            assert_eq!(store.message(id).unwrap().is_some(), kept, "{id}");
        }
        let ids = |v: Vec<(u64, String)>| v.into_iter().map(|(_, id)| id).collect::<Vec<_>>();
        assert_eq!(ids(store.index(RECEIVED)), ["m2", "m3", "m10", "m5"]);
        assert_eq!(store.pending().unwrap().len(), 2, "m2's and m10's");
        assert_eq!(store.dead().unwrap().len(), 1, "m3's");

        // Pruned, the same message is a new one again.
        assert!(store.insert("m1", &message_at(900), &[]).unwrap());

        // A replayed dead letter, once delivered, lets its message go.
        store.replay(None, 200).unwrap();
        store.delivered(&delivery_of("m3", "a", 200)).unwrap();
        assert_eq!(store.prune(500, None, 1000).unwrap().removed, 1);
        assert_eq!(store.message("m3").unwrap(), None);
        assert_eq!(ids(store.index(RECEIVED)), ["m2", "m1", "m10", "m5"]);
    }

    #[test]
    fn pruning_looks_at_no_more_than_limit_messages_per_call() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .insert("kept", &message_at(0), &[delivery_of("kept", "a", 1)])
            .unwrap();
        for at in 1..=5 {
            store
                .insert(&format!("m{at}"), &message_at(at), &[])
                .unwrap();
        }
        let first = store.prune(100, None, 2).unwrap();
        assert_eq!(
            first,
            Pruned {
                removed: 1,
                resume: Some((1, "m1".into()))
            }
        );
        let second = store.prune(100, first.resume.as_ref(), 2).unwrap();
        assert_eq!(
            second,
            Pruned {
                removed: 2,
                resume: Some((3, "m3".into()))
            }
        );
        let third = store.prune(100, second.resume.as_ref(), 2).unwrap();
        assert_eq!(
            third,
            Pruned {
                removed: 2,
                resume: None
            }
        );
        assert_eq!(store.prune(100, None, 2).unwrap(), Pruned::default());
        assert_eq!(store.index(RECEIVED), [(0, "kept".to_owned())]);
    }

    #[test]
    fn a_store_written_without_the_indexes_gets_them_on_opening() {
        let dir = tempfile::tempdir().unwrap();
        {
            // The layout before `due` and `received` existed.
            let db = Database::create(dir.path().join("callbacks.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut messages = txn.open_table(MESSAGES).unwrap();
                let mut pending = txn.open_table(PENDING).unwrap();
                let mut dead = txn.open_table(DEAD).unwrap();
                for id in ["m1", "m2", "m3"] {
                    messages
                        .insert(id, to_json(&message_at(100)).as_slice())
                        .unwrap();
                }
                let d = delivery_of("m1", "a", 10);
                pending
                    .insert(d.key().as_str(), to_json(&d).as_slice())
                    .unwrap();
                let d = delivery_of("m2", "a", 10);
                dead.insert(d.key().as_str(), to_json(&d).as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_due_index_matches_pending(&store);
        assert_eq!(store.index(RECEIVED).len(), 3);
        let due = store.due(50, 256, &none()).unwrap();
        assert_eq!(keys(&due), [key("m1", "a")]);
        assert_eq!(store.prune(500, None, 1000).unwrap().removed, 1, "m3");
        store.delivered(&delivery_of("m1", "a", 10)).unwrap();
        assert_eq!(store.prune(500, None, 1000).unwrap().removed, 1, "m1");
        assert_eq!(
            store.message("m2").unwrap().map(|m| m.received_at_ms),
            Some(100)
        );
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_due_index_matches_pending(&store);
        assert_eq!(store.index(RECEIVED), [(100, "m2".to_owned())]);
    }

    #[test]
    fn stores_once_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert!(
                store
                    .insert("m1", &message(), &[delivery("a"), delivery("b")])
                    .unwrap()
            );
            assert!(
                !store.insert("m1", &message(), &[delivery("a")]).unwrap(),
                "duplicate"
            );
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.message("m1").unwrap(), Some(message()));
        assert_eq!(store.pending().unwrap().len(), 2);
        store.delivered(&delivery("a")).unwrap();
        store.bury(&delivery("b")).unwrap();
        assert!(store.pending().unwrap().is_empty());
        assert_eq!(store.dead().unwrap().len(), 1);
        assert_eq!(store.replay(None, 99).unwrap(), 1);
        let back = store.pending().unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].next_at_ms, 99);
        assert!(store.dead().unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_row_is_reported_with_its_table_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = delivery_of("m1", "http://hook:pw@orders.internal/events", 10);
        store
            .insert("m1", &message(), std::slice::from_ref(&d))
            .unwrap();
        {
            let txn = store.db.begin_write().unwrap();
            txn.open_table(PENDING)
                .unwrap()
                .insert(d.key().as_str(), b"{not json".as_slice())
                .unwrap();
            txn.open_table(MESSAGES)
                .unwrap()
                .insert("m1", b"[]".as_slice())
                .unwrap();
            txn.commit().unwrap();
        }

        let e = store.pending().unwrap_err();
        assert!(
            matches!(&e, StoreError::Corrupt { table, key, .. } if table == "pending" && *key == d.key()),
            "{e:?}"
        );
        let shown = e.to_string();
        assert!(
            shown.contains(r#"pending row "m1|http://hook:<redacted>@orders.internal/events""#),
            "{shown}"
        );
        assert!(!shown.contains("pw"), "{shown}");
        let e = store.pending_one(&d.key()).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
        let e = store.due(50, 256, &none()).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
        let e = store.message("m1").unwrap_err();
        assert!(
            matches!(&e, StoreError::Corrupt { table, key, .. } if table == "messages" && key == "m1"),
            "{e:?}"
        );
        assert!(e.to_string().contains(r#"messages row "m1""#), "{e}");
    }

    #[test]
    fn a_late_failure_never_revives_an_acknowledged_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.insert("m1", &message(), &[delivery("a")]).unwrap();
        let mut stale = delivery("a");
        store.delivered(&stale).unwrap();
        stale.attempts = 1;
        stale.next_at_ms = 5;
        store.reschedule(&stale).unwrap();
        assert_eq!(store.pending_one(&stale.key()).unwrap(), None);
        assert!(store.pending().unwrap().is_empty());
    }

    /// Pages of `limit` through the pending (or dead) list, checking each
    /// page's size; the keys in the order given.
    fn page_through(store: &Store, dead: bool, limit: usize) -> Vec<String> {
        let mut keys = Vec::new();
        let mut after = None;
        loop {
            let page = store.page(dead, after.as_ref(), limit).unwrap();
            assert!(page.deliveries.len() <= limit);
            keys.extend(page.deliveries.iter().map(Delivery::key));
            match page.next {
                Some(next) => {
                    assert_eq!(
                        page.deliveries.len(),
                        limit,
                        "a page before the last is full"
                    );
                    after = Some(next);
                }
                None => return keys,
            }
        }
    }

    #[test]
    fn pages_hold_every_delivery_once_oldest_first_then_by_delivery_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut all = Vec::new();
        for (m, at) in [("m1", 30), ("m2", 10), ("m3", 20)] {
            let ds: Vec<_> = ["a", "b", "c", "d"]
                .iter()
                .map(|s| Delivery {
                    first_at_ms: at,
                    ..delivery_of(m, s, at)
                })
                .collect();
            store.insert(m, &message_at(at), &ds).unwrap();
            all.extend(ds);
        }
        for d in all.iter().filter(|d| d.subscriber == "b") {
            store.bury(d).unwrap();
        }
        let order = |dead: bool| {
            let mut want: Vec<_> = all
                .iter()
                .filter(|d| (d.subscriber == "b") == dead)
                .map(|d| (Cursor::of(d), d.key()))
                .collect();
            want.sort();
            want.into_iter().map(|(_, k)| k).collect::<Vec<_>>()
        };
        for limit in [1, 4, 5, 9, 1000] {
            assert_eq!(page_through(&store, false, limit), order(false), "{limit}");
        }
        assert_eq!(page_through(&store, true, 2), order(true));
        // A retry moves next_at_ms, not the delivery's place in the list.
        let mut retried = all[0].clone();
        retried.attempts = 1;
        retried.next_at_ms = 99;
        store.reschedule(&retried).unwrap();
        assert_eq!(page_through(&store, false, 4), order(false));
        let last = store.page(false, None, 1000).unwrap().deliveries;
        let after_all = Cursor::of(last.last().unwrap());
        assert_eq!(
            store.page(false, Some(&after_all), 10).unwrap(),
            Page::default()
        );
    }

    #[test]
    fn a_dead_letter_is_replayed_by_key_or_delivery_id_and_all_of_them_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ds: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| delivery_of("m1", s, 1))
            .collect();
        store.insert("m1", &message(), &ds).unwrap();
        for d in &ds {
            store.bury(d).unwrap();
        }
        assert_eq!(store.replay_one(&ds[0].id(), 50).unwrap(), 1);
        assert_eq!(
            store.replay_one(&ds[0].id(), 50).unwrap(),
            0,
            "no longer dead"
        );
        assert_eq!(store.replay_one(&ds[1].key(), 50).unwrap(), 1);
        assert_eq!(store.replay_one(&delivery_id("m1|zz"), 50).unwrap(), 0);
        let (moved, from) = store.replay_batch(None, 60, 2, 60).unwrap();
        assert_eq!(moved, 2);
        let (moved, from) = store.replay_batch(from.as_deref(), 60, 2, 60).unwrap();
        assert_eq!((moved, from), (1, None));
        assert!(store.dead().unwrap().is_empty());
        assert_due_index_matches_pending(&store);
        // Those dead again after the pass began stay for the next one.
        let mut again = ds[2].clone();
        again.first_at_ms = 60;
        store.bury(&again).unwrap();
        assert_eq!(store.replay_batch(None, 60, 2, 70).unwrap(), (0, None));
        assert_eq!(store.replay_batch(None, 61, 2, 70).unwrap(), (1, None));
    }

    #[test]
    fn a_cursor_reads_back_as_written_and_nothing_else_reads_as_one() {
        let c = Cursor {
            first_at_ms: 1_700_000_000_123,
            delivery_id: delivery_id("m1|http://s/1"),
        };
        assert_eq!(c.to_string().parse::<Cursor>(), Ok(c.clone()));
        assert_eq!(
            format!("0-{}", c.delivery_id)
                .parse::<Cursor>()
                .unwrap()
                .first_at_ms,
            0
        );
        let upper = format!("1-{}", c.delivery_id.to_uppercase());
        let long = format!("1-{}0", c.delivery_id);
        let huge = format!("99999999999999999999-{}", c.delivery_id);
        let plus = format!("+1-{}", c.delivery_id);
        for bad in [
            "",
            "-",
            "1-",
            "x-y",
            &c.delivery_id,
            &upper,
            &long,
            &huge,
            &plus,
        ] {
            assert_eq!(bad.parse::<Cursor>(), Err(NotACursor), "{bad:?}");
        }
    }
}
