//! Keyed: a call with an idempotency key — replayed from the store when the
//! key was used before; otherwise reserved, sent, and its answer kept, or
//! the key released when nothing reached the provider.

use std::time::Duration;

use http::Response;
use tokio::time::Instant;

use super::prepare::Prepared;
use super::{Answer, Gateway};
use crate::base::error::GatewayError;
use crate::net::body::{ResponseBody, UpstreamBody};
use crate::observe::access_log::AccessRecord;
use crate::state::idempotency::{self, Begun, Idempotency, Key, Logged, Stored};

impl Gateway {
    /// A call with an idempotency key: answered from the store when the key
    /// was used before; otherwise reserved, sent, and its answer kept, or
    /// the key released when nothing reached the provider. Replays and
    /// refusals come before the breaker and the limiter: they spend no
    /// quota and need no provider.
    pub(super) async fn keyed(
        &self,
        idempotency: &Idempotency,
        call: &Prepared<'_>,
        key: Key,
        body: UpstreamBody,
        gateway_id: &str,
        record: &mut AccessRecord,
    ) -> Answer {
        record.idempotency_key = Some(key.shown);
        let UpstreamBody::Full(bytes) = &body else {
            return Err(GatewayError::KeyedBodyTooLarge {
                limit: self.buffer_body,
            });
        };
        let target = call.uri.path_and_query().map_or("/", |p| p.as_str());
        let fingerprint =
            idempotency::fingerprint(&call.method, target, bytes.as_deref().unwrap_or_default());
        let deadline = Duration::from_millis(self.retry.deadline_ms);
        let reservation = match idempotency.begin(&key, fingerprint, deadline).await {
            Begun::Reserved(reservation) => reservation,
            Begun::Answered(logged, answer) => {
                record.idempotency = Some(logged);
                return answer.map(|r| r.map(ResponseBody::local));
            }
        };
        record.idempotency = Some(Logged::New);
        let until = Instant::now() + deadline;
        let mut reached = false;
        let answer = self.attempts(call, body, record, &mut reached).await;
        if !reached {
            idempotency.release(reservation).await;
            record.idempotency = Some(Logged::Released);
            return answer;
        }
        let max = idempotency.config().max_response_bytes;
        let (answer, stored) = match answer {
            Ok(response) => keep(response, max, until, gateway_id).await,
            Err(e) => {
                let stored = Stored::of_error(&e, gateway_id);
                (Err(e), stored)
            }
        };
        idempotency.finish(reservation, stored).await;
        answer
    }
}

/// Reads the provider's answer to keep it for replays, by `until`: whole
/// when it ends within `max` bytes; otherwise its status and headers only,
/// while the caller still gets all of it. An answer whose body fails or
/// does not end in time becomes the gateway's own (502 or 504), kept so.
async fn keep(
    response: Response<ResponseBody>,
    max: usize,
    until: Instant,
    gateway_id: &str,
) -> (Answer, Stored) {
    let (parts, body) = response.into_parts();
    let started = Instant::now();
    let read = tokio::time::timeout_at(until, body.read_within(max)).await;
    let failed = |e: GatewayError| {
        let stored = Stored::of_error(&e, gateway_id);
        (Err(e), stored)
    };
    match read {
        Ok(Ok(Ok(whole))) => {
            let stored = Stored::new(parts.status, &parts.headers, Some(&whole));
            let response = Response::from_parts(parts, ResponseBody::local(whole));
            (Ok(response), stored)
        }
        Ok(Ok(Err(long))) => {
            let stored = Stored::new(parts.status, &parts.headers, None);
            (Ok(Response::from_parts(parts, long)), stored)
        }
        Ok(Err(_)) => failed(GatewayError::UpstreamFailed),
        Err(_) => failed(GatewayError::UpstreamTimeout(
            (until - started).as_millis() as u64
        )),
    }
}
