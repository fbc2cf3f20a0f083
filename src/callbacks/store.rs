//! The durable message store (redb, one file, fsync on every commit).
//!
//! * `messages`: message id (SHA-256 of the raw push body) → the message;
//! * `pending`: delivery key (`message id|subscriber url`) → delivery state;
//! * `dead`: delivery key → the state it died in.
//!
//! A push is acknowledged only after the transaction that stores it and its
//! deliveries has committed; a delivery leaves `pending` only when its
//! subscriber acknowledged it (or it died of old age).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const MESSAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("messages");
const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending");
const DEAD: TableDefinition<&str, &[u8]> = TableDefinition::new("dead");

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
}

pub fn key(message_id: &str, subscriber: &str) -> String {
    format!("{message_id}|{subscriber}")
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

pub type StoreError = redb::Error;

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data serialises")
}

fn from_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| redb::Error::Corrupted(e.to_string()))
}

impl Store {
    /// Opens (or creates) `dir/callbacks.redb`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(redb::Error::Io)?;
        let db = Database::create(dir.join("callbacks.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(MESSAGES)?;
        txn.open_table(PENDING)?;
        txn.open_table(DEAD)?;
        txn.commit()?;
        Ok(Store { db })
    }

    /// Stores a message and its deliveries, durably. `false`: this message
    /// was already stored (the provider pushed it again); nothing changes.
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
            let mut pending = txn.open_table(PENDING)?;
            for d in deliveries {
                pending.insert(d.key().as_str(), to_json(d).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(true)
    }

    pub fn message(&self, id: &str) -> Result<Option<Message>, StoreError> {
        let txn = self.db.begin_read()?;
        let messages = txn.open_table(MESSAGES)?;
        messages.get(id)?.map(|v| from_json(v.value())).transpose()
    }

    fn list(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<Delivery>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (_, v) = item?;
            out.push(from_json(v.value())?);
        }
        Ok(out)
    }

    pub fn pending(&self) -> Result<Vec<Delivery>, StoreError> {
        self.list(PENDING)
    }

    pub fn dead(&self) -> Result<Vec<Delivery>, StoreError> {
        self.list(DEAD)
    }

    /// The subscriber acknowledged: the delivery is done.
    pub fn delivered(&self, d: &Delivery) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(PENDING)?.remove(d.key().as_str())?;
        txn.commit()?;
        Ok(())
    }

    /// The delivery with `key` as it stands now, if it is still pending.
    pub fn pending_one(&self, key: &str) -> Result<Option<Delivery>, StoreError> {
        let txn = self.db.begin_read()?;
        let pending = txn.open_table(PENDING)?;
        pending.get(key)?.map(|v| from_json(v.value())).transpose()
    }

    /// Another attempt failed: keep it pending with its new state. A delivery
    /// no longer pending (acknowledged meanwhile) is left alone, never revived.
    pub fn reschedule(&self, d: &Delivery) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut pending = txn.open_table(PENDING)?;
            let key = d.key();
            if pending.get(key.as_str())?.is_none() {
                return Ok(());
            }
            pending.insert(key.as_str(), to_json(d).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Too old to keep trying: move it to the dead letters.
    pub fn bury(&self, d: &Delivery) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(PENDING)?.remove(d.key().as_str())?;
        txn.open_table(DEAD)?
            .insert(d.key().as_str(), to_json(d).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Moves dead deliveries (all, or the one with `key`) back to pending,
    /// due now, with a fresh age. Returns how many.
    pub fn replay(&self, key: Option<&str>, now_ms: u64) -> Result<usize, StoreError> {
        let dead = self.dead()?;
        let txn = self.db.begin_write()?;
        let mut moved = 0;
        {
            let mut dead_table = txn.open_table(DEAD)?;
            let mut pending = txn.open_table(PENDING)?;
            for mut d in dead
                .into_iter()
                .filter(|d| key.is_none_or(|k| d.key() == k))
            {
                dead_table.remove(d.key().as_str())?;
                d.first_at_ms = now_ms;
                d.next_at_ms = now_ms;
                pending.insert(d.key().as_str(), to_json(&d).as_slice())?;
                moved += 1;
            }
        }
        txn.commit()?;
        Ok(moved)
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
}
