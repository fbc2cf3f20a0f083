//! Delivering stored messages to subscribers until they acknowledge.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::store::{Delivery, Message};
use super::{Callbacks, now_ms};

/// Deliveries in flight at once.
const PARALLEL: usize = 16;
/// How often due deliveries are looked for when nothing wakes the loop.
const TICK: Duration = Duration::from_millis(200);

/// Stable per (message, subscriber): receivers deduplicate on it.
pub fn delivery_id(d: &Delivery) -> String {
    hex::encode(&Sha256::digest(d.key().as_bytes())[..16])
}

impl Callbacks {
    /// Delivers pending messages, forever (pending deliveries left by an
    /// earlier run included).
    pub async fn run_deliveries(self: Arc<Self>) {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
        let slots = Arc::new(Semaphore::new(PARALLEL));
        loop {
            let store = self.store.clone();
            let pending = tokio::task::spawn_blocking(move || store.pending())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let now = now_ms();
            for d in pending.into_iter().filter(|d| d.next_at_ms <= now) {
                // The list is a snapshot: by the time a slot frees up, a copy
                // in it may already be delivered. Take the slot first, then
                // claim the key, and let the task re-read the row.
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                let key = d.key();
                if !in_flight.lock().expect("not poisoned").insert(key.clone()) {
                    continue;
                }
                let (this, client, in_flight) = (self.clone(), client.clone(), in_flight.clone());
                tokio::spawn(async move {
                    this.deliver_due(&client, &key).await;
                    in_flight.lock().expect("not poisoned").remove(&key);
                    drop(permit);
                });
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Delivers `key` if it is still pending and due. Only one task holds a
    /// key at a time, and the previous holder's store update has committed,
    /// so the row read here is current.
    async fn deliver_due(&self, client: &Client<HttpConnector, Full<Bytes>>, key: &str) {
        let store = self.store.clone();
        let owned = key.to_owned();
        let current = tokio::task::spawn_blocking(move || store.pending_one(&owned)).await;
        match current {
            Ok(Ok(Some(d))) if d.next_at_ms <= now_ms() => self.deliver_one(client, d).await,
            Ok(Err(e)) => tracing::error!(error = %e, "callback store read failed; will retry"),
            _ => {}
        }
    }

    async fn deliver_one(&self, client: &Client<HttpConnector, Full<Bytes>>, mut d: Delivery) {
        let store = self.store.clone();
        let id = d.message_id.clone();
        let message = match tokio::task::spawn_blocking(move || store.message(&id)).await {
            Ok(Ok(Some(m))) => m,
            _ => return,
        };
        let outcome = self.post(client, &d, &message).await;
        let store = self.store.clone();
        let now = now_ms();
        let result = match outcome {
            Ok(()) => {
                self.counts.delivered.fetch_add(1, Ordering::Relaxed);
                let lag_ms = now.saturating_sub(message.received_at_ms);
                self.counts.lag.observe(lag_ms as f64 / 1000.0);
                tracing::info!(
                    delivery_id = %delivery_id(&d),
                    subscriber = %crate::redact::url(&d.subscriber),
                    message_type = %message.message_type,
                    attempts = d.attempts + 1,
                    lag_ms,
                    "callback delivered"
                );
                tokio::task::spawn_blocking(move || store.delivered(&d)).await
            }
            Err(error) => {
                d.attempts += 1;
                d.last_error = Some(error);
                if now.saturating_sub(d.first_at_ms) >= self.config.max_age_ms {
                    self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        delivery_id = %delivery_id(&d),
                        subscriber = %crate::redact::url(&d.subscriber),
                        attempts = d.attempts,
                        "callback delivery gave up: dead letter"
                    );
                    tokio::task::spawn_blocking(move || store.bury(&d)).await
                } else {
                    self.counts.retried.fetch_add(1, Ordering::Relaxed);
                    let factor = 1u64 << d.attempts.saturating_sub(1).min(20);
                    let wait = self
                        .config
                        .backoff_base_ms
                        .saturating_mul(factor)
                        .min(self.config.backoff_cap_ms);
                    d.next_at_ms = now + wait;
                    tokio::task::spawn_blocking(move || store.reschedule(&d)).await
                }
            }
        };
        if let Ok(Err(e)) = result {
            tracing::error!(error = %e, "callback store update failed; the delivery will be retried");
        }
    }

    async fn post(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
        d: &Delivery,
        m: &Message,
    ) -> Result<(), String> {
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
            .header("x-pandagate-delivery-id", delivery_id(d))
            .body(Full::new(Bytes::from(payload.to_string())))
            .map_err(|e| e.to_string())?;
        let timeout = Duration::from_millis(self.config.delivery_timeout_ms);
        match tokio::time::timeout(timeout, client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(format!("HTTP {}", resp.status().as_u16())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }
}
