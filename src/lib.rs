//! pandagate: a signing gateway for the PandaPon OpenAPI.
//!
//! Internal services call the gateway over plain HTTP with no credentials; the
//! gateway injects the AccessKey and user-id, signs every upstream attempt,
//! forwards over HTTPS and writes one access-log line per call carrying the
//! provider's `requestId` and `code`.
//!
//! Reading order: [`config`] (what can be set) → [`proxy`] (the request phases,
//! top to bottom) → [`signer`] (the signature recipe) → [`error`] (the one
//! mapping from failures to HTTP answers) → [`app`] (how the process is put
//! together).
//!
//! # Layers
//!
//! Lowest first. A module uses only modules of lower layers, never one of
//! its own layer or above; `scripts/layers.py` checks it in CI.
//!
//! 1. leaves: error ids secret signer headers envelope redact connections log_queue worker drain body_budget
//! 2. config: config
//! 3. trust: tls
//! 4. reaching the stores: stores
//! 5. policies: routes retry breaker limiter profiles body telemetry idempotency traces egress
//! 6. built on them: auth upstream access_log cache caller_tls
//! 7. loaded and counted: loaded metrics
//! 8. one call's log line: call_log
//! 9. serving parts: proxy callbacks server sandbox
//! 10. around the gateway: reload exporter
//! 11. operations: admin
//! 12. the process: app demo fuzzing
//! 13. the command line: cli
#![forbid(unsafe_code)]

// 1. leaves
pub mod body_budget;
pub mod connections;
pub mod drain;
pub mod envelope;
pub mod error;
pub mod headers;
pub mod ids;
pub mod log_queue;
pub mod redact;
pub mod secret;
pub mod signer;
pub mod worker;
// 2. config
pub mod config;
// 3. trust
pub mod tls;
// 4. reaching the stores
pub mod stores;
// 5. policies
pub mod body;
pub mod breaker;
pub mod egress;
pub mod idempotency;
pub mod limiter;
pub mod profiles;
pub mod retry;
pub mod routes;
pub mod telemetry;
pub mod traces;
// 6. built on them
pub mod access_log;
pub mod auth;
pub mod cache;
pub mod caller_tls;
pub mod upstream;
// 7. loaded and counted
pub mod loaded;
pub mod metrics;
// 8. one call's log line
pub mod call_log;
// 9. serving parts
pub mod callbacks;
pub mod proxy;
pub mod sandbox;
pub mod server;
// 10. around the gateway
pub mod exporter;
pub mod reload;
// 11. operations
pub mod admin;
// 12. the process
pub mod app;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
// 13. the command line
pub mod cli;
