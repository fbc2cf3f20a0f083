//! The shared store: one Redis key per idempotency key, shared by every
//! replica. Each operation is one Lua script, atomic in Redis; an entry
//! expires by Redis' own `PX` timer, kept across replacements (`KEEPTTL`).
//! Keys carry their hash in a Cluster hash tag (`{...}`).

use std::time::Duration;

use super::StoreError;
use crate::config::{ConfigError, IdempotencyConfig, RedisUrl};
use crate::net::tls::WithTrust;
use crate::state;

/// Returns the entry, or stores ARGV[1] for ARGV[2] ms and returns nil.
const INSERT_IF_VACANT: &str = r"
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

/// Sets ARGV[2], keeping the expiry, if the entry is exactly ARGV[1].
const REPLACE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
";

/// Deletes the entry if it is exactly ARGV[1].
const REMOVE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

#[derive(Clone)]
pub struct RedisStore {
    url: RedisUrl,
    conn: state::redis::Conn,
    prefix: String,
    timeout: Duration,
    /// Replicas each write must reach before it counts.
    wait_replicas: u32,
    insert_if_vacant: redis::Script,
    replace: redis::Script,
    remove: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A lazy connection: nothing is dialled until the first keyed call.
    /// Needs a tokio runtime.
    pub fn new(
        c: &IdempotencyConfig,
        url: &WithTrust<RedisUrl>,
    ) -> Result<RedisStore, ConfigError> {
        let timeout = Duration::from_millis(c.redis_timeout_ms);
        let conn = state::redis::connect(url, "idempotency.redis_url", timeout)?;
        Ok(RedisStore {
            url: (**url).clone(),
            conn,
            prefix: c.redis_key_prefix.clone(),
            timeout,
            wait_replicas: c.wait_replicas(),
            insert_if_vacant: redis::Script::new(INSERT_IF_VACANT),
            replace: redis::Script::new(REPLACE),
            remove: redis::Script::new(REMOVE),
        })
    }

    fn key(&self, key: &[u8; 32]) -> String {
        format!("{}:idempotency:{{{}}}", self.prefix, hex::encode(key))
    }

    /// Runs `script` on `key` with `args`, within the timeout.
    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        key: &[u8; 32],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let mut call = script.key(self.key(key));
        for a in args {
            call.arg(*a);
        }
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, call.invoke_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Redis(state::redis::describe(&e, &self.url))),
            Err(_) => Err(StoreError::RedisTimeout(self.timeout.as_millis() as u64)),
        }
    }

    /// After a write on `key`: it reached `wait_replicas` replicas, or it
    /// counts as not made (a failover could lose it).
    async fn replicated(&self, key: &[u8; 32]) -> Result<(), StoreError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        // Half the budget for the replicas, the rest for the answer.
        let wait = self.timeout / 2;
        let key = self.key(key);
        let asked = self.conn.replicas_having(&key, self.wait_replicas, wait);
        match tokio::time::timeout(self.timeout, asked).await {
            Ok(Ok(n)) if n >= self.wait_replicas => Ok(()),
            Ok(Ok(n)) => Err(StoreError::Redis(format!(
                "the write reached {n} of {} replicas within {} ms",
                self.wait_replicas,
                wait.as_millis()
            ))),
            Ok(Err(e)) => Err(StoreError::Redis(state::redis::describe(&e, &self.url))),
            Err(_) => Err(StoreError::RedisTimeout(self.timeout.as_millis() as u64)),
        }
    }

    pub(super) async fn insert_if_vacant(
        &self,
        key: &[u8; 32],
        value: &[u8],
        ttl_ms: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let ttl = ttl_ms.to_string();
        let found: Option<Vec<u8>> = self
            .run(&self.insert_if_vacant, key, &[value, ttl.as_bytes()])
            .await?;
        if found.is_none()
            && let Err(e) = self.replicated(key).await
        {
            // Not kept for sure: the reservation is taken back (best
            // effort) and the call is refused, nothing sent.
            let _ = self.run::<i64>(&self.remove, key, &[value]).await;
            return Err(e);
        }
        Ok(found)
    }

    pub(super) async fn replace(
        &self,
        key: &[u8; 32],
        expected: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let n: i64 = self.run(&self.replace, key, &[expected, new]).await?;
        if n == 1 {
            self.replicated(key).await?;
        }
        Ok(n == 1)
    }

    pub(super) async fn remove(&self, key: &[u8; 32], expected: &[u8]) -> Result<bool, StoreError> {
        let n: i64 = self.run(&self.remove, key, &[expected]).await?;
        Ok(n == 1)
    }
}
