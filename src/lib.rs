//! pandagate: a signing gateway for the PandaPon OpenAPI.
//!
//! Internal services call the gateway over plain HTTP with no credentials; the
//! gateway injects the AccessKey and user-id, signs every upstream attempt,
//! forwards over HTTPS and writes one access-log line per call carrying the
//! provider's `requestId` and `code`.
//!
//! # Layout
//!
//! The folders are the layers, lowest first, in the order they are declared
//! below. A folder uses only folders declared before it, never one after;
//! `scripts/layers.py` checks it in CI, so no import can close a cycle.
//!
//! * `base/`: the error type and its one mapping to answers, ids, secrets,
//!   redaction, the body budget. No knowledge of an HTTP call.
//! * `pandapon/`: the provider's rules: signer, envelope, headers, sandbox.
//! * `config/`: one file per section of the TOML, each with its `validate`.
//! * `net/`: bytes and connections: TLS trust, the accept loop, TLS for
//!   callers, bodies, the provider connection and the egress proxy.
//! * `policy/`: decisions: routes, retry, breaker, profiles, caller auth, a
//!   config loaded with its secrets.
//! * `state/`: what outlives a call: read cache, idempotency keys, quota;
//!   each in this process or in Redis; the one Redis and PostgreSQL setup.
//! * `observe/`: access log, per-call metrics, traces, diagnostics.
//! * `gateway/`: one call from the caller to the provider and back, a file
//!   per phase.
//! * `callbacks/`: pushed messages: verified, stored, delivered.
//! * `process/`: the process around them: app, reload, `/metrics`, admin,
//!   demo, fuzz entry points.
//! * `cli`: the command line.
//!
//! Reading order: [`config`] (what can be set) → `gateway` (the request
//! phases, top to bottom) → `pandapon::signer` (the signature recipe) →
//! `base::error` (the one mapping from failures to HTTP answers) →
//! `process::app` (how the process is put together).
#![forbid(unsafe_code)]

// Each declaration is a layer; a comment between them keeps rustfmt from
// sorting them out of order.
// 1.
mod base;
// 2.
mod pandapon;
// 3.
pub mod config;
// 4.
mod net;
// 5.
mod policy;
// 6.
mod state;
// 7.
mod observe;
// 8.
pub mod gateway;
// 9.
pub mod callbacks;
// 10.
mod process;
// 11.
mod cli;

// What the binary, the integration tests, the benchmarks and the fuzz targets
// reach; the rest of each folder stays inside the crate.
pub use base::{body_budget, ids};
pub use cli::main;
pub use net::{egress, server, tls};
pub use observe::{access_log, metrics};
pub use pandapon::{envelope, signer};
pub use policy::{breaker, loaded, profiles, routes};
#[doc(hidden)]
pub use process::fuzzing;
pub use process::{exporter, reload};
pub use state::{idempotency, postgres, quota, redis};
