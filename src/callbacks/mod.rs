//! Pushed messages: receive the provider's callbacks, verify them, store
//! them durably, acknowledge, and deliver them to internal subscribers.
//!
//! A push is acknowledged (HTTP 200) only after it is in the store (fsync'd);
//! the same body pushed again within `retain_ms` is stored once. Each stored message goes to
//! every matching subscriber as a JSON POST with a stable
//! `x-pandagate-delivery-id`, retried with backoff until the subscriber
//! answers 2xx or `max_age_ms` passes (then it is a dead letter, which an
//! operator can replay). Pending deliveries survive restarts.

mod backend;
mod deliver;
pub mod postgres;
pub mod store;

use crate::base::families::{self, Described, DescriptorEncoder};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{KeyInit, Mac};
use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::base::body_budget::{BodyBudget, ConnectionBodies, Held, Reader};
use crate::base::error::{GatewayError, envelope_response};
use crate::base::ids;
use crate::base::secret::Secret;
use crate::config::{CallbacksConfig, ConfigError, SubscriberConfig};
use crate::net::body::{self, BodyLimits, ResponseBody, UpstreamBody};
use crate::net::tls::FailureLog;
use crate::observe::traces::{Operation, Traces};
use crate::policy::profiles::Profiles;
pub use backend::Backend;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use postgres::PgError;
pub use store::{Cursor, NotACursor};
use store::{Delivery, Message, Store, StoreError};

/// Why a callback operation failed: the store, the thread a store call ran
/// on, or (kept as the delivery's `last_error`) one delivery attempt.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// A store call on a blocking thread panicked or was cancelled.
    #[error("a store task did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The message a pending delivery is for is not in the store.
    #[error("message missing from the store")]
    MessageMissing,
    /// The request to the subscriber could not be built.
    #[error("{0}")]
    Request(#[from] http::Error),
    /// The subscriber answered, but not with 2xx.
    #[error("HTTP {}", .0.as_u16())]
    Status(StatusCode),
    /// The subscriber could not be reached, or the exchange broke off.
    #[error("{0}")]
    Transport(#[from] hyper_util::client::legacy::Error),
    /// The TLS handshake with the subscriber failed: nothing was posted.
    #[error("TLS with {host} failed: {reason}")]
    Tls {
        host: String,
        reason: crate::base::error::TlsReason,
    },
    /// The subscriber did not answer within `delivery_timeout_ms`.
    #[error("timed out")]
    Timeout,
}

fn bad_signature() -> Refusal {
    Refusal::rejected(
        StatusCode::UNAUTHORIZED,
        "bad_signature",
        "missing or invalid Authorization signature",
    )
}

/// Whether subscriber `s` takes message `m`.
fn wants(s: &SubscriberConfig, m: &Message) -> bool {
    let platform = match &m.message_platform {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    };
    s.message_types
        .as_ref()
        .is_none_or(|types| types.contains(&m.message_type))
        && s.platforms
            .as_ref()
            .is_none_or(|ps| platform.is_some_and(|p| ps.iter().any(|q| u64::from(*q) == p)))
}

/// Counters for `/metrics`.
#[derive(Debug)]
pub struct CallbackCounts {
    /// Seconds from a push's acknowledgement to its delivery.
    pub lag: prometheus_client::metrics::histogram::Histogram,
    /// Seconds from a delivery falling due to its being taken up (claimed,
    /// with the shared store).
    pub claim_lag: prometheus_client::metrics::histogram::Histogram,
    pub received: AtomicU64,
    pub rejected: AtomicU64,
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
}

impl Default for CallbackCounts {
    fn default() -> Self {
        Self {
            lag: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.01, 2.0, 20),
            ),
            claim_lag: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 20),
            ),
            received: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
        }
    }
}

impl CallbackCounts {
    /// The two lag histograms, kept by the registry.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "callbacks_delivery_lag_seconds",
            "Time from a push's acknowledgement to its delivery",
            self.lag.clone(),
        );
        registry.register(
            "callbacks_claim_lag_seconds",
            "Time from a delivery falling due to its being taken up by a delivery loop",
            self.claim_lag.clone(),
        );
    }

    /// The counters, read at scrape time.
    pub fn describe(&self, e: &mut DescriptorEncoder) -> Described {
        for (name, help, v) in [
            ("callbacks_received", "Pushes received.", &self.received),
            (
                "callbacks_rejected",
                "Pushes refused (signature, size, format).",
                &self.rejected,
            ),
            (
                "callbacks_stored",
                "Pushes stored and acknowledged.",
                &self.stored,
            ),
            (
                "callbacks_duplicates",
                "Pushes acknowledged that were already stored.",
                &self.duplicates,
            ),
            (
                "callbacks_delivered",
                "Deliveries a subscriber acknowledged.",
                &self.delivered,
            ),
            (
                "callbacks_retried",
                "Delivery attempts that failed and will be retried.",
                &self.retried,
            ),
            (
                "callbacks_dead_lettered",
                "Deliveries given up after max_age_ms.",
                &self.dead_lettered,
            ),
        ] {
            families::counter(e, name, help, v.load(Ordering::Relaxed))?;
        }
        Ok(())
    }
}

/// One delivery as operators see it (`GET /callbacks` on the admin listener).
#[derive(Debug, Serialize)]
pub struct DeliveryView {
    pub delivery_id: String,
    pub key: String,
    pub message_id: String,
    pub subscriber: String,
    pub attempts: u32,
    pub first_at_ms: u64,
    pub next_at_ms: u64,
    pub last_error: Option<String>,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        DeliveryView {
            delivery_id: d.id(),
            key: d.key(),
            message_id: d.message_id,
            subscriber: d.subscriber,
            attempts: d.attempts,
            first_at_ms: d.first_at_ms,
            next_at_ms: d.next_at_ms,
            last_error: d.last_error,
        }
    }
}

/// One page of `GET /callbacks`: the deliveries, and the `after` that
/// gives the next page (`None`: this is the last).
#[derive(Debug, Serialize)]
pub struct PageView {
    pub deliveries: Vec<DeliveryView>,
    pub next: Option<String>,
}

/// Deliveries per page of a listing when the caller gives no `limit`.
pub const LIST_LIMIT_DEFAULT: usize = 100;
/// Most deliveries per page of a listing.
pub const LIST_LIMIT_MAX: usize = 1000;

/// Where the secret that verifies pushes comes from. It is asked on every
/// push, so that a config reload or a rotated secret file takes effect at
/// the next push; `None`: the profile is gone (the push is not accepted).
pub type SecretSource = Arc<dyn Fn() -> Option<Arc<Secret>> + Send + Sync>;

/// Why a push was not acknowledged, as the provider is answered.
struct Refusal {
    status: StatusCode,
    /// The envelope's `error` kind.
    error: &'static str,
    msg: &'static str,
    /// Counted in `callbacks_rejected` and logged: the push itself was at
    /// fault (as opposed to the gateway being unable to take it).
    rejected: bool,
    /// A refusal the gateway answers as it does for calls (with the
    /// headers that go with it, such as `Retry-After`).
    gateway: Option<GatewayError>,
}

impl Refusal {
    fn rejected(status: StatusCode, error: &'static str, msg: &'static str) -> Refusal {
        Refusal {
            status,
            error,
            msg,
            rejected: true,
            gateway: None,
        }
    }

    /// The gateway cannot take the push now (not counted as rejected).
    fn gateway(e: GatewayError) -> Refusal {
        Refusal {
            status: e.status(),
            error: e.kind(),
            msg: e.kind(),
            rejected: false,
            gateway: Some(e),
        }
    }

    fn not_counted(status: StatusCode, error: &'static str, msg: &'static str) -> Refusal {
        Refusal {
            rejected: false,
            ..Refusal::rejected(status, error, msg)
        }
    }
}

/// The receiver and its deliveries.
pub struct Callbacks {
    config: CallbacksConfig,
    secret: SecretSource,
    body_read_timeout: Duration,
    /// The process's budget for bodies being read, shared with the gateway.
    bodies: Arc<BodyBudget>,
    store: Backend,
    wake: Notify,
    /// Spans of each push received and each delivery, when traces are on.
    traces: Option<Arc<Traces>>,
    /// TLS failures with subscribers already told.
    tls_failures: FailureLog,
    pub counts: CallbackCounts,
}

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callbacks")
            .field("config", &self.config)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn no_profile(name: &str) -> ConfigError {
    ConfigError::new(
        "callbacks.profile",
        format_args!("no profile named {name:?}"),
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// A pushed message's envelope.
#[derive(Debug, Deserialize)]
pub struct Push {
    #[serde(rename = "messageType")]
    pub message_type: String,
    #[serde(rename = "messageBody")]
    pub message_body: String,
    #[serde(rename = "messagePlatform")]
    pub message_platform: serde_json::Value,
    pub timestamp: serde_json::Value,
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushRejected {
    /// No `Authorization`, or not the body's signature.
    BadSignature,
    /// Signed, but not a message envelope.
    NotEnvelope,
}

/// Checks one push: `Authorization` = hex HMAC-SHA256(key = Access secret,
/// raw body), either case, compared in constant time; then reads the
/// envelope. Nothing unsigned is ever parsed.
pub fn verify_push(
    secret: &Secret,
    authorization: Option<&header::HeaderValue>,
    body: &[u8],
) -> Result<Push, PushRejected> {
    let signature = signature_of(authorization)?;
    let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(secret.expose().as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(body);
    mac.verify_slice(&signature)
        .map_err(|_| PushRejected::BadSignature)?;
    serde_json::from_slice(body).map_err(|_| PushRejected::NotEnvelope)
}

/// Length of an HMAC-SHA256, in bytes.
const SIGNATURE_BYTES: usize = 32;

/// The signature an `Authorization` header carries: hex of exactly an
/// HMAC-SHA256. Anything else cannot verify, whatever the body.
fn signature_of(
    authorization: Option<&header::HeaderValue>,
) -> Result<[u8; SIGNATURE_BYTES], PushRejected> {
    let mut signature = [0u8; SIGNATURE_BYTES];
    let hex = authorization
        .and_then(|v| v.to_str().ok())
        .ok_or(PushRejected::BadSignature)?;
    hex::decode_to_slice(hex.trim(), &mut signature).map_err(|_| PushRejected::BadSignature)?;
    Ok(signature)
}

impl Callbacks {
    /// Opens the store; the verifying secret is that of `config.profile` in
    /// `profiles` (following its rotation, not a reload: see
    /// [`Callbacks::with_secret_source`]), bodies must arrive within 30 s,
    /// within a body budget of its own of the default size.
    pub fn new(
        config: CallbacksConfig,
        profiles: &Profiles,
    ) -> Result<Arc<Callbacks>, ConfigError> {
        let cell = profiles
            .get(&config.profile)
            .map(|p| p.secret.clone())
            .ok_or_else(|| no_profile(&config.profile))?;
        let source: SecretSource = Arc::new(move || Some(Arc::clone(&cell.current())));
        let defaults = crate::config::ServerConfig::default();
        let timeout = Duration::from_millis(defaults.body_read_timeout_ms);
        let bodies = BodyBudget::new(defaults.max_buffered_body_bytes);
        let store = Backend::open_local(&config)?;
        Self::with_secret_source(config, source, timeout, bodies, store, None)
    }

    /// A receiver on `store` (see [`Backend::open`]); pushes are verified
    /// with whatever `secret` gives at the time, and their bodies must
    /// arrive within `body_read_timeout` and fit in `bodies` (the process's
    /// body budget).
    pub fn with_secret_source(
        config: CallbacksConfig,
        secret: SecretSource,
        body_read_timeout: Duration,
        bodies: Arc<BodyBudget>,
        store: Backend,
        traces: Option<Arc<Traces>>,
    ) -> Result<Arc<Callbacks>, ConfigError> {
        if secret().is_none() {
            return Err(no_profile(&config.profile));
        }
        Ok(Arc::new(Callbacks {
            secret,
            body_read_timeout,
            bodies,
            store,
            wake: Notify::new(),
            traces,
            tls_failures: FailureLog::default(),
            counts: CallbackCounts::default(),
            config,
        }))
    }

    pub fn path(&self) -> &str {
        &self.config.path
    }

    /// The profile whose secret verifies pushes.
    pub fn profile(&self) -> &str {
        &self.config.profile
    }

    pub fn store(&self) -> &Backend {
        &self.store
    }

    /// The local store, when that is the backend.
    pub fn local_store(&self) -> Option<&Store> {
        self.store.local()
    }

    /// A page of the pending (or, with `dead`, dead-lettered) deliveries:
    /// up to `limit` (at most [`LIST_LIMIT_MAX`]), oldest first, after
    /// `after` (the `next` of the page before).
    pub async fn list(
        &self,
        dead: bool,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<PageView, CallbackError> {
        let page = self
            .store
            .page(dead, after, limit.clamp(1, LIST_LIMIT_MAX))
            .await?;
        Ok(PageView {
            deliveries: page
                .deliveries
                .into_iter()
                .map(DeliveryView::from)
                .collect(),
            next: page.next.map(|c| c.to_string()),
        })
    }

    /// Puts dead letters back in line: the one whose key or delivery id is
    /// `id` (found by key or index, not by reading the others), or all of
    /// them (in bounded batches). Returns how many.
    pub async fn replay(&self, id: Option<String>) -> Result<usize, CallbackError> {
        let moved = match id {
            Some(id) => self.store.replay_one(id, now_ms()).await?,
            None => self.store.replay_all(now_ms()).await?,
        };
        if moved > 0 {
            tracing::info!(replayed = moved, "dead letters put back in line");
            self.wake.notify_one();
        }
        Ok(moved)
    }

    /// Answers one push: 200 once it is stored, else the gateway's
    /// envelope saying why not.
    pub async fn receive(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let trace = self.traces.as_ref().map(|t| {
            t.operation(
                "callback receive",
                SpanKind::Server,
                vec![
                    KeyValue::new("http.request.method", req.method().as_str().to_owned()),
                    KeyValue::new("url.path", req.uri().path().to_owned()),
                ],
            )
        });
        let accepted = self.accept(req, trace.as_ref()).await;
        if let Some(trace) = trace {
            let status = accepted
                .as_ref()
                .map_or_else(|r| r.status.as_u16(), |_| 200);
            trace.note(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            trace.end(accepted.as_ref().err().map(|r| r.error));
        }
        match accepted {
            Ok(()) => {
                let mut r = Response::new(ResponseBody::local(Bytes::from_static(
                    br#"{"code":200,"msg":"success"}"#,
                )));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(refusal) => {
                if refusal.rejected {
                    self.counts.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        status = refusal.status.as_u16(),
                        reason = refusal.msg,
                        "callback rejected"
                    );
                }
                let id = ids::request_id();
                let response = match &refusal.gateway {
                    Some(e) => e.to_response(&id),
                    None => envelope_response(refusal.status, &id, refusal.error, refusal.msg),
                };
                response.map(ResponseBody::local)
            }
        }
    }

    /// Reads, verifies and stores one push.
    async fn accept(
        &self,
        req: Request<Incoming>,
        trace: Option<&Operation>,
    ) -> Result<(), Refusal> {
        if req.method() != Method::POST {
            return Err(Refusal::not_counted(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "pushes are POSTed",
            ));
        }
        self.counts.received.fetch_add(1, Ordering::Relaxed);
        let (parts, body) = req.into_parts();
        // What cannot verify is refused before a byte of its body is read.
        signature_of(parts.headers.get(header::AUTHORIZATION)).map_err(|_| bad_signature())?;
        let connection = parts.extensions.get::<Arc<ConnectionBodies>>().cloned();
        let (body, _held) = self.read_body(body, connection).await?;
        let Some(secret) = (self.secret)() else {
            // Not acknowledged: once the profile is back, the provider's
            // next try is verified.
            tracing::error!(profile = %self.config.profile, "the profile verifying pushes is not in the running config");
            return Err(Refusal::not_counted(
                StatusCode::SERVICE_UNAVAILABLE,
                "verification_unavailable",
                "push verification unavailable",
            ));
        };
        let push = verify_push(&secret, parts.headers.get(header::AUTHORIZATION), &body).map_err(
            |rejected| match rejected {
                PushRejected::BadSignature => bad_signature(),
                PushRejected::NotEnvelope => Refusal::rejected(
                    StatusCode::BAD_REQUEST,
                    "not_envelope",
                    "push is not a message envelope",
                ),
            },
        )?;
        if let Some(trace) = trace {
            trace.note(KeyValue::new(
                "pandapon.message_type",
                push.message_type.clone(),
            ));
        }
        let store_span = trace
            .zip(self.traces.as_deref())
            .map(|(t, traces)| t.child(traces, "callback store"));
        let stored = self.store_push(&body, push).await;
        if let Some(span) = store_span {
            span.end(stored.as_ref().err().map(|_| "store_unavailable"));
        }
        let stored = stored.map_err(|e| {
            // Not acknowledged: the provider pushes it again later.
            tracing::error!(error = %e, "callback store failed; push not acknowledged");
            Refusal::not_counted(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "message store unavailable",
            )
        })?;
        if let Some(trace) = trace {
            let result = if stored { "stored" } else { "duplicate" };
            trace.note(KeyValue::new("pandagate.callback_result", result));
        }
        let counter = if stored {
            &self.counts.stored
        } else {
            &self.counts.duplicates
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
        Ok(())
    }

    /// The push's body, whole, with its hold on the body budget: within
    /// `max_body_bytes`, the body deadline and the budget, and the only
    /// push read on its `connection` at the time.
    async fn read_body(
        &self,
        body: Incoming,
        connection: Option<Arc<ConnectionBodies>>,
    ) -> Result<(Bytes, Held), Refusal> {
        // One push body at a time per connection: HTTP/2 streams cannot
        // make one connection read a hundred.
        let _turn = match &connection {
            None => None,
            Some(c) => match c.push_turn() {
                Some(turn) => Some(turn),
                None => {
                    self.bodies.count_refusal(Reader::Push);
                    return Err(Refusal::gateway(GatewayError::Overloaded));
                }
            },
        };
        let max = self.config.max_body_bytes as u64;
        let limits = BodyLimits {
            buffer: max,
            max,
            deadline: tokio::time::Instant::now() + self.body_read_timeout,
            timeout_ms: self.body_read_timeout.as_millis() as u64,
        };
        let declared = http_body::Body::size_hint(&body).exact();
        let held = self.bodies.hold(Reader::Push, connection);
        match body::read_request(body, declared, limits, held).await {
            Ok((UpstreamBody::Full(bytes), held)) => Ok((bytes.unwrap_or_default(), held)),
            // Read whole up to the maximum: a body streams only past it.
            Ok((UpstreamBody::Stream(_), _)) | Err(GatewayError::BodyTooLarge { .. }) => {
                Err(Refusal::rejected(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    "push body too large",
                ))
            }
            Err(GatewayError::BodyTimeout(_)) => Err(Refusal::rejected(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "push body not received within server.body_read_timeout_ms",
            )),
            Err(GatewayError::Overloaded) => Err(Refusal::gateway(GatewayError::Overloaded)),
            Err(_) => Err(Refusal::rejected(
                StatusCode::BAD_REQUEST,
                "body_read",
                "push body could not be read",
            )),
        }
    }

    async fn store_push(&self, body: &[u8], push: Push) -> Result<bool, CallbackError> {
        let id = hex::encode(Sha256::digest(body));
        let now = now_ms();
        let message = Message {
            received_at_ms: now,
            message_type: push.message_type,
            message_body: push.message_body,
            message_platform: push.message_platform,
            timestamp: push.timestamp,
        };
        let deliveries: Vec<Delivery> = self
            .config
            .subscribers
            .iter()
            .filter(|s| wants(s, &message))
            .map(|s| Delivery {
                message_id: id.clone(),
                subscriber: s.url.clone(),
                attempts: 0,
                first_at_ms: now,
                next_at_ms: now,
                last_error: None,
            })
            .collect();
        self.store.insert(id, message, deliveries).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed attempt's text is stored as the delivery's `last_error`:
    /// operators and their tools read it, so it stays as it was.
    #[test]
    fn delivery_failures_read_as_before_in_last_error() {
        assert_eq!(
            CallbackError::Status(StatusCode::SERVICE_UNAVAILABLE).to_string(),
            "HTTP 503"
        );
        assert_eq!(CallbackError::Timeout.to_string(), "timed out");
        assert_eq!(
            CallbackError::MessageMissing.to_string(),
            "message missing from the store"
        );
    }
}
