//! PostgreSQL, for the shared push store: a real PostgreSQL 15 server
//! (Debian package `postgresql`; `scripts/test` installs it) in a temporary
//! data directory on a free loopback port, with or without TLS.

use std::time::Duration;

use super::os::dead_address;
use super::tls::Issued;

/// A PostgreSQL 15 server on a free loopback port, in a temporary data
/// directory, stopped (fast shutdown) when dropped. Needs the Debian package
/// `postgresql` (`scripts/test` installs it). PostgreSQL refuses to run as
/// root, so as root it runs as the `postgres` system user.
pub struct PostgresServer {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<std::process::Child>,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn as_postgres(program: &str) -> std::process::Command {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let path = format!("{PG_BIN}/{program}");
    if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        std::process::Command::new(path)
    }
}

impl PostgresServer {
    pub fn start() -> PostgresServer {
        let dir = tempfile::tempdir().unwrap();
        let _ = std::process::Command::new("chown")
            .args(["postgres:postgres", dir.path().to_str().unwrap()])
            .status();
        let data = dir.path().join("data");
        let ok = as_postgres("initdb")
            .args(["-A", "trust", "-U", "pandagate", "--no-sync", "-D"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("initdb runs (install the Debian package postgresql)")
            .success();
        assert!(ok, "initdb");
        let port = dead_address().port();
        let mut pg = PostgresServer {
            dir,
            port,
            child: None,
        };
        pg.resume();
        pg
    }

    /// Starts the server again on its data directory and port.
    pub fn resume(&mut self) {
        let child = as_postgres("postgres")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("postgres runs");
        self.child = Some(child);
        for _ in 0..200 {
            let ready = std::process::Command::new(format!("{PG_BIN}/pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "postgres did not accept connections on {} within 10 s",
            self.port
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://pandagate@127.0.0.1:{}/postgres", self.port)
    }

    /// Fast shutdown (SIGINT to the postmaster, through its pid file:
    /// runuser does not pass signals on), waiting for it to end.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_owned))
        {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid])
                .status();
        }
        for _ in 0..200 {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL server with `ssl = on` and `cert`. With `tls_only`, a TCP
/// client that does not use TLS is refused (`hostssl` in `pg_hba.conf`).
pub fn postgres_tls(cert: &Issued, tls_only: bool) -> PostgresServer {
    let mut pg = PostgresServer::start();
    pg.stop();
    let data = pg.dir.path().join("data");
    std::fs::copy(&cert.cert, data.join("server.crt")).unwrap();
    std::fs::copy(&cert.key, data.join("server.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    // As root, the server runs as `postgres`, which must own its key.
    let _ = std::process::Command::new("chown")
        .args(["postgres:postgres"])
        .arg(data.join("server.crt"))
        .arg(data.join("server.key"))
        .stderr(std::process::Stdio::null())
        .status();
    let conf = data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    std::fs::write(&conf, text).unwrap();
    if tls_only {
        let hba = data.join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba).unwrap();
        let only_tls: String = text
            .lines()
            .map(|line| match line.strip_prefix("host ") {
                Some(rest) => format!("hostssl {rest}\n"),
                None => format!("{line}\n"),
            })
            .collect();
        std::fs::write(&hba, only_tls).unwrap();
    }
    pg.resume();
    pg
}
