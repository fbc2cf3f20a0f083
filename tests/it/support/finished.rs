//! The binary stopped with SIGTERM, and everything it wrote: its
//! diagnostics (stderr, JSON lines, read as they come so that none is
//! dropped for a full pipe, even at `RUST_LOG=trace`) and, when it was
//! launched with a piped stdout, its access log.

use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::binary::Running;

/// What a stopped gateway wrote.
pub struct Finished {
    /// Every diagnostic line written after it started listening.
    pub diagnostics: Vec<serde_json::Value>,
    /// The same, as written.
    pub stderr: String,
    /// The access log, when stdout was piped.
    pub stdout: String,
}

impl Finished {
    /// The diagnostics whose message contains `text`.
    pub fn messages_with(&self, text: &str) -> Vec<&serde_json::Value> {
        self.diagnostics
            .iter()
            .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(text)))
            .collect()
    }
}

/// A running gateway whose output is being read.
pub struct Watched {
    pub child: tokio::process::Child,
    /// The traffic listener's address.
    pub gateway: String,
    stderr: tokio::task::JoinHandle<String>,
    stdout: tokio::task::JoinHandle<String>,
}

/// Starts reading everything `gw` writes.
pub fn watch(gw: Running) -> Watched {
    let Running {
        mut child,
        mut stderr,
        gateway,
        ..
    } = gw;
    let stderr = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let stdout_pipe = child.stdout.take();
    let stdout = tokio::spawn(async move {
        let mut all = String::new();
        if let Some(mut pipe) = stdout_pipe {
            let _ = pipe.read_to_string(&mut all).await;
        }
        all
    });
    Watched {
        child,
        gateway,
        stderr,
        stdout,
    }
}

impl Watched {
    /// Sends SIGTERM, waits (at most 20 s) for the exit and for the end of
    /// its output.
    pub async fn finish(mut self) -> Finished {
        super::os::signal(self.child.id().expect("still running"), "-TERM");
        let done = async {
            let _ = self.child.wait().await;
            (self.stderr.await.unwrap(), self.stdout.await.unwrap())
        };
        let (stderr, stdout) = tokio::time::timeout(Duration::from_secs(20), done)
            .await
            .expect("the gateway exits within 20 s of SIGTERM");
        Finished {
            diagnostics: stderr
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect(),
            stderr,
            stdout,
        }
    }
}

/// Stops `gw` and returns what it wrote from now on.
pub async fn finish(gw: Running) -> Finished {
    watch(gw).finish().await
}
