//! The read cache: good answers of `read` routes that set `cache_ttl_ms`,
//! kept in this process, so that the quota is spent once per answer.
//!
//! * **Key**: the provider account (the AccessKey's hash), the `user-id`
//!   sent, method, path, query (parameters sorted by name when the route
//!   says so), the body's SHA-256 and every caller header a cached route
//!   forwards (`cache.forward_headers`; no other caller header reaches the
//!   provider on a cached route). So no header can make one caller's answer
//!   another's, and a changed AccessKey never reaches old entries.
//! * **Only good, shareable answers**: HTTP 200 whose envelope `code` is
//!   200, at most `cache.max_entry_bytes`; never one that sets a cookie,
//!   says `Cache-Control: private`, `no-store` or `no-cache`, or varies on
//!   `*` or on a header outside the key.
//! * **Coalescing**: while one call asks the provider for a key, the same
//!   key's other calls wait for its answer (at most
//!   `cache.coalesce_wait_ms`) instead of asking too. The asking call runs
//!   to its end even when its caller leaves, so the waiters still get it.
//! * **Stale if error**: an entry past its TTL but within `cache_stale_ms`
//!   answers a call the provider could not.
//!
//! The entries live in a `moka` cache bounded by bytes (TinyLFU admission,
//! LRU eviction). An entry owns its bytes (never a slice of a connection's
//! read buffer, which it would keep alive) and is weighed with what holding
//! it costs, so `cache.max_bytes` bounds the memory it takes. With
//! `backend = "redis"` entries are also written to Redis (expiring at TTL +
//! stale window), and a call that finds nothing in memory looks there, so
//! replicas share answers; Redis away or slow is a miss, never an error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::base::families::{self, Described, DescriptorEncoder};
use crate::config::{CacheConfig, ConfigError, RedisUrl};
use crate::net::tls::WithTrust;
use crate::policy::routes::CacheRule;

mod redis;
use redis::Shared;

/// The response header saying where an answer came from.
pub const X_PANDAGATE_CACHE: http::HeaderName = http::HeaderName::from_static("x-pandagate-cache");

/// What the cache did for a call: the access log's `cache` field,
/// `pandagate_cache_requests_total{result}` and `x-pandagate-cache`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    /// Answered from the cache.
    Hit,
    /// Asked the provider (and kept the answer if it was good).
    Miss,
    /// Answered by another call's answer, asked at the same time.
    Coalesced,
    /// The provider could not answer; an entry past its TTL did.
    Stale,
    /// The caller said `Cache-Control: no-store`, or the body was too big
    /// to key: neither looked up nor kept.
    Bypass,
}

impl CacheResult {
    /// Every result, for series that exist before the first call.
    pub const ALL: [CacheResult; 5] = [
        CacheResult::Hit,
        CacheResult::Miss,
        CacheResult::Coalesced,
        CacheResult::Stale,
        CacheResult::Bypass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Coalesced => "coalesced",
            CacheResult::Stale => "stale",
            CacheResult::Bypass => "bypass",
        }
    }
}

/// A kept answer. Everything in it is its own allocation.
#[derive(Debug)]
pub struct Entry {
    /// The path it answers, for purges by prefix.
    path: Box<str>,
    headers: Box<[(HeaderName, HeaderValue)]>,
    body: Bytes,
    stored: Instant,
    /// When it was stored, by the wall clock: what replicas share.
    stored_unix_ms: u64,
}

/// What holding one entry costs beyond its bytes, as measured in the
/// process's resident memory (`bench/cache_memory.py`): the `Arc`ed entry,
/// the map's node, its key and its place in the eviction lists take about
/// 300 bytes, and the allocator's pages kept around the entry's small,
/// long-lived allocations, between the short-lived ones of the calls
/// served meanwhile, about 1.7 KiB more.
const ENTRY_OVERHEAD: usize = 2048;
/// What a header costs beyond its name and value: the pair itself and the
/// value's allocation.
const HEADER_OVERHEAD: usize = 96;

impl Entry {
    /// The memory holding this entry takes, as the cache bounds it.
    fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + HEADER_OVERHEAD)
            .sum();
        let bytes = self.body.len() + self.path.len() + headers + ENTRY_OVERHEAD;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// Now, in milliseconds since the Unix epoch: an entry's age across
/// replicas.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Entry {
    /// The answer as the caller gets it: as kept, plus `age` and
    /// `x-pandagate-cache`.
    pub fn answer(&self, how: CacheResult, now: Instant) -> Response<Bytes> {
        let mut response = Response::new(self.body.clone());
        let headers = response.headers_mut();
        headers.reserve(self.headers.len() + 2);
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        let age = now.saturating_duration_since(self.stored).as_secs();
        response
            .headers_mut()
            .insert(http::header::AGE, HeaderValue::from(age));
        response
            .headers_mut()
            .insert(X_PANDAGATE_CACHE, HeaderValue::from_static(how.as_str()));
        response
    }

    fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored)
    }
}

/// Where a leader's answer (or `None`: ask for yourself) arrives.
pub type Awaited = watch::Receiver<Option<Arc<Entry>>>;

/// What a call found.
#[derive(Debug, Default)]
pub struct Found {
    /// Within its TTL: answer with it.
    pub fresh: Option<Arc<Entry>>,
    /// Past its TTL, within the stale window: for when the provider fails.
    pub stale: Option<Arc<Entry>>,
}

/// The process's read cache; outlives config reloads.
pub struct ReadCache {
    entries: moka::sync::Cache<[u8; 32], Arc<Entry>>,
    max_entry: usize,
    coalesce_wait: Duration,
    /// Keys being asked for now, and where their answer will be sent.
    asking: Mutex<HashMap<[u8; 32], Awaited>>,
    purges: AtomicU64,
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCache")
            .field("entries", &self.entries.entry_count())
            .field("bytes", &self.entries.weighted_size())
            .finish_non_exhaustive()
    }
}

/// Whether a call asks the provider itself or waits for another's answer.
pub enum Role<'a> {
    /// Asks, and must [`Leader::finish`] (dropping it tells the waiters to
    /// ask for themselves).
    Leader(Leader<'a>),
    /// Waits for the leader's answer.
    Follower(Awaited),
}

pub struct Leader<'a> {
    cache: &'a ReadCache,
    key: [u8; 32],
    send: Option<watch::Sender<Option<Arc<Entry>>>>,
}

impl Leader<'_> {
    /// Keeps `entry` (if any; in Redis too, for `keep`) and hands it to the
    /// waiters.
    pub fn finish(mut self, entry: Option<Arc<Entry>>, keep: Duration) {
        if let Some(entry) = &entry {
            self.cache.entries.insert(self.key, entry.clone());
            if let Some(shared) = &self.cache.shared {
                shared.put(&entry.path, &self.key, entry.to_wire(), keep);
            }
        }
        self.cache
            .asking
            .lock()
            .expect("not poisoned")
            .remove(&self.key);
        if let Some(send) = self.send.take() {
            let _ = send.send(entry);
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if self.send.is_some() {
            self.cache
                .asking
                .lock()
                .expect("not poisoned")
                .remove(&self.key);
            // The sender goes with it: waiters see no answer and ask.
        }
    }
}

impl ReadCache {
    /// A cache in this process, and in Redis when `redis_url` is given
    /// (`Loaded::cache_redis_url`; a lazy connection: needs a runtime).
    pub fn open(
        config: &CacheConfig,
        redis_url: Option<&WithTrust<RedisUrl>>,
    ) -> Result<ReadCache, ConfigError> {
        let mut cache = ReadCache::new(config);
        if let Some(url) = redis_url {
            cache.shared = Some(Arc::new(Shared::new(config, url)?));
        }
        Ok(cache)
    }

    /// A cache in this process only.
    pub fn new(config: &CacheConfig) -> ReadCache {
        let entries = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|_, e: &Arc<Entry>| e.weight())
            .build();
        ReadCache {
            entries,
            max_entry: config.max_entry_bytes,
            coalesce_wait: Duration::from_millis(config.coalesce_wait_ms),
            asking: Mutex::new(HashMap::new()),
            purges: AtomicU64::new(0),
            shared: None,
        }
    }

    pub fn max_entry_bytes(&self) -> usize {
        self.max_entry
    }

    pub fn coalesce_wait(&self) -> Duration {
        self.coalesce_wait
    }

    /// Bytes held, as the weigher counts them.
    pub fn bytes(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    pub fn describe(&self, e: &mut DescriptorEncoder) -> Described {
        families::bytes_gauge(
            e,
            "cache_bytes",
            "Bytes of answers the read cache holds.",
            self.bytes(),
        )
    }

    /// The entry for `key`, by its age against `rule`.
    pub fn look(&self, key: &[u8; 32], rule: CacheRule, now: Instant) -> Found {
        let Some(entry) = self.entries.get(key) else {
            return Found::default();
        };
        let age = entry.age(now);
        if age < rule.ttl {
            Found {
                fresh: Some(entry),
                stale: None,
            }
        } else if age < rule.ttl + rule.stale {
            Found {
                fresh: None,
                stale: Some(entry),
            }
        } else {
            Found::default()
        }
    }

    /// Like [`look`](Self::look), and when memory has nothing, Redis
    /// (whatever it finds is kept in memory too).
    pub async fn look_shared(&self, path: &str, key: &[u8; 32], rule: CacheRule) -> Found {
        let found = self.look(key, rule, Instant::now());
        let Some(shared) = &self.shared else {
            return found;
        };
        // A fresh entry here answers; an expired one may be older than
        // what another replica has put in Redis since.
        if found.fresh.is_some() {
            return found;
        }
        let Some(bytes) = shared.get(path, key).await else {
            return found;
        };
        let Some(entry) = Entry::from_wire(&bytes, Instant::now()) else {
            return found;
        };
        let newer = found
            .stale
            .as_ref()
            .is_none_or(|mine| entry.stored_unix_ms > mine.stored_unix_ms);
        if newer {
            self.entries.insert(*key, Arc::new(entry));
        }
        self.look(key, rule, Instant::now())
    }

    /// Leads the asking for `key`, or follows the call already leading.
    pub fn lead_or_follow(&self, key: [u8; 32]) -> Role<'_> {
        let mut asking = self.asking.lock().expect("not poisoned");
        if let Some(answer) = asking.get(&key) {
            return Role::Follower(answer.clone());
        }
        let (send, answer) = watch::channel(None);
        asking.insert(key, answer);
        Role::Leader(Leader {
            cache: self,
            key,
            send: Some(send),
        })
    }

    /// An entry for a provider answer, if it is one to keep: 200, envelope
    /// `code` 200, at most `max_entry_bytes`, and [`shareable`]. `sent` is
    /// the request as it went upstream, `keyed` the headers in its key.
    /// The entry owns copies of the bytes: `body` and `headers` may be
    /// slices of a connection's read buffer, which they would keep alive.
    pub fn keepable(
        &self,
        path: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: &Bytes,
        sent: (&HeaderMap, &[HeaderName]),
        now: Instant,
    ) -> Option<Arc<Entry>> {
        if status != StatusCode::OK || body.len() > self.max_entry {
            return None;
        }
        if !shareable(headers, sent.0, sent.1) {
            return None;
        }
        let code = crate::pandapon::envelope::inspect(body).code?;
        let good = code.as_u64() == Some(200) || code.as_str() == Some("200");
        if !good {
            return None;
        }
        let dropped = [
            http::header::AGE,
            X_PANDAGATE_CACHE,
            crate::pandapon::headers::X_REQUEST_ID,
            http::header::CONTENT_LENGTH,
        ];
        let kept = headers
            .iter()
            .filter(|(name, _)| !dropped.contains(name))
            .map(|(name, value)| {
                Some((
                    HeaderName::from_bytes(name.as_str().as_bytes()).ok()?,
                    HeaderValue::from_bytes(value.as_bytes()).ok()?,
                ))
            })
            .collect::<Option<Box<[_]>>>()?;
        Some(Arc::new(Entry {
            path: path.into(),
            headers: kept,
            body: Bytes::copy_from_slice(body),
            stored: now,
            stored_unix_ms: unix_ms(),
        }))
    }

    /// Removes every entry whose path starts with `prefix`, here and in
    /// Redis, and says what it did.
    pub async fn purge_everywhere(&self, prefix: &str) -> Purged {
        let here = self.purge(prefix);
        let shared = match &self.shared {
            Some(shared) => Some(shared.purge(prefix).await),
            None => None,
        };
        Purged { here, shared }
    }

    /// Removes every entry of this process whose path starts with `prefix`;
    /// how many.
    pub fn purge(&self, prefix: &str) -> usize {
        let keys: Vec<[u8; 32]> = self
            .entries
            .iter()
            .filter(|(_, e)| e.path.starts_with(prefix))
            .map(|(k, _)| *k)
            .collect();
        for k in &keys {
            self.entries.invalidate(k);
        }
        self.purges.fetch_add(1, Ordering::Relaxed);
        keys.len()
    }
}

/// What a purge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Purged {
    /// Entries removed from this process's memory.
    pub here: usize,
    /// In Redis, with the Redis backend.
    pub shared: Option<SharedPurge>,
}

/// What a purge did in Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedPurge {
    /// Keys deleted.
    pub removed: usize,
    /// Every key was looked at: none of the prefix's entries remain. When
    /// false (Redis failed, or `cache.purge_timeout_ms` passed), some may:
    /// purging again goes on.
    pub complete: bool,
}

impl Purged {
    /// Whether nothing of the prefix is left anywhere this process knows.
    pub fn complete(&self) -> bool {
        self.shared.is_none_or(|s| s.complete)
    }
}

/// What a cached call is keyed by.
#[derive(Debug)]
pub struct KeyOf<'a> {
    /// The provider account the call is sent as (`Profile::account`).
    pub account: &'a [u8; 32],
    pub method: &'a http::Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Sort the query's parameters by name (repeated names keep their
    /// order, which can matter to the provider).
    pub sort_query: bool,
    pub body: &'a [u8],
    /// The headers sent upstream: `user-id` and the `keyed` ones are part
    /// of the key.
    pub headers: &'a HeaderMap,
    pub keyed: &'a [HeaderName],
}

impl KeyOf<'_> {
    /// The key: each part length-prefixed, so no two calls share one.
    pub fn key(&self) -> [u8; 32] {
        let mut k = Sha256::new();
        let mut part = |bytes: &[u8]| {
            k.update((bytes.len() as u64).to_be_bytes());
            k.update(bytes);
        };
        part(b"pandagate read cache v2");
        part(self.account);
        let mut header = |name: &HeaderName| {
            let mut values = self.headers.get_all(name).iter().peekable();
            if values.peek().is_none() {
                part(b"\x00none");
            }
            for value in values {
                part(value.as_bytes());
            }
            part(b"\x00end");
        };
        header(&crate::pandapon::headers::USER_ID);
        for name in self.keyed {
            header(name);
        }
        part(self.method.as_str().as_bytes());
        part(self.path.as_bytes());
        match self.query {
            None => part(b"\x00none"),
            Some(q) if self.sort_query => {
                let mut pairs: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
                // Stable: `id=2&id=1` stays apart from `id=1&id=2`.
                pairs.sort_by_key(|p| p.split_once('=').map_or(*p, |(name, _)| name));
                part(pairs.join("&").as_bytes());
            }
            Some(q) => part(q.as_bytes()),
        }
        part(&Sha256::digest(self.body));
        k.finalize().into()
    }
}

/// Whether an answer may be given to every caller of its key: it sets no
/// cookie, its `Cache-Control` does not say `private`, `no-store` or
/// `no-cache`, and its `Vary` names no header that went upstream (in
/// `sent`) outside the key (`keyed`, `user-id`, the AccessKey), nor `*`.
pub fn shareable(answer: &HeaderMap, sent: &HeaderMap, keyed: &[HeaderName]) -> bool {
    use crate::pandapon::headers::{ACCESS_KEY, NONCE_STR, SIGNATURE, TIMESTAMP, USER_ID};
    if answer.contains_key(http::header::SET_COOKIE) {
        return false;
    }
    let tokens = |name| {
        answer
            .get_all(name)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("*").split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
    };
    let private = tokens(http::header::CACHE_CONTROL).iter().any(|d| {
        let name = d.split('=').next().unwrap_or_default().trim();
        matches!(name, "private" | "no-store" | "no-cache")
    });
    if private {
        return false;
    }
    tokens(http::header::VARY).iter().all(|name| {
        if name == "*" {
            return false;
        }
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            // `*`, or not a name: it varies on what cannot be keyed.
            return false;
        };
        let in_key = keyed.contains(&name) || name == USER_ID || name == ACCESS_KEY;
        // Each attempt's own signature headers vary with every call.
        let per_attempt = [TIMESTAMP, NONCE_STR, SIGNATURE].contains(&name);
        in_key || !(sent.contains_key(&name) || per_attempt)
    })
}

/// What the caller's `Cache-Control` asks of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerWish {
    /// Use it as usual.
    Any,
    /// `no-cache`: ask the provider, keep the fresh answer.
    Refresh,
    /// `no-store`: neither look up nor keep.
    Bypass,
}

pub fn caller_wish(headers: &HeaderMap) -> CallerWish {
    let mut wish = CallerWish::Any;
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',').map(|d| d.trim().to_ascii_lowercase()) {
            match directive.as_str() {
                "no-store" => return CallerWish::Bypass,
                "no-cache" => wish = CallerWish::Refresh,
                _ => {}
            }
        }
    }
    wish
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(ttl_ms: u64, stale_ms: u64) -> CacheRule {
        CacheRule {
            ttl: Duration::from_millis(ttl_ms),
            stale: Duration::from_millis(stale_ms),
            sort_query: false,
        }
    }

    fn good() -> Bytes {
        Bytes::from_static(br#"{"requestId":"r","code":200,"msg":"ok","data":{}}"#)
    }

    const KEYED: [HeaderName; 2] = [http::header::ACCEPT_LANGUAGE, http::header::CONTENT_TYPE];

    fn sent(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    /// A plain call's key parts, sent with `headers`.
    fn plain(headers: &HeaderMap) -> KeyOf<'_> {
        KeyOf {
            account: &[1; 32],
            method: &http::Method::GET,
            path: "/a",
            query: Some("x=1&y=2"),
            sort_query: false,
            body: b"",
            headers,
            keyed: &KEYED,
        }
    }

    #[test]
    fn keys_part_accounts_users_targets_bodies_and_forwarded_headers() {
        let usual = sent(&[("user-id", "1"), ("accept-language", "en")]);
        let base = plain(&usual).key();
        let user = sent(&[("user-id", "2"), ("accept-language", "en")]);
        let no_user = sent(&[("accept-language", "en")]);
        let language = sent(&[("user-id", "1"), ("accept-language", "xx-EVIL")]);
        let typed = sent(&[
            ("user-id", "1"),
            ("accept-language", "en"),
            ("content-type", "text/plain"),
        ]);
        let others = [
            KeyOf {
                account: &[2; 32],
                ..plain(&usual)
            },
            plain(&user),
            plain(&no_user),
            plain(&language),
            plain(&typed),
            KeyOf {
                method: &http::Method::POST,
                ..plain(&usual)
            },
            KeyOf {
                path: "/b",
                ..plain(&usual)
            },
            KeyOf {
                query: Some("y=2&x=1"),
                ..plain(&usual)
            },
            KeyOf {
                query: None,
                ..plain(&usual)
            },
            KeyOf {
                body: b"{}",
                ..plain(&usual)
            },
        ];
        for (i, other) in others.iter().enumerate() {
            assert_ne!(base, other.key(), "case {i}");
        }
        // A header outside the key changes nothing (it is not forwarded).
        let cookie = sent(&[
            ("user-id", "1"),
            ("accept-language", "en"),
            ("cookie", "sid=attacker"),
        ]);
        assert_eq!(plain(&cookie).key(), base);
    }

    #[test]
    fn a_sorted_query_keeps_the_order_of_repeated_names() {
        let usual = sent(&[("user-id", "1")]);
        let sorted = |q: &'static str| {
            KeyOf {
                query: Some(q),
                sort_query: true,
                ..plain(&usual)
            }
            .key()
        };
        assert_eq!(sorted("y=2&x=1"), sorted("x=1&y=2"));
        assert_eq!(sorted("b=1&id=2&a=3&id=1"), sorted("a=3&id=2&b=1&id=1"));
        assert_ne!(sorted("itemId=2&itemId=1"), sorted("itemId=1&itemId=2"));
    }

    #[test]
    fn only_good_small_answers_are_kept() {
        let c = ReadCache::new(&CacheConfig {
            max_entry_bytes: 100,
            ..CacheConfig::default()
        });
        let now = Instant::now();
        let h = HeaderMap::new();
        let keep = |status, headers: &HeaderMap, body: &Bytes| {
            c.keepable("/a", status, headers, body, (&HeaderMap::new(), &[]), now)
        };
        assert!(keep(StatusCode::OK, &h, &good()).is_some());
        let busy = Bytes::from_static(br#"{"code":500,"msg":"busy"}"#);
        assert!(keep(StatusCode::OK, &h, &busy).is_none());
        let text = Bytes::from_static(br#"{"code":"200"}"#);
        assert!(keep(StatusCode::OK, &h, &text).is_some());
        assert!(keep(StatusCode::CREATED, &h, &good()).is_none());
        assert!(keep(StatusCode::OK, &h, &Bytes::from_static(b"not json")).is_none());
        let big = Bytes::from(format!(r#"{{"code":200,"data":"{}"}}"#, "x".repeat(200)));
        assert!(keep(StatusCode::OK, &h, &big).is_none());
    }

    #[test]
    fn only_answers_meant_for_everyone_are_shared() {
        let keyed = [http::header::ACCEPT_LANGUAGE];
        let mut sent = HeaderMap::new();
        sent.insert("accept-language", HeaderValue::from_static("en"));
        sent.insert("traceparent", HeaderValue::from_static("00-1-2-01"));
        sent.insert("user-id", HeaderValue::from_static("1"));
        let with = |name: &'static str, value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("content-type", HeaderValue::from_static("application/json"));
            h.append(name, HeaderValue::from_static(value));
            shareable(&h, &sent, &keyed)
        };
        for (name, value) in [
            ("set-cookie", "sid=1"),
            ("cache-control", "private"),
            ("cache-control", "max-age=60, Private=\"x\""),
            ("cache-control", "no-store"),
            ("cache-control", "no-cache"),
            ("vary", "*"),
            ("vary", "Accept-Language, *"),
            ("vary", "traceparent"),
            ("vary", "timestamp"),
            ("vary", "signature"),
        ] {
            assert!(!with(name, value), "{name}: {value}");
        }
        for (name, value) in [
            ("cache-control", "max-age=60, public"),
            ("vary", "Accept-Language"),
            ("vary", "user-id, access-key"),
            // Never sent on a cached route: the answer is everyone's.
            ("vary", "Cookie, Origin"),
            ("x-other", "1"),
        ] {
            assert!(with(name, value), "{name}: {value}");
        }
    }

    #[test]
    fn an_entry_owns_its_bytes_and_weighs_what_it_holds() {
        let c = ReadCache::new(&CacheConfig::default());
        // A 64 KiB read buffer of which the answer is a small slice.
        let buffer = Bytes::from([good().as_ref(), vec![b' '; 64 * 1024].as_slice()].concat());
        let body = buffer.slice(..good().len());
        let mut h = HeaderMap::new();
        let value = buffer.slice(..8);
        h.insert("x-slice", HeaderValue::from_maybe_shared(value).unwrap());
        let e = c
            .keepable(
                "/a",
                StatusCode::OK,
                &h,
                &body,
                (&HeaderMap::new(), &[]),
                Instant::now(),
            )
            .unwrap();
        assert_ne!(e.body.as_ptr(), body.as_ptr(), "a copy of the body");
        assert_eq!(e.body, body);
        let (_, kept) = &e.headers[0];
        assert!(
            !std::ptr::eq(kept.as_bytes().as_ptr(), buffer.as_ptr()),
            "a copy of the header"
        );
        let weight = e.weight() as usize;
        assert!(
            weight >= body.len() + ENTRY_OVERHEAD + HEADER_OVERHEAD,
            "{weight}"
        );
        assert!(weight < 2 * ENTRY_OVERHEAD + body.len() + 64, "{weight}");
    }

    #[test]
    fn entries_are_fresh_then_stale_then_gone() {
        let c = ReadCache::new(&CacheConfig::default());
        let t0 = Instant::now();
        let entry = c
            .keepable(
                "/a",
                StatusCode::OK,
                &HeaderMap::new(),
                &good(),
                (&HeaderMap::new(), &[]),
                t0,
            )
            .unwrap();
        let Role::Leader(leader) = c.lead_or_follow([1; 32]) else {
            panic!("first caller leads")
        };
        assert!(matches!(c.lead_or_follow([1; 32]), Role::Follower(_)));
        leader.finish(Some(entry), Duration::from_secs(1));
        assert!(matches!(c.lead_or_follow([1; 32]), Role::Leader(_)));
        let r = rule(1_000, 500);
        assert!(
            c.look(&[1; 32], r, t0 + Duration::from_millis(999))
                .fresh
                .is_some()
        );
        let later = c.look(&[1; 32], r, t0 + Duration::from_millis(1_200));
        assert!(later.fresh.is_none() && later.stale.is_some());
        let gone = c.look(&[1; 32], r, t0 + Duration::from_millis(1_500));
        assert!(gone.fresh.is_none() && gone.stale.is_none());
        let answer = later
            .stale
            .unwrap()
            .answer(CacheResult::Stale, t0 + Duration::from_secs(2));
        assert_eq!(answer.headers()["age"], "2");
        assert_eq!(answer.headers()[X_PANDAGATE_CACHE], "stale");
        assert_eq!(answer.body(), &good());
    }

    #[tokio::test]
    async fn a_leader_that_gives_up_sends_its_followers_to_ask() {
        let c = ReadCache::new(&CacheConfig::default());
        let Role::Leader(leader) = c.lead_or_follow([2; 32]) else {
            panic!()
        };
        let Role::Follower(mut answer) = c.lead_or_follow([2; 32]) else {
            panic!()
        };
        drop(leader);
        assert!(answer.changed().await.is_err(), "no answer will come");
        assert!(matches!(c.lead_or_follow([2; 32]), Role::Leader(_)));
    }

    #[test]
    fn caller_cache_control_is_read() {
        let mut h = HeaderMap::new();
        assert_eq!(caller_wish(&h), CallerWish::Any);
        h.insert(
            "cache-control",
            HeaderValue::from_static("max-age=0, No-Cache"),
        );
        assert_eq!(caller_wish(&h), CallerWish::Refresh);
        h.append("cache-control", HeaderValue::from_static("no-store"));
        assert_eq!(caller_wish(&h), CallerWish::Bypass);
    }

    #[test]
    fn purges_go_by_path_prefix() {
        let c = ReadCache::new(&CacheConfig::default());
        let now = Instant::now();
        for (i, path) in ["/open/product/1", "/open/product/2", "/open/order/1"]
            .iter()
            .enumerate()
        {
            let e = c
                .keepable(
                    path,
                    StatusCode::OK,
                    &HeaderMap::new(),
                    &good(),
                    (&HeaderMap::new(), &[]),
                    now,
                )
                .unwrap();
            let Role::Leader(l) = c.lead_or_follow([i as u8; 32]) else {
                panic!()
            };
            l.finish(Some(e), Duration::from_secs(1));
        }
        assert_eq!(c.purge("/open/product/"), 2);
        assert!(c.bytes() > 0);
        assert_eq!(c.purge("/"), 1);
    }
}
