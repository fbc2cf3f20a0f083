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
use std::time::Duration;

use http::header::HeaderMap;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::base::body_budget::{BodyBudget, ConnectionBodies, Reader};
use crate::base::error::{self, GatewayError};
use crate::base::families::{Described, DescriptorEncoder};
use crate::base::ids;
use crate::config::{ConfigError, RetryConfig, ServerConfig, SigningConfig};
use crate::net::body::{self, ResponseBody};
use crate::net::upstream::Upstream;
use crate::net::worker;
use crate::observe::access_log::{AccessLog, AccessRecord};
use crate::observe::call_log::CallLog;
use crate::observe::metrics::Metrics;
use crate::observe::traces::Traces;
use crate::pandapon::headers::{X_REQUEST_ID, detached};
use crate::policy::auth::Clients;
use crate::policy::breaker::Breaker;
use crate::policy::loaded::Loaded;
use crate::policy::profiles::Profiles;
use crate::policy::retry::Budget;
use crate::policy::routes::Routes;
use crate::state::cache::{self, CacheResult, ReadCache};
use crate::state::idempotency::{IDEMPOTENCY_KEY, Idempotency, Logged};
use crate::state::quota::{Limiter, QuotaClient};
use prepare::Prepared;

mod attempts;
mod cached;
mod exchange;
mod keyed;
mod prepare;

/// Longest caller `x-request-id` passed on; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// What lasts for the process whatever config runs: opened once (in
/// `App::build`) and handed to the gateway of each config, so a reload
/// keeps the metrics, the log, the stores, the trace exporter, the cached
/// answers and the bodies being read.
#[derive(Debug, Clone)]
pub struct Lasting {
    pub access_log: AccessLog,
    /// The per-call series, counted across reloads.
    pub metrics: Arc<Metrics>,
    /// Callers' idempotency keys, when `[idempotency]` is set. A local
    /// store is a file only one process may hold.
    pub idempotency: Option<Arc<Idempotency>>,
    /// Spans of each call and attempt, when `[telemetry]` has an endpoint.
    pub traces: Option<Arc<Traces>>,
    /// Good answers of cached read routes.
    pub cache: Arc<ReadCache>,
    /// What request bodies being read may hold, shared with the push
    /// receiver; resized to each config's limit.
    pub bodies: Arc<BodyBudget>,
}

impl Lasting {
    /// What `loaded` asks for, opened: the read cache, the body budget, the
    /// idempotency store and the trace exporter.
    pub fn open(loaded: &Loaded, access_log: AccessLog) -> Result<Lasting, ConfigError> {
        let mut lasting = Lasting::without_stores(loaded, access_log)?;
        if let Some(c) = &loaded.config.idempotency {
            let store = Idempotency::open(c, loaded.idempotency_redis_url.as_ref())?;
            lasting.idempotency = Some(Arc::new(store));
        }
        if let Some(endpoint) = &loaded.traces_endpoint {
            let traces = Traces::start(&loaded.config.telemetry, endpoint)?;
            lasting.traces = Some(Arc::new(traces));
        }
        Ok(lasting)
    }

    /// As [`Lasting::open`], without opening the idempotency store or
    /// starting the exporter: what `check` builds, which must not hold a
    /// running gateway's store file or send spans.
    pub fn without_stores(loaded: &Loaded, access_log: AccessLog) -> Result<Lasting, ConfigError> {
        let c = &loaded.config;
        Ok(Lasting {
            access_log,
            metrics: Arc::new(Metrics::default()),
            idempotency: None,
            traces: None,
            cache: Arc::new(ReadCache::open(&c.cache, loaded.cache_redis_url.as_ref())?),
            bodies: BodyBudget::new(c.server.max_buffered_body_bytes),
        })
    }
}

/// One config's gateway over the process's [`Lasting`] parts. Shared by
/// every connection (behind an `Arc`): nothing in it is per-caller. The
/// retry budget and the circuit breaker are process-wide on purpose.
#[derive(Debug)]
pub struct Gateway {
    lasting: Lasting,
    upstream: Upstream,
    profiles: Profiles,
    clients: Clients,
    routes: Routes,
    signing: SigningConfig,
    retry: RetryConfig,
    budget: Budget,
    breaker: Breaker,
    limiter: Limiter,
    /// `[rate_limit] client`: who the calls of no `[[clients]]` entry are,
    /// as the access log names them.
    sidecar_client: Option<Arc<str>>,
    server: ServerConfig,
    /// `[rate_limit]` as configured, for the status page.
    rate_limit: Option<crate::config::RateLimitConfig>,
    max_body: u64,
    buffer_body: u64,
    request_timeout: Duration,
    inspect_bytes: usize,
    /// The caller headers a cached route forwards, each in the key.
    cache_forward: Vec<http::HeaderName>,
}

/// One upstream attempt's result: the answer the caller would get.
type Answer = Result<Response<ResponseBody>, GatewayError>;

impl Gateway {
    /// The gateway of `loaded`: its routes, profiles, clients, limits and
    /// provider connection, over the process's `lasting` parts (the body
    /// budget resized to this config's limit).
    pub fn new(loaded: &Loaded, lasting: Lasting) -> Result<Gateway, ConfigError> {
        let c = &loaded.config;
        let profiles = Profiles::new(loaded.profiles.clone(), &c.default_profile);
        let routes = Routes::new(&c.routes);
        let limiter = Limiter::new(
            c.rate_limit.as_ref(),
            loaded.redis_url.as_ref(),
            profiles.quota_keys(),
            routes.buckets(),
            &quota_clients(c),
        )?;
        let cache_forward = c
            .cache
            .forward_headers
            .iter()
            .map(|name| http::HeaderName::from_bytes(name.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| ConfigError::new("cache.forward_headers", "not a header name"))?;
        lasting.bodies.resize(c.server.max_buffered_body_bytes);
        Ok(Gateway {
            lasting,
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
            sidecar_client: c
                .rate_limit
                .as_ref()
                .and_then(|r| r.client.as_deref())
                .map(Arc::from),
            server: c.server.clone(),
            rate_limit: c.rate_limit.clone(),
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
            cache_forward,
        })
    }

    /// The process's parts this gateway serves with.
    pub fn lasting(&self) -> &Lasting {
        &self.lasting
    }

    pub fn cache(&self) -> &Arc<ReadCache> {
        &self.lasting.cache
    }

    pub fn traces(&self) -> Option<&Arc<Traces>> {
        self.lasting.traces.as_ref()
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

    pub fn profiles(&self) -> &Profiles {
        &self.profiles
    }

    /// The quota this gateway was built with (`[rate_limit]`), if any.
    pub fn quota_config(&self) -> Option<&crate::config::RateLimitConfig> {
        self.rate_limit.as_ref()
    }

    /// The callers of a shared gateway (`[[clients]]`).
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// The listener settings this gateway was built with.
    pub fn server_config(&self) -> &ServerConfig {
        &self.server
    }

    /// The series of the parts this gateway serves with, read now: retry
    /// budget, quota, breaker, calls in flight and reloads, cache, traces.
    pub fn describe(&self, e: &mut DescriptorEncoder) -> Described {
        self.budget.describe(e)?;
        self.limiter.describe(e)?;
        self.breaker.describe(e)?;
        self.lasting.metrics.describe_state(e)?;
        self.lasting.cache.describe(e)?;
        if let Some(traces) = &self.lasting.traces {
            traces.describe(e)?;
        }
        Ok(())
    }

    /// Answers one call. Never fails: errors become envelopes. The call's
    /// log line is its [`CallLog`]'s to write, whatever happens.
    ///
    /// Two kinds of call run as a task of their own, to their end even
    /// when their caller leaves: one with an idempotency key (its outcome
    /// is what the caller's retry with the same key will be answered with)
    /// and one on a cached route (other calls may be waiting for its
    /// answer, which it keeps).
    ///
    /// Not `async fn`s, here and in [`Gateway::answer`]: the request's head
    /// is taken apart before the call's future is made, so that future,
    /// which lives as long as the call, does not keep copies of it.
    pub fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + 'static {
        let keyed = self
            .lasting
            .idempotency
            .as_ref()
            .filter(|_| req.headers().contains_key(IDEMPOTENCY_KEY));
        let cached = self.routes.caches() && self.routes.route(req.uri().path()).cache.is_some();
        // `Some` for a call that runs as a task of its own.
        let own_task = (keyed.is_some() || cached).then(|| keyed.map(|i| i.running()));
        async move {
            let Some(running) = own_task else {
                return self.answer(req).await;
            };
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
    }

    /// The call's phases: prepare (synchronous, as the call arrives), read
    /// the body, then the attempts; then its answer and log line.
    fn answer(&self, req: Request<Incoming>) -> impl Future<Output = Response<ResponseBody>> + '_ {
        let id = ids::request_id_bytes();
        let x_request_id = caller_request_id(req.headers())
            .unwrap_or_else(|| HeaderValue::from_bytes(&id).expect("hex is a valid header value"));
        let mut call = CallLog::start(
            AccessRecord::start(req.method().clone(), req.uri().path(), &x_request_id),
            self.lasting.access_log.clone(),
            self.lasting.metrics.clone(),
        );
        let record = call.record();
        if let Some(traces) = &self.lasting.traces {
            record.trace = Some(traces.call(req.headers(), req.method(), req.uri().path()));
        }
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
        let prepared = self.prepare(parts, &x_request_id, record);
        async move {
            let gateway_id = std::str::from_utf8(&id).expect("hex is ASCII");
            let record = call.record();
            // The prepared call is used in place: moved, it would be held
            // twice in this future.
            let answer = match prepared.as_ref() {
                Ok(prepared) => {
                    self.forward(
                        prepared,
                        incoming,
                        body_limits,
                        connection,
                        gateway_id,
                        record,
                    )
                    .await
                }
                Err(_) => Err(prepared.expect_err("a refusal")),
            };
            let (mut response, inspect) = match answer {
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
    }

    /// A prepared call: its body read, then its attempts.
    async fn forward(
        &self,
        call: &Prepared<'_>,
        incoming: Incoming,
        body_limits: body::BodyLimits,
        connection: Option<Arc<ConnectionBodies>>,
        gateway_id: &str,
        record: &mut AccessRecord,
    ) -> Answer {
        // Small bodies are read whole, so an over-limit body is refused
        // before anything is sent, and the bytes can be sent again. Their
        // hold on the body budget lasts as long as the call's attempts,
        // which may send them again.
        let held = self.lasting.bodies.hold(Reader::Call, connection);
        let (body, _held) = body::read_request(incoming, call.declared, body_limits, held).await?;
        // Keyed and cached calls are boxed: their state (the stores' round
        // trips around the attempts) is large, and every call's future would
        // carry it, and copy it as it starts, if it were inline.
        match (&self.lasting.idempotency, call.key, call.route.cache) {
            (Some(idempotency), Some(key), _) => {
                Box::pin(self.keyed(idempotency, call, key, body, gateway_id, record)).await
            }
            (_, _, Some(rule)) => Box::pin(self.cached(rule, call, body, record)).await,
            _ => self.attempts(call, body, record, &mut false).await,
        }
    }
}

/// The quota's clients: the calls of no `[[clients]]` entry (named by
/// `[rate_limit] client`), then each entry in order.
fn quota_clients(c: &crate::config::Config) -> Vec<QuotaClient> {
    let limit = c.rate_limit.as_ref();
    let unknown = QuotaClient {
        name: limit
            .and_then(|r| r.client.as_deref())
            .unwrap_or(crate::config::DEFAULT_CLIENT)
            .into(),
        share: limit.and_then(|r| r.share).unwrap_or(1.0),
        max_per_second: None,
    };
    std::iter::once(unknown)
        .chain(c.clients.iter().map(|entry| QuotaClient {
            name: entry.name.as_str().into(),
            share: entry.quota_share.unwrap_or(1.0),
            max_per_second: entry.quota_max_per_second,
        }))
        .collect()
}

/// The caller's `x-request-id`, when it is one we can pass on.
pub(crate) fn caller_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let v = headers.get(X_REQUEST_ID)?;
    let ok = !v.is_empty()
        && v.len() <= MAX_REQUEST_ID_LEN
        && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
    ok.then(|| detached(v))
}
