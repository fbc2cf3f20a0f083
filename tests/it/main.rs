//! The integration tests: one binary, one module per behaviour.
//!
//! One binary is linked once against the whole gateway after a change,
//! where a binary per behaviour would each be linked again. `cargo test
//! --test it NAME` picks tests by name, and a module's path (`cache::`,
//! say) picks one behaviour.
//!
//! The helpers live in `tests/it/support/`, a module of this binary like
//! the others, rather than in `tests/support/` reached by `#[path]`: this
//! binary is their only user, and cargo takes no folder under `tests/`
//! for a test target unless it has a `main.rs`, so nothing else compiles
//! them.

mod support;

mod access_log;
mod auth;
mod body_budget;
mod cache;
mod callbacks;
mod callbacks_postgres;
mod callbacks_process;
mod caller_tls;
mod cli;
mod dashboards;
mod edges;
mod egress_proxy;
mod errors;
mod forwarding;
mod fuzz_regressions;
mod idempotency;
mod large_bodies;
mod metrics;
mod no_leaks;
mod quota_shares;
mod rate_limit;
mod redis_topologies;
mod reload;
mod retries;
mod shutdown;
mod signing;
mod stalls;
mod status_page;
mod traces;
mod unread_logs;
mod upstream_tls;
