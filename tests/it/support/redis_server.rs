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

    pub fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        Self::spawn(None, port, extra)
    }

    /// `redis-server` with `conf` (its config file, which must come
    /// first) and `extra` after the port and bind options.
    fn spawn(conf: Option<&Path>, port: u16, extra: &[&str]) -> RedisServer {
        let mut command = std::process::Command::new("redis-server");
        command.args(conf);
        let mut child = command
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
pub fn redis_manager(url: &str, ca_file: &Path) -> pandagate::redis::Conn {
    let url = pandagate::config::RedisUrl::parse(url, "test").unwrap();
    pandagate::redis::connect(
        &WithTrust::new(url, trust(Some(ca_file))),
        "test",
        std::time::Duration::from_secs(5),
    )
    .unwrap()
}

/// `redis-cli` with `args`, bounded to 20 s; its stdout, or a panic saying
/// what it printed.
pub fn redis_cli(args: &[&str]) -> String {
    redis_cli_try(args).unwrap_or_else(|e| panic!("{e}"))
}

/// `redis-cli` with `args`, bounded to 20 s: its stdout, or what it said
/// when it failed (an error reply included).
pub fn redis_cli_try(args: &[&str]) -> Result<String, String> {
    let mut child = std::process::Command::new("redis-cli")
        .env("REDISCLI_AUTH", TOPOLOGY_PASSWORD)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli runs (Debian package redis-tools, with redis-server)");
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-cli {args:?} did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && !stdout.starts_with("ERR") {
        Ok(stdout)
    } else {
        Err(format!(
            "redis-cli {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Polls `done` every 50 ms for at most `within`; panics with `what`.
pub fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The password of every server of a Cluster or a sentinel setup (and of
/// the sentinel): clients reach them as they reach a standalone server
/// with one.
pub const TOPOLOGY_PASSWORD: &str = "topology-pw-5";

/// A Redis Cluster of `masters` masters and no replicas, each a
/// `redis-server --cluster-enabled yes` on free loopback ports (its bus on
/// another), made one cluster by `redis-cli --cluster create`; stopped when
/// dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// redis-cli's options to reach the nodes (TLS, its CA).
    cli_tls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        Self::start_over(masters, 0, None)
    }

    /// `masters` masters with one replica each, every master's replica in
    /// sync before it returns.
    pub fn start_with_replicas(masters: usize) -> RedisCluster {
        let cluster = Self::start_over(masters, 1, None);
        for n in &cluster.nodes {
            wait_until(
                "each master has its replica in sync",
                Duration::from_secs(30),
                || {
                    let info = cluster.cli(Some(n.port), &["info", "replication"]);
                    info.contains("role:slave") && info.contains("master_link_status:up")
                        || info.contains("role:master") && info.contains("connected_slaves:1")
                },
            );
        }
        cluster
    }

    /// Freezes every replica (SIGSTOP): their masters go on, nothing is
    /// copied to them.
    pub fn freeze_replicas(&self) {
        for n in &self.nodes {
            if self.cli(Some(n.port), &["role"]).starts_with("slave") {
                n.freeze();
            }
        }
    }

    /// The same cluster, on TLS ports only (its bus too), serving `cert`
    /// signed by `ca`.
    pub fn start_tls(masters: usize, ca: &TestCa, cert: &Issued) -> RedisCluster {
        Self::start_over(masters, 0, Some((ca, cert)))
    }

    fn start_over(
        masters: usize,
        replicas: usize,
        tls: Option<(&TestCa, &Issued)>,
    ) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let tls_args: Vec<String> = match tls {
            None => Vec::new(),
            Some((ca, cert)) => [
                "--tls-cluster",
                "yes",
                "--tls-auth-clients",
                "no",
                "--tls-cert-file",
                cert.cert.to_str().unwrap(),
                "--tls-key-file",
                cert.key.to_str().unwrap(),
                "--tls-ca-cert-file",
                ca.ca_file.to_str().unwrap(),
            ]
            .map(str::to_owned)
            .into(),
        };
        let cli_tls: Vec<String> = match tls {
            None => Vec::new(),
            Some((ca, _)) => vec![
                "--tls".into(),
                "--cacert".into(),
                ca.ca_file.display().to_string(),
            ],
        };
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|i| {
                let port = dead_address().port();
                let bus = dead_address().port().to_string();
                let conf = dir.path().join(format!("nodes-{i}.conf"));
                let mut args: Vec<String> = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-config-file",
                    conf.to_str().unwrap(),
                    "--cluster-node-timeout",
                    "2000",
                    "--requirepass",
                    TOPOLOGY_PASSWORD,
                    "--masterauth",
                    TOPOLOGY_PASSWORD,
                    "--dir",
                    dir.path().to_str().unwrap(),
                ]
                .map(str::to_owned)
                .into();
                if tls.is_some() {
                    // The port given is the TLS one; no plain port.
                    args.extend(["--port", "0", "--tls-port"].map(str::to_owned));
                    args.push(port.to_string());
                    args.extend(tls_args.iter().cloned());
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                RedisServer::start_with(port, &args)
            })
            .collect();
        let cluster = RedisCluster {
            nodes,
            cli_tls,
            _dir: dir,
        };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        let replicas = replicas.to_string();
        args.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        cluster.cli(None, &args);
        for n in &cluster.nodes {
            wait_until(
                "the cluster is ok on every node",
                Duration::from_secs(20),
                || {
                    cluster
                        .cli(Some(n.port), &["cluster", "info"])
                        .contains("cluster_state:ok")
                },
            );
        }
        cluster
    }

    /// `redis-cli` (over TLS for a TLS cluster), on the node at `port` if given.
    fn cli(&self, port: Option<u16>, args: &[&str]) -> String {
        let port = port.map(|p| p.to_string());
        let mut all: Vec<&str> = self.cli_tls.iter().map(String::as_str).collect();
        if let Some(port) = &port {
            all.extend(["-p", port.as_str()]);
        }
        all.extend(args);
        redis_cli(&all)
    }

    /// The nodes' URLs, with the password (seed nodes for a client):
    /// `rediss://` for a TLS cluster.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.cli_tls.is_empty() {
            "redis"
        } else {
            "rediss"
        };
        self.nodes
            .iter()
            .map(|n| format!("{scheme}://:{TOPOLOGY_PASSWORD}@127.0.0.1:{}", n.port))
            .collect()
    }

    /// How many keys each node holds.
    pub fn keys_per_node(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|n| self.cli(Some(n.port), &["dbsize"]).trim().parse().unwrap())
            .collect()
    }
}

/// A master, one replica of it and one sentinel watching it as `mymaster`
/// (quorum 1, a master down after 1 s), on free loopback ports; stopped
/// when dropped.
pub struct RedisSentinel {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinel: RedisServer,
    _dir: tempfile::TempDir,
}

impl RedisSentinel {
    pub const MASTER_NAME: &'static str = "mymaster";

    pub fn start() -> RedisSentinel {
        Self::start_with(true)
    }

    /// The same, the sentinel itself answering without a password (the
    /// master and replica still want one).
    pub fn start_open_sentinel() -> RedisSentinel {
        Self::start_with(false)
    }

    fn start_with(sentinel_password: bool) -> RedisSentinel {
        let dir = tempfile::tempdir().unwrap();
        // A full sync writes a snapshot to each server's directory: the
        // test's own, one each, not the working directory.
        let (master_dir, replica_dir) = (dir.path().join("master"), dir.path().join("replica"));
        std::fs::create_dir(&master_dir).unwrap();
        std::fs::create_dir(&replica_dir).unwrap();
        let auth = [
            "--requirepass",
            TOPOLOGY_PASSWORD,
            "--masterauth",
            TOPOLOGY_PASSWORD,
        ];
        let mut master_args = auth.to_vec();
        master_args.extend(["--dir", master_dir.to_str().unwrap()]);
        let master = RedisServer::start_with(dead_address().port(), &master_args);
        let master_port = master.port.to_string();
        let mut replica_args = auth.to_vec();
        replica_args.extend(["--dir", replica_dir.to_str().unwrap()]);
        replica_args.extend(["--replicaof", "127.0.0.1", &master_port]);
        let replica = RedisServer::start_with(dead_address().port(), &replica_args);
        let port = dead_address().port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "dir {dir}\n\
                 sentinel monitor {name} 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n\
                 sentinel auth-pass {name} {pw}\n{require}",
                pw = TOPOLOGY_PASSWORD,
                require = if sentinel_password {
                    format!("requirepass {TOPOLOGY_PASSWORD}\n")
                } else {
                    String::new()
                },
                dir = dir.path().display(),
                name = Self::MASTER_NAME,
                master = master.port,
            ),
        )
        .unwrap();
        let sentinel = RedisServer::spawn(Some(&conf), port, &["--sentinel"]);
        let (m, r) = (master.port.to_string(), replica.port.to_string());
        wait_until("the replica is in sync", Duration::from_secs(20), || {
            redis_cli(&["-p", &r, "info", "replication"]).contains("master_link_status:up")
                && redis_cli(&["-p", &m, "info", "replication"]).contains("connected_slaves:1")
        });
        let s = sentinel.port.to_string();
        wait_until(
            "the sentinel knows the replica",
            Duration::from_secs(30),
            || redis_cli(&["-p", &s, "sentinel", "replicas", Self::MASTER_NAME]).contains(&r),
        );
        RedisSentinel {
            master,
            replica,
            sentinel,
            _dir: dir,
        }
    }

    /// The sentinel's URL, with the password it and the master share.
    pub fn sentinel_url(&self) -> String {
        format!(
            "redis://:{TOPOLOGY_PASSWORD}@127.0.0.1:{}",
            self.sentinel.port
        )
    }

    /// The master's port, as the sentinel names it now.
    pub fn master_port(&self) -> u16 {
        let out = redis_cli(&[
            "-p",
            &self.sentinel.port.to_string(),
            "sentinel",
            "get-master-addr-by-name",
            Self::MASTER_NAME,
        ]);
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

/// Asks the sentinel on `sentinel` to promote the replica on `replica`
/// now, and waits until the sentinel names it and it takes writes.
pub fn fail_over(sentinel: u16, replica: u16) {
    let s = sentinel.to_string();
    // The sentinel refuses while it judges no replica good yet (NOGOODSLAVE)
    // or a failover is under way: asked again until it accepts.
    wait_until(
        "the sentinel starts a failover",
        Duration::from_secs(30),
        || redis_cli_try(&["-p", &s, "sentinel", "failover", RedisSentinel::MASTER_NAME]).is_ok(),
    );
    wait_until(
        "the sentinel names the replica",
        Duration::from_secs(30),
        || {
            let out = redis_cli(&[
                "-p",
                &s,
                "sentinel",
                "get-master-addr-by-name",
                RedisSentinel::MASTER_NAME,
            ]);
            out.lines().nth(1).map(str::trim) == Some(replica.to_string().as_str())
        },
    );
    let r = replica.to_string();
    wait_until(
        "the promoted replica is a master",
        Duration::from_secs(30),
        || redis_cli(&["-p", &r, "role"]).starts_with("master"),
    );
}
