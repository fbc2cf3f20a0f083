//! The real binary (`CARGO_BIN_EXE_pandagate`) as a child process, with
//! only the environment a test gives it, serving on free loopback ports
//! whose addresses it read from the binary's diagnostics. How to stop it
//! and read all it wrote: [`super::finished`].

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::os::signal;

/// The real binary, serving, with its listeners known.
pub struct Running {
    pub child: tokio::process::Child,
    /// Diagnostics not yet read; kept so the pipe stays open.
    pub stderr: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    pub gateway: String,
    pub admin: String,
    /// The control listener (state-changing operator endpoints).
    pub control: String,
}

impl Running {
    /// Sends `sig` (e.g. "-TERM") to the gateway process.
    pub fn signal(&self, sig: &str) {
        signal(self.child.id().expect("still running"), sig);
    }
}

/// Starts `pandagate ARGS` with only `env` (plus free loopback ports and
/// JSON logs) and waits until both listeners are up.
pub async fn launch(args: &[&str], env: &[(&str, &str)]) -> Running {
    launch_with_stdout(args, env, std::process::Stdio::null()).await
}

/// Like [`launch`], with stdout (the access log) a pipe that is never read:
/// it stays open in `Running::child`.
pub async fn launch_stdout_unread(args: &[&str], env: &[(&str, &str)]) -> Running {
    launch_with_stdout(args, env, std::process::Stdio::piped()).await
}

async fn launch_with_stdout(
    args: &[&str],
    env: &[(&str, &str)],
    stdout: std::process::Stdio,
) -> Running {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pandagate"))
        .args(args)
        .env_clear()
        .env("PANDAGATE_LISTEN", "127.0.0.1:0")
        .env("PANDAGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PANDAGATE_CONTROL_LISTEN", "127.0.0.1:0")
        .env("PANDAGATE_LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut gateway, mut admin, mut control) = (None, None, None);
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap();
            let addr = v["addr"].as_str().map(str::to_owned);
            match v["message"].as_str() {
                Some("gateway listening") => gateway = addr,
                Some("admin listening") => admin = addr,
                Some("control listening") => control = addr,
                _ => {}
            }
            if gateway.is_some() && admin.is_some() && control.is_some() {
                return;
            }
        }
        panic!("exited before listening");
    })
    .await;
    assert!(found.is_ok(), "listening within 20 s");
    Running {
        child,
        stderr,
        gateway: gateway.unwrap(),
        admin: admin.unwrap(),
        control: control.unwrap(),
    }
}

/// Starts the binary with `server_extra` in `[server]`, `upstream`, a local
/// push store in `dir` and a callback listener of its own, with `env`;
/// returns it with the callback listener's address.
pub async fn launch_with_callback_listener(
    dir: &std::path::Path,
    upstream: &str,
    server_extra: &str,
    env: &[(&str, &str)],
) -> (Running, SocketAddr) {
    let config = dir.join("pandagate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\n{server_extra}\n\n[upstream]\nurl = \"{upstream}\"\n\n\
             [callbacks]\nlisten = \"127.0.0.1:0\"\nstore = \"{}\"\n",
            dir.join("store").display()
        ),
    )
    .unwrap();
    let mut gw = launch(&["--config", config.to_str().unwrap()], env).await;
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = gw.stderr.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["message"] == "callbacks listening" {
                return v["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap();
            }
        }
        panic!("exited before the callback listener was up");
    })
    .await;
    (gw, found.expect("callback listener within 10 s"))
}
