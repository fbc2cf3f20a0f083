//! Prepare: everything decided before the body is read — the request
//! filter, the caller and its profile, the route, the idempotency key, and
//! the upstream target and headers. Synchronous; touches only the record.

use http::HeaderValue;
use http::header::{self, HeaderMap};

use super::Gateway;
use crate::base::error::GatewayError;
use crate::config::AmbiguousPaths;
use crate::observe::access_log::AccessRecord;
use crate::pandapon::headers::{self, X_PANDAGATE_PROFILE, X_REQUEST_ID};
use crate::policy::profiles::Profile;
use crate::policy::routes::{Route, is_ambiguous};
use crate::state::cache::{self, CallerWish};
use crate::state::idempotency::{self, IDEMPOTENCY_KEY, Key};

/// A call as it will be sent upstream, before its body is read and before
/// any attempt is signed.
#[derive(Debug)]
pub(crate) struct Prepared<'a> {
    pub profile: &'a Profile,
    /// The caller among the quota's clients (0: no known client).
    pub client: usize,
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
        let (profile, client) = match self.clients.authenticate(
            &parts.headers,
            parts.extensions.get::<crate::net::tls::PeerIdentity>(),
        )? {
            None => (self.profiles.select(requested)?, 0),
            Some(client) => {
                record.client = Some(client.name.clone());
                (client.select(&self.profiles, requested)?, client.quota)
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
        let key = match &self.lasting.idempotency {
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
        // Named for the log after the key, whose owner is the authenticated
        // caller only.
        if record.client.is_none() {
            record.client.clone_from(&self.sidecar_client);
        }

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
        if self.lasting.idempotency.is_some() {
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
            client,
            route,
            declared,
            method: parts.method,
            uri,
            headers,
            key,
            wish,
        })
    }
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
