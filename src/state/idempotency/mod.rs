//! Callers' idempotency keys: a `write` or `unknown` call sent again with
//! the same `Idempotency-Key` is answered from the first call's outcome and
//! never reaches the provider a second time, on any replica.
//!
//! A key is scoped to its [`Owner`] — the provider account (the AccessKey's
//! hash), the `user-id` sent and the authenticated client — and the key
//! itself; the call's fingerprint is its method, path, query and
//! the SHA-256 of its body. The store holds one entry per scope:
//!
//! ```text
//!  (none) ──reserve──► in progress ──finish──► done (the answer) ─┐
//!    ▲                   │   │                                     │
//!    └───────release─────┘   └─lease passed─► lapsed (outcome      │
//!        (nothing sent)                        unknown)            │
//!    ▲                                                             │
//!    └──────────────────────── ttl_ms after the reservation ◄─────┘
//! ```
//!
//! Every change is one atomic operation on the store: an insert that only
//! succeeds on a vacant key, and a compare-and-swap on the entry's exact
//! bytes. Two replicas may race; one wins, the other reads what it wrote.
//! The rules of what an entry means for a new call are [`judge`], a pure
//! function.

mod local;
mod redis;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::base::error::GatewayError;
use crate::config::{Class, ConfigError, IdempotencyBackend, IdempotencyConfig, RedisUrl};
use crate::net::tls::WithTrust;

pub use local::LocalStore;
pub use redis::RedisStore;

/// The caller's key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// On an answer replayed from the store.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Longest key, in characters.
pub const MAX_KEY_LEN: usize = 255;

/// What became of a call's key: the access log's `idempotency` field and
/// `pandagate_idempotency_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logged {
    /// A key on a read: not used.
    Ignored,
    /// First use: reserved and forwarded.
    New,
    /// Answered from the store.
    Replayed,
    /// Refused 409: the first call is still in progress.
    InProgress,
    /// Refused 422: the key was used for another call.
    Mismatch,
    /// Nothing reached the provider: the reservation was released.
    Released,
    /// The first call's gateway was lost mid-call: refused 502.
    UnknownOutcome,
    /// The store could not be reached: refused 503, nothing sent.
    Unavailable,
}

impl Logged {
    /// Every outcome, for series that exist before the first call.
    pub const ALL: [Logged; 8] = [
        Logged::Ignored,
        Logged::New,
        Logged::Replayed,
        Logged::InProgress,
        Logged::Mismatch,
        Logged::Released,
        Logged::UnknownOutcome,
        Logged::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Logged::Ignored => "ignored",
            Logged::New => "new",
            Logged::Replayed => "replayed",
            Logged::InProgress => "in_progress",
            Logged::Mismatch => "mismatch",
            Logged::Released => "released",
            Logged::UnknownOutcome => "unknown_outcome",
            Logged::Unavailable => "unavailable",
        }
    }
}

/// A caller's key, as the store and the log know it: never the key itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// SHA-256 of the owner and the key: the store's key.
    pub scope: [u8; 32],
    /// The first 12 hex digits of the key's SHA-256, for the log.
    pub shown: [u8; 12],
}

/// Reads the `Idempotency-Key` header: 1 to [`MAX_KEY_LEN`] visible ASCII
/// characters, bare or as a structured-field string (`"..."`, with `\"`
/// and `\\` escapes), which is unquoted. `None`: no header.
pub fn read_key(headers: &HeaderMap) -> Result<Option<Vec<u8>>, GatewayError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(GatewayError::BadIdempotencyKey);
    }
    parse_key(value.as_bytes())
        .map(Some)
        .ok_or(GatewayError::BadIdempotencyKey)
}

fn parse_key(raw: &[u8]) -> Option<Vec<u8>> {
    let key = match raw {
        [b'"', inner @ .., b'"'] => {
            let mut out = Vec::with_capacity(inner.len());
            let mut bytes = inner.iter();
            while let Some(&b) = bytes.next() {
                match b {
                    b'\\' => match bytes.next() {
                        Some(&e @ (b'"' | b'\\')) => out.push(e),
                        _ => return None,
                    },
                    b'"' => return None,
                    _ => out.push(b),
                }
            }
            out
        }
        // A quote opens a string: one that is not closed is malformed.
        [b'"', ..] => return None,
        _ => raw.to_vec(),
    };
    let visible = key.iter().all(u8::is_ascii_graphic);
    (visible && (1..=MAX_KEY_LEN).contains(&key.len())).then_some(key)
}

/// Whose key a key is: the provider account and sub-account the call is
/// sent as, and the authenticated caller that sent it. Two owners never
/// share an entry, whatever they name their keys.
#[derive(Clone, Copy, Debug)]
pub struct Owner<'a> {
    /// The AccessKey's hash (`Profile::account`): never the AccessKey.
    pub account: &'a [u8; 32],
    /// The `user-id` sent upstream, if any.
    pub user_id: Option<&'a [u8]>,
    /// The authenticated client, when clients are configured.
    pub client: Option<&'a str>,
}

impl Key {
    /// `key` as `owner`'s.
    pub fn new(owner: Owner<'_>, key: &[u8]) -> Key {
        let mut scope = Sha256::new();
        scope.update(b"pandagate idempotency v2\0");
        scope.update(owner.account);
        // Each optional part tagged and length-prefixed, so no two owners
        // hash alike.
        for part in [owner.user_id, owner.client.map(str::as_bytes)] {
            match part {
                None => scope.update([0u8]),
                Some(p) => {
                    scope.update([1u8]);
                    scope.update((p.len() as u64).to_be_bytes());
                    scope.update(p);
                }
            }
        }
        scope.update(key);
        let mut shown = [0u8; 12];
        hex::encode_to_slice(&Sha256::digest(key)[..6], &mut shown).expect("12 hex digits");
        Key {
            scope: scope.finalize().into(),
            shown,
        }
    }

    /// The SHA-256 prefix shown in logs.
    pub fn shown(&self) -> &str {
        std::str::from_utf8(&self.shown).expect("hex is ASCII")
    }
}

/// The call's fingerprint: method, path and query, and the body's SHA-256.
pub fn fingerprint(method: &http::Method, path_and_query: &str, body: &[u8]) -> [u8; 32] {
    let mut f = Sha256::new();
    f.update(method.as_str());
    f.update([0u8]);
    f.update(path_and_query);
    f.update([0u8]);
    f.update(Sha256::digest(body));
    f.finalize().into()
}

/// One key's entry in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub fingerprint: [u8; 32],
    /// Random, per reservation: tells its owner's writes from others'.
    pub owner: u64,
    /// Unix milliseconds after which an entry still in progress has lost
    /// its owner.
    pub lease_until_ms: u64,
    pub state: State,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    InProgress,
    /// Finished: the answer the first caller got.
    Done(Stored),
    /// Its owner was lost mid-call: whether the provider acted is unknown.
    Lapsed,
}

/// An answer as kept for replays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub status: u16,
    /// End-to-end headers, `x-request-id` aside.
    pub headers: Vec<(String, Vec<u8>)>,
    /// `None`: longer than `max_response_bytes`, not kept.
    pub body: Option<Vec<u8>>,
}

impl Stored {
    /// Keeps `status`, `headers` and `body` (`None`: too long to keep).
    pub fn new(status: StatusCode, headers: &HeaderMap, body: Option<&[u8]>) -> Stored {
        Stored {
            status: status.as_u16(),
            headers: headers
                .iter()
                .filter(|(name, _)| *name != crate::pandapon::headers::X_REQUEST_ID)
                .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                .collect(),
            body: body.map(<[u8]>::to_vec),
        }
    }

    /// The gateway's own answer `error`, as its caller got it.
    pub fn of_error(error: &GatewayError, request_id: &str) -> Stored {
        let shown = error.to_response(request_id);
        Stored::new(shown.status(), shown.headers(), Some(shown.body()))
    }

    /// The answer to replay, marked `idempotent-replayed: true`; an answer
    /// that was not kept is a refusal saying so.
    pub fn replay(&self) -> Result<Response<bytes::Bytes>, GatewayError> {
        let Some(body) = &self.body else {
            return Err(GatewayError::IdempotencyAnswerNotKept {
                status: self.status,
            });
        };
        let mut response = Response::new(bytes::Bytes::copy_from_slice(body));
        *response.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        let headers = response.headers_mut();
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                headers.append(name, value);
            }
        }
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        Ok(response)
    }
}

/// What an entry found in the store means for a new call.
#[derive(Debug, PartialEq, Eq)]
pub enum Judged {
    /// The key was used for another call.
    Mismatch,
    /// Finished: answer with this.
    Replay(Stored),
    /// Its owner is still within its lease.
    InProgress,
    /// Its owner's lease has passed: it must be marked lapsed.
    LeasePassed,
    /// Lapsed already.
    Unknown,
}

/// The rules, in order: another call's key is refused whatever its state;
/// a finished one is replayed; one in progress is waited for until its
/// lease passes, then its outcome is unknown.
pub fn judge(entry: &Entry, fingerprint: &[u8; 32], now_ms: u64) -> Judged {
    if entry.fingerprint != *fingerprint {
        return Judged::Mismatch;
    }
    match &entry.state {
        State::Done(stored) => Judged::Replay(stored.clone()),
        State::Lapsed => Judged::Unknown,
        State::InProgress if now_ms >= entry.lease_until_ms => Judged::LeasePassed,
        State::InProgress => Judged::InProgress,
    }
}

/// An entry as stored: its expiry (Unix ms, big-endian), then the entry.
/// Compare-and-swap compares these bytes whole.
fn encode(expires_at_ms: u64, entry: &Entry) -> Vec<u8> {
    let mut out = expires_at_ms.to_be_bytes().to_vec();
    postcard::to_io(entry, &mut out).expect("writing to a Vec cannot fail");
    out
}

fn decode(bytes: &[u8]) -> Result<(u64, Entry), StoreError> {
    let (expiry, entry) = bytes.split_at_checked(8).ok_or(StoreError::Corrupt)?;
    let expires = u64::from_be_bytes(expiry.try_into().expect("8 bytes"));
    let entry = postcard::from_bytes(entry).map_err(|_| StoreError::Corrupt)?;
    Ok((expires, entry))
}

/// The expiry of stored bytes (0 if unreadable: expired).
fn expiry(bytes: &[u8]) -> u64 {
    bytes
        .get(..8)
        .map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("local idempotency store: {0}")]
    Local(String),
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis did not answer within {0} ms")]
    RedisTimeout(u64),
    #[error("an entry in the idempotency store cannot be read")]
    Corrupt,
}

/// Where entries live. Cloning shares the connection or the file.
#[derive(Debug, Clone)]
pub enum Store {
    Local(LocalStore),
    Redis(Box<RedisStore>),
}

impl Store {
    /// Stores `value` unless the key holds an unexpired entry, which is
    /// returned instead.
    async fn insert_if_vacant(
        &self,
        key: &[u8; 32],
        value: &[u8],
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::Local(s) => s.insert_if_vacant(key, value, now_ms).await,
            Store::Redis(s) => s.insert_if_vacant(key, value, ttl_ms).await,
        }
    }

    /// Replaces the entry with `new` if it is exactly `expected`; its
    /// expiry stays.
    async fn replace(
        &self,
        key: &[u8; 32],
        expected: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        match self {
            Store::Local(s) => s.replace(key, expected, new).await,
            Store::Redis(s) => s.replace(key, expected, new).await,
        }
    }

    /// Removes the entry if it is exactly `expected`.
    async fn remove(&self, key: &[u8; 32], expected: &[u8]) -> Result<bool, StoreError> {
        match self {
            Store::Local(s) => s.remove(key, expected).await,
            Store::Redis(s) => s.remove(key, expected).await,
        }
    }
}

/// The keys of one gateway process; outlives config reloads.
#[derive(Debug)]
pub struct Idempotency {
    config: IdempotencyConfig,
    store: Store,
    running: Arc<Running>,
}

/// Keyed calls still running, their callers there or gone: a drain waits
/// for them, so a restart does not leave their keys with an unknown
/// outcome.
#[derive(Debug, Default)]
struct Running {
    calls: AtomicUsize,
    none: Notify,
}

/// Held by a keyed call while it runs.
#[derive(Debug)]
pub struct RunningCall(Arc<Running>);

impl Drop for RunningCall {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none.notify_waiters();
        }
    }
}

/// What [`Idempotency::begin`] found.
#[derive(Debug)]
pub enum Begun {
    /// First use: the call goes on, and must end in finish or release.
    Reserved(Reservation),
    /// Answered without sending: replayed, or refused (in progress,
    /// mismatch, unknown outcome).
    Answered(Logged, Result<Response<bytes::Bytes>, GatewayError>),
}

/// A key reserved by this call.
#[derive(Debug)]
pub struct Reservation {
    key: [u8; 32],
    expires_at_ms: u64,
    entry: Entry,
    /// The bytes stored, for compare-and-swap.
    stored: Vec<u8>,
}

impl Idempotency {
    /// Opens the store: the local file (created if missing), or a lazy
    /// connection to Redis (`redis_url` is `Loaded::idempotency_redis_url`).
    pub fn open(
        config: &IdempotencyConfig,
        redis_url: Option<&WithTrust<RedisUrl>>,
    ) -> Result<Idempotency, ConfigError> {
        let store = match config.backend {
            IdempotencyBackend::Local => {
                Store::Local(LocalStore::open(&config.path).map_err(|e| {
                    ConfigError::new(
                        "idempotency.path",
                        format_args!(
                            "{}: {e} (one process holds a local store; replicas share \
                         backend = \"redis\")",
                            config.path.display()
                        ),
                    )
                })?)
            }
            IdempotencyBackend::Redis => {
                let url = redis_url.ok_or_else(|| {
                    ConfigError::new("idempotency.redis_url", "no Redis URL was read")
                })?;
                Store::Redis(Box::new(RedisStore::new(config, url)?))
            }
        };
        Ok(Idempotency {
            config: config.clone(),
            store,
            running: Arc::default(),
        })
    }

    /// Counts a keyed call as running until the guard is dropped.
    pub fn running(&self) -> RunningCall {
        self.running.calls.fetch_add(1, Ordering::AcqRel);
        RunningCall(self.running.clone())
    }

    /// Waits until no keyed call is running, or `until`; true if none is.
    pub async fn settled(&self, until: tokio::time::Instant) -> bool {
        let wait = async {
            loop {
                let none = self.running.none.notified();
                if self.running.calls.load(Ordering::Acquire) == 0 {
                    return;
                }
                none.await;
            }
        };
        tokio::time::timeout_at(until, wait).await.is_ok()
    }

    pub fn config(&self) -> &IdempotencyConfig {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The call's key, if it carries one and its class uses it. A call
    /// that may not be repeated (a `write` or `unknown` one) without a key
    /// is refused when `require_key` is set; a read's key is noted in
    /// `logged` and not used.
    pub fn key_of(
        &self,
        headers: &HeaderMap,
        class: Class,
        owner: Owner<'_>,
        logged: &mut Option<Logged>,
    ) -> Result<Option<Key>, GatewayError> {
        let Some(key) = read_key(headers)? else {
            if self.config.require_key && !class.repeatable() {
                return Err(GatewayError::IdempotencyKeyRequired);
            }
            return Ok(None);
        };
        if class.repeatable() {
            *logged = Some(Logged::Ignored);
            tracing::debug!("Idempotency-Key on a read: ignored");
            return Ok(None);
        }
        Ok(Some(Key::new(owner, &key)))
    }

    /// Reserves `key` for a call with `fingerprint` that will be over
    /// within `deadline`, or says how the call is answered instead. A store
    /// that cannot be reached refuses the call (fails closed).
    pub async fn begin(&self, key: &Key, fingerprint: [u8; 32], deadline: Duration) -> Begun {
        match self.try_begin(key, fingerprint, deadline).await {
            Ok(begun) => begun,
            Err(e) => {
                tracing::warn!(error = %e, key = key.shown(), "idempotency store unavailable: call refused");
                Begun::Answered(
                    Logged::Unavailable,
                    Err(GatewayError::IdempotencyUnavailable),
                )
            }
        }
    }

    async fn try_begin(
        &self,
        key: &Key,
        fingerprint: [u8; 32],
        deadline: Duration,
    ) -> Result<Begun, StoreError> {
        let now = now_ms();
        let lease = deadline.as_millis() as u64 + self.config.lease_margin_ms;
        let entry = Entry {
            fingerprint,
            owner: rand::random(),
            lease_until_ms: now.saturating_add(lease),
            state: State::InProgress,
        };
        let expires_at_ms = now.saturating_add(self.config.ttl_ms);
        let stored = encode(expires_at_ms, &entry);
        // Each round either ends or follows a change another call made to
        // the entry in between; a few rounds settle any race.
        for _ in 0..4 {
            let inserted = self
                .store
                .insert_if_vacant(&key.scope, &stored, self.config.ttl_ms, now)
                .await;
            let inserted = match inserted {
                Ok(inserted) => inserted,
                Err(e) => {
                    // No answer is not "not stored": the reservation may
                    // land after all. The call is refused (nothing sent),
                    // so it must not hold the key.
                    let lapsed = encode(
                        expires_at_ms,
                        &Entry {
                            state: State::Lapsed,
                            ..entry.clone()
                        },
                    );
                    self.settle_later(key.scope, vec![stored, lapsed], None, entry.lease_until_ms);
                    return Err(e);
                }
            };
            let Some(found) = inserted else {
                return Ok(Begun::Reserved(Reservation {
                    key: key.scope,
                    expires_at_ms,
                    entry,
                    stored,
                }));
            };
            let (expires, existing) = decode(&found)?;
            let answered = match judge(&existing, &fingerprint, now) {
                Judged::Mismatch => (Logged::Mismatch, Err(GatewayError::IdempotencyKeyReused)),
                Judged::Replay(stored) => (Logged::Replayed, stored.replay()),
                Judged::InProgress => {
                    (Logged::InProgress, Err(GatewayError::IdempotencyInProgress))
                }
                Judged::Unknown => (
                    Logged::UnknownOutcome,
                    Err(GatewayError::IdempotencyOutcomeUnknown),
                ),
                Judged::LeasePassed => {
                    let lapsed = encode(
                        expires,
                        &Entry {
                            state: State::Lapsed,
                            ..existing
                        },
                    );
                    if self.store.replace(&key.scope, &found, &lapsed).await? {
                        tracing::warn!(
                            key = key.shown(),
                            "idempotency: a reservation outlived its lease; its outcome is unknown"
                        );
                    }
                    continue;
                }
            };
            return Ok(Begun::Answered(answered.0, answered.1));
        }
        Ok(Begun::Answered(
            Logged::InProgress,
            Err(GatewayError::IdempotencyInProgress),
        ))
    }

    /// Keeps the answer the caller got for replays. The entry is replaced
    /// only while it is this reservation's (in progress, or marked lapsed
    /// by another call meanwhile). `false`: it was not kept.
    pub async fn finish(&self, reservation: Reservation, answer: Stored) -> bool {
        let done = Entry {
            state: State::Done(answer),
            ..reservation.entry.clone()
        };
        let done = encode(reservation.expires_at_ms, &done);
        let lapsed = encode(
            reservation.expires_at_ms,
            &Entry {
                state: State::Lapsed,
                ..reservation.entry
            },
        );
        let ours = vec![reservation.stored, lapsed];
        match swap(&self.store, &reservation.key, &ours, Some(&done)).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(
                    "idempotency: the reservation was gone when its answer came; answer not kept"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "idempotency: answer not kept yet; trying again in the background");
                let until = reservation.expires_at_ms;
                self.settle_later(reservation.key, ours, Some(done), until);
                false
            }
        }
    }

    /// Frees the key of a call that sent nothing, so it can be used again.
    pub async fn release(&self, reservation: Reservation) {
        let lapsed = encode(
            reservation.expires_at_ms,
            &Entry {
                state: State::Lapsed,
                ..reservation.entry.clone()
            },
        );
        let ours = vec![reservation.stored, lapsed];
        if let Err(e) = swap(&self.store, &reservation.key, &ours, None).await {
            tracing::warn!(error = %e, "idempotency: reservation not released yet; trying again in the background");
            let until = reservation.entry.lease_until_ms;
            self.settle_later(reservation.key, ours, None, until);
        }
    }

    /// Replaces (`new`) or removes (`None`) the entry of `key` while it is
    /// one of `ours`, in the background, until the store answers: a store
    /// that did not answer may yet apply what it was sent, or may not have.
    /// It tries with backoff until the change is made, or the entry is
    /// seen not to be ours twice a second apart (an earlier write still in
    /// flight has landed by then), or `until_ms` plus a minute has passed.
    fn settle_later(&self, key: [u8; 32], ours: Vec<Vec<u8>>, new: Option<Vec<u8>>, until_ms: u64) {
        let store = self.store.clone();
        let give_up = until_ms.saturating_add(SETTLE_GRACE_MS);
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(50);
            let mut not_ours_since: Option<tokio::time::Instant> = None;
            while now_ms() < give_up {
                tokio::time::sleep(wait).await;
                match swap(&store, &key, &ours, new.as_deref()).await {
                    Ok(true) => return,
                    Ok(false) => {
                        let first = *not_ours_since.get_or_insert_with(tokio::time::Instant::now);
                        if first.elapsed() >= Duration::from_secs(1) {
                            return;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "idempotency: store still not answering"),
                }
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            tracing::error!(
                "idempotency: the store did not answer in time; the key's outcome reads as unknown once its lease passes"
            );
        });
    }
}

/// How long past its deadline [`Idempotency::settle_later`] keeps trying.
const SETTLE_GRACE_MS: u64 = 60_000;

/// Replaces (`new`) or removes (`None`) the entry of `key` if it is one of
/// `ours`; whether it did.
async fn swap(
    store: &Store,
    key: &[u8; 32],
    ours: &[Vec<u8>],
    new: Option<&[u8]>,
) -> Result<bool, StoreError> {
    for expected in ours {
        let done = match new {
            Some(new) => store.replace(key, expected, new).await?,
            None => store.remove(key, expected).await?,
        };
        if done {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Now, in Unix milliseconds: leases and expiries are wall-clock times,
/// shared by every replica of a Redis store.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_bare_or_quoted() {
        let ok: [(&[u8], &[u8]); 6] = [
            (b"order-1", b"order-1"),
            (b"\"order-1\"", b"order-1"),
            (b"\"a\\\"b\\\\c\"", b"a\"b\\c"),
            (b"x", b"x"),
            (
                b"~!#$%&'()*+,-./:;<=>?@[]^_`{|}",
                b"~!#$%&'()*+,-./:;<=>?@[]^_`{|}",
            ),
            (b"\"\\\"\"", b"\""),
        ];
        for (raw, key) in ok {
            assert_eq!(parse_key(raw).as_deref(), Some(key), "{raw:?}");
        }
        let long = vec![b'k'; MAX_KEY_LEN];
        assert_eq!(parse_key(&long), Some(long.clone()));
        let too_long = vec![b'k'; MAX_KEY_LEN + 1];
        let bad: [&[u8]; 10] = [
            b"",
            b"\"\"",
            b"has space",
            b"\"has space\"",
            b"tab\t",
            b"\"open",
            b"\"a\"b\"",
            b"\"bad\\escape\"",
            "ключ".as_bytes(),
            &too_long,
        ];
        for raw in bad {
            assert_eq!(parse_key(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn two_headers_are_refused() {
        let mut h = HeaderMap::new();
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert_eq!(read_key(&h).unwrap(), Some(b"a".to_vec()));
        h.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert!(matches!(read_key(&h), Err(GatewayError::BadIdempotencyKey)));
        assert_eq!(read_key(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn scopes_part_accounts_users_callers_and_keys() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let owner = |account, user_id, client| Owner {
            account,
            user_id,
            client,
        };
        let scopes = [
            Key::new(owner(&a, None, None), b"k"),
            Key::new(owner(&b, None, None), b"k"),
            Key::new(owner(&a, Some(b"111"), None), b"k"),
            Key::new(owner(&a, Some(b"112"), None), b"k"),
            Key::new(owner(&a, None, Some("x")), b"k"),
            Key::new(owner(&a, None, Some("y")), b"k"),
            Key::new(owner(&a, Some(b"111"), Some("x")), b"k"),
            Key::new(owner(&a, None, None), b"k2"),
            // Tags and length prefixes: moving bytes between parts changes
            // the scope.
            Key::new(owner(&a, Some(b"x"), None), b"k"),
            Key::new(owner(&a, Some(b"1"), Some("11")), b"k"),
            Key::new(owner(&a, Some(b"11"), Some("1")), b"k"),
            Key::new(owner(&a, Some(b""), None), b"k"),
        ];
        for (i, x) in scopes.iter().enumerate() {
            for y in &scopes[i + 1..] {
                assert_ne!(x.scope, y.scope, "{x:?} {y:?}");
            }
        }
        assert_eq!(
            Key::new(owner(&a, Some(b"1"), None), b"k"),
            Key::new(owner(&a, Some(b"1"), None), b"k")
        );
        // The log shows a hash prefix, never the key.
        let k = Key::new(owner(&a, None, None), b"order-secret-1");
        assert_eq!(k.shown().len(), 12);
        assert_eq!(
            k.shown(),
            &hex::encode(Sha256::digest(b"order-secret-1"))[..12]
        );
    }

    #[test]
    fn fingerprints_differ_by_method_target_and_body() {
        let base = fingerprint(&http::Method::POST, "/a?x=1", b"{}");
        for other in [
            fingerprint(&http::Method::PUT, "/a?x=1", b"{}"),
            fingerprint(&http::Method::POST, "/a?x=2", b"{}"),
            fingerprint(&http::Method::POST, "/b?x=1", b"{}"),
            fingerprint(&http::Method::POST, "/a?x=1", b"{ }"),
            fingerprint(&http::Method::POST, "/a?x=1", b""),
        ] {
            assert_ne!(base, other);
        }
        assert_eq!(base, fingerprint(&http::Method::POST, "/a?x=1", b"{}"));
    }

    fn entry(state: State) -> Entry {
        Entry {
            fingerprint: [7; 32],
            owner: 1,
            lease_until_ms: 1_000,
            state,
        }
    }

    #[test]
    fn judge_applies_the_rules_in_order() {
        let stored = Stored {
            status: 200,
            headers: vec![],
            body: Some(b"{}".to_vec()),
        };
        let cases = [
            (entry(State::InProgress), [7; 32], 999, Judged::InProgress),
            (
                entry(State::InProgress),
                [7; 32],
                1_000,
                Judged::LeasePassed,
            ),
            (entry(State::InProgress), [8; 32], 999, Judged::Mismatch),
            (entry(State::Lapsed), [7; 32], 5, Judged::Unknown),
            (entry(State::Lapsed), [8; 32], 5, Judged::Mismatch),
            (
                entry(State::Done(stored.clone())),
                [7; 32],
                5_000,
                Judged::Replay(stored.clone()),
            ),
            (entry(State::Done(stored)), [8; 32], 5, Judged::Mismatch),
        ];
        for (entry, fp, now, want) in cases {
            assert_eq!(judge(&entry, &fp, now), want, "{entry:?} at {now}");
        }
    }

    #[test]
    fn entries_round_trip_and_carry_their_expiry_first() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-request-id", HeaderValue::from_static("drop-me"));
        h.insert("x-bin", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        let e = entry(State::Done(Stored::new(
            StatusCode::CREATED,
            &h,
            Some(b"\x00body"),
        )));
        let bytes = encode(42, &e);
        assert_eq!(expiry(&bytes), 42);
        assert_eq!(decode(&bytes).unwrap(), (42, e.clone()));
        assert!(matches!(decode(&bytes[..20]), Err(StoreError::Corrupt)));

        let State::Done(stored) = e.state else {
            unreachable!()
        };
        let replay = stored.replay().unwrap();
        assert_eq!(replay.status(), StatusCode::CREATED);
        assert_eq!(replay.body().as_ref(), b"\x00body");
        assert_eq!(replay.headers()["content-type"], "application/json");
        assert_eq!(replay.headers()["x-bin"].as_bytes(), b"\xff\xfe");
        assert_eq!(replay.headers()[IDEMPOTENT_REPLAYED], "true");
        assert!(replay.headers().get("x-request-id").is_none());
    }

    #[test]
    fn an_answer_too_long_to_keep_replays_as_a_refusal_naming_its_status() {
        let stored = Stored::new(StatusCode::OK, &HeaderMap::new(), None);
        let e = stored.replay().unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(e.to_string().contains("200"), "{e}");
    }
}
