//! Delivering stored messages to subscribers until they acknowledge.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::store::{Delivery, Due, Message, Outcome};
use super::{CallbackError, Callbacks, now_ms};
use crate::net::tls::Trust;

/// The client that posts to subscribers: `http://` or `https://` (trusted
/// as `[tls]` says, HTTP/1.1 by ALPN), straight to them, never through the
/// egress proxy (they are internal; see `crate::net::egress`).
type SubscriberClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

fn subscriber_client(trust: &Trust) -> SubscriberClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(trust.client_config())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(https)
}

/// A subscriber URL's `host[:port]`, without its credentials: for messages.
fn host_of(url: &str) -> String {
    url.parse::<http::Uri>()
        .ok()
        .and_then(|u| {
            let host = u.host()?.to_owned();
            Some(match u.port_u16() {
                Some(port) => format!("{host}:{port}"),
                None => host,
            })
        })
        .unwrap_or_default()
}

/// Deliveries in flight at once.
const PARALLEL: usize = 16;
/// Most due deliveries taken from the store per look.
const BATCH: usize = 256;
/// Most messages looked at per pruning transaction.
const PRUNE_BATCH: usize = 1000;
/// Pruning runs every `retain_ms`, within these bounds.
const PRUNE_EVERY_MIN: Duration = Duration::from_secs(1);
const PRUNE_EVERY_MAX: Duration = Duration::from_secs(60);
/// Wait after the store failed before the same work is tried again.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Wait after the store failed to record an attempt's outcome, doubling
/// per try up to `RECORD_RETRY_CAP`: a database back after a blip gets the
/// outcome within half a second, long before a lease (at least 5 s) ends.
const RECORD_RETRY_FIRST: Duration = Duration::from_millis(50);
const RECORD_RETRY_CAP: Duration = Duration::from_millis(500);

/// Says how recording an outcome ended when that is news: it took more
/// than one try, or it did not apply (the delivery was no longer this
/// replica's claim).
fn log_recorded(d: &Delivery, applied: bool, failed: u32, since: Instant) {
    let (id, subscriber) = (d.id(), crate::base::redact::url(&d.subscriber));
    let (tries, waited_ms) = (failed + 1, since.elapsed().as_millis() as u64);
    match (applied, failed) {
        (true, 0) => {}
        (true, _) => tracing::info!(
            delivery_id = %id,
            %subscriber,
            tries,
            waited_ms,
            "callback delivery: outcome recorded once the store answered again"
        ),
        (false, 0) => tracing::warn!(
            delivery_id = %id,
            %subscriber,
            "callback delivery: its claim had passed to another replica; outcome not recorded"
        ),
        (false, _) => tracing::warn!(
            delivery_id = %id,
            %subscriber,
            tries,
            waited_ms,
            "callback delivery: outcome not recorded: the delivery is no longer this replica's \
             claim (an earlier try whose answer was lost recorded it, or another replica took it)"
        ),
    }
}

/// The instant `at_ms` (Unix milliseconds) falls on, by the monotonic clock.
fn instant_of(at_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(at_ms.saturating_sub(now_ms()))
}

impl Callbacks {
    /// Delivers pending messages, forever (pending deliveries left by an
    /// earlier run included), and prunes old delivered messages.
    ///
    /// Each round reads the front of the due index (at most `BATCH` due
    /// deliveries not in flight, and when the next one falls due), starts
    /// the due ones, then sleeps until that next one, the next pruning, or
    /// a wake-up: new work in the store, a replay, or a delivery task
    /// finishing (its row leaves the due set only when its task updates it,
    /// so the round that follows finds out where it went).
    ///
    /// `https://` subscribers are trusted as `trust` says.
    pub async fn run_deliveries(self: Arc<Self>, trust: Trust) {
        let client = subscriber_client(&trust);
        let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
        let slots = Arc::new(Semaphore::new(PARALLEL));
        let prune_every =
            Duration::from_millis(self.config.retain_ms).clamp(PRUNE_EVERY_MIN, PRUNE_EVERY_MAX);
        let mut next_prune = Instant::now();
        let mut prune_from = None;
        loop {
            if Instant::now() >= next_prune {
                prune_from = self.prune(prune_from).await;
                // A pruning pass that stopped at its limit goes on next round.
                next_prune = Instant::now()
                    + if prune_from.is_some() {
                        Duration::ZERO
                    } else {
                        prune_every
                    };
            }
            let skip = in_flight.lock().expect("not poisoned").clone();
            let now = now_ms();
            let attempt = Duration::from_millis(self.config.delivery_timeout_ms);
            let limit = if self.store.leases() {
                slots.available_permits()
            } else {
                BATCH
            };
            let found = if limit == 0 {
                // Every slot busy: a finishing task wakes the loop.
                Ok(Due::default())
            } else {
                self.store.due(now, limit, skip, attempt).await
            };
            let next_due = match found {
                Ok(due) => {
                    for d in due.deliveries {
                        // The list is a snapshot: by the time a slot frees
                        // up, a delivery in it may be done. Take the slot
                        // first, then claim the key, and let the task re-read
                        // the row.
                        let permit = slots.clone().acquire_owned().await.expect("never closed");
                        let key = d.key();
                        // A key still in flight here, from the shared store,
                        // is a delivery whose task is recording its outcome
                        // past the lease: claimed again, it stays this
                        // replica's (the same claim token) and that task
                        // records it. It is not posted again.
                        if !in_flight.lock().expect("not poisoned").insert(key.clone()) {
                            continue;
                        }
                        self.counts
                            .claim_lag
                            .observe(now_ms().saturating_sub(d.next_at_ms) as f64 / 1000.0);
                        let (this, client, in_flight) =
                            (self.clone(), client.clone(), in_flight.clone());
                        tokio::spawn(async move {
                            this.deliver_due(&client, d).await;
                            in_flight.lock().expect("not poisoned").remove(&key);
                            drop(permit);
                            this.wake.notify_one();
                        });
                    }
                    due.next_at_ms.map(instant_of)
                }
                Err(e) => {
                    tracing::error!(error = %e, "callback store read failed; will retry");
                    Some(Instant::now() + STORE_RETRY)
                }
            };
            let mut until = next_due.map_or(next_prune, |at| at.min(next_prune));
            if let Some(every) = self.store.poll_every() {
                until = until.min(Instant::now() + every);
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = self.store.changed() => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// One bounded pruning transaction; returns where the next should go on
    /// from (`None`: this pass is over).
    async fn prune(&self, from: Option<(u64, String)>) -> Option<(u64, String)> {
        let before = now_ms().saturating_sub(self.config.retain_ms);
        let pruned = self.store.prune(before, from, PRUNE_BATCH).await;
        match pruned {
            Ok(pruned) => {
                if pruned.removed > 0 {
                    tracing::debug!(
                        removed = pruned.removed,
                        "callback store: old messages pruned"
                    );
                }
                pruned.resume
            }
            Err(e) => {
                tracing::error!(error = %e, "callback store pruning failed; will retry");
                None
            }
        }
    }

    /// Delivers `d` if it is still pending and due. Only one task holds a
    /// delivery at a time (here: the in-flight set; across replicas: the
    /// shared store's claim), and the previous holder's store update has
    /// committed, so the row it works on is current. When the store fails
    /// before the attempt, the task waits before giving the delivery back,
    /// so a failing store is not hammered; after the attempt, the task
    /// stays until its outcome is recorded (see [`Callbacks::record`]).
    async fn deliver_due(&self, client: &SubscriberClient, d: Delivery) {
        let current = self.store.current(d).await;
        let delivered = match current {
            Ok(Some(d)) if d.next_at_ms <= now_ms() => self.deliver_one(client, d).await,
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = delivered {
            tracing::error!(error = %e, "callback store failed; the delivery will be retried");
            tokio::time::sleep(STORE_RETRY).await;
        }
    }

    /// One attempt and its store update. `Err`: the store failed before
    /// the attempt (nothing was posted).
    async fn deliver_one(
        &self,
        client: &SubscriberClient,
        d: Delivery,
    ) -> Result<(), CallbackError> {
        let message = self.store.message(d.message_id.clone()).await?;
        let trace = self.traces.as_ref().map(|t| {
            t.operation(
                "callback delivery",
                SpanKind::Client,
                vec![
                    KeyValue::new("pandagate.delivery_id", d.id()),
                    KeyValue::new("pandagate.delivery_attempt", i64::from(d.attempts + 1)),
                    KeyValue::new(
                        "server.address",
                        d.subscriber
                            .parse::<http::Uri>()
                            .ok()
                            .and_then(|u| u.host().map(str::to_owned))
                            .unwrap_or_default(),
                    ),
                ],
            )
        });
        let outcome = match &message {
            Some(message) => self.post(client, &d, message).await.map(|()| message),
            // Cannot happen (a message is pruned only with no delivery
            // pending); if it does, the delivery ages out like a failing one
            // instead of being picked up again and again.
            None => Err(CallbackError::MessageMissing),
        };
        if let Some(trace) = trace {
            if let Some(m) = &message {
                trace.note(KeyValue::new(
                    "pandapon.message_type",
                    m.message_type.clone(),
                ));
            }
            let error = outcome.as_ref().err().map(|e| match e {
                CallbackError::Status(status) => status.as_str().to_owned(),
                CallbackError::Timeout => "timeout".to_owned(),
                CallbackError::Transport(_) => "transport".to_owned(),
                CallbackError::Tls { .. } => "tls".to_owned(),
                _ => "message_missing".to_owned(),
            });
            trace.end(error.as_deref());
        }
        let outcome = self.outcome(d, outcome);
        self.record(outcome).await;
        Ok(())
    }

    /// What an attempt's result (`Ok`: the message the subscriber
    /// acknowledged) means for its delivery; counted and logged here, once
    /// per attempt.
    fn outcome(&self, mut d: Delivery, result: Result<&Message, CallbackError>) -> Outcome {
        let now = now_ms();
        match result {
            Ok(message) => {
                self.counts.delivered.fetch_add(1, Ordering::Relaxed);
                let lag_ms = now.saturating_sub(message.received_at_ms);
                self.counts.lag.observe(lag_ms as f64 / 1000.0);
                tracing::info!(
                    delivery_id = %d.id(),
                    subscriber = %crate::base::redact::url(&d.subscriber),
                    message_type = %message.message_type,
                    attempts = d.attempts + 1,
                    lag_ms,
                    "callback delivered"
                );
                Outcome::Delivered(d)
            }
            Err(error) => {
                d.attempts += 1;
                // Kept as text: operators read it in the listings.
                d.last_error = Some(error.to_string());
                if now.saturating_sub(d.first_at_ms) >= self.config.max_age_ms {
                    self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        delivery_id = %d.id(),
                        subscriber = %crate::base::redact::url(&d.subscriber),
                        attempts = d.attempts,
                        "callback delivery gave up: dead letter"
                    );
                    Outcome::Buried(d)
                } else {
                    self.counts.retried.fetch_add(1, Ordering::Relaxed);
                    let factor = 1u64 << d.attempts.saturating_sub(1).min(20);
                    let wait = self
                        .config
                        .backoff_base_ms
                        .saturating_mul(factor)
                        .min(self.config.backoff_cap_ms);
                    d.next_at_ms = now + wait;
                    Outcome::Rescheduled(d)
                }
            }
        }
    }

    /// Writes an attempt's outcome, trying again while the store fails,
    /// however long that takes (every `RECORD_RETRY_CAP` at most). The
    /// delivery stays in flight meanwhile, so this replica never starts it
    /// again, not even when it claims the row once more after its lease
    /// passed; and the shared store applies the update as long as the row
    /// is this replica's claim, whatever the lease says. So a delivery the
    /// subscriber acknowledged is posted again only if another replica took
    /// it first (see `postgres::TAKEOVER_GRACE`), or this process ends
    /// before the outcome is written.
    async fn record(&self, outcome: Outcome) {
        let mut wait = RECORD_RETRY_FIRST;
        let mut failed = 0u32;
        let since = Instant::now();
        loop {
            match self.store.record(outcome.clone()).await {
                Ok(applied) => {
                    log_recorded(outcome.delivery(), applied, failed, since);
                    return;
                }
                Err(e) => {
                    failed += 1;
                    // Logged at the 1st, 2nd, 4th, 8th... failure: a store
                    // down for long is seen without a line per try.
                    if failed.is_power_of_two() {
                        tracing::error!(
                            error = %e,
                            delivery_id = %outcome.delivery().id(),
                            tries = failed,
                            "callback store failed to record a delivery's outcome; trying again until it does"
                        );
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RECORD_RETRY_CAP);
                }
            }
        }
    }

    async fn post(
        &self,
        client: &SubscriberClient,
        d: &Delivery,
        m: &Message,
    ) -> Result<(), CallbackError> {
        // The provider's messageBody is JSON in a string: subscribers get it decoded.
        let body = serde_json::from_str::<serde_json::Value>(&m.message_body)
            .unwrap_or_else(|_| serde_json::Value::String(m.message_body.clone()));
        let payload = serde_json::json!({
            "messageType": m.message_type,
            "messageBody": body,
            "messagePlatform": m.message_platform,
            "timestamp": m.timestamp,
        });
        let req = Request::post(&d.subscriber)
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-pandagate-delivery-id", d.id())
            .body(Full::new(Bytes::from(payload.to_string())))?;
        let timeout = Duration::from_millis(self.config.delivery_timeout_ms);
        match tokio::time::timeout(timeout, client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(CallbackError::Status(resp.status())),
            Ok(Err(e)) => match crate::net::tls::failure(&e) {
                Some(reason) => {
                    let host = host_of(&d.subscriber);
                    self.tls_failures.tell("a subscriber", &host, reason);
                    Err(CallbackError::Tls { host, reason })
                }
                None => Err(CallbackError::Transport(e)),
            },
            Err(_) => Err(CallbackError::Timeout),
        }
    }
}
