//! pandagate: a signing gateway for the PandaPon OpenAPI.
//!
//! Internal services call the gateway over plain HTTP with no credentials; the
//! gateway injects the AccessKey and user-id, signs every upstream attempt,
//! forwards over HTTPS and writes one access-log line per call carrying the
//! provider's `requestId` and `code`.
//!
//! Reading order: [`config`] (what can be set) → [`proxy`] (the request phases,
//! top to bottom) → [`signer`] (the signature recipe) → [`error`] (the one
//! mapping from failures to HTTP answers).
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod auth;
pub mod body;
pub mod breaker;
pub mod call_log;
pub mod callbacks;
pub mod cli;
pub mod config;
pub mod connections;
pub mod demo;
pub mod envelope;
pub mod error;
pub mod exporter;
#[doc(hidden)]
pub mod fuzzing;
pub mod headers;
pub mod ids;
pub mod limiter;
pub mod loaded;
pub mod log_queue;
pub mod metrics;
pub mod profiles;
pub mod proxy;
pub mod redact;
pub mod reload;
pub mod retry;
pub mod routes;
pub mod sandbox;
pub mod secret;
pub mod server;
pub mod signer;
pub mod telemetry;
pub mod upstream;
