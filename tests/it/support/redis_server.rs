//! Redis, for the shared quota, cache and idempotency stores: a real
//! `redis-server` (Debian package; `scripts/test` installs it) on a free
//! loopback port, in plain TCP or on a TLS port only, and a connection made
//! the gateway's way for a test to look at what the gateway wrote.
//!
//! Named `redis_server`, not `redis`: a module `redis` would shadow the
//! redis crate in the test modules that glob-import `support`.

use std::path::Path;
use std::time::Duration;

use pandagate::tls::WithTrust;

use super::os::{dead_address, signal};
use super::tls::{Issued, TestCa, trust};

/// A `redis-server` on a free loopback port, stopped when dropped. Needs the
/// Debian package `redis-server` (`.ci/run` installs it).
pub struct RedisServer {
    pub port: u16,
    child: std::process::Child,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(dead_address().port())
    }

    pub fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, &[])
    }

    /// A server that answers only clients that `AUTH` with `password`.
    pub fn start_with_password(password: &str) -> RedisServer {
        Self::start_with(dead_address().port(), &["--requirepass", password])
    }

    fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        let mut child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (install the Debian package redis-server)");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return RedisServer { port, child };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not listen on {port} within 2 s");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) {
        signal(self.child.id(), "-STOP");
    }

    pub fn thaw(&self) {
        signal(self.child.id(), "-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        signal(self.child.id(), "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-server` listening only on a TLS port, with `cert`, requiring
/// `password` when one is given.
pub fn redis_tls(ca: &TestCa, cert: &Issued, password: Option<&str>) -> RedisServer {
    let port = dead_address().port().to_string();
    let mut args: Vec<String> = [
        "--port",
        "0",
        "--tls-port",
        &port,
        "--tls-auth-clients",
        "no",
    ]
    .map(str::to_owned)
    .into();
    for (flag, file) in [
        ("--tls-cert-file", &cert.cert),
        ("--tls-key-file", &cert.key),
        ("--tls-ca-cert-file", &ca.ca_file),
    ] {
        args.push(flag.to_owned());
        args.push(file.display().to_string());
    }
    if let Some(password) = password {
        args.extend(["--requirepass".to_owned(), password.to_owned()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    RedisServer::start_with(port.parse().unwrap(), &args)
}

/// The `rediss://` URL of a TLS `redis-server`, with `password` if any.
pub fn rediss_url(server: &RedisServer, password: Option<&str>) -> String {
    match password {
        Some(pw) => format!("rediss://:{pw}@127.0.0.1:{}", server.port),
        None => format!("rediss://127.0.0.1:{}", server.port),
    }
}

/// A connection to the Redis at `url` (`rediss://`) trusting `ca_file`,
/// made the gateway's way: for a test to look at what the gateway wrote.
pub fn redis_manager(url: &str, ca_file: &Path) -> redis::aio::ConnectionManager {
    let url = pandagate::config::RedisUrl::parse(url, "test").unwrap();
    pandagate::redis::connect(
        &WithTrust::new(url, trust(Some(ca_file))),
        "test",
        std::time::Duration::from_secs(5),
    )
    .unwrap()
}
