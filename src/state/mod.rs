//! State shared beyond one call: the read cache, idempotency keys and the
//! quota, each kept in this process (`local.rs`) or in Redis (`redis.rs`).
//!
//! How the gateway reaches its stores — Redis (rate limit, idempotency,
//! read cache) and PostgreSQL (pushed messages) — in plaintext or over TLS,
//! trusting exactly `[tls]` ([`crate::net::tls::Trust`]).
//!
//! * [`redis`]: the one Redis setup the three Redis users share: a lazy
//!   connection manager with their timeouts, `rediss://` over rustls, and
//!   error texts that name TLS and never the URL's password.
//! * [`postgres`]: the `sslmode` of a PostgreSQL URL turned into a rustls
//!   connector that checks what the mode asks for.

pub mod cache;
pub mod idempotency;
pub mod postgres;
pub mod quota;
pub mod redis;
