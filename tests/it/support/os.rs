//! What the tests ask of the machine: a free loopback port, and a signal
//! to a process (the gateway's, or a store's).

use std::net::SocketAddr;

/// A loopback address on which nothing listens.
pub fn dead_address() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Sends `sig` (e.g. "-TERM") to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}
