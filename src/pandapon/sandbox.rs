//! A stand-in for the PandaPon OpenAPI, for the demo, tests and local
//! development (`pandagate sandbox --listen ADDR`).
//!
//! It checks what the provider's manual says the provider checks:
//! the AccessKey, the timestamp within 600 s of its clock, a 32-character
//! nonce never seen before within that window, and the signature. It answers
//! in the provider's envelope with a fresh `requestId`; a failed check is a
//! business error (HTTP 200, `code` 401 and a `msg` naming the check), the
//! way the provider is believed to report them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::base::ids;
use crate::base::secret::Secret;
use crate::pandapon::headers;
use crate::pandapon::signer::{self, Recipe, TimestampUnit};

pub const DEMO_ACCESS_KEY: &str = "demo-access-key";
pub const DEMO_SECRET: &str = "demo-secret";
pub const DEMO_USER_ID: &str = "2100007341207";
const DEVELOP_ID: &str = "1014533973088404335";
/// The provider's allowed clock difference.
pub const WINDOW: Duration = Duration::from_secs(600);

#[derive(Debug)]
pub struct Sandbox {
    access_key: String,
    secret: Secret,
    recipe: Recipe,
    unit: TimestampUnit,
    seen_nonces: Mutex<HashMap<String, SystemTime>>,
}

/// Why the sandbox refused a call, as its `msg` says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("missing header {0}")]
    Missing(http::HeaderName),
    #[error("unknown access-key")]
    AccessKey,
    #[error("timestamp is not a number")]
    TimestampNotANumber,
    #[error("timestamp outside the 600 s window")]
    TimestampOutsideWindow,
    #[error("nonce-str must be 32 letters or digits")]
    NonceShape,
    #[error("signature mismatch")]
    Signature,
    #[error("nonce-str reused")]
    NonceReused,
}

impl Sandbox {
    pub fn new(access_key: &str, secret: Secret, recipe: Recipe, unit: TimestampUnit) -> Sandbox {
        Sandbox {
            access_key: access_key.to_owned(),
            secret,
            recipe,
            unit,
            seen_nonces: Mutex::new(HashMap::new()),
        }
    }

    /// The sandbox with the demo credentials and the default recipe.
    pub fn demo() -> Sandbox {
        Sandbox::new(
            DEMO_ACCESS_KEY,
            Secret::new(DEMO_SECRET),
            Recipe::default(),
            TimestampUnit::default(),
        )
    }

    /// Checks the system headers of one request received at `now`.
    pub fn verify(&self, h: &HeaderMap, now: SystemTime) -> Result<(), Refused> {
        let get = |name: &http::HeaderName| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| Refused::Missing(name.clone()))
        };
        let access_key = get(&headers::ACCESS_KEY)?;
        let timestamp = get(&headers::TIMESTAMP)?;
        let nonce = get(&headers::NONCE_STR)?;
        let signature = get(&headers::SIGNATURE)?;
        if access_key != self.access_key {
            return Err(Refused::AccessKey);
        }
        let stamp: u64 = timestamp
            .parse()
            .map_err(|_| Refused::TimestampNotANumber)?;
        let now_stamp = self.unit.stamp(now);
        let window = match self.unit {
            TimestampUnit::Ms => WINDOW.as_millis() as u64,
            TimestampUnit::S => WINDOW.as_secs(),
        };
        if stamp.abs_diff(now_stamp) > window {
            return Err(Refused::TimestampOutsideWindow);
        }
        if nonce.len() != 32 || !nonce.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(Refused::NonceShape);
        }
        let expected = signer::sign(
            self.recipe,
            access_key,
            timestamp,
            nonce,
            self.secret.expose(),
        );
        if signature.as_bytes() != expected {
            return Err(Refused::Signature);
        }
        let mut seen = self.seen_nonces.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 100_000 {
            seen.retain(|_, at| now.duration_since(*at).unwrap_or_default() <= WINDOW);
        }
        if seen.insert(nonce.to_owned(), now).is_some() {
            return Err(Refused::NonceReused);
        }
        Ok(())
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let checked = self.verify(req.headers(), SystemTime::now());
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let body = Limited::new(req.into_body(), 16 * 1024 * 1024)
            .collect()
            .await;
        let body = body.map(|b| b.to_bytes()).unwrap_or_default();
        let (code, msg, data) = match checked {
            Ok(()) => (200, "成功".to_string(), answer(&path, &query, &body)),
            Err(reason) => (401, reason.to_string(), Value::Null),
        };
        let envelope = json!({
            "requestId": ids::request_id(),
            "code": code,
            "developId": DEVELOP_ID,
            "msg": msg,
            "data": data,
        });
        let mut response = Response::new(Full::new(Bytes::from(envelope.to_string())));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// Plausible data for the calls the demo makes; an echo otherwise.
fn answer(path: &str, query: &str, body: &[u8]) -> Value {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if path.ends_with("/product/get") || path.ends_with("/product/detail/get") {
        json!({"query": query, "title": "Demo ceramic mug, 350 ml", "price": "19.90", "currency": "CNY", "stock": 120})
    } else if path.contains("/keywords/query") {
        json!({"request": request, "total": 2, "items": [
            {"offerId": 610947572360u64, "subject": "Demo mug", "price": "6.50"},
            {"offerId": 610947572361u64, "subject": "Demo mug, gift box", "price": "8.20"}]})
    } else if path.contains("/order/create") || path == "/open/order" {
        json!({"orderId": ids::request_id(), "status": "WAIT_BUYER_PAY", "request": request})
    } else {
        json!({"path": path, "query": query, "request": request})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn signed(ts: &str, nonce: &str, secret: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let sig = signer::sign(Recipe::Concat, DEMO_ACCESS_KEY, ts, nonce, secret);
        h.insert(
            headers::ACCESS_KEY,
            HeaderValue::from_static(DEMO_ACCESS_KEY),
        );
        h.insert(headers::TIMESTAMP, HeaderValue::from_str(ts).unwrap());
        h.insert(headers::NONCE_STR, HeaderValue::from_str(nonce).unwrap());
        h.insert(headers::SIGNATURE, HeaderValue::from_bytes(&sig).unwrap());
        h
    }

    const N1: &str = "0123456789abcdefghijABCDEFGHIJ01";
    const N2: &str = "0123456789abcdefghijABCDEFGHIJ02";

    #[test]
    fn accepts_a_good_call_once_and_rejects_the_replay() {
        let s = Sandbox::demo();
        let now = SystemTime::now();
        let ts = TimestampUnit::Ms.stamp(now).to_string();
        assert_eq!(s.verify(&signed(&ts, N1, DEMO_SECRET), now), Ok(()));
        assert_eq!(
            s.verify(&signed(&ts, N1, DEMO_SECRET), now),
            Err(Refused::NonceReused)
        );
    }

    #[test]
    fn rejects_wrong_secret_stale_timestamp_and_short_nonce() {
        let s = Sandbox::demo();
        let now = SystemTime::now();
        let ts = TimestampUnit::Ms.stamp(now).to_string();
        assert_eq!(
            s.verify(&signed(&ts, N1, "wrong"), now),
            Err(Refused::Signature)
        );
        let stale = TimestampUnit::Ms
            .stamp(now - Duration::from_secs(601))
            .to_string();
        assert!(
            s.verify(&signed(&stale, N2, DEMO_SECRET), now)
                .unwrap_err()
                .to_string()
                .contains("window")
        );
        assert!(
            s.verify(&signed(&ts, "short", DEMO_SECRET), now)
                .unwrap_err()
                .to_string()
                .contains("32")
        );
        assert!(
            s.verify(&HeaderMap::new(), now)
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
    }
}
