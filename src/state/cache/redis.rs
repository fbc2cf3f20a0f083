//! The read cache in Redis, shared by the replicas: entries written in the
//! background (expiring at TTL + stale window), read when memory has none,
//! purged by path prefix with a bounded scan. Best effort: Redis away or
//! slow is a miss, never an error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use super::{Entry, SharedPurge, unix_ms};
use crate::config::{CacheConfig, ConfigError, RedisUrl};
use crate::net::tls::WithTrust;
use crate::state;

/// An entry as Redis holds it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    stored_unix_ms: u64,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Entry {
    pub(super) fn to_wire(&self) -> Vec<u8> {
        let wire = Wire {
            stored_unix_ms: self.stored_unix_ms,
            path: self.path.to_string(),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            body: self.body.to_vec(),
        };
        postcard::to_stdvec(&wire).expect("an entry serialises")
    }

    /// An entry read from Redis, its age carried over by the wall clock.
    pub(super) fn from_wire(bytes: &[u8], now: Instant) -> Option<Entry> {
        let wire: Wire = postcard::from_bytes(bytes).ok()?;
        let headers = wire
            .headers
            .into_iter()
            .map(|(name, value)| {
                Some((
                    HeaderName::from_bytes(name.as_bytes()).ok()?,
                    HeaderValue::from_bytes(&value).ok()?,
                ))
            })
            .collect::<Option<Box<[_]>>>()?;
        let age = Duration::from_millis(unix_ms().saturating_sub(wire.stored_unix_ms));
        Some(Entry {
            path: wire.path.into(),
            headers,
            body: Bytes::from(wire.body),
            stored: now.checked_sub(age).unwrap_or(now),
            stored_unix_ms: wire.stored_unix_ms,
        })
    }
}

/// Redis, shared by the replicas: best effort, bounded by its timeout.
pub(super) struct Shared {
    url: RedisUrl,
    conn: state::redis::Conn,
    prefix: String,
    timeout: Duration,
    purge_timeout: Duration,
}

impl Shared {
    pub(super) fn new(
        config: &CacheConfig,
        url: &WithTrust<RedisUrl>,
    ) -> Result<Shared, ConfigError> {
        let timeout = Duration::from_millis(config.redis_timeout_ms);
        let conn = state::redis::connect(url, "cache.redis_url", timeout)?;
        Ok(Shared {
            url: (**url).clone(),
            conn,
            prefix: config.redis_key_prefix.clone(),
            timeout,
            purge_timeout: Duration::from_millis(config.purge_timeout_ms),
        })
    }

    /// `PREFIX:cache:PATH:KEY`: the path first, so a purge by path prefix
    /// can find its keys.
    pub(super) fn name(&self, path: &str, key: &[u8; 32]) -> String {
        format!("{}:cache:{}:{}", self.prefix, path, hex::encode(key))
    }

    pub(super) async fn get(&self, path: &str, key: &[u8; 32]) -> Option<Vec<u8>> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.name(path, key));
        let get = cmd.query_async::<Option<Vec<u8>>>(&mut conn);
        match tokio::time::timeout(self.timeout, get).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::debug!(error = %state::redis::describe(&e, &self.url), "read cache: Redis read failed; a miss");
                None
            }
            Err(_) => None,
        }
    }

    /// Writes in the background: the caller never waits for it.
    pub(super) fn put(
        self: &Arc<Self>,
        path: &str,
        key: &[u8; 32],
        bytes: Vec<u8>,
        keep: Duration,
    ) {
        let (this, name) = (self.clone(), self.name(path, key));
        tokio::spawn(async move {
            let mut conn = this.conn.clone();
            let mut cmd = redis::cmd("SET");
            cmd.arg(name)
                .arg(bytes)
                .arg("PX")
                .arg(keep.as_millis().max(1) as u64);
            let set = cmd.query_async::<()>(&mut conn);
            if let Ok(Err(e)) = tokio::time::timeout(this.timeout, set).await {
                tracing::debug!(error = %state::redis::describe(&e, &this.url), "read cache: Redis write failed");
            }
        });
    }

    /// Deletes the keys of paths starting with `prefix`, scanning the
    /// whole key space unless Redis fails or `deadline` passes first.
    pub(super) async fn purge(&self, prefix: &str) -> SharedPurge {
        let deadline = tokio::time::Instant::now() + self.purge_timeout;
        // Glob characters in the path are escaped: a prefix is literal.
        let mut pattern = format!("{}:cache:", self.prefix);
        for c in prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        // A Cluster's keys are spread over its masters: each is scanned.
        let nodes = match &self.conn {
            state::redis::Conn::Cluster(cluster) => {
                match tokio::time::timeout_at(deadline, cluster.masters()).await {
                    Ok(Ok(masters)) if !masters.is_empty() => {
                        masters.into_iter().map(Some).collect()
                    }
                    _ => Vec::new(),
                }
            }
            _ => vec![None],
        };
        let mut removed = 0;
        let mut complete = !nodes.is_empty();
        for node in &nodes {
            if !self
                .purge_on(node.as_ref(), &pattern, deadline, &mut removed)
                .await
            {
                complete = false;
                break;
            }
        }
        if complete {
            return SharedPurge {
                removed,
                complete: true,
            };
        }
        tracing::warn!(
            prefix,
            removed,
            "read cache: purge in Redis not finished; purge again to go on"
        );
        SharedPurge {
            removed,
            complete: false,
        }
    }

    /// Scans one server (`node`: a Cluster's master; none: the one server)
    /// for `pattern` and deletes what it finds; false when Redis failed or
    /// `deadline` passed first.
    async fn purge_on(
        &self,
        node: Option<&(String, u16)>,
        pattern: &str,
        deadline: tokio::time::Instant,
        removed: &mut usize,
    ) -> bool {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let scanned = match (node, &self.conn) {
                (Some((host, port)), state::redis::Conn::Cluster(cluster)) => {
                    tokio::time::timeout_at(deadline, cluster.on_node(&cmd, host, *port)).await
                }
                _ => tokio::time::timeout_at(deadline, cmd.query_async(&mut conn)).await,
            };
            let Ok(Ok((next, keys))) = scanned else {
                return false;
            };
            let keys: Vec<String> = keys;
            // In a Cluster, keys of different slots cannot go in one DEL.
            let batches: Vec<&[String]> = match node {
                Some(_) => keys.chunks(1).collect(),
                None if keys.is_empty() => Vec::new(),
                None => vec![&keys[..]],
            };
            for batch in batches {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(batch);
                let del = cmd.query_async::<usize>(&mut conn);
                match tokio::time::timeout_at(deadline, del).await {
                    Ok(Ok(n)) => *removed += n,
                    _ => return false,
                }
            }
            cursor = next;
            if cursor == 0 {
                return true;
            }
        }
    }
}
