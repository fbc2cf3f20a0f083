//! Test support, one file per thing a test stands up or stands in for:
//!
//! | module | stands in for |
//! | --- | --- |
//! | [`gateway`] | the gateway under test, in this process, with the test config and credentials |
//! | [`binary`] | the gateway under test as the real binary, a child process |
//! | [`finished`] | that binary stopped, with everything it wrote |
//! | [`client`] | the caller: a plain HTTP client, raw-TCP requests |
//! | [`h2_client`] | a caller speaking h2c frame by frame |
//! | [`provider`] | the provider over HTTP: envelopes, fake upstreams, its signature check, its pushes |
//! | [`provider_tls`] | the provider (or a subscriber) over TLS |
//! | [`collector`] | the OTLP collector's TLS listener |
//! | [`redis_server`] | Redis (`redis-server`), plain or TLS |
//! | [`postgres_server`] | PostgreSQL 15, plain or TLS |
//! | [`tinyproxy`] | the egress proxy (`tinyproxy`) |
//! | [`tls`] | a test CA and its certificates, and the `[tls]` trust in them |
//! | [`wire`] | HTTP/1.1 read off a raw stream, by either end |
//! | [`os`] | a free loopback port, a signal to a process |
//!
//! The helpers nearly every test module uses are re-exported here (a test
//! module's `use support::*` takes them); the rest are named from their
//! module.

pub mod binary;
pub mod client;
pub mod collector;
pub mod finished;
pub mod gateway;
pub mod h2_client;
pub mod os;
pub mod postgres_server;
pub mod provider;
pub mod provider_tls;
pub mod redis_server;
pub mod tinyproxy;
pub mod tls;
pub mod wire;

pub use binary::launch;
pub use client::{get, send};
pub use gateway::{ACCESS_KEY, SECRET, config, spawn_gateway};
pub use os::dead_address;
pub use provider::{provider_body, push_signed, upstream_answering};
