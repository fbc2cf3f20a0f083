//! The admin listener, apart from traffic: `GET /healthz`, `GET /readyz`,
//! `GET /metrics` (Prometheus text) and `POST /quitquitquit` (drain and exit,
//! for Jobs whose main container has finished).

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::limiter::BackendState;
use crate::metrics::{Exporter, GatewaySource};

/// Process-wide drain state: once draining, readiness fails and listeners
/// stop accepting.
#[derive(Clone, Debug)]
pub struct Drain {
    tx: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            tx: watch::Sender::new(false),
        }
    }
}

impl Drain {
    /// Starts draining; returns `false` if it had already started.
    pub fn start(&self, why: &str) -> bool {
        let first = self
            .tx
            .send_if_modified(|draining| !std::mem::replace(draining, true));
        if first {
            tracing::info!(reason = why, "draining: readiness off, no new connections");
        }
        first
    }

    pub fn is_draining(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes when draining starts.
    pub async fn started(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|draining| *draining).await;
    }
}

/// What the admin endpoints read.
pub struct Admin {
    gateway: GatewaySource,
    exporter: Exporter,
    drain: Drain,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("drain", &self.drain).finish()
    }
}

impl Admin {
    pub fn new(gateway: GatewaySource, drain: Drain) -> Admin {
        Admin {
            exporter: Exporter::new(gateway.clone()),
            gateway,
            drain,
        }
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n".into()),
            (&Method::GET | &Method::HEAD, "/readyz") => self.readiness(),
            (&Method::GET | &Method::HEAD, "/metrics") => {
                let mut r = text(StatusCode::OK, self.exporter.render());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (&Method::POST, "/quitquitquit") => {
                self.drain.start("POST /quitquitquit");
                text(StatusCode::OK, "draining\n".into())
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/quitquitquit") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    /// Ready: config loaded and secrets present (the gateway exists only
    /// then), the rate-limit backend answering or in its declared fallback,
    /// and not draining.
    fn readiness(&self) -> Response<Full<Bytes>> {
        let limiter = match (self.gateway)().limiter().backend_state() {
            BackendState::Local => "local".to_owned(),
            BackendState::Redis => "redis".to_owned(),
            BackendState::Fallback(mode) => {
                format!("redis away, fail_mode {mode:?}").to_lowercase()
            }
        };
        if self.drain.is_draining() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
        }
        text(StatusCode::OK, format!("ready; rate limit: {limiter}\n"))
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
