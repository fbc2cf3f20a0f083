//! Decisions, pure where possible: which routes may be sent twice, when to
//! retry, when the circuit opens, which profile signs a call, which caller
//! may make it, and a config loaded with its secrets read.

pub mod auth;
pub mod breaker;
pub mod loaded;
pub mod profiles;
pub mod retry;
pub mod routes;
