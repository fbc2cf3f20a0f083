//! The operator endpoints, apart from traffic, on two listeners:
//!
//! * the admin listener (`server.admin_listen`) only reads: `GET /` (the
//!   status page, [`status`]), `GET /healthz`,
//!   `GET /readyz`, `GET /metrics` (Prometheus text) and, with
//!   `[callbacks]`, `GET /callbacks[?dead=1][&limit=N][&after=NEXT]` (a page
//!   of pending or dead deliveries, JSON `{"deliveries": [...], "next":
//!   ...}`). It may be opened to the kubelet and to Prometheus.
//! * the control listener (`server.control_listen`, [`control`]) changes
//!   state: `POST /quitquitquit`, `POST /cache/purge`, `POST
//!   /callbacks/replay`. It is on loopback, or demands a token.

mod control;
mod status;

pub use control::Control;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::state::quota::BackendState;
use std::sync::Arc;

use crate::callbacks::{Callbacks, Cursor, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, NotACursor};
pub use crate::net::drain::Drain;
use crate::process::exporter::{Exporter, GatewaySource, Process};

/// What the admin endpoints read.
pub struct Admin {
    gateway: GatewaySource,
    exporter: Exporter,
    drain: Drain,
    callbacks: Option<Arc<Callbacks>>,
    page: status::Page,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("drain", &self.drain).finish()
    }
}

impl Admin {
    /// `process`: what `/metrics` reports besides the gateway, and the
    /// push receiver the `/callbacks` endpoints operate.
    pub fn new(gateway: GatewaySource, drain: Drain, process: Process) -> Admin {
        let server = gateway().server_config().clone();
        let control_token =
            server.control_token_env.is_some() || server.control_token_file.is_some();
        Admin {
            callbacks: process.callbacks.clone(),
            exporter: Exporter::with_process(gateway.clone(), process),
            gateway,
            drain,
            page: status::Page::new(server.control_listen, control_token),
        }
    }

    /// The status page shows its actions at `control`, with a bearer token
    /// when `token`.
    pub fn with_control(mut self, control: std::net::SocketAddr, token: bool) -> Admin {
        self.page = status::Page::new(control, token);
        self
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/") => self.status_page().await,
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
            (&Method::GET, "/callbacks") => {
                let dead = has_flag(req.uri().query(), "dead");
                let (limit, after) = match page_of(req.uri().query()) {
                    Ok(page) => page,
                    Err(why) => return text(StatusCode::BAD_REQUEST, format!("{why}\n")),
                };
                with_callbacks(self.callbacks.as_ref(), |cb| async move {
                    cb.list(dead, after, limit)
                        .await
                        .map(|page| serde_json::json!(page))
                })
                .await
            }
            (_, "/quitquitquit" | "/cache/purge" | "/callbacks/replay") => text(
                StatusCode::NOT_FOUND,
                "not on the admin listener, which only reads: this endpoint is on the control \
                 listener (server.control_listen)\n"
                    .into(),
            ),
            (_, "/" | "/healthz" | "/readyz" | "/metrics" | "/callbacks") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    /// The status page, from what `/metrics` and `/readyz` say now.
    async fn status_page(&self) -> Response<Full<Bytes>> {
        let pushes = match &self.callbacks {
            None => None,
            Some(cb) => {
                let count = |dead| async move {
                    cb.list(dead, None, LIST_LIMIT_MAX)
                        .await
                        .map(|page| (page.deliveries.len(), page.next.is_some()))
                        .unwrap_or((0, false))
                };
                let ((pending, more_pending), (dead, more_dead)) =
                    (count(false).await, count(true).await);
                Some(status::Pushes {
                    pending,
                    dead,
                    more: more_pending || more_dead,
                })
            }
        };
        let (_, ready) = self.ready();
        let html = self.page.render(
            &(self.gateway)(),
            &self.exporter.render(),
            &ready,
            pushes.as_ref(),
        );
        let mut r = text(StatusCode::OK, html);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/html; charset=utf-8"),
        );
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        r
    }

    /// Ready: config loaded and secrets present (the gateway exists only
    /// then), the rate-limit backend answering or in its declared fallback,
    /// and not draining.
    fn readiness(&self) -> Response<Full<Bytes>> {
        let (status, said) = self.ready();
        text(status, said)
    }

    fn ready(&self) -> (StatusCode, String) {
        let limiter = match (self.gateway)().limiter().backend_state() {
            BackendState::Local => "local".to_owned(),
            BackendState::Redis => "redis".to_owned(),
            BackendState::Fallback(mode) => {
                format!("redis away, fail_mode {mode:?}").to_lowercase()
            }
        };
        if self.drain.is_draining() {
            return (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
        }
        (StatusCode::OK, format!("ready; rate limit: {limiter}\n"))
    }
}

/// Runs `f` on the push receiver, answering its result as JSON; 404
/// without `[callbacks]`.
async fn with_callbacks<F, Fut>(callbacks: Option<&Arc<Callbacks>>, f: F) -> Response<Full<Bytes>>
where
    F: FnOnce(Arc<Callbacks>) -> Fut,
    Fut: Future<Output = Result<serde_json::Value, crate::callbacks::CallbackError>>,
{
    let Some(cb) = callbacks.cloned() else {
        return text(StatusCode::NOT_FOUND, "no [callbacks] configured\n".into());
    };
    match f(cb).await {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = text(status, format!("{v}\n"));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Whether `query` sets parameter `name` to `1`.
fn has_flag(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == name && v == "1"))
}

/// The first value of parameter `name` in `query`, decoded
/// (`application/x-www-form-urlencoded`: `%XX` escapes, `+` for a space).
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The page a listing asks for: `limit` (1 to `LIST_LIMIT_MAX`, default
/// `LIST_LIMIT_DEFAULT`) and `after` (the previous page's `next`); `Err`
/// says which is wrong.
fn page_of(query: Option<&str>) -> Result<(usize, Option<Cursor>), String> {
    let limit = match query_value(query, "limit") {
        None => LIST_LIMIT_DEFAULT,
        Some(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=LIST_LIMIT_MAX).contains(n))
            .ok_or_else(|| {
                format!("limit must be a whole number from 1 to {LIST_LIMIT_MAX}, not {v:?}")
            })?,
    };
    let after = query_value(query, "after")
        .map(|v| v.parse().map_err(|e: NotACursor| format!("after: {e}")))
        .transpose()?;
    Ok((limit, after))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        let key = "0a1b|http://orders.internal/hooks/a+b";
        for query in [
            "id=0a1b%7Chttp%3A%2F%2Forders.internal%2Fhooks%2Fa%2Bb",
            "id=0a1b%7chttp://orders.internal/hooks/a%2bb",
            "all-dead=0&id=0a1b%7Chttp://orders.internal/hooks/a%2Bb&id=other",
        ] {
            assert_eq!(
                query_value(Some(query), "id").as_deref(),
                Some(key),
                "{query}"
            );
        }
        assert_eq!(
            query_value(Some("id=a+b%20c"), "id").as_deref(),
            Some("a b c")
        );
        assert_eq!(query_value(Some("id="), "id").as_deref(), Some(""));
        assert_eq!(query_value(Some("dead=1"), "id"), None);
        assert_eq!(query_value(None, "id"), None);
    }

    #[test]
    fn flags_are_set_by_1_only() {
        assert!(has_flag(Some("dead=1"), "dead"));
        assert!(has_flag(Some("x=2&dead=%31"), "dead"));
        assert!(has_flag(Some("all-dead=1"), "all-dead"));
        for query in ["dead=true", "dead", "dead=0", "undead=1", "all-dead=1"] {
            assert!(!has_flag(Some(query), "dead"), "{query}");
        }
        assert!(!has_flag(None, "dead"));
    }

    #[test]
    fn a_page_is_100_by_default_and_bad_limits_and_cursors_say_what_is_wrong() {
        assert_eq!(page_of(None), Ok((100, None)));
        assert_eq!(page_of(Some("dead=1&limit=1")), Ok((1, None)));
        assert_eq!(page_of(Some("limit=1000")), Ok((1000, None)));
        let next = format!("5-{}", "a".repeat(32));
        let (_, after) = page_of(Some(&format!("after={next}"))).unwrap();
        assert_eq!(after.map(|c| c.to_string()), Some(next));
        for bad in ["0", "1001", "-1", "x", "", "2.5"] {
            let why = page_of(Some(&format!("limit={bad}"))).unwrap_err();
            assert_eq!(
                why,
                format!("limit must be a whole number from 1 to 1000, not {bad:?}")
            );
        }
        assert_eq!(
            page_of(Some("after=abc")).unwrap_err(),
            r#"after: not a cursor from a listing's "next""#
        );
    }
}
