//! Attempts: the retry loop. Each attempt is admitted by the breaker, takes
//! a quota slot, is signed afresh and sent; the retry policy, the breaker and
//! the retry budget decide whether another follows.

use std::time::{Duration, SystemTime};

use http::header::HeaderMap;
use http::{HeaderValue, Request};
use opentelemetry::KeyValue;
use tokio::time::Instant;

use super::prepare::Prepared;
use super::{Answer, Gateway};
use crate::base::error::GatewayError;
use crate::base::ids;
use crate::net::body::UpstreamBody;
use crate::observe::access_log::AccessRecord;
use crate::observe::traces::AttemptTrace;
use crate::pandapon::headers;
use crate::pandapon::signer;
use crate::policy::breaker::{Admission, State as BreakerState};
use crate::policy::profiles::Profile;
use crate::policy::retry::{self, Attempt, Decision, Outcome, RetryReason, Skipped};
use crate::policy::routes::Route;

impl Gateway {
    /// The retry loop. Each attempt is admitted by the breaker, takes a
    /// quota slot, is signed afresh and sent; then the retry policy, the
    /// breaker and the retry budget decide whether another follows.
    ///
    /// `reached` is set once an attempt may have reached the provider.
    pub(super) async fn attempts(
        &self,
        call: &Prepared<'_>,
        body: UpstreamBody,
        record: &mut AccessRecord,
        reached: &mut bool,
    ) -> Answer {
        let route = &call.route;
        // The clock is read once per step and the reading shared.
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.retry.deadline_ms);
        let max_attempts = route.max_attempts.unwrap_or(self.retry.max_attempts);
        let attempt_timeout = self.attempt_timeout(route, max_attempts);
        let replay = body.replay();
        let mut next_body = Some(body);
        self.budget.record_first(started);

        let mut retrying: Option<RetryReason> = None;
        for number in 1..=max_attempts {
            let now = if number == 1 { started } else { Instant::now() };
            let permit = self.admit(call, number, now, record).await?;
            let trace = record.trace.as_ref().map(|t| {
                let host = self.upstream.host.to_str().unwrap_or_default();
                let attempt = t.attempt(number, &call.method, call.uri.path(), host);
                if let Some(reason) = &retrying {
                    attempt.note(KeyValue::new("pandagate.retry_reason", reason.to_string()));
                }
                let waited = Instant::now().saturating_duration_since(now);
                if waited >= Duration::from_millis(1) {
                    attempt.note(KeyValue::new(
                        "pandagate.rate_limit_wait_ms",
                        waited.as_millis() as i64,
                    ));
                }
                attempt
            });
            // This attempt is a retry that is really going out: its reason
            // is logged now, not when it was decided.
            record.retry_reasons.extend(retrying.take());
            let body = next_body
                .take()
                .or_else(|| replay.as_ref().and_then(UpstreamBody::replay))
                .expect("the retry policy repeats only calls whose body can be replayed");
            record.attempts = number;
            let sent = Instant::now();
            let remaining = deadline.saturating_duration_since(sent);
            let (outcome, answer) = self
                .send(call, body, attempt_timeout.min(remaining), trace.as_ref())
                .await;
            *reached |= outcome.may_have_reached();
            if let Some(trace) = trace {
                match &answer {
                    Ok(response) => trace.end(Some(response.status().as_u16()), None),
                    Err(e) => trace.end(None, Some(e.kind())),
                }
            }
            let done = Instant::now();
            self.lasting.metrics.attempt(route.class, done - sent);
            permit.record(outcome.health(), done);
            tracing::debug!(attempt = number, ?outcome, path = %call.uri.path(), "upstream attempt");

            let attempt = Attempt {
                class: route.class,
                number,
                max_attempts,
                replayable: replay.is_some(),
                remaining: deadline.saturating_duration_since(done),
            };
            match self.decide(&outcome, attempt) {
                Decision::Retry { reason, wait } => {
                    retrying = Some(reason);
                    // Dropping an unread answer closes its connection; the
                    // pool opens another if needed.
                    drop(answer);
                    tokio::time::sleep(wait).await;
                }
                Decision::Done { skipped } => {
                    record.retry_skipped = skipped;
                    return answer;
                }
            }
        }
        unreachable!("the retry policy stops at max_attempts")
    }

    /// An attempt of a call that may be repeated gets
    /// `read_attempt_timeout_ms`, so a hung one leaves time for another;
    /// one that cannot gets the whole `request_timeout_ms`.
    fn attempt_timeout(&self, route: &Route, max_attempts: u32) -> Duration {
        let request = self.request_timeout.as_millis() as u64;
        Duration::from_millis(route.attempt_timeout_ms.unwrap_or(
            if route.class.repeatable() && max_attempts > 1 {
                self.retry.read_attempt_timeout_ms.min(request)
            } else {
                request
            },
        ))
    }

    /// May attempt `number` go? The breaker must admit it, then the quota
    /// give it a slot: the provider counts every attempt. A refusal ends the
    /// call; for a retry, it is also why the retry was skipped.
    async fn admit(
        &self,
        call: &Prepared<'_>,
        number: u32,
        now: Instant,
        record: &mut AccessRecord,
    ) -> Result<Admission<'_>, GatewayError> {
        let mut skipped = |why| {
            if number > 1 {
                record.retry_skipped = Some(why);
            }
        };
        let permit = self.breaker.admit(now).map_err(|retry_after| {
            skipped(Skipped::CircuitOpen);
            if let Some(trace) = &record.trace {
                trace.note(KeyValue::new("pandagate.circuit_state", "open"));
            }
            GatewayError::CircuitOpen { retry_after }
        })?;
        let slot = self
            .limiter
            .acquire(call.profile.quota_key, call.route.bucket, call.client)
            .await;
        if let Err(limited) = slot {
            permit.record(None, Instant::now());
            skipped(Skipped::RateLimited);
            return Err(limited.into());
        }
        Ok(permit)
    }

    /// The retry policy's decision, then the gateway's own limits on
    /// retrying: not into an open circuit, not past the retry budget.
    fn decide(&self, outcome: &Outcome, attempt: Attempt) -> Decision {
        let backoff = retry::backoff(
            attempt.number,
            Duration::from_millis(self.retry.backoff_base_ms),
            Duration::from_millis(self.retry.backoff_cap_ms),
            &mut rand::rng(),
        );
        let skip = |why| Decision::Done { skipped: Some(why) };
        match retry::decide(outcome, attempt, backoff) {
            Decision::Retry { .. } if self.breaker.state() == BreakerState::Open => {
                skip(Skipped::CircuitOpen)
            }
            Decision::Retry { .. } if !self.budget.try_retry(Instant::now()) => {
                skip(Skipped::Budget)
            }
            decision => decision,
        }
    }

    /// Builds one attempt's request (the call's target and headers, signed
    /// afresh) and sends it.
    async fn send(
        &self,
        call: &Prepared<'_>,
        body: UpstreamBody,
        timeout: Duration,
        trace: Option<&AttemptTrace>,
    ) -> (Outcome, Answer) {
        // Boxed: it passes through the pool's futures to hyper's queue.
        let mut upstream_req = Box::new(Request::new(body));
        *upstream_req.method_mut() = call.method.clone();
        *upstream_req.uri_mut() = call.uri.clone();
        *upstream_req.headers_mut() = call.headers.clone();
        if let Some(trace) = trace {
            trace.inject(upstream_req.headers_mut());
        }
        self.sign(call.profile, upstream_req.headers_mut());
        self.exchange(upstream_req, timeout, call.route.class).await
    }

    /// Adds `access-key`, `timestamp`, `nonce-str` and `signature`, fresh for
    /// this attempt.
    fn sign(&self, profile: &Profile, headers: &mut HeaderMap) {
        let timestamp = self.signing.timestamp_unit.stamp(SystemTime::now());
        let nonce = ids::nonce(&mut rand::rng());
        let ts = timestamp.to_string();
        let nonce_str = std::str::from_utf8(&nonce).expect("alphanumeric");
        let access_key = profile
            .access_key
            .to_str()
            .expect("validated: visible ASCII");
        let signature = signer::sign(
            self.signing.recipe,
            access_key,
            &ts,
            nonce_str,
            profile.secret.current().expose(),
        );
        let mut signature =
            HeaderValue::from_bytes(&signature).expect("hex is a valid header value");
        signature.set_sensitive(true);
        headers.insert(headers::ACCESS_KEY, profile.access_key.clone());
        headers.insert(headers::TIMESTAMP, HeaderValue::from(timestamp));
        headers.insert(
            headers::NONCE_STR,
            HeaderValue::from_bytes(&nonce).expect("alphanumeric"),
        );
        headers.insert(headers::SIGNATURE, signature);
    }
}
