//! An egress proxy for the tests: Debian's `tinyproxy` (`scripts/test`
//! installs it) in the foreground on a free loopback port, with a config and
//! log file of its own, stopped by its pid when dropped. Its log (level
//! `Connect`) has a line per `CONNECT` and per forwarded request.

use std::time::Duration;

/// A running tinyproxy.
pub struct Tinyproxy {
    pub port: u16,
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Tinyproxy {
    /// A proxy that tunnels only to `connect_ports` (`CONNECT`) and, with
    /// `basic_auth`, serves only clients that send those credentials.
    pub fn start(connect_ports: &[u16], basic_auth: Option<(&str, &str)>) -> Tinyproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = super::os::dead_address().port();
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nLogLevel Connect\n\
             LogFile \"{}\"\nMaxClients 20\nTimeout 30\n",
            dir.path().join("tinyproxy.log").display()
        );
        for p in connect_ports {
            conf.push_str(&format!("ConnectPort {p}\n"));
        }
        if let Some((user, password)) = basic_auth {
            conf.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        let file = dir.path().join("tinyproxy.conf");
        std::fs::write(&file, conf).unwrap();
        let mut child = std::process::Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tinyproxy runs (install the Debian package tinyproxy)");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Tinyproxy { port, dir, child };
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("tinyproxy did not listen on {port} within 2 s");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default()
    }

    /// The requests it was sent (`CONNECT localhost:443 HTTP/1.1`, `GET
    /// http://… HTTP/1.1`), as its log shows them.
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split_once("]: Request (file descriptor "))
            .filter_map(|(_, rest)| rest.split_once("): "))
            .map(|(_, request)| request.to_owned())
            .collect()
    }

    /// Its `CONNECT` requests' targets (`host:port`).
    pub fn connects(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter_map(|r| r.strip_prefix("CONNECT "))
            .filter_map(|r| r.split(' ').next())
            .map(str::to_owned)
            .collect()
    }

    /// Waits (bounded) until its log shows `n` requests; its log is written
    /// as it goes, a moment after the client saw an answer.
    pub async fn requests_of(&self, n: usize) -> Vec<String> {
        for _ in 0..200 {
            let found = self.requests();
            if found.len() >= n {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.requests()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
