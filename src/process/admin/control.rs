//! The control listener: the operator endpoints that change state.
//!
//! * `POST /quitquitquit`: drain and exit (for Jobs whose main container has
//!   finished);
//! * `POST /reload`: reload the config now, all or nothing (200 applied,
//!   422 refused with the key at fault; the running config stays);
//! * `POST /cache/purge?prefix=P`: drop the read cache's entries whose path
//!   starts with `P`, here and in Redis (503 when Redis could not be
//!   purged to the end: purging again goes on);
//! * `POST /callbacks/replay?id=ID|all-dead=1`: put dead letters back in
//!   line (with `[callbacks]`).
//!
//! It listens on `server.control_listen` (loopback by default). With a token
//! (`server.control_token_env` or `_file`) every request must carry
//! `Authorization: Bearer <token>`, compared in constant time; config
//! validation refuses an address off loopback without one.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{Drain, has_flag, json, query_value, text, with_callbacks};
use crate::base::secret::Secret;
use crate::callbacks::Callbacks;
use crate::process::exporter::GatewaySource;
use crate::process::reload::{Outcome, Reloader};

/// What the control endpoints act on.
pub struct Control {
    gateway: GatewaySource,
    drain: Drain,
    callbacks: Option<Arc<Callbacks>>,
    token: Option<Secret>,
    /// What `POST /reload` runs; none: it answers 404.
    reloader: Option<Arc<Reloader>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("drain", &self.drain)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Control {
    pub fn new(
        gateway: GatewaySource,
        drain: Drain,
        callbacks: Option<Arc<Callbacks>>,
        token: Option<Secret>,
    ) -> Control {
        Control {
            gateway,
            drain,
            callbacks,
            token,
            reloader: None,
        }
    }

    /// Serves `POST /reload` with `reloader`.
    pub fn with_reloader(mut self, reloader: Arc<Reloader>) -> Control {
        self.reloader = Some(reloader);
        self
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.authorized(&req) {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "the control listener needs Authorization: Bearer <server.control_token>\n".into(),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
        let query = req.uri().query();
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/quitquitquit") => {
                self.drain.start("POST /quitquitquit");
                text(StatusCode::OK, "draining\n".into())
            }
            (&Method::POST, "/reload") => self.reload().await,
            (&Method::POST, "/cache/purge") => {
                let Some(prefix) = query_value(query, "prefix") else {
                    return text(StatusCode::BAD_REQUEST, "give prefix=/path/\n".into());
                };
                self.purge(&prefix).await
            }
            (&Method::POST, "/callbacks/replay") => {
                let id = query_value(query, "id");
                if id.is_none() && !has_flag(query, "all-dead") {
                    return text(StatusCode::BAD_REQUEST, "give id=ID or all-dead=1\n".into());
                }
                with_callbacks(self.callbacks.as_ref(), |cb| async move {
                    cb.replay(id)
                        .await
                        .map(|n| serde_json::json!({ "replayed": n }))
                })
                .await
            }
            (_, "/quitquitquit" | "/reload" | "/cache/purge" | "/callbacks/replay") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: POST\n".into(),
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    /// With a token, the request bears it; without one, anyone who can
    /// reach the (loopback) listener may act.
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .is_some_and(|(_, presented)| token.matches(presented.trim().as_bytes()))
    }

    /// Reloads the config now: 200 when applied, 422 when refused (the
    /// running config stays), with the key at fault.
    async fn reload(&self) -> Response<Full<Bytes>> {
        let Some(reloader) = self.reloader.clone() else {
            return text(StatusCode::NOT_FOUND, "not found\n".into());
        };
        let outcome = tokio::task::spawn_blocking(move || reloader.reload("POST /reload")).await;
        match outcome {
            Ok(Outcome::Applied { profiles }) => json(
                StatusCode::OK,
                &serde_json::json!({ "result": "applied", "profiles": profiles }),
            ),
            Ok(Outcome::Refused(e)) => json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &serde_json::json!({ "result": "refused", "key": e.key, "error": e.message }),
            ),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the reload did not finish\n".into(),
            ),
        }
    }

    async fn purge(&self, prefix: &str) -> Response<Full<Bytes>> {
        let cache = (self.gateway)().cache().clone();
        let purged = cache.purge_everywhere(prefix).await;
        let redis = purged.shared.map(|s| s.removed);
        let body = serde_json::json!({
            "purged": purged.here + redis.unwrap_or(0),
            "memory": purged.here,
            "redis": redis,
            "complete": purged.complete(),
        });
        // Not finished: some of the prefix's entries may remain in Redis,
        // and purging again goes on.
        let status = if purged.complete() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json(status, &body)
    }
}
