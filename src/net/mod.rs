//! Bytes and connections: whom TLS trusts, the accept loop and its caps, TLS
//! for callers, request and response bodies, the pooled connection to the
//! provider (directly or through an egress proxy), and which serving thread
//! runs the code. Nothing here decides what a call may do.

pub mod body;
pub mod caller_tls;
pub mod connections;
pub mod drain;
pub mod egress;
pub mod pool;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod worker;
