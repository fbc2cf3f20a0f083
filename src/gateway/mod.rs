//! The gateway's request path, phase by phase.
//!
//! ```text
//!            ┌─ prepare (synchronous) ──────────────────────────────┐
//! caller ──► │ request filter ─► credentials ─► route ─► target and │
//!            │ (method, target,  (client,       (class,  headers    │
//!            │  ambiguous path)   profile,       bucket)  (strip)    │
//!            │                    user-id)                          │
//!            └──────────────────────────────────────────────────────┘
//!        ──► body (cap, deadline, buffer) ──► attempts:
//!            ┌────────────────────────────────────────────────────────────┐
//!            │ breaker admits ─► limiter slot ─► sign ─► send ─► provider │
//!            │        ▲                                    │              │
//!            │        └─ retry: policy (class, attempts,   │              │
//!            │           deadline, body), open circuit,    │              │
//!            │           budget ◄── outcome ◄──────────────┘              │
//!            └────────────────────────────────────────────────────────────┘
//! caller ◄── response filter (hop-by-hop, x-request-id) ◄── answer
//!            the call's log line is written when the answer's body ends
//! ```
//!
//! The limiter sits inside the retry loop, after the breaker: the provider
//! counts every attempt against the quota, and an attempt the breaker turns
//! away must not spend a slot. Signing is the last step before sending, so
//! every attempt carries its own timestamp and nonce.
//!
//! Every path through [`Gateway::handle`] ends in a response: the provider's,
//! or the gateway's own envelope built from a [`GatewayError`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::base::body_budget::{BodyBudget, ConnectionBodies, Reader};
use crate::base::error::{self, GatewayError};
use crate::base::ids;
use crate::config::{AmbiguousPaths, Class, ConfigError, RetryConfig, ServerConfig, SigningConfig};
use crate::net::body::{self, BodyTimedOut, BodyTooLarge, ResponseBody, UpstreamBody};
use crate::net::upstream::Upstream;
use crate::net::worker;
use crate::observe::access_log::{AccessLog, AccessRecord};
use crate::observe::call_log::CallLog;
use crate::observe::metrics::Metrics;
use crate::observe::traces::{AttemptTrace, Traces};
use crate::pandapon::envelope;
use crate::pandapon::headers::{self, X_PANDAGATE_PROFILE, X_REQUEST_ID};
use crate::pandapon::signer;
use crate::policy::auth::Clients;
use crate::policy::breaker::{Admission, Breaker, State as BreakerState};
use crate::policy::loaded::Loaded;
use crate::policy::profiles::{Profile, Profiles};
use crate::policy::retry::{self, Attempt, Budget, Decision, Outcome, RetryReason, Skipped};
use crate::policy::routes::{CacheRule, Route, Routes, is_ambiguous};
use crate::state::cache::{self, CacheResult, CallerWish, ReadCache, Role};
use crate::state::idempotency::{self, Begun, IDEMPOTENCY_KEY, Idempotency, Key, Logged, Stored};
use crate::state::quota::Limiter;
use opentelemetry::KeyValue;

/// Longest caller `x-request-id` passed on; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Shared by every connection (behind an `Arc`): nothing in it is per-caller.
/// The retry budget and the circuit breaker are process-wide on purpose.
#[derive(Debug)]
pub struct Gateway {
    upstream: Upstream,
    profiles: Profiles,
    clients: Clients,
    routes: Routes,
    signing: SigningConfig,
    retry: RetryConfig,
    budget: Budget,
    breaker: Breaker,
    limiter: Limiter,
    metrics: Arc<Metrics>,
    server: ServerConfig,
    max_body: u64,
    buffer_body: u64,
    request_timeout: Duration,
    inspect_bytes: usize,
    access_log: AccessLog,
    /// Callers' idempotency keys, when `[idempotency]` is set. Opened once
    /// per process and handed from one config to the next.
    idempotency: Option<Arc<Idempotency>>,
    /// Spans of each call and attempt, when `[telemetry]` has an endpoint.
    /// Started once per process and handed from one config to the next.
    traces: Option<Arc<Traces>>,
    /// Good answers of cached read routes; made once per process and handed
    /// from one config to the next.
    cache: Arc<ReadCache>,
    /// The caller headers a cached route forwards, each in the key.
    cache_forward: Vec<http::HeaderName>,
    /// What request bodies being read may hold, shared with the push
    /// receiver; made once per process and handed from one config to the
    /// next.
    bodies: Arc<BodyBudget>,
}

/// One upstream attempt's result: the answer the caller would get.
type Answer = Result<Response<ResponseBody>, GatewayError>;

/// A call as it will be sent upstream, before its body is read and before
/// any attempt is signed.
#[derive(Debug)]
pub(crate) struct Prepared<'a> {
    pub profile: &'a Profile,
    pub route: Route,
    /// The caller's `Content-Length`, when it sent one.
    pub declared: Option<u64>,
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: HeaderMap,
    /// The caller's idempotency key, on a write or unknown call.
    pub key: Option<Key>,
    /// On a cached route, what the caller's `Cache-Control` asks.
    pub wish: CallerWish,
}

impl Gateway {
    /// A gateway with metrics and an idempotency store of its own.
    pub fn new(loaded: &Loaded, access_log: AccessLog) -> Result<Gateway, ConfigError> {
        let gateway = Self::with_metrics(loaded, access_log, Arc::new(Metrics::default()))?;
        let idempotency = match &loaded.config.idempotency {
            None => None,
            Some(c) => Some(Arc::new(Idempotency::open(
                c,
                loaded.idempotency_redis_url.as_ref(),
            )?)),
        };
        let traces = match &loaded.traces_endpoint {
            None => None,
            Some(endpoint) => Some(Arc::new(Traces::start(&loaded.config.telemetry, endpoint)?)),
        };
        Ok(gateway.with_idempotency(idempotency).with_traces(traces))
    }

    /// A gateway recording into `metrics`, which outlive config reloads.
    pub fn with_metrics(
        loaded: &Loaded,
        access_log: AccessLog,
        metrics: Arc<Metrics>,
    ) -> Result<Gateway, ConfigError> {
        let c = &loaded.config;
        let profiles = Profiles::new(loaded.profiles.clone(), &c.default_profile);
        let routes = Routes::new(&c.routes);
        let limiter = Limiter::new(
            c.rate_limit.as_ref(),
            loaded.redis_url.as_ref(),
            profiles.quota_keys(),
            routes.buckets(),
        )?;
        Ok(Gateway {
            upstream: Upstream::new(
                &c.upstream,
                &loaded.tls,
                &loaded.egress,
                worker::count(c.server.worker_threads),
            )?,
            profiles,
            clients: Clients::new(loaded.clients.clone()),
            routes,
            limiter,
            metrics,
            server: c.server.clone(),
            signing: c.signing.clone(),
            retry: c.retry.clone(),
            budget: Budget::new(
                c.retry.budget_percent,
                c.retry.budget_min_per_sec,
                Duration::from_millis(c.retry.budget_window_ms),
            ),
            breaker: Breaker::new(c.circuit_breaker.clone()),
            max_body: c.server.max_request_body_bytes,
            buffer_body: c.server.buffer_body_bytes,
            request_timeout: Duration::from_millis(c.upstream.request_timeout_ms),
            inspect_bytes: c.log.inspect_bytes,
            access_log,
            idempotency: None,
            traces: None,
            cache: Arc::new(ReadCache::open(&c.cache, loaded.cache_redis_url.as_ref())?),
            cache_forward: c
                .cache
                .forward_headers
                .iter()
                .map(|name| http::HeaderName::from_bytes(name.as_bytes()))
                .collect::<Result<_, _>>()
                .map_err(|_| ConfigError::new("cache.forward_headers", "not a header name"))?,
            bodies: BodyBudget::new(c.server.max_buffered_body_bytes),
        })
    }

    /// Serves callers' idempotency keys from `store` (opened once per
    /// process: see [`Idempotency::open`]).
    pub fn with_idempotency(mut self, store: Option<Arc<Idempotency>>) -> Gateway {
        self.idempotency = store;
        self
    }

    pub fn idempotency(&self) -> Option<&Arc<Idempotency>> {
        self.idempotency.as_ref()
    }

    /// Exports spans through `traces` (started once per process).
    pub fn with_traces(mut self, traces: Option<Arc<Traces>>) -> Gateway {
        self.traces = traces;
        self
    }

    pub fn traces(&self) -> Option<&Arc<Traces>> {
        self.traces.as_ref()
    }

    /// Keeps the read cache of the gateway this one replaces.
    pub fn with_cache(mut self, cache: Arc<ReadCache>) -> Gateway {
        self.cache = cache;
        self
    }

    pub fn cache(&self) -> &Arc<ReadCache> {
        &self.cache
    }

    /// Reads bodies within `bodies` (the process's budget, kept from the
    /// gateway this one replaces), set to this config's limit.
    pub fn with_body_budget(mut self, bodies: Arc<BodyBudget>) -> Gateway {
        bodies.resize(self.server.max_buffered_body_bytes);
        self.bodies = bodies;
        self
    }

    pub fn body_budget(&self) -> &Arc<BodyBudget> {
        &self.bodies
    }

    pub fn access_log(&self) -> &AccessLog {
        &self.access_log
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn profiles(&self) -> &Profiles {
        &self.profiles
    }

    /// The listener settings this gateway was built with.
    pub fn server_config(&self) -> &ServerConfig {
        &self.server
    }

    /// Answers one call. Never fails: errors become envelopes. The call's
    /// log line is its [`CallLog`]'s to write, whatever happens.
    ///
    /// Two kinds of call run as a task of their own, to their end even
    /// when their caller leaves: one with an idempotency key (its outcome
    /// is what the caller's retry with the same key will be answered with)
    /// and one on a cached route (other calls may be waiting for its
    /// answer, which it keeps).
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        let keyed = self
            .idempotency
            .as_ref()
            .filter(|_| req.headers().contains_key(IDEMPOTENCY_KEY));
        let cached = self.routes.caches() && self.routes.route(req.uri().path()).cache.is_some();
        if keyed.is_none() && !cached {
            return self.answer(req).await;
        }
        let running = keyed.map(|idempotency| idempotency.running());
        let call = async move {
            let response = self.answer(req).await;
            drop(running);
            response
        };
        match tokio::spawn(call).await {
            Ok(response) => response,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(_) => error::envelope_response(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "",
                "shutting_down",
                "the gateway stopped before the call finished",
            )
            .map(ResponseBody::local),
        }
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let id = ids::request_id_bytes();
        let gateway_id = std::str::from_utf8(&id).expect("hex is ASCII");
        let x_request_id = caller_request_id(req.headers())
            .unwrap_or_else(|| HeaderValue::from_bytes(&id).expect("hex is a valid header value"));
        let mut call = CallLog::start(
            AccessRecord::start(req.method().clone(), req.uri().path(), &x_request_id),
            self.access_log.clone(),
            self.metrics.clone(),
        );
        let record = call.record();
        if let Some(traces) = &self.traces {
            record.trace = Some(traces.call(req.headers(), req.method(), req.uri().path()));
        }
        let (mut response, inspect) =
            match self.forward(req, &x_request_id, gateway_id, record).await {
                Ok(response) => {
                    // A replayed answer is the provider's, but from the store.
                    if record.idempotency != Some(Logged::Replayed) {
                        record.upstream_status = Some(response.status().as_u16());
                    }
                    (response, self.inspect_bytes)
                }
                Err(e) => {
                    record.error = Some(e.kind());
                    record.gateway_msg = Some(e.to_string());
                    (e.to_response(gateway_id).map(ResponseBody::local), 0)
                }
            };
        record.status = response.status().as_u16();
        response.headers_mut().insert(X_REQUEST_ID, x_request_id);
        // The gateway's own refusal on a cached route was a miss too.
        if record.cache == Some(CacheResult::Miss.as_str()) {
            response
                .headers_mut()
                .entry(cache::X_PANDAGATE_CACHE)
                .or_insert(HeaderValue::from_static("miss"));
        }
        response.body_mut().watch(call.answering(inspect));
        response
    }

    /// The call's phases: prepare (synchronous), read the body, then the
    /// attempts.
    async fn forward(
        &self,
        req: Request<Incoming>,
        x_request_id: &HeaderValue,
        gateway_id: &str,
        record: &mut AccessRecord,
    ) -> Answer {
        // The body's deadline runs from the end of the head, before anything
        // else can make the caller wait.
        let body_limits = body::BodyLimits {
            buffer: self.buffer_body,
            max: self.max_body,
            deadline: Instant::now() + Duration::from_millis(self.server.body_read_timeout_ms),
            timeout_ms: self.server.body_read_timeout_ms,
        };
        let connection = req.extensions().get::<Arc<ConnectionBodies>>().cloned();
        let (parts, incoming) = req.into_parts();
        let call = self.prepare(parts, x_request_id, record)?;
        // Small bodies are read whole, so an over-limit body is refused
        // before anything is sent, and the bytes can be sent again. Their
        // hold on the body budget lasts as long as the call's attempts,
        // which may send them again.
        let held = self.bodies.hold(Reader::Call, connection);
        let (body, _held) = body::read_request(incoming, call.declared, body_limits, held).await?;
        match (&self.idempotency, call.key, call.route.cache) {
            (Some(idempotency), Some(key), _) => {
                self.keyed(idempotency, &call, key, body, gateway_id, record)
                    .await
            }
            (_, _, Some(rule)) => self.cached(rule, &call, body, record).await,
            _ => self.attempts(&call, body, record, &mut false).await,
        }
    }

    /// A read on a cached route: answered from the cache while fresh; else
    /// asked once for all identical calls at that moment, its good answer
    /// kept; when the provider cannot answer, a stale entry answers.
    async fn cached(
        &self,
        rule: CacheRule,
        call: &Prepared<'_>,
        body: UpstreamBody,
        record: &mut AccessRecord,
    ) -> Answer {
        let cache = &self.cache;
        let wish = call.wish;
        let UpstreamBody::Full(bytes) = &body else {
            record.cache = Some(CacheResult::Bypass.as_str());
            return self.attempts(call, body, record, &mut false).await;
        };
        if wish == CallerWish::Bypass {
            record.cache = Some(CacheResult::Bypass.as_str());
            return self.attempts(call, body, record, &mut false).await;
        }
        let key = cache::KeyOf {
            account: &call.profile.account,
            method: &call.method,
            path: call.uri.path(),
            query: call.uri.query(),
            sort_query: rule.sort_query,
            body: bytes.as_deref().unwrap_or_default(),
            headers: &call.headers,
            keyed: &self.cache_forward,
        }
        .key();
        let found = cache.look_shared(call.uri.path(), &key, rule).await;
        if wish == CallerWish::Any
            && let Some(entry) = &found.fresh
        {
            record.cache = Some(CacheResult::Hit.as_str());
            let answer = entry.answer(CacheResult::Hit, std::time::Instant::now());
            return Ok(answer.map(ResponseBody::local));
        }
        let leader = match cache.lead_or_follow(key) {
            Role::Leader(leader) => Some(leader),
            Role::Follower(mut answer) => {
                let waited = tokio::time::timeout(cache.coalesce_wait(), async {
                    while answer.changed().await.is_ok() {
                        if let Some(entry) = answer.borrow().clone() {
                            return Some(entry);
                        }
                    }
                    None
                })
                .await;
                if let Ok(Some(entry)) = waited {
                    record.cache = Some(CacheResult::Coalesced.as_str());
                    let answer = entry.answer(CacheResult::Coalesced, std::time::Instant::now());
                    return Ok(answer.map(ResponseBody::local));
                }
                // The leader failed or is slow: ask for ourselves.
                None
            }
        };
        record.cache = Some(CacheResult::Miss.as_str());
        let until = Instant::now() + Duration::from_millis(self.retry.deadline_ms);
        let answer = match self.attempts(call, body, record, &mut false).await {
            Ok(response) if response.status() == http::StatusCode::OK => {
                let (parts, body) = response.into_parts();
                let read =
                    tokio::time::timeout_at(until, body.read_within(cache.max_entry_bytes())).await;
                match read {
                    Ok(Ok(Ok(whole))) => {
                        let entry = cache.keepable(
                            call.uri.path(),
                            parts.status,
                            &parts.headers,
                            &whole,
                            (&call.headers, &self.cache_forward),
                            std::time::Instant::now(),
                        );
                        if let Some(leader) = leader {
                            leader.finish(entry, rule.ttl + rule.stale);
                        }
                        Ok(Response::from_parts(parts, ResponseBody::local(whole)))
                    }
                    Ok(Ok(Err(long))) => Ok(Response::from_parts(parts, long)),
                    Ok(Err(_)) => Err(GatewayError::UpstreamFailed),
                    Err(_) => Err(GatewayError::UpstreamTimeout(self.retry.deadline_ms)),
                }
            }
            other => other,
        };
        let failed = match &answer {
            Ok(response) => response.status().is_server_error(),
            Err(e) => {
                e.status().is_server_error() || e.status() == http::StatusCode::TOO_MANY_REQUESTS
            }
        };
        if failed && let Some(entry) = found.stale.or(found.fresh) {
            record.cache = Some(CacheResult::Stale.as_str());
            let answer = entry.answer(CacheResult::Stale, std::time::Instant::now());
            return Ok(answer.map(ResponseBody::local));
        }
        answer.map(|mut response| {
            response
                .headers_mut()
                .insert(cache::X_PANDAGATE_CACHE, HeaderValue::from_static("miss"));
            response
        })
    }

    /// A call with an idempotency key: answered from the store when the key
    /// was used before; otherwise reserved, sent, and its answer kept, or
    /// the key released when nothing reached the provider. Replays and
    /// refusals come before the breaker and the limiter: they spend no
    /// quota and need no provider.
    async fn keyed(
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

    /// The retry loop. Each attempt is admitted by the breaker, takes a
    /// quota slot, is signed afresh and sent; then the retry policy, the
    /// breaker and the retry budget decide whether another follows.
    ///
    /// `reached` is set once an attempt may have reached the provider.
    async fn attempts(
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
            self.metrics.attempt(route.class, done - sent);
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
            .acquire(call.profile.quota_key, call.route.bucket)
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
        let mut upstream_req = Request::new(body);
        *upstream_req.method_mut() = call.method.clone();
        *upstream_req.uri_mut() = call.uri.clone();
        *upstream_req.headers_mut() = call.headers.clone();
        if let Some(trace) = trace {
            trace.inject(upstream_req.headers_mut());
        }
        self.sign(call.profile, upstream_req.headers_mut());
        self.exchange(upstream_req, timeout, call.route.class).await
    }

    /// Everything decided before the body is read: refuses what must never
    /// be forwarded, authenticates the caller, picks the profile and
    /// user-id, classifies the route and builds the upstream target and
    /// headers (the caller's, minus hop-by-hop and gateway-owned ones).
    /// Synchronous and side-effect free but for `record`.
    pub(crate) fn prepare(
        &self,
        parts: http::request::Parts,
        x_request_id: &HeaderValue,
        record: &mut AccessRecord,
    ) -> Result<Prepared<'_>, GatewayError> {
        // Request filter: refuse what must never be forwarded.
        self.upstream.check_target_parts(&parts)?;

        // Caller: who is calling (when clients are configured), which
        // profile signs, and which user-id is sent.
        let requested = parts.headers.get(X_PANDAGATE_PROFILE);
        let profile = match self.clients.authenticate(
            &parts.headers,
            parts.extensions.get::<crate::net::tls::PeerIdentity>(),
        )? {
            None => self.profiles.select(requested)?,
            Some(client) => {
                record.client = Some(client.name.clone());
                client.select(&self.profiles, requested)?
            }
        };
        record.profile = Some(profile.name.clone());
        let user_id = profile
            .user_id(parts.headers.get(headers::USER_ID))?
            .cloned();

        // Route: may this call be sent twice? A path some server would read
        // as another one is not guessed at.
        if self.server.ambiguous_paths == AmbiguousPaths::Refuse && is_ambiguous(parts.uri.path()) {
            return Err(GatewayError::AmbiguousPath);
        }
        let route = self.routes.route(parts.uri.path());
        record.class = Some(route.class);
        let key = match &self.idempotency {
            None => None,
            Some(idempotency) => {
                let owner = idempotency::Owner {
                    account: &profile.account,
                    user_id: user_id.as_ref().map(HeaderValue::as_bytes),
                    client: record.client.as_deref(),
                };
                idempotency.key_of(&parts.headers, route.class, owner, &mut record.idempotency)?
            }
        };

        let declared = content_length(&parts.headers)?;
        let uri = self.upstream.uri_for(&parts.uri)?;

        // Upstream request: the caller's message with the gateway's headers;
        // on a cached route only the headers in the key, so no caller can
        // shape the answer another one gets.
        let wish = cache::caller_wish(&parts.headers);
        let mut headers = headers::for_upstream(parts.headers);
        if route.cache.is_some() {
            headers::keep_only(&mut headers, &self.cache_forward);
        }
        if self.idempotency.is_some() {
            // The gateway keeps the promise; the provider never sees the key.
            headers.remove(IDEMPOTENCY_KEY);
        }
        headers.insert(header::HOST, self.upstream.host.clone());
        if let Some(auth) = self.upstream.proxy_authorization() {
            headers.insert(header::PROXY_AUTHORIZATION, auth.clone());
        }
        headers.insert(X_REQUEST_ID, x_request_id.clone());
        if let Some(user_id) = user_id {
            headers.insert(headers::USER_ID, user_id);
        }
        Ok(Prepared {
            profile,
            route,
            declared,
            method: parts.method,
            uri,
            headers,
            key,
            wish,
        })
    }

    /// Sends one attempt and says how it went.
    async fn exchange(
        &self,
        req: Request<UpstreamBody>,
        timeout: Duration,
        class: Class,
    ) -> (Outcome, Answer) {
        let exchange = async {
            let mut response = match self.upstream.client(class).request(req).await {
                Ok(response) => response,
                Err(e) => {
                    // TLS and the egress proxy fail while connecting.
                    let known = e.is_connect().then(|| self.upstream.connect_failure(&e));
                    let error = known.flatten().unwrap_or_else(|| {
                        classify(&e, self.max_body, self.server.body_read_timeout_ms)
                    });
                    let outcome = match error {
                        GatewayError::UpstreamConnect | GatewayError::UpstreamProxy { .. } => {
                            Outcome::ConnectFailed
                        }
                        GatewayError::UpstreamTls { .. } => Outcome::TlsFailed,
                        GatewayError::BodyTooLarge { .. } | GatewayError::BodyTimeout(_) => {
                            Outcome::Refused
                        }
                        _ => Outcome::Dropped,
                    };
                    return (outcome, Err(error));
                }
            };
            // Response filter: connection-level headers stay on their hop.
            headers::strip_hop_by_hop(response.headers_mut());
            let status = response.status().as_u16();
            let retry_after = matches!(status, 429 | 503)
                .then(|| response.headers().get(header::RETRY_AFTER))
                .flatten()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
            let outcome = Outcome::Response {
                status,
                retry_after,
            };
            if class.repeatable()
                && response.status().is_success()
                && !self.retry.transient_codes.is_empty()
            {
                return self.look_for_transient_code(response, outcome).await;
            }
            (outcome, Ok(response.map(ResponseBody::upstream)))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => (
                Outcome::TimedOut,
                Err(GatewayError::UpstreamTimeout(timeout.as_millis() as u64)),
            ),
        }
    }

    /// Reads the start of a read's 2xx body to see whether its `code` is one
    /// of `retry.transient_codes`. A body longer than `log.inspect_bytes` is
    /// not judged (and so not retried on its code): it streams on.
    async fn look_for_transient_code(
        &self,
        response: Response<Incoming>,
        outcome: Outcome,
    ) -> (Outcome, Answer) {
        let (parts, incoming) = response.into_parts();
        match body::read_prefix(incoming, self.inspect_bytes).await {
            Err(_) => (Outcome::Dropped, Err(GatewayError::UpstreamFailed)),
            Ok((chunks, Some(rest))) => (
                outcome,
                Ok(Response::from_parts(
                    parts,
                    ResponseBody::upstream_after(chunks, rest),
                )),
            ),
            Ok((chunks, None)) => {
                let whole = body::join(chunks);
                let code = envelope::inspect(&whole).code;
                let outcome = match code {
                    Some(code) if self.retry.is_transient(&code) => Outcome::TransientCode(
                        code.as_str()
                            .map_or_else(|| code.to_string(), str::to_owned),
                    ),
                    _ => outcome,
                };
                (
                    outcome,
                    Ok(Response::from_parts(parts, ResponseBody::local(whole))),
                )
            }
        }
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

/// Maps a client error to the gateway's answer.
fn classify(
    e: &hyper_util::client::legacy::Error,
    max_body: u64,
    body_timeout_ms: u64,
) -> GatewayError {
    if e.is_connect() {
        return GatewayError::UpstreamConnect;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.downcast_ref::<BodyTooLarge>().is_some() {
            return GatewayError::BodyTooLarge { limit: max_body };
        }
        if err.downcast_ref::<BodyTimedOut>().is_some() {
            return GatewayError::BodyTimeout(body_timeout_ms);
        }
        source = err.source();
    }
    tracing::debug!(error = %e, "upstream request failed");
    GatewayError::UpstreamFailed
}

/// The caller's `x-request-id`, when it is one we can pass on.
fn caller_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let v = headers.get(X_REQUEST_ID)?;
    let ok = !v.is_empty()
        && v.len() <= MAX_REQUEST_ID_LEN
        && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
    ok.then(|| v.clone())
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, GatewayError> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(GatewayError::BadHeader("content-length"))
        })
        .transpose()
}

/// Builds the gateway for `loaded`, sharing it across connections.
pub fn build(loaded: &Loaded, access_log: AccessLog) -> Result<Arc<Gateway>, ConfigError> {
    Gateway::new(loaded, access_log).map(Arc::new)
}
