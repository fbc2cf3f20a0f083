//! The gateway's request path, phase by phase.
//!
//! ```text
//! caller ──► request filter ──► credentials ──► body ──► upstream request ──► provider
//!            (open proxy,        (profile,       (cap,     (rewrite, strip,
//!             CONNECT)            user-id)        buffer)   sign, send)
//! caller ◄── response filter (hop-by-hop, x-request-id) ◄── access log when the body ends
//! ```
//!
//! Every path through [`Gateway::handle`] ends in a response: the provider's,
//! or the gateway's own envelope built from a [`GatewayError`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderMap};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;

use crate::access_log::{AccessLog, AccessRecord};
use crate::body::{self, BodyTooLarge, ResponseBody, UpstreamBody};
use crate::config::{ConfigError, Loaded, SigningConfig};
use crate::error::GatewayError;
use crate::headers::{self, X_PANDAGATE_PROFILE, X_REQUEST_ID};
use crate::ids;
use crate::profiles::{Profile, Profiles};
use crate::signer;
use crate::upstream::Upstream;

/// Longest caller `x-request-id` passed on; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Shared by every connection (behind an `Arc`): nothing in it is per-caller.
#[derive(Debug)]
pub struct Gateway {
    upstream: Upstream,
    profiles: Profiles,
    signing: SigningConfig,
    max_body: u64,
    buffer_body: u64,
    request_timeout: Duration,
    inspect_bytes: usize,
    access_log: AccessLog,
}

impl Gateway {
    pub fn new(loaded: &Loaded, access_log: AccessLog) -> Result<Gateway, ConfigError> {
        let c = &loaded.config;
        Ok(Gateway {
            upstream: Upstream::new(&c.upstream)?,
            profiles: Profiles::new(loaded.profiles.clone(), &c.default_profile),
            signing: c.signing.clone(),
            max_body: c.server.max_request_body_bytes,
            buffer_body: c.server.buffer_body_bytes,
            request_timeout: Duration::from_millis(c.upstream.request_timeout_ms),
            inspect_bytes: c.log.inspect_bytes,
            access_log,
        })
    }

    pub fn access_log(&self) -> &AccessLog {
        &self.access_log
    }

    /// Answers one call. Never fails: errors become envelopes.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let gateway_id = ids::request_id();
        let x_request_id = caller_request_id(req.headers()).unwrap_or_else(|| {
            HeaderValue::from_str(&gateway_id).expect("hex is a valid header value")
        });
        let mut record = AccessRecord {
            started: Instant::now(),
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            x_request_id: x_request_id.clone(),
            profile: None,
            status: 0,
            upstream_status: None,
            attempts: 0,
            error: None,
            gateway_msg: None,
        };

        let (mut response, inspect) = match self.forward(req, &x_request_id, &mut record).await {
            Ok(response) => {
                record.upstream_status = Some(response.status().as_u16());
                (response.map(ResponseBody::upstream), self.inspect_bytes)
            }
            Err(e) => {
                record.error = Some(e.kind());
                record.gateway_msg = Some(e.to_string());
                (e.to_response(&gateway_id).map(ResponseBody::local), 0)
            }
        };
        record.status = response.status().as_u16();
        response.headers_mut().insert(X_REQUEST_ID, x_request_id);
        response
            .body_mut()
            .log_on_finish(record, self.access_log.clone(), inspect);
        response
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        x_request_id: &HeaderValue,
        record: &mut AccessRecord,
    ) -> Result<Response<Incoming>, GatewayError> {
        // Request filter: refuse what must never be forwarded.
        self.upstream.check_target(&req)?;

        // Credentials: which profile signs and which user-id is sent.
        let profile = self
            .profiles
            .select(req.headers().get(X_PANDAGATE_PROFILE))?;
        record.profile = Some(profile.name.clone());
        let user_id = profile
            .user_id(req.headers().get(headers::USER_ID))?
            .cloned();

        // Body: small bodies are read whole, so an over-limit body is refused
        // before anything is sent.
        let (parts, incoming) = req.into_parts();
        let declared = content_length(&parts.headers)?;
        let body = body::read_request(incoming, declared, self.buffer_body, self.max_body).await?;

        // Upstream request: the caller's message with the gateway's headers.
        let mut headers = parts.headers;
        headers::strip_hop_by_hop(&mut headers);
        headers::strip_gateway_owned(&mut headers);
        headers.insert(header::HOST, self.upstream.host.clone());
        headers.insert(X_REQUEST_ID, x_request_id.clone());
        if let Some(user_id) = user_id {
            headers.insert(headers::USER_ID, user_id);
        }
        let uri = self.upstream.uri_for(&parts.uri)?;
        let mut upstream_req = Request::new(body);
        *upstream_req.method_mut() = parts.method;
        *upstream_req.uri_mut() = uri;
        *upstream_req.headers_mut() = headers;

        record.attempts += 1;
        self.sign(profile, upstream_req.headers_mut());
        self.send(upstream_req).await
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
            profile.secret.expose(),
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

    async fn send(&self, req: Request<UpstreamBody>) -> Result<Response<Incoming>, GatewayError> {
        let sent =
            tokio::time::timeout(self.request_timeout, self.upstream.client.request(req)).await;
        let mut response = match sent {
            Err(_) => {
                return Err(GatewayError::UpstreamTimeout(
                    self.request_timeout.as_millis() as u64,
                ));
            }
            Ok(Err(e)) => return Err(classify(&e, self.max_body)),
            Ok(Ok(response)) => response,
        };
        // Response filter: connection-level headers stay on their hop.
        headers::strip_hop_by_hop(response.headers_mut());
        Ok(response)
    }
}

/// Maps a client error to the gateway's answer.
fn classify(e: &hyper_util::client::legacy::Error, max_body: u64) -> GatewayError {
    if e.is_connect() {
        return GatewayError::UpstreamConnect;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.downcast_ref::<BodyTooLarge>().is_some() {
            return GatewayError::BodyTooLarge { limit: max_body };
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
