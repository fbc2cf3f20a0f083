//! The local store: one redb file that this process holds, written durably
//! (each change is committed to disk before the call goes on), so a
//! reservation survives a crash and a restart. Expired entries read as
//! vacant and are removed by [`LocalStore::sweep`].

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};

use super::{StoreError, expiry};

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");

/// Most expired keys one read of the table collects before they are
/// removed (32 bytes each); a sweep reads again until none is left.
const MAX_PER_SCAN: usize = 100_000;

#[derive(Debug, Clone)]
pub struct LocalStore {
    db: Arc<Database>,
}

fn local(e: impl std::fmt::Display) -> StoreError {
    StoreError::Local(e.to_string())
}

impl LocalStore {
    /// Opens (or creates) `dir/idempotency.redb`.
    pub fn open(dir: &Path) -> Result<LocalStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(local)?;
        let db = Database::create(dir.join("idempotency.redb")).map_err(local)?;
        let txn = db.begin_write().map_err(local)?;
        txn.open_table(ENTRIES).map_err(local)?;
        txn.commit().map_err(local)?;
        Ok(LocalStore { db: Arc::new(db) })
    }

    /// Runs `f` on a blocking thread: a commit waits for the disk.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(local)?
    }

    pub(super) async fn insert_if_vacant(
        &self,
        key: &[u8; 32],
        value: &[u8],
        now_ms: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let (key, value) = (*key, value.to_vec());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(local)?;
            {
                let mut t = txn.open_table(ENTRIES).map_err(local)?;
                if let Some(found) = t.get(key.as_slice()).map_err(local)? {
                    let found = found.value().to_vec();
                    if expiry(&found) > now_ms {
                        return Ok(Some(found));
                    }
                }
                t.insert(key.as_slice(), value.as_slice()).map_err(local)?;
            }
            txn.commit().map_err(local)?;
            Ok(None)
        })
        .await
    }

    /// Sets the key to `new` (or removes it, for `None`) if it holds
    /// exactly `expected`.
    async fn swap(
        &self,
        key: &[u8; 32],
        expected: &[u8],
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let (key, expected, new) = (*key, expected.to_vec(), new.map(<[u8]>::to_vec));
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(local)?;
            {
                let mut t = txn.open_table(ENTRIES).map_err(local)?;
                let same = t
                    .get(key.as_slice())
                    .map_err(local)?
                    .is_some_and(|v| v.value() == expected.as_slice());
                if !same {
                    return Ok(false);
                }
                match &new {
                    Some(new) => t.insert(key.as_slice(), new.as_slice()).map_err(local)?,
                    None => t.remove(key.as_slice()).map_err(local)?,
                };
            }
            txn.commit().map_err(local)?;
            Ok(true)
        })
        .await
    }

    pub(super) async fn replace(
        &self,
        key: &[u8; 32],
        expected: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        self.swap(key, expected, Some(new)).await
    }

    pub(super) async fn remove(&self, key: &[u8; 32], expected: &[u8]) -> Result<bool, StoreError> {
        self.swap(key, expected, None).await
    }

    /// Removes every entry expired at `now_ms`; returns how many. The
    /// expired keys are found under a read transaction, which keyed calls
    /// do not wait for, then removed `batch` at a time, each batch a short
    /// write transaction of its own (a key written again meanwhile stays).
    pub async fn sweep(&self, now_ms: u64, batch: usize) -> Result<usize, StoreError> {
        let batch = batch.max(1);
        let mut removed = 0;
        loop {
            let found = self
                .blocking(move |db| {
                    use redb::ReadableDatabase;
                    let txn = db.begin_read().map_err(local)?;
                    let t = txn.open_table(ENTRIES).map_err(local)?;
                    let mut expired = Vec::new();
                    for item in t.iter().map_err(local)? {
                        let (k, v) = item.map_err(local)?;
                        if expiry(v.value()) <= now_ms {
                            expired.push(k.value().to_vec());
                            if expired.len() >= MAX_PER_SCAN {
                                break;
                            }
                        }
                    }
                    Ok(expired)
                })
                .await?;
            let more = found.len() >= MAX_PER_SCAN;
            for chunk in found.chunks(batch) {
                let chunk = chunk.to_vec();
                removed += self
                    .blocking(move |db| {
                        let txn = db.begin_write().map_err(local)?;
                        let mut n = 0;
                        {
                            let mut t = txn.open_table(ENTRIES).map_err(local)?;
                            for k in &chunk {
                                let still = t
                                    .get(k.as_slice())
                                    .map_err(local)?
                                    .is_some_and(|v| expiry(v.value()) <= now_ms);
                                if still {
                                    t.remove(k.as_slice()).map_err(local)?;
                                    n += 1;
                                }
                            }
                        }
                        txn.commit().map_err(local)?;
                        Ok(n)
                    })
                    .await?;
            }
            if !more {
                return Ok(removed);
            }
        }
    }

    /// How many entries the file holds, expired ones included.
    pub async fn entries(&self) -> Result<u64, StoreError> {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        self.blocking(|db| {
            let txn = db.begin_read().map_err(local)?;
            let t = txn.open_table(ENTRIES).map_err(local)?;
            t.len().map_err(local)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(expires: u64, tag: u8) -> Vec<u8> {
        let mut v = expires.to_be_bytes().to_vec();
        v.push(tag);
        v
    }

    #[tokio::test]
    async fn insert_only_into_a_vacant_or_expired_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let k = [1u8; 32];
        assert_eq!(
            s.insert_if_vacant(&k, &value(100, 1), 10).await.unwrap(),
            None
        );
        assert_eq!(
            s.insert_if_vacant(&k, &value(100, 2), 99).await.unwrap(),
            Some(value(100, 1))
        );
        // Expired at 100: vacant again.
        assert_eq!(
            s.insert_if_vacant(&k, &value(300, 3), 100).await.unwrap(),
            None
        );
        assert_eq!(
            s.insert_if_vacant(&k, &value(300, 4), 101).await.unwrap(),
            Some(value(300, 3))
        );
    }

    #[tokio::test]
    async fn swaps_compare_the_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let k = [2u8; 32];
        s.insert_if_vacant(&k, &value(100, 1), 0).await.unwrap();
        assert!(!s.replace(&k, &value(100, 9), &value(100, 2)).await.unwrap());
        assert!(s.replace(&k, &value(100, 1), &value(100, 2)).await.unwrap());
        assert!(!s.remove(&k, &value(100, 1)).await.unwrap());
        assert!(s.remove(&k, &value(100, 2)).await.unwrap());
        assert!(!s.replace(&k, &value(100, 2), &value(100, 3)).await.unwrap());
        assert_eq!(s.entries().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn entries_survive_reopening_and_expired_ones_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LocalStore::open(dir.path()).unwrap();
            for i in 0..10u8 {
                let expires = if i < 6 { 50 } else { 500 };
                s.insert_if_vacant(&[i; 32], &value(expires, i), 0)
                    .await
                    .unwrap();
            }
        }
        let s = LocalStore::open(dir.path()).unwrap();
        assert_eq!(s.entries().await.unwrap(), 10);
        assert_eq!(
            s.insert_if_vacant(&[7; 32], &value(900, 0), 60)
                .await
                .unwrap(),
            Some(value(500, 7))
        );
        assert_eq!(s.sweep(60, 4).await.unwrap(), 6, "in batches of 4");
        assert_eq!(s.entries().await.unwrap(), 4);
        assert_eq!(s.sweep(60, 100).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn one_sweep_removes_every_expired_entry_however_many() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        // More than one read of the table collects, written in one go.
        let expired = MAX_PER_SCAN + 5_000;
        let db = s.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(ENTRIES).unwrap();
                for i in 0..expired as u64 + 10 {
                    let mut key = [0u8; 32];
                    key[..8].copy_from_slice(&i.to_be_bytes());
                    let expires = if i < expired as u64 { 50 } else { 500 };
                    t.insert(key.as_slice(), value(expires, 0).as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        })
        .await
        .unwrap();
        assert_eq!(s.sweep(60, 10_000).await.unwrap(), expired);
        assert_eq!(s.entries().await.unwrap(), 10);
    }
}
