//! `[server]`: the listeners and the limits every caller's connection is held to.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, at_most, positive};
use super::secrets::SecretSource;
use crate::base::body_budget::SHARE_DIVISOR;

/// The listener that internal services call.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (env `PANDAGATE_LISTEN`). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Read-only operator endpoints: health, readiness, metrics and the
    /// pending deliveries (env `PANDAGATE_ADMIN_LISTEN`). Only `GET` and
    /// `HEAD`: it may be opened to the kubelet and to Prometheus.
    pub admin_listen: SocketAddr,
    /// The endpoints that change state: drain and exit, cache purge,
    /// callback replay (env `PANDAGATE_CONTROL_LISTEN`). A loopback address
    /// unless a token is set (`control_token_env` or `control_token_file`),
    /// which then every call must bear (`Authorization: Bearer <token>`).
    pub control_listen: SocketAddr,
    /// The environment variable holding the control listener's token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_token_env: Option<String>,
    /// A file holding the control listener's token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_token_file: Option<PathBuf>,
    /// Serve TLS on the traffic and callback listeners with this
    /// certificate chain (PEM, leaf first) and `tls_key_file`; HTTP/1.1 and
    /// HTTP/2 by ALPN. Both files are re-read when they change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of `tls_cert_file` (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// With TLS: callers on the traffic listener must present a certificate
    /// signed by a CA of this PEM file; a `[[clients]]` entry with
    /// `cert_san` is identified by it. The callback listener does not ask
    /// (the provider has no such certificate). Read at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Time a client has to send a complete HTTP/1 request head, from its
    /// first byte, in milliseconds.
    pub header_read_timeout_ms: u64,
    /// Time a client has to send the complete request body, from the end of
    /// its head, in milliseconds; a body not in by then gets 408 and nothing
    /// of the call is forwarded or stored. Also on the callback listener.
    pub body_read_timeout_ms: u64,
    /// A connection with no call in progress and no byte read or written
    /// for this long is closed (a client that connects and never sends
    /// anything included), in milliseconds.
    pub idle_timeout_ms: u64,
    /// Largest request head (request line and headers), in bytes; at least 8192.
    pub max_header_bytes: usize,
    /// Most request headers accepted in one request.
    pub max_headers: usize,
    /// Most open connections per listener (traffic, callbacks and admin
    /// each have their own); one over the cap is accepted and closed at once.
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams (calls) on one connection.
    pub http2_max_concurrent_streams: u32,
    /// A path a server could resolve to another one (docs/requests.md,
    /// "Ambiguous paths"): `refuse` (400, nothing sent) or `forward` (sent byte for
    /// byte, classified `unknown`, matching no `[[routes]]` entry).
    pub ambiguous_paths: AmbiguousPaths,
    /// Largest request body, in bytes; larger bodies get 413.
    pub max_request_body_bytes: u64,
    /// Bodies up to this many bytes are read whole before anything is sent
    /// upstream, so an over-limit body is refused before a byte is forwarded
    /// and the body can be re-sent. Larger bodies stream.
    pub buffer_body_bytes: u64,
    /// Most bytes of request bodies the process holds while reading them
    /// (calls' buffered bodies and push bodies, all listeners and threads
    /// together). A body that would pass it gets 503 `overloaded` with
    /// `Retry-After`; one connection's bodies, and all pushes together,
    /// may hold a quarter of it each. At least 4 × `buffer_body_bytes`.
    pub max_buffered_body_bytes: u64,
    /// On SIGTERM/SIGINT, how long calls in flight may take to finish, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// How often secret files (profiles' secrets, clients' token files) are
    /// re-read for rotation, in milliseconds.
    pub secret_poll_ms: u64,
    /// How often the config file is read again; a changed file is reloaded
    /// as on SIGHUP, in milliseconds. Read at start.
    pub config_poll_ms: u64,
    /// Threads serving calls (env `PANDAGATE_WORKER_THREADS`), like nginx's
    /// `worker_processes`: 0 = one per CPU the process may use (a cgroup
    /// CPU quota counts). Each has its own single-threaded runtime, its own
    /// `SO_REUSEPORT` listeners and its own upstream connection pool; the
    /// admin listener, signals, reloads and push deliveries run on the main
    /// thread. Read at start; a reload does not change it.
    pub worker_threads: usize,
}

impl ServerConfig {
    /// Where the control listener's token comes from, if it has one.
    pub fn control_token(&self) -> Result<Option<SecretSource>, ConfigError> {
        SecretSource::from_keys(
            self.control_token_env.as_deref(),
            self.control_token_file.as_deref(),
            "server.control_token",
        )
    }
}

/// What happens to a call whose path is ambiguous.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AmbiguousPaths {
    #[default]
    Refuse,
    Forward,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            control_listen: SocketAddr::from(([127, 0, 0, 1], 9902)),
            control_token_env: None,
            control_token_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            idle_timeout_ms: 75_000,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            http2_max_concurrent_streams: 100,
            ambiguous_paths: AmbiguousPaths::Refuse,
            max_request_body_bytes: 8 * 1024 * 1024,
            buffer_body_bytes: 1024 * 1024,
            max_buffered_body_bytes: 64 * 1024 * 1024,
            shutdown_grace_ms: 20_000,
            secret_poll_ms: 1_000,
            config_poll_ms: 1_000,
            worker_threads: 0,
        }
    }
}

impl ServerConfig {
    /// Every limit positive, and within what can be allocated or spawned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("server.header_read_timeout_ms", self.header_read_timeout_ms),
            ("server.body_read_timeout_ms", self.body_read_timeout_ms),
            ("server.idle_timeout_ms", self.idle_timeout_ms),
            ("server.max_header_bytes", self.max_header_bytes as u64),
            ("server.max_headers", self.max_headers as u64),
            ("server.max_connections", self.max_connections as u64),
            (
                "server.http2_max_concurrent_streams",
                u64::from(self.http2_max_concurrent_streams),
            ),
            ("server.max_request_body_bytes", self.max_request_body_bytes),
            ("server.buffer_body_bytes", self.buffer_body_bytes),
            (
                "server.max_buffered_body_bytes",
                self.max_buffered_body_bytes,
            ),
            ("server.shutdown_grace_ms", self.shutdown_grace_ms),
            ("server.secret_poll_ms", self.secret_poll_ms),
            ("server.config_poll_ms", self.config_poll_ms),
        ] {
            positive(key, value)?;
        }
        for (key, value, max) in [
            (
                "server.max_header_bytes",
                self.max_header_bytes as u64,
                1 << 20,
            ),
            ("server.max_headers", self.max_headers as u64, 1_000),
            (
                "server.max_connections",
                self.max_connections as u64,
                1_000_000,
            ),
            (
                "server.http2_max_concurrent_streams",
                u64::from(self.http2_max_concurrent_streams),
                10_000,
            ),
            ("server.worker_threads", self.worker_threads as u64, 1_024),
        ] {
            at_most(key, value, max)?;
        }
        if self.max_header_bytes < 8192 {
            return Err(ConfigError::new(
                "server.max_header_bytes",
                "must be at least 8192",
            ));
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "server.tls_key_file",
                    "tls_cert_file needs its key",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "server.tls_cert_file",
                    "tls_key_file needs its certificate",
                ));
            }
            _ => {}
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return Err(ConfigError::new(
                "server.tls_client_ca_file",
                "client certificates are asked for in a TLS handshake: set tls_cert_file and \
                 tls_key_file too",
            ));
        }
        let token = self.control_token()?;
        if token.is_none() && !self.control_listen.ip().is_loopback() {
            return Err(ConfigError::new(
                "server.control_listen",
                format_args!(
                    "{} is not a loopback address: the endpoints that drain the gateway, purge \
                     its cache and replay pushes need a token off loopback (control_token_env \
                     or control_token_file)",
                    self.control_listen
                ),
            ));
        }
        if self.control_listen.port() != 0
            && (self.control_listen == self.admin_listen || self.control_listen == self.listen)
        {
            return Err(ConfigError::new(
                "server.control_listen",
                "must differ from server.listen and server.admin_listen",
            ));
        }
        if self.buffer_body_bytes > self.max_request_body_bytes {
            return Err(ConfigError::new(
                "server.buffer_body_bytes",
                "must not exceed server.max_request_body_bytes",
            ));
        }
        // A connection may hold a quarter of the budget: it must fit one
        // body read whole.
        if self.max_buffered_body_bytes / SHARE_DIVISOR < self.buffer_body_bytes {
            return Err(ConfigError::new(
                "server.max_buffered_body_bytes",
                format_args!(
                    "must be at least {SHARE_DIVISOR} × server.buffer_body_bytes ({})",
                    self.buffer_body_bytes.saturating_mul(SHARE_DIVISOR)
                ),
            ));
        }
        Ok(())
    }
}
