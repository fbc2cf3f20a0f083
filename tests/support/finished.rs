//! The binary stopped with SIGTERM, and everything it wrote: its
//! diagnostics (stderr, JSON lines) and, when it was launched with a piped
//! stdout, its access log.

use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::Running;

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

/// Sends SIGTERM, waits (at most 20 s) for the exit, and reads what is left
/// of its output.
pub async fn finish(mut gw: Running) -> Finished {
    let mut stdout_pipe = gw.child.stdout.take();
    gw.signal("-TERM");
    let read = async {
        let mut stderr = String::new();
        while let Ok(Some(line)) = gw.stderr.next_line().await {
            stderr.push_str(&line);
            stderr.push('\n');
        }
        let mut stdout = String::new();
        if let Some(pipe) = stdout_pipe.as_mut() {
            let _ = pipe.read_to_string(&mut stdout).await;
        }
        let _ = gw.child.wait().await;
        (stderr, stdout)
    };
    let (stderr, stdout) = tokio::time::timeout(Duration::from_secs(20), read)
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
